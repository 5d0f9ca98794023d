"""The factored plane's per-point cache: each point's adapter products built once per point, not once per batch.

    python -m experiments.benchmarks.factored_cache [--quick] [--json PATH] [--points N] [--repeats R]

One process, one model, the same solutions, points and batches for both sides: a randomly initialised Llama
(shape in :data:`SHAPE`, no download) with fabricated commonsense data, LoRA and RandLoRA trained one step each
through the toolkit (``--methods lora randlora``; the plane's third vertex is the base model), in fp32 and on an
NF4 base (``--load-4bit``: the points applied beside the packed layers). For each evaluation-set size in
batches, :class:`landscape.engine.factored.FactoredEvaluator` evaluates the same inner grid points (every adapter term
active) with the cache on (``cache_bytes`` 1 GiB) and off (0: every batch rebuilds the products), the two
interleaved repeat by repeat so load from other processes hits both alike; the median seconds per point of each
and their ratio (off / on) are reported, and the losses are checked to be bit-identical.

Uses the tests' tiny-model helpers (:mod:`tests.llm_models`, :mod:`tests.llm_data`) for the tokenizer and data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip
POINTS = [(0.25, 0.25), (0.5, 0.5), (-0.25, 0.75), (0.75, -0.25)]


def _model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.llm_models import tokenizer

    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **SHAPE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _setup(model: Path, data: Path, out: Path, load_4bit: bool):
    from adapters.solution import base_solution
    from landscape.cli import Stages
    from landscape.config import from_argv
    from landscape.run import load, train_solutions

    argv = ["--model", f"hf:{model}", "--dataset", "commonsense", "--data-root", str(data), "--out", str(out),
            "--no-progress", "--device", "cpu", "--train-steps", "1", "--methods", "lora", "randlora",
            *(["--load-4bit"] if load_4bit else [])]  # fmt: skip
    loaded = load(from_argv(argv))
    solutions = train_solutions(loaded, torch.device("cpu"), Stages(quiet=True))
    solutions["base"] = base_solution(loaded.task.base, loaded.model_name)
    return loaded, solutions


def _case(loaded, solutions, batches: int, points: list, repeats: int) -> dict:
    from adapters.data import eval_subset
    from landscape.engine import factored
    from landscape.engine.grid import EvalSet

    task = loaded.task
    subset = eval_subset(task.dataset.test, None, 0)
    evals = EvalSet.prepare(task.entry.encode(subset.inputs), subset.labels, 1, "cpu")
    evals = EvalSet(evals.batches[:batches], sum(int(t.numel()) for _, t in evals.batches[:batches]))
    deltas = {s: solutions[s].module_deltas(check=False) for s in ("base", "lora", "randlora")}
    chart = factored.build_chart("paper", task.base, deltas, geometry=False)
    sides = {"cache": 1 << 30, "no_cache": 0}
    evaluators = {k: factored.FactoredEvaluator(task.base, chart, evals, "cpu", objective=task.objective,
                                                cache_bytes=v) for k, v in sides.items()}  # fmt: skip
    seconds = {k: [] for k in sides}
    losses = {k: [] for k in sides}
    for k in sides:  # warm-up
        evaluators[k].evaluate(*points[0])
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for k in order:
            start = time.perf_counter()
            losses[k] = [evaluators[k].evaluate(x, y).loss for x, y in points]
            seconds[k].append((time.perf_counter() - start) / len(points))
    info = evaluators["cache"].cache_info()
    for e in evaluators.values():
        e.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"batches": len(evals.batches), "samples": evals.n, "s_per_point_cache": med["cache"],
            "s_per_point_no_cache": med["no_cache"], "ratio": med["no_cache"] / med["cache"],
            "identical": losses["cache"] == losses["no_cache"], "cache_bytes": info["peak_bytes"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.factored_cache", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="batches 2 and 4, 3 repeats (default: 1, 2, 4, 8; 5)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    from tests.llm_data import write_commonsense

    sizes = (2, 4) if args.quick else (1, 2, 4, 8)
    repeats = args.repeats or (3 if args.quick else 5)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _model(tmp / "model")
        data = write_commonsense(tmp / "data", n_train=24, n_test=max(sizes))
        for variant, load_4bit in (("fp32", False), ("nf4", True)):
            loaded, solutions = _setup(model, data, tmp / variant, load_4bit)
            for batches in sizes:
                case = {"variant": variant, **_case(loaded, solutions, batches, POINTS, repeats)}
                cases.append(case)
                on, off = case["s_per_point_cache"] * 1e3, case["s_per_point_no_cache"] * 1e3
                print(f"{variant:>5} batches {case['batches']}: {on:8.1f} ms/point cached, {off:8.1f} uncached, "
                      f"ratio {case['ratio']:.2f}, identical {case['identical']}", flush=True)  # fmt: skip
    result = {"shape": SHAPE, "points": POINTS, "repeats": repeats, "torch_threads": torch.get_num_threads(),
              "cases": cases}  # fmt: skip
    if args.json:
        from adapters.io import write_json

        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
