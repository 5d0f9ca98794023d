"""The one place that turns a run's configuration into a chart and its evaluator.

The engine (:mod:`landscape.engine`) knows charts, directions and evaluators but never reads the run
configuration; the recipes know the configuration. Here the two meet: which chart (the paper's plane, the
orthonormal one, random directions around a centre), in which storage (dense, factored over a packed or
large base), in which coordinates (all weights, or an adapter's own parameters), on which grid axes.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from adapters.objectives import Classification
from adapters.quant import packed_names
from landscape import draws
from landscape.engine import directions, factored
from landscape.engine.directions import CENTERS, AdapterEvaluator, adapter_folder, center_weights, draw_chart
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import (
    RANDOM_CHARTS,
    SOLUTIONS,
    Chart,
    build_chart,
    centred_axis,
    default_axes,
    paper_axis,
    solution_weights,
)
from landscape.engine.store import GridStore
from landscape.run import Loaded, eval_set

HESSIAN = "hessian"  # the eigen-direction chart (landscape.engine.hessian_chart)
CENTRED_CHARTS = (*RANDOM_CHARTS, HESSIAN)  # charts around one solution (--center)

if TYPE_CHECKING:
    from adapters.solution import Solution
    from landscape.config import RunConfig


def plane(
    loaded: Loaded, solutions: dict[str, Solution], device: torch.device
) -> tuple[Chart, np.ndarray, np.ndarray, PlaneEvaluator]:
    """The chart through the three solutions, its grid axes, and the evaluator on the evaluation set.

    ``config.plane_storage``: ``dense`` (:mod:`landscape.engine.plane`: origin + x·U + y·V per parameter, written
    into a copy of the model), ``factored`` (:mod:`landscape.engine.factored`: W0 + the solutions' updates, weights
    built per module on the base model itself: ~1 model copy instead of ~13) or ``auto`` (factored when the
    dense plane would need more than half of the free memory). ``chart.info["storage"]`` records it.
    The random charts (``--chart random`` / ``random-line``, :mod:`landscape.engine.directions`) are centred on one
    solution and always dense: a PlaneEvaluator on a copy of the model, or over the centre's adapter
    parameters (``--coordinates adapter``).
    """
    config, base = loaded.config, loaded.task.base
    random = config.chart in CENTRED_CHARTS  # always dense: the directions span every weight
    storage = "dense" if random else factored.choose_storage(config.plane_storage, base, device)
    dtype, evals = config.landscape_dtype(device.type), eval_set(loaded, device)
    if config.chart == HESSIAN:  # the centre's top-2 Hessian eigenvectors (landscape.engine.hessian_chart)
        vertex, center = directions.center_of(config.center, solutions)
        chart, evaluator = hessian_evaluator(loaded, center, vertex, evals, device, dtype)
    elif random:  # Li et al.'s random directions around one solution (landscape.engine.directions)
        vertex, center = directions.center_of(config.center, solutions)
        chart, evaluator = random_evaluator(config, center, vertex, evals, device, dtype, loaded.task.objective)
    elif storage == "factored":
        deltas = {s: solutions[s].module_deltas(check=False) for s in (*SOLUTIONS, "base") if s in solutions}
        chart = factored.build_chart(config.chart, base, deltas)
        evaluator = factored.FactoredEvaluator(base, chart, evals, device, dtype, config.points_per_forward,
                                               loaded.task.objective)  # fmt: skip
    else:
        from landscape.engine.plane import third_vertex, with_third

        third = third_vertex(solutions)
        roles = {"ft": third, "lora": "lora", "randlora": "randlora"}
        thetas = solution_weights(dict(base.named_parameters()), {s: solutions[roles[s]].delta() for s in SOLUTIONS})
        chart = with_third(build_chart(config.chart, thetas), third)
        del thetas
        evaluator = PlaneEvaluator(
            copy.deepcopy(base), chart, evals, device, dtype, config.points_per_forward, loaded.task.objective
        )
    chart.info["storage"] = "factored" if isinstance(evaluator, factored.FactoredEvaluator) else "dense"
    xs, ys = default_axes(chart, config.grid)
    verts = list(chart.vertices.values())
    if config.x_range:  # the config's window, the vertices kept on the grid
        xs = paper_axis(config.grid, *config.x_range, [v[0] for v in verts])
    if config.y_range and config.chart != "random-line":  # a line has the one row y = 0
        ys = paper_axis(config.grid, *config.y_range, [v[1] for v in verts])
    if config.chart == HESSIAN:
        xs, ys = hessian_axes(config, evaluator, xs, ys)
    elif random:
        xs, ys = random_scale(loaded, evaluator, xs, ys)
    return chart, xs, ys, evaluator


def hessian_evaluator(loaded: Loaded, solution: Solution, vertex: str, evals: EvalSet, device: torch.device,
                      dtype: str, tol: float | None = None) -> tuple[Chart, PlaneEvaluator]:  # fmt: skip
    """The Hessian chart around ``solution`` (:mod:`landscape.engine.hessian_chart`) and its dense evaluator.

    Coordinates as :mod:`landscape.curvature`'s (the same Hessian as curvature.json's): ``weights`` = the adapted
    weights and the head at θ* = W0 + ΔW; ``adapter`` = the centre's peft parameters. One HessianOperator (fp32)
    gives the products for Lanczos; its model, at the centre, then carries the plane's points. ``tol``: Lanczos'
    Ritz residual test (default :data:`landscape.engine.hessian_chart.TOL`, tight enough for the chart's check)."""
    from landscape import curvature
    from landscape.engine import hessian_chart

    config, task = loaded.config, loaded.task
    flags = [(p, p.requires_grad) for p in solution.base.parameters()]
    if config.coordinates == "adapter":
        adapter_folder(solution)
        model, names = curvature.adapter_coordinates(solution, True, "float32", device)
    else:
        names = curvature.weight_names(task.base, task.entry.targets, "adapted", {vertex: solution}, True)
        model, names = curvature.weight_coordinates(solution, names)
    try:
        op = curvature.HessianOperator(model.to(device), names, evals, task.objective, "float32")
    finally:  # the operator (and peft) froze parameters an adapter's skeleton shares with the base: put back
        for p, flag in flags:
            p.requires_grad_(flag)
    start = time.perf_counter()
    tol = hessian_chart.TOL if tol is None else tol
    values, vectors, info = hessian_chart.top_eigenpairs(op.flat_hvp, op.dim, op.device, op.dtype, tol=tol,
                                                         seed=config.seed)  # fmt: skip
    info = {**info, "coordinates": config.coordinates, "center": vertex, "parameters": len(names), "dim": op.dim,
            "hvps": op.hvps, "rise": hessian_chart.DEFAULT_RISE, "hvp_mode": op.mode, "tol": tol,
            "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    chart = hessian_chart.hessian_chart(dict(op.params), values, vectors, vertex, info)
    del op, vectors
    return chart, PlaneEvaluator(model, chart, evals, device, dtype, config.points_per_forward, task.objective)


def hessian_axes(config: RunConfig, evaluator: PlaneEvaluator, xs: np.ndarray, ys: np.ndarray) -> tuple:
    """The Hessian chart's axes: [−α, α] on both, ½λ₁α² = Δ (unless the config gives its window), and the
    second-difference check at h = α / STEP_FRACTION, printed and kept in ``chart.info["hessian"]``."""
    from adapters import distributed
    from landscape.engine import hessian_chart

    info = evaluator.chart.info["hessian"]
    alpha = hessian_chart.half_width(info["eigenvalues"][0], info["rise"])
    info["half_width"] = alpha
    if not (config.x_range or config.y_range):
        xs, ys = centred_axis(config.grid) * alpha, centred_axis(config.grid) * alpha
    loss = lambda x, y: evaluator.evaluate(x, y).loss  # noqa: E731
    info["check"] = hessian_chart.second_differences(loss, info["eigenvalues"], alpha / hessian_chart.STEP_FRACTION)
    if distributed.is_lead():
        print(hessian_chart.check_line(info["check"]), flush=True)
    return xs, ys


def random_scale(loaded: Loaded, evaluator: PlaneEvaluator, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """The random chart's axes scaled by the step scale (:func:`landscape.draws.probe_scale`: every draw's extreme
    points below the collapse level) unless the config gives its window; ``chart.info["draws"]`` records the
    draws' seeds, the collapse level and the scale."""
    config, chart = loaded.config, evaluator.chart
    seed = direction_seed(config)
    level, level_rule = draws.collapse_level(loaded.task)
    count = draw_count(config, evaluator)
    info = {"count": count, "seeds": [directions.draw_seed(seed, k) for k in range(count)],
            "collapse_level": level, "collapse_rule": level_rule}  # fmt: skip
    if count < config.draws:
        info["note"] = f"{config.draws} draws asked for; a 4-bit base's factored chart is drawn once (not redrawn)"
    if config.x_range or config.y_range:
        info["step"] = {"scale": None, "rule": "the window the configuration gives (x_range / y_range)"}
    else:
        scale, info["step"] = draws.probe_scale(evaluator, count, seed, level)
        xs, ys = xs * scale, ys * scale  # the default axes are [-1, 1] (x/h: scaled, 0 and the ends stay exact)
    chart.info["draws"] = info
    return xs, ys


def draw_count(config: RunConfig, evaluator: PlaneEvaluator) -> int:
    """``--draws``, or 1 for a 4-bit base: its factored chart holds no dense directions to redraw in place."""
    return config.draws if isinstance(evaluator.chart, Chart) else 1


def random_draws(config: RunConfig, evaluator: PlaneEvaluator, xs: np.ndarray, ys: np.ndarray, first: dict,
                 grid_store: GridStore | None) -> dict[str, np.ndarray]:  # fmt: skip
    """Draws 1..K−1 of a random chart after draw 0's grid ``first`` (:func:`landscape.draws.evaluate_draws`), each
    checkpointed in ``.grid/draw-k`` beside the run's grid store; ``chart.info["draws"]`` gains their summary
    (every draw's losses, the collapsed points, the sharpness with its spread). Returns landscape.npz's arrays."""
    from adapters import distributed
    from adapters.errors import UserError
    from landscape.engine.store import StaleGrid

    seed, info = direction_seed(config), evaluator.chart.info["draws"]

    def store(k: int) -> GridStore | None:
        if grid_store is None:
            return None
        s = draw_store(config, grid_store, k)
        if config.restart:  # as the run's own grid store: rank 0 clears, every rank waits for it
            if s.rank == 0:
                s.clear()
            distributed.wait_for_all()
        return s

    try:
        arrays = draws.evaluate_draws(evaluator, xs, ys, first, info["count"], seed, store, config.progress)
    except StaleGrid as e:
        raise UserError(f"{config.out_dir / '.grid'}: {e}: rerun with --restart to discard them, or pick another "
                        "--out") from None  # fmt: skip
    info.update(draws.summary(xs, ys, arrays, info["collapse_level"]))
    info["points_computed_this_run"] = arrays["points_computed_draws"]  # draws 1..K-1 (resumed points excluded)
    if distributed.is_lead():
        print(draws.line(info), flush=True)
    return {**{k: arrays[k] for k in ("draw_loss", "draw_accuracy", "draw_loss_se", "draw_seeds")},
            **draws.spread_arrays(arrays, info["collapse_level"])}  # fmt: skip


def draw_store(config: RunConfig, grid_store: GridStore, k: int) -> GridStore:
    """The grid store of draw ``k`` of a random chart: ``.grid/draw-k`` beside the run's, keyed by the draw's seed."""
    extra = {"draw": k, "draw_seed": directions.draw_seed(direction_seed(config), k)}
    return GridStore(grid_store.folder / f"draw-{k}", {**grid_store.config, **extra}, grid_store.solutions,
                     rank=grid_store.rank)  # fmt: skip


def load_center(config: RunConfig, base: nn.Module, model_name: str) -> Solution | None:
    """The solution given as ``--center PATH`` (None for ft / lora / randlora), loaded onto the run's base now,
    before any training, so a bad folder fails at once; ``--coordinates adapter`` needs an adapter there."""
    if config.chart not in CENTRED_CHARTS or config.center in CENTERS:
        return None
    from adapters.solution import load_solution

    solution = load_solution(Path(config.center), base=base, model=model_name)
    if config.coordinates == "adapter":
        adapter_folder(solution)
    return solution


def grid_settings(config: RunConfig) -> dict:
    """What the random chart adds to the grid store's key (a stale grid of another centre or seed is refused)."""
    return {
        "center": config.center, "direction_seed": direction_seed(config), "direction_norm": config.direction_norm,
        "ignore": config.ignore, "coordinates": config.coordinates,
        "draws": config.draws,  # the step-scale probe, hence the grid's axes, depends on the draws
    }  # fmt: skip


def direction_seed(config: RunConfig) -> int:
    return config.seed if config.direction_seed is None else config.direction_seed


def random_evaluator(
    config: RunConfig,
    solution: Solution,
    vertex: str,
    eval_set: EvalSet,
    device: torch.device | str,
    dtype: str,
    objective: Classification,
) -> tuple[Chart, PlaneEvaluator]:
    """The random chart of a run (``config``: chart, coordinates, direction seed / norm / ignore) around
    ``solution`` and its evaluator: a PlaneEvaluator on a copy of the model, or an :class:`AdapterEvaluator`."""
    seed, line = direction_seed(config), config.chart == "random-line"
    if config.coordinates == "adapter":
        evaluator = AdapterEvaluator(solution, eval_set, device, seed, config.direction_norm, config.ignore, line,
                                     dtype, config.points_per_forward, objective, vertex)  # fmt: skip
        return evaluator.chart, evaluator
    chart = draw_chart(center_weights(solution), vertex, seed, config.direction_norm, config.ignore, line)
    if packed_names(solution.base):  # a 4-bit base: θ* + x·δ + y·η applied beside its packed layers
        from landscape.engine import factored

        chart = factored.affine_chart(solution.base, chart)
        return chart, factored.FactoredEvaluator(solution.base, chart, eval_set, device, dtype,
                                                 config.points_per_forward, objective)  # fmt: skip
    model = copy.deepcopy(solution.base)
    return chart, PlaneEvaluator(model, chart, eval_set, device, dtype, config.points_per_forward, objective)
