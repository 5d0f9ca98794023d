"""python -m experiments.benchmarks.lm_throughput — causal-LM evaluation: the toolkit against a plain loop.

Side by side in one process, over the same fabricated multiple-choice examples (:func:`experiments.benchmarks.
plain_lm.fabricate_examples`: a prompt and 4 candidates of 3 tokens per sample) and the same weights:

- **toolkit**: one grid point of the landscape engine (:class:`landscape.engine.grid.PlaneEvaluator.evaluate`
  on an :class:`landscape.engine.grid.EvalSet` cut by ``--eval-tokens``), i.e.
  :class:`adapters.models.lm_scoring.CausalLMScorer` with each sample's prompt run once and its candidates
  continued from copies of the KV cache, logits only at the answer positions;
- **plain**: :func:`experiments.benchmarks.plain_lm.plain_loop`, each candidate its own sequence,
  ``model(input_ids, attention_mask)`` over the whole vocabulary and a gather, ``--plain-batch`` sequences per
  batch.

The model has the shape of Qwen2-0.5B (:data:`QWEN2_0_5B`: the real config's numbers, written here; random
initialisation, nothing downloaded), fp32; ``--layers N`` keeps the first N of its 24 decoder layers. Both
sides count the same work: the real tokens of every ``prompt + candidate`` sequence; tokens/s = that count over
the wall time of one pass, after a warm-up pass of each on two samples. The ratio is toolkit ÷ plain. The
per-sample answer losses of both are compared (``max_abs_loss_diff``), so a speed-up never hides another result.

``--quick``: a tiny model of the same family (2 layers, hidden 64, vocabulary 1,000) and 4 samples, for tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters.precision import cpu_description
from experiments.benchmarks.plain_lm import Example, fabricate_examples, plain_loop

PROG = "python -m experiments.benchmarks.lm_throughput"

# Qwen/Qwen2-0.5B's config.json (the numbers that set the compute; rope and norm constants as released)
QWEN2_0_5B = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
    vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, hidden_act="silu",
)  # fmt: skip
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=512,
)  # fmt: skip


def build_model(shape: dict, layers: int | None, seed: int = 0):
    """A randomly initialised Qwen2 causal LM of ``shape`` (``layers``: keep that many decoder layers), fp32, eval."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def encode(examples: Sequence[Example], seed: int = 0):
    """The examples as the toolkit's causal-LM inputs (:func:`adapters.models.hf.encode_lm`'s layout: (N, C, T)
    right-padded ids, attention and answer masks, pad id 0) and a random gold candidate per sample."""
    from adapters.models.base import Encoded

    c = max(len(cands) for _, cands in examples)
    t = max(len(p) + len(x) for p, cands in examples for x in cands)
    ids = torch.zeros(len(examples), c, t, dtype=torch.long)
    mask, answer = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (prompt, cands) in enumerate(examples):
        for j, cand in enumerate(cands):
            seq = list(prompt) + list(cand)
            ids[i, j, : len(seq)] = torch.tensor(seq)
            mask[i, j, : len(seq)] = 1
            answer[i, j, len(prompt) : len(seq)] = True
    data = Encoded({"input_ids": ids, "attention_mask": mask, "answer_mask": answer}, lengths=mask.sum(-1).amax(-1))
    gold = torch.randint(0, c, (len(examples),), generator=torch.Generator().manual_seed(seed))
    return data, gold


def toolkit_evaluator(model, data, gold, eval_tokens: int):
    """The landscape engine at one point: a PlaneEvaluator whose chart moves only the final norm's weight (so
    setting a point costs nothing next to the forwards), over the evaluation set cut by ``eval_tokens``."""
    from adapters.models.lm_scoring import CausalLMScorer
    from adapters.objectives import OBJECTIVES
    from landscape.engine.grid import EvalSet, PlaneEvaluator
    from landscape.engine.plane import SOLUTIONS, build_chart, solution_weights

    scorer = CausalLMScorer(model).eval()
    evals = EvalSet.prepare(data, gold, 1, "cpu", eval_tokens)
    params = dict(scorer.named_parameters())
    name = next(n for n in params if n.endswith("model.norm.weight"))
    g = torch.Generator().manual_seed(1)
    deltas = {s: {name: 0.01 * torch.randn(params[name].shape, generator=g)} for s in SOLUTIONS}
    chart = build_chart("paper", solution_weights({name: params[name]}, deltas))
    return PlaneEvaluator(scorer, chart, evals, "cpu", objective=OBJECTIVES["answer"])


def plain_losses(scores: torch.Tensor, examples: Sequence[Example], gold: torch.Tensor) -> torch.Tensor:
    """Per sample, the gold candidate's mean answer-token loss from the plain loop's summed log-probabilities."""
    out, k = [], 0
    for (_, cands), g in zip(examples, gold.tolist(), strict=True):
        out.append(-float(scores[k + g]) / len(cands[g]))
        k += len(cands)
    return torch.tensor(out, dtype=torch.float64)


def run(layers: int | None, samples: int, quick: bool, eval_tokens: int, plain_batch: int, prompt_len: int,
        point: tuple[float, float] = (0.3, 0.4), log=print) -> dict:  # fmt: skip
    """One side-by-side measurement (module docstring); returns the report's case."""
    shape = TINY if quick else QWEN2_0_5B
    t0 = time.perf_counter()
    model = build_model(shape, layers)
    build_s = time.perf_counter() - t0
    examples = fabricate_examples(samples, shape["vocab_size"], prompt_len=prompt_len)
    tokens = sum(len(p) + len(c) for p, cands in examples for c in cands)
    data, gold = encode(examples)
    evaluator = toolkit_evaluator(model, data, gold, eval_tokens)
    evaluator.set_point(*point)  # both sides score the weights of this grid point
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({build_s:.1f} s to build); "
        f"{samples} samples, {tokens} tokens; {len(evaluator.eval_set.batches)} toolkit batches")  # fmt: skip

    warm = examples[:2]  # one-time costs (allocator, kernels' first calls) out of both timings
    plain_loop(model, warm, plain_batch)
    w_data, w_gold = encode(warm)
    toolkit_evaluator(model, w_data, w_gold, eval_tokens).evaluate(*point)
    evaluator.set_point(*point)

    t = time.perf_counter()
    result = evaluator.evaluate(*point, keep_samples=True)
    toolkit_s = time.perf_counter() - t
    scores, padded, plain_s = plain_loop(model, examples, plain_batch)
    reference = plain_losses(scores, examples, gold)[data.length_order()]  # the evaluation set's order
    diff = float((result.samples - reference).abs().max())
    case = {
        "model": "qwen2-tiny" if quick else "qwen2-0.5b-shape",
        "shape": {**shape, **({"num_hidden_layers": layers} if layers else {})},
        "params": sum(p.numel() for p in model.parameters()),
        "samples": samples, "candidates": 4, "prompt_len": prompt_len, "answer_len": 3,
        "eval_tokens": eval_tokens, "plain_batch": plain_batch, "point": list(point),
        "tokens": tokens, "plain_padded_tokens": padded,
        "toolkit_seconds": toolkit_s, "plain_seconds": plain_s,
        "tokens_per_s": tokens / toolkit_s, "plain_tokens_per_s": tokens / plain_s,
        "ratio": plain_s / toolkit_s,
        "toolkit_loss": result.loss, "plain_loss": float(reference.mean()), "max_abs_loss_diff": diff,
    }  # fmt: skip
    log(f"toolkit {case['tokens_per_s']:.0f} tokens/s ({toolkit_s:.2f} s), plain {case['plain_tokens_per_s']:.0f} "
        f"tokens/s ({plain_s:.2f} s): {case['ratio']:.2f}x; losses {result.loss:.6f} / {case['plain_loss']:.6f} "
        f"(max per-sample difference {diff:.1e})")  # fmt: skip
    return case


def build_parser() -> argparse.ArgumentParser:
    from landscape.cli import positive_int

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=positive_int, default=None, help="decoder layers kept (default: all 24)")
    p.add_argument("--samples", type=positive_int, default=None, help="samples of 4 candidates (default 16; quick 4)")
    p.add_argument("--prompt-len", type=positive_int, default=48, help="longest prompt in tokens (default 48; "
                   "prompts are drawn from half of it to it)")  # fmt: skip
    p.add_argument("--eval-tokens", type=positive_int, default=8192, help="the toolkit's token budget (default 8192)")
    p.add_argument("--plain-batch", type=positive_int, default=8, help="the plain loop's sequences per batch (8)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a tiny Qwen2 (2 layers, hidden 64) and 4 samples: tests")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.layers is not None and args.layers > QWEN2_0_5B["num_hidden_layers"]:
        print(f"{PROG}: --layers {args.layers}: Qwen2-0.5B has 24 layers: pass at most 24", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = args.samples or (4 if args.quick else 16)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    case = run(args.layers, samples, args.quick, args.eval_tokens, args.plain_batch, args.prompt_len, log=log)
    print(f"toolkit {case['tokens_per_s']:.0f} tokens/s, plain loop {case['plain_tokens_per_s']:.0f} tokens/s: "
          f"{case['ratio']:.2f}x")  # fmt: skip
    if args.json:
        import importlib.metadata as md

        from adapters.io import write_json

        write_json(args.json, {
            "benchmark": "lm_throughput",
            "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
            "cases": [case],
            "wall_s": time.perf_counter() - start,
            "machine": {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_after": os.getloadavg()},
            "versions": {p: md.version(p) for p in ("torch", "transformers")},
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
