"""Shims for the declared floors in pyproject.toml: ``tomllib`` on Python 3.10 (``tomli``), and whether this
torch runs FSDP2 on the CPU. tests/test_floors.py runs the call sites with the newer APIs hidden.
"""

from __future__ import annotations

import torch

try:  # Python >= 3.11
    import tomllib  # novm (vermin: the 3.10 fallback is below)
except ImportError:  # Python 3.10: the same API from the `tomli` backport (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

# FSDP2 on CPU tensors (gloo): torch 2.4 and 2.5 raise "FSDP requires CUDA for streams", 2.6 calls
# Stream.record_event, which its CPU stream lacks, and 2.7 and 2.8 run but train to other weights than one
# process (5.6 % apart in tests/test_fsdp.py; 2.9.0, 2.9.1, 2.10, 2.11 and 2.14 pass its 1e-4).
FSDP_CPU_TORCH = "2.9"


def fsdp_runs_on_cpu() -> bool:
    """Whether this torch's FSDP2 trains CPU tensors (gloo) as one process would: from :data:`FSDP_CPU_TORCH` on."""
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= FSDP_CPU_TORCH


__all__ = ["FSDP_CPU_TORCH", "fsdp_runs_on_cpu", "tomllib"]
