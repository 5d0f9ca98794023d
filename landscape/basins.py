"""python -m landscape.basins — task-metric basins (Chen et al., ICLR 2026): how far each solution can move along
a direction before its **accuracy** (not its loss) drops.

For each solution θ* and direction d, the radius r* is the smallest r found at which

    acc(θ*) − acc(θ* + r·d) > 2 · SE   (or > ``--epsilon`` ε when given),

SE the standard error of the accuracy difference **paired** over the same evaluation samples (the per-sample
0/1 errors at θ* and at θ* + r·d; :func:`adapters.objectives.paired_se`). Only +d is walked. Directions:

- ``--draws`` K random directions, filter-normalised around θ* over every weight (biases and norms held, Li et
  al.: the random charts' rule, :func:`landscape.engine.directions.draw_directions`), draw k seeded with
  :func:`landscape.engine.directions.draw_seed` (the run's seed, k); r in units of the direction (≈ ‖θ*‖);
- with ``--eigen`` (default) the top-2 Hessian eigenvectors at θ* (unit-norm, in the run's ``--coordinates``;
  the ``--chart hessian`` construction, :func:`landscape.build.hessian_evaluator`); r in weight-space norm.

**Search.** A geometric ladder r_i = start·2^i, i < ``--steps`` (start = ``--start`` for a random direction,
``--start``·‖θ*‖ for an eigen-direction), up to the first failing rung; then ``--bisections`` halvings of
[last safe rung (0 before the first), first failing rung]. ``radius`` is the failing end of the final bracket,
``radius_low`` its safe end, ``resolution`` = radius − radius_low (the first failing r of a dense scan lies in
the bracket when the criterion fails monotonically in r). A direction that never fails is reported with
``radius`` null and ``censored_at`` the ladder's top.

**Output** (under ``--out``, default the run folder; each file written atomically):

  basins.json  ``solutions`` → name → {``accuracy``, ``random``: [per draw: seed, radius, radius_low,
               resolution, distance (radius·‖d‖), evaluations, trace], ``random_summary`` (mean / sd / min / max /
               count over the draws that failed, ``censored``), ``eigen``: [per axis: eigenvalue, radius, ...],
               ``loss_sharpness`` (sharpness.json's entry, when the run folder holds one)}; settings, seeds
  basins.npz   ``random_radius`` (solutions, draws), ``eigen_radius`` (solutions, 2), ``eigenvalues``,
               ``solutions``, ``seeds``
  basins.png / basins.pdf   radius per solution: the draws, their mean ± SD, the eigen radii
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES, Classification, paired_se
from adapters.progress import progress_bar
from landscape.engine import store
from landscape.engine.directions import center_weights, draw_chart, draw_seed, redraw
from landscape.engine.grid import EvalSet, PlaneEvaluator, eval_fingerprint
from landscape.engine.plane import SOLUTIONS

PROG = "python -m landscape.basins"
FORMAT = 1
FILES = tuple(f"basins.{ext}" for ext in ("json", "npz", "png", "pdf"))
DEFAULT_DRAWS = 5
DEFAULT_START = 1e-3
DEFAULT_STEPS = 14  # 1e-3 · 2^13 ≈ 8: past any basin of a filter-normalised direction (|d| ≈ |θ*|)
DEFAULT_BISECTIONS = 4  # the bracket shrinks 16-fold: resolution ≤ r/16 on a ×2 ladder
SIGMAS = 2.0
SHARPNESS_KEYS = ("worst_case", "average_case", "average_se", "loss", "resolution")
DEFINITIONS = {
    "radius": "smallest r found with acc(theta*) - acc(theta* + r d) > 2 paired SE (or > epsilon), along +d",
    "resolution": "radius - radius_low: the final bracket [last safe r, first failing r] of the ladder + bisection",
    "distance": "radius * |d| (weight-space length)",
    "paired_se": "SE of the mean per-sample difference of the 0/1 errors at theta* and theta* + r d",
}

__all__ = ["ErrorObjective", "accuracy_drop", "compute_basins", "find_radius", "main", "write_basins"]


@dataclass(frozen=True)
class ErrorObjective:
    """``objective`` with each sample's 0/1 error as its "loss", so the evaluator's kept samples are the
    per-sample errors (the mean "loss" is the error rate; accuracy is the objective's own)."""

    base: Classification

    @property
    def name(self) -> str:
        return self.base.name

    def per_sample(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, correct = self.base.per_sample(outputs, target)
        return 1.0 - correct.double(), correct


def accuracy_drop(errors0: torch.Tensor, errors: torch.Tensor) -> tuple[float, float]:
    """(acc(θ*) − acc(θ), its paired SE) from the per-sample 0/1 errors at θ* and at θ."""
    return float((errors - errors0).double().mean()), paired_se(errors, errors0)


def find_radius(fails: Callable[[float], bool], start: float, steps: int = DEFAULT_STEPS,
                bisections: int = DEFAULT_BISECTIONS) -> dict:  # fmt: skip
    """The ladder + bisection search (module docstring) of the first r > 0 with ``fails(r)``."""
    if not (start > 0 and steps >= 1 and bisections >= 0):
        raise UserError(f"--start {start} --steps {steps} --bisections {bisections}: need start > 0, steps ≥ 1, "
                        "bisections ≥ 0")  # fmt: skip
    trace, low, high = [], 0.0, None
    for i in range(steps):
        r = start * 2.0**i
        failed = bool(fails(r))
        trace.append([r, failed])
        if failed:
            high = r
            break
        low = r
    if high is None:
        return {"radius": None, "radius_low": low, "resolution": None, "censored_at": low, "evaluations": len(trace),
                "trace": trace}  # fmt: skip
    for _ in range(bisections):
        mid = 0.5 * (low + high)
        failed = bool(fails(mid))
        trace.append([mid, failed])
        low, high = (low, mid) if failed else (mid, high)
    return {"radius": high, "radius_low": low, "resolution": high - low, "censored_at": None,
            "evaluations": len(trace), "trace": trace}  # fmt: skip


def _center_errors(evaluator: PlaneEvaluator, counter: list) -> torch.Tensor:
    """The per-sample 0/1 errors at the chart's origin θ* (an ErrorObjective evaluator)."""
    counter[0] += 1
    return evaluator.evaluate(0.0, 0.0, keep_samples=True).samples


def _criterion(evaluator: PlaneEvaluator, axis: tuple[float, float], epsilon: float | None, counter: list,
               errors0: torch.Tensor):  # fmt: skip
    """fails(r) along ``axis`` of ``evaluator``'s chart (an ErrorObjective evaluator), against θ*'s errors."""

    def fails(r: float) -> bool:
        res = evaluator.evaluate(axis[0] * r, axis[1] * r, keep_samples=True)
        counter[0] += 1
        drop, se = accuracy_drop(errors0, res.samples)
        return drop > (epsilon if epsilon is not None else SIGMAS * se)

    return fails


def spread(radii: Sequence[float | None]) -> dict:
    """mean / sd (ddof 1) / min / max over the draws that failed; ``censored``: how many never did."""
    r = np.array([x for x in radii if x is not None], dtype=np.float64)
    if r.size == 0:
        return {"mean": None, "sd": None, "min": None, "max": None, "count": 0, "censored": len(radii)}
    return {"mean": float(r.mean()), "sd": float(r.std(ddof=1)) if r.size > 1 else None, "min": float(r.min()),
            "max": float(r.max()), "count": int(r.size), "censored": len(radii) - int(r.size)}  # fmt: skip


def compute_basins(
    base, solutions: Mapping, eval_set: EvalSet, device, draws: int = DEFAULT_DRAWS, seed: int = 0,
    eigen: Callable | None = None, epsilon: float | None = None, start: float = DEFAULT_START,
    steps: int = DEFAULT_STEPS, bisections: int = DEFAULT_BISECTIONS, dtype: str = "float32",
    objective: Classification = OBJECTIVES["classification"], progress: bool = True,
) -> dict:  # fmt: skip
    """Every solution's radii (module docstring). ``solutions``: {name: Solution} on ``base``; ``eigen(name,
    solution)`` → (model, chart with unit axes u, v, eigenvalues [λ1, λ2]) or None for no eigen-directions."""
    if draws < 0 or (epsilon is not None and not epsilon >= 0):
        raise UserError(f"--draws {draws} --epsilon {epsilon}: need draws ≥ 0 and epsilon ≥ 0")
    find_radius(lambda r: True, start, steps, bisections)  # the search settings, checked before any work
    from adapters.quant import packed_names

    if packed_names(base):
        raise UserError("basins write weights into the base, which a packed 4-bit base cannot hold: run without "
                        "--load-4bit")  # fmt: skip
    errors = ErrorObjective(objective)
    started, counter, out = time.perf_counter(), [0], {}
    bar = progress_bar(total=len(solutions) * (draws + (2 if eigen else 0)), desc="basins", disable=not progress)
    for name, solution in solutions.items():
        chart = draw_chart(center_weights(solution), name, draw_seed(seed, 0), line=True)
        evaluator = PlaneEvaluator(_fresh(base), chart, eval_set, device, dtype, 1, errors)
        errors0 = _center_errors(evaluator, counter)  # θ* is the origin whatever the draw
        entry = {"accuracy": float(1.0 - errors0.double().mean()), "random": []}
        for k in range(draws):
            s = draw_seed(seed, k)
            norm = redraw(evaluator.chart, s)[0]
            fails = _criterion(evaluator, (1.0, 0.0), epsilon, counter, errors0)
            found = find_radius(fails, start, steps, bisections)
            dist = None if found["radius"] is None else found["radius"] * norm
            entry["random"].append({"draw": k, "seed": s, "direction_norm": norm, **found, "distance": dist})
            bar.update(1)
        entry["random_summary"] = spread([d["radius"] for d in entry["random"]])
        entry["center_norm"] = chart.info["directions"]["center_norm"]
        del evaluator, chart
        if eigen is not None:
            model, hchart, values = eigen(name, solution)
            ev = PlaneEvaluator(model, hchart, eval_set, device, dtype, 1, errors)
            scale = math.sqrt(sum(float(t.double().square().sum()) for t in hchart.origin.values()))
            e0 = _center_errors(ev, counter)
            entry["eigen"], entry["eigen_accuracy"] = [], float(1.0 - e0.double().mean())
            for axis, lam in zip(((1.0, 0.0), (0.0, 1.0)), values, strict=True):
                fails = _criterion(ev, axis, epsilon, counter, e0)
                found = find_radius(fails, start * scale, steps, bisections)
                entry["eigen"].append({"axis": "xy"[int(axis[1])], "eigenvalue": float(lam), **found,
                                       "distance": found["radius"], "direction_norm": 1.0})  # fmt: skip
                bar.update(1)
            entry["eigen_center_norm"] = scale
            entry["eigen_info"] = {k: v for k, v in hchart.info.get("hessian", {}).items() if k != "check"}
        out[name] = entry
    bar.close()
    return {"solutions": out, "draws": draws, "seed": seed, "seeds": [draw_seed(seed, k) for k in range(draws)],
            "epsilon": epsilon, "criterion": "epsilon" if epsilon is not None else f"{SIGMAS:g} paired SE",
            "start": start, "steps": steps, "bisections": bisections, "eigen": eigen is not None,
            "eval_samples": eval_set.n, "eval": eval_fingerprint(eval_set), "evaluations": counter[0],
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def _fresh(base):
    import copy

    return copy.deepcopy(base)


# --------------------------------------------------------------------------- outputs


def arrays(result: Mapping) -> dict[str, np.ndarray]:
    """The npz arrays (NaN: a direction that never failed, or no eigen-directions)."""
    names = list(result["solutions"])
    nan = lambda x: np.nan if x is None else x  # noqa: E731
    rand = np.array([[nan(d["radius"]) for d in result["solutions"][s]["random"]] for s in names], dtype=np.float64)
    eig = np.full((len(names), 2), np.nan)
    lam = np.full((len(names), 2), np.nan)
    for i, s in enumerate(names):
        for j, e in enumerate(result["solutions"][s].get("eigen", [])):
            eig[i, j], lam[i, j] = nan(e["radius"]), e["eigenvalue"]
    cens = np.array([[nan(d["censored_at"]) for d in result["solutions"][s]["random"]] for s in names], dtype=float)
    ecens = np.full((len(names), 2), np.nan)
    for i, s in enumerate(names):
        for j, e in enumerate(result["solutions"][s].get("eigen", [])):
            ecens[i, j] = nan(e["censored_at"])
    sharp = np.array([_worst_case(result["solutions"][s]) for s in names], dtype=np.float64)
    return {"random_radius": rand.reshape(len(names), result["draws"]), "eigen_radius": eig, "eigenvalues": lam,
            "random_censored_at": cens.reshape(len(names), result["draws"]), "eigen_censored_at": ecens,
            "accuracy": np.array([result["solutions"][s]["accuracy"] for s in names], dtype=np.float64),
            "loss_sharpness": sharp,
            "solutions": np.array(names, dtype=str), "seeds": np.array(result["seeds"], dtype=np.int64)}  # fmt: skip


def _worst_case(entry: Mapping) -> float:
    """The solution's worst-case loss sharpness in weight coordinates (sharpness.json's), else NaN."""
    value = entry.get("loss_sharpness", {}).get("weights", {}).get("worst_case")
    return float(value) if isinstance(value, (int, float)) else np.nan


def write_basins(result: Mapping, out: str | Path, info: Mapping | None = None,
                 title: str = "task-metric basins") -> list[Path]:  # fmt: skip
    """basins.json, basins.npz and the figure under ``out`` (atomically)."""
    from landscape.render.basins import basins_figure

    out = Path(out)
    meta = {"format": FORMAT, **(dict(info) if info else {}), **result, "definitions": DEFINITIONS}
    data = arrays(result)
    store.write_npz(out / "basins.npz", **data)
    store.write_json(out / "basins.json", meta)
    fig = basins_figure(data, title, result["criterion"])
    store.write_with(out / "basins.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    store.write_with(out / "basins.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / f for f in FILES]


def attach_sharpness(result: dict, folder: Path) -> None:
    """Each solution's sharpness.json entry (the loss sharpness) beside its radii, when the folder holds one."""
    path = Path(folder) / "sharpness.json"
    if not path.is_file():
        return
    try:
        sharp = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    entries = sharp.get("solutions", sharp) if isinstance(sharp, dict) else {}
    for name, entry in result["solutions"].items():
        if isinstance(entries, dict) and isinstance(entries.get(name), dict):  # per coordinates: the readings only
            read = {c: v for c, v in entries[name].items() if isinstance(v, dict) and "worst_case" in v}
            entry["loss_sharpness"] = {c: {k: v[k] for k in SHARPNESS_KEYS if k in v} for c, v in read.items()}


def _eigen_for(loaded, evals: EvalSet, device, dtype: str, tol: float | None = None) -> Callable:
    """eigen(name, solution) for compute_basins: the ``--chart hessian`` construction around the solution, its
    Lanczos at Ritz residual ``tol`` (default the chart's)."""
    from landscape.build import hessian_evaluator

    def eigen(name, solution):
        chart, ev = hessian_evaluator(loaded, solution, name, evals, torch.device(device), dtype, tol)
        return ev.model, chart, chart.info["hessian"]["eigenvalues"]

    return eigen


def basins_stage(loaded, solutions: Mapping, eval_set: EvalSet, device, progress: bool = True) -> list[Path]:
    """``--basins`` of landscape.connectivity: the run's ft/lora/randlora with the defaults and the run's seed,
    on the plane's evaluation set and precision, written next to landscape.npz."""
    config = loaded.config
    dtype = config.landscape_dtype(torch.device(device).type)
    chosen = {s: solutions[s] for s in SOLUTIONS if s in solutions}
    result = compute_basins(loaded.task.base, chosen, eval_set, device, DEFAULT_DRAWS, config.seed,
                            _eigen_for(loaded, eval_set, device, dtype), None, dtype=dtype,
                            objective=loaded.task.objective, progress=progress)  # fmt: skip
    attach_sharpness(result, config.out_dir)
    info = {"dataset": config.dataset, "model": loaded.model_name, "eval_split": config.eval_split,
            "training_seed": config.seed}  # fmt: skip
    return write_basins(result, config.out_dir, info, f"{loaded.model_name} on {config.dataset}: task-metric basins")


# ----------------------------------------------------------------------------- command line ----


def build_parser():
    from landscape.cli import Parser, add_run_options, nonnegative_float, nonnegative_int, positive_float, positive_int

    p = Parser(
        prog=PROG,
        description="Task-metric basins: for each of the run's solutions, the radius along K filter-normalised "
        "random directions and the top-2 Hessian eigen-directions at which accuracy falls below the solution's own "
        "by more than 2 paired SEs (or --epsilon), on the run's evaluation set (that of paths.json).",
        epilog="Example: python -m landscape.basins --run runs/wordnet --draws 5",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument(
        "--draws", type=nonnegative_int, default=DEFAULT_DRAWS, help="random directions per solution (default: 5)"
    )
    p.add_argument("--eigen", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="also the top-2 Hessian eigen-directions (default: on)")  # fmt: skip
    p.add_argument("--eigen-tol", type=float, default=None,
                   help="Lanczos' Ritz residual test for the eigen-directions, ‖Hq − θq‖ ≤ tol·|θ| (default: the "
                   "Hessian chart's 1e-6; a looser one takes fewer Hessian-vector products: a direction's angle to the "
                   "true eigenvector is at most about tol·|θ| / the eigengap, Davis–Kahan)")  # fmt: skip
    p.add_argument("--epsilon", type=nonnegative_float, default=None,
                   help="fail when accuracy drops by more than this (default: by more than 2 paired SEs)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seed of the random directions (default: the run's)")
    p.add_argument(
        "--start", type=positive_float, default=DEFAULT_START, help="the ladder's first radius (default: 1e-3)"
    )
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="rungs of the ×2 ladder (default: 14)")
    p.add_argument("--bisections", type=nonnegative_int, default=DEFAULT_BISECTIONS, help="bisections (default: 4)")
    add_run_options(p, "basins.{json,npz,png,pdf}")
    return p


def _run(argv: Sequence[str] | None = None) -> None:
    from landscape import run as run_module

    args = build_parser().parse_args(argv)
    if args.eigen_tol is not None and not 0 < args.eigen_tol < 1:
        raise UserError(f"--eigen-tol {args.eigen_tol}: give a tolerance in (0, 1), for example 1e-3")
    if args.draws == 0 and not args.eigen:
        raise UserError("--draws 0 --no-eigen: no direction to walk: give --draws K or --eigen")
    ctx, device = run_module.open_run_from_args(args)
    chosen = {s: ctx.solutions[s] for s in SOLUTIONS if s in ctx.solutions}
    if not chosen:
        raise UserError(f"the run {args.run} has no solution: train one first")
    config = ctx.loaded.config
    dtype = config.landscape_dtype(device.type)
    seed = config.seed if args.seed is None else args.seed
    eigen = _eigen_for(ctx.loaded, ctx.eval_set, device, dtype, args.eigen_tol) if args.eigen else None
    result = compute_basins(ctx.base, chosen, ctx.eval_set, device, args.draws, seed, eigen, args.epsilon,
                            args.start, args.steps, args.bisections, dtype, ctx.loaded.task.objective,
                            not args.no_progress)  # fmt: skip
    attach_sharpness(result, ctx.run_dir)
    meta = ctx.meta
    info = {k: meta.get(k) for k in ("dataset", "model", "eval_split")}
    info.update(run=str(ctx.run_dir), training_seed=config.seed, device=str(device), dtype=dtype)
    out = Path(args.out) if args.out else ctx.run_dir
    written = write_basins(result, out, info, f"{meta.get('model')} on {meta.get('dataset')}: task-metric basins")
    print("wrote " + ", ".join(str(p) for p in written))
    for name, e in result["solutions"].items():
        s = e["random_summary"]
        fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
        line = (f"{name}: accuracy {e['accuracy']:.4f}; random radius mean {fmt(s['mean'])} sd {fmt(s['sd'])} "
                f"min {fmt(s['min'])} max {fmt(s['max'])} ({s['censored']} never failed)")  # fmt: skip
        if "eigen" in e:
            line += "; eigen radii " + ", ".join(fmt(a["radius"]) for a in e["eigen"])
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import recipe_main

    return recipe_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
