"""The main job end to end on a tiny BERT and tiny data files, and exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from landscape import connectivity, spectrum
from tests import procs
from tests.conftest import TINY_RUN, free_port

TINY = TINY_RUN  # the arguments of run_dir, besides --dataset, --data-root and --out
OUTPUTS = ["landscape.npz", "landscape.json", "landscape.html", "landscape.png", "landscape.pdf",
           "spectrum.json", "spectrum.png"]  # fmt: skip


@pytest.fixture
def run_dir(tiny_wordnet_run):
    """The main job's tiny run (conftest: shared with other test files, read only)."""
    return tiny_wordnet_run


def test_end_to_end_writes_the_output_contract(run_dir):
    for name in OUTPUTS:
        assert (run_dir / name).stat().st_size > 0, name
    data = np.load(run_dir / "landscape.npz")
    nx, ny = len(data["x"]), len(data["y"])
    for key in ("loss", "accuracy", "loss_se"):
        assert data[key].shape == (ny, nx) and np.isfinite(data[key]).all()
    assert list(data["point_names"]) == ["ft", "lora", "randlora"]
    meta = json.loads((run_dir / "landscape.json").read_text())
    assert meta["seed"] == 0 and meta["eval_samples"] == 16 and meta["chart"] == "paper"
    assert set(meta["solutions"]) == {"ft", "lora", "randlora", "head_only"}
    # Vertices are grid points, and the stored vertex loss is the grid value there.
    for name, (px, py) in zip(data["point_names"], data["points"], strict=True):
        j, i = list(data["x"]).index(px), list(data["y"]).index(py)
        assert meta["solutions"][name]["vertex_loss"] == pytest.approx(data["loss"][i, j], abs=1e-12)
    spec = json.loads((run_dir / "spectrum.json").read_text())
    layer = spec["layers"][0]
    assert {"name", "shape", "ft", "lora", "randlora"} <= set(layer)
    assert {"singular_values", "rank", "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99"} <= set(
        layer["lora"]
    )
    html = (run_dir / "landscape.html").read_text()
    assert '<script src="http' not in html and "Plotly" in html
    for name in ("ft", "lora", "randlora", "head_only"):
        assert (run_dir / "solutions" / name / "solution.json").exists()
    assert (run_dir / "solutions" / "lora" / "adapter_model.safetensors").exists()


def test_peft_loads_saved_adapters(run_dir):
    from peft import PeftModel

    from adapters.models import get_model

    for name in ("lora", "randlora"):
        model = PeftModel.from_pretrained(get_model("tiny-bert").build(8), run_dir / "solutions" / name)
        assert sum(p.numel() for n, p in model.named_parameters() if "lora" in n) > 0


def test_rerun_reuses_solutions_and_gives_the_same_numbers(run_dir, wordnet_root, tmp_path, no_figure_drawing):
    out = tmp_path / "again"
    shutil.copytree(run_dir / "solutions", out / "solutions")
    assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY]) == 0
    a, b = np.load(run_dir / "landscape.npz"), np.load(out / "landscape.npz")
    assert np.array_equal(a["loss"], b["loss"]) and np.array_equal(a["x"], b["x"])


def test_solutions_option_and_orthonormal_chart(run_dir, wordnet_root, tmp_path, no_figure_drawing):
    out = tmp_path / "reuse"
    sols = [f"{n}={run_dir / 'solutions' / n}" for n in ("ft", "lora", "randlora")]
    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), "--chart", "orthonormal",
            "--solutions", *sols, *TINY]  # fmt: skip
    assert connectivity.main(argv) == 0
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["chart"] == "orthonormal" and meta["chart_geometry"]["distances"]["ft-lora"] > 0
    assert not (out / "solutions" / "ft").exists()  # reused, not retrained
    data = np.load(out / "landscape.npz")
    (x0, y0), (x1, y1) = data["points"][0], data["points"][1]  # ft, lora
    assert np.hypot(x0 - x1, y0 - y1) == pytest.approx(meta["chart_geometry"]["distances"]["ft-lora"], rel=1e-5)


def test_spectrum_cli_on_a_run(run_dir, tmp_path, no_figure_drawing):
    assert spectrum.main(["--run", str(run_dir), "--out", str(tmp_path), "--no-progress"]) == 0
    ours = json.loads((tmp_path / "spectrum.json").read_text())
    assert ours["layers"] == json.loads((run_dir / "spectrum.json").read_text())["layers"]


def _bad(argv, capsys, out):
    code = connectivity.main([*TINY, *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and "Traceback" not in "\n".join(err)
    assert not out.exists(), "bad input must leave no output behind"
    return err[-1]


def test_bad_inputs_exit_2_with_one_line(run_dir, wordnet_root, tmp_path, capsys):
    wn = ["--dataset", "wordnet", "--data-root", str(wordnet_root)]
    assert "unknown dataset 'cifar10'" in _bad(["--dataset", "cifar10"], capsys, tmp_path / "a")
    assert "unknown model 'gpt9'" in _bad([*wn, "--model", "gpt9"], capsys, tmp_path / "b")
    assert "apt-get install wordnet-base" in _bad(
        ["--dataset", "wordnet", "--data-root", str(tmp_path)], capsys, tmp_path / "c"
    )
    assert "NAME one of ft, lora, randlora" in _bad([*wn, "--solutions", f"dora={run_dir}"], capsys, tmp_path / "d")
    assert "does not exist" in _bad([*wn, "--solutions", f"ft={tmp_path / 'nope'}"], capsys, tmp_path / "e")
    assert "too small" in _bad([*wn, "--grid", "1"], capsys, tmp_path / "f")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir / "solutions" / "ft", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "corrupt" in _bad([*wn, "--solutions", f"ft={corrupt}"], capsys, tmp_path / "g")

    bad_json = tmp_path / "bad_json"
    shutil.copytree(run_dir / "solutions" / "lora", bad_json)
    (bad_json / "solution.json").write_text("{ not json")
    assert "corrupt" in _bad([*wn, "--solutions", f"lora={bad_json}"], capsys, tmp_path / "h")

    other_base = tmp_path / "other_base"
    shutil.copytree(run_dir / "solutions" / "randlora", other_base)
    info = json.loads((other_base / "solution.json").read_text())
    info["base_fingerprint"] = "0123456789abcdef"
    (other_base / "solution.json").write_text(json.dumps(info))
    assert "different base model" in _bad([*wn, "--solutions", f"randlora={other_base}"], capsys, tmp_path / "i")

    other_model = tmp_path / "other_model"
    shutil.copytree(run_dir / "solutions" / "ft", other_model)
    info = json.loads((other_model / "solution.json").read_text())
    info["model"] = "minilm"
    (other_model / "solution.json").write_text(json.dumps(info))
    assert "pass matching solutions" in _bad([*wn, "--solutions", f"ft={other_model}"], capsys, tmp_path / "j")


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "landscape.connectivity", "--dataset", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def _reuse_argv(run_dir, wordnet_root, out, *extra):
    sols = [f"{n}={run_dir / 'solutions' / n}" for n in ("ft", "lora", "randlora")]
    return ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY,
            "--path-points", "0", "--solutions", *sols, *extra]  # fmt: skip


def test_torchrun_two_gloo_processes_equal_one_process(run_dir, wordnet_root, tmp_path):
    """The grid of run_dir (one process, which evaluated its solutions as saved) by torchrun on those solutions."""
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "landscape.connectivity", *_reuse_argv(run_dir, wordnet_root, multi)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = np.load(run_dir / "landscape.npz"), np.load(multi / "landscape.npz")
    for key in ("x", "y", "loss", "accuracy", "loss_se"):
        np.testing.assert_array_equal(a[key], b[key])
    assert json.loads((multi / "landscape.json").read_text())["world_size"] == 2


def test_sigkill_mid_grid_then_resume_equals_uninterrupted(run_dir, wordnet_root, tmp_path, capsys, no_figure_drawing):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    argv = ["--grid", "9", "--eval-samples", "96"]
    assert connectivity.main(_reuse_argv(run_dir, wordnet_root, clean, *argv)) == 0
    # a process of its own, forked from a server that has imported the toolkit (tests.procs)
    proc = procs.start(_reuse_argv(run_dir, wordnet_root, killed, *argv), tmp_path / "killed.log", draw=False)
    checkpoint = killed / ".grid" / "rank0.npz"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            with np.load(checkpoint) as f:
                if len(f["i"]) >= 3:
                    break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()  # SIGKILL
    proc.wait()
    assert not (killed / "landscape.npz").exists()
    assert connectivity.main(_reuse_argv(run_dir, wordnet_root, killed, *argv)) == 0
    meta = json.loads((killed / "landscape.json").read_text())
    assert meta["grid_points_computed_this_run"] < 81
    a, b = np.load(clean / "landscape.npz"), np.load(killed / "landscape.npz")
    for key in ("loss", "accuracy", "loss_se"):
        np.testing.assert_array_equal(a[key], b[key])

    # the same folder with another configuration is refused, and --restart discards the old points
    capsys.readouterr()
    assert connectivity.main(_reuse_argv(run_dir, wordnet_root, killed, "--grid", "9", "--eval-samples", "64")) == 2
    assert "--restart" in capsys.readouterr().err
    assert connectivity.main(_reuse_argv(run_dir, wordnet_root, killed, "--grid", "9", "--eval-samples", "64",
                                         "--restart")) == 0  # fmt: skip


def test_figures_command_on_a_tiny_run(run_dir, tmp_path):
    from experiments import figures

    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "wordnet")
    gallery = tmp_path / "gallery.md"
    gallery.write_text(f"# x\n\n{figures.START}\nold\n{figures.END}\nafter\n")
    argv = ["--only", "wordnet", "--runs", str(runs), "--figures", str(tmp_path / "fig"), "--gallery", str(gallery),
            "--readme", str(tmp_path / "no-README.md"), "--claims-page", str(tmp_path / "no-claims.md")]  # fmt: skip
    assert figures.main(argv) == 0
    text = gallery.read_text()
    assert "old" not in text and text.endswith("after\n")
    assert "| LoRA |" in text and "beat the head-only baseline" in text
    meta = json.loads((run_dir / "landscape.json").read_text())
    assert f"{meta['solutions']['randlora']['test_accuracy']:.4f}" in text  # numbers come from the run
    for name in ("landscape.png", "spectrum.png", "rank.png", "similarity.png"):
        assert (tmp_path / "fig" / f"wordnet_{name}").stat().st_size > 0
