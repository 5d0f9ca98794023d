"""Rehearsal of the seed's commonsense pipeline at the real architecture, on whatever machine is at hand.

    python -m experiments.rehearsal [--out runs/rehearsal] [--variants fp32 4bit bf16] [--layers N]
                                    [--model qwen2-0.5b|llama3-8b|hf:FOLDER] [--device cpu|cuda] [--json PATH]

Builds a randomly initialised model from a real configuration written below (no download; Qwen2-0.5B by
default, the seed's Llama-3-8B shape with ``--model llama3-8b``) or takes a real one (``--model hf:FOLDER``),
fabricates LLM-Adapters commonsense files in the real format, and runs, per variant, the real command lines:

1. ``python -m landscape.connectivity --config experiments/paper/commonsense_rehearsal.toml`` — the seed's
   RandLoRA r = 30 and a budget-matched LoRA trained (~10 steps), head-only baseline, the plane and its grid,
   the straight paths and the spectra; then
2. ``python -m landscape.curvature --coordinates adapter --top-k 1`` — the top Hessian eigenvalue of each
   adapter in its own coordinates.

Variants: ``fp32`` (fp32 weights), ``4bit`` (``--load-4bit``: NF4 base, QLoRA recipe) and ``bf16``
(``--torch-dtype bfloat16``: bf16 storage). Each command runs as its own process; the table gives each stage's
wall time (from the run's ``landscape.json`` and ``curvature.json``), the process's peak RSS and the vertex
losses. ``--layers`` shortens the model (the only reduction allowed when a variant cannot fit; the table says
so). Results are written atomically with ``--json``. ``experiments.gpu_check --rehearsal`` calls this with
``--device cuda`` at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "paper" / "commonsense_rehearsal.toml"
VARIANTS = {"fp32": [], "4bit": ["--load-4bit"], "bf16": ["--torch-dtype", "bfloat16"]}

# Real configurations (config.json of the released checkpoints), so the rehearsal's cost is the real one.
SHAPES = {
    "qwen2-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}  # fmt: skip


def corpus_tokenizer(data: Path, vocab_size: int = 4000):
    """A byte-level BPE trained on the fabricated files themselves, so a prompt costs about as many tokens as a
    real tokenizer gives it (tests.llm_models' 300-word tokenizer splits these prompts almost into characters:
    about twice the tokens, which made every stage, curvature above all, about that much dearer)."""
    from tests.llm_models import CORPUS, tokenizer

    texts = [f"{r['instruction']} {r.get('input', '')} {r['output']}" for f in sorted(data.rglob("*.json"))
             for r in json.loads(f.read_text())]  # fmt: skip
    return tokenizer(texts + CORPUS, vocab_size)


def build_model(shape: str, layers: int | None, folder: Path, data: Path) -> Path:
    """Save a randomly initialised ``shape`` model (seed 0, ``layers`` deep) and a tokenizer trained on ``data``
    in ``folder``; kept when an earlier call wrote the same configuration."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape], bos_token_id=1, eos_token_id=2, tokenizer="corpus-bpe-4000")
    if layers is not None:
        spec["num_hidden_layers"] = layers
    stamp = folder / "rehearsal.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return folder
    import torch

    config = AutoConfig.for_model(**{k: v for k, v in spec.items() if k != "tokenizer"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    corpus_tokenizer(data).save_pretrained(folder)
    stamp.write_text(json.dumps(spec))
    return folder


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd``; its exit code, wall seconds and peak RSS in bytes (``wait4``: this child alone)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024


def run_variant(name: str, model: str, data: Path, out: Path, device: str) -> dict:
    """The two commands of one variant; their stage times, peaks and vertex losses."""
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    connectivity = [sys.executable, "-m", "landscape.connectivity", "--dataset", "commonsense", "--config", str(CONFIG),
                    "--model", model, "--data-root", str(data), "--out", str(run), "--device", device, "--no-progress",
                    *VARIANTS[name]]  # fmt: skip
    code, seconds, peak = run_measured(connectivity, run / "connectivity.log")
    result = {"variant": name, "connectivity_exit": code, "connectivity_s": round(seconds, 1),
              "connectivity_peak_rss": peak}  # fmt: skip
    if code != 0:
        return result
    meta = json.loads((run / "landscape.json").read_text())
    result["stages_s"] = meta.get("wall_time_s", {})
    solutions = meta.get("solutions", {})
    result["vertex_loss"] = {k: v.get("vertex_loss") for k, v in solutions.items() if isinstance(v, dict)}
    curvature = [sys.executable, "-m", "landscape.curvature", "--run", str(run), "--solutions", "lora", "randlora",
                 "--coordinates", "adapter", "--top-k", "1", "--trace-probes", "0", "--slq-probes", "0",
                 "--device", device, "--no-progress"]  # fmt: skip
    code, seconds, peak = run_measured(curvature, run / "curvature.log")
    result.update(curvature_exit=code, curvature_s=round(seconds, 1), curvature_peak_rss=peak)
    if code == 0:
        curv = json.loads((run / "curvature.json").read_text())
        result["top_eigenvalue"] = {
            s: (e.get("adapter", {}).get("eigenvalues") or [None])[0] for s, e in curv.get("solutions", {}).items()
        }
    return result


def table(results: list[dict], shape: str, layers: int | None) -> str:
    depth = f"{layers} of {SHAPES[shape]['num_hidden_layers']} layers (reduced)" if layers else "full depth"
    header = f"{'variant':8} {'total s':>8} {'connectivity s':>15} {'curvature s':>12} {'peak GB':>8}  stages (s)"
    lines = [f"rehearsal: {shape}, {depth}", header]
    for r in results:
        total = r["connectivity_s"] + r.get("curvature_s", 0.0)
        peak = max(r["connectivity_peak_rss"], r.get("curvature_peak_rss", 0)) / 1e9
        stages = " ".join(f"{k}={v:.0f}" for k, v in r.get("stages_s", {}).items())
        failed = "" if r["connectivity_exit"] == 0 and r.get("curvature_exit", 0) == 0 else "  FAILED (see the logs)"
        lines.append(f"{r['variant']:8} {total:8.0f} {r['connectivity_s']:15.0f} {r.get('curvature_s', 0):12.0f} "
                     f"{peak:8.2f}  {stages}{failed}")  # fmt: skip
    lines.append(f"total: {sum(r['connectivity_s'] + r.get('curvature_s', 0.0) for r in results):.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rehearsal", help="work folder (model, data, one run per variant)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--model", default="qwen2-0.5b",
                   help="qwen2-0.5b or llama3-8b (random init, real shape) or hf:FOLDER (real weights)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a random-init model (default: all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    from tests.llm_data import write_commonsense

    data = write_commonsense(out / "data", n_train=8, n_test=2)
    if args.model.startswith("hf:"):
        model, shape = args.model, "qwen2-0.5b"
    else:
        if args.model not in SHAPES:
            p.error(f"unknown --model {args.model!r}: qwen2-0.5b, llama3-8b or hf:FOLDER")
        shape = args.model
        model = "hf:" + str(build_model(shape, args.layers, out / f"{shape}-{args.layers or 'full'}", data))
    results = [run_variant(v, model, data, out, args.device) for v in args.variants]
    text = table(results, shape, args.layers)
    print(text)
    if args.json:
        from adapters.io import write_json

        write_json(Path(args.json), {"model": args.model, "layers": args.layers, "device": args.device,
                                     "results": results, "table": text})  # fmt: skip
    return 0 if all(r["connectivity_exit"] == 0 and r.get("curvature_exit", 0) == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
