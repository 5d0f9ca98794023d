"""Evaluating the loss over a plane of weights.

The evaluation set is encoded once, cut into batches once (sorted by length, so text
padding costs almost nothing) and kept on the device. The model's plane parameters are
written in place from the chart for each point, ``W = origin + x·U + y·V`` — never
accumulated step to step (no drift), never through ``load_state_dict``. Loss sums
accumulate on the device in fp64 and are read once per point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapters.models.base import Encoded
from landscape.plane import Chart


@dataclass
class EvalSet:
    """Device-resident evaluation batches in a fixed order."""

    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]
    n: int

    @classmethod
    def prepare(
        cls,
        data: Encoded,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        tokens_per_batch: int | None = None,
    ) -> EvalSet:
        """Batches in length order; text batches hold up to ``tokens_per_batch`` padded tokens
        (default 16 × batch_size), so short sequences travel in larger batches and padding stays small."""
        order = data.length_order()
        if data.lengths is None:
            cuts = list(range(0, len(order), batch_size)) + [len(order)]
        else:
            budget = tokens_per_batch or 16 * batch_size
            lengths = data.lengths[order].tolist()
            cuts, start = [0], 0
            for k, length in enumerate(lengths):
                # sorted ascending: a batch's padded size is (count) × (its last sample's length)
                if k > start and (k - start + 1) * length > budget:
                    cuts.append(k)
                    start = k
            cuts.append(len(order))
        batches = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            index = order[a:b]
            inputs = {k: v.to(device) for k, v in data.batch(index).items()}
            batches.append((inputs, labels[index].to(device)))
        return cls(batches, len(order))


@dataclass
class PointResult:
    loss: float
    accuracy: float
    loss_se: float  # standard error of the mean per-sample loss


class PlaneEvaluator:
    """Sets a model's plane parameters to chart points and evaluates the loss there."""

    def __init__(
        self, model: nn.Module, chart: Chart, eval_set: EvalSet, device: torch.device | str, dtype: str = "float32"
    ):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, not {dtype}")
        # bf16 autocast for the forward only; weights stay fp32 (so W = W0 + x·U + y·V is exact to
        # fp32) and the loss is reduced in fp32/fp64 from fp32 logits.
        self.autocast = dtype == "bfloat16"
        self.device_type = torch.device(device).type
        self.model = model.to(device).eval()
        self.chart = chart.to(device)
        self.eval_set = eval_set
        params = dict(self.model.named_parameters())
        self.names = list(self.chart.origin)
        self.params = [params[n] for n in self.names]
        self.origin = [self.chart.origin[n] for n in self.names]
        self.u = [self.chart.u[n] for n in self.names]
        self.v = [self.chart.v[n] for n in self.names]

    @torch.no_grad()
    def set_point(self, x: float, y: float) -> None:
        # Same arithmetic order at every point, so a vertex evaluated inside or outside a grid
        # gets bit-identical weights.
        for p, o, u, v in zip(self.params, self.origin, self.u, self.v, strict=True):
            torch.add(o, u, alpha=float(x), out=p).add_(v, alpha=float(y))

    @torch.no_grad()
    def evaluate(self, x: float, y: float) -> PointResult:
        self.set_point(x, y)
        device = self.origin[0].device if self.origin else "cpu"
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        loss_sq = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for inputs, target in self.eval_set.batches:
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(**inputs)
            logits = logits.float()
            losses = F.cross_entropy(logits, target, reduction="none").double()
            loss_sum += losses.sum()
            loss_sq += (losses * losses).sum()
            correct += (logits.argmax(-1) == target).sum()
        n = self.eval_set.n
        total, sq, right = torch.stack([loss_sum, loss_sq, correct.double()]).tolist()  # one host sync
        mean = total / n
        var = max(sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
        return PointResult(mean, right / n, (var / n) ** 0.5)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def run_grid(
    evaluator: PlaneEvaluator, xs: np.ndarray, ys: np.ndarray, store=None, progress: bool = True
) -> dict[str, np.ndarray]:
    """Evaluate a grid, resuming from ``store`` and spreading points over torch.distributed ranks.

    Rank 0 reads the finished points and broadcasts them, so every rank agrees on what is left;
    rank r evaluates points r, r + K, r + 2K, … of the remaining ones (any K, also more ranks
    than points), checkpointing each into its own file; the results are gathered to every rank.
    Each point is computed exactly as in a single process, so the grid is the same.
    """
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    done = store.load() if (store is not None and rank == 0) else {}
    if dist:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    shape = (len(ys), len(xs))
    todo = [(i, j) for i in range(shape[0]) for j in range(shape[1]) if (i, j) not in done]
    mine = todo[rank::world]
    computed: dict[tuple[int, int], tuple[float, float, float]] = {}
    start = time.perf_counter()
    bar = tqdm(
        total=len(mine),
        desc=f"grid (rank {rank})" if dist else "grid",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    for i, j in mine:
        r = evaluator.evaluate(xs[j], ys[i])
        computed[(i, j)] = (r.loss, r.accuracy, r.loss_se)
        if store is not None:
            store.add(i, j, computed[(i, j)])
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    if dist:
        parts: list = [None] * world
        dist.all_gather_object(parts, computed)
        for part in parts:
            done.update(part)
    else:
        done.update(computed)
    if store is not None and rank == 0 and dist:
        store.mine.update(done)  # rank 0's file then holds the whole grid
        store.flush()
    out = {k: np.full(shape, np.nan) for k in ("loss", "accuracy", "loss_se")}
    for (i, j), (lo, acc, se) in done.items():
        out["loss"][i, j], out["accuracy"][i, j], out["loss_se"][i, j] = lo, acc, se
    out["points_computed"] = np.array(len(computed))
    out["seconds"] = np.array(seconds)
    return out
