"""landscape.lanczos: the host-memory Lanczos against numpy / scipy on explicit symmetric matrices, its
memory-mapped basis, and the bound on coordinate-sized tensors alive while it runs."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import eigsh

from landscape import lanczos as lz
from landscape.curvature.solvers import _RitzTest


def symmetric(dim: int, seed: int = 0) -> np.ndarray:
    """A dense symmetric matrix with a spread spectrum: a few large eigenvalues of both signs and a bulk."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    values = np.concatenate([[40.0, 25.0, 17.0, 11.0, 8.0, -30.0], rng.uniform(-2.0, 2.0, dim - 6)])
    return (q * values) @ q.T


def top_from(alpha: np.ndarray, beta: np.ndarray, k: int) -> np.ndarray:
    return np.sort(eigh_tridiagonal(alpha, beta[: len(alpha) - 1], eigvals_only=True))[::-1][:k]


def test_top_eigenvalues_equal_numpy_and_scipy(tmp_path: Path):
    """The top 5 (algebraic) eigenvalues of a 400 × 400 symmetric matrix equal numpy's eigh and scipy's eigsh
    to 1e-8 relative, with the basis in memory and memory-mapped on disk (the file is removed afterwards)."""
    a = symmetric(400)
    reference = np.linalg.eigvalsh(a)[::-1][:5]
    arpack = np.sort(eigsh(a, k=5, which="LA", tol=1e-12, return_eigenvectors=False))[::-1]
    np.testing.assert_allclose(arpack, reference, rtol=1e-10)
    matrix = torch.from_numpy(a)
    v0 = np.random.default_rng(1).standard_normal(400)
    for memmap_bytes in (lz.MEMMAP_BYTES, 1024):
        stop = _RitzTest(5, 1e-12)
        alpha, beta, basis = lz.lanczos(lambda x: matrix @ x, v0 / np.linalg.norm(v0), 200, stop,
                                        dtype=torch.float64, scratch=tmp_path, memmap_bytes=memmap_bytes)  # fmt: skip
        assert basis.mapped == (memmap_bytes == 1024)
        assert isinstance(basis.data, np.memmap) == basis.mapped and basis.data.dtype == np.float64
        if basis.mapped:
            assert list(tmp_path.glob(".lanczos-*/basis.f64"))
        # the basis is orthonormal to fp64 accuracy (full reorthogonalisation)
        v = np.array(basis.data[: len(alpha)])
        np.testing.assert_allclose(v @ v.T, np.eye(len(alpha)), atol=1e-10)
        basis.close()
        assert stop.done and len(alpha) < 200
        np.testing.assert_allclose(top_from(alpha, beta, 5), reference, rtol=1e-8)
        np.testing.assert_allclose(top_from(alpha, beta, 5), arpack, rtol=1e-8)
    assert not list(tmp_path.iterdir())  # the memory-mapped basis is gone


def test_ritz_vector_combination_streams_over_chunks(monkeypatch):
    """HostBasis.combine and .orthogonalise equal the dense products when the chunk is smaller than dim."""
    monkeypatch.setattr(lz, "CHUNK", 7)
    rng = np.random.default_rng(2)
    basis = lz.HostBasis(5, 30)
    basis.data[:] = np.linalg.qr(rng.standard_normal((30, 5)))[0].T
    c, w = rng.standard_normal(5), rng.standard_normal(30)
    np.testing.assert_allclose(basis.combine(c, 5), c @ basis.data, rtol=1e-12)
    expected = w - basis.data.T @ (basis.data @ w)
    basis.orthogonalise(w, 5)
    np.testing.assert_allclose(w, expected, atol=1e-12)
    basis.close()


def test_at_most_two_coordinate_sized_tensors_alive():
    """Every tensor of the coordinates' size alive in the process is counted at each product (the garbage
    collector's view): the one multiplied and the product — never the basis, whatever the number of steps."""
    dim = 1237
    a = torch.from_numpy(symmetric(dim, seed=3)).float()
    counts = []

    def matvec(x: torch.Tensor) -> torch.Tensor:
        out = a @ x
        gc.collect()
        counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() == dim))
        return out

    v0 = np.random.default_rng(4).standard_normal(dim)
    # 12 steps: a basis kept as tensors would count 12 here; each count walks every object of the test process
    # (a gc pass), seconds late in the whole suite, so no more steps than the claim needs
    alpha, _, basis = lz.lanczos(matvec, v0 / np.linalg.norm(v0), 12)
    basis.close()
    assert len(alpha) == 12 and len(counts) == 12
    assert max(counts) <= 2, counts
