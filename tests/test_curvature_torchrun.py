"""Curvature under torchrun (2 gloo processes on the CPU) against one process, the shards it averages, and the
probe ranges a job array computes.

The torchrun test launches ``tests.curvature_worker`` once: it runs ``python -m landscape.curvature`` on the
session's tiny run in float64, in float32 and with ``--blocks`` (13 evaluation samples: shards of 6 and 7, so
an unweighted mean of the ranks' products would be off by percents, far outside the tolerances). The same
worker in this process is the one-process reference.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.objectives import OBJECTIVES
from landscape import curvature
from landscape.curvature.hessian import shard_eval_set
from landscape.engine.grid import EvalSet
from tests import curvature_worker
from tests.conftest import free_port

# float64: the ranks' sums are the single process's in another order, so only float64 rounding separates them
# (measured: at most 4.3e-16 relative here, 3.3e-15 on the whole tiny run's SLQ nodes)
FLOAT64_RTOL = 1e-8
# float32: the same reordering in float32 rounding. Measured on this configuration (tiny-bert, lora and randlora
# adapter coordinates, 2 gloo processes against one): eigenvalues <= 2.5e-8, loss <= 1.1e-7, trace samples
# <= 2.2e-7, SLQ nodes <= 5.1e-8, relative to the largest magnitude of each; on the whole run (every solution
# and coordinates, 10 SLQ steps) SLQ nodes reached 2e-6. 1e-5 leaves a margin of 5x over the worst of those.
FLOAT32_RTOL = 1e-5
CE = OBJECTIVES["classification"]


def _relative(a, b) -> float:
    """Largest absolute difference over the largest magnitude of ``a`` (flattened)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _quantities(entry: dict) -> dict:
    return {"eigenvalues": entry["eigenvalues"], "trace samples": entry["hutchinson"]["samples"],
            "SLQ nodes": np.concatenate(entry["density"]["nodes"]), "loss": [entry["loss"]],
            "gradient norm": [entry["grad_norm"]]}  # fmt: skip


@pytest.fixture(scope="module")
def launched(tiny_wordnet_run, tmp_path_factory):
    """The worker's outputs: {"one": folder, "two": folder}, each with float64/ and float32/ curvature.json
    and blocks/blocks.json."""
    root = tmp_path_factory.mktemp("curvature_torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "tests.curvature_worker", str(tiny_wordnet_run), str(root / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:  # the one-process reference runs here while the two processes run
        assert curvature_worker.run_all(str(tiny_wordnet_run), str(root / "one")) == 0
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    return {"one": root / "one", "two": root / "two"}


@pytest.mark.parametrize(("dtype", "rtol"), [("float64", FLOAT64_RTOL), ("float32", FLOAT32_RTOL)])
def test_two_gloo_processes_equal_one_process(launched, dtype, rtol):
    one = json.loads((launched["one"] / dtype / "curvature.json").read_text())
    two = json.loads((launched["two"] / dtype / "curvature.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["eval_samples"] == two["eval_samples"] == 13
    assert two["settings"]["dtype"] == dtype and two["complete"]
    assert sorted(os.listdir(launched["two"] / dtype)) == ["curvature.json", "curvature.pdf", "curvature.png"]
    for name in ("lora", "randlora"):
        a, b = one["solutions"][name]["adapter"], two["solutions"][name]["adapter"]
        if dtype == "float64":  # the same Lanczos path, step for step
            assert a["hvps"] == b["hvps"] and len(a["eigen"]["residuals"]) == len(b["eigen"]["residuals"])
        for quantity, values in _quantities(a).items():
            difference = _relative(values, _quantities(b)[quantity])
            assert difference <= rtol, f"{name} {quantity}: relative difference {difference:.2e} > {rtol:.0e}"


def test_blocks_in_two_gloo_processes_equal_one_process(launched):
    one = json.loads((launched["one"] / "blocks" / "blocks.json").read_text())
    two = json.loads((launched["two"] / "blocks" / "blocks.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2) and two["complete"]
    a, b = one["solutions"]["lora"]["adapter"], two["solutions"]["lora"]["adapter"]
    assert a["hvps"] == b["hvps"] and [x["name"] for x in a["blocks"]] == [x["name"] for x in b["blocks"]]

    def numbers(e: dict) -> dict:
        return {"top eigenvalues": [e["top_eigenvalue"], *(x["top_eigenvalue"] for x in e["blocks"])],
                "traces": [e["trace"], *(x["trace"] for x in e["blocks"])], "JS": e["js_distance"]}  # fmt: skip

    for quantity, values in numbers(a).items():
        difference = _relative(values, numbers(b)[quantity])
        assert difference <= FLOAT64_RTOL, f"blocks {quantity}: relative difference {difference:.2e}"


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.task_head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_head(torch.tanh(self.l1(x)))


@pytest.fixture(scope="module")
def tiny():
    """A tiny model and 23 samples in three batches of unequal size."""
    torch.manual_seed(0)
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    eval_set = EvalSet([({"x": x[:4]}, y[:4]), ({"x": x[4:15]}, y[4:15]), ({"x": x[15:]}, y[15:])], 23)
    return TinyNet(), eval_set, x, y


@pytest.mark.parametrize("world", [1, 2, 3, 5, 30])
def test_shards_partition_the_samples_and_their_weighted_products_are_the_whole(tiny, world):
    """The shards are the samples in order, without gap or overlap (a rank past the last sample gets none); the
    shards' products weighted by their counts are the whole set's product, and the unweighted mean is not."""
    model, eval_set, x, y = tiny
    shards = [shard_eval_set(eval_set, r, world) for r in range(world)]
    assert [s.n for s in shards] == [(r + 1) * 23 // world - r * 23 // world for r in range(world)]
    assert torch.equal(torch.cat([i["x"] for s in shards for i, _ in s.batches]), x)
    assert torch.equal(torch.cat([t for s in shards for _, t in s.batches]), y)
    names = [n for n, _ in model.named_parameters()]
    v = {n: torch.randn(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    whole = curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, "float64").hvp(v)
    # the reference: autograd's Hessian-vector product of the whole mean loss, independent of the operator
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    model64 = copy.deepcopy(model).double()

    def loss(*flat):
        p = dict(zip(names, flat, strict=True))
        return F.cross_entropy(torch.func.functional_call(model64, p, (x.double(),)), y)

    _, reference = torch.autograd.functional.hvp(loss, tuple(params.values()), tuple(v.values()))
    parts = [(s.n, curvature.HessianOperator(copy.deepcopy(model), names, s, CE, "float64").hvp(v))
             for s in shards if s.n]  # fmt: skip
    for n, expected in zip(names, reference, strict=True):
        np.testing.assert_allclose(whole[n], expected, rtol=1e-10, atol=1e-14)
        weighted = sum(count * hv[n] for count, hv in parts) / 23
        np.testing.assert_allclose(weighted, expected, rtol=1e-10, atol=1e-14)
    if len(parts) > 1 and len({count for count, _ in parts}) > 1:
        unweighted = sum(hv["task_head.weight"] for _, hv in parts) / len(parts)
        assert not torch.allclose(unweighted, reference[names.index("task_head.weight")], rtol=1e-3)


def test_probe_ranges_combine_to_the_whole_estimates(tiny):
    """Probe ranges computed apart (any order) and combined are hutchinson_trace's and slq_density's numbers."""
    model, eval_set, _, _ = tiny
    names = [n for n, _ in model.named_parameters()]
    op = curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, "float64")
    whole = curvature.hutchinson_trace(op, 7, seed=3)
    parts = [curvature.trace_probes(op, 3, lo, hi) for lo, hi in ((4, 7), (0, 1), (1, 4))]
    combined = curvature.combine_trace(json.loads(json.dumps(parts)))  # parts travel as JSON between jobs
    assert combined["samples"] == whole["samples"] and combined["trace"] == whole["trace"]
    assert combined["trace_se"] == whole["trace_se"] and combined["probes"] == 7 and combined["hvps"] == 7
    density = curvature.slq_density(op, 6, 3, seed=3, points=50, broadening=0.05)
    pieces = [curvature.density_probes(op, 6, 3, lo, hi) for lo, hi in ((2, 3), (0, 2))]
    joined = curvature.combine_density(json.loads(json.dumps(pieces)), points=50, broadening=0.05)
    for key in ("nodes", "weights", "grid", "values", "mean", "trace_estimate", "probes", "steps"):
        assert joined[key] == density[key], key
    with pytest.raises(ValueError, match="tile"):
        curvature.combine_trace([parts[0], parts[2]])  # probe 0 missing
    with pytest.raises(ValueError, match="tile"):
        curvature.combine_trace([*parts, curvature.trace_probes(op, 3, 2, 3)])  # probe 2 twice
    with pytest.raises(ValueError, match="one seed"):
        curvature.combine_trace([parts[1], curvature.trace_probes(op, 4, 1, 7)])


def test_an_entrys_probes_by_range_equal_the_stages_entry(tiny_wordnet_run, tmp_path, no_figure_drawing):
    """What a job array does with an entry of curvature.json: the entry's operator (entry_operator), its probes
    computed by range in separate calls, combined: the stage's own trace and density, probe for probe."""
    from landscape.run import open_run

    run = open_run(tiny_wordnet_run)
    settings = curvature.CurvatureSettings(top_k=1, trace_probes=3, slq_probes=3, slq_steps=4, seed=2,
                                           coordinates=("weights", "adapter"), density_points=60)  # fmt: skip
    solution = run.solutions["randlora"]
    staged = curvature.curvature_stage(run, {"randlora": solution}, run.eval_set, tmp_path, settings,
                                       progress=False)["solutions"]["randlora"]  # fmt: skip
    for coordinates in ("weights", "adapter"):
        op = curvature.entry_operator(run, solution, coordinates, run.eval_set, settings)
        assert op.dim == staged[coordinates]["dim"]
        trace = curvature.combine_trace([curvature.trace_probes(op, 2, lo, hi) for lo, hi in ((0, 1), (1, 3))])
        density = curvature.combine_density([curvature.density_probes(op, 4, 2, lo, hi) for lo, hi in ((2, 3), (0, 2))],
                                            settings.density_points, settings.broadening)  # fmt: skip
        assert trace["samples"] == staged[coordinates]["hutchinson"]["samples"]
        assert trace["trace"] == staged[coordinates]["trace"]
        assert density["nodes"] == staged[coordinates]["density"]["nodes"]
        assert density["values"] == staged[coordinates]["density"]["values"]
    with pytest.raises(ValueError, match="no adapter"):
        curvature.entry_operator(run, run.solutions["ft"], "adapter", run.eval_set, settings)


def test_hvp_dtype_is_a_checked_option(tiny_wordnet_run, tmp_path, capsys):
    argv = ["--run", str(tiny_wordnet_run), "--out", str(tmp_path / "c"), "--no-progress"]
    # a leading "--" (the torchrun command's, which some Python versions hand on) is dropped
    for prefix in ([], ["--"]):
        assert curvature.main([*prefix, *argv, "--hvp-dtype", "float16"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--hvp-dtype" in err and "float64" in err, err
    assert not (tmp_path / "c").exists()
