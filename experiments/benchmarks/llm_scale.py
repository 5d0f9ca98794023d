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

**Cases.** One per (model, size, dtype, source, stage), each in a FRESH spawned Python process, so its peak is its
own. Its glibc ``MALLOC_MMAP_THRESHOLD_`` is recorded (``malloc_mmap_threshold``): 1 MiB, and 64 KiB for adapter
training, whose graph of activation-sized tensors crosses 1 MiB between the sizes (:func:`mmap_threshold`);
``--glibc-malloc`` leaves glibc's dynamic threshold (recorded as null), as a user's run has it. For the same reason
every stage but full fine-tuning runs with :mod:`adapters.heap`'s policy off (``ADAPTERS_KEEP_FREED_MEMORY=0``:
freed blocks kept in the heap for the next step or point would read as the stage's memory) unless
``--glibc-malloc`` or the environment sets the switch; full fine-tuning has it, as the toolkit does (+5-13 %,
flat); recorded as ``keep_freed_memory``. The process imports everything first (the architecture's module and the
entry's tokenizer included) and reads its RSS (the runtime's own overhead); ``load`` reports the peak of loading
the base above it, measured on a second load in the process (the first one initialises 8-13 MB once, whatever the
size: measured as three loads in one process, the second and third holding exactly the model's bytes), with
``resident_after_load_bytes``, ``load_scratch_bytes`` (peak − resident) and ``largest_source_tensor_bytes`` (the
checkpoint's largest tensor as stored: a casting load, :func:`adapters.models.hf.streamed_state`, holds one of them
at a time besides the converted model; a 4-bit load only a chunk of one, :mod:`adapters.models.hf_stream`). Every
other stage loads the base (``--torch-dtype`` or ``--load-4bit`` as the toolkit does it,
:func:`adapters.models.hf.entry`), runs one forward of one evaluation batch twice (the first call's buffers are not
stage memory; the second one's peak is ``activation_bytes``: one batch's activations), trims the allocator, reads
the RSS (the loaded base), restarts the peak counter (``/proc/self/clear_refs``) and runs the stage:

- ``head_only``: the evaluation of the base (a causal LM has no head: nothing trains) —
  :func:`adapters.objectives.score` over the evaluation set;
- ``train_ft`` / ``train_lora`` / ``train_randlora``: 2 optimizer steps of :func:`adapters.train.train`
  (AdamW, batch 4) on the model :func:`adapters.methods.attach` makes: a copy of the base for FT (refused
  on a 4-bit base, recorded as skipped), an adapter on a skeleton sharing the base's tensors; the peak of
  attach() alone (peft making RandLoRA's bases) is ``attach_peak_above_base_bytes``, the stage's is the steps';
- ``plane``: the factored chart through the three solutions (:func:`landscape.engine.factored.build_chart`) and a
  2 × 2 grid (:func:`landscape.engine.grid.run_grid`) — the plane and the grid are this one stage here;
- ``paths``: :func:`landscape.paths.compute_paths`, 3 points per pair, factored;
- ``curvature``: the top Hessian eigenvalue of the RandLoRA solution in adapter coordinates
  (:class:`landscape.curvature.HessianOperator`, Lanczos at most 4 vectors, fp32);
- ``spectrum``: :func:`landscape.spectrum.analyse_solutions` (every metric, layer by layer);
- ``checkpoint``: :func:`adapters.io.write_torch` of the base's state dict (a training checkpoint's size).

**Ratio.** ``ratio`` = ``peak_rss_above_base_bytes`` / ``held_bytes``: the bytes of the weights the stage holds
besides the base — a full-size update once in the model's dtype (train_ft: its copy; plane and paths: FT's ΔW,
plus the adapters' factors), adapters by their factors (fp32), the spectrum one layer's ΔW (fp32, its
largest), the checkpoint and head_only the model's bytes (nothing else held: their ratio should be near
0). ``load``: the peak above the runtime over the model's bytes (target ≤ 1.1). Reported beside it:
``activation_bytes`` (one batch's forward) and ``layer_scratch_bytes`` (one layer's fp32 ΔW, the scratch of
a streamed stage). Stages that read the solutions also report ``shared_bases_bytes``: RandLoRA's random bases
as peft holds them (one copy shared by every adapted layer, :func:`randlora_bases_bytes`). They are factors of
RandLoRA's update (ΔW = Σ_i B_i Λ_i A_i Γ_i: the frozen B_i, A_i beside the trained Λ_i, Γ_i), so the ratio the
targets and the flatness read, ``ratio_without_activations``, counts them once among the held weights: (peak −
one batch's activations) / (``held_bytes`` + ``shared_bases_bytes``) = / ``held_with_bases_bytes``;
``ratio_without_activations_and_bases`` instead subtracts them from the peak, over ``held_bytes`` alone. They
are large next to a 4-layer model (about max(out)² × 4 B) and small next to a 32-layer one (0.8 GB at
Llama-3-8B). **Flatness** (target ≤ 1.15): max / min over the sizes of that reading, per (model, dtype,
source, stage); of the ratio for ``load``; for ``curvature`` of ``graph_over_activations`` = (peak − bases −
held) / one batch's activations (in adapter coordinates it holds kilobytes of RandLoRA's scalings and the
growth is the Hessian-vector product's graph, which the projection scales as activations); for adapter
training of ``graph_over_saved`` = (peak − bases and their converted copy − factors) / ``saved_graph_bytes``, the
bytes its forward saved for the backward, counted with ``saved_tensors_hooks`` (a forward's peak, the
activations' yardstick elsewhere, follows the largest single tensor — the logits or the MLP's — not the sum over
layers a graph keeps). On a 4-bit base both graph readings also leave out one layer's scratch, its weight
dequantized by bitsandbytes for the forward and the backward (``layer_scratch_bytes``, fp32; 91 MB at hidden
2048, where the 4-bit training graph exceeds fp32's by 82-89 MB: :func:`_graph_bytes`). head_only and
checkpoint hold nothing besides the base and have none. ``--merge`` lets a later run's case replace the same
(model, size, dtype, source, stage) of an earlier one (marked ``rerun``).

**Throughput.** For evaluation stages (head_only, plane) ``tokens_per_s``: the examples' tokens (prompt +
candidate, each candidate counted as its own sequence, no padding) per second of the toolkit's own
evaluation; ``plain_tokens_per_s``: the same tokens through :func:`experiments.benchmarks.plain_lm.plain_loop`
(``model(**batch)`` and a gather of the answer log-probs, each candidate its own sequence), in the same
process on the same weights. Both are timed side by side in 3 interleaved rounds (the plain loop, then the
evaluation again) and the best round of each is kept (``eval_rounds``, ``plain_rounds``: every round's seconds),
so another job on a shared machine slows a ratio less.

**Projection** (labelled so: nothing at 8B is measured). For each stage and dtype, from the ratio measured
at the largest size: ``projected_peak_bytes`` = the 8B base's bytes (fp32 4 B, bf16 2 B, 4-bit 0.5 B per
weight of the linear layers + 2 B for the rest) + (peak above base − activations) / held (bases included) ×
the stage's held bytes at 8B (RandLoRA's bases at 8B included) + the activations scaled by hidden × layers;
curvature in adapter coordinates: the base + its vectors and the bases at 8B + its graph (the peak beyond them)
scaled as one batch's activations; ``fits``: ≤ 141 GB. Curvature in weight
coordinates (not run here) is projected from its design: a dense copy of the model at the solution in
fp32, k + 4 fp32 vectors of the target weights on the device (the basis on the host). ``scaling``: per-GPU memory
and wall time of Llama-3-8B FT under ``--fsdp`` and of the commonsense grid on 1, 2, 4 and 8 H200s, also a
projection, calibrated by ``gpu_check --calibrate`` when its file exists
(:mod:`experiments.benchmarks.llm_scale_plan`).

The CPU, the thread count and the environment are recorded. Results print as a table and, with ``--json``,
are written atomically. The cases (constants, models, solutions, examples) are built by
:mod:`experiments.benchmarks.llm_scale_cases`, each one is run by :mod:`experiments.benchmarks.llm_scale_worker`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters.heap import SWITCH
from adapters.precision import cpu_description
from experiments.benchmarks.llm_scale_cases import (
    DTYPES,
    GPU_BYTES,
    LAYERS,
    PROG,
    QUICK_LAYERS,
    QUICK_SIZES,
    RANKS,
    REAL,
    ROOT,
    SIZES,
    SOURCE_STAGES,
    SOURCES,
    STAGES,
    TARGETS,
    VOCAB,
    full_config,
    make_case,
)
from experiments.benchmarks.llm_scale_worker import worker

# glibc serves blocks under MALLOC_MMAP_THRESHOLD_ from its heap, which fragments and keeps freed blocks resident,
# and mmaps the larger ones, which return to the system when freed; unset, the threshold rises to the largest block
# freed so far. 1 MiB mmaps the per-module temporaries (weight-sized) at every size. An adapter training step's
# graph is many activation-sized tensors, most of 0.25-0.9 MiB at hidden 512 and of 1-1.3 MiB at 2048 (fp32,
# Llama-3 shape): at 1 MiB the small sizes' graphs were read with the heap's fragmentation, the large ones' without
# (graph / saved bytes, LoRA: 1.83 / 1.75 / 1.34 at hidden 512 / 1024 / 2048; at 64 KiB 1.17 / 1.15 / 1.15), so
# those stages run at 64 KiB, where every size's graph is mmapped.
MMAP_THRESHOLD = 1 << 20
GRAPH_MMAP_THRESHOLD = 1 << 16
GRAPH_MMAP_STAGES = ("train_lora", "train_randlora")


def mmap_threshold(stage: str) -> int:
    """glibc's ``MALLOC_MMAP_THRESHOLD_`` for ``stage``'s process (the comment above)."""
    return GRAPH_MMAP_THRESHOLD if stage in GRAPH_MMAP_STAGES else MMAP_THRESHOLD


def run_case(case: Path, dtype: str, source: str, stage: str, samples: int, prompt_len: int,
             threads: int | None, fixed_mmap: bool = True) -> dict:  # fmt: skip
    """:func:`worker` in a fresh Python process; its last printed line, as JSON, with the process's
    ``malloc_mmap_threshold`` (:func:`mmap_threshold`, or None: glibc's dynamic one)."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.llm_scale", "--worker", str(case), dtype, source, stage,
           "--samples", str(samples), "--prompt-len", str(prompt_len)]  # fmt: skip
    threshold = mmap_threshold(stage) if fixed_mmap else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    if fixed_mmap and stage != "train_ft":
        env.setdefault(SWITCH, "0")  # the module docstring
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "malloc_mmap_threshold": threshold,
            "keep_freed_memory": env.get(SWITCH, "default rule")}  # fmt: skip


# --------------------------------------------------------------------------- projection


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of one Llama/Qwen2 decoder layer of ``config``."""
    h, i = config.hidden_size, config.intermediate_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip


def _bytes_8b(model: str, dtype: str) -> tuple[int, int, int]:
    """(params, bytes as stored, target-weight params) of the real ``model`` (shapes from its config)."""
    c = full_config(model)
    h, n = c.hidden_size, c.num_hidden_layers
    per_layer = {name: out * inp for name, (out, inp) in _linear_shapes(c).items()}
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
    shapes = _linear_shapes(c)
    r = RANKS[method]
    total = 0
    for out, inp in (shapes[t] for t in TARGETS):
        if method == "lora":
            total += r * (out + inp)
        else:
            bases = math.ceil(min(out, inp) / r)
            total += r * bases + bases * min(out, inp)
    return total * c.num_hidden_layers


def randlora_bases_bytes(config, targets: tuple[str, ...] = TARGETS, r: int = RANKS["randlora"]) -> int:
    """fp32 bytes of the random bases peft's RandLoRA shares across the ``targets`` of a Llama/Qwen2 ``config``
    (peft's ``_find_dim`` and ``_init_randlora_A_randlora_B``): A (r, 1, d) and B (D, ⌈d / r⌉, r), where (D, d) are
    the max and min of the largest output and the largest input size over the targets."""
    shapes = _linear_shapes(config)
    out, inp = (max(shapes[t][k] for t in targets) for k in (0, 1))
    big, small = max(out, inp), min(out, inp)
    return 4 * (r * small + big * math.ceil(small / r) * r)


def randlora_bases_cache_bytes(
    config, dtype: str, targets: tuple[str, ...] = TARGETS, r: int = RANKS["randlora"]
) -> int:
    """Bytes of the fast RandLoRA forward's converted bases in training (``bases_cache_bytes``,
    :class:`adapters.methods.randlora.SharedBases`): per distinct (max(in, out), min(in, out)) of the ``targets``,
    the slices A (r, 1, min) and B (max, n, r), n = ⌈min / r⌉, in the base's dtype (fp32 for a 4-bit base)."""
    shapes = {(max(s), min(s)) for t, s in _linear_shapes(config).items() if t in targets}
    floats = sum(r * small + big * math.ceil(small / r) * r for big, small in shapes)
    return floats * (2 if dtype == "bfloat16" else 4)


# hold a few MB of factors or scalings: their memory is a backward graph (an HVP's, a training step's), which
# grows as one batch's activations (tokens × hidden × layers), not as what they hold
GRAPH_STAGES = ("curvature", "train_lora", "train_randlora")


def _graph_peak_8b(x: dict, base_bytes: int, held_8b: int, bases_8b: int, act_8b: float, layer_8b: int) -> float:
    """A :data:`GRAPH_STAGES` stage at 8B (curvature in adapter coordinates, adapter training): what it holds —
    its coordinate vectors or factors and RandLoRA's bases — at their 8B size, and what grows beyond them, the
    backward's graph (the forward's activations and, for curvature, their tangents; module docstring of
    :mod:`landscape.curvature.hessian`), scaled as one batch's activations are; on a 4-bit base, one layer's
    dequantized weight (fp32) at 8B besides (:func:`_graph_bytes`)."""
    per_activation = _graph_bytes(x) / x["activation_bytes"] if x.get("activation_bytes") else 0.0
    scratch = layer_8b if x["dtype"] == "4bit" else 0
    return base_bytes + held_8b + bases_8b + per_activation * act_8b + scratch


def _graph_bytes(c: dict) -> int:
    """A :data:`GRAPH_STAGES` case's graph: its peak beyond what it holds (factors, RandLoRA's bases) and, on a
    4-bit base, beyond one layer's scratch: bitsandbytes dequantizes each packed layer's weight, in the compute
    dtype (fp32 here: ``layer_scratch_bytes``), for its forward and again for its backward."""
    held = (c.get("shared_bases_bytes") or 0) + (c.get("bases_cache_bytes") or 0) + c["held_bytes"]
    if c["dtype"] == "4bit":
        held += c.get("layer_scratch_bytes") or 0
    return max(c["peak_rss_above_base_bytes"] - held, 0)


def project(cases: list[dict], model: str = "llama3-8b") -> list[dict]:
    """Per (stage, dtype): the projected peak at 8B from the largest measured size (module docstring)."""
    c = full_config(model)
    layer_8b = max(c.intermediate_size * c.hidden_size, c.hidden_size**2) * 4  # the largest layer's fp32 weight
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
            held = layer_8b
        else:
            held = x["held_bytes"] * scale
        bases_8b = randlora_bases_bytes(c) if x.get("shared_bases_bytes") is not None else 0
        bases_8b += randlora_bases_cache_bytes(c, dtype) if x.get("bases_cache_bytes") is not None else 0
        above = x["peak_rss_above_base_bytes"]
        activation = x.get("activation_bytes") or 0
        act_8b = activation * (c.hidden_size * c.num_hidden_layers) / (x["hidden"] * x["layers"])
        if stage == "load":  # the loading's peak scales with the model's bytes; at least the model (an fp32 load
            # maps the file, and its pages count only once a forward touches them)
            peak = max(above / x["model_bytes"], 1.0) * base_bytes
        elif stage in GRAPH_STAGES:
            peak = _graph_peak_8b(x, base_bytes, held, bases_8b, act_8b, layer_8b)
            if x.get("attach_peak_above_base_bytes") and x.get("shared_bases_bytes"):  # making the bases, once
                making = x["attach_peak_above_base_bytes"] / x["shared_bases_bytes"] * randlora_bases_bytes(c)
                peak = max(peak, base_bytes + making)
        else:  # the base + the stage's own memory per held byte (bases included) × held at 8B + activations scaled
            per_held = max(above - activation, 0) / (x["held_bytes"] + (x.get("shared_bases_bytes") or 0))
            peak = base_bytes + per_held * (held + bases_8b) + act_8b
        out.append({"stage": stage, "dtype": dtype, "model": model, "from_params": x["params"],
                    "from_source": x.get("source"),
                    "from_ratio": x["ratio"], "held_bytes_8b": held, "bases_bytes_8b": bases_8b,
                    "base_bytes_8b": base_bytes,
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
        "-act = (peak - one batch's activations) / (held + RandLoRA's shared bases, counted as its factors); "
        "-bases = (peak - act - bases) / held.\nflatness (max/min over sizes of -act; of ratio for load; of "
        "(peak - bases - held) / act for curvature, its graph, and of (peak - bases and their converted copy - held) "
        "/ the bytes its forward saved for adapter training, on a 4-bit base less one layer's dequantized weight; per "
        "model, dtype, source, stage; target <= 1.15; "
        "head_only and checkpoint, which hold nothing, left out):"
    )
    for key, spread in result["flatness"].items():
        lines.append(f"  {key}: {spread:.2f}")
    curves = [c for c in result["cases"] if c.get("curve_over_state") is not None]
    if curves:
        lines += ["", "curves: (peak - act - bases - the solutions) / (the bend, its gradient and AdamW's 2 moments, "
                  "fp32; target <= 1):"]  # fmt: skip
        lines += [f"  {c['model']}/{c['hidden']}/{c['dtype']}/{c['source']}: {c['curve_over_state']:.2f}"
                  for c in curves]  # fmt: skip
    lines.append("")
    lines.append("projection for Llama-3-8B on one 141 GB GPU (a projection, not a measurement):")
    for p in result["projection"]:
        lines.append(f"  projection {p['stage']:<17} {p['dtype']:<8} {p['projected_peak_bytes'] / 1e9:8.1f} GB  "
                     f"{'fits' if p['fits'] else 'does not fit'}")  # fmt: skip
    if result.get("scaling"):  # experiments.benchmarks.llm_scale_plan
        from experiments.benchmarks.llm_scale_plan import markdown

        lines += ["", "FT (--fsdp) and the commonsense grid on 1-8 GPUs:", markdown(result["scaling"])]
    return "\n".join(lines)


NOTHING_HELD = ("head_only", "checkpoint")  # hold nothing besides the base: their ratio (near 0) is no multiple


def flatness_reading(c: dict) -> float | None:
    """The reading whose spread over sizes is the flatness: the load's ratio; for :data:`GRAPH_STAGES` the graph
    over one batch's activations (``graph_over_activations``: the peak less what the stage holds — its factors and
    RandLoRA's shared bases — over the activations), for training over the bytes its forward saved for the
    backward, counted (``graph_over_saved``: over ``saved_graph_bytes``); any other stage's
    ``ratio_without_activations``; None for the stages that hold nothing (:data:`NOTHING_HELD`)."""
    if c.get("stage") in NOTHING_HELD or "skipped" in c:
        return None
    if c.get("stage") == "load":
        return c.get("ratio")
    if c.get("stage") in GRAPH_STAGES:  # training counts its saved graph; older runs and curvature have the peak
        return c.get("graph_over_saved") or c.get("graph_over_activations")
    return c.get("ratio_without_activations")


def flatness(cases: list[dict]) -> dict[str, float]:
    """max / min over sizes of :func:`flatness_reading`, per model, dtype, source and stage (target ≤ 1.15)."""
    groups: dict[str, list[float]] = {}
    for c in cases:
        value = flatness_reading(c)
        if value:
            groups.setdefault(f"{c['model']}/{c['dtype']}/{c['source']}/{c['stage']}", []).append(value)
    # a reading below 0.1 measures nothing held (an fp32 load maps the file: its pages are not a copy)
    return {k: max(v) / min(v) for k, v in groups.items() if len(v) > 1 and min(v) >= 0.1}


def summarise(result: dict) -> dict:
    """``result`` with each case's ``ratio_without_activations`` ((peak − one batch's activations) / held), the
    flatness over sizes and the projection, from its cases."""
    for c in result["cases"]:
        if c.get("held_bytes") and c.get("peak_rss_above_base_bytes") is not None and c["stage"] != "load":
            above = c["peak_rss_above_base_bytes"] - (c.get("activation_bytes") or 0)
            bases = c.get("shared_bases_bytes") or 0
            c["held_with_bases_bytes"] = c["held_bytes"] + bases
            c["ratio_without_activations"] = max(above, 0) / c["held_with_bases_bytes"]
            if c.get("shared_bases_bytes") is not None:
                c["ratio_without_activations_and_bases"] = max(above - bases, 0) / c["held_bytes"]
            if c["stage"] in GRAPH_STAGES and c.get("activation_bytes"):
                c["graph_over_activations"] = _graph_bytes(c) / c["activation_bytes"]
            if c["stage"] in GRAPH_STAGES and c.get("saved_graph_bytes"):
                c["graph_over_saved"] = _graph_bytes(c) / c["saved_graph_bytes"]
            if c.get("curve_state_bytes"):  # curves: its own memory over the bend, its gradient and 2 moments
                c["curve_over_state"] = max(above - bases - c["solutions_bytes"], 0) / c["curve_state_bytes"]
    from experiments.benchmarks import llm_scale_plan  # FT under --fsdp and the grid on 1-8 GPUs

    scaling = llm_scale_plan.plan(calibration=llm_scale_plan.load_calibration(llm_scale_plan.CALIBRATION))
    return {**result, "flatness": flatness(result["cases"]), "projection": project(result["cases"]),
            "scaling": scaling}  # fmt: skip


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


def hidden_size(text: str) -> int:
    """argparse type of ``--sizes``: a hidden size that :func:`scaled_config` splits into max(2, size // 64)
    heads of one even width (rotary embeddings pair the dimensions)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    heads = max(2, value // 64)
    if value < 8 or value % heads or (value // heads) % 2:
        raise argparse.ArgumentTypeError(f"expected a hidden size ≥ 8 that splits into max(2, size // 64) heads "
                                         f"of even width (e.g. 64, 96, 512, 1024), not {text!r}")  # fmt: skip
    return value


def _check_merge(p: argparse.ArgumentParser, paths: list[Path]) -> None:
    """Each ``--merge`` file is a JSON report of this benchmark (a dict with its ``cases``)."""
    for path in paths:
        try:
            cases = json.loads(path.read_text()).get("cases")
        except (OSError, ValueError, AttributeError) as e:
            p.error(f"--merge {path}: cannot read it as this benchmark's JSON ({type(e).__name__}): pass files "
                    "written by --json")  # fmt: skip
        if not isinstance(cases, list):
            p.error(f"--merge {path}: holds no 'cases' list: pass files written by --json")


def parse(argv: list[str] | None) -> argparse.Namespace:
    from landscape.cli import Parser, out_file, positive_int

    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", type=out_file, help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help=f"CI-sized: hidden {QUICK_SIZES}, {QUICK_LAYERS} layers, "
                   "4 samples, fp32, own solutions, stages load head_only plane spectrum")  # fmt: skip
    p.add_argument("--models", nargs="+", choices=sorted(REAL), default=None, help="default: both")
    p.add_argument("--sizes", type=hidden_size, nargs="+", default=None, help=f"hidden sizes (default {SIZES})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help="default: all three")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=None, help="default: both")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="default: every stage")
    p.add_argument("--samples", type=positive_int, default=None, help="evaluation samples (default 16; quick 4)")
    p.add_argument("--prompt-len", type=positive_int, default=None,
                   help="longest prompt in tokens (default 48; quick 16)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=None,
                   help="OMP threads per case (default: the environment's)")  # fmt: skip
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's dynamic mmap threshold (default: fixed per stage)")  # fmt: skip
    p.add_argument("--merge", type=Path, nargs="+", help="summarise the cases of these runs' JSON together (no run)")
    p.add_argument("--worker", nargs=4, metavar=("CASE", "DTYPE", "SOURCE", "STAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.merge:
        _check_merge(p, args.merge)
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
        "cpu": cpu_description(),
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
                                               args.threads, not args.glibc_malloc)  # fmt: skip
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
