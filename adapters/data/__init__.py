"""Dataset registry: name -> loader returning an :class:`adapters.data.base.Dataset`.

Adding a dataset is one entry in :data:`DATASETS` whose ``load`` accepts
``(data_root=None, seed=0, **options)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

from adapters.data import cifar100, commonsense, fashion_mnist, food101, ucf101, wordnet
from adapters.data.base import Dataset, Split, balanced_indices, eval_subset
from adapters.errors import UserError

__all__ = [
    "DATASETS", "Dataset", "DatasetEntry", "Split", "balanced_indices", "dataset_names", "eval_subset",
    "load_dataset",
]  # fmt: skip


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    modality: str  # "text", "image" or "lm" (prompt + candidate responses)
    description: str
    load: Callable[..., Dataset]


DATASETS: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry("wordnet", "text", "WordNet 3.0 noun gloss -> lexicographer category", wordnet.load),
        DatasetEntry("fashion-mnist", "image", "Fashion-MNIST 28x28 grayscale, 10 classes", fashion_mnist.load),
        DatasetEntry("cifar100", "image", "CIFAR-100 32x32 colour, 100 classes (torchvision files)", cifar100.load),
        DatasetEntry("food101", "image", "Food-101 dishes, 101 classes, decoded at image_size", food101.load),
        DatasetEntry("ucf101", "image", "UCF101 middle frames, 101 actions, CoOp split", ucf101.load),
        DatasetEntry(
            "commonsense", "lm", "LLM-Adapters commonsense reasoning (8 tasks), causal-LM answer loss", commonsense.load
        ),
    )
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str, data_root: str | os.PathLike | None = None, seed: int = 0, **options: object) -> Dataset:
    """Load dataset ``name``; ``options`` go to its loader (e.g. train_per_class)."""
    entry = DATASETS.get(name)
    if entry is None:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(dataset_names())}")
    params = inspect.signature(entry.load).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = ", ".join(p for p in params if p not in ("data_root", "seed"))
        raise UserError(f"unknown option(s) {', '.join(unknown)} for dataset '{name}': valid are {valid}")
    return entry.load(data_root=data_root, seed=seed, **options)
