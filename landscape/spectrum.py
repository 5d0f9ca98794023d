"""Spectral analysis of weight updates ΔW (full fine-tuning, LoRA, RandLoRA).

For each adapted layer we take the update ΔW of every solution, compute its singular
values and summarise them:

- ``rank``: numerical rank with numpy.linalg.matrix_rank's default tolerance for float32
  (``tol = s_max · max(out, in) · eps_float32``),
- ``effective_rank``: Roy & Vetterli (2007), exp of the entropy of s / sum(s),
- ``stable_rank``: sum(s²) / max(s)²,
- ``energy_rank_90`` / ``energy_rank_99``: fewest singular values holding 90 % / 99 % of sum(s²),
- ``energy_beyond_rank``: Σ_{i>r} s_i² / Σ_i s_i², r = the LoRA solution's rank (the same r
  for every solution: how much of the update a rank-r adapter could never express).

Similarity to full fine-tuning (key ``similarity_to_ft`` of every other solution): with U_X,k the
top-k left singular vectors of ΔW_X (only vectors of singular value above ``tol``: a rank-ρ update
spans at most ρ dimensions, so LoRA's subspace stops growing at k = r),

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

Computation (fast, exact, bounded memory): in Gram form (``method="gram"``, default: eigen-
decomposition of the fp64 Gram matrix XᵀX or XXᵀ of the fp32 update, on its smaller side — at least
as accurate as an fp32 SVD for every singular value above 1e-9 · s_max, i.e. far below the rank
tolerance; the top-10 vectors of W0 + ΔW for the intruder test come from an fp32 Gram matrix, and
for LoRA from W0's Gram matrix plus low-rank terms) or with ``torch.linalg.svd`` in fp32
(``method="svd"``). On the CPU the Gram method runs layer by layer through LAPACK (scipy) and
computes only what the metrics need (:func:`_lapack_eigh`): the Gram matrix by ``syrk``; for each ΔW
all eigenvalues (``sytrd`` + ``sterf``) but only the top max(64, r) eigenvectors (MRRR ``stemr``, and
back-transformation of those vectors only); for W0 + ΔW only the top 10; for W0 all eigenvectors of
its tridiagonal form (``stevd``), the Householder Q applied to the intruder vectors only, never
formed. Off the CPU, layers of equal shape are stacked in chunks (at most ``chunk_bytes`` of fp64
matrices resident at a time) for torch's batched ``eigh``. A LoRA update given by its factors
(:class:`LowRank`, ΔW = s·B·A) never goes dense for its spectrum: QR of B and of Aᵀ and the SVD of
the r×r core s·R_B·R_Aᵀ give its singular values exactly and its singular vectors as Q_B·U_core,
Q_A·V_core.

The library part is ``singular_values``, ``spectrum_metrics``, ``lowrank_svd``,
``principal_angles``, ``overlap_curve``, ``intruder_cosines`` and ``analyse``; the command-line
entry point lives at the bottom.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adapters.models.base import HEAD

__all__ = [
    "LowRank",
    "analyse",
    "intruder_cosines",
    "lora_factors",
    "lowrank_svd",
    "natural_key",
    "overlap_curve",
    "principal_angles",
    "singular_values",
    "spectrum_metrics",
    "write_spectrum",
]

ENERGY_LEVELS = (0.90, 0.99)


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10`` (digits compared as numbers)."""
    # re.split with a capture group alternates text and digit runs, always starting with text,
    # so keys of different names compare element-wise str-to-str and int-to-int.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """View an update as a matrix: 2-D as is, >2-D (conv kernels) as (shape[0], -1)."""
    if delta.ndim < 2:
        raise ValueError(f"need a 2-D (or higher) update, got shape {tuple(delta.shape)}")
    return delta if delta.ndim == 2 else delta.reshape(delta.shape[0], -1)


def singular_values(delta: torch.Tensor, device: str | torch.device | None = None) -> np.ndarray:
    """Singular values of ``delta`` in descending order, computed with torch in float32.

    ``device`` selects where the SVD runs (``None``: where ``delta`` already is); the GPU is
    much faster for the 768×3072 matrices of a ViT-B.
    """
    m = as_matrix(delta).detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("update contains NaN or inf; its singular values are undefined")
    return torch.linalg.svdvals(m).cpu().numpy()


def _energy_rank(s64: np.ndarray, q: float) -> int:
    energy = np.cumsum(s64**2)
    # first k (1-based) with cumulative energy >= q * total; clamp guards against rounding at the end
    k = int(np.searchsorted(energy, q * energy[-1], side="left")) + 1
    return min(k, len(s64))


def spectrum_metrics(s: np.ndarray, shape: tuple[int, int]) -> dict:
    """Rank measures of a matrix of ``shape`` with singular values ``s`` (any order, ≥ 0).

    An all-zero update gets 0 for every rank measure.
    """
    s32 = np.sort(np.asarray(s, dtype=np.float32))[::-1]
    s64 = s32.astype(np.float64)
    out: dict = {"singular_values": [float(v) for v in s32]}
    smax = float(s64[0]) if len(s64) else 0.0
    if smax <= 0.0:
        out.update(rank=0, effective_rank=0.0, stable_rank=0.0)
        out.update({f"energy_rank_{round(q * 100)}": 0 for q in ENERGY_LEVELS})
        return out
    # numpy.linalg.matrix_rank's default tolerance, as it applies to a float32 matrix
    tol = smax * max(shape) * float(np.finfo(np.float32).eps)
    p = s64 / s64.sum()
    p = p[p > 0]  # 0·log 0 = 0
    out["rank"] = int(np.count_nonzero(s64 > tol))
    out["effective_rank"] = float(math.exp(-float(np.sum(p * np.log(p)))))
    out["stable_rank"] = float(np.sum(s64**2) / smax**2)
    for q in ENERGY_LEVELS:
        out[f"energy_rank_{round(q * 100)}"] = _energy_rank(s64, q)
    return out


def _default_layers(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    solutions = list(deltas.values())
    common = set(solutions[0]).intersection(*solutions[1:]) if solutions else set()
    return sorted((n for n in common if all(sol[n].ndim >= 2 for sol in solutions)), key=natural_key)


# ------------------------------------------------------------------------ building blocks ----

ANGLE_KS = (1, 4, 16)  # plus the LoRA rank r
OVERLAP_MAX_K = 64
INTRUDER_TOP_K = 10
INTRUDER_THRESHOLDS = (0.3, 0.5, 0.7)
METHODS = ("gram", "svd")


@dataclass
class LowRank:
    """A factored update ΔW = scale · B · A (LoRA), B: (out, r), A: (r, in). Never made dense for its spectrum."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    def __post_init__(self):
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRank needs B (out, r) and A (r, in), got {tuple(self.B.shape)}, {tuple(self.A.shape)}"
            )

    ndim = 2

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    @property
    def r(self) -> int:
        return int(self.B.shape[1])

    def dense(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * float(self.scale)


def _tol(s_max: float, shape: Sequence[int]) -> float:
    """numpy.linalg.matrix_rank's default tolerance for a float32 matrix (the ``rank`` metric's)."""
    return s_max * max(shape) * float(np.finfo(np.float32).eps)


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0):
    """Exact thin SVD of scale·B·A without forming it: ``(U, s, V)`` with ΔW = U·diag(s)·Vᵀ.

    QR of B and of Aᵀ, SVD of the small core scale·R_B·R_Aᵀ; U = Q_B·U_core, V = Q_A·V_core.
    Works on stacked factors (leading batch dimensions). Computed in float64; at most r values.
    """
    B64, A64 = B.to(torch.float64), A.to(torch.float64)
    qb, rb = torch.linalg.qr(B64)
    qa, ra = torch.linalg.qr(A64.mT)
    u, s, vh = torch.linalg.svd(float(scale) * rb @ ra.mT)
    return qb @ u, s, qa @ vh.mT


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on the CPU through numpy's BLAS (OpenBLAS: 2× faster than torch's MKL for these tall-skinny
    fp64 products, measured on one core of an AMD EPYC), elsewhere torch."""
    if a.device.type == "cpu" and b.device.type == "cpu":
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return a @ b


class _Tridiag:
    """All eigenvectors of a symmetric matrix, descending, held as Q·Z and never formed.

    Q: the Householder reflectors of LAPACK ``sytrd`` (lower), Z: all eigenvectors of the tridiagonal
    matrix. Applying Q or Qᵀ to a few columns costs O(d²) per column, forming Q·Z would cost O(d³).
    """

    def __init__(self, refl: np.ndarray | None, tau: np.ndarray | None, z: np.ndarray):
        self.refl, self.tau, self.z = refl, tau, z  # refl: the (d-1) × (d-1) block c[1:, :-1] of sytrd's output

    def apply_q(self, y: np.ndarray, trans: str = "N") -> np.ndarray:
        """Q·y (``trans="N"``) or Qᵀ·y (``"T"``) for y (d, k)."""
        return _apply_q(self.refl, self.tau, y, trans)

    def vectors(self, k: int) -> np.ndarray:
        """The top-k eigenvectors (d, k)."""
        return self.apply_q(self.z[:, :k], "N")

    def vt(self, y: np.ndarray) -> np.ndarray:
        """Vᵀ·y = Zᵀ·(Qᵀ·y) for ALL eigenvectors V: (d, k)."""
        return self.z.T @ self.apply_q(y, "T")


class _Decomp:
    """Singular values of a stack of matrices (b, m, n) and access to their singular vectors.

    The vectors come as left vectors (``left``), as right vectors with the matrices (``right``, ``x``:
    tall Gram path, U = X V / s), or, for all vectors of a Gram matrix on the CPU, as
    :class:`_Tridiag` per matrix (``tridiag``; with ``x`` when tall).
    """

    def __init__(self, s: torch.Tensor, shape: tuple[int, int], left=None, right=None, x=None, tridiag=None):
        self.s = s  # (b, d) float64, descending (intruder test: possibly only the top k)
        self.shape = shape
        self._left = left  # (b, m, k) left vectors, or None
        self._right = right  # (b, n, k) right vectors (tall Gram path: U = X V / s), or None
        self._x = x  # (b, m, n) float64 matrices, for U = X V / s (tall Gram path), or None
        self._tridiag = tridiag  # [_Tridiag] per matrix: all eigenvectors of the Gram matrices, or None
        self._gram = None  # the fp64 Gram matrices (b, d, d), when kept
        self._gram_lower = None  # or their lower triangles (numpy, per matrix), symmetrised on first use

    @property
    def gram(self) -> torch.Tensor | None:
        """The fp64 Gram matrices, when they were kept (all vectors, method "gram")."""
        if self._gram is None and self._gram_lower is not None:
            self._gram = torch.stack([torch.from_numpy(_symmetric(g)) for g in self._gram_lower])
            self._gram_lower = None
        return self._gram

    @gram.setter
    def gram(self, g: torch.Tensor | None) -> None:
        self._gram, self._gram_lower = g, None

    def _gram_vectors(self, k: int) -> torch.Tensor:
        """Top-k eigenvectors of the Gram matrices (b, d, k): right vectors when tall, left ones when wide."""
        if self._tridiag is not None:
            return torch.stack([torch.from_numpy(t.vectors(k)) for t in self._tridiag])
        return self._right[..., :k]

    def left(self, k: int) -> torch.Tensor:
        """Top-k left singular vectors (b, m, k); columns of zero singular value are zero."""
        if self._left is not None:
            return self._left[..., :k]
        v = self._gram_vectors(k)
        if self._x is None:  # wide Gram matrix XXᵀ: its eigenvectors are the left vectors
            return v
        s = self.s[:, :k]
        u = _mm(self._x, v)
        return torch.where(s[:, None, :] > 0, u / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None, :], 0.0)

    def abs_cos_with_left(self, u: torch.Tensor) -> torch.Tensor:
        """|u0_iᵀ u_j| for ALL left singular vectors u0_i of these matrices: (b, d, k), rows of s = 0 zeroed."""
        if self._left is not None:
            c = self._left.mT @ u
        else:  # tall: u0_i = X v_i / s_i  =>  u0_iᵀ u_j = v_iᵀ (Xᵀ u_j) / s_i; never forms all of U0
            y = u if self._x is None else _mm(u.mT, self._x).mT
            if self._tridiag is None:
                c = self._right.mT @ y
            else:
                y = y.to(torch.float64).numpy()
                c = torch.stack([torch.from_numpy(t.vt(y[i])) for i, t in enumerate(self._tridiag)])
            if self._x is not None:
                c = c / self.s.clamp_min(torch.finfo(self.s.dtype).tiny)[..., None]
        keep = self.s > torch.tensor([_tol(float(sm), self.shape) for sm in self.s[:, 0]], dtype=self.s.dtype,
                                     device=self.s.device)[:, None]  # fmt: skip
        return torch.where(keep[..., None], c.abs(), 0.0)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX or XXᵀ, whichever is smaller: (b, d, d)."""
    return x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT


def _top_eigh(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a stack of symmetric matrices in the precision of ``g``, descending: ((b, k), (b, d, k)).

    torch's full ``eigh``: the path off the CPU (on the CPU, :func:`_lapack_eigh` computes only what is
    needed).
    """
    lam, vec = torch.linalg.eigh(g)
    return lam.flip(-1)[..., :k].double(), vec.flip(-1)[..., :k].double()


# ---- CPU: LAPACK through scipy, computing only what is needed ----------------------------------


def _syrk(x: np.ndarray) -> np.ndarray:
    """Lower triangle of XᵀX or XXᵀ (the smaller) of one matrix, by BLAS ``syrk`` (half a GEMM's work).

    Returns a Fortran-ordered (d, d) array in the precision of ``x``; its strict upper triangle is not
    meaningful (the LAPACK routines below read the lower one only; :func:`_symmetric` fills it).
    """
    import scipy.linalg.blas

    x = np.ascontiguousarray(x)
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (x,))
    # x.T is a Fortran-ordered view (n, m): trans=0 gives x.T·x = XᵀX (tall), trans=1 x·x.T = XXᵀ (wide)
    return syrk(1.0, x.T, trans=0 if x.shape[0] >= x.shape[1] else 1, lower=1)


def _symmetric(g_lower: np.ndarray) -> np.ndarray:
    """The full symmetric matrix whose lower triangle ``g_lower`` holds."""
    g = np.tril(g_lower)
    g += np.tril(g_lower, -1).T
    return g


def _lapack(names: tuple[str, ...], a: np.ndarray):
    import scipy.linalg.lapack

    return scipy.linalg.lapack.get_lapack_funcs(names, (a,))


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info={info})")


def _sytrd(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Householder tridiagonalisation QᵀGQ = T of the lower triangle of ``g`` (overwritten), d >= 2.

    Returns (reflectors, tau, diagonal, off-diagonal). sytrd(lower) stores Q = H(1)···H(d-1),
    H(i) = I - tau_i v_i v_iᵀ with v_i = (0, …, 0, 1, c[i+2:, i]), its 1 in row i+1: exactly QR's (geqrf)
    storage of the reflectors of the (d-1) × (d-1) block c[1:, :-1], so Q = diag(1, Q') with Q' applied
    by ``ormqr``.
    """
    sytrd, sytrd_lwork = _lapack(("sytrd", "sytrd_lwork"), g)
    d = g.shape[0]
    lwork, info = sytrd_lwork(d, lower=1)
    c, diag, off, tau, info = sytrd(g, lower=1, lwork=int(lwork) if info == 0 else max(1, d), overwrite_a=1)
    _check(info, "sytrd")
    return np.asfortranarray(c[1:, :-1]), tau, diag, off


def _apply_q(refl: np.ndarray | None, tau: np.ndarray | None, y: np.ndarray, trans: str) -> np.ndarray:
    """Q·y or Qᵀ·y for Q = diag(1, Q') given by :func:`_sytrd`'s reflectors (None: Q = I)."""
    out = np.array(y, dtype=refl.dtype if refl is not None else y.dtype, order="F")
    if refl is None or out.shape[1] == 0:
        return out
    (ormqr,) = _lapack(("ormqr",), refl)
    rest, _, info = ormqr("L", trans, refl, tau, out[1:], lwork=max(1, 64 * out.shape[1]), overwrite_c=1)
    _check(info, "ormqr")
    out[1:] = rest
    return out


def _lapack_eigh(g: np.ndarray, k: int | None, all_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigenvalues and the top-``k`` eigenvectors of a symmetric matrix, both descending.

    Reads only the lower triangle of ``g`` (and may overwrite it); fp32 or fp64 as ``g``. ``k``:
    0 = values only, None = all vectors. ``all_values``: all d eigenvalues, else only the top k.
    For 0 < k < d only what is needed is computed, as scipy's default ``eigh`` driver (``syevr``)
    does for a subset: Householder tridiagonalisation (``sytrd``), all eigenvalues of the tridiagonal
    matrix (``sterf``, no vectors, when ``all_values``), its top-k eigenpairs by MRRR (``stemr``),
    and back-transformation of those k vectors only (``ormqr`` with the reflectors). On one core:
    a 768 × 768 matrix with the top 64 vectors in ~0.6×, the top 10 in ~0.4× the time of a full
    ``eigh``; the same eigenvalues and vectors to rounding (tested against numpy).
    """
    d = g.shape[0]
    if k is not None and k >= d:
        k = None
    if d < 2 or k is None:
        import scipy.linalg

        lam, vec = scipy.linalg.eigh(g, lower=True, driver="evd", overwrite_a=True, check_finite=False)
        return lam[::-1], (None if k == 0 else vec[:, ::-1])
    refl, tau, diag, off = _sytrd(g)
    sterf, stemr = _lapack(("sterf", "stemr"), g)
    lam = None
    if all_values or k == 0:
        lam, info = sterf(diag.copy(), off.copy())
        _check(info, "sterf")
        lam = lam[::-1]
        if k == 0:
            return lam, None
    off_n = np.zeros(d, dtype=off.dtype)  # stemr takes the off-diagonal in a length-d workspace
    off_n[:-1] = off
    found, w, z, info = stemr(diag.copy(), off_n, 2, 0.0, 0.0, d - k + 1, d)  # range "I": the top k (1-based)
    if info != 0 or found != k:  # MRRR gave up (rare): divide and conquer on the tridiagonal matrix, all vectors
        (stevd,) = _lapack(("stevd",), g)
        w, z, info = stevd(diag, off, compute_v=1)
        _check(info, "stevd")
        w, z = w[d - k :], z[:, d - k :]
    if lam is None:
        lam = w[:k][::-1]
    return lam, _apply_q(refl, tau, z[:, k - 1 :: -1], "N")


def _lapack_eigh_implicit(g: np.ndarray) -> tuple[np.ndarray, _Tridiag]:
    """All eigenvalues (descending) and all eigenvectors as a :class:`_Tridiag` (Q never formed).

    ``sytrd`` then divide and conquer on the tridiagonal matrix (``stevd``); reads only the lower
    triangle of ``g`` and overwrites it. Saves ``eigh``'s back-transformation of all d vectors (O(d³)).
    """
    d = g.shape[0]
    if d < 2:
        lam, vec = _lapack_eigh(g, None)
        return lam, _Tridiag(None, None, np.ascontiguousarray(vec))
    refl, tau, diag, off = _sytrd(g)
    (stevd,) = _lapack(("stevd",), g)
    lam, z, info = stevd(diag, off, compute_v=1, overwrite_d=1, overwrite_e=1)
    _check(info, "stevd")
    return lam[::-1], _Tridiag(refl, tau, np.ascontiguousarray(z[:, ::-1]))


def _decompose_lapack(x: torch.Tensor, vectors: int | None, gram: torch.Tensor | None, top_only: bool) -> _Decomp:
    """The Gram method on the CPU with LAPACK through scipy (same arguments and result as :func:`_decompose`).

    Matrix by matrix in numpy (large numpy arrays are cheap to allocate: transparent huge pages).
    """
    b, m, n = x.shape
    d = min(m, n)
    k = d if vectors is None else min(vectors, d)
    tall = m >= n
    top = bool(top_only and vectors)
    dtype = np.float32 if top else np.float64  # fp64: singular values accurate to 1e-9 · s_max
    xn = x.detach().cpu().numpy()
    x64 = np.asarray(xn, dtype=np.float64) if tall and k else None  # for U = X V / s
    values, vecs, tridiag, lower = [], [], [], []
    for i in range(b):
        if gram is not None:
            g = np.asfortranarray(gram[i].detach().cpu().numpy(), dtype=dtype)
        else:
            g = _syrk(x64[i] if x64 is not None and dtype == np.float64 else np.asarray(xn[i], dtype=dtype))
        if vectors is None:  # all vectors (W0): implicit; the Gram matrix kept for W0 + low-rank updates
            lower.append(g.copy())
            lam, t = _lapack_eigh_implicit(g)
            tridiag.append(t)
        else:
            lam, vec = _lapack_eigh(g, k, all_values=not top)
            vecs.append(vec)
        values.append(np.sqrt(np.clip(lam.astype(np.float64), 0.0, None)))
    s = torch.from_numpy(np.stack(values))
    x64 = None if x64 is None else torch.from_numpy(x64)
    if not k:
        return _Decomp(s, (m, n))
    if vectors is None:
        dec = _Decomp(s, (m, n), x=x64, tridiag=tridiag)
        dec._gram_lower = lower
        return dec
    v = torch.from_numpy(np.stack(vecs).astype(np.float64))
    return _Decomp(s, (m, n), right=v, x=x64) if tall else _Decomp(s, (m, n), left=v)


def _decompose(
    x: torch.Tensor,
    vectors: int | None,
    method: str,
    gram: torch.Tensor | None = None,
    top_only: bool = False,
    lapack: bool | None = None,
) -> _Decomp:
    """Decompose a stack ``x`` (b, m, n); ``vectors``: 0 = values only, k = top-k left vectors, None = all.

    ``gram``: the Gram matrix of ``x`` when already known (method "gram"). ``top_only``: only the top
    ``vectors`` singular values/vectors are needed (the intruder test): the Gram matrix may then be
    formed in fp32 (it only has to resolve the leading directions) and only those eigenvectors are
    computed. ``lapack``: the Gram method through scipy's LAPACK (only the needed eigenpairs; default:
    on the CPU) or through torch (full ``eigh``; default elsewhere).
    """
    b, m, n = x.shape
    d = min(m, n)
    if method == "svd":
        x32 = x.to(torch.float32)
        if vectors == 0:
            return _Decomp(torch.linalg.svdvals(x32).double(), (m, n))
        u, s, _ = torch.linalg.svd(x32, full_matrices=False)
        k = d if vectors is None else min(vectors, d)
        return _Decomp(s.double(), (m, n), left=u[..., :k].double())
    if method != "gram":
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    if x.device.type == "cpu" if lapack is None else lapack:
        return _decompose_lapack(x.cpu(), vectors, None if gram is None else gram.cpu(), top_only)
    tall = m >= n
    k = d if vectors is None else min(vectors, d)
    if top_only and vectors:
        g = gram.to(torch.float32) if gram is not None else _gram(x.to(torch.float32))
        lam, vec = _top_eigh(g, k)
        s = lam.clamp_min(0).sqrt()
        if tall:
            return _Decomp(s, (m, n), right=vec, x=x.to(torch.float64))
        return _Decomp(s, (m, n), left=vec)
    x64 = x.to(torch.float64)
    g = gram if gram is not None else _gram(x64)  # fp64: accurate singular values down to 1e-9 · s_max
    if vectors == 0:
        lam = torch.linalg.eigvalsh(g)
        return _Decomp(lam.flip(-1).clamp_min(0).sqrt(), (m, n))
    lam, vec = torch.linalg.eigh(g)
    s = lam.flip(-1).clamp_min(0).sqrt()
    vec = vec.flip(-1)[..., :k]
    dec = _Decomp(s, (m, n), right=vec, x=x64) if tall else _Decomp(s, (m, n), left=vec)
    dec.gram = g
    return dec


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


def intruder_cosines(w0: torch.Tensor, w: torch.Tensor, top_k: int = INTRUDER_TOP_K, method: str = "gram"):
    """``max_i |u_jᵀ u0_i|`` for the top-k left singular vectors u_j of ``w`` (= W0 + ΔW) against all of W0's."""
    d0 = _decompose(as_matrix(w0)[None].float(), None, method)
    d1 = _decompose(as_matrix(w)[None].float(), top_k, method, top_only=True)
    return _intruder_max_cos(d0, d1, top_k)[0]


def _intruder_max_cos(d0: _Decomp, d1: _Decomp, top_k: int) -> np.ndarray:
    k = min(top_k, d1.s.shape[1])
    u = d1.left(k)
    cos = d0.abs_cos_with_left(u).amax(dim=1)  # (b, k)
    tol = torch.tensor([_tol(float(sm), d1.shape) for sm in d1.s[:, 0]], dtype=d1.s.dtype, device=d1.s.device)
    cos = torch.where(d1.s[:, :k] > tol[:, None], cos, torch.nan)  # vectors of zero singular value: undefined
    return cos.cpu().numpy()


def _is_finite(t) -> bool:
    if isinstance(t, LowRank):
        return _is_finite(t.B) and _is_finite(t.A)
    t = t.detach()
    if t.is_floating_point() and math.isfinite(float(t.sum())):  # a finite sum: no inf or NaN in t (fast path)
        return True
    return bool(torch.isfinite(t).all())


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, without a copy for a single tensor."""
    return ts[0][None] if len(ts) == 1 else torch.stack(ts)


def _chunks(names: list[str], shapes: dict[str, tuple[int, int]], chunk_bytes: int) -> list[list[str]]:
    """Layers grouped by shape (in order of first appearance), each group cut into chunks within the budget."""
    groups: dict[tuple[int, int], list[str]] = {}
    for n in names:
        groups.setdefault(shapes[n], []).append(n)
    out = []
    for (m, n), members in groups.items():
        per = max(1, chunk_bytes // (m * n * 8 * 4))  # fp64 copies: X, W0 + ΔW, products
        out += [members[i : i + per] for i in range(0, len(members), per)]
    return out


def _clean(v):
    """JSON-safe float (NaN -> None)."""
    v = float(v)
    return None if math.isnan(v) else v


def analyse(
    deltas: Mapping[str, Mapping[str, torch.Tensor | LowRank]],
    layers: Iterable[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    rank: int | None = None,
    reference: str = "ft",
    method: str = "gram",
    angle_ks: Sequence[int] = ANGLE_KS,
    overlap_max_k: int = OVERLAP_MAX_K,
    intruder_top_k: int = INTRUDER_TOP_K,
    intruder_thresholds: Sequence[float] = INTRUDER_THRESHOLDS,
    chunk_bytes: int = 512 * 2**20,
) -> dict:
    """Spectrum metrics of every solution's update for each layer.

    ``deltas`` maps a solution name ("ft", "lora", "randlora", ...) to {parameter name: ΔW}, ΔW a
    dense tensor (any dtype, >2-D viewed as (shape[0], -1)) or a :class:`LowRank` (LoRA factors:
    exact fast path). Values are read one chunk of layers at a time, so a lazy mapping keeps
    memory bounded. ``layers`` defaults to the 2-D parameters present in every solution, in
    natural order.

    Optional: ``base`` {parameter name: W0} adds intruder dimensions; ``rank`` (default: the r of
    the first :class:`LowRank` found) adds ``energy_beyond_rank`` and k = r to the angle set; the
    ``reference`` solution (default "ft"), when present, adds ``similarity_to_ft`` to the others.

    Returns ``{"layers": [{"name", "shape": [out, in], <solution>: metrics, ...}, ...],
    "settings": {...}}`` with solutions in the order of ``deltas`` (module docstring: definitions).

    Off the CPU, layers of equal shape are stacked in chunks of at most ``chunk_bytes`` for batched
    torch calls; on the CPU (method "gram": LAPACK, matrix by matrix) one layer at a time, as stacking
    would only copy.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    names = _default_layers(deltas) if layers is None else list(layers)
    sols = list(deltas)
    if rank is None:
        rank = next((v.r for params in deltas.values() for v in params.values() if isinstance(v, LowRank)), None)
    ref = reference if reference in deltas else None
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        for solution, params in deltas.items():
            if name not in params:
                raise KeyError(f"solution {solution!r} has no parameter {name!r}")
            t = params[name]
            if t.ndim < 2:
                raise ValueError(f"need a 2-D (or higher) update, got shape {tuple(t.shape)}")
            shape = (int(t.shape[0]), int(math.prod(t.shape[1:])))
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}: shape {list(shape)} in {solution!r} != {list(shapes[name])}")
        if base is not None and (name not in base or tuple(as_matrix(base[name]).shape) != shapes[name]):
            raise KeyError(f"base weights lack {name!r} {list(shapes[name])}")

    results: dict[str, dict] = {n: {"name": n, "shape": list(shapes[n])} for n in names}
    bar = tqdm(total=len(names), desc="spectrum", unit="layer", disable=not progress)
    if device is not None:
        where = torch.device(device)
    elif names:  # None: where the tensors are
        first = next(iter(deltas.values()))[names[0]]
        where = (first.B if isinstance(first, LowRank) else first).device
    else:
        where = torch.device("cpu")
    on_cpu = method == "gram" and where.type == "cpu"
    for chunk in _chunks(names, shapes, 1 if on_cpu else chunk_bytes):
        m, n = shapes[chunk[0]]
        d = min(m, n)
        kvec = min(d, max([overlap_max_k, *angle_ks, rank or 0]))  # vectors kept for the similarity
        ks = sorted({k for k in (*angle_ks, *([rank] if rank else [])) if 1 <= k <= d})
        w0 = d0 = None
        if base is not None:
            w0 = _stack([as_matrix(base[nm]).detach().to(device=device, dtype=torch.float32) for nm in chunk])
            d0 = _decompose(w0, None, method)
        left: dict[str, tuple[np.ndarray, list[int]]] = {}
        for solution in sols:
            items = [deltas[solution][nm] for nm in chunk]
            for nm, t in zip(chunk, items, strict=True):
                if not _is_finite(t):
                    raise ValueError(
                        f"{solution!r} {nm}: update contains NaN or inf; its singular values are undefined"
                    )
            lowrank = all(isinstance(t, LowRank) for t in items) and len({t.r for t in items}) == 1
            if lowrank:
                B = _stack([t.B.detach().to(device=device, dtype=torch.float64) for t in items])
                A = _stack([t.A.detach().to(device=device, dtype=torch.float64) for t in items])
                scale = torch.tensor([float(t.scale) for t in items], dtype=torch.float64, device=B.device)
                u, s, _ = lowrank_svd(B * scale[:, None, None], A)
                s_full = torch.zeros(len(items), d, dtype=torch.float64, device=B.device)
                s_full[:, : min(s.shape[1], d)] = s[:, :d]
                s_all, u_top = s_full, u[..., :kvec]
                dense = None
            else:
                dense = _stack(
                    [
                        (t.dense() if isinstance(t, LowRank) else as_matrix(t).detach()).to(
                            device=device, dtype=torch.float32
                        )
                        for t in items
                    ]  # fmt: skip
                )
                dec = _decompose(dense, kvec, method)
                s_all, u_top = dec.s, dec.left(kvec)
            s_np = s_all.to(torch.float32).cpu().numpy()
            u_np = u_top.cpu().numpy()
            ranks = []
            for i, nm in enumerate(chunk):
                metrics = spectrum_metrics(s_np[i], (m, n))
                if rank:
                    s64 = np.sort(s_np[i].astype(np.float64))[::-1]
                    total = float(np.sum(s64**2))
                    metrics["energy_beyond_rank"] = float(np.sum(s64[rank:] ** 2) / total) if total > 0 else 0.0
                ranks.append(metrics["rank"])
                results[nm][solution] = metrics
            left[solution] = (u_np, ranks)
            if d0 is not None:
                gram = None
                if dense is None:
                    bs = B * scale[:, None, None]
                    w064 = w0.double() if d0._x is None else d0._x  # tall on the CPU: W0 in fp64 already there
                    w = w064 + _mm(bs, A)
                    if method == "gram":  # Gram of W0 + B·A from W0's: no (out × in)² product
                        if m >= n:
                            c = _mm(_mm(w064.mT, bs), A)
                            gram = d0.gram + c + c.mT + A.mT @ (bs.mT @ bs) @ A
                        else:
                            c = bs @ _mm(A, w064.mT)
                            gram = d0.gram + c + c.mT + bs @ (A @ A.mT) @ bs.mT
                else:
                    w = torch.from_numpy(w0.numpy() + dense.numpy()) if w0.device.type == "cpu" else w0 + dense
                del dense
                d1 = _decompose(w, intruder_top_k, method, gram=gram, top_only=True)
                max_cos = _intruder_max_cos(d0, d1, intruder_top_k)
                del d1, gram
                del w
                for i, nm in enumerate(chunk):
                    mc = max_cos[i]
                    results[nm][solution]["intruders"] = {
                        "max_cos": [_clean(v) for v in mc],
                        "count": {str(eps): int(np.sum(mc < eps)) for eps in intruder_thresholds},  # NaN < eps: False
                    }
        if ref is not None:
            u_ref, r_ref = left[ref]
            kmax = min(overlap_max_k, d)
            for solution in sols:
                if solution == ref:
                    continue
                u_a, r_a = left[solution]
                for i, nm in enumerate(chunk):
                    qa, qb = u_a[i][:, : min(r_a[i], kvec)], u_ref[i][:, : min(r_ref[i], kvec)]
                    results[nm][solution][f"similarity_to_{ref}"] = {
                        "principal_angles_deg": {
                            str(k): [float(v) for v in principal_angles(qa[:, :k], qb[:, :k])] for k in ks
                        },
                        "overlap": [float(v) for v in overlap_curve(qa, qb, kmax)],
                    }
        del w0, d0, left
        bar.update(len(chunk))
    bar.close()
    settings = {
        "method": method,
        "lora_rank": rank,
        "reference": ref,
        "angle_ks": sorted({*angle_ks, *([rank] if rank else [])}),
        "overlap_max_k": overlap_max_k,
        "intruders": None
        if base is None
        else {"top_k": intruder_top_k, "thresholds": list(intruder_thresholds), "vectors": "left"},
    }
    return {"layers": [results[n] for n in names], "settings": settings}


def scalar_rows(spectrum: Mapping) -> tuple[list[str], list[dict]]:
    """One row per layer × solution with the scalar metrics (for ``spectrum.csv``)."""
    settings = spectrum.get("settings", {})
    ks = settings.get("angle_ks") or []
    thresholds = (settings.get("intruders") or {}).get("thresholds") or []
    ref = settings.get("reference")
    cols = ["layer", "out", "in", "solution", "rank", "effective_rank", "stable_rank", "energy_rank_90",
            "energy_rank_99", "energy_beyond_rank", "s_max"]  # fmt: skip
    cols += [f"overlap_k{k}" for k in ks] + [f"mean_angle_deg_k{k}" for k in ks] + [f"max_angle_deg_k{k}" for k in ks]
    cols += [f"intruders_eps{t}" for t in thresholds]
    rows = []
    for layer in spectrum["layers"]:
        for sol, met in layer.items():
            if sol in ("name", "shape"):
                continue
            sv = met.get("singular_values") or [0.0]
            row = {"layer": layer["name"], "out": layer["shape"][0], "in": layer["shape"][1], "solution": sol,
                   "s_max": sv[0]}  # fmt: skip
            for key in ("rank", "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99",
                        "energy_beyond_rank"):  # fmt: skip
                row[key] = met.get(key)
            sim = met.get(f"similarity_to_{ref}") if ref else None
            for k in ks:
                angles = (sim or {}).get("principal_angles_deg", {}).get(str(k))
                curve = (sim or {}).get("overlap") or []
                row[f"overlap_k{k}"] = curve[k - 1] if sim and k <= len(curve) else None
                row[f"mean_angle_deg_k{k}"] = float(np.mean(angles)) if angles else None
                row[f"max_angle_deg_k{k}"] = float(np.max(angles)) if angles else None
            for t in thresholds:
                row[f"intruders_eps{t}"] = (met.get("intruders") or {}).get("count", {}).get(str(t))
            rows.append(row)
    return cols, rows


def write_csv(spectrum: Mapping, path) -> None:
    import csv
    import io

    from landscape import store

    cols, rows = scalar_rows(spectrum)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})
    store.write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Solutions and the command-line interface
# ---------------------------------------------------------------------------------------------

PROG = "python -m landscape.spectrum"


def adapted_layers(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The matrix-shaped weights every solution changes (a convolution as out × in·kh·kw), minus the
    classification head (trained in full by all)."""
    return [n for n in _default_layers(deltas) if not n.startswith(HEAD + ".")]


def lora_factors(sol) -> dict[str, LowRank]:
    """{parameter name: LowRank(B, A, scaling)} of a LoRA ``Solution``, read through peft.

    Loads the adapter with ``PeftModel.from_pretrained(copy.deepcopy(sol.base), sol.path)`` and
    takes each LoRA layer's ``lora_A['default'].weight``, ``lora_B['default'].weight`` and
    ``scaling['default']``. Layers whose update is not B·A (DoRA, convolutions) are left out:
    the caller uses their dense ΔW.
    """
    import copy

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from adapters.solution import PEFT_PREFIX, peft_config_of

    model = PeftModel.from_pretrained(copy.deepcopy(sol.base), sol.path, config=peft_config_of(sol.path))
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get("default", False):
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
            continue  # convolutional LoRA: keep the dense update
        B, A = b.weight.detach().float().clone(), a.weight.detach().float().clone()
        if getattr(module, "fan_in_fan_out", False):  # peft transposes B·A for Conv1D-style weights
            B, A = A.T.contiguous(), B.T.contiguous()
        weight = getattr(module, "adapted_weight", "weight")  # attention: in_proj_weight
        out[f"{name.removeprefix(PEFT_PREFIX)}.{weight}"] = LowRank(B, A, float(module.scaling["default"]))
    return out


def solution_deltas(sol, fast: bool = True) -> dict:
    """A solution's updates for :func:`analyse`: LoRA layers as exact factors (fast path), others dense."""
    delta = dict(sol.delta())
    if fast and sol.method == "lora":
        for key, low in lora_factors(sol).items():
            if key in delta and tuple(low.shape) == tuple(as_matrix(delta[key]).shape):
                delta[key] = low
    return delta


def write_spectrum(solutions: Mapping, out, device=None, progress: bool = True, method: str = "gram") -> dict:
    """Analyse the ΔW of each solution; write spectrum.json/csv/png and rank/similarity.png/pdf under ``out``."""
    from pathlib import Path

    from landscape import render, store

    out = Path(out)
    deltas = {name: solution_deltas(sol) for name, sol in solutions.items()}
    lora = next((s for s in solutions.values() if s.method == "lora"), None)
    rank = int(lora.info["rank"]) if lora is not None and lora.info.get("rank") else None
    ref = next((n for n, s in solutions.items() if s.method == "ft"), "ft")
    first = next(iter(solutions.values()))
    base = dict(first.base.named_parameters())
    result = analyse(deltas, layers=adapted_layers(deltas), progress=progress, device=device, base=base,
                     rank=rank, reference=ref, method=method)  # fmt: skip
    result["solutions"] = {
        name: {"method": sol.method, "rank": sol.info.get("rank"), "path": str(sol.path)}
        for name, sol in solutions.items()
    }
    store.write_json(out / "spectrum.json", result)
    write_csv(result, out / "spectrum.csv")
    render.spectrum_figure(result, out / "spectrum.png")
    render.rank_figure(result, out / "rank.png", out / "rank.pdf")
    if any(f"similarity_to_{result['settings']['reference']}" in met for met in result["layers"][0].values()
           if isinstance(met, dict)):  # fmt: skip
        render.similarity_figure(result, out / "similarity.png", out / "similarity.pdf")
    return result


OUTPUTS = ("spectrum.json", "spectrum.csv", "spectrum.png", "rank.png", "rank.pdf", "similarity.png", "similarity.pdf")


def build_parser():
    from landscape.cli import Parser

    p = Parser(
        prog=PROG,
        description="Singular-value spectra, rank metrics, similarity to full fine-tuning and intruder dimensions "
        "of the weight updates ΔW of saved solutions: the ft, lora and randlora solutions of a run (--run), or "
        "solution folders given one by one (--solution NAME=PATH ...).",
    )
    p.add_argument("--run", default=None, help="run folder holding solutions/{ft,lora,randlora}")
    p.add_argument(
        "--solution",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="solution folders written by this tool, or peft adapter folders (adapter_config.json; need --base "
        "and --num-classes); NAME is free (the ft one is the similarity reference, the lora one gives r)",
    )
    p.add_argument("--base", default=None, help="model name of the base (default: from the solutions' solution.json)")
    p.add_argument("--num-classes", type=int, default=None, help="class count of the base model's head")
    p.add_argument("--out", default=None, help="where to write the outputs (default: the run folder)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device for the SVDs")
    p.add_argument("--method", default="gram", choices=METHODS, help="fp64 Gram eigendecomposition or fp32 SVD")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_given(items: Sequence[str], model: str | None, num_classes: int | None) -> dict:
    import json
    from pathlib import Path

    from adapters.errors import UserError
    from adapters.solution import Solution, _compute_delta, check_base, load_solution, read_info

    parsed = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--solution takes NAME=PATH (got '{item}')")
        if name in dict(parsed):
            raise UserError(f"--solution {name} given twice")
        parsed.append((name, Path(path)))
    infos = {}
    for name, path in parsed:
        if not path.is_dir():
            raise UserError(f"solution folder {path} does not exist: pass a folder written by landscape.connectivity")
        if (path / "solution.json").exists():
            infos[name] = read_info(path)
        elif (path / "adapter_config.json").exists():
            try:
                cfg = json.loads((path / "adapter_config.json").read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}/adapter_config.json is corrupt ({e.msg})") from None
            method = {"LORA": "lora", "RANDLORA": "randlora"}.get(str(cfg.get("peft_type", "")).upper())
            if method is None:
                raise UserError(f"{path}: peft type {cfg.get('peft_type')!r} is not supported (LORA or RANDLORA)")
            if model is None or num_classes is None:
                raise UserError(f"{path} is a bare peft adapter: pass --base MODEL_NAME and --num-classes N")
            infos[name] = {"method": method, "model": model, "num_classes": num_classes, "rank": cfg.get("r"),
                           "name": name, "peft_only": True}  # fmt: skip
        else:
            raise UserError(f"{path} has neither solution.json nor adapter_config.json: not a solution folder")
    model = model or next(iter(infos.values()))["model"]
    classes = num_classes or int(next(iter(infos.values()))["num_classes"])
    for name, info in infos.items():
        if info["model"] != model:
            raise UserError(f"--solution {name} was trained from {info['model']}, not {model}: pass matching solutions")
    from adapters.solution import build_base

    first = next(iter(infos.values()))
    names = first.get("classes") if int(first.get("num_classes", -1)) == classes else None
    base = build_base({**first, "model": model, "num_classes": classes, "classes": names})
    solutions = {}
    for name, path in parsed:
        info = infos[name]
        if info.get("peft_only"):
            sol = Solution(path=path, info=info, metrics={}, base=base)
            check_base(path, info, base)
            sol._delta = _compute_delta(sol)
        else:
            sol = load_solution(path, base=base)
        solutions[name] = sol
    return solutions


def _run(argv=None) -> None:
    from pathlib import Path

    from adapters.errors import UserError
    from adapters.solution import load_solution
    from landscape.cli import resolve_device

    args = build_parser().parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError("--num-classes must be >= 1")
    if args.run is None and not args.solution:
        raise UserError("pass --run DIR (a run folder) or --solution NAME=PATH ... (solution folders)")
    device = resolve_device(args.device)
    if args.solution:
        solutions = _load_given(args.solution, args.base, args.num_classes)
    else:
        run = Path(args.run)
        if not (run / "solutions").is_dir():
            raise UserError(f"{run} has no solutions/ folder: pass a run folder written by landscape.connectivity")
        solutions, base = {}, None
        for name in ("ft", "lora", "randlora"):
            sol = load_solution(run / "solutions" / name, base=base)
            base = sol.base
            solutions[name] = sol
    if args.out:
        out = Path(args.out)
    elif args.run:
        out = Path(args.run)
    else:
        raise UserError("--solution needs --out DIR (where to write the results)")
    out.mkdir(parents=True, exist_ok=True)
    write_spectrum(solutions, out, device=device, progress=not args.no_progress, method=args.method)
    print(f"wrote {out}/spectrum.{{json,csv,png}}, rank.{{png,pdf}} and similarity.{{png,pdf}}")


def main(argv=None) -> int:
    from landscape.cli import run_main

    return run_main(_run, argv, PROG)


if __name__ == "__main__":
    import sys

    sys.exit(main())
