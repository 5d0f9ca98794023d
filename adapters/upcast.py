"""Half-precision weights computed in fp32: a model stored in bf16 or fp16 runs its forward in fp32 unless autocast
says otherwise.

Why: the storage dtype says how the weights are kept, not how they multiply. A bf16 model's own forward runs every
matmul in bf16, and on a CPU without bf16 arithmetic (AVX2, or AVX-512 without AVX512-BF16 / AMX) each is emulated:
a 2-layer Qwen2-0.5B-shaped forward took 8.2 s with bf16 weights against 2.0 s in fp32 on an AMD EPYC restricted to
AVX2 (``ATEN_CPU_CAPABILITY=avx2``), and full fine-tuning's forward under bf16 autocast there ran over 6× longer
than fp32's. So the forward precision is autocast's alone, as for an fp32 model: under autocast (``--dtype
bfloat16`` / ``auto`` where the device has bf16) the layers run as they are; without it (``float32``, or ``auto``
on a device without native bf16) each half-precision weight is widened to fp32 where it is used, which is exact
(every bf16 and fp16 value is an fp32 value), and the activations stay fp32.

How (:func:`compute_in_fp32`, installed by :func:`adapters.models.hf.build` on a half-precision model):

- ``nn.Linear`` with a frozen half weight: :class:`_UpcastLinear`, ``x·Wᵀ`` with W widened at most :data:`CHUNK`
  elements at a time (an 8B model's LM head is not copied whole), and the autograd graph keeps W itself, not
  an fp32 copy (the input's gradient widens it again), so training, Hessian-vector products and the plane hold what
  they held with bf16 compute. It has a forward-mode formula and a generated vmap rule, for the grid's vmapped
  points and :mod:`landscape.curvature`'s products.
- ``nn.Embedding``: the looked-up rows are widened (the table is not).
- Any other module with its own half parameters (norms, convolutions): those parameters are widened for the call.
- A trainable half weight (not the toolkit's way: full fine-tuning keeps fp32 master weights,
  :func:`adapters.train.fp32_masters`) is widened by a differentiable cast, so its gradient still reaches it.

The weights keep their dtype and names; a module whose weight is fp32 at call time (a sharded fp32 copy, the fp32
re-evaluation's :func:`landscape.report.fp32_weights`) runs its own forward.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.nn import functional as F

HALF = (torch.float16, torch.bfloat16)
# elements of W widened at once (1 GiB in fp32): a Qwen2 LM head (136 M) whole, Llama-3-8B's (525 M) in two halves.
# Not smaller: on the 2-core EPYC restricted to AVX2, x·Wᵀ for that Qwen2 head (512 tokens) took 1.66 s whole and
# 2.11 s in 9 row blocks of fp32 W, plus 0.26 s to concatenate them, against 0.25 s to widen the whole head.
CHUNK = 1 << 28
MARK = "_adapters_fp32_compute"  # set on every module whose forward this module replaced


class _UpcastLinear(torch.autograd.Function):
    """``x·Wᵀ`` for a frozen half-precision W, in x's dtype; the backward is this same product with Wᵀ and the
    tangent's too, so differentiating it (double backward, reverse over forward) keeps no fp32 copy of W either."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK // max(1, weight.shape[1]))
        if weight.shape[0] <= rows:
            return F.linear(x, weight.to(x.dtype))
        return torch.cat([F.linear(x, weight[i : i + rows].to(x.dtype)) for i in range(0, weight.shape[0], rows)], -1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _UpcastLinear.apply(grad, ctx.weight.t()), None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, _weight_tangent) -> torch.Tensor:
        return _UpcastLinear.apply(x_tangent, ctx.weight)


def active(module: nn.Module, device_type: str) -> bool:
    """Whether ``module``'s forward widens its half weights now: installed, and no autocast on the device."""
    return getattr(module, MARK, False) and not torch.is_autocast_enabled(device_type)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in HALF else t


def _linear(module: nn.Linear, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    weight = module.weight
    if weight.dtype not in HALF or torch.is_autocast_enabled(x.device.type) or args or kwargs:
        return original(x, *args, **kwargs)
    x = _fp32(x)
    out = F.linear(x, weight.float()) if weight.requires_grad else _UpcastLinear.apply(x, weight)
    return out if module.bias is None else out + module.bias.float()


def _embedding(module: nn.Embedding, original, *args, **kwargs) -> torch.Tensor:
    out = original(*args, **kwargs)
    return out if torch.is_autocast_enabled(out.device.type) else _fp32(out)


def _widened(module: nn.Module, original, *args, **kwargs):
    """Any other module: its own half parameters widened for the call, floating inputs too."""
    device = next(module.parameters(recurse=False)).device.type
    if torch.is_autocast_enabled(device):
        return original(*args, **kwargs)
    half = {n: p for n, p in module._parameters.items() if p is not None and p.dtype in HALF}
    args = tuple(_fp32(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    try:
        for name, p in half.items():
            module._parameters[name] = p.float()  # a differentiable cast: a trainable p still gets its gradient
        return original(*args, **kwargs)
    finally:
        module._parameters.update(half)


def compute_in_fp32(model: nn.Module) -> int:
    """Install the fp32 compute of half-precision weights on every module of ``model`` that holds one (module
    docstring; idempotent). Returns how many modules it covers."""
    count = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.dtype in HALF]
        if not own or getattr(module, MARK, False):
            continue
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            replacement = _linear
        elif isinstance(module, nn.Embedding):
            replacement = _embedding
        else:
            replacement = _widened
        original = module.__dict__.get("forward") or types.MethodType(type(module).forward, module)
        module.forward = functools.partial(replacement, module, original)
        setattr(module, MARK, True)
        count += 1
    return count


def computes_in_fp32(model: nn.Module) -> bool:
    """Whether :func:`compute_in_fp32` was installed on ``model`` (a peft wrapper's base included)."""
    return any(getattr(m, MARK, False) for m in model.modules())
