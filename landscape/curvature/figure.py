"""curvature.png / .pdf: the top eigenvalues and spectral densities of the solutions side by side."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from adapters.io import write_with
from landscape.curvature.settings import COORDINATES


def curvature_figure(result: Mapping, title: str | None = None):
    """Top eigenvalues (left) and spectral densities (right) of the solutions, one row per coordinates."""
    from matplotlib.figure import Figure

    rows = [c for c in COORDINATES if any("eigenvalues" in (s.get(c) or {}) for s in result["solutions"].values())]
    fig = Figure(figsize=(11, 3.8 * max(len(rows), 1)), layout="constrained")
    axes = fig.subplots(max(len(rows), 1), 2, squeeze=False)
    for row, coordinates in enumerate(rows):
        entries = {n: per[coordinates] for n, per in result["solutions"].items()
                   if "eigenvalues" in (per.get(coordinates) or {})}  # fmt: skip
        _figure_row(axes[row], entries, coordinates)
    if title:
        fig.suptitle(title)
    return fig


def _figure_row(axes, entries: Mapping[str, Mapping], coordinates: str) -> None:
    from matplotlib.ticker import MaxNLocator

    from landscape.render import COLORS, LABELS

    ax_eig, ax_den = axes
    peak, floor = 0.0, math.inf
    for name, entry in entries.items():
        color, label = COLORS.get(name, "#666666"), LABELS.get(name, name)
        eig = entry["eigenvalues"]
        ax_eig.plot(range(1, len(eig) + 1), eig, "o-", color=color, label=f"{label} (dim {entry['dim']:,})")
        if "density" in entry:
            d = entry["density"]
            peak = max(peak, max(d["values"]))
            floor = min(floor, _lightest_node(d))
            trace = "" if entry.get("trace") is None else f", tr = {entry['trace']:.3g} ± {entry['trace_se']:.2g}"
            ax_den.plot(d["grid"], d["values"], color=color, label=f"{label}{trace}")
    values = [v for e in entries.values() for v in e["eigenvalues"]]
    # a log axis only where the eigenvalues span a decade or more (and are all positive)
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        ax_eig.set_yscale("log")
    ax_eig.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_eig.set(xlabel="rank", ylabel="Hessian eigenvalue", title=f"top eigenvalues ({coordinates} coordinates)")
    if peak > 0:  # the bulk near 0 dwarfs the outliers (weight ~1/dim each): log density down to the lightest node
        ax_den.set_yscale("log")
        ax_den.set_ylim(max(min(floor / 3, peak * 1e-6), peak * 1e-12), peak * 3)
    ax_den.set(xlabel="eigenvalue", ylabel="density", title=f"spectral density (SLQ, {coordinates} coordinates)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def _lightest_node(density: Mapping) -> float:
    """Height of the broadened density's smallest-weight node at its centre: w / (probes · σ·√(2π))."""
    weights = [w for probe in density["weights"] for w in probe if w > 0]
    if not weights or not density["sigma"]:
        return math.inf
    return min(weights) / (len(density["weights"]) * density["sigma"] * math.sqrt(2 * math.pi))


def write_figure(result: Mapping, out: str | Path, title: str | None = None) -> list[Path]:
    fig = curvature_figure(result, title)
    out = Path(out)
    write_with(out / "curvature.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    write_with(out / "curvature.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / "curvature.png", out / "curvature.pdf"]
