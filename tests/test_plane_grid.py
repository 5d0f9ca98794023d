"""Charts map vertices back to solutions; the grid engine equals a naive per-point loop."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.models.base import Encoded
from landscape.engine.grid import EvalSet, PlaneEvaluator, run_grid
from landscape.engine.plane import build_chart, default_axes, paper_axis, solution_weights


def _random_solutions(model, seed=0, scale=0.05):
    """Three synthetic solutions: ft changes everything, lora/randlora a few weights and the head."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    deltas = {"ft": {n: scale * torch.randn(p.shape, generator=g) for n, p in params.items()}}
    some = [n for n in params if n.endswith("query.weight") or n.endswith("value.weight") or n.startswith("task_head.")]
    for s in ("lora", "randlora"):
        deltas[s] = {n: scale * torch.randn(params[n].shape, generator=g) for n in some}
    return deltas


def make_setup(tiny_entry):
    """The tiny model, its weights, three synthetic solutions and 23 texts of mixed lengths."""
    torch.manual_seed(0)
    model = tiny_entry.build(4)
    deltas = _random_solutions(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [f"sample {i} " + "word " * (i % 7) for i in range(23)]
    data = tiny_entry.encode(texts)
    labels = torch.arange(23) % 4
    return model, base, deltas, data, labels


@pytest.fixture(scope="module")
def setup(tiny_entry):
    return make_setup(tiny_entry)


@pytest.mark.parametrize("chart_name", ["paper", "orthonormal"])
def test_vertices_map_back_to_solutions(setup, chart_name):
    model, base, deltas, _, _ = setup
    thetas = solution_weights(base, deltas)
    chart = build_chart(chart_name, thetas)
    for s, (x, y) in chart.vertices.items():
        w = chart.weights_at(x, y)
        for n in w:
            expected = base[n] + deltas[s].get(n, 0.0)
            assert torch.allclose(w[n], expected, atol=1e-6, rtol=0), (chart_name, s, n)


def test_orthonormal_chart_is_orthonormal_and_keeps_distances(setup):
    _, base, deltas, _, _ = setup
    thetas = solution_weights(base, deltas)
    chart = build_chart("orthonormal", thetas)
    flat = lambda d: torch.cat([d[n].flatten().double() for n in sorted(d)])  # noqa: E731
    u, v = flat(chart.u), flat(chart.v)
    # u, v are stored in fp32: unit length and orthogonal to fp32 precision
    assert abs(u.norm().item() - 1) < 1e-6 and abs(v.norm().item() - 1) < 1e-6 and abs(u @ v).item() < 1e-6
    # The distance between two vertices in chart coordinates equals the weight-space distance.
    (x1, y1), (x2, y2) = chart.vertices["ft"], chart.vertices["lora"]
    direct = (flat(thetas["ft"]) - flat(thetas["lora"])).norm().item()
    assert math.isclose(math.hypot(x1 - x2, y1 - y2), direct, rel_tol=1e-6)
    assert math.isclose(chart.info["distances"]["ft-lora"], direct, rel_tol=1e-9)


def test_paper_chart_equals_the_papers_formula(setup):
    _, base, deltas, _, _ = setup
    thetas = solution_weights(base, deltas)
    chart = build_chart("paper", thetas)
    for x, y in [(-0.7, 1.3), (0.25, -0.4), (1.4, 1.9)]:
        a, b, c = 1 - x - y / 2, y, x - y / 2
        w = chart.weights_at(x, y)
        for n in w:
            expected = a * thetas["randlora"][n] + b * thetas["ft"][n] + c * thetas["lora"][n]
            assert torch.allclose(w[n], expected, atol=1e-6)


@pytest.mark.parametrize("n", [3, 5, 11, 13, 25])
def test_default_paper_grid_holds_the_vertices(n):
    x = paper_axis(n, -1.0, 1.4, [0.0, 0.5, 1.0])
    y = paper_axis(n, -0.5, 1.9, [0.0, 1.0])
    assert len(x) == len(y) == n
    assert {0.0, 0.5, 1.0} <= set(x.tolist()) and {0.0, 1.0} <= set(y.tolist())
    assert np.allclose(np.diff(x), np.diff(x)[0]) and np.allclose(np.diff(y), np.diff(y)[0])
    if n == 25:  # exactly the paper's grid
        assert np.allclose(x, np.arange(-1.0, 1.41, 0.1)) and np.allclose(y, np.arange(-0.5, 1.91, 0.1))


def test_default_orthonormal_grid_holds_the_vertices(setup):
    _, base, deltas, _, _ = setup
    chart = build_chart("orthonormal", solution_weights(base, deltas))
    xs, ys = default_axes(chart, 7)
    for x, y in chart.vertices.values():
        assert x in xs and y in ys
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)


def _naive_loss(model, base, deltas, x, y, data: Encoded, labels):
    """Independent reference: the paper's formula, load_state_dict, one sample at a time."""
    a, b, c = 1 - x - y / 2, y, x - y / 2
    fresh = copy.deepcopy(model)
    state = fresh.state_dict()
    for n in base:
        theta = {s: base[n] + deltas[s].get(n, 0.0) for s in deltas}
        state[n] = a * theta["randlora"] + b * theta["ft"] + c * theta["lora"]
    fresh.load_state_dict(state)
    fresh.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for i in range(len(labels)):
            logits = fresh(**data.batch(torch.tensor([i])))
            losses.append(F.cross_entropy(logits, labels[i : i + 1]).item())
            correct += int(logits.argmax(-1).item() == labels[i].item())
    return float(np.mean(losses)), correct / len(labels), float(np.std(losses, ddof=1) / np.sqrt(len(losses)))


def test_grid_equals_naive_loop_and_orientation(setup):
    model, base, deltas, data, labels = setup
    chart = build_chart("paper", solution_weights(base, deltas))
    evaluator = PlaneEvaluator(copy.deepcopy(model), chart, EvalSet.prepare(data, labels, 5, "cpu"), "cpu")
    xs, ys = np.array([-0.5, 0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.5])  # nx != ny catches a transpose
    result = run_grid(evaluator, xs, ys, progress=False)
    assert result["loss"].shape == (3, 4)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            loss, acc, se = _naive_loss(model, base, deltas, x, y, data, labels)
            assert abs(result["loss"][i, j] - loss) < 1e-5, (i, j)
            assert result["accuracy"][i, j] == pytest.approx(acc)
            assert result["loss_se"][i, j] == pytest.approx(se, rel=1e-4)


def test_vertices_reproduce_each_solutions_own_loss(setup):
    model, base, deltas, data, labels = setup
    chart = build_chart("paper", solution_weights(base, deltas))
    evaluator = PlaneEvaluator(copy.deepcopy(model), chart, EvalSet.prepare(data, labels, 8, "cpu"), "cpu")
    for s, (x, y) in chart.vertices.items():
        own = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in own.named_parameters():
                p.add_(deltas[s].get(n, torch.zeros_like(p)))
        own.eval()
        with torch.no_grad():
            expected = F.cross_entropy(own(**data.batch(slice(None))), labels).item()
        assert abs(evaluator.evaluate(x, y).loss - expected) < 1e-5, s
