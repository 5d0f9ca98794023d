"""torchrun support: joining the process group, who leads, and waiting for each other.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), every process joins one process group whose backend
follows the device the run computes on: NCCL for CUDA, gloo for the CPU (also on a machine that has
GPUs but runs with ``--device cpu``). Rank 0 leads: it saves solutions and writes the outputs.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# The other ranks wait at a barrier while rank 0 evaluates, saves and writes outputs (minutes for a
# CLIP solution, longer for spectra of large models), so the group's timeout must be long.
TIMEOUT = datetime.timedelta(hours=12)


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init(device_type: str) -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device_type), timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_lead() -> bool:
    return rank_world()[0] == 0


def wait_for_all() -> None:
    """A barrier across the torchrun processes (nothing in a single process)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the processes (the value itself in a single process)."""
    if active():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


__all__ = ["active", "backend_for", "global_mean", "init", "is_lead", "rank_world", "shutdown", "wait_for_all"]
