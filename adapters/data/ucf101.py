"""UCF101 as the RandLoRA paper used it: one middle frame per video, CoOp's train/val/test split.

Expected files (CoOp's ``DATASETS.md``, section UCF101,
https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md#ucf101)::

    ucf101/
        UCF-101-midframes/<Class_Name>/<video>.jpg   # from UCF-101-midframes.zip (CoOp's Google Drive link)
        split_zhou_UCF101.json                       # CoOp's split file (its Google Drive link)

``split_zhou_UCF101.json`` has keys "train", "val" and "test", each a list of
``[path relative to UCF-101-midframes, label int, class name]``; e.g.
``["Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg", 0, "Apply_Eye_Makeup"]``. Pass
``--data-root DIR`` holding ``ucf101/`` (or the ``ucf101`` folder itself); else the cache
``~/.cache/randlora-landscape/data/ucf101`` is searched. There is no download: torchvision only
offers the raw videos, not these frames.

Train = CoOp's "train" (plus "val" with ``include_val=True``), test = CoOp's "test". Frames are
decoded like :mod:`food101` (CLIP's eval transform, uint8 ``(N, 3, S, S)``). Class names are the
split file's names with ``_`` shown as a space ("Apply Eye Makeup", as in CLIP's prompts); the raw
names are in ``info["raw_class_names"]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from adapters.data import cifar100
from adapters.data.base import Dataset
from adapters.data.food101 import image_dataset
from adapters.errors import UserError

FOLDER = "ucf101"
FRAMES = "UCF-101-midframes"
SPLIT_FILE = "split_zhou_UCF101.json"
CACHE_ROOT = cifar100.CACHE_ROOT
FIX = (
    f"download {FRAMES}.zip and {SPLIT_FILE} as CoOp's DATASETS.md describes "
    "(https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md#ucf101), put both in DIR/ucf101/ "
    "(zip unpacked) and pass --data-root DIR"
)


def candidate_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched: an explicit data_root (itself and its ucf101/); else the cache's."""
    root = Path(data_root) if data_root is not None else CACHE_ROOT
    return [root, root / FOLDER]


def find_root(data_root: str | os.PathLike | None = None) -> Path:
    """The folder holding UCF-101-midframes/ and split_zhou_UCF101.json."""
    dirs = candidate_dirs(data_root)
    for d in dirs:
        if (d / FRAMES).is_dir() and (d / SPLIT_FILE).is_file():
            return d
    raise UserError(f"UCF101 middle frames not found under {', '.join(map(str, dirs))}: {FIX}")


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"corrupt UCF101 split file {path} ({why}): {FIX}")


def read_split_file(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Raw class names (index = label) and, per split, (frame path, label) pairs."""
    path = root / SPLIT_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, str(e)) from e
    if not isinstance(table, dict) or any(not isinstance(table.get(k), list) for k in ("train", "val", "test")):
        raise _bad(path, "expected an object with lists 'train', 'val' and 'test'")
    names: dict[int, str] = {}
    splits: dict[str, list[tuple[Path, int]]] = {}
    for key in ("train", "val", "test"):
        items = []
        for k, item in enumerate(table[key]):
            ok = isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
            if not ok or isinstance(item[1], bool) or not isinstance(item[1], int) or not isinstance(item[2], str):
                raise _bad(path, f"{key}[{k}] is not [relative path, label, class name]")
            rel, label, name = item
            if label < 0 or names.setdefault(label, name) != name:
                raise _bad(path, f"{key}[{k}]: label {label} named '{name}' and '{names.get(label)}'")
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise _bad(path, f"{key}[{k}]: path '{rel}' is not relative to {FRAMES}/")
            items.append((root / FRAMES / rel, label))
        splits[key] = items
    if sorted(names) != list(range(len(names))) or not names:
        raise _bad(path, f"labels are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))], splits


def load(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    image_size: int = 224,
    include_val: bool = False,
) -> Dataset:
    """Balanced subsets (None: all) of CoOp's train (+val) and test frames, decoded to uint8 (N, 3, S, S)."""
    root = find_root(data_root)
    raw_names, table = read_split_file(root)
    parts = {"train": table["train"] + (table["val"] if include_val else []), "test": table["test"]}
    listed = {}
    for split, rows in parts.items():
        listed[split] = ([p for p, _ in rows], torch.tensor([lab for _, lab in rows], dtype=torch.long))
    info = {"include_val": include_val, "split_sizes": {k: len(v) for k, v in table.items()}}
    return image_dataset(
        "ucf101", root, listed, raw_names, train_per_class, test_per_class, image_size, seed, info, FIX
    )
