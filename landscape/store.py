"""Atomic result files: every output is written to a temporary file beside it and renamed.

A reader (or a crashed run) therefore never sees a half-written ``landscape.npz``,
``spectrum.json`` or figure: the file is either the old one, absent, or complete.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


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


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write a file produced by a library that wants a path (matplotlib, plotly)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


class GridStore:
    """Finished grid points on disk, so that a killed run resumes where it died.

    Each rank owns one file ``<folder>/rank<R>.npz`` holding the points it finished, rewritten
    atomically after every point: after SIGKILL at any moment the file is the previous or the
    new complete version. Every file carries a key describing the configuration (solutions,
    chart, grid, evaluation set, dtype); files with another key are refused, so a resume never
    mixes numbers from different configurations. Resuming with another number of ranks works:
    points are merged from all files.
    """

    FIELDS = ("loss", "accuracy", "loss_se")

    def __init__(self, folder: str | os.PathLike, key: dict, rank: int = 0):
        self.folder = Path(folder)
        self.key = json.dumps(key, sort_keys=True, default=_json_default)
        self.rank = rank
        self.mine: dict[tuple[int, int], tuple[float, float, float]] = {}

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("rank*.npz")) if self.folder.is_dir() else []

    def load(self) -> dict[tuple[int, int], tuple[float, float, float]]:
        """All finished points of this configuration; a different configuration raises ValueError."""
        done: dict[tuple[int, int], tuple[float, float, float]] = {}
        for path in self.files():
            try:
                with np.load(path, allow_pickle=False) as f:
                    key = str(f["key"])
                    rows = zip(f["i"].tolist(), f["j"].tolist(), *(f[k].tolist() for k in self.FIELDS), strict=True)
                    points = {(i, j): (lo, acc, se) for i, j, lo, acc, se in rows}
            except (OSError, KeyError, ValueError) as e:
                raise ValueError(f"{path} is unreadable ({e})") from e
            if key != self.key:
                raise ValueError(f"{path} holds points of a different configuration")
            done.update(points)
            if path.name == f"rank{self.rank}.npz":
                self.mine.update(points)  # rewriting this file later must keep them
        return done

    def add(self, i: int, j: int, values: tuple[float, float, float]) -> None:
        self.mine[(i, j)] = values
        self.flush()

    def flush(self) -> None:
        points = sorted(self.mine)
        arrays = {k: np.array([self.mine[p][n] for p in points], dtype=np.float64) for n, k in enumerate(self.FIELDS)}
        write_npz(
            self.folder / f"rank{self.rank}.npz",
            key=np.array(self.key),
            i=np.array([p[0] for p in points], dtype=np.int64),
            j=np.array([p[1] for p in points], dtype=np.int64),
            **arrays,
        )

    def clear(self) -> None:
        for path in self.files():
            path.unlink()
