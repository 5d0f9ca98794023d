"""Memory and throughput of every stage on language models, in fp32, bf16 and 4-bit, at three or more sizes,
with the projection to Llama-3-8B on one 141 GB GPU.

    python -m experiments.benchmarks.llm_scale [--json PATH] [--quick] [--models qwen2-0.5b llama3-8b]
        [--sizes 128 256 512] [--dtypes float32 bfloat16 4bit] [--sources own foreign] [--stages ...]

**Models.** Randomly initialised, nothing downloaded: the real configuration of ``Qwen/Qwen2-0.5B`` and of
``meta-llama/Meta-Llama-3-8B`` (:data:`REAL`, written here) scaled to hidden size h (``--sizes``): head
dimension 64, the real ratios of intermediate to hidden size and of key/value to query heads, the real
embedding tying and attention biases, :data:`LAYERS` layers and a :data:`VOCAB`-word vocabulary (the real
vocabularies would put most of a small model's bytes in the embeddings, which no adapter touches). Each is
saved once (fp32 safetensors, a word-level tokenizer) with its solutions:

- ``own``: ft (every weight perturbed), LoRA r 8 and RandLoRA r 30 (the seed's rank) on q/k/v/up/down,
  attached and saved by the toolkit (:func:`adapters.solution.save_solution`);
- ``foreign``: the same three made as a researcher elsewhere would: a full checkpoint
  (``model.safetensors`` of the causal LM) and peft adapters saved by peft's ``save_pretrained``, loaded
  with :func:`adapters.solution.load_solution` (:mod:`adapters.foreign`).

**Cases.** One per (model, size, dtype, source, stage), each in a FRESH spawned Python process, so its
peak is its own. The process imports everything first (the architecture's module and the entry's tokenizer
included) and reads its RSS (the runtime's own overhead); ``load`` reports the peak of loading the base above
it, measured on a second load in the process (the first one initialises 8-13 MB once, whatever the size:
measured as three loads in one process, the second and third holding exactly the model's bytes), with
``resident_after_load_bytes``, ``load_scratch_bytes`` (peak − resident) and ``largest_source_tensor_bytes`` (the
checkpoint's largest tensor as stored: a converting load, :func:`adapters.models.hf.streamed_state`, holds one
of them at a time besides the converted model). Every other stage loads the base (``--torch-dtype``
or ``--load-4bit`` as the toolkit does it, :func:`adapters.models.hf.entry`), runs one forward of one
evaluation batch twice (the first call's buffers are not stage memory; the second one's peak is
``activation_bytes``: one batch's activations), trims the allocator, reads the RSS (the loaded base),
restarts the peak counter (``/proc/self/clear_refs``) and runs the stage:

- ``head_only``: the evaluation of the base (a causal LM has no head: nothing trains) —
  :func:`adapters.objectives.score` over the evaluation set;
- ``train_ft`` / ``train_lora`` / ``train_randlora``: 2 optimizer steps of :func:`adapters.train.train`
  (AdamW, batch 4) on the model :func:`adapters.methods.attach` makes: a copy of the base for FT (refused
  on a 4-bit base, recorded as skipped), an adapter on a skeleton sharing the base's tensors;
- ``plane``: the factored chart through the three solutions (:func:`landscape.engine.factored.build_chart`) and a
  2 × 2 grid (:func:`landscape.engine.grid.run_grid`) — the plane and the grid are this one stage here;
- ``paths``: :func:`landscape.paths.compute_paths`, 3 points per pair, factored;
- ``curvature``: the top Hessian eigenvalue of the RandLoRA solution in adapter coordinates
  (:class:`landscape.curvature.HessianOperator`, Lanczos at most 4 vectors, fp32);
- ``spectrum``: :func:`landscape.spectrum.analyse_solutions` (every metric, layer by layer);
- ``checkpoint``: :func:`adapters.io.write_torch` of the base's state dict (a training checkpoint's size).

**Ratio.** ``peak_rss_above_base_bytes`` / ``held_bytes``: the bytes of the weights the stage holds besides
the base — a full-size update once in the model's dtype (train_ft: its copy; plane and paths: FT's ΔW,
plus the adapters' factors), adapters by their factors (fp32), the spectrum one layer's ΔW (fp32, its
largest), the checkpoint and head_only the model's bytes (nothing else held: their ratio should be near
0). ``load``: the peak above the runtime over the model's bytes (target ≤ 1.1). Reported beside it:
``activation_bytes`` (one batch's forward) and ``layer_scratch_bytes`` (one layer's fp32 ΔW, the scratch of
a streamed stage). Stages that read the solutions also report ``shared_bases_bytes``: RandLoRA's random bases
as peft holds them (one copy, about max(out)² × 4 B, regenerated from the PRNG key: no trained parameters, so
not in ``held_bytes``, but a floor of every such stage, large next to a 4-layer model and small next to a
32-layer one); ``ratio_without_activations_and_bases`` subtracts them too. ``--merge`` lets a later run's case
replace the same (model, size, dtype, source, stage) of an earlier one (marked ``rerun``).

**Throughput.** For evaluation stages (head_only, plane) ``tokens_per_s``: the examples' tokens (prompt +
candidate, each candidate counted as its own sequence, no padding) per second of the toolkit's own
evaluation; ``plain_tokens_per_s``: the same tokens through :func:`experiments.benchmarks.plain_lm.plain_loop`
(``model(**batch)`` and a gather of the answer log-probs, each candidate its own sequence), in the same
process on the same weights.

**Projection** (labelled so: nothing at 8B is measured). For each stage and dtype, from the ratio measured
at the largest size: ``projected_peak_bytes`` = the 8B base's bytes (fp32 4 B, bf16 2 B, 4-bit 0.5 B per
weight of the linear layers + 2 B for the rest) + (peak above base − activations) / held × the stage's held
bytes at 8B + the activations scaled by hidden × layers; ``fits``: ≤ 141 GB. Curvature in weight
coordinates (not run here) is projected from its design: a dense copy of the model at the solution in
fp32, k + 4 fp32 vectors of the target weights on the device (the basis on the host).

The CPU, the thread count and the environment are recorded. Results print as a table and, with ``--json``,
are written atomically.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from experiments.benchmarks.memory import reset_peak, status_bytes, trim

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m experiments.benchmarks.llm_scale"
GPU_BYTES = 141e9  # one H200
VOCAB = 4096
LAYERS = 4
QUICK_LAYERS = 2
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
RANKS = {"lora": 8, "randlora": 30}
SIZES = (128, 256, 512)
QUICK_SIZES = (64, 96, 128)
DTYPES = ("float32", "bfloat16", "4bit")
SOURCES = ("own", "foreign")
STAGES = ("load", "head_only", "train_ft", "train_lora", "train_randlora", "plane", "paths", "curvature",
          "spectrum", "checkpoint")  # fmt: skip
EVAL_STAGES = ("head_only", "plane")
FACTOR = re.compile(r"(^|\.)(lora_A|lora_B|randlora_lambda|randlora_gamma)(\.|$)")
SOURCE_STAGES = ("plane", "paths", "curvature", "spectrum")  # the stages that read solutions
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


# --------------------------------------------------------------------------- one case (fresh process)


def _entry(case: Path, dtype: str):
    """The toolkit's entry of the case's base (its checks and tokenizer: read before the load is measured)."""
    from adapters.models import hf

    options = {"load_4bit": True} if dtype == "4bit" else {"torch_dtype": dtype}
    return hf.entry(str(case / "base"), "lm", options)


def _load(case: Path, dtype: str):
    entry = _entry(case, dtype)
    return entry, entry.build(0).eval()


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as stored (a packed 4-bit weight: its codes, plus its quantisation state)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def _solutions(case: Path, source: str, base):
    from adapters.solution import Solution, load_solution, read_info

    if source == "own":
        return {s: Solution(path=case / "own" / s, info=read_info(case / "own" / s), metrics={}, base=base)
                for s in ("ft", "lora", "randlora")}  # fmt: skip
    where = {"ft": case / "foreign" / "ft.safetensors", "lora": case / "foreign" / "lora",
             "randlora": case / "foreign" / "randlora"}  # fmt: skip
    return {s: load_solution(p, base=base, expect_method=s, model="base") for s, p in where.items()}


def _factor_bytes(solution) -> int:
    """The adapter's own parameters (its factors) in fp32, from its saved file."""
    from safetensors import safe_open

    files = list(Path(solution.path).glob("adapter_model.safetensors"))
    total = 0
    for file in files:
        with safe_open(file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                # LoRA's A/B, RandLoRA's λ/γ; not RandLoRA's random bases (randlora_A/B), which peft's own
                # save_pretrained writes too (fixed, regenerated from the seed: no trained parameters)
                if FACTOR.search(k):
                    total += math.prod(f.get_slice(k).get_shape()) * 4
    return total


def _largest_layer_bytes(base) -> int:
    from adapters.quant import logical_shape

    return max(math.prod(logical_shape(m)) * 4 for n, m in base.named_modules() if n.endswith(TARGETS))


def _largest_source(case: Path) -> int:
    """Bytes of the largest tensor of the base's checkpoint as stored: what a converting load holds besides the
    converted model (plus the conversion's own scratch)."""
    from safetensors import safe_open

    with safe_open(str(case / "base" / "model.safetensors"), "pt") as f:
        sizes = {"F32": 4, "F16": 2, "BF16": 2}
        slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118 (safe_open has no iterator)
        return max(math.prod(t.get_shape()) * sizes.get(t.get_dtype(), 4) for t in slices)


def _shared_bases_bytes(solution) -> int:
    """Bytes of the random bases peft holds for a RandLoRA solution (one copy, shared by its layers): regenerated
    from the PRNG key, no trained parameters, so not in ``held_bytes``; reported beside it (a floor of every stage
    that reads the adapter, about max(out)² × 4 B: large next to a 4-layer model, small next to a 32-layer one)."""
    from adapters.deltas import load_adapter

    model = load_adapter(Path(solution.path), solution.base, quiet=True)
    seen: dict[int, int] = {}
    for name, b in model.named_buffers():
        if re.search(r"(^|\.)(randlora|vera)_[AB](\.|$)", name):
            seen[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    return sum(seen.values())


def _tokens(ids) -> int:
    return sum(len(p) + len(c) for p, cands in ids for c in cands)


def worker(case: Path, dtype: str, source: str, stage: str, samples: int, prompt_len: int) -> dict:
    """One stage of one case (module docstring); its readings."""
    import peft  # noqa: F401  (code before the baseline)
    import transformers  # noqa: F401

    import adapters.deltas  # noqa: F401
    import landscape.engine.factored  # noqa: F401
    from adapters.objectives import OBJECTIVES
    from experiments.benchmarks.plain_lm import plain_loop
    from landscape.engine.grid import EvalSet

    if dtype == "4bit":
        import bitsandbytes  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    # the model's own code (transformers imports each architecture's module lazily) and the entry's checks and
    # tokenizer: runtime, not the load of the weights
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(case / "base"))]
    entry = _entry(case, dtype)
    if stage == "load":
        # a process's first load initialises once what every later load reuses (8-13 MB whatever the model's
        # size: measured as the first of three loads in one process, the next two holding the model's bytes):
        # the runtime's overhead, so the load measured is a second one
        warm = entry.build(0)
        del warm
        gc.collect()  # a transformers model holds reference cycles: freed by the collector, not by del
    trim()
    runtime = status_bytes("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    model = entry.build(0).eval()
    seconds = time.perf_counter() - start
    model_bytes = _model_bytes(model)
    out = {"model_bytes": model_bytes, "runtime_rss_bytes": runtime, "layer_scratch_bytes": _largest_layer_bytes(model),
           "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss"}  # fmt: skip
    if stage == "load":
        return {**out, **_load_readings(case, runtime, reset, model_bytes), "seconds": round(seconds, 3)}
    objective = OBJECTIVES["answer"]
    ids, data, labels = examples(samples, prompt_len)
    eval_set = EvalSet.prepare(data, labels, samples, "cpu")
    activation = _activation_bytes(model, eval_set, reset)
    trim()
    rss_base = status_bytes("VmRSS")
    reset_peak()
    start = time.perf_counter()
    extra: dict = {}
    held = _run_stage(stage, model, case, source, (data, labels, eval_set, objective), extra)
    held = model_bytes if held is None else held
    seconds = time.perf_counter() - start
    peak = (status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - rss_base
    if stage in SOURCE_STAGES:  # after the peak is read: the bases the stage held besides its factors
        extra["shared_bases_bytes"] = _shared_bases_bytes(_solutions(case, source, model)["randlora"])
    out.update(extra)
    out.update({"peak_rss_above_base_bytes": peak, "held_bytes": held, "ratio": peak / held if held else None,
                "activation_bytes": activation, "seconds": round(seconds, 3)})  # fmt: skip
    if stage in EVAL_STAGES:
        points = extra.pop("points", 1)
        grid_seconds = extra.pop("eval_seconds", seconds)
        tokens = _tokens(ids)
        out["tokens_per_s"] = tokens * points / grid_seconds
        _, plain_tokens, plain_s = plain_loop(model.backbone, ids, batch_size=8)
        out["plain_tokens_per_s"] = tokens / plain_s
        out["plain_padded_tokens"] = plain_tokens
    return out


def _load_readings(case: Path, runtime: int, reset: bool, model_bytes: int) -> dict:
    """The load's readings, right after it: its peak above the runtime, what stays resident, its scratch."""
    peak = (status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - runtime
    trim()  # the freed scratch back to the system: what the loaded model keeps (mapped pages: those touched)
    resident = status_bytes("VmRSS") - runtime
    return {"peak_rss_above_base_bytes": peak, "held_bytes": model_bytes, "ratio": peak / model_bytes,
            "activation_bytes": None, "resident_after_load_bytes": resident, "load_scratch_bytes": peak - resident,
            "largest_source_tensor_bytes": _largest_source(case)}  # fmt: skip


def _activation_bytes(model, eval_set, reset: bool) -> int | None:
    """One batch's activations: the peak of a second no-grad forward above the RSS before it (None without
    a resettable peak)."""
    with torch.no_grad():
        model(**eval_set.batches[0][0])
        trim()
        before = status_bytes("VmRSS")
        reset_peak()
        model(**eval_set.batches[0][0])
        return status_bytes("VmHWM") - before if reset else None


def _run_stage(stage: str, model, case: Path, source: str, inputs: tuple, extra: dict) -> int | None:
    """The stage's work on the loaded model; the bytes it holds besides the base (None: the model's own)."""
    import numpy as np

    from adapters.objectives import score

    data, labels, eval_set, objective = inputs
    if stage == "head_only":
        score(lambda batch: model(**batch), eval_set.batches, eval_set.n, objective)
        return None
    if stage.startswith("train_"):
        return _train_stage(model, stage.removeprefix("train_"), data, labels, objective, extra)
    if stage in ("plane", "paths", "curvature", "spectrum"):
        return _solution_stage(stage, model, _solutions(case, source, model), eval_set, objective, extra, np)
    if stage == "checkpoint":
        with tempfile.TemporaryDirectory(dir=case) as tmp:
            from adapters.io import write_torch

            write_torch(Path(tmp) / "checkpoint.pt", {"model": model.state_dict(), "step": 0})
        return None
    raise ValueError(stage)


def _train_stage(model, method: str, data, labels, objective, extra: dict) -> int:
    """2 steps of the toolkit's training on the model attach() makes (a skeleton for an adapter); held bytes."""
    from adapters.deltas import skeleton
    from adapters.errors import UserError
    from adapters.methods import ADAPTERS, MethodSpec, attach
    from adapters.train import TrainConfig, train

    trainable = skeleton(model) if method in ADAPTERS else copy.deepcopy(model)
    try:
        trainable = attach(trainable, MethodSpec(method, rank=RANKS.get(method)), TARGETS)
    except UserError as e:
        extra["skipped"] = str(e)
        return _model_bytes(model)
    storage = next(p.dtype for p in model.parameters() if p.is_floating_point())
    autocast = "bfloat16" if storage == torch.bfloat16 else "none"
    config = TrainConfig(steps=2, batch_size=4, lr=1e-4, autocast=autocast)
    history = train(trainable, data, labels, config, "cpu", progress=False, objective=objective)
    extra["train_loss"] = history["train_loss"]
    params = [p for p in trainable.parameters() if p.requires_grad]
    extra["trainable_params"] = sum(p.numel() for p in params)
    # a full-size update once in the model's dtype; adapters by their factors (fp32)
    return _model_bytes(model) if method == "ft" else sum(p.numel() * 4 for p in params)


def _solution_stage(stage: str, model, solutions: dict, eval_set, objective, extra: dict, np) -> int:
    """plane (+ 2 × 2 grid), paths, curvature (RandLoRA, adapter coordinates) or spectrum; held bytes."""
    from landscape.engine import factored
    from landscape.engine.grid import run_grid

    ft_bytes = _model_bytes(model)  # FT's ΔW, once in the model's dtype (a 4-bit base: fp32 of its logical shape)
    if any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
        ft_bytes = sum(math.prod(p.quant_state.shape) * 4 if getattr(p, "quant_state", None) is not None
                       else p.numel() * p.element_size() for p in model.parameters())  # fmt: skip
    factors = sum(_factor_bytes(solutions[s]) for s in ("lora", "randlora"))
    if stage == "plane":
        deltas = {s: sol.module_deltas(check=False) for s, sol in solutions.items()}
        chart = factored.build_chart("paper", model, deltas)
        evaluator = factored.FactoredEvaluator(model, chart, eval_set, "cpu", objective=objective)
        result = run_grid(evaluator, np.array([0.0, 1.0]), np.array([0.0, 1.0]), progress=False)
        extra.update(points=4, eval_seconds=float(result["seconds"]), loss=np.asarray(result["loss"]).tolist())
        return ft_bytes + factors
    if stage == "paths":
        from landscape.paths import compute_paths

        result = compute_paths(model, solutions, eval_set, "cpu", points=3, progress=False, objective=objective,
                               storage="factored")  # fmt: skip
        extra["barriers"] = {k: v.get("barrier") for k, v in result["barriers"].items()}
        return ft_bytes + factors
    if stage == "curvature":
        from landscape import curvature

        adapter, names = curvature.adapter_coordinates(solutions["randlora"], head=False, device="cpu")
        op = curvature.HessianOperator(adapter, names, eval_set, objective)
        result = curvature.top_eigenvalues(op, 1, tol=1e-1, max_vectors=4)
        extra.update(eigenvalues=result["eigenvalues"], hvps=result["hvps"], dim=op.dim)
        return op.dim * 4
    from landscape.spectrum import analyse_solutions

    result = analyse_solutions(solutions, device="cpu", progress=False)
    extra["layers"] = len(result["layers"])
    return _largest_layer_bytes(model)


def run_case(case: Path, dtype: str, source: str, stage: str, samples: int, prompt_len: int,
             threads: int | None) -> dict:  # fmt: skip
    """:func:`worker` in a fresh Python process; its last printed line, as JSON."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.llm_scale", "--worker", str(case), dtype, source, stage,
           "--samples", str(samples), "--prompt-len", str(prompt_len)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- projection


def _bytes_8b(model: str, dtype: str) -> tuple[int, int, int]:
    """(params, bytes as stored, target-weight params) of the real ``model`` (shapes from its config)."""
    c = full_config(model)
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = h // c.num_attention_heads * c.num_key_value_heads
    per_layer = {"q_proj": h * h, "k_proj": h * kv, "v_proj": h * kv, "o_proj": h * h, "gate_proj": h * i,
                 "up_proj": h * i, "down_proj": i * h}  # fmt: skip
    linear = n * sum(per_layer.values())
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    other = n * 2 * h + h
    params = linear + embed + other
    targets = n * sum(per_layer[t] for t in TARGETS)
    per = {"float32": 4, "bfloat16": 2, "4bit": None}[dtype]
    # 4-bit: NF4 codes (half a byte) + an fp32 absmax per block of 64 for the linear layers, the rest in bf16
    stored = params * per if per else linear // 2 + linear // 64 * 4 + (embed + other) * 2
    return params, stored, targets


def _adapter_params_8b(model: str, method: str) -> int:
    """LoRA r·(in + out) per target; RandLoRA λ (r × n) and γ (n × min(in, out)), n = ⌈min(in, out) / r⌉."""
    c = full_config(model)
    h, i = c.hidden_size, c.intermediate_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "up_proj": (i, h), "down_proj": (h, i)}
    r = RANKS[method]
    total = 0
    for out, inp in shapes.values():
        if method == "lora":
            total += r * (out + inp)
        else:
            bases = math.ceil(min(out, inp) / r)
            total += r * bases + bases * min(out, inp)
    return total * c.num_hidden_layers


def project(cases: list[dict], model: str = "llama3-8b") -> list[dict]:
    """Per (stage, dtype): the projected peak at 8B from the largest measured size (module docstring)."""
    c = full_config(model)
    out = []
    usable = [x for x in cases if x.get("ratio") is not None and "skipped" not in x and "error" not in x]
    keys = sorted({(x["stage"], x["dtype"]) for x in usable})
    for stage, dtype in keys:
        measured = [x for x in usable if x["stage"] == stage and x["dtype"] == dtype]
        x = max(measured, key=lambda m: (m["params"], m["ratio"]))
        params, base_bytes, targets = _bytes_8b(model, dtype)
        scale = params / x["params"]
        if stage.startswith("train_") and stage != "train_ft" or stage == "curvature":
            method = "lora" if stage == "train_lora" else "randlora"
            held = _adapter_params_8b(model, method) * 4
        elif stage == "spectrum":
            held = max(c.intermediate_size * c.hidden_size, c.hidden_size**2) * 4
        else:
            held = x["held_bytes"] * scale
        above = x["peak_rss_above_base_bytes"]
        if stage == "load":  # the loading's peak scales with the model's bytes; at least the model (an fp32 load
            # maps the file, and its pages count only once a forward touches them)
            peak = max(above / x["model_bytes"], 1.0) * base_bytes
        else:  # the base + the stage's own memory per held byte × held at 8B + activations scaled
            activation = x.get("activation_bytes") or 0
            act_8b = activation * (c.hidden_size * c.num_hidden_layers) / (x["hidden"] * x["layers"])
            peak = base_bytes + max(above - activation, 0) / x["held_bytes"] * held + act_8b
        out.append({"stage": stage, "dtype": dtype, "model": model, "from_params": x["params"],
                    "from_source": x.get("source"),
                    "from_ratio": x["ratio"], "held_bytes_8b": held, "base_bytes_8b": base_bytes,
                    "projected_peak_bytes": int(peak), "fits": bool(peak <= GPU_BYTES),
                    "label": "projection"})  # fmt: skip
    for dtype in sorted({x["dtype"] for x in cases}):  # curvature in weight coordinates: from its design
        params, base_bytes, targets = _bytes_8b(model, dtype)
        peak = base_bytes + params * 4 + (1 + 4) * targets * 4
        out.append({"stage": "curvature_weights", "dtype": dtype, "model": model, "projected_peak_bytes": int(peak),
                    "fits": bool(peak <= GPU_BYTES), "label": "projection (design: dense fp32 model at the "
                    "solution + k + 4 fp32 target-weight vectors, k = 1; no measurement)"})  # fmt: skip
    return out


# --------------------------------------------------------------------------- report


def _gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.3f}"


def table(result: dict) -> str:
    lines = [f"{'model':<11} {'h':>4} {'params':>10} {'dtype':<8} {'source':<7} {'stage':<15} {'model MB':>9} "
             f"{'peak MB':>8} {'held MB':>8} {'ratio':>7} {'-act':>7} {'-bases':>7} {'act MB':>7} {'s':>7} "
             f"{'tok/s':>8} {'plain':>8}"]  # fmt: skip
    for c in result["cases"]:
        head = f"{c['model']:<11} {c['hidden']:>4} {c['params']:>10,} {c['dtype']:<8} {c['source']:<7} {c['stage']:<15}"
        if "error" in c or "skipped" in c:
            lines.append(f"{head} {'ERROR ' + c['error'] if 'error' in c else 'skipped: ' + c['skipped'][:60]}")
            continue
        mb = lambda b: "-" if b is None else f"{b / 1e6:.1f}"  # noqa: E731
        tps = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
        ratio = "-" if c.get("ratio") is None else f"{c['ratio']:.2f}"
        bare = "-" if c.get("ratio_without_activations") is None else f"{c['ratio_without_activations']:.2f}"
        floor = c.get("ratio_without_activations_and_bases")
        floor = "-" if floor is None else f"{floor:.2f}"
        lines.append(f"{head} {mb(c['model_bytes']):>9} {mb(c['peak_rss_above_base_bytes']):>8} "
                     f"{mb(c['held_bytes']):>8} {ratio:>7} {bare:>7} {floor:>7} {mb(c.get('activation_bytes')):>7} "
                     f"{c['seconds']:>7.2f} "
                     f"{tps(c.get('tokens_per_s')):>8} {tps(c.get('plain_tokens_per_s')):>8}")  # fmt: skip
    lines.append("")
    lines.append(
        "flatness (max/min ratio over sizes, per model, dtype, source, stage; target <= 1.15; stages whose "
        "ratio is below 0.1 left out):"
    )
    for key, spread in result["flatness"].items():
        lines.append(f"  {key}: {spread:.2f}")
    lines.append("")
    lines.append("projection for Llama-3-8B on one 141 GB GPU (a projection, not a measurement):")
    for p in result["projection"]:
        lines.append(f"  projection {p['stage']:<17} {p['dtype']:<8} {p['projected_peak_bytes'] / 1e9:8.1f} GB  "
                     f"{'fits' if p['fits'] else 'does not fit'}")  # fmt: skip
    return "\n".join(lines)


def flatness(cases: list[dict]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for c in cases:
        if c.get("ratio") and "skipped" not in c:
            groups.setdefault(f"{c['model']}/{c['dtype']}/{c['source']}/{c['stage']}", []).append(c["ratio"])
    # a stage that holds nothing besides the base (head_only, checkpoint: ratio near 0) has no flatness to test
    return {k: max(v) / min(v) for k, v in groups.items() if len(v) > 1 and min(v) >= 0.1}


def summarise(result: dict) -> dict:
    """``result`` with each case's ``ratio_without_activations`` ((peak − one batch's activations) / held), the
    flatness over sizes and the projection, from its cases."""
    for c in result["cases"]:
        if c.get("held_bytes") and c.get("peak_rss_above_base_bytes") is not None and c["stage"] != "load":
            above = c["peak_rss_above_base_bytes"] - (c.get("activation_bytes") or 0)
            c["ratio_without_activations"] = max(above, 0) / c["held_bytes"]
            if c.get("shared_bases_bytes") is not None:
                c["ratio_without_activations_and_bases"] = max(above - c["shared_bases_bytes"], 0) / c["held_bytes"]
    return {**result, "flatness": flatness(result["cases"]), "projection": project(result["cases"])}


CASE_KEY = ("model", "hidden", "dtype", "source", "stage")


def merged(paths: list[Path]) -> dict:
    """The cases of several runs' JSON (e.g. one per model, run side by side), summarised again. A case measured
    again by a later run (same model, size, dtype, source and stage) replaces the earlier one, marked
    ``rerun``: a rerun of some rows on newer code updates a full table."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("cases", "flatness", "projection")}
    cases: dict[tuple, dict] = {}
    for i, run in enumerate(runs):
        for c in run["cases"]:
            key = tuple(c.get(k) for k in CASE_KEY)
            cases[key] = {**c, "rerun": True} if i and key in cases else c
    out["cases"] = list(cases.values())
    out["seconds"] = sum(run.get("seconds", 0) for run in runs)
    out["runs"] = [{k: run.get(k) for k in ("threads", "samples", "prompt_len", "layers", "seconds")} for run in runs]
    return summarise(out)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help=f"CI-sized: hidden {QUICK_SIZES}, {QUICK_LAYERS} layers, "
                   "4 samples, fp32, own solutions, stages load head_only plane spectrum")  # fmt: skip
    p.add_argument("--models", nargs="+", choices=sorted(REAL), default=None, help="default: both")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help=f"hidden sizes (default {SIZES})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help="default: all three")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=None, help="default: both")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="default: every stage")
    p.add_argument("--samples", type=int, default=None, help="evaluation samples (default 16; quick 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="longest prompt in tokens (default 48; quick 16)")
    p.add_argument("--threads", type=int, default=None, help="OMP threads per case (default: the environment's)")
    p.add_argument("--merge", type=Path, nargs="+", help="summarise the cases of these runs' JSON together (no run)")
    p.add_argument("--worker", nargs=4, metavar=("CASE", "DTYPE", "SOURCE", "STAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["qwen2-0.5b"] if quick else sorted(REAL))
    args.sizes = args.sizes or list(QUICK_SIZES if quick else SIZES)
    args.dtypes = args.dtypes or (["float32"] if quick else list(DTYPES))
    args.sources = args.sources or (["own"] if quick else list(SOURCES))
    args.stages = args.stages or (["load", "head_only", "plane", "spectrum"] if quick else list(STAGES))
    args.samples = args.samples or (4 if quick else 16)
    args.prompt_len = args.prompt_len or (16 if quick else 48)
    args.layers = QUICK_LAYERS if quick else LAYERS
    return args


def header(args: argparse.Namespace, cases: list[dict], start: float) -> dict:
    """The settings of a run and its cases so far."""
    return {
        "cpu": cpu_name(),
        "threads": args.threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count(),
        "torch": torch.__version__,
        "layers": args.layers,
        "vocab": VOCAB,
        "samples": args.samples,
        "prompt_len": args.prompt_len,
        "real_configs": REAL,
        "cases": cases,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        case, dtype, source, stage = args.worker
        print(json.dumps(worker(Path(case), dtype, source, stage, args.samples, args.prompt_len)))
        return 0
    if args.merge:
        result = merged(args.merge)
        print(table(result))
        if args.json:
            from adapters.io import write_json

            write_json(args.json, result)
            print(f"wrote {args.json}")
        return 0
    if "4bit" in args.dtypes:
        from adapters.models.hf import check_4bit

        check_4bit()  # a missing bitsandbytes: one line now, not after the fp32 cases
    cases = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llm_scale-") as tmp:
        for model in args.models:
            for hidden in args.sizes:
                folder = Path(tmp) / f"{model}-h{hidden}"
                shape = make_case(folder, model, hidden, args.layers)
                for dtype in args.dtypes:
                    for stage in args.stages:
                        for source in args.sources if stage in SOURCE_STAGES else args.sources[:1]:
                            reading = run_case(folder, dtype, source, stage, args.samples, args.prompt_len,
                                               args.threads)  # fmt: skip
                            case = {"model": model, **shape, "dtype": dtype, "source": source, "stage": stage,
                                    **reading}  # fmt: skip
                            cases.append(case)
                            print(table({"cases": [case], "flatness": {}, "projection": []}).splitlines()[1],
                                  file=sys.stderr, flush=True)  # fmt: skip
                            if args.json:  # after every case: a run stopped early keeps what it measured
                                from adapters.io import write_json

                                write_json(args.json, {**header(args, cases, start), "complete": False})
    result = summarise({**header(args, cases, start), "complete": True})
    print(table(result))
    if args.json:
        from adapters.io import write_json

        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
