"""``python -m landscape.curves``' command line: its options (those of ``--launcher`` among them), their checks,
and what the curve's key and files record besides the results.

The cluster options are the run's own (:mod:`landscape.config`, docs/how-to/cluster.md), checked by the run's
validation: :func:`cluster_config` turns those given into a :class:`landscape.config.RunConfig` that holds
only them, which is what :func:`landscape.launch.drive` and its executors read.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from adapters.errors import UserError
from adapters.train import TrainConfig
from landscape import paths
from landscape.engine.plane import SOLUTIONS

PROG = "python -m landscape.curves"
KINDS = ("bezier", "polychain")
ROWS = ("curve", "line")  # the rows of the results: the trained curve, the straight line

# (flag, argparse settings): the run's cluster options, under the same names (landscape.config)
LAUNCH_FLAGS = {
    "--launcher": {
        "choices": ("local", "slurm"),
        "help": "submit the curve as submitit jobs: its training, then "
        "its points as an array, then the files (see docs/how-to/cluster.md); rerun to gather",
    },
    "--wait": {"action": "store_true", "help": "with --launcher: wait for the jobs, resubmitting failed ones"},
    "--shards": {"help": "with --launcher: array tasks the points are split into (default: one per 64 points)"},
    "--partition": {"help": "Slurm partition"},
    "--gpus-per-task": {"help": "Slurm: GPUs per task (0: CPU jobs; default 1)"},
    "--time-limit": {"help": "with --launcher: time limit per job in minutes (default 240)"},
    "--array-parallelism": {"help": "Slurm: array tasks running at once (default 64)"},
    "--cluster-config": {"help": "a run TOML whose [cluster] table gives the cluster settings (account, qos, ...)"},
}


def check_options(bends: int, kind: str) -> None:
    """UserError unless ``kind`` is a curve kind and ``bends`` >= 1."""
    if kind not in KINDS:
        raise UserError(f"unknown curve kind '{kind}': choose one of {', '.join(KINDS)}")
    if bends < 1:
        raise UserError(f"a trained curve needs at least 1 bend, got {bends}: try --bends 1 (a quadratic Bézier)")


def parse_pair(text: str) -> tuple[str, str]:
    """``"A,B"`` → (A, B), two different solutions of the plane; anything else is a UserError."""
    names = [s.strip() for s in str(text).split(",")]
    if len(names) != 2 or any(n not in (*SOLUTIONS, "base") for n in names) or names[0] == names[1]:
        raise UserError(
            f"--pair {text!r} is not two different solutions of {', '.join(SOLUTIONS)} (or base, the base model): "
            "pass e.g. --pair ft,lora"
        )
    return names[0], names[1]


def add_launcher_options(p) -> None:
    """The ``--launcher`` options, all None (or False) unless given."""
    group = p.add_argument_group("cluster (landscape.launch)")
    for flag, settings in LAUNCH_FLAGS.items():
        group.add_argument(flag, default=None, **settings)


def cluster_config(args, out: Path):
    """The cluster options given in ``args`` as a validated :class:`landscape.config.RunConfig` whose ``out_dir``
    is ``out`` (where the launcher keeps its state); a bad one is the run's one-line error."""
    from landscape import config as run_config

    argv = ["--out", str(out)]
    for flag in LAUNCH_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += ["--config" if flag == "--cluster-config" else flag, str(value)]
    return run_config.from_argv(argv, PROG)


def build_parser():
    """The command's parser."""
    from landscape.cli import Parser, out_folder, positive_int

    p = Parser(
        prog=PROG,
        description="Train a curve of low loss between two solutions of a run (written by landscape.connectivity): "
        "fixed endpoints, trainable bends (Garipov et al. 2018), then the loss along it and along the straight "
        "line, with the barrier of each (its height above the chord between the endpoint losses). Memory: each "
        "bend is a dense fp32 copy of the parameters the pair changes, and training holds its gradient and "
        "AdamW's two moments too (4 × bends of them); an adapter's endpoint stays factored and the base is "
        "never copied.",
        epilog="Example: python -m landscape.curves --run runs/wordnet --pair ft,lora --bends 1 --steps 300",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--pair", required=True, help="the two solutions to connect, A,B: two of ft, lora, randlora")
    p.add_argument("--bends", type=int, default=3, help="trainable control points (each one dense copy of the "
                   "plane's parameters); 1 with bezier is the quadratic Bézier (default: 3)")  # fmt: skip
    p.add_argument("--kind", default="bezier", choices=KINDS, help="Bézier curve or polygonal chain (default: bezier)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, one t per step (default: the run's "
                   "training steps)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate of the bends (default: the run's full "
                   "fine-tuning rate: the bends are full weights)")  # fmt: skip
    p.add_argument("--points", type=int, default=21, help="values of t in [0, 1] evaluated, 0 and 1 included "
                   "(default: 21)")  # fmt: skip
    p.add_argument("--out", type=out_folder, default=None, help="where curves/ goes (default: the run folder)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the CPUs available)")
    p.add_argument("--one-seed", action="store_true",
                   help="on a run of --seeds N: only the run's own seed's curve (default: one curve per seed, N times "
                   "the cost, for the barrier's interval over seeds)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_launcher_options(p)
    return p


def check_args(args) -> tuple[str, str]:
    """Every option checked before anything is loaded; returns the pair."""
    pair = parse_pair(args.pair)
    check_options(args.bends, args.kind)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}: try --steps 300")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}: try --lr 1e-4")
    paths.check_options(args.points, 0.0)
    return pair


def curve_key(ctx, pair: tuple[str, str], args, device: torch.device, solutions=None, seed=None) -> dict:
    """Everything that changes a trained curve: its checkpoint is resumed only under the same key. ``solutions``
    and ``seed``: an extra training seed's (``--seeds N``), default the run's own."""
    from adapters.solution import delta_fingerprint
    from landscape.run import train_key

    solutions = ctx.solutions if solutions is None else solutions
    return {
        "curve": 2,  # 2: offsets from W0 on every base (1: full weights unless the base was packed)
        "pair": list(pair),
        "kind": args.kind,
        "bends": args.bends,
        "solutions": {s: delta_fingerprint(solutions[s]) for s in pair},
        "data": train_key(ctx.loaded, "ft", device, seed),  # the run's data, model, base weights and batches
    }


def curve_folder(seed: int | None) -> str:
    """Where a curve's files go under the output folder: ``curves``, an extra training seed's ``curves/seed-K``."""
    return "curves" if seed is None else f"curves/seed-{seed}"


def curve_info(ctx, config: TrainConfig, history: dict, device, dtype: str) -> dict:
    """What the JSON records besides the results: the run, the training settings and how it went."""
    meta = ctx.meta
    losses = history["train_loss"]
    return {
        **{k: meta.get(k) for k in ("dataset", "model", "seed", "eval_split", "eval_samples")},
        "run": str(ctx.run_dir),
        "device": str(device),
        "dtype": dtype,
        "train": {
            "steps": config.steps,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "grad_clip": config.grad_clip,
            "weight_decay": config.weight_decay,
            "optimizer": "AdamW, cosine schedule",
            "t_per_step": 1,
            "resumed_at_step": history.get("resumed_at_step", 0),
            "train_seconds": round(history.get("train_seconds", 0.0), 3),
            "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
        },
    }


__all__ = [
    "KINDS",
    "LAUNCH_FLAGS",
    "PROG",
    "ROWS",
    "add_launcher_options",
    "build_parser",
    "check_args",
    "check_options",
    "cluster_config",
    "curve_folder",
    "curve_info",
    "curve_key",
    "parse_pair",
]
