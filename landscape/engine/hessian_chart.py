"""The Hessian eigen-direction chart (``--chart hessian``): the plane through one solution θ* spanned by the top-2
eigenvectors of the Hessian of the loss there, as PyHessian draws it.

``θ(x, y) = θ* + x·q₁ + y·q₂``, q₁ and q₂ the Ritz vectors of the two largest (algebraic) eigenvalues λ₁ ≥ λ₂,
unit-norm and orthogonal in the chosen coordinates (all weights, or the centre's adapter parameters). Along an
axis the loss is L(θ*) + α·g·q + ½λα² + O(α³), so:

- **Range.** Both axes span [−α, α] with ½λ₁α² = Δ (:data:`DEFAULT_RISE` nats by default): along q₁ the quadratic
  model of the loss rises by Δ at the edge, along q₂ by ½λ₂α² ≤ Δ (the same scale on both axes, so the picture's
  lengths are Euclidean).
- **Check.** The central second difference (L(h) − 2L(0) + L(−h)) / h² along each axis equals that axis's
  eigenvalue up to O(h²) (the odd terms cancel) and the loss's rounding, ε·L/h²; h = α / :data:`STEP_FRACTION`.

The eigenvectors come from Lanczos with full reorthogonalisation (:func:`landscape.lanczos.lanczos`, the curvature
solver's) on any Hessian-vector product, stopped when the top two Ritz pairs' residuals are below tol·|θ|
(ARPACK's test); the Ritz vectors are formed from the host basis. Pure maths: the caller supplies the product
(:class:`landscape.curvature.HessianOperator`'s ``flat_hvp``) and the evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from adapters.errors import UserError
from landscape.engine.plane import Chart, random_chart
from landscape.lanczos import lanczos

DEFAULT_RISE = 1.0  # Δ: nats the quadratic model of the loss rises along q₁ at the edge of the chart
STEP_FRACTION = 10.0  # the check's h = α / STEP_FRACTION (tiny-bert, fp32: α/30 is worse, rounding dominates)
TOL = 1e-6  # the Ritz residual test: ‖Hq − θq‖ ≤ TOL·|θ| (tight: the axes must be eigenvectors, not only θ)
MAX_VECTORS = 120


def _tridiagonal(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(alpha, dtype=np.float64)
    return eigh_tridiagonal(a, np.asarray(beta[: len(a) - 1], dtype=np.float64))


def top_eigenpairs(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    device: torch.device | str,
    dtype: torch.dtype,
    k: int = 2,
    tol: float = TOL,
    seed: int = 0,
    max_vectors: int = MAX_VECTORS,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The k largest (algebraic) eigenvalues (descending) and their unit Ritz vectors (k × dim, float64) of the
    symmetric operator ``hvp``, and what the solver did (steps, residuals, converged)."""
    if dim <= k:
        raise UserError(f"a Hessian chart needs more than {k} coordinates, and there are {dim}")
    state = {"residuals": None}

    def stop(alpha: Sequence[float], beta: Sequence[float], next_beta: float) -> bool:
        if len(alpha) < k:
            return False
        theta, s = _tridiagonal(alpha, beta)
        top = np.argsort(theta)[::-1][:k]
        residual = abs(next_beta) * np.abs(s[-1, top])
        state["residuals"] = residual.tolist()
        return bool(np.all(residual <= tol * np.abs(theta[top])))

    v0 = torch.from_numpy(np.random.default_rng(seed).standard_normal(dim))
    steps = min(dim, max_vectors)
    alpha, beta, basis = lanczos(hvp, v0 / torch.linalg.vector_norm(v0), steps, stop, device, dtype, None)
    with basis:
        theta, s = _tridiagonal(alpha, beta)
        top = np.argsort(theta)[::-1][:k]
        vectors = np.stack([basis.combine(s[:, j], len(alpha)) for j in top])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    residuals = state["residuals"] or [0.0] * k
    info = {"steps": len(alpha), "tol": tol, "seed": seed, "residuals": residuals,
            "converged": bool(all(r <= tol * abs(t) for r, t in zip(residuals, theta[top], strict=True)))}  # fmt: skip
    return theta[top].astype(np.float64), vectors, info


def unflatten(flat: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat vector as tensors shaped (and placed) like ``like``, in its order, fp32."""
    out, lo = {}, 0
    for n, t in like.items():
        out[n] = torch.from_numpy(np.ascontiguousarray(flat[lo : lo + t.numel()])).view(t.shape).float().to(t.device)
        lo += t.numel()
    return out


def half_width(eigenvalue: float, rise: float = DEFAULT_RISE) -> float:
    """α with ½·λ₁·α² = Δ (``rise``): the chart's half-width."""
    if not eigenvalue > 0:
        raise UserError(f"the top Hessian eigenvalue at the centre is {eigenvalue:.3g} (not positive): no range at "
                        "which the loss rises; pass x_range / y_range for a Hessian chart here")  # fmt: skip
    return math.sqrt(2.0 * rise / eigenvalue)


def hessian_chart(
    center: dict[str, torch.Tensor], values: np.ndarray, vectors: np.ndarray, vertex: str, info: dict
) -> Chart:
    """The chart θ* + x·q₁ + y·q₂ (``center``: θ* over the coordinates, in the vectors' order); its ``name`` is
    ``hessian`` and ``info["hessian"]`` holds the eigenvalues and the solver's record."""
    origin = {n: t.detach().float().clone() for n, t in center.items()}
    u, v = unflatten(vectors[0], origin), unflatten(vectors[1], origin)
    chart = random_chart(origin, u, v, vertex, {"hessian": {**info, "eigenvalues": [float(x) for x in values]}})
    chart.name = "hessian"
    return chart


def second_differences(evaluate: Callable[[float, float], float], eigenvalues: Sequence[float], h: float) -> dict:
    """(L(h) − 2L(0) + L(−h)) / h² along x and y (``evaluate(x, y)``: the loss at a chart point) beside the
    eigenvalues, with their relative difference."""
    l0 = evaluate(0.0, 0.0)
    axes = []
    for name, lam, (dx, dy) in zip(("x", "y"), eigenvalues, ((1.0, 0.0), (0.0, 1.0)), strict=True):
        plus, minus = evaluate(dx * h, dy * h), evaluate(-dx * h, -dy * h)
        d2 = (plus - 2.0 * l0 + minus) / (h * h)
        axes.append({"axis": name, "eigenvalue": float(lam), "second_difference": float(d2),
                     "relative_difference": abs(d2 - lam) / max(abs(lam), 1e-300)})  # fmt: skip
    return {"step": float(h), "loss_at_center": float(l0), "axes": axes}


def check_line(check: dict) -> str:
    """The check, as the run prints it."""
    parts = [f"{a['axis']}: (L(h)-2L(0)+L(-h))/h^2 = {a['second_difference']:.6g} vs lambda = {a['eigenvalue']:.6g} "
             f"(rel. diff. {a['relative_difference']:.2e})" for a in check["axes"]]  # fmt: skip
    return f"hessian chart check, h = {check['step']:.4g}: " + "; ".join(parts)
