"""The interactive landscape (plotly): the 3-D surface with the solutions' markers lifted clear of it and the
contour map (:func:`landscape_figure`, :func:`landscape_html`); a one-row grid as a line (:func:`line_figure_html`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.ticker import MaxNLocator
from plotly.subplots import make_subplots

from landscape.engine.store import write_with
from landscape.render.style import _color, _label, _unpack

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
