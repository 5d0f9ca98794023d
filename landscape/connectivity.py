"""python -m landscape.connectivity — the main job.

Trains (or loads) three solutions of one pretrained model on one dataset — full
fine-tuning, LoRA and RandLoRA at matched trainable-parameter budgets — plus a head-only
baseline, then evaluates the loss on the plane through the three solutions, and writes
the output contract under --out:

  solutions/{ft,lora,randlora,head_only}/   the solutions (safetensors / peft format)
  landscape.npz   x, y, loss, accuracy, loss_se, points, point_names
  landscape.json  configuration, seeds, versions, wall time per stage, per-solution summary
  landscape.html  interactive 3D surface (plotly, self-contained)
  landscape.png / landscape.pdf   static surface + contour map
  spectrum.json / spectrum.png    singular-value spectra of each ΔW (see landscape.spectrum)
  paths.npz / paths.json / paths.png / paths.pdf   loss along the lines between pairs (see landscape.paths)
"""

from __future__ import annotations

import contextlib
import copy
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from adapters.data import dataset_names, eval_subset, load_dataset
from adapters.errors import UserError
from adapters.methods import MethodSpec, attach, match_lora_rank, target_shapes, trainable_params
from adapters.methods.budget import lora_params, randlora_params
from adapters.models import DEFAULT_MODEL, get_model, model_names
from adapters.solution import Solution, fingerprint, load_solution, read_info, save_solution
from adapters.train import TrainConfig, evaluate, train
from landscape import paths, render, spectrum, store
from landscape.cli import Parser, resolve_device, run_main
from landscape.grid import EvalSet, PlaneEvaluator, run_grid
from landscape.plane import CHARTS, SOLUTIONS, build_chart, default_axes, solution_weights
from landscape.store import GridStore

PROG = "python -m landscape.connectivity"
METHOD_ORDER = ("head_only", "ft", "lora", "randlora")
# Presets: `quick` fits the default run (wordnet + MiniLM) in under 10 minutes on 2 CPU cores.
PRESETS = {
    "quick": {"grid": 11, "eval_samples": 512, "train_steps": 200, "path_points": 11},
    "full": {"grid": 25, "eval_samples": 2000, "train_steps": 1500, "path_points": 21},
}


def build_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="Train full fine-tuning, LoRA and RandLoRA solutions (or load them) and map the loss "
        "landscape on the plane through them, with the singular-value spectra of their weight updates.",
        epilog="Example: python -m landscape.connectivity --dataset wordnet --out runs/wordnet  "
        "(offline default; about 5-8 minutes on 2 CPU cores)",
    )
    a = p.add_argument
    a("--dataset", default="wordnet", help=f"dataset: {', '.join(dataset_names())} (default: wordnet)")
    a(
        "--model",
        default=None,
        help=f"model: {', '.join(model_names())} (default: minilm for text, efficientnet-lite0 for images)",
    )
    a("--data-root", default=None, help="folder holding the dataset files (default: the system install)")
    a("--out", default=None, help="output folder (default: runs/<dataset>)")
    a(
        "--train-per-class",
        type=int,
        default=None,
        help="training samples per class (default: the dataset's, wordnet 500, fashion-mnist 500)",
    )
    a("--test-per-class", type=int, default=None, help="test samples per class (default: 100)")
    a(
        "--chart",
        default="paper",
        choices=CHARTS,
        help="plane chart: 'paper' = the RandLoRA paper's affine "
        "chart (RandLoRA (0,0), LoRA (1,0), FT (0.5,1)); 'orthonormal' = Garipov et al., Euclidean units "
        "(default: paper)",
    )
    a(
        "--grid",
        type=int,
        default=None,
        help="grid points per axis; the vertices are always grid points (quick: 11, full: 25 = the paper's grid)",
    )
    a(
        "--eval-split",
        default="train",
        choices=("train", "test"),
        help="split the landscape is evaluated on (default: train, as the paper)",
    )
    a(
        "--eval-samples",
        type=int,
        default=None,
        help="size of the fixed evaluation subset (quick: 512, full: 2000); 0 = the whole split",
    )
    a("--preset", default="quick", choices=sorted(PRESETS), help="quick (minutes on a laptop CPU) or full")
    a("--train-steps", type=int, default=None, help="optimizer steps per solution (quick: 200, full: 1500)")
    a("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    a("--randlora-rank", type=int, default=None, help="RandLoRA rank r (default: the model's, minilm: 8)")
    a(
        "--lora-rank",
        type=int,
        default=None,
        help="LoRA rank (default: matched to RandLoRA's trainable parameter count)",
    )
    a("--seed", type=int, default=0, help="seed for data split, initialisation, batches and bases (default: 0)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    a(
        "--solutions",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="reuse solutions trained elsewhere instead of training them: ft=PATH lora=PATH randlora=PATH (any subset)",
    )
    a(
        "--path-points",
        type=int,
        default=None,
        help="values of t on each 1-D path between two solutions (quick: 11, full: 21; 0 = no paths)",
    )
    a("--path-extend", type=float, default=0.0, help="the paths run over t in [-E, 1 + E] (default: 0)")
    a(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="forward precision of the landscape evaluation: bfloat16 autocast (loss reduced in fp32) or float32 "
        "(default auto: bfloat16 on GPU, float32 on CPU)",
    )
    a(
        "--restart",
        action="store_true",
        help="discard grid points checkpointed in --out by an earlier run (needed when its configuration differs)",
    )
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_solutions(items: Sequence[str]) -> dict[str, Path]:
    given = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in SOLUTIONS or not path:
            raise UserError(f"--solutions takes NAME=PATH with NAME one of ft, lora, randlora (got '{item}')")
        given[name] = Path(path)
    return given


class Stages:
    """Wall time per stage, printed as it goes."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
        if not self.quiet:
            print(f"[{name}] done in {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


def run(argv: Sequence[str] | None = None) -> Path:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    grid_n = args.grid if args.grid is not None else preset["grid"]
    eval_samples = args.eval_samples if args.eval_samples is not None else preset["eval_samples"]
    steps = args.train_steps if args.train_steps is not None else preset["train_steps"]
    if grid_n < 2:
        raise UserError(f"--grid {grid_n} is too small: a surface needs at least 2 points per axis (try --grid 11)")
    if eval_samples < 0 or steps < 1 or args.batch_size < 1:
        raise UserError("--eval-samples must be >= 0, --train-steps and --batch-size >= 1")
    if args.path_points is None:
        args.path_points = preset["path_points"]
    if args.path_points != 0:
        try:
            paths.check_options(args.path_points, args.path_extend)
        except UserError as e:
            raise UserError(f"--path-points/--path-extend: {e} (--path-points 0 disables the paths)") from None
    given = parse_solutions(args.solutions)
    given_info = {name: read_info(path) for name, path in given.items()}
    rank, world = init_distributed()
    device = resolve_device(args.device, rank)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    lead = rank == 0  # rank 0 saves, gathers and writes; all ranks train (DDP) and evaluate grid points
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} torchrun processes")
    stages = Stages(quiet=not lead)

    with stages("load"):
        sizes = {
            k: v
            for k, v in (("train_per_class", args.train_per_class), ("test_per_class", args.test_per_class))
            if v is not None
        }
        dataset = load_dataset(args.dataset, data_root=args.data_root, seed=args.seed, **sizes)
        model_name = args.model or DEFAULT_MODEL[dataset.modality]
        entry = get_model(model_name)
        if entry.modality != dataset.modality:
            raise UserError(
                f"model '{model_name}' takes {entry.modality} but dataset '{args.dataset}' is "
                f"{dataset.modality}: pick a {dataset.modality} model"
            )
        for name, info in given_info.items():
            if info["model"] != model_name or info.get("dataset", args.dataset) != args.dataset:
                raise UserError(
                    f"--solutions {name}={given[name]} was trained with {info['model']} on "
                    f"{info.get('dataset')}, not {model_name} on {args.dataset}: pass matching solutions"
                )
        torch.manual_seed(args.seed)
        base = entry.build(len(dataset.classes))
        base_print = fingerprint(base)
        solutions: dict[str, Solution] = {n: load_solution(p, base=base) for n, p in given.items()}
        train_data = entry.encode(dataset.train.inputs)
        test_data = entry.encode(dataset.test.inputs)

    out = Path(args.out or f"runs/{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    shapes = target_shapes(base, entry.targets)
    randlora_rank = args.randlora_rank or entry.defaults.get("randlora_rank", 8)
    lora_rank = args.lora_rank or match_lora_rank(shapes, randlora_rank)
    print(
        f"budget: RandLoRA r={randlora_rank}: {randlora_params(shapes, randlora_rank):,} adapter parameters; "
        f"LoRA r={lora_rank}{' (matched)' if not args.lora_rank else ''}: {lora_params(shapes, lora_rank):,}",
        file=sys.stderr,
    )
    ranks = {"lora": lora_rank, "randlora": randlora_rank}
    summary: dict[str, dict] = {}
    for method in METHOD_ORDER:
        if method in solutions:
            continue
        folder = out / "solutions" / method
        config = TrainConfig(
            steps=steps,
            batch_size=args.batch_size,
            lr=entry.defaults["lr"][method],
            head_lr=entry.defaults.get("head_lr", 3e-3),
            seed=args.seed,
        )
        key = {
            "dataset": args.dataset,
            "model": model_name,
            "rank": ranks.get(method),
            "seed": args.seed,
            "train_config": config.to_dict(),
            "base_fingerprint": base_print,
            "data_root": args.data_root,
            "sizes": sizes,
        }
        if _reusable(folder, key):
            if lead:
                print(f"[train {method}] reusing {folder}", file=sys.stderr)
        else:
            with stages(f"train_{method}"):
                _train_one(
                    method,
                    ranks.get(method),
                    entry,
                    base,
                    dataset,
                    train_data,
                    test_data,
                    config,
                    key,
                    folder,
                    device,
                    args.seed,
                    not args.no_progress,
                )
        barrier()  # the other ranks wait for rank 0's solution
        solutions[method] = load_solution(folder, base=base)

    for name, sol in solutions.items():
        summary[name] = {
            "trainable_params": sol.info.get("trainable_params"),
            "adapter_params": sol.info.get("adapter_params"),
            "rank": sol.info.get("rank"),
            "test_accuracy": sol.metrics.get("test_accuracy"),
            "test_loss": sol.metrics.get("test_loss"),
            "path": str(sol.path),
        }

    with stages("plane"):
        base_params = dict(base.named_parameters())
        thetas = solution_weights(base_params, {s: solutions[s].delta() for s in SOLUTIONS})
        chart = build_chart(args.chart, thetas)
        del thetas
        xs, ys = default_axes(chart, grid_n)
        split = dataset.train if args.eval_split == "train" else dataset.test
        subset = eval_subset(split, eval_samples or None, args.seed)
        eval_set = EvalSet.prepare(entry.encode(subset.inputs), subset.labels, 128, device)
        evaluator = PlaneEvaluator(copy.deepcopy(base), chart, eval_set, device, dtype=dtype)
        grid_key = {
            "model": model_name, "base_fingerprint": base_print, "chart": args.chart, "dtype": dtype,
            "x": xs.tolist(), "y": ys.tolist(), "eval": [args.dataset, args.eval_split, eval_set.n, args.seed,
            args.data_root, sizes], "solutions": {s: delta_fingerprint(solutions[s]) for s in SOLUTIONS},
        }  # fmt: skip
        grid_store = GridStore(out / ".grid", grid_key, rank=rank)
        if args.restart and lead:
            grid_store.clear()
        barrier()

    with stages("grid"):
        try:
            result = run_grid(evaluator, xs, ys, store=grid_store, progress=not args.no_progress)
        except ValueError as e:
            raise UserError(
                f"{out} holds grid points of another configuration ({e}): rerun with --restart to discard "
                "them, or pick another --out"
            ) from None
    if not lead:
        return out
    for s in SOLUTIONS:  # the vertices are grid points, except on grids too small to hold them
        x, y = chart.vertices[s]
        i, j = np.flatnonzero(ys == y), np.flatnonzero(xs == x)
        if len(i) and len(j):
            loss, acc = float(result["loss"][i[0], j[0]]), float(result["accuracy"][i[0], j[0]])
        else:
            point = evaluator.evaluate(x, y)
            loss, acc = point.loss, point.accuracy
        summary[s]["vertex_loss"], summary[s]["vertex_accuracy"] = loss, acc
    summary["head_only"]["vertex_loss"] = None
    precision_check = None
    if evaluator.autocast:  # measure what bf16 costs in accuracy: the vertices again in fp32
        evaluator.autocast = False
        fp32 = {s: evaluator.evaluate(*chart.vertices[s]).loss for s in SOLUTIONS}
        evaluator.autocast = True
        precision_check = {
            "vertex_loss_fp32": fp32,
            "max_abs_diff_bf16_vs_fp32": max(abs(summary[s]["vertex_loss"] - fp32[s]) for s in SOLUTIONS),
        }

    points = np.array([chart.vertices[s] for s in SOLUTIONS], dtype=np.float64)
    arrays = {
        "x": xs,
        "y": ys,
        "loss": result["loss"],
        "accuracy": result["accuracy"],
        "loss_se": result["loss_se"],
        "points": points,
        "point_names": np.array(SOLUTIONS),
    }
    store.write_npz(out / "landscape.npz", **arrays)

    path_summary = None
    if args.path_points:
        with stages("paths"):
            path_result = paths.compute_paths(
                base,
                {s: solutions[s] for s in SOLUTIONS},
                eval_set,
                device,
                args.path_points,
                args.path_extend,
                progress=not args.no_progress,
            )
            path_info = {"dataset": args.dataset, "model": model_name, "seed": args.seed, "eval_split": args.eval_split}
            paths.write_paths(path_result, out, info=path_info, title=f"{model_name} on {args.dataset}: linear paths")
            path_summary = paths.summary(path_result)

    with stages("spectrum"):
        spectrum.write_spectrum({s: solutions[s] for s in SOLUTIONS}, out, device=device, progress=not args.no_progress)

    with stages("render"):
        data = {**arrays, "vertex_loss": np.array([summary[s]["vertex_loss"] for s in SOLUTIONS]), "chart": args.chart}
        title = f"{model_name} on {args.dataset}: loss on the plane through FT, LoRA, RandLoRA ({args.chart} chart)"
        render.landscape_html(data, out / "landscape.html", title)
        render.landscape_static(data, out / "landscape.png", out / "landscape.pdf", title)

    meta = {
        "dataset": args.dataset,
        "model": model_name,
        "chart": args.chart,
        "chart_geometry": chart.info,
        "eval_split": args.eval_split,
        "eval_samples": eval_set.n,
        "seed": args.seed,
        # what landscape.paths needs to rebuild the evaluation set exactly
        "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
        "train_per_class": dataset.info.get("train_per_class"),
        "test_per_class": dataset.info.get("test_per_class"),
        "grid": {
            "nx": len(xs),
            "ny": len(ys),
            "x_range": [float(xs[0]), float(xs[-1])],
            "y_range": [float(ys[0]), float(ys[-1])],
        },
        "preset": args.preset,
        "train_steps": steps,
        "device": str(device),
        "dtype": dtype,
        "bf16_check": precision_check,
        "world_size": world,
        "grid_points_computed_this_run": int(result["points_computed"]),
        "base_fingerprint": base_print,
        "data_source": dataset.source,
        "classes": dataset.classes,
        "solutions": summary,
        "paths": path_summary,
        "wall_time_s": stages.seconds,
        "wall_time_total_s": round(time.perf_counter() - started, 1),
        "versions": _versions(),
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
    }
    store.write_json(out / "landscape.json", meta)
    _print_summary(out, summary, stages.seconds)
    return out


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Long timeout: the other ranks wait at a barrier while rank 0 trains the solutions.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def delta_fingerprint(solution: Solution) -> str:
    """sha256 of a solution's ΔW, so a checkpointed grid is never resumed with other solutions."""
    import hashlib

    h = hashlib.sha256()
    for name, d in sorted(solution.delta().items()):
        h.update(name.encode())
        h.update(d.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _reusable(folder: Path, key: dict) -> bool:
    try:
        return read_info(folder).get("train_key") == key
    except UserError:
        return False


def _train_one(method, rank, entry, base, dataset, train_data, test_data, config, key, folder, device, seed, progress):
    torch.manual_seed(seed)  # peft's LoRA initialises A from the global generator
    spec = MethodSpec(method, rank=rank, seed=seed)
    model = attach(copy.deepcopy(base), spec, entry.targets)
    head = sum(p.numel() for p in base.task_head.parameters())
    # Checkpointed every 50 steps: a killed run resumes training where it died.
    # Under torchrun all ranks train together (DDP, each on a slice of the global batch); rank 0 saves.
    lead = not _distributed() or torch.distributed.get_rank() == 0
    history = train(
        model, train_data, dataset.train.labels, config, device=device, desc=f"train {method}",
        progress=progress and lead, checkpoint=folder.with_name(f".{method}.ckpt"), checkpoint_every=50,
    )  # fmt: skip
    if not lead:
        return
    test_loss, test_acc = evaluate(model, test_data, dataset.test.labels, config.eval_batch_size, device)
    n_train = trainable_params(model)
    print(
        f"[train {method}] test accuracy {test_acc:.4f}, loss {test_loss:.4f}, {n_train:,} trainable", file=sys.stderr
    )
    info = {
        "name": method,
        "method": method,
        "model": entry.name,
        "dataset": dataset.name,
        "num_classes": len(dataset.classes),
        "classes": dataset.classes,
        "rank": rank,
        "seed": seed,
        "trainable_params": n_train,
        "adapter_params": n_train - head if method in ("lora", "randlora") else None,
        "targets": list(entry.targets),
        "base_fingerprint": key["base_fingerprint"],
        "train_key": key,
    }
    losses = history["train_loss"]
    metrics = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_seconds": history["train_seconds"],
        "final_train_loss": float(np.mean(losses[-20:])),
        "steps": len(losses),
    }
    save_solution(folder, model.cpu(), info, metrics)


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "peft", "transformers", "numpy", "scipy", "plotly", "matplotlib", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


def _print_summary(out: Path, summary: dict, seconds: dict) -> None:
    print(f"\nwrote {out}/landscape.{{npz,json,html,png,pdf}} and spectrum.{{json,png}}")
    print(f"{'solution':<10} {'trainable':>11} {'rank':>5} {'test acc':>9} {'test loss':>10} {'vertex loss':>12}")
    for name in METHOD_ORDER:
        s = summary[name]
        vl = "" if s.get("vertex_loss") is None else f"{s['vertex_loss']:.4f}"
        print(
            f"{name:<10} {s['trainable_params'] or 0:>11,} {s['rank'] or '':>5} "
            f"{s['test_accuracy']:>9.4f} {s['test_loss']:>10.4f} {vl:>12}"
        )
    print("wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


def main(argv: Sequence[str] | None = None) -> int:
    code = run_main(run, argv, PROG)
    if _distributed():
        if code == 0:
            barrier()  # the other ranks wait until rank 0 has written every output
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
