"""CIFAR-100 (32x32 colour, 100 fine classes) read from torchvision's ``cifar-100-python`` files.

Files: ``cifar-100-python/{train,test,meta}`` (the original Python pickles: ``train``/``test`` hold a
dict with ``b"data"`` uint8 (N, 3072), row-major CHW, and ``b"fine_labels"``; ``meta`` holds
``b"fine_label_names"``), either unpacked or as the original ``cifar-100-python.tar.gz``, under
``--data-root`` (itself or its ``cifar-100-python/``), else under the cache
``~/.cache/randlora-landscape/data``, where torchvision downloads them when online.

The pickles are read with a restricted unpickler that only rebuilds numpy arrays (the only
objects the real files hold); any other global (``os.system``, ``builtins.eval`` ...) is refused
with a :class:`UserError`, so a tampered file cannot execute code.

Class names are the meta file's fine label names with ``_`` shown as a space ("aquarium fish");
the raw names are in ``info["raw_class_names"]``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from adapters.data.base import Dataset, Split, balanced_indices, find_or_download
from adapters.errors import UserError
from adapters.network import fetch_online

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
MEMBERS = ("train", "test", "meta")
SIDE = 32
NUM_CLASSES = 100
CACHE_ROOT = Path.home() / ".cache" / "randlora-landscape" / "data"
DOWNLOAD_HOST = "www.cs.toronto.edu"
FIX = f"pass --data-root DIR holding {FOLDER}/ (torchvision layout) or {ARCHIVE}"

# numpy's array-rebuilding function, whatever module this numpy version keeps it in.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles (protocol <= 2) use it for bytes; latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


# (module, name) -> object: everything the real files (and a Python 3 re-save of them) reference.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode_latin1,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`; anything else is a UserError."""

    def __init__(self, file: io.BufferedIOBase, source: str, **kwargs: object) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UserError(
                f"refusing to load {self.source}: its pickle references {module}.{name}, which a CIFAR-100 file "
                f"never contains (only numpy arrays): delete it and use the original {ARCHIVE}"
            )
        return found

    def persistent_load(self, pid: object) -> object:
        raise UserError(
            f"refusing to load {self.source}: it uses persistent ids: delete it and use the original {ARCHIVE}"
        )


def safe_unpickle(data: bytes, source: str) -> object:
    """Unpickle ``data`` (named ``source`` in errors) with :class:`SafeUnpickler`, py2 strings as bytes."""
    try:
        return SafeUnpickler(io.BytesIO(data), source, encoding="bytes").load()
    except UserError:
        raise
    except Exception as e:  # truncated / garbage pickles raise many types
        raise _corrupt(source, f"not a readable pickle: {type(e).__name__}: {e}") from e


def _corrupt(source: str, why: str) -> UserError:
    return UserError(f"corrupt CIFAR-100 file {source} ({why}): delete it and {FIX}")


# --- finding / downloading ------------------------------------------------------------------------


def candidate_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched: an explicit data_root (itself and its cifar-100-python/); else the cache."""
    root = Path(data_root) if data_root is not None else CACHE_ROOT
    return [root, root / FOLDER]


def _source_in(dirs: list[Path]) -> Path | None:
    """The first of ``dirs`` holding train/test/meta, else the first ``ARCHIVE`` among them, else None."""
    for d in dirs:
        if all((d / m).is_file() for m in MEMBERS):
            return d
    return next((d / ARCHIVE for d in dirs if (d / ARCHIVE).is_file()), None)


def _download(root: Path) -> None:
    """torchvision's CIFAR-100 download into ``root`` (the archive, extracted to root/cifar-100-python)."""

    def fetch() -> None:
        from torchvision import datasets

        datasets.CIFAR100(root=str(root), train=True, download=True)

    fetch_online(fetch, DOWNLOAD_HOST)


def find_source(data_root: str | os.PathLike | None = None) -> Path:
    """The folder holding train/test/meta (preferred) or the tar.gz; downloads only when data_root is None."""
    download = None if data_root is not None else lambda: _download(CACHE_ROOT)
    return find_or_download("CIFAR-100", candidate_dirs(data_root), _source_in, download, FIX)


# --- reading --------------------------------------------------------------------------------------


def read_members(source: str | os.PathLike) -> dict[str, bytes]:
    """Raw bytes of train, test and meta from a folder or the tar.gz (read in place, never extracted)."""
    source = Path(source)
    if source.is_dir():
        try:
            return {m: (source / m).read_bytes() for m in MEMBERS}
        except OSError as e:
            raise _corrupt(str(source), f"cannot read: {e}") from e
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(source, "r:gz") as tar:
            for info in tar:  # one sequential pass over the gzip stream
                if info.isfile() and info.name.lstrip("./") in {f"{FOLDER}/{m}" for m in MEMBERS}:
                    out[info.name.rsplit("/", 1)[-1]] = tar.extractfile(info).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise _corrupt(str(source), f"cannot read archive: {e}") from e
    missing = [m for m in MEMBERS if m not in out]
    if missing:
        raise _corrupt(str(source), f"archive lacks {', '.join(f'{FOLDER}/{m}' for m in missing)}")
    return out


def _key(d: dict, name: str, source: str) -> object:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise _corrupt(source, f"no '{name}' entry")


def _text(x: object) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def parse_meta(data: bytes, source: str) -> list[str]:
    """The 100 fine label names (raw, e.g. 'aquarium_fish') from the meta pickle."""
    meta = safe_unpickle(data, source)
    if not isinstance(meta, dict):
        raise _corrupt(source, f"holds a {type(meta).__name__}, expected a dict")
    names = _key(meta, "fine_label_names", source)
    if not isinstance(names, list | tuple) or len(names) != NUM_CLASSES:
        raise _corrupt(source, f"fine_label_names is not a list of {NUM_CLASSES} names")
    return [_text(n) for n in names]


def parse_split(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 3, 32, 32) and int64 fine labels (N,) of one split pickle."""
    batch = safe_unpickle(data, source)
    if not isinstance(batch, dict):
        raise _corrupt(source, f"holds a {type(batch).__name__}, expected a dict")
    images = _key(batch, "data", source)
    labels = _key(batch, "fine_labels", source)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2:
        raise _corrupt(source, "data is not a 2-D uint8 array")
    if images.shape[1] != 3 * SIDE * SIDE:
        raise _corrupt(source, f"data rows have {images.shape[1]} values, expected {3 * SIDE * SIDE}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise _corrupt(source, f"fine_labels are not integers: {e}") from e
    if len(labels) != len(images):
        raise _corrupt(source, f"{len(labels)} fine_labels for {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _corrupt(source, f"fine label {labels.min() if labels.min() < 0 else labels.max()} outside 0..99")
    return images.reshape(-1, 3, SIDE, SIDE), labels


def load(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Dataset:
    """Balanced subsets (None: all 500 / 100 per class) of train and test as uint8 images (N, 3, 32, 32)."""
    source = find_source(data_root)
    raw = read_members(source)
    where = (lambda m: f"{source}:{FOLDER}/{m}") if source.is_file() else (lambda m: str(source / m))
    raw_names = parse_meta(raw["meta"], where("meta"))
    splits = []
    for member, per_class, offset in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        images, labels = parse_split(raw.pop(member), where(member))
        labels_t = torch.from_numpy(labels)
        idx = balanced_indices(labels_t, per_class, seed + offset)
        splits.append(Split(torch.from_numpy(images)[idx], labels_t[idx]))
    train, test = splits
    return Dataset(
        name="cifar100",
        modality="image",
        classes=[n.replace("_", " ") for n in raw_names],
        train=train,
        test=test,
        source=str(source),
        info={
            "seed": seed,
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "raw_class_names": raw_names,
            "train_counts": torch.bincount(train.labels, minlength=NUM_CLASSES).tolist(),
            "test_counts": torch.bincount(test.labels, minlength=NUM_CLASSES).tolist(),
        },
    )
