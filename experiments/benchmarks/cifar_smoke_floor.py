"""Benchmark: the CIFAR-100 smoke run's arithmetic floor, the time its model matmuls alone take on this machine.

    python -m experiments.benchmarks.cifar_smoke_floor [--threads N] [--avx2] [--smoke PATH] [--json PATH]
                                                       [--batch-size N]

What it counts: the model work of :mod:`experiments.benchmarks.cifar_smoke`'s run (the paper preset on random-init
ViT-B/32 with both towers): a training step of FT, LoRA r = 32 and RandLoRA r = 6 at the preset's batch of 128
augmented images (2 steps each), the test evaluation of each solution and of the zero-shot base (the fabricated
50-image test split), and the evaluated points over 16 samples (a 3 × 3 grid, 3 × 19 interior path points, the 3
vertices). Each piece runs once under a dispatch mode that records every matmul it calls (aten ``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``convolution``: their FLOPs and operand shapes); each distinct matmul is then timed alone, on
fresh contiguous operands, at the run's thread count (nn.MultiheadAttention's fused inference kernel counts as its
two projections; attention's own T² products, ~1 % at 50 tokens, are left out). The floor is Σ count × time: what
the run would take if everything else (norms, activations, attention's softmax, copies, the optimizer, Python, I/O,
the spectra, start-up) were free. ``--smoke`` (a ``cifar_smoke --json`` file) sets the measured stages beside it.

Why: the 5-minute budget of issue 20 is met on one kind of 2-core machine and not on another; this says how far
the run is from what its arithmetic costs there (``--avx2`` restricts torch/MKL/oneDNN and OpenBLAS to AVX2, as
cifar_smoke's).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.benchmarks.cifar_smoke import AVX2_ENV, BUDGET_S, RUN_ARGS, TEST_IMAGES, cpu_name
from experiments.benchmarks.cifar_smoke import PRESET_BATCH as BATCH

_RUN = {RUN_ARGS[i]: RUN_ARGS[i + 1] for i in range(len(RUN_ARGS) - 1) if RUN_ARGS[i].startswith("--")}
STEPS, SAMPLES = int(_RUN["--train-steps"]), int(_RUN["--eval-samples"])
# the grid's points, each path's interior points (its ends are the vertices, evaluated once) and the 3 vertices
POINTS = int(_RUN["--grid"]) ** 2 + 3 * (int(_RUN["--path-points"]) - 2) + 3
RANKS = {"ft": None, "lora": 32, "randlora": 6}  # the paper preset's
_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
           _aten.convolution.default, _aten.convolution_backward.default}  # fmt: skip


class MatmulRecorder(TorchDispatchMode):
    """Counts each matmul call by (op, operand shapes), with its FLOPs (2 per multiply-add)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.calls[(str(func.overloadpacket.__name__), shapes, *_conv_options(func, args))] += 1
        elif func == _aten._native_multi_head_attention.default:
            # nn.MultiheadAttention's inference fast path: one kernel whose q/k/v and output projections dispatch
            # nothing of their own; recorded as the two addmm they are (attention's own products, T² per head,
            # are left out here as everywhere: at a ViT's 50 tokens they are ~1 % of the block's)
            query, embed = args[0], args[3]
            tokens = query.numel() // embed
            self.calls[("addmm", ((3 * embed,), (tokens, embed), (embed, 3 * embed)))] += 1
            self.calls[("addmm", ((embed,), (tokens, embed), (embed, embed)))] += 1
        return func(*args, **(kwargs or {}))


def _conv_options(func, args) -> tuple:
    """A convolution's options after its tensors (none for a matmul): stride, padding, dilation, transposed, output
    padding and groups; its backward's bias sizes first and which gradients it computes last."""
    if func == _aten.convolution.default:
        return tuple(tuple(a) if isinstance(a, list) else a for a in args[3:9])
    if func == _aten.convolution_backward.default:
        return tuple(tuple(a) if isinstance(a, list) else a for a in args[3:11])
    return ()


def flops(key: tuple) -> int:
    """FLOPs of one recorded call (2 per multiply-add)."""
    op, shapes = key[0], key[1]
    if op == "mm":
        (m, k), (_, n) = shapes
        return 2 * m * k * n
    if op == "addmm":
        (m, k), (_, n) = shapes[-2:]
        return 2 * m * k * n
    if op in ("bmm", "baddbmm"):
        (b, m, k), (_, _, n) = shapes[-2:]
        return 2 * b * m * k * n
    if op == "convolution_backward":  # (grad_output, input, weight): one forward's worth per gradient computed
        grad_out, w, mask = shapes[0], shapes[2], key[-1]
        return 2 * math.prod(grad_out) * math.prod(w[1:]) * (int(mask[0]) + int(mask[1]))
    x, w = shapes[0], shapes[1]  # convolution, no padding or dilation in a ViT's patch embedding
    stride = key[2]
    out = [(size - kernel) // s + 1 for size, kernel, s in zip(x[2:], w[2:], stride, strict=True)]
    return 2 * x[0] * math.prod(out) * math.prod(w)


def time_call(key: tuple, min_seconds: float = 0.2) -> float:
    """Seconds of one call of ``key``'s matmul on fresh contiguous operands (mean over ≥ ``min_seconds``)."""
    args: list = [torch.randn(shape) for shape in key[1]]
    options = [list(a) if isinstance(a, tuple) else a for a in key[2:]]
    if key[0] == "convolution":  # input, weight[, bias], then the recorded options
        args = [*args[:2], args[2] if len(args) > 2 else None, *options]
    elif key[0] == "convolution_backward":  # grad_output, input, weight, then bias sizes ... output mask
        args = [*args, *options]
    op = getattr(_aten, key[0])
    op(*args)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 2:
        op(*args)
        n += 1
    return (time.perf_counter() - start) / n


def record(fn) -> Counter:
    """The matmuls ``fn()`` calls."""
    with MatmulRecorder() as rec:
        fn()
    return rec.calls


def pieces(
    arch: str = "ViT-B-32", classes: list[str] | None = None, batch: int = BATCH
) -> dict[str, tuple[int, Counter]]:
    """{piece: (times the smoke runs it, the matmuls of one)} on random-init ``arch``, training at ``batch`` images a
    step (the preset's by default, as the issue's smoke; cifar_smoke --batch-size runs a smaller one)."""
    import torch.nn.functional as F

    from adapters.methods import MethodSpec, attach
    from adapters.models import clip
    from tests.fakes import CIFAR_FINE_NAMES  # the smoke's fabricated class names

    torch.manual_seed(0)
    classes = classes or list(CIFAR_FINE_NAMES)
    base = clip.build(len(classes), classes, arch=arch, pretrained="none").eval()
    size = base.image_size
    augment = clip.make_augment(size)
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)  # noqa: E731
    out: dict[str, tuple[int, Counter]] = {}
    for method, rank in RANKS.items():
        model = attach(copy.deepcopy(base), MethodSpec(method, rank=rank, seed=0), clip.TARGETS).train()
        labels = torch.randint(0, len(classes), (batch,))

        def step(model=model, labels=labels):
            inputs = augment({"pixels": images(batch)}, torch.Generator().manual_seed(0))
            F.cross_entropy(model(**inputs).float(), labels).backward()

        out[f"train step {method}"] = (STEPS, record(step))
        del model

    def evaluate(n: int):
        def run():
            base._text_cache = None  # every point's text tower is new
            with torch.no_grad():
                base(pixels=images(n))

        return run

    out[f"test evaluation ({TEST_IMAGES} images)"] = (len(RANKS) + 1, record(evaluate(TEST_IMAGES)))
    out[f"point ({SAMPLES} samples)"] = (POINTS, record(evaluate(SAMPLES)))
    return out


def floor(parts: dict[str, tuple[int, Counter]]) -> dict:
    """Per piece: count, TFLOP and matmul-alone seconds of one, and the floor (count × seconds)."""
    timings: dict[tuple, float] = {}
    rows = {}
    for name, (count, calls) in parts.items():
        for key in calls:
            if key not in timings:
                timings[key] = time_call(key)
        seconds = sum(n * timings[key] for key, n in calls.items())
        total = sum(n * flops(key) for key, n in calls.items())
        rows[name] = {"count": count, "tflop": total / 1e12, "seconds": seconds, "floor_s": count * seconds,
                      "gflops": total / seconds / 1e9 if seconds else 0.0}  # fmt: skip
    return {"pieces": rows, "floor_s": sum(r["floor_s"] for r in rows.values())}


def measured(smoke: dict) -> dict[str, float]:
    """The smoke's measured seconds, grouped as the floor's pieces: training (its steps and test evaluations) and
    evaluation (grid and paths); the rest (load, plane, spectrum, render, start-up) has no matmul floor here."""
    stages = {k: v["seconds"] for k, v in smoke["stages"].items()}
    train = sum(v for k, v in stages.items() if k.startswith("train_"))
    evaluation = stages.get("grid", 0.0) + stages.get("paths", 0.0)
    return {"training": train, "evaluation": evaluation, "rest": smoke["wall_s"] - train - evaluation,
            "whole": smoke["wall_s"]}  # fmt: skip


def table(result: dict) -> str:
    lines = [f"CIFAR-100 smoke's matmul floor on {result['cpu']}, {result['threads']} threads, "
             f"training batch {result.get('batch_size', BATCH)}",
             "", f"{'piece':<28} {'count':>5} {'TFLOP':>7} {'s each':>8} {'GFLOP/s':>8} {'floor s':>8}"]  # fmt: skip
    for name, r in result["pieces"].items():
        lines.append(f"{name:<28} {r['count']:>5} {r['tflop']:>7.3f} {r['seconds']:>8.3f} {r['gflops']:>8.0f} "
                     f"{r['floor_s']:>8.1f}")  # fmt: skip
    lines.append(f"{'matmul floor':<28} {'':>5} {'':>7} {'':>8} {'':>8} {result['floor_s']:>8.1f}")
    if result.get("smoke"):
        m, p = result["smoke"], result["pieces"]
        train_floor = sum(r["floor_s"] for k, r in p.items() if not k.startswith("point"))
        point_floor = sum(r["floor_s"] for k, r in p.items() if k.startswith("point"))
        lines += ["", f"measured ({result['smoke_file']}):",
                  f"  training (steps, test evaluations)  {m['training']:7.1f} s   floor {train_floor:6.1f} s",
                  f"  grid + paths                        {m['evaluation']:7.1f} s   floor {point_floor:6.1f} s",
                  f"  the rest (no matmul floor counted)  {m['rest']:7.1f} s",
                  f"  whole                               {m['whole']:7.1f} s   budget {BUDGET_S:.0f} s"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.cifar_smoke_floor",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the timed matmuls (the smoke's)")
    parser.add_argument(
        "--avx2",
        action="store_true",
        help="restrict torch/MKL/oneDNN and OpenBLAS to AVX2 (cifar_smoke.AVX2_ENV; a child process)",
    )
    parser.add_argument("--smoke", type=Path, help="a cifar_smoke --json file to set beside the floor")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"images per training step (default: --smoke's, else the preset's {BATCH})",
    )
    args = parser.parse_args(argv)
    if args.smoke is not None and not args.smoke.is_file():
        print(f"error: --smoke {args.smoke}: no such file; write one with cifar_smoke --json", file=sys.stderr)
        return 2
    if args.avx2 and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):  # the ISA is fixed at start-up
        rest = list(argv if argv is not None else sys.argv[1:])
        cmd = [sys.executable, "-m", "experiments.benchmarks.cifar_smoke_floor", *rest]
        return subprocess.run(cmd, env={**os.environ, **AVX2_ENV}, cwd=Path(__file__).resolve().parents[2]).returncode
    torch.set_num_threads(args.threads)
    smoke = json.loads(args.smoke.read_text()) if args.smoke is not None else {}
    # the smoke it stands beside trained at its own batch (files written before batch_size was recorded: the preset's)
    smoke_batch = smoke.get("batch_size", BATCH) if smoke else None
    batch = args.batch_size if args.batch_size is not None else (smoke_batch or BATCH)
    if batch < 1 or (smoke_batch is not None and batch != smoke_batch):
        print(f"error: --batch-size {batch}: the floor needs a positive batch, and the --smoke run's "
              f"({smoke_batch}) when one is given; drop --batch-size", file=sys.stderr)  # fmt: skip
        return 2
    result = {"cpu": cpu_name() + (" restricted to AVX2" if args.avx2 else ""), "threads": args.threads,
              "batch_size": batch, **floor(pieces(batch=batch))}  # fmt: skip
    if smoke:
        result["smoke"], result["smoke_file"] = measured(smoke), str(args.smoke)
    print(table(result))
    if args.json is not None:
        from landscape.engine import store

        store.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
