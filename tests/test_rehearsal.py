"""experiments.rehearsal drives the real command lines per variant; gpu_check --rehearsal refuses without CUDA.

The rehearsal itself (the Qwen2-0.5B shape) is measured, not tested: see experiments/benchmarks/results/.
Here a tiny random Llama stands in for it, so the driver's whole path runs: model and data fabrication,
``landscape.connectivity`` with the rehearsal TOML, ``landscape.curvature`` in adapter coordinates, the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.llm_models import save_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_rehearsal_runs_every_stage_of_each_variant(tmp_path):
    from experiments import rehearsal

    model = save_tiny_causal_lm(tmp_path / "tiny", "llama")
    out, report = tmp_path / "rehearsal", tmp_path / "rehearsal.json"
    # the 4-bit variant alone: the fp32 one is the same sequence without --load-4bit (two variants took 64 s of
    # the suite on a 2-core Zen 3; the table's rows per variant are checked below all the same)
    code = rehearsal.main(["--model", f"hf:{model}", "--out", str(out), "--variants", "4bit",
                           "--json", str(report)])  # fmt: skip
    written = json.loads(report.read_text())
    results = {r["variant"]: r for r in written["results"]}
    logs = {v: (out / v / "connectivity.log").read_text()[-2000:] for v in results}
    assert code == 0, logs
    for variant, r in results.items():
        meta = json.loads((out / variant / "landscape.json").read_text())
        stages = {s["stage"]: s for s in r["stages"]}
        # every stage of the pipeline ran (fresh folder: nothing reused), each with its own peak RSS, which no
        # stage can exceed the process's (wait4's) peak
        assert {"train_lora", "train_randlora", "grid", "paths", "spectrum"} <= set(meta["wall_time_s"]), variant
        assert set(meta["wall_time_s"]) < set(stages) and {"curvature lora", "curvature randlora"} < set(stages)
        for name in meta["wall_time_s"]:
            assert stages[name]["seconds"] == meta["wall_time_s"][name]
            assert 0 < stages[name]["peak_rss"] <= r["connectivity"]["peak_rss"], (variant, name)
        assert stages["curvature randlora"]["hvps"] >= 1
        # the stages and the processes' time outside them add up to the measured wall time
        total = r["connectivity"]["seconds"] + r["curvature"]["seconds"]
        assert abs(sum(s["seconds"] for s in r["stages"]) - total) < 0.5
        # CPU seconds per connectivity stage (from /proc) add up to the process's (from wait4)
        connectivity = [s for s in r["stages"] if not s["stage"].startswith("curvature")]
        assert all(s["cpu_seconds"] is not None for s in connectivity)
        assert abs(sum(s["cpu_seconds"] for s in connectivity) - r["connectivity"]["cpu_seconds"]) < 0.5
        assert len(r["connectivity"]["load_average"]) == 6
        assert meta["config"]["randlora_rank"] == 30 and meta["config"]["grid"] == 3
        eig = r["top_eigenvalue"]
        assert set(eig) == {"lora", "randlora"} and all(torch.isfinite(torch.tensor(v)) for v in eig.values())
        curvature = json.loads((out / variant / "curvature.json").read_text())
        assert curvature["settings"]["tol"] == rehearsal.CURVATURE_TOL and curvature["settings"]["top_k"] == 1
        # the table has one row per stage of the variant, and the CPU it ran on
        rows = [line for line in written["table"].splitlines() if line.startswith(variant + " ")]
        assert len(rows) == len(r["stages"]) + 2 and rows[-1].split()[1] == "total"
    assert "CPU:" in written["table"] and written["cpus"] == os.cpu_count()
    assert json.loads((out / "4bit" / "landscape.json").read_text())["config"]["load_4bit"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_rehearsal_needs_cuda():
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--rehearsal"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=120)  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "CUDA" in err[0], proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_rehearsal_on_cuda_without_a_gpu_is_refused_before_the_model_is_built(tmp_path):
    out = tmp_path / "rehearsal"
    argv = ["--device", "cuda", "--model", "llama3-8b", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "experiments.rehearsal", *argv], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "--device cuda" in err[0], proc.stderr
    assert not out.exists()  # no data fabricated, no 8B model started


@pytest.mark.parametrize("layers", ["0", "25"])
def test_rehearsal_refuses_an_impossible_depth_before_work(tmp_path, layers):
    proc = subprocess.run([sys.executable, "-m", "experiments.rehearsal", "--layers", layers, "--out", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "--layers" in err[0], proc.stderr
    assert not any(tmp_path.iterdir())  # nothing fabricated, nothing built


def test_table_names_a_killed_stage():
    from experiments import rehearsal

    ok = {"exit": 0, "seconds": 10.0, "cpu_seconds": 8.0, "peak_rss": 2e9, "load_average": [1.0] * 6}
    killed = ok | {"exit": -9, "seconds": 5.0, "cpu_seconds": 1.0, "peak_rss": 3e9}
    result = {"variant": "fp32", "connectivity": ok, "curvature": killed,
              "stages": [{"stage": "grid", "seconds": 10.0, "cpu_seconds": 8.0, "peak_rss": 2e9}]}  # fmt: skip
    text = rehearsal.table([result], "qwen2-0.5b", 4)
    total = next(line for line in text.splitlines() if line.startswith("fp32     total"))
    assert "FAILED: curvature exit -9" in total and "out-of-memory" in total and "connectivity exit" not in total
    assert "4 of 24 decoder layers (reduced)" in text and "15 s wall, 9 CPU s" in text
