"""Memory of the loss-landscape plane (the factored plane against the dense one) and of the streamed
spectral analysis, on Llama-style models.

    python -m experiments.benchmarks.memory [--json PATH] [--sizes 256 512 1024] [--quick] [--storages ...]
                                            [--parts plane spectrum] [--spectrum-sizes 256 512 1024]

Per size (hidden size h, intermediate ≈ 8h/3 rounded to 64, 4 layers, h/64 heads, h/128 key/value
heads, vocabulary 4096), a randomly initialised ``transformers.LlamaForCausalLM`` is saved with
``save_pretrained`` (with a word-level tokenizer, so :func:`adapters.models.hf.entry` accepts the folder)
together with three solutions in the toolkit's formats (:func:`adapters.solution.save_solution`): ``ft``
(every parameter perturbed at random), ``lora`` (r = 8) and ``randlora`` (r = 32) with peft on
q/k/v/up/down and non-zero random factors.

Each (size, storage) case runs in a FRESH SUBPROCESS, so its peak is its own: it loads the base, runs
one forward of the evaluation batch (the math libraries' first-call buffers are not plane memory), reads
the RSS (``VmRSS``), restarts the peak counter (``/proc/self/clear_refs``; when that is refused, the
process's ``ru_maxrss`` is used and includes the loading), loads the three solutions and evaluates a
2 × 2 grid of the paper chart ((0, 0), (1, 0), (0, 1), (1, 1)) with

- ``factored``: :func:`landscape.engine.factored.build_chart` + :class:`~landscape.engine.factored.FactoredEvaluator`
  on the base model itself (what ``--plane-storage factored`` does);
- ``dense``: as ``landscape.connectivity`` does with ``--plane-storage dense``: the solutions' dense
  ``delta()``, :func:`landscape.engine.plane.solution_weights`, the chart, a copy of the model.

Reported per case: ``params``, ``model_bytes``, ``rss_after_base_bytes``, ``grid_peak_rss_bytes`` (the
peak from solutions loading to the end of the grid), ``ratio`` = (grid peak − RSS after loading the
base) / model_bytes (target for the factored plane: <= 1.5, i.e. one dense FT update plus small
factored ones), ``live_ratio`` (the same with the RSS after the grid once ``malloc_trim`` has returned
the allocator's free memory: what the plane keeps alive), ``forward_ratio`` (the peak of one forward of
the evaluation batch at the base weights, above the RSS before it, / model_bytes: activations that any
storage's peak includes), ``ru_maxrss_bytes`` (the whole process),
seconds, and the 2 × 2 losses; per size the largest relative loss difference between the two storages.

The cases run with glibc's ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB (``--mmap-threshold``; 0 keeps glibc's
dynamic threshold): glibc otherwise raises its threshold to the size of the largest block freed so far
(up to 32 MiB), so the per-module temporaries (a materialised ΔW, a few MiB each) are then served from
the heap, which fragments and keeps them resident after they are freed. A long CPU run can set the
same variable; both storages are measured under the same setting.

The objective: :class:`adapters.models.hf.CausalLMScorer` (``hf.entry(folder, "lm")``), scoring 2
fabricated candidate responses per sample with the answer loss (:class:`adapters.objectives.AnswerLoss`);
where ``adapters.models.hf`` cannot be imported, a tiny wrapper returning each sequence's mean
next-token loss (recorded as ``objective`` in the JSON).

Spectrum cases (``--parts spectrum``; sizes ``--spectrum-sizes``, default those above, quick 128, 256,
512): the same saved model and solutions (FT a full-weight safetensors solution, LoRA and RandLoRA peft
adapters); each case, in a fresh subprocess under the same malloc setting, loads the base and the
solutions' metadata (``solution.json``: no weights) and warms up (:func:`spectrum_warm_up`: the base's
weights paged in, as transformers maps them from the file; the math libraries' and peft's first calls on
tiny inputs), reads the RSS, restarts the peak counter and runs
:func:`landscape.spectrum.analyse_solutions` on the CPU (every metric and the weight spectra; the updates
streamed layer by layer from the files). Reported per case in ``spectrum_cases``: ``params``,
``largest_layer_bytes`` (the largest analysed weight matrix in fp32), ``spectrum_peak_rss_bytes`` (peak
RSS of the analysis minus the RSS before it; ``ru_maxrss`` minus it where the peak counter cannot be
restarted) and ``ratio`` = that / ``largest_layer_bytes``: the target is a ratio that does not grow with
the model's size, at most ``SPECTRUM_TARGET_RATIO``. Also ``adapters_bytes`` (the RSS the loaded updates
hold throughout: peft's adapters, RandLoRA's shared random bases — about 2.7 × the largest layer for these
shapes — and LoRA's factors; part of the peak) and ``ratio_without_adapters``, ``result_bytes`` (the
returned spectrum), ``live_after_trim_bytes`` (the RSS left once it is dropped), the seconds and the layer
count. The BLAS thread count is the environment's (``OPENBLAS_NUM_THREADS``): it changes the time, not
the memory.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters import heap
from adapters.objectives import Classification

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m experiments.benchmarks.memory"
SIZES = (256, 512, 1024)
QUICK_SIZES = (128, 256)
QUICK_SPECTRUM_SIZES = (128, 256, 512)
PARTS = ("plane", "spectrum")
SPECTRUM_TARGET_RATIO = 10.0
STORAGES = ("factored", "dense")
VOCAB = 4096
LAYERS = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
RANKS = {"lora": 8, "randlora": 32}
TARGET_RATIO = 1.5
MMAP_THRESHOLD = 1 << 20  # glibc: blocks from 1 MiB up are mmapped, so freed ones go back to the system


# --------------------------------------------------------------------------- memory readings


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def trim() -> None:
    """Give freed heap memory back to the system, so the RSS reading is what is alive."""
    gc.collect()
    heap.release_freed()


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (False where the kernel refuses it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- models and objective


@dataclass(frozen=True)
class SampleLoss(Classification):
    """Objective of the fallback wrapper: outputs are already per-sample losses (accuracy is not defined: 0)."""

    name: str = "sample-loss"

    def per_sample(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.float(), torch.zeros(outputs.shape, dtype=torch.bool, device=outputs.device)


class NextTokenLoss(nn.Module):
    """Fallback when adapters.models.hf is missing: a causal LM's mean next-token loss per sequence."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.backbone = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        return nll.mean(-1)


def has_hf() -> bool:
    import importlib.util

    return importlib.util.find_spec("adapters.models.hf") is not None


def llama_config(hidden: int):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=64 * round(hidden * 8 / 3 / 64), num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=VOCAB,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of the model's vocabulary (t0 … and </s>, <pad>): hf.entry needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(folder)


def load_base(case: Path) -> tuple[nn.Module, str]:
    """The base model of a case and the objective's name (``answer`` through hf, else ``sample-loss``)."""
    if has_hf():
        from adapters.models import hf

        return hf.entry(str(case / "base"), "lm").build(0), "answer"
    from transformers import LlamaForCausalLM

    return NextTokenLoss(LlamaForCausalLM.from_pretrained(case / "base")), "sample-loss"


def eval_set_for(objective: str, samples: int, length: int):
    """A few fabricated token sequences as one evaluation batch, and the objective that scores them."""
    from adapters.models.base import Encoded
    from adapters.objectives import OBJECTIVES
    from landscape.engine.grid import EvalSet

    g = torch.Generator().manual_seed(0)
    if objective == "answer":  # 2 candidate responses per sample; the last 8 tokens are the answer
        ids = torch.randint(0, VOCAB - 2, (samples, 2, length), generator=g)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[..., -8:] = True
        data = Encoded({"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_mask": answer})
        labels, scorer = torch.arange(samples) % 2, OBJECTIVES["answer"]
    else:
        ids = torch.randint(0, VOCAB - 2, (samples, length), generator=g)
        data = Encoded({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        labels, scorer = torch.zeros(samples, dtype=torch.long), SampleLoss()
    return EvalSet.prepare(data, labels, samples, "cpu"), scorer


# --------------------------------------------------------------------------- setup (parent process)


def make_case(folder: Path, hidden: int, seed: int = 0) -> dict:
    """Save a random Llama of ``hidden`` size and its ft / lora / randlora solutions under ``folder``."""
    from transformers import LlamaForCausalLM

    from adapters.methods import MethodSpec, attach
    from adapters.solution import save_solution

    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(hidden)).save_pretrained(folder / "base")
    save_tokenizer(folder / "base")
    base, objective = load_base(folder)
    g = torch.Generator().manual_seed(seed + 1)
    for method in ("ft", "lora", "randlora"):
        model = attach(copy.deepcopy(base), MethodSpec(method, rank=RANKS.get(method)), TARGETS)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:  # ft: every weight; lora: A and (zero-initialised) B; randlora: λ, γ
                    p.add_((1e-3 if "randlora" in name else 1e-2) * torch.randn(p.shape, generator=g))
        info = {"name": method, "method": method, "model": f"llama-h{hidden}", "num_classes": 0,
                "rank": RANKS.get(method)}  # fmt: skip
        save_solution(folder / method, model, info, {})
        del model
    params = sum(p.numel() for p in base.parameters())
    return {"params": params, "model_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
            "objective": objective}  # fmt: skip


# --------------------------------------------------------------------------- one case (fresh subprocess)


def evaluator_for(storage: str, model: nn.Module, solutions: dict, eval_set, objective):
    """The plane's evaluator as ``landscape.build.plane`` builds it for ``storage``."""
    from landscape.engine import factored
    from landscape.engine.grid import PlaneEvaluator
    from landscape.engine.plane import build_chart, solution_weights

    if storage == "factored":
        chart = factored.build_chart(
            "paper", model, {s: sol.module_deltas(check=False) for s, sol in solutions.items()}
        )
        return factored.FactoredEvaluator(model, chart, eval_set, "cpu", objective=objective)
    thetas = solution_weights(dict(model.named_parameters()), {s: sol.delta() for s, sol in solutions.items()})
    chart = build_chart("paper", thetas)
    del thetas
    return PlaneEvaluator(copy.deepcopy(model), chart, eval_set, "cpu", objective=objective)


def worker(case: Path, storage: str, samples: int, length: int) -> dict:
    """Load the base, restart the peak, build the plane and evaluate the 2 × 2 grid; the readings."""
    import numpy as np
    import peft  # noqa: F401  (imported before the baseline: code, not plane memory)

    import adapters.deltas  # noqa: F401
    from adapters.solution import Solution, read_info
    from landscape.engine import factored  # noqa: F401
    from landscape.engine.grid import run_grid

    model, objective = load_base(case)
    model.eval()
    eval_set, scorer = eval_set_for(objective, samples, length)
    with torch.no_grad():  # the math libraries' first-call buffers and threads: before the baseline, not plane memory
        model(**eval_set.batches[0][0])
        trim()
        before, reset = status_bytes("VmRSS"), reset_peak()
        model(**eval_set.batches[0][0])  # a forward's own activations, at the base weights: any plane pays them
        forward = status_bytes("VmHWM") - before if reset else None
    trim()
    rss_base = status_bytes("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    solutions = {s: Solution(path=case / s, info=read_info(case / s), metrics={}, base=model)
                 for s in ("ft", "lora", "randlora")}  # fmt: skip
    evaluator = evaluator_for(storage, model, solutions, eval_set, scorer)
    plane_s = time.perf_counter() - start
    result = run_grid(evaluator, np.array([0.0, 1.0]), np.array([0.0, 1.0]), progress=False)
    peak = status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trim()  # what is still alive once the allocator has given its free memory back
    live = status_bytes("VmRSS")
    return {
        "forward_activation_bytes": forward,
        "live_after_trim_bytes": live,
        "rss_after_base_bytes": rss_base,
        "grid_peak_rss_bytes": peak,
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss (includes loading)",
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "plane_s": round(plane_s, 3),
        "grid_s": round(float(result["seconds"]), 3),
        "seconds_per_point": round(float(result["seconds"]) / 4, 3),
        "loss": result["loss"].tolist(),
        "objective": objective,
    }


def run_case(case: Path, storage: str, samples: int, length: int, threads: int | None, mmap_threshold: int) -> dict:
    """:func:`worker` in a fresh Python process (its peak RSS is then this case's alone); ``mmap_threshold``
    > 0: glibc's ``MALLOC_MMAP_THRESHOLD_`` for it (module docstring)."""
    return _subprocess(["--worker", str(case), storage, "--samples", str(samples), "--length", str(length)], threads,
                       mmap_threshold)  # fmt: skip


def _subprocess(args: list[str], threads: int | None, mmap_threshold: int) -> dict:
    """This module with ``args`` in a fresh Python process; its last printed line, as JSON."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.memory", *args]
    cmd += ["--threads", str(threads)] if threads else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def spectrum_warm_up(solutions: dict) -> int:
    """What a first call costs once, whatever the model's size, done before the baseline: the base's weights
    paged in (transformers maps the safetensors file: untouched pages are not resident), the first calls of
    LAPACK / BLAS / torch.linalg on a tiny analysis (dense, factored, lazy), and each solution's adapter code
    (peft) on its smallest layer. Returns the RSS the solutions' loaded updates hold (peft's adapters with
    RandLoRA's shared bases, LoRA's factors), a part of the analysis' peak reported on its own."""
    from landscape.spectrum import LowRank, analyse
    from landscape.spectrum.updates import LazyDelta, is_lazy, lazy_deltas

    base = next(iter(solutions.values())).base
    with torch.no_grad():
        for p in base.parameters():
            float(p.float().sum())
    g = torch.Generator().manual_seed(0)
    w = lambda: torch.randn(48, 24, generator=g)  # noqa: E731
    low = LowRank(torch.randn(48, 2, generator=g), torch.randn(2, 24, generator=g))
    analyse({"ft": {"w": w()}, "lora": {"w": low}, "randlora": {"w": LazyDelta("w", (48, 24), w, "randlora")}},
            progress=False, base={"w": w()})  # fmt: skip
    trim()
    before = status_bytes("VmRSS")
    held = {name: lazy_deltas(sol, name) for name, sol in solutions.items()}
    for updates in held.values():
        lazy = [v for v in updates.values() if is_lazy(v)]
        if lazy:
            min(lazy, key=lambda v: v.shape.numel())()
    trim()
    adapters = status_bytes("VmRSS") - before
    del held, lazy
    return adapters


def spectrum_worker(case: Path) -> dict:
    """Load the base and the solutions' metadata, warm up, restart the peak and run the streamed analysis."""
    import peft  # noqa: F401  (imported before the baseline: code, not spectrum memory)

    from adapters.solution import Solution, read_info
    from landscape.spectrum import analyse_solutions

    model, _ = load_base(case)
    solutions = {s: Solution(path=case / s, info=read_info(case / s), metrics={}, base=model)
                 for s in ("ft", "lora", "randlora")}  # fmt: skip
    adapters = spectrum_warm_up(solutions)
    trim()
    rss_base = status_bytes("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    result = analyse_solutions(solutions, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trim()
    with_result = status_bytes("VmRSS")
    layers = [layer["shape"] for layer in result["layers"]]
    del result
    trim()
    live = status_bytes("VmRSS")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "layers": len(layers),
        "largest_layer_bytes": max(m * n * 4 for m, n in layers),
        "rss_after_base_bytes": rss_base,
        "spectrum_peak_rss_bytes": peak - rss_base,
        "adapters_bytes": adapters,
        "result_bytes": with_result - live,
        "live_after_trim_bytes": live - rss_base,
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss (includes loading)",
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "spectrum_s": round(seconds, 3),
    }


def run_spectrum_case(case: Path, threads: int | None, mmap_threshold: int) -> dict:
    """:func:`spectrum_worker` in a fresh Python process (as :func:`run_case`)."""
    return _subprocess(["--spectrum-worker", str(case)], threads, mmap_threshold)


# --------------------------------------------------------------------------- report


def table(out: dict) -> str:
    lines = [f"{'case':<12} {'storage':<9} {'params':>11} {'model MiB':>10} {'base RSS':>9} {'grid peak':>10} "
             f"{'ratio':>6} {'live':>6} {'fwd':>6} {'plane s':>8} {'s/point':>8}"]  # fmt: skip
    for c in out["cases"]:
        if "error" in c:
            lines.append(f"{c['name']:<12} {c['storage']:<9} ERROR {c['error']}")
            continue
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        lines.append(
            f"{c['name']:<12} {c['storage']:<9} {c['params']:>11,d} {mib(c['model_bytes']):>10} "
            f"{mib(c['rss_after_base_bytes']):>9} {mib(c['grid_peak_rss_bytes']):>10} {c['ratio']:>6.2f} "
            f"{c['live_ratio']:>6.2f} {c.get('forward_ratio', float('nan')):>6.2f} "
            f"{c['plane_s']:>8.2f} {c['seconds_per_point']:>8.2f}"
        )
    for name, diff in out["max_rel_loss_diff"].items():
        lines.append(f"{name}: largest relative loss difference factored vs dense {diff:.2e}")
    lines.append(f"ratio = (grid peak RSS - RSS after loading the base) / model bytes; target <= {TARGET_RATIO} "
                 "for the factored plane; live = the same with the RSS after the grid, allocator trimmed; "
                 "fwd = one forward's own activations at the base weights (in the peak of either storage)")  # fmt: skip
    lines.append(f"glibc MALLOC_MMAP_THRESHOLD_ of the cases: {out['malloc_mmap_threshold']}")
    return "\n".join(lines)


def loss_differences(cases: list[dict]) -> dict[str, float]:
    by = {(c["name"], c["storage"]): c for c in cases if "error" not in c}
    out = {}
    for name in sorted({c["name"] for c in cases}):
        a, b = by.get((name, "factored")), by.get((name, "dense"))
        if a and b:
            la, lb = torch.tensor(a["loss"], dtype=torch.float64), torch.tensor(b["loss"], dtype=torch.float64)
            out[name] = float(((la - lb).abs() / lb.abs().clamp_min(1e-12)).max())
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here (atomically)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help=f"hidden sizes (default {SIZES})")
    p.add_argument("--storages", nargs="+", choices=STORAGES, default=list(STORAGES), help="default: both")
    p.add_argument("--quick", action="store_true", help=f"CI-sized: hidden {QUICK_SIZES}, 2 short samples")
    p.add_argument("--samples", type=int, default=None, help="fabricated samples (default 8; quick 2)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default 64; quick 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per case (default: all cores)")
    p.add_argument(
        "--mmap-threshold", type=int, default=MMAP_THRESHOLD,
        help=f"glibc MALLOC_MMAP_THRESHOLD_ of the cases, bytes (default {MMAP_THRESHOLD}; 0: glibc's dynamic one)",
    )  # fmt: skip
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="plane and/or spectrum cases")
    p.add_argument(
        "--spectrum-sizes", type=int, nargs="+", default=None,
        help=f"hidden sizes of the spectrum cases (default {SIZES}; quick {QUICK_SPECTRUM_SIZES})",
    )  # fmt: skip
    p.add_argument("--worker", nargs=2, metavar=("CASE_DIR", "STORAGE"), help=argparse.SUPPRESS)
    p.add_argument("--spectrum-worker", metavar="CASE_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.samples = args.samples or (2 if args.quick else 8)
    args.length = args.length or (32 if args.quick else 64)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    args.spectrum_sizes = args.spectrum_sizes or list(QUICK_SPECTRUM_SIZES if args.quick else SIZES)
    return args


class Cases:
    """The saved models and solutions of each hidden size, made on first use under one temporary folder."""

    def __init__(self, root: Path):
        self.root, self.setup = root, {}

    def folder(self, hidden: int) -> tuple[str, Path, dict]:
        name, folder = f"llama-h{hidden}", self.root / f"h{hidden}"
        if name not in self.setup:
            self.setup[name] = make_case(folder, hidden)
            trim()
        return name, folder, self.setup[name]


def plane_cases(args: argparse.Namespace, made: Cases) -> list[dict]:
    """Every (size, storage) plane case, each in a fresh subprocess."""
    cases = []
    for hidden in args.sizes:
        name, folder, setup = made.folder(hidden)
        for storage in args.storages:
            print(f"{name} {storage} ...", file=sys.stderr, flush=True)
            reading = run_case(folder, storage, args.samples, args.length, args.threads, args.mmap_threshold)
            case = {"name": name, "storage": storage, "params": setup["params"], "model_bytes": setup["model_bytes"],
                    **reading}  # fmt: skip
            if "error" not in reading:
                base_rss, size = reading["rss_after_base_bytes"], case["model_bytes"]
                case["ratio"] = (reading["grid_peak_rss_bytes"] - base_rss) / size
                case["live_ratio"] = (reading["live_after_trim_bytes"] - base_rss) / size
                if reading.get("forward_activation_bytes") is not None:
                    case["forward_ratio"] = reading["forward_activation_bytes"] / size
            cases.append(case)
    return cases


def spectrum_cases(args: argparse.Namespace, made: Cases) -> list[dict]:
    """One streamed spectral analysis per size, each in a fresh subprocess."""
    cases = []
    for hidden in args.spectrum_sizes:
        name, folder, setup = made.folder(hidden)
        print(f"{name} spectrum ...", file=sys.stderr, flush=True)
        reading = run_spectrum_case(folder, args.threads, args.mmap_threshold)
        case = {"name": name, "model_bytes": setup["model_bytes"], **reading}
        if "error" not in reading:
            peak, layer = reading["spectrum_peak_rss_bytes"], reading["largest_layer_bytes"]
            case["ratio"] = peak / layer
            case["ratio_without_adapters"] = (peak - reading["adapters_bytes"]) / layer
        cases.append(case)
    return cases


def spectrum_table(out: dict) -> str:
    lines = [f"{'case':<12} {'params':>11} {'layers':>6} {'largest MiB':>11} {'peak MiB':>9} {'ratio':>6} "
             f"{'adapters MiB':>12} {'w/o adapters':>12} {'result MiB':>10} {'seconds':>8}"]  # fmt: skip
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    for c in out["spectrum_cases"]:
        if "error" in c:
            lines.append(f"{c['name']:<12} ERROR {c['error']}")
            continue
        lines.append(
            f"{c['name']:<12} {c['params']:>11,d} {c['layers']:>6} {mib(c['largest_layer_bytes']):>11} "
            f"{mib(c['spectrum_peak_rss_bytes']):>9} {c['ratio']:>6.2f} {mib(c['adapters_bytes']):>12} "
            f"{c['ratio_without_adapters']:>12.2f} {mib(c['result_bytes']):>10} {c['spectrum_s']:>8.2f}"
        )
    lines.append(
        "ratio = (peak RSS of analyse_solutions - RSS after loading the base and the solutions' metadata) / the "
        f"largest analysed layer's fp32 bytes; target: not growing with size, <= {SPECTRUM_TARGET_RATIO}; adapters = "
        "RSS held by the loaded updates (peft adapters, RandLoRA's shared bases), in the peak; w/o adapters = the "
        "ratio without them; result = the returned spectrum (lists of floats)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from adapters import threads

    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads.configure(args.threads)
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1], args.samples, args.length)))
        return 0
    if args.spectrum_worker:
        print(json.dumps(spectrum_worker(Path(args.spectrum_worker))))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        made = Cases(Path(tmp))
        cases = plane_cases(args, made) if "plane" in args.parts else []
        spectra = spectrum_cases(args, made) if "spectrum" in args.parts else []
    out = {
        "benchmark": "memory", "quick": args.quick, "parts": args.parts, "sizes": args.sizes, "layers": LAYERS,
        "vocab": VOCAB, "ranks": RANKS, "samples": args.samples, "length": args.length, "target_ratio": TARGET_RATIO,
        "malloc_mmap_threshold": args.mmap_threshold or "glibc default (dynamic)",
        "objective": next((c["objective"] for c in cases if "objective" in c), None),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - started, 1), "cases": cases, "max_rel_loss_diff": loss_differences(cases),
        "spectrum_sizes": args.spectrum_sizes, "spectrum_target_ratio": SPECTRUM_TARGET_RATIO,
        "spectrum_cases": spectra,
    }  # fmt: skip
    if cases:
        print(table(out))
    if spectra:
        print(spectrum_table(out))
    if args.json:
        from adapters.io import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
