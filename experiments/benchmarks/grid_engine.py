"""The grid benchmark's engine side: :class:`landscape.engine.grid.PlaneEvaluator` built as the main job builds it
(:func:`make_engine`), its losses over a set of points, and P points per forward against one
(:func:`engine_batched_vs_single`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from experiments.benchmarks.grid_cases import Deltas
from experiments.benchmarks.peers import sync
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import build_chart, solution_weights

# --------------------------------------------------------------------------- the engine


def make_engine(
    model: nn.Module,
    deltas: Deltas,
    eval_set: EvalSet,
    device,
    dtype: str = "float32",
    points_per_forward: int | str = 1,
) -> PlaneEvaluator:
    """The engine as the main job builds it: paper chart through the three solutions, a model copy."""
    thetas = solution_weights(dict(model.named_parameters()), deltas)
    chart = build_chart("paper", thetas)
    del thetas
    return PlaneEvaluator(
        copy.deepcopy(model), chart, eval_set, device, dtype=dtype, points_per_forward=points_per_forward
    )


def engine_losses(
    model: nn.Module,
    deltas: Deltas,
    eval_set: EvalSet,
    device: torch.device,
    xy: np.ndarray,
    dtype: str = "float32",
) -> tuple[np.ndarray, float, PlaneEvaluator]:
    """Losses at the points ``xy`` (..., 2) with the engine; seconds for all points (after a warm-up)."""
    evaluator = make_engine(model, deltas, eval_set, device, dtype)
    flat = xy.reshape(-1, 2)
    evaluator.evaluate(*flat[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    losses = [evaluator.evaluate(float(x), float(y)).loss for x, y in flat]
    sync(device)
    return np.array(losses).reshape(xy.shape[:-1]), time.perf_counter() - start, evaluator


def engine_batched_vs_single(
    model: nn.Module,
    deltas: Deltas,
    eval_set: EvalSet,
    device: torch.device,
    xy: np.ndarray,
    points_per_forward: int,
    groups: int = 2,
    dtype: str = "float32",
) -> dict:
    """The engine with ``points_per_forward`` = P points per vmapped forward against P = 1.

    Both evaluate the same ``groups × P`` points (``xy`` in order, cycled), group by group, in an
    order alternating from group to group; one untimed warm-up group each. Returns seconds per
    point of each, the P really used (a model that cannot be vmapped falls back to 1, see
    ``note``) and the losses of both.
    """
    p = points_per_forward
    single = make_engine(model, deltas, eval_set, device, dtype)
    batched = make_engine(model, deltas, eval_set, device, dtype, points_per_forward=p)
    flat = [(float(x), float(y)) for x, y in xy.reshape(-1, 2)]
    points = [flat[k % len(flat)] for k in range(groups * p)]
    batched.evaluate_many(points[:p])  # warm-ups
    single.evaluate(*points[0])
    engines = {"single": single, "batched": batched}
    seconds = {k: 0.0 for k in engines}
    losses: dict[str, list[float]] = {k: [] for k in engines}
    for g in range(groups):
        group = points[g * p : (g + 1) * p]
        for name in ("single", "batched") if g % 2 == 0 else ("batched", "single"):
            sync(device)
            start = time.perf_counter()
            results = engines[name].evaluate_many(group)
            sync(device)
            seconds[name] += time.perf_counter() - start
            losses[name] += [r.loss for r in results]
    n = len(points)
    return {
        "points_per_forward": p,
        "points_per_forward_used": batched.points_per_forward,
        "note": batched.note,
        "points": n,
        "single_s_per_point": seconds["single"] / n,
        "batched_s_per_point": seconds["batched"] / n,
        "loss_single": np.array(losses["single"]),
        "loss_batched": np.array(losses["batched"]),
    }
