"""The paths on the dense plane's own evaluator against the paths on line charts of their own, side by side.

    python -m experiments.benchmarks.paths_on_plane --run DIR [--points N] [--repeats R] [--threads N] [--json PATH]

One process, one reopened run (``DIR``: a run folder with a dense plane, e.g. one kept by ``python -m
experiments.benchmarks.cifar_smoke --keep DIR``, whose run is ``DIR/run``), the same solutions, evaluation set and
points on both sides: :func:`landscape.paths.compute_paths` with ``plane=None`` (each line builds θ_A, θ_B, θ_third
and a working copy of the model: the code before the paths moved onto the plane) and with ``plane=`` the plane's
:class:`landscape.engine.grid.PlaneEvaluator` (:class:`landscape.paths.LineOnPlane`), alternating repeat by repeat
so the machine's drift hits both alike. Per side: the wall seconds of each repeat, the process's minor page faults
and system CPU seconds in it (``getrusage``), and the largest difference of the path losses between the sides
(fp32 rounding of the weights: the line's point rebuilt through the plane's chart).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIDES = ("own lines", "on the plane")


def _kernel() -> tuple[int, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def measure(run_dir: Path, points: int, repeats: int) -> dict:
    """Both sides ``repeats`` times each, alternating, on the reopened run ``run_dir``."""
    from landscape import build, paths
    from landscape.run import open_run

    ctx = open_run(run_dir, "cpu")
    _, _, _, plane = build.plane(ctx.loaded, dict(ctx.solutions), torch.device("cpu"))
    if plane.chart.info.get("storage") != "dense":
        raise SystemExit(f"{run_dir}: its plane is factored here; the comparison needs a dense one")
    dtype = ctx.loaded.config.landscape_dtype("cpu")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    losses: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for side, given in zip(SIDES, (None, plane), strict=True):
            faults, system = _kernel()
            start = time.perf_counter()
            result = paths.compute_paths(ctx.base, ctx.solutions, ctx.eval_set, "cpu", points=points, progress=False,
                                         dtype=dtype, storage="dense", plane=given)  # fmt: skip
            seconds = time.perf_counter() - start
            faults_after, system_after = _kernel()
            runs[side].append({"seconds": round(seconds, 2), "minor_faults": faults_after - faults,
                               "system_s": round(system_after - system, 2)})  # fmt: skip
            losses[side] = result["loss"]
    gap = np.abs(losses[SIDES[0]] - losses[SIDES[1]])
    return {"run": str(run_dir), "points": points, "repeats": repeats, "threads": torch.get_num_threads(),
            "sides": runs, "median_s": {s: statistics.median(r["seconds"] for r in runs[s]) for s in SIDES},
            "max_abs_loss_difference": float(gap.max()),
            "max_rel_loss_difference": float((gap / np.abs(losses[SIDES[0]])).max())}  # fmt: skip


def table(result: dict) -> str:
    from experiments.benchmarks.cifar_smoke import cpu_name

    head = f"{'side':<14} {'seconds (each repeat)':<28} {'faults M':>9} {'system s':>9}"
    lines = [f"paths of {result['run']}: {result['points']} points per line, {result['threads']} threads, "
             f"{cpu_name()}", head]  # fmt: skip
    for side in SIDES:
        runs = result["sides"][side]
        each = " / ".join(f"{r['seconds']:.1f}" for r in runs)
        faults = statistics.median(r["minor_faults"] for r in runs) / 1e6
        system = statistics.median(r["system_s"] for r in runs)
        lines.append(f"{side:<14} {each:<28} {faults:>9.2f} {system:>9.1f}")
    own, plane = (result["median_s"][s] for s in SIDES)
    gap, rel = result["max_abs_loss_difference"], result["max_rel_loss_difference"]
    lines.append(f"median ratio own lines / on the plane: {own / plane:.2f}; largest loss difference {gap:.2g} "
                 f"({rel:.2g} relative)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.paths_on_plane",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--run", type=Path, required=True, help="a run folder whose plane is dense (landscape.json)")
    parser.add_argument("--points", type=int, default=11, help="points per line, its ends included (default 11)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if not (args.run / "landscape.json").is_file():
        print(f"error: --run {args.run}: no landscape.json there; pass a finished run folder", file=sys.stderr)
        return 2
    if args.points < 3 or args.repeats < 1:
        print("error: --points needs at least 3 and --repeats at least 1", file=sys.stderr)
        return 2
    from adapters import threads

    threads.configure(args.threads)
    result = measure(args.run, args.points, args.repeats)
    print(table(result))
    if args.json is not None:
        from landscape.engine import store

        store.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
