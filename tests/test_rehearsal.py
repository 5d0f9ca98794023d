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
    code = rehearsal.main(["--model", f"hf:{model}", "--out", str(out), "--variants", "fp32", "4bit",
                           "--json", str(report)])  # fmt: skip
    results = {r["variant"]: r for r in json.loads(report.read_text())["results"]}
    logs = {v: (out / v / "connectivity.log").read_text()[-2000:] for v in results}
    assert code == 0, logs
    for variant, r in results.items():
        meta = json.loads((out / variant / "landscape.json").read_text())
        # every stage of the pipeline ran (fresh folder: nothing reused)
        assert {"train_lora", "train_randlora", "grid", "paths", "spectrum"} <= set(r["stages_s"]), variant
        assert meta["config"]["randlora_rank"] == 30 and meta["config"]["grid"] == 3
        eig = r["top_eigenvalue"]
        assert set(eig) == {"lora", "randlora"} and all(torch.isfinite(torch.tensor(v)) for v in eig.values())
    assert json.loads((out / "4bit" / "landscape.json").read_text())["config"]["load_4bit"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_rehearsal_needs_cuda():
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--rehearsal"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=120)  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "CUDA" in err[0], proc.stderr
