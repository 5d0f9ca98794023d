"""The cases of :mod:`experiments.benchmarks.llm_scale`: its constants, the real configurations (:data:`REAL`) scaled
to a hidden size, each case's folder (base model, tokenizer, own and foreign solutions) and the fabricated
examples. The module docstring of :mod:`experiments.benchmarks.llm_scale` says what they are for.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m experiments.benchmarks.llm_scale"
GPU_BYTES = 141e9  # one H200
VOCAB = 4096
LAYERS = 4
QUICK_LAYERS = 2
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
RANKS = {"lora": 8, "randlora": 30}
SIZES = (512, 1024, 2048)  # the smallest with fixed overheads under 15 % of its ratios (issue 20 pt 3)
QUICK_SIZES = (64, 96, 128)
DTYPES = ("float32", "bfloat16", "4bit")
SOURCES = ("own", "foreign")
STAGES = ("load", "head_only", "train_ft", "train_lora", "train_randlora", "plane", "paths", "curves",
          "curves_checkpointed", "curvature", "spectrum", "checkpoint")  # fmt: skip
EVAL_STAGES = ("head_only", "plane")
FACTOR = re.compile(r"(^|\.)(lora_A|lora_B|randlora_lambda|randlora_gamma)(\.|$)")
SOURCE_STAGES = (
    "plane",
    "paths",
    "curves",
    "curves_checkpointed",
    "curvature",
    "spectrum",
)  # the stages that read solutions
# measured on their second call in the process (the first initialises runtime state once: llm_scale_worker._first_call)
WARMED = ("train_ft", "train_lora", "train_randlora", "plane", "curves", "curves_checkpointed")
TARGET = {"load": 1.1, "plane": 1.5, "paths": 1.5}  # issue 20 point 3 (load: above the runtime)

# The real configurations (config.json of the hub repositories), scaled by scaled_config().
REAL = {
    "qwen2-0.5b": {"family": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 32768},
    "llama3-8b": {"family": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                  "max_position_embeddings": 8192},
}  # fmt: skip


# --------------------------------------------------------------------------- models, solutions, data


def scaled_config(model: str, hidden: int, layers: int = LAYERS, vocab: int = VOCAB):
    """The real configuration of ``model`` at hidden size ``hidden`` (module docstring)."""
    from transformers import LlamaConfig, Qwen2Config

    real = REAL[model]
    heads = max(2, hidden // 64)
    kv = max(1, round(heads * real["num_key_value_heads"] / real["num_attention_heads"]))
    while heads % kv:
        kv -= 1
    inter = 64 * max(1, round(hidden * real["intermediate_size"] / real["hidden_size"] / 64))
    kwargs = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=real["tie_word_embeddings"],
                  rope_theta=real["rope_theta"], rms_norm_eps=real["rms_norm_eps"], max_position_embeddings=512,
                  bos_token_id=None, eos_token_id=vocab - 1, pad_token_id=vocab - 2)  # fmt: skip
    return (Qwen2Config if real["family"] == "qwen2" else LlamaConfig)(**kwargs)


def full_config(model: str):
    """The real configuration itself (for the projection: shapes only, never instantiated)."""
    from transformers import LlamaConfig, Qwen2Config

    real = {k: v for k, v in REAL[model].items() if k != "family"}
    return (Qwen2Config if REAL[model]["family"] == "qwen2" else LlamaConfig)(**real)


def save_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer ``t0 … t{V-3}``, ``<pad>``, ``</s>``: hf.entry needs one (the examples are given as
    token ids: beside a qwen2 config.json transformers reads it with Qwen2's own tokenizer class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 2)} | {"<pad>": vocab - 2, "</s>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(folder)


def _peft_config(method: str):
    from peft import LoraConfig, RandLoraConfig

    if method == "lora":
        return LoraConfig(r=RANKS["lora"], lora_alpha=2 * RANKS["lora"], target_modules=list(TARGETS),
                          task_type="CAUSAL_LM")  # fmt: skip
    return RandLoraConfig(r=RANKS["randlora"], randlora_alpha=2 * RANKS["randlora"], target_modules=list(TARGETS),
                          task_type="CAUSAL_LM", projection_prng_key=0)  # fmt: skip


def _perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # ft: every weight; lora: A and (zero-initialised) B; randlora: λ, γ
                p.add_((1e-3 if "randlora" in name else 1e-2) * torch.randn(p.shape, generator=g))


def make_case(folder: Path, model: str, hidden: int, layers: int) -> dict:
    """Save the scaled ``model`` and its own and foreign solutions under ``folder``; its sizes."""
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from adapters.methods import MethodSpec, attach
    from adapters.models import hf
    from adapters.solution import fingerprint, save_solution

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(scaled_config(model, hidden, layers))
    lm.save_pretrained(folder / "base")
    save_tokenizer(folder / "base")
    base = hf.entry(str(folder / "base"), "lm").build(0)
    g = torch.Generator().manual_seed(1)
    for method in ("ft", "lora", "randlora"):
        trained = attach(copy.deepcopy(base), MethodSpec(method, rank=RANKS.get(method)), TARGETS)
        _perturb(trained, g)
        info = {"name": method, "method": method, "model": f"hf:{folder / 'base'}", "num_classes": 0,
                "rank": RANKS.get(method), "base_fingerprint": fingerprint(base), "targets": list(TARGETS)}  # fmt: skip
        save_solution(folder / "own" / method, trained, info, {})
        del trained
    (folder / "foreign").mkdir()
    ft = copy.deepcopy(lm)
    ft.requires_grad_(True)
    _perturb(ft, g)
    tied = lm.config.tie_word_embeddings  # a tied head is the embedding: saved once
    state = {k: v.contiguous() for k, v in ft.state_dict().items() if k != "lm_head.weight" or not tied}
    save_file(state, folder / "foreign" / "ft.safetensors")
    del ft, state
    for method in ("lora", "randlora"):
        peft_model = get_peft_model(copy.deepcopy(lm), _peft_config(method))
        _perturb(peft_model, g)
        peft_model.save_pretrained(folder / "foreign" / method)
        del peft_model
    targets = [m for n, m in lm.named_modules() if n.endswith(TARGETS) and isinstance(m, torch.nn.Linear)]
    return {"params": sum(p.numel() for p in lm.parameters()), "hidden": hidden, "layers": layers,
            "intermediate": lm.config.intermediate_size, "heads": lm.config.num_attention_heads,
            "kv_heads": lm.config.num_key_value_heads,
            "target_params": sum(m.weight.numel() for m in targets)}  # fmt: skip


def examples(samples: int, prompt_len: int, candidates: int = 4, answer_len: int = 3):
    """Fabricated multiple-choice examples as token ids (the plain loop's input), the same sequences in the
    toolkit's encoding (what :func:`adapters.models.hf.encode_lm` makes of records: ``(N, C, T)`` ids,
    attention and answer masks, the eos that ends each answer included), and a gold candidate each."""
    from adapters.models.base import Encoded
    from experiments.benchmarks.plain_lm import fabricate_examples

    raw = fabricate_examples(samples, VOCAB - 2, prompt_len, answer_len, candidates)
    ids = [(prompt, [[*c, VOCAB - 1] for c in cands]) for prompt, cands in raw]
    width = max(len(p) + len(c) for p, cands in ids for c in cands)
    input_ids = torch.full((samples, candidates, width), VOCAB - 2, dtype=torch.int64)
    attention = torch.zeros_like(input_ids)
    answer = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (prompt, cands) in enumerate(ids):
        for j, cand in enumerate(cands):
            seq = torch.tensor([*prompt, *cand])
            input_ids[i, j, : len(seq)] = seq
            attention[i, j, : len(seq)] = 1
            answer[i, j, len(prompt) : len(seq)] = True
    data = Encoded({"input_ids": input_ids, "attention_mask": attention, "answer_mask": answer},
                   lengths=attention.sum(-1).amax(-1))  # fmt: skip
    return ids, data, torch.arange(samples) % candidates
