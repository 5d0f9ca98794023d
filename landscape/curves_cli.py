"""``python -m landscape.curves``' command line: its options (those of ``--launcher`` among them) and their checks.

The cluster options are the run's own (:mod:`landscape.config`, docs/how-to/cluster.md), checked by the run's
validation: :func:`cluster_config` turns those given into a :class:`landscape.config.RunConfig` that holds
only them, which is what :func:`landscape.launch.drive` and its executors read.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.errors import UserError
from landscape import curves, paths
from landscape.curves import KINDS, PROG, check_options, parse_pair

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
    from landscape.cli import Parser, positive_int

    p = Parser(
        prog=PROG,
        description="Train a curve of low loss between two solutions of a run (written by landscape.connectivity): "
        "fixed endpoints, trainable bends (Garipov et al. 2018), then the loss along it and along the straight "
        "line, with the barrier of each (its height above the chord between the endpoint losses). Memory: the "
        "bends are dense fp32 copies of the plane's parameters (bends × model), and training holds their "
        "gradients and AdamW's two moments too (4 × bends × model).",
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
    p.add_argument("--out", default=None, help="where curves/ goes (default: the run folder)")
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


def run(argv: Sequence[str] | None = None) -> None:
    """The command: its options checked, then the curves run here, or submitted under ``--launcher``."""
    args = build_parser().parse_args(argv)
    pair = check_args(args)
    if args.launcher is not None:  # the curve as submitit jobs: submit, or gather and resubmit (landscape.launch)
        from landscape import curves_launch

        curves_launch.drive(args, pair, list(sys.argv[1:] if argv is None else argv))
        return
    cluster_config(args, Path(args.run))  # cluster settings without --launcher: the run's one-line error
    run_curves(args, pair)


def open_curves(args, pair: tuple[str, str]):
    """The run reopened for the curves of ``pair``: (its context, the device, the output folder, {extra training
    seed: its solutions} of ``--seeds N``, empty with ``--one-seed``)."""
    from adapters import threads
    from adapters.solution import base_solution, load_solution
    from landscape.cli import resolve_device
    from landscape.run import open_run, seed_solution_folders

    threads.configure(args.threads)
    device = resolve_device(args.device)
    ctx = open_run(args.run, device)
    if "base" in pair:
        ctx.solutions["base"] = base_solution(ctx.base, ctx.loaded.model_name)
    missing = [s for s in pair if s not in ctx.solutions]
    if missing:
        raise UserError(f"--pair {args.pair}: the run {args.run} has no {missing[0]} solution: pick two it has")
    out = Path(args.out) if args.out else ctx.run_dir
    extra = {} if args.one_seed else seed_solution_folders(ctx.run_dir, ctx.meta)
    seeds = {seed: {**ctx.solutions, **{s: load_solution(f, base=ctx.base, expect_method=s)
                                        for s, f in folders.items()}}
             for seed, folders in extra.items()}  # fmt: skip
    return ctx, device, out, seeds


def run_curves(args, pair: tuple[str, str]) -> None:
    """The curves of ``pair`` in this process (a launcher's finish job: their training and points on disk)."""
    ctx, device, out, extra = open_curves(args, pair)
    # --seeds N: each extra seed's curve, between its own solutions, trained on its seed's batches
    others = [curves.one_curve(ctx, solutions, pair, args, device, out, seed, []) for seed, solutions in extra.items()]
    result = curves.one_curve(ctx, ctx.solutions, pair, args, device, out, None, others)
    for row in curves.ROWS:
        b = result["barriers"][row]
        spread = (f"; over {len(b['barrier_per_seed'])} seeds {b['barrier_mean']:.4f} [{b['barrier_ci95'][0]:.4f}, "
                  f"{b['barrier_ci95'][1]:.4f}]" if b.get("barrier_ci95") else "")  # fmt: skip
        peak = f"{b['peak_above_endpoint_mean']:.4f} ± {b['peak_above_endpoint_mean_se']:.4f}"
        print(f"{row:<6} mean loss {result['mean_loss'][row]:.4f}, {paths.barrier_text(b)}{spread}; peak above the "
              f"endpoint mean {peak}")  # fmt: skip


__all__ = [
    "LAUNCH_FLAGS",
    "add_launcher_options",
    "build_parser",
    "check_args",
    "cluster_config",
    "open_curves",
    "run",
    "run_curves",
]
