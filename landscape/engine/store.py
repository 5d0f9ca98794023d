"""Result files of the output contract and the grid checkpoints.

Every output is written atomically through :mod:`adapters.io` (re-exported here): a reader, or
a run killed at any moment, never sees a half-written ``landscape.npz``, ``spectrum.json`` or
figure. :class:`GridStore` keeps finished grid points so a killed run resumes where it died.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from adapters.io import atomic_path, json_default, write_bytes, write_json, write_npz, write_text, write_with


class GridStore:
    """Finished grid points on disk, so that a killed run resumes where it died.

    Each rank owns one file ``<folder>/rank<R>.npz`` holding the points it finished, rewritten
    atomically after every point: after SIGKILL at any moment the file is the previous or the
    new complete version. Every rank reads every file on resume (so a rank's rewrite keeps the
    points it saved before), and resuming with another number of ranks works: points are
    merged from all files.

    Every file carries the key of its configuration, ``{"config": ..., "solutions": ...}``: the
    run's settings (model, chart, grid, evaluation set, dtype), known before any training, and
    the fingerprints of the solutions' ΔW. :meth:`check` compares the settings up front, before
    any training; :meth:`load` compares the whole key. A mismatch raises :class:`StaleGrid`, so
    a resume never mixes numbers from different configurations.
    """

    FIELDS = ("loss", "accuracy", "loss_se")

    def __init__(self, folder: str | os.PathLike, config: dict, solutions: dict | None = None, rank: int = 0):
        self.folder = Path(folder)
        self.config = _canonical(config)
        self.solutions = _canonical(solutions or {})
        self.rank = rank
        self.mine: dict[tuple[int, int], tuple[float, float, float]] = {}

    def set_solutions(self, solutions: dict) -> None:
        """The second part of the key, known once the solutions are trained (their ΔW fingerprints)."""
        self.solutions = _canonical(solutions)

    @property
    def key(self) -> str:
        return json.dumps({"config": self.config, "solutions": self.solutions}, sort_keys=True)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("rank*.npz")) if self.folder.is_dir() else []

    def _read(self, path: Path) -> tuple[dict, dict[tuple[int, int], tuple[float, float, float]]]:
        try:
            with np.load(path, allow_pickle=False) as f:
                key = json.loads(str(f["key"]))
                rows = zip(f["i"].tolist(), f["j"].tolist(), *(f[k].tolist() for k in self.FIELDS), strict=True)
                return key, {(i, j): (lo, acc, se) for i, j, lo, acc, se in rows}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile: truncated, bad CRC
            raise StaleGrid(f"{path.name} is unreadable ({type(e).__name__})") from e

    def check(self) -> None:
        """Raise :class:`StaleGrid` if a file holds points of other settings (the solutions aside)."""
        for path in self.files():
            key, _ = self._read(path)
            if not isinstance(key, dict) or key.get("config") != self.config:
                raise StaleGrid(f"{path.name} holds points of a different configuration: other settings")

    def load(self) -> dict[tuple[int, int], tuple[float, float, float]]:
        """All finished points of this configuration (every file); another configuration raises StaleGrid."""
        done: dict[tuple[int, int], tuple[float, float, float]] = {}
        for path in self.files():
            key, points = self._read(path)
            if key != {"config": self.config, "solutions": self.solutions}:
                raise StaleGrid(f"{path.name} holds points of a different configuration: other settings or solutions")
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


class SampleStore(GridStore):
    """A :class:`GridStore` whose points also keep their per-sample losses: the points of the paths between the
    solutions (i = the pair, j = the index of t), whose barriers' paired errors need them. A launcher's path task
    writes them (:mod:`landscape.launch`); the run that gathers reads them back bit for bit."""

    def _read(self, path: Path) -> tuple[dict, dict]:
        try:
            with np.load(path, allow_pickle=False) as f:
                key = json.loads(str(f["key"]))
                rows = zip(f["i"].tolist(), f["j"].tolist(), *(f[k].tolist() for k in self.FIELDS), f["samples"],
                           strict=True)  # fmt: skip
                return key, {(i, j): (lo, acc, se, sam.copy()) for i, j, lo, acc, se, sam in rows}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise StaleGrid(f"{path.name} is unreadable ({type(e).__name__})") from e

    def drop_stale(self) -> None:
        """Remove the files of other keys (or unreadable): a stage's points are redone when its inputs change."""
        for path in self.files():
            try:
                stale = self._read(path)[0] != {"config": self.config, "solutions": self.solutions}
            except StaleGrid:
                stale = True
            if stale:
                path.unlink(missing_ok=True)

    def flush(self) -> None:
        points = sorted(self.mine)
        arrays = {k: np.array([self.mine[p][n] for p in points], dtype=np.float64) for n, k in enumerate(self.FIELDS)}
        samples = np.stack([np.asarray(self.mine[p][3]) for p in points]) if points else np.zeros((0, 0))
        write_npz(self.folder / f"rank{self.rank}.npz", key=np.array(self.key), samples=samples,
                  i=np.array([p[0] for p in points], dtype=np.int64), j=np.array([p[1] for p in points],
                  dtype=np.int64), **arrays)  # fmt: skip


class StaleGrid(ValueError):
    """The grid folder holds points of another configuration (or an unreadable file)."""


def _canonical(obj) -> object:
    """``obj`` as it reads back from JSON (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=json_default))


__all__ = [
    "GridStore",
    "SampleStore",
    "StaleGrid",
    "atomic_path",
    "write_bytes",
    "write_json",
    "write_npz",
    "write_text",
    "write_with",
]
