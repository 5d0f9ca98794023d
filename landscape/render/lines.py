"""Loss along 1-D paths: the straight paths between the solutions with their barriers, the heights above the
chord between the endpoint losses (:func:`paths_figure`), and a trained curve against the straight line
(:func:`curve_figure`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from landscape.barriers import has_barrier as above_chord
from landscape.render.style import COLORS, LABELS

# One colour per pair, from the Okabe-Ito colours the methods do not use, plus a line style
# per pair so the figure also reads in grayscale.
PAIR_STYLES = {"ft-lora": ("#E69F00", "-"), "ft-randlora": ("#0072B2", "--"), "lora-randlora": ("#009E73", "-.")}


def has_barrier(info: Mapping) -> bool:
    """:func:`landscape.barriers.has_barrier` of a path's barrier."""
    return above_chord(info["barrier"])


def _barrier_label(info: Mapping) -> str:
    """``barrier X`` (the height above the chord), or ``no barrier`` for a path at or below its chord."""
    return f"barrier {info['barrier']:.3g}" if has_barrier(info) else "no barrier"


def _draw_barriers(ax, info: Mapping, color: str) -> None:
    """One path's chord (1 − t)·L(0) + t·L(1) (dashed) and, when the path rises above it, an arrow from the chord
    up to the path where it is furthest above it: the barrier (none for a path at or below its chord)."""
    ax.plot([0.0, 1.0], [info["loss_t0"], info["loss_t1"]], color=color, linestyle=(0, (5, 3)), linewidth=0.9)
    if has_barrier(info):
        tc = info["t_max"]
        on_chord = (1.0 - tc) * info["loss_t0"] + tc * info["loss_t1"]
        ax.annotate(
            "",
            xy=(tc, info["loss_max"]),
            xytext=(tc, on_chord),
            arrowprops=dict(arrowstyle="<->", color=color, linewidth=1.2, shrinkA=0, shrinkB=0),
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
    """The legend entry that explains the chord and barrier marks (a fresh artist: an artist belongs to one
    figure)."""
    chord = "chord (1 − t)·L(0) + t·L(1); ↕ barrier, the height above it"
    return [Line2D([], [], color="0.3", linestyle=(0, (5, 3)), linewidth=0.9, label=chord)]


def paths_figure(result: Mapping, title: str | None = None) -> Figure:
    """Loss along t per pair; solutions marked in their method colours, chords dashed, barriers (heights above
    the chord) as vertical arrows; a path at or below its chord reads "no barrier" in the legend."""
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
    loss along t ∈ [0, 1] for both, each with its barrier above the chord between the endpoint losses (dashed).

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
