"""Figures: the loss landscape over the plane of three solutions, and ΔW spectra.

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
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go

# matplotlib's Figure is used directly, without pyplot: no global figure registry to leak,
# and it renders with Agg whatever backend the caller has (works headless).
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from plotly.subplots import make_subplots

from landscape.store import write_with

__all__ = [
    "COLORS",
    "LABELS",
    "clip_for_display",
    "landscape_figure",
    "landscape_html",
    "landscape_static",
    "spectrum_figure",
]

# Okabe-Ito palette (colour-blind safe). None of these is a shade of the blue-green tempo
# colour scale, so the markers stand out on the surface.
COLORS = {"ft": "#D55E00", "lora": "#56B4E9", "randlora": "#CC79A7", "head_only": "#000000"}
LABELS = {"ft": "Full FT", "lora": "LoRA", "randlora": "RandLoRA", "head_only": "Head only"}

COLORSCALE = "tempo_r"
# The same scale for matplotlib, so the static and interactive figures agree.
TEMPO_R = LinearSegmentedColormap.from_list(
    "tempo_r", [tuple(v / 255 for v in pcolors.unlabel_rgb(c)) for c in pcolors.sequential.tempo_r]
)

AXIS_TITLES = {
    "paper": ("x", "y"),
    "orthonormal": ("α (weight-space distance)", "β (weight-space distance)"),
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
    accuracy = data.get("accuracy")
    if accuracy is not None and np.shape(accuracy) != loss.shape:
        raise ValueError(f"accuracy has shape {np.shape(accuracy)}, loss has {loss.shape}")
    return {
        "x": x,
        "y": y,
        "loss": loss,
        "z": clip_for_display(loss, vertex),
        "accuracy": None if accuracy is None else np.asarray(accuracy, dtype=np.float64),
        "points": points,
        "names": names,
        "vertex": vertex,
        "axes": AXIS_TITLES.get(_str(data["chart"]) if "chart" in data else "paper", ("x", "y")),
    }


# Remaining Okabe-Ito colours for methods outside COLORS (valid in both matplotlib and plotly).
_EXTRA_COLORS = ("#E69F00", "#0072B2", "#009E73", "#F0E442")


def _color(name: str, i: int = 0) -> str:
    return COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _label(name: str) -> str:
    return LABELS.get(name, name)


# ------------------------------------------------------------------ interactive (plotly) ----


def landscape_figure(data: Mapping, title: str) -> go.Figure:
    """Plotly figure: 3-D surface (left) and contour map (right) sharing one colour axis."""
    d = _unpack(data)
    x, y, z = d["x"], d["y"], d["z"]
    xt, yt = d["axes"]
    acc = d["accuracy"] if d["accuracy"] is not None else np.full_like(z, np.nan)
    # Hover shows the true loss, not the clipped display value.
    # An object array: plotly.py keeps it 2-D (a nested list of str would be flattened row-wise
    # into strings for Surface), and plotly.js reads text[i][j] for cell (x[j], y[i]).
    text = np.array(
        [
            [f"loss {lo:.4g}<br>accuracy {ac:.4g}" for lo, ac in zip(row_l, row_a, strict=True)]
            for row_l, row_a in zip(d["loss"], acc, strict=True)
        ],
        dtype=object,
    )
    hover = f"{xt}=%{{x:.3f}}<br>{yt}=%{{y:.3f}}<br>%{{text}}<extra></extra>"
    # One explicit colour scale and range per trace: plotly.js drops a coloraxis shared by a
    # Surface and a Contour ("incompatible colorscales") and falls back to its default scale.
    colorscale = pcolors.make_colorscale(pcolors.sequential.tempo_r)
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    fig = make_subplots(
        rows=1,
        cols=2,
        specs=[[{"type": "scene"}, {"type": "xy"}]],
        column_widths=[0.58, 0.42],
        subplot_titles=("surface (clipped at 1.2 × max solution loss)", "contour map"),
    )
    fig.add_trace(
        go.Surface(
            x=x,
            y=y,
            z=z,  # z[i][j] at (x[j], y[i]) — same convention as ours, so no transpose
            colorscale=colorscale,
            cmin=lo,
            cmax=hi,
            showscale=False,
            contours_z=dict(show=True, project_z=True, usecolormap=True),
            text=text,
            hovertemplate=hover,
            name="loss",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Contour(
            x=x,
            y=y,
            z=z,
            colorscale=colorscale,
            zmin=lo,
            zmax=hi,
            colorbar=dict(title="loss", tickformat=".3f"),
            text=text,
            hovertemplate=hover,
            name="loss",
        ),
        row=1,
        col=2,
    )
    zmax = float(np.nanmax(z))
    for i, (name, (px, py), pz) in enumerate(zip(d["names"], d["points"], d["vertex"], strict=True)):
        style = dict(color=_color(name, i), size=7, line=dict(color="white", width=1))
        common = dict(mode="markers+text", text=[_label(name)], name=_label(name), legendgroup=name)
        fig.add_trace(
            go.Scatter3d(
                x=[px],
                y=[py],
                # lifted by 3% of the z range so the marker is not buried in the surface
                z=[min(pz, zmax) + 0.03 * (zmax - float(np.nanmin(z)))],
                marker=style,
                textposition="top center",
                textfont=dict(color=_color(name, i), size=14),
                hovertemplate=f"{_label(name)}<br>{xt}={px:.3f}<br>{yt}={py:.3f}<br>loss {pz:.4g}<extra></extra>",
                **common,
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[px],
                y=[py],
                marker=dict(style, size=11),
                textposition="top center",
                textfont=dict(color="white", size=13),
                showlegend=False,
                hovertemplate=f"{_label(name)}<br>loss {pz:.4g}<extra></extra>",
                **common,
            ),
            row=1,
            col=2,
        )
    fig.update_layout(
        title=title,
        scene=dict(xaxis_title=xt, yaxis_title=yt, zaxis_title="loss"),
        legend=dict(x=0.0, y=1.0),
        width=1400,
        height=650,
    )
    fig.update_xaxes(title_text=xt, row=1, col=2)
    # equal units on both axes so distances and angles on the plane are not distorted
    fig.update_yaxes(title_text=yt, scaleanchor="x", scaleratio=1, row=1, col=2)
    return fig


def landscape_html(data: Mapping, path: str | os.PathLike, title: str) -> None:
    """Self-contained HTML (plotly.js inlined, opens offline) of :func:`landscape_figure`."""
    fig = landscape_figure(data, title)
    write_with(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs=True, full_html=True))


# ---------------------------------------------------------------------- static (matplotlib) --


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

    # mplot3d sorts artists by depth and tends to hide markers under the surface; draw in zorder.
    ax3.computed_zorder = False
    ax3.plot_surface(
        X,
        Y,
        zm,
        cmap=TEMPO_R,
        vmin=vmin,
        vmax=vmax,
        rstride=1,
        cstride=1,
        linewidth=0.2,
        edgecolor=(1, 1, 1, 0.25),
        antialiased=True,
        zorder=1,
    )
    ax3.set_xlabel(xt)
    ax3.set_ylabel(yt)
    ax3.set_zlabel("loss")
    # x to the right and y into the page, as in the contour map next to it
    ax3.view_init(elev=48, azim=-60)
    ax3.set_box_aspect(None, zoom=0.88)  # room for the z label inside the constrained layout

    levels = MaxNLocator(nbins=20).tick_values(vmin, vmax) if vmax > vmin else None
    cf = ax2.contourf(x, y, zm, levels=levels, cmap=TEMPO_R, vmin=vmin, vmax=vmax)
    ax2.contour(x, y, zm, levels=cf.levels, colors="white", linewidths=0.4, alpha=0.5)
    ax2.set_xlabel(xt)
    ax2.set_ylabel(yt)
    ax2.set_aspect("equal")

    top = vmax + 0.12 * (vmax - vmin)
    for i, (name, (px, py), pz) in enumerate(zip(d["names"], d["points"], d["vertex"], strict=True)):
        c = _color(name, i)
        ax3.scatter(
            [px],
            [py],
            [min(pz, vmax)],
            color=c,
            s=70,
            edgecolors="white",
            linewidths=1.2,
            depthshade=False,
            zorder=10,
            label=_label(name),
        )
        # A stem from the solution up through the surface, labelled above it: the marker can sit
        # behind a basin wall, the stem shows where on the plane it is.
        ax3.plot([px, px], [py, py], [min(pz, vmax), top], color=c, lw=1.5, zorder=9)
        ax3.text(px, py, top, _label(name), color=c, fontsize=11, fontweight="bold", zorder=11)
        ax2.scatter([px], [py], color=c, s=80, edgecolors="white", linewidths=1.2, zorder=10)
        ax2.annotate(
            _label(name),
            (px, py),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=11,
            fontweight="bold",
            color=c,
            zorder=11,
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8),
        )
    ax3.legend(loc="upper left")
    fig.colorbar(cf, ax=ax2, label="loss (clipped at 1.2 × max solution loss)")
    fig.suptitle(title)
    return fig


def _save(fig: Figure, path: str | os.PathLike, fmt: str, dpi: int = 150) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def landscape_static(data: Mapping, png_path: str | os.PathLike, pdf_path: str | os.PathLike, title: str) -> None:
    """3-D surface and contour map side by side, saved as PNG (150 dpi) and vector PDF."""
    fig = _static_figure(data, title)
    _save(fig, png_path, "png")
    _save(fig, pdf_path, "pdf")


# ---------------------------------------------------------------------------- spectra -------


def _methods(layers: Sequence[Mapping]) -> list[str]:
    found = [k for k in layers[0] if k not in ("name", "shape")] if layers else []
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


def rank_figure(
    spectrum: Mapping,
    png_path: str | os.PathLike,
    pdf_path: str | os.PathLike | None = None,
) -> None:
    """Effective rank (top) and stable rank (bottom) per layer, the methods as grouped bars.

    ``spectrum`` is the output of :func:`landscape.spectrum.analyse`; log scale, one colour per method.
    """
    layers = list(spectrum["layers"])
    if not layers:
        raise ValueError("spectrum has no layers")
    methods = _methods(layers)
    idx = np.arange(len(layers))
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(max(8.0, 0.28 * len(layers) * max(1, len(methods)) + 2), 7.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, label in zip(axes, ("effective_rank", "stable_rank"), ("effective rank", "stable rank"), strict=True):
        for mi, m in enumerate(methods):
            values = np.array([float(layer[m].get(key) or 0.0) for layer in layers])
            offset = (mi - (len(methods) - 1) / 2) * width
            ax.bar(idx + offset, np.where(values > 0, values, np.nan), width, color=_color(m, mi), label=_label(m))
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=9, ncols=len(methods))
    if len(layers) <= 40:
        axes[1].set_xticks(idx, [_wrap_name(layer["name"], 60).replace("\n", "") for layer in layers], rotation=90,
                           fontsize=7)  # fmt: skip
    else:
        axes[1].set_xlabel("layer index (order in the spectrum file)")
    fig.suptitle("Effective and stable rank of the weight updates ΔW per layer")
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
