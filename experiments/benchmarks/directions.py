"""Cost per point of the random-direction chart beside the paper's plane, measured side by side in one run.

    python -m experiments.benchmarks.directions [--json PATH] [--quick] [--cases minilm efficientnet]
                                                [--points N] [--threads N] [--samples N] [--seed S]

The README says ``--chart random`` (:mod:`landscape.engine.directions`) evaluates "at the cost per point of any
other chart (it is the same evaluator)". This benchmark measures that claim. Per case, in one process, on
the same model, the same three synthetic solutions (:func:`experiments.benchmarks.grid.synthetic_deltas`)
and the same evaluation samples, fp32 on the CPU, one point per forward:

- ``plane``: the paper chart's :class:`landscape.engine.grid.PlaneEvaluator` through FT, LoRA and RandLoRA, as the
  grid benchmark's engine builds it (:func:`experiments.benchmarks.grid.make_engine`);
- ``random``: the random chart of ``--chart random`` — 2-D, filter-normalised Gaussian directions drawn
  over every parameter, biases and norm parameters fixed (``--ignore biasbn``), centred on the RandLoRA
  solution — built by :func:`landscape.build.random_evaluator` itself from a run configuration, as
  ``landscape.connectivity`` builds it, with the RandLoRA solution held in memory.

Each evaluator evaluates N points of its own chart's default grid (⌈√N⌉ × ⌈√N⌉ points, the first N in
row order: the paper window for the plane, [−1, 1]² for the random chart). Timing: the two evaluators
run interleaved point by point, the order alternating from point to point, so load from other processes
hits both alike; each is timed on its own ``evaluate`` call. The one untimed warm-up of each is at the
shared centre — the RandLoRA vertex (0, 0) of the plane and the centre (0, 0) of the random chart, the
same weights W0 + ΔW_RandLoRA — and the two losses there must agree within :data:`TOLERANCE`.

Reported per case: seconds per point of each (total and median), their ratio, the median of the per-point
ratios (robust to a load spike in one point), the evaluation samples, the elements each chart writes per
point (``dim``), the losses, and the load average before and after; per run: torch version, threads, the
CPU model (``/proc/cpuinfo``) and the load average before and after.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapters import threads
from adapters.errors import UserError
from adapters.methods import has_head
from adapters.objectives import OBJECTIVES
from experiments.benchmarks.grid import Deltas, efficientnet_case, fit_head, make_engine, minilm_case, synthetic_deltas
from experiments.benchmarks.peers import BATCH_SIZE, sync
from landscape.cli import Parser, positive_int, run_main
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import Chart, default_axes

PROG = "python -m experiments.benchmarks.directions"
CASES: dict[str, Callable] = {"minilm": minilm_case, "efficientnet": efficientnet_case}
PRESETS = {"quick": {"points": 9, "samples": 256}, "full": {"points": 25, "samples": 512}}
TOLERANCE = 1e-5  # |plane − random| at the shared centre: the same weights, so the same loss
CENTER = "randlora"  # the random chart's centre, the paper chart's origin
CHARTS = ("plane", "random")
Point = tuple[float, float]


# --------------------------------------------------------------------------- the two evaluators


def random_evaluator(
    model: nn.Module, deltas: Deltas, eval_set: EvalSet, device: torch.device | str = "cpu", seed: int = 0
) -> PlaneEvaluator:
    """The evaluator of ``--chart random --center randlora`` (default norm, ignore, coordinates), built by
    :func:`landscape.build.random_evaluator` around an in-memory RandLoRA solution (W0 = ``model``)."""
    from adapters.solution import Solution
    from landscape import build
    from landscape.config import RunConfig
    from landscape.engine import directions

    config = RunConfig(chart="random", center=CENTER, seed=seed, points_per_forward=1)
    solution = Solution(Path(f"<synthetic {CENTER}>"), {"method": CENTER, "name": CENTER}, {}, model, deltas[CENTER])
    vertex, center = directions.center_of(config.center, {CENTER: solution})
    _, evaluator = build.random_evaluator(
        config, center, vertex, eval_set, device, "float32", OBJECTIVES["classification"]
    )
    return evaluator


def build_evaluators(
    model: nn.Module, deltas: Deltas, eval_set: EvalSet, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, PlaneEvaluator]:
    """``plane`` (paper chart through the three solutions) and ``random`` (around RandLoRA), each on its own
    copy of ``model``, which is left untouched."""
    return {
        "plane": make_engine(model, deltas, eval_set, device),
        "random": random_evaluator(model, deltas, eval_set, device, seed),
    }


def chart_points(chart: Chart, n: int) -> list[Point]:
    """The first ``n`` points, in row order, of the chart's default ⌈√n⌉ × ⌈√n⌉ grid."""
    k = max(2, math.ceil(math.sqrt(n)))
    xs, ys = default_axes(chart, k)
    return [(float(x), float(y)) for y in ys for x in xs][:n]


def chart_elements(chart: Chart) -> int:
    """Elements the evaluator writes per point: every parameter tensor on the chart."""
    return sum(t.numel() for t in chart.origin.values())


# --------------------------------------------------------------------------- the measurement


def interleaved(
    evaluators: dict[str, PlaneEvaluator], points: dict[str, list[Point]], device: torch.device | str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Point k of every evaluator, k = 0, 1, ...: order ``plane, random`` at even k, reversed at odd k, each
    call timed alone. Returns ``{"seconds": {name: [s per point]}, "losses": {name: [loss per point]}}``."""
    names = list(evaluators)
    count = len(points[names[0]])
    if any(len(points[n]) != count for n in names):
        raise ValueError("every evaluator needs the same number of points")
    seconds: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for k in range(count):
        for name in names if k % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            loss = evaluators[name].evaluate(*points[name][k]).loss
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
    return {"seconds": seconds, "losses": losses}


def compare_charts(
    evaluators: dict[str, PlaneEvaluator], n: int, device: torch.device | str = "cpu", log: Callable = print
) -> dict:
    """Warm each evaluator up at the shared centre (untimed; the two losses must agree within
    :data:`TOLERANCE`), then time ``n`` points of each, interleaved (:func:`interleaved`)."""
    plane, random = evaluators["plane"], evaluators["random"]
    centers = {"plane": plane.chart.vertices[CENTER], "random": random.chart.vertices[CENTER]}
    center_loss = {name: float(evaluators[name].evaluate(*centers[name]).loss) for name in CHARTS}
    diff = abs(center_loss["plane"] - center_loss["random"])
    if not diff <= TOLERANCE:
        raise AssertionError(f"plane and random chart differ by {diff:.3g} > {TOLERANCE} at the shared centre")
    points = {name: chart_points(evaluators[name].chart, n) for name in CHARTS}
    log(f"  {n} points each, interleaved; centre loss {center_loss['plane']:.6f} on both (|Δ| {diff:.1e})")
    out = interleaved(evaluators, points, device)
    sec = {name: np.array(out["seconds"][name]) for name in CHARTS}
    plane_s, random_s = float(sec["plane"].mean()), float(sec["random"].mean())
    return {
        "points": n,
        "plane_s_per_point": plane_s,
        "random_s_per_point": random_s,
        "ratio_random_over_plane": random_s / plane_s,
        "plane_s_per_point_median": float(np.median(sec["plane"])),
        "random_s_per_point_median": float(np.median(sec["random"])),
        "ratio_median_of_pairs": float(np.median(sec["random"] / sec["plane"])),
        "plane_s_each": out["seconds"]["plane"],
        "random_s_each": out["seconds"]["random"],
        "samples": plane.eval_set.n,
        "dim": {
            "plane": chart_elements(plane.chart),
            "random": chart_elements(random.chart),
            "random_moved": random.chart.info["directions"]["elements_moved"],
        },
        "center": CENTER,
        "center_loss_plane": center_loss["plane"],
        "center_loss_random": center_loss["random"],
        "max_abs_diff_center": diff,
        "tolerance": TOLERANCE,
        "points_plane": points["plane"],
        "points_random": points["random"],
        "loss_plane": out["losses"]["plane"],
        "loss_random": out["losses"]["random"],
        "directions": random.chart.info["directions"],
        "timing": "interleaved point by point, order alternating; one untimed warm-up each at the shared centre",
    }


def run_case(name: str, samples: int, n: int, delta_scale: float = 1e-2, seed: int = 0, log: Callable = print) -> dict:
    """One case (:data:`CASES`): its model, synthetic solutions and evaluation samples, both charts compared."""
    load_before, start = os.getloadavg(), time.perf_counter()
    case = CASES[name](samples, seed)
    device = torch.device("cpu")
    model = case.model.to(device).eval()
    eval_set = EvalSet.prepare(case.encode(case.raw), case.labels, BATCH_SIZE, device)
    head = fit_head(model, eval_set, case.num_classes) if has_head(model) else None
    deltas = synthetic_deltas(model, case.targets, head, delta_scale, seed)
    log(f"[{name}] {case.name}: paper plane vs random chart around {CENTER}, {eval_set.n} samples")
    evaluators = build_evaluators(model, deltas, eval_set, device, seed)
    result = compare_charts(evaluators, n, device, log)
    del evaluators, deltas
    log(
        f"[{name}] s/point: plane {result['plane_s_per_point']:.3f}, random {result['random_s_per_point']:.3f} "
        f"(× {result['ratio_random_over_plane']:.3f})"
    )
    return {
        "name": name, "case": case.name, **case.info, "device": str(device), "dtype": "float32",
        "torch_threads": torch.get_num_threads(), "delta_scale": delta_scale, "seed": seed, **result,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "case_wall_s": time.perf_counter() - start,
    }  # fmt: skip


# --------------------------------------------------------------------------- CLI


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The first "model name" of ``/proc/cpuinfo`` (None where there is none)."""
    from adapters.precision import cpu_model_name

    try:
        return cpu_model_name(Path(cpuinfo).read_text(errors="replace"))
    except OSError:
        return None


def table(results: list[dict]) -> str:
    """The markdown table of the cases."""
    rows = [
        "| case | points × samples | plane s/pt | random s/pt | random / plane | median of pair ratios "
        "| elements per point, plane / random (moved) | centre loss | max Δ centre |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        d = r["dim"]
        rows.append(
            f"| {r['case']} | {r['points']} × {r['samples']} | {r['plane_s_per_point']:.3f} "
            f"| {r['random_s_per_point']:.3f} | {r['ratio_random_over_plane']:.3f} | {r['ratio_median_of_pairs']:.3f} "
            f"| {d['plane']:,} / {d['random']:,} ({d['random_moved']:,}) | {r['center_loss_plane']:.4f} "
            f"| {r['max_abs_diff_center']:.1e} |"
        )
    return "\n".join(rows)


def report(results: list[dict], argv: Sequence[str] | None, wall_s: float, load_before: tuple) -> dict:
    """The JSON document: the cases and the machine they ran on."""
    return {
        "benchmark": "directions",
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
        "cases": results,
        "wall_s": wall_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="9 points, 256 samples per case (default 25, 512)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases (default: all)")
    p.add_argument("--points", type=positive_int, default=None, help="points per chart (overrides the preset)")
    p.add_argument("--samples", type=positive_int, default=None, help="evaluation samples (overrides the preset)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--delta-scale", type=float, default=1e-2, help="solution noise / parameter RMS (default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="data subset, synthetic solutions and directions")
    return p


def _main(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if not (math.isfinite(args.delta_scale) and args.delta_scale > 0):
        raise UserError(f"--delta-scale {args.delta_scale:g} must be a finite number > 0: pass e.g. 0.01")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        threads.configure(args.threads)
    preset = PRESETS["quick" if args.quick else "full"]
    n, samples = args.points or preset["points"], args.samples or preset["samples"]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    start, load_before = time.perf_counter(), os.getloadavg()
    results = [run_case(name, samples, n, args.delta_scale, args.seed, log) for name in args.cases]
    print(table(results))
    if args.json:
        from adapters.io import write_json

        write_json(args.json, report(results, argv, time.perf_counter() - start, load_before))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
