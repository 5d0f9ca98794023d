"""The task-metric basins figure (``basins.png`` / ``.pdf``, :mod:`landscape.basins`): per solution, the radius
along each random draw (dots), their mean ± SD (bar), and the two eigen-direction radii (diamonds, own axis: they
are weight-space lengths, the draws' are in units of the filter-normalised direction); a direction that never
failed is an open marker at the ladder's top rung; under each solution its accuracy and, when the run has
sharpness.json, its worst-case loss sharpness (weight coordinates)."""

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
        c = data["random_censored_at"][i][np.isfinite(data["random_censored_at"][i])]
        ax.scatter(np.full(c.size, i), c, s=24, marker="^", facecolors="none", edgecolors="C0",
                   label="never failed (≥ top rung)" if i == 0 and c.size else None)  # fmt: skip
        if r.size:
            ax.errorbar(i + 0.15, r.mean(), yerr=r.std(ddof=1) if r.size > 1 else 0.0, fmt="s", color="C3", capsize=3)
    labels = [f"{n}\nacc {a:.3g}" + (f"\nsharpness {h:.3g}" if np.isfinite(h) else "")
              for n, a, h in zip(names, data["accuracy"], data["loss_sharpness"], strict=True)]  # fmt: skip
    ax.set_xticks(x, labels, fontsize=8)
    if np.isfinite(data["random_censored_at"]).any():
        ax.legend(fontsize=7)
    ax.set_ylabel("radius (× filter-normalised d)")
    ax.set_title(f"random directions ({rand.shape[1]} draws): dots, mean ± SD", fontsize=9)
    for j, marker in enumerate(("D", "v")):
        bx.scatter(x, data["eigen_radius"][:, j], marker=marker, label=f"q{j + 1}", color=f"C{j + 1}")
        bx.scatter(x, data["eigen_censored_at"][:, j], marker=marker, facecolors="none", edgecolors=f"C{j + 1}",
                   label=f"q{j + 1} never failed (≥)")  # fmt: skip
    bx.set_xticks(x, labels, fontsize=8)
    bx.set_ylabel("radius (weight-space norm)")
    bx.set_title("top-2 Hessian eigen-directions", fontsize=9)
    if np.isfinite(data["eigen_radius"]).any() or np.isfinite(data["eigen_censored_at"]).any():
        bx.legend(fontsize=7)
    fig.suptitle(f"{title}\nradius at which accuracy drops by more than {criterion}", fontsize=9)
    return fig
