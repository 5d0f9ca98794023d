"""One colour and one label per method, used by every figure, so a reader can match "LoRA" across the
3-D surface, the contour map, the paths and the spectrum plots; the landscape data as every landscape figure
reads it (:func:`_unpack`: the paper's display clipping, the chart's axis titles and note); the atomic save.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors as pcolors

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from landscape.engine.store import write_with

# Okabe-Ito palette (colour-blind safe). None of these is a shade of the blue-green tempo
# colour scale, so the markers stand out on the surface.
COLORS = {"ft": "#D55E00", "lora": "#56B4E9", "randlora": "#CC79A7", "head_only": "#000000", "base": "#E69F00"}
LABELS = {"ft": "Full FT", "lora": "LoRA", "randlora": "RandLoRA", "head_only": "Head only", "base": "Base model"}

COLORSCALE = "tempo_r"
# The same scale for matplotlib, so the static and interactive figures agree.
TEMPO_R = LinearSegmentedColormap.from_list(
    "tempo_r", [tuple(v / 255 for v in pcolors.unlabel_rgb(c)) for c in pcolors.sequential.tempo_r]
)

AXIS_TITLES = {
    "paper": ("x", "y"),
    "orthonormal": ("α (weight-space distance)", "β (weight-space distance)"),
    "random": ("α (along δ)", "β (along η)"),
    "random-line": ("α (along δ)", "y"),
    "hessian": ("α (along q₁, top Hessian eigenvector)", "β (along q₂, second)"),
}


def clip_for_display(loss: np.ndarray, vertex_losses: Sequence[float], factor: float = 1.2) -> np.ndarray:
    """Cap values above ``factor × max(vertex_losses)`` at that cap (the paper's rule); NaN stays NaN."""
    v = np.asarray(vertex_losses, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"vertex losses must be finite and non-empty, got {v.tolist()}")
    cap = factor * float(v.max())
    loss = np.asarray(loss, dtype=np.float64)
    # NaN > cap is False, so missing grid points stay NaN (holes, not fake plateaus)
    return np.where(loss > cap, cap, loss)


def _str(value) -> str:
    """A string stored in an npz comes back as a 0-d array (or bytes)."""
    value = np.asarray(value).item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else str(value)


def _unpack(data: Mapping) -> dict:
    x = np.asarray(data["x"], dtype=np.float64)
    y = np.asarray(data["y"], dtype=np.float64)
    loss = np.asarray(data["loss"], dtype=np.float64)
    if loss.shape != (len(y), len(x)):
        raise ValueError(f"loss has shape {loss.shape}, expected (len(y), len(x)) = {(len(y), len(x))}")
    names = [_str(n) for n in np.asarray(data["point_names"]).ravel()]
    vertex = np.asarray(data["vertex_loss"], dtype=np.float64).ravel()
    points = np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)
    if not len(names) == len(points) == len(vertex):
        raise ValueError(f"{len(names)} point_names, {len(points)} points, {len(vertex)} vertex_loss")
    chart = _str(data["chart"]) if "chart" in data else "paper"
    factor = float(data.get("clip_factor", 1.2))  # a random chart's one centre: a wider window (connectivity)
    accuracy = data.get("accuracy")
    if accuracy is not None and np.shape(accuracy) != loss.shape:
        raise ValueError(f"accuracy has shape {np.shape(accuracy)}, loss has {loss.shape}")
    return {
        "x": x,
        "y": y,
        "loss": loss,
        "z": clip_for_display(loss, vertex, factor),
        "clip": f"clipped at {factor:g} × max solution loss",
        "accuracy": None if accuracy is None else np.asarray(accuracy, dtype=np.float64),
        "points": points,
        "names": names,
        "vertex": vertex,
        "axes": AXIS_TITLES.get(chart, ("x", "y")),
        "note": _str(data["note"]) if "note" in data else chart_note(chart, _distances(data.get("distances"))),
    }


# Short method names for the distance note (|FT−LoRA| reads better than |Full FT−LoRA|).
_SHORT = {"ft": "FT", "head_only": "head"}


def _distances(value) -> dict[str, float] | None:
    """``{"ft-lora": 9.21, ...}`` from a mapping, or from the 0-d object array an npz gives back."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        value = value.item()
    if not isinstance(value, Mapping):
        raise ValueError(f"distances must map a pair name such as 'ft-lora' to a number, got {type(value).__name__}")
    return {str(k): float(v) for k, v in value.items()}


def _pair_label(pair: str) -> str:
    parts = pair.split("-", 1) if pair.count("-") == 1 else [pair]
    return "|" + "−".join(_SHORT.get(p, LABELS.get(p, p)) for p in parts) + "|"


def chart_note(chart: str, distances: Mapping[str, float] | None = None) -> str:
    """What the plane's axes mean, for the reader: the paper chart is affine and NOT to scale.

    ``distances`` (pair name such as ``"ft-lora"`` -> Euclidean distance in weight space, as in
    :attr:`landscape.engine.plane.Chart.info` ``["distances"]``) are appended when given.
    """
    dist = ", ".join(f"{_pair_label(k)} = {v:.2f}" for k, v in (distances or {}).items())
    if chart == "orthonormal":
        return "orthonormal chart: true distances" + (f" ({dist})" if dist else " (axes in weight-space units)")
    if chart == "paper":
        head = "paper chart (affine, not to scale)"
        return f"{head}: {dist}" if dist else f"{head}: the axes are not weight-space distances"
    return f"{chart} chart" + (f": {dist}" if dist else "")


# Remaining Okabe-Ito colours for methods outside COLORS (valid in both matplotlib and plotly).
_EXTRA_COLORS = ("#E69F00", "#0072B2", "#009E73", "#F0E442")


def _color(name: str, i: int = 0) -> str:
    return COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _label(name: str) -> str:
    return LABELS.get(name, name)


# ------------------------------------------------------------------ interactive (plotly) ----


def _save(fig: Figure, path: str | os.PathLike, fmt: str, dpi: int = 150) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
