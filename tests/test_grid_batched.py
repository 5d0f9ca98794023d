"""Several grid points per forward (torch.func vmap) equal the per-point engine and a naive loop."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.models.base import Encoded
from landscape import paths
from landscape.cli import points_per_forward_arg
from landscape.engine.grid import EvalSet, PlaneEvaluator, auto_points_per_forward, run_grid
from landscape.engine.plane import build_chart, solution_weights
from landscape.engine.store import GridStore
from tests.test_paths import _solutions
from tests.test_plane_grid import _naive_loss, make_setup

# 3 × 5 = 15 points, P = 4: three full groups and one of three points
XS, YS = np.array([-0.5, 0.0, 0.5, 1.0, 1.5]), np.array([0.0, 1.0, 1.5])
P = 4


@pytest.fixture(scope="module")
def setup(tiny_entry):
    model, base, deltas, data, labels = make_setup(tiny_entry)
    chart = build_chart("paper", solution_weights(base, deltas))
    eval_set = EvalSet.prepare(data, labels, 5, "cpu")  # several batches of different lengths
    return model, base, deltas, data, labels, chart, eval_set


def _evaluator(setup, points_per_forward, dtype="float32"):
    model, *_, chart, eval_set = setup
    return PlaneEvaluator(
        copy.deepcopy(model), chart, eval_set, "cpu", dtype=dtype, points_per_forward=points_per_forward
    )


def test_batched_grid_equals_naive_loop(setup):
    model, base, deltas, data, labels, *_ = setup
    evaluator = _evaluator(setup, P)
    result = run_grid(evaluator, XS, YS, progress=False)
    assert evaluator.points_per_forward == P and evaluator.note is None  # vmap really ran
    assert len(XS) * len(YS) % P != 0
    assert result["loss"].shape == (3, 5) and int(result["points_computed"]) == 15
    for i, y in enumerate(YS):
        for j, x in enumerate(XS):
            loss, acc, se = _naive_loss(model, base, deltas, x, y, data, labels)
            assert abs(result["loss"][i, j] - loss) < 1e-5, (i, j)
            assert result["accuracy"][i, j] == pytest.approx(acc)
            assert result["loss_se"][i, j] == pytest.approx(se, rel=1e-4)


@pytest.mark.parametrize("p", [2, 3, 16])
def test_batched_equals_single_point_engine(setup, p):
    single = run_grid(_evaluator(setup, 1), XS, YS, progress=False)
    batched = run_grid(_evaluator(setup, p), XS, YS, progress=False)
    np.testing.assert_allclose(batched["loss"], single["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batched["loss_se"], single["loss_se"], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(batched["accuracy"], single["accuracy"])


def test_a_point_does_not_depend_on_its_companions(setup):
    evaluator = _evaluator(setup, P)
    points = [(float(x), float(y)) for y in YS for x in XS]
    alone = evaluator.evaluate_many(points)
    shuffled = [points[k] for k in np.random.default_rng(0).permutation(len(points))]
    again = dict(zip(shuffled, evaluator.evaluate_many(shuffled), strict=True))
    for point, r in zip(points, alone, strict=True):
        assert again[point] == r, point  # same group shape, other companions: bit-identical


def test_bf16_autocast_batched_is_close_to_single(setup):
    xy = [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]
    single = [r.loss for r in _evaluator(setup, 1, "bfloat16").evaluate_many(xy)]
    batched = [r.loss for r in _evaluator(setup, 2, "bfloat16").evaluate_many(xy)]
    fp32 = [r.loss for r in _evaluator(setup, 1).evaluate_many(xy)]
    assert np.max(np.abs(np.subtract(batched, single))) < 0.05
    assert np.max(np.abs(np.subtract(batched, fp32))) < 0.05


class Crash(Exception):
    pass


class DyingStore(GridStore):
    """Dies while saving its (limit + 1)-th point, after ``limit`` points are on disk."""

    def __init__(self, *args, limit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit

    def add(self, i, j, values):
        if len(self.mine) >= self.limit:
            raise Crash
        super().add(i, j, values)


def test_killed_batched_run_resumes_to_the_same_grid(setup, tmp_path):
    key = {"chart": "paper", "grid": [5, 3]}
    reference = run_grid(_evaluator(setup, P), XS, YS, progress=False)
    with pytest.raises(Crash):  # dies in the second group, after its first point was saved
        run_grid(_evaluator(setup, P), XS, YS, store=DyingStore(tmp_path, key, limit=5), progress=False)
    assert len(GridStore(tmp_path, key).load()) == 5
    resumed = run_grid(_evaluator(setup, P), XS, YS, store=GridStore(tmp_path, key), progress=False)
    assert int(resumed["points_computed"]) == 15 - 5  # groups of 4, 4 and 2 (padded to 4)
    for k in ("loss", "accuracy", "loss_se"):
        np.testing.assert_array_equal(resumed[k], reference[k])
    assert len(GridStore(tmp_path, key).load()) == 15


class ConvBN(nn.Module):
    """A small image classifier with BatchNorm in eval mode and a depthwise convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.task_head = nn.Linear(8, 4)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(pixels.float() / 255.0)))
        return self.task_head(F.adaptive_avg_pool2d(self.dw(x), 1).flatten(1))


class NotVmappable(ConvBN):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        scale = float(self.task_head.weight.abs().max())  # .item() of a batched tensor: vmap refuses
        return super().forward(pixels) / max(scale, 1e-3)


def _image_setup(cls):
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    deltas = {
        s: {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in params.items() if s == "ft" or "head" in n}
        for s in ("ft", "lora", "randlora")
    }
    chart = build_chart("paper", solution_weights(params, deltas))
    images = (torch.rand(11, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    eval_set = EvalSet.prepare(Encoded({"pixels": images}), torch.arange(11) % 4, 4, "cpu")
    return model, chart, eval_set


def test_out_of_memory_halves_the_points_per_forward(setup, monkeypatch):
    points = [(float(x), float(y)) for y in YS for x in XS]
    single = _evaluator(setup, 1).evaluate_many(points)
    evaluator = _evaluator(setup, P)
    real_group = evaluator._evaluate_group

    def group_fits_two(group, keep_samples=False):
        if len(group) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_group(group, keep_samples)

    monkeypatch.setattr(evaluator, "_evaluate_group", group_fits_two)
    with pytest.warns(RuntimeWarning, match=f"out of memory with {P} points per forward: now 2"):
        halved = evaluator.evaluate_many(points)
    assert evaluator.points_per_forward == 2 and "out of memory" in evaluator.note
    for a, b in zip(single, halved, strict=True):
        assert abs(a.loss - b.loss) < 1e-5 and a.accuracy == b.accuracy


def test_batchnorm_model_batched_equals_single():
    model, chart, eval_set = _image_setup(ConvBN)
    xy = [(float(x), float(y)) for y in YS for x in XS]
    single = PlaneEvaluator(copy.deepcopy(model), chart, eval_set, "cpu").evaluate_many(xy)
    evaluator = PlaneEvaluator(copy.deepcopy(model), chart, eval_set, "cpu", points_per_forward=P)
    batched = evaluator.evaluate_many(xy)
    assert evaluator.note is None
    for a, b in zip(single, batched, strict=True):
        assert abs(a.loss - b.loss) < 1e-5 and a.accuracy == b.accuracy


def test_a_model_that_cannot_be_vmapped_falls_back_to_one_point():
    model, chart, eval_set = _image_setup(NotVmappable)
    xy = [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]
    single = PlaneEvaluator(copy.deepcopy(model), chart, eval_set, "cpu").evaluate_many(xy)
    evaluator = PlaneEvaluator(copy.deepcopy(model), chart, eval_set, "cpu", points_per_forward=P)
    with pytest.warns(RuntimeWarning, match="cannot be vmapped"):
        batched = evaluator.evaluate_many(xy)
    assert evaluator.points_per_forward == 1 and "cannot be vmapped" in evaluator.note
    assert batched == single


def test_paths_batched_equal_single(tiny_entry):
    torch.manual_seed(0)
    model = tiny_entry.build(4)
    sols = _solutions(model)
    data = tiny_entry.encode([f"sample {i} " + "word " * (i % 7) for i in range(13)])
    eval_set = EvalSet.prepare(data, torch.arange(13) % 4, 8, "cpu")
    one = paths.compute_paths(model, sols, eval_set, "cpu", points=5, progress=False)
    many = paths.compute_paths(model, sols, eval_set, "cpu", points=5, progress=False, points_per_forward=3)
    np.testing.assert_allclose(many["loss"], one["loss"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(many["accuracy"], one["accuracy"])


def test_auto_and_the_cli_option(setup):
    *_, eval_set = setup
    assert auto_points_per_forward("cpu", eval_set, 10**6) == 1
    assert _evaluator(setup, "auto").points_per_forward == 1  # on CPU
    assert points_per_forward_arg("auto") == "auto" and points_per_forward_arg("8") == 8
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            points_per_forward_arg(bad)
    for bad in (0, "fast"):
        with pytest.raises(ValueError, match="points_per_forward"):
            _evaluator(setup, bad)
    from landscape.config import from_argv

    assert from_argv([]).points_per_forward == "auto"
    assert from_argv(["--points-per-forward", "4"]).points_per_forward == 4
    assert paths.build_parser().parse_args(["--run", "x", "--points-per-forward", "2"]).points_per_forward == 2


def test_benchmark_measures_batched_against_single(setup):
    from experiments.benchmarks import grid as bench

    model, _, deltas, *_, eval_set = setup
    model = copy.deepcopy(model).eval()
    xy = bench.paper_xy(bench.ll_points(2))  # 4 grid points, cycled to 2 groups of 3
    out = bench.engine_batched_vs_single(model, deltas, eval_set, torch.device("cpu"), xy, 3, groups=2)
    assert out["points"] == 6 and out["points_per_forward_used"] == 3 and out["note"] is None
    assert out["single_s_per_point"] > 0 and out["batched_s_per_point"] > 0
    assert np.max(np.abs(out["loss_batched"] - out["loss_single"])) < 1e-5
    assert out["loss_single"][4] == out["loss_single"][0]  # the points cycle
    text = bench.table([{"name": "x", "skipped": "no CUDA device"}])
    assert "points per forward" not in text
