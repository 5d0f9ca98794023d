"""The static landscape (matplotlib, PNG and PDF): the 3-D surface and contour map side by side with
labels placed clear of the markers (:func:`landscape_static`); a one-row grid as a line (:func:`line_figure`).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.mplot3d import proj3d

from landscape.render.style import TEMPO_R, _color, _label, _save, _unpack

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
