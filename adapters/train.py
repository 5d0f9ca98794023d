"""The training loop: AdamW, cosine schedule without warm-up, gradient clipping, a seed.

Small and direct on purpose. Batches are drawn from a seeded permutation of the
pre-encoded training set (one per epoch), so a run is a pure function of its config.
The classification head has its own learning rate: it starts at zero and must move
quickly even when the backbone moves slowly (full fine-tuning at 1e-5..1e-4).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adapters import distributed, heap
from adapters import fsdp as sharding
from adapters.data.base import Dataset
from adapters.errors import UserError
from adapters.io import key_digest, torch_file_damage, write_torch
from adapters.methods import MethodSpec
from adapters.models.base import HEAD, Encoded, ModelEntry
from adapters.objectives import OBJECTIVES, Classification, score
from adapters.progress import progress_bar
from adapters.upcast import computes_in_fp32


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 32
    lr: float = 1e-3  # learning rate of the method's own parameters
    head_lr: float = 3e-3  # learning rate of the classification head
    weight_decay: float = 0.01  # AdamW, decoupled
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0
    eval_batch_size: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is the effective batch)
    # "bfloat16" / "float16": forward and loss under autocast to that dtype (weights and optimizer fp32; a model
    # stored in half precision needs its storage dtype here); "float16" also scales the loss (GradScaler)
    autocast: str = "none"
    augment: bool = False  # apply the model's training augmentation (per step, seeded)
    grad_checkpointing: bool = False  # recompute activations in the backward (models that support it)
    generate_eval: bool = False  # causal LMs: also the paper's generation accuracy on the test split (slow)
    # causal LMs: evaluation batches in padded candidate tokens (None: the device's default); batching only,
    # so not part of the training key (to_dict)
    eval_tokens: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("eval_tokens")
        return d


AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.float16, torch.bfloat16)


def autocast_context(device: torch.device | str, autocast: str):
    """``torch.autocast`` to ``autocast`` ("bfloat16", "float16"), or nothing for "none"."""
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)}, not {autocast!r}")
    dtype = AUTOCAST[autocast]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def storage_dtype(model: nn.Module) -> str:
    """The half-precision dtype the model's floating weights are stored in ("float32" when none is half).
    peft already keeps LoRA/RandLoRA factors in fp32 on a half base, so the frozen weights decide."""
    half = {p.dtype for p in model.parameters() if p.dtype in HALF}
    if len(half) > 1:
        raise ValueError(f"the model mixes {sorted(map(str, half))}: load it in one dtype")
    return str(half.pop()).removeprefix("torch.") if half else "float32"


def fp32_masters(trainable: dict[str, nn.Parameter]) -> None:
    """Cast the half-precision trainable parameters to fp32 in place (the master weights).

    Why: AdamW updating bf16 weights directly loses the update. At lr 1e-5 a step moves a weight by ~1e-5,
    while bf16 (8 significant bits) spaces the numbers near a typical weight |w| ~ 0.02 by 2^-6 · 2^-7 ≈ 1.2e-4:
    the step is below half the spacing and rounds away, so a bf16 run moved about a third as far as an fp32 one
    (tests/test_half.py). With fp32 masters the optimizer state and updates are fp32; the forward runs under
    autocast to the storage dtype, so the compute costs what it did. In fp16 the optimizer's eps (1e-8) is 0
    and small gradients underflow: fp32 state, plus a loss scaler for the gradients. An equivalent design
    (half weights + a separate fp32 copy in the optimizer) holds both copies; casting in place holds one, and
    the trained solution is then saved in fp32 (ΔW = θ_FT(fp32) − W0). The frozen weights keep their storage
    dtype (no memory cost for what does not train).
    """
    for p in trainable.values():
        if p.dtype in HALF:
            p.data = p.data.float()


def batch_indices(
    n: int, batch_size: int, seed: int, lengths: torch.Tensor | None = None, group: int = 16
) -> Iterator[torch.Tensor]:
    """Endless stream of batches: a fresh seeded permutation each epoch, last partial batch dropped.

    With ``lengths`` (text), each run of ``group`` batches of the permutation is sorted by
    length before being cut into batches, and the batches are then shuffled: batches hold
    similar lengths, so padding (trimmed per batch) costs little, as in HF's group_by_length.
    """
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    while True:
        order = torch.randperm(n, generator=generator)[: per_epoch * batch_size]
        if lengths is not None:
            chunks = []
            for start in range(0, len(order), group * batch_size):
                chunk = order[start : start + group * batch_size]
                chunks.append(chunk[torch.argsort(lengths[chunk], stable=True)])
            order = torch.cat(chunks)
        batches = order.view(per_epoch, batch_size)
        for i in torch.randperm(per_epoch, generator=generator):
            yield batches[i]


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # peft wraps the head as `...head.modules_to_save.default.*`
            is_head = name.startswith(HEAD + ".") or f".{HEAD}." in name
            (head if is_head else rest).append(p)
    groups = [{"params": rest, "lr": config.lr}] if rest else []
    return groups + ([{"params": head, "lr": config.head_lr}] if head else [])


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config)
    try:  # the fused kernel is ~7x faster than the per-tensor loop on CPU, same maths
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def train(
    model: nn.Module,
    data: Encoded,
    labels: torch.Tensor,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    augment: Callable | None = None,
    checkpoint_key: str = "",
    objective: Classification = OBJECTIVES["classification"],
    fsdp: bool = False,
) -> dict:
    """Train in place; returns a small history (loss every step, wall time).

    With ``checkpoint``, the trainable parameters, optimizer, schedule, RNG state and step are
    written atomically every ``checkpoint_every`` steps; calling ``train`` again with the same
    arguments after a crash (or SIGKILL) resumes there and ends with the same weights as an
    uninterrupted run (on CPU, bit-exact). A checkpoint is resumed only when it records the same
    ``checkpoint_key`` (the caller's key of everything that changes the result) and config. The file is
    kept when training ends: the caller removes it once the trained solution is safely saved.

    ``augment(inputs, generator)`` (used when ``config.augment``) transforms each batch on the
    device; its generator is seeded by (seed, step), so augmentation survives a resume exactly.
    ``config.grad_accum`` splits each rank's batch into that many micro-batches whose summed
    losses give the same gradient as the whole batch at once. With ``fsdp`` (under torchrun) the model is
    sharded with FSDP2 (:mod:`adapters.fsdp`) and ``checkpoint`` is a sharded checkpoint folder.
    """
    if config.augment and augment is None:
        raise ValueError("config.augment is set but no augment function was given")
    if config.grad_accum < 1 or config.batch_size % config.grad_accum:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum {config.grad_accum}")
    torch.manual_seed(config.seed)
    if config.grad_checkpointing and hasattr(_unwrap(model), "set_grad_checkpointing"):
        _unwrap(model).set_grad_checkpointing(True)
    model.to(device).train()
    rank, world = distributed.rank_world()
    # Under torchrun every rank draws the same global batch and computes on its slice
    # index[rank::world]; DDP averages the gradients, which equals the gradient of the global
    # mean loss when the slices are equal (global batch divisible by the world size).
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    config, scaler, precision = _mixed_precision(model, trainable, config, device)
    forward, trainable = _wrap(model, config, fsdp, world)
    optimizer = make_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
    )
    first, losses, ident = 0, [], {"key": checkpoint_key, "config": repr(config.to_dict())}
    if fsdp and checkpoint is not None:  # collective: every rank reads its shards
        first, losses = sharding.resume_training(Path(checkpoint), model, optimizer, schedule, ident)
    elif checkpoint is not None and Path(checkpoint).exists():
        first, losses = _resume(Path(checkpoint), trainable, optimizer, schedule, config, checkpoint_key, scaler)
    start = time.perf_counter()
    batches = batch_indices(len(labels), min(config.batch_size, len(labels)), config.seed, data.lengths)
    for _ in range(first):  # the batch stream is a pure function of the seed: skip what was done
        next(batches)
    bar = progress_bar(range(first, config.steps), desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    with heap.keeping(model, device):
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            index = next(batches)[rank::world]
            loss = _backward(forward, data, labels, index, step, config, device, augment, objective, scaler)
            _step(optimizer, schedule, scaler, list(trainable.values()), config.grad_clip)
            losses.append(distributed.global_mean(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            # Also after the last step: the trained weights survive a kill before the caller has saved them.
            due = checkpoint is not None and (done % checkpoint_every == 0 or done == config.steps)
            if due and fsdp:  # collective: every rank writes its shards
                sharding.save_training(Path(checkpoint), done, losses, model, optimizer, schedule, ident)
            elif due and rank == 0:
                _save_checkpoint(
                    Path(checkpoint), done, losses, trainable, optimizer, schedule, config, checkpoint_key, scaler
                )
    model.eval()
    return {"train_loss": losses, "train_seconds": time.perf_counter() - start, "resumed_at_step": first,
            "precision": precision}  # fmt: skip


def _mixed_precision(
    model: nn.Module, trainable: dict[str, nn.Parameter], config: TrainConfig, device
) -> tuple[TrainConfig, torch.amp.GradScaler | None, dict]:
    """fp32 master copies of the trainable parameters (in place); the config with the forward's autocast (half
    weights: a mixed forward), the loss scaler fp16 needs (None otherwise), and the precision record."""
    # a model sharded by adapters.fsdp.sharded_copy holds fp32 shards already: its base's dtype is the record's
    held = storage_dtype(model)
    storage = getattr(model, "base_storage_dtype", None) or held
    fp32_masters(trainable)  # before the optimizer and DDP see the parameters
    if held != "float32" and config.autocast == "none" and not computes_in_fp32(model):
        # fp32 masters beside half weights that multiply as they are stored: a mixed forward needs autocast
        # (a transformers model widens its half weights itself, adapters.upcast: fp32 compute, no autocast)
        config = dataclasses.replace(config, autocast=held)
    # fp16's 5 exponent bits underflow small gradients: scale the loss, unscale before clipping, skip inf steps
    scaler = torch.amp.GradScaler(torch.device(device).type) if config.autocast == "float16" else None
    precision = {"storage_dtype": storage, "master_weights": "float32", "autocast": config.autocast,
                 "compute_dtype": "float32" if config.autocast == "none" else config.autocast,
                 "loss_scaling": scaler is not None}  # fmt: skip
    return config, scaler, precision


def _step(optimizer, schedule, scaler, params: list[nn.Parameter], grad_clip: float) -> None:
    """Clip the gradients, step the optimizer and the schedule (with loss scaling: on the unscaled gradients,
    and a step the scaler skips does not spend the schedule)."""
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
    else:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when a gradient is inf/nan
        scaler.update()
        if scaler.get_scale() >= scale:  # the scale drops exactly when the step was skipped
            schedule.step()  # a skipped step must not spend the schedule


def _backward(
    forward, data: Encoded, labels, index, step: int, config: TrainConfig, device, augment, objective, scaler=None
):
    """Gradients of one step's batch (``index``), in ``config.grad_accum`` micro-batches whose summed
    losses give the whole batch's mean (scaled by ``scaler`` when given); returns the batch's loss (detached)."""
    world = distributed.rank_world()[1]
    micro = index.chunk(config.grad_accum) if config.grad_accum > 1 else (index,)
    loss = torch.zeros((), device=device)
    for k, part in enumerate(micro):
        inputs = {key: v.to(device) for key, v in data.batch(part).items()}
        inputs, target = objective.training_view(inputs, labels[part].to(device))
        if config.augment:
            inputs = augment(inputs, torch.Generator().manual_seed(config.seed * 1_000_003 + step * 64 + k))
        sync = k == len(micro) - 1 or world == 1
        # DDP: all-reduce once per step; FSDP2 (no no_sync) reduce-scatters each micro-batch, same sum
        with (
            contextlib.nullcontext() if sync or not hasattr(forward, "no_sync") else forward.no_sync()
        ):  # DDP: all-reduce once per step
            with autocast_context(device, config.autocast):
                outputs = forward(**inputs).float()
            if len(micro) == 1:
                part_loss = objective.loss(outputs, target)
            else:  # the sum over micro-batches is the mean over the whole batch
                part_loss = objective.loss(outputs, target, reduction="sum") / len(index)
            (part_loss if scaler is None else scaler.scale(part_loss)).backward()
        loss += part_loss.detach()
    return loss


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _as_saved(param: torch.Tensor) -> torch.Tensor:
    """``param`` as a checkpoint stores it: itself (detached, no copy: a full fine-tuning checkpoint of an 8B model
    would otherwise hold a second copy of every weight, on the GPU too, while it is written), or a compact copy
    when it views part of a larger storage, since ``torch.save`` writes a view's whole storage."""
    param = param.detach()
    if param.untyped_storage().nbytes() == param.numel() * param.element_size():
        return param
    return param.clone(memory_format=torch.contiguous_format)


def _save_checkpoint(
    path: Path, step, losses, trainable, optimizer, schedule, config: TrainConfig, key: str, scaler=None
) -> None:
    state = {
        "key": key,
        "step": step,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "config": repr(config.to_dict()),
        "params": {n: _as_saved(p) for n, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    write_torch(path, state)  # atomic: a crash or a full disk leaves the previous checkpoint intact


def _wrap(model: nn.Module, config: TrainConfig, fsdp: bool, world: int) -> tuple[nn.Module, dict]:
    """The module the steps call (sharded in place with FSDP2, DDP-wrapped under torchrun, or ``model``) and the
    trainable parameters the optimizer steps (FSDP2's are the sharded DTensors)."""
    if fsdp:
        if not distributed.active():
            raise ValueError("fsdp needs torchrun (a process group)")
        if config.autocast == "float16":  # --torch-dtype auto on a float16 checkpoint (an explicit one: config)
            raise UserError("--fsdp trains with no float16 loss scaling, and the model is float16: pass "
                            "--torch-dtype bfloat16 or float32")  # fmt: skip
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):  # sharded_copy shards on the meta device; a plain model here
            model = sharding.shard(model)  # after the fp32 masters: the shards (and AdamW's state) are fp32
    elif world > 1:
        return torch.nn.parallel.DistributedDataParallel(model), {n: p for n, p in model.named_parameters()
                                                                  if p.requires_grad}  # fmt: skip
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def _resume(
    path: Path, trainable, optimizer, schedule, config: TrainConfig, key: str, scaler=None
) -> tuple[int, list[float]]:
    try:
        damaged = torch_file_damage(path)  # torch.load reads a flipped byte as a wrong number: check the CRCs first
        if damaged:
            print(f"[train] checkpoint {path} is damaged (its record {damaged} fails its CRC-32); starting over")
            return 0, []
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means: start over
        print(f"[train] ignoring unreadable checkpoint {path} ({type(e).__name__}); starting over")
        return 0, []
    if (
        state.get("key", "") != key
        or state.get("config") != repr(config.to_dict())
        or set(state["params"]) != set(trainable)
        or any(state["params"][n].shape != p.shape for n, p in trainable.items())
    ):
        print(f"[train] checkpoint {path} is from another configuration; starting over")
        return 0, []
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), state["losses"].tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Encoded,
    labels: torch.Tensor,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    autocast: str = "none",
    objective: Classification = OBJECTIVES["classification"],
    tokens: int | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy over the whole set (batches in length order; ``autocast="bfloat16"`` or
    ``"float16"``: forward under autocast to that dtype, loss reduced in fp32). Causal-LM sets are batched by
    ``tokens`` padded candidate tokens (default: the device's, :func:`adapters.models.lm_scoring.default_eval_tokens`)
    instead of ``batch_size`` samples."""
    from adapters.models.lm_scoring import default_eval_tokens

    model.to(device).eval()
    order = data.length_order()
    if data.has_candidates:
        parts = data.token_batches(tokens or default_eval_tokens(device))
    else:
        parts = order.split(batch_size)
    batches = (({k: v.to(device) for k, v in data.batch(index).items()}, labels[index].to(device)) for index in parts)
    forward = lambda inputs: model(**inputs)  # noqa: E731
    with autocast_context(device, autocast):  # score's own bf16 switch is off: this context decides
        result = score(forward, batches, len(order), objective)[0]
    return result.loss, result.accuracy


# --------------------------------------------------------------------------- one solution, end to end


@dataclass
class Task:
    """What a solution is trained and tested on: the dataset, its model entry and base model, the
    splits encoded once for that model, and the objective."""

    dataset: Dataset
    entry: ModelEntry
    base: nn.Module
    train: Encoded
    test: Encoded
    objective: Classification = OBJECTIVES["classification"]


def checkpoint_path(folder: str | os.PathLike, key: dict) -> Path:
    """Where the training checkpoint of the solution ``folder`` with training ``key`` lives: derived from
    the key, so a run with other settings never resumes it (and never deletes it)."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}-{key_digest(key)}.ckpt")


def train_solution(
    task: Task,
    spec: MethodSpec,
    config: TrainConfig,
    key: dict,
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    progress: bool = True,
    fsdp: bool = False,
) -> None:
    """Train one solution of ``spec`` on ``task`` and save it (with its test metrics) to ``folder``.

    Checkpointed every 50 steps at :func:`checkpoint_path` (``key`` covers everything that changes
    the result), so a killed run resumes where it died; the checkpoint is removed only after the
    solution folder is saved atomically. Under torchrun all ranks train together (DDP, each on a
    slice of the global batch); rank 0 evaluates and saves. With ``fsdp`` (full fine-tuning under torchrun) the
    model is sharded with FSDP2, checkpointed as a sharded ``torch.distributed.checkpoint`` folder, and its
    trained weights consolidated to rank 0 (full fp32) before the evaluation and the save.
    """
    from adapters.deltas import skeleton
    from adapters.methods import attach, has_head

    folder = Path(folder)
    ckpt = checkpoint_path(folder, key)
    if fsdp:  # a folder of shards, apart from the one-file checkpoint of an unsharded run
        ckpt = ckpt.with_suffix(".dcp")
    nothing_to_train = spec.method == "head_only" and not has_head(task.base)
    shared = _shares_base(task.base, spec, device)
    flags = [(p, p.requires_grad) for p in task.base.parameters()]
    if nothing_to_train:  # a causal LM, CLIP (zero-shot): no head, so the baseline is the base itself, in place
        model = task.base
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)  # peft's LoRA initialises A from the global generator
            # an adapter trains beside the frozen base: its skeleton shares the base's tensors (no second copy
            # of the weights); full fine-tuning changes every weight, so it trains a copy
            if fsdp:  # built on the meta device: each rank materialises its shards only (no full copy)
                model = sharding.sharded_copy(task.base, lambda m: attach(m, spec, task.entry.targets), device)
                model.base_storage_dtype = storage_dtype(task.base)  # its shards are fp32: autocast follows the base
            else:
                model = attach(skeleton(task.base) if shared else copy.deepcopy(task.base), spec,
                               task.entry.targets)  # fmt: skip
    try:
        _train_and_save(task, spec, config, key, folder, device, progress, model, ckpt, nothing_to_train,
                        shared or nothing_to_train, fsdp)  # fmt: skip
    finally:
        for p, flag in flags:  # peft froze the shared base parameters: the base model is not ours to change
            p.requires_grad_(flag)


def _shares_base(base: nn.Module, spec, device: torch.device | str) -> bool:
    """Whether ``spec`` trains on a skeleton of ``base`` (its tensors shared): an adapter, with every tensor of
    the base already on the training device — moving a skeleton would move the shared base's tensors too."""
    from adapters.methods import ADAPTERS

    target = torch.device(device)
    on_device = all(t.device.type == target.type and (target.index is None or t.device.index == target.index)
                    for t in (*base.parameters(), *base.buffers()))  # fmt: skip
    return spec.method in ADAPTERS and on_device


def _train_and_save(task, spec, config, key, folder, device, progress, model, ckpt, nothing_to_train: bool,
                    shared: bool, fsdp: bool = False) -> None:  # fmt: skip
    """The training pass (none when there is nothing to train), test evaluation and the saved solution."""
    from adapters.methods import has_head, trainable_params
    from adapters.quant import base_quantization
    from adapters.solution import save_solution

    if nothing_to_train:
        history = {"train_loss": [], "train_seconds": 0.0}
    else:
        history = train(
            model, task.train, task.dataset.train.labels, config, device=device, desc=f"train {spec.method}",
            progress=progress and distributed.is_lead(), checkpoint=ckpt, checkpoint_every=50,
            augment=task.entry.augment, checkpoint_key=key_digest(key), objective=task.objective, fsdp=fsdp,
        )  # fmt: skip
    if fsdp:
        model = _consolidated(model, task, spec)
    if not distributed.is_lead():
        return
    test_loss, test_acc = evaluate(
        model, task.test, task.dataset.test.labels, config.eval_batch_size, device, config.autocast, task.objective,
        tokens=config.eval_tokens,
    )  # fmt: skip
    if config.generate_eval and task.objective.name == "answer":
        from adapters.models.hf import generate_accuracy

        generated = generate_accuracy(_unwrap(model), task.entry, task.dataset.test.inputs, config.eval_batch_size)
        print(f"[train {spec.method}] generation accuracy {generated['accuracy']:.4f} (beam 4)", file=sys.stderr)
    n_train = 0 if nothing_to_train else trainable_params(model)
    head = sum(p.numel() for p in task.base.task_head.parameters()) if has_head(task.base) else 0
    print(
        f"[train {spec.method}] test accuracy {test_acc:.4f}, loss {test_loss:.4f}, {n_train:,} trainable"
        + (f" ({n_train - head:,} adapter + {head:,} head)" if spec.method in ("lora", "randlora") and head else ""),
        file=sys.stderr,
    )
    info = {
        "name": spec.method,
        "method": spec.method,
        "model": task.entry.name,
        "model_options": key.get("model_options"),
        "dataset": task.dataset.name,
        "modality": task.dataset.modality,
        "num_classes": len(task.dataset.classes),
        "classes": task.dataset.classes,
        "rank": spec.rank,
        "seed": spec.seed,
        "trainable_params": n_train,
        "adapter_params": n_train - head if spec.method in ("lora", "randlora") else None,
        "targets": list(task.entry.targets),
        "base_fingerprint": key.get("base_fingerprint"),
        "base_quantization": base_quantization(task.base),  # checked when the solution is loaded onto a base
        "train_key": key,
        # storage dtype of the model, fp32 master weights, autocast dtype, loss scaling: how it was trained
        "precision": history.get("precision"),
    }
    losses = history["train_loss"]
    metrics = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_seconds": history["train_seconds"],
        "final_train_loss": float(sum(losses[-20:]) / len(losses[-20:])) if losses else None,
        "steps": len(losses),
        **({"generate_accuracy": generated} if config.generate_eval and task.objective.name == "answer" else {}),
    }
    # a model sharing the base's tensors is not moved (that would move the base): the writers copy to the host
    save_solution(folder, model if shared else model.cpu(), info, metrics)
    # only now: a kill before the save resumes from the checkpoint
    if fsdp:
        shutil.rmtree(ckpt, ignore_errors=True)
    else:
        ckpt.unlink(missing_ok=True)


def _consolidated(model: nn.Module, task: Task, spec) -> nn.Module | None:
    """The FSDP-sharded ``model``'s trained weights in an unsharded fp32 copy on rank 0's CPU (None on the other
    ranks), which rank 0 evaluates and saves as any other solution. Collective."""
    from adapters import fsdp
    from adapters.methods import attach

    state = fsdp.full_state_dict(model)
    if not distributed.is_lead():
        return None
    plain = attach(copy.deepcopy(task.base), spec, task.entry.targets).cpu()
    trainable = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    if set(trainable) != set(state):
        raise RuntimeError(f"FSDP consolidation: {len(state)} gathered tensors for {len(trainable)} parameters")
    fp32_masters(trainable)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state[name])
    world = distributed.rank_world()[1]
    print(f"[train {spec.method}] FSDP2: {len(state)} fp32 tensors consolidated from {world} shards", file=sys.stderr)
    return plain.eval()
