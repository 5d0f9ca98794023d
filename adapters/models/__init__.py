"""Model registry: a name -> a ``ModelEntry`` that builds the classifier and its encoder.

Names: the built-in models (:data:`MODELS`), open_clip architectures (``clip`` = ViT-B-32), and
``hf:ID_OR_PATH``: any Hugging Face transformers model (:mod:`adapters.models.hf`), whose entry
depends on the dataset's modality (``text`` classification or ``lm`` answer scoring) and options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapters.errors import UserError
from adapters.models import efficientnet, minilm
from adapters.models.base import HEAD, Classifier, Encoded, ModelEntry

MODELS: dict[str, ModelEntry] = {e.name: e for e in (minilm.ENTRY, minilm.TINY_ENTRY, efficientnet.ENTRY)}
# The model a dataset uses when --model is not given.
DEFAULT_MODEL = {"text": "minilm", "image": "efficientnet-lite0"}


CLIP_ALIAS = "clip"  # = open_clip ViT-B-32
HF_PREFIX = "hf:"


def model_names() -> list[str]:
    return sorted(MODELS) + [f"{CLIP_ALIAS} / any open_clip architecture (e.g. ViT-B-32)", f"{HF_PREFIX}ID_OR_PATH"]


def is_hf(name_or_entry: str | ModelEntry) -> bool:
    """Whether a model name (or entry) is a Hugging Face model, ``hf:ID_OR_PATH``."""
    name = name_or_entry.name if isinstance(name_or_entry, ModelEntry) else str(name_or_entry)
    return name.startswith(HF_PREFIX)


def get_model(name: str, modality: str = "text", options: Mapping | None = None) -> ModelEntry:
    """A registered model, an open_clip CLIP architecture (``clip`` = ViT-B-32), or ``hf:ID_OR_PATH``.

    ``modality`` (the dataset's) and ``options`` (build options, baked into the entry) matter for
    ``hf:`` models only.
    """
    if is_hf(name):
        from adapters.models import hf

        return hf.entry(name[len(HF_PREFIX) :], modality, options)
    if name in MODELS:
        return MODELS[name]
    from adapters.models import clip

    if name == CLIP_ALIAS:
        return clip.entry(clip.DEFAULT_ARCH)
    if name in clip.architectures():
        return clip.entry(name)
    raise UserError(f"unknown model '{name}': choose one of {', '.join(model_names())}")


def build_base(
    name: str, classes: Sequence[str], options: dict | None = None, seed: int = 0, modality: str = "text"
) -> nn.Module:
    """The base model ``name`` for ``classes``, built under ``seed`` with the global RNG left as it was.

    The one way every recipe and loader builds a base: randomly initialised parts (``--pretrained
    none``, the tiny test models) come out identical for the same seed, wherever they are built.
    ``modality``: the dataset's (an ``hf:`` model is a classifier for ``text``, an answer scorer for ``lm``).
    """
    entry = get_model(name, modality, options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return entry.create(list(classes), options)


def is_clip(entry: ModelEntry) -> bool:
    return "pretrained" in entry.options


__all__ = [
    "HEAD",
    "HF_PREFIX",
    "MODELS",
    "DEFAULT_MODEL",
    "build_base",
    "is_clip",
    "is_hf",
    "Classifier",
    "Encoded",
    "ModelEntry",
    "get_model",
    "model_names",
]
