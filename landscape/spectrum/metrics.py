"""From singular values to rank measures, and the scalar table of a spectrum (``spectrum.csv``).

- ``rank``: numerical rank with numpy.linalg.matrix_rank's default tolerance for float32
  (``tol = s_max · max(out, in) · eps_float32``, :func:`rank_tol`),
- ``effective_rank``: Roy & Vetterli (2007), exp of the entropy of s / sum(s),
- ``stable_rank``: sum(s²) / max(s)²,
- ``energy_rank_90`` / ``energy_rank_99``: fewest singular values holding 90 % / 99 % of sum(s²),
- ``energy_beyond_rank``: Σ_{i>r} s_i² / Σ_i s_i² (:func:`energy_beyond_rank`; the analysis uses
  r = the LoRA solution's rank for every solution: how much of the update a rank-r adapter could
  never express).

Weight spectra (:func:`weight_metrics`, of W0 and of W0 + ΔW, WeightWatcher-style context for the
update): the same measures plus ``s_max`` (spectral norm), ``frobenius_norm`` and, for W0 + ΔW,
``relative_update`` = ‖ΔW‖_F / ‖W0‖_F; no power-law fit (stable and effective rank summarise the
spectrum's shape without one). In ``spectrum.csv``: ``base_*`` (W0) and ``weight_*`` (W0 + ΔW) columns
of s_max, stable rank and effective rank, and ``relative_update``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ENERGY_LEVELS = (0.90, 0.99)
WEIGHT_COLUMNS = ("s_max", "stable_rank", "effective_rank")  # of W0 and W0 + ΔW in spectrum.csv
BASE_KEY = "base"  # a layer entry's key of W0's weight spectrum
WEIGHT_KEY = "weight_spectrum"  # a solution entry's key of W0 + ΔW's weight spectrum
LAYER_KEYS = ("name", "shape", BASE_KEY)  # a layer entry's keys that are not solutions


def rank_tol(s_max: float, shape: Sequence[int]) -> float:
    """numpy.linalg.matrix_rank's default tolerance for a float32 matrix (the ``rank`` metric's)."""
    return s_max * max(shape) * float(np.finfo(np.float32).eps)


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
    tol = rank_tol(smax, shape)
    p = s64 / s64.sum()
    p = p[p > 0]  # 0·log 0 = 0
    out["rank"] = int(np.count_nonzero(s64 > tol))
    out["effective_rank"] = float(math.exp(-float(np.sum(p * np.log(p)))))
    out["stable_rank"] = float(np.sum(s64**2) / smax**2)
    for q in ENERGY_LEVELS:
        out[f"energy_rank_{round(q * 100)}"] = _energy_rank(s64, q)
    return out


def weight_metrics(s: np.ndarray, shape: tuple[int, int], delta_s: np.ndarray | None = None,
                   base_s: np.ndarray | None = None) -> dict:  # fmt: skip
    """The weight spectrum of a weight matrix of ``shape`` with singular values ``s``: :func:`spectrum_metrics`
    plus ``s_max`` and ``frobenius_norm``; with the singular values of its update ``delta_s`` and of the base
    weight ``base_s``, ``relative_update`` = ‖ΔW‖_F / ‖W0‖_F (None when W0 is zero)."""
    out = spectrum_metrics(s, shape)
    s64 = np.asarray(s, dtype=np.float64)
    out["s_max"] = float(s64.max()) if s64.size else 0.0
    out["frobenius_norm"] = float(np.sqrt(np.sum(s64**2)))
    if delta_s is not None and base_s is not None:
        base_norm = float(np.sqrt(np.sum(np.asarray(base_s, dtype=np.float64) ** 2)))
        delta_norm = float(np.sqrt(np.sum(np.asarray(delta_s, dtype=np.float64) ** 2)))
        out["relative_update"] = delta_norm / base_norm if base_norm > 0 else None
    return out


def energy_beyond_rank(s: np.ndarray, rank: int) -> float:
    """Σ_{i>rank} s_i² / Σ_i s_i² for singular values ``s`` (any order); 0 for an all-zero update."""
    s64 = np.sort(np.asarray(s).astype(np.float64))[::-1]
    total = float(np.sum(s64**2))
    return float(np.sum(s64[rank:] ** 2) / total) if total > 0 else 0.0


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
    floor = settings.get("rounding_floor") is not None  # landscape.spectrum.floor: ΔW between half weights
    if floor:
        cols += ["noise_floor", "rank_above_floor", "below_floor"] + [f"intruders_limited_eps{t}" for t in thresholds]
    weights = bool(settings.get("weight_spectra"))
    if weights:
        cols += [f"{side}_{key}" for side in ("base", "weight") for key in WEIGHT_COLUMNS] + ["relative_update"]
    rows = []
    for layer in spectrum["layers"]:
        for sol, met in layer.items():
            if sol in LAYER_KEYS:
                continue
            sv = met.get("singular_values") or [0.0]
            row = {"layer": layer["name"], "out": layer["shape"][0], "in": layer["shape"][1], "solution": sol,
                   "s_max": sv[0]}  # fmt: skip
            for key in ("rank", "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99",
                        "energy_beyond_rank"):  # fmt: skip
                row[key] = met.get(key)
            row.update(_similarity_columns(met.get(f"similarity_to_{ref}") if ref else None, ks))
            for t in thresholds:
                row[f"intruders_eps{t}"] = (met.get("intruders") or {}).get("count", {}).get(str(t))
            if floor:
                row.update(_floor_columns(met, thresholds))
            if weights:
                row.update(_weight_columns(layer.get(BASE_KEY), met.get(WEIGHT_KEY)))
            rows.append(row)
    return cols, rows


def _floor_columns(met: Mapping, thresholds: Sequence[float]) -> dict:
    """noise_floor, rank_above_floor, below_floor (how many of the singular values counted in ``rank`` are below
    the floor) and intruders_limited_eps{t} (intruders at ε = t whose update share is below the floor) of one
    row; empty (None) where there is no floor (an adapter's factors)."""
    marks = met.get("below_floor")
    row = {"noise_floor": met.get("noise_floor"), "rank_above_floor": met.get("rank_above_floor"),
           "below_floor": None if marks is None else int(sum(marks[: met.get("rank") or 0]))}  # fmt: skip
    intr = met.get("intruders") or {}
    limited, cos = intr.get("limited_by_rounding"), intr.get("max_cos") or []
    for t in thresholds:
        row[f"intruders_limited_eps{t}"] = (
            None
            if limited is None
            else sum(1 for c, lim in zip(cos, limited, strict=False) if c is not None and c < t and lim)
        )
    return row


def _weight_columns(base: Mapping | None, weight: Mapping | None) -> dict:
    """base_* (W0) and weight_* (W0 + ΔW) columns and relative_update of one row (None: empty)."""
    row = {f"{side}_{key}": (spec or {}).get(key) for side, spec in (("base", base), ("weight", weight))
           for key in WEIGHT_COLUMNS}  # fmt: skip
    row["relative_update"] = (weight or {}).get("relative_update")
    return row


def _similarity_columns(sim: Mapping | None, ks: Sequence[int]) -> dict:
    """overlap_k{k}, mean_angle_deg_k{k}, max_angle_deg_k{k} of one solution's similarity entry (None: empty)."""
    row = {}
    for k in ks:
        angles = (sim or {}).get("principal_angles_deg", {}).get(str(k))
        curve = (sim or {}).get("overlap") or []
        row[f"overlap_k{k}"] = curve[k - 1] if sim and k <= len(curve) else None
        row[f"mean_angle_deg_k{k}"] = float(np.mean(angles)) if angles else None
        row[f"max_angle_deg_k{k}"] = float(np.max(angles)) if angles else None
    return row


def write_csv(spectrum: Mapping, path: str | Path) -> None:
    """``spectrum.csv``: :func:`scalar_rows`, empty cells for missing values (written atomically)."""
    import csv
    import io

    from landscape.engine import store

    cols, rows = scalar_rows(spectrum)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})
    store.write_text(path, buf.getvalue())
