"""Plane charts through three solutions: grid coordinates <-> weights.

Every chart is affine, ``θ(x, y) = origin + x·U + y·V``, over the parameters that differ
between the solutions (all others stay at the base model's values).

- ``paper``: the RandLoRA paper's chart (not orthonormal). With a = 1 − x − y/2, b = y,
  c = x − y/2: θ = a·θ_RandLoRA + b·θ_FT + c·θ_LoRA, i.e. origin = θ_R, U = θ_L − θ_R,
  V = θ_F − (θ_R + θ_L)/2. Vertices: RandLoRA (0, 0), LoRA (1, 0), FT (0.5, 1).
- ``orthonormal``: Garipov et al. 2018 with w0 = RandLoRA, w2 = LoRA, w1 = FT:
  u = (w2 − w0)/‖w2 − w0‖, v = Gram–Schmidt of (w1 − w0) against u. Coordinates are
  Euclidean distances in weight space, so lengths and angles in the picture are true.
- ``random`` / ``random-line``: Li et al. 2018's chart around ONE solution θ*, over every parameter of
  the model: origin = θ*, U = δ, V = η, two filter-normalised Gaussian directions drawn by
  :mod:`landscape.engine.directions` (which builds it through :func:`random_chart`). One vertex, the centre,
  at (0, 0); the default axes are [−1, 1] × [−1, 1] (a line: x only, y = [0]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from adapters.errors import UserError

SOLUTIONS = ("ft", "lora", "randlora")
CHARTS = ("paper", "orthonormal")
RANDOM_CHARTS = ("random", "random-line")  # built by landscape.engine.directions (one solution, random directions)
PAPER_RANGE = {"x": (-1.0, 1.4), "y": (-0.5, 1.9)}


@dataclass
class Chart:
    name: str
    origin: dict[str, torch.Tensor]
    u: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    vertices: dict[str, tuple[float, float]]  # solution -> (x, y)
    info: dict = field(default_factory=dict)

    def weights_at(self, x: float, y: float) -> dict[str, torch.Tensor]:
        return {n: self.origin[n] + x * self.u[n] + y * self.v[n] for n in self.origin}

    def to(self, device: torch.device | str) -> Chart:
        move = lambda d: {k: t.to(device) for k, t in d.items()}  # noqa: E731
        return Chart(self.name, move(self.origin), move(self.u), move(self.v), self.vertices, self.info)


# elements per float64 block of a dot product or Gram accumulation (1 MB): no model-sized float64 temporaries.
# Whole parameters converted at once made the dense plane's geometry 41 s of a 65 s build on the rehearsal's
# 4-layer Qwen2-0.5B shape (a 136 M-element embedding, twelve dot products, fresh pages every time).
CHUNK = 1 << 17


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    # float64 accumulation: millions of terms, and the Gram–Schmidt step subtracts near-equal numbers.
    total = 0.0
    for n in a:
        x, y = a[n].reshape(-1), b[n].reshape(-1)
        sums = torch.zeros((), dtype=torch.float64, device=x.device)  # on the device, read once per parameter
        for i in range(0, x.numel(), CHUNK):
            sums += torch.dot(x[i : i + CHUNK].double(), y[i : i + CHUNK].double())
        total += float(sums)
    return total


def solution_weights(
    base: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> dict[str, dict[str, torch.Tensor]]:
    """θ_s = W0 + Δ_s over the union of parameters any solution changes (fp32)."""
    missing = [s for s in SOLUTIONS if s not in deltas]
    if missing:
        raise UserError(f"the plane needs the solutions ft, lora and randlora; missing: {', '.join(missing)}")
    names = sorted(set().union(*(deltas[s] for s in SOLUTIONS)))
    thetas = {}
    for s in SOLUTIONS:
        thetas[s] = {}
        for n in names:
            w = base[n].detach().float()
            thetas[s][n] = w + deltas[s][n].to(w.device) if n in deltas[s] else w.clone()
    return thetas


def paper_chart(thetas: dict[str, dict[str, torch.Tensor]]) -> Chart:
    r, lo, ft = thetas["randlora"], thetas["lora"], thetas["ft"]
    origin = {n: r[n].clone() for n in r}
    u = {n: lo[n] - r[n] for n in r}
    v = {n: ft[n] - 0.5 * (r[n] + lo[n]) for n in r}
    vertices = {"randlora": (0.0, 0.0), "lora": (1.0, 0.0), "ft": (0.5, 1.0)}
    return Chart("paper", origin, u, v, vertices, _geometry(thetas))


def orthonormal_chart(thetas: dict[str, dict[str, torch.Tensor]]) -> Chart:
    w0, w1, w2 = thetas["randlora"], thetas["ft"], thetas["lora"]
    e2 = {n: w2[n] - w0[n] for n in w0}
    e1 = {n: w1[n] - w0[n] for n in w0}
    norm_u = math.sqrt(_dot(e2, e2))
    if norm_u == 0:
        raise UserError("the LoRA and RandLoRA solutions are identical: no orthonormal plane through them")
    u = {n: e2[n] / norm_u for n in e2}
    along = _dot(e1, u)
    v_raw = {n: e1[n] - along * u[n] for n in e1}
    norm_v = math.sqrt(_dot(v_raw, v_raw))
    if norm_v == 0:
        raise UserError("the three solutions are collinear: no plane through them")
    v = {n: v_raw[n] / norm_v for n in v_raw}
    vertices = {"randlora": (0.0, 0.0), "lora": (norm_u, 0.0), "ft": (along, norm_v)}
    return Chart("orthonormal", {n: w0[n].clone() for n in w0}, u, v, vertices, _geometry(thetas))


def _geometry(thetas: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Pairwise distances and the triangle's angles (degrees) in weight space."""
    gram = np.zeros((3, 3))
    for n, w in thetas["ft"].items():
        gram += difference_gram([thetas[s][n] for s in ("ft", "lora", "randlora")], w.numel())
    return geometry_from_gram(gram)


def difference_gram(ds: list[torch.Tensor | None], numel: int) -> np.ndarray:
    """Gram matrix (float64) of Δ_ft − Δ_lora, Δ_ft − Δ_randlora, Δ_lora − Δ_randlora over one parameter (the
    solutions' updates, or their weights θ = W0 + Δ: the same differences; None: a zero update).

    Differences first, then products (no cancellation of large ⟨Δ_a, Δ_b⟩ terms), a chunk at a time; the
    sums stay on the device and are read once per parameter."""
    flat = [d.reshape(-1) if d is not None else None for d in ds]
    device = next(d for d in flat if d is not None).device
    sums = torch.zeros(3, 3, dtype=torch.float64, device=device)
    for a in range(0, numel, CHUNK):
        f, lo, r = (x[a : a + CHUNK].to(device, torch.float64) if x is not None else None for x in flat)
        rows = (_minus(f, lo), _minus(f, r), _minus(lo, r))
        for i in range(3):
            for j in range(i, 3):
                if rows[i] is not None and rows[j] is not None:
                    sums[i, j] += torch.dot(rows[i], rows[j])
        del f, lo, r, rows
    out = sums.cpu().numpy()
    return np.triu(out) + np.triu(out, 1).T


def _minus(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    """x − y with None for zero (None when both are)."""
    if y is None:
        return x
    return -y if x is None else x - y


def geometry_from_gram(gram: np.ndarray) -> dict:
    """Pairwise distances and the triangle's angles (degrees) in weight space, from the Gram matrix of
    (ft − lora, ft − randlora, lora − randlora)."""
    dist = {p: math.sqrt(max(gram[k, k], 0.0)) for k, p in enumerate(("ft-lora", "ft-randlora", "lora-randlora"))}
    # at each vertex, the two edges leaving it as signed rows of the Gram matrix: (row, sign)
    edges = {"ft": ((0, -1), (1, -1)), "lora": ((0, 1), (2, -1)), "randlora": ((1, 1), (2, 1))}
    angles = {}
    for at, ((i, si), (j, sj)) in edges.items():
        dot = si * sj * gram[i, j]
        cos = dot / max(math.sqrt(max(gram[i, i] * gram[j, j], 0.0)), 1e-300)
        angles[at] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    return {"distances": dist, "triangle_angles_deg": angles}


def random_chart(
    center: dict[str, torch.Tensor],
    u: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor] | None,
    vertex: str,
    info: dict | None = None,
) -> Chart:
    """Li et al.'s chart around one solution: origin θ* (``center``), U = δ, V = η, the centre ``vertex`` at (0, 0).

    ``v`` None makes the 1-D chart ``random-line``: V is a zero scalar per parameter (broadcast by
    ``origin + x·U + y·V`` and by the grid engine), so a line holds no second model-sized direction."""
    if v is None:
        v = {n: torch.zeros((), dtype=t.dtype, device=t.device) for n, t in u.items()}
        name = "random-line"
    else:
        name = "random"
    return Chart(name, center, u, v, {vertex: (0.0, 0.0)}, dict(info or {}))


def centred_axis(n: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """n values over [lo, hi] holding 0 (lo < 0 < hi): uniform k/h for odd n on [−1, 1] (0 and the ends exact),
    else linspace with its line nearest 0 moved onto it."""
    if n % 2 and (lo, hi) == (-1.0, 1.0):
        h = n // 2
        return np.arange(-h, h + 1) / h
    return snapped_axis(lo, hi, n, [0.0])


def third_vertex(solutions) -> str:
    """The plane's third vertex: ``ft``, or ``base`` (the base model itself, ΔW = 0) when there is no FT solution
    (the default under ``--load-4bit``); it takes FT's place in both charts."""
    return "ft" if "ft" in solutions else "base"


def with_third(chart: Chart, third: str) -> Chart:
    """``chart`` (built with the third vertex's update under the key ``ft``) with its vertex and geometry named
    ``third``."""
    if third == "ft":
        return chart
    swap = lambda key: "-".join(third if part == "ft" else part for part in key.split("-"))  # noqa: E731
    chart.vertices = {swap(k): v for k, v in chart.vertices.items()}
    chart.info = {k: ({swap(n): x for n, x in v.items()} if isinstance(v, dict) else v) for k, v in chart.info.items()}
    return chart


def build_chart(name: str, thetas: dict[str, dict[str, torch.Tensor]]) -> Chart:
    if name == "paper":
        return paper_chart(thetas)
    if name == "orthonormal":
        return orthonormal_chart(thetas)
    raise UserError(f"unknown chart '{name}': choose one of {', '.join(CHARTS)}")


def paper_axis(n: int, lo: float, hi: float, anchors: list[float]) -> np.ndarray:
    """n uniformly spaced values near [lo, hi] whose step divides 0.5, holding every anchor.

    The paper's vertices sit at multiples of 0.5, so a step of 1/(2k) puts them exactly on
    grid lines. n = 25 on the paper's ranges gives exactly the paper's grid (step 0.1).
    Values are computed as integers / (2k), so the anchors are exact in floating point.
    """
    k = max(1, round(0.5 * (n - 1) / (hi - lo)))
    step = 1.0 / (2 * k)
    start = round(((lo + hi) / 2 - (n - 1) * step / 2) / step)
    a_lo, a_hi = math.floor(min(anchors) / step + 1e-9), math.ceil(max(anchors) / step - 1e-9)
    if a_hi - a_lo <= n - 1:  # the vertices fit: make sure they are inside
        start = min(start, a_lo)
        start = max(start, a_hi - (n - 1))
    return (start + np.arange(n)) / (2 * k)


def snapped_axis(lo: float, hi: float, n: int, anchors: list[float]) -> np.ndarray:
    """linspace(lo, hi, n) with the line nearest each anchor moved onto it (still increasing)."""
    axis = np.linspace(lo, hi, n)
    used: set[int] = set()
    for a in sorted(set(anchors)):
        order = np.argsort(np.abs(axis - a), kind="stable")
        j = next(int(i) for i in order if int(i) not in used)
        axis[j] = a
        used.add(j)
    if np.any(np.diff(axis) <= 0):  # anchors too close for this resolution: add them as extra lines
        axis = np.union1d(np.linspace(lo, hi, n), anchors)
    return axis


def default_axes(chart: Chart, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The default grid of n × n points for a chart; the vertices are grid points. A random chart: [−1, 1]²
    around its centre (a line: n × 1, y = [0])."""
    if n < 2:
        raise UserError(f"--grid {n} is too small: a surface needs at least 2 points per axis (try --grid 11)")
    if chart.name in (*RANDOM_CHARTS, "hessian"):  # centred on one solution (the hessian chart: scaled by its caller)
        return centred_axis(n), (np.zeros(1) if chart.name == "random-line" else centred_axis(n))
    xs = [p[0] for p in chart.vertices.values()]
    ys = [p[1] for p in chart.vertices.values()]
    if chart.name == "paper":
        return paper_axis(n, *PAPER_RANGE["x"], xs), paper_axis(n, *PAPER_RANGE["y"], ys)
    # Orthonormal: the vertices' bounding box widened by the paper's proportions (2.4× the extent).
    extent = max(max(xs) - min(xs), max(ys) - min(ys))
    margin = 0.7 * extent
    return (
        snapped_axis(min(xs) - margin, max(xs) + margin, n, xs),
        snapped_axis(min(ys) - margin, max(ys) + margin, n, ys),
    )
