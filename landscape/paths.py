"""python -m landscape.paths — 1-D linear paths between the three solutions, and their barriers.

For each pair (A, B) of (ft, lora), (ft, randlora), (lora, randlora) the loss is evaluated on
the straight line ``θ(t) = (1 − t)·θ_A + t·θ_B = θ_A + t·(θ_B − θ_A)`` for ``points`` values
of t in ``[−extend, 1 + extend]`` (0 and 1 are always exactly on the grid). Per pair:

- ``barrier = max_{t ∈ [0, 1]} [L(θ(t)) − ((1 − t)·L(θ_A) + t·L(θ_B))]``, the chord barrier (Entezari et al.
  2022): the height of the path above the chord between the endpoint losses, at ``t_max``. It is 0 for any
  path at or below its chord (a monotone or convex path among them), which reads "no barrier". The same
  value is kept under ``chord_barrier`` (``chord_t_max``, ``chord_loss_max``, ``chord_barrier_se``).
- ``peak_above_endpoint_mean = max_{t ∈ [0, 1]} L(θ(t)) − (L(θ_A) + L(θ_B)) / 2`` (Frankle et al. 2020;
  REFERENCE.md §3), at ``peak_t``. It is not a barrier: on a monotone path between endpoints of different
  loss it is half their gap, positive with no bump at all.

A barrier near 0 means the two solutions are linearly mode-connected. Each quantity comes with its standard
error paired over the evaluation samples, from the per-sample losses the paths keep (no extra forward).

The line is an affine chart (origin θ_A, U = θ_B − θ_A, V = 0) evaluated by the same
:class:`landscape.engine.grid.PlaneEvaluator` and :class:`landscape.engine.grid.EvalSet` as the plane, so
the path at t = 0 and t = 1 is the loss of the solutions themselves on the same samples. Inside a run with a
dense plane through the solutions the lines lie in that plane, and the plane's own evaluator carries them
(:class:`LineOnPlane`: the same weights to fp32 rounding, no second copy of the model or of the θ's).

Writes under the run folder (or ``--out``):

  paths.npz   t (n,), loss / accuracy / loss_se (3, n) (row k = pairs[k]), pairs (3,) e.g. "ft-lora"
  paths.json  ``format_version`` (:data:`FORMAT_VERSION`); per pair: barrier, barrier_se, t_max, loss_max,
              the chord_barrier* copies, peak_above_endpoint_mean, its _se, peak_t, peak_loss, endpoint
              losses; the definitions; points, extend, seed, eval info
  paths.png / paths.pdf   loss along t, one line per pair, solutions marked, chords and barriers drawn

Format versions of paths.json (and of the curves' JSON, :mod:`landscape.curves`): 1 (no ``format_version``
key) had ``barrier`` = max L(t) − mean endpoint loss, Frankle's quantity; 2 has ``barrier`` = the chord
barrier and Frankle's quantity as ``peak_above_endpoint_mean``.

The command reopens a run with :func:`landscape.run.open_run` (the configuration recorded in
``landscape.json``), so the evaluation set, the device's precision and the solutions are the run's.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES, Classification, PointResult, paired_se
from adapters.progress import progress_bar
from adapters.solution import Solution
from landscape.barriers import NO_BARRIER_ATOL, barrier_text, has_barrier
from landscape.engine import factored, store
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import SOLUTIONS, Chart, snapped_axis, solution_weights

PROG = "python -m landscape.paths"
PAIRS = (("ft", "lora"), ("ft", "randlora"), ("lora", "randlora"))

__all__ = [
    "BARRIER_DEFINITION",
    "CHORD_BARRIER_DEFINITION",
    "FORMAT_VERSION",
    "NO_BARRIER_ATOL",
    "PAIRS",
    "PEAK_DEFINITION",
    "barrier_se",
    "barrier_text",
    "barriers_with_se",
    "check_options",
    "chord_barrier_se",
    "compute_paths",
    "has_barrier",
    "line_chart",
    "loss_barrier",
    "main",
    "path_axis",
    "peak_above_endpoint_mean_se",
    "write_paths",
]

FORMAT_VERSION = 2  # of paths.json and the curves' JSON: 2 = ``barrier`` is the chord barrier (module docstring)
CHORD_BARRIER_DEFINITION = "max over t in [0, 1] of L((1-t)*theta_A + t*theta_B) - ((1-t)*L(theta_A) + t*L(theta_B))"
BARRIER_DEFINITION = CHORD_BARRIER_DEFINITION
PEAK_DEFINITION = "max over t in [0, 1] of L((1-t)*theta_A + t*theta_B) - (L(theta_A) + L(theta_B)) / 2"


# The chord barrier is exactly 0 at the ends; a path on its chord (a straight-line loss) may rise above it by
# float64 rounding alone, far below this, and still reads "no barrier".
def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def check_options(points: int, extend: float) -> None:
    """UserError unless ``points`` >= 2 and ``extend`` is a finite number >= 0."""
    if points < 2:
        raise UserError(f"a path needs at least 2 points (0 and 1), got {points}: try 21")
    if not math.isfinite(extend) or extend < 0:
        raise UserError(f"the path extension must be a finite number >= 0, got {extend}: try 0 or 0.5")


def path_axis(points: int, extend: float = 0.0) -> np.ndarray:
    """``points`` increasing values spanning [−extend, 1 + extend] that hold 0.0 and 1.0 exactly."""
    check_options(points, extend)
    return snapped_axis(-float(extend), 1.0 + float(extend), points, [0.0, 1.0])


def line_chart(theta_a: Mapping[str, torch.Tensor], theta_b: Mapping[str, torch.Tensor], name: str = "line") -> Chart:
    """The affine chart of the line through θ_A (x = 0) and θ_B (x = 1); y does nothing (V = 0, a zero scalar per
    parameter, as ``random-line``'s: no model-sized zeros, and the engine skips the y term at y = 0)."""
    u = {n: theta_b[n] - theta_a[n] for n in theta_a}
    v = {n: torch.zeros((), dtype=t.dtype, device=t.device) for n, t in theta_a.items()}
    return Chart(name, dict(theta_a), u, v, {"a": (0.0, 0.0), "b": (1.0, 0.0)})


def loss_barrier(t: np.ndarray, loss: np.ndarray) -> dict:
    """The barrier and the peak above the endpoint mean of one path (module docstring) from its losses at ``t``
    (which holds 0 and 1).

    ``barrier`` (and its copy ``chord_barrier``): max over t ∈ [0, 1] of the loss minus the chord
    ``(1 − t)·L(0) + t·L(1)``, at ``t_max`` (``chord_t_max``) where the loss is ``loss_max``; never negative,
    as the chord meets the path at both ends. ``peak_above_endpoint_mean``: max over t ∈ [0, 1] of the loss
    minus the mean of the losses at t = 0 and 1, at ``peak_t`` where the loss is ``peak_loss``.
    """
    t, loss = np.asarray(t, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    inside = np.flatnonzero((t >= 0.0) & (t <= 1.0))
    i0, i1 = int(np.flatnonzero(t == 0.0)[0]), int(np.flatnonzero(t == 1.0)[0])
    k = int(inside[np.argmax(loss[inside])])
    mean_ends = 0.5 * (loss[i0] + loss[i1])
    above_chord = loss[inside] - ((1.0 - t[inside]) * loss[i0] + t[inside] * loss[i1])
    c = int(np.argmax(above_chord))
    chord = {"barrier": float(above_chord[c]), "t_max": float(t[inside[c]]), "loss_max": float(loss[inside[c]])}
    return {
        **chord,
        **{f"chord_{key}": value for key, value in chord.items()},
        "peak_above_endpoint_mean": float(loss[k] - mean_ends),
        "peak_t": float(t[k]),
        "peak_loss": float(loss[k]),
        "loss_t0": float(loss[i0]),
        "loss_t1": float(loss[i1]),
        "mean_endpoint_loss": float(mean_ends),
    }


def peak_above_endpoint_mean_se(t: np.ndarray, samples: Sequence[torch.Tensor], info: dict) -> float:
    """Standard error of a path's peak above the endpoint mean, paired over the evaluation samples: of the mean
    over samples of l(peak_t) − (l(0) + l(1)) / 2 (the points share their samples, so their errors largely
    cancel). ``samples[j]`` holds the per-sample losses at ``t[j]``."""
    at = {float(tj): s for tj, s in zip(t, samples, strict=True)}
    return paired_se(at[info["peak_t"]], (at[0.0] + at[1.0]) / 2)


def chord_barrier_se(t: np.ndarray, samples: Sequence[torch.Tensor], info: dict) -> float:
    """Standard error of a path's (chord) barrier, paired over the evaluation samples: of the mean over samples
    of l(t*) − ((1 − t*)·l(0) + t*·l(1)) at t* = ``info["chord_t_max"]`` (0 when t* is an end)."""
    at = {float(tj): s for tj, s in zip(t, samples, strict=True)}
    tc = info["chord_t_max"]
    return paired_se(at[tc], (1.0 - tc) * at[0.0] + tc * at[1.0])


barrier_se = chord_barrier_se  # the barrier is the chord barrier


def barriers_with_se(t: np.ndarray, loss: np.ndarray, samples: Sequence[torch.Tensor]) -> dict:
    """:func:`loss_barrier` of a path plus ``barrier_se`` (= ``chord_barrier_se``) and
    ``peak_above_endpoint_mean_se`` from its per-sample losses."""
    info = loss_barrier(t, loss)
    info["barrier_se"] = info["chord_barrier_se"] = chord_barrier_se(t, samples, info)
    info["peak_above_endpoint_mean_se"] = peak_above_endpoint_mean_se(t, samples, info)
    return info


def _dense_line_evaluators(
    base_model: nn.Module,
    solutions: Mapping[str, Solution],
    third: str,
    eval_set: EvalSet,
    device,
    dtype: str,
    points_per_forward: int | str,
    objective: Classification,
):
    """``make(a, b, name)``: the dense engine on the line from solution ``a`` to ``b`` (``third`` stands in for
    "ft"), every line on one working copy of ``base_model``."""
    base = dict(base_model.named_parameters())
    roles = {s: third if s == "ft" else s for s in SOLUTIONS}
    thetas = solution_weights(base, {s: solutions[roles[s]].delta() for s in SOLUTIONS if roles[s] in solutions})
    thetas = {roles[s]: theta for s, theta in thetas.items()}
    model = copy.deepcopy(base_model)  # one working copy: every pair overwrites the same parameters
    return lambda a, b, name: PlaneEvaluator(
        model, line_chart(thetas[a], thetas[b], name), eval_set, device, dtype, points_per_forward, objective
    )


def _known_ends(t: np.ndarray, a: str, b: str, known: Mapping[str, PointResult] | None) -> dict[int, PointResult]:
    """{index of t = 0 or 1: the known result of the solution there}, for the ends whose per-sample losses are
    known (not evaluated again)."""
    return {j: known[s] for j, s in ((int(np.flatnonzero(t == 0.0)[0]), a), (int(np.flatnonzero(t == 1.0)[0]), b))
            if known and s in known and known[s].samples is not None}  # fmt: skip


def _share_ends(known: dict, t: np.ndarray, a: str, b: str, results: Mapping[int, PointResult]) -> None:
    """The ends of the line from ``a`` to ``b`` join ``known``: the next lines take them (an extra training seed's
    paths, :mod:`landscape.seeds`: 3 forwards fewer). Off by default: a t = 1 end is θ_A + (θ_B − θ_A), θ_B only
    to rounding, and the paths' numbers stay those they were."""
    known.update({s: results[int(np.flatnonzero(t == e)[0])] for s, e in ((a, 0.0), (b, 1.0)) if s not in known})


class LineOnPlane:
    """The line from vertex ``a`` to vertex ``b`` of a dense plane, evaluated by the plane's own evaluator at the
    plane coordinates of θ_a + t·(θ_b − θ_a): the line lies in the plane through the three solutions, so these
    are its weights (to fp32 rounding, as the plane's vertices are the solutions'), and the paths need no second
    copy of the model nor of the solutions' weights (on the CIFAR-100 smoke: 2.4 GB and ~8 s of building)."""

    def __init__(self, plane: PlaneEvaluator, a: str, b: str):
        self.plane = plane
        self.start = np.asarray(plane.chart.vertices[a], dtype=np.float64)
        self.end = np.asarray(plane.chart.vertices[b], dtype=np.float64)

    def evaluate_iter(self, points: Iterable[tuple[float, float]], keep_samples: bool = False) -> Iterator[PointResult]:
        """:meth:`landscape.engine.grid.PlaneEvaluator.evaluate_iter` at the line's points (t, 0)."""
        coords = []
        for t, y in points:
            if y != 0.0:
                raise ValueError(f"a line on the plane has points (t, 0) only, not (t, {y})")
            coords.append(tuple(float(c) for c in self.start + t * (self.end - self.start)))
        return self.plane.evaluate_iter(coords, keep_samples=keep_samples)


def _plane_for(plane: PlaneEvaluator | None, chart, lines: list[tuple[str, str]]) -> PlaneEvaluator | None:
    """``plane`` (a dense plane's evaluator) when it can carry every line: no factored ``chart`` given and each
    line's ends among its vertices (a random or Hessian chart has only its centre); else None."""
    if chart is not None or plane is None or any(s not in plane.chart.vertices for line in lines for s in line):
        return None
    return plane


def _line_maker(base_model, solutions, third, eval_set, device, dtype, points_per_forward, objective, storage, chart,
                plane=None):  # fmt: skip
    """``make(a, b, name)``: the evaluator of the line from ``a`` to ``b``: on ``plane`` (the plane's dense evaluator,
    whose vertices the lines join: :class:`LineOnPlane`), else in ``storage`` (factored or dense)."""
    if plane is not None:
        return lambda a, b, name: LineOnPlane(plane, a, b)
    if storage == "factored":
        return factored.line_evaluators(base_model, solutions, eval_set, device, dtype, objective, chart)
    return _dense_line_evaluators(base_model, solutions, third, eval_set, device, dtype, points_per_forward,
                                  objective)  # fmt: skip


def evaluate_line(evaluator, t: np.ndarray, todo: list[int], results: dict, k: int, store, bar, label: str,
                  y: float = 0.0) -> None:  # fmt: skip
    """The points ``todo`` (indices of ``t``, at (t, ``y``) in the evaluator's chart) of line ``k`` into ``results``
    (and ``store``, with their samples); also used by :mod:`landscape.curves` (its curve row at y = 1)."""
    line = evaluator.evaluate_iter(((float(t[j]), y) for j in todo), keep_samples=True)
    for j, r in zip(todo, line, strict=True):
        results[j] = r
        if store is not None:
            store.add(k, j, (r.loss, r.accuracy, r.loss_se, r.samples.detach().cpu().numpy()))
        bar.update(1)
        bar.set_postfix(path=label, loss=f"{r.loss:.3f}")
    bar.update(len(t) - len(todo))


def stored_points(stored: Mapping[tuple[int, int], tuple], k: int) -> dict[int, PointResult]:
    """The points of line ``k`` read back from a :class:`landscape.engine.store.SampleStore` (their per-sample
    losses as the forward returned them: fp64)."""
    return {j: PointResult(lo, acc, se, torch.from_numpy(np.asarray(sam)))
            for (i, j), (lo, acc, se, sam) in stored.items() if i == k}  # fmt: skip


def compute_paths(
    base_model: nn.Module,
    solutions: Mapping[str, Solution],
    eval_set: EvalSet,
    device: torch.device | str,
    points: int = 21,
    extend: float = 0.0,
    progress: bool = True,
    points_per_forward: int | str = 1,
    dtype: str = "float32",
    objective: Classification = OBJECTIVES["classification"],
    storage: str = "auto",
    chart: factored.FactoredChart | None = None,
    plane: PlaneEvaluator | None = None,
    known: Mapping[str, PointResult] | None = None,
    share_ends: bool = False,
    store: store.SampleStore | None = None,
    only: Collection[tuple[int, int]] | None = None,
) -> dict | None:
    """Loss, accuracy and its standard error along the three pairwise lines; barriers per pair.

    ``points_per_forward``: values of t per vmapped forward (see :mod:`landscape.engine.grid`); ``dtype``: the
    forward precision, the plane's (``bfloat16`` autocast or ``float32``), so paths and surface agree.
    ``storage``: ``dense``, ``factored`` (W0 + (1 − t)·ΔW_A + t·ΔW_B built per module on ``base_model`` itself)
    or ``auto``, as the plane's (:mod:`landscape.engine.factored`); ``chart``: the plane's factored chart, whose
    updates the lines then share (implies ``factored``: full fine-tuning's update is not held twice).
    ``plane``: a dense plane's evaluator through the solutions: the lines are evaluated on it (:class:`LineOnPlane`:
    the same weights to fp32 rounding, no second model copy) where it can carry them (:func:`_plane_for`).
    ``known``: {solution: its result on the same evaluation set and precision, with per-sample losses} (the
    plane's vertices, :func:`landscape.report.vertex_results`): the endpoints t = 0 and t = 1 of a line take
    these instead of being evaluated again (the same weights to fp32 rounding, built through the plane's chart).
    ``share_ends``: a solution evaluated at one line's end is not evaluated again at the next's (:func:`_share_ends`).
    ``store``: points (pair k, t's index j) with their per-sample losses, read back and added to (a launcher
    run's :class:`landscape.engine.store.SampleStore`); ``only``: these (k, j) alone, into ``store`` (returns None).
    Returns ``{"t": (n,), "pairs": [..3], "loss"/"accuracy"/"loss_se": (3, n), "barriers": {pair: {...}},
    "points", "extend", "eval_samples", "seconds", "storage"}``. ``base_model``'s weights are not modified.
    """
    t = path_axis(points, extend)
    # without an FT solution the base model (ΔW = 0) is the third vertex, as on the plane
    third = chart.third if chart is not None else ("ft" if "ft" in solutions else "base")
    storage = "factored" if chart is not None else factored.choose_storage(storage, base_model, device)
    lines = [(third if a == "ft" else a, b) for a, b in PAIRS]
    plane = _plane_for(plane, chart, lines)
    storage = "dense" if plane is not None else storage
    make = _line_maker(base_model, solutions, third, eval_set, device, dtype, points_per_forward, objective, storage,
                       chart, plane)  # fmt: skip
    pairs = [pair_name(a, b) for a, b in lines]
    out = {k: np.full((len(lines), len(t)), np.nan) for k in ("loss", "accuracy", "loss_se")}
    barriers, known = {}, dict(known or {})
    start = time.perf_counter()
    bar = progress_bar(total=len(lines) * len(t), desc="paths", disable=not progress, dynamic_ncols=True)
    stored = store.load() if store is not None else {}
    for k, (a, b) in enumerate(lines):
        results = {**stored_points(stored, k), **_known_ends(t, a, b, known)}
        todo = [j for j in range(len(t)) if j not in results and (only is None or (k, j) in only)]
        if only is not None and not todo:
            continue
        evaluator = make(a, b, pairs[k])
        samples = []  # per-sample losses along the line: the barrier's paired error needs no extra forward
        evaluate_line(evaluator, t, todo, results, k, store, bar, pairs[k])
        if only is not None:  # a path task: its points are in the store
            if storage == "factored":
                evaluator.close(restore_device=True)
            continue
        for j in range(len(t)):
            r = results[j]
            out["loss"][k, j], out["accuracy"][k, j], out["loss_se"][k, j] = r.loss, r.accuracy, r.loss_se
            samples.append(r.samples)
        barriers[pairs[k]] = barriers_with_se(t, out["loss"][k], samples)
        if share_ends:
            _share_ends(known, t, a, b, results)
        if storage == "factored":  # the hooks go; the base model goes home after the last pair
            evaluator.close(restore_device=k == len(lines) - 1)
        del evaluator
    bar.close()
    if only is not None:
        return None
    seconds = round(time.perf_counter() - start, 3)
    return {"t": t, "pairs": pairs, **out, "barriers": barriers, "points": len(t), "extend": float(extend),
            "eval_samples": eval_set.n, "seconds": seconds, "storage": storage}  # fmt: skip


def write_paths(
    result: Mapping, out_dir: str | Path, info: Mapping | None = None, title: str | None = None
) -> list[Path]:
    """Write paths.npz, paths.json, paths.png and paths.pdf under ``out_dir`` (atomically); returns them.

    ``info`` (optional) is merged into paths.json: dataset, model, seed, eval split, ...
    """
    out = Path(out_dir)
    store.write_npz(
        out / "paths.npz",
        t=np.asarray(result["t"], dtype=np.float64),
        loss=np.asarray(result["loss"], dtype=np.float64),
        accuracy=np.asarray(result["accuracy"], dtype=np.float64),
        loss_se=np.asarray(result["loss_se"], dtype=np.float64),
        pairs=np.array([str(p) for p in result["pairs"]]),
    )
    meta = {
        **(dict(info) if info else {}),
        "points": int(result["points"]),
        "extend": float(result["extend"]),
        "t_range": [float(result["t"][0]), float(result["t"][-1])],
        "eval_samples": int(result["eval_samples"]),
        "format_version": FORMAT_VERSION,
        "barrier_definition": BARRIER_DEFINITION,
        "chord_barrier_definition": CHORD_BARRIER_DEFINITION,
        "peak_above_endpoint_mean_definition": PEAK_DEFINITION,
        "pairs": {p: dict(result["barriers"][p]) for p in result["pairs"]},
        "seconds": result.get("seconds"),
    }
    store.write_json(out / "paths.json", meta)
    # imported here, not at the top: plotting (matplotlib, about 31 MB resident) is for writing the figure, and
    # compute_paths (a launcher's path task, the benchmarks) needs none of it
    from landscape import render

    fig = render.paths_figure(result, title)
    store.write_with(out / "paths.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    store.write_with(out / "paths.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / f"paths.{ext}" for ext in ("npz", "json", "png", "pdf")]


def summary(result: Mapping) -> dict:
    """What landscape.json records under "paths": per quantity {pair: value}; ``barrier`` the chord barrier."""
    keys = ("barrier", "barrier_se", "t_max", "chord_barrier", "chord_t_max", "chord_barrier_se",
            "peak_above_endpoint_mean", "peak_above_endpoint_mean_se", "peak_t")  # fmt: skip
    if any("barrier_per_seed" in b for b in result["barriers"].values()):  # --seeds N > 1 (landscape.seeds)
        keys += ("barrier_per_seed", "barrier_mean", "barrier_ci95")
    return {
        "format_version": FORMAT_VERSION,
        "points": int(result["points"]),
        "extend": float(result["extend"]),
        **{key: {p: result["barriers"][p].get(key) for p in result["pairs"]} for key in keys},
        "definitions": {
            "barrier": BARRIER_DEFINITION,
            "chord_barrier": CHORD_BARRIER_DEFINITION,
            "peak_above_endpoint_mean": PEAK_DEFINITION,
        },
    }


# ----------------------------------------------------------------------------- command line ----


def build_parser():
    from landscape.cli import Parser, out_folder, points_per_forward_arg, positive_int

    p = Parser(
        prog=PROG,
        description="Loss along the straight lines between the ft, lora and randlora solutions of a run "
        "(written by landscape.connectivity) and the barrier of each pair: the height of the path above the chord "
        "between its endpoint losses.",
        epilog="Example: python -m landscape.paths --run runs/wordnet --points 21 --extend 0.25",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument(
        "--out", type=out_folder, default=None, help="where to write paths.{npz,json,png,pdf} (default: the run folder)"
    )
    p.add_argument("--points", type=int, default=21, help="values of t per path, 0 and 1 included (default: 21)")
    p.add_argument("--extend", type=float, default=0.0, help="t runs over [-E, 1 + E] (default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument(
        "--points-per-forward",
        type=points_per_forward_arg,
        default="auto",
        help="values of t evaluated by one vmapped forward: a number or auto (1 on CPU, where batching does not "
        "pay; on GPU enough to fill it, 8 for batches of 128) (default: auto)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(argv: Sequence[str] | None = None) -> None:
    from adapters import threads
    from landscape.cli import resolve_device
    from landscape.run import open_run

    args = build_parser().parse_args(argv)
    check_options(args.points, args.extend)
    threads.configure(args.threads)
    device = resolve_device(args.device)
    ctx = open_run(args.run, device)
    missing = [m for m in ("lora", "randlora") if m not in ctx.solutions]
    if missing:
        raise UserError(f"{args.run}: the paths run between lora, randlora and ft (or the base model), and this run "
                        f"has no {' and no '.join(missing)}: pass a run that trained them (--methods)")  # fmt: skip
    if "ft" not in ctx.solutions:  # as the run's plane: the base model is the third vertex (--load-4bit's default)
        from adapters.solution import base_solution

        ctx.solutions["base"] = base_solution(ctx.base, ctx.loaded.model_name)
    dtype = ctx.loaded.config.landscape_dtype(device.type)  # the run's precision on this device
    result = compute_paths(
        ctx.base, ctx.solutions, ctx.eval_set, device, args.points, args.extend, progress=not args.no_progress,
        points_per_forward=args.points_per_forward, dtype=dtype, objective=ctx.loaded.task.objective,
    )  # fmt: skip
    meta = ctx.meta
    # The endpoints are the solutions: their loss must match what the run measured at the vertices.
    for pair in result["pairs"]:
        a, b = pair.split("-")
        ends = result["barriers"][pair]
        for name, value in ((a, ends["loss_t0"]), (b, ends["loss_t1"])):
            recorded = (meta.get("solutions") or {}).get(name, {}).get("vertex_loss")
            if recorded is not None and abs(value - recorded) > 1e-4 * max(1.0, abs(recorded)):
                print(
                    f"{PROG}: warning: {name}'s loss here is {value:.6g} but the run recorded {recorded:.6g}: "
                    "the evaluation set or the weights differ from the run's",
                    file=sys.stderr,
                )
    info = {k: meta.get(k) for k in ("dataset", "model", "seed", "eval_split")}
    info.update(run=str(ctx.run_dir), device=str(device), dtype=dtype)
    out = Path(args.out) if args.out else ctx.run_dir
    title = f"{meta['model']} on {meta['dataset']}: loss along the linear paths between the solutions"
    written = write_paths(result, out, info=info, title=title)
    print("wrote " + ", ".join(str(p) for p in written))
    for p in result["pairs"]:
        b = result["barriers"][p]
        print(
            f"{p:<14} {barrier_text(b)}; peak above the endpoint mean {b['peak_above_endpoint_mean']:.4f} ± "
            f"{b['peak_above_endpoint_mean_se']:.4f} at t = {b['peak_t']:.3f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import recipe_main

    return recipe_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
