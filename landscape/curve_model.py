"""The trained curve itself: the control points' weights (Bézier, polygonal chain), :class:`Curve` (θ(t) between
two fixed endpoints through trainable bends), :class:`CurveModel` (the model run at θ(t), built per module in
hooks) and :func:`train_curve`. :mod:`landscape.curves` evaluates, writes and drives them (its module docstring
says what the curve is and what it holds); it re-exports every name here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from adapters.errors import UserError
from adapters.models.base import Encoded
from adapters.objectives import OBJECTIVES, Classification
from adapters.quant import is_packed
from adapters.train import TrainConfig, train
from landscape.curves_cli import KINDS, check_options


def bezier_weights(t: float, bends: int) -> list[float]:
    """Bernstein weights of the ``bends + 2`` control points at ``t``: ``C(n, k)·t^k·(1 − t)^(n − k)``,
    n = bends + 1."""
    n = bends + 1
    return [math.comb(n, k) * t**k * (1.0 - t) ** (n - k) for k in range(n + 1)]


def polychain_weights(t: float, bends: int) -> list[float]:
    """Weights of the ``bends + 2`` control points of the polygonal chain at ``t``:
    ``max(0, 1 − |(bends + 1)·t − k|)``."""
    n = bends + 1
    return [max(0.0, 1.0 - abs(t * n - k)) for k in range(n + 1)]


def curve_weights(kind: str, t: float, bends: int) -> list[float]:
    """The control points' weights of a curve of ``kind`` at ``t``."""
    if kind == "bezier":
        return bezier_weights(float(t), bends)
    if kind == "polychain":
        return polychain_weights(float(t), bends)
    raise UserError(f"unknown curve kind '{kind}': choose one of {', '.join(KINDS)}")


EndValue = torch.Tensor | Callable[[], torch.Tensor] | None


class Curve(nn.Module):
    """θ(t) between fixed endpoints θ_A, θ_B through ``bends`` trainable control points (module docstring).

    The endpoints map each parameter name (in ``theta_a``'s order) to a tensor, to ``None`` (zero: an offset the
    solution does not change) or to a lazy ΔW (:class:`adapters.deltas.Delta`). An endpoint whose values are all
    factored ``Delta`` (an adapter's update) stays lazy: each parameter's dense ΔW is rebuilt from the factors when
    a point uses it (as the factored plane does), never held. Any other endpoint is one flat buffer
    (``theta_a`` / ``theta_b``) of dtype ``end_dtype``, filled one parameter at a time: fp32, or a half-precision
    base's own dtype for an offset curve (:func:`landscape.curves.pair_curve`: the forward runs θ(t) rounded to
    that dtype, and the factored plane stores a dense ΔW in it too); its terms are summed in fp32.

    The bends are one fp32 tensor of shape (bends, total size) (:attr:`bends`), trained through one leaf
    parameter per bend and parameter that is a view of it (``bend<k>_<i>``): each gets its own gradient, so
    the backward never concatenates the pieces' gradients into a bends-sized tensor and AdamW's temporaries are
    one parameter's size, not the bends'.
    """

    def __init__(
        self,
        theta_a: Mapping[str, EndValue],
        theta_b: Mapping[str, EndValue],
        bends: int = 3,
        kind: str = "bezier",
        offset: bool = False,
        end_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_options(bends, kind)
        if set(theta_a) != set(theta_b):
            raise ValueError("the two endpoints must hold the same parameters")
        # offset: the endpoints and bends are offsets from the base weights W0 (θ(t) = W0 + offset(t): the same
        # curve, as the weights w_k(t) sum to 1), applied beside a packed 4-bit layer, never written into it
        self.kind, self.num_bends, self.offset, self.end_dtype = kind, bends, offset, end_dtype
        self.names = list(theta_a)
        known = [next(v for v in (theta_a[n], theta_b[n]) if v is not None) for n in self.names]
        self.shapes = [tuple(v.shape) for v in known]  # a tensor's, or a lazy ΔW's (Delta.shape)
        self.sizes = [math.prod(s) for s in self.shapes]
        device = next((v.device for v in known if isinstance(v, torch.Tensor)), None)
        self.lazy: dict[str, dict[str, Callable[[], torch.Tensor]]] = {}
        for key, values in (("a", theta_a), ("b", theta_b)):
            if all(getattr(v, "kind", None) == "factored" for v in values.values() if v is not None):
                self.lazy[key] = {n: v for n, v in values.items() if v is not None}
            else:
                self.register_buffer(f"theta_{key}", self._flat(values, device))
        self._bends = torch.empty(bends, sum(self.sizes), device=device)
        with torch.no_grad():
            ends = [self.end_parts(key) for key in ("a", "b")]
            for k in range(bends):  # on the straight line: bend k at (1 − α)·θ_A + α·θ_B, α = k / (bends + 1)
                x = (k + 1) / (bends + 1)
                for part, a, b in zip(self._bends[k].split(self.sizes), *ends, strict=True):
                    part.copy_(_sum([(1.0 - x, a), (x, b)], part.numel(), part.device).reshape(-1))
        self._view_bends()

    def _flat(self, values: Mapping[str, EndValue], device) -> torch.Tensor:
        """One endpoint as a flat vector of :attr:`end_dtype`, filled one parameter at a time (a lazy value computed
        when reached and dropped before the next): building it holds the vector and one parameter's ΔW."""
        flat = torch.zeros(sum(self.sizes), dtype=self.end_dtype, device=device)
        for n, part in zip(self.names, flat.split(self.sizes), strict=True):
            value = values[n]
            if value is not None:
                part.copy_((value if isinstance(value, torch.Tensor) else value()).detach().reshape(-1))
        return flat

    def _view_bends(self) -> None:
        """One leaf parameter per (bend, parameter), each a view of :attr:`bends` (class docstring)."""
        for k in range(self.num_bends):
            for i, (part, shape) in enumerate(zip(self._bends[k].split(self.sizes), self.shapes, strict=True)):
                self._parameters[f"bend{k + 1}_{i}"] = nn.Parameter(part.view(shape))

    def _apply(self, fn, recurse: bool = True):
        # nn.Module would move each piece on its own, off the shared tensor: move the tensor once, view it again
        pieces = {n: self._parameters.pop(n) for n in list(self._parameters) if n.startswith("bend")}
        super()._apply(fn, recurse)
        moved = fn(self._bends)
        if moved is self._bends:
            self._parameters.update(pieces)
        else:
            self._bends = moved
            self._view_bends()
        return self

    @property
    def bends(self) -> torch.Tensor:
        """The bends, shape (bends, total size): the trained parameters' storage (written in place: a write here
        moves them)."""
        return self._bends

    def bend_pieces(self, k: int) -> list[torch.Tensor]:
        """The k-th bend's leaf parameters (k from 0), one per parameter name."""
        return [self._parameters[f"bend{k + 1}_{i}"] for i in range(len(self.names))]

    def bends_grad(self) -> torch.Tensor | None:
        """The bends' gradient in :attr:`bends`' layout (None before any backward)."""
        params = [p for k in range(self.num_bends) for p in self.bend_pieces(k)]
        if all(p.grad is None for p in params):
            return None
        flat = [torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.reshape(-1) for p in params]
        return torch.cat(flat).view_as(self._bends)

    def end_parts(self, key: str) -> list[torch.Tensor | Callable[[], torch.Tensor] | None]:
        """Endpoint ``key`` ("a" or "b") per parameter: a view of its flat buffer, a lazy ΔW, or None (zero)."""
        if key in self.lazy:
            return [self.lazy[key].get(n) for n in self.names]
        return list(self.split(getattr(self, f"theta_{key}")).values())

    def controls(self) -> list[list]:
        """The control points per parameter: θ_A's parts, each bend's leaf parameters, θ_B's parts."""
        return [self.end_parts("a"), *(self.bend_pieces(k) for k in range(self.num_bends)), self.end_parts("b")]

    def term(self, controls: list[list], weights: list[float], i: int) -> torch.Tensor:
        """θ(t) of parameter ``i`` from :meth:`controls` and the control weights at t (:func:`curve_weights`)."""
        terms = [(w, c[i]) for w, c in zip(weights, controls, strict=True) if w != 0.0]
        return _sum(terms, self.sizes[i], self._bends.device).view(self.shapes[i])

    def pieces(self, t: float) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, θ(t) of that parameter)``, differentiable in the bends, one parameter at a time. Control
        points of weight 0 are skipped, so θ(0) is θ_A and θ(1) is θ_B exactly; a lazy endpoint's ΔW is built for
        its term and dropped."""
        weights, controls = curve_weights(self.kind, t, self.num_bends), self.controls()
        for i, name in enumerate(self.names):
            yield name, self.term(controls, weights, i)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as {parameter name: view of its shape}."""
        parts = flat.split(self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def weights_at(self, t: float) -> dict[str, torch.Tensor]:
        """{parameter name: θ(t)}, differentiable in the bends."""
        return dict(self.pieces(t))

    def bend_weights(self) -> dict[str, torch.Tensor]:
        """{``bend<k>.<name>``: the k-th bend's weights (k from 1)}, contiguous CPU copies, for saving."""
        return {
            f"bend{k + 1}.{n}": w.detach().cpu().contiguous().clone()
            for k, bend in enumerate(self.bends)
            for n, w in self.split(bend).items()
        }


def _sum(terms: list[tuple[float, torch.Tensor | Callable[[], torch.Tensor] | None]], size: int,
         device: torch.device) -> torch.Tensor:  # fmt: skip
    """Σ w·c over the terms (None: zero), in fp32 (a half-precision endpoint is widened, exactly), fp32 zeros when
    every term is zero. Tensors are summed in order, the first as ``c·w`` and the rest by ``torch.add(out, c,
    alpha=w)``: the same arithmetic, in the same order, as a flat θ(t) sliced. A lazy ΔW that adds itself from
    its factors (:meth:`adapters.solutions.deltas.Delta.add_to`: one ``addmm`` for peft's LoRA and RandLoRA, as
    the factored plane builds it) goes into one constant buffer first, added last; any other callable is
    computed now (a foreign adapter's ``Delta()`` merges its layer in fp64: several times the layer's bytes)."""
    out, built = None, None
    for w, c in terms:
        if c is None:
            continue
        if not isinstance(c, torch.Tensor) and hasattr(c, "add_to"):
            built = torch.zeros(c.shape, device=device) if built is None else built
            c.add_to(built, w)  # no graph: a constant of the bends
            continue
        c = (c if isinstance(c, torch.Tensor) else c()).float()  # the fp32 bends and ΔW: the same tensor
        out = c * w if out is None else torch.add(out, c.view_as(out), alpha=w)
    if built is not None:
        out = built.view(-1) if out is None else out + built.view_as(out)
    return torch.zeros(size, device=device) if out is None else out


class CurveModel(nn.Module):
    """What :func:`adapters.train.train` trains: the model run with the curve's weights at a random t.

    One t ~ U(0, 1) per optimizer step (drawn at the first of its ``grad_accum`` micro-batches from the
    global generator, whose state training checkpoints and restores). The model's own parameters are frozen; on
    the curve's parameters each module that uses one builds its ``θ(t)`` (cast to the parameter's dtype; an offset
    curve: ``W0 + offset(t)``) in a forward pre-hook, differentiably in the bends, swaps it in and swaps W0 back
    after its forward (:func:`landscape.engine.factored.holders`: tied weights in every holder, a parameter its
    owner never runs in the ancestor that does, found by one no-grad forward of the first batch). So no module
    holds θ(t) beyond its own forward but for autograd, and under gradient checkpointing (``set_grad_checkpointing``,
    the seed's recipe) not even that: a checkpointed layer's weights are built again in its backward. A packed
    4-bit weight is never written: its module's output gets ``x·offset(t)ᵀ`` added beside it.
    """

    def __init__(self, curve: Curve, model: nn.Module, grad_accum: int = 1):
        super().__init__()
        self.curve, self.model, self.grad_accum = curve, model, grad_accum
        self.model.requires_grad_(False)
        params = dict(model.named_parameters())
        missing = [n for n in curve.names if n not in params]
        if missing:
            raise ValueError(f"the model has no parameters {missing[:3]}")
        self.dtypes = {n: params[n].dtype for n in curve.names}
        self.index = {n: i for i, n in enumerate(curve.names)}
        self.calls, self.t = 0, 0.0
        self._holders: dict | None = None  # found at the first forward (its batch is the probe)
        self._handles: list = []
        self._controls: list = []
        self._weights: list[float] = []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Training's ``grad_checkpointing``, passed on to the model when it supports it."""
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def _swap_in(self, entries: list, controls: list, weights: list, beside: dict) -> None:
        for owner, attr, w0, name in entries:
            piece = self.curve.term(controls, weights, self.index[name])
            if is_packed(w0):  # added beside the packed layer's output by _swap_out
                beside[id(owner), attr] = piece
            else:
                owner._parameters[attr] = ((w0 + piece) if self.curve.offset else piece).to(self.dtypes[name])

    def _swap_out(self, entries: list, beside: dict, args: tuple, out):
        for owner, attr, w0, _ in entries:
            owner._parameters[attr] = w0
            d = beside.pop((id(owner), attr), None)
            if d is not None:
                out = out + nn.functional.linear(args[0].to(d.dtype), d).to(out.dtype)
        return out

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.calls % self.grad_accum == 0:
            self.t = float(torch.rand(()))
        self.calls += 1
        if self._holders is None:
            self._hook(inputs)
        # the hooks read these until the next forward: a checkpointed layer's backward builds its θ(t) again
        self._controls = self.curve.controls()
        self._weights = curve_weights(self.curve.kind, self.t, self.curve.num_bends)
        try:
            # a checkpointed layer's recomputation runs its whole forward, so its forward hooks swap W0 back
            # (torch's early stop would end it at its last saved tensor, leaving a θ(t) in a module)
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                return self.model(**inputs)
        finally:
            self._restore()  # a forward that raised: W0 back wherever it was swapped out

    def _restore(self) -> None:
        for entries in (self._holders or {}).values():
            for owner, attr, w0, _ in entries:
                owner._parameters[attr] = w0

    def _hook(self, inputs: dict) -> None:
        """Find the holders (one no-grad forward of ``inputs``) and hook them until :meth:`close`."""
        from landscape.engine.factored import holders

        # the probe's forward must not draw from the generators a resume restores
        cuda = [v.device for v in inputs.values() if isinstance(v, torch.Tensor) and v.device.type == "cuda"]
        with torch.random.fork_rng(devices=cuda[:1]):
            self._holders = holders(self.model, self.curve.names, inputs)
        beside: dict = {}
        for holder, entries in self._holders.items():
            self._handles.append(
                holder.register_forward_pre_hook(
                    lambda m, a, e=entries: self._swap_in(e, self._controls, self._weights, beside)
                )
            )
            self._handles.append(holder.register_forward_hook(
                lambda m, a, o, e=entries: self._swap_out(e, beside, a, o)))  # fmt: skip

    def close(self) -> None:
        """Remove the hooks: the model runs its own weights again."""
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles, self._holders = [], None


def train_curve(
    curve: Curve,
    model: nn.Module,
    data: Encoded,
    labels: torch.Tensor,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    objective: Classification = OBJECTIVES["classification"],
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    checkpoint_key: str = "",
    augment=None,
    progress: bool = True,
) -> dict:
    """Train ``curve``'s bends in place to minimise E_t L(θ(t)) on (``data``, ``labels``): returns the history
    of :func:`adapters.train.train` (``train_loss`` per step, ``resumed_at_step``).

    ``model`` is the base model the curve's weights are put into; it is left as it was: training runs on it (no
    second copy of its weights), its parameters frozen meanwhile, and their flags, its modules' train/eval modes
    and its buffers (train mode may move batch-norm statistics) are restored after. A base not yet on ``device``
    is trained as a copy instead (moving it would move the caller's model).
    ``checkpoint`` / ``checkpoint_key`` / ``checkpoint_every``: as training's, so a killed curve training resumes
    there and ends with the same bends (bit-exact on CPU).
    """
    # train() cuts each step's batch into index.chunk(grad_accum): fewer pieces when the set is smaller than
    # a batch. The wrapper draws one t per step, so it must know how many forwards a step makes.
    forwards = len(torch.empty(min(config.batch_size, len(labels))).chunk(config.grad_accum))
    target = torch.device(device)
    if not all(t.device.type == target.type and target.index in (None, t.device.index)
               for t in (*model.parameters(), *model.buffers())):  # fmt: skip
        model = copy.deepcopy(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    wrapper = CurveModel(curve, model, forwards)
    try:
        return train(
            wrapper, data, labels, config, device, desc="train curve",
            progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every, augment=augment,
            checkpoint_key=checkpoint_key, objective=objective,
        )  # fmt: skip
    finally:
        wrapper.close()
        if config.grad_checkpointing:  # train() turned it on for this training
            wrapper.set_grad_checkpointing(False)
        with torch.no_grad():
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.train(mode)
            for b, saved in buffers:
                b.copy_(saved)
