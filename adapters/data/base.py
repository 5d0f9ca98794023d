"""Common containers for classification datasets and the seeded subset helpers.

Every loader in :mod:`adapters.data` returns a :class:`Dataset` of two :class:`Split` s.
Subsets are drawn with :func:`balanced_indices` (training/test sets) and
:func:`eval_subset` (the fixed evaluation batch of the loss landscape); both are
deterministic functions of their seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.errors import UserError


@dataclass
class Split:
    """Inputs and int64 labels of one split.

    ``inputs`` is a list of str (text) or a uint8 tensor ``(N, H, W)`` / ``(N, C, H, W)`` (images).
    """

    inputs: list[str] | torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"Split has {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Split:
        """The samples at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if isinstance(self.inputs, torch.Tensor):
            inputs: list[str] | torch.Tensor = self.inputs[idx]
        else:
            inputs = [self.inputs[i] for i in idx.tolist()]
        return Split(inputs=inputs, labels=self.labels[idx])


@dataclass
class Dataset:
    """A classification dataset: class names (index = label), train and test splits, provenance."""

    name: str
    modality: str  # "text" or "image"
    classes: list[str]
    train: Split
    test: Split
    source: str  # the folder/files it was read from
    info: dict = field(default_factory=dict)  # recorded in run metadata (seed, counts, categories ...)
    objective: str = "classification"  # the name in adapters.objectives.OBJECTIVES it is scored with


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def balanced_indices(labels: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class present in ``labels`` (None: all samples).

    Per class (ascending label) the first ``per_class`` of a seeded permutation; the union is then
    put in a seeded random order so classes are interleaved. Deterministic in ``seed``.
    """
    if per_class is not None and per_class < 1:
        raise UserError(f"per-class sample count must be >= 1, got {per_class}: pass a positive number")
    labels = torch.as_tensor(labels).reshape(-1)
    g = _generator(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).reshape(-1)
        if per_class is not None and len(members) < per_class:
            raise UserError(
                f"class {c} has only {len(members)} samples but {per_class} per class were requested: "
                f"ask for at most {len(members)} per class"
            )
        perm = torch.randperm(len(members), generator=g)
        chosen.append(members[perm if per_class is None else perm[:per_class]])
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    out = torch.cat(chosen)
    return out[torch.randperm(len(out), generator=g)]


def eval_subset(split: Split, n: int | None, seed: int) -> Split:
    """First ``n`` samples of a seeded permutation of ``split`` (n None or >= len: all, permuted)."""
    perm = torch.randperm(len(split), generator=_generator(seed))
    if n is not None:
        if n < 1:
            raise UserError(f"evaluation subset size must be >= 1, got {n}: pass a positive number")
        perm = perm[:n]
    return split.subset(perm)


def find_or_download(
    name: str,
    dirs: list[Path],
    locate: Callable[[list[Path]], Path | None],
    download: Callable[[], None] | None,
    fix: str,
) -> Path:
    """What ``locate`` finds in ``dirs``; else, with a ``download`` (no --data-root given), what it finds after
    downloading. Anything else is one line naming the folders looked in, why the download failed, and ``fix``."""
    if (found := locate(dirs)) is not None:
        return found
    looked = ", ".join(map(str, dirs))
    if download is None:
        raise UserError(f"{name} not found under {looked}: {fix}")
    try:
        download()
    except Exception as e:  # offline, server down, torchvision missing ...
        why = f"download failed (offline? {type(e).__name__}: {e})"
        raise UserError(f"{name} not found under {looked} and {why}: {fix}") from e
    if (found := locate(dirs)) is not None:
        return found
    raise UserError(f"{name}: the download left nothing usable under {looked}: {fix}")
