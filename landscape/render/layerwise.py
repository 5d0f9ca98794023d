"""The layer-wise barriers figure (``layerwise.png`` / ``.pdf``, :mod:`landscape.layerwise`): barrier / SE per
block (rows) × pair and held side (columns), the barrier itself written in each cell; a block a pair does not
change is left blank."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure


def layerwise_figure(data: Mapping[str, np.ndarray], title: str) -> Figure:
    """The heatmap of :func:`landscape.layerwise.arrays`' barrier / barrier_se."""
    pairs, blocks, sides = list(data["pairs"]), list(data["blocks"]), list(data["sides"])
    barrier, se = data["barrier"], data["barrier_se"]
    # (blocks, pairs × sides): z = barrier / SE, how many standard errors each barrier stands above 0
    b = barrier.transpose(1, 0, 2).reshape(len(blocks), -1)
    z = b / np.where(se > 0, se, np.nan).transpose(1, 0, 2).reshape(len(blocks), -1)
    z = np.where((b == 0) & np.isnan(z), 0.0, z)
    cols = [f"{p}\nrest at {p.split('-')[k]}" for p in pairs for k in range(len(sides))]
    fig = Figure(figsize=(1.6 + 1.3 * len(cols), 1.4 + 0.38 * max(len(blocks), 1)), layout="constrained")
    ax = fig.add_subplot()
    top = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(z), cmap="magma_r", vmin=0.0, vmax=max(top, 2.0), aspect="auto")
    dark = 0.6 * max(top, 2.0)  # cells darker than this get white text
    for i in range(len(blocks)):
        for j in range(len(cols)):
            if np.isfinite(b[i, j]):
                white = np.isfinite(z[i, j]) and z[i, j] > dark
                ax.text(
                    j, i, f"{b[i, j]:.3g}", ha="center", va="center", fontsize=7, color="white" if white else "black"
                )
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=8)
    whole = ", ".join(f"{p} {w:.3g} ± {s:.2g}" for p, w, s in
                      zip(pairs, data["whole_barrier"], data["whole_barrier_se"], strict=True))  # fmt: skip
    ax.set_title(f"{title}\nchord barrier (in cells) and barrier / paired SE (colour), one block interpolated "
                 "(blank: the pair does not differ there)\n"
                 f"whole path: {whole}", fontsize=9)  # fmt: skip
    fig.colorbar(im, ax=ax, label="barrier / SE (≥ 2: a barrier)")
    return fig
