"""The directions benchmark compares what it claims: the paper plane and ``--chart random`` around RandLoRA.

References independent of :mod:`landscape.engine.grid` and :mod:`adapters.objectives`: the weights are written into
a plain copy of the model from the paper's closed form (or θ* + α·δ + β·η) and scored with ``cross_entropy``
over one unsorted batch; the filter norms are checked with numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.methods import adapted_weights
from experiments.benchmarks import directions as bench
from experiments.benchmarks import grid
from landscape.engine.grid import EvalSet

NUM_CLASSES = 4
TEXTS = [f"sample {i} " + "word " * (i % 5) + "end" for i in range(12)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_entry):
    model = tiny_entry.build(NUM_CLASSES).eval()
    labels = torch.arange(len(TEXTS)) % NUM_CLASSES
    encoded = tiny_entry.encode(TEXTS)
    eval_set = EvalSet.prepare(encoded, labels, 8, "cpu")
    head = grid.fit_head(model, eval_set, NUM_CLASSES)
    targets = list(adapted_weights(model, tiny_entry.targets))
    deltas = grid.synthetic_deltas(model, targets, head, scale=0.05, seed=0, lora_rank=2)
    evaluators = bench.build_evaluators(model, deltas, eval_set, "cpu", seed=3)
    one_batch = encoded.batch(torch.arange(len(TEXTS)))  # dataset order, padded to the longest: not EvalSet's
    return model, deltas, eval_set, evaluators, one_batch, labels


def theta(model, deltas, name):
    return {n: p.detach().float() + deltas[name].get(n, 0) for n, p in model.named_parameters()}


@torch.no_grad()
def plain_loss(model, weights, inputs, labels) -> float:
    net = copy.deepcopy(model)
    for n, p in net.named_parameters():
        p.copy_(weights[n])
    return float(F.cross_entropy(net(**inputs), labels))


def rows(t: torch.Tensor) -> np.ndarray:
    return np.linalg.norm(t.reshape(t.shape[0], -1).numpy().astype(np.float64), axis=1)


def test_random_chart_is_filter_normalised_around_randlora(tiny):
    model, deltas, _, evaluators, _, _ = tiny
    chart = evaluators["random"].chart
    center = theta(model, deltas, "randlora")
    assert chart.name == "random" and chart.vertices == {"randlora": (0.0, 0.0)}
    assert set(chart.origin) == set(center)  # every parameter, not only the plane's
    info = chart.info["directions"]
    assert (info["norm"], info["ignore"], info["coordinates"], info["seed"]) == ("filter", "biasbn", "weights", 3)
    for n, w in center.items():
        assert torch.equal(chart.origin[n], w)
        for d in (chart.u[n], chart.v[n]):
            if w.dim() <= 1:  # biasbn: biases and LayerNorm parameters stay at θ*
                assert not d.any()
            else:  # each row rescaled to the norm of θ*'s row
                np.testing.assert_allclose(rows(d), rows(w), rtol=1e-4, atol=1e-6)
    two_d = [n for n, w in center.items() if w.dim() > 1]
    assert not torch.equal(chart.u[two_d[0]], chart.v[two_d[0]])
    assert evaluators["plane"].chart.name == "paper"


def test_compare_charts_fields_and_losses_against_a_plain_loop(tiny):
    model, deltas, eval_set, evaluators, inputs, labels = tiny
    r = bench.compare_charts(evaluators, 9, log=lambda s: None)
    assert r["points"] == 9 and r["samples"] == eval_set.n == len(TEXTS)
    assert len(r["plane_s_each"]) == len(r["random_s_each"]) == 9
    assert r["plane_s_per_point"] == pytest.approx(np.mean(r["plane_s_each"])) and r["plane_s_per_point"] > 0
    assert r["random_s_per_point"] == pytest.approx(np.mean(r["random_s_each"])) and r["random_s_per_point"] > 0
    assert r["ratio_random_over_plane"] == pytest.approx(r["random_s_per_point"] / r["plane_s_per_point"])
    plane_names = set(deltas["ft"]) | set(deltas["lora"]) | set(deltas["randlora"])
    params = dict(model.named_parameters())
    assert r["dim"]["plane"] == sum(params[n].numel() for n in plane_names)
    assert r["dim"]["random"] == sum(p.numel() for p in params.values())
    assert r["dim"]["random_moved"] == sum(p.numel() for p in params.values() if p.dim() > 1)

    # the shared centre: W0 + ΔW_RandLoRA on both charts, and a plain loop there
    reference = plain_loss(model, theta(model, deltas, "randlora"), inputs, labels)
    assert abs(r["center_loss_plane"] - r["center_loss_random"]) <= 1e-5
    assert r["center_loss_random"] == pytest.approx(reference, abs=1e-5)
    assert r["max_abs_diff_center"] == abs(r["center_loss_plane"] - r["center_loss_random"])

    # timed points: the random chart's default [−1, 1]² grid, the plane's paper window
    assert r["points_random"] == [(a, b) for b in (-1.0, 0.0, 1.0) for a in (-1.0, 0.0, 1.0)]
    assert (0.0, 0.0) in r["points_plane"] and (1.0, 0.0) in r["points_plane"]  # RandLoRA and LoRA vertices
    chart = evaluators["random"].chart
    for (a, b), loss in zip(r["points_random"], r["loss_random"], strict=True):
        weights = {n: chart.origin[n] + a * chart.u[n] + b * chart.v[n] for n in chart.origin}
        assert loss == pytest.approx(plain_loss(model, weights, inputs, labels), abs=1e-5)
    ft, lo, ra = (theta(model, deltas, s) for s in ("ft", "lora", "randlora"))
    for (x, y), loss in zip(r["points_plane"], r["loss_plane"], strict=True):
        weights = {n: (1 - x - y / 2) * ra[n] + y * ft[n] + (x - y / 2) * lo[n] for n in ra}  # the paper's chart
        assert loss == pytest.approx(plain_loss(model, weights, inputs, labels), abs=1e-5)


class _Fake:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def evaluate(self, x, y):
        self.calls.append((self.name, x, y))
        return type("Result", (), {"loss": x + 10 * y})()


def test_interleaving_alternates_the_order():
    calls: list = []
    evaluators = {"plane": _Fake("plane", calls), "random": _Fake("random", calls)}
    points = {"plane": [(0.0, 1.0), (2.0, 0.0), (3.0, 3.0)], "random": [(1.0, 0.0), (0.0, 2.0), (4.0, 4.0)]}
    out = bench.interleaved(evaluators, points)
    assert [c[0] for c in calls] == ["plane", "random", "random", "plane", "plane", "random"]
    assert out["losses"] == {"plane": [10.0, 2.0, 33.0], "random": [1.0, 20.0, 44.0]}
    assert all(len(s) == 3 and min(s) >= 0 for s in out["seconds"].values())


def test_table_cpu_model_and_bad_input(tmp_path, capsys):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU @ 2 GHz\n\nprocessor\t: 1\nmodel name\t: Other\n")
    assert bench.cpu_model(info) == "Test CPU @ 2 GHz"
    assert bench.cpu_model(tmp_path / "missing") is None
    row = {"case": "c", "points": 4, "samples": 8, "plane_s_per_point": 0.5, "random_s_per_point": 0.55,
           "ratio_random_over_plane": 1.1, "ratio_median_of_pairs": 1.05, "center_loss_plane": 0.25,
           "max_abs_diff_center": 0.0, "dim": {"plane": 1000, "random": 1200, "random_moved": 900}}  # fmt: skip
    lines = bench.table([row]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| c | 4 × 8 | 0.500 | 0.550 | 1.100 | 1.050 | 1,000 / 1,200 (900)")
    assert bench.main(["--delta-scale", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--delta-scale" in err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--points", "0"])
    assert exc.value.code == 2
