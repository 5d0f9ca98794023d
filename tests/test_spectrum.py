"""Spectrum metrics against independent references on matrices with known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from landscape.spectrum import analyse, natural_key, singular_values, spectrum_metrics


def metrics_of(m: np.ndarray) -> dict:
    return spectrum_metrics(singular_values(torch.from_numpy(m)), m.shape)


def reference_energy_rank(s: np.ndarray, q: float) -> int:
    energy = np.cumsum(np.sort(s)[::-1].astype(np.float64) ** 2)
    return int(np.argmax(energy >= q * energy[-1])) + 1


def test_identity():
    n = 7
    m = metrics_of(np.eye(n, dtype=np.float32))
    np.testing.assert_allclose(m["singular_values"], np.ones(n), rtol=1e-6)
    assert m["rank"] == n
    assert m["effective_rank"] == pytest.approx(n, rel=1e-6)  # uniform spectrum: entropy log n
    assert m["stable_rank"] == pytest.approx(n, rel=1e-6)  # ‖I‖_F² / ‖I‖_2² = n
    assert m["energy_rank_90"] == math.ceil(0.9 * n)
    assert m["energy_rank_99"] == n


@pytest.mark.parametrize("shape,k", [((40, 30), 5), ((17, 64), 1), ((25, 25), 12)])
def test_low_rank_product(shape, k):
    rng = np.random.default_rng(k)
    m = (rng.standard_normal((shape[0], k)) @ rng.standard_normal((k, shape[1]))).astype(np.float32)
    got = metrics_of(m)
    assert got["rank"] == np.linalg.matrix_rank(m) == k
    assert len(got["singular_values"]) == min(shape)
    assert got["energy_rank_99"] <= k


def test_geometric_diagonal():
    rng = np.random.default_rng(0)
    diag = (0.7 ** np.arange(12)).astype(np.float32)
    perm = rng.permutation(12)  # unsorted on purpose: the output must come back descending
    m = np.zeros((15, 12), dtype=np.float32)
    m[np.arange(12), perm] = diag[perm]
    got = metrics_of(m)
    s_ref = np.sort(diag)[::-1]
    np.testing.assert_allclose(got["singular_values"], s_ref, rtol=1e-6)
    assert got["rank"] == np.linalg.matrix_rank(m) == 12
    assert got["effective_rank"] == pytest.approx(math.exp(scipy.stats.entropy(s_ref / s_ref.sum())), rel=1e-6)
    assert got["stable_rank"] == pytest.approx(float(np.sum(s_ref.astype(np.float64) ** 2)), rel=1e-6)
    assert got["energy_rank_90"] == reference_energy_rank(s_ref, 0.90)
    assert got["energy_rank_99"] == reference_energy_rank(s_ref, 0.99)
    assert 1 < got["energy_rank_90"] < got["energy_rank_99"] <= 12  # the decay makes them differ


def test_rank_tolerance_matches_numpy_near_threshold():
    # singular values straddling numpy's float32 tolerance S.max() * max(M, N) * eps
    tol = 20 * np.finfo(np.float32).eps
    s = np.array([1.0, 0.5, 10 * tol, 0.1 * tol], dtype=np.float32)
    m = np.zeros((20, 4), dtype=np.float32)
    m[:4, :4] = np.diag(s)
    assert metrics_of(m)["rank"] == np.linalg.matrix_rank(m) == 3


def test_zero_matrix():
    got = metrics_of(np.zeros((6, 4), dtype=np.float32))
    assert got["singular_values"] == [0.0] * 4
    for key in ("rank", "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99"):
        assert got[key] == 0


def test_singular_values_reshapes_conv_and_rejects_vectors():
    w = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    s = singular_values(w)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, np.linalg.svd(w.reshape(8, 12).numpy(), compute_uv=False), rtol=1e-5)
    with pytest.raises(ValueError):
        singular_values(torch.ones(5))
    with pytest.raises(ValueError):
        singular_values(torch.tensor([[1.0, float("nan")]]))


def test_analyse_structure():
    g = torch.Generator().manual_seed(1)
    names = ["blocks.10.w", "blocks.2.w", "blocks.1.w"]
    deltas = {
        sol: {n: torch.randn(6, 4, generator=g) for n in names} | {"blocks.1.bias": torch.randn(6, generator=g)}
        for sol in ("ft", "lora", "randlora")
    }
    deltas["ft"]["only_in_ft.w"] = torch.randn(3, 3, generator=g)
    deltas["lora"]["blocks.2.w"] = deltas["lora"]["blocks.2.w"].to(torch.bfloat16)  # any dtype is accepted

    out = analyse(deltas, progress=False)
    assert [entry["name"] for entry in out["layers"]] == ["blocks.1.w", "blocks.2.w", "blocks.10.w"]
    for entry in out["layers"]:
        assert entry["shape"] == [6, 4]
        assert set(entry) == {"name", "shape", "ft", "lora", "randlora"}
        for sol in ("ft", "lora", "randlora"):
            ref = np.linalg.svd(deltas[sol][entry["name"]].float().numpy(), compute_uv=False)
            np.testing.assert_allclose(entry[sol]["singular_values"], ref, rtol=1e-5)

    assert [e["name"] for e in analyse(deltas, layers=["blocks.2.w"], progress=False)["layers"]] == ["blocks.2.w"]
    with pytest.raises(KeyError):
        analyse(deltas, layers=["only_in_ft.w"], progress=False)


def test_natural_key():
    assert sorted(["a.10.b", "a.2.b", "a.1.c", "b.0"], key=natural_key) == ["a.1.c", "a.2.b", "a.10.b", "b.0"]


def test_the_cpu_analysis_holds_openblas_to_one_thread_and_gives_its_threads_back():
    """Every update of a CPU analysis is read, and everything between the LAPACK calls runs, with numpy/scipy's
    OpenBLAS on one thread (its idle second thread would spin on the other core); the caller's setting returns."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from landscape.spectrum.updates import LazyDelta

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}

    seen = []
    g = torch.Generator().manual_seed(2)
    values = {f"w{i}": torch.randn(8, 5, generator=g) for i in range(3)}

    def reader(value):
        def read():
            seen.append(blas_threads())  # what the update's reader meets, inside the analysis
            return value

        return read

    deltas = {"ft": {n: LazyDelta(n, v.shape, reader(v), "ft") for n, v in values.items()}}
    base = {n: torch.randn(8, 5, generator=g) for n in values}
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        out = analyse(deltas, base=base, progress=False, device="cpu")
        assert blas_threads() == {2}
    assert seen == [{1}] * 3
    for entry in out["layers"]:  # the same numbers as numpy's SVD
        ref = np.linalg.svd(values[entry["name"]].numpy().astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(entry["ft"]["singular_values"], ref, rtol=1e-5)
