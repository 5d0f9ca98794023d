"""Fine-tuning methods: which parameters train, and how adapters are attached (through peft).

- ``ft``: every parameter trains.
- ``head_only``: only the classification head trains (the baseline).
- ``lora``: peft LoRA on the model's targets; the head trains in full.
- ``randlora``: peft RandLoRA on the same targets; the head trains in full.

Targets are module-name suffixes (peft's rule) selecting ``nn.Linear``, ``nn.Conv2d`` and
``nn.MultiheadAttention`` (its q/k/v ``in_proj_weight``). peft adapts Linears (and LoRA adapts
convolutions); :mod:`adapters.methods.layers` adds RandLoRA on attention and convolutions and
LoRA on ``in_proj_weight`` alone, with peft's maths and the model's one set of shared bases.
Models without a trainable head (CLIP's zero-shot head) train the adapters alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adapters.errors import UserError
from adapters.methods.budget import (
    adapted_weights,
    lora_params,
    match_lora_rank,
    match_randlora_rank,
    randlora_params,
    target_shapes,
)
from adapters.models.base import HEAD

METHODS = ("ft", "lora", "randlora", "head_only")
ADAPTERS = ("lora", "randlora")
# Scale alpha/r. LoRA: the common alpha = 2r. RandLoRA: the authors recommend alpha in
# [2r, 20r]; its update is a sum of N = d/r bases with γ initialised to 1/max(in, out), so
# it needs the larger end to move as far per step as LoRA.
LORA_ALPHA_PER_RANK = 2.0
RANDLORA_ALPHA_PER_RANK = 20.0
# RandLoRA trains through adapters.methods.randlora's fast forward (same maths as peft, chooses
# per layer between peft's factored path and a materialized W + s·ΔW); False: peft's forward.
FAST_RANDLORA = True


@dataclass(frozen=True)
class MethodSpec:
    method: str
    rank: int | None = None  # adapters only
    seed: int = 0  # RandLoRA's projection_prng_key unless prng_key is given
    alpha: float | None = None  # RandLoRA alpha (None: RANDLORA_ALPHA_PER_RANK × rank)
    dropout: float = 0.0  # RandLoRA dropout (the seed: 0.05)
    prng_key: int | None = None  # RandLoRA projection_prng_key (None: seed)

    @property
    def projection_prng_key(self) -> int:
        return self.seed if self.prng_key is None else self.prng_key

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.method in ADAPTERS and (self.rank is None or self.rank < 1):
            raise UserError(f"method '{self.method}' needs a rank >= 1 (got {self.rank})")


def peft_config(spec: MethodSpec, targets: tuple[str, ...], head: bool = True):
    """peft's config for ``spec``; ``head``: the model has a trainable classification head to save."""
    from peft import LoraConfig, RandLoraConfig

    from adapters.methods import layers

    save = [HEAD] if head else None
    if spec.method == "lora":
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=LORA_ALPHA_PER_RANK * spec.rank,
            target_modules=list(targets),
            lora_dropout=0.0,
            bias="none",
            modules_to_save=save,
        )
        layers.register_lora(config)
        return config
    layers.install()
    return RandLoraConfig(
        r=spec.rank,
        randlora_alpha=RANDLORA_ALPHA_PER_RANK * spec.rank if spec.alpha is None else spec.alpha,
        target_modules=list(targets),
        randlora_dropout=spec.dropout,
        bias="none",
        modules_to_save=save,
        projection_prng_key=spec.projection_prng_key,
    )


def seed_prng_key(seed: int) -> int:
    """The RandLoRA authors' projection_prng_key for a seed: ``int(exp(seed) * 3.1415 * 1000)`` (their README)."""
    import torch

    return int(torch.exp(torch.tensor(seed)) * 3.1415 * 1000)


def has_head(model: nn.Module) -> bool:
    """Whether ``model`` has a trainable classification head (:data:`HEAD`)."""
    return isinstance(getattr(model, HEAD, None), nn.Module)


def attach(
    model: nn.Module, spec: MethodSpec, targets: tuple[str, ...], fast_randlora: bool | None = None
) -> nn.Module:
    """Return the module to train, with exactly the method's parameters trainable.

    ``fast_randlora`` (default: :data:`FAST_RANDLORA`) installs the fast RandLoRA forward.
    """
    if spec.method in ADAPTERS:
        from peft import get_peft_model

        if not target_shapes(model, targets):
            raise UserError(
                f"no nn.Linear, nn.Conv2d or nn.MultiheadAttention matches the adapter targets {list(targets)}: "
                "pass other --targets"
            )
        peft_model = get_peft_model(model, peft_config(spec, targets, head=has_head(model)))
        _check_only_head_saved(peft_model)
        if spec.method == "randlora" and (FAST_RANDLORA if fast_randlora is None else fast_randlora):
            from adapters.methods.randlora import enable_fast_randlora

            enable_fast_randlora(peft_model)
        return peft_model
    if spec.method == "ft":
        from adapters.quant import packed_names

        if packed_names(model):  # packed uint8 codes: no gradient, no optimizer step can change them
            raise UserError("full fine-tuning cannot train a base loaded in 4 bits: train lora / randlora on it, or "
                            "load the base without --load-4bit")  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(spec.method == "ft" or name.startswith(HEAD + "."))
    return model


def _check_only_head_saved(peft_model: nn.Module) -> None:
    """peft picks modules_to_save by name suffix; make sure it wrapped the classification head alone."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    stray = [n for n in wrapped if not n.endswith("model." + HEAD)]
    if stray:
        raise UserError(f"peft would train {stray} in full besides the head: rename those modules")


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ADAPTERS",
    "adapted_weights",
    "METHODS",
    "MethodSpec",
    "attach",
    "has_head",
    "lora_params",
    "match_lora_rank",
    "match_randlora_rank",
    "peft_config",
    "randlora_params",
    "seed_prng_key",
    "target_shapes",
    "trainable_params",
]
