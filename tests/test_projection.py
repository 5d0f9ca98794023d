"""experiments.benchmarks.projection: the H200 arithmetic against a hand computation, its labelling, the
preset's grid read from the TOML, bad input refused before work, and gpu_check --grid-projection without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.benchmarks import projection as proj

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_projection_arithmetic_by_hand():
    # 1,000 tokens per point, 625 points, 1 GFLOP per token: 6.25e14 FLOPs; at 1e15 FLOP/s x 0.5: 1.25 s.
    # The CPU at 2,000 tokens/s needs 625,000 tokens / 2,000 = 312.5 s and runs 2e12 FLOP/s.
    out = proj.project_grid_wall_time(1000, 625, 1e9, cpu_tokens_per_s=2000, peak_flops=1e15, efficiency=0.5)
    assert out["total_tokens"] == 625_000 and out["total_flops"] == pytest.approx(6.25e14)
    assert out["projected_seconds"] == pytest.approx(1.25)
    assert out["projected_tokens_per_s"] == pytest.approx(500_000)
    assert out["cpu_seconds_at_measured_rate"] == pytest.approx(312.5)
    assert out["cpu_flops_per_s"] == pytest.approx(2e12)
    assert out["label"].startswith("PROJECTION") and "not measured" in out["label"]
    # the defaults are the stated H200 assumptions: 989 TFLOP/s dense bf16 at 0.3
    default = proj.project_grid_wall_time(1000, 625, 1e9)
    assert default["projected_seconds"] == pytest.approx(6.25e14 / (989e12 * 0.3))
    assert "cpu_seconds_at_measured_rate" not in default


@pytest.mark.parametrize(
    "kwargs",
    [dict(tokens_per_point=0), dict(points=0), dict(flops_per_token=-1.0), dict(efficiency=0.0),
     dict(efficiency=1.5), dict(cpu_tokens_per_s=0.0)],
)  # fmt: skip
def test_projection_refuses_meaningless_inputs(kwargs):
    args = dict(tokens_per_point=10, points=4, flops_per_token=1.0) | kwargs
    with pytest.raises(ValueError):
        proj.project_grid_wall_time(**args)


def test_preset_grid_is_the_real_size_toml():
    preset = proj.preset_grid()
    assert preset["points"] == 625 and preset["samples"] == 512  # experiments/paper/commonsense.toml


def test_cli_measures_then_labels_the_projection(tmp_path):
    report = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "experiments.benchmarks.projection", "--quick", "--samples", "4", "--json"]
    proc = subprocess.run([*cmd, str(report)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(report.read_text())
    m, p, preset = written["measured"], written["projection"], written["preset"]
    # the projection is the preset's size times what was measured, redone by hand from the written inputs
    assert p["points"] == preset["points"] == 625
    assert p["tokens_per_point"] == pytest.approx(m["tokens"] / m["samples"] * 512)
    assert p["flops_per_token"] == pytest.approx(m["flops"] / m["tokens"]) and m["flops"] > 0
    hand = m["tokens"] / 4 * 512 * 625 * (m["flops"] / m["tokens"]) / (989e12 * 0.3)
    assert p["projected_seconds"] == pytest.approx(hand)
    assert p["cpu_seconds_at_measured_rate"] == pytest.approx(m["tokens"] / 4 * 512 * 625 / m["tokens_per_s"])
    # every printed H200 figure says it is a projection; the CPU is named
    h200 = [line for line in proc.stdout.splitlines() if "H200" in line]
    assert h200 and all("PROJECTION" in line and "not measured" in line for line in h200)
    assert proc.stdout.startswith("CPU: ") and written["cpus"] == os.cpu_count()


def test_cli_bad_input_is_one_line_before_work(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[landscape]\ngrid = 3\n")
    for args in (["--efficiency", "1.5"], ["--config", str(bad)]):
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.projection", *args], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=120)  # fmt: skip
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(err) == 1 and "error" in err[0], proc.stderr
        assert "model" not in proc.stderr  # refused before the model was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_grid_projection_needs_cuda():
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--grid-projection"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=120)  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "CUDA" in err[0], proc.stderr
