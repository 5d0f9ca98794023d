"""Grid evaluation cost: our engine vs the paper's loop vs the ``loss-landscapes`` package.

    python -m experiments.benchmarks.grid [--json PATH] [--quick] [--cases NAME ...] [--threads N] [--profile]
                                          [--points-per-forward P] [--batched-groups G]

Per case, in one process, on the same model, the same three solutions, the same grid points
and the same evaluation samples, fp32 everywhere:

- ``engine``: :class:`landscape.grid.PlaneEvaluator` (paper chart) evaluating every point —
  weights written in place from device-resident base and directions, evaluation set encoded
  once and batched by length, one host sync per point.
- ``paper_loop``: the RandLoRA paper's loop. Per point: rebuild the whole state dict in Python
  as ``a·θ_R + b·θ_F + c·θ_L`` (every floating entry, a = 1 − x − y/2, b = y, c = x − y/2),
  ``model.load_state_dict``, a fresh ``DataLoader`` over the RAW samples whose collate function
  preprocesses every batch again (tokenises the strings / resizes the images), ``.item()`` per
  batch. The three state dicts live on the model's device (the cheaper choice for the loop).
- ``loss_landscapes``: ``loss_landscapes.planar_interpolation(model_start=RandLoRA,
  model_end_one=LoRA, model_end_two=FT, metric, steps=S)`` with a custom ``Metric`` that runs
  every evaluation batch (encoded once, in dataset order, each batch padded to its longest
  sample — what tokenising each batch would give) and sums the per-sample cross-entropy,
  ``.item()`` per batch like the package's own ``Loss`` metric. For text cases a second run,
  ``loss_landscapes_same_batches``, hands the metric the engine's own length-sorted batches,
  to separate what batching saves from what the per-point machinery saves.

Mapping of the planes. ``planar_interpolation`` walks ``θ = θ_R + α·(θ_L − θ_R) + β·(θ_F − θ_R)``
in place (``start.add_(dir)``, drift accumulates) with α = i/S for column i = 0 … S−1 and a
zig-zag in β: even columns are evaluated at β = 1/S … S/S, odd columns at β = 0 … (S−1)/S (it
adds the step before evaluating on the way up, subtracts before evaluating on the way down).
So its grid never reaches α = 1 (LoRA) and misses RandLoRA itself (α = β = 0). The paper
chart is ``θ = θ_R + x·(θ_L − θ_R) + y·(θ_F − (θ_R + θ_L)/2)``, i.e. α = x − y/2 = c and β = y = b,
so loss-landscapes' point (α, β) is the paper chart's (x, y) = (α + β/2, β). The engine and
the paper loop are evaluated at exactly these S × S points (:func:`ll_points`), so all three
methods evaluate the same number of points at the same places in weight space.

``engine_batched`` (extra measurement, not one of the three methods): the engine with P grid
points per forward (``points_per_forward``: the P points' plane parameters stacked and the model
run under ``torch.func.vmap(functional_call)``, see :mod:`landscape.grid`) against the same
engine with P = 1, on ``--batched-groups`` groups of P grid points (quick: 1, full: 2; the grid
points in order, cycled), group by group with the order of the two alternating, one untimed
warm-up group each.
P = ``--points-per-forward`` (default: 4 on CPU; on CUDA the engine's ``auto`` rule).

Timing. The three methods run interleaved, point by point (:func:`interleaved_grid`):
``planar_interpolation`` drives the walk and its metric, at each point, also runs the engine and
the paper loop at the same (x, y), in an order rotated from point to point, so load from other
processes hits all of them alike. Each method is timed on its own work (loss-landscapes: its
metric plus its in-place step between two metric calls); every method gets one untimed warm-up.

Solutions are synthetic (no training): base model from the registry; FT = base + noise on
every parameter, LoRA = base + rank-8 noise ``B·A`` on the target Linears, RandLoRA = base +
full-rank noise on the target Linears, each noise scaled to ``--delta-scale`` × the RMS of the
parameter it perturbs. The head (zero in the base model) gets a nearest-centroid head fitted
on the base model's features of the evaluation samples (one temperature picked by a 1-D
search) plus the same kind of noise, so losses are below log(classes) and differ per solution.

Useful FLOP/s = forward FLOPs of the real work per point divided by the engine's time per point:
text — 2 × (encoder matrix parameters) × (real tokens) + 4·L·d·T² per sample of real length T
(QKᵀ and AV) + the head; images — ``torch.utils.flop_counter.FlopCounterMode`` on one batch of
real size, scaled to the evaluation set. Peak = best 2n³/t of a large ``torch.mm`` in the same
dtype (n = 2048 on CPU, 8192 on CUDA), timed before, between the points and after every case;
the best is the peak (``utilization``), the median is recorded too (``utilization_vs_median_peak``).

Cases: ``minilm-wordnet`` (all-MiniLM-L6-v2 + WordNet glosses, 8 classes), ``efficientnet-fashion-
mnist`` (EfficientNet-Lite0 at 64 px + Fashion-MNIST), both on CPU; ``vit-b32-cifar`` (open_clip
ViT-B-32, random init, as a 100-class image classifier on synthetic 32 px images — a random
pattern per class plus noise — resized to 224 px; twice the samples) only when CUDA is available
(fp32 with TF32 off), else recorded as skipped.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.models.base import HEAD, Classifier, Encoded
from landscape.grid import EvalSet, PlaneEvaluator, auto_points_per_forward
from landscape.plane import build_chart, solution_weights

PROG = "python -m experiments.benchmarks.grid"
CASES = ("minilm-wordnet", "efficientnet-fashion-mnist", "vit-b32-cifar")
BATCH_SIZE = 128  # the paper's evaluation batch and the main job's
PRESETS = {
    "quick": {"steps": 3, "samples": 256, "batched_groups": 1},
    "full": {"steps": 5, "samples": 512, "batched_groups": 2},
}
TOLERANCE = 1e-4  # |engine − paper loop| at every point


# --------------------------------------------------------------------------- the three solutions


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def adapted_weights(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of the weights the adapters would adapt: Linears, convolutions and attention in_proj whose
    module matches ``suffixes`` (peft's rule), head excluded."""
    from adapters.methods.budget import matches_target
    from adapters.methods.layers import weight_name

    names = []
    for name, m in model.named_modules():
        if name == HEAD or name.startswith(HEAD + ".") or not matches_target(name, suffixes):
            continue
        weight = "weight" if isinstance(m, nn.Linear) else weight_name(m)
        if weight is not None:
            names.append(f"{name}.{weight}")
    return names


@torch.no_grad()
def fit_head(model: Classifier, eval_set: EvalSet, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A nearest-centroid head on the base model's features (cosine logits times a searched temperature)."""
    feats, labels = [], []
    for inputs, target in eval_set.batches:
        feats.append(model.features(**inputs).float().cpu())
        labels.append(target.cpu())
    f, y = torch.cat(feats), torch.cat(labels)
    mean = f.mean(0)
    centroids = torch.stack([f[y == c].mean(0) if (y == c).any() else mean for c in range(num_classes)])
    w = centroids - mean
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = (f - mean) / (f - mean).norm(dim=1, keepdim=True).clamp_min(1e-12)  # cosine logits before temperature
    cos = z @ w.T
    # The best temperature, but no sharper than a mean loss of 0.1·log(C): few samples per class would
    # otherwise give a near-zero loss everywhere, where agreement between the methods proves little.
    losses = {float(t): float(F.cross_entropy(t * cos, y)) for t in np.geomspace(1, 30, 25)}
    floor = 0.1 * float(np.log(num_classes))
    allowed = {t: v for t, v in losses.items() if v >= floor} or {min(losses): 0.0}
    best_t = min(allowed, key=allowed.get)
    # logits = t·cos(f − mean, w_c) ≈ t/‖f − mean‖ · (f − mean)·w_c: a Linear with the typical norm folded in
    scale = best_t / float((f - mean).norm(dim=1).mean().clamp_min(1e-12))
    weight = scale * w
    return weight, -(weight @ mean)


def synthetic_deltas(
    model: Classifier,
    targets: Sequence[str],
    head: tuple[torch.Tensor, torch.Tensor],
    scale: float = 1e-2,
    seed: int = 0,
    lora_rank: int = 8,
) -> dict[str, dict[str, torch.Tensor]]:
    """ΔW of three synthetic solutions (CPU fp32): ft everything, lora/randlora the targets + head."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    head_w, head_b = head

    def noise(ref: torch.Tensor, shape=None) -> torch.Tensor:
        return torch.randn(shape or ref.shape, generator=g) * (scale * max(rms(ref), 1e-8))

    def head_delta() -> dict[str, torch.Tensor]:
        return {f"{HEAD}.weight": head_w + noise(head_w), f"{HEAD}.bias": head_b + noise(head_w, head_b.shape)}

    deltas: dict[str, dict[str, torch.Tensor]] = {
        "ft": {n: noise(p) for n, p in params.items() if not n.startswith(HEAD + ".")} | head_delta()
    }
    lora = {}
    for n in targets:
        w = params[n].reshape(params[n].shape[0], -1)
        b = torch.randn(w.shape[0], lora_rank, generator=g)
        a = torch.randn(lora_rank, w.shape[1], generator=g)
        d = b @ a
        lora[n] = (d * (scale * rms(w) / max(rms(d), 1e-12))).reshape(params[n].shape)
    deltas["lora"] = lora | head_delta()
    deltas["randlora"] = {n: noise(params[n]) for n in targets} | head_delta()
    return deltas


def solution_state_dicts(
    model: nn.Module, deltas: dict[str, dict[str, torch.Tensor]], device: torch.device | str
) -> dict[str, dict[str, torch.Tensor]]:
    """Full state dicts (parameters and buffers) of the three solutions, on ``device``."""
    base = {k: v.detach().to(device) for k, v in model.state_dict().items()}
    out = {}
    for s, d in deltas.items():
        out[s] = {k: (v + d[k].to(device)) if k in d else v for k, v in base.items()}
    return out


# --------------------------------------------------------------------------- the grid points


def ll_points(steps: int) -> np.ndarray:
    """(α, β) of ``loss_landscapes.planar_interpolation``'s output [i, j], shape (steps, steps, 2)."""
    out = np.zeros((steps, steps, 2))
    for i in range(steps):
        for j in range(steps):
            out[i, j] = (i / steps, (j + 1) / steps if i % 2 == 0 else j / steps)
    return out


def paper_xy(alpha_beta: np.ndarray) -> np.ndarray:
    """loss-landscapes' (α, β) -> paper-chart (x, y) = (α + β/2, β); same leading shape."""
    a, b = alpha_beta[..., 0], alpha_beta[..., 1]
    return np.stack([a + b / 2, b], axis=-1)


# --------------------------------------------------------------------------- (a) the engine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(
    model: nn.Module,
    deltas: dict[str, dict[str, torch.Tensor]],
    eval_set: EvalSet,
    device,
    dtype: str = "float32",
    points_per_forward: int | str = 1,
) -> PlaneEvaluator:
    """The engine as the main job builds it: paper chart through the three solutions, a model copy."""
    thetas = solution_weights(dict(model.named_parameters()), deltas)
    chart = build_chart("paper", thetas)
    del thetas
    return PlaneEvaluator(
        copy.deepcopy(model), chart, eval_set, device, dtype=dtype, points_per_forward=points_per_forward
    )


def engine_losses(
    model: nn.Module,
    deltas: dict[str, dict[str, torch.Tensor]],
    eval_set: EvalSet,
    device: torch.device,
    xy: np.ndarray,
    dtype: str = "float32",
) -> tuple[np.ndarray, float, PlaneEvaluator]:
    """Losses at the points ``xy`` (..., 2) with the engine; seconds for all points (after a warm-up)."""
    evaluator = make_engine(model, deltas, eval_set, device, dtype)
    flat = xy.reshape(-1, 2)
    evaluator.evaluate(*flat[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    losses = [evaluator.evaluate(float(x), float(y)).loss for x, y in flat]
    sync(device)
    return np.array(losses).reshape(xy.shape[:-1]), time.perf_counter() - start, evaluator


def engine_batched_vs_single(
    model: nn.Module,
    deltas: dict[str, dict[str, torch.Tensor]],
    eval_set: EvalSet,
    device: torch.device,
    xy: np.ndarray,
    points_per_forward: int,
    groups: int = 2,
    dtype: str = "float32",
) -> dict:
    """The engine with ``points_per_forward`` = P points per vmapped forward against P = 1.

    Both evaluate the same ``groups × P`` points (``xy`` in order, cycled), group by group, in an
    order alternating from group to group; one untimed warm-up group each. Returns seconds per
    point of each, the P really used (a model that cannot be vmapped falls back to 1, see
    ``note``) and the losses of both.
    """
    p = points_per_forward
    single = make_engine(model, deltas, eval_set, device, dtype)
    batched = make_engine(model, deltas, eval_set, device, dtype, points_per_forward=p)
    flat = [(float(x), float(y)) for x, y in xy.reshape(-1, 2)]
    points = [flat[k % len(flat)] for k in range(groups * p)]
    batched.evaluate_many(points[:p])  # warm-ups
    single.evaluate(*points[0])
    engines = {"single": single, "batched": batched}
    seconds = {k: 0.0 for k in engines}
    losses: dict[str, list[float]] = {k: [] for k in engines}
    for g in range(groups):
        group = points[g * p : (g + 1) * p]
        for name in ("single", "batched") if g % 2 == 0 else ("batched", "single"):
            sync(device)
            start = time.perf_counter()
            results = engines[name].evaluate_many(group)
            sync(device)
            seconds[name] += time.perf_counter() - start
            losses[name] += [r.loss for r in results]
    n = len(points)
    return {
        "points_per_forward": p,
        "points_per_forward_used": batched.points_per_forward,
        "note": batched.note,
        "points": n,
        "single_s_per_point": seconds["single"] / n,
        "batched_s_per_point": seconds["batched"] / n,
        "loss_single": np.array(losses["single"]),
        "loss_batched": np.array(losses["batched"]),
    }


# --------------------------------------------------------------------------- (b) the paper's loop


class RawSamples(torch.utils.data.Dataset):
    def __init__(self, raw: list[str] | torch.Tensor, labels: torch.Tensor):
        self.raw, self.labels = raw, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.raw[i], self.labels[i]


class Collate:
    """Preprocesses a batch of raw samples (tokenise strings / resize images) with the model's encoder."""

    def __init__(self, encode: Callable[[Sequence | torch.Tensor], Encoded]):
        self.encode = encode

    def __call__(self, items):
        raw = [x for x, _ in items]
        inputs = torch.stack(raw) if isinstance(raw[0], torch.Tensor) else raw
        return self.encode(inputs).tensors, torch.stack([y for _, y in items])


def paper_point(
    model: nn.Module,
    states: dict[str, dict[str, torch.Tensor]],
    raw: list[str] | torch.Tensor,
    labels: torch.Tensor,
    encode: Callable,
    device: torch.device,
    x: float,
    y: float,
    batch_size: int = BATCH_SIZE,
) -> float:
    a, b, c = 1 - x - y / 2, y, x - y / 2
    r, f, lo = states["randlora"], states["ft"], states["lora"]
    state = {k: (a * r[k] + b * f[k] + c * lo[k]) if r[k].is_floating_point() else r[k] for k in r}
    model.load_state_dict(state)
    model.eval()
    loader = torch.utils.data.DataLoader(
        RawSamples(raw, labels), batch_size=batch_size, shuffle=False, collate_fn=Collate(encode)
    )
    total = 0.0
    with torch.no_grad():
        for inputs, target in loader:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            logits = model(**inputs)
            total += F.cross_entropy(logits.float(), target.to(device), reduction="sum").item()
    return total / len(labels)


def paper_losses(
    model: nn.Module,
    deltas: dict[str, dict[str, torch.Tensor]],
    raw: list[str] | torch.Tensor,
    labels: torch.Tensor,
    encode: Callable,
    device: torch.device,
    xy: np.ndarray,
    batch_size: int = BATCH_SIZE,
) -> tuple[np.ndarray, float]:
    states = solution_state_dicts(model, deltas, device)
    net = copy.deepcopy(model).to(device)
    flat = xy.reshape(-1, 2)
    run = lambda x, y: paper_point(net, states, raw, labels, encode, device, x, y, batch_size)  # noqa: E731
    run(*flat[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    losses = [run(float(x), float(y)) for x, y in flat]
    sync(device)
    return np.array(losses).reshape(xy.shape[:-1]), time.perf_counter() - start


# --------------------------------------------------------------------------- (c) loss-landscapes


def plain_batches(data: Encoded, labels: torch.Tensor, batch_size: int, device: torch.device | str) -> list:
    """Batches in dataset order, each padded to its longest sample: what per-batch tokenising gives."""
    out = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        out.append(({k: v.to(device) for k, v in data.batch(sl).items()}, labels[sl].to(device)))
    return out


def ll_metric(batches: list, n: int):
    """A ``loss_landscapes`` Metric: mean cross-entropy over every batch (sum of per-sample losses / n)."""
    from loss_landscapes.metrics import Metric

    class EvalSetCE(Metric):
        def __call__(self, model_wrapper) -> float:
            total = 0.0
            for inputs, target in batches:
                logits = model_wrapper.forward(inputs)
                total += F.cross_entropy(logits.float(), target, reduction="sum").item()
            return total / n

    return EvalSetCE()


def ll_wrappers(model: nn.Module, deltas: dict[str, dict[str, torch.Tensor]], device: torch.device) -> dict:
    """One ``GeneralModelWrapper`` per solution (its own model copy, weights loaded, eval mode)."""
    from loss_landscapes import GeneralModelWrapper

    states = solution_state_dicts(model, deltas, device)
    wrappers = {}
    for s in ("randlora", "lora", "ft"):
        net = copy.deepcopy(model).to(device)
        net.load_state_dict(states[s])
        net.eval()
        wrappers[s] = GeneralModelWrapper(net, [net], lambda m, x: m(**x)).requires_grad_(False)
    return wrappers


def ll_losses(
    model: nn.Module,
    deltas: dict[str, dict[str, torch.Tensor]],
    batches: list,
    n: int,
    device: torch.device,
    steps: int,
) -> tuple[np.ndarray, float]:
    """``planar_interpolation(RandLoRA, LoRA, FT)``: (steps, steps) mean losses at :func:`ll_points`."""
    from loss_landscapes import planar_interpolation

    w = ll_wrappers(model, deltas, device)
    metric = ll_metric(batches, n)
    metric(w["randlora"])  # warm-up (at RandLoRA, before any step)
    sync(device)
    start = time.perf_counter()
    values = planar_interpolation(w["randlora"], w["lora"], w["ft"], metric, steps=steps)
    sync(device)
    return np.asarray(values, dtype=np.float64), time.perf_counter() - start


# --------------------------------------------------------------------------- all three, interleaved


def interleaved_grid(
    model: nn.Module,
    deltas: dict[str, dict[str, torch.Tensor]],
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
    from loss_landscapes import planar_interpolation

    n = len(labels)
    evaluator = make_engine(model, deltas, eval_set, device, dtype)
    states = solution_state_dicts(model, deltas, device)
    paper_net = copy.deepcopy(model).to(device)
    wrappers = ll_wrappers(model, deltas, device)
    metrics = {"ll": ll_metric(ll_batches, n)}
    if same_batches:
        metrics["ll_same"] = ll_metric(eval_set.batches, eval_set.n)
    order = [(int(i), int(j)) for i in range(steps) for j in (range(steps) if i % 2 == 0 else reversed(range(steps)))]
    xy = paper_xy(ll_points(steps))
    names = ("engine", "paper_loop", *metrics)
    seconds = {k: 0.0 for k in names}
    seconds["ll_steps"] = 0.0
    values = {k: np.full((steps, steps), np.nan) for k in names}
    state = {"k": 0, "end": None, "setup": 0.0}

    # warm-ups, untimed
    evaluator.evaluate(*xy[0, 0])
    paper_point(paper_net, states, raw, labels, encode, device, *xy[0, 0], batch_size=batch_size)
    for m in metrics.values():
        m(wrappers["randlora"])

    def run(task: str, i: int, j: int, wrapper) -> float:
        sync(device)
        t = time.perf_counter()
        if task == "engine":
            v = evaluator.evaluate(*xy[i, j]).loss
        elif task == "paper_loop":
            v = paper_point(paper_net, states, raw, labels, encode, device, *xy[i, j], batch_size=batch_size)
        else:
            v = metrics[task](wrapper)
        sync(device)
        seconds[task] += time.perf_counter() - t
        values[task][i, j] = v
        return v

    class Driver:
        def __call__(self, wrapper) -> float:
            now = time.perf_counter()
            if state["end"] is None:
                state["setup"] = now - state["start"]
            else:
                seconds["ll_steps"] += now - state["end"]
            k = state["k"]
            i, j = order[k]
            tasks = names[k % len(names) :] + names[: k % len(names)]
            for task in tasks:
                run(task, i, j, wrapper)
            if between is not None:
                between()
            state["k"] += 1
            state["end"] = time.perf_counter()
            return float(values["ll"][i, j])

    state["start"] = time.perf_counter()
    returned = planar_interpolation(wrappers["randlora"], wrappers["lora"], wrappers["ft"], Driver(), steps=steps)
    if not np.array_equal(np.asarray(returned), values["ll"]):
        raise AssertionError("loss-landscapes' output order differs from ll_points")
    points = steps * steps
    per_point = {
        "engine": seconds["engine"] / points,
        "paper_loop": seconds["paper_loop"] / points,
        "loss_landscapes": (seconds["ll"] + seconds["ll_steps"]) / points,
    }
    if same_batches:
        per_point["loss_landscapes_same_batches"] = (seconds["ll_same"] + seconds["ll_steps"]) / points
    return {
        "losses": {
            "engine": values["engine"],
            "paper_loop": values["paper_loop"],
            "loss_landscapes": values["ll"],
            **({"loss_landscapes_same_batches": values["ll_same"]} if same_batches else {}),
        },
        "s_per_point": per_point,
        "loss_landscapes_step_s_per_point": seconds["ll_steps"] / max(points - 1, 1),
        "loss_landscapes_setup_s": state["setup"],
        "evaluator": evaluator,
    }


# --------------------------------------------------------------------------- FLOPs and peak


def bert_useful_flops(model: Classifier, lengths: torch.Tensor, num_classes: int) -> float:
    """Forward FLOPs over the real (non-padded) tokens of every sample."""
    cfg = model.backbone.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    matrix = sum(p.numel() for p in model.backbone.encoder.parameters() if p.dim() == 2)
    t = lengths.double()
    return float(2 * matrix * t.sum() + 4 * layers * d * (t * t).sum() + 2 * d * num_classes * len(t))


def counted_flops(model: nn.Module, inputs: dict[str, torch.Tensor], train_mode: bool = False) -> float:
    """FLOPs of one forward, counted by FlopCounterMode (train_mode avoids fused inference kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.train(train_mode)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    model.train(was)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best 2n³/t over ``repeats`` timings of an n × n ``torch.mm``."""
    n = 8192 if device.type == "cuda" else 2048
    inner = 10 if device.type == "cuda" else 1
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    device: torch.device
    model: Classifier
    raw: list[str] | torch.Tensor
    labels: torch.Tensor
    encode: Callable[[Sequence | torch.Tensor], Encoded]
    targets: list[str]
    num_classes: int
    useful_flops: Callable[[Classifier, Encoded, EvalSet], float]  # forward FLOPs per point
    info: dict = field(default_factory=dict)


def _bert_flops(case_classes: int):
    return lambda model, encoded, eval_set: bert_useful_flops(model, encoded.lengths, case_classes)


def _image_flops(train_mode: bool = False):
    def flops(model, encoded, eval_set):
        inputs, _ = eval_set.batches[0]
        size = next(iter(inputs.values())).shape[0]
        return counted_flops(model, inputs, train_mode) / size * eval_set.n

    return flops


def _offline_case(name: str, model_name: str, dataset: str, samples: int, seed: int, flops, info: dict) -> Case:
    """A CPU case on an offline model and dataset: a fixed evaluation subset of the training split."""
    from adapters.data import eval_subset, load_dataset
    from adapters.models import get_model

    entry = get_model(model_name)
    data = load_dataset(dataset, seed=seed)
    subset = eval_subset(data.train, samples, seed)
    model = entry.build(len(data.classes))
    return Case(
        name, torch.device("cpu"), model, subset.inputs, subset.labels, entry.encode,
        adapted_weights(model, entry.targets), len(data.classes), flops(len(data.classes)),
        {**info, "data": data.source},
    )  # fmt: skip


def minilm_case(samples: int, seed: int = 0) -> Case:
    return _offline_case("minilm-wordnet", "minilm", "wordnet", samples, seed, _bert_flops,
                         {"model": "all-MiniLM-L6-v2"})  # fmt: skip


def efficientnet_case(samples: int, seed: int = 0) -> Case:
    return _offline_case("efficientnet-fashion-mnist", "efficientnet-lite0", "fashion-mnist", samples, seed,
                         lambda classes: _image_flops(), {"model": "EfficientNet-Lite0 @ 64 px"})  # fmt: skip


class ClipImageClassifier(Classifier):
    """open_clip's image tower + a linear head; uint8 pixels normalised with CLIP's statistics."""

    def __init__(self, visual: nn.Module, feature_dim: int, num_classes: int):
        super().__init__(visual, feature_dim, num_classes)
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1), False)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone((pixels.float() / 255.0 - self.mean) / self.std)


def encode_224(images: torch.Tensor) -> Encoded:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, 224, 224), bilinear."""
    x = F.interpolate(images.float(), size=(224, 224), mode="bilinear", align_corners=False)
    return Encoded({"pixels": x.round().clamp(0, 255).to(torch.uint8)})


def vit_case(samples: int, seed: int, device: torch.device, num_classes: int = 100) -> Case:
    import logging

    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is intended
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.create_model("ViT-B-32", pretrained=None)
    model = ClipImageClassifier(clip.visual, clip.visual.output_dim, num_classes)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (samples,), generator=g)
    # Learnable synthetic classes: a fixed random pattern per class plus per-image noise.
    patterns = torch.rand(num_classes, 3, 32, 32, generator=g) * 255
    noisy = patterns[labels] + 60 * torch.randn(samples, 3, 32, 32, generator=g)
    raw = noisy.round().clamp(0, 255).to(torch.uint8)
    suffixes = ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    targets = [n for n, _ in model.named_parameters() if n.endswith(suffixes)]
    return Case(
        "vit-b32-cifar", device, model, raw, labels, encode_224, targets, num_classes, _image_flops(train_mode=True),
        {"model": "open_clip ViT-B-32 (pretrained=None)", "data": "synthetic uint8 32 px images -> 224 px"},
    )  # fmt: skip


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
    rule on CUDA; 0: not measured)."""
    device, dtype = case.device, "float32"
    model = case.model.to(device).eval()
    peaks = [matmul_peak(device)]
    encoded = case.encode(case.raw)
    eval_set = EvalSet.prepare(encoded, case.labels, BATCH_SIZE, device)
    head = fit_head(model, eval_set, case.num_classes)
    deltas = synthetic_deltas(model.cpu(), case.targets, head, delta_scale, seed)
    model.to(device)
    flops = case.useful_flops(model, encoded, eval_set)
    ab = ll_points(steps)
    xy = paper_xy(ab)
    points = steps * steps

    text = encoded.lengths is not None
    batches = plain_batches(encoded, case.labels, BATCH_SIZE, device)
    log(f"[{case.name}] {points} points × {eval_set.n} samples, engine / paper loop / loss-landscapes interleaved")
    out = interleaved_grid(
        model, deltas, eval_set, batches, case.raw, case.labels, case.encode, device, steps,
        same_batches=text, dtype=dtype, between=lambda: peaks.append(matmul_peak(device, repeats=1)),
    )  # fmt: skip
    evaluator = out.pop("evaluator")
    profile_rows = profile_point(evaluator, *xy[0, 0]) if profile else None
    del evaluator
    if points_per_forward is None:
        plane_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        points_per_forward = 4 if device.type == "cpu" else auto_points_per_forward(device, eval_set, plane_bytes)
    batched = None
    if points_per_forward:
        log(f"[{case.name}] engine with {points_per_forward} points per forward vs 1, {batched_groups} groups")
        batched = engine_batched_vs_single(
            model, deltas, eval_set, device, xy, points_per_forward, batched_groups, dtype
        )
    peaks.append(matmul_peak(device))
    losses, spp = out["losses"], out["s_per_point"]
    eng, pap, ll = losses["engine"], losses["paper_loop"], losses["loss_landscapes"]
    log(f"[{case.name}] s/point: " + ", ".join(f"{k} {v:.3f}" for k, v in spp.items()))

    diff_b = float(np.max(np.abs(eng - pap)))
    diff_c = float(np.max(np.abs(eng - ll)))
    if not diff_b <= TOLERANCE:
        raise AssertionError(f"{case.name}: engine and paper loop differ by {diff_b:.3g} > {TOLERANCE}")
    engine_spp = spp["engine"]
    useful = flops / engine_spp
    peak = max(peaks)
    median_peak = float(np.median(peaks))
    result = {
        "name": case.name,
        "device": str(device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "grid_points": points,
        "grid_steps": steps,
        "eval_samples": eval_set.n,
        "batch_size": BATCH_SIZE,
        "engine_s_per_point": engine_spp,
        "paper_loop_s_per_point": spp["paper_loop"],
        "loss_landscapes_s_per_point": spp["loss_landscapes"],
        "speedup_vs_paper_loop": spp["paper_loop"] / engine_spp,
        "speedup_vs_loss_landscapes": spp["loss_landscapes"] / engine_spp,
        "loss_landscapes_step_s_per_point": out["loss_landscapes_step_s_per_point"],
        "loss_landscapes_setup_s": out["loss_landscapes_setup_s"],
        "useful_flops_per_point": flops,
        "useful_flops_per_s": useful,
        "peak_flops_per_s": peak,
        "peak_flops_per_s_median": median_peak,
        "peak_flops_per_s_measurements": peaks,
        "utilization": useful / peak,
        "utilization_vs_median_peak": useful / median_peak,
        "timing": "interleaved point by point (see interleaved_grid); peak = best torch.mm of the case",
        "max_abs_diff_engine_vs_paper_loop": diff_b,
        "max_abs_diff_engine_vs_loss_landscapes": diff_c,
        "tolerance": TOLERANCE,
        "points_alpha_beta": ab.reshape(-1, 2).tolist(),
        "points_paper_xy": xy.reshape(-1, 2).tolist(),
        "loss_engine": eng.reshape(-1).tolist(),
        "loss_paper_loop": pap.reshape(-1).tolist(),
        "loss_loss_landscapes": ll.reshape(-1).tolist(),
        "log_num_classes": float(np.log(case.num_classes)),
        "delta_scale": delta_scale,
        "real_tokens": int(encoded.lengths.sum()) if text else None,
        "padded_tokens_engine": sum(int(b[0]["input_ids"].numel()) for b in eval_set.batches) if text else None,
        "padded_tokens_dataset_order": sum(int(b[0]["input_ids"].numel()) for b in batches) if text else None,
        **case.info,
    }
    if text:
        same = losses["loss_landscapes_same_batches"]
        result["loss_landscapes_same_batches_s_per_point"] = spp["loss_landscapes_same_batches"]
        result["speedup_vs_loss_landscapes_same_batches"] = spp["loss_landscapes_same_batches"] / engine_spp
        result["max_abs_diff_engine_vs_loss_landscapes_same_batches"] = float(np.max(np.abs(same - eng)))
    if batched is not None:
        diff = float(np.max(np.abs(batched["loss_batched"] - batched["loss_single"])))
        if not diff <= TOLERANCE:
            raise AssertionError(f"{case.name}: batched and single-point engine differ by {diff:.3g} > {TOLERANCE}")
        result.update(
            engine_batched_s_per_point=batched["batched_s_per_point"],
            engine_batched_points_per_forward=batched["points_per_forward_used"],
            engine_batched_points_per_forward_requested=batched["points_per_forward"],
            engine_batched_note=batched["note"],
            engine_batched_points=batched["points"],
            engine_single_s_per_point_beside_batched=batched["single_s_per_point"],
            speedup_batched_vs_single=batched["single_s_per_point"] / batched["batched_s_per_point"],
            max_abs_diff_engine_batched_vs_single=diff,
        )
        log(
            f"[{case.name}] engine s/point: 1 point per forward {batched['single_s_per_point']:.3f}, "
            f"{batched['points_per_forward_used']} per forward {batched['batched_s_per_point']:.3f}"
        )
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
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
    start = time.perf_counter()
    load_before = os.getloadavg()
    results = []
    for name in args.cases:
        if name == "vit-b32-cifar":
            if torch.cuda.is_available():
                torch.backends.cuda.matmul.allow_tf32 = False  # strict fp32, like the CPU cases
                torch.backends.cudnn.allow_tf32 = False
                case = vit_case(samples * 2, args.seed, torch.device("cuda"))
            elif args.vit_on_cpu:
                case = vit_case(samples, args.seed, torch.device("cpu"))
            else:
                results.append({"name": name, "skipped": "no CUDA device"})
                log(f"[{name}] skipped: no CUDA device")
                continue
        elif name == "minilm-wordnet":
            case = minilm_case(samples, args.seed)
        else:
            case = efficientnet_case(samples, args.seed)
        t = time.perf_counter()
        results.append(
            run_case(
                case,
                steps,
                args.delta_scale,
                args.seed,
                args.profile,
                log,
                args.points_per_forward,
                groups,
            )
        )
        results[-1]["case_wall_s"] = time.perf_counter() - t
        del case
    import importlib.metadata as md

    out = {
        "benchmark": "grid",
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
        "cases": results,
        "wall_s": time.perf_counter() - start,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "versions": {p: md.version(p) for p in ("torch", "transformers", "loss-landscapes", "numpy")},
        "mapping": "loss-landscapes point [i, j] = (α, β) = (i/S, (j+1)/S if i even else j/S); paper chart "
        "(x, y) = (α + β/2, β); engine and paper loop evaluated at those (x, y)",
    }
    print(table(results))
    for r in results:
        if r.get("engine_profile_top_ops"):
            print(f"\n{r['name']}: engine, one point, top operators by self CPU time")
            for row in r["engine_profile_top_ops"]:
                print(f"  {row['share']:6.1%}  {row['self_cpu_s']:8.4f} s  {row['calls']:5d}×  {row['op']}")
    if args.json:
        from landscape.store import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
