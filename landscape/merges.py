"""python -m landscape.merges — merges of the solutions' weight updates ΔW, evaluated on the paths' evaluation set
and placed on the plane through the solutions.

**Merges** (of any two or three solutions' dense ΔW, per parameter of the base model; a parameter a solution
does not change is a zero update there):

- ``task_arithmetic`` (Ilharco et al. 2023): ΔW = Σ w_i ΔW_i.
- ``ties`` (Yadav et al. 2023, TIES-Merging), as ``peft.utils.merge_utils.ties``: per ΔW_i keep its top
  ``k`` % entries by magnitude (``--top-k``, default 20: int(k/100 · numel) entries) and zero the rest; elect
  one sign per entry, that of Σ_i trimmed ΔW_i (the sign of larger summed magnitude; + on a tie); ΔW =
  Σ_i w_i·trimmed ΔW_i over the entries whose sign agrees, divided by how many agree (at least 1). The weights
  scale the entries inside that mean, as peft does: weights summing to 1 shrink the merge towards W0 (at
  (½, ½): half the mean of the agreeing entries); the paper's scaling λ = 1 is weights (1, 1).
- ``dare`` (Yu et al. 2024, DARE), as ``peft.utils.merge_utils.dare_linear``: each entry of each ΔW_i is
  dropped with probability p (``--drop``, default 0.9) and the kept ones rescaled by 1/(1 − p); ΔW =
  Σ w_i·(that ΔW_i). The masks come from a ``torch.Generator`` seeded per merge (its ``seed`` is recorded):
  parameters in sorted order, the merge's solutions in order within each, one Bernoulli draw per entry —
  the numbers peft's ``dare_linear`` draws after ``torch.manual_seed(seed)`` on the same tensors (tests).

These merge the dense updates ΔW = W − W0. peft's ``add_weighted_adapter`` (combination_type ``ties``,
``dare_linear``, ...) merges a LoRA's factors A and B separately into a new adapter, which is a different
operation (its ΔW is not a merge of the ΔWs) and is not what this module computes.

**Default merges**: every pair of the chosen solutions at weights (½, ½) and the three at (⅓, ⅓, ⅓), for
each kind (``--weights``: instead, one merge of the ``--solutions`` at those weights). A (½, ½)
task-arithmetic merge is the midpoint of the straight path between the two solutions (``paths.json`` at
t = 0.5), and every task-arithmetic merge with weights summing to 1 lies on the plane.

**Evaluation and placement.** Each merge W0 + ΔW is evaluated on the run's evaluation set (the samples,
objective and precision of ``paths.json`` and the plane), and so is each merged solution. ``gap`` = merged
loss − the lowest loss among the merged solutions (the best endpoint), with ``gap_se`` its standard error
paired over the samples. ``coords`` are the least-squares coordinates (x, y) of the merged weights in the
run's chart (:mod:`landscape.engine.plane`: ``paper`` θ = θ_R + x·(θ_L − θ_R) + y·(θ_F − (θ_R + θ_L)/2), or
``orthonormal``; a run on a random chart is placed on the paper chart) and ``off_plane_distance`` the
Euclidean norm of the rest (weight-space units): 0 for a point of the plane.

**Output** (under ``--out``, default the run folder; each file written atomically):

  merges.json   ``merges``: per merge ``kind``, ``solutions``, ``weights``, ``loss``, ``loss_se``, ``accuracy``,
                ``gap``, ``gap_se``, ``best_endpoint``, ``coords``, ``off_plane_distance``, ``delta_norm``
                (‖ΔW‖) and ``seed`` (dare); ``endpoints`` (each solution's loss and coordinates); the settings,
                ``seed``, the run's ``training_seed``, chart, precision and evaluation set (``eval``: the
                digest of its batches, as :func:`landscape.curvature.eval_fingerprint`)
  merges.npz    the same numbers as arrays (coords (m, 2), loss, loss_se, gap, gap_se, off_plane_distance, ...)
  merges.png / merges.pdf   the merges on the plane's loss contour (landscape.npz) and their gaps ± 2 SE
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES, Classification, PointResult, paired_se
from adapters.progress import progress_bar
from adapters.solution import Solution
from landscape.engine import store
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import CHARTS, SOLUTIONS, Chart, build_chart

PROG = "python -m landscape.merges"
FORMAT = 1
KINDS = ("task_arithmetic", "ties", "dare")
FILES = tuple(f"merges.{ext}" for ext in ("json", "npz", "png", "pdf"))
DEFINITIONS = {
    "task_arithmetic": "sum_i w_i dW_i",
    "ties": "trim each dW_i to its top k% by magnitude; elect the sign of sum_i trimmed dW_i per entry; "
    "sum_i w_i trimmed dW_i over the agreeing entries / their count (peft.utils.merge_utils.ties)",
    "dare": "sum_i w_i (dW_i * Bernoulli(1 - p) mask / (1 - p)) (peft.utils.merge_utils.dare_linear)",
    "gap": "loss(W0 + merged dW) - min over the merged solutions of loss(W0 + dW_i), paired SE over the samples",
    "coords": "least-squares coordinates of the merged weights in the run's chart",
    "off_plane_distance": "Euclidean norm of the merged weights minus their projection onto the plane",
}
PEFT_NOTE = ("merges of the dense updates dW; peft's add_weighted_adapter merges a LoRA's A and B factors "
             "separately into a new adapter, a different operation")  # fmt: skip

__all__ = ["KINDS", "MergeSettings", "dare", "default_merges", "main", "merge", "merges_stage", "project", "ties"]


@dataclass(frozen=True)
class MergeSettings:
    """Which merges to make and how (module docstring)."""

    kinds: tuple[str, ...] = KINDS
    top_k: float = 20.0  # TIES: the percentage of each ΔW's entries kept, by magnitude
    drop: float = 0.9  # DARE: the probability p of dropping an entry
    seed: int = 0
    weights: tuple[float, ...] | None = None  # one merge of all the chosen solutions at these weights

    def check(self) -> None:
        """UserError naming the first bad setting and its fix."""
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise UserError(f"--kinds {' '.join(map(str, self.kinds))}: choose from {', '.join(KINDS)}")
        k, p = self.top_k, self.drop
        if not isinstance(k, int | float) or not math.isfinite(k) or not 0 < k <= 100:
            raise UserError(f"--top-k {k!r}: the percentage of entries TIES keeps must be in (0, 100]: try 20")
        if not isinstance(p, int | float) or not math.isfinite(p) or not 0 <= p < 1:
            raise UserError(f"--drop {p!r}: DARE's drop probability must be in [0, 1): try 0.9")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserError(f"--seed {self.seed!r}: must be an integer >= 0: try 0")
        w = self.weights
        if w is not None and (
            len(w) not in (2, 3) or not all(isinstance(x, int | float) and math.isfinite(x) for x in w)
        ):
            raise UserError(f"--weights {' '.join(map(str, w))}: two or three finite numbers, one per solution")

    def to_dict(self) -> dict:
        weights = None if self.weights is None else list(self.weights)
        return {**dataclasses.asdict(self), "kinds": list(self.kinds), "weights": weights}


def default_merges(names: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
    """Every pair of ``names`` at (½, ½) and, with three or more, every triple at (⅓, ⅓, ⅓)."""
    out = [(pair, (0.5, 0.5)) for pair in itertools.combinations(names, 2)]
    out += [(triple, (1 / 3, 1 / 3, 1 / 3)) for triple in itertools.combinations(names, 3)]
    return out


def merge_seed(seed: int, solutions: Sequence[str]) -> int:
    """The DARE generator's seed of one merge: from ``seed`` and the merged solutions (an independent stream
    per merge, the same for the same merge in every run)."""
    words = [int.from_bytes(s.encode(), "little") % (1 << 32) for s in solutions]
    return int(np.random.SeedSequence([seed, 23, *words]).generate_state(1)[0])


# --------------------------------------------------------------------------- the merges of one parameter


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], top_k: float) -> torch.Tensor:
    """TIES of one parameter's updates (module docstring): trim to the top ``top_k`` %, elect, disjoint mean."""
    trimmed = []
    for d in deltas:
        keep = int(top_k / 100 * d.numel())
        flat = d.reshape(-1)
        order = torch.topk(flat.abs(), keep, sorted=False).indices  # which of equal magnitudes: as peft's
        t = torch.zeros_like(flat)
        t[order] = flat[order]
        trimmed.append(t.reshape(d.shape))
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0)  # sum(...) starts at int 0: fine for tensors
    agree = [torch.sign(t) == elected for t in trimmed]  # a trimmed (zero) entry has sign 0: never agrees
    total = sum(w * t * a for w, t, a in zip(weights, trimmed, agree, strict=True))
    count = sum(a.to(deltas[0].dtype) for a in agree)
    return total / count.clamp_min(1.0)


def dare(deltas: Sequence[torch.Tensor], weights: Sequence[float], drop: float,
         generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """DARE of one parameter's updates: each entry kept with probability 1 − ``drop`` and rescaled by 1/(1 − drop),
    then the weighted sum. ``drop`` = 0 draws nothing (as peft)."""
    keep = 1.0 - drop
    total = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        if drop > 0:
            d = d * torch.bernoulli(torch.full_like(d, keep), generator=generator) / keep
        total = total + w * d
    return total


def merge(
    kind: str, deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], settings: MergeSettings,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The merged update {parameter: ΔW} of ``deltas`` (one {parameter: ΔW} per solution, a parameter absent
    from one is its zero update) over the union of their parameters, in sorted order (DARE's draws follow it).
    ``seed``: DARE's generator (default ``settings.seed``)."""
    if len(deltas) != len(weights) or len(deltas) < 2:
        raise UserError(
            f"a merge needs two or more solutions and one weight each, got {len(deltas)} and {len(weights)}"
        )
    names = sorted(set().union(*deltas))
    generator = torch.Generator().manual_seed(settings.seed if seed is None else seed)
    out = {}
    for n in names:
        like = next(d[n] for d in deltas if n in d).float()
        parts = [d[n].float() if n in d else torch.zeros_like(like) for d in deltas]
        if kind == "task_arithmetic":
            out[n] = sum(w * p for w, p in zip(weights, parts, strict=True))
        elif kind == "ties":
            out[n] = ties(parts, weights, settings.top_k)
        elif kind == "dare":
            out[n] = dare(parts, weights, settings.drop, generator)
        else:
            raise UserError(f"unknown merge {kind!r}: choose from {', '.join(KINDS)}")
    return out


# --------------------------------------------------------------------------- placing a point on the plane


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    # fp32 products summed in float64: millions of terms (a float64 copy of each would cost twice the time)
    return float(sum(torch.sum(a[n] * b[n], dtype=torch.float64) for n in a))


def plane_chart(deltas: Mapping[str, Mapping[str, torch.Tensor]], chart: str) -> Chart | None:
    """The run's chart in update space (W0 = 0: every chart is affine, so coordinates are the same as in weight
    space) over the union of the solutions' parameters; None without the lora and randlora vertices. The third
    vertex is ft, or the base model (ΔW = 0) as on the run's plane."""
    if not all(s in deltas for s in ("lora", "randlora")):
        return None
    names = sorted(set().union(*deltas.values()))
    like = {n: next(d[n] for d in deltas.values() if n in d) for n in names}
    full = {s: {n: deltas[s][n].float() if n in deltas[s] else torch.zeros_like(like[n]).float() for n in names}
            for s in SOLUTIONS if s in deltas}  # fmt: skip
    if "ft" not in full:
        full["ft"] = {n: torch.zeros_like(t).float() for n, t in like.items()}
    return build_chart(chart if chart in CHARTS else "paper", full)


def gram(chart: Chart) -> np.ndarray:
    """[[U·U, U·V], [V·U, V·V]] of a chart (float64): what every :func:`project` onto it shares."""
    u, v = chart.u, chart.v
    return np.array([[_dot(u, u), _dot(u, v)], [_dot(v, u), _dot(v, v)]])


def project(chart: Chart, delta: Mapping[str, torch.Tensor], g: np.ndarray | None = None) -> tuple[list[float], float]:
    """(x, y) minimising ‖Δ − (origin + x·U + y·V)‖ and that minimum (the distance off the plane); ``g``: the
    chart's :func:`gram` (computed when not given)."""
    d = {n: delta[n].float() - o if n in delta else -o for n, o in chart.origin.items()}
    u, v = chart.u, chart.v
    rhs = np.array([_dot(u, d), _dot(v, d)])
    xy = np.linalg.lstsq(gram(chart) if g is None else g, rhs, rcond=None)[0]
    x, y = float(xy[0]), float(xy[1])
    # the residual itself, not ‖d‖² − bᵀG⁻¹b: a point of the plane gives 0 up to rounding, not to cancellation
    rest = sum(float(torch.sum((d[n] - x * u[n] - y * v[n]) ** 2, dtype=torch.float64)) for n in d)
    return [x, y], math.sqrt(rest)


# --------------------------------------------------------------------------- evaluation


class PointLoss:
    """The loss of W0 + ΔW on an evaluation set, through the plane's engine (a one-point chart: origin W0,
    U = ΔW, V = 0, evaluated at (1, 0)) on one working copy of the base model."""

    def __init__(self, base, eval_set: EvalSet, device, dtype: str, objective: Classification):
        self.model = copy.deepcopy(base)
        self.w0 = {n: p.detach().float() for n, p in base.named_parameters()}
        self.eval_set, self.device, self.dtype, self.objective = eval_set, device, dtype, objective
        self.passes = 0
        self.touched: set[str] = set()

    def __call__(self, delta: Mapping[str, torch.Tensor]) -> PointResult:
        # the parameters an earlier point changed go back to W0 (the working copy is shared by every point)
        self.touched.update(delta)
        zero = torch.zeros((), dtype=torch.float32)
        origin = {n: self.w0[n] for n in self.touched}
        u = {n: delta[n].float() if n in delta else zero for n in self.touched}
        chart = Chart("merge", origin, u, dict.fromkeys(self.touched, zero), {})
        evaluator = PlaneEvaluator(self.model, chart, self.eval_set, self.device, self.dtype, 1, self.objective)
        self.passes += 1
        return evaluator.evaluate(1.0, 0.0, keep_samples=True)


def _plan(names: Sequence[str], settings: MergeSettings) -> list[dict]:
    """Each merge to make: the default ones, or the one of every chosen solution at ``settings.weights``."""
    if settings.weights is not None and len(settings.weights) != len(names):
        raise UserError(f"--weights {' '.join(map(str, settings.weights))}: one weight per solution "
                        f"({' '.join(names)}): pass --solutions with as many names")  # fmt: skip
    merges = default_merges(names) if settings.weights is None else [(tuple(names), tuple(settings.weights))]
    return [{"kind": kind, "solutions": list(chosen), "weights": [float(w) for w in weights],
             **({"seed": merge_seed(settings.seed, chosen)} if kind == "dare" else {})}
            for kind in settings.kinds for chosen, weights in merges]  # fmt: skip


def compute_merges(
    base, solutions: Mapping[str, Solution], eval_set: EvalSet, device, settings: MergeSettings,
    chart: str = "paper", dtype: str = "float32", objective: Classification = OBJECTIVES["classification"],
    plane: Mapping[str, Solution] | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """Every default merge of ``solutions`` of every kind in ``settings``, evaluated and placed on the plane
    through ``plane`` (default ``solutions``): {"endpoints": {name: ...}, "merges": [...], "chart", ...}."""
    from adapters.quant import packed_names

    settings.check()
    if packed_names(base):
        raise UserError("merges write W0 + dW into the base's weights, which a packed 4-bit base cannot hold: "
                        "run without --load-4bit")  # fmt: skip
    start = time.perf_counter()
    names = list(solutions)
    plan = _plan(names, settings)  # checked before any work
    every = {**(plane or {}), **solutions}
    deltas = {s: every[s].delta() for s in every if s in names or s in SOLUTIONS}
    chart_obj = plane_chart({s: deltas[s] for s in (plane or solutions) if s in SOLUTIONS}, chart)
    g = gram(chart_obj) if chart_obj is not None else None
    place = (lambda d: project(chart_obj, d, g)) if chart_obj is not None else (lambda d: (None, None))
    loss = PointLoss(base, eval_set, device, dtype, objective)
    bar = progress_bar(total=len(names) + len(plan), desc="merges", disable=not progress, dynamic_ncols=True)
    endpoints, results = {}, {}
    for s in names:
        results[s] = r = loss(deltas[s])
        coords, off = place(deltas[s])
        endpoints[s] = {"loss": r.loss, "loss_se": r.loss_se, "accuracy": r.accuracy, "coords": coords,
                        "off_plane_distance": off}  # fmt: skip
        bar.update(1)
    merges = []
    for item in plan:
        merged = merge(item["kind"], [deltas[s] for s in item["solutions"]], item["weights"], settings,
                       item.get("seed"))  # fmt: skip
        r = loss(merged)
        best = min(item["solutions"], key=lambda s: results[s].loss)
        coords, off = place(merged)
        merges.append({**item, "loss": r.loss, "loss_se": r.loss_se, "accuracy": r.accuracy,
                       "gap": r.loss - results[best].loss, "gap_se": paired_se(r.samples, results[best].samples),
                       "best_endpoint": best, "best_endpoint_loss": results[best].loss, "coords": coords,
                       "off_plane_distance": off, "delta_norm": math.sqrt(_dot(merged, merged))})  # fmt: skip
        bar.update(1)
        bar.set_postfix(kind=item["kind"], loss=f"{r.loss:.3f}")
    bar.close()
    chart_name = None if chart_obj is None else chart_obj.name
    vertices = None if chart_obj is None else {k: list(v) for k, v in chart_obj.vertices.items()}
    if vertices is not None and "ft" not in solutions and "ft" not in (plane or {}):
        vertices["base"] = vertices.pop("ft")  # the third vertex is the base model, as on the run's plane
    from landscape.curvature import eval_fingerprint

    seconds = round(time.perf_counter() - start, 3)
    return {"endpoints": endpoints, "merges": merges, "chart": chart_name, "vertices": vertices,
            "eval_samples": eval_set.n, "eval": eval_fingerprint(eval_set), "passes": loss.passes,
            "seconds": seconds}  # fmt: skip


# --------------------------------------------------------------------------- outputs


def merge_label(m: Mapping) -> str:
    """``ties ft+lora`` — a merge's short name in figures and printouts."""
    return f"{m['kind']} {'+'.join(m['solutions'])}"


def write_merges(result: Mapping, out: str | Path, settings: MergeSettings, info: Mapping | None = None,
                 landscape: Path | None = None, title: str = "merges") -> list[Path]:  # fmt: skip
    """merges.json, merges.npz and the figure under ``out`` (atomically); ``landscape``: the run's landscape.npz,
    whose contour the figure draws when the merges were placed in its chart."""
    from landscape.render.merges import merges_figure

    out = Path(out)
    merges = result["merges"]
    meta = {"format": FORMAT, **(dict(info) if info else {}), "settings": settings.to_dict(), "seed": settings.seed,
            **{k: result[k] for k in ("chart", "vertices", "eval_samples", "eval", "passes", "seconds")},
            "definitions": DEFINITIONS, "note": PEFT_NOTE, "endpoints": result["endpoints"],
            "merges": merges}  # fmt: skip
    nan2 = [math.nan, math.nan]
    store.write_npz(
        out / "merges.npz",
        kind=np.array([m["kind"] for m in merges]), label=np.array([merge_label(m) for m in merges]),
        coords=np.array([m["coords"] or nan2 for m in merges], dtype=np.float64).reshape(-1, 2),
        **{k: np.array([np.nan if m[k] is None else m[k] for m in merges], dtype=np.float64)
           for k in ("loss", "loss_se", "accuracy", "gap", "gap_se", "off_plane_distance", "delta_norm")},
    )  # fmt: skip
    store.write_json(out / "merges.json", meta)
    surface = None
    if landscape is not None and landscape.is_file() and result["chart"] is not None:
        with np.load(landscape) as z:
            if info is None or info.get("plane_chart") == result["chart"]:
                surface = {k: z[k] for k in ("x", "y", "loss")}
    fig = merges_figure(result, surface, title)
    store.write_with(out / "merges.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    store.write_with(out / "merges.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / f for f in FILES]


def merges_stage(loaded, solutions: Mapping[str, Solution], eval_set: EvalSet, device, progress: bool = True,
                 settings: MergeSettings | None = None) -> list[Path]:  # fmt: skip
    """``--merges`` of landscape.connectivity: the default merges of the run's ft/lora/randlora with the run's
    seed, on the plane's evaluation set and precision, written next to landscape.npz."""
    config = loaded.config
    settings = settings or MergeSettings(seed=config.seed)
    chosen = {s: solutions[s] for s in SOLUTIONS if s in solutions}
    result = compute_merges(loaded.task.base, chosen, eval_set, device, settings, config.chart,
                            config.landscape_dtype(torch.device(device).type), loaded.task.objective,
                            progress=progress)  # fmt: skip
    info = {"dataset": config.dataset, "model": loaded.model_name, "eval_split": config.eval_split,
            "training_seed": config.seed, "plane_chart": config.chart}  # fmt: skip
    title = f"{loaded.model_name} on {config.dataset}: merges of the solutions' updates"
    return write_merges(result, config.out_dir, settings, info, config.out_dir / "landscape.npz", title)


# ----------------------------------------------------------------------------- command line ----


def build_parser():
    from landscape.cli import Parser, add_run_options

    d = MergeSettings()
    p = Parser(
        prog=PROG,
        description="Merge the solutions' weight updates (task arithmetic, TIES, DARE: every pair at (1/2, 1/2) and "
        "the three at (1/3, 1/3, 1/3)), evaluate each merge on the run's evaluation set (that of paths.json) and "
        "place it on the plane: its coordinates, its distance off the plane, and its gap above the best endpoint.",
        epilog="Example: python -m landscape.merges --run runs/wordnet --top-k 20 --drop 0.9 --seed 0",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--solutions", nargs="+", choices=SOLUTIONS, default=None,
                   help="solutions to merge, two or three (default: those of ft lora randlora in the run)")  # fmt: skip
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"merges to make (default: {' '.join(KINDS)})")
    p.add_argument("--top-k", type=float, default=d.top_k,
                   help="TIES: percentage of each update's entries kept by magnitude, in (0, 100] "
                   f"(default: {d.top_k:g})")  # fmt: skip
    p.add_argument("--drop", type=float, default=d.drop,
                   help=f"DARE: probability of dropping an entry, in [0, 1) (default: {d.drop})")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="seed of DARE's masks (default: 0)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one merge of the --solutions at these weights, one per solution, instead of the default "
                   "pairs at (1/2, 1/2) and triple at (1/3, 1/3, 1/3)")  # fmt: skip
    add_run_options(p, "merges.{json,npz,png,pdf}")
    return p


def _run(argv: Sequence[str] | None = None) -> None:
    from landscape import run as run_module

    args = build_parser().parse_args(argv)
    weights = None if args.weights is None else tuple(args.weights)
    settings = MergeSettings(tuple(dict.fromkeys(args.kinds)), args.top_k, args.drop, args.seed, weights)
    settings.check()  # every setting is checked before any loading
    given = args.solutions
    if given is not None and (len(set(given)) != len(given) or len(given) < 2):
        raise UserError(f"--solutions {' '.join(args.solutions)}: a merge needs two or three different solutions")
    if weights is not None and len(weights) != len(args.solutions or ()):
        raise UserError(f"--weights {' '.join(map(str, weights))}: one weight per solution: pass --solutions with "
                        f"{len(weights)} names")  # fmt: skip
    ctx, device = run_module.open_run_from_args(args)
    chosen = list(dict.fromkeys(args.solutions or [s for s in SOLUTIONS if s in ctx.solutions]))
    missing = [s for s in chosen if s not in ctx.solutions]
    if missing:
        raise UserError(f"--solutions {' '.join(chosen)}: the run {args.run} has no {missing[0]} solution")
    if len(chosen) < 2:
        raise UserError(f"the run {args.run} has {len(chosen)} solution(s): a merge needs two or three")
    config = ctx.loaded.config
    dtype = config.landscape_dtype(device.type)  # the run's precision on this device, as paths.json
    result = compute_merges(ctx.base, {s: ctx.solutions[s] for s in chosen}, ctx.eval_set, device, settings,
                            config.chart, dtype, ctx.loaded.task.objective, plane=ctx.solutions,
                            progress=not args.no_progress)  # fmt: skip
    meta = ctx.meta
    info = {k: meta.get(k) for k in ("dataset", "model", "eval_split")}
    info.update(run=str(ctx.run_dir), training_seed=config.seed, device=str(device), dtype=dtype,
                plane_chart=config.chart)  # fmt: skip
    out = Path(args.out) if args.out else ctx.run_dir
    title = f"{meta.get('model')} on {meta.get('dataset')}: merges of the solutions' updates"
    written = write_merges(result, out, settings, info, ctx.run_dir / "landscape.npz", title)
    print("wrote " + ", ".join(str(p) for p in written))
    for m in result["merges"]:
        where = (
            ""
            if m["coords"] is None
            else (f"; at ({m['coords'][0]:.3f}, {m['coords'][1]:.3f}), {m['off_plane_distance']:.3g} off the plane")
        )
        print(f"{merge_label(m):<32} loss {m['loss']:.4f} ± {m['loss_se']:.4f}; gap {m['gap']:+.4f} ± "
              f"{m['gap_se']:.4f} (best endpoint {m['best_endpoint']}){where}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import recipe_main

    return recipe_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
