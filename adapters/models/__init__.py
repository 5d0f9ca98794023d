"""Model registry: a name -> a ``ModelEntry`` that builds the classifier and its encoder."""

from __future__ import annotations

from adapters.errors import UserError
from adapters.models import efficientnet, minilm
from adapters.models.base import HEAD, Classifier, Encoded, ModelEntry

MODELS: dict[str, ModelEntry] = {e.name: e for e in (minilm.ENTRY, minilm.TINY_ENTRY, efficientnet.ENTRY)}
# The model a dataset uses when --model is not given.
DEFAULT_MODEL = {"text": "minilm", "image": "efficientnet-lite0"}


def model_names() -> list[str]:
    return sorted(MODELS)


def get_model(name: str) -> ModelEntry:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(model_names())}")
    return MODELS[name]


__all__ = ["HEAD", "MODELS", "DEFAULT_MODEL", "Classifier", "Encoded", "ModelEntry", "get_model", "model_names"]
