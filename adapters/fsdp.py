"""Full fine-tuning that does not fit one device: FSDP2 sharding, sharded checkpoints, consolidation.

Under torchrun with ``--fsdp``, the model is sharded with ``torch.distributed.fsdp.fully_shard`` per
transformer block and at the root. :func:`sharded_copy` builds the model to train on the meta device, shards it
there and materialises only each rank's shard (``to_empty``), then loads the base's weights into the shards with
``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``: rank 0's base is the source, one tensor
at a time, so no rank ever holds a second full copy of the model (the deep copy it replaced held one in fp32).
Every parameter becomes a DTensor sharded over the ranks, so the fp32 master weights, their gradients and
AdamW's two moments (built on the sharded parameters) each hold 1/world of the model per rank. Gradients are
reduce-scattered with averaging, which equals DDP's mean (each rank computes on its slice of the global batch, as
in :func:`adapters.train.train`).

Checkpoints are written with ``torch.distributed.checkpoint`` (each rank writes its own shards; the step,
losses, schedule and RNG state go beside them), so a kill resumes bit-equal. Its files carry no checksum, so
``extra.pt`` records the sha256 of each (the ranks hash a share of the files each), and a resume whose files
differ (a flipped byte on a failing disk) starts over rather than training on from wrong numbers. The trained
weights are consolidated into one full fp32 state dict on rank 0, which the toolkit saves as any other solution.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.fsdp and .checkpoint are imported where used: adapters.train imports this module, and every
# run, sharded or not, would pay for them at start-up
from adapters.io import file_sha256, torch_file_damage, write_torch


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the members of its longest ``nn.ModuleList`` (a transformer's layers)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place over the process group: each block its own FSDP unit (its parameters are
    gathered only around its forward and backward), then the root (embeddings, head). Returns the model."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (shapes, dtypes and ties kept;
    no bytes): the memo maps each tensor to its meta twin before ``deepcopy`` would copy it."""
    memo: dict = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("meta")
    return copy.deepcopy(model, memo)


def sharded_copy(base: nn.Module, prepare: Callable[[nn.Module], nn.Module], device: torch.device | str) -> nn.Module:
    """``prepare`` (e.g. :func:`adapters.methods.attach` for FT) applied to a copy of ``base``, with fp32 master
    weights, sharded over the process group: built on the meta device, only the rank's shards materialised on
    ``device``, their values broadcast from rank 0's ``base`` tensor by tensor. Buffers (non-persistent ones are
    in no state dict) come from each rank's own ``base``. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = prepare(meta_copy(base))
    for p in model.parameters():  # the fp32 masters (adapters.train.fp32_masters), cast on meta: no bytes
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    shard(model)
    model.to_empty(device=device)  # the rank's shards only: FSDP2 keeps 1/world of each parameter
    source = base.state_dict() if dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, source, options=options)
    own = dict(base.named_buffers())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(own[name])
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 state of the sharded trainable parameters, gathered to rank 0's CPU (empty elsewhere).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.float() for n, t in state.items() if n in trainable} if dist.get_rank() == 0 else {}


def save_checkpoint(path: Path, model: nn.Module, optimizer, extra: dict) -> None:
    """A sharded checkpoint at the folder ``path``: the model and optimizer shards through
    ``torch.distributed.checkpoint`` and ``extra`` (step, losses, schedule, RNG) as ``extra.pt``, written to a
    temporary folder and renamed, so a kill mid-write leaves the previous checkpoint. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, {f.name: file_sha256(f) for f in _my_share(tmp)})
    if dist.get_rank() == 0:
        write_torch(tmp / "extra.pt", {**extra, "sha256": {k: v for share in shares for k, v in share.items()}})
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _my_share(folder: Path) -> list[Path]:
    """This rank's share of the checkpoint files to hash (every world-th, in name order): the ranks read them in
    parallel, each about 1/world of the checkpoint."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != "extra.pt")
    return files[dist.get_rank() :: dist.get_world_size()]


def damage(path: Path) -> str | None:
    """What of the sharded checkpoint at ``path`` is not as saved: ``extra.pt`` failing its CRC-32 or unreadable,
    or a file whose sha256 is not the one ``extra.pt`` recorded (each rank checks its share); None when intact or
    saved before the record. Collective: every rank gets the same answer."""
    try:
        record = torch_file_damage(path / "extra.pt")
        found = f"extra.pt's record {record} fails its CRC-32" if record else None
        recorded = {} if found else torch.load(path / "extra.pt", map_location="cpu", weights_only=True).get("sha256")
    except Exception as e:  # noqa: BLE001 - any unreadable extra.pt means: start over
        found, recorded = f"extra.pt is unreadable ({type(e).__name__})", {}
    if not found and recorded:
        names = set(recorded)
        missing = sorted(names - {f.name for f in path.iterdir()})
        changed = [f.name for f in _my_share(path) if f.name in names and file_sha256(f) != recorded[f.name]]
        if missing or changed:
            found = f"{missing[0]} is missing" if missing else f"{changed[0]} differs from the sha256 saved with it"
    answers = [None] * dist.get_world_size()
    dist.all_gather_object(answers, found)
    return next((a for a in answers if a), None)


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict | None:
    """Load the sharded checkpoint at ``path`` into ``model`` and ``optimizer``; returns its ``extra``
    (None when there is no complete checkpoint). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / "extra.pt").exists():
        return None
    extra = torch.load(path / "extra.pt", map_location="cpu", weights_only=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return extra


def save_training(
    path: Path, step: int, losses: list[float], model: nn.Module, optimizer, schedule, ident: dict
) -> None:
    """The training state after ``step`` at ``path`` (:func:`save_checkpoint`): shards, then the step, losses,
    schedule and CPU RNG state, with ``ident`` (the run's key and config) to be checked on resume."""
    extra = {**ident, "step": step, "losses": torch.tensor(losses, dtype=torch.float64),
             "schedule": schedule.state_dict(), "rng": torch.get_rng_state()}  # fmt: skip
    save_checkpoint(path, model, optimizer, extra)


def resume_training(path: Path, model: nn.Module, optimizer, schedule, ident: dict) -> tuple[int, list[float]]:
    """(step, losses) of the training state at ``path``, loaded into ``model``, ``optimizer``, ``schedule`` and the
    CPU RNG; (0, []) when there is none or it records another ``ident``. Collective."""
    if (path / "extra.pt").exists():
        damaged = damage(path)
        if damaged:
            if dist.get_rank() == 0:
                print(f"[train] checkpoint {path} is damaged ({damaged}); starting over")
            return 0, []
        extra = torch.load(path / "extra.pt", map_location="cpu", weights_only=True)
        if any(extra.get(k) != v for k, v in ident.items()):
            print(f"[train] checkpoint {path} is from another configuration; starting over")
            return 0, []
    extra = load_checkpoint(path, model, optimizer)
    if extra is None:
        return 0, []
    schedule.load_state_dict(extra["schedule"])
    torch.set_rng_state(extra["rng"])
    return int(extra["step"]), extra["losses"].tolist()


__all__ = [
    "blocks",
    "damage",
    "full_state_dict",
    "load_checkpoint",
    "resume_training",
    "save_checkpoint",
    "meta_copy",
    "save_training",
    "shard",
    "sharded_copy",
]
