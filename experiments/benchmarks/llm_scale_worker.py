"""One case of :mod:`experiments.benchmarks.llm_scale` in its own fresh process: :func:`worker` loads the base,
reads the runtime's RSS, runs one stage and returns its readings (peak RSS above the loaded base, the bytes the
stage holds, one batch's activations, tokens/s against the plain transformers loop). The module docstring of
:mod:`experiments.benchmarks.llm_scale` defines each reading.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import re
import resource
import tempfile
import time
from pathlib import Path

import torch

from experiments.benchmarks.llm_scale_cases import (
    EVAL_STAGES,
    FACTOR,
    RANKS,
    SOURCE_STAGES,
    TARGETS,
    WARMED,
    examples,
)
from experiments.benchmarks.memory import reset_peak, status_bytes, trim

ROUNDS = 3  # rounds of the throughput timing: the plain loop, then the stage's evaluation again


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

    return _bases_bytes(load_adapter(Path(solution.path), solution.base, quiet=True))


def _bases_bytes(model: torch.nn.Module) -> int:
    """Bytes of the RandLoRA (or VeRA) random bases a peft model holds, each shared storage once."""
    seen: dict[int, int] = {}
    for name, b in model.named_buffers():
        if re.search(r"(^|\.)(randlora|vera)_[AB](\.|$)", name):
            seen[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    return sum(seen.values())


def _bases_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes of the fast RandLoRA forward's converted bases (:class:`adapters.methods.randlora.SharedBases`), each
    cache once: held for the whole run like the bases, beside the graph a step builds."""
    from adapters.methods.randlora import randlora_layers

    states = [m.__dict__.get("_fast_randlora") for m in randlora_layers(model).values()]
    caches = {id(state.shared): state.shared for state in states if state is not None}
    return sum(cache.nbytes() for cache in caches.values())


def _tokens(ids) -> int:
    return sum(len(p) + len(c) for p, cands in ids for c in cands)


def worker(case: Path, dtype: str, source: str, stage: str, samples: int, prompt_len: int) -> dict:
    """One stage of one case (module docstring); its readings."""
    import peft  # noqa: F401  (code before the baseline)
    import transformers  # noqa: F401

    import adapters.deltas  # noqa: F401
    import experiments.benchmarks.plain_lm  # noqa: F401
    import landscape.engine.factored  # noqa: F401
    from adapters.objectives import OBJECTIVES
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
    inputs = (data, labels, eval_set, objective)
    first_call = _first_call(stage, model, case, source, inputs, reset) if stage in WARMED else None
    trim()
    rss_base = status_bytes("VmRSS")
    reset_peak()
    start = time.perf_counter()
    extra: dict = {} if first_call is None else {"first_call_peak_above_base_bytes": first_call}

    def restart_peak(name: str) -> None:  # a phase's peak above the base, recorded; the counter restarts
        if reset:
            extra[name] = status_bytes("VmHWM") - rss_base
            reset_peak()

    held = _run_stage(stage, model, case, source, inputs, extra, restart_peak)
    held = model_bytes if held is None else held
    seconds = time.perf_counter() - start
    peak = (status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - rss_base
    if stage in SOURCE_STAGES:  # after the peak is read: the bases the stage held besides its factors
        extra["shared_bases_bytes"] = _shared_bases_bytes(_solutions(case, source, model)["randlora"])
    again = extra.pop("again", None)
    out.update(extra)
    out.update({"peak_rss_above_base_bytes": peak, "held_bytes": held, "ratio": peak / held if held else None,
                "activation_bytes": activation, "seconds": round(seconds, 3)})  # fmt: skip
    if stage in EVAL_STAGES:
        out.update(_throughput(model, ids, extra.get("points", 1), extra.get("eval_seconds", seconds), again))
    return out


def _first_call(stage: str, model, case: Path, source: str, inputs: tuple, reset: bool) -> int | None:
    """Runs the stage once, unmeasured but for its peak, and frees it: a process's first training step or
    first bf16 grid initialises runtime state once (kernels' workspaces, autocast's and oneDNN's caches:
    36 MB in a bf16 LoRA step whatever the model's size, measured as three runs of the stage in one process,
    the second and third agreeing; a bf16 curve's first call at hidden 512 peaks 69 MB above its second), so the
    stage measured is its second call, as the load's is. Its peak above
    the base is returned (reported as ``first_call_peak_above_base_bytes``)."""
    trim()
    before = status_bytes("VmRSS")
    reset_peak()
    _run_stage(stage, model, case, source, inputs, {})
    peak = status_bytes("VmHWM") - before if reset else None
    gc.collect()  # the trainable copy, the optimizer and the chart hold reference cycles
    return peak


def _throughput(model, ids, points: int, seconds: float, again) -> dict:
    """Tokens/s of the stage's evaluation and of the plain loop, side by side: :data:`ROUNDS` rounds, each the
    plain loop then the evaluation again (``again()``: its seconds), the best of each (the machine is shared:
    the best round is the one least slowed by the other jobs)."""
    from experiments.benchmarks.plain_lm import plain_loop

    grid, plain = [seconds], []
    for k in range(ROUNDS):
        _, plain_tokens, plain_s = plain_loop(model.backbone, ids, batch_size=8)
        plain.append(plain_s)
        if again is not None and k < ROUNDS - 1:
            grid.append(again())
    tokens = _tokens(ids)
    return {"tokens_per_s": tokens * points / min(grid), "plain_tokens_per_s": tokens / min(plain),
            "plain_padded_tokens": plain_tokens, "eval_rounds": [round(s, 3) for s in grid],
            "plain_rounds": [round(s, 3) for s in plain]}  # fmt: skip


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


def _run_stage(
    stage: str, model, case: Path, source: str, inputs: tuple, extra: dict, restart_peak=lambda name: None
) -> int | None:
    """The stage's work on the loaded model; the bytes it holds besides the base (None: the model's own)."""
    import numpy as np

    from adapters.objectives import score

    data, labels, eval_set, objective = inputs
    if stage == "head_only":

        def again() -> float:
            start = time.perf_counter()
            score(lambda batch: model(**batch), eval_set.batches, eval_set.n, objective)
            return time.perf_counter() - start

        extra.update(eval_seconds=again(), again=again)
        return None
    if stage.startswith("train_"):
        return _train_stage(model, stage.removeprefix("train_"), data, labels, objective, extra, restart_peak)
    if stage.startswith("curves"):
        return _curves_stage(model, _solutions(case, source, model), inputs, extra, stage == "curves_checkpointed")
    if stage in ("plane", "paths", "curvature", "spectrum"):
        return _solution_stage(stage, model, _solutions(case, source, model), eval_set, objective, extra, np)
    if stage == "checkpoint":
        with tempfile.TemporaryDirectory(dir=case) as tmp:
            from adapters.io import write_torch

            write_torch(Path(tmp) / "checkpoint.pt", {"model": model.state_dict(), "step": 0})
        return None
    raise ValueError(stage)


def _train_stage(model, method: str, data, labels, objective, extra: dict, restart_peak) -> int:
    """2 steps of the toolkit's training on the model attach() makes (a skeleton for an adapter); held bytes.

    The peak of attach() alone is ``attach_peak_above_base_bytes`` and the stage's peak is the training's: peft
    makes RandLoRA's shared bases once, through bf16 pieces, a concatenation and a normalised copy (about twice the
    bases' bytes at once), a one-time cost that scales as the bases, not a training step's graph."""
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
    restart_peak("attach_peak_above_base_bytes")
    storage = next(p.dtype for p in model.parameters() if p.is_floating_point())
    autocast = "bfloat16" if storage == torch.bfloat16 else "none"
    config = TrainConfig(steps=2, batch_size=4, lr=1e-4, autocast=autocast)
    with _saved_graph(trainable) as graph:
        history = train(trainable, data, labels, config, "cpu", progress=False, objective=objective)
    extra["saved_graph_bytes"] = graph["max"]
    extra["train_loss"] = history["train_loss"]
    params = [p for p in trainable.parameters() if p.requires_grad]
    extra["trainable_params"] = sum(p.numel() for p in params)
    if method == "randlora":
        extra["shared_bases_bytes"] = _bases_bytes(trainable)
        extra["bases_cache_bytes"] = _bases_cache_bytes(trainable)
    # a full-size update once in the model's dtype; adapters by their factors (fp32)
    return _model_bytes(model) if method == "ft" else sum(p.numel() * 4 for p in params)


@contextlib.contextmanager
def _saved_graph(model: torch.nn.Module):
    """The most bytes autograd saved for one backward: per forward of ``model`` (and the loss after it, until the
    next forward), the storages packed by ``saved_tensors_hooks`` that are no parameter or buffer of the model,
    each once; yields {"max": bytes}, final on exit. The activations a training step's graph holds, counted, not
    estimated from a forward's peak."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    current: dict[int, int] = {}
    result = {"max": 0}

    def close(*_) -> None:
        result["max"] = max(result["max"], sum(current.values()))
        current.clear()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            current[storage.data_ptr()] = storage.nbytes()
        return t

    hook = model.register_forward_pre_hook(close)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        hook.remove()
        close()


def _solutions_bytes(model, solutions: dict) -> int:
    """What the analyses hold of the solutions: FT's ΔW once in the model's dtype (a 4-bit base: fp32 of its
    logical shape) and the adapters' factors."""
    ft_bytes = _model_bytes(model)
    if any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
        ft_bytes = sum(math.prod(p.quant_state.shape) * 4 if getattr(p, "quant_state", None) is not None
                       else p.numel() * p.element_size() for p in model.parameters())  # fmt: skip
    return ft_bytes + sum(_factor_bytes(solutions[s]) for s in ("lora", "randlora"))


def _curves_stage(model, solutions: dict, inputs: tuple, extra: dict, checkpointing: bool) -> int:
    """The curve between FT and RandLoRA (one bend, quadratic Bézier: :func:`landscape.curves.pair_curve`), 2 steps
    of its training (:func:`landscape.curves.train_curve`, batch 4; ``checkpointing``: with gradient checkpointing,
    the seed's recipe) and 3 points of its evaluation; held bytes: the solutions (as the paths') + the bend, its
    gradient and AdamW's two moments (fp32), the issue's allowance."""
    from adapters.train import TrainConfig
    from landscape import curves

    data, labels, eval_set, objective = inputs
    curve = curves.pair_curve(model, solutions, ("ft", "randlora"), 1, "bezier")
    storage = next(p.dtype for p in model.parameters() if p.is_floating_point())
    autocast = "bfloat16" if storage == torch.bfloat16 else "none"
    config = TrainConfig(steps=2, batch_size=4, lr=1e-4, head_lr=1e-4, weight_decay=0.0, autocast=autocast,
                         grad_checkpointing=checkpointing)  # fmt: skip
    history = curves.train_curve(curve, model, data, labels, config, "cpu", objective, progress=False)
    result = curves.evaluate_curve(curve, model, eval_set, "cpu", points=3, objective=objective, progress=False)
    state = 4 * curve.bends.numel() * 4
    extra.update(train_loss=history["train_loss"], curve_loss=result["loss"][0].tolist(), curve_state_bytes=state,
                 solutions_bytes=_solutions_bytes(model, solutions))  # fmt: skip
    return extra["solutions_bytes"] + state


def _solution_stage(stage: str, model, solutions: dict, eval_set, objective, extra: dict, np) -> int:
    """plane (+ 2 × 2 grid), paths, curvature (RandLoRA, adapter coordinates) or spectrum; held bytes."""
    from landscape.engine import factored
    from landscape.engine.grid import run_grid

    held = _solutions_bytes(model, solutions)
    if stage == "plane":
        deltas = {s: sol.module_deltas(check=False) for s, sol in solutions.items()}
        chart = factored.build_chart("paper", model, deltas)
        evaluator = factored.FactoredEvaluator(model, chart, eval_set, "cpu", objective=objective)
        axes = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
        result = run_grid(evaluator, *axes, progress=False)
        extra.update(points=4, eval_seconds=float(result["seconds"]), loss=np.asarray(result["loss"]).tolist(),
                     again=lambda: float(run_grid(evaluator, *axes, progress=False)["seconds"]))  # fmt: skip
        return held
    if stage == "paths":
        from landscape.paths import compute_paths

        result = compute_paths(model, solutions, eval_set, "cpu", points=3, progress=False, objective=objective,
                               storage="factored")  # fmt: skip
        extra["barriers"] = {k: v.get("barrier") for k, v in result["barriers"].items()}
        return held
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
