"""The task-metric basins figure (``basins.png`` / ``.pdf``, :mod:`landscape.basins`): per solution, the radius
along each random draw (dots), their mean ± SD (bar), and the two eigen-direction radii (diamonds, own axis: they
are weight-space lengths, the draws' are in units of the filter-normalised direction)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure


def basins_figure(data: Mapping[str, np.ndarray], title: str, criterion: str) -> Figure:
    """Two panels: random-direction radii, eigen-direction radii (NaN: never failed on the ladder)."""
    names = list(data["solutions"])
    fig = Figure(figsize=(8.5, 3.4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    x = np.arange(len(names))
    rand = data["random_radius"]
    for i in range(len(names)):
        r = rand[i][np.isfinite(rand[i])]
        ax.scatter(np.full(r.size, i), r, s=14, color="C0", alpha=0.7)
        if r.size:
            ax.errorbar(i + 0.15, r.mean(), yerr=r.std(ddof=1) if r.size > 1 else 0.0, fmt="s", color="C3", capsize=3)
    ax.set_xticks(x, names)
    ax.set_ylabel("radius (units of the filter-normalised direction)")
    ax.set_title(f"random directions ({rand.shape[1]} draws): dots, mean ± SD", fontsize=9)
    for j, marker in enumerate(("D", "v")):
        bx.scatter(x, data["eigen_radius"][:, j], marker=marker, label=f"q{j + 1}", color=f"C{j + 1}")
    bx.set_xticks(x, names)
    bx.set_ylabel("radius (weight-space norm)")
    bx.set_title("top-2 Hessian eigen-directions", fontsize=9)
    if np.isfinite(data["eigen_radius"]).any():
        bx.legend(fontsize=8)
    fig.suptitle(f"{title}\nradius at which accuracy drops by more than {criterion}", fontsize=9)
    return fig
