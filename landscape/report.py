"""What a run reports: the per-solution summary, the bf16 check, landscape.json's metadata, the console table.

Kept apart from the recipe so every recipe (and the figures command) describes runs the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapters import threads
from adapters.objectives import paired_se
from landscape import paths
from landscape.cli import versions
from landscape.plane import SOLUTIONS
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
        point = None if len(i) and len(j) else evaluator.evaluate(x, y)
        summary[s]["vertex_loss"] = float(result["loss"][i[0], j[0]]) if point is None else point.loss
        summary[s]["vertex_accuracy"] = float(result["accuracy"][i[0], j[0]]) if point is None else point.accuracy
        summary[s]["vertex_loss_se"] = float(result["loss_se"][i[0], j[0]]) if point is None else point.loss_se
    return summary


def precision_check(summary: dict, chart, evaluator) -> dict | None:
    """What bf16 costs: the vertices again in fp32, compared with the smallest effects the run reports."""
    if not evaluator.autocast:
        return None
    evaluator.autocast = False
    fp32 = {s: evaluator.evaluate(*chart.vertices[s]).loss for s in _vertices(chart)}
    evaluator.autocast = True
    diff = max(abs(summary[s]["vertex_loss"] - fp32[s]) for s in fp32)
    gaps = [abs(summary[a]["vertex_loss"] - summary[b]["vertex_loss"]) for a, b in _pairs(chart)]
    gap = min(gaps) if gaps else None  # a random chart has one vertex: no gap to compare with
    return {"vertex_loss_fp32": fp32, "max_abs_diff_bf16_vs_fp32": diff, "smallest_vertex_loss_gap": gap,
            "bf16_below_smallest_gap": None if gap is None else diff < gap}  # fmt: skip


def vertex_gap_se(chart, evaluator) -> dict[str, float]:
    """Paired standard error of the vertex-loss difference of each pair of solutions (same samples)."""
    pairs = _pairs(chart)
    names = [s for s in _vertices(chart) if any(s in pair for pair in pairs)]
    samples = {s: evaluator.evaluate(*chart.vertices[s], keep_samples=True).samples for s in names}
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
    }  # fmt: skip


def print_summary(written: list[Path], summary: dict, seconds: dict) -> None:
    print("\nwrote " + ", ".join(str(p) for p in written))
    print(f"{'solution':<10} {'trainable':>11} {'rank':>5} {'test acc':>9} {'test loss':>10} {'vertex loss':>12}")
    for name in METHOD_ORDER:
        s = summary[name]
        # a solution given with --solutions may have no metrics (trained elsewhere: adapters.foreign)
        acc, loss, vl = (("" if s.get(k) is None else f"{s[k]:.4f}") for k in ("test_accuracy", "test_loss",
                                                                                 "vertex_loss"))  # fmt: skip
        print(f"{name:<10} {s['trainable_params'] or 0:>11,} {s['rank'] or '':>5} {acc:>9} {loss:>10} {vl:>12}")
    print("trainable counts include the classification head; wall time (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))  # fmt: skip


__all__ = ["metadata", "precision_check", "print_summary", "summarise", "vertex_gap_se"]
