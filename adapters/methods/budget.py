"""Trainable-parameter counts of LoRA and RandLoRA in closed form, and budget matching.

For a weight of shape (out, in), with d = min(in, out) (attention ``in_proj_weight``: (3E, E);
a convolution: (C_out, C_in/groups·kh·kw), the Linear it equals on unfolded patches):
  LoRA rank r:      r · (in + out)                 (A is r×in, B is out×r)
  RandLoRA rank r:  N · (r + d),  N = ceil(d / r)  (λ is r×N, γ is N×d; peft's layout)
Lowering RandLoRA's r raises its count. Counts exclude the classification head, which
every method trains in full and so adds equally to each.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from torch import nn

Shape = tuple[int, int]


def lora_params(shapes: Iterable[Shape], r: int) -> int:
    return sum(r * (out + inp) for out, inp in shapes)


def randlora_params(shapes: Iterable[Shape], r: int) -> int:
    total = 0
    for out, inp in shapes:
        d = min(out, inp)
        total += math.ceil(d / r) * (r + d)
    return total


def _closest(candidates: range, count, target: int) -> int:
    # Ties go to the smaller rank (cheaper), deterministic.
    return min(candidates, key=lambda r: (abs(count(r) - target), r))


def match_lora_rank(shapes: Sequence[Shape], randlora_rank: int) -> int:
    """LoRA rank whose trainable count is closest to RandLoRA's at ``randlora_rank``."""
    target = randlora_params(shapes, randlora_rank)
    max_rank = max(min(s) for s in shapes)
    return _closest(range(1, max_rank + 1), lambda r: lora_params(shapes, r), target)


def match_randlora_rank(shapes: Sequence[Shape], lora_rank: int) -> int:
    """RandLoRA rank whose trainable count is closest to LoRA's at ``lora_rank``."""
    target = lora_params(shapes, lora_rank)
    max_rank = max(min(s) for s in shapes)
    return _closest(range(1, max_rank + 1), lambda r: randlora_params(shapes, r), target)


def matches_target(module_name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the full name, or a dotted suffix of it."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def adapted_weights(model: nn.Module, targets: Sequence[str]) -> dict[str, Shape]:
    """{parameter name: (out, in)} of every weight that ``targets`` selects (peft's suffix rule), in
    module order: an nn.Linear's ``weight``, nn.MultiheadAttention's ``in_proj_weight`` (3E, E), an
    nn.Conv2d's ``weight`` as its equivalent Linear (C_out, C_in/groups·kh·kw). The classification
    head is never adapted. This is the one rule used by training, budgets, benchmarks and checks."""
    from adapters.methods.layers import linear_shape, weight_name
    from adapters.models.base import HEAD

    out = {}
    for name, m in model.named_modules():
        if name == HEAD or name.startswith(HEAD + ".") or not matches_target(name, targets):
            continue
        shape = linear_shape(m)
        weight = "weight" if isinstance(m, nn.Linear | nn.Conv2d) else weight_name(m)
        if shape is not None and weight is not None:
            out[f"{name}.{weight}" if name else weight] = shape
    return out


def target_shapes(model: nn.Module, targets: Sequence[str]) -> list[Shape]:
    """(out, in) of every adaptable weight that ``targets`` selects (see :func:`adapted_weights`)."""
    return list(adapted_weights(model, targets).values())
