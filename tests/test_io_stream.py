"""adapters.io: checkpoints stream to their file — no second copy of the payload in host memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import torch

from adapters import io


def traced_peak(write) -> int:
    """Peak bytes Python and numpy allocate while ``write()`` runs (tracemalloc; the payload is made before)."""
    tracemalloc.start()
    try:
        write()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_checkpoint_writes_hold_no_second_copy(tmp_path: Path):
    """Writing 64 MB of tensors (torch.save) allocates under a tenth of the payload on top of it (a BytesIO and
    its getvalue() allocated 1.13× the payload here), np.savez at most one 8 MB array's bytes; the files read
    back exactly."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(1024, 2048, generator=generator) for i in range(8)}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    peak = traced_peak(lambda: io.write_torch(tmp_path / "state.pt", {"model": tensors, "step": 3}))
    assert peak <= 0.1 * size, (peak, size)
    back = torch.load(tmp_path / "state.pt", weights_only=True)
    assert back["step"] == 3 and all(torch.equal(back["model"][k], t) for k, t in tensors.items())

    arrays = {k: t.numpy() for k, t in tensors.items()}
    peak = traced_peak(lambda: io.write_npz(tmp_path / "arrays.npz", **arrays))
    assert peak <= 8 * 2**20 + 0.05 * size, (peak, size)  # numpy writes a zip member from one array's bytes
    with np.load(tmp_path / "arrays.npz") as back:
        assert all(np.array_equal(back[k], a) for k, a in arrays.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npz", "state.pt"]  # no temporary left
