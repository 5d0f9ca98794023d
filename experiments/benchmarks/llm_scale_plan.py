"""Planning before spending: PROJECTED per-GPU memory and wall time of full fine-tuning Llama-3-8B under
``--fsdp`` and of the commonsense grid, on 1, 2, 4 and 8 H200s. Nothing here is measured at 8B.

    python -m experiments.benchmarks.llm_scale_plan [--gpus 1 2 4 8] [--calibration PATH] [--json PATH]
        [--markdown]

**Model.** ``meta-llama/Meta-Llama-3-8B``'s real configuration (:data:`experiments.benchmarks.llm_scale_cases.REAL`):
hidden h 4096, intermediate i 14336, 32 layers, 32 query / 8 key-value heads, vocabulary 128256, untied. Its
parameters are counted in closed form (:func:`shape`; 8.03 B).

**Workload** (the commonsense preset, ``experiments/paper/commonsense.toml``): FT trains one epoch of
``commonsense_170k`` (:data:`TRAIN_RECORDS` records) at batch 16 with gradient checkpointing, each sequence
taken at the cutoff (256 tokens: an upper bound; the records' lengths are not here); the grid is 25 × 25 points ×
512 samples of :data:`EVAL_TOKENS_PER_SAMPLE` tokens (a prompt run once, 4 candidates continued from its KV cache:
the fabricated shape of :mod:`experiments.benchmarks.projection`), bf16 compute.

**Memory per GPU** (:func:`ft_memory`). FSDP2 over N GPUs: fp32 master weights + gradients + AdamW's two moments =
16 B/param, sharded: 16 P / N. Unsharded at a time (N > 1): the root unit (embeddings, final norm, head: FSDP2 keeps
the root gathered from the forward to the backward) in fp32 with its gradient, and two blocks (the one computing and
the one prefetched) in fp32 with one block's gradient. Activations (bf16 autocast, fp32 residual stream, flash
attention): with checkpointing each block's fp32 input (4 h B/token/layer) plus one block recomputed, 18 h + 6 kv +
8 i B/token (norm inputs fp32; normed inputs, q k v, rotated q k, attention output, gate, up, SiLU, product bf16),
plus the logits (V × (2 + 4 + 4) B/token: bf16, their fp32 copy, its gradient); each GPU computes on 16 / N sequences.
The base the toolkit's other stages read stays on the host (host RAM, not counted). The grid holds, on every GPU
whatever N (its points are split, not its model), the factored chart ``--plane-storage auto`` picks at 8B (the dense
one needs about 6 fp32 copies): the base in bf16 (2 B/param), FT's update in the model's dtype (2 B/param), one
layer's fp32 scratch, the adapters' factors (negligible) and one evaluation batch's activations (16 × 96 tokens).
"fits": at most :data:`USABLE` of the GPU's 141 GB.

**Wall time** (:func:`ft_time`, :func:`grid_time`). FT: FLOPs per token = 8 P (forward 2 P, backward 4 P,
recomputed forward 2 P) + 16 L h s (attention scores and values, forward, recompute and backward, causal halves
counted once) over N GPUs at the dense bf16 peak × an efficiency; FSDP traffic per step (all-gather in the forward,
again in the backward, reduce-scatter of the gradients, all in fp32: 12 P (N − 1) / N bytes per GPU) at
:data:`NVLINK_BYTES_PER_S`, assumed to overlap the compute (step = the longer of the two). Grid: 2 × the blocks'
parameters FLOPs per token (the head runs at the answers only: not counted; an embedding is a lookup) + 4 L h ×
the mean context; the points split over the N GPUs (⌈625 / N⌉ each), plus each GPU's load of the bf16 base at
:data:`LOAD_BYTES_PER_S`.

**Assumptions and calibration.** The efficiencies (:data:`TRAIN_EFFICIENCY`, the grid's
:data:`experiments.benchmarks.projection.H200_EFFICIENCY`), the link and the disk are assumptions, printed as such.
``python -m experiments.gpu_check --calibrate`` measures both efficiencies on the GPU it runs on and writes
:data:`CALIBRATION`; this projection uses that file when it exists (``--calibration`` names another) and says
``uncalibrated`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from adapters.io import write_json
from experiments.benchmarks.llm_scale_cases import GPU_BYTES, ROOT, TARGETS, full_config
from experiments.benchmarks.projection import H200_BF16_DENSE_FLOPS, H200_EFFICIENCY

PROG = "python -m experiments.benchmarks.llm_scale_plan"
CALIBRATION = ROOT / "experiments" / "benchmarks" / "results" / "gpu_calibration.json"
GPUS = (1, 2, 4, 8)
TRAIN_RECORDS = 170_420  # LLM-Adapters' commonsense_170k.json
BATCH, SEQ = 16, 256  # the preset's batch and cutoff
POINTS, SAMPLES = 625, 512  # the preset's 25 x 25 grid and eval_samples
EVAL_TOKENS_PER_SAMPLE, EVAL_CONTEXT = 96, 72  # prompt ~72 + 4 candidates x 6 (projection's fabricated shape)
TRAIN_EFFICIENCY = 0.4  # assumed: FSDP bf16 training of 7-8 B models commonly reaches 35-45 % of the dense peak
NVLINK_BYTES_PER_S = 350e9  # assumed achieved all-gather / reduce-scatter bus bandwidth per H200 (NVLink 4)
LOAD_BYTES_PER_S = 2e9  # assumed read rate of the base from local disk
USABLE = 0.9  # "fits": within 90 % of the GPU (the CUDA context, the allocator's fragmentation, AdamW's scratch)
LABEL = "PROJECTION (not measured)"


def shape(model: str = "llama3-8b") -> dict:
    """The real ``model``'s sizes and its parameters counted in closed form from its configuration."""
    c = full_config(model)
    h, i, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    linear = {"q_proj": h * h, "k_proj": h * kv, "v_proj": h * kv, "o_proj": h * h, "gate_proj": h * i,
              "up_proj": h * i, "down_proj": i * h}  # fmt: skip
    block = sum(linear.values()) + 2 * h  # + the two RMSNorm weights
    root = vocab * h * (1 if c.tie_word_embeddings else 2) + h  # embeddings, head, final norm
    return {"model": model, "hidden": h, "intermediate": i, "layers": layers, "kv": kv, "vocab": vocab,
            "block_params": block, "root_params": root, "params": layers * block + root,
            "target_params": layers * sum(linear[t] for t in TARGETS)}  # fmt: skip


def ft_memory(s: dict, n: int, batch: int = BATCH, seq: int = SEQ) -> dict:
    """Per-GPU bytes of FT over ``n`` GPUs (module docstring), by component."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv"]
    tokens = math.ceil(batch / n) * seq
    unsharded = 0 if n == 1 else 4 * (2 * s["root_params"] + 3 * s["block_params"])
    activations = tokens * (s["layers"] * 4 * h + 18 * h + 6 * kv + 8 * i)
    logits = tokens * s["vocab"] * (2 + 4 + 4)
    parts = {"sharded_state": 16 * s["params"] / n, "unsharded_transient": unsharded, "activations": activations,
             "logits": logits}  # fmt: skip
    total = sum(parts.values())
    return {**parts, "total": total, "fits": total <= USABLE * GPU_BYTES}


def grid_memory(s: dict, batch: int = 16) -> dict:
    """Per-GPU bytes of the grid (the same on every GPU: the points are split, not the model)."""
    activations = batch * EVAL_TOKENS_PER_SAMPLE * (18 * s["hidden"] + 6 * s["kv"] + 8 * s["intermediate"])
    parts = {"base_bf16": 2 * s["params"], "ft_delta_bf16": 2 * s["params"],
             "layer_scratch_fp32": 4 * s["hidden"] * s["intermediate"], "activations": activations}  # fmt: skip
    total = sum(parts.values())
    return {**parts, "total": total, "fits": total <= USABLE * GPU_BYTES}


def ft_time(s: dict, n: int, efficiency: float) -> dict:
    """Seconds of one epoch of FT on ``n`` GPUs (module docstring)."""
    steps = math.ceil(TRAIN_RECORDS / BATCH)
    flops_per_token = 8 * s["params"] + 16 * s["layers"] * s["hidden"] * SEQ
    step_flops = BATCH * SEQ * flops_per_token
    compute = step_flops / (n * H200_BF16_DENSE_FLOPS * efficiency)
    comm = 12 * s["params"] * (n - 1) / n / NVLINK_BYTES_PER_S
    step = max(compute, comm)
    return {"steps": steps, "flops_per_token": flops_per_token, "compute_s_per_step": compute,
            "comm_s_per_step": comm, "bound": "communication" if comm > compute else "compute",
            "seconds": steps * step}  # fmt: skip


def grid_time(s: dict, n: int, efficiency: float) -> dict:
    """Seconds of the preset's grid on ``n`` GPUs (module docstring)."""
    flops_per_token = 2 * s["layers"] * s["block_params"] + 4 * s["layers"] * s["hidden"] * EVAL_CONTEXT
    per_point = SAMPLES * EVAL_TOKENS_PER_SAMPLE * flops_per_token / (H200_BF16_DENSE_FLOPS * efficiency)
    points = math.ceil(POINTS / n)
    load = 2 * s["params"] / LOAD_BYTES_PER_S
    return {"flops_per_token": flops_per_token, "s_per_point": per_point, "points_per_gpu": points,
            "load_s": load, "seconds": load + points * per_point}  # fmt: skip


def load_calibration(path: Path | None) -> dict | None:
    """The calibration ``gpu_check --calibrate`` wrote (None when there is none); a bad file is an error."""
    if path is None or not Path(path).exists():
        return None
    data = json.loads(Path(path).read_text())
    for key in ("train_efficiency", "eval_efficiency"):
        if not 0 < float(data.get(key, 0)) <= 1:
            raise ValueError(f"{path}: {key} must be a fraction of the peak in (0, 1], not {data.get(key)!r}")
    return data


def measure_train(device: str = "cuda", layers: int = 2, batch: int = 4, steps: int = 3, hidden: int | None = None,
                  vocab: int | None = None) -> dict:  # fmt: skip
    """Measured training efficiency: Llama-3-8B's configuration cut to ``layers`` layers (``hidden`` / ``vocab``
    shrink it for a CPU test), fp32 master weights, bf16 autocast, gradient checkpointing, AdamW, ``batch`` × 256
    tokens; FLOPs of one step counted by ``FlopCounterMode``, over the median of ``steps`` timed steps, as a
    fraction of the H200's dense bf16 peak (``gpu_check --calibrate`` writes it)."""
    import statistics
    import time

    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    c = full_config("llama3-8b")
    c.num_hidden_layers = layers
    if hidden:
        c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads = hidden, 4 * hidden, 2, 1
        c.head_dim = hidden // 2
    c.vocab_size = vocab or c.vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(c).to(device).train()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, c.vocab_size, (batch, SEQ), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synced():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    step()  # warm-up: kernels, AdamW's state
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    for _ in range(steps):
        start = synced()
        step()
        times.append(synced() - start)
    seconds = statistics.median(times)
    flops = counter.get_total_flops()
    return {"layers": layers, "batch": batch, "seq": SEQ, "params": sum(p.numel() for p in model.parameters()),
            "step_s": seconds, "step_flops": flops,
            "train_efficiency": flops / seconds / H200_BF16_DENSE_FLOPS}  # fmt: skip


def plan(gpus: tuple[int, ...] = GPUS, calibration: dict | None = None, model: str = "llama3-8b") -> dict:
    """The projection for each GPU count: FT and grid memory per GPU and wall time, with every assumption."""
    s = shape(model)
    train_eff = calibration["train_efficiency"] if calibration else TRAIN_EFFICIENCY
    eval_eff = calibration["eval_efficiency"] if calibration else H200_EFFICIENCY
    rows = [{"gpus": n, "ft_memory": ft_memory(s, n), "ft_time": ft_time(s, n, train_eff),
             "grid_memory": grid_memory(s), "grid_time": grid_time(s, n, eval_eff)} for n in gpus]  # fmt: skip
    status = f"calibrated on {calibration.get('device', '?')}" if calibration else "uncalibrated"
    return {"label": f"{LABEL}, {status}", "calibration": calibration, "shape": s, "rows": rows,
            "assumptions": {"peak_bf16_dense_flops": H200_BF16_DENSE_FLOPS, "train_efficiency": train_eff,
                            "eval_efficiency": eval_eff, "nvlink_bytes_per_s": NVLINK_BYTES_PER_S,
                            "load_bytes_per_s": LOAD_BYTES_PER_S, "gpu_bytes": GPU_BYTES,
                            "train_records": TRAIN_RECORDS, "batch": BATCH, "seq": SEQ, "points": POINTS,
                            "samples": SAMPLES, "eval_tokens_per_sample": EVAL_TOKENS_PER_SAMPLE}}  # fmt: skip


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def markdown(result: dict) -> str:
    """The projection as a markdown table (docs/reference/scaling.md)."""
    a, s = result["assumptions"], result["shape"]
    lines = [f"**{result['label']}** — Llama-3-8B ({s['params'] / 1e9:.2f} B parameters), H200 "
             f"({GPU_BYTES / 1e9:.0f} GB, {a['peak_bf16_dense_flops'] / 1e12:.0f} TFLOP/s dense bf16; efficiency "
             f"{a['train_efficiency']:.2f} training, {a['eval_efficiency']:.2f} grid)", "",
             "| GPUs | FT GB/GPU (state + unsharded + act. + logits) | fits | FT epoch | bound | grid GB/GPU | grid |",
             "|---:|---|---|---:|---|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        m, t, gm, gt = r["ft_memory"], r["ft_time"], r["grid_memory"], r["grid_time"]
        parts = " + ".join(f"{m[k] / 1e9:.1f}" for k in ("sharded_state", "unsharded_transient", "activations",
                                                            "logits"))  # fmt: skip
        lines.append(f"| {r['gpus']} | {m['total'] / 1e9:.1f} ({parts}) | {'yes' if m['fits'] else 'no'} | "
                     f"{_hours(t['seconds'])} | {t['bound']} | {gm['total'] / 1e9:.1f} | "
                     f"{_hours(gt['seconds'])} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=list(GPUS), help="GPU counts (default: 1 2 4 8)")
    p.add_argument("--calibration", type=Path, default=CALIBRATION,
                   help=f"gpu_check --calibrate's file (default: {CALIBRATION.relative_to(ROOT)}; "
                   "absent: uncalibrated)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the projection here (atomically)")
    p.add_argument("--markdown", action="store_true", help="print the markdown table only")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.gpus):
        print(f"{PROG}: error: --gpus {' '.join(map(str, args.gpus))}: counts must be >= 1", file=sys.stderr)
        return 2
    try:
        calibration = load_calibration(args.calibration)
    except (ValueError, json.JSONDecodeError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}: rerun python -m experiments.gpu_check --calibrate",
              file=sys.stderr)  # fmt: skip
        return 2
    result = plan(tuple(args.gpus), calibration)
    print(markdown(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
