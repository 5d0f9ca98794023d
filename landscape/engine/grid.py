"""Evaluating the loss over a plane of weights.

The evaluation set is encoded once, cut into batches once (sorted by length, so text
padding costs almost nothing) and kept on the device. The model's plane parameters are
written in place from the chart for each point, ``W = origin + x·U + y·V`` — never
accumulated step to step (no drift), never through ``load_state_dict``. Loss sums
accumulate on the device in fp64 and are read once per point.

Several points per forward (``points_per_forward`` = P > 1): the P points' plane parameters
are stacked, ``(P, *shape)``, written in place from the chart with the same arithmetic as
:meth:`PlaneEvaluator.set_point`, and the model runs once per batch under
``torch.func.vmap(functional_call)`` over the point dimension — only the plane parameters are
batched; the other parameters, the buffers and the input batch are shared, unbatched. Per-point
fp64 loss sums, squared sums and correct counts accumulate on the device, read once per group.
Every group has exactly P points (the last one is padded with copies of its last point, whose
results are dropped), so each point is computed by kernels of the same shapes whatever its
companions: a grid resumed or sharded over ranks gives the same numbers as an uninterrupted one.
A batched point agrees with the single-point path to fp32 rounding (not bit for bit: batched
matmuls reduce in another order). A model that cannot be vmapped falls back to P = 1 with a
warning; an out-of-memory group halves P.

``points_per_forward="auto"`` (:func:`auto_points_per_forward`): 1 on CPU, where it was measured
not to pay: one point's batch of 128 already runs the matmuls at full speed, the batched matmuls
are no faster per FLOP, and vmap adds copies and unfused bias adds (MiniLM, 256 samples, one
thread: 0.88× / 0.80× / 0.76× the per-point speed at P = 2 / 4 / 8; EfficientNet-Lite0, whose
convolutions with batched weights become grouped convolutions: 0.34× / 0.27× at P = 2 / 4). On
CUDA, P fills the device: ``P = min(16, max(1, 1024 // n))`` with n the median number of
samples per evaluation batch (P = 8 for the main job's batches of 128), capped so that the P
stacked copies of the plane parameters take at most 1/8 of the device's memory.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adapters import heap
from adapters.io import digest
from adapters.models.base import Encoded
from adapters.objectives import OBJECTIVES, Classification, PointResult, score
from adapters.progress import progress_bar
from landscape.engine.plane import Chart


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
        """Batches in length order. Causal-LM sets (candidates per sample): at most ``tokens_per_batch`` padded
        candidate tokens per batch (:meth:`Encoded.token_batches`; default
        :func:`adapters.models.lm_scoring.default_eval_tokens` of the device), whatever ``batch_size``. Other
        text: up to ``tokens_per_batch`` padded tokens (default 16 × batch_size), so short sequences travel in
        larger batches and padding stays small. Images: ``batch_size``."""
        order = data.length_order()
        if data.lengths is None:
            parts = list(order.split(batch_size))
        elif data.has_candidates:
            from adapters.models.lm_scoring import default_eval_tokens

            parts = data.token_batches(tokens_per_batch or default_eval_tokens(device))
        else:
            parts = data.token_batches(tokens_per_batch or 16 * batch_size)
        batches = []
        for index in parts:
            inputs = {k: v.to(device) for k, v in data.batch(index).items()}
            batches.append((inputs, labels[index].to(device)))
        return cls(batches, len(order))


def eval_fingerprint(eval_set: EvalSet) -> str:
    """Digest of the evaluation batches (inputs and targets, in order): the key of every stage that reads them."""
    return digest((f"{i}.{k}", t) for i, (inputs, target) in enumerate(eval_set.batches)
                  for k, t in [*sorted(inputs.items()), ("target", target)])  # fmt: skip


TARGET_SAMPLES_PER_FORWARD = 1024  # auto P on CUDA: P × (samples per batch) ≈ this
MAX_POINTS_PER_FORWARD = 16


def auto_points_per_forward(device: torch.device | str, eval_set: EvalSet, plane_bytes: int) -> int:
    """Points per forward for ``"auto"``: 1 on CPU, else enough points to fill the device (module docstring)."""
    device = torch.device(device)
    if device.type != "cuda" or not eval_set.batches:
        return 1
    rows = sorted(len(target) for _, target in eval_set.batches)
    p = min(MAX_POINTS_PER_FORWARD, max(1, TARGET_SAMPLES_PER_FORWARD // rows[len(rows) // 2]))
    memory = torch.cuda.get_device_properties(device).total_memory
    return max(1, min(p, memory // 8 // max(plane_bytes, 1)))


class PlaneEvaluator:
    """Sets a model's plane parameters to chart points and evaluates the loss there.

    ``points_per_forward``: grid points evaluated by one vmapped forward (module docstring);
    1 (default) is the plain per-point path, ``"auto"`` picks by device.
    """

    def __init__(
        self,
        model: nn.Module,
        chart: Chart,
        eval_set: EvalSet,
        device: torch.device | str,
        dtype: str = "float32",
        points_per_forward: int | str = 1,
        objective: Classification = OBJECTIVES["classification"],
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
        self.objective = objective
        params = dict(self.model.named_parameters())
        self.names = list(self.chart.origin)
        self.params = [params[n] for n in self.names]
        self.origin = [self.chart.origin[n] for n in self.names]
        self.u = [self.chart.u[n] for n in self.names]
        self.v = [self.chart.v[n] for n in self.names]
        if points_per_forward == "auto":
            plane_bytes = sum(p.numel() * p.element_size() for p in self.params)
            points_per_forward = auto_points_per_forward(device, eval_set, plane_bytes)
            if not getattr(model, "batch_grid_points", True):  # the model asks for one point per forward
                points_per_forward = 1
        if not isinstance(points_per_forward, int) or points_per_forward < 1:
            raise ValueError(f"points_per_forward must be a positive integer or 'auto', not {points_per_forward!r}")
        self.points_per_forward = points_per_forward if self.names else 1  # nothing on the plane: nothing to batch
        self.note: str | None = None  # why batching was reduced or turned off, if it was
        self._stacked: list[torch.Tensor] = []  # (P, *shape) plane parameters, allocated on first use

    @torch.no_grad()
    def set_point(self, x: float, y: float) -> None:
        # Same arithmetic order at every point, so a vertex evaluated inside or outside a grid
        # gets bit-identical weights.
        for p, o, u, v in zip(self.params, self.origin, self.u, self.v, strict=True):
            _affine(o, u, v, x, y, out=p)

    @torch.no_grad()
    def evaluate(self, x: float, y: float, keep_samples: bool = False) -> PointResult:
        self.set_point(x, y)
        forward = lambda inputs: self.model(**inputs)  # noqa: E731
        batches, n = self.eval_set.batches, self.eval_set.n
        return score(forward, batches, n, self.objective, bf16=self.autocast, keep_samples=keep_samples)[0]

    def evaluate_iter(self, points: Iterable[tuple[float, float]], keep_samples: bool = False) -> Iterator[PointResult]:
        """Results at ``points`` in order, yielded as they complete: one by one with
        :meth:`evaluate` when ``points_per_forward`` is 1, else a group of P points at a time.
        ``keep_samples``: each result also holds its per-sample losses. On the CPU the memory a point frees is kept
        for the next (:mod:`adapters.heap`: the main job's 11 x 11 grid faulted 22.4 M pages in afresh without it,
        0.37 M with it, 211 against 186 s)."""
        with heap.keeping(self.model, self.device_type):
            yield from self._results(points, keep_samples)

    def _results(self, points: Iterable[tuple[float, float]], keep_samples: bool) -> Iterator[PointResult]:
        points = [(float(x), float(y)) for x, y in points]
        k = 0
        while k < len(points):
            p = self.points_per_forward
            if p == 1:
                yield self.evaluate(*points[k], keep_samples=True) if keep_samples else self.evaluate(*points[k])
                k += 1
                continue
            group = points[k : k + p]
            try:
                results = self._evaluate_group(group + [group[-1]] * (p - len(group)), keep_samples)
            except torch.OutOfMemoryError:
                self._stacked = []
                torch.cuda.empty_cache()
                self.points_per_forward = p // 2
                self.note = f"out of memory with {p} points per forward: now {p // 2}"
                warnings.warn(f"grid engine: {self.note}", RuntimeWarning, stacklevel=2)
                continue
            except Exception as e:  # an op without a vmap rule, data-dependent control flow, ...
                self._stacked = []
                self.points_per_forward = 1
                self.note = f"this model cannot be vmapped over grid points ({type(e).__name__}: {e}); using 1 point"
                warnings.warn(f"grid engine: {self.note}", RuntimeWarning, stacklevel=2)
                continue
            yield from results[: len(group)]
            k += len(group)

    def evaluate_many(self, points: Iterable[tuple[float, float]]) -> list[PointResult]:
        return list(self.evaluate_iter(points))

    @torch.no_grad()
    def _evaluate_group(self, points: list[tuple[float, float]], keep_samples: bool = False) -> list[PointResult]:
        """One vmapped forward per batch for all ``points`` at once; one host sync."""
        from torch.func import functional_call, vmap

        p = len(points)
        if not self._stacked or self._stacked[0].shape[0] != p:
            self._stacked = [torch.empty((p, *o.shape), dtype=o.dtype, device=o.device) for o in self.origin]
        for w, o, u, v in zip(self._stacked, self.origin, self.u, self.v, strict=True):
            for k, (x, y) in enumerate(points):  # set_point's arithmetic: bit-identical weights
                _affine(o, u, v, x, y, out=w[k])
        stacked = dict(zip(self.names, self._stacked, strict=True))

        def forward(params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.model, params, args=(), kwargs=inputs)

        batched = vmap(forward, in_dims=(0, None))  # plane parameters batched; the rest and the inputs shared
        with warnings.catch_warnings():
            # e.g. CPU attention has no batching rule and loops over the points: correct, no extra FLOPs
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return score(
                lambda inputs: batched(stacked, inputs), self.eval_set.batches, self.eval_set.n, self.objective,
                points=p, bf16=self.autocast, keep_samples=keep_samples,
            )  # fmt: skip


def _affine(o: torch.Tensor, u: torch.Tensor, v: torch.Tensor, x: float, y: float, out: torch.Tensor) -> None:
    """``out = o + x·U + y·V`` in that order. At y = 0 the V pass is left out: adding 0·V changes no value (only a
    −0 would become +0), and a line (the paths, ``random-line``) is all y = 0: one pass over the parameters less
    per point (the CIFAR smoke's 57 path points: a read and a write of ViT-B/32's 151 M weights each)."""
    torch.add(o, u, alpha=float(x), out=out)
    if y != 0.0:
        out.add_(v, alpha=float(y))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def run_grid(
    evaluator: PlaneEvaluator,
    xs: np.ndarray,
    ys: np.ndarray,
    store=None,
    progress: bool = True,
    points: Sequence[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate a grid, resuming from ``store`` and spreading points over torch.distributed ranks.

    Every rank reads every finished point from the store (so its own file keeps its earlier points
    when it rewrites it) and the ranks check they agree on what is left; rank r evaluates points
    r, r + K, r + 2K, … of the remaining ones (any K, also more ranks than points), checkpointing
    each into its own file; the results are gathered to every rank.
    ``points``: only these (i, j) are evaluated (a launcher's shard of the grid, ``store`` its own file);
    the result still holds every finished point.
    Each point is computed exactly as in a single process, so the grid is the same. With
    ``evaluator.points_per_forward`` = P > 1 each rank evaluates its points P at a time and
    checkpoints a group's points as the group completes.
    """
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    done = store.load() if store is not None else {}
    if dist:  # every rank read the same files before anyone writes: they agree, unless the files changed
        counts: list = [None] * world
        dist.all_gather_object(counts, sorted(done))
        if any(c != counts[0] for c in counts):
            raise RuntimeError("grid ranks read different finished points: is another run writing to the folder?")
    shape = (len(ys), len(xs))
    chosen = [(i, j) for i in range(shape[0]) for j in range(shape[1])] if points is None else points
    todo = [(int(i), int(j)) for i, j in chosen if (i, j) not in done]
    mine = todo[rank::world]
    computed: dict[tuple[int, int], tuple[float, float, float]] = {}
    start = time.perf_counter()
    bar = progress_bar(
        total=len(mine),
        desc=f"grid (rank {rank})" if dist else "grid",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    results = evaluator.evaluate_iter((xs[j], ys[i]) for i, j in mine)
    for (i, j), r in zip(mine, results, strict=True):
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
        points_computed = sum(len(part) for part in parts)  # by every rank, not only this one
    else:
        done.update(computed)
        points_computed = len(computed)
    if store is not None and rank == 0 and dist:
        store.mine.update(done)  # rank 0's file then holds the whole grid
        store.flush()
    out = {k: np.full(shape, np.nan) for k in ("loss", "accuracy", "loss_se")}
    for (i, j), (lo, acc, se) in done.items():
        out["loss"][i, j], out["accuracy"][i, j], out["loss_se"][i, j] = lo, acc, se
    out["points_computed"] = np.array(points_computed)
    out["seconds"] = np.array(seconds)
    return out
