"""Spectra of the weight updates ΔW: normalised singular values and effective rank (:func:`spectrum_figure`),
effective and stable rank per layer (:func:`rank_figure`), subspace similarity to full FT (:func:`similarity_figure`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

from landscape.render.style import LABELS, _color, _label, _save

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
