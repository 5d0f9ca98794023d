"""Adapters for weights that peft's tuners do not reach: attention ``in_proj_weight`` and convolutions.

peft's RandLoRA adapts only ``nn.Linear`` (and HF ``Conv1D``); its LoRA adapts
``nn.MultiheadAttention`` only together with ``out_proj`` (documented in peft's layer). The
paper adapts CLIP's q/k/v, which open_clip keeps in ``nn.MultiheadAttention.in_proj_weight``,
and we want RandLoRA on the 1×1 convolutions of EfficientNet. This module adds

- :class:`RandLoraWeight`: RandLoRA on ``nn.MultiheadAttention.in_proj_weight`` (out 3E, in E)
  and on ``nn.Conv2d.weight`` (out C_out, in C_in/groups·kh·kw). It is a peft ``RandLoraLayer``
  that uses the model's ONE shared pair of random bases (peft's ``randlora_A``/``randlora_B``
  BufferDict) and peft's own ``get_scaled_bases`` / ``get_delta_weight``, so for the same bases,
  λ and γ its ΔW equals that of a peft RandLoRA Linear of the equivalent shape.
- :class:`LoraInProj`: peft-style LoRA (``lora_A``/``lora_B`` Linears, peft's init, scale
  alpha/r) on ``in_proj_weight`` alone, registered through peft's custom-module API.

Both compute ``W + ΔW`` once per call and run the base module's own forward with that weight
(``torch.func.functional_call``): the attention or convolution code is torch's, untouched, and
autograd reaches λ, γ (or A, B) through ΔW. This is the materialised path of
:mod:`adapters.methods.randlora` (one out×K×in product per call, cheap when a call holds many
tokens or pixels).

:func:`install` teaches peft's ``RandLoraModel`` these two module types (creation, and the
size of the shared bases, which must cover them too); it is called by
:func:`adapters.methods.attach` and by solution loading, and is idempotent.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# --------------------------------------------------------------------------- shapes


def weight_name(module: nn.Module) -> str | None:
    """The name of the weight adapted in ``module`` (None when this module adds nothing for it)."""
    if isinstance(module, nn.MultiheadAttention):
        return "in_proj_weight" if module._qkv_same_embed_dim and module.in_proj_weight is not None else None
    if isinstance(module, nn.Conv2d):
        return "weight"
    return None


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of the Linear equivalent to ``module``'s adapted weight (None: not adaptable)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.MultiheadAttention) and weight_name(module):
        return 3 * module.embed_dim, module.embed_dim
    if isinstance(module, nn.Conv2d):
        w = module.weight
        return w.shape[0], math.prod(w.shape[1:])
    return None


# --------------------------------------------------------------------------- shared forward / merge


class _WeightAdapterMixin:
    """Forward with ``W + Σ ΔW`` substituted for the base module's weight; merge / unmerge in place."""

    adapted_weight: str

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in getattr(self, self.adapter_layer_names[0])]

    def base_weight(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.adapted_weight)

    def forward(self, *args, **kwargs):
        base = self.get_base_layer()
        active = self._active()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(*args, **kwargs)
        if self.merged or not active:
            return base(*args, **kwargs)
        weight = self.base_weight()
        for adapter in active:
            weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
        return torch.func.functional_call(base, {self.adapted_weight: weight}, args, kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for adapter in check_adapters_to_merge(self, adapter_names):
            weight = self.base_weight()
            merged = weight.data + self.get_delta_weight(adapter).detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.base_weight()
            weight.data -= self.get_delta_weight(adapter).detach().to(weight.dtype)


# --------------------------------------------------------------------------- RandLoRA


def _make_randlora_weight():
    from peft.tuners.randlora.layer import Linear as RandLoraLinear
    from peft.tuners.randlora.layer import RandLoraLayer

    class RandLoraWeight(_WeightAdapterMixin, nn.Module, RandLoraLayer):
        """RandLoRA on ``in_proj_weight`` of ``nn.MultiheadAttention`` or on ``nn.Conv2d.weight``."""

        def __init__(self, base_layer, randlora_A, randlora_B, adapter_name, config, r: int = 0, **kwargs):
            nn.Module.__init__(self)
            self.adapted_weight = weight_name(base_layer)
            if self.adapted_weight is None:
                raise ValueError(f"RandLoRA cannot adapt {type(base_layer).__name__} (only q=k=v embed dims)")
            # RandLoraLayer.__init__ reads (in, out) from Linear/Conv1D only; the same fields, our shape.
            self.base_layer = base_layer
            self.r, self.scaling = {}, {}
            self.randlora_dropout = nn.ModuleDict({})
            self.randlora_lambda = nn.ParameterDict({})
            self.randlora_gamma = nn.ParameterDict({})
            self.randlora_A = self.randlora_B = None
            self._disable_adapters = False
            self.merged_adapters = []
            self.cast_input_dtype_enabled = True
            self.out_features, self.in_features = linear_shape(base_layer)
            self.kwargs = kwargs
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, randlora_A, randlora_B, r, config=config)

        # peft's own maths, shared with its Linear layer (see the module docstring).
        get_scaled_bases = RandLoraLinear.get_scaled_bases

        def get_delta_weight(self, adapter) -> torch.Tensor:
            """peft's ``get_delta_weight`` in fp32 (bases cast once, shared), shaped like the adapted weight."""
            from adapters.methods.randlora import scaled_bases

            weight = self.base_weight()
            dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
            lam, gam = self.randlora_lambda[adapter], self.randlora_gamma[adapter]
            first, second = scaled_bases(self, adapter, lam, gam, weight.device, dtype)
            return ((second @ first) * self.scaling[adapter]).reshape(weight.shape)

        def __repr__(self) -> str:
            return f"randlora.{type(self).__name__}({self.adapted_weight} {self.out_features}x{self.in_features})"

    return RandLoraWeight


_CLASSES: dict[str, type] = {}


def randlora_weight_cls() -> type:
    if "randlora" not in _CLASSES:
        _CLASSES["randlora"] = _make_randlora_weight()
    return _CLASSES["randlora"]


# --------------------------------------------------------------------------- LoRA on in_proj


def _make_lora_in_proj():
    from peft.tuners.lora.layer import LoraLayer

    class LoraInProj(_WeightAdapterMixin, nn.Module, LoraLayer):
        """LoRA on ``nn.MultiheadAttention.in_proj_weight`` only (peft's adapts ``out_proj`` as well)."""

        adapted_weight = "in_proj_weight"

        def __init__(self, base_layer, adapter_name, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            if weight_name(base_layer) != "in_proj_weight":
                raise ValueError("LoRA on nn.MultiheadAttention needs equal q/k/v embedding dims")
            nn.Module.__init__(self)
            LoraLayer.__init__(self, base_layer, **kwargs)  # (in, out) = (E, 3E) for attention
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def get_delta_weight(self, adapter) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (b @ a) * self.scaling[adapter]

        def __repr__(self) -> str:
            return f"lora.LoraInProj({self.out_features}x{self.in_features})"

    return LoraInProj


def lora_in_proj_cls() -> type:
    if "lora" not in _CLASSES:
        _CLASSES["lora"] = _make_lora_in_proj()
    return _CLASSES["lora"]


def register_lora(config) -> None:
    """Route ``nn.MultiheadAttention`` targets of a peft ``LoraConfig`` to :class:`LoraInProj`."""
    config._register_custom_module({nn.MultiheadAttention: lora_in_proj_cls()})


# --------------------------------------------------------------------------- peft integration


def install() -> None:
    """Teach peft's RandLoraModel ``nn.MultiheadAttention`` and ``nn.Conv2d`` targets (idempotent).

    Creation: such targets become :class:`RandLoraWeight` (Linear / Conv1D targets are peft's as
    before). Sizing: peft sizes the shared bases from the Linear targets alone; here the same
    rule covers every target's equivalent Linear shape, so for a model of Linears alone the
    bases are exactly peft's.
    """
    from peft.tuners.randlora import model as randlora_model

    cls = randlora_model.RandLoraModel
    if getattr(cls, "_adapters_layers_installed", False):
        return
    original_create = cls._create_new_module

    def create_new_module(config, randlora_A, randlora_B, adapter_name, target, **kwargs):
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, (nn.MultiheadAttention, nn.Conv2d)):
            return randlora_weight_cls()(base, randlora_A, randlora_B, adapter_name, config=config, r=config.r)
        return original_create(config, randlora_A, randlora_B, adapter_name, target, **kwargs)

    def find_dim(self, config) -> tuple[int, int]:
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        from transformers.pytorch_utils import Conv1D

        peft_config = self._prepare_adapter_config(config, self.get_model_config(self.model))
        peft_config = _maybe_include_all_linear_layers(peft_config, self.model)
        largest = None
        for key, module in self.model.named_modules():
            if not self._check_target_module_exists(peft_config, key):
                continue
            if isinstance(module, Conv1D):
                shape = module.weight.ds_shape if hasattr(module.weight, "ds_shape") else module.weight.shape
                shape = tuple(shape[::-1])
            else:
                shape = linear_shape(module)
            if shape is None:
                continue
            largest = shape if largest is None else tuple(max(a, b) for a, b in zip(largest, shape, strict=False))
        if largest is None:
            raise ValueError("No layers types compatible with RandLora were found. Check `target_modules`.")
        return largest

    original_replace = cls._replace_module

    def replace_module(self, parent, child_name, new_module, child) -> None:
        # Unloading puts the bare base module back; peft's generic rule would copy a `.weight`
        # that nn.MultiheadAttention lacks. The base module already holds its (merged) weights.
        if isinstance(child, randlora_weight_cls()) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        original_replace(self, parent, child_name, new_module, child)

    cls._peft_create_new_module, cls._peft_find_dim = cls._create_new_module, cls._find_dim  # peft's, for tests
    cls._create_new_module = staticmethod(create_new_module)
    cls._find_dim = find_dim
    cls._replace_module = replace_module
    cls._adapters_layers_installed = True


__all__ = [
    "install",
    "linear_shape",
    "lora_in_proj_cls",
    "randlora_weight_cls",
    "register_lora",
    "weight_name",
]
