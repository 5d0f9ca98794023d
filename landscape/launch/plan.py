"""What a launcher run submits, and what it remembers: the phases and their tasks, and ``.launch/`` in the run folder.

Nothing here imports submitit: the plan is the same for the local and the Slurm executors, and tests read it.

``.launch/state.json`` holds the digest of the run's settings (:func:`settings_digest`) and, per task, the id of
the job last submitted for it and the number of attempts. ``.launch/done/<task>.json`` is written by a job as it
finishes and ``.launch/failed/<task>.json`` when it stopped on a bad input (a :class:`UserError`, which a
resubmission would not fix); both carry the digest, so the markers of other settings are ignored.
``.launch/logs/`` holds submitit's pickles and each job's stdout and stderr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapters.io import key_digest, write_json
from landscape.config import RunConfig
from landscape.config_checks import LAUNCH_OPTIONS, RANDOM_CHARTS
from landscape.run import trained_methods, training_seeds

FOLDER = ".launch"
POINTS_PER_SHARD = 64  # --shards' default: the model loads once per 64 grid points (or fewer shards)
# --curvature's probe tasks: each builds the entry's operator (the model loaded, the loss and gradient at the
# solution) once for about this many HVPs of trace and SLQ probes (the defaults' 30 + 2 x 40: two tasks)
HVPS_PER_PROBE_TASK = 60
# how the run runs, not what it computes: another value keeps the finished jobs
NOT_KEYED = (*LAUNCH_OPTIONS, "restart", "progress", "threads")


@dataclass(frozen=True)
class Task:
    """One job: its name (unique in the run), its kind (train, grid, finish) and its arguments after the config."""

    name: str
    kind: str
    args: tuple = ()


def grid_shape(config: RunConfig) -> tuple[int, int]:
    """(rows, columns) of the run's grid: a random line has the one row y = 0."""
    return (1 if config.chart == "random-line" else config.grid), config.grid


def grid_shards(config: RunConfig) -> int:
    """The number of grid shards (array tasks): ``--shards``, else one per :data:`POINTS_PER_SHARD` points; at
    most one per point."""
    rows, cols = grid_shape(config)
    points = rows * cols
    return max(1, min(points, config.shards or math.ceil(points / POINTS_PER_SHARD)))


def shard_points(config: RunConfig, shard: int, shards: int) -> list[tuple[int, int]]:
    """The grid points (i, j) of ``shard`` of ``shards``: a contiguous chunk of the points in row-major order."""
    rows, cols = grid_shape(config)
    chunk = np.array_split(np.arange(rows * cols), shards)[shard]
    return [(int(k) // cols, int(k) % cols) for k in chunk]


def path_tasks(config: RunConfig) -> list[Task]:
    """The paths' points (pair k, index of t j) as array tasks of :data:`POINTS_PER_SHARD` points or fewer: every
    point but the ends t = 0 and t = 1, which are the plane's vertices (evaluated once, by the finish job)."""
    if not config.path_points:
        return []
    from landscape.paths import PAIRS, path_axis

    t = path_axis(config.path_points, config.path_extend)
    points = [(k, j) for k in range(len(PAIRS)) for j in range(len(t)) if t[j] not in (0.0, 1.0)]
    count = max(1, math.ceil(len(points) / POINTS_PER_SHARD))
    chunks = [c for c in np.array_split(np.arange(len(points)), count) if len(c)]
    return [Task(f"path-{k}-of-{len(chunks)}", "path", ([points[i] for i in c], k)) for k, c in enumerate(chunks)]


def probe_tasks_per_entry(settings) -> int:
    """How many probe tasks an entry's trace and density probes make under the curvature ``settings``: about
    :data:`HVPS_PER_PROBE_TASK` products each (a trace probe is one, an SLQ probe ``slq_steps``), never more
    tasks than the larger of the two probe counts (so none is empty)."""
    hvps = settings.trace_probes + settings.slq_probes * settings.slq_steps
    return min(max(settings.trace_probes, settings.slq_probes), math.ceil(hvps / HVPS_PER_PROBE_TASK))


def probe_ranges(probes: int, tasks: int) -> list[tuple[int, int]]:
    """``probes`` probes as ``tasks`` contiguous ranges [start, stop), their sizes within one of each other (a
    range is empty when there are fewer probes than tasks)."""
    edges = [probes * k // tasks for k in range(tasks + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def probe_parts(settings) -> list[list[tuple[str, int, int]]]:
    """Per probe task of an entry, its parts (kind, start, stop): range k of the ``trace`` probes and range k of
    the ``density`` probes (:func:`probe_ranges`, the empty ones left out)."""
    tasks = probe_tasks_per_entry(settings)
    if not tasks:
        return []
    kinds = {"trace": probe_ranges(settings.trace_probes, tasks),
             "density": probe_ranges(settings.slq_probes, tasks)}  # fmt: skip
    return [[(kind, *ranges[k]) for kind, ranges in kinds.items() if ranges[k][1] > ranges[k][0]]
            for k in range(tasks)]  # fmt: skip


def probe_kinds(settings) -> list[tuple[str, list[tuple[int, int]]]]:
    """(kind, its ranges in order) of an entry's probe parts under the curvature ``settings``: what the finish job
    joins (:func:`landscape.launch.probes.join`)."""
    parts = [part for task in probe_parts(settings) for part in task]
    return [(kind, [(a, b) for k, a, b in parts if k == kind]) for kind in ("trace", "density")]


def curvature_tasks(config: RunConfig) -> list[Task]:
    """``--curvature``: per (solution, coordinates) entry (not FT's adapter, which it has not; not the weights of
    a 4-bit base, which are packed) one task for its top eigenvalues (Lanczos, sequential) and the probe tasks of
    :func:`probe_parts` (ranges of its trace and density probes); the finish job joins them into the entry."""
    if not config.curvature:
        return []
    from landscape.curvature import CurvatureSettings
    from landscape.curvature.settings import ADAPTER_METHODS

    settings = CurvatureSettings()  # --curvature's (its seed changes no count)
    entries = [
        (s, c)
        for s in config.method_set()
        for c in settings.coordinates
        if not (c == "adapter" and s not in ADAPTER_METHODS) and not (c == "weights" and config.load_4bit)
    ]
    tasks = []
    for s, c in entries:
        tasks.append(Task(f"curvature-{s}-{c}-eigen", "curvature", (s, c)))
        parts = probe_parts(settings)
        tasks += [Task(f"curvature-{s}-{c}-probes-{k}-of-{len(parts)}", "probes", (s, c, task))
                  for k, task in enumerate(parts)]  # fmt: skip
    return tasks


def phases(config: RunConfig, argv: Sequence[str]) -> list[tuple[str, list[Task]]]:
    """The run's phases in order, each with its tasks: every (method, seed) trained; the grid's shards (and a random
    chart's other draws) with the paths' points; the finishing run (the rest, and landscape.json, in one process)."""
    train = [Task(f"train-{m}-seed{seed}", "train", (m, seed)) for seed in training_seeds(config)
             for m in trained_methods(config, seed)]  # fmt: skip
    shards = grid_shards(config)
    draws = config.draws if config.chart in RANDOM_CHARTS else 1  # a random chart's other draws: grids alike
    grid = [Task(f"{f'draw{d}-' if d else ''}grid-{k}-of-{shards}", "grid", (shard_points(config, k, shards), k, d))
            for d in range(draws) for k in range(shards)]  # fmt: skip
    grid += path_tasks(config) + curvature_tasks(config)
    launched = {"name": config.launcher, "shards": shards}
    finish = [Task("finish", "finish", (list(argv), launched))]
    return [(name, tasks) for name, tasks in (("train", train), ("grid", grid), ("finish", finish)) if tasks]


def settings_digest(config: RunConfig) -> str:
    """The digest of what the run computes (its settings less :data:`NOT_KEYED`): the markers of finished jobs
    count only under the same digest."""
    settings = config.to_dict()
    return key_digest({k: v for k, v in settings.items() if k not in NOT_KEYED})


@dataclass
class State:
    """``.launch/state.json``: the settings' digest and the jobs submitted per task (id, attempts)."""

    folder: Path
    digest: str
    jobs: dict = field(default_factory=dict)

    @classmethod
    def open(cls, out: Path, digest: str) -> State:
        """The state of ``out``'s launcher run; a fresh one when none, unreadable, or of other settings."""
        folder = Path(out) / FOLDER
        try:
            data = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            data = {}
        jobs = data.get("jobs") if isinstance(data, dict) and data.get("digest") == digest else None
        return cls(folder, digest, jobs if isinstance(jobs, dict) else {})

    def save(self) -> None:
        write_json(self.folder / "state.json", {"digest": self.digest, "jobs": self.jobs})

    def marker(self, kind: str, name: str) -> Path:
        return self.folder / kind / f"{name}.json"

    def finished(self, name: str) -> bool:
        return _read(self.marker("done", name)).get("digest") == self.digest

    def failure(self, name: str) -> str | None:
        """The one-line error a job stopped on (a bad input), None when it did not."""
        record = _read(self.marker("failed", name))
        return record.get("error") if record.get("digest") == self.digest else None

    def give_up(self, name: str) -> None:
        """A task reported as failed: its record and ``failed`` marker go, so the next call submits it again."""
        self.jobs.pop(name, None)
        self.marker("failed", name).unlink(missing_ok=True)
        self.save()

    def forget(self) -> None:
        """Drop every job and marker (``--restart``)."""
        self.jobs = {}
        for kind in ("done", "failed"):
            for path in (self.folder / kind).glob("*.json"):
                path.unlink()


def job_seconds(config: RunConfig) -> dict[str, float]:
    """Wall time of each finished job of the run (their ``done`` markers), for landscape.json's ``launcher``."""
    digest, found = settings_digest(config), {}
    for path in sorted((Path(config.out_dir) / FOLDER / "done").glob("*.json")):
        record = _read(path)
        if record.get("digest") == digest and isinstance(record.get("seconds"), int | float):
            found[path.stem] = record["seconds"]
    return found


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(folder: Path, kind: str, name: str, digest: str, **extra) -> None:
    """A job's marker: ``done`` as it finishes, ``failed`` (with the error) when it stopped on a bad input."""
    write_json(Path(folder) / kind / f"{name}.json", {"digest": digest, **extra})


__all__ = [
    "FOLDER",
    "HVPS_PER_PROBE_TASK",
    "State",
    "Task",
    "grid_shape",
    "grid_shards",
    "job_seconds",
    "path_tasks",
    "phases",
    "probe_kinds",
    "probe_parts",
    "probe_ranges",
    "probe_tasks_per_entry",
    "settings_digest",
    "shard_points",
]
