"""The solvers over a :class:`~landscape.curvature.hessian.HessianOperator`: the top eigenvalues
(Lanczos with ARPACK's residual test), the trace (Hutchinson) and the spectral density (SLQ).

**Algorithms** (HVPs in the model's precision on its device; Lanczos vectors in float64 on the host,
as ARPACK's are):

- Top-k eigenvalues: Lanczos with full reorthogonalisation from a seeded Gaussian start, stopped after
  the first step at which the top k Ritz pairs (the largest *algebraic*, so a negative direction is never
  mistaken for the top one) all have residual ‖Hx − θx‖ ≤ tol·|θ|. That is ARPACK's convergence test
  (``scipy.sparse.linalg.eigsh(tol=...)``), and it bounds each eigenvalue's error: for a symmetric H some
  eigenvalue lies within the residual of θ. The residual of every Ritz pair is known after each step
  without another product (β_j times the last component of its eigenvector of T_j), so the solver stops
  at the first HVP at which the answer is good enough; ARPACK instead fills a Krylov space of
  ``ncv = max(2k + 1, 20)`` vectors before its first test, so it never takes fewer than 20 products and
  then restarts in batches of ncv − k. Hand-written for that reason (a loop of 20 lines around the HVP);
  the ``lanczos_vectors`` bound (default 60) caps its memory, and past it ARPACK's implicit restarts take
  over from the top Ritz vectors (recorded in ``method``). PyHessian's power iteration with deflation
  needs one HVP per iteration per eigenvalue (``experiments.benchmarks.curvature`` measures both) and
  stops on the relative change between two iterations, which does not bound the error. scipy and our own
  operator rather than curvlinops: curvlinops' Hessian operator, exported with ``.to_scipy()``, would feed
  the same solver; it takes a ``torch.nn`` loss module and ``(X, y)`` batches (dict inputs through a
  wrapper), while the product here must go through the run's own objective (classification or the causal
  LM's answer loss), over a subset of a peft model's parameters, with the kernel and peft rewrites above
  and a count of passes — so it would add a dependency and two adapters and leave the solver unchanged.
  Memory: the Lanczos basis, up to ``lanczos_vectors`` float64 vectors of the coordinates' size (typically
  15–30 are used), lives in host memory, memory-mapped from a temporary file under the output folder when
  it exceeds 1 GiB (:mod:`landscape.lanczos`); the device holds at most k + 4 coordinate-sized vectors (the
  vector multiplied, the HVP's tangent, gradient and product). When ``k >= dim`` the Hessian is built column by column
  (``dim`` HVPs) and diagonalised exactly.
- Trace: Hutchinson, ``tr H ≈ mean_i zᵢᵀ H zᵢ`` over ``trace_probes`` Rademacher probes, with the
  standard error of that mean.
- Spectral density: SLQ (Ghorbani et al. 2019): per probe (Rademacher, normalised) ``slq_steps``
  Lanczos steps with full reorthogonalisation give a tridiagonal T whose eigenvalues θⱼ and first
  eigenvector components τⱼ² are the nodes and weights of a Gauss quadrature of the spectral
  measure; the density is the probes' mean of ``Σⱼ τⱼ² N(t; θⱼ, σ²)`` on a grid, σ = ``broadening``
  × the range of the nodes. It integrates to 1, and its mean ``Σⱼ τⱼ² θⱼ`` is an estimate of
  ``tr H / dim``. Early exit when the Krylov space is invariant (then the quadrature is exact).


Every random draw derives from ``seed`` (recorded): the same probes for every solution, so their
differences are paired, and the same on every torchrun rank, so the solvers run identically on each.

**Probes spread over jobs** (a Slurm job array): :func:`trace_probes` and :func:`density_probes` compute the
probes of an index range [start, stop) — probe i is the same vector in any range — and :func:`combine_trace` /
:func:`combine_density` join parts that tile 0 .. P - 1 into exactly what :func:`hutchinson_trace` /
:func:`slq_density` return for P probes (they are those two functions' own path, with one part).

"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from landscape.curvature.hessian import HessianOperator
from landscape.curvature.settings import LANCZOS_VECTORS, CurvatureSettings
from landscape.lanczos import HostBasis
from landscape.lanczos import lanczos as host_lanczos


def _stream_seed(seed: int, stream: int) -> int:
    """An independent integer seed per random stream (eigen start vector, trace probes, SLQ probes)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def top_eigenvalues(
    op: HessianOperator, k: int, tol: float = 1e-3, seed: int = 0, max_vectors: int = LANCZOS_VECTORS
) -> dict:
    """The k largest (algebraic) eigenvalues, descending: Lanczos stopped as soon as they have converged
    (module docstring), ARPACK's ``eigsh`` if not within ``max_vectors`` steps, exactly for k >= dim."""
    start, before, history = time.perf_counter(), op.hvps, []
    if k >= op.dim:
        columns = [op.flat_hvp(torch.eye(op.dim, dtype=op.dtype)[j]).double().cpu().numpy() for j in range(op.dim)]
        h = np.stack(columns, axis=1)
        values, method, converged = np.linalg.eigvalsh(0.5 * (h + h.T))[::-1][:k], EXACT, True
    else:
        v0 = torch.from_numpy(np.random.default_rng(_stream_seed(seed, 0)).standard_normal(op.dim))
        stop = _RitzTest(k, tol)
        alpha, beta, basis = lanczos(op, v0 / torch.linalg.vector_norm(v0), min(op.dim, max(max_vectors, k + 1)), stop)
        with basis:
            values, converged, method, history = stop.values, stop.done, LANCZOS, stop.history
            restart = None if converged else _top_ritz_vector(alpha, beta, basis, k)
        if not converged:  # restart ARPACK from the Ritz vectors of the top k: its implicit restarts converge
            values, converged = _eigsh(op, k, tol, restart, len(alpha))
            method = f"{LANCZOS}, then {EIGSH} from its top Ritz vectors"
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    # residuals: after each Lanczos step, the top k's largest residual / |θ| (what tol is compared with), so a
    # reader sees how many products another tol would have taken
    return {"eigenvalues": [float(x) for x in values], "method": method, "converged": bool(converged), "tol": tol,
            "residuals": history, "hvps": op.hvps - before,
            "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


LANCZOS = "lanczos (full reorthogonalisation, stopped when the top k Ritz residuals are below tol·|θ|)"
EIGSH = "scipy.sparse.linalg.eigsh (ARPACK, which='LA')"
EXACT = "exact (Hessian built from dim HVPs, numpy.linalg.eigvalsh)"


class _RitzTest:
    """Stopping rule of :func:`lanczos` for the top k: after step j, T_j = V_jᵀHV_j has Ritz pairs
    (θᵢ, V_j sᵢ) whose residual is exactly ‖H V_j sᵢ − θᵢ V_j sᵢ‖ = β_j·|s_{j,i}| (the Lanczos relation,
    kept by full reorthogonalisation) — ARPACK's convergence test, computed for free from T_j."""

    def __init__(self, k: int, tol: float):
        self.k, self.tol, self.values, self.done = k, tol, np.zeros(0), False
        self.history: list[float] = []  # after each step from the k-th: the largest residual / |θ| of the top k

    def __call__(self, alpha: Sequence[float], beta: Sequence[float], next_beta: float) -> bool:
        if len(alpha) < self.k:
            return False
        theta, s = _tridiagonal_eigh(alpha, beta)
        top = np.argsort(theta)[::-1][: self.k]
        self.values = theta[top]
        residual = abs(next_beta) * np.abs(s[-1, top])
        self.history.append(float(np.max(residual / np.maximum(np.abs(self.values), np.finfo(float).tiny))))
        self.done = bool(np.all(residual <= self.tol * np.abs(self.values)))
        return self.done


def _tridiagonal_eigh(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    return eigh_tridiagonal(np.asarray(alpha, dtype=np.float64), np.asarray(beta[: len(alpha) - 1], dtype=np.float64))


def _top_ritz_vector(alpha: Sequence[float], beta: Sequence[float], basis: HostBasis, k: int) -> np.ndarray:
    """The sum of the top k Ritz vectors: a start vector rich in the wanted eigenvectors."""
    theta, s = _tridiagonal_eigh(alpha, beta)
    top = np.argsort(theta)[::-1][:k]
    return basis.combine(s[:, top].sum(1), len(alpha))


def _eigsh(op: HessianOperator, k: int, tol: float, v0: np.ndarray, ncv: int) -> tuple[np.ndarray, bool]:
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    ncv = min(op.dim, max(ncv, 2 * k + 1))
    try:
        values = eigsh(op.linear_operator(), k=k, which="LA", tol=tol, v0=v0, ncv=ncv, return_eigenvectors=False)
        return values, True
    except ArpackNoConvergence as e:
        return e.eigenvalues, False


def _rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype)


def hutchinson_trace(op: HessianOperator, probes: int, seed: int = 0) -> dict:
    """tr H ≈ mean of zᵀHz over ``probes`` Rademacher vectors z, with the standard error of that mean."""
    return combine_trace([trace_probes(op, seed, 0, probes)])


def _skipped_generator(stream: int, seed: int, start: int, dim: int, dtype: torch.dtype) -> torch.Generator:
    """The generator of a probe stream, positioned at probe ``start``: the earlier probes drawn and dropped (cheap
    beside their products), so probe i is the same vector whichever range computes it."""
    generator = torch.Generator().manual_seed(_stream_seed(seed, stream))
    for _ in range(start):
        _rademacher(dim, generator, dtype)
    return generator


def _check_range(start: int, stop: int) -> None:
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
        raise ValueError(f"probe range [{start}, {stop}): need integers 0 <= start <= stop")


def trace_probes(op: HessianOperator, seed: int, start: int, stop: int) -> dict:
    """Hutchinson's probes ``start`` .. ``stop - 1`` of ``seed``: their samples zᵢᵀHzᵢ (one HVP each).

    A part of :func:`hutchinson_trace`, for spreading its probes over jobs (a job array, one range per task):
    probe i is the same vector in any range, so :func:`combine_trace` of parts that cover 0 .. P - 1 (each
    computed on the same operator: run, solution, coordinates, dtype) is the trace of P probes, equal to one
    ``hutchinson_trace(op, P, seed)``. Returns ``{"kind": "trace", "seed", "start", "stop", "samples", "hvps",
    "seconds"}`` (JSON-ready)."""
    _check_range(start, stop)
    begin, before = time.perf_counter(), op.hvps
    generator = _skipped_generator(1, seed, start, op.dim, op.dtype)
    samples = []
    for _ in range(start, stop):
        z = _rademacher(op.dim, generator, op.dtype)  # ±1: exact in any precision
        samples.append(float((z.double() * op.flat_hvp(z).double().cpu()).sum()))
    return {"kind": "trace", "seed": seed, "start": start, "stop": stop, "samples": samples,
            "hvps": op.hvps - before, "seconds": round(time.perf_counter() - begin, 3)}  # fmt: skip


def _ordered(parts: Sequence[dict], kind: str) -> list[dict]:
    """``parts`` in probe order, checked: one kind and seed, ranges that tile 0 .. P - 1 without gap or overlap."""
    parts = sorted(parts, key=lambda p: p["start"])
    if not parts or any(p.get("kind") != kind for p in parts) or len({p["seed"] for p in parts}) != 1:
        raise ValueError(
            f"combine: need {kind} parts of one seed, got {[(p.get('kind'), p.get('seed')) for p in parts]}"
        )
    ends = [0, *(p["stop"] for p in parts)]
    if any(p["start"] != end for p, end in zip(parts, ends, strict=False)):
        raise ValueError(f"combine: the ranges {[(p['start'], p['stop']) for p in parts]} do not tile 0 .. P - 1")
    return parts


def combine_trace(parts: Sequence[dict]) -> dict:
    """The Hutchinson estimate from :func:`trace_probes` parts (any order) that tile the probes 0 .. P - 1:
    what :func:`hutchinson_trace` returns for P probes (``seconds`` and ``hvps`` summed over the parts)."""
    parts = _ordered(parts, "trace")
    x = np.asarray([v for p in parts for v in p["samples"]], dtype=np.float64)
    if len(x) == 0:
        raise ValueError("combine_trace: no probes")
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"trace": float(x.mean()), "trace_se": se, "probes": len(x), "samples": x.tolist(),
            "hvps": sum(p["hvps"] for p in parts), "seconds": round(sum(p["seconds"] for p in parts), 3)}  # fmt: skip


def lanczos(
    op: HessianOperator,
    v: torch.Tensor,
    steps: int,
    stop: Callable[[list[float], list[float], float], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, HostBasis]:
    """At most ``steps`` Lanczos steps of the operator's Hessian from the unit vector ``v``
    (:func:`landscape.lanczos.lanczos`: full reorthogonalisation against a float64 basis in host memory,
    memory-mapped under ``op.scratch`` when large; two coordinate-sized vectors on the device). Returns
    (alpha, beta) of T and the :class:`HostBasis` (its first ``len(alpha)`` rows are used; close it)."""
    return host_lanczos(op.flat_hvp, v, steps, stop, op.device, op.dtype, op.scratch)


def slq_density(
    op: HessianOperator, steps: int, probes: int, seed: int = 0, points: int = 400, broadening: float = 0.01
) -> dict:
    """Spectral density by stochastic Lanczos quadrature (module docstring): nodes, weights, and the
    Gaussian-broadened density on a grid of ``points`` values."""
    return combine_density([density_probes(op, steps, seed, 0, probes)], points, broadening)


def density_probes(op: HessianOperator, steps: int, seed: int, start: int, stop: int) -> dict:
    """SLQ's probes ``start`` .. ``stop - 1`` of ``seed``: each probe's quadrature nodes and weights (at most
    ``steps`` HVPs each).

    A part of :func:`slq_density`, for spreading its probes over jobs, as :func:`trace_probes` is for the trace:
    :func:`combine_density` of parts that tile 0 .. P - 1 (same operator and ``steps``) equals one
    ``slq_density(op, steps, P, seed)``. Returns ``{"kind": "density", "seed", "start", "stop", "steps", "dim",
    "nodes", "weights", "hvps", "seconds"}`` (JSON-ready)."""
    _check_range(start, stop)
    begin, before = time.perf_counter(), op.hvps
    generator = _skipped_generator(2, seed, start, op.dim, torch.float64)
    nodes, weights = [], []
    for _ in range(start, stop):
        z = _rademacher(op.dim, generator, torch.float64)
        alpha, beta, basis = lanczos(op, z / math.sqrt(op.dim), steps)
        basis.close()
        theta, vectors = np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
        nodes.append(theta.tolist())
        weights.append((vectors[0] ** 2).tolist())
    return {"kind": "density", "seed": seed, "start": start, "stop": stop, "steps": steps, "dim": op.dim,
            "nodes": nodes, "weights": weights, "hvps": op.hvps - before,
            "seconds": round(time.perf_counter() - begin, 3)}  # fmt: skip


def combine_density(parts: Sequence[dict], points: int = 400, broadening: float = 0.01) -> dict:
    """The SLQ density from :func:`density_probes` parts (any order) that tile the probes 0 .. P - 1: what
    :func:`slq_density` returns for P probes (``seconds`` and ``hvps`` summed over the parts)."""
    parts = _ordered(parts, "density")
    if len({(p["steps"], p["dim"]) for p in parts}) != 1:
        raise ValueError("combine_density: the parts differ in steps or dimension: not one operator's probes")
    nodes = [t for p in parts for t in p["nodes"]]
    weights = [w for p in parts for w in p["weights"]]
    if not nodes:
        raise ValueError("combine_density: no probes")
    grid, values, sigma = broadened_density(nodes, weights, points, broadening)
    mean = float(np.mean([np.dot(t, w) for t, w in zip(nodes, weights, strict=True)]))
    return {"grid": grid.tolist(), "values": values.tolist(), "sigma": sigma, "nodes": nodes, "weights": weights,
            "mean": mean, "trace_estimate": mean * parts[0]["dim"], "steps": parts[0]["steps"],
            "probes": len(nodes), "hvps": sum(p["hvps"] for p in parts),
            "seconds": round(sum(p["seconds"] for p in parts), 3)}  # fmt: skip


def broadened_density(
    nodes: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], points: int, broadening: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean over probes of Σⱼ wⱼ N(t; θⱼ, σ²) on a grid spanning the nodes ± 5σ; σ = broadening × their range."""
    flat = np.concatenate([np.asarray(t, dtype=np.float64) for t in nodes])
    lo, hi = float(flat.min()), float(flat.max())
    sigma = broadening * (hi - lo) if hi > lo else broadening * max(abs(hi), 1.0)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    values = np.zeros_like(grid)
    for t, w in zip(nodes, weights, strict=True):
        d = (grid[:, None] - np.asarray(t)[None, :]) / sigma
        values += (np.exp(-0.5 * d * d) * np.asarray(w)[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return grid, values / len(nodes), float(sigma)


def curvature_at(op: HessianOperator, settings: CurvatureSettings, bar: tqdm | None = None) -> dict:
    """Eigenvalues, trace and density of one operator: one entry of curvature.json (without its key).
    ``cpu_seconds``: this process's CPU time (user + system, every thread) over the entry, beside its wall
    ``seconds`` (on a shared machine the wall time depends on the other jobs, the CPU time much less)."""
    start, cpu = time.perf_counter(), time.process_time()
    parts = {}
    say = (lambda stage: bar.set_postfix_str(stage)) if bar is not None else (lambda stage: None)  # noqa: E731
    say("eigenvalues")
    parts["eigen"] = top_eigenvalues(op, settings.top_k, settings.tol, settings.seed, settings.lanczos_vectors)
    if settings.trace_probes:
        say("trace")
        parts["hutchinson"] = hutchinson_trace(op, settings.trace_probes, settings.seed)
    if settings.slq_probes:
        say("density")
        parts["density"] = slq_density(op, settings.slq_steps, settings.slq_probes, settings.seed,
                                       settings.density_points, settings.broadening)  # fmt: skip
    return {
        "dim": op.dim,
        "parameters": len(op.names),
        "loss": op.loss,
        "grad_norm": op.grad_norm,
        "eigenvalues": parts["eigen"]["eigenvalues"],
        "trace": parts["hutchinson"]["trace"] if "hutchinson" in parts else None,
        "trace_se": parts["hutchinson"]["trace_se"] if "hutchinson" in parts else None,
        **parts,
        "hvps": op.hvps,
        "hvp_mode": op.mode,
        "hvp_note": op.note,
        "seconds_per_hvp": op.hvp_seconds / max(op.hvps, 1),
        "seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
    }
