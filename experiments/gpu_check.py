"""GPU check: CLIP ViT-B/32 at full size (random init, synthetic images) on one GPU, in ≤ 5 minutes.

    python -m experiments.gpu_check [--json PATH] [--steps 10] [--eval-images 4096] [--points 4]

Measures, in one run:

- training: median optimizer-step time and peak memory (``torch.cuda.max_memory_allocated``)
  for full fine-tuning, LoRA r=32 and RandLoRA r=6 on both encoders (the paper's three
  solutions; batch 128, bf16 autocast, AdamW, the main job's training loop body);
- grid evaluation: the landscape engine (:class:`landscape.engine.grid.PlaneEvaluator`, bf16, losses
  through :func:`adapters.objectives.score`) on a plane through three synthetic solutions over
  the weights the adapters adapt (:func:`adapters.methods.adapted_weights`: q/k/v, ``c_fc`` and
  ``c_proj`` of both towers), in images/s, and as a fraction of the bf16 matmul peak measured in
  the same run (useful FLOPs counted by ``FlopCounterMode`` on one batch, the text features once
  per point: :func:`experiments.benchmarks.grid.point_flops`);
- the projection of the paper's CIFAR-100 figure (625 points × 50,000 training images) from that
  throughput, with text features computed once per point (the text tower is on the plane).

``--rehearsal`` instead runs :mod:`experiments.rehearsal` (the seed's commonsense pipeline, every variant)
with ``--device cuda`` at real size and prints the same table: Qwen2-0.5B real weights when ``--model
hf:FOLDER`` points at them, otherwise a randomly initialised Llama-3-8B shape. It needs CUDA (exit 2
without).

``--grid-projection`` calibrates :mod:`experiments.benchmarks.projection`: one grid point of the commonsense
engine (Qwen2-0.5B shape, random init, the preset's 512 samples, bf16) timed on the GPU, its FLOPs counted,
and measured against projected printed for that point and for the preset's whole grid (625 points), with the
efficiency the GPU reached. It needs CUDA (exit 2 without).

``--calibrate`` measures the two efficiencies :mod:`experiments.benchmarks.llm_scale_plan` assumes (training: a
2-layer Llama-3-8B shape, bf16 autocast, fp32 masters, AdamW, checkpointing; grid: the commonsense grid point
above) and writes them to its calibration file, which the scaling projection then uses. It needs CUDA (exit 2
without).

``--smoke`` runs the same code on the CPU with the reduced ``clip-tiny`` architecture (seconds;
used by the tests). Results are printed and, with ``--json``, written atomically.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from adapters.io import write_json
from adapters.methods import MethodSpec, adapted_weights, attach, trainable_params
from adapters.models import build_base, get_model
from adapters.objectives import OBJECTIVES
from adapters.train import TrainConfig, make_optimizer
from experiments.benchmarks.grid import matmul_peak, point_flops
from experiments.benchmarks.peers import sync
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import build_chart, solution_weights

PAPER_POINTS, PAPER_IMAGES = 625, 50_000
METHODS = (("ft", None), ("lora", 32), ("randlora", 6))
OBJECTIVE = OBJECTIVES["classification"]


def train_case(base, entry, method, rank, images, labels, steps, device, bf16) -> dict:
    torch.manual_seed(0)
    model = attach(copy.deepcopy(base), MethodSpec(method, rank=rank), entry.targets).to(device).train()
    lr = {"ft": 1e-5}.get(method, 1e-3)
    optimizer = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    augment = entry.augment
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        sync(device)
        start = time.perf_counter()
        inputs = augment({"pixels": images}, torch.Generator().manual_seed(step))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**inputs).float()
        loss = OBJECTIVE.loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out = {"trainable_params": trainable_params(model), "step_s": statistics.median(times), "peak_mem_bytes": peak}
    del model, optimizer
    return out


def grid_case(base, entry, images, labels, points, device, bf16, batch) -> dict:
    g = torch.Generator().manual_seed(0)
    base_params = dict(base.named_parameters())
    adapted = list(adapted_weights(base, entry.targets))
    deltas = {s: {n: 1e-3 * torch.randn(base_params[n].shape, generator=g) for n in adapted}
              for s in ("ft", "lora", "randlora")}  # fmt: skip
    chart = build_chart("paper", solution_weights(base_params, deltas))
    eval_set = EvalSet.prepare(entry.encode(images), labels, batch, device)
    dtype = "bfloat16" if bf16 else "float32"
    evaluator = PlaneEvaluator(copy.deepcopy(base), chart, eval_set, device, dtype=dtype, objective=OBJECTIVE)
    vertex = evaluator.evaluate(0.0, 0.0)  # warm-up, at RandLoRA's vertex
    sync(device)
    start = time.perf_counter()
    for k in range(points):
        evaluator.evaluate(0.1 * k, 0.05 * k)
    sync(device)
    seconds = (time.perf_counter() - start) / points
    first_inputs, _ = eval_set.batches[0]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        flops = point_flops(evaluator.model, first_inputs, eval_set.n, train_mode=True)
    return {
        "adapted_weights": len(adapted),
        "plane_params": sum(base_params[n].numel() for n in adapted),
        "s_per_point": seconds,
        "images_per_s": eval_set.n / seconds,
        "forward_flops_per_image": flops["per_sample"],
        "text_flops_per_point": flops["once"],
        "flops_per_point": flops["total"],
        "loss_at_randlora": vertex.loss,
    }


def run(args) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (or --smoke for a CPU dry run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    arch = "clip-tiny" if args.smoke else "ViT-B-32"
    entry = get_model(arch)
    base = build_base(arch, [f"class {i}" for i in range(100)], {"pretrained": "none"}, seed=0)
    size = base.image_size
    g = torch.Generator().manual_seed(1)
    batch = 8 if args.smoke else 128
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 100, (batch,), generator=g).to(device)
    bf16 = device.type == "cuda"
    report = {"device": torch.cuda.get_device_name(device) if bf16 else "cpu", "model": arch, "batch": batch,
              "dtype": "bfloat16" if bf16 else "float32", "training": {}}  # fmt: skip
    started = time.perf_counter()
    for method, rank in METHODS:
        report["training"][method] = train_case(base, entry, method, rank, images, labels, args.steps, device, bf16)
        print(f"[train {method}] {report['training'][method]}", file=sys.stderr, flush=True)
    n_eval = 32 if args.smoke else args.eval_images
    eval_images = torch.randint(0, 256, (n_eval, 3, size, size), dtype=torch.uint8, generator=g)
    eval_labels = torch.randint(0, 100, (n_eval,), generator=g)
    grid = grid_case(base, entry, eval_images, eval_labels, args.points, device, bf16, 8 if args.smoke else 512)
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    grid["peak_flops_per_s"] = peak
    grid["utilization"] = grid["flops_per_point"] / grid["s_per_point"] / peak
    # text features once per point: 100 prompts through the text tower, small next to 50,000 images
    grid["paper_figure_projection_s"] = PAPER_POINTS * PAPER_IMAGES / grid["images_per_s"]
    report["grid"] = grid
    report["wall_s"] = time.perf_counter() - started
    return report


def grid_projection(json_path: str | None) -> int:
    """Measured against projected: one point of the commonsense grid on this GPU (module docstring)."""
    from experiments.benchmarks import projection as proj

    preset = proj.preset_grid()
    measured = proj.measure_point("cuda", "auto", samples=preset["samples"])
    per_sample = measured["tokens_per_sample"] * preset["samples"]
    point = proj.project_grid_wall_time(measured["tokens"], 1, measured["flops_per_token"])
    grid = proj.project_grid_wall_time(per_sample, preset["points"], measured["flops_per_token"])
    efficiency = measured["flops"] / measured["seconds"] / proj.H200_BF16_DENSE_FLOPS
    name = torch.cuda.get_device_name()
    minutes = measured["seconds"] * preset["points"] / 60
    print(f"{name}: one commonsense grid point ({measured['samples']} samples, {measured['tokens']} tokens, "
          f"{measured['dtype']}): measured {measured['seconds']:.3f} s, projected {point['projected_seconds']:.3f} s "
          f"(efficiency assumed {proj.H200_EFFICIENCY}, measured {efficiency:.3f} of the H200 bf16 peak)")  # fmt: skip
    print(f"preset grid ({preset['points']} points): measured rate x points {minutes:.1f} min, PROJECTED "
          f"{grid['projected_seconds'] / 60:.1f} min")  # fmt: skip
    if json_path:
        write_json(json_path, {"device": name, "preset": preset, "measured": measured, "projected_point": point,
                               "projected_grid": grid, "measured_efficiency": efficiency})  # fmt: skip
    return 0


def calibrate(json_path: str | None) -> int:
    """Both efficiencies the scaling projection assumes, measured on this GPU, written where
    :mod:`experiments.benchmarks.llm_scale_plan` reads them (its CALIBRATION, or ``json_path``)."""
    from experiments.benchmarks import llm_scale_plan as plan
    from experiments.benchmarks import projection as proj

    point = proj.measure_point("cuda", "auto", samples=proj.preset_grid()["samples"])
    train = plan.measure_train("cuda")
    report = {"device": torch.cuda.get_device_name(), "eval_efficiency": point["flops"] / point["seconds"]
              / proj.H200_BF16_DENSE_FLOPS, "train_efficiency": train["train_efficiency"], "grid_point": point,
              "train": train, "written_by": "python -m experiments.gpu_check --calibrate"}  # fmt: skip
    path = json_path or plan.CALIBRATION
    write_json(path, report)
    print(
        f"{report['device']}: efficiency of the dense bf16 peak: training {report['train_efficiency']:.3f} "
        f"(Llama-3-8B shape, {train['layers']} layers), grid {report['eval_efficiency']:.3f}; written to {path}"
    )
    return 0


def main(argv=None) -> int:
    from landscape.cli import Parser, out_file, positive_int

    p = Parser(prog="python -m experiments.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=out_file, default=None, help="write the report here (atomically)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed training steps per method (default: 10)")
    p.add_argument("--eval-images", type=positive_int, default=4096, help="images per grid point (default: 4096)")
    p.add_argument("--points", type=positive_int, default=4, help="timed grid points (default: 4)")
    p.add_argument("--smoke", action="store_true", help="CPU dry run with clip-tiny (for tests)")
    p.add_argument("--rehearsal", action="store_true",
                   help="run experiments.rehearsal on the GPU at real size (Qwen2-0.5B weights given with --model "
                   "hf:FOLDER, else a random-init Llama-3-8B shape) and print its table")  # fmt: skip
    p.add_argument("--model", default=None, help="--rehearsal: hf:FOLDER of real Qwen2-0.5B weights")
    p.add_argument("--grid-projection", action="store_true",
                   help="time a commonsense grid point on the GPU, against the projection")  # fmt: skip
    p.add_argument("--calibrate", action="store_true",
                   help="measure the training and grid efficiencies the scaling projection assumes "
                   "(experiments.benchmarks.llm_scale_plan) and write its calibration file (or --json)")  # fmt: skip
    args = p.parse_args(argv)
    if args.calibrate:
        if not torch.cuda.is_available():
            print("python -m experiments.gpu_check: error: --calibrate needs a CUDA GPU; without one, "
                  "python -m experiments.benchmarks.llm_scale_plan prints the uncalibrated projection",
                  file=sys.stderr)  # fmt: skip
            return 2
        return calibrate(args.json)
    if args.grid_projection:
        if not torch.cuda.is_available():
            print("python -m experiments.gpu_check: error: --grid-projection needs a CUDA GPU; on a CPU run "
                  "python -m experiments.benchmarks.projection", file=sys.stderr)  # fmt: skip
            return 2
        return grid_projection(args.json)
    if args.rehearsal:
        if not torch.cuda.is_available():
            print("python -m experiments.gpu_check: error: --rehearsal needs a CUDA GPU; on a CPU run "
                  "python -m experiments.rehearsal", file=sys.stderr)  # fmt: skip
            return 2
        from experiments import rehearsal

        rehearsal_argv = ["--device", "cuda", "--out", "runs/rehearsal-gpu", "--model", args.model or "llama3-8b"]
        return rehearsal.main(rehearsal_argv + (["--json", args.json] if args.json else []))
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU: run it where one is visible, or pass --smoke for a CPU dry run")
    report = run(args)
    t, gr = report["training"], report["grid"]
    print(f"{report['model']} on {report['device']} ({report['dtype']}), batch {report['batch']}")
    for method in t:
        mem = t[method]["peak_mem_bytes"]
        mem_text = f"{mem / 2**30:.2f} GiB" if mem else "n/a"
        step_ms = t[method]["step_s"] * 1e3
        count = t[method]["trainable_params"]
        print(f"  train {method:<9} {count:>12,} params  step {step_ms:8.1f} ms  peak {mem_text}")
    print(f"  grid: {gr['images_per_s']:,.0f} images/s, utilization {gr['utilization']:.2f} of the measured peak; "
          f"paper CIFAR-100 figure projected at {gr['paper_figure_projection_s'] / 60:.1f} min")  # fmt: skip
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
