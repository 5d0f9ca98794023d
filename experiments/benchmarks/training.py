"""Training cost of LoRA, peft's RandLoRA and our fast RandLoRA, side by side.

    python -m experiments.benchmarks.training [--json PATH] [--quick] [--threads N] [--batch-sizes 32 128]

Per case, at matched trainable-parameter budgets (LoRA's rank from
``adapters.methods.budget.match_lora_rank`` for the model's RandLoRA rank), three variants:

- ``lora``: peft LoRA;
- ``randlora_peft``: peft RandLoRA, peft's own forward (``attach(..., fast_randlora=False)``);
- ``randlora_ours``: peft RandLoRA through ``adapters.methods.randlora`` (``mode="auto"``).

Measured per variant: ``step_s`` = median wall time of one training step (forward, the
objective's loss as ``adapters.train`` computes it — cross-entropy —, backward, gradient
clipping, AdamW step) after warm-up, the steps of the three variants interleaved so background
load hits them alike; ``peak_mem_bytes`` = peak memory
over the warm-up steps above the level just before them (CPU: the process's peak RSS, reset
through ``/proc/self/clear_refs`` after ``malloc_trim``, or a 1 ms RSS sampler where that is
not allowed; GPU: ``torch.cuda.max_memory_allocated``); ``adapter_bytes`` = the files the tool
saves: ``save_pretrained`` for ``lora`` and ``randlora_peft``, ``adapters.methods.randlora_saving.save_compact``
for ``randlora_ours``
(no bases: peft regenerates them from their key, a stored checksum is verified; its
``save_pretrained`` size is ``adapter_bytes_peft_format``);
``step_cpu_s`` = median process CPU time of a step, less sensitive to other processes'
load than wall time.

Cases: ``minilm-wordnet`` (all-MiniLM-L6-v2 on WordNet glosses, batches of 32 drawn as
``adapters.train`` draws them, CPU) and, when CUDA is present, ``vit-b32-sized`` (a randomly
initialised ViT with ViT-B/32's shapes from transformers, batch 128 of random 224 px images,
bf16 autocast). Every variant starts from identical base weights and sees identical batches.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters import heap, threads
from adapters.models.base import HEAD
from adapters.objectives import OBJECTIVES

VARIANTS = ("lora", "randlora_peft", "randlora_ours")


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _trim() -> None:
    gc.collect()
    heap.release_freed()


class PeakMemory:
    """Peak memory above the level at ``__enter__`` (bytes), on CPU or one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.method = ""

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.base = _rss_bytes()
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "RSS sampled every 1 ms"
            self._stop = threading.Event()
            self._max = self.base

            def sample():
                while not self._stop.is_set():
                    self._max = max(self._max, _rss_bytes())
                    time.sleep(0.001)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self._max, _rss_bytes()) - self.base
        else:
            self.peak = _hwm_bytes() - self.base
        return False


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    device: torch.device
    build: object  # () -> fresh base model (identical weights each call)
    targets: tuple[str, ...]
    randlora_rank: int
    batches: list  # [(inputs dict, labels)]
    autocast: bool = False
    info: dict | None = None


def minilm_case(steps: int, seed: int = 0, batch_size: int = 32) -> Case:
    from adapters.data import load_dataset
    from adapters.models import get_model
    from adapters.train import batch_indices

    entry = get_model("minilm")
    data = load_dataset("wordnet", seed=seed)
    encoded = entry.encode(data.train.inputs)
    labels = data.train.labels
    stream = batch_indices(len(labels), batch_size, seed, encoded.lengths)
    batches = []
    for _ in range(steps):
        index = next(stream)
        batches.append((encoded.batch(index), labels[index]))
    tokens = [int(b[0]["attention_mask"].numel()) for b in batches]
    return Case(
        name="minilm-wordnet",
        device=torch.device("cpu"),
        build=lambda: entry.build(len(data.classes)),
        targets=entry.targets,
        randlora_rank=entry.defaults["randlora_rank"],
        batches=batches,
        info={"batch_size": batch_size, "mean_tokens_per_step": statistics.mean(tokens), "classes": len(data.classes)},
    )


def vit_case(steps: int, device: torch.device, batch_size: int = 128) -> Case:
    from transformers import ViTConfig, ViTModel

    from adapters.models.base import Classifier

    class ViTClassifier(Classifier):
        def features(self, pixel_values):
            return self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0]

    config = ViTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
        patch_size=32,
    )  # fmt: skip

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ViTClassifier(ViTModel(config, add_pooling_layer=False), 768, 100)

    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            {"pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator)},
            torch.randint(0, 100, (batch_size,), generator=generator),
        )
        for _ in range(steps)
    ]
    targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    return Case(
        name="vit-b32-sized",
        device=device,
        build=build,
        targets=targets,
        randlora_rank=6,
        batches=batches,
        autocast=True,
        info={"batch_size": batch_size, "tokens_per_step": batch_size * 50, "note": "random init, random data"},
    )


# --------------------------------------------------------------------------- running


def build_variant(case: Case, variant: str, lora_rank: int):
    from adapters.methods import MethodSpec, attach

    model = case.build()
    if variant == "lora":
        spec = MethodSpec("lora", rank=lora_rank)
    else:
        spec = MethodSpec("randlora", rank=case.randlora_rank)
    model = attach(model, spec, case.targets, fast_randlora=variant == "randlora_ours")
    return model.to(case.device).train()


class Stepper:
    def __init__(self, model, case: Case):
        from adapters.train import TrainConfig, make_optimizer

        self.model, self.case = model, case
        self.optimizer = make_optimizer(model, TrainConfig())
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.i = 0

    def step(self) -> tuple[float, float]:
        case = self.case
        inputs, labels = case.batches[self.i % len(case.batches)]
        self.i += 1
        inputs = {k: v.to(case.device) for k, v in inputs.items()}
        labels = labels.to(case.device)
        if case.device.type == "cuda":
            torch.cuda.synchronize(case.device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast(case.device.type, dtype=torch.bfloat16, enabled=case.autocast):
            logits = self.model(**inputs)
        loss = OBJECTIVES["classification"].loss(logits, labels)  # the training loss adapters.train uses
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        if case.device.type == "cuda":
            torch.cuda.synchronize(case.device)
        return time.perf_counter() - start, time.process_time() - cpu


def adapter_bytes(model, compact: bool = False) -> int:
    from adapters.methods.randlora_saving import save_compact

    with tempfile.TemporaryDirectory() as folder:
        save_compact(model, folder) if compact else model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def run_case(case: Case, warmup: int, timed: int, log=print) -> dict:
    from adapters.methods import match_lora_rank, target_shapes
    from adapters.methods.randlora import last_choices

    shapes = target_shapes(case.build(), case.targets)
    lora_rank = match_lora_rank(shapes, case.randlora_rank)
    result = {"name": case.name, "device": str(case.device), "randlora_rank": case.randlora_rank}
    result["lora_rank"] = lora_rank
    result["adapted_layers"] = len(shapes)
    result.update(case.info or {})
    steppers = {}
    for variant in VARIANTS:  # build + warm-up one at a time: peak memory of each alone
        model = build_variant(case, variant, lora_rank)
        stepper = Stepper(model, case)
        memory = PeakMemory(case.device)
        with memory:
            for _ in range(warmup):
                stepper.step()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and f".{HEAD}." in f".{n}")
        entry = {
            "trainable_params": trainable,
            "adapter_params": trainable - head,
            "peak_mem_bytes": int(memory.peak),
            "peak_mem_method": memory.method,
            "adapter_bytes": adapter_bytes(model),
        }
        if variant == "randlora_ours":  # what this tool saves: no bases, their checksum (save_compact)
            entry["adapter_bytes_peft_format"] = entry["adapter_bytes"]
            entry["adapter_bytes"] = entry["adapter_bytes_compact"] = adapter_bytes(model, compact=True)
            choices = list(last_choices(model).values())
            entry["paths"] = {p: choices.count(p) for p in ("factored", "materialized")}
        result[variant] = entry
        steppers[variant] = stepper
        log(f"  {case.name} {variant}: built, warm, peak {memory.peak / 2**20:.1f} MiB")
    times = {v: [] for v in VARIANTS}
    for _ in range(timed):  # interleaved: the same background load for all three
        for variant in VARIANTS:
            times[variant].append(steppers[variant].step())
    for variant in VARIANTS:
        wall, cpu = zip(*times[variant], strict=True)
        result[variant]["step_s"] = statistics.median(wall)
        result[variant]["step_cpu_s"] = statistics.median(cpu)  # process CPU time: robust to other load
        result[variant]["step_s_all"] = list(wall)
    tokens = result.get("mean_tokens_per_step") or result.get("tokens_per_step")
    if tokens:
        result["flop_model"] = flop_model(shapes, case.randlora_rank, lora_rank, float(tokens))
    lora, peft, ours = (result[v] for v in VARIANTS)
    result["ratios"] = {
        "ours_step_over_lora": ours["step_s"] / lora["step_s"],
        "peft_step_over_ours": peft["step_s"] / ours["step_s"],
        "peft_step_over_lora": peft["step_s"] / lora["step_s"],
        "ours_cpu_over_lora": ours["step_cpu_s"] / lora["step_cpu_s"],
        "peft_cpu_over_ours": peft["step_cpu_s"] / ours["step_cpu_s"],
        "ours_mem_over_lora": ours["peak_mem_bytes"] / max(1, lora["peak_mem_bytes"]),
        "peft_mem_over_lora": peft["peak_mem_bytes"] / max(1, lora["peak_mem_bytes"]),
        "ours_adapter_over_lora": ours["adapter_bytes"] / lora["adapter_bytes"],
    }
    return result


def flop_model(shapes, randlora_rank: int, lora_rank: int, tokens: float) -> dict:
    """Multiply-adds per step of the adapted layers alone, and the speed ratios they allow.

    Per layer (out, in) and T tokens: the frozen layer's forward and input gradient (2·T·in·out,
    common to all), plus LoRA's 3·T·r·(in + out) (forward, input and factor gradients), peft's
    factored RandLoRA and our per-layer choice (:func:`adapters.methods.randlora.path_costs`).
    Everything outside the adapted layers (attention scores, norms, the optimizer) is common to
    the three variants, so the whole-step ratios lie between 1 and these.
    """
    import math

    from adapters.methods.randlora import path_costs

    base = lora = peft = ours = 0.0
    for out, inp in shapes:
        n_bases = math.ceil(min(out, inp) / randlora_rank)
        factored, materialized = path_costs(inp, out, randlora_rank, n_bases, round(tokens), training=True)
        base += 2 * tokens * inp * out
        lora += 3 * tokens * lora_rank * (inp + out)
        peft += factored
        ours += min(factored, materialized)
    return {
        "tokens_per_step": tokens,
        "peft_over_ours_max": (base + peft) / (base + ours),
        "ours_over_lora_min": (base + ours) / (base + lora),
        "note": "adapted-layer multiply-adds only; whole-step ratios lie between 1 and these",
    }


def targets_met(ratios: dict) -> dict:
    return {
        "ours_step_le_1.3x_lora": ratios["ours_step_over_lora"] <= 1.3,
        "ours_ge_1.3x_faster_than_peft": ratios["peft_step_over_ours"] >= 1.3,
        "ours_mem_le_1.1x_lora": ratios["ours_mem_over_lora"] <= 1.1,
        "ours_adapter_le_2x_lora": ratios["ours_adapter_over_lora"] <= 2.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.training", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="5 warm-up + 15 timed steps (default 10 + 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, max 8)")
    parser.add_argument("--skip-gpu", action="store_true", help="do not run the GPU case even when CUDA is present")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32], help="MiniLM batch sizes, one case each (default: 32)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads.configure(args.threads)
    warmup, timed = (5, 15) if args.quick else (10, 40)
    started = time.perf_counter()
    cases = [minilm_case(warmup + timed, batch_size=b) for b in args.batch_sizes]
    for case, b in zip(cases, args.batch_sizes, strict=True):
        if b != 32:
            case.name = f"minilm-wordnet-b{b}"
    if torch.cuda.is_available() and not args.skip_gpu:
        cases.append(vit_case(warmup + timed, torch.device("cuda")))
    results = []
    for case in cases:
        print(f"{case.name}: {warmup} warm-up + {timed} timed steps", file=sys.stderr)
        try:
            result = run_case(case, warmup, timed, log=lambda s: print(s, file=sys.stderr))
        except Exception as e:  # report, keep the other cases
            results.append({"name": case.name, "error": f"{type(e).__name__}: {e}"})
            continue
        result["targets_met"] = targets_met(result["ratios"])
        results.append(result)
        del case
        gc.collect()
    out = {
        "benchmark": "training",
        "quick": args.quick,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "python": platform.python_version(),
        "wall_s": time.perf_counter() - started,
        "cases": results,
    }
    for r in results:
        if "error" in r:
            print(f"{r['name']}: ERROR {r['error']}")
            continue
        print(f"{r['name']} (RandLoRA r={r['randlora_rank']}, LoRA r={r['lora_rank']})")
        for v in VARIANTS:
            e = r[v]
            print(
                f"  {v:14s} params {e['trainable_params']:>9,d}  step {e['step_s'] * 1e3:7.1f} ms  "
                f"peak {e['peak_mem_bytes'] / 2**20:7.1f} MiB  adapter {e['adapter_bytes'] / 2**20:7.2f} MiB"
            )
        print("  " + "  ".join(f"{k}={v:.2f}" for k, v in r["ratios"].items()))
        print("  targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["targets_met"].items()))
        if "flop_model" in r:
            fm = r["flop_model"]
            print(f"  FLOP model at {fm['tokens_per_step']:.0f} tokens/step (adapted layers): peft/ours <= "
                  f"{fm['peft_over_ours_max']:.2f}, ours/LoRA >= {fm['ours_over_lora_min']:.2f}")  # fmt: skip
    if args.json:
        from adapters.io import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
