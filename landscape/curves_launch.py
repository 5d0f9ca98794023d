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

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.io import key_digest
from landscape import curves, paths
from landscape.curves_cli import LAUNCH_FLAGS, build_parser, check_args, cluster_config, open_curves, run_curves
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
    folder = Path(out) / curves.curve_folder(seed) / f".{paths.pair_name(*pair)}-points"
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
    points = [(k, j) for k in range(len(curves.ROWS)) for j in range(args.points)]
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


def _open(argv: Sequence[str], seed: int | None):
    args = build_parser().parse_args(argv)
    pair = check_args(args)
    ctx, device, out, extra = open_curves(args, pair)
    return args, pair, ctx, device, out, (ctx.solutions if seed is None else extra[seed])


def train_job(config, argv: list[str], seed: int | None) -> None:
    """A launcher's curve training: the bends trained (or resumed), the checkpoint kept for the points' tasks."""
    args, pair, ctx, device, out, solutions = _open(argv, seed)
    curves.trained_curve(ctx, solutions, pair, args, device, out, seed)


def points_job(config, argv: list[str], seed: int | None, points: list[tuple[int, int]], shard: int) -> None:
    """A launcher's points task: the curve's ``points`` (row k, index of t j) not yet stored, with their per-sample
    losses, into ``.<A>-<B>-points/rank<shard>.npz``; the bends come from the training's checkpoint."""
    args, pair, ctx, device, out, solutions = _open(argv, seed)
    curve, _, key, _, _ = curves.trained_curve(ctx, solutions, pair, args, device, out, seed)
    dtype = ctx.loaded.config.landscape_dtype(device.type)
    found = point_store(out, seed, pair, key, args.points, dtype, rank=shard)
    curves.evaluate_curve(curve, copy.deepcopy(ctx.base), ctx.eval_set, device, args.points, dtype,
                          ctx.loaded.task.objective, progress=False, store=found,
                          only=set(map(tuple, points)))  # fmt: skip


def finish_job(config, argv: list[str]) -> None:
    """A launcher's last job: the command in one process, every curve resumed and every point read back."""
    args = build_parser().parse_args(argv)
    run_curves(args, check_args(args))


JOBS = {"train": train_job, "points": points_job, "finish": finish_job}


def drive(args, pair: tuple[str, str], argv: Sequence[str]) -> Path:
    """The command under ``--launcher``: submit the first unfinished phase's jobs, or gather and resubmit
    (:func:`landscape.launch.drive`); with ``--wait`` until the curve's files are written."""
    from landscape import launch

    config = cluster_config(args, launch_dir(args, pair))
    curve_seeds(args)  # a missing run folder is one line now, not in a job
    return launch.drive(config, list(argv), JOBS, phases=phases, digest=settings_digest(args))


__all__ = ["JOBS", "NOT_KEYED", "curve_seeds", "drive", "launch_dir", "phases", "point_store", "settings_digest"]
