"""Atomic files and content digests: the one writer and the one fingerprint of the project.

Every result, checkpoint and solution folder is written to a temporary name beside its
destination and renamed onto it, so a reader (or a run killed at any moment, or a full
disk) sees the old file, no file, or the complete new one — never a half-written one.

:func:`digest` is the one sha256 fingerprint: of named tensors (base weights, ΔW, random
bases) or of JSON-able keys, so solutions, grid checkpoints and training checkpoints are
never combined with other weights or another configuration. :func:`file_sha256` and
:func:`torch_file_damage` tell a damaged file (a flipped byte on a failing disk or copy) from an intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the same folder; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should be readable like any file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Yield an empty temporary folder beside ``folder``; on success it replaces ``folder`` whole."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():  # two renames: the folder is never missing while a complete one exists
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def _write_stream(path: str | os.PathLike, save: Callable[[Any], None]) -> None:
    """``save(file)`` into a temporary file beside ``path``, flushed to disk and renamed onto it: the
    serialiser streams to the file, with no in-memory copy of the whole payload (a ``BytesIO`` and its
    ``getvalue()`` would hold two — a training checkpoint of an 8B model twice over in host memory)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` atomically, streamed to the file."""
    _write_stream(path, lambda f: np.savez(f, **arrays))


def write_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically, streamed to the file (training checkpoints); read back with ``weights_only=True``."""
    _write_stream(path, lambda f: torch.save(obj, f))


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write a file produced by a library that wants a path (matplotlib, plotly, safetensors)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def digest(named_tensors: Iterable[tuple[str, torch.Tensor]], length: int = 16) -> str:
    """sha256 (first ``length`` hex digits) of named tensors: names, shapes and fp32 bytes, in the given order."""
    h = hashlib.sha256()
    for name, tensor in named_tensors:
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy())  # its buffer: no bytes copy
    return h.hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes, read in ``chunk``-byte pieces (flat memory for any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def torch_file_damage(path: str | os.PathLike) -> str | None:
    """The first record of a ``torch.save`` file whose bytes fail the CRC-32 the file stores for it, or None when
    every record matches. torch's format is a zip archive with a CRC-32 per record, which ``torch.load`` does not
    check (a flipped byte loads as a wrong number); :meth:`zipfile.ZipFile.testzip` does, reading the file once in
    chunks. A file that is not a zip archive raises :class:`zipfile.BadZipFile`."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def key_digest(key: Any, length: int = 16) -> str:
    """sha256 (first ``length`` hex digits) of a JSON-able configuration key (canonical JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=json_default).encode()).hexdigest()[:length]


__all__ = [
    "atomic_folder",
    "atomic_path",
    "digest",
    "file_sha256",
    "json_default",
    "key_digest",
    "torch_file_damage",
    "write_bytes",
    "write_json",
    "write_npz",
    "write_text",
    "write_torch",
    "write_with",
]
