"""The merges figure (``merges.png`` / ``.pdf``, :mod:`landscape.merges`): the merged weights placed on the
plane's loss contour by their projected coordinates, beside each merge's gap above its best endpoint ± 2 SE
(with its distance off the plane, which the contour cannot show)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from landscape.render.style import AXIS_TITLES, TEMPO_R, _color, _label, clip_for_display

KIND_STYLES = {"task_arithmetic": ("o", "#009E73", "task arithmetic"), "ties": ("^", "#0072B2", "TIES"),
               "dare": ("s", "#E69F00", "DARE")}  # fmt: skip
# task arithmetic and DARE land on the same coordinates (DARE is unbiased): the later kinds are drawn smaller
KIND_SIZES = {"task_arithmetic": 120, "ties": 60, "dare": 32}


def _plane(ax, result: Mapping, surface: Mapping | None) -> None:
    vertices = result.get("vertices") or {}
    if surface is not None:
        losses = [e["loss"] for e in result["endpoints"].values()]
        z = np.ma.masked_invalid(clip_for_display(surface["loss"], losses))
        vmin, vmax = float(z.min()), float(z.max())
        levels = MaxNLocator(nbins=20).tick_values(vmin, vmax) if vmax > vmin else None
        cf = ax.contourf(surface["x"], surface["y"], z, levels=levels, cmap=TEMPO_R)
        ax.contour(surface["x"], surface["y"], z, levels=cf.levels, colors="white", linewidths=0.4, alpha=0.5)
        ax.get_figure().colorbar(cf, ax=ax, label="loss (clipped at 1.2 × max solution loss)")
    for i, (name, (px, py)) in enumerate(vertices.items()):
        ax.scatter([px], [py], color=_color(name, i), s=90, edgecolors="white", linewidths=1.2, zorder=10)
        ax.annotate(_label(name), (px, py), xytext=(6, 6), textcoords="offset points", fontsize=10,
                    fontweight="bold", color=_color(name, i), zorder=11)  # fmt: skip
    seen = set()
    for m in result["merges"]:
        if m["coords"] is None:
            continue
        marker, color, label = KIND_STYLES.get(m["kind"], ("x", "0.3", m["kind"]))
        ax.scatter(*m["coords"], marker=marker, color=color, s=KIND_SIZES.get(m["kind"], 50), edgecolors="black",
                   linewidths=0.6, zorder=12, label=None if m["kind"] in seen else label)  # fmt: skip
        seen.add(m["kind"])
    # the vertices, the merges and the surface in view with a margin (contourf alone would clip at the grid)
    xy = [*vertices.values(), *(m["coords"] for m in result["merges"] if m["coords"] is not None)]
    if surface is not None:
        xy += [(float(np.min(surface["x"])), float(np.min(surface["y"]))),
               (float(np.max(surface["x"])), float(np.max(surface["y"])))]  # fmt: skip
    if xy:
        lo, hi = np.min(np.asarray(xy, dtype=np.float64), axis=0), np.max(np.asarray(xy, dtype=np.float64), axis=0)
        pad = 0.12 * np.maximum(hi - lo, 1e-12)  # room for the vertices' labels
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    chart = result.get("chart") or "paper"
    xt, yt = AXIS_TITLES.get(chart, ("x", "y"))
    ax.set_xlabel(xt)
    ax.set_ylabel(yt)
    ax.set_aspect("equal", adjustable="box")  # the limits above stay; the box takes the aspect
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)  # below: clear of the points
    ax.set_title(f"merges projected onto the plane ({chart} chart)\ncontour: the plane's loss, not the merges' own",
                 fontsize=9)  # fmt: skip


def _gaps(ax, result: Mapping) -> None:
    merges = result["merges"]
    y = np.arange(len(merges))[::-1]
    for k, m in zip(y, merges, strict=True):
        _, color, _ = KIND_STYLES.get(m["kind"], ("x", "0.3", m["kind"]))
        ax.errorbar(m["gap"], k, xerr=2 * m["gap_se"], fmt="o", color=color, capsize=3)
    labels = []
    for m in merges:
        off = "" if m["off_plane_distance"] is None else f" (off {m['off_plane_distance']:.2g})"
        labels.append(f"{KIND_STYLES.get(m['kind'], (0, 0, m['kind']))[2]} {'+'.join(m['solutions'])}{off}")
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0.0, color="0.4", linewidth=0.8)
    ax.set_xlabel("gap: merged loss − best endpoint loss (± 2 paired SE)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("merge gap; distance off the plane in brackets", fontsize=10)


def merges_figure(result: Mapping, surface: Mapping | None, title: str) -> Figure:
    """The plane with the merges on it (``surface``: x, y, loss of the run's landscape.npz in the same chart, or
    None: the vertices and merges only) and the gaps."""
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    _plane(fig.add_subplot(1, 2, 1), result, surface)
    _gaps(fig.add_subplot(1, 2, 2), result)
    fig.suptitle(title)
    return fig
