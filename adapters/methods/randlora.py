"""RandLoRA training at LoRA's cost: a faster forward for peft's RandLoRA layers, same maths.

peft's ``randlora.layer.Linear.forward`` computes, per adapted Linear and per step,
``base(x) + F.linear(F.linear(x, first), second) · s`` where ``(first, second)`` come from
``get_scaled_bases`` (``ΔW = second @ first``, K = r·N columns, N = ⌈d/r⌉). Those are two
extra token-sized matmuls forward and three backward. When a step holds many tokens it is
cheaper to build ``ΔW`` once (one out×K×in product, independent of the batch) and run a
single ``F.linear(x, W + s·ΔW, bias)``.

:func:`enable_fast_randlora` installs, on every ``peft.tuners.randlora.layer.Linear`` of a
peft model, a forward that picks per call between

- ``"factored"``: peft's own expression, in a custom autograd function that saves ``x``, λ, γ
  (and the T×K intermediate when in > out) instead of peft's per-layer scaled factor and, under
  autocast, low-precision copies of both factors (weight-sized, per layer, until the backward), and
- ``"materialized"``: ``F.linear(x, W + s·ΔW, bias)`` in a custom autograd function that
  saves ``x``, λ, γ and W + s·ΔW (``keep_weight=True``, the default: one weight-sized tensor
  per materialized layer until the backward) or rebuilds W + s·ΔW in the backward
  (``keep_weight=False``: no weight-sized tensor kept, one more out×K×in product), and gets
  the λ/γ gradients from ``G = s·gradᵀ·x`` through peft's own graph (``get_scaled_bases`` →
  ``UniqueBaseGrad``).

Both paths scale peft's cached bases by peft's expression (``UniqueBaseGrad``'s λ·A·γ, the
scaled factor on the layer's smaller side: :func:`scaled_bases`, :func:`_scaled`, the latter a block at a time), so the
basis layout is peft's; tested against peft's layer. Module structure, parameter and buffer names are untouched:
``save_pretrained`` / ``PeftModel.from_pretrained`` work as before.

Choice rule (``mode="auto"``), multiply-adds beyond the frozen layer's own ``x·Wᵀ`` and its
input gradient, with T tokens (``x.numel() / in``), d = min(in, out), D = max(in, out),
K = r·N:

====================  ===========================  =====================================
                      factored (peft)              materialized (ours)
====================  ===========================  =====================================
training (grad on)    T·K·(2·(in + out) + d)       D·d·(2·K + T)   [keep_weight=False: 3·K + T]
no grad (eval)        T·K·(in + out)               D·d·K
====================  ===========================  =====================================

Factored, training: forward x·firstᵀ and h·secondᵀ (T·K·(in+out)), backward the two input
gradients (the same again) and the trainable factor's gradient (T·K·d). Materialized: build
ΔW in the forward (D·K·d), the weight gradient gradᵀ·x (T·D·d), the trainable factor's
gradient from it (D·K·d), and with ``keep_weight=False`` a rebuild of ΔW in the backward
(D·K·d). The materialized path is taken when its count is strictly lower; for a square
layer with K = d that is T > d/2 in training (3d/4 with keep_weight=False) and in eval; for
out = 4·in (K = d = in) T > 8d/7 (12d/7). The input is assumed to
need a gradient. Dropout on the adapter input (``randlora_dropout > 0`` in training),
several active adapters, merged or disabled adapters, extra forward arguments and Conv1D
base layers always take peft's original forward. A packed 4-bit base (peft's ``randlora.bnb.Linear4bit``)
always takes the factored path: the adapter runs beside the packed layer.

Bases: peft stores the shared A and B once, in bf16 (fp16 without bf16), and on CPU every
layer casts the whole shared B to fp32 on every call. Here one converted copy per
(device, dtype) is cached for all layers together (outside the state dict), in the base
weight's dtype unless ``bases_dtype`` says otherwise; bf16 → fp32 is exact, so the maths is
unchanged. It is refreshed when peft's buffers are replaced or modified in place.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters import upcast
from adapters.quant import is_packed

MODES = ("auto", "factored", "materialized")


def _peft_linear():
    from peft.tuners.randlora.layer import Linear

    return Linear


def _peft_linear_4bit() -> tuple:
    """peft's RandLoRA layer over a bitsandbytes ``Linear4bit`` (empty without bitsandbytes)."""
    from peft.tuners.randlora import bnb

    return (bnb.Linear4bit,) if hasattr(bnb, "Linear4bit") else ()


# --------------------------------------------------------------------------- choice rule


def path_costs(
    in_features: int, out_features: int, rank: int, num_bases: int, tokens: int, training: bool = True,
    keep_weight: bool = True,
) -> tuple[int, int]:  # fmt: skip
    """(factored, materialized) multiply-adds of one call, beyond the frozen layer's own work."""
    d, big = min(in_features, out_features), max(in_features, out_features)
    k = rank * num_bases
    if training:
        factored = tokens * k * (2 * (in_features + out_features) + d)
        materialized = big * d * ((2 if keep_weight else 3) * k + tokens)
    else:
        factored = tokens * k * (in_features + out_features)
        materialized = big * d * k
    return factored, materialized


def choose_path(
    in_features: int, out_features: int, rank: int, num_bases: int, tokens: int, training: bool = True,
    keep_weight: bool = True,
) -> str:  # fmt: skip
    """``"materialized"`` when its multiply-add count is strictly lower, else ``"factored"``."""
    factored, materialized = path_costs(in_features, out_features, rank, num_bases, tokens, training, keep_weight)
    return "materialized" if materialized < factored else "factored"


def threshold_tokens(
    in_features: int, out_features: int, rank: int, num_bases: int, training: bool = True, keep_weight: bool = True
) -> int:
    """Smallest token count per call at which ``auto`` materializes."""
    lo, hi = 1, 1
    while choose_path(in_features, out_features, rank, num_bases, hi, training, keep_weight) != "materialized":
        hi *= 2
        if hi > 1 << 40:
            return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if choose_path(in_features, out_features, rank, num_bases, mid, training, keep_weight) == "materialized":
            hi = mid
        else:
            lo = mid + 1
    return lo


# --------------------------------------------------------------------------- shared bases


class SharedBases:
    """One converted copy of peft's shared random bases, for every layer of a model.

    One copy per (adapter, device, dtype, layer shape): peft's slices of the shared A and B
    for that shape, made contiguous once (peft's own forward re-slices, re-casts and, via
    ``flatten`` of a non-contiguous slice, copies B on every call). Refreshed when peft's buffer is replaced (e.g. by
    ``model.to``) or modified in place (its version counter moves). Not a module and not a
    buffer: it never enters the state dict.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._cache: dict = {}
        self.conversions = 0

    def get(self, layer, adapter: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) sliced as peft slices them for ``layer``'s shape, B contiguous (its flatten is then a view)."""
        src_a, src_b = layer.randlora_A[adapter], layer.randlora_B[adapter]
        small, big = min(layer.in_features, layer.out_features), max(layer.in_features, layer.out_features)
        key = (adapter, device, dtype, big, small, layer.num_bases)
        hit = self._cache.get(key)
        stamp = (src_a._version, src_b._version)
        if hit is not None and hit[0] is src_a and hit[1] is src_b and hit[2] == stamp:
            return hit[3], hit[4]
        with torch.no_grad():
            a = src_a[:, : layer.num_bases, :small].to(device=device, dtype=dtype).contiguous()
            b = src_b[:big, : layer.num_bases, :].to(device=device, dtype=dtype).contiguous()
        if not (_transformed(a) or _transformed(b)):  # made under torch.func: bound to that call, never kept
            self._cache[key] = (src_a, src_b, stamp, a, b)
        self.conversions += 1
        return a, b

    def nbytes(self) -> int:
        """Bytes of the converted slices held (each storage once): about the used part of the shared bases,
        per layer shape, in the compute dtype; like the bases, it grows with the layers' size, not the batch."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for hit in self._cache.values() for t in hit[3:]}  # fmt: skip
        return sum(storages.values())


def _transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` was made inside a torch.func transform (grad, jvp, vmap): it is bound to that transform's
    level, and a later call returning it from the cache fails with functorch's "escaped?" internal assert."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))


@dataclass
class _LayerState:
    name: str
    mode: str
    keep_weight: bool
    shared: SharedBases
    last: str | None = None  # the path taken by the latest call
    counts: dict = field(default_factory=lambda: {"factored": 0, "materialized": 0})


# One SharedBases per model: keyed by peft's BufferDict of bases, which every layer of a model shares.
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_bases(layer, dtype: torch.dtype | None = None) -> SharedBases:
    """The cache of converted bases of ``layer``'s model (created on first use)."""
    shared = _SHARED.get(layer.randlora_B)
    if shared is None:
        shared = _SHARED[layer.randlora_B] = SharedBases(dtype)
    return shared


def scaled_bases(layer, adapter: str, lam, gam, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``get_scaled_bases`` on the cached bases and the given λ, γ: (first, second), ΔW = second @ first.

    peft's own expression with peft's ``UniqueBaseGrad`` (so the basis layout is peft's), on the slices
    :class:`SharedBases` keeps in ``dtype``, less one step: on CPU peft casts half-precision bases to fp32 on
    every call, a copy of the layer's whole B slice (max(in, out) × K) that this forward would then round back;
    here only the scaled factor is made (K × min(in, out), fp32 from the fp32 λ, γ, then ``dtype``), the other
    is a view of the cache. ``layer`` is any peft RandLoRA layer (peft's Linear or
    :class:`adapters.methods.layers.RandLoraWeight`).
    """
    from peft.tuners.randlora.layer import UniqueBaseGrad

    state = layer.__dict__.get("_fast_randlora")
    shared = state.shared if state is not None else shared_bases(layer)
    a, b = shared.get(layer, adapter, device, dtype)  # A (r, ·, min), B (max, n, r): peft's slices for this shape
    update_b = b.flatten(start_dim=1)  # (max, n·r), a view of the contiguous cache
    update_a = UniqueBaseGrad.apply(a, lam.to(device), gam.to(device)).flatten(end_dim=1).to(dtype)  # (r·n, min)
    return _ordered(update_a, update_b, layer.in_features <= layer.out_features)


def _ordered(scaled: torch.Tensor, full: torch.Tensor, scaled_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second), ΔW = second @ first, as peft's ``get_scaled_bases`` orders them: the scaled factor (K×d)
    on the layer's smaller side — first when in ≤ out, else transposed second — and B (D×K) on the other."""
    return (scaled, full) if scaled_first else (full.t(), scaled.t())


def delta_weight(layer, adapter: str = "default") -> torch.Tensor:
    """ΔW·s of ``layer`` as the materialized path builds it (equals peft's ``get_delta_weight``)."""
    weight = layer.get_base_layer().weight
    dtype = _compute_dtype(layer, weight)
    first, second = scaled_bases(
        layer, adapter, layer.randlora_lambda[adapter], layer.randlora_gamma[adapter], weight.device, dtype
    )
    return (second @ first) * layer.scaling[adapter]


def _compute_dtype(layer, weight: torch.Tensor) -> torch.dtype:
    chosen = layer._fast_randlora.shared.dtype
    if chosen is not None:
        return chosen
    if not weight.dtype.is_floating_point:
        return torch.float32
    # a half base that widens its weights (adapters.upcast) multiplies in fp32 outside autocast: so does its adapter
    return torch.float32 if upcast.active(layer.get_base_layer(), weight.device.type) else weight.dtype


# --------------------------------------------------------------------------- materialized path


class _MaterializedLinear(torch.autograd.Function):
    """y = x·(W + s·ΔW(λ, γ))ᵀ + b, saving x, λ, γ (and W + s·ΔW only with keep_weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lam, gam, build, scaling, keep_weight):
        first, second = build(lam, gam)
        w = torch.addmm(weight.to(first.dtype), second, first, alpha=scaling)
        y = F.linear(x, w, None if bias is None else bias.to(w.dtype))
        ctx.build, ctx.scaling, ctx.keep_weight = build, scaling, keep_weight
        ctx.save_for_backward(x, weight, lam, gam, w if keep_weight else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _first_derivative_only()
        x, weight, lam, gam, w = ctx.saved_tensors
        need_x, need_w, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_lam = grad_gam = None
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        first = second = None
        if need_w or need_lam or need_gam:
            grad_delta = gy.t().to(x2.dtype) @ x2  # (out, in): T·D·d
            if need_w:
                grad_w = grad_delta.to(weight.dtype)
            if need_lam or need_gam:
                with torch.enable_grad():
                    lam_ = lam.detach().requires_grad_(need_lam)
                    gam_ = gam.detach().requires_grad_(need_gam)
                    first, second = ctx.build(lam_, gam_)
                    g = grad_delta * ctx.scaling
                    outs, grads = [], []
                    if first.requires_grad:  # in <= out: first = scaled A (K×in), second = B (out×K)
                        outs.append(first)
                        grads.append(second.detach().t() @ g)  # D·K·d
                    if second.requires_grad:  # in > out: second = scaled Aᵀ (out×K), first = Bᵀ (K×in)
                        outs.append(second)
                        grads.append(g @ first.detach().t())  # D·K·d
                    inputs = [t for t, need in ((lam_, need_lam), (gam_, need_gam)) if need]
                    found = iter(torch.autograd.grad(outs, inputs, grads))
                grad_lam = next(found) if need_lam else None
                grad_gam = next(found) if need_gam else None
        if need_x:
            if w is None:
                if first is None:
                    first, second = ctx.build(lam, gam)
                w = torch.addmm(weight.to(first.dtype), second.detach(), first.detach(), alpha=ctx.scaling)
            grad_x = (gy.to(w.dtype) @ w).reshape(x.shape)
        if need_b:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b, grad_lam, grad_gam, None, None, None


# --------------------------------------------------------------------------- factored path


def _first_derivative_only() -> None:
    """Both paths' backwards rebuild the bases under a graph of their own, detached from λ and γ: a backward with
    ``create_graph`` (an HVP by double backward) would silently miss their second-order terms, so it fails."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fast RandLoRA forward gives first derivatives only: call "
            "adapters.methods.randlora.disable_fast_randlora(model) before a double backward"
        )


# The scaled factor S = λ·A·γ (K×d) is never whole: each product that takes it runs over _SLICES blocks of it, of
# A's r rows or of its d columns, whichever makes every block a separate part of the product's output (rows for
# x·Sᵀ, columns for h·S; no partial sums, so each output element is one full reduction, rounded once as peft's).
# A layer's scratch is then a block of S, one of G = ∂L/∂S and one fp32 G·A: K×d / _SLICES each, not K×d.
_SLICES = 8


def _blocks(size: int) -> list[slice]:
    step = -(-size // _SLICES)
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


def _scaled(a: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, dtype: torch.dtype, rows=slice(None),
            cols=slice(None)) -> torch.Tensor:  # fmt: skip
    """S[rows, cols] = λ[rows, :, None]·A[rows, :, cols]·γ[None, :, cols] (peft's ``UniqueBaseGrad`` forward, fp32
    from the fp32 λ, γ, then ``dtype``), flattened to (len(rows)·n) × len(cols): a block of S (K×d, K = r·n)."""
    return (lam[rows, :, None] * a[rows, :, cols] * gam[None, :, cols]).to(dtype).flatten(end_dim=1)


def _add_scale_grads(g, a, lam, gam, rows, cols, grad_lam, grad_gam) -> None:
    """Adds to (∂L/∂λ, ∂L/∂γ), fp32, the terms of G's block (rows, cols), G = ∂L/∂S: Σ_j G·A·γ and Σ_k G·A·λ
    (``UniqueBaseGrad``'s backward)."""
    ga = g.float().view(-1, lam.shape[1], g.shape[-1])  # a fresh block (the .float() copy, or G's own block)
    ga.mul_(a[rows, :, cols])
    grad_lam[rows] += torch.einsum("kbj,bj->kb", ga, gam[:, cols].float())
    grad_gam[:, cols] += torch.einsum("kbj,kb->bj", ga, lam[rows].float())


def _row_span(rows: slice, n: int) -> slice:
    """The flat K indices of A's rows ``rows`` (S is (r, n, d) flattened)."""
    return slice(rows.start * n, rows.stop * n)


class _FactoredLinear(torch.autograd.Function):
    """s·(x·firstᵀ)·secondᵀ: peft's RandLoRA expression on the cached bases, in ``compute`` dtype.

    ``bases()`` gives the cached slices A (r, n, d) and B (D, n, r) of the layer's shape; A scaled is
    S = λ·A·γ (K×d, K = r·n; :func:`_scaled`, peft's ``UniqueBaseGrad`` expression) and (first, second) =
    (S, B) when in ≤ out, else (Bᵀ, Sᵀ), B flattened to D×K. peft's own forward leaves autograd holding, per
    adapted layer until the backward, S and, under autocast, low-precision copies of S and B: tensors that
    grow with the layer, not the batch, which made RandLoRA training's memory grow with model size. This
    saves x, λ, γ and, when in > out, h = x·firstᵀ (T×K, batch-sized); S, and G = ∂L/∂S for λ's and γ's
    gradients, are made a block at a time (see ``_SLICES``). The multiply-adds are peft's: two T×K products
    forward, three backward.
    """

    @staticmethod
    def forward(ctx, x, lam, gam, bases, scaling, compute, scaled_first):
        a, b = bases()
        full = b.flatten(start_dim=1)  # B, D×K: a view of the cache
        n = lam.shape[1]
        with torch.autocast(x.device.type, enabled=False):  # ``compute`` already says what autocast would
            xc = x.to(compute)
            if scaled_first:  # h = x·Sᵀ by A's rows, y = h·Bᵀ
                h = xc.new_empty(*x.shape[:-1], full.shape[1])
                for rows in _blocks(a.shape[0]):
                    h[..., _row_span(rows, n)] = F.linear(xc, _scaled(a, lam, gam, compute, rows=rows))
                y = F.linear(h, full)
            else:  # h = x·B, y = h·S by S's columns
                h = F.linear(xc, full.t())
                y = h.new_empty(*x.shape[:-1], a.shape[-1])
                for cols in _blocks(a.shape[-1]):
                    y[..., cols] = h @ _scaled(a, lam, gam, compute, cols=cols)
            y = y * scaling
        ctx.bases, ctx.scaling, ctx.compute, ctx.scaled_first = bases, scaling, compute, scaled_first
        ctx.save_for_backward(x, lam, gam, None if scaled_first else h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _first_derivative_only()
        x, lam, gam, h = ctx.saved_tensors
        need_x, need_lam, need_gam = ctx.needs_input_grad[:3]
        need_scales = need_lam or need_gam
        a, b = ctx.bases()
        full = b.flatten(start_dim=1)
        n, compute = lam.shape[1], ctx.compute
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(compute) * ctx.scaling
        grad_lam = torch.zeros(lam.shape, dtype=torch.float32, device=lam.device)
        grad_gam = torch.zeros(gam.shape, dtype=torch.float32, device=gam.device)
        grad_x = None
        if ctx.scaled_first:  # grad_h = gy·B; by S's columns: grad_x = grad_h·S, G = grad_hᵀ·x
            grad_h = gy @ full
            x2 = x.reshape(-1, x.shape[-1]).to(compute) if need_scales else None  # G's other factor only
            grad_x = gy.new_empty(gy.shape[0], x.shape[-1]) if need_x else None
            for cols in _blocks(a.shape[-1]):
                if need_x:
                    grad_x[:, cols] = grad_h @ _scaled(a, lam, gam, compute, cols=cols)
                if need_scales:
                    g = grad_h.t() @ x2[:, cols]
                    _add_scale_grads(g, a, lam, gam, slice(None), cols, grad_lam, grad_gam)
        else:  # by A's rows: grad_h = gy·Sᵀ, G = hᵀ·gy; then grad_x = grad_h·Bᵀ
            h2 = h.reshape(-1, h.shape[-1])
            grad_h = gy.new_empty(gy.shape[0], full.shape[1])
            for rows in _blocks(a.shape[0]):
                span = _row_span(rows, n)
                grad_h[:, span] = gy @ _scaled(a, lam, gam, compute, rows=rows).t()
                if need_scales:
                    _add_scale_grads(h2[:, span].t() @ gy, a, lam, gam, rows, slice(None), grad_lam, grad_gam)
            grad_x = grad_h @ full.t() if need_x else None
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        grad_lam = grad_lam.to(lam.dtype) if need_lam else None
        grad_gam = grad_gam.to(gam.dtype) if need_gam else None
        return grad_x, grad_lam, grad_gam, None, None, None, None


# --------------------------------------------------------------------------- the forward


def _single_adapter(layer, x, args, kwargs) -> str | None:
    """The one active adapter when the fast forward applies, else None (use peft's forward)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    if not isinstance(layer.get_base_layer(), nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [a for a in layer.active_adapters if a in layer.randlora_lambda]
    if len(active) != 1:
        return None
    dropout = layer.randlora_dropout[active[0]]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return None
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return None
    return active[0]


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _single_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    state: _LayerState = self._fast_randlora
    base = self.get_base_layer()
    lam, gam = self.randlora_lambda[adapter], self.randlora_gamma[adapter]
    scaling = self.scaling[adapter]
    dtype = _compute_dtype(self, base.weight)
    training = torch.is_grad_enabled() and (lam.requires_grad or gam.requires_grad)
    path = state.mode
    if is_packed(base):  # a 4-bit base: W + s·ΔW cannot be built, the adapter runs beside the packed layer
        path = "factored"
    elif path == "auto":
        tokens = x.numel() // max(1, x.shape[-1])
        path = choose_path(
            self.in_features, self.out_features, self.r[adapter], self.num_bases, tokens, training, state.keep_weight
        )
    state.last = path
    state.counts[path] += 1
    previous_dtype = x.dtype

    if path == "factored":  # peft's expression, on the cached bases, without its saved weight-sized copies
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        scaled_first = self.in_features <= self.out_features  # peft scales the factor on the smaller side

        def bases():  # cached as autocast would round them: no per-call cast of B
            return state.shared.get(self, adapter, x.device, compute)

        adapter_out = _FactoredLinear.apply(x, lam, gam, bases, scaling, compute, scaled_first)
        return (self.base_layer(x) + adapter_out).to(previous_dtype)

    def build(lam_, gam_):
        return scaled_bases(self, adapter, lam_, gam_, x.device, dtype)

    result = _MaterializedLinear.apply(x.to(dtype), base.weight, base.bias, lam, gam, build, scaling, state.keep_weight)
    return result.to(previous_dtype)


# --------------------------------------------------------------------------- public API


def randlora_layers(model: nn.Module, linear_only: bool = True) -> dict[str, nn.Module]:
    """{module name: peft RandLoRA Linear} of ``model``, its 4-bit Linear included (``linear_only=False``: every
    RandLoRA layer)."""
    if linear_only:
        kind = (_peft_linear(), *_peft_linear_4bit())
    else:
        from peft.tuners.randlora.layer import RandLoraLayer as kind
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def enable_fast_randlora(
    model: nn.Module, mode: str = "auto", keep_weight: bool = True, bases_dtype: torch.dtype | None = None
) -> dict[str, dict]:
    """Install the fast forward on every peft RandLoRA Linear of ``model`` (in place; idempotent).

    ``mode``: ``"auto"`` (per call, the cheaper path by :func:`path_costs`), ``"factored"``
    or ``"materialized"`` (forced). ``keep_weight``: the materialized path keeps W + s·ΔW
    for the backward instead of rebuilding it (faster, one weight-sized tensor per layer).
    ``bases_dtype``: dtype of the cached shared bases (default: the base weight's dtype).

    Returns per layer: shape, rank, number of bases, the mode and, for ``auto``, the token
    counts per call from which training / eval calls materialize.
    """
    if mode not in MODES:
        raise ValueError(f"unknown fast RandLoRA mode '{mode}': choose one of {', '.join(MODES)}")
    shared_by_buffers: dict[int, SharedBases] = {}
    plan = {}
    for name, layer in randlora_layers(model).items():
        key = id(layer.randlora_B)  # peft gives every layer the same BufferDict
        if key not in shared_by_buffers:
            shared_by_buffers[key] = _SHARED[layer.randlora_B] = SharedBases(bases_dtype)
        shared = shared_by_buffers[key]
        layer.__dict__["_fast_randlora"] = _LayerState(name, mode, keep_weight, shared)
        layer.forward = types.MethodType(_fast_forward, layer)
        adapter = next(iter(layer.randlora_lambda), None)
        rank = layer.r.get(adapter, 0) if adapter is not None else 0
        info = {"shape": (layer.out_features, layer.in_features), "rank": rank, "num_bases": layer.num_bases}
        packed = is_packed(layer.get_base_layer())
        info["mode"] = "factored" if packed else mode  # beside a 4-bit base the adapter never materializes
        if mode == "auto" and rank and not packed:
            args = (layer.in_features, layer.out_features, rank, layer.num_bases)
            info["train_threshold_tokens"] = threshold_tokens(*args, training=True, keep_weight=keep_weight)
            info["eval_threshold_tokens"] = threshold_tokens(*args, training=False)
        plan[name] = info
    return plan


def disable_fast_randlora(model: nn.Module) -> None:
    """Restore peft's own forward on every RandLoRA Linear of ``model``."""
    for layer in randlora_layers(model).values():
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_fast_randlora", None)


def last_choices(model: nn.Module) -> dict[str, str | None]:
    """{layer name: path taken by its latest call} (None: fast forward not installed or not called)."""
    out = {}
    for name, layer in randlora_layers(model).items():
        state = layer.__dict__.get("_fast_randlora")
        out[name] = None if state is None else state.last
    return out


__all__ = [
    "MODES",
    "SharedBases",
    "choose_path",
    "scaled_bases",
    "shared_bases",
    "delta_weight",
    "disable_fast_randlora",
    "enable_fast_randlora",
    "last_choices",
    "path_costs",
    "randlora_layers",
    "threshold_tokens",
]
