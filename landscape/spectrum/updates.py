"""The updates ΔW the analysis reads from solutions: which layers, LoRA's factors through peft, and each
parameter's ΔW as a lazy value (:func:`lazy_deltas`) so the analysis holds one layer at a time.

A value of an update mapping is a dense tensor, a :class:`LowRank` (LoRA's factors: the exact cheap path)
or a *lazy* update: a zero-argument callable with a ``shape`` that returns the dense fp32 ΔW when called
(:class:`LazyDelta`, wrapping :meth:`adapters.solution.Solution.module_deltas`' values).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from adapters.errors import UserError
from adapters.models.base import HEAD
from landscape.spectrum.decomposition import LowRank, is_finite


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10`` (digits compared as numbers)."""
    # re.split with a capture group alternates text and digit runs, always starting with text,
    # so keys of different names compare element-wise str-to-str and int-to-int.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def shape_of(value) -> tuple[int, ...]:
    """The shape of an update value: a tensor, a :class:`LowRank` or a lazy update (its ``shape``)."""
    if not hasattr(value, "shape"):
        raise TypeError(f"an update must be a tensor, a LowRank or a callable with a shape, not {value!r}")
    return tuple(value.shape)


def matrix_shape(shape) -> tuple[int, int]:
    """The (out, in) matrix an update of ``shape`` is analysed as (a convolution: out × in·kh·kw)."""
    return int(shape[0]), int(math.prod(shape[1:]))


def is_lazy(value) -> bool:
    """Whether an update value is computed on call (neither a tensor nor a :class:`LowRank`)."""
    return callable(value) and not isinstance(value, (torch.Tensor, LowRank))


def default_layers(deltas: Mapping[str, Mapping]) -> list[str]:
    """The parameters of at least 2 dimensions present in every solution, in natural order."""
    solutions = list(deltas.values())
    common = set(solutions[0]).intersection(*solutions[1:]) if solutions else set()
    return sorted((n for n in common if all(len(shape_of(sol[n])) >= 2 for sol in solutions)), key=natural_key)


def adapted_layers(deltas: Mapping[str, Mapping]) -> list[str]:
    """The matrix-shaped weights every solution changes (a convolution as out × in·kh·kw), minus the
    classification head (trained in full by all)."""
    return [n for n in default_layers(deltas) if not n.startswith(HEAD + ".")]


def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` sharing all its parameter and buffer tensors: peft attaches to it without a
    second copy of the weights."""
    shared = [*model.parameters(), *model.buffers()]
    return copy.deepcopy(model, memo={id(t): t for t in shared})


def lora_factors(sol) -> dict[str, LowRank]:
    """{parameter name: LowRank(B, A, scaling)} of a LoRA ``Solution``, read through peft.

    Loads the adapter with ``PeftModel.from_pretrained`` onto a skeleton of ``sol.base`` (a copy of its
    structure that shares its tensors: no second copy of the weights; the base's ``requires_grad`` flags,
    which peft clears, are put back) and takes each LoRA layer's ``lora_A['default'].weight``,
    ``lora_B['default'].weight`` and ``scaling['default']``. Layers whose update is not B·A (DoRA,
    convolutions) are left out: the caller uses their dense ΔW.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from adapters.solution import PEFT_PREFIX, peft_config_of

    flags = [(p, p.requires_grad) for p in sol.base.parameters()]
    try:
        model = PeftModel.from_pretrained(_skeleton(sol.base), sol.path, config=peft_config_of(sol.path))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
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


def randlora_factors(sol) -> dict[str, LowRank]:
    """{parameter name: LowRank(second, first, scaling, kind="randlora")} of a RandLoRA ``Solution``: peft's
    ``get_delta_weight`` is ``(second @ first)·scaling`` with ``first, second`` its ``get_scaled_bases`` (the
    shared random bases scaled by the trained λ, γ; :func:`adapters.methods.randlora.scaled_bases`), so ΔW is
    a product of an (out × K) and a (K × in) factor, K = number of bases × r, and its spectrum comes from
    them without forming ΔW. The adapter is attached as :func:`adapters.deltas.load_adapter` does (bases
    verified, the base shared and left as it was). Layers whose ΔW is not such a 2-D product (convolutions,
    ``fan_in_fan_out``) are left out: the caller uses their dense ΔW."""
    from peft.tuners.randlora.layer import RandLoraLayer

    from adapters.deltas import load_adapter
    from adapters.methods.randlora import scaled_bases
    from adapters.solution import PEFT_PREFIX

    model = load_adapter(Path(sol.path), sol.base)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, RandLoraLayer) or "default" not in getattr(module, "randlora_lambda", {}):
            continue
        if getattr(module, "fan_in_fan_out", False):
            continue
        shape = (int(module.out_features), int(module.in_features))
        lam, gam = module.randlora_lambda["default"], module.randlora_gamma["default"]
        with torch.no_grad():
            first, second = scaled_bases(module, "default", lam, gam, torch.device("cpu"), torch.float32)
        if second.ndim != 2 or (second.shape[0], first.shape[1]) != shape or second.shape[1] != first.shape[0]:
            continue
        weight = getattr(module, "adapted_weight", "weight")
        out[f"{name.removeprefix(PEFT_PREFIX)}.{weight}"] = LowRank(
            second.detach().clone(), first.detach().clone(), float(module.scaling["default"]), kind="randlora"
        )
    return out


def _factors(sol) -> dict[str, LowRank]:
    """An adapter solution's exact factors (LoRA, RandLoRA) read from its peft folder, else {}."""
    if not (Path(sol.path) / "adapter_config.json").exists():
        return {}  # an adapter held otherwise keeps its dense updates
    if sol.method == "lora":
        return lora_factors(sol)
    if sol.method == "randlora":
        return randlora_factors(sol)
    return {}


def solution_deltas(sol, fast: bool = True) -> dict:
    """A solution's updates, all resident: LoRA layers as exact factors (fast path), others dense from
    ``sol.delta()`` (the whole-model reference of :func:`lazy_deltas`)."""
    delta = dict(sol.delta())
    for key, low in (_factors(sol) if fast else {}).items():
        if key in delta and tuple(low.shape) == matrix_shape(delta[key].shape):
            delta[key] = low
    return delta


class LazyDelta:
    """One parameter's ΔW, computed when called (fp32, nothing cached); NaN/inf raises :class:`UserError`.

    ``compute``: a zero-argument callable returning the dense ΔW (e.g. an :class:`adapters.deltas.Delta`);
    ``shape``: the parameter's shape; ``label``: the solution, for the message.
    """

    def __init__(self, name: str, shape, compute: Callable[[], torch.Tensor], label: str):
        self.name, self.shape, self.label, self._compute = name, torch.Size(shape), label, compute

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        d = self._compute()
        if not is_finite(d):
            raise UserError(f"{self.label} has NaN/inf in '{self.name}': the training diverged; re-train it")
        return d

    def __repr__(self) -> str:
        return f"LazyDelta({self.name!r}, {tuple(self.shape)}, {self.label!r})"


def drops_zero_updates(sol) -> bool:
    """Whether ``sol.delta()`` leaves all-zero updates out: this tool's solutions do; one trained elsewhere
    (:mod:`adapters.foreign`: kept and reported) or given its updates explicitly (``_delta``) does not."""
    from adapters import foreign

    return getattr(sol, "_delta", None) is None and sol.info.get("source") not in foreign.SOURCES


def lazy_deltas(sol, label: str | None = None, fast: bool = True) -> dict:
    """A solution's updates for :func:`landscape.spectrum.analyse`, none computed yet: {parameter name:
    :class:`LazyDelta`} from ``sol.module_deltas(check=False)`` (safetensors read per tensor, peft's
    ``get_delta_weight`` per module), LoRA and RandLoRA layers as exact factors where peft gives them (``fast``).

    Unlike ``sol.delta()`` of this tool's solutions, all-zero updates are not left out here (that would
    compute every ΔW once more): :func:`landscape.spectrum.analysis.analyse_solutions` drops their layers
    afterwards (:func:`drops_zero_updates`). ``label`` names the solution in error messages (default: its
    path). A Solution given its updates explicitly (``_delta``) gets them, as ``delta()`` does.
    """
    label = label or f"solution {sol.path}"
    if getattr(sol, "_delta", None) is not None:  # updates given explicitly (in memory): those, as delta() does
        return solution_deltas(sol, fast)
    out: dict = {name: LazyDelta(name, d.shape, d, label) for name, d in sol.module_deltas(check=False).items()}
    for key, low in (_factors(sol) if fast else {}).items():  # LoRA, RandLoRA: from their peft folder's factors
        if key in out and tuple(low.shape) == matrix_shape(out[key].shape):
            if not is_finite(low):
                raise UserError(f"{label} has NaN/inf in '{key}': the training diverged; re-train it")
            out[key] = low
    return out
