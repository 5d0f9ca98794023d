"""The rounding floor of a spectrum of ΔW taken between weights stored in half precision.

A ΔW = θ − W0 whose θ or W0 was rounded to bf16 / fp16 carries the rounding error E of those weights, and E's
size follows |W0|, not ΔW: a small update of a large weight drowns in it. Its singular values below the largest
singular value of E cannot be told apart from rounding; this module gives that floor and marks what lies below.

**Model of the rounding error.** Round-to-nearest to a format of p significant bits (unit roundoff u = 2^-p:
bf16 2^-8, fp16 2^-11, fp32 2^-24) moves a value w in the binade [2^E, 2^(E+1)) to the grid of spacing
Δ(w) = 2^(E+1) u; the error of a value that carries more bits than the format is uniform on [−Δ/2, Δ/2]
(the discarded bits are uniform), so it has mean 0 and variance Δ(w)²/12. Writing |w| = m·2^E (mantissa
m ∈ [1, 2)), Δ = 2u|w|/m and the variance is u²|w|²/(3m²): the std is u|w|/√3 at m = 1 (the largest, a
value just above a power of two) and u|w|/(√3·m) in general; averaged over mantissas spread log-uniformly
(Benford), E[1/m²] = 3/(8 ln 2) and std ≈ u·|w|_rms/√(8 ln 2) ≈ u·|w|_rms/2.35. Rather than assume a mantissa
distribution, :func:`rounding_std` takes Δ(w) of every entry of W0 exactly (``frexp``) and returns
σ = √(mean Δ²/12). The errors of distinct entries are independent (each depends on its own discarded bits).

**Largest singular value of the noise.** An m × n matrix of independent zero-mean entries of variance σ² has
largest singular value → σ(√m + √n) (Bai–Yin; the edge of the Marchenko–Pastur law), with fluctuations of
relative order (m n)^(-1/6)·… that shrink with size. :func:`noise_floor` = σ(√m + √n). This is the floor of
one rounding: a θ rounded once against the base as loaded. When θ and W0 were both rounded independently from
finer weights, the noise is √2 larger; the floor stays the one-rounding value, so what it marks is certainly
within rounding.

Which dtype a solution's floor uses (:func:`floor_dtype`): the coarser of the base's storage dtype and the
solution's stored weights'; a solution trained here with fp32 master weights starts at W0 exactly, so the
base's rounding cancels in θ − W0 and only its own fp32 storage counts (floor with u = 2^-24: tiny, but
stated rather than n/a, so every dense update has a floor). An adapter's ΔW (LoRA, RandLoRA) is built from
its factors, not from rounded weights: no floor (None, "n/a").

Intruder dimensions (:mod:`landscape.spectrum.similarity`): the top singular vectors u_i of W0 + ΔW. The
update's share of one of them is ‖ΔWᵀ u_i‖; when that is below the floor, rounding noise of the base's
magnitude could have made the same direction, and the intruder is marked ``limited_by_rounding``, with
``noise_ratio`` = floor / ‖ΔWᵀ u_i‖ (:func:`intruder_floor_entry`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# the smallest spacing of each format (its subnormals): the error of a value rounded near zero
MIN_SPACING = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
_SAFETENSORS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _check(dtype: torch.dtype) -> None:
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"no rounding model for {dtype}: use one of {', '.join(map(str, UNIT_ROUNDOFF))}")


def rounding_std(w: torch.Tensor, dtype: torch.dtype) -> float:
    """σ of the error of rounding the entries of ``w`` to ``dtype``: √(mean Δ(w)²/12), Δ(w) the spacing of
    ``dtype`` at each |w| (module docstring)."""
    _check(dtype)
    a = w.detach().double().abs().flatten()
    _, exponent = torch.frexp(a)  # |w| = mantissa · 2^exponent, mantissa in [0.5, 1): spacing 2^exponent · u
    spacing = torch.ldexp(torch.full_like(a, UNIT_ROUNDOFF[dtype]), exponent).clamp_min(MIN_SPACING[dtype])
    return math.sqrt(float(spacing.square().mean()) / 12.0) if a.numel() else 0.0


def noise_floor(w0: torch.Tensor, dtype: torch.dtype) -> float:
    """Expected largest singular value of the rounding noise of ``w0`` (viewed as (out, in)) in ``dtype``:
    σ(√m + √n), σ from :func:`rounding_std`."""
    m = w0.shape[0]
    n = w0.numel() // max(m, 1)
    return rounding_std(w0, dtype) * (math.sqrt(m) + math.sqrt(n))


def below_floor(singular_values: Sequence[float] | np.ndarray, floor: float | None) -> np.ndarray:
    """Boolean mask of the singular values below ``floor`` (None: nothing marked)."""
    s = np.asarray(singular_values, dtype=np.float64)
    return np.zeros(s.shape, dtype=bool) if floor is None else s < floor


def rank_above_floor(singular_values: Sequence[float] | np.ndarray, floor: float | None) -> int | None:
    """How many singular values stand above ``floor`` (None: no floor)."""
    if floor is None:
        return None
    return int(np.count_nonzero(~below_floor(singular_values, floor) & (np.asarray(singular_values) > 0)))


def floor_entry(singular_values: Sequence[float] | np.ndarray, floor: float | None) -> dict:
    """The fields of one update's spectrum: ``noise_floor``, ``below_floor`` (one flag per singular value,
    in the order given) and ``rank_above_floor``; all None when there is no floor (an adapter's factors)."""
    if floor is None:
        return {"noise_floor": None, "below_floor": None, "rank_above_floor": None}
    return {"noise_floor": float(floor), "below_floor": [bool(b) for b in below_floor(singular_values, floor)],
            "rank_above_floor": rank_above_floor(singular_values, floor)}  # fmt: skip


def intruder_floor_entry(strength: Sequence[float] | np.ndarray, floor: float | None) -> dict:
    """Per top vector u_i of W0 + ΔW, with ``strength`` = ‖ΔWᵀ u_i‖: ``noise_ratio`` = floor / strength and
    ``limited_by_rounding`` = strength < floor (module docstring); None without a floor."""
    if floor is None:
        return {"noise_ratio": None, "limited_by_rounding": None}
    c = np.asarray(strength, dtype=np.float64)
    ratio = np.divide(floor, c, out=np.full(c.shape, np.inf), where=c > 0)
    return {"noise_ratio": [float(r) if np.isfinite(r) else None for r in ratio],
            "limited_by_rounding": [bool(v) for v in c < floor]}  # fmt: skip


def coarsest(*dtypes: torch.dtype | None) -> torch.dtype:
    """The dtype of largest unit roundoff among ``dtypes`` (others, fp64 and None count as fp32)."""
    known = [d for d in dtypes if d in UNIT_ROUNDOFF]
    return max(known, key=UNIT_ROUNDOFF.__getitem__, default=torch.float32)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The storage dtype of a model's floating weights: its coarsest (a half-precision base stores in half)."""
    return coarsest(*{p.dtype for p in model.parameters() if p.is_floating_point()})


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The coarsest dtype of the floating tensors in a solution's safetensors file(s), read from the headers
    (no tensor loaded); None where there is none (a .pt/.bin checkpoint, an in-memory solution)."""
    from safetensors import safe_open

    path = Path(path)
    files = [path] if path.is_file() and path.suffix == ".safetensors" else sorted(path.glob("*.safetensors"))
    found = set()
    for file in files:
        with safe_open(file, "pt") as f:
            found |= {_SAFETENSORS.get(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    found.discard(None)
    return coarsest(*found) if found else None


def floor_dtype(solution) -> torch.dtype | None:
    """The dtype whose rounding floors the spectrum of ``solution``'s ΔW (module docstring); None for adapters."""
    if solution.method in ("lora", "randlora"):
        return None
    base = model_dtype(solution.base)
    precision = solution.info.get("precision") or {}
    if precision.get("master_weights") == "float32":  # trained here from W0 exactly: the base's rounding cancels
        base = torch.float32
    stored = None if getattr(solution, "_delta", None) is not None else stored_dtype(solution.path)
    return coarsest(base, stored)


__all__ = [
    "MIN_SPACING",
    "UNIT_ROUNDOFF",
    "below_floor",
    "coarsest",
    "floor_dtype",
    "floor_entry",
    "intruder_floor_entry",
    "model_dtype",
    "noise_floor",
    "rank_above_floor",
    "rounding_std",
    "stored_dtype",
]
