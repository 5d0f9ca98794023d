"""The run configuration: layered sources, and every bad value refused in one line before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.errors import UserError
from landscape import config as run_config
from landscape import connectivity
from tests import nodraw

TINY = ["--model", "tiny-bert", "--train-steps", "2", "--grid", "3", "--eval-samples", "16", "--path-points", "2",
        "--train-per-class", "12", "--test-per-class", "4", "--no-progress"]  # fmt: skip


def resolve(*argv: str) -> run_config.RunConfig:
    return run_config.from_argv(list(argv))


def test_layers_defaults_preset_file_command_line(tmp_path):
    quick = resolve()
    assert (quick.preset, quick.grid, quick.eval_samples, quick.train_steps) == ("quick", 11, 320, 150)
    full = resolve("--preset", "full", "--grid", "7")
    assert (full.grid, full.eval_samples, full.train_steps) == (7, 2000, 1500)
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nepochs = 2\nlr = { ft = 1e-4 }\n[landscape]\ngrid = 5\neval_batch = 64\n")
    cfg = resolve("--config", str(toml), "--grid", "9")
    assert (cfg.grid, cfg.eval_batch, cfg.epochs, cfg.train_steps, cfg.lr) == (9, 64, 2, None, {"ft": 1e-4})
    assert cfg.steps_for(100) == 7  # 2 epochs of 100 samples at batch 32, rounded up
    # A layer that sets the length in epochs replaces steps from the layers below, and the reverse.
    assert resolve("--epochs", "1").train_steps is None and resolve("--epochs", "1").epochs == 1
    assert resolve("--config", str(toml), "--train-steps", "4").epochs is None
    paper = resolve("--dataset", "cifar100")
    assert (paper.preset, paper.grid, paper.batch_size, paper.lora_rank, paper.randlora_rank) == (
        "paper",
        25,
        128,
        32,
        6,
    )
    assert paper.sources["grid"] == "cifar100.toml [landscape] grid"
    assert resolve("--no-progress").progress is False and resolve().progress is True


@pytest.mark.parametrize(
    ("argv", "toml", "names"),
    [
        (["--batch-size", "0"], None, "--batch-size"),
        (["--grad-accum", "0"], None, "--grad-accum"),
        (["--epochs", "0"], None, "--epochs"),
        (["--randlora-rank", "0"], None, "--randlora-rank"),
        (["--lora-rank", "-3"], None, "--lora-rank"),
        (["--grid", "1"], None, "--grid"),
        (["--eval-samples", "-1"], None, "--eval-samples"),
        (["--path-points", "1"], None, "--path-points"),
        (["--path-extend", "-0.5"], None, "--path-extend"),
        (["--threads", "0"], None, "--threads"),
        (["--batch-size", "30", "--grad-accum", "4"], None, "--grad-accum"),
        (["--dataset", "imagenet"], None, "unknown dataset 'imagenet'"),
        ([], '[landscape]\ndtype = "fp8"\n', "[landscape] dtype"),
        ([], '[train]\ndtype = "float16"\n', "[train] dtype"),
        ([], "[landscape]\neval_batch = 0\n", "[landscape] eval_batch"),
        ([], "[train]\nlr = { ft = -1e-4 }\n", "[train] lr"),
        ([], "[train]\nlr = { fft = 1e-4 }\n", "[train] lr"),
        ([], "[train]\nweight_decay = -0.1\n", "[train] weight_decay"),
        ([], '[landscape]\nchart = "polar"\n', "[landscape] chart"),
        ([], "[landscape]\nx_range = [1.0, -1.0]\n", "[landscape] x_range"),
        ([], "[landscape]\ngrid = 2.5\n", "wrong type"),
        ([], "[landscape]\nsize = 3\n", "unknown key 'size'"),
    ],
)
def test_bad_values_are_refused_naming_their_source(tmp_path, argv, toml, names):
    if toml is not None:
        (tmp_path / "bad.toml").write_text(toml)
        argv = [*argv, "--config", str(tmp_path / "bad.toml")]
    with pytest.raises(UserError, match=f".*{names.replace('[', '.').replace(']', '.')}.*") as err:
        resolve(*argv)
    assert "\n" not in str(err.value)


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "landscape.connectivity", *argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_command_line_exits_2_with_one_line_before_any_work(tmp_path):
    """In a process of its own (the real command line): exit status 2, one line, nothing written."""
    out = tmp_path / "out"
    done = _cli("--model", "tiny-bert", "--out", str(out), "--batch-size", "0", cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [["--batch-size", "0"], ["--grad-accum", "0"], ["--epochs", "0"], ["--randlora-rank", "0"]],
    ids=["batch-size", "grad-accum", "epochs", "randlora-rank"],
)
def test_main_returns_2_with_one_line_naming_the_option(tmp_path, capsys, argv):
    """The message of each (in this process: the real process's exit and output are checked above)."""
    out = tmp_path / "out"
    assert connectivity.main(["--model", "tiny-bert", "--out", str(out), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and argv[0] in lines[0], lines
    assert not out.exists()


@pytest.fixture(scope="module", autouse=True)
def figures_not_drawn():
    """No assertion here reads a figure: the runs build them but do not draw them (tests.nodraw)."""
    with nodraw.figures_not_drawn():
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, wordnet_root):
    out = tmp_path_factory.mktemp("cfg") / "run"
    args = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY]
    assert connectivity.main(args) == 0
    return out, args


def test_solutions_under_another_methods_name_are_refused_up_front(finished_run, tmp_path, capsys):
    run, args = finished_run
    lora = run / "solutions" / "lora"
    out = tmp_path / "other"
    argv = [
        *args[: args.index("--out")],
        "--out",
        str(out),
        *args[args.index("--out") + 2 :],
        "--solutions",
        f"ft={lora}",
    ]
    assert connectivity.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a lora solution, not ft" in err[0]
    assert not (out / "solutions").exists()


def test_stale_grid_is_refused_before_any_training(finished_run, tmp_path, capsys):
    run, args = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for name in ("lora", "randlora"):  # force retraining of two solutions if the check came late
        shutil.rmtree(copy / "solutions" / name)
    argv = [a if a != str(run) else str(copy) for a in args]
    argv[argv.index("--train-steps") + 1] = "3"  # other solutions: the checkpointed grid no longer applies
    assert connectivity.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "--restart" in err[-1] and "[train" not in captured.err
    assert not (copy / "solutions" / "lora").exists()
    assert connectivity.main([*argv, "--restart"]) == 0  # --restart discards the old points and runs


def test_landscape_json_records_the_resolved_config(finished_run):
    run, _ = finished_run
    meta = json.loads((run / "landscape.json").read_text())
    cfg = meta["config"]
    assert cfg["model"] == "tiny-bert" and cfg["train_steps"] == 2 and cfg["grid"] == 3 and cfg["preset"] == "quick"
    assert "sources" not in cfg
    rebuilt = run_config.RunConfig(**cfg).validate()
    assert rebuilt.to_dict() == cfg


@pytest.mark.parametrize("chart", ["random", "random-line", "hessian"])
def test_a_centre_the_run_does_not_make_is_refused_before_training(chart):
    """A chart around ft when the run trains only the adapters (or a 4-bit base, whose default is the adapters):
    refused while resolving the configuration (it was a KeyError after the training for the random charts)."""
    for given, shown in (({"methods": ["lora", "randlora"]}, "--center ft (the default)"),
                         ({"methods": ["lora"], "center": "randlora"}, "--center randlora")):  # fmt: skip
        with pytest.raises(UserError) as e:
            run_config.resolve({"chart": chart, **given})
        assert str(e.value).startswith(f"{shown}: is not among the solutions") and "\n" not in str(e.value)
    alone = {"chart": chart, "methods": ["lora"], "center": "lora", "path_points": 0}
    assert run_config.resolve(alone).center == "lora"


def test_a_plane_without_lora_or_randlora_is_refused_before_training():
    """The plane through the solutions needs LoRA and RandLoRA (the base model stands in for a missing FT): a run of
    FT alone, or of FT and one adapter, is refused while resolving (it was a KeyError in the plane after training)."""
    for methods, missing in ((["ft"], "no lora and no randlora"), (["ft", "lora"], "no randlora")):
        with pytest.raises(UserError) as e:
            run_config.resolve({"methods": methods})
        assert f"the run has {missing}" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert run_config.resolve({"methods": ["lora", "randlora"]}).method_set() == ("lora", "randlora")
    line = {"methods": ["ft"], "chart": "random-line", "center": "ft"}
    assert run_config.resolve({**line, "path_points": 0}).method_set() == ("ft",)


def test_paths_without_lora_or_randlora_are_refused_before_training():
    """A chart of one solution needs no plane, but the paths run between the three vertices: without LoRA or
    RandLoRA they are refused while resolving (they failed after the training and the grid, leaving files)."""
    for given, shown in (({}, "--path-points 11 (preset quick)"), ({"path_points": 5}, "--path-points 5")):
        for chart in ("random", "hessian"):
            with pytest.raises(UserError) as e:
                run_config.resolve({"methods": ["ft", "lora"], "chart": chart, "center": "ft", **given})
            message = str(e.value)
            assert message.startswith(shown) and "no randlora" in message and "--path-points 0" in message, message


def test_settings_that_apply_elsewhere_are_refused_not_ignored():
    """The causal-LM settings on a classification dataset, and --path-extend without paths, ran as if not given."""
    for argv, shown in ((["--generate-eval"], "--generate-eval:"), (["--eval-tokens", "100"], "--eval-tokens 100:"),
                        (["--tasks", "boolq", "piqa"], "--tasks boolq piqa:")):  # fmt: skip
        with pytest.raises(UserError) as e:
            resolve(*argv)
        assert str(e.value).startswith(shown) and "(--dataset commonsense) only, not to wordnet" in str(e.value)
    with pytest.raises(UserError, match=r"^--path-extend 0.5: extends the paths, and --path-points 0 runs none"):
        resolve("--path-points", "0", "--path-extend", "0.5")
    assert resolve("--path-points", "3", "--path-extend", "0.5").path_extend == 0.5
