"""One curvature HVP of LoRA and of RandLoRA side by side at the rehearsal's shape, in one process.

Qwen2-0.5B's configuration with 4 decoder layers (random init, seed 0, as ``experiments.rehearsal`` builds it),
the rehearsal's targets, RandLoRA r = 30 (alpha 60) and LoRA r = 16, one piece of ``--hvp-batch 4`` (4 gold
sequences of ``--tokens`` tokens, the last 8 scored), reverse-over-forward in fp32 on one thread. Prints each
product's CPU seconds (``--repeats`` times, alternating) and its FLOPs (``FlopCounterMode``): it answers where
RandLoRA's extra HVP time goes (README, rehearsal). Usage: ``python -m experiments.benchmarks.randlora_hvp``.
"""

from __future__ import annotations

import argparse
import copy
import resource

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _operators(tokens: int) -> dict:
    from peft import LoraConfig, RandLoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.models.hf import CausalLMScorer
    from adapters.objectives import AnswerLoss
    from experiments.rehearsal import SHAPES
    from landscape.curvature.hessian import HessianOperator
    from landscape.engine.grid import EvalSet

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(SHAPES["qwen2-0.5b"], num_hidden_layers=4)))
    ids = torch.randint(3, 4000, (4, 2, tokens))
    answer = torch.zeros_like(ids)
    answer[..., -8:] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_mask": answer}
    eval_set = EvalSet([(inputs, torch.zeros(4, dtype=torch.long))], 4)
    configs = {
        "lora": (LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), "lora_"),
        "randlora": (RandLoraConfig(r=30, randlora_alpha=60, target_modules=TARGETS, projection_prng_key=3,
                                    randlora_dropout=0.0), "randlora_"),
    }  # fmt: skip
    ops = {}
    for kind, (config, key) in configs.items():
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # away from the initialisation (LoRA's B = 0, RandLoRA's γ = 1)
            for name, p in model.named_parameters():
                if key in name:
                    p.normal_(0, 0.05)
        names = ["backbone." + n for n, p in model.named_parameters() if p.requires_grad]
        op = HessianOperator(CausalLMScorer(model), names, eval_set, AnswerLoss(), "float32", "reverse-over-forward")
        v = torch.randn(op.dim)
        op.flat_hvp(v)  # the first product also takes the gradient
        ops[kind] = (op, v)
    return ops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=80, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ops = _operators(args.tokens)
    for _ in range(args.repeats):
        for kind, (op, v) in ops.items():
            start = _cpu()
            op.flat_hvp(v)
            print(f"{kind:9} one HVP {_cpu() - start:6.2f} CPU s", flush=True)
    from torch.utils.flop_counter import FlopCounterMode

    for kind, (op, v) in ops.items():
        with FlopCounterMode(display=False) as counter:
            op.flat_hvp(v)
        print(f"{kind:9} one HVP {counter.get_total_flops() / 1e9:6.1f} GFLOP")


if __name__ == "__main__":
    main()
