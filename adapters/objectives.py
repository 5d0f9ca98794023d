"""What training, the grid, the paths and every analysis minimise and score: the objective.

An objective maps a model's outputs and a batch's targets to per-sample losses and per-sample
correct flags (:meth:`Classification.per_sample`), and to the scalar training loss
(:meth:`Classification.loss`). :func:`score` is the one loop that accumulates them over an
evaluation set — on the device, in fp64, read with one host sync — into a mean loss, its
standard error over samples and an accuracy, for one set of weights or for P sets evaluated by
one batched forward (leading dimension P on the outputs). Training, the grid engine, the paths
and the benchmarks all score through it, so every analysis works for every objective:

- :class:`Classification`: cross-entropy of class logits, accuracy = arg-max;
- :class:`AnswerLoss`: a causal LM's answer loss (the RandLoRA paper's commonsense setup): the
  model scores C candidate responses per sample (:class:`adapters.models.lm_scoring.CausalLMScorer`:
  outputs ``(..., B, C, 2)`` = summed next-token cross-entropy over each candidate's answer
  tokens and their count); the loss is the gold response's mean over its answer tokens (prompt
  masked), per sample, then averaged over samples (so ``loss_se`` stays a per-sample standard
  error); correct = the gold candidate has the highest likelihood among the task's fixed answers.

``training_view`` gives what a training step needs from a batch (the gold response alone for
:class:`AnswerLoss`, so training costs one sequence per sample, not C).
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

    def training_view(self, inputs: dict[str, torch.Tensor], target: torch.Tensor):
        """What a training step feeds the model and the loss: the whole batch."""
        return inputs, target


@dataclass(frozen=True)
class AnswerLoss(Classification):
    """A causal LM's answer loss over candidate responses (module docstring).

    ``outputs[..., b, c, 0]``: the summed cross-entropy of candidate c's answer tokens, ``[..., 1]``: their
    count (0 marks a padding candidate of a task with fewer answers); ``target[b]``: the gold candidate.
    """

    name: str = "answer"

    def per_sample(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll, count = outputs[..., 0].double(), outputs[..., 1].double()  # (..., B, C)
        gold = target.expand(nll.shape[:-1]).unsqueeze(-1)
        losses = (nll.gather(-1, gold) / count.gather(-1, gold).clamp_min(1.0)).squeeze(-1)
        # likelihood of a candidate = exp(-summed cross-entropy); padding candidates can never win
        choice = nll.masked_fill(count == 0, float("inf")).argmin(-1)
        return losses, choice == gold.squeeze(-1)

    def loss(self, outputs: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        nll, count = outputs[..., 0], outputs[..., 1]
        gold = target.unsqueeze(-1)
        losses = (nll.gather(-1, gold) / count.gather(-1, gold).clamp_min(1.0)).squeeze(-1)
        return losses.mean() if reduction == "mean" else losses.sum()

    def training_view(self, inputs: dict[str, torch.Tensor], target: torch.Tensor):
        """The gold response of each sample alone, ``(B, 1, T)``, and target 0."""
        index = target.view(-1, 1, 1)
        picked = {k: v.gather(1, index.expand(-1, 1, v.shape[-1])) for k, v in inputs.items()}
        return picked, torch.zeros_like(target)


OBJECTIVES = {"classification": Classification(), "answer": AnswerLoss()}


def objective_for(dataset) -> Classification:
    """The objective a dataset is scored with: its ``objective`` attribute (default classification)."""
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
    ``keep_samples`` also returns each point's per-sample losses (batch order), for paired comparisons.
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
        samples = torch.cat(kept, -1).cpu().reshape(len(results), -1)
        results = [dataclasses.replace(r, samples=s) for r, s in zip(results, samples, strict=True)]
    return results


__all__ = ["OBJECTIVES", "AnswerLoss", "Batch", "Classification", "PointResult", "objective_for", "paired_se", "score"]
