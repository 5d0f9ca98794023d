"""A peft adapter folder's config as this tool reads it: the bottom of :mod:`adapters.solutions`.

Shared by the ΔW readers (:mod:`adapters.solutions.deltas`) and the foreign readers above them; imports no
other module of the package."""

from __future__ import annotations

from pathlib import Path

PEFT_PREFIX = "base_model.model."
# The attributes our models keep the wrapped model in (Classifier / CausalLMScorer: backbone; CLIP: clip):
# a peft regex written for the plain model may omit them.
WRAPPERS = ("backbone", "clip")


def peft_config_of(folder: Path):
    """The adapter's peft config, with our layers for attention / convolutions registered."""
    from peft import LoraConfig, PeftConfig

    from adapters.methods import layers

    config = PeftConfig.from_pretrained(str(folder))
    if isinstance(config, LoraConfig):
        layers.register_lora(config)
    layers.install()
    # Only the weights are read: the plain PeftModel, whatever task the adapter was trained for (peft's
    # task classes, e.g. for CAUSAL_LM, expect a transformers model, not our wrapper of one).
    config.task_type = None
    for option in ("target_modules", "exclude_modules"):
        pattern = getattr(config, option, None)
        if isinstance(pattern, str) and pattern != "all-linear":  # a regex matched against full module names
            setattr(config, option, rf"(?:(?:{'|'.join(WRAPPERS)})\.)?(?:{pattern})")
    return config
