"""Packed (bitsandbytes 4-bit) base weights: what every ΔW and analysis needs to know about them.

Under ``--load-4bit`` the base model's linear layers are ``bitsandbytes.nn.Linear4bit``: their weight is a
``Params4bit`` holding the NF4 codes packed two per byte (``uint8``, shape ``(n/2, 1)``) plus a
``quant_state`` (absmax per block, the code book, the logical shape and dtype). Such a weight cannot take a
gradient, an in-place ``W0 + ΔW`` or a reshape to ``(out, in)``; these helpers give its logical view:

- :func:`is_packed`: whether a parameter (or a module's ``weight``) is packed;
- :func:`logical_shape`: the ``(out, in)`` shape the packed codes stand for (the plain shape otherwise);
- :func:`dequantized_weight`: the weight the layer computes with, dense fp32 in its logical shape
  (``bitsandbytes.functional.dequantize_4bit``), on the weight's device;
- :func:`base_quantization`: what a solution records of its base (``"nf4"``/None, compute and storage dtype);
- :func:`disable_cpu_repacking`: keeps bitsandbytes from repacking weights in place on AVX512-BF16 CPUs.

bitsandbytes is imported only when a packed weight is met, so everything here works without it.
"""

from __future__ import annotations

import torch
from torch import nn


def _weight_of(obj) -> torch.Tensor | None:
    """The tensor ``obj`` stands for: itself (a tensor / parameter) or a module's ``weight`` (None if none)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, nn.Module):
        weight = getattr(obj, "weight", None)  # peft's tuner layers forward .weight to their base layer
        return weight if isinstance(weight, torch.Tensor) else None
    return None


def is_packed(param_or_module) -> bool:
    """Whether a parameter, or a module's ``weight``, holds bitsandbytes 4-bit codes (quantised already)."""
    weight = _weight_of(param_or_module)
    # Params4bit gets its quant_state when it is quantised (on .to(device) / loading): before that it
    # is an ordinary dense tensor and behaves as one.
    return weight is not None and getattr(weight, "quant_state", None) is not None


def logical_shape(param_or_module) -> torch.Size:
    """The shape the weight stands for: the quant state's ``(out, in)`` when packed, the tensor's shape otherwise."""
    weight = _weight_of(param_or_module)
    if weight is None:
        raise TypeError(f"{type(param_or_module).__name__} has no weight tensor")
    return torch.Size(weight.quant_state.shape) if is_packed(weight) else weight.shape


@torch.no_grad()
def dequantized_weight(param_or_module) -> torch.Tensor:
    """The weight as the layer computes with it, dense **fp32** in its logical shape, on its device.

    Packed: ``bitsandbytes.functional.dequantize_4bit(codes, quant_state)`` (the exact values the 4-bit
    layer multiplies by, before the cast to its compute dtype). Not packed: a detached fp32 view/copy.
    """
    weight = _weight_of(param_or_module)
    if weight is None:
        raise TypeError(f"{type(param_or_module).__name__} has no weight tensor")
    if not is_packed(weight):
        return weight.detach().float()
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()


def dequantize_into(param_or_module, out: torch.Tensor) -> torch.Tensor:
    """:func:`dequantized_weight` of a packed weight written into ``out`` (its logical shape, contiguous) when
    ``out`` has the dtype bitsandbytes dequantises to and its backend writes into a given tensor (CUDA; not its CPU
    backend, 0.50): no temporary of the weight's size. Otherwise the fp32 weight, a new tensor (one layer's scratch;
    the caller rounds it into ``out``)."""
    weight = _weight_of(param_or_module)
    state = weight.quant_state
    if out.dtype != state.dtype or not out.is_contiguous() or out.device.type == "cpu":
        return dequantized_weight(weight)
    import bitsandbytes.functional as bnb_functional

    try:
        bnb_functional.dequantize_4bit(weight.data, state, out=out)
    except NotImplementedError:
        return dequantized_weight(weight)
    return out


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep every ``Linear4bit`` of ``model`` on bitsandbytes' one exact path; returns how many layers it set.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2 here) repacks a 4-bit weight *in place* the first time the
    layer runs in eval mode without gradients: a CPU-only code layout and its absmax rounded to bf16. After
    that the layer computes other values than in training (and than ``dequantize_4bit`` gave before), the
    base's fingerprint changes, and layers narrower than a quantisation block fail. Turning that path off
    costs the bf16 kernel's speed on such CPUs and keeps every forward on the weights as loaded.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def packed_names(model: nn.Module) -> set[str]:
    """Names (``model.named_parameters()``) of the packed parameters of ``model``."""
    return {name for name, p in model.named_parameters() if is_packed(p)}


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def base_quantization(model: nn.Module) -> dict:
    """What a solution records of its base: ``{"quantization": "nf4"|"fp4"|None, "compute_dtype": str|None,
    "torch_dtype": str}``. ``torch_dtype``: the dtype the weights were loaded in (a packed weight's quant state
    keeps it; peft's ``prepare_model_for_kbit_training`` casts the other parameters to fp32); else that of the
    first floating parameter. ``compute_dtype``: the 4-bit layers' matmul dtype (None when nothing is packed)."""
    for module in model.modules():
        if is_packed(module):
            state = module.weight.quant_state
            compute = getattr(module, "compute_dtype", None) or state.dtype
            return {"quantization": str(getattr(state, "quant_type", "nf4")), "compute_dtype": _name(compute),
                    "torch_dtype": _name(state.dtype)}  # fmt: skip
    floating = (p.dtype for p in model.parameters() if p.is_floating_point())
    return {"quantization": None, "compute_dtype": None, "torch_dtype": _name(next(floating, torch.float32))}


__all__ = [
    "base_quantization",
    "dequantized_weight",
    "disable_cpu_repacking",
    "is_packed",
    "logical_shape",
    "packed_names",
]
