"""What training, the grid, the paths and every analysis minimise and score: the objective.

An objective maps a model's outputs and a batch's targets to per-sample losses and per-sample
correct flags (:meth:`Classification.per_sample`), and to the scalar training loss
(:meth:`Classification.loss`). :func:`score` is the one loop that accumulates them over an
evaluation set — on the device, in fp64, read with one host sync — into a mean loss, its
standard error over samples and an accuracy, for one set of weights or for P sets evaluated by
one batched forward (leading dimension P on the outputs). Training, the grid engine, the paths
and the benchmarks all score through it, so a new objective (e.g. a causal LM's answer loss)
plugs in here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (model inputs, targets) on the device


@dataclass(frozen=True)
class PointResult:
    loss: float  # mean per-sample loss
    accuracy: float
    loss_se: float  # standard error of the mean per-sample loss
    samples: torch.Tensor | None = None  # the per-sample losses (fp64, batch order), when asked for


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of mean(a − b) for per-sample losses a, b on the same samples (paired: the
    samples' shared difficulty cancels, unlike combining the two standard errors)."""
    d = (a - b).double()
    return float(d.std(unbiased=True) / d.numel() ** 0.5) if d.numel() > 1 else 0.0


@dataclass(frozen=True)
class Classification:
    """Cross-entropy of class logits against integer labels; correct = arg-max equals the label."""

    name: str = "classification"

    def loss(self, outputs: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch (``"mean"``; ``"sum"`` for micro-batches of an accumulated step)."""
        return F.cross_entropy(outputs.float(), target, reduction=reduction)

    def per_sample(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses, correct), each of shape ``outputs.shape[:-1]``; outputs may lead with a point dimension."""
        logits = outputs.float()
        targets = target.expand(logits.shape[:-1])
        losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
        return losses.view(targets.shape), logits.argmax(-1) == targets


OBJECTIVES = {"classification": Classification()}


def objective_for(dataset) -> Classification:
    """The objective a dataset is scored with (every dataset today is a classification task)."""
    return OBJECTIVES[getattr(dataset, "objective", "classification")]


def _result(total: float, sq: float, right: float, n: int) -> PointResult:
    mean = total / n
    var = max(sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return PointResult(mean, right / n, (var / n) ** 0.5)


@torch.no_grad()
def score(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[Batch],
    n: int,
    objective: Classification = OBJECTIVES["classification"],
    points: int | None = None,
    bf16: bool = False,
    keep_samples: bool = False,
) -> list[PointResult]:
    """Mean loss, accuracy and standard error over ``batches`` (``n`` samples in all).

    ``forward(inputs)`` gives the outputs of one set of weights, or of ``points`` sets stacked on a
    leading dimension. ``bf16``: the forward runs under bf16 autocast; losses are reduced from fp32
    outputs in fp64. Returns one result per point (a list of one when ``points`` is None);
    ``keep_samples`` (one point only) also returns the per-sample losses, for paired comparisons.
    """
    shape = () if points is None else (points,)
    totals, kept = None, []
    for inputs, target in batches:
        if totals is None:
            totals = [torch.zeros(shape, dtype=torch.float64, device=target.device) for _ in range(3)]
        with torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = forward(inputs)
        losses, correct = objective.per_sample(outputs, target)
        losses = losses.double()
        if keep_samples:
            kept.append(losses)
        totals[0] += losses.sum(-1)
        totals[1] += (losses * losses).sum(-1)
        totals[2] += correct.sum(-1)
    if totals is None:
        raise ValueError("score() needs at least one batch")
    values = torch.stack(totals).reshape(3, -1).tolist()  # one host sync
    results = [_result(*column, n) for column in zip(*values, strict=True)]
    if keep_samples:
        results[0] = dataclasses.replace(results[0], samples=torch.cat(kept, -1).cpu())
    return results


__all__ = ["OBJECTIVES", "Batch", "Classification", "PointResult", "objective_for", "paired_se", "score"]
