"""Nothing recomputed, nothing served stale (issue 20, point 5): stages.json keeps each finished stage's key as the
stage finishes, so a run killed in render is resumed with its paths and spectra untouched; and each input a stage
reads (the base weights, one solution, the evaluation subset and its examples, the precision, --cutoff-len, the
4-bit setting) changes its key, so a rerun recomputes it and never returns the old numbers.

The runs are the main job on a tiny random Llama and fabricated commonsense files (seconds each)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from landscape import stages as stage_log
from landscape.config import RunConfig
from tests import procs
from tests.conftest import reseal
from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm

RUN = ["--dataset", "commonsense", "--train-steps", "1", "--grid", "3", "--eval-samples", "6", "--path-points", "3",
       "--no-progress"]  # fmt: skip
TRAIN_FILE = "ft-training_set/commonsense_170k.json"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=16, n_test=4)


def main(llama: Path, data_root: Path, out: Path, *flags: str) -> list[str]:
    """The main job in this process; its stderr lines (it must succeed)."""
    from landscape import connectivity
    from tests.nodraw import figures_not_drawn

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), figures_not_drawn():
        code = connectivity.main(["--model", f"hf:{llama}", "--data-root", str(data_root), "--out", str(out),
                                  *RUN, *flags])  # fmt: skip
    lines = err.getvalue().splitlines()
    assert code == 0, lines
    return lines


def recomputed(err: list[str], stage: str) -> bool:
    done, reused = any(e.startswith(f"[{stage}] done in") for e in err), f"[{stage}] reused" in "\n".join(err)
    assert done != reused, err  # one or the other, said once
    return done


def numbers(out: Path) -> dict:
    """What the stages computed: the grid's and the paths' losses, and the spectra."""
    with np.load(out / "landscape.npz") as grid, np.load(out / "paths.npz") as paths:
        found = {"grid": grid["loss"].copy(), "paths": paths["loss"].copy()}
    found["spectrum"] = json.loads((out / "spectrum.json").read_text())["layers"]
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory, llama, data_root) -> Path:
    """One finished run: each test copies it and changes one thing."""
    out = tmp_path_factory.mktemp("finished") / "run"
    main(llama, data_root, out)
    return out


# ----------------------------------------------------------------------------------- a run killed in render


def die_in_render() -> None:
    """In the child run (tests.procs patch): SIGKILL itself when render starts."""
    from landscape import connectivity

    connectivity.render_landscape = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)


def test_a_run_killed_in_render_keeps_its_paths_and_spectra(llama, data_root, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", f"hf:{llama}", "--data-root", str(data_root), "--out", str(out), *RUN]
    log = tmp_path / "killed.log"
    code = procs.run(argv, log, patch="tests.test_stages:die_in_render", draw=False)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (out / "landscape.json").exists()  # written last: the kill came before it
    records = stage_log.read(out)
    assert {"train_ft", "train_lora", "train_randlora", "grid", "paths", "spectrum"} <= set(records)
    assert "render" not in records
    files = [out / name for stage in ("paths", "spectrum") for name in records[stage]["outputs"]]
    assert {"paths.npz", "spectrum.json"} <= {f.name for f in files}
    before = {f: f.stat().st_mtime_ns for f in files}

    err = main(llama, data_root, out)
    assert not recomputed(err, "paths") and not recomputed(err, "spectrum")
    assert {f: f.stat().st_mtime_ns for f in files} == before  # not rewritten
    meta = json.loads((out / "landscape.json").read_text())
    assert {"paths", "spectrum"} <= set(meta["reused_stages"])
    assert meta["paths"] == records["paths"]["summary"]  # the summary comes from stages.json
    assert meta["stage_keys"]["paths"] == records["paths"]["key"] and "render" in stage_log.read(out)


def test_paths_rewritten_by_the_paths_recipe_are_not_taken_for_the_runs(finished, llama, data_root, tmp_path):
    """``landscape.paths --run`` writes into the run folder with its own settings: the next run sees the file
    changed since it was recorded and recomputes its paths."""
    from landscape import paths

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert paths.main(["--run", str(out), "--points", "5", "--no-progress"]) == 0
    with np.load(out / "paths.npz") as f:
        assert f["loss"].shape[1] == 5
    err = main(llama, data_root, out)
    assert recomputed(err, "paths") and not recomputed(err, "spectrum")
    with np.load(out / "paths.npz") as f, np.load(finished / "paths.npz") as g:
        np.testing.assert_array_equal(f["loss"], g["loss"])  # the run's own 3 points again


# ---------------------------------------------------------------------------------- each input in turn


@contextlib.contextmanager
def edited(path: Path, edit):
    """``path`` changed by ``edit(path)`` for the block, restored after (the module's files are shared)."""
    saved = path.with_name(path.name + ".saved")
    shutil.copy2(path, saved)
    try:
        edit(path)
        yield
    finally:
        shutil.move(saved, path)


def other_weights(llama: Path):
    def edit(path: Path) -> None:
        other = save_tiny_causal_lm(path.parent.parent / "other-llama", "llama", seed=1)
        shutil.copy2(other / path.name, path)

    return edited(llama / "model.safetensors", edit)


def doubled_lora(out: Path):
    """The LoRA solution's update doubled in its own file (its folder's training key unchanged)."""

    def edit(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        save_file({k: 2 * v if "lora_B" in k else v for k, v in tensors.items()}, path)
        reseal(path.parent)  # another solution copied in whole (its record too), not a damaged one

    return edited(out / "solutions" / "lora" / "adapter_model.safetensors", edit)


def reworded(data_root: Path):
    """The same examples and answers, their questions reworded: other tokens, the same labels."""

    def edit(path: Path) -> None:
        path.write_text(path.read_text().replace("question:", "query:"))

    return edited(data_root / TRAIN_FILE, edit)


# change -> (flags, stages that read it and must be recomputed); every other reused stage must be reused
CHANGES = {
    "base weights": ((), {"paths", "spectrum"}),
    "one solution": ((), {"paths", "spectrum"}),
    "eval subset": (("--eval-samples", "5"), {"paths"}),
    "eval examples edited in place": ((), {"paths", "spectrum"}),  # retrained too: their training text changed
    "precision": (("--dtype", "bfloat16"), {"paths"}),
    "cutoff-len": (("--cutoff-len", "40"), {"paths", "spectrum"}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_input_is_recomputed_never_served_old(change, finished, llama, data_root, tmp_path):
    flags, expected = CHANGES[change]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old = numbers(out)
    edits = {"base weights": lambda: other_weights(llama), "one solution": lambda: doubled_lora(out),
             "eval examples edited in place": lambda: reworded(data_root)}  # fmt: skip
    with edits.get(change, contextlib.nullcontext)():
        err = main(llama, data_root, out, *flags, "--restart")  # --restart: the grid's old points are dropped
    new = numbers(out)
    for stage in stage_log.REUSED:
        assert recomputed(err, stage) == (stage in expected), (change, stage)
    assert not np.array_equal(new["grid"], old["grid"], equal_nan=True)
    for stage in expected:  # never the old numbers
        assert new[stage] != old[stage] if stage == "spectrum" else not np.array_equal(new[stage], old[stage]), stage
    for stage in set(stage_log.REUSED) - expected:  # and no work redone for nothing
        assert new[stage] == old[stage] if stage == "spectrum" else np.array_equal(new[stage], old[stage]), stage
    if change == "one solution":  # the other solutions' training is reused; only their update changed
        assert all(f"[train {m}] reusing" in "\n".join(err) for m in ("ft", "lora", "randlora"))


def test_a_changed_input_without_restart_is_refused_not_served_old(finished, llama, data_root, tmp_path):
    """The grid keeps its points under a key of its own: another evaluation set fails with a hint, in one line."""
    from landscape import connectivity

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), reworded(data_root):
        code = connectivity.main(["--model", f"hf:{llama}", "--data-root", str(data_root), "--out", str(out), *RUN])
    lines = [e for e in err.getvalue().splitlines() if "error" in e]
    assert code == 2 and len(lines) == 1 and "--restart" in lines[0], err.getvalue()


def test_the_4bit_setting_changes_the_base_input(llama, data_root, tmp_path):
    pytest.importorskip("bitsandbytes")
    from landscape.config import from_argv
    from landscape.run import load

    def base(*flags: str) -> tuple[str, dict]:
        config = from_argv(["--model", f"hf:{llama}", "--data-root", str(data_root), "--out", str(tmp_path), *RUN,
                            *flags])  # fmt: skip
        loaded = load(config)
        return stage_log.base_digest(loaded), stage_log.stage_key("spectrum", config, {"base": "-", "solutions": "-",
                                                                                        "device": "cpu"})  # fmt: skip

    plain, packed = base(), base("--load-4bit")
    assert plain[0] != packed[0] and plain[1] != packed[1]


# ------------------------------------------------------------------------------------------- the key table


def test_every_setting_is_placed_in_one_group():
    placed = [f for group in stage_log.FIELD_GROUPS.values() for f in group]
    assert len(placed) == len(set(placed)), "a setting in two groups"
    assert set(placed) == set(RunConfig.__dataclass_fields__), "place every RunConfig field in FIELD_GROUPS"


class Settings:
    def __init__(self, values: dict):
        self.values = values

    def to_dict(self) -> dict:
        return dict(self.values)


@pytest.mark.parametrize("stage", list(stage_log.STAGE_READS))
def test_each_thing_a_stage_reads_changes_its_key(stage):
    reads = stage_log.STAGE_READS[stage]
    settings = RunConfig().to_dict()
    inputs = {name: f"digest-of-{name}" for name in stage_log.INPUTS}
    key = stage_log.stage_digest(stage, Settings(settings), inputs)
    assert set(reads.inputs) <= set(stage_log.INPUTS)
    for name in reads.config:
        assert stage_log.stage_digest(stage, Settings({**settings, name: ["changed"]}), inputs) != key, name
    for name in reads.inputs:
        assert stage_log.stage_digest(stage, Settings(settings), {**inputs, name: "other"}) != key, name
    assert stage_log.stage_digest(stage, Settings({**settings, "progress": False}), inputs) == key  # run-only


def test_the_spectrum_key_covers_the_base_model():
    """The spectra hold W0's and W0 + ΔW's: another base is another spectrum, with the same updates."""
    reads = stage_log.STAGE_READS["spectrum"]
    assert "base" in reads.inputs and {"model", "torch_dtype", "load_4bit"} <= set(reads.config)


def test_stage_log_records_forgets_and_checks_outputs(tmp_path):
    log = stage_log.StageLog(tmp_path)
    (tmp_path / "a.json").write_text("{}")
    log.record("paths", "k1", [tmp_path / "a.json"], 1.5, summary={"x": 1})
    again = stage_log.StageLog(tmp_path)  # read back from stages.json
    assert again.reusable("paths", "k1")["summary"] == {"x": 1} and again.reusable("paths", "k2") is None
    assert again.seconds() == {"paths": 1.5}
    (tmp_path / "a.json").write_text('{"other": 1}')
    assert again.reusable("paths", "k1") is None  # rewritten since (another recipe): recomputed
    (tmp_path / "a.json").write_text("{}")
    assert again.reusable("paths", "k1") is not None
    (tmp_path / "a.json").unlink()
    assert again.reusable("paths", "k1") is None  # an output gone: recomputed
    again.forget("paths")
    assert stage_log.read(tmp_path) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.json"]  # atomic writes leave no temp files
    (tmp_path / "stages.json").write_text("{not json")
    assert stage_log.StageLog(tmp_path).records == {}
