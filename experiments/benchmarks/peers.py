"""The benchmarks' peers: the other ways of evaluating a loss over weight space that ours is measured against.

Every benchmark that compares our engine with another implementation takes that implementation
from here, so each peer is written once (the grid benchmark today; curvature against PyHessian
next). A peer is reproduced as its authors run it, including the costs that make it slower —
those costs are what a benchmark measures — but it scores with the project's one loss
definition (:data:`adapters.objectives.OBJECTIVES`), so any difference in the numbers is the
peer's evaluation order or precision, never another formula.

- **The RandLoRA paper's per-point loop** (:func:`paper_point`, :func:`paper_losses`). Per point:
  rebuild the whole state dict in Python as ``a·θ_R + b·θ_F + c·θ_L`` (every floating entry;
  a = 1 − x − y/2, b = y, c = x − y/2: the paper chart), ``model.load_state_dict``, a fresh
  ``DataLoader`` over the RAW samples whose collate function preprocesses every batch again
  (tokenises the strings / stacks and encodes the images), ``.item()`` per batch. The three state
  dicts live on the model's device (the cheaper choice for the loop).
- **loss-landscapes** (:func:`ll_wrappers`, :func:`ll_metric`, :func:`ll_losses`):
  ``loss_landscapes.planar_interpolation(model_start=RandLoRA, model_end_one=LoRA,
  model_end_two=FT, metric, steps=S)`` with a ``Metric`` that runs every evaluation batch it is
  given and sums the per-sample losses, ``.item()`` per batch like the package's own ``Loss``
  metric. :func:`plain_batches` gives it batches in dataset order, each padded to its longest
  sample — what tokenising each batch would give.

Mapping of the planes (:func:`ll_points`, :func:`paper_xy`). ``planar_interpolation`` walks
``θ = θ_R + α·(θ_L − θ_R) + β·(θ_F − θ_R)`` in place (``start.add_(dir)``, drift accumulates)
with α = i/S for column i = 0 … S−1 and a zig-zag in β: even columns are evaluated at
β = 1/S … S/S, odd columns at β = 0 … (S−1)/S (it adds the step before evaluating on the way
up, subtracts before evaluating on the way down). So its grid never reaches α = 1 (LoRA) and
misses RandLoRA itself (α = β = 0). The paper chart is
``θ = θ_R + x·(θ_L − θ_R) + y·(θ_F − (θ_R + θ_L)/2)``, i.e. α = x − y/2 = c and β = y = b, so
loss-landscapes' point (α, β) is the paper chart's (x, y) = (α + β/2, β).

Solutions are given as ΔW per solution (``deltas[s][name]``, CPU fp32, relative to ``model``'s
weights); :func:`solution_state_dicts` turns them into the full state dicts both peers load.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from adapters.models.base import Encoded
from adapters.objectives import OBJECTIVES, Classification

BATCH_SIZE = 128  # the paper's evaluation batch and the main job's
SOLUTIONS = ("randlora", "lora", "ft")  # loss-landscapes' start, end one, end two
Deltas = dict[str, dict[str, torch.Tensor]]


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def solution_state_dicts(model: nn.Module, deltas: Deltas, device: torch.device | str) -> Deltas:
    """Full state dicts (parameters and persistent buffers) of the solutions, on ``device``."""
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


# --------------------------------------------------------------------------- the paper's loop


class RawSamples(torch.utils.data.Dataset):
    def __init__(self, raw: list[str] | torch.Tensor, labels: torch.Tensor):
        self.raw, self.labels = raw, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.raw[i], self.labels[i]


class Collate:
    """Preprocesses a batch of raw samples (tokenise strings / encode images) with the model's encoder."""

    def __init__(self, encode: Callable[[Sequence | torch.Tensor], Encoded]):
        self.encode = encode

    def __call__(self, items):
        raw = [x for x, _ in items]
        inputs = torch.stack(raw) if isinstance(raw[0], torch.Tensor) else raw
        return self.encode(inputs).tensors, torch.stack([y for _, y in items])


def paper_state(states: Deltas, x: float, y: float) -> dict[str, torch.Tensor]:
    """The paper's rebuild of the whole state dict at paper-chart (x, y): a·θ_R + b·θ_F + c·θ_L."""
    a, b, c = 1 - x - y / 2, y, x - y / 2
    r, f, lo = states["randlora"], states["ft"], states["lora"]
    return {k: (a * r[k] + b * f[k] + c * lo[k]) if r[k].is_floating_point() else r[k] for k in r}


def paper_point(
    model: nn.Module,
    states: Deltas,
    raw: list[str] | torch.Tensor,
    labels: torch.Tensor,
    encode: Callable,
    device: torch.device,
    x: float,
    y: float,
    batch_size: int = BATCH_SIZE,
    objective: Classification = OBJECTIVES["classification"],
) -> float:
    """Mean loss at (x, y) the paper's way: rebuild, ``load_state_dict``, re-preprocess, ``.item()`` per batch."""
    model.load_state_dict(paper_state(states, x, y))
    model.eval()
    loader = torch.utils.data.DataLoader(
        RawSamples(raw, labels), batch_size=batch_size, shuffle=False, collate_fn=Collate(encode)
    )
    total = 0.0
    with torch.no_grad():
        for inputs, target in loader:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            total += objective.loss(model(**inputs), target.to(device), reduction="sum").item()
    return total / len(labels)


def paper_losses(
    model: nn.Module,
    deltas: Deltas,
    raw: list[str] | torch.Tensor,
    labels: torch.Tensor,
    encode: Callable,
    device: torch.device,
    xy: np.ndarray,
    batch_size: int = BATCH_SIZE,
) -> tuple[np.ndarray, float]:
    """Losses at the points ``xy`` (..., 2) with the paper's loop; seconds for all points (after a warm-up)."""
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


# --------------------------------------------------------------------------- loss-landscapes


def plain_batches(data: Encoded, labels: torch.Tensor, batch_size: int, device: torch.device | str) -> list:
    """Batches in dataset order, each padded to its longest sample: what per-batch tokenising gives."""
    out = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        out.append(({k: v.to(device) for k, v in data.batch(sl).items()}, labels[sl].to(device)))
    return out


def ll_metric(batches: list, n: int, objective: Classification = OBJECTIVES["classification"]):
    """A ``loss_landscapes`` Metric: the mean loss over every batch (sum of per-sample losses / n)."""
    from loss_landscapes.metrics import Metric

    class EvalSetLoss(Metric):
        def __call__(self, model_wrapper) -> float:
            total = 0.0
            for inputs, target in batches:
                total += objective.loss(model_wrapper.forward(inputs), target, reduction="sum").item()
            return total / n

    return EvalSetLoss()


def ll_wrappers(model: nn.Module, deltas: Deltas, device: torch.device) -> dict:
    """One ``GeneralModelWrapper`` per solution (its own model copy, weights loaded, eval mode)."""
    from loss_landscapes import GeneralModelWrapper

    states = solution_state_dicts(model, deltas, device)
    wrappers = {}
    for s in SOLUTIONS:
        net = copy.deepcopy(model).to(device)
        net.load_state_dict(states[s])
        net.eval()
        wrappers[s] = GeneralModelWrapper(net, [net], lambda m, x: m(**x)).requires_grad_(False)
    return wrappers


def ll_planar(wrappers: dict, metric, steps: int) -> np.ndarray:
    """``planar_interpolation(RandLoRA, LoRA, FT)`` with ``metric``: (steps, steps) values at :func:`ll_points`."""
    from loss_landscapes import planar_interpolation

    values = planar_interpolation(*(wrappers[s] for s in SOLUTIONS), metric, steps=steps)
    return np.asarray(values, dtype=np.float64)


def ll_losses(
    model: nn.Module, deltas: Deltas, batches: list, n: int, device: torch.device, steps: int
) -> tuple[np.ndarray, float]:
    """loss-landscapes' (steps, steps) mean losses at :func:`ll_points`; seconds for all points."""
    w = ll_wrappers(model, deltas, device)
    metric = ll_metric(batches, n)
    metric(w["randlora"])  # warm-up (at RandLoRA, before any step)
    sync(device)
    start = time.perf_counter()
    values = ll_planar(w, metric, steps)
    sync(device)
    return values, time.perf_counter() - start


__all__ = [
    "BATCH_SIZE",
    "Collate",
    "RawSamples",
    "SOLUTIONS",
    "ll_losses",
    "ll_metric",
    "ll_planar",
    "ll_points",
    "ll_wrappers",
    "paper_losses",
    "paper_point",
    "paper_state",
    "paper_xy",
    "plain_batches",
    "solution_state_dicts",
    "sync",
]
