"""The updates ΔW the analysis reads from solutions: which layers, and LoRA's factors through peft."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from adapters.models.base import HEAD
from landscape.spectrum.decomposition import LowRank, as_matrix


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10`` (digits compared as numbers)."""
    # re.split with a capture group alternates text and digit runs, always starting with text,
    # so keys of different names compare element-wise str-to-str and int-to-int.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def default_layers(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The parameters of at least 2 dimensions present in every solution, in natural order."""
    solutions = list(deltas.values())
    common = set(solutions[0]).intersection(*solutions[1:]) if solutions else set()
    return sorted((n for n in common if all(sol[n].ndim >= 2 for sol in solutions)), key=natural_key)


def adapted_layers(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The matrix-shaped weights every solution changes (a convolution as out × in·kh·kw), minus the
    classification head (trained in full by all)."""
    return [n for n in default_layers(deltas) if not n.startswith(HEAD + ".")]


def lora_factors(sol) -> dict[str, LowRank]:
    """{parameter name: LowRank(B, A, scaling)} of a LoRA ``Solution``, read through peft.

    Loads the adapter with ``PeftModel.from_pretrained(copy.deepcopy(sol.base), sol.path)`` and
    takes each LoRA layer's ``lora_A['default'].weight``, ``lora_B['default'].weight`` and
    ``scaling['default']``. Layers whose update is not B·A (DoRA, convolutions) are left out:
    the caller uses their dense ΔW.
    """
    import copy

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from adapters.solution import PEFT_PREFIX, peft_config_of

    model = PeftModel.from_pretrained(copy.deepcopy(sol.base), sol.path, config=peft_config_of(sol.path))
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get("default", False):
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
            continue  # convolutional LoRA: keep the dense update
        B, A = b.weight.detach().float().clone(), a.weight.detach().float().clone()
        if getattr(module, "fan_in_fan_out", False):  # peft transposes B·A for Conv1D-style weights
            B, A = A.T.contiguous(), B.T.contiguous()
        weight = getattr(module, "adapted_weight", "weight")  # attention: in_proj_weight
        out[f"{name.removeprefix(PEFT_PREFIX)}.{weight}"] = LowRank(B, A, float(module.scaling["default"]))
    return out


def solution_deltas(sol, fast: bool = True) -> dict:
    """A solution's updates for :func:`landscape.spectrum.analyse`: LoRA layers as exact factors (fast path),
    others dense."""
    delta = dict(sol.delta())
    if fast and sol.method == "lora":
        for key, low in lora_factors(sol).items():
            if key in delta and tuple(low.shape) == tuple(as_matrix(delta[key]).shape):
                delta[key] = low
    return delta
