"""The training loop: AdamW, cosine schedule without warm-up, gradient clipping, a seed.

Small and direct on purpose. Batches are drawn from a seeded permutation of the
pre-encoded training set (one per epoch), so a run is a pure function of its config.
The classification head has its own learning rate: it starts at zero and must move
quickly even when the backbone moves slowly (full fine-tuning at 1e-5..1e-4).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapters.models.base import HEAD, Encoded


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
    autocast: str = "none"  # "bfloat16": bf16 autocast for forward and loss (weights and optimizer fp32)
    augment: bool = False  # apply the model's training augmentation (per step, seeded)
    grad_checkpointing: bool = False  # recompute activations in the backward (models that support it)

    def to_dict(self) -> dict:
        return asdict(self)


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
) -> dict:
    """Train in place; returns a small history (loss every step, wall time).

    With ``checkpoint``, the trainable parameters, optimizer, schedule, RNG state and step are
    written atomically every ``checkpoint_every`` steps; calling ``train`` again with the same
    arguments after a crash (or SIGKILL) resumes there and ends with the same weights as an
    uninterrupted run (on CPU, bit-exact). The file is removed when training completes.

    ``augment(inputs, generator)`` (used when ``config.augment``) transforms each batch on the
    device; its generator is seeded by (seed, step), so augmentation survives a resume exactly.
    ``config.grad_accum`` splits each rank's batch into that many micro-batches whose summed
    losses give the same gradient as the whole batch at once.
    """
    if config.augment and augment is None:
        raise ValueError("config.augment is set but no augment function was given")
    if config.grad_accum < 1 or config.batch_size % config.grad_accum:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum {config.grad_accum}")
    torch.manual_seed(config.seed)
    if config.grad_checkpointing and hasattr(_unwrap(model), "set_grad_checkpointing"):
        _unwrap(model).set_grad_checkpointing(True)
    model.to(device).train()
    rank, world = _dist_rank_world()
    # Under torchrun every rank draws the same global batch and computes on its slice
    # index[rank::world]; DDP averages the gradients, which equals the gradient of the global
    # mean loss when the slices are equal (global batch divisible by the world size).
    forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = make_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    losses: list[float] = []
    first = 0
    if checkpoint is not None and Path(checkpoint).exists():
        first, losses = _resume(Path(checkpoint), trainable, optimizer, schedule, config)
    start = time.perf_counter()
    batches = batch_indices(len(labels), min(config.batch_size, len(labels)), config.seed, data.lengths)
    for _ in range(first):  # the batch stream is a pure function of the seed: skip what was done
        next(batches)
    bar = tqdm(range(first, config.steps), desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config.autocast == "bfloat16")
    for step in bar:
        index = next(batches)[rank::world]
        optimizer.zero_grad(set_to_none=True)
        micro = index.chunk(config.grad_accum) if config.grad_accum > 1 else (index,)
        loss = torch.zeros((), device=device)
        for k, part in enumerate(micro):
            inputs = {key: v.to(device) for key, v in data.batch(part).items()}
            if config.augment:
                inputs = augment(inputs, torch.Generator().manual_seed(config.seed * 1_000_003 + step * 64 + k))
            sync = k == len(micro) - 1 or world == 1
            with contextlib.nullcontext() if sync else forward.no_sync():  # DDP: all-reduce once per step
                with autocast:
                    logits = forward(**inputs).float()
                target = labels[part].to(device)
                if len(micro) == 1:
                    part_loss = F.cross_entropy(logits, target)
                else:  # the sum over micro-batches is the mean over the whole batch
                    part_loss = F.cross_entropy(logits, target, reduction="sum") / len(index)
                part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(_global_mean(loss.detach(), world))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if checkpoint is not None and rank == 0 and done % checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(Path(checkpoint), done, losses, trainable, optimizer, schedule, config)
    model.eval()
    if checkpoint is not None and rank == 0 and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    return {"train_loss": losses, "train_seconds": time.perf_counter() - start, "resumed_at_step": first}


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _global_mean(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return loss.item()


def _save_checkpoint(path: Path, step, losses, trainable, optimizer, schedule, config: TrainConfig) -> None:
    state = {
        "step": step,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "config": repr(config.to_dict()),
        "params": {n: p.detach().clone() for n, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def _resume(path: Path, trainable, optimizer, schedule, config: TrainConfig) -> tuple[int, list[float]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means: start over
        print(f"[train] ignoring unreadable checkpoint {path} ({type(e).__name__}); starting over")
        return 0, []
    if state.get("config") != repr(config.to_dict()) or set(state["params"]) != set(trainable):
        print(f"[train] checkpoint {path} is from another configuration; starting over")
        return 0, []
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
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
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole set (batches in length order; ``autocast="bfloat16"``:
    bf16 forward, fp32 loss)."""
    model.to(device).eval()
    bf16 = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast == "bfloat16")
    order = data.length_order()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        inputs = {k: v.to(device) for k, v in data.batch(index).items()}
        target = labels[index].to(device)
        with bf16:
            logits = model(**inputs).float()
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(-1) == target).sum()
    n = len(order)
    return loss_sum.item() / n, correct.item() / n
