"""Several draws of random directions around one centre, the collapse level, the step scale and the spread.

A random chart (``--chart random`` / ``random-line``, :mod:`landscape.engine.directions`) drawn once says as much
about its seed as about the solution. With ``--draws K`` (default 5) the chart is evaluated for K independent
draws of the directions around the same centre: draw 0 with the direction seed (its grid is the run's
``landscape.npz`` ``loss``, resumed through the run's grid store, and the one the figures draw), draw k > 0 with
:func:`landscape.engine.directions.draw_seed` (seed, k), each written into the same evaluator in place
(:func:`landscape.engine.directions.redraw`) and checkpointed in ``.grid/draw-k``.

The collapse level is the loss of a uniform prediction: ln C for C classes; ln |V| for a causal LM's answer
loss, a token cross-entropy over the vocabulary V. A point at or above it is flagged ``collapsed``: there the
model has forgotten the task, and its loss says nothing about the basin's curvature.

The step scale (the grid's α range [−a, a] when no ``x_range`` / ``y_range`` is given): a = 1, halved until
every draw's loss at the grid's extreme points — α = ±a on a line, the four corners (±a, ±a) of a plane — is
below the collapse level, at most :data:`HALVINGS` times (a ≥ 2⁻¹⁰); the draws are probed in turn, each from
the scale the earlier ones left. When the centre itself is at or above the level no scale helps: a = 1.

Sharpness of a draw: the rise (L(−α) + L(+α))/2 − L(0) along δ (a plane: the mean of the rises along δ and η)
at α = the largest grid step at which no draw has a collapsed point at ±α (collapsed points are left out), and
at the first grid step; its spread over the draws is the SD (ddof = 1), min and max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from landscape.engine.directions import draw_seed, redraw
from landscape.engine.grid import run_grid

HALVINGS = 10  # the step-scale probe stops at a = 2^-10
FIELDS = ("loss", "accuracy", "loss_se")


def collapse_level(task) -> tuple[float | None, str]:
    """(the loss of a uniform prediction, how it was found) for a run's task: ln C, or ln |V| for an LM."""
    if task.objective.name == "answer":
        vocab = vocab_size(task.base)
        if vocab is None:
            return None, "unknown: the model has no output vocabulary to read"
        return math.log(vocab), f"ln {vocab}: a uniform prediction over the {vocab}-token vocabulary"
    classes = len(task.dataset.classes)
    return math.log(classes), f"ln {classes}: a uniform prediction over the {classes} classes"


def vocab_size(model) -> int | None:
    """The size of a causal LM's output vocabulary: its output embedding's rows, else its config's vocab_size."""
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        out = get() if callable(get) else None
        if out is not None and getattr(out, "weight", None) is not None:
            return int(out.weight.shape[0])
        size = getattr(getattr(module, "config", None), "vocab_size", None)
        if isinstance(size, int):
            return size
    return None


def end_points(line: bool, a: float) -> list[tuple[float, float]]:
    """The grid's extreme points at scale ``a``: ±a on a line, the four corners of a plane."""
    return [(-a, 0.0), (a, 0.0)] if line else [(x, y) for y in (-a, a) for x in (-a, a)]


def step_scale(
    ends: Callable[[int, float], Sequence[float]], count: int, level: float | None, centre_loss: float
) -> tuple[float, list[dict]]:
    """The step scale a (module docstring) and the probe's record; ``ends(k, a)``: draw k's losses at the
    extreme points at scale a."""
    if level is None or not centre_loss < level:
        return 1.0, []
    a, probes = 1.0, []
    for k in range(count):
        for _ in range(HALVINGS + 1):
            worst = float(max(ends(k, a)))
            probes.append({"draw": k, "scale": a, "max_end_loss": worst})
            if worst < level or a <= 2.0**-HALVINGS:
                break
            a /= 2
    return a, probes


def probe_scale(evaluator, count: int, seed: int, level: float | None) -> tuple[float, dict]:
    """:func:`step_scale` on ``evaluator``'s chart (left holding draw 0's directions) and its record."""
    line = evaluator.chart.name == "random-line"
    current = {"k": 0}

    def ends(k: int, a: float) -> list[float]:
        if current["k"] != k:
            redraw(evaluator.chart, draw_seed(seed, k))
            current["k"] = k
        return [r.loss for r in evaluator.evaluate_many(end_points(line, a))]

    centre = evaluator.evaluate(0.0, 0.0).loss
    try:
        a, probes = step_scale(ends, count, level, centre)
    finally:
        if current["k"] != 0:
            redraw(evaluator.chart, draw_seed(seed, 0))
    rule = (
        "a = 1 halved until every draw's loss at the grid's extreme points (±a on a line, the corners of a plane) "
        f"is below the collapse level (at most {HALVINGS} halvings)"
    )
    return a, {"scale": a, "rule": rule, "probes": probes, "centre_loss": centre}


def evaluate_draws(evaluator, xs, ys, first: dict, count: int, seed: int, store=None, progress: bool = True) -> dict:
    """The grid of every draw: ``first`` (draw 0's :func:`run_grid` result) and draws 1..count−1, each written into
    ``evaluator``'s chart in place and evaluated by :func:`run_grid` (``store(k)``: its grid store, or None);
    the chart holds draw 0's directions again on return. Arrays ``draw_<field>`` of shape (count, ny, nx)."""
    grids = [first]
    try:
        for k in range(1, count):
            redraw(evaluator.chart, draw_seed(seed, k))
            grids.append(run_grid(evaluator, xs, ys, store=store(k) if store else None, progress=progress))
    finally:
        if count > 1:
            redraw(evaluator.chart, draw_seed(seed, 0))
    out = {f"draw_{f}": np.stack([g[f] for g in grids]) for f in FIELDS}
    out["draw_seeds"] = np.array([draw_seed(seed, k) for k in range(count)], dtype=np.int64)
    out["points_computed_draws"] = sum(int(g["points_computed"]) for g in grids[1:])
    return out


def spread(values: Sequence[float]) -> dict:
    """SD (ddof = 1; 0 for one value), min and max, and the mean, of per-draw values."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max())}  # fmt: skip


def _index(axis: np.ndarray, value: float) -> int | None:
    hits = np.flatnonzero(np.isclose(axis, value, rtol=0.0, atol=1e-12))
    return int(hits[0]) if len(hits) else None


def rises(xs: np.ndarray, ys: np.ndarray, loss: np.ndarray, alpha: float) -> np.ndarray | None:
    """Per draw, the rise at ±``alpha`` (module docstring) of ``loss`` (K, ny, nx); None when a point is off the
    grid."""
    i0, j0 = _index(ys, 0.0), _index(xs, 0.0)
    jm, jp = _index(xs, -alpha), _index(xs, alpha)
    if None in (i0, j0, jm, jp):
        return None
    centre = loss[:, i0, j0]
    rise = 0.5 * (loss[:, i0, jm] + loss[:, i0, jp]) - centre
    if len(ys) > 1:  # a plane: the mean of the rises along δ and along η
        im, ip = _index(ys, -alpha), _index(ys, alpha)
        if None in (im, ip):
            return None
        rise = 0.5 * (rise + 0.5 * (loss[:, im, j0] + loss[:, ip, j0]) - centre)
    return rise


def _ends_collapsed(xs, ys, collapsed: np.ndarray, alpha: float) -> bool:
    i0, j0 = _index(ys, 0.0), _index(xs, 0.0)
    hit = [collapsed[:, i0, _index(xs, s * alpha)] for s in (-1, 1)]
    if len(ys) > 1:
        hit += [collapsed[:, _index(ys, s * alpha), j0] for s in (-1, 1)]
    return bool(np.any(hit))


def summary(xs: np.ndarray, ys: np.ndarray, arrays: dict, level: float | None) -> dict:
    """The draws' record for landscape.json: seeds, every draw's losses, the collapsed points, the per-point spread
    and the sharpness of each draw at the largest uncollapsed step and at the first step, with its spread."""
    loss = arrays["draw_loss"]
    collapsed = np.zeros(loss.shape, dtype=bool) if level is None else ~(loss < level)  # NaN counts as collapsed
    steps = sorted(float(a) for a in xs if a > 0 and _index(xs, -a) is not None)
    usable = [a for a in steps if rises(xs, ys, loss, a) is not None and not _ends_collapsed(xs, ys, collapsed, a)]
    sharp = {}
    for name, alpha in (("at_scale", usable[-1] if usable else None), ("first_step", steps[0] if steps else None)):
        if alpha is None or alpha not in usable:
            sharp[name] = {"alpha": alpha, "per_draw": None, "why": "a point at ±alpha is collapsed in some draw"}
            continue
        per = rises(xs, ys, loss, alpha)
        sharp[name] = {"alpha": alpha, "per_draw": [float(v) for v in per], **spread(per)}
    return {
        "count": int(loss.shape[0]), "seeds": [int(s) for s in arrays["draw_seeds"]],
        "seed_rule": "draw 0: the direction seed; draw k > 0: numpy SeedSequence([seed, k]).generate_state(1)[0] "
                     "& 0x7FFFFFFF",
        "loss_per_draw": loss.tolist(), "collapsed_per_draw": collapsed.tolist(),
        "collapsed_points": int(collapsed.sum()), "collapse_level": level,
        "sharpness": sharp,
        "sharpness_rule": "(L(-a) + L(+a))/2 - L(0) per draw (a plane: the mean over δ and η), at the largest grid "
                          "step a with no collapsed point at ±a in any draw (at_scale) and at the first step; sd "
                          "with ddof = 1",
    }  # fmt: skip


def spread_arrays(arrays: dict, level: float | None) -> dict[str, np.ndarray]:
    """landscape.npz's per-point spread over the draws and the collapsed flags."""
    loss = arrays["draw_loss"]
    k = loss.shape[0]
    return {
        "draw_loss_sd": loss.std(axis=0, ddof=1) if k > 1 else np.zeros(loss.shape[1:]),
        "draw_loss_min": loss.min(axis=0), "draw_loss_max": loss.max(axis=0),
        "collapsed": np.zeros(loss.shape, dtype=bool) if level is None else ~(loss < level),
        "collapse_level": np.array(np.nan if level is None else level),
    }  # fmt: skip


def line(info: dict) -> str:
    """The run's console line for its draws: the sharpness with its spread, the collapsed points."""
    sharp = info["sharpness"]["at_scale"]
    if not sharp.get("per_draw"):
        rise = "no step without collapsed points, no rise"
    elif info["count"] == 1:
        rise = f"rise at α = {sharp['alpha']:g} {sharp['mean']:.4f} (one draw: no spread)"
    else:
        rise = (f"rise at α = {sharp['alpha']:g} {sharp['mean']:.4f} (SD {sharp['sd']:.4f}; {sharp['min']:.4f}–"
                f"{sharp['max']:.4f} over the draws)")  # fmt: skip
    total = int(np.asarray(info["collapsed_per_draw"]).size)
    level = "unknown" if info["collapse_level"] is None else f"{info['collapse_level']:.4f}"
    return (
        f"random directions, {info['count']} draws: {rise}; {info['collapsed_points']} of {total} points at or above "
        f"the collapse level {level}"
    )
