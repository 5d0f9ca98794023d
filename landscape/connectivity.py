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
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from adapters.data import dataset_names, eval_subset, load_dataset
from adapters.errors import UserError
from adapters.methods import MethodSpec, attach, has_head, match_lora_rank, target_shapes, trainable_params
from adapters.methods.budget import lora_params, randlora_params
from adapters.models import DEFAULT_MODEL, clip, get_model, is_clip, model_names
from adapters.solution import Solution, fingerprint, load_solution, read_info, save_solution
from adapters.train import TrainConfig, evaluate, train
from landscape import paths, recipe, render, spectrum, store
from landscape.cli import Parser, resolve_device, run_main
from landscape.grid import EvalSet, PlaneEvaluator, points_per_forward_arg, run_grid
from landscape.plane import CHARTS, SOLUTIONS, build_chart, default_axes, paper_axis, solution_weights
from landscape.recipe import PAPER_DATASETS, PRESETS
from landscape.store import GridStore

PROG = "python -m landscape.connectivity"
METHOD_ORDER = ("head_only", "ft", "lora", "randlora")


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
        help=f"model: {', '.join(model_names())} (default: minilm for text, efficientnet-lite0 for "
        "fashion-mnist, ViT-B-32 for cifar100/food101/ucf101 through --preset paper)",
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
        default=None,
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
        default=None,
        choices=("train", "test"),
        help="split the landscape is evaluated on (default: train, as the paper)",
    )
    a(
        "--eval-samples",
        type=int,
        default=None,
        help="size of the fixed evaluation subset (quick: 512, full: 2000); 0 = the whole split",
    )
    a(
        "--preset",
        default=None,
        choices=[*sorted(PRESETS), "paper"],
        help="quick (minutes on a laptop CPU), full, or paper (the RandLoRA paper's CLIP recipe from "
        f"experiments/paper/<dataset>.toml; the default for {', '.join(PAPER_DATASETS)}; quick otherwise)",
    )
    a("--config", default=None, metavar="FILE", help="a TOML experiment config (layout of experiments/paper/*.toml)")
    a("--train-steps", type=int, default=None, help="optimizer steps per solution (quick: 200, full: 1500)")
    a("--epochs", type=float, default=None, help="training length in epochs (paper: 6 / 15 / 20); --train-steps wins")
    a("--batch-size", type=int, default=None, help="effective training batch size (default: 32; paper: 128)")
    a("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: 1)")
    a("--grad-checkpointing", action="store_true", help="recompute activations in the backward (CLIP): less memory")
    a(
        "--pretrained",
        default=None,
        help="CLIP weights: an open_clip tag (default: openai), a local checkpoint file, or none (random init)",
    )
    a(
        "--prompt-template",
        default=None,
        help="CLIP class prompt, with {c} for the class name (default: 'An image of {c}')",
    )
    a(
        "--paper-temperature",
        action="store_true",
        default=None,
        help="CLIP: scale logits by the raw logit_scale as the paper's code does "
        "(default: exp(logit_scale), CLIP's own temperature)",
    )
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
        "--points-per-forward",
        type=points_per_forward_arg,
        default="auto",
        help="grid points evaluated by one vmapped forward (torch.func): a number or auto (1 on CPU, where batching "
        "does not pay; on GPU min(16, 1024 // samples per batch) = 8 for batches of 128) (default: auto)",
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
    preset_name, preset = recipe.resolve(args.dataset, args.preset, args.config)
    grid_n = args.grid if args.grid is not None else preset.get("grid", 11)
    eval_samples = args.eval_samples if args.eval_samples is not None else preset.get("eval_samples", 512)
    args.chart = args.chart or preset.get("chart", "paper")
    args.eval_split = args.eval_split or preset.get("eval_split", "train")
    args.batch_size = args.batch_size or preset.get("batch_size", 32)
    grad_accum = args.grad_accum or preset.get("grad_accum", 1)
    if args.chart not in CHARTS or args.eval_split not in ("train", "test"):
        raise UserError(f"config: chart must be one of {', '.join(CHARTS)} and eval_split train or test")
    if grid_n < 2:
        raise UserError(f"--grid {grid_n} is too small: a surface needs at least 2 points per axis (try --grid 11)")
    if eval_samples < 0 or (args.train_steps is not None and args.train_steps < 1) or args.batch_size < 1:
        raise UserError("--eval-samples must be >= 0, --train-steps and --batch-size >= 1")
    if grad_accum < 1 or args.batch_size % grad_accum:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {grad_accum}")
    if args.path_points is None:
        args.path_points = preset.get("path_points", 11)
    if args.path_points != 0:
        try:
            paths.check_options(args.path_points, args.path_extend)
        except UserError as e:
            raise UserError(f"--path-points/--path-extend: {e} (--path-points 0 disables the paths)") from None
    given = parse_solutions(args.solutions)
    given_info = {name: read_info(path) for name, path in given.items()}
    rank, world = init_distributed()
    device = resolve_device(args.device, rank)
    if args.dtype == "auto":  # bf16 autocast on GPU (the config's choice), fp32 on CPU
        dtype = preset.get("dtype", "bfloat16") if device.type == "cuda" else "float32"
    else:
        dtype = args.dtype
    lead = rank == 0  # rank 0 saves, gathers and writes; all ranks train (DDP) and evaluate grid points
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} torchrun processes")
    stages = Stages(quiet=not lead)

    with stages("load"):
        sizes = {
            k: v
            for k in ("train_per_class", "test_per_class")
            if (v := getattr(args, k) if getattr(args, k) is not None else preset.get(k)) is not None
        }
        model_name = args.model or preset.get("model") or DEFAULT_MODEL[dataset_modality(args.dataset)]
        entry = get_model(model_name)
        model_options = resolve_model_options(args, preset, entry)
        # Data and weights are checked together, so one line names everything that is missing.
        problems, dataset = [], None
        try:
            dataset = load_dataset(args.dataset, data_root=args.data_root, seed=args.seed, **sizes)
        except UserError as e:
            problems.append(str(e))
        if is_clip(entry):
            try:
                clip.resolve_pretrained(entry.name, model_options.get("pretrained"))
            except UserError as e:
                problems.append(str(e))
        if problems:
            raise UserError("; and ".join(problems))
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
        base = entry.create(dataset.classes, model_options)
        base_print = fingerprint(base)
        solutions: dict[str, Solution] = {n: load_solution(p, base=base) for n, p in given.items()}
        train_data = entry.encode(dataset.train.inputs)
        test_data = entry.encode(dataset.test.inputs)
    if args.train_steps:
        steps = args.train_steps
    elif args.epochs or "train_steps" not in preset:  # epochs over the training split at the effective batch
        epochs = args.epochs or preset.get("epochs", 1)
        steps = max(1, math.ceil(epochs * len(dataset.train) / min(args.batch_size, len(dataset.train))))
    else:
        steps = preset["train_steps"]

    out = Path(args.out or f"runs/{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    shapes = target_shapes(base, entry.targets)
    randlora_rank = args.randlora_rank or preset.get("randlora_rank") or entry.defaults.get("randlora_rank", 8)
    given_lora = args.lora_rank or preset.get("lora_rank")
    lora_rank = given_lora or match_lora_rank(shapes, randlora_rank)
    if lead:
        print(
            f"budget: RandLoRA r={randlora_rank}: {randlora_params(shapes, randlora_rank):,} adapter parameters; "
            f"LoRA r={lora_rank}{'' if given_lora else ' (matched)'}: {lora_params(shapes, lora_rank):,} "
            f"({len(shapes)} adapted weights)",
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
            lr={**entry.defaults["lr"], **preset.get("lr", {})}[method],
            head_lr=entry.defaults.get("head_lr", 3e-3),
            weight_decay=preset.get("weight_decay", entry.defaults.get("weight_decay", 0.01)),
            grad_clip=preset.get("grad_clip", 1.0),
            seed=args.seed,
            eval_batch_size=preset.get("eval_batch", 128),
            grad_accum=grad_accum,
            autocast="bfloat16" if device.type == "cuda" and preset.get("train_dtype") == "bfloat16" else "none",
            augment=bool(preset.get("augment")) and entry.augment is not None,
            grad_checkpointing=args.grad_checkpointing or preset.get("grad_checkpointing", False),
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
            "model_options": model_options,
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
        if "x_range" in preset or "y_range" in preset:  # the config's window, the vertices kept on the grid
            verts = list(chart.vertices.values())
            if "x_range" in preset:
                xs = paper_axis(grid_n, *preset["x_range"], [v[0] for v in verts])
            if "y_range" in preset:
                ys = paper_axis(grid_n, *preset["y_range"], [v[1] for v in verts])
        split = dataset.train if args.eval_split == "train" else dataset.test
        subset = eval_subset(split, eval_samples or None, args.seed)
        eval_set = EvalSet.prepare(entry.encode(subset.inputs), subset.labels, preset.get("eval_batch", 128), device)
        evaluator = PlaneEvaluator(
            copy.deepcopy(base), chart, eval_set, device, dtype=dtype, points_per_forward=args.points_per_forward
        )
        grid_key = {
            "model": model_name, "model_options": model_options, "base_fingerprint": base_print, "chart": args.chart,
            "dtype": dtype,
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
                points_per_forward=evaluator.points_per_forward,
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
        "model_options": model_options,
        "preset": preset_name,
        "config_file": preset.get("config_file"),
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


def dataset_modality(name: str) -> str:
    from adapters.data import DATASETS

    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(dataset_names())}")
    return DATASETS[name].modality


def resolve_model_options(args, preset: dict, entry) -> dict:
    """Build options of CLIP models (pretrained weights, prompt, temperature); none for the others."""
    given = {
        "pretrained": args.pretrained,
        "template": args.prompt_template,
        "paper_temperature": args.paper_temperature,
    }
    if not is_clip(entry):
        flags = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if flags:
            raise UserError(f"{', '.join(flags)} apply to CLIP models only, not '{entry.name}': drop them")
        return {}
    options = {
        "pretrained": given["pretrained"] or preset.get("pretrained") or entry.defaults.get("pretrained", "openai"),
        "template": given["template"] or preset.get("template") or clip.TEMPLATE,
        "paper_temperature": bool(given["paper_temperature"] or preset.get("paper_temperature", False)),
    }
    return options


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
    head = sum(p.numel() for p in base.task_head.parameters()) if has_head(base) else 0
    # Checkpointed every 50 steps: a killed run resumes training where it died.
    # Under torchrun all ranks train together (DDP, each on a slice of the global batch); rank 0 saves.
    lead = not _distributed() or torch.distributed.get_rank() == 0
    if method == "head_only" and not has_head(base):  # CLIP: the baseline is zero-shot, nothing to train
        history = {"train_loss": [], "train_seconds": 0.0}
    else:
        history = train(
            model, train_data, dataset.train.labels, config, device=device, desc=f"train {method}",
            progress=progress and lead, checkpoint=folder.with_name(f".{method}.ckpt"), checkpoint_every=50,
            augment=entry.augment,
        )  # fmt: skip
    if not lead:
        return
    test_loss, test_acc = evaluate(
        model, test_data, dataset.test.labels, config.eval_batch_size, device, autocast=config.autocast
    )
    n_train = trainable_params(model)
    print(
        f"[train {method}] test accuracy {test_acc:.4f}, loss {test_loss:.4f}, {n_train:,} trainable", file=sys.stderr
    )
    info = {
        "name": method,
        "method": method,
        "model": entry.name,
        "model_options": key["model_options"],
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
        "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
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
