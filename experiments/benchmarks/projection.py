"""PROJECTED wall time of the commonsense preset's grid on one H200, from a grid point measured on this machine.

    python -m experiments.benchmarks.projection [--config experiments/paper/commonsense.toml] [--layers N]
        [--samples 16] [--prompt-len 96] [--answer-len 6] [--candidates 4] [--efficiency 0.3] [--json PATH]

Nothing here runs on an H200: the H200 figure is a **projection**, and every output says so.

**Measured (this machine).** The landscape engine at one grid point (:class:`landscape.engine.grid.PlaneEvaluator`,
the precision ``auto`` picks, :class:`adapters.models.lm_scoring.CausalLMScorer`: each prompt run once, its
candidates continued from its KV cache, logits only at the answer positions) on a randomly initialised model of
Qwen2-0.5B's real configuration (:data:`experiments.benchmarks.lm_throughput.QWEN2_0_5B`, all 24 layers unless
``--layers``) over ``--samples`` fabricated multiple-choice samples shaped like the commonsense files
(:func:`experiments.benchmarks.plain_lm.fabricate_examples`: a prompt of ``--prompt-len`` / 2 to
``--prompt-len`` tokens and ``--candidates`` answers of ``--answer-len`` tokens; the real files are not here,
so these are stated assumptions). It gives:

- ``tokens_per_s``: the samples' tokens (prompt + candidate, each candidate counted as its own sequence: the
  count ``experiments.benchmarks.llm_scale`` uses) over the seconds of one point, after a warm-up point;
- ``flops_per_token``: the FLOPs that point really ran (``torch.utils.flop_counter.FlopCounterMode`` around
  the same evaluation; the shared prompt forwards and answer-only logits make it less than a plain forward's
  2 × parameters per token; the padding of each length-sorted batch is counted, as the engine runs it) over
  those tokens.

**Projected (H200).** :func:`project_grid_wall_time`: the preset's points (``grid``², 625) × its samples
(``eval_samples``, 512) × the measured tokens per sample × ``flops_per_token``, over the H200's dense bf16
peak (:data:`H200_BF16_DENSE_FLOPS`, 989 TFLOP/s: NVIDIA's datasheet figure of 1,979 is with 2:4 sparsity)
times an efficiency (:data:`H200_EFFICIENCY`, 0.3, an assumption: a 0.5B model's matmuls are 896 wide and the
answer continuations are short, so far from peak). Setting each point's weights (W0 + x·U + y·V over the
adapted weights: a few GB of memory traffic, milliseconds at 4.8 TB/s) is left out. The CPU's own time for the
same grid at the measured rate is printed beside it. ``python -m experiments.gpu_check --grid-projection``
measures the same point on a GPU and prints measured against projected (the calibration of the efficiency).

``--quick``: a tiny model of the same family (seconds; for tests). Results print and, with ``--json``, are
written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters.compat import tomllib
from adapters.errors import UserError

PROG = "python -m experiments.benchmarks.projection"
ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "experiments" / "paper" / "commonsense.toml"
H200_BF16_DENSE_FLOPS = 989e12  # H200 SXM, bf16 tensor cores, dense (the datasheet's 1,979 TFLOP/s is 2:4 sparse)
# assumed fraction of that peak the grid's forwards reach; gpu_check --grid-projection measures it
H200_EFFICIENCY = 0.3
LABEL = "PROJECTION (not measured): H200 time = FLOPs / (dense bf16 peak x assumed efficiency)"


def project_grid_wall_time(
    tokens_per_point: float,
    points: int,
    flops_per_token: float,
    *,
    cpu_tokens_per_s: float | None = None,
    peak_flops: float = H200_BF16_DENSE_FLOPS,
    efficiency: float = H200_EFFICIENCY,
) -> dict:
    """Projected wall time of a grid of ``points`` points, each scoring ``tokens_per_point`` tokens at
    ``flops_per_token`` FLOPs each, on a device of ``peak_flops`` (default: one H200, dense bf16) running at
    ``efficiency`` of that peak: seconds = tokens_per_point × points × flops_per_token / (peak_flops ×
    efficiency). ``cpu_tokens_per_s`` (a measured rate) adds the same grid's time at that rate.

    Returns a dict with ``label`` (it is a projection, never a measurement), the inputs, ``total_tokens``,
    ``total_flops``, ``projected_seconds``, ``projected_tokens_per_s`` and, given ``cpu_tokens_per_s``,
    ``cpu_seconds_at_measured_rate`` and ``cpu_flops_per_s``. Raises ValueError on a non-positive input or an
    efficiency above 1.
    """
    for name, value in (("tokens_per_point", tokens_per_point), ("points", points),
                        ("flops_per_token", flops_per_token), ("peak_flops", peak_flops),
                        ("efficiency", efficiency)):  # fmt: skip
        if not value > 0:
            raise ValueError(f"{name} must be > 0, not {value!r}")
    if efficiency > 1:
        raise ValueError(f"efficiency is a fraction of the peak (0 < e <= 1), not {efficiency!r}")
    if cpu_tokens_per_s is not None and not cpu_tokens_per_s > 0:
        raise ValueError(f"cpu_tokens_per_s must be > 0, not {cpu_tokens_per_s!r}")
    tokens = float(tokens_per_point) * points
    flops = tokens * flops_per_token
    seconds = flops / (peak_flops * efficiency)
    out = {
        "label": LABEL,
        "tokens_per_point": float(tokens_per_point), "points": int(points), "flops_per_token": float(flops_per_token),
        "peak_flops": float(peak_flops), "efficiency": float(efficiency),
        "total_tokens": tokens, "total_flops": flops,
        "projected_seconds": seconds, "projected_tokens_per_s": tokens / seconds,
    }  # fmt: skip
    if cpu_tokens_per_s is not None:
        out["cpu_tokens_per_s"] = float(cpu_tokens_per_s)
        out["cpu_seconds_at_measured_rate"] = tokens / cpu_tokens_per_s
        out["cpu_flops_per_s"] = cpu_tokens_per_s * flops_per_token
    return out


def preset_grid(config: Path = PRESET) -> dict:
    """The grid's size in a commonsense TOML: ``points`` (grid²) and ``samples`` (eval_samples)."""
    try:
        landscape = tomllib.loads(Path(config).read_text())["landscape"]
        grid, samples = int(landscape["grid"]), int(landscape["eval_samples"])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"--config {config}: cannot read [landscape] grid and eval_samples ({e})") from e
    shown = Path(config).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    return {"config": str(shown), "grid": grid, "points": grid * grid, "samples": samples}


def measure_point(device: str = "cpu", dtype: str = "auto", layers: int | None = None, samples: int = 16,
                  prompt_len: int = 96, answer_len: int = 6, candidates: int = 4, quick: bool = False,
                  log=print) -> dict:  # fmt: skip
    """One grid point of the engine on ``device`` (module docstring): its seconds, tokens, tokens/s and counted
    FLOPs per token, after one warm-up point."""
    from torch.utils.flop_counter import FlopCounterMode

    from adapters.precision import resolve_dtype
    from experiments.benchmarks.lm_throughput import QWEN2_0_5B, TINY, build_model, encode, toolkit_evaluator
    from experiments.benchmarks.peers import sync
    from experiments.benchmarks.plain_lm import fabricate_examples
    from landscape.engine.grid import EvalSet, PlaneEvaluator

    shape = TINY if quick else QWEN2_0_5B
    dtype = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    model = build_model(shape, layers)
    examples = fabricate_examples(samples, shape["vocab_size"], prompt_len, answer_len, candidates)
    tokens = sum(len(p) + len(c) for p, cands in examples for c in cands)
    data, gold = encode(examples)
    budget = 8192 if device == "cpu" else 65536  # adapters.models.lm_scoring's default token budgets
    chart_only = toolkit_evaluator(model, data, gold, budget)  # its chart moves the final norm only: no weight cost
    evaluator = PlaneEvaluator(chart_only.model, chart_only.chart, EvalSet.prepare(data, gold, 1, device, budget),
                               device, dtype=dtype, objective=chart_only.objective)  # fmt: skip
    depth = layers or shape["num_hidden_layers"]
    log(f"model {'tiny' if quick else 'qwen2-0.5b shape'} ({depth} layers, {time.perf_counter() - t0:.0f} s to "
        f"build), {samples} samples, {tokens} tokens, {dtype} on {device}")  # fmt: skip
    evaluator.evaluate(0.1, 0.2)  # warm-up: allocator and kernels' first calls
    sync(torch.device(device))
    start = time.perf_counter()
    evaluator.evaluate(0.3, 0.4)
    sync(torch.device(device))
    seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        evaluator.evaluate(0.3, 0.4)
    flops = float(counter.get_total_flops())
    return {"device": device, "dtype": dtype, "layers": layers or shape["num_hidden_layers"],
            "shape": "qwen2-tiny" if quick else "qwen2-0.5b", "samples": samples, "prompt_len": prompt_len,
            "answer_len": answer_len, "candidates": candidates, "tokens": tokens, "tokens_per_sample": tokens / samples,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "flops": flops,
            "flops_per_token": flops / tokens}  # fmt: skip


def report_lines(measured: dict, preset: dict, projection: dict) -> list[str]:
    """The printed report: what was measured on this machine, then the projection, labelled as one."""
    p = projection
    return [
        f"measured here ({measured['device']}, {measured['dtype']}): one grid point, {measured['samples']} samples, "
        f"{measured['tokens']} tokens in {measured['seconds']:.2f} s = {measured['tokens_per_s']:,.0f} tokens/s, "
        f"{measured['flops_per_token'] / 1e9:.3f} GFLOP/token (FlopCounterMode)",
        f"preset {preset['config']}: {preset['points']} points x {preset['samples']} samples x "
        f"{measured['tokens_per_sample']:.1f} tokens/sample = {p['total_tokens']:,.0f} tokens, "
        f"{p['total_flops'] / 1e15:,.1f} PFLOP",
        f"at the measured rate on this machine: {p['cpu_seconds_at_measured_rate'] / 3600:,.1f} h (measured rate "
        f"x preset size)",
        f"PROJECTION for one H200 (not measured): {p['projected_seconds'] / 60:,.1f} min "
        f"({p['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 peak x assumed efficiency {p['efficiency']:.2f})",
    ]


def build_parser() -> argparse.ArgumentParser:
    from landscape.cli import Parser, positive_int

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(PRESET), help="the preset TOML whose grid is projected")
    p.add_argument("--layers", type=positive_int, default=None, help="decoder layers measured (default: all 24)")
    p.add_argument("--samples", type=positive_int, default=16, help="samples in the measured point (default: 16)")
    p.add_argument("--prompt-len", type=positive_int, default=96, help="longest prompt in tokens (default: 96)")
    p.add_argument("--answer-len", type=positive_int, default=6, help="tokens per candidate (default: 6)")
    p.add_argument("--candidates", type=positive_int, default=4, help="candidates per sample (default: 4)")
    p.add_argument("--efficiency", type=float, default=H200_EFFICIENCY,
                   help=f"assumed fraction of the H200's dense bf16 peak (default: {H200_EFFICIENCY})")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny model (seconds; for tests)")
    p.add_argument("--json", default=None, help="write the result here (atomically)")
    return p


def _run(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 < args.efficiency <= 1:
        raise UserError(f"--efficiency is a fraction of the peak (0 < e <= 1), not {args.efficiency}")
    preset = preset_grid(Path(args.config))  # checked before the model is built
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adapters.precision import cpu_description

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    measured = measure_point("cpu", "auto", args.layers, args.samples, args.prompt_len, args.answer_len,
                             args.candidates, args.quick, log=say)  # fmt: skip
    projection = project_grid_wall_time(measured["tokens_per_sample"] * preset["samples"], preset["points"],
                                        measured["flops_per_token"], cpu_tokens_per_s=measured["tokens_per_s"],
                                        efficiency=args.efficiency)  # fmt: skip
    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("\n".join(report_lines(measured, preset, projection)))
    if args.json:
        from adapters.io import write_json

        write_json(args.json, {"cpu": cpu_description(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                               "preset": preset, "measured": measured, "projection": projection})  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import run_main

    return run_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
