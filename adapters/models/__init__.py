"""Model registry: a name -> a ``ModelEntry`` that builds the classifier and its encoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapters.errors import UserError
from adapters.models import efficientnet, minilm
from adapters.models.base import HEAD, Classifier, Encoded, ModelEntry

MODELS: dict[str, ModelEntry] = {e.name: e for e in (minilm.ENTRY, minilm.TINY_ENTRY, efficientnet.ENTRY)}
# The model a dataset uses when --model is not given.
DEFAULT_MODEL = {"text": "minilm", "image": "efficientnet-lite0"}


CLIP_ALIAS = "clip"  # = open_clip ViT-B-32


def model_names() -> list[str]:
    return sorted(MODELS) + [f"{CLIP_ALIAS} / any open_clip architecture (e.g. ViT-B-32)"]


def get_model(name: str) -> ModelEntry:
    """A registered model, or an open_clip CLIP architecture (``clip`` = ViT-B-32)."""
    if name in MODELS:
        return MODELS[name]
    from adapters.models import clip

    if name == CLIP_ALIAS:
        return clip.entry(clip.DEFAULT_ARCH)
    if name in clip.architectures():
        return clip.entry(name)
    raise UserError(f"unknown model '{name}': choose one of {', '.join(model_names())}")


def build_base(name: str, classes: Sequence[str], options: dict | None = None, seed: int = 0) -> nn.Module:
    """The base model ``name`` for ``classes``, built under ``seed`` with the global RNG left as it was.

    The one way every recipe and loader builds a base: randomly initialised parts (``--pretrained
    none``, the tiny test models) come out identical for the same seed, wherever they are built.
    """
    entry = get_model(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return entry.create(list(classes), options)


def is_clip(entry: ModelEntry) -> bool:
    return "pretrained" in entry.options


__all__ = [
    "HEAD",
    "MODELS",
    "DEFAULT_MODEL",
    "build_base",
    "is_clip",
    "Classifier",
    "Encoded",
    "ModelEntry",
    "get_model",
    "model_names",
]
