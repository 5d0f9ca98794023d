"""Lanczos with its basis in host memory: device memory of two coordinate-sized vectors, whatever the steps.

The Lanczos basis is what a Krylov solver holds most of: ``steps`` vectors of the coordinates' size. At
the target weights of Qwen2-0.5B (~360 M coordinates) 60 fp64 vectors are 170 GB — more than one device
holds, and nothing a Hessian-vector product needs. So here the basis lives on the host, in float64
(numpy), and is memory-mapped from a temporary file (``np.memmap``, removed when the solver's
:class:`HostBasis` is closed) when it would exceed :data:`MEMMAP_BYTES`. The device sees only the vector
being multiplied (in the operator's dtype) and the product it returns; both are copied to the host at
once, so at most **two** coordinate-sized tensors are alive on the device, plus what the product itself
allocates (for an HVP: its tangent, gradient and output, which is where curvature's "k + 4 vectors"
bound comes from).

Full reorthogonalisation (classical Gram–Schmidt, twice: "twice is enough") runs on the host in column
chunks of the basis (:data:`CHUNK` coordinates at a time), so a memory-mapped basis is streamed from disk
and never read whole into memory. In fp64: in fp32, the rounding of million-term dot products moved the
top Ritz value of EfficientNet-Lite0's Hessian by 2e-5 relative.

:func:`lanczos` is the solver; its ``stop(alpha, beta, next_beta)`` callback decides when the top Ritz
pairs are good enough (:class:`landscape.curvature.solvers._RitzTest` passes ARPACK's residual test).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

MEMMAP_BYTES = 1 << 30  # a basis larger than this (fp64 bytes) is memory-mapped from a temporary file
CHUNK = 1 << 20  # coordinates per column chunk of the reorthogonalisation (8 MiB per basis row)

__all__ = ["CHUNK", "MEMMAP_BYTES", "HostBasis", "lanczos"]


class HostBasis:
    """``rows`` float64 vectors of ``dim`` coordinates on the host: a numpy array, or a ``np.memmap`` in a
    temporary folder under ``scratch`` (default the system's temporary folder) when larger than
    ``memmap_bytes``. :meth:`close` (or leaving a ``with`` block) frees it and removes the file."""

    def __init__(self, rows: int, dim: int, scratch: str | Path | None = None, memmap_bytes: int = MEMMAP_BYTES):
        self.rows, self.dim = rows, dim
        self.folder: Path | None = None
        if rows * dim * 8 > memmap_bytes:
            if scratch is not None:
                Path(scratch).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=".lanczos-", dir=scratch))
            self.data = np.memmap(self.folder / "basis.f64", dtype=np.float64, mode="w+", shape=(rows, dim))
        else:
            self.data = np.empty((rows, dim), dtype=np.float64)

    @property
    def mapped(self) -> bool:
        return self.folder is not None

    def combine(self, coefficients: np.ndarray, count: int) -> np.ndarray:
        """``coefficientsᵀ · rows[:count]`` (a vector of ``dim``), streamed over column chunks."""
        out = np.empty(self.dim, dtype=np.float64)
        c = np.asarray(coefficients, dtype=np.float64)
        for lo in range(0, self.dim, CHUNK):
            out[lo : lo + CHUNK] = c @ self.data[:count, lo : lo + CHUNK]
        return out

    def orthogonalise(self, w: np.ndarray, count: int) -> None:
        """``w −= Vᵀ(V w)`` in place against the first ``count`` rows V (classical Gram–Schmidt, chunked)."""
        dots = np.zeros(count, dtype=np.float64)
        for lo in range(0, self.dim, CHUNK):
            dots += self.data[:count, lo : lo + CHUNK] @ w[lo : lo + CHUNK]
        for lo in range(0, self.dim, CHUNK):
            w[lo : lo + CHUNK] -= dots @ self.data[:count, lo : lo + CHUNK]

    def close(self) -> None:
        if self.folder is not None:
            data, self.data = self.data, None
            del data  # unmaps the file (the last reference) before it is removed
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        else:
            self.data = None

    def __enter__(self) -> HostBasis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v: np.ndarray | torch.Tensor,
    steps: int,
    stop: Callable[[Sequence[float], Sequence[float], float], bool] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scratch: str | Path | None = None,
    memmap_bytes: int = MEMMAP_BYTES,
) -> tuple[np.ndarray, np.ndarray, HostBasis]:
    """At most ``steps`` Lanczos steps of the symmetric operator ``matvec`` from the unit vector ``v``.

    ``matvec(x)`` takes a flat tensor on ``device`` in ``dtype`` and returns A·x (any float dtype, same
    device). Full reorthogonalisation against the host basis (module docstring). Stops early when the Krylov
    space is invariant or when ``stop(alpha, beta, next_beta)`` says so after a step. Returns (alpha, beta)
    of the tridiagonal T and the :class:`HostBasis` (its first ``len(alpha)`` rows are used; close it).
    """
    q = np.asarray(v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    q = q.reshape(-1)
    dim = q.size
    steps = max(1, min(steps, dim))
    basis = HostBasis(steps, dim, scratch, memmap_bytes)
    try:
        basis.data[0] = q
        alpha: list[float] = []
        beta: list[float] = []
        for j in range(steps):
            x = torch.from_numpy(np.ascontiguousarray(basis.data[j])).to(device=device, dtype=dtype)
            product = matvec(x)
            del x  # the input's device copy goes before the product comes to the host
            w = product.detach().to("cpu", torch.float64).numpy().copy()
            del product  # now nothing coordinate-sized is left on the device
            alpha.append(float(w @ basis.data[j]))
            for _ in range(2):  # against every earlier vector: no ghost copies of converged eigenvalues
                basis.orthogonalise(w, j + 1)
            b = float(np.linalg.norm(w))
            invariant = b <= 1e-10 * (max(abs(a) for a in alpha) or 1.0)
            if stop is not None and stop(alpha, beta, 0.0 if invariant else b):
                break
            if j + 1 == steps or invariant:
                break
            beta.append(b)
            basis.data[j + 1] = w / b
    except BaseException:
        basis.close()
        raise
    return np.asarray(alpha), np.asarray(beta), basis
