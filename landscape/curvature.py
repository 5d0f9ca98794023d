"""python -m landscape.curvature — curvature of the loss at a solution: the top Hessian eigenvalues
(Lanczos), the Hessian's trace (Hutchinson) and its spectral density (stochastic Lanczos quadrature).

**Objective.** H = ∇²L(θ) of the run's objective, the mean loss over the run's evaluation set —
the same objective (:mod:`adapters.objectives`) and the same samples as the plane and the paths
(``--samples N``: the first N of the same seeded permutation). The model is in eval mode (dropout
off; BatchNorm normalises with its frozen running statistics), fp32.

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

**Memory.** What grows with the tokens is the graph: the forward's activations and their tangents, about
1 MB per token at h = 512 with 4 layers in fp32 (``micro_batch`` bounds it). What does not: the coordinate
vectors (the product, the gradient of the first pass, the vector multiplied), a layer's transients and,
for RandLoRA, peft's shared random bases, which loading the adapter costs.

**Coordinates.** ``weights``: the dense weights at the solution, θ = W0 + ΔW (:meth:`Solution.model`).
By default (``weight_set="adapted"``) the adapted weights (:func:`adapters.methods.adapted_weights`,
the same for every solution) plus the classification head: every solution is measured in the same
space, the one the adapters move in. ``weight_set="plane"``: every parameter any of the run's
solutions changes — what :func:`landscape.engine.plane.solution_weights` puts on the plane; with a full
fine-tuning solution that is every parameter of the model. ``adapter``: the coordinates the
optimiser of a LoRA / RandLoRA solution sees — LoRA's A and B factors, RandLoRA's λ and γ (and the
head), as parameters of the solution's peft model loaded from its folder; full fine-tuning has no
adapter (its optimiser's coordinates are the weights), so its ``adapter`` entry is skipped.

**Algorithms** (HVPs in the model's precision on its device; Lanczos vectors in float64 on the host,
as ARPACK's are):

- Top-k eigenvalues: Lanczos with full reorthogonalisation from a seeded Gaussian start, stopped after
  the first step at which the top k Ritz pairs (the largest *algebraic*, so a negative direction is never
  mistaken for the top one) all have residual ‖Hx − θx‖ ≤ tol·|θ|. That is ARPACK's convergence test
  (``scipy.sparse.linalg.eigsh(tol=...)``), and it bounds each eigenvalue's error: for a symmetric H some
  eigenvalue lies within the residual of θ. The residual of every Ritz pair is known after each step
  without another product (β_j times the last component of its eigenvector of T_j), so the solver stops
  at the first HVP at which the answer is good enough; ARPACK instead fills a Krylov space of
  ``ncv = max(2k + 1, 20)`` vectors before its first test, so it never takes fewer than 20 products and
  then restarts in batches of ncv − k. Hand-written for that reason (a loop of 20 lines around the HVP);
  the ``lanczos_vectors`` bound (default 60) caps its memory, and past it ARPACK's implicit restarts take
  over from the top Ritz vectors (recorded in ``method``). PyHessian's power iteration with deflation
  needs one HVP per iteration per eigenvalue (``experiments.benchmarks.curvature`` measures both) and
  stops on the relative change between two iterations, which does not bound the error. scipy and our own
  operator rather than curvlinops: curvlinops' Hessian operator, exported with ``.to_scipy()``, would feed
  the same solver; it takes a ``torch.nn`` loss module and ``(X, y)`` batches (dict inputs through a
  wrapper), while the product here must go through the run's own objective (classification or the causal
  LM's answer loss), over a subset of a peft model's parameters, with the kernel and peft rewrites above
  and a count of passes — so it would add a dependency and two adapters and leave the solver unchanged.
  Memory: the Lanczos basis, up to ``lanczos_vectors`` float64 vectors of the coordinates' size (typically
  15–30 are used), lives in host memory, memory-mapped from a temporary file under the output folder when
  it exceeds 1 GiB (:mod:`landscape.lanczos`); the device holds at most k + 4 coordinate-sized vectors (the
  vector multiplied, the HVP's tangent, gradient and product). When ``k >= dim`` the Hessian is built column by column
  (``dim`` HVPs) and diagonalised exactly.
- Trace: Hutchinson, ``tr H ≈ mean_i zᵢᵀ H zᵢ`` over ``trace_probes`` Rademacher probes, with the
  standard error of that mean.
- Spectral density: SLQ (Ghorbani et al. 2019): per probe (Rademacher, normalised) ``slq_steps``
  Lanczos steps with full reorthogonalisation give a tridiagonal T whose eigenvalues θⱼ and first
  eigenvector components τⱼ² are the nodes and weights of a Gauss quadrature of the spectral
  measure; the density is the probes' mean of ``Σⱼ τⱼ² N(t; θⱼ, σ²)`` on a grid, σ = ``broadening``
  × the range of the nodes. It integrates to 1, and its mean ``Σⱼ τⱼ² θⱼ`` is an estimate of
  ``tr H / dim``. Early exit when the Krylov space is invariant (then the quadrature is exact).

Every random draw derives from ``seed`` (recorded): the same probes for every solution, so their
differences are paired.

**Outputs** (under ``--out``, default the run folder, written atomically): ``curvature.json`` — the
settings and seed, and per solution and coordinates the eigenvalues, trace ± standard error,
density grid and values (and the quadrature nodes and weights), the loss and gradient norm at the
point, the number of HVPs and the seconds of each part; ``curvature.png`` / ``.pdf`` — top
eigenvalues and densities of the solutions side by side. Each (solution, coordinates) entry is
saved as soon as it is done, under a key of everything that determines it (settings, the
solution's ΔW, the evaluation samples, the objective); a rerun after a kill reuses the entries
whose key matches and computes the rest.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import math
import sys
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapters import compat
from adapters.errors import UserError, first_line
from adapters.io import digest, key_digest, write_json, write_with
from adapters.objectives import Classification
from adapters.progress import progress_bar
from adapters.quant import is_packed, packed_names
from adapters.solution import Solution, delta_fingerprint
from landscape.engine.grid import EvalSet
from landscape.lanczos import HostBasis
from landscape.lanczos import lanczos as host_lanczos

PROG = "python -m landscape.curvature"
SOLUTION_CHOICES = ("ft", "lora", "randlora")
COORDINATES = ("weights", "adapter")
WEIGHT_SETS = ("adapted", "plane")
HVP_MODES = ("auto", "reverse-over-forward", "forward-over-reverse", "reverse-over-reverse")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ADAPTER_METHODS = ("lora", "randlora")
LANCZOS_VECTORS = 60  # float64 vectors of the coordinates' size held (on the host) by the top-k Lanczos
NO_ADAPTER = "its optimiser's coordinates are the weights"
PACKED_WEIGHTS = "the base is packed in 4 bits (--load-4bit): its weights cannot be coordinates; see adapter"

__all__ = [
    "COORDINATES",
    "CurvatureSettings",
    "HessianOperator",
    "adapter_coordinates",
    "batch_loss",
    "broadened_density",
    "curvature_at",
    "curvature_figure",
    "curvature_stage",
    "summary",
    "eval_fingerprint",
    "hutchinson_trace",
    "lanczos",
    "main",
    "slq_density",
    "top_eigenvalues",
    "weight_coordinates",
    "weight_names",
    "write_figure",
]


@dataclass(frozen=True)
class CurvatureSettings:
    """What to compute at each solution (module docstring). ``trace_probes`` / ``slq_probes`` = 0 skips."""

    top_k: int = 5
    tol: float = 1e-3  # each Ritz pair's residual ‖Hx − θx‖ <= tol·|θ| (ARPACK's test)
    lanczos_vectors: int = LANCZOS_VECTORS  # most Lanczos steps before ARPACK's restarts take over
    trace_probes: int = 30
    slq_probes: int = 2
    slq_steps: int = 40
    coordinates: tuple[str, ...] = COORDINATES
    weight_set: str = "adapted"
    include_head: bool = True
    seed: int = 0
    density_points: int = 400
    broadening: float = 0.01  # σ of the density's Gaussians, as a fraction of the range of the nodes
    dtype: str = "float32"
    hvp_batch: int | None = None  # samples per HVP forward (None: the evaluation batches); same products

    def check(self) -> None:
        """UserError naming the first bad setting and its fix."""
        ints = {"top_k": (self.top_k, 1), "trace_probes": (self.trace_probes, 0), "slq_probes": (self.slq_probes, 0),
                "slq_steps": (self.slq_steps, 2), "density_points": (self.density_points, 10),
                "lanczos_vectors": (self.lanczos_vectors, 2)}  # fmt: skip
        if self.hvp_batch is not None:
            ints["hvp_batch"] = (self.hvp_batch, 1)
        for name, (value, low) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{_flag(name)} {value!r}: must be an integer >= {low}: pass a value >= {low}")
        for name, value in (("tol", self.tol), ("broadening", self.broadening)):
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value < 1):
                default = CurvatureSettings.__dataclass_fields__[name].default
                raise UserError(f"{_flag(name)} {value!r}: must be a number in (0, 1): try {default}")
        bad = [c for c in self.coordinates if c not in COORDINATES]
        if bad or not self.coordinates:
            raise UserError(f"--coordinates {' '.join(map(str, self.coordinates))}: choose weights, adapter or both")
        if self.weight_set not in WEIGHT_SETS:
            raise UserError(f"--weight-set {self.weight_set!r}: choose one of {', '.join(WEIGHT_SETS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "coordinates": list(self.coordinates)}

    def key(self) -> dict:
        """Every setting that changes an entry's numbers (which coordinates are asked for does not)."""
        # nor how the products' passes are split (hvp_batch): the same sums, to rounding
        return {k: v for k, v in self.to_dict().items() if k not in ("coordinates", "hvp_batch")}


def _flag(name: str) -> str:
    """The command-line flag of a setting (the library's messages name the flags too)."""
    return "--" + name.replace("_", "-")


def _stream_seed(seed: int, stream: int) -> int:
    """An independent integer seed per random stream (eigen start vector, trace probes, SLQ probes)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


# --------------------------------------------------------------------------- Hessian-vector products


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
    same and cost one sequence per sample instead of one per candidate.
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
        self.batches = [
            ({k: _cast(v, self.dtype) for k, v in inputs.items()}, target)
            for i, t in eval_set.batches
            for inputs, target in _split(*view(i, t), micro_batch)
        ]
        self.n = eval_set.n
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
                        if isinstance(e, compat.OutOfMemoryError) or mode == "reverse-over-reverse":
                            raise
                        failed = f"{mode} failed ({type(e).__name__}: {first_line(e, 160)})"
                        self.note = failed if self.note is None else f"{self.note}; {failed}"
                        warnings.warn(f"curvature: {failed}; trying the next mode", RuntimeWarning, stacklevel=2)
                        continue
                    self.mode = mode
                    break
        if self.loss is None:
            self.loss = float(loss)
            self.grad_norm = float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in g.values())))
        self.hvps += 1
        self.hvp_seconds += time.perf_counter() - start
        if self.on_hvp is not None:
            self.on_hvp()
        return hv

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


def _split(inputs: dict[str, torch.Tensor], target: torch.Tensor, size: int | None):
    """A batch in consecutive pieces of at most ``size`` samples (every input's first dimension), or whole.
    The HVP is a sum over samples, so the pieces give the same product; its graph holds the activations of
    one piece instead of one evaluation batch (the part of an HVP's memory that grows with the tokens)."""
    count = len(target)
    if size is None or size >= count or any(v.dim() == 0 or len(v) != count for v in inputs.values()):
        return [(inputs, target)]
    return [({k: v[lo : lo + size] for k, v in inputs.items()}, target[lo : lo + size])
            for lo in range(0, count, size)]  # fmt: skip


def _accumulate(total: dict | None, part: dict, like: Mapping[str, torch.Tensor]) -> dict:
    """``total + part`` per name (None in ``part``: a parameter the loss does not reach, zeros)."""
    part = {n: torch.zeros_like(like[n]) if t is None else t.detach() for n, t in part.items()}
    return part if total is None else {n: total[n] + part[n] for n in total}


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and dtype == torch.float64 else t


# --------------------------------------------------------------------------- algorithms


def top_eigenvalues(
    op: HessianOperator, k: int, tol: float = 1e-3, seed: int = 0, max_vectors: int = LANCZOS_VECTORS
) -> dict:
    """The k largest (algebraic) eigenvalues, descending: Lanczos stopped as soon as they have converged
    (module docstring), ARPACK's ``eigsh`` if not within ``max_vectors`` steps, exactly for k >= dim."""
    start, before = time.perf_counter(), op.hvps
    if k >= op.dim:
        columns = [op.flat_hvp(torch.eye(op.dim, dtype=op.dtype)[j]).double().cpu().numpy() for j in range(op.dim)]
        h = np.stack(columns, axis=1)
        values, method, converged = np.linalg.eigvalsh(0.5 * (h + h.T))[::-1][:k], EXACT, True
    else:
        v0 = torch.from_numpy(np.random.default_rng(_stream_seed(seed, 0)).standard_normal(op.dim))
        stop = _RitzTest(k, tol)
        alpha, beta, basis = lanczos(op, v0 / torch.linalg.vector_norm(v0), min(op.dim, max(max_vectors, k + 1)), stop)
        with basis:
            values, converged, method = stop.values, stop.done, LANCZOS
            restart = None if converged else _top_ritz_vector(alpha, beta, basis, k)
        if not converged:  # restart ARPACK from the Ritz vectors of the top k: its implicit restarts converge
            values, converged = _eigsh(op, k, tol, restart, len(alpha))
            method = f"{LANCZOS}, then {EIGSH} from its top Ritz vectors"
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return {"eigenvalues": [float(x) for x in values], "method": method, "converged": bool(converged), "tol": tol,
            "hvps": op.hvps - before, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


LANCZOS = "lanczos (full reorthogonalisation, stopped when the top k Ritz residuals are below tol·|θ|)"
EIGSH = "scipy.sparse.linalg.eigsh (ARPACK, which='LA')"
EXACT = "exact (Hessian built from dim HVPs, numpy.linalg.eigvalsh)"


class _RitzTest:
    """Stopping rule of :func:`lanczos` for the top k: after step j, T_j = V_jᵀHV_j has Ritz pairs
    (θᵢ, V_j sᵢ) whose residual is exactly ‖H V_j sᵢ − θᵢ V_j sᵢ‖ = β_j·|s_{j,i}| (the Lanczos relation,
    kept by full reorthogonalisation) — ARPACK's convergence test, computed for free from T_j."""

    def __init__(self, k: int, tol: float):
        self.k, self.tol, self.values, self.done = k, tol, np.zeros(0), False

    def __call__(self, alpha: Sequence[float], beta: Sequence[float], next_beta: float) -> bool:
        if len(alpha) < self.k:
            return False
        theta, s = _tridiagonal_eigh(alpha, beta)
        top = np.argsort(theta)[::-1][: self.k]
        self.values = theta[top]
        residual = abs(next_beta) * np.abs(s[-1, top])
        self.done = bool(np.all(residual <= self.tol * np.abs(self.values)))
        return self.done


def _tridiagonal_eigh(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    return eigh_tridiagonal(np.asarray(alpha, dtype=np.float64), np.asarray(beta[: len(alpha) - 1], dtype=np.float64))


def _top_ritz_vector(alpha: Sequence[float], beta: Sequence[float], basis: HostBasis, k: int) -> np.ndarray:
    """The sum of the top k Ritz vectors: a start vector rich in the wanted eigenvectors."""
    theta, s = _tridiagonal_eigh(alpha, beta)
    top = np.argsort(theta)[::-1][:k]
    return basis.combine(s[:, top].sum(1), len(alpha))


def _eigsh(op: HessianOperator, k: int, tol: float, v0: np.ndarray, ncv: int) -> tuple[np.ndarray, bool]:
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    ncv = min(op.dim, max(ncv, 2 * k + 1))
    try:
        values = eigsh(op.linear_operator(), k=k, which="LA", tol=tol, v0=v0, ncv=ncv, return_eigenvectors=False)
        return values, True
    except ArpackNoConvergence as e:
        return e.eigenvalues, False


def _rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype)


def hutchinson_trace(op: HessianOperator, probes: int, seed: int = 0) -> dict:
    """tr H ≈ mean of zᵀHz over ``probes`` Rademacher vectors z, with the standard error of that mean."""
    start, before = time.perf_counter(), op.hvps
    generator = torch.Generator().manual_seed(_stream_seed(seed, 1))
    samples = []
    for _ in range(probes):
        z = _rademacher(op.dim, generator, op.dtype)  # ±1: exact in any precision
        samples.append(float((z.double() * op.flat_hvp(z).double().cpu()).sum()))
    x = np.asarray(samples)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"trace": float(x.mean()), "trace_se": se, "probes": probes, "samples": samples,
            "hvps": op.hvps - before, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def lanczos(
    op: HessianOperator,
    v: torch.Tensor,
    steps: int,
    stop: Callable[[list[float], list[float], float], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, HostBasis]:
    """At most ``steps`` Lanczos steps of the operator's Hessian from the unit vector ``v``
    (:func:`landscape.lanczos.lanczos`: full reorthogonalisation against a float64 basis in host memory,
    memory-mapped under ``op.scratch`` when large; two coordinate-sized vectors on the device). Returns
    (alpha, beta) of T and the :class:`HostBasis` (its first ``len(alpha)`` rows are used; close it)."""
    return host_lanczos(op.flat_hvp, v, steps, stop, op.device, op.dtype, op.scratch)


def slq_density(
    op: HessianOperator, steps: int, probes: int, seed: int = 0, points: int = 400, broadening: float = 0.01
) -> dict:
    """Spectral density by stochastic Lanczos quadrature (module docstring): nodes, weights, and the
    Gaussian-broadened density on a grid of ``points`` values."""
    start, before = time.perf_counter(), op.hvps
    generator = torch.Generator().manual_seed(_stream_seed(seed, 2))
    nodes, weights = [], []
    for _ in range(probes):
        z = _rademacher(op.dim, generator, torch.float64)
        alpha, beta, basis = lanczos(op, z / math.sqrt(op.dim), steps)
        basis.close()
        theta, vectors = np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
        nodes.append(theta.tolist())
        weights.append((vectors[0] ** 2).tolist())
    grid, values, sigma = broadened_density(nodes, weights, points, broadening)
    mean = float(np.mean([np.dot(t, w) for t, w in zip(nodes, weights, strict=True)]))
    return {"grid": grid.tolist(), "values": values.tolist(), "sigma": sigma, "nodes": nodes, "weights": weights,
            "mean": mean, "trace_estimate": mean * op.dim, "steps": steps, "probes": probes,
            "hvps": op.hvps - before, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def broadened_density(
    nodes: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], points: int, broadening: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean over probes of Σⱼ wⱼ N(t; θⱼ, σ²) on a grid spanning the nodes ± 5σ; σ = broadening × their range."""
    flat = np.concatenate([np.asarray(t, dtype=np.float64) for t in nodes])
    lo, hi = float(flat.min()), float(flat.max())
    sigma = broadening * (hi - lo) if hi > lo else broadening * max(abs(hi), 1.0)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    values = np.zeros_like(grid)
    for t, w in zip(nodes, weights, strict=True):
        d = (grid[:, None] - np.asarray(t)[None, :]) / sigma
        values += (np.exp(-0.5 * d * d) * np.asarray(w)[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return grid, values / len(nodes), float(sigma)


def curvature_at(op: HessianOperator, settings: CurvatureSettings, bar: tqdm | None = None) -> dict:
    """Eigenvalues, trace and density of one operator: one entry of curvature.json (without its key)."""
    start = time.perf_counter()
    parts = {}
    say = (lambda stage: bar.set_postfix_str(stage)) if bar is not None else (lambda stage: None)  # noqa: E731
    say("eigenvalues")
    parts["eigen"] = top_eigenvalues(op, settings.top_k, settings.tol, settings.seed, settings.lanczos_vectors)
    if settings.trace_probes:
        say("trace")
        parts["hutchinson"] = hutchinson_trace(op, settings.trace_probes, settings.seed)
    if settings.slq_probes:
        say("density")
        parts["density"] = slq_density(op, settings.slq_steps, settings.slq_probes, settings.seed,
                                       settings.density_points, settings.broadening)  # fmt: skip
    return {
        "dim": op.dim,
        "parameters": len(op.names),
        "loss": op.loss,
        "grad_norm": op.grad_norm,
        "eigenvalues": parts["eigen"]["eigenvalues"],
        "trace": parts["hutchinson"]["trace"] if "hutchinson" in parts else None,
        "trace_se": parts["hutchinson"]["trace_se"] if "hutchinson" in parts else None,
        **parts,
        "hvps": op.hvps,
        "hvp_mode": op.mode,
        "hvp_note": op.note,
        "seconds_per_hvp": op.hvp_seconds / max(op.hvps, 1),
        "seconds": round(time.perf_counter() - start, 3),
    }


# --------------------------------------------------------------------------- coordinates


def weight_names(
    base: nn.Module, targets: Sequence[str], weight_set: str, plane_solutions: Mapping[str, Solution], head: bool
) -> list[str]:
    """Names of the weight coordinates (module docstring), in the model's parameter order."""
    from adapters.methods import adapted_weights
    from adapters.models.base import HEAD

    if weight_set == "plane":
        # the names only: each solution's ΔW streamed one parameter at a time, never all dense at once
        chosen = {name for s in plane_solutions.values() for name, _ in s.streamed_deltas()}
    else:
        chosen = set(adapted_weights(base, targets))
    is_head = lambda n: n.startswith(HEAD + ".")  # noqa: E731
    return [n for n, _ in base.named_parameters() if (n in chosen and not is_head(n)) or (head and is_head(n))]


def weight_coordinates(solution: Solution, names: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """The dense model at the solution (a copy of the base with ΔW applied) and the weight names."""
    return solution.model(), list(names)


def adapter_coordinates(
    solution: Solution, head: bool = True, dtype: str = "float32", device: torch.device | str | None = None
) -> tuple[nn.Module, list[str]]:
    """The solution's peft model, loaded from its folder, and the names of what its optimiser trained:
    LoRA's A/B, RandLoRA's λ/γ, and (``head``) the classification head peft saves with them.

    The adapter is attached to a skeleton of the base that shares its tensors (no second copy of the weights)
    when the base's floating-point tensors are already in ``dtype`` and every tensor is on ``device`` (the
    operator's conversion or move would otherwise convert or move the shared base), else to a copy."""
    from peft import PeftModel

    from adapters.deltas import skeleton
    from adapters.methods.randlora import BASES_FILE, verify_bases
    from adapters.solution import peft_config_of

    folder = solution.path
    base = solution.base
    floating = [t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()]
    target = torch.device(device) if device is not None else None
    shared = all(t.dtype == DTYPES[dtype] for t in floating) and (target is None or all(
        t.device.type == target.type and target.index in (None, t.device.index)
        for t in (*base.parameters(), *base.buffers())))  # fmt: skip
    with warnings.catch_warnings():  # "bases regenerated from the PRNG key": verified just below
        warnings.filterwarnings("ignore", message=".*save_projection.*")
        model = PeftModel.from_pretrained(skeleton(base) if shared else copy.deepcopy(base), folder,
                                          config=peft_config_of(folder), is_trainable=True)  # fmt: skip
    if (folder / BASES_FILE).exists():
        try:
            verify_bases(model, folder)
        except ValueError as e:
            raise UserError(f"{folder}: {e}") from None
    names = [n for n, p in model.named_parameters() if p.requires_grad and (head or "modules_to_save" not in n)]
    return model, names


# --------------------------------------------------------------------------- the stage


def eval_fingerprint(eval_set: EvalSet) -> str:
    """Digest of the evaluation batches (inputs and targets, in order)."""
    return digest((f"{i}.{k}", t) for i, (inputs, target) in enumerate(eval_set.batches)
                  for k, t in [*sorted(inputs.items()), ("target", target)])  # fmt: skip


def _previous(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old.get("solutions", {}) if isinstance(old, dict) else {}


def _compute_entry(
    name: str, solution: Solution, coordinates: str, names: Sequence[str], task, eval_set: EvalSet,
    settings: CurvatureSettings, device: torch.device | str, progress: bool, scratch: Path | None = None,
) -> dict:  # fmt: skip
    """One (solution, coordinates) entry, computed."""
    flags = [(p, p.requires_grad) for p in solution.base.parameters()]
    if coordinates == "weights":
        model, chosen = weight_coordinates(solution, names)
    else:
        model, chosen = adapter_coordinates(solution, settings.include_head, settings.dtype, device)
    # bitsandbytes' 4-bit matmul is an autograd.Function without setup_context, which torch.func's
    # forward-over-reverse refuses (measured with bitsandbytes 0.50.2 on CPU): a packed base goes by
    # reverse-over-forward (its layers through _PackedMatmul), else by double backward (the note says why)
    mode = "auto"
    try:
        op = HessianOperator(model.to(device), chosen, eval_set, task.objective, settings.dtype, mode=mode,
                             micro_batch=settings.hvp_batch)  # fmt: skip
    finally:  # the operator (and peft) froze parameters an adapter's skeleton shares with the base: put back
        for p, flag in flags:
            p.requires_grad_(flag)
    op.scratch = scratch
    # one tick per HVP: each Lanczos iteration, trace probe and SLQ step (whole lines in a log)
    bar = progress_bar(desc=f"curvature {name}/{coordinates}", unit="hvp", disable=not progress, dynamic_ncols=True)
    op.on_hvp = lambda: bar.update(1)
    try:
        return {**curvature_at(op, settings, bar), "device": str(device)}
    finally:
        bar.close()


def curvature_stage(
    source,
    solutions: Mapping[str, Solution],
    eval_set: EvalSet,
    out: str | Path,
    settings: CurvatureSettings,
    device: torch.device | str = "cpu",
    progress: bool = True,
    plane_solutions: Mapping[str, Solution] | None = None,
    info: Mapping | None = None,
) -> dict:
    """Curvature of every solution in every coordinates of ``settings``; writes curvature.json after each
    entry and curvature.png/.pdf at the end, under ``out``; returns what curvature.json holds.

    ``source``: an :class:`landscape.run.OpenRun` or a :class:`landscape.run.Loaded` (its task gives the
    base model, the adapter targets and the objective). ``plane_solutions``: whose changed parameters make
    ``weight_set="plane"`` (default ``solutions``). ``info`` is merged into curvature.json (its ``title``
    also heads the figure). Entries of an earlier curvature.json in ``out`` with the same key are reused.
    """
    from adapters.solution import fingerprint

    settings.check()
    task = getattr(source, "loaded", source).task
    out = Path(out)
    names = weight_names(task.base, task.entry.targets, settings.weight_set, plane_solutions or solutions,
                         settings.include_head)  # fmt: skip
    common = {"settings": settings.key(), "base": fingerprint(task.base), "eval": eval_fingerprint(eval_set),
              "objective": task.objective.name, "weights": names}  # fmt: skip
    previous = _previous(out / "curvature.json")
    result = {**(dict(info) if info else {}), "settings": settings.to_dict(), "seed": settings.seed,
              "eval_samples": eval_set.n, "device": str(device), "complete": False, "solutions": {}}  # fmt: skip
    for name, solution in solutions.items():
        result["solutions"][name] = per = {}
        delta = delta_fingerprint(solution)
        for coordinates in settings.coordinates:
            if coordinates == "adapter" and solution.method not in ADAPTER_METHODS:
                per[coordinates] = {"skipped": f"a {solution.method} solution has no adapter: {NO_ADAPTER}"}
                continue
            if coordinates == "weights" and packed_names(task.base):
                per[coordinates] = {"skipped": PACKED_WEIGHTS}
                continue
            key = key_digest({**common, "coordinates": coordinates, "solution": delta})
            old = previous.get(name, {}).get(coordinates, {})
            if old.get("key") == key:
                per[coordinates] = {**old, "reused": True}
            else:
                entry = _compute_entry(name, solution, coordinates, names, task, eval_set, settings, device, progress,
                                       out)  # fmt: skip
                per[coordinates] = {"key": key, **entry}
            write_json(out / "curvature.json", result)  # saved as it completes: a rerun resumes here
    result["complete"] = True
    write_json(out / "curvature.json", result)
    write_figure(result, out, (info or {}).get("title"))
    return result


def summary(result: Mapping) -> dict:
    """The headline numbers of curvature.json per solution and coordinates (for landscape.json):
    top eigenvalues, trace ± SE, dimension and HVPs; a skipped entry keeps its reason."""
    keep = ("eigenvalues", "trace", "trace_se", "dim", "hvps", "skipped")
    return {name: {c: {k: e[k] for k in keep if k in e} for c, e in per.items()}
            for name, per in result["solutions"].items()}  # fmt: skip


# --------------------------------------------------------------------------- figure


def curvature_figure(result: Mapping, title: str | None = None):
    """Top eigenvalues (left) and spectral densities (right) of the solutions, one row per coordinates."""
    from matplotlib.figure import Figure

    rows = [c for c in COORDINATES if any("eigenvalues" in (s.get(c) or {}) for s in result["solutions"].values())]
    fig = Figure(figsize=(11, 3.8 * max(len(rows), 1)), layout="constrained")
    axes = fig.subplots(max(len(rows), 1), 2, squeeze=False)
    for row, coordinates in enumerate(rows):
        entries = {n: per[coordinates] for n, per in result["solutions"].items()
                   if "eigenvalues" in (per.get(coordinates) or {})}  # fmt: skip
        _figure_row(axes[row], entries, coordinates)
    if title:
        fig.suptitle(title)
    return fig


def _figure_row(axes, entries: Mapping[str, Mapping], coordinates: str) -> None:
    from matplotlib.ticker import MaxNLocator

    from landscape.render import COLORS, LABELS

    ax_eig, ax_den = axes
    peak, floor = 0.0, math.inf
    for name, entry in entries.items():
        color, label = COLORS.get(name, "#666666"), LABELS.get(name, name)
        eig = entry["eigenvalues"]
        ax_eig.plot(range(1, len(eig) + 1), eig, "o-", color=color, label=f"{label} (dim {entry['dim']:,})")
        if "density" in entry:
            d = entry["density"]
            peak = max(peak, max(d["values"]))
            floor = min(floor, _lightest_node(d))
            trace = "" if entry.get("trace") is None else f", tr = {entry['trace']:.3g} ± {entry['trace_se']:.2g}"
            ax_den.plot(d["grid"], d["values"], color=color, label=f"{label}{trace}")
    values = [v for e in entries.values() for v in e["eigenvalues"]]
    # a log axis only where the eigenvalues span a decade or more (and are all positive)
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        ax_eig.set_yscale("log")
    ax_eig.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_eig.set(xlabel="rank", ylabel="Hessian eigenvalue", title=f"top eigenvalues ({coordinates} coordinates)")
    if peak > 0:  # the bulk near 0 dwarfs the outliers (weight ~1/dim each): log density down to the lightest node
        ax_den.set_yscale("log")
        ax_den.set_ylim(max(min(floor / 3, peak * 1e-6), peak * 1e-12), peak * 3)
    ax_den.set(xlabel="eigenvalue", ylabel="density", title=f"spectral density (SLQ, {coordinates} coordinates)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def _lightest_node(density: Mapping) -> float:
    """Height of the broadened density's smallest-weight node at its centre: w / (probes · σ·√(2π))."""
    weights = [w for probe in density["weights"] for w in probe if w > 0]
    if not weights or not density["sigma"]:
        return math.inf
    return min(weights) / (len(density["weights"]) * density["sigma"] * math.sqrt(2 * math.pi))


def write_figure(result: Mapping, out: str | Path, title: str | None = None) -> list[Path]:
    fig = curvature_figure(result, title)
    out = Path(out)
    write_with(out / "curvature.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    write_with(out / "curvature.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / "curvature.png", out / "curvature.pdf"]


# ----------------------------------------------------------------------------- command line ----


def build_parser():
    from landscape.cli import Parser, positive_int

    def count(text: str) -> int:  # an integer >= 0 (0 skips)
        import argparse

        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
        return int(text)

    p = Parser(
        prog=PROG,
        description="Curvature of the loss at the solutions of a run (written by landscape.connectivity): top "
        "Hessian eigenvalues (Lanczos), Hessian trace (Hutchinson) and spectral density (SLQ).",
        epilog="Example: python -m landscape.curvature --run runs/wordnet --solutions lora randlora --top-k 5",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--solutions", nargs="+", choices=SOLUTION_CHOICES, default=None,
                   help="solutions to measure (default: those of ft lora randlora the run has)")  # fmt: skip
    p.add_argument("--top-k", type=positive_int, default=5, help="top Hessian eigenvalues (default: 5)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="Lanczos tolerance: each Ritz residual <= tol x |eigenvalue| (default: 1e-3)")  # fmt: skip
    p.add_argument("--lanczos-vectors", type=positive_int, default=LANCZOS_VECTORS,
                   help="most Lanczos vectors held (float64, the coordinates' size) before ARPACK's restarts take "
                   f"over (default: {LANCZOS_VECTORS})")  # fmt: skip
    p.add_argument("--trace-probes", type=count, default=30, help="Hutchinson probes, 0 skips (default: 30)")
    p.add_argument("--slq-probes", type=count, default=2, help="SLQ probes, 0 skips the density (default: 2)")
    p.add_argument("--slq-steps", type=positive_int, default=40, help="Lanczos steps per SLQ probe (default: 40)")
    p.add_argument(
        "--coordinates",
        choices=("weights", "adapter", "both"),
        default="both",
        help="dense weights at the solution, the adapter's own parameters, or both (default: both)",
    )
    p.add_argument("--weight-set", choices=WEIGHT_SETS, default="adapted",
                   help="weights coordinates: the adapted weights + head, or every parameter the solutions change "
                   "(the plane's) (default: adapted)")  # fmt: skip
    p.add_argument("--no-head", action="store_true", help="leave the classification head out of the coordinates")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=None,
        help="evaluation samples: the first N of the run's seeded permutation of its evaluation split, so fewer "
        "than the run's are a subset of them (default: the run's evaluation set)",
    )
    p.add_argument("--hvp-batch", type=positive_int, default=None,
                   help="samples per forward of a Hessian-vector product: fewer hold fewer activations, same "
                   "products (default: the evaluation batches)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of every random probe (default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument("--out", default=None, help="where to write curvature.{json,png,pdf} (default: the run folder)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from(args) -> CurvatureSettings:
    coordinates = COORDINATES if args.coordinates == "both" else (args.coordinates,)
    settings = CurvatureSettings(
        top_k=args.top_k, tol=args.tol, lanczos_vectors=args.lanczos_vectors, trace_probes=args.trace_probes,
        slq_probes=args.slq_probes, slq_steps=args.slq_steps, coordinates=coordinates, weight_set=args.weight_set,
        include_head=not args.no_head, seed=args.seed, hvp_batch=args.hvp_batch,
    )  # fmt: skip
    settings.check()
    return settings


def _run(argv: Sequence[str] | None = None) -> None:
    from adapters import threads
    from landscape import run as run_module
    from landscape.cli import resolve_device

    args = build_parser().parse_args(argv)
    settings = settings_from(args)  # every setting is checked before any loading
    threads.configure(args.threads)
    device = resolve_device(args.device)
    ctx = run_module.open_run(args.run, device, with_eval_set=args.samples is None)
    eval_set = ctx.eval_set
    if args.samples is not None:
        config = dataclasses.replace(ctx.loaded.config, eval_samples=args.samples)
        eval_set = run_module.eval_set(dataclasses.replace(ctx.loaded, config=config), device)
    meta = ctx.meta
    info = {k: meta.get(k) for k in ("dataset", "model", "eval_split")}
    info.update(run=str(ctx.run_dir), title=f"{meta.get('model')} on {meta.get('dataset')}: curvature at the solutions")
    out = Path(args.out) if args.out else ctx.run_dir
    chosen = args.solutions or [s for s in SOLUTION_CHOICES if s in ctx.solutions]  # --load-4bit: no ft
    missing = [s for s in chosen if s not in ctx.solutions]
    if missing:
        raise UserError(f"--solutions {' '.join(chosen)}: the run {args.run} has no {missing[0]} solution")
    solutions = {s: ctx.solutions[s] for s in dict.fromkeys(chosen)}
    result = curvature_stage(ctx, solutions, eval_set, out, settings, device, progress=not args.no_progress,
                             plane_solutions=ctx.solutions, info=info)  # fmt: skip
    print(f"wrote {out / 'curvature.json'}, {out / 'curvature.png'}, {out / 'curvature.pdf'}")
    for name, per in result["solutions"].items():
        for coordinates, e in per.items():
            if "eigenvalues" not in e:
                continue
            trace = "" if e.get("trace") is None else f"; trace {e['trace']:.4g} ± {e['trace_se']:.2g}"
            top = ", ".join(f"{v:.4g}" for v in e["eigenvalues"])
            print(f"{name:<9} {coordinates:<8} dim {e['dim']:>10,}: top eigenvalues {top}{trace} ({e['hvps']} HVPs)")


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import run_main

    try:
        return run_main(_run, argv, PROG)
    except SystemExit as e:  # argparse's one-line error (landscape.cli.Parser) or --help, as a return code
        return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
