"""Grid evaluation cost: our engine vs the paper's loop vs the ``loss-landscapes`` package.

    python -m experiments.benchmarks.grid [--json PATH] [--quick] [--cases NAME ...] [--threads N] [--profile]
                                          [--points-per-forward P] [--batched-groups G]

Per case, in one process, on the same model, the same three solutions, the same grid points
and the same evaluation samples, fp32 everywhere:

- ``engine``: :class:`landscape.engine.grid.PlaneEvaluator` (paper chart) evaluating every point —
  weights written in place from device-resident base and directions, evaluation set encoded
  once and batched by length, one host sync per point.
- ``paper_loop``: the RandLoRA paper's per-point loop (state-dict rebuild, ``load_state_dict``,
  a fresh ``DataLoader`` that preprocesses the raw samples again, ``.item()`` per batch), from
  :mod:`experiments.benchmarks.peers`.
- ``loss_landscapes``: ``loss_landscapes.planar_interpolation(RandLoRA, LoRA, FT, metric, steps=S)``
  with a metric over every evaluation batch (encoded once, in dataset order, each batch padded
  to its longest sample), from :mod:`experiments.benchmarks.peers`. For text cases a second run,
  ``loss_landscapes_same_batches``, hands the metric the engine's own length-sorted batches, to
  separate what batching saves from what the per-point machinery saves.

All three score with the project's one objective (:mod:`adapters.objectives`). The engine and
the paper loop are evaluated at exactly loss-landscapes' S × S points, mapped to the paper
chart (:func:`~experiments.benchmarks.peers.ll_points`, :func:`~experiments.benchmarks.peers.paper_xy`;
the mapping is derived in :mod:`experiments.benchmarks.peers`), so all three methods evaluate
the same number of points at the same places in weight space.

``engine_batched`` (extra measurement, not one of the three methods): the engine with P grid
points per forward (``points_per_forward``: the P points' plane parameters stacked and the model
run under ``torch.func.vmap(functional_call)``, see :mod:`landscape.engine.grid`) against the same
engine with P = 1, on ``--batched-groups`` groups of P grid points (quick: 1, full: 2; the grid
points in order, cycled), group by group with the order of the two alternating, one untimed
warm-up group each. P = ``--points-per-forward`` (default: 4 on CPU; on CUDA the engine's
``auto`` rule; not measured for a model that asks for one point per forward, CLIP's zero-shot
classifier, unless P is given).

Timing. The three methods run interleaved, point by point (:func:`interleaved_grid`):
``planar_interpolation`` drives the walk and its metric, at each point, also runs the engine and
the paper loop at the same (x, y), in an order rotated from point to point, so load from other
processes hits all of them alike. Each method is timed on its own work (loss-landscapes: its
metric plus its in-place step between two metric calls); every method gets one untimed warm-up.

Solutions are synthetic (no training). The plane holds what the adapters adapt: the weights
:func:`adapters.methods.adapted_weights` selects for the model's targets. FT = base + noise on
every trainable parameter, LoRA = base + rank-8 noise ``B·A`` on the adapted weights, RandLoRA =
base + full-rank noise on the adapted weights, each noise scaled to ``--delta-scale`` × the RMS
of the parameter it perturbs. A model with a trainable head (zero in the base model) gets a
nearest-centroid head fitted on the base model's features of the evaluation samples (one
temperature picked by a 1-D search) plus the same kind of noise, so losses are below
log(classes) and differ per solution; CLIP's zero-shot head is its text tower, on the plane
like the image tower.

Useful FLOP/s = forward FLOPs of the real work per point divided by the engine's time per point:
text — 2 × (encoder matrix parameters) × (real tokens) + 4·L·d·T² per sample of real length T
(QKᵀ and AV) + the head; images — ``torch.utils.flop_counter.FlopCounterMode`` on one batch of
real size, scaled to the evaluation set, plus the work done once per set of weights (CLIP's
class-prompt text features) once (:func:`point_flops`). Peak = best 2n³/t of a large
``torch.mm`` in the same dtype (n = 2048 on CPU, 8192 on CUDA), timed before, between the
points and after every case; the best is the peak (``utilization``), the median is recorded too
(``utilization_vs_median_peak``).

Cases: ``minilm-wordnet`` (all-MiniLM-L6-v2 + WordNet glosses, 8 classes), ``efficientnet-fashion-
mnist`` (EfficientNet-Lite0 at 64 px + Fashion-MNIST), both on CPU; ``vit-b32-cifar`` (the
adapters' own CLIP ViT-B-32, ``get_model("ViT-B-32")`` with ``pretrained none``: random init
from the seed, zero-shot head from 100 class prompts, q/k/v, ``c_fc`` and ``c_proj`` of both
towers on the plane, on synthetic 32 px images — a random pattern per class plus noise —
resized to 224 px in the model's forward; twice the samples) only when CUDA is available (fp32
with TF32 off), else recorded as skipped (``--vit-on-cpu``: on the CPU, a smoke test).

Where things live: the cases, their synthetic solutions, FLOPs and the matmul peak in
:mod:`experiments.benchmarks.grid_cases`; the engine's side in :mod:`experiments.benchmarks.grid_engine`;
the timed interleaving, one case's result and the CLI here.
"""

from __future__ import annotations

import argparse
import copy
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
from adapters.methods import has_head
from adapters.models.base import HEAD as HEAD  # re-exported, as before the split
from experiments.benchmarks.grid_cases import (
    Case,
    Deltas,
    efficientnet_case,
    fit_head,
    matmul_peak,
    minilm_case,
    synthetic_deltas,
    vit_case,
)
from experiments.benchmarks.grid_cases import bert_useful_flops as bert_useful_flops
from experiments.benchmarks.grid_cases import point_flops as point_flops
from experiments.benchmarks.grid_engine import engine_batched_vs_single, make_engine
from experiments.benchmarks.grid_engine import engine_losses as engine_losses  # re-exported, as before the split
from experiments.benchmarks.peers import (
    BATCH_SIZE,
    SOLUTIONS,
    ll_metric,
    ll_planar,
    ll_points,
    ll_wrappers,
    paper_point,
    paper_xy,
    plain_batches,
    solution_state_dicts,
    sync,
)
from landscape.engine.grid import EvalSet, PlaneEvaluator, auto_points_per_forward

PROG = "python -m experiments.benchmarks.grid"
CASES = ("minilm-wordnet", "efficientnet-fashion-mnist", "vit-b32-cifar")
PRESETS = {
    "quick": {"steps": 3, "samples": 256, "batched_groups": 1},
    "full": {"steps": 5, "samples": 512, "batched_groups": 2},
}
TOLERANCE = 1e-4  # |engine − paper loop| at every point


# --------------------------------------------------------------------------- all three, interleaved


class _Driver:
    """loss-landscapes' metric that, at each point of its walk, runs every method and times each alone.

    ``tasks``: name -> ``f(i, j, wrapper)`` giving the loss at grid point [i, j] (the wrapper is
    loss-landscapes' model there); ``"ll"`` is loss-landscapes' own metric, whose value it returns.
    """

    def __init__(self, tasks: dict[str, Callable], steps: int, device, between: Callable[[], None] | None):
        self.tasks, self.device, self.between = tasks, device, between
        self.order = [(i, j) for i in range(steps) for j in (range(steps) if i % 2 == 0 else reversed(range(steps)))]
        self.seconds = {k: 0.0 for k in tasks}
        self.values = {k: np.full((steps, steps), np.nan) for k in tasks}
        self.step_seconds = self.setup = 0.0
        self.k, self.end, self.start = 0, None, time.perf_counter()

    def __call__(self, wrapper) -> float:
        now = time.perf_counter()
        if self.end is None:
            self.setup = now - self.start  # loss-landscapes' direction set-up
        else:
            self.step_seconds += now - self.end  # its in-place step to this point
        i, j = self.order[self.k]
        names = list(self.tasks)
        r = self.k % len(names)
        for task in names[r:] + names[:r]:
            sync(self.device)
            t = time.perf_counter()
            value = self.tasks[task](i, j, wrapper)
            sync(self.device)
            self.seconds[task] += time.perf_counter() - t
            self.values[task][i, j] = value
        if self.between is not None:
            self.between()
        self.k += 1
        self.end = time.perf_counter()
        return float(self.values["ll"][i, j])


def interleaved_grid(
    model: nn.Module,
    deltas: Deltas,
    eval_set: EvalSet,
    ll_batches: list,
    raw: list[str] | torch.Tensor,
    labels: torch.Tensor,
    encode: Callable,
    device: torch.device,
    steps: int,
    same_batches: bool = False,
    dtype: str = "float32",
    between: Callable[[], None] | None = None,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """All three methods point by point, so background load hits them alike.

    ``planar_interpolation`` drives the walk; its metric, at each point, also runs the engine and
    the paper loop at the same (x, y) (and, with ``same_batches``, loss-landscapes' metric on the
    engine's batches), in an order rotated from point to point. Each method's time per point is
    its own work only: the engine's ``evaluate``, the paper loop's point, and for loss-landscapes
    its metric plus the time from the end of the previous callback to the start of this one (its
    in-place step along the plane). The first gap (its direction set-up) is reported apart.
    ``between`` (e.g. a peak measurement) runs after every point, outside all timings.
    """
    xy = paper_xy(ll_points(steps))
    evaluator = make_engine(model, deltas, eval_set, device, dtype)
    states = solution_state_dicts(model, deltas, device)
    paper_net = copy.deepcopy(model).to(device)
    wrappers = ll_wrappers(model, deltas, device)
    metrics = {"ll": ll_metric(ll_batches, len(labels))}
    if same_batches:
        metrics["ll_same"] = ll_metric(eval_set.batches, eval_set.n)
    tasks = {
        "engine": lambda i, j, w: evaluator.evaluate(*xy[i, j]).loss,
        "paper_loop": lambda i, j, w: paper_point(
            paper_net, states, raw, labels, encode, device, *xy[i, j], batch_size=batch_size
        ),
        **{name: (lambda i, j, w, m=m: m(w)) for name, m in metrics.items()},
    }
    for task in tasks.values():  # warm-ups, untimed (loss-landscapes' metric at RandLoRA, before any step)
        task(0, 0, wrappers[SOLUTIONS[0]])
    driver = _Driver(tasks, steps, device, between)
    if not np.array_equal(ll_planar(wrappers, driver, steps), driver.values["ll"]):
        raise AssertionError("loss-landscapes' output order differs from ll_points")
    points = steps * steps
    s = driver.seconds
    per_point = {"engine": s["engine"] / points, "paper_loop": s["paper_loop"] / points}
    per_point["loss_landscapes"] = (s["ll"] + driver.step_seconds) / points
    losses = {"engine": driver.values["engine"], "paper_loop": driver.values["paper_loop"]}
    losses["loss_landscapes"] = driver.values["ll"]
    if same_batches:
        per_point["loss_landscapes_same_batches"] = (s["ll_same"] + driver.step_seconds) / points
        losses["loss_landscapes_same_batches"] = driver.values["ll_same"]
    return {
        "losses": losses,
        "s_per_point": per_point,
        "loss_landscapes_step_s_per_point": driver.step_seconds / max(points - 1, 1),
        "loss_landscapes_setup_s": driver.setup,
        "evaluator": evaluator,
    }


# --------------------------------------------------------------------------- one case


def profile_point(evaluator: PlaneEvaluator, x: float, y: float, top: int = 12) -> list[dict]:
    """Self time of the top operators of one engine point (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if evaluator.device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        evaluator.evaluate(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows
    ]


def batched_measurement(
    case: Case, model: nn.Module, deltas: Deltas, eval_set: EvalSet, xy: np.ndarray, p: int | None, groups: int, log
) -> dict:
    """Result fields of the engine with P points per forward against P = 1 (``p`` None: the default rule)."""
    device = case.device
    if p is None and not getattr(model, "batch_grid_points", True):
        return {"engine_batched_skipped": "the model evaluates one grid point per forward (batch_grid_points)"}
    if p is None:
        plane_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        p = 4 if device.type == "cpu" else auto_points_per_forward(device, eval_set, plane_bytes)
    if not p:
        return {}
    log(f"[{case.name}] engine with {p} points per forward vs 1, {groups} groups")
    b = engine_batched_vs_single(model, deltas, eval_set, device, xy, p, groups)
    diff = float(np.max(np.abs(b["loss_batched"] - b["loss_single"])))
    if not diff <= TOLERANCE:
        raise AssertionError(f"{case.name}: batched and single-point engine differ by {diff:.3g} > {TOLERANCE}")
    log(
        f"[{case.name}] engine s/point: 1 point per forward {b['single_s_per_point']:.3f}, "
        f"{b['points_per_forward_used']} per forward {b['batched_s_per_point']:.3f}"
    )
    return {
        "engine_batched_s_per_point": b["batched_s_per_point"],
        "engine_batched_points_per_forward": b["points_per_forward_used"],
        "engine_batched_points_per_forward_requested": b["points_per_forward"],
        "engine_batched_note": b["note"],
        "engine_batched_points": b["points"],
        "engine_single_s_per_point_beside_batched": b["single_s_per_point"],
        "speedup_batched_vs_single": b["single_s_per_point"] / b["batched_s_per_point"],
        "max_abs_diff_engine_batched_vs_single": diff,
    }


def agreement(name: str, losses: dict[str, np.ndarray]) -> dict:
    """Largest |engine − peer| per peer; the paper loop must agree within :data:`TOLERANCE`."""
    eng = losses["engine"]
    diffs = {
        "max_abs_diff_engine_vs_paper_loop": float(np.max(np.abs(eng - losses["paper_loop"]))),
        "max_abs_diff_engine_vs_loss_landscapes": float(np.max(np.abs(eng - losses["loss_landscapes"]))),
    }
    if "loss_landscapes_same_batches" in losses:
        same = float(np.max(np.abs(eng - losses["loss_landscapes_same_batches"])))
        diffs["max_abs_diff_engine_vs_loss_landscapes_same_batches"] = same
    if not diffs["max_abs_diff_engine_vs_paper_loop"] <= TOLERANCE:
        raise AssertionError(
            f"{name}: engine and paper loop differ by {diffs['max_abs_diff_engine_vs_paper_loop']:.3g} > {TOLERANCE}"
        )
    return diffs


def timing_fields(spp: dict[str, float], flops: float, peaks: list[float]) -> dict:
    """Seconds per point, speed-ups over the peers, useful FLOP/s and utilization of the measured peak."""
    engine = spp["engine"]
    useful, peak, median_peak = flops / engine, max(peaks), float(np.median(peaks))
    out = {
        "engine_s_per_point": engine,
        "paper_loop_s_per_point": spp["paper_loop"],
        "loss_landscapes_s_per_point": spp["loss_landscapes"],
        "speedup_vs_paper_loop": spp["paper_loop"] / engine,
        "speedup_vs_loss_landscapes": spp["loss_landscapes"] / engine,
        "useful_flops_per_point": flops,
        "useful_flops_per_s": useful,
        "peak_flops_per_s": peak,
        "peak_flops_per_s_median": median_peak,
        "peak_flops_per_s_measurements": peaks,
        "utilization": useful / peak,
        "utilization_vs_median_peak": useful / median_peak,
    }
    if "loss_landscapes_same_batches" in spp:
        out["loss_landscapes_same_batches_s_per_point"] = spp["loss_landscapes_same_batches"]
        out["speedup_vs_loss_landscapes_same_batches"] = spp["loss_landscapes_same_batches"] / engine
    return out


def run_case(
    case: Case,
    steps: int,
    delta_scale: float,
    seed: int = 0,
    profile: bool = False,
    log=print,
    points_per_forward: int | None = None,
    batched_groups: int = 2,
) -> dict:
    """One case; ``points_per_forward`` = P of the batched engine (None: 4 on CPU, the engine's auto
    rule on CUDA, not measured for a model asking for one point per forward; 0: not measured)."""
    device = case.device
    model = case.model.to(device).eval()
    peaks = [matmul_peak(device)]
    encoded = case.encode(case.raw)
    eval_set = EvalSet.prepare(encoded, case.labels, BATCH_SIZE, device)
    head = fit_head(model, eval_set, case.num_classes) if has_head(model) else None
    deltas = synthetic_deltas(model.cpu(), case.targets, head, delta_scale, seed)
    model.to(device)
    flops = case.useful_flops(model, encoded, eval_set)
    xy = paper_xy(ll_points(steps))
    text = encoded.lengths is not None
    batches = plain_batches(encoded, case.labels, BATCH_SIZE, device)
    log(f"[{case.name}] {steps * steps} points × {eval_set.n} samples: engine, paper loop, loss-landscapes interleaved")
    out = interleaved_grid(
        model, deltas, eval_set, batches, case.raw, case.labels, case.encode, device, steps,
        same_batches=text, between=lambda: peaks.append(matmul_peak(device, repeats=1)),
    )  # fmt: skip
    evaluator = out.pop("evaluator")
    profile_rows = profile_point(evaluator, *xy[0, 0]) if profile else None
    del evaluator
    batched = batched_measurement(case, model, deltas, eval_set, xy, points_per_forward, batched_groups, log)
    peaks.append(matmul_peak(device))
    losses = out["losses"]
    log(f"[{case.name}] s/point: " + ", ".join(f"{k} {v:.3f}" for k, v in out["s_per_point"].items()))
    result = {
        "name": case.name, "device": str(device), "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "grid_points": steps * steps, "grid_steps": steps, "eval_samples": eval_set.n, "batch_size": BATCH_SIZE,
        "adapted_weights": len(case.targets), "plane_params": sum(t.numel() for t in deltas["ft"].values()),
        **timing_fields(out["s_per_point"], flops, peaks),
        "loss_landscapes_step_s_per_point": out["loss_landscapes_step_s_per_point"],
        "loss_landscapes_setup_s": out["loss_landscapes_setup_s"],
        "timing": "interleaved point by point (see interleaved_grid); peak = best torch.mm of the case",
        **agreement(case.name, losses), "tolerance": TOLERANCE,
        "points_alpha_beta": ll_points(steps).reshape(-1, 2).tolist(), "points_paper_xy": xy.reshape(-1, 2).tolist(),
        **{f"loss_{k}": v.reshape(-1).tolist() for k, v in losses.items()},
        "log_num_classes": float(np.log(case.num_classes)), "delta_scale": delta_scale,
        "real_tokens": int(encoded.lengths.sum()) if text else None,
        "padded_tokens_engine": sum(int(b[0]["input_ids"].numel()) for b in eval_set.batches) if text else None,
        "padded_tokens_dataset_order": sum(int(b[0]["input_ids"].numel()) for b in batches) if text else None,
        **case.info, **batched,
    }  # fmt: skip
    if profile_rows is not None:
        result["engine_profile_top_ops"] = profile_rows
    return result


# --------------------------------------------------------------------------- CLI


def table(results: list[dict]) -> str:
    head = (
        "| case | points × samples | engine s/pt | paper loop s/pt | loss-landscapes s/pt | × vs paper | × vs l-l "
        "| max Δ a–b | max Δ a–c | useful GFLOP/s | peak GFLOP/s | utilization |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        if r.get("skipped"):
            rows.append(f"| {r['name']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        ll = f"{r['loss_landscapes_s_per_point']:.3f}"
        sp_ll = f"{r['speedup_vs_loss_landscapes']:.2f}"
        if "loss_landscapes_same_batches_s_per_point" in r:
            ll += f" ({r['loss_landscapes_same_batches_s_per_point']:.3f})"
            sp_ll += f" ({r['speedup_vs_loss_landscapes_same_batches']:.2f})"
        rows.append(
            f"| {r['name']} | {r['grid_points']} × {r['eval_samples']} | {r['engine_s_per_point']:.3f} "
            f"| {r['paper_loop_s_per_point']:.3f} | {ll} | {r['speedup_vs_paper_loop']:.2f} | {sp_ll} "
            f"| {r['max_abs_diff_engine_vs_paper_loop']:.1e} | {r['max_abs_diff_engine_vs_loss_landscapes']:.1e} "
            f"| {r['useful_flops_per_s'] / 1e9:.1f} | {r['peak_flops_per_s'] / 1e9:.1f} | {r['utilization']:.2f} |"
        )
    batched = [r for r in results if "engine_batched_s_per_point" in r]
    if batched:
        rows += [
            "",
            "| case | points per forward | engine s/pt, 1 per forward | engine s/pt, batched | × batched vs 1 "
            "| max Δ batched–1 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in batched:
            rows.append(
                f"| {r['name']} | {r['engine_batched_points_per_forward']} "
                f"| {r['engine_single_s_per_point_beside_batched']:.3f} | {r['engine_batched_s_per_point']:.3f} "
                f"| {r['speedup_batched_vs_single']:.2f} | {r['max_abs_diff_engine_batched_vs_single']:.1e} |"
            )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="3 × 3 points, 256 samples (default 5 × 5, 512)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="points per axis (overrides the preset)")
    p.add_argument("--samples", type=int, default=None, help="evaluation samples (overrides the preset)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--delta-scale", type=float, default=1e-2, help="solution noise / parameter RMS (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--points-per-forward",
        type=int,
        default=None,
        help="P of the batched-engine measurement (default: 4 on CPU, the engine's auto rule on CUDA; 0 = skip it)",
    )
    p.add_argument(
        "--batched-groups", type=int, default=None, help="groups of P points timed per engine (quick: 1, full: 2)"
    )
    p.add_argument("--profile", action="store_true", help="profile one engine point per case (torch.profiler)")
    p.add_argument(
        "--vit-on-cpu", action="store_true", help="run vit-b32-cifar on CPU when CUDA is absent (smoke test only)"
    )
    return p


def make_case(name: str, samples: int, seed: int, vit_on_cpu: bool) -> Case | str:
    """The case ``name``, or why it is skipped."""
    if name == "minilm-wordnet":
        return minilm_case(samples, seed)
    if name == "efficientnet-fashion-mnist":
        return efficientnet_case(samples, seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # strict fp32, like the CPU cases
        torch.backends.cudnn.allow_tf32 = False
        return vit_case(samples * 2, seed, torch.device("cuda"))
    return vit_case(samples, seed, torch.device("cpu")) if vit_on_cpu else "no CUDA device"


def report(results: list[dict], argv: Sequence[str] | None, wall_s: float, load_before) -> dict:
    import importlib.metadata as md

    return {
        "benchmark": "grid",
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
        "cases": results,
        "wall_s": wall_s,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "versions": {
            p: md.version(p) for p in ("torch", "transformers", "open_clip_torch", "loss-landscapes", "numpy")
        },
        "mapping": "loss-landscapes point [i, j] = (α, β) = (i/S, (j+1)/S if i even else j/S); paper chart "
        "(x, y) = (α + β/2, β); engine and paper loop evaluated at those (x, y)",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        threads.configure(args.threads)
    preset = PRESETS["quick" if args.quick else "full"]
    steps = args.steps or preset["steps"]
    samples = args.samples or preset["samples"]
    groups = preset["batched_groups"] if args.batched_groups is None else args.batched_groups
    if steps < 2 or samples < 1:
        print(f"{PROG}: --steps must be >= 2 and --samples >= 1", file=sys.stderr)
        return 2
    if (args.points_per_forward or 0) < 0 or groups < 1:
        print(f"{PROG}: --points-per-forward must be >= 0 and --batched-groups >= 1", file=sys.stderr)
        return 2
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    start, load_before = time.perf_counter(), os.getloadavg()
    results = []
    for name in args.cases:
        case = make_case(name, samples, args.seed, args.vit_on_cpu)
        if isinstance(case, str):
            results.append({"name": name, "skipped": case})
            log(f"[{name}] skipped: {case}")
            continue
        t = time.perf_counter()
        results.append(
            run_case(case, steps, args.delta_scale, args.seed, args.profile, log, args.points_per_forward, groups)
        )
        results[-1]["case_wall_s"] = time.perf_counter() - t
        del case
    print(table(results))
    for r in results:
        if r.get("engine_profile_top_ops"):
            print(f"\n{r['name']}: engine, one point, top operators by self CPU time")
            for row in r["engine_profile_top_ops"]:
                print(f"  {row['share']:6.1%}  {row['self_cpu_s']:8.4f} s  {row['calls']:5d}×  {row['op']}")
    if args.json:
        from adapters.io import write_json

        write_json(args.json, report(results, argv, time.perf_counter() - start, load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
