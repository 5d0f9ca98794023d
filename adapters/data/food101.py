"""Food-101 (101 dishes, 750 train / 250 test images per class) in torchvision's ``food-101`` layout.

Files: ``food-101/images/<class>/<id>.jpg``, ``food-101/meta/classes.txt`` (one class folder name
a line; its order is the label order) and ``food-101/meta/{train,test}.json`` (``{class: ["class/id",
...]}``), under ``--data-root`` (itself or its ``food-101/``), else under the cache
``~/.cache/randlora-landscape/data``, where torchvision downloads them (about 5 GB) when online.

Images are decoded once at load time as CLIP's evaluation transform does (RGB, bicubic resize of
the shorter side to ``image_size``, centre crop) into uint8 ``(N, 3, S, S)``: the full train split
at S = 224 takes 75,750 x 150 KB = 11.4 GB of memory, so pass ``train_per_class`` /
``test_per_class`` for subsets (None: all). :func:`decode_images` is shared with :mod:`ucf101`.

Class names are the folder names with ``_`` shown as a space ("apple pie"); the raw names are in
``info["raw_class_names"]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from adapters.data import cifar100
from adapters.data.base import Dataset, Split, balanced_indices, find_or_download
from adapters.errors import UserError
from adapters.network import fetch_online

FOLDER = "food-101"
CACHE_ROOT = cifar100.CACHE_ROOT
DOWNLOAD_HOST = "data.vision.ee.ethz.ch"
FIX = f"pass --data-root DIR holding {FOLDER}/ (torchvision layout: images/, meta/classes.txt, meta/*.json)"


# --- image decoding (shared with ucf101) ----------------------------------------------------------


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def decode_image(path: str | os.PathLike, size: int, fix: str) -> np.ndarray:
    """One image as uint8 (3, size, size): RGB, bicubic resize of the shorter side, centre crop.

    Matches torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` (CLIP's eval transform).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if w <= h:
                nw, nh = size, int(size * h / w)
            else:
                nw, nh = int(size * w / h), size
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError as e:
        raise UserError(f"image {path} is missing: {fix}") from e
    except (OSError, ValueError, Image.DecompressionBombError, ZeroDivisionError) as e:
        raise UserError(f"cannot decode image {path} ({type(e).__name__}: {e}): {fix}") from e


def decode_images(paths: Sequence[str | os.PathLike], size: int, fix: str) -> torch.Tensor:
    """All ``paths`` decoded by :func:`decode_image` into uint8 (N, 3, size, size), in order (threads)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"image_size must be a positive integer, got {size!r}: pass e.g. image_size=224")
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def one(k: int) -> None:
        out[k] = decode_image(paths[k], size, fix)

    if len(paths) <= 1 or _workers() == 1:
        for k in range(len(paths)):
            one(k)
    else:
        with ThreadPoolExecutor(max_workers=_workers()) as pool:  # PIL releases the GIL while decoding
            for _ in pool.map(one, range(len(paths))):
                pass
    return torch.from_numpy(out)


# --- finding / downloading ------------------------------------------------------------------------


def candidate_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched: an explicit data_root (itself and its food-101/); else the cache's food-101/."""
    root = Path(data_root) if data_root is not None else CACHE_ROOT
    return [root, root / FOLDER]


def _complete_in(dirs: list[Path]) -> Path | None:
    """The first of ``dirs`` holding a complete food-101 (images/ and meta/), else None."""
    meta = ("classes.txt", "train.json", "test.json")
    return next((d for d in dirs if (d / "images").is_dir() and all((d / "meta" / n).is_file() for n in meta)), None)


def _download(root: Path) -> None:
    """torchvision's Food-101 download into ``root`` (extracted to root/food-101)."""

    def fetch() -> None:
        from torchvision import datasets

        datasets.Food101(root=str(root), split="train", download=True)

    fetch_online(fetch, DOWNLOAD_HOST)


def find_root(data_root: str | os.PathLike | None = None) -> Path:
    """The food-101 folder (holding images/ and meta/); downloads only when data_root is None."""
    download = None if data_root is not None else lambda: _download(CACHE_ROOT)
    return find_or_download("Food-101", candidate_dirs(data_root), _complete_in, download, FIX)


# --- reading --------------------------------------------------------------------------------------


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"corrupt Food-101 file {path} ({why}): restore it from the original archive or {FIX}")


def read_classes(root: Path) -> list[str]:
    path = root / "meta" / "classes.txt"
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, str(e)) from e
    if not names or len(set(names)) != len(names):
        raise _bad(path, "no class names" if not names else "repeated class names")
    return names


def read_split(root: Path, split: str, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    """Image paths and labels of meta/<split>.json, classes in classes.txt order."""
    path = root / "meta" / f"{split}.json"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, str(e)) from e
    if not isinstance(table, dict):
        raise _bad(path, 'expected a JSON object {class: ["class/id", ...]}')
    label_of = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for cls, items in table.items():
        if cls not in label_of:
            raise _bad(path, f"class '{cls}' is not in meta/classes.txt")
        if not isinstance(items, list) or not all(isinstance(s, str) and s.startswith(f"{cls}/") for s in items):
            raise _bad(path, f"entries of '{cls}' must be strings '{cls}/<id>'")
        paths += [root / "images" / f"{s}.jpg" for s in items]
        labels += [label_of[cls]] * len(items)
    return paths, torch.tensor(labels, dtype=torch.long)


def load(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    image_size: int = 224,
) -> Dataset:
    """Balanced subsets (None: all) of meta/train.json and meta/test.json, decoded to uint8 (N, 3, S, S)."""
    root = find_root(data_root)
    raw_names = read_classes(root)
    listed = {split: read_split(root, split, raw_names) for split in ("train", "test")}  # all checks first
    info = {"listed_images": {split: len(paths) for split, (paths, _) in listed.items()}}
    return image_dataset(
        "food101", root, listed, raw_names, train_per_class, test_per_class, image_size, seed, info, FIX
    )


def image_dataset(
    name: str,
    root: Path,
    listed: dict,
    raw_names: list[str],
    train_per_class: int | None,
    test_per_class: int | None,
    image_size: int,
    seed: int,
    info: dict,
    fix: str,
) -> Dataset:
    """Balanced selection of listed (paths, labels) per split, decoded once; shared by food101 and ucf101."""
    chosen = []
    for split, per_class, offset in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        paths, labels = listed[split]
        idx = balanced_indices(labels, per_class, seed + offset)  # both selections checked before decoding
        chosen.append(([paths[i] for i in idx.tolist()], labels[idx]))
    train, test = (Split(decode_images(paths, image_size, fix), labels) for paths, labels in chosen)
    counts = {f"{k}_counts": torch.bincount(v.labels, minlength=len(raw_names)).tolist() for k, v in
              (("train", train), ("test", test))}  # fmt: skip
    return Dataset(
        name=name,
        modality="image",
        classes=[n.replace("_", " ") for n in raw_names],
        train=train,
        test=test,
        source=str(root),
        info={
            "seed": seed, "train_per_class": train_per_class, "test_per_class": test_per_class,
            "image_size": image_size, "raw_class_names": raw_names, **info, **counts,
        },
    )  # fmt: skip
