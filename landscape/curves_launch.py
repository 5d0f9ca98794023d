"""``python -m landscape.curves --launcher local|slurm``: a trained curve as submitit jobs (:mod:`landscape.launch`).

The command is cut into the launcher's phases, submitted, gathered and resubmitted by
:func:`landscape.launch.drive` itself (its markers, attempts and ``--wait``):

1. ``train``: one job per curve (the run's training seed's, and each extra seed's of a ``--seeds N`` run unless
   ``--one-seed``), which trains the bends and keeps the training checkpoint, written at the last step;
2. ``points``: a job array, each task a contiguous chunk of the curve's points (row ``curve`` or ``line``, index
   of t), at most :data:`landscape.launch.plan.POINTS_PER_SHARD` per task (``--shards``: that many per curve). A
   task resumes the bends from the checkpoint (no step left to train) and stores each point with its per-sample
   losses in ``curves/.<A>-<B>-points/rank<K>.npz`` (:class:`landscape.engine.store.SampleStore`, keyed by the
   curve's key, its points and precision), so the barriers' paired errors are those of one process;
3. ``finish``: the command in one process: the bends resumed, every point read back, the files written (and the
   checkpoint then removed), as a run without ``--launcher`` writes them.

The launcher's state lives in ``curves/.<A>-<B>-launch/.launch/`` (not the run's ``.launch/``: the run's own
launcher state is left alone), keyed by the curve's options less the cluster ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.io import key_digest
from landscape import paths
from landscape.curves_cli import LAUNCH_FLAGS, ROWS, build_parser, check_args, cluster_config, curve_folder
from landscape.engine import store
from landscape.launch.plan import POINTS_PER_SHARD, Task

# how the curve runs, not what it computes: another value keeps the finished jobs
NOT_KEYED = (*(flag[2:].replace("-", "_") for flag in LAUNCH_FLAGS), "threads", "no_progress")


def launch_dir(args, pair: tuple[str, str]) -> Path:
    """Where the launcher of the curve of ``pair`` keeps its state: ``curves/.<A>-<B>-launch`` of the output."""
    out = Path(args.out) if args.out else Path(args.run)
    return out / "curves" / f".{paths.pair_name(*pair)}-launch"


def point_store(out: Path, seed: int | None, pair, key: dict, points: int, dtype: str, rank: int = 0):
    """The points of a curve computed by the array's tasks (their per-sample losses kept), keyed by the curve's
    training key, its number of points and precision; files of other keys are removed."""
    folder = Path(out) / curve_folder(seed) / f".{paths.pair_name(*pair)}-points"
    found = store.SampleStore(folder, {"curve": key_digest(key), "points": points, "dtype": dtype}, {}, rank=rank)
    found.drop_stale()
    return found


def curve_seeds(args) -> list[int | None]:
    """The curves the command computes: the run's own (None) and, unless ``--one-seed``, each extra seed's."""
    from landscape.run import read_meta, seed_solution_folders

    extra = [] if args.one_seed else list(seed_solution_folders(args.run, read_meta(args.run)))
    return [None, *extra]


def phases(config, argv: Sequence[str]) -> list[tuple[str, list[Task]]]:
    """The curve command's phases (module docstring): train, points, finish."""
    args = build_parser().parse_args(argv)
    check_args(args)
    argv = list(argv)
    points = [(k, j) for k in range(len(ROWS)) for j in range(args.points)]
    shards = max(1, min(len(points), config.shards or math.ceil(len(points) / POINTS_PER_SHARD)))
    chunks = np.array_split(np.arange(len(points)), shards)
    train, tasks = [], []
    for seed in curve_seeds(args):
        label = "run-seed" if seed is None else f"seed{seed}"
        train.append(Task(f"curve-train-{label}", "train", (argv, seed)))
        tasks += [Task(f"curve-points-{label}-{k}-of-{shards}", "points", (argv, seed, [points[i] for i in c], k))
                  for k, c in enumerate(chunks)]  # fmt: skip
    return [("train", train), ("points", tasks), ("finish", [Task("finish", "finish", (argv,))])]


def settings_digest(args) -> str:
    """The digest of what the curve command computes (its options less :data:`NOT_KEYED`)."""
    return key_digest({k: v for k, v in sorted(vars(args).items()) if k not in NOT_KEYED})


def drive(args, pair: tuple[str, str], argv: Sequence[str], jobs: dict) -> Path:
    """The command under ``--launcher``: submit the first unfinished phase's jobs, or gather and resubmit
    (:func:`landscape.launch.drive`) with the curve's ``jobs`` (:data:`landscape.curves.JOBS`); with ``--wait``
    until the curve's files are written."""
    from landscape import launch

    config = cluster_config(args, launch_dir(args, pair))
    curve_seeds(args)  # a missing run folder is one line now, not in a job
    return launch.drive(config, list(argv), jobs, phases=phases, digest=settings_digest(args))


__all__ = ["NOT_KEYED", "curve_seeds", "drive", "launch_dir", "phases", "point_store", "settings_digest"]
