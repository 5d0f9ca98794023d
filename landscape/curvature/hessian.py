"""Hessian-vector products of the run's objective (:class:`HessianOperator`), and the rewrites of peft's
RandLoRA and bitsandbytes' 4-bit layers that let a product differentiate them.

**Hessian-vector products** (:class:`HessianOperator`). A causal LM's answer loss reads only the gold
candidate, so only the gold continuation is run (the objective's training view): the same loss and
products at 1/C of the work for C candidates. Each product is one pass over the evaluation batches
(``micro_batch``: in pieces of at most that many samples), summed; every pass is counted (``hvps``). Only
the chosen parameters are differentiated (the rest of the model is constant). Three ways, the first that
the model differentiates is kept (``hvp_mode``; a failure is recorded in ``hvp_note``):

- ``reverse-over-forward`` (first): the parameters become dual tensors ``θ + ε·v``
  (``torch.autograd.forward_ad``), one forward gives the loss and its directional derivative ∇L·v, and one
  ``torch.autograd.grad`` of that derivative (``create_graph=False``) gives H·v. The graph holds the forward's
  activations and their tangents, and the backward frees each node's tensors as it passes it. The
  ``torch.func`` ways below record the backward itself (``torch.func.grad`` always does, to allow nesting), so
  every layer's backward intermediates stay until the product ends. Two things make it work: the forward
  runs under a pass-through dispatch mode, because torch's forward-mode formulas of ``softmax`` and
  ``log_softmax`` (attention, the cross-entropy) otherwise multiply a saved tensor in place, which reverse
  mode refuses; and, for calls of fewer tokens than min(in, out) (``--hvp-batch``), peft's RandLoRA layers
  run their product in another order (:func:`_randlora_product`, same sums), so the scaled basis λ·A·γ — a
  d × d matrix per layer, r times that layer's λ/γ — is never formed or kept. Measured on the Qwen2 shape
  (4 layers, fp32, CPU): a product's peak above the loaded base, 16 samples of 51 tokens at h = 512, 860 MB
  instead of 1,060 MB by ``torch.func``; one sample at h = 1024, 270 MB instead of 635 MB.
- ``forward-over-reverse``: ``torch.func.jvp(grad(L), (θ,), (v,))`` through ``functional_call``.
- ``reverse-over-reverse``: double backward through ``torch.autograd``: the one that differentiates
  bitsandbytes' 4-bit matmul (an ``autograd.Function`` without forward-mode formula or ``setup_context``).

For both ``torch.func``/double-backward ways attention runs on PyTorch's math SDPA kernel (the fused CPU/GPU
kernels have no forward-mode derivative), and peft's RandLoRA ``UniqueBaseGrad`` — an
``autograd.Function`` that torch.func cannot trace, whose forward is the product ``λ[:, :, None]·A·γ[None]``
and whose hand-written backward is that product's gradient — is replaced, for the duration of the
computation, by the same product in plain tensor operations (same values, same derivatives).


**Under torchrun** (``distributed=True``): each rank keeps a contiguous shard of the evaluation samples
(:func:`shard_eval_set`) and a product is the average of the ranks' products, each the mean over its shard,
weighted by the shards' sample counts (one ``all_reduce`` per product). Every rank receives the same sum, so the
solvers run identically on every rank, from the same seeded probes.


**Memory.** What grows with the tokens is the graph: the forward's activations and their tangents, about
1 MB per token at h = 512 with 4 layers in fp32 (``micro_batch`` bounds it). What does not: the coordinate
vectors (the product, the gradient of the first pass, the vector multiplied), a layer's transients and,
for RandLoRA, peft's shared random bases, which loading the adapter costs.

"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import first_line
from adapters.objectives import Classification
from adapters.quant import is_packed
from landscape.curvature.settings import DTYPES
from landscape.engine.grid import EvalSet

HVP_MODES = ("auto", "reverse-over-forward", "forward-over-reverse", "reverse-over-reverse")


class _PlainUniqueBaseGrad:
    """peft's RandLoRA ``UniqueBaseGrad`` in plain tensor operations (module docstring): the same product,
    differentiable by torch.func; its autograd gradient is what peft's hand-written backward returns."""

    @staticmethod
    def apply(randlora_a: torch.Tensor, randlora_lambda: torch.Tensor, randlora_gamma: torch.Tensor) -> torch.Tensor:
        return randlora_lambda[:, :, None] * randlora_a * randlora_gamma[None,]


# RandLoRA's product without its scaled bases. peft's forward builds, per adapted layer, the scaled basis
# S = λ[:, :, None]·A·γ[None] (r × N × d, d = min(in, out), r·N ≈ d: a d × d matrix, r times the layer's own
# λ/γ) and runs F.linear(F.linear(x, first), second). Inside an HVP every layer's S, its tangent and its
# gradient are kept by the graph until the backward reaches the layer: about 2r vectors of the coordinates
# at once (measured: 20 MB per decoder block of the Qwen2 shape at h = 512, against 0.1 MB of λ/γ). The same
# product in another order keeps only token-sized tensors: peft's A is one (r, 1, d) matrix shared by the N
# bases, so with in = d
#     h[t, k, b] = λ[k, b] · Σ_j A[k, j] · γ[b, j] · x[t, j]  =  λ ⊙ ((x ⊙ γ_b) Aᵀ)
# (x ⊙ γ: T × N × d, transient; saved for the backward: x, and the T × N × r product, activation-sized)
# and with out = d < in, z = x·B (T × r·N) and
#     y[t, j] = Σ_k A[k, j] · ((z ⊙ λ) γ)[t, k, j]
# (T × r × d transient; saved: z ⊙ λ). Tokens go in chunks so a transient never exceeds the larger of S and
# RANDLORA_CHUNK_ELEMENTS. Same sums in another order: equal to peft's to rounding (tests). Used for calls of
# fewer tokens than d (_randlora_applies): a micro-batch (--hvp-batch), or a short evaluation batch.
RANDLORA_CHUNK_ELEMENTS = 1 << 22


def _randlora_applies(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether :func:`_randlora_forward` runs for this call (else peft's forward): it reproduces the layer's
    forward, and it holds less. It keeps about T·r·N for T tokens where peft's keeps S and its tangent, 2·r·N·d,
    and its T × N × d transients cost time: fewer tokens than d (measured, Qwen2 shape: at h = 1024 and 47
    tokens a product's peak 270 MB instead of 440 MB; at h = 256 and 816 tokens 437 MB and twice the time,
    instead of 396 MB)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    if x.numel() // max(x.shape[-1], 1) >= min(layer.in_features, layer.out_features):
        return False
    for adapter in layer.active_adapters:
        if adapter in layer.randlora_lambda and layer.randlora_A[adapter].shape[1] != 1:
            return False  # a basis A per base (peft makes one shared (r, 1, d) A): peft's own forward
    return True


def _randlora_product(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """peft's ``F.linear(F.linear(x, first), second)`` of ``get_scaled_bases`` without forming the basis."""
    lam, gam = layer.randlora_lambda[adapter], layer.randlora_gamma[adapter]  # (r, N), (N, d)
    dtype = torch.promote_types(lam.dtype, layer.randlora_B[adapter].dtype)
    r, n = lam.shape
    d, big = min(layer.in_features, layer.out_features), max(layer.in_features, layer.out_features)
    a = layer.randlora_A[adapter][:, 0, :d].to(x.device, dtype)  # (r, d)
    b = layer.randlora_B[adapter][:big, :n, :].to(x.device, dtype).flatten(1)  # (D, N·r), column b·r + k
    lam, gam = lam.to(x.device, dtype), gam.to(x.device, dtype)
    lead, x = x.shape[:-1], x.to(dtype).reshape(-1, x.shape[-1])
    chunk = max(1, max(r * n * d, RANDLORA_CHUNK_ELEMENTS) // (max(r, n) * d))
    parts = []
    for lo in range(0, x.shape[0], chunk):
        xc = x[lo : lo + chunk]
        if d == layer.in_features:  # first = S flattened (r·N, d), row k·N + b; second = B flattened
            p = (xc.unsqueeze(-2) * gam) @ a.T  # (T, N, r)
            parts.append(F.linear((p.transpose(-1, -2) * lam).flatten(-2), b))
        else:  # first = Bᵀ: z column b'·r + k' meets S's row k·N + b of the same index
            w = F.linear(xc, b.T).view(-1, r, n) * lam  # (T, r, N)
            parts.append(((w @ gam) * a).sum(-2))  # (T, r, d) ⊙ A, summed over k
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.view(*lead, out.shape[-1])


def _randlora_forward(layer, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's RandLoRA Linear forward (plain or bitsandbytes base) with :func:`_randlora_product`."""
    if not _randlora_applies(layer, x, args, kwargs):
        return original(x, *args, **kwargs)
    previous = x.dtype
    result = layer.base_layer(x)
    for adapter in layer.active_adapters:
        if adapter not in layer.randlora_lambda:
            continue
        delta = _randlora_product(layer, adapter, layer.randlora_dropout[adapter](x))
        result = result + delta.to(result.dtype) * layer.scaling[adapter]
    return result.to(previous)


@contextlib.contextmanager
def _factored_randlora(model: nn.Module | None):
    """Every peft RandLoRA Linear of ``model`` runs :func:`_randlora_forward` inside the block."""
    try:
        from peft.tuners.randlora.layer import RandLoraLayer
    except ImportError:
        RandLoraLayer = None  # noqa: N806
    chosen = [
        module
        for module in (model.modules() if model is not None and RandLoraLayer is not None else ())
        # peft's own Linear classes (plain and bitsandbytes), not a subclass with another forward (the toolkit's
        # convolution, adapters.methods.layers.RandLoraWeight)
        if isinstance(module, RandLoraLayer)
        and type(module).__module__.startswith("peft.tuners.randlora")
        and isinstance(module.get_base_layer(), nn.Linear)
    ]
    with _forwards_replaced(chosen, _randlora_forward):
        yield


def _out_of_place_formulas():
    """A pass-through dispatch mode, over the forward of reverse-over-forward products. Some of torch's
    forward-mode formulas (``logsumexp_jvp``, used by ``softmax`` and ``log_softmax``: attention and the
    cross-entropy) multiply in place a tensor that autograd saved, unless a tensor subclass or a dispatch mode
    is active; reverse mode over them then fails ("modified by an inplace operation"). Under any mode they take
    their out-of-place branch: same values, and reverse mode can differentiate them. The cost is a Python call
    per operation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return PassThrough()


class _PackedMatmul(torch.autograd.Function):
    """``x · Wᵀ`` for a bitsandbytes 4-bit weight W, with a forward-mode formula (bitsandbytes' own Function has
    none): the product by bitsandbytes' kernel, the input's gradient ``g · dequantize(W)`` (as bitsandbytes'
    MatMul4Bit backward computes it) and the tangent ``ẋ · Wᵀ`` through this same Function, so reverse mode over
    the tangent keeps no dense copy of W either (every product dequantises, one layer at a time)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, weight, quant_state=weight.quant_state)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from bitsandbytes.functional import dequantize_4bit

        weight = ctx.weight
        return grad @ dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(grad.dtype), None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, _weight_tangent) -> torch.Tensor:
        return _PackedMatmul.apply(x_tangent, ctx.weight)


def _packed_forward(module: nn.Module, original, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit.forward`` through :class:`_PackedMatmul` (its CPU repacking for inference
    excepted: a weight already repacked keeps bitsandbytes' forward)."""
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        return original(x)
    if not module.compute_type_is_set:
        module.set_compute_type(x)
        module.compute_type_is_set = True
    previous = x.dtype
    if module.compute_dtype is not None:
        x = x.to(module.compute_dtype)
    out = _PackedMatmul.apply(x, module.weight)
    if module.bias is not None:
        out = out + module.bias.to(out.dtype)
    return out.to(previous)


@contextlib.contextmanager
def _packed_with_tangents(model: nn.Module):
    """Every bitsandbytes 4-bit Linear of ``model`` runs :func:`_packed_forward` inside the block."""
    chosen = [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "compute_type_is_set")
              and is_packed(m)]  # fmt: skip
    with _forwards_replaced(chosen, _packed_forward):
        yield


@contextlib.contextmanager
def _forwards_replaced(modules: list[nn.Module], replacement):
    """Inside the block each module's forward is ``replacement(module, original_forward, *args)``; afterwards
    each gets back what it had (an instance forward, such as adapters.methods.randlora's, or its class's)."""
    swapped = []
    for module in modules:
        own = module.__dict__.get("forward")
        swapped.append((module, own))
        original = own if own is not None else types.MethodType(type(module).forward, module)
        module.forward = functools.partial(replacement, module, original)
    try:
        yield
    finally:
        for module, own in swapped:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own


@contextlib.contextmanager
def _reverse_over_forward_safe(model: nn.Module):
    """RandLoRA's factored product and out-of-place forward-mode formulas, for reverse mode over forward mode."""
    with _factored_randlora(model), _packed_with_tangents(model), _out_of_place_formulas():
        yield


@contextlib.contextmanager
def _differentiable_twice():
    """Math SDPA kernel and peft's RandLoRA product in plain operations, while Hessians are computed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the name in peft's randlora.layer and the one its bitsandbytes layers imported (randlora.bnb)
    swapped = []
    for module_name in ("peft.tuners.randlora.layer", "peft.tuners.randlora.bnb"):
        module = sys.modules.get(module_name)
        if module is None and module_name.endswith(".layer"):
            with contextlib.suppress(ImportError):
                module = importlib.import_module(module_name)
        if module is not None and getattr(module, "UniqueBaseGrad", None) not in (None, _PlainUniqueBaseGrad):
            swapped.append((module, module.UniqueBaseGrad))
            module.UniqueBaseGrad = _PlainUniqueBaseGrad
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for module, original in swapped:
            module.UniqueBaseGrad = original


def batch_loss(objective: Classification, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The objective's summed loss over a batch. Classification in float64 is reduced in float64 (the
    objective casts logits to fp32, which would limit a float64 check to fp32 accuracy)."""
    if outputs.dtype == torch.float64 and type(objective) is Classification:
        return F.cross_entropy(outputs, target, reduction="sum")
    return objective.loss(outputs, target, reduction="sum")


class HessianOperator:
    """Hessian of the mean loss over ``eval_set`` w.r.t. the parameters ``names`` of ``model``, as products.

    The model is put in eval mode, its parameters stop requiring gradients (only the chosen ones are
    differentiated, functionally) and, for ``dtype="float64"``, it is converted: pass a copy you own.
    ``hvps`` counts products (one pass over the data each); ``on_hvp`` is called after each.
    ``micro_batch``: at most this many samples per forward (the evaluation batches split; same products, the
    graph's activations of that many samples). ``gold_only`` (default): a causal LM's candidates other than
    the gold one are not run — the answer
    loss does not read them (:meth:`adapters.objectives.AnswerLoss.training_view`), so the products are the
    same and cost one sequence per sample instead of one per candidate. ``distributed``: under torchrun, this
    rank's shard of the samples, and products averaged over the ranks (module docstring); every rank must call
    :meth:`hvp` the same number of times.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        eval_set: EvalSet,
        objective: Classification,
        dtype: str = "float32",
        mode: str = "auto",
        gold_only: bool = True,
        micro_batch: int | None = None,
        distributed: bool = False,
    ):
        if mode not in HVP_MODES:
            raise ValueError(f"mode must be one of {HVP_MODES}, not {mode!r}")
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.dtype).eval()
        self.model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing or not names:
            raise ValueError(f"parameters not in the model: {missing[:3]} (of {len(names)} asked for)")
        self.names = list(names)
        self.params = {n: params[n].detach() for n in self.names}
        self.shapes = [p.shape for p in self.params.values()]
        self.sizes = [p.numel() for p in self.params.values()]
        self.dim = sum(self.sizes)
        self.device = next(iter(self.params.values())).device
        # gold_only: the objective's training view of each batch (a causal LM's gold response alone, one
        # sequence per sample): the answer loss reads only the gold candidate's cross-entropy, so the other
        # candidates' forwards and backwards add work and nothing to H (same loss, same products).
        view = objective.training_view if gold_only else (lambda inputs, target: (inputs, target))
        self.total = eval_set.n  # the samples of H's mean, over every rank
        self.rank, self.world = distributed_ranks() if distributed else (0, 1)
        if self.world > 1:  # this rank's samples only: its products are summed with the others' (hvp)
            eval_set = shard_eval_set(eval_set, self.rank, self.world)
        self.batches = [
            ({k: _cast(v, self.dtype) for k, v in _trimmed(inputs).items()}, target)
            for i, t in eval_set.batches
            for inputs, target in _split(*view(i, t), micro_batch)
        ]
        self.n = eval_set.n  # this rank's samples (all of them in a single process)
        self.objective = objective
        self.mode = mode
        self.note: str | None = None
        self.hvps = 0
        self.hvp_seconds = 0.0
        self.loss: float | None = None  # at the point, from the first product's pass
        self.grad_norm: float | None = None
        self.on_hvp: Callable[[], None] | None = None
        self.scratch: Path | None = None  # where a Lanczos basis too large for memory is memory-mapped

    def _loss(self, params: dict[str, torch.Tensor], inputs: dict, target: torch.Tensor) -> torch.Tensor:
        outputs = torch.func.functional_call(self.model, params, args=(), kwargs=inputs)
        return batch_loss(self.objective, outputs, target) / self.n

    def _forward_over_reverse(self, v: dict[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor]:
        from torch.func import grad_and_value, jvp

        hv, g, loss = None, None, 0.0
        for inputs, target in self.batches:
            step = grad_and_value(lambda p, i=inputs, t=target: self._loss(p, i, t))
            (g_b, loss_b), (hv_b, _) = jvp(step, (self.params,), (v,))
            hv = hv_b if hv is None else {n: hv[n] + hv_b[n] for n in hv}
            g = g_b if g is None else {n: g[n] + g_b[n] for n in g}
            loss = loss + loss_b.detach()
        return hv, g, loss

    def _reverse_over_reverse(self, v: dict[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor]:
        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        hv = {n: torch.zeros_like(p) for n, p in params.items()}
        g = {n: torch.zeros_like(p) for n, p in params.items()}
        loss = 0.0
        with torch.enable_grad():
            for inputs, target in self.batches:
                loss_b = self._loss(params, inputs, target)
                grads = torch.autograd.grad(loss_b, list(params.values()), create_graph=True)
                dot = sum((gr * v[n]).sum() for n, gr in zip(params, grads, strict=True))
                for n, h, gr in zip(params, torch.autograd.grad(dot, list(params.values())), grads, strict=True):
                    hv[n] += h
                    g[n] += gr.detach()
                loss = loss + loss_b.detach()
        return hv, g, loss

    def _reverse_over_forward(self, v: dict[str, torch.Tensor]) -> tuple[dict, dict | None, torch.Tensor]:
        import torch.autograd.forward_ad as fwad

        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        leaves = list(params.values())
        hv, g, loss = None, None, 0.0
        with torch.enable_grad(), _reverse_over_forward_safe(self.model):
            for inputs, target in self.batches:
                with fwad.dual_level():
                    duals = {n: fwad.make_dual(p, v[n]) for n, p in params.items()}
                    primal, tangent = fwad.unpack_dual(self._loss(duals, inputs, target))
                if self.loss is None:  # the gradient at the point, once (a second backward of the same graph)
                    g_b = torch.autograd.grad(primal, leaves, retain_graph=True, allow_unused=True)
                    g = _accumulate(g, dict(zip(params, g_b, strict=True)), params)
                # create_graph=False: each node's saved tensors go as the backward passes it (the backward's
                # own intermediates never pile up, as they do under torch.func.grad, which always records them)
                hv_b = (torch.autograd.grad(tangent, leaves, allow_unused=True) if tangent is not None
                        else [None] * len(leaves))  # fmt: skip
                hv = _accumulate(hv, dict(zip(params, hv_b, strict=True)), params)
                loss = loss + primal.detach()
                del primal, tangent, duals
        return hv, g, loss

    def hvp(self, v: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """H·v for ``v`` = {name: tensor shaped like the parameter}: one pass over the evaluation set."""
        v = {n: v[n].to(device=self.device, dtype=self.dtype) for n in self.names}
        start = time.perf_counter()
        with _differentiable_twice():
            if self.mode == "reverse-over-reverse":
                hv, g, loss = self._reverse_over_reverse(v)
            elif self.mode == "forward-over-reverse":
                hv, g, loss = self._forward_over_reverse(v)
            elif self.mode == "reverse-over-forward":
                hv, g, loss = self._reverse_over_forward(v)
            else:  # auto: the first of the three that this model differentiates, kept for the next products
                hv = None
                for mode, product in (("reverse-over-forward", self._reverse_over_forward),
                                      ("forward-over-reverse", self._forward_over_reverse),
                                      ("reverse-over-reverse", self._reverse_over_reverse)):  # fmt: skip
                    try:
                        hv, g, loss = product(v)
                    except (RuntimeError, NotImplementedError) as e:
                        if isinstance(e, torch.OutOfMemoryError) or mode == "reverse-over-reverse":
                            raise
                        failed = f"{mode} failed ({type(e).__name__}: {first_line(e, 160)})"
                        self.note = failed if self.note is None else f"{self.note}; {failed}"
                        warnings.warn(f"curvature: {failed}; trying the next mode", RuntimeWarning, stacklevel=2)
                        continue
                    self.mode = mode
                    break
        if self.world > 1:
            hv, g, loss = self._weighted_over_ranks(hv, g, loss)
        if self.loss is None:
            self.loss = float(loss)
            self.grad_norm = float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in g.values())))
        self.hvps += 1
        self.hvp_seconds += time.perf_counter() - start
        if self.on_hvp is not None:
            self.on_hvp()
        return hv

    def _weighted_over_ranks(self, hv: dict | None, g: dict | None, loss) -> tuple[dict, dict | None, torch.Tensor]:
        """The ranks' products (and, at the first, their gradients and losses), each the mean over its own
        shard, averaged with the shards' sample counts as weights: Σ_r n_r·x_r / N, H·v of the whole mean loss.
        One all_reduce of one flat vector; every rank gets the same sum, so the solvers above run identically."""
        import torch.distributed as dist

        first = self.loss is None  # the gradient and loss are read once, at the first product
        zeros = lambda: {n: torch.zeros_like(p) for n, p in self.params.items()}  # noqa: E731  (an empty shard)
        hv, g = hv if hv is not None else zeros(), g if g is not None else zeros()
        parts = [hv[n].reshape(-1) for n in self.names]
        if first:
            parts += [g[n].reshape(-1).to(self.dtype) for n in self.names]
            parts.append(torch.as_tensor(loss, dtype=self.dtype, device=self.device).reshape(1))
        flat = torch.cat(parts) * self.n
        dist.all_reduce(flat)
        flat /= self.total
        pieces = list(flat.split([*self.sizes, *(self.sizes if first else []), *([1] if first else [])]))
        hv = {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes, strict=False)}
        if not first:
            return hv, None, torch.zeros(())
        g = {n: t.view(s) for n, t, s in zip(self.names, pieces[len(self.names) :], self.shapes, strict=False)}
        return hv, g, pieces[-1][0]

    def flat_hvp(self, x: torch.Tensor) -> torch.Tensor:
        """H·x for a flat vector ``x`` (dim,) in the operator's dtype and device; returns the same layout."""
        parts = x.to(device=self.device, dtype=self.dtype).split(self.sizes)
        hv = self.hvp({n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)})
        return torch.cat([hv[n].reshape(-1) for n in self.names])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """H·x on float64 numpy vectors (scipy's side)."""
        out = self.flat_hvp(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)))
        return out.detach().double().cpu().numpy()

    def linear_operator(self):
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator((self.dim, self.dim), matvec=self.matvec, rmatvec=self.matvec, dtype=np.float64)


def distributed_ranks() -> tuple[int, int]:
    """(rank, world size) of the torchrun process group, (0, 1) without one."""
    from adapters.distributed import rank_world

    return rank_world()


def shard_eval_set(eval_set: EvalSet, rank: int, world: int) -> EvalSet:
    """Rank ``rank``'s samples of ``eval_set``: the contiguous range [rank·N/world, (rank+1)·N/world) of its
    samples in batch order, each batch cut to its part of the range (a batch whose inputs are not all per-sample
    goes whole to the rank holding its first sample). The shards partition the samples, so the ranks' sums
    add up to the single process's; a rank past the last sample gets none (its products are zeros)."""
    lo, hi = rank * eval_set.n // world, (rank + 1) * eval_set.n // world
    batches, offset, count = [], 0, 0
    for inputs, target in eval_set.batches:
        size = len(target)
        a, b = max(lo, offset) - offset, min(hi, offset + size) - offset
        if any(v.dim() == 0 or len(v) != size for v in inputs.values()):
            a, b = (0, size) if lo <= offset < hi else (0, 0)
        if a < b:
            batches.append(({k: v[a:b] for k, v in inputs.items()}, target[a:b]))
            count += b - a
        offset += size
    return EvalSet(batches, count)


def _split(inputs: dict[str, torch.Tensor], target: torch.Tensor, size: int | None):
    """A batch in consecutive pieces of at most ``size`` samples (every input's first dimension), or whole.
    The HVP is a sum over samples, so the pieces give the same product; its graph holds the activations of
    one piece instead of one evaluation batch (the part of an HVP's memory that grows with the tokens)."""
    count = len(target)
    if size is None or size >= count or any(v.dim() == 0 or len(v) != count for v in inputs.values()):
        return [(inputs, target)]
    return [({k: v[lo : lo + size] for k, v in inputs.items()}, target[lo : lo + size])
            for lo in range(0, count, size)]  # fmt: skip


def _trimmed(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal LM's piece without its trailing columns of padding (no row has a token there): a position
    after every real token is read by no real token's causal attention and scores nothing, so the loss and its
    derivatives are the same, and a length-sorted piece (``micro_batch``) runs its own length instead of its
    evaluation batch's longest. Other inputs (no ``answer_mask``: classifiers, images) are left whole."""
    mask = inputs.get("attention_mask")
    if mask is None or "answer_mask" not in inputs or mask.dim() == 0 or mask.shape[-1] == 0:
        return inputs
    length = mask.shape[-1]
    used = mask.reshape(-1, length).bool().any(0).nonzero()
    last = int(used.max()) + 1 if len(used) else length
    if last == length or any(v.dim() == 0 or v.shape[-1] != length for v in inputs.values()):
        return inputs
    return {k: v[..., :last] for k, v in inputs.items()}


def _accumulate(total: dict | None, part: dict, like: Mapping[str, torch.Tensor]) -> dict:
    """``total + part`` per name (None in ``part``: a parameter the loss does not reach, zeros)."""
    part = {n: torch.zeros_like(like[n]) if t is None else t.detach() for n, t in part.items()}
    return part if total is None else {n: total[n] + part[n] for n in total}


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and dtype == torch.float64 else t
