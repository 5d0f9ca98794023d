"""Figures: the loss landscape over the plane of three solutions, the loss along the straight
paths between them, and the spectra and ranks of the weight updates ΔW.

One colour and one label per method, used by every figure, so a reader can match
"LoRA" across the 3-D surface, the contour map and the spectrum plots.

Landscape display follows the RandLoRA paper: losses above 1.2 × the largest loss of the
three solutions are clipped so the basins stay readable; plotly ``Surface`` with the
``tempo_r`` colour scale and z-contours projected onto the floor, plus a contour map.
Unlike the paper's plotting code we do NOT transpose z: ``loss[i, j]`` is drawn at
``(x[j], y[i])`` in every figure.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator
from mpl_toolkits.mplot3d import proj3d
from plotly.subplots import make_subplots

from landscape.engine.store import write_with

__all__ = [
    "COLORS",
    "LABELS",
    "clip_for_display",
    "landscape_figure",
    "landscape_html",
    "landscape_static",
    "line_figure",
    "line_figure_html",
    "chart_note",
    "curve_figure",
    "marker_z",
    "PAIR_STYLES",
    "paths_figure",
    "rank_figure",
    "short_layer_names",
    "similarity_figure",
    "spectrum_figure",
]

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


# Default camera of the 3-D surface: from the front (−y) and to the right (+x), looking down at about
# 40°, as the static figure does. Orthographic, so the line of sight is the same for every point and
# :func:`marker_z` can lift the vertex markers exactly as far as this view needs.
CAMERA_EYE = (0.6, -1.1, 1.0)
ASPECT_Z = 0.6  # height of the 3-D box relative to its x side
BOX_SCALE = 1.35  # with an orthographic camera, the size of the box is the zoom


def _scene_aspect(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Aspect ratio (x, y, z) of the 3-D box: x:y as the data's ranges (within 1:2 and 2:1), z flatter."""
    sx, sy = float(x[-1] - x[0]), float(y[-1] - y[0])
    ratio = float(np.clip(sy / sx, 0.5, 2.0)) if sx > 0 and sy > 0 else 1.0
    return (BOX_SCALE, BOX_SCALE * ratio, BOX_SCALE * ASPECT_Z)


def _around(axis: np.ndarray, v: float) -> slice:
    """Grid lines of the cell holding ``v`` plus one more line on each side."""
    return slice(max(0, int(np.searchsorted(axis, v, "right")) - 2), int(np.searchsorted(axis, v, "left")) + 2)


def marker_z(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    px: float,
    py: float,
    *,
    lift: float,
    zrange: tuple[float, float],
    aspect: Sequence[float],
    eye: Sequence[float] | None = None,
) -> float:
    """Height at which a vertex marker at (px, py) is not hidden by the surface ``z[i, j]`` at (x[j], y[i]).

    ``lift`` above the higher of: the surface's maximum over the grid cells around (px, py), and the
    lowest height from which the line of sight towards the (orthographic) camera ``eye`` passes
    above the surface (drawn as any interpolation between grid nodes: bilinear, triangles).
    ``zrange`` and ``aspect`` are the scene's z axis range and box aspect ratio, which fix the
    direction of that line in data units.
    """
    eye = CAMERA_EYE if eye is None else eye
    zf = np.where(np.isfinite(z), z, -np.inf)
    need = float(np.max(zf[_around(y, py), _around(x, px)], initial=-np.inf))
    # the scene box in units where the camera direction is what plotly uses: axis range -> aspect
    sx = aspect[0] / max(float(x[-1] - x[0]), 1e-300)
    sy = aspect[1] / max(float(y[-1] - y[0]), 1e-300)
    sz = aspect[2] / max(float(zrange[1] - zrange[0]), 1e-300)
    e = np.asarray(eye, dtype=np.float64)
    e = e / np.linalg.norm(e)
    eh = e[:2]
    if e[2] > 0 and float(eh @ eh) > 0:
        X, Y = np.meshgrid((x - px) * sx, (y - py) * sy)  # node offsets from the marker, box units
        t = (X * eh[0] + Y * eh[1]) / float(eh @ eh)  # along the sight line's horizontal trace
        off = np.hypot(X - t * eh[0], Y - t * eh[1])  # distance from that trace
        cell = np.hypot(np.max(np.diff(x), initial=0.0) * sx, np.max(np.diff(y), initial=0.0) * sy)
        # Every node of every cell the line crosses: within one cell of its trace, and at most one
        # cell (along the trace) behind the marker. If each such node q satisfies
        # z_m + t_q·e_z >= z_q, so does any convex combination of them, i.e. the drawn surface.
        front = (t > -cell / np.sqrt(float(eh @ eh))) & (off <= cell) & np.isfinite(zf)
        if front.any():
            need = max(need, float(np.max(zf[front] - t[front] * e[2] / sz)))  # e_z / sz: data units
    if not np.isfinite(need):
        need = float(zrange[0])
    return need + lift


_LABEL_PX = 38  # pixels from a marker to its label in the plotly figure


def _screen_xy(x, y, zrange, aspect, points, heights, eye: Sequence[float] | None = None) -> np.ndarray:
    """Where the orthographic default camera puts 3-D points on screen (right, up), in box units."""
    eye = CAMERA_EYE if eye is None else eye
    lo = np.array([x[0], y[0], zrange[0]], dtype=np.float64)
    span = np.array([x[-1] - x[0], y[-1] - y[0], zrange[1] - zrange[0]], dtype=np.float64)
    box = (np.column_stack([np.asarray(points, dtype=np.float64), heights]) - lo) / np.maximum(span, 1e-300)
    box = box * np.asarray(aspect, dtype=np.float64)
    f = -np.asarray(eye, dtype=np.float64) / np.linalg.norm(eye)  # viewing direction
    right = np.cross(f, (0.0, 0.0, 1.0))
    right = right / n if (n := np.linalg.norm(right)) > 0 else np.array([1.0, 0.0, 0.0])
    return np.column_stack([box @ right, box @ np.cross(right, f)])


def _outward(xy) -> np.ndarray:
    """Unit vectors from the centroid of the points to each point (straight up for the centroid itself)."""
    xy = np.asarray(xy, dtype=np.float64)
    v = xy - xy.mean(axis=0)
    n = np.hypot(v[:, 0], v[:, 1])
    scale = max(float(n.max(initial=0.0)), 1e-300)
    up = np.tile([0.0, 1.0], (len(xy), 1))
    return np.where((n > 1e-9 * scale)[:, None], v / np.where(n > 0, n, 1.0)[:, None], up)


def _z_ticks(lo: float, hi: float) -> dict:
    """Tick values and texts for the 3-D z axis, none near the middle: plotly puts the axis title
    there and offers no padding, so a tick in the middle would print over "loss". None at the very
    bottom either, where it would print over the first x or y tick in the corner."""
    step_ticks = MaxNLocator(nbins=6).tick_values(lo, hi)
    span = hi - lo
    ticks = [float(t) for t in step_ticks if lo + 0.06 * span <= t <= hi and abs(t - (lo + hi) / 2) > 0.12 * span]
    step = float(step_ticks[1] - step_ticks[0]) if len(step_ticks) > 1 else 1.0
    # as many decimals as the step needs (0.025 needs 3)
    digits = next((k for k in range(10) if abs(round(step, k) - step) <= 1e-6 * step), 3)
    return dict(tickvals=ticks, ticktext=[f"{t:.{digits}f}" for t in ticks])


def _hover_text(d: dict) -> np.ndarray:
    """Hover text per cell with the true loss (not the clipped display value) and accuracy.

    An object array: plotly.py keeps it 2-D (a nested list of str would be flattened row-wise into
    strings for Surface), and plotly.js reads text[i][j] for cell (x[j], y[i])."""
    acc = d["accuracy"] if d["accuracy"] is not None else np.full_like(d["z"], np.nan)
    rows = [
        [f"loss {lo:.4g}<br>accuracy {ac:.4g}" for lo, ac in zip(row_l, row_a, strict=True)]
        for row_l, row_a in zip(d["loss"], acc, strict=True)
    ]
    return np.array(rows, dtype=object)


def _surface_and_contour(fig: go.Figure, d: dict, lo: float, hi: float) -> None:
    x, y, z = d["x"], d["y"], d["z"]
    xt, yt = d["axes"]
    text, hover = _hover_text(d), f"{xt}=%{{x:.3f}}<br>{yt}=%{{y:.3f}}<br>%{{text}}<extra></extra>"
    # One explicit colour scale and range per trace: plotly.js drops a coloraxis shared by a
    # Surface and a Contour ("incompatible colorscales") and falls back to its default scale.
    colorscale = pcolors.make_colorscale(pcolors.sequential.tempo_r)
    lighting = dict(ambient=0.75, diffuse=0.5, specular=0.05, roughness=0.9, fresnel=0.05)
    fig.add_trace(
        go.Surface(  # z[i][j] at (x[j], y[i]) — same convention as ours, so no transpose
            x=x, y=y, z=z, colorscale=colorscale, cmin=lo, cmax=hi, showscale=False, lighting=lighting,
            contours_z=dict(show=True, project_z=True, usecolormap=True), text=text, hovertemplate=hover, name="loss",
        ),
        row=1, col=1,
    )  # fmt: skip
    fig.add_trace(
        go.Contour(
            x=x, y=y, z=z, colorscale=colorscale, zmin=lo, zmax=hi, colorbar=dict(title="loss", tickformat=".3f"),
            text=text, hovertemplate=hover, name="loss",
        ),
        row=1, col=2,
    )  # fmt: skip


def _marker_heights(d: dict, lo: float, hi: float, aspect) -> tuple[list[float], tuple[float, float], float]:
    """Marker heights above the surface around each solution, the z range that holds them, and the lift."""
    x, y, z = d["x"], d["y"], d["z"]
    top = hi + (0.15 * (hi - lo) if hi > lo else 0.5 * max(abs(hi), 1.0))
    lift = 0.04 * (top - lo)
    for _ in range(10):  # the z range holds the markers; a taller range flattens the view: iterate
        zrange = (lo, top)
        heights = [marker_z(x, y, z, px, py, lift=lift, zrange=zrange, aspect=aspect) for px, py in d["points"]]
        if max(heights) + lift <= top:
            break
        top = lo + 1.1 * (max(heights) + lift - lo)
    return heights, zrange, lift


def _solution_markers(fig: go.Figure, d: dict, heights: list[float], hi: float, away2, away3) -> list[dict]:
    """Each solution: a stem and a marker in the scene, a marker and a label on the contour map; returns
    the scene's labels (annotations drawn over the WebGL scene, so the surface never hides them)."""
    xt, yt = d["axes"]
    scene_labels = []
    for i, (name, (px, py), pz, mz) in enumerate(zip(d["names"], d["points"], d["vertex"], heights, strict=True)):
        c = _color(name, i)
        style = dict(color=c, size=10, line=dict(color="white", width=2))
        fig.add_trace(  # a stem from the solution's loss on the surface up to its marker
            go.Scatter3d(x=[px, px], y=[py, py], z=[min(pz, hi), mz], mode="lines", line=dict(color=c, width=4),
                         legendgroup=name, showlegend=False, hoverinfo="skip"),
            row=1, col=1,
        )  # fmt: skip
        fig.add_trace(
            go.Scatter3d(
                x=[px], y=[py], z=[mz], mode="markers", marker=style, name=_label(name), legendgroup=name,
                hovertemplate=f"{_label(name)}<br>{xt}={px:.3f}<br>{yt}={py:.3f}<br>loss {pz:.4g}"
                "<br>(marker drawn above the surface so it stays visible)<extra></extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(x=[px], y=[py], mode="markers", marker=dict(style, size=11, line=dict(color="white", width=1)),
                       name=_label(name), legendgroup=name, showlegend=False,
                       hovertemplate=f"{_label(name)}<br>loss {pz:.4g}<extra></extra>"),
            row=1, col=2,
        )  # fmt: skip
        label = dict(text=f"<b>{_label(name)}</b>", font=dict(color=c, size=14), bgcolor="rgba(255,255,255,0.85)",
                     borderpad=2, showarrow=True, arrowcolor=c, arrowwidth=1.5, arrowhead=0, standoff=7)  # fmt: skip
        u3, u2 = away3[i], away2[i]
        scene_labels.append(dict(label, x=px, y=py, z=mz, ax=_LABEL_PX * u3[0], ay=-_LABEL_PX * u3[1]))
        fig.add_annotation(label, x=px, y=py, ax=_LABEL_PX * u2[0], ay=-_LABEL_PX * u2[1], row=1, col=2)
    return scene_labels


def landscape_figure(data: Mapping, title: str) -> go.Figure:
    """Plotly figure: 3-D surface (left) and contour map (right) sharing one colour axis."""
    d = _unpack(data)
    x, y, z = d["x"], d["y"], d["z"]
    xt, yt = d["axes"]
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    fig = make_subplots(
        rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "xy"}]], column_widths=[0.58, 0.42],
        subplot_titles=(f"surface ({d['clip']}; markers drawn above it)", "contour map"),
    )  # fmt: skip
    _surface_and_contour(fig, d, lo, hi)
    aspect = _scene_aspect(x, y)
    heights, zrange, _ = _marker_heights(d, lo, hi, aspect)
    # Labels are pushed away from the other markers: outwards from the centroid, on screen.
    away3 = _outward(_screen_xy(x, y, zrange, aspect, d["points"], heights))
    scene_labels = _solution_markers(fig, d, heights, hi, _outward(d["points"]), away3)
    eye = dict(zip("xyz", CAMERA_EYE, strict=True))
    fig.update_layout(
        title=dict(text=f"{title}<br><sup>{d['note']}</sup>"),
        scene=dict(
            xaxis=dict(title=xt, range=[float(x[0]), float(x[-1])]),
            yaxis=dict(title=yt, range=[float(y[0]), float(y[-1])]),
            zaxis=dict(title="loss", range=list(zrange), tickangle=0, **_z_ticks(*zrange)),
            aspectmode="manual",
            aspectratio=dict(zip("xyz", aspect, strict=True)),
            camera=dict(eye=eye, projection=dict(type="orthographic")),
            annotations=scene_labels,
        ),
        legend=dict(x=0.0, y=1.0),
        width=1400,
        height=700,
        margin=dict(t=110),
    )
    fig.update_xaxes(title_text=xt, row=1, col=2)
    # equal units on both axes so distances and angles on the plane are not distorted
    fig.update_yaxes(title_text=yt, scaleanchor="x", scaleratio=1, row=1, col=2)
    return fig


def landscape_html(data: Mapping, path: str | os.PathLike, title: str) -> None:
    """Self-contained HTML (plotly.js inlined, opens offline) of :func:`landscape_figure`, or of
    :func:`line_figure_html` when the grid has one row (``random-line``)."""
    fig = line_figure_html(data, title) if np.size(data["y"]) == 1 else landscape_figure(data, title)
    write_with(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs=True, full_html=True))


# ---------------------------------------------------------------------- static (matplotlib) --


def _static_surface(ax3, d: dict, X, Y, zm, vmin: float, vmax: float) -> None:
    xt, yt = d["axes"]
    # mplot3d sorts artists by depth and tends to hide markers under the surface; draw in zorder.
    ax3.computed_zorder = False
    ax3.plot_surface(X, Y, zm, cmap=TEMPO_R, vmin=vmin, vmax=vmax, rstride=1, cstride=1, linewidth=0.2,
                     edgecolor=(1, 1, 1, 0.25), antialiased=True, zorder=1)  # fmt: skip
    ax3.set_xlabel(xt)
    ax3.set_ylabel(yt)
    # few z ticks, and the "loss" label pushed clear of them
    ax3.zaxis.set_major_locator(MaxNLocator(nbins=5))
    ax3.set_zlabel("loss", labelpad=14)
    ax3.tick_params(axis="z", pad=6)
    # x to the right and y into the page, as in the contour map next to it
    ax3.view_init(elev=48, azim=-60)
    ax3.set_box_aspect(None, zoom=0.85)  # room for the z label inside the constrained layout


def _static_labels(fig: Figure, ax3, ax2, d: dict, heights: list[float]) -> None:
    """Label each marker on the side where its label box is farthest from the other markers and labels
    (the 3-D view, limits included, is fixed before the markers are projected)."""
    fig.draw_without_rendering()
    proj = ax3.get_proj()
    on3 = [proj3d.proj_transform(px, py, pz, proj)[:2] for (px, py), pz in zip(d["points"], heights, strict=True)]
    labels = [_label(n) for n in d["names"]]
    colors = [_color(n, i) for i, n in enumerate(d["names"])]
    for ax, xy in ((ax3, on3), (ax2, [tuple(p) for p in d["points"]])):
        for (lx, ly), (dx, dy, ha, va), text, c in zip(xy, _label_offsets(ax, xy, labels), labels, colors, strict=True):
            ax.annotate(
                text, (lx, ly), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=11,
                fontweight="bold", color=c, zorder=11, annotation_clip=False,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8),
            )  # fmt: skip


def _static_figure(data: Mapping, title: str) -> Figure:
    d = _unpack(data)
    x, y, z = d["x"], d["y"], d["z"]
    xt, yt = d["axes"]
    X, Y = np.meshgrid(x, y)  # (ny, nx): X[i, j] = x[j], Y[i, j] = y[i], matching z[i, j]
    zm = np.ma.masked_invalid(z)
    vmin, vmax = float(zm.min()), float(zm.max())
    fig = Figure(figsize=(14, 6), layout="constrained")
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax2 = fig.add_subplot(1, 2, 2)
    _static_surface(ax3, d, X, Y, zm, vmin, vmax)
    levels = MaxNLocator(nbins=20).tick_values(vmin, vmax) if vmax > vmin else None
    cf = ax2.contourf(x, y, zm, levels=levels, cmap=TEMPO_R, vmin=vmin, vmax=vmax)
    ax2.contour(x, y, zm, levels=cf.levels, colors="white", linewidths=0.4, alpha=0.5)
    ax2.set_xlabel(xt)
    ax2.set_ylabel(yt)
    ax2.set_aspect("equal")
    heights = [min(pz, vmax) for pz in d["vertex"]]
    for i, (name, (px, py), pz) in enumerate(zip(d["names"], d["points"], heights, strict=True)):
        c = _color(name, i)
        ax3.scatter([px], [py], [pz], color=c, s=70, edgecolors="white", linewidths=1.2, depthshade=False,
                    zorder=10, label=_label(name))  # fmt: skip
        ax2.scatter([px], [py], color=c, s=80, edgecolors="white", linewidths=1.2, zorder=10)
    ax3.legend(loc="upper left")
    fig.colorbar(cf, ax=ax2, label=f"loss ({d['clip']})")
    fig.suptitle(title)
    fig.supxlabel(d["note"], fontsize=10, color="0.2")
    ax3.set_xlim(float(x[0]), float(x[-1]))
    ax3.set_ylim(float(y[0]), float(y[-1]))
    ax3.set_zlim(vmin, vmax if vmax > vmin else vmin + 1.0)
    _static_labels(fig, ax3, ax2, d, heights)
    return fig


_LABEL_GAP = 9.0  # points from a marker's centre to its label
_MARKER_RADIUS = 5.0  # points


def _label_offsets(ax, xy: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 11) -> list:
    """Per marker (data coordinates of ``ax``) an offset (points) and alignment for its label.

    Of eight directions around the marker, the one whose label box keeps the largest clearance
    from every other marker and every label placed before it, inside the axes; ties go to the
    direction pointing away from the markers' centroid.
    """
    fig = ax.get_figure()
    k = fig.dpi / 72.0  # display pixels per point
    pts = ax.transData.transform(np.asarray(xy, dtype=np.float64))
    centre = pts.mean(axis=0)
    box = ax.bbox
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for m, (p, text) in enumerate(zip(pts, labels, strict=True)):
        w, h = (0.68 * fontsize * len(text) + 6) * k, (1.5 * fontsize) * k  # bold text + bbox padding
        away = p - centre
        away = away / n if (n := float(np.hypot(*away))) > 0 else np.zeros(2)
        best = None
        for angle in np.deg2rad(np.arange(0, 360, 45)):
            u = np.array([np.cos(angle), np.sin(angle)])
            ax_, ay_ = p + _LABEL_GAP * k * u
            ha = "left" if u[0] > 0.3 else "right" if u[0] < -0.3 else "center"
            va = "bottom" if u[1] > 0.3 else "top" if u[1] < -0.3 else "center"
            x0 = ax_ if ha == "left" else ax_ - w if ha == "right" else ax_ - w / 2
            y0 = ay_ if va == "bottom" else ay_ - h if va == "top" else ay_ - h / 2
            rect = (x0, y0, x0 + w, y0 + h)
            clear = [_rect_distance(rect, q, q) - _MARKER_RADIUS * k for j, q in enumerate(pts) if j != m]
            clear += [_rect_gap(rect, r) for r in placed]
            score = min(clear, default=np.inf)
            if rect[0] < box.x0 or rect[2] > box.x1 or rect[1] < box.y0 or rect[3] > box.y1:
                score -= 1e6  # outside the axes: only if nothing else fits
            score = min(score, 40.0 * k) + float(u @ away)  # beyond 40 points, only the direction matters
            if best is None or score > best[0]:
                best = (score, u, ha, va, rect)
        _, u, ha, va, rect = best
        placed.append(rect)
        out.append((float(_LABEL_GAP * u[0]), float(_LABEL_GAP * u[1]), ha, va))
    return out


def _rect_distance(rect: tuple[float, float, float, float], lo, hi) -> float:
    """Distance between an axis-aligned rectangle and the box [lo, hi] (a point when lo == hi)."""
    dx = max(rect[0] - hi[0], lo[0] - rect[2], 0.0)
    dy = max(rect[1] - hi[1], lo[1] - rect[3], 0.0)
    return float(np.hypot(dx, dy))


def _rect_gap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return _rect_distance(a, (b[0], b[1]), (b[2], b[3]))


def _save(fig: Figure, path: str | os.PathLike, fmt: str, dpi: int = 150) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def landscape_static(data: Mapping, png_path: str | os.PathLike, pdf_path: str | os.PathLike, title: str) -> None:
    """3-D surface and contour map side by side (a one-row grid: :func:`line_figure`), saved as PNG (150 dpi)
    and vector PDF."""
    fig = line_figure(data, title) if np.size(data["y"]) == 1 else _static_figure(data, title)
    _save(fig, png_path, "png")
    _save(fig, pdf_path, "pdf")


# ------------------------------------------------------------------ a one-row grid (1-D) ----


def line_figure(data: Mapping, title: str) -> Figure:
    """A landscape of one row (``random-line``): loss along x, unclipped, the solutions on it marked in their
    colours. (No standard-error band: the points share their samples, so their differences are far surer than
    each point's standard error says.)"""
    d = _unpack(data)
    x, loss = d["x"], d["loss"][0]
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, loss, color="0.2", linewidth=1.8, marker=".", markersize=5, label="loss")
    for i, (name, (px, _), pz) in enumerate(zip(d["names"], d["points"], d["vertex"], strict=True)):
        ax.plot([px], [pz], "o", color=_color(name, i), markersize=10, markeredgecolor="white", zorder=5,
                label=_label(name))  # fmt: skip
    ax.set_xlabel(d["axes"][0])
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    fig.supxlabel("\n".join(textwrap.wrap(d["note"], 110)), fontsize=8, color="0.2")
    return fig


def line_figure_html(data: Mapping, title: str) -> go.Figure:
    """:func:`line_figure` in plotly (the interactive landscape.html of a one-row grid)."""
    d = _unpack(data)
    x, loss = d["x"], d["loss"][0]
    acc = d["accuracy"][0] if d["accuracy"] is not None else np.full_like(loss, np.nan)
    fig = go.Figure(go.Scatter(x=x, y=loss, mode="lines+markers", line=dict(color="#333333"), name="loss",
                               customdata=acc, hovertemplate="x=%{x:.3f}<br>loss %{y:.4g}<br>accuracy "
                               "%{customdata:.4g}<extra></extra>"))  # fmt: skip
    for i, (name, (px, _), pz) in enumerate(zip(d["names"], d["points"], d["vertex"], strict=True)):
        marker = dict(color=_color(name, i), size=12, line=dict(color="white", width=2))
        fig.add_trace(go.Scatter(x=[px], y=[pz], mode="markers", name=_label(name), marker=marker))
    fig.update_layout(title=dict(text=f"{title}<br><sup>{d['note']}</sup>"), xaxis_title=d["axes"][0],
                      yaxis_title="loss", width=1000, height=600)  # fmt: skip
    return fig


# ------------------------------------------------------------------ linear paths (1-D) -----

# One colour per pair, from the Okabe-Ito colours the methods do not use, plus a line style
# per pair so the figure also reads in grayscale.
PAIR_STYLES = {"ft-lora": ("#E69F00", "-"), "ft-randlora": ("#0072B2", "--"), "lora-randlora": ("#009E73", "-.")}


def _barrier_label(info: Mapping) -> str:
    """``barrier X`` and, when recorded (results from before the chord barrier have none), ``; chord Y``."""
    chord = info.get("chord_barrier")
    return f"barrier {info['barrier']:.3g}" + ("" if chord is None else f"; chord {chord:.3g}")


def _draw_barriers(ax, info: Mapping, color: str) -> None:
    """One path's two barriers: the mean endpoint loss (dotted) with a solid arrow up to the highest loss on
    [0, 1], and the chord (1 − t)·L(0) + t·L(1) (dashed) with a thin arrow up to where the path is furthest
    above it. The chord is drawn from the endpoint losses, also for results that predate the chord barrier."""
    ax.hlines(info["mean_endpoint_loss"], 0.0, 1.0, colors=color, linestyles=":", linewidth=1)
    ax.annotate(
        "",
        xy=(info["t_max"], info["loss_max"]),
        xytext=(info["t_max"], info["mean_endpoint_loss"]),
        arrowprops=dict(arrowstyle="<->", color=color, linewidth=1.2, shrinkA=0, shrinkB=0),
    )
    ax.plot([0.0, 1.0], [info["loss_t0"], info["loss_t1"]], color=color, linestyle=(0, (5, 3)), linewidth=0.9)
    if info.get("chord_t_max") is not None:
        tc = info["chord_t_max"]
        on_chord = (1.0 - tc) * info["loss_t0"] + tc * info["loss_t1"]
        ax.annotate(
            "",
            xy=(tc, info["chord_loss_max"]),
            xytext=(tc, on_chord),
            arrowprops=dict(arrowstyle="<->", color=color, linewidth=0.8, linestyle="--", shrinkA=0, shrinkB=0),
        )


def _end_markers(ax, pairs: Sequence[str], ends: Mapping[str, tuple[float, float]]) -> list[Line2D]:
    """The solutions at t = 0 and 1 in their method colours (``ends``: pair → (L(0), L(1))); their legend handles."""
    for pair in pairs:
        for end, name, y in zip((0.0, 1.0), pair.split("-", 1), ends[pair], strict=True):
            ax.plot([end], [y], "o", color=COLORS.get(name, "0.2"), markersize=9, markeredgecolor="white", zorder=5)
    named = [n for p in pairs for n in p.split("-", 1)]
    names = [n for n in LABELS if n in named] + [n for n in dict.fromkeys(named) if n not in LABELS]
    return [
        Line2D([], [], marker="o", linestyle="", color=COLORS.get(n, "0.2"), markersize=9, markeredgecolor="white",
               label=LABELS.get(n, n))
        for n in names
    ]  # fmt: skip


def _barrier_keys() -> list[Line2D]:
    """Legend entries that explain the barrier marks (fresh artists: an artist belongs to one figure)."""
    chord = "chord (1 − t)·L(0) + t·L(1); ↕ chord barrier"
    return [
        Line2D([], [], color="0.3", linestyle=":", label="mean endpoint loss; ↕ barrier"),
        Line2D([], [], color="0.3", linestyle=(0, (5, 3)), linewidth=0.9, label=chord),
    ]


def paths_figure(result: Mapping, title: str | None = None) -> Figure:
    """Loss along t per pair; solutions marked in their method colours, barriers as vertical arrows, chords dashed."""
    t = np.asarray(result["t"], dtype=np.float64)
    loss = np.asarray(result["loss"], dtype=np.float64)
    pairs = [str(p) for p in result["pairs"]]
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.axvspan(0.0, 1.0, color="0.93", zorder=0)
    for k, pair in enumerate(pairs):
        color, style = PAIR_STYLES.get(pair, ("0.3", "-"))
        a, b = pair.split("-", 1)
        info = result["barriers"][pair]
        label = f"{LABELS.get(a, a)} → {LABELS.get(b, b)}  ({_barrier_label(info)})"
        ax.plot(t, loss[k], color=color, linestyle=style, linewidth=1.8, marker=".", markersize=4, label=label)
        _draw_barriers(ax, info, color)
    handles, _ = ax.get_legend_handles_labels()
    ends = {p: (result["barriers"][p]["loss_t0"], result["barriers"][p]["loss_t1"]) for p in pairs}
    handles += _end_markers(ax, pairs, ends) + _barrier_keys()
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("t   (θ = (1 − t)·θ_A + t·θ_B)")
    ax.set_ylabel("mean cross-entropy loss")
    pad = 0.03 * float(t[-1] - t[0])  # room for the solutions' markers and barrier arrows at the ends
    ax.set_xlim(float(t[0]) - pad, float(t[-1]) + pad)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Loss along the linear paths between the solutions", fontsize=10)
    return fig


CURVE_KINDS = {"bezier": "Bézier curve", "polychain": "polygonal chain"}


def curve_figure(result: Mapping, title: str | None = None) -> Figure:
    """A trained curve between two solutions against the straight line between them (landscape.curves):
    loss along t ∈ [0, 1] for both, each with its barriers; the chord between the endpoint losses dashed.

    ``result``: ``t`` (n,), ``loss`` (2, n) with rows ``paths`` = ("curve", "line"), ``barriers`` per row
    (:func:`landscape.paths.loss_barrier`), ``pair`` ("ft-lora"), ``kind`` and ``bends``.
    """
    t = np.asarray(result["t"], dtype=np.float64)
    loss = np.asarray(result["loss"], dtype=np.float64)
    rows = [str(p) for p in result["paths"]]
    pair = str(result["pair"])
    color, style = PAIR_STYLES.get(pair, ("0.45", "--"))
    kind = CURVE_KINDS.get(str(result["kind"]), str(result["kind"]))
    looks = {
        "curve": ("0.1", "-", f"{kind}, {result['bends']} bend{'s' * (int(result['bends']) != 1)}"),
        "line": (color, style if style != "-" else "--", "straight line"),
    }
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for k, row in enumerate(rows):
        c, ls, name = looks.get(row, ("0.5", "-", row))
        info = result["barriers"][row]
        ax.plot(t, loss[k], color=c, linestyle=ls, linewidth=1.8, marker=".", markersize=4,
                label=f"{name}  ({_barrier_label(info)})")  # fmt: skip
        _draw_barriers(ax, info, c)
    info = result["barriers"][rows[0]]
    handles, _ = ax.get_legend_handles_labels()
    handles += _end_markers(ax, [pair], {pair: (info["loss_t0"], info["loss_t1"])}) + _barrier_keys()
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("t   (curve: θ(t) with θ(0) = θ_A, θ(1) = θ_B; line: (1 − t)·θ_A + t·θ_B)")
    ax.set_ylabel("mean loss")
    ax.set_xlim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    a, b = pair.split("-", 1)
    ax.set_title(title or f"Loss along a trained curve and the straight line, {LABELS.get(a, a)} → "
                 f"{LABELS.get(b, b)}", fontsize=10)  # fmt: skip
    return fig


# ---------------------------------------------------------------------------- spectra -------


def _methods(layers: Sequence[Mapping]) -> list[str]:
    found = [k for k in layers[0] if k not in ("name", "shape", "base")] if layers else []  # base: W0's spectrum
    # the fixed order (FT, LoRA, RandLoRA, ...) first, then anything else as found
    return [m for m in LABELS if m in found] + [m for m in found if m not in LABELS]


def _wrap_name(name: str, width: int = 34) -> str:
    """Full parameter name (the tower matters: visual.* vs transformer.*), split at a dot if long."""
    name = name.removesuffix(".weight")
    if len(name) <= width or "." not in name:
        return name
    dots = [i for i, ch in enumerate(name) if ch == "."]
    cut = min(dots, key=lambda i: abs(i - len(name) / 2))
    return name[: cut + 1] + "\n" + name[cut + 1 :]


def spectrum_figure(spectrum: Mapping, png_path: str | os.PathLike, max_layers: int = 4) -> None:
    """Normalised singular values of a few layers spread over depth, and effective rank per layer.

    ``spectrum`` is the output of :func:`landscape.spectrum.analyse`.
    """
    layers = list(spectrum["layers"])
    if not layers:
        raise ValueError("spectrum has no layers")
    methods = _methods(layers)
    n = min(max_layers, len(layers))
    # first, last and evenly in between
    picks = sorted({int(round(v)) for v in np.linspace(0, len(layers) - 1, n)})
    fig = Figure(figsize=(3.6 * len(picks) + 1, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, len(picks))

    for col, li in enumerate(picks):
        ax = fig.add_subplot(grid[0, col])
        layer = layers[li]
        for mi, m in enumerate(methods):
            s = np.asarray(layer[m]["singular_values"], dtype=np.float64)
            if s.size == 0 or s[0] <= 0:
                continue  # zero update: nothing to normalise
            r = s / s[0]
            r[r <= 0] = np.nan  # exact zeros cannot be drawn on a log axis
            ax.plot(np.arange(1, len(r) + 1), r, color=_color(m, mi), label=_label(m), lw=1.5)
        ax.set_yscale("log")
        shape = "×".join(str(v) for v in layer["shape"])
        ax.set_title(f"[{li}] {_wrap_name(layer['name'])}  ({shape})", fontsize=9)
        ax.set_xlabel("index i")
        if col == 0:
            ax.set_ylabel(r"$s_i\,/\,s_1$")
            ax.legend(fontsize=9)
        ax.grid(True, which="major", alpha=0.3)

    ax = fig.add_subplot(grid[1, :])
    idx = np.arange(len(layers))
    for mi, m in enumerate(methods):
        er = [layer[m]["effective_rank"] for layer in layers]
        ax.plot(idx, er, marker="o", ms=4, color=_color(m, mi), label=_label(m), lw=1.2)
    for li in picks:
        ax.axvline(li, color="0.6", ls=":", lw=1)  # the layers shown above
    ax.set_xlabel("layer index (order in the spectrum file; dotted: layers shown above)")
    ax.set_ylabel("effective rank")
    ax.set_yscale("log")
    ax.legend(fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.suptitle("Singular-value spectra of the weight updates ΔW")
    _save(fig, png_path, "png")


# ------------------------------------------------------- ranks and similarity to full FT ----


_RANK_MARKERS = ("o", "s", "^", "D", "v", "P")

RANK_FIG_WIDTH = 11.0  # inches, whatever the number of layers (1650 px at 150 dpi)


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names without ``.weight`` and without the leading components every name shares.

    Everything that tells layers apart stays (``visual.`` vs ``transformer.``), and a name never
    starts with a bare block number: ``layer.0.attention.self.query``, not ``0.attention...``.
    """
    names = [str(n).removesuffix(".weight") for n in names]
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    dots = [i for i, ch in enumerate(prefix) if ch == "."]
    cut = dots[-1] + 1 if dots else 0
    if len(dots) >= 1 and any(n[cut : cut + 1].isdigit() for n in names):
        cut = dots[-2] + 1 if len(dots) >= 2 else 0
    return [n[cut:] for n in names]


def _rank_figure(spectrum: Mapping) -> Figure:
    layers = list(spectrum["layers"])
    if not layers:
        raise ValueError("spectrum has no layers")
    methods = _methods(layers)
    n = len(layers)
    names = short_layer_names([layer["name"] for layer in layers])
    width = max(len(f"{n - 1} {s}") for s in names)
    # one row per layer: the figure grows downwards with the layers, never sideways
    fig = Figure(figsize=(RANK_FIG_WIDTH, 1.9 + 0.17 * n), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    idx = np.arange(n)
    # alternate shading per block (the name up to its first number): layer.0.*, layer.1.*, ...
    blocks = [re.match(r"\D*\d+", s).group(0) if re.match(r"\D*\d+", s) else s for s in names]
    band, shade = 0, []
    for i in range(n):
        band ^= int(i > 0 and blocks[i] != blocks[i - 1])
        shade.append(band)
    for ax, key, label in zip(axes, ("effective_rank", "stable_rank"), ("effective rank", "stable rank"), strict=True):
        for i in idx[np.asarray(shade, dtype=bool)]:
            ax.axhspan(i - 0.5, i + 0.5, color="0.93", lw=0, zorder=0)
        for mi, m in enumerate(methods):
            values = np.array([float(layer[m].get(key) or 0.0) for layer in layers])
            ax.plot(
                np.where(values > 0, values, np.nan),  # log axis: a zero update has no rank to draw
                idx,
                linestyle="",
                marker=_RANK_MARKERS[mi % len(_RANK_MARKERS)],
                markersize=5,
                markeredgecolor="white",
                markeredgewidth=0.5,
                color=_color(m, mi),
                alpha=0.9,
                label=_label(m),
                zorder=3,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 3, 10, 100 rather than 3×10⁰
        # minor ticks labelled only where the axis spans less than about a decade
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
        ax.set_xlabel(f"{label} (log scale)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.tick_params(axis="y", length=0)
    axes[0].set_yticks(idx, [f"{i} {s}" for i, s in enumerate(names)], fontsize=7 if width <= 48 else 6)
    axes[0].set_ylim(n - 0.5, -0.5)  # first layer at the top
    axes[0].set_ylabel("layer (order in the spectrum file)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(methods), fontsize=9)
    fig.suptitle(f"Effective and stable rank of the weight updates ΔW per layer ({n} layers)")
    return fig


def rank_figure(
    spectrum: Mapping,
    png_path: str | os.PathLike,
    pdf_path: str | os.PathLike | None = None,
) -> None:
    """Effective rank (left) and stable rank (right) per layer, one row per layer, one marker per method.

    ``spectrum`` is the output of :func:`landscape.spectrum.analyse`; log scale, one colour and marker
    per method. The figure is :data:`RANK_FIG_WIDTH` inches wide for any number of layers.
    """
    fig = _rank_figure(spectrum)
    _save(fig, png_path, "png")
    if pdf_path is not None:
        _save(fig, pdf_path, "pdf")


def similarity_figure(
    spectrum: Mapping,
    png_path: str | os.PathLike,
    pdf_path: str | os.PathLike | None = None,
) -> None:
    """Subspace overlap ‖U_X,kᵀ U_ft,k‖²_F / k with full fine-tuning versus k, mean over layers.

    The band spans the 10th to 90th percentile over layers; the vertical line marks k = LoRA's r;
    the dotted grey curve is the mean k / out expected for random subspaces.
    """
    layers = list(spectrum["layers"])
    settings = spectrum.get("settings", {})
    ref = settings.get("reference") or "ft"
    key = f"similarity_to_{ref}"
    methods = [m for m in _methods(layers) if m != ref and layers and key in layers[0][m]]
    if not methods:
        raise ValueError(f"spectrum has no similarity to {ref!r}")
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    kmax = max(len(layer[m][key]["overlap"]) for layer in layers for m in methods)
    for mi, m in enumerate(methods):
        curves = np.full((len(layers), kmax), np.nan)
        for li, layer in enumerate(layers):
            c = layer[m][key]["overlap"]
            curves[li, : len(c)] = c
        k = np.arange(1, kmax + 1)
        mean = np.nanmean(curves, axis=0)
        lo, hi = np.nanpercentile(curves, 10, axis=0), np.nanpercentile(curves, 90, axis=0)
        ax.fill_between(k, lo, hi, color=_color(m, mi), alpha=0.2, lw=0)
        ax.plot(k, mean, color=_color(m, mi), lw=2, label=f"{_label(m)} (mean, 10–90 % band)")
    k = np.arange(1, kmax + 1)
    rand = np.mean([np.minimum(k, layer["shape"][0]) / layer["shape"][0] for layer in layers], axis=0)
    ax.plot(k, rand, color="0.5", ls=":", lw=1.2, label="random subspaces (k / out)")
    r = settings.get("lora_rank")
    if r:
        ax.axvline(r, color=_color("lora"), ls="--", lw=1.2, label=f"LoRA rank r = {r}")
    ax.set_xlabel("k (top-k left singular vectors)")
    ax.set_ylabel(rf"overlap with {_label(ref)}: $\|U_{{X,k}}^\top U_{{ref,k}}\|_F^2\,/\,k$")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, kmax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(f"Similarity of the update's top singular subspace to {_label(ref)}'s ({len(layers)} layers)")
    _save(fig, png_path, "png")
    if pdf_path is not None:
        _save(fig, pdf_path, "pdf")
