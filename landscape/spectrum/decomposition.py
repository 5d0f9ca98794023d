"""The linear algebra of the spectral analysis: singular values and vectors of stacks of updates.

Two methods: ``"gram"`` (default), the eigendecomposition of the fp64 Gram matrix XᵀX or XXᵀ of the fp32
update on its smaller side (at least as accurate as an fp32 SVD for every singular value above
1e-9 · s_max, i.e. far below the rank tolerance), and ``"svd"``, ``torch.linalg.svd`` in fp32. For the
intruder test only the top vectors of W0 + ΔW are needed: their Gram matrix may be fp32 (``top_only``).

On the CPU the Gram method runs matrix by matrix through LAPACK (scipy) and computes only what is needed
(:func:`lapack_eigh`): the Gram matrix by ``syrk``; all eigenvalues (``sytrd`` + ``sterf``) but only the
top-k eigenvectors (MRRR ``stemr``, and back-transformation of those vectors only); for W0 all
eigenvectors of its tridiagonal form (``stevd``), the Householder Q applied to the few vectors it meets,
never formed (:class:`Tridiag`). Off the CPU, torch's batched ``eigh`` on stacks of equal shape.

A LoRA update given by its factors (:class:`LowRank`, ΔW = s·B·A) never goes dense for its spectrum:
QR of B and of Aᵀ and the SVD of the r×r core s·R_B·R_Aᵀ give its singular values exactly and its
singular vectors as Q_B·U_core, Q_A·V_core (:func:`lowrank_svd`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from landscape.spectrum.metrics import rank_tol

METHODS = ("gram", "svd")


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


@dataclass
class LowRank:
    """A factored update ΔW = scale · B · A, B: (out, r), A: (r, in). Never made dense for its spectrum.

    ``kind``: ``"lora"`` (r is LoRA's rank) or ``"randlora"`` (B and A are RandLoRA's scaled bases, r = the
    number of bases × their rank: not a rank the analysis compares against)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0
    kind: str = "lora"

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


def is_finite(t: torch.Tensor | LowRank) -> bool:
    """No NaN or inf in a dense update or in a :class:`LowRank`'s factors."""
    if isinstance(t, LowRank):
        return is_finite(t.B) and is_finite(t.A)
    t = t.detach()
    if t.is_floating_point() and math.isfinite(float(t.sum())):  # a finite sum: no inf or NaN in t (fast path)
        return True
    return bool(torch.isfinite(t).all())


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


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on the CPU through numpy's BLAS (OpenBLAS: 2× faster than torch's MKL for these tall-skinny
    fp64 products, measured on one core of an AMD EPYC), elsewhere torch."""
    if a.device.type == "cpu" and b.device.type == "cpu":
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return a @ b


class Tridiag:
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


class Decomp:
    """Singular values of a stack of matrices (b, m, n) and access to their singular vectors.

    The vectors come as left vectors (``left``), as right vectors with the matrices (``right``, ``x``:
    tall Gram path, U = X V / s), or, for all vectors of a Gram matrix on the CPU, as
    :class:`Tridiag` per matrix (``tridiag``; with ``x`` when tall). ``x`` is public: the intruder test of
    a LoRA update reuses W0 in fp64 from it. For all vectors on the CPU (W0) the fp64 matrices are not kept
    (each is 2× the fp32 matrix, for as long as the layer is analysed), nor their Gram matrices beyond
    :data:`KEEP_GRAM_BYTES`: ``x`` and ``gram`` make them again from the matrices (``source``) on each access,
    with the same values.
    """

    def __init__(self, s: torch.Tensor, shape: tuple[int, int], left=None, right=None, x=None, tridiag=None,
                 gram_lower: list[np.ndarray] | None = None, source: np.ndarray | None = None):  # fmt: skip
        self.s = s  # (b, d) float64, descending (intruder test: possibly only the top k)
        self.shape = shape
        self._x = x  # (b, m, n) float64 matrices, for U = X V / s (tall Gram path), or None
        self._source = source  # (b, m, n) matrices (numpy) whose fp64 copy is x / gives the Gram matrix, or None
        self._left = left  # (b, m, k) left vectors, or None
        self._right = right  # (b, n, k) right vectors (tall Gram path: U = X V / s), or None
        self._tridiag = tridiag  # [Tridiag] per matrix: all eigenvectors of the Gram matrices, or None
        self._gram = None  # the fp64 Gram matrices (b, d, d), when kept
        self._gram_lower = gram_lower  # or their lower triangles (numpy, per matrix), symmetrised on first use

    @property
    def has_x(self) -> bool:
        """Whether the left vectors come as U = X V / s (tall Gram path)."""
        return self._x is not None or (self._source is not None and self.shape[0] >= self.shape[1])

    @property
    def x(self) -> torch.Tensor | None:
        """The fp64 matrices (b, m, n) of the tall Gram path, else None; made from ``source`` on each access."""
        if self._x is not None or not self.has_x:
            return self._x
        return torch.from_numpy(np.asarray(self._source, dtype=np.float64))

    @property
    def gram(self) -> torch.Tensor | None:
        """The fp64 Gram matrices (all vectors, method "gram"): kept ones, else made from ``source`` (not kept)."""
        if self._gram is None and self._gram_lower is not None:
            self._gram = torch.stack([torch.from_numpy(symmetric(g)) for g in self._gram_lower])
            self._gram_lower = None
        if self._gram is None and self._source is not None:
            grams = [torch.from_numpy(symmetric(syrk(np.asarray(x, dtype=np.float64)))) for x in self._source]
            return grams[0][None] if len(grams) == 1 else torch.stack(grams)
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
        if not self.has_x:  # wide Gram matrix XXᵀ: its eigenvectors are the left vectors
            return v
        s = self.s[:, :k]
        u = matmul(self.x, v)
        return torch.where(s[:, None, :] > 0, u / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None, :], 0.0)

    def abs_cos_with_left(self, u: torch.Tensor) -> torch.Tensor:
        """|u0_iᵀ u_j| for ALL left singular vectors u0_i of these matrices: (b, d, k), rows of s = 0 zeroed."""
        if self._left is not None:
            c = self._left.mT @ u
        else:  # tall: u0_i = X v_i / s_i  =>  u0_iᵀ u_j = v_iᵀ (Xᵀ u_j) / s_i; never forms all of U0
            y = matmul(u.mT, self.x).mT if self.has_x else u
            if self._tridiag is None:
                c = self._right.mT @ y
            else:
                y = y.to(torch.float64).numpy()
                c = torch.stack([torch.from_numpy(t.vt(y[i])) for i, t in enumerate(self._tridiag)])
            if self.has_x:
                c = c / self.s.clamp_min(torch.finfo(self.s.dtype).tiny)[..., None]
        keep = self.s > torch.tensor([rank_tol(float(sm), self.shape) for sm in self.s[:, 0]], dtype=self.s.dtype,
                                     device=self.s.device)[:, None]  # fmt: skip
        return torch.where(keep[..., None], c.abs(), 0.0)


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """XᵀX or XXᵀ, whichever is smaller: (b, d, d)."""
    return x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT


def top_eigh(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a stack of symmetric matrices in the precision of ``g``, descending: ((b, k), (b, d, k)).

    torch's full ``eigh``: the path off the CPU (on the CPU, :func:`lapack_eigh` computes only what is
    needed).
    """
    lam, vec = torch.linalg.eigh(g)
    return lam.flip(-1)[..., :k].double(), vec.flip(-1)[..., :k].double()


# ---- CPU: LAPACK through scipy, computing only what is needed ----------------------------------


def syrk(x: np.ndarray) -> np.ndarray:
    """Lower triangle of XᵀX or XXᵀ (the smaller) of one matrix, by BLAS ``syrk`` (half a GEMM's work).

    Returns a Fortran-ordered (d, d) array in the precision of ``x``; its strict upper triangle is not
    meaningful (the LAPACK routines below read the lower one only; :func:`symmetric` fills it).
    """
    import scipy.linalg.blas

    x = np.ascontiguousarray(x)
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (x,))
    # x.T is a Fortran-ordered view (n, m): trans=0 gives x.T·x = XᵀX (tall), trans=1 x·x.T = XXᵀ (wide)
    return syrk(1.0, x.T, trans=0 if x.shape[0] >= x.shape[1] else 1, lower=1)


def symmetric(g_lower: np.ndarray) -> np.ndarray:
    """The full symmetric matrix whose lower triangle ``g_lower`` holds."""
    g = np.tril(g_lower)
    g += np.tril(g_lower, -1).T
    return g


_CONTROLLER: list = []  # the threadpoolctl controller, made once (it scans the loaded libraries)


def one_blas_thread():
    """Context: the BLAS/LAPACK libraries that numpy and scipy load (OpenBLAS) on one thread.

    Why: the Householder tridiagonalisation (``sytrd``) and the application of its reflectors (``ormqr``) are
    dominated by matrix-vector products in many small parallel regions, and OpenBLAS's threads spin while they
    wait. Measured on the 2-core Xeon beside other work (load average ~5), ``sytrd`` of a 768 × 768 fp64 matrix:
    0.02-0.07 s on one thread, 3.3-4.5 s on two; in the CIFAR smoke run's spectrum these two routines took
    80 % of the time. On one thread they are memory-bound and lose little when the machine is quiet. The CPU
    analysis (:func:`landscape.spectrum.analysis.analyse`) holds it over its whole pass, so that no idle BLAS
    thread spins between these calls either. Without threadpoolctl installed: unchanged."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")


def _on_one_blas_thread(f):
    """Run ``f`` inside :func:`one_blas_thread`."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return f(*args, **kwargs)

    return wrapper


def _lapack(names: tuple[str, ...], a: np.ndarray):
    import scipy.linalg.lapack

    if not hasattr(scipy.linalg.lapack, "dstevd"):  # scipy < 1.16 wraps only stev: same call, same results
        names = tuple("stev" if n == "stevd" else n for n in names)
    return scipy.linalg.lapack.get_lapack_funcs(names, (a,))


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info={info})")


@_on_one_blas_thread
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


@_on_one_blas_thread
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


@_on_one_blas_thread
def lapack_eigh(g: np.ndarray, k: int | None, all_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
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
    if d < 2:  # a 1 x 1 matrix is its own eigenvalue (scipy < 1.12's syevd asks LAPACK for too little workspace)
        return g.diagonal().copy(), (None if k == 0 else np.eye(d, dtype=g.dtype))
    if k is None:
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


@_on_one_blas_thread
def lapack_eigh_implicit(g: np.ndarray) -> tuple[np.ndarray, Tridiag]:
    """All eigenvalues (descending) and all eigenvectors as a :class:`Tridiag` (Q never formed).

    ``sytrd`` then divide and conquer on the tridiagonal matrix (``stevd``); reads only the lower
    triangle of ``g`` and overwrites it. Saves ``eigh``'s back-transformation of all d vectors (O(d³)).
    """
    d = g.shape[0]
    if d < 2:
        lam, vec = lapack_eigh(g, None)
        return lam, Tridiag(None, None, np.ascontiguousarray(vec))
    refl, tau, diag, off = _sytrd(g)
    (stevd,) = _lapack(("stevd",), g)
    lam, z, info = stevd(diag, off, compute_v=1, overwrite_d=1, overwrite_e=1)
    _check(info, "stevd")
    return lam[::-1], Tridiag(refl, tau, np.ascontiguousarray(z[:, ::-1]))


# W0's fp64 Gram matrix (all vectors, implicit) is kept for the layer's low-rank updates (W0 + B·A's Gram matrix
# from it) when it takes at most this: a CLIP ViT-B layer's (768², 4.7 MB) is kept, saving one syrk per layer and
# LoRA solution (3 s of the CIFAR smoke's spectrum); an LLM's (4096², 134 MB) is made again, as memory comes first.
KEEP_GRAM_BYTES = 32 << 20


def _decompose_lapack(x: torch.Tensor, vectors: int | None, gram: torch.Tensor | None, top_only: bool) -> Decomp:
    """The Gram method on the CPU with LAPACK through scipy (same arguments and result as :func:`decompose`).

    Matrix by matrix in numpy (large numpy arrays are cheap to allocate: transparent huge pages).
    """
    b, m, n = x.shape
    d = min(m, n)
    k = d if vectors is None else min(vectors, d)
    tall = m >= n
    top = bool(top_only and vectors)
    dtype = np.float32 if top else np.float64  # fp64: singular values accurate to 1e-9 · s_max
    xn = x.detach().cpu().numpy()
    implicit = vectors is None and gram is None  # W0: its fp64 copy and Gram matrix made again when needed
    x64 = np.asarray(xn, dtype=np.float64) if tall and k and not implicit else None  # for U = X V / s
    values, vecs, tridiag, lower = [], [], [], []
    for i in range(b):
        if gram is not None:
            g = np.asfortranarray(gram[i].detach().cpu().numpy(), dtype=dtype)
        else:
            g = syrk(x64[i] if x64 is not None and dtype == np.float64 else np.asarray(xn[i], dtype=dtype))
        if vectors is None:  # all vectors (W0): implicit; a given Gram matrix kept for W0 + low-rank updates
            if gram is not None or g.nbytes <= KEEP_GRAM_BYTES:
                lower.append(g.copy())
            lam, t = lapack_eigh_implicit(g)
            tridiag.append(t)
        else:
            lam, vec = lapack_eigh(g, k, all_values=not top)
            vecs.append(vec)
        values.append(np.sqrt(np.clip(lam.astype(np.float64), 0.0, None)))
    s = torch.from_numpy(np.stack(values))
    x64 = None if x64 is None else torch.from_numpy(x64)
    if not k:
        return Decomp(s, (m, n))
    if vectors is None:
        return Decomp(s, (m, n), x=x64, tridiag=tridiag, gram_lower=lower or None, source=xn if implicit else None)
    v = torch.from_numpy(np.stack(vecs).astype(np.float64))
    return Decomp(s, (m, n), right=v, x=x64) if tall else Decomp(s, (m, n), left=v)


def decompose(
    x: torch.Tensor,
    vectors: int | None,
    method: str,
    gram: torch.Tensor | None = None,
    top_only: bool = False,
    lapack: bool | None = None,
) -> Decomp:
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
            return Decomp(torch.linalg.svdvals(x32).double(), (m, n))
        u, s, _ = torch.linalg.svd(x32, full_matrices=False)
        k = d if vectors is None else min(vectors, d)
        return Decomp(s.double(), (m, n), left=u[..., :k].double())
    if method != "gram":
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    if x.device.type == "cpu" if lapack is None else lapack:
        return _decompose_lapack(x.cpu(), vectors, None if gram is None else gram.cpu(), top_only)
    tall = m >= n
    k = d if vectors is None else min(vectors, d)
    if top_only and vectors:
        g = gram.to(torch.float32) if gram is not None else gram_matrix(x.to(torch.float32))
        lam, vec = top_eigh(g, k)
        s = lam.clamp_min(0).sqrt()
        if tall:
            return Decomp(s, (m, n), right=vec, x=x.to(torch.float64))
        return Decomp(s, (m, n), left=vec)
    x64 = x.to(torch.float64)
    g = gram if gram is not None else gram_matrix(x64)  # fp64: accurate singular values down to 1e-9 · s_max
    if vectors == 0:
        lam = torch.linalg.eigvalsh(g)
        return Decomp(lam.flip(-1).clamp_min(0).sqrt(), (m, n))
    lam, vec = torch.linalg.eigh(g)
    s = lam.flip(-1).clamp_min(0).sqrt()
    vec = vec.flip(-1)[..., :k]
    dec = Decomp(s, (m, n), right=vec, x=x64) if tall else Decomp(s, (m, n), left=vec)
    dec.gram = g
    return dec
