"""Shims for the declared floors in pyproject.toml: ``tomllib`` on Python 3.10 (``tomli``), and torch's
device-generic OOM error and autocast query, spelled differently before torch 2.4 (the floor is higher
for other reasons; these keep the call sites free of it), and whether this torch runs FSDP2 on the CPU.
tests/test_floors.py runs the call sites with the newer APIs hidden.
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
# Stream.record_event, which its CPU stream lacks, and 2.7 and 2.8 run but train to other weights than one
# process (5.6 % apart in tests/test_fsdp.py; 2.9.0, 2.9.1, 2.10, 2.11 and 2.14 pass its 1e-4).
FSDP_CPU_TORCH = "2.9"


def fsdp_runs_on_cpu() -> bool:
    """Whether this torch's FSDP2 trains CPU tensors (gloo) as one process would: from :data:`FSDP_CPU_TORCH` on."""
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= FSDP_CPU_TORCH


__all__ = ["FSDP_CPU_TORCH", "OutOfMemoryError", "autocast_enabled", "fsdp_runs_on_cpu", "tomllib"]
