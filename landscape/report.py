"""What a run reports: the per-solution summary, the bf16 check, landscape.json's metadata, the console table.

Kept apart from the recipe so every recipe (and the figures command) describes runs the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from adapters import threads
from adapters.objectives import PointResult, paired_se
from landscape import paths
from landscape.cli import versions
from landscape.engine.plane import SOLUTIONS
from landscape.run import METHOD_ORDER, Loaded


def summarise(loaded: Loaded, solutions, chart, xs, ys, result, evaluator) -> dict[str, dict]:
    """Per solution: parameter counts, rank, test metrics, and its loss at its vertex of the plane."""
    summary = {}
    for name, sol in solutions.items():
        summary[name] = {k: sol.info.get(k) for k in ("trainable_params", "adapter_params", "rank")}
        summary[name].update(test_accuracy=sol.metrics.get("test_accuracy"), test_loss=sol.metrics.get("test_loss"),
                             path=str(sol.path), vertex_loss=None)  # fmt: skip
    for s in _vertices(chart):  # the vertices are grid points, except on grids too small to hold them
        x, y = chart.vertices[s]
        i, j = np.flatnonzero(ys == y), np.flatnonzero(xs == x)
        point = None if len(i) and len(j) else vertex_results(chart, evaluator)[s]
        summary[s]["vertex_loss"] = float(result["loss"][i[0], j[0]]) if point is None else point.loss
        summary[s]["vertex_accuracy"] = float(result["accuracy"][i[0], j[0]]) if point is None else point.accuracy
        summary[s]["vertex_loss_se"] = float(result["loss_se"][i[0], j[0]]) if point is None else point.loss_se
    return summary


HALF = (torch.float16, torch.bfloat16)


def stored_in_half(evaluator) -> str | None:
    """The half dtype the evaluator's model stores floating weights in ("bfloat16", "float16"), else None."""
    half = {p.dtype for p in evaluator.model.parameters() if p.dtype in HALF}
    return str(max(half, key=str)).removeprefix("torch.") if half else None


@contextlib.contextmanager
def fp32_weights(evaluator) -> Iterator[None]:
    """Inside: the evaluator's model holds fp32 weights (every half-precision parameter and buffer upcast, the
    plane's own half tensors too), so an "fp32" evaluation is fp32 in its weights as well as its arithmetic;
    on exit the very tensors it had are put back (bit for bit). Costs an fp32 copy of the half weights while
    inside. Works for the dense plane (the point is written into the upcast parameters) and the factored
    one (its hooks build each weight in its W0's dtype, now fp32)."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    lists: list[tuple[str, list]] = []
    try:
        with torch.no_grad():
            for t in [*evaluator.model.parameters(), *evaluator.model.buffers()]:
                if t.dtype in HALF:
                    saved.append((t, t.data))
                    t.data = t.data.float()  # same Parameter object: hooks and optimizers still see it
            for attr in ("origin", "u", "v"):  # a dense plane's W0 + x·U + y·V, if held in half
                held = getattr(evaluator, attr, None)
                if isinstance(held, list) and any(t.dtype in HALF for t in held):
                    lists.append((attr, held))
                    setattr(evaluator, attr, [t.float() if t.dtype in HALF else t for t in held])
        if hasattr(evaluator, "_stacked"):
            evaluator._stacked = []  # vmapped buffers are allocated in the origin's dtype: made again
        yield
    finally:
        for t, data in saved:
            t.data = data
        for attr, held in lists:
            setattr(evaluator, attr, held)
        if hasattr(evaluator, "_stacked"):
            evaluator._stacked = []


def precision_check(summary: dict, chart, evaluator) -> dict | None:
    """What the run's precision costs: the vertices again in fp32, compared with the smallest effects the run
    reports. Runs when the forward used bf16 autocast or the model stores its weights in half precision; the
    re-evaluation uses fp32 weights (:func:`fp32_weights`) and no autocast, so it is fp32 throughout."""
    half = stored_in_half(evaluator)
    if not evaluator.autocast and half is None:
        return None
    autocast = evaluator.autocast
    evaluator.autocast = False
    try:
        with fp32_weights(evaluator):
            fp32 = {s: evaluator.evaluate(*chart.vertices[s]).loss for s in _vertices(chart)}
    finally:
        evaluator.autocast = autocast
    diff = max(abs(summary[s]["vertex_loss"] - fp32[s]) for s in fp32)
    gaps = [abs(summary[a]["vertex_loss"] - summary[b]["vertex_loss"]) for a, b in _pairs(chart)]
    gap = min(gaps) if gaps else None  # a random chart has one vertex: no gap to compare with
    # the historical key names say bf16; "run_precision" says what the run's numbers were computed in
    return {"vertex_loss_fp32": fp32, "max_abs_diff_bf16_vs_fp32": diff, "smallest_vertex_loss_gap": gap,
            "bf16_below_smallest_gap": None if gap is None else diff < gap,
            "run_precision": {"autocast": "bfloat16" if autocast else None, "weights": half or "float32"},
            "fp32_weights": True}  # fmt: skip


def vertex_results(chart, evaluator) -> dict[str, PointResult]:
    """Each vertex of ``chart`` evaluated once by ``evaluator`` in its run precision, with per-sample losses,
    and kept on the evaluator: the summary of off-grid vertices, their paired standard errors and the paths'
    endpoints (:func:`landscape.paths.compute_paths` ``known``) all read these instead of evaluating again.
    (:func:`precision_check`'s fp32 re-evaluation is not one of them.)"""
    cache = evaluator.__dict__.setdefault("_vertex_results", {})
    out = {}
    for s in _vertices(chart):
        key = (s, tuple(chart.vertices[s]), bool(evaluator.autocast))
        if key not in cache:
            cache[key] = evaluator.evaluate(*chart.vertices[s], keep_samples=True)
        out[s] = cache[key]
    return out


def vertex_gap_se(chart, evaluator) -> dict[str, float]:
    """Paired standard error of the vertex-loss difference of each pair of solutions (same samples)."""
    pairs = _pairs(chart)
    names = {s for pair in pairs for s in pair}
    samples = {s: r.samples for s, r in vertex_results(chart, evaluator).items() if s in names}
    return {f"{a}-{b}": paired_se(samples[a], samples[b]) for a, b in pairs}


def _vertices(chart) -> list[str]:
    """The chart's vertices: ft, lora, randlora for a plane through them, the centre of a random chart."""
    return [s for s in SOLUTIONS if s in chart.vertices] + [s for s in chart.vertices if s not in SOLUTIONS]


def _pairs(chart) -> list[tuple[str, str]]:
    return [(a, b) for a, b in paths.PAIRS if a in chart.vertices and b in chart.vertices]


def metadata(loaded: Loaded, chart, xs, ys, result, summary, path_summary, evaluator, device, world) -> dict:
    config, dataset = loaded.config, loaded.task.dataset
    return {
        "dataset": config.dataset, "model": loaded.model_name, "model_options": loaded.model_options,
        "preset": config.preset, "config": config.to_dict(), "chart": config.chart, "chart_geometry": chart.info,
        "eval_split": config.eval_split, "eval_samples": evaluator.eval_set.n, "seed": config.seed,
        "grid": {"nx": len(xs), "ny": len(ys), "x_range": [float(xs[0]), float(xs[-1])],
                 "y_range": [float(ys[0]), float(ys[-1])]},
        "train_steps": config.steps_for(len(dataset.train)), "device": str(device),
        "dtype": config.landscape_dtype(device.type), "bf16_check": precision_check(summary, chart, evaluator),
        "vertex_gap_se": vertex_gap_se(chart, evaluator),
        "threads": threads.info(), "world_size": world,
        "grid_points_computed_this_run": int(result["points_computed"]), "base_fingerprint": loaded.base_fingerprint,
        "data_source": dataset.source, "classes": dataset.classes, "test_samples": len(dataset.test),
        "solutions": summary, "paths": path_summary,
        "versions": versions(),
        # the hessian chart (landscape.engine.hessian_chart): [λ1, λ2] of the unit axes x, y and the check
        **({"chart_eigenvalues": chart.info["hessian"]["eigenvalues"], "chart_check": chart.info["hessian"]["check"]}
           if "hessian" in chart.info else {}),
    }  # fmt: skip


def print_summary(written: list[Path], summary: dict, seconds: dict, path_summary: dict | None = None,
                  orderings: dict | None = None) -> None:  # fmt: skip
    """The run's closing lines: the files, a table of the solutions, and with ``path_summary`` (landscape.json's
    "paths") each straight path's barrier ("no barrier" at or below its chord) and peak above the endpoint mean;
    with ``orderings`` (``--seeds N``, :mod:`landscape.seeds`) the readings over the training seeds."""
    print("\nwrote " + ", ".join(str(p) for p in written))
    print(f"{'solution':<10} {'trainable':>11} {'rank':>5} {'test acc':>9} {'test loss':>10} {'vertex loss':>12}")
    for name in [*METHOD_ORDER, "base"]:  # the methods the run has (--load-4bit: no ft), the base vertex
        if name not in summary:
            continue
        s = summary[name]
        # a solution given with --solutions may have no metrics (trained elsewhere: adapters.foreign)
        acc, loss, vl = (("" if s.get(k) is None else f"{s[k]:.4f}") for k in ("test_accuracy", "test_loss",
                                                                                 "vertex_loss"))  # fmt: skip
        print(f"{name:<10} {s['trainable_params'] or 0:>11,} {s['rank'] or '':>5} {acc:>9} {loss:>10} {vl:>12}")
    print("trainable counts include the classification head; wall time (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))  # fmt: skip
    for pair in (path_summary or {}).get("barrier") or {}:
        entry = {k: path_summary[k][pair] for k in ("barrier", "barrier_se", "t_max")}
        peak, se = (path_summary[k][pair] for k in ("peak_above_endpoint_mean", "peak_above_endpoint_mean_se"))
        print(f"path {pair:<14} {paths.barrier_text(entry)}; peak above the endpoint mean {peak:.4f} ± {se:.4f}")
    if orderings is not None:
        from landscape import seeds

        seeds.print_report(summary, orderings, path_summary)


__all__ = [
    "fp32_weights", "metadata", "precision_check", "print_summary", "stored_in_half", "summarise", "vertex_gap_se",
    "vertex_results",
]  # fmt: skip
