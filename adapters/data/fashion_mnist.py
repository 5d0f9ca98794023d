"""Fashion-MNIST (28x28 grayscale, 10 classes) read from the idx files (a real image task).

Files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-*`` (gzip or
uncompressed), from apt ``dataset-fashion-mnist``, a --data-root folder, or torchvision's download.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from adapters.data.base import Dataset, Split, balanced_indices
from adapters.errors import UserError
from adapters.network import fetch_online

CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
SIDE = 28
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_ROOT = Path.home() / ".cache" / "randlora-landscape" / "data"
DOWNLOAD_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"  # torchvision's mirror
_FILES = tuple(f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(
        f"corrupt Fashion-MNIST file {path} ({why}): delete it and reinstall with "
        "'apt-get install --reinstall dataset-fashion-mnist' or pass --data-root DIR with intact files"
    )


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """An idx file (gzip if the name ends in .gz) as a uint8 array; checks magic, dims and size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"cannot read/decompress: {e}") from e
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the idx header")
    found, *dims = struct.unpack(f">{1 + ndim}i", raw[:header])
    if found != magic:
        raise _corrupt(path, f"magic number {found}, expected {magic}")
    if ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise _corrupt(path, f"images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}")
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise _corrupt(path, f"{len(raw) - header} data bytes, header says {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def candidate_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched: an explicit data_root (itself, FashionMNIST/raw); else SYSTEM_DIR, the cache."""
    roots = [Path(data_root)] if data_root is not None else [SYSTEM_DIR, CACHE_ROOT]
    return [d for root in roots for d in (root, root / "FashionMNIST" / "raw")]


def _files_in(folder: Path) -> list[Path] | None:
    found = []
    for stem in _FILES:
        hit = next((folder / n for n in (stem + ".gz", stem) if (folder / n).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _download(root: Path) -> None:
    """torchvision's download into ``root``; fails in seconds offline (see adapters.network.fetch_online)."""

    def fetch() -> None:
        from torchvision import datasets

        for train in (True, False):
            datasets.FashionMNIST(root=str(root), train=train, download=True)

    fetch_online(fetch, DOWNLOAD_HOST)


def find_files(data_root: str | os.PathLike | None = None) -> list[Path]:
    """[train images, train labels, test images, test labels]; downloads only when data_root is None."""
    dirs = candidate_dirs(data_root)
    for d in dirs:
        if files := _files_in(d):
            return files
    why = ""
    if data_root is None:
        try:
            _download(CACHE_ROOT)
        except Exception as e:  # offline, mirror down, torchvision missing ...
            why = f"; download failed: {type(e).__name__}"
        else:
            if files := _files_in(CACHE_ROOT / "FashionMNIST" / "raw"):
                return files
    raise UserError(
        f"Fashion-MNIST not found (looked in: {', '.join(map(str, dirs))}{why}): install it with "
        "'apt-get install dataset-fashion-mnist' or pass --data-root DIR with the *-ubyte.gz files"
    )


def load(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int | None = 500,
    test_per_class: int | None = 100,
) -> Dataset:
    """Balanced subsets (None: all) of the train and t10k files as uint8 images (N, 28, 28)."""
    tr_img, tr_lab, te_img, te_lab = find_files(data_root)
    splits = []
    for img_path, lab_path, per_class, offset in ((tr_img, tr_lab, train_per_class, 0),
                                                  (te_img, te_lab, test_per_class, 1)):  # fmt: skip
        images = read_idx(img_path, IMAGES_MAGIC)
        labels = read_idx(lab_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise _corrupt(lab_path, f"{len(labels)} labels for {len(images)} images in {img_path.name}")
        if labels.size and labels.max() >= len(CLASSES):
            raise _corrupt(lab_path, f"label {labels.max()} outside 0..{len(CLASSES) - 1}")
        labels_t = torch.from_numpy(labels.astype(np.int64))
        idx = balanced_indices(labels_t, per_class, seed + offset)
        splits.append(Split(torch.from_numpy(images)[idx], labels_t[idx]))
    train, test = splits
    return Dataset(
        name="fashion-mnist",
        modality="image",
        classes=list(CLASSES),
        train=train,
        test=test,
        source=str(tr_img.parent),
        info={
            "seed": seed,
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "files": [str(p) for p in (tr_img, tr_lab, te_img, te_lab)],
            "train_counts": torch.bincount(train.labels, minlength=len(CLASSES)).tolist(),
            "test_counts": torch.bincount(test.labels, minlength=len(CLASSES)).tolist(),
        },
    )
