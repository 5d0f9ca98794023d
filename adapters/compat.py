"""Shims for the declared floors in pyproject.toml: ``tomllib`` on Python 3.10 (``tomli``), torch's
device-generic OOM error and autocast query, spelled differently before torch 2.4 (the floor is 2.4
for other reasons; these keep the call sites free of it), and FSDP2's API, public in torch 2.6 and
under ``torch.distributed._composable.fsdp`` in 2.4 and 2.5. tests/test_floors.py runs the call sites
with the newer APIs hidden.
"""

from __future__ import annotations

import torch

try:  # Python >= 3.11
    import tomllib  # novm (vermin: the 3.10 fallback is below)
except ImportError:  # Python 3.10: the same API from the `tomli` backport (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

# torch >= 2.4 has the device-generic torch.OutOfMemoryError; older torch raises (and names) the
# CUDA one, which newer torch keeps as an alias of the generic class.
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cpu", "cuda", ...) in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)  # torch >= 2.4
    except TypeError:  # torch < 2.4: no argument, CUDA only; other devices have their own function
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        return getattr(torch, f"is_autocast_{device_type}_enabled", lambda: False)()


# FSDP2 on CPU tensors (gloo): torch 2.4 and 2.5 raise "FSDP requires CUDA for streams", 2.6 calls
# Stream.record_event, which its CPU stream lacks; 2.7 runs (tests/test_floors.py, run on each of them).
FSDP_CPU_TORCH = "2.7"


def fsdp_runs_on_cpu() -> bool:
    """Whether this torch's FSDP2 shards CPU tensors (gloo): from :data:`FSDP_CPU_TORCH` on."""
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= FSDP_CPU_TORCH


def fsdp2():
    """FSDP2's ``(fully_shard, FSDPModule)``: ``torch.distributed.fsdp`` from torch 2.6; the same function and
    class under ``torch.distributed._composable.fsdp`` in torch 2.4 and 2.5. Imported on call: loading
    torch.distributed's FSDP costs a run that never shards."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


__all__ = ["FSDP_CPU_TORCH", "OutOfMemoryError", "autocast_enabled", "fsdp2", "fsdp_runs_on_cpu", "tomllib"]
