"""How updates relate: subspace similarity to full fine-tuning, and intruder dimensions.

Similarity to full fine-tuning (key ``similarity_to_ft`` of every other solution): with U_X,k the
top-k left singular vectors of ΔW_X (only vectors of singular value above the rank tolerance: a
rank-ρ update spans at most ρ dimensions, so LoRA's subspace stops growing at k = r),

- ``principal_angles_deg``: {k: principal angles (degrees, ascending) between span U_X,k and
  span U_ft,k} for k in (1, 4, 16, r) capped at min(out, in) (computed like
  ``scipy.linalg.subspace_angles``: arcsin of the residual's singular values for small angles,
  arccos of the cosines for large ones),
- ``overlap``: the curve ‖U_X,kᵀ U_ft,k‖²_F / k for k = 1 .. min(64, min(out, in)) (1: same
  subspace, k/out on average for random subspaces, 0: orthogonal).

Intruder dimensions (key ``intruders``, when the base weights are given), following
Shuttleworth et al. 2024 "LoRA vs Full Fine-tuning: An Illusion of Equivalence" exactly as
peft's ``reduce_intruder_dimension`` does: with u_j (j = 1..10) the top-10 left singular vectors of
the fine-tuned weight W0 + ΔW and u0_i all left singular vectors of W0 (thin SVD; those of
non-zero singular value), ``max_cos[j] = max_i |u_jᵀ u0_i|``; u_j is an intruder dimension at
threshold ε when ``max_cos[j] < ε``. ``count`` gives the number for ε in (0.3, 0.5, 0.7);
peft's default is ε = 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from landscape.spectrum.decomposition import Decomp, as_matrix, decompose
from landscape.spectrum.metrics import rank_tol

ANGLE_KS = (1, 4, 16)  # plus the LoRA rank r
OVERLAP_MAX_K = 64
INTRUDER_TOP_K = 10
INTRUDER_THRESHOLDS = (0.3, 0.5, 0.7)


def principal_angles(qa: np.ndarray, qb: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the spans of two orthonormal bases (m, ka), (m, kb).

    min(ka, kb) angles; small angles from the sines (accurate near 0), large ones from the cosines.
    """
    qa, qb = np.asarray(qa, dtype=np.float64), np.asarray(qb, dtype=np.float64)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return np.zeros(0)
    p = qa.T @ qb
    cos = np.linalg.svd(p, compute_uv=False)  # descending: smallest angles first
    resid = qb - qa @ p if qa.shape[1] >= qb.shape[1] else qa - qb @ p.T
    sin = np.linalg.svd(resid, compute_uv=False)[::-1]  # ascending: smallest angles first
    theta = np.where(cos**2 >= 0.5, np.arcsin(np.clip(sin, 0.0, 1.0)), np.arccos(np.clip(cos, -1.0, 1.0)))
    return np.degrees(theta)


def overlap_curve(ua: np.ndarray, ub: np.ndarray, kmax: int, rank_a: int | None = None,
                  rank_b: int | None = None) -> np.ndarray:  # fmt: skip
    """``‖U_a,kᵀ U_b,k‖²_F / k`` for k = 1..kmax, with U_a,k = the first min(k, rank_a) columns of ``ua``.

    ``ua``, ``ub``: orthonormal columns in order of decreasing singular value.
    """
    ra = ua.shape[1] if rank_a is None else min(rank_a, ua.shape[1])
    rb = ub.shape[1] if rank_b is None else min(rank_b, ub.shape[1])
    m2 = np.zeros((kmax, kmax))
    ka, kb = min(ra, kmax), min(rb, kmax)
    m2[:ka, :kb] = (np.asarray(ua[:, :ka], np.float64).T @ np.asarray(ub[:, :kb], np.float64)) ** 2
    cum = m2.cumsum(0).cumsum(1)  # cum[k-1, k-1] = sum of the top-left k×k block
    k = np.arange(1, kmax + 1)
    return np.diagonal(cum) / k


def similarity_entry(qa: np.ndarray, qb: np.ndarray, ks: Sequence[int], kmax: int) -> dict:
    """``{"principal_angles_deg": {k: angles}, "overlap": curve}`` of the bases ``qa`` (a solution's) and
    ``qb`` (the reference's), each already cut to the vectors above the rank tolerance."""
    return {
        "principal_angles_deg": {str(k): [float(v) for v in principal_angles(qa[:, :k], qb[:, :k])] for k in ks},
        "overlap": [float(v) for v in overlap_curve(qa, qb, kmax)],
    }


def intruder_cosines(w0: torch.Tensor, w: torch.Tensor, top_k: int = INTRUDER_TOP_K, method: str = "gram"):
    """``max_i |u_jᵀ u0_i|`` for the top-k left singular vectors u_j of ``w`` (= W0 + ΔW) against all of W0's."""
    d0 = decompose(as_matrix(w0)[None].float(), None, method)
    d1 = decompose(as_matrix(w)[None].float(), top_k, method, top_only=True)
    return intruder_max_cos(d0, d1, top_k)[0]


def intruder_max_cos(d0: Decomp, d1: Decomp, top_k: int) -> np.ndarray:
    """(b, k) ``max_i |u_jᵀ u0_i|`` from the decompositions of W0 (``d0``, all vectors) and of W0 + ΔW
    (``d1``, the top ``top_k``); NaN for vectors of zero singular value (undefined)."""
    k = min(top_k, d1.s.shape[1])
    u = d1.left(k)
    cos = d0.abs_cos_with_left(u).amax(dim=1)  # (b, k)
    tol = torch.tensor([rank_tol(float(sm), d1.shape) for sm in d1.s[:, 0]], dtype=d1.s.dtype, device=d1.s.device)
    cos = torch.where(d1.s[:, :k] > tol[:, None], cos, torch.nan)  # vectors of zero singular value: undefined
    return cos.cpu().numpy()


def intruder_entry(max_cos: np.ndarray, thresholds: Sequence[float]) -> dict:
    """``{"max_cos": [...], "count": {ε: number of max_cos < ε}}`` of one layer (NaN: null, never counted)."""
    return {
        "max_cos": [_clean(v) for v in max_cos],
        "count": {str(eps): int(np.sum(max_cos < eps)) for eps in thresholds},  # NaN < eps: False
    }


def _clean(v) -> float | None:
    """JSON-safe float (NaN -> None)."""
    v = float(v)
    return None if math.isnan(v) else v
