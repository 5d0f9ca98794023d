"""Renderers write valid files, and never transpose the landscape (nx != ny on purpose)."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.text import Text
from scipy.interpolate import RegularGridInterpolator

from landscape import render
from landscape.engine.store import write_npz
from landscape.render import (
    COLORS,
    LABELS,
    clip_for_display,
    landscape_figure,
    landscape_html,
    landscape_static,
    spectrum_figure,
)
from landscape.spectrum import spectrum_metrics


@pytest.fixture
def data() -> dict:
    x = np.linspace(-1.0, 1.0, 5)  # nx = 5
    y = np.linspace(-0.5, 1.0, 4)  # ny = 4
    X, Y = np.meshgrid(x, y)
    loss = (X - 0.5) ** 2 + 3 * (Y - 0.5) ** 2 + 0.1  # bowl, minimum at (0.5, 0.5)
    loss[0, 0] = np.nan  # a missing grid point
    return {
        "x": x,
        "y": y,
        "loss": loss,
        "accuracy": 1.0 / (1.0 + loss),
        "points": np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]),
        "point_names": np.array(["randlora", "lora", "ft"]),
        "vertex_loss": np.array([1.0, 1.0, 0.5]),
        "chart": np.array("paper"),
    }


def test_palette_covers_methods():
    assert set(COLORS) == set(LABELS) == {"ft", "lora", "randlora", "head_only", "base"}  # base: a vertex without FT
    assert len(set(COLORS.values())) == len(COLORS)


def test_clip_for_display():
    loss = np.array([[0.5, 2.0, np.nan], [np.inf, 1.19, 1.21]])
    got = clip_for_display(loss, [0.3, 1.0, 0.7])
    cap = 1.2 * 1.0
    want = np.where(np.isnan(loss), np.nan, np.minimum(loss, cap))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(clip_for_display(loss, [1.0], factor=2.0), np.where(loss > 2.0, 2.0, loss))
    with pytest.raises(ValueError):
        clip_for_display(loss, [np.nan, 1.0])


def test_figure_orientation(data):
    fig = landscape_figure(data, "bowl")
    surface, contour = fig.data[0], fig.data[1]
    want = clip_for_display(data["loss"], data["vertex_loss"])
    for trace in (surface, contour):
        z = np.asarray(trace.z, dtype=float)
        assert z.shape == (4, 5)  # (ny, nx): rows follow y, not transposed
        np.testing.assert_array_equal(z, want)
        np.testing.assert_array_equal(np.asarray(trace.x, dtype=float), data["x"])
        np.testing.assert_array_equal(np.asarray(trace.y, dtype=float), data["y"])
    # hover text of cell (i, j) reports the loss at (x[j], y[i]) (unclipped)
    assert np.shape(surface.text) == np.shape(contour.text) == (4, 5)
    assert surface.text[2][4].startswith(f"loss {data['loss'][2, 4]:.4g}")
    markers = [t for t in fig.data if t.type == "scatter3d" and t.mode == "markers"]
    assert [t.name for t in markers] == ["RandLoRA", "LoRA", "Full FT"]
    assert [(t.x[0], t.y[0]) for t in markers] == [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]
    # each marker sits above the surface over the grid cells around it, so the surface cannot bury it
    for t in markers:
        j, i = int(np.flatnonzero(data["x"] == t.x[0])[0]), int(np.flatnonzero(data["y"] == t.y[0])[0])
        around = want[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
        assert t.z[0] > np.nanmax(around)
    assert markers[2].marker.color == COLORS["ft"]


def test_accepts_loaded_npz(tmp_path, data):
    # the real input is np.load("landscape.npz"): 0-d string arrays, NpzFile mapping
    write_npz(tmp_path / "landscape.npz", **(data | {"chart": np.array("orthonormal")}))
    with np.load(tmp_path / "landscape.npz") as npz:
        fig = landscape_figure(npz, "from npz")
    np.testing.assert_array_equal(fig.data[0].z, clip_for_display(data["loss"], data["vertex_loss"]))
    assert fig.layout.scene.xaxis.title.text.startswith("α")


def test_landscape_html_is_offline(tmp_path, data):
    path = tmp_path / "landscape.html"
    landscape_html(data, path, "bowl")
    html = path.read_text(encoding="utf-8")
    assert "<html>" in html[:200].lower()
    assert "plotly.js v" in html  # the library is inlined...
    assert not re.search(r"<script[^>]*\bsrc=", html)  # ...and nothing is loaded from a CDN
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic write left no temp file behind


def test_landscape_static(tmp_path, data):
    png, pdf = tmp_path / "l.png", tmp_path / "l.pdf"
    landscape_static(data, png, pdf, "bowl")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:4] == b"%PDF"


def test_spectrum_figure(tmp_path):
    rng = np.random.default_rng(0)
    layers = []
    for i in range(6):
        entry = {"name": f"blocks.{i}.mlp.weight", "shape": [8, 6]}
        for m, k in (("ft", 6), ("lora", 2), ("randlora", 6)):
            mat = rng.standard_normal((8, k)) @ rng.standard_normal((k, 6))
            entry[m] = spectrum_metrics(np.linalg.svd(mat, compute_uv=False), (8, 6))
        layers.append(entry)
    layers[3]["lora"] = spectrum_metrics(np.zeros(6), (8, 6))  # a zero update must not break the plot
    png = tmp_path / "s.png"
    spectrum_figure({"layers": layers}, png, max_layers=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------- what a reader sees in each figure --

DISTANCES = {"ft-lora": 9.2113, "ft-randlora": 28.6789, "lora-randlora": 29.8732}


def _png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


@pytest.fixture
def walled() -> dict:
    """Paper chart with a ridge (clipped at the display cap) between Full FT and the default camera.

    The camera looks from +x, −y; Full FT sits at (0.5, 1) in a low valley, the ridge runs along
    y ∈ [0.25, 0.5] in front of it, as high as the display allows.
    """
    x = np.linspace(-1.0, 2.0, 13)  # step 0.25: the vertices are grid points
    y = np.linspace(-1.0, 2.0, 13)
    X, Y = np.meshgrid(x, y)
    loss = 0.1 + 0.02 * ((X - 0.5) ** 2 + (Y - 0.5) ** 2)
    loss[(Y >= 0.25) & (Y <= 0.5)] = 5.0
    return {
        "x": x,
        "y": y,
        "loss": loss,
        "points": np.array([[0.5, 1.0], [1.0, 0.0], [0.0, 0.0]]),
        "point_names": np.array(["ft", "lora", "randlora"]),
        "vertex_loss": np.array([loss[8, 6], loss[4, 8], loss[4, 4]]),
        "chart": "paper",
    }


def _sight_line_clear(fig, marker) -> float:
    """Lowest height of the line of sight from ``marker`` to the orthographic default camera above
    the drawn (linearly interpolated) surface, in loss units; < 0 means the surface hides the marker."""
    scene = fig.layout.scene
    assert scene.camera.projection.type == "orthographic"  # parallel lines of sight
    surface = fig.data[0]
    x, y = np.asarray(surface.x, dtype=float), np.asarray(surface.y, dtype=float)
    z = np.asarray(surface.z, dtype=float)
    ranges = [scene.xaxis.range, scene.yaxis.range, scene.zaxis.range]
    aspect = [scene.aspectratio.x, scene.aspectratio.y, scene.aspectratio.z]
    # box units (what plotly's camera eye is expressed in) per data unit, on each axis
    scale = np.array([a / (r[1] - r[0]) for a, r in zip(aspect, ranges, strict=True)])
    eye = np.array([scene.camera.eye.x, scene.camera.eye.y, scene.camera.eye.z])
    step = eye / np.linalg.norm(eye) / scale  # one box unit towards the camera, in data units
    s = np.linspace(0.0, 4.0, 4001)[:, None]
    ray = np.array([marker.x[0], marker.y[0], marker.z[0]]) + s * step
    inside = (ray[:, 0] >= x[0]) & (ray[:, 0] <= x[-1]) & (ray[:, 1] >= y[0]) & (ray[:, 1] <= y[-1])
    surf = RegularGridInterpolator((y, x), z)(ray[inside][:, [1, 0]])
    return float(np.nanmin(ray[inside, 2] - surf))


def test_markers_visible_from_default_camera(walled):
    fig = landscape_figure(walled, "ridge")
    markers = [t for t in fig.data if t.type == "scatter3d" and t.mode == "markers"]
    assert [t.name for t in markers] == ["Full FT", "LoRA", "RandLoRA"]
    for t in markers:
        assert _sight_line_clear(fig, t) > 0, t.name
    # Full FT had to climb over the ridge, and its label says the marker is drawn above the surface
    assert markers[0].z[0] > 1.2 * walled["vertex_loss"].max() * 0.9
    assert "above the surface" in markers[0].hovertemplate


def test_plotly_z_title_has_room(walled):
    # plotly puts the 3-D axis title at the middle of the axis, with no padding: no tick label there
    zaxis = landscape_figure(walled, "ridge").layout.scene.zaxis
    lo, hi = zaxis.range
    assert len(zaxis.tickvals) >= 2 and len(zaxis.ticktext) == len(zaxis.tickvals)
    assert all(lo <= t <= hi and abs(t - (lo + hi) / 2) > 0.1 * (hi - lo) for t in zaxis.tickvals)
    assert zaxis.title.text == "loss"


def test_marker_z_clears_any_line_of_sight():
    rng = np.random.default_rng(1)
    x, y = np.linspace(0, 1, 9), np.linspace(0, 2, 17)
    for _ in range(20):
        z = rng.random((17, 9))
        px, py = rng.uniform(0, 1), rng.uniform(0, 2)
        aspect, zrange = (1.3, 2.6, 0.8), (0.0, 1.2)
        eye = rng.normal(size=3) * [1, 1, 0] + [0, 0, rng.uniform(0.3, 2)]
        mz = render.marker_z(x, y, z, px, py, lift=0.0, zrange=zrange, aspect=aspect, eye=eye)
        scale = np.array(aspect) / [1.0, 2.0, 1.2]
        step = eye / np.linalg.norm(eye) / scale
        ray = np.array([px, py, mz]) + np.linspace(0, 5, 5001)[:, None] * step
        inside = (ray[:, 0] >= 0) & (ray[:, 0] <= 1) & (ray[:, 1] >= 0) & (ray[:, 1] <= 2)
        surf = RegularGridInterpolator((y, x), z)(ray[inside][:, [1, 0]])
        assert np.all(ray[inside, 2] >= surf - 1e-12)


def test_chart_note_on_every_landscape_figure(tmp_path, data):
    want = "paper chart (affine, not to scale): |FT−LoRA| = 9.21, |FT−RandLoRA| = 28.68, |LoRA−RandLoRA| = 29.87"
    assert render.chart_note("paper", DISTANCES) == want
    with_dist = data | {"distances": DISTANCES}
    assert want in landscape_figure(with_dist, "bowl").layout.title.text
    static = render._static_figure(with_dist, "bowl")
    assert want in [t.get_text() for t in static.findobj(Text)]
    # without distances the paper chart is still flagged; the orthonormal chart is true to scale
    assert "not to scale" in landscape_figure(data, "bowl").layout.title.text
    ortho = landscape_figure(data | {"chart": np.array("orthonormal")}, "o").layout.title.text
    assert "orthonormal chart: true distances" in ortho and "not to scale" not in ortho
    # landscape_static writes both files with the note (the PDF keeps it as text)
    landscape_static(with_dist, tmp_path / "l.png", tmp_path / "l.pdf", "bowl")
    assert (tmp_path / "l.png").stat().st_size > 0
    with pytest.raises(ValueError, match="distances"):
        landscape_figure(data | {"distances": [9.2]}, "bad")


def test_static_labels_next_to_their_own_marker(walled):
    fig = render._static_figure(walled, "ridge")
    fig.draw_without_rendering()
    for ax in fig.axes[:2]:  # the 3-D surface and the contour map
        dots = {}  # the markers (one-point scatters), named by their colour
        for coll in ax.collections:
            if isinstance(coll, PathCollection) and len(coll.get_offsets()) == 1 and len(coll.get_facecolor()):
                c = "#{:02X}{:02X}{:02X}".format(*(round(255 * v) for v in coll.get_facecolor()[0][:3]))
                name = next((n for n, col in COLORS.items() if col == c), None)
                if name is not None:  # (matplotlib < 3.8 draws contours as PathCollections too)
                    dots[LABELS[name]] = ax.transData.transform(coll.get_offsets())[0]
        assert set(dots) == {"Full FT", "LoRA", "RandLoRA"}
        labels = [t for t in ax.texts if t.get_text() in dots]
        assert sorted(t.get_text() for t in labels) == sorted(dots)
        for t in labels:
            box = t.get_window_extent()
            centre = np.array([box.x0 + box.x1, box.y0 + box.y1]) / 2
            near = min(dots, key=lambda n: np.hypot(*(dots[n] - centre)))
            assert near == t.get_text()  # the label is closest to its own marker...
            for name, p in dots.items():  # ...and covers no other marker
                if name != t.get_text():
                    assert not box.expanded(1.0, 1.0).contains(*p), (t.get_text(), name)


def test_static_z_label_clear_of_ticks(walled):
    fig = render._static_figure(walled, "ridge")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    ax3 = fig.axes[0]
    label = ax3.zaxis.label.get_window_extent(r)
    lo, hi = ax3.get_zlim()
    # the tick labels as drawn (Axis.get_ticklabels would move them again); those inside the limits
    ticks = [t.label1.get_window_extent(r) for t in ax3.zaxis.majorTicks if lo <= t.get_loc() <= hi]
    assert len(ticks) >= 3
    gap = 2 * fig.dpi / 72  # 2 points of white between "loss" and any tick label
    assert not any(label.overlaps(t.expanded(1, 1).padded(gap)) for t in ticks)


def _layers(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    layers = []
    towers = ("model.visual.transformer.resblocks", "model.transformer.resblocks")
    parts = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
    for k in range(n):
        tower, block, part = towers[k // (n // 2)], (k % (n // 2)) // 4, parts[(k % (n // 2)) % 4]
        entry = {"name": f"{tower}.{block}.{part}.weight", "shape": [8, 6]}
        for m, r in (("ft", 6), ("lora", 2), ("randlora", 6)):
            s = np.sort(rng.random(6))[::-1] * (np.arange(6) < r)
            entry[m] = {"effective_rank": float(np.exp(rng.uniform(0, 5))), "stable_rank": float(s[0] > 0) + r}
        layers.append(entry)
    layers[5]["lora"]["effective_rank"] = 0.0  # a zero update: nothing drawn on the log axis
    return layers


@pytest.mark.parametrize("n", [36, 96])
def test_rank_figure_bounded_and_readable(tmp_path, n):
    png = tmp_path / "rank.png"
    render.rank_figure({"layers": _layers(n)}, png)
    width, height = _png_size(png)
    assert width <= 2400  # at 150 dpi, whatever the number of layers
    assert height <= 0.25 * 150 * n + 600
    fig = render._rank_figure({"layers": _layers(n)})
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    labels = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) == n  # every layer named...
    assert all(t.get_fontsize() >= 6 for t in labels)
    boxes = sorted((t.get_window_extent(r) for t in labels), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:], strict=False))  # ...without overlap
    # the tower stays in the name, the shared prefix and ".weight" do not
    text = [t.get_text() for t in labels]
    assert text[0] == "0 visual.transformer.resblocks.0.attn.in_proj"
    assert text[n // 2] == f"{n // 2} transformer.resblocks.0.attn.in_proj"


def test_short_layer_names():
    names = ["backbone.encoder.layer.0.attention.self.query.weight", "backbone.encoder.layer.1.output.dense.weight"]
    assert render.short_layer_names(names) == ["layer.0.attention.self.query", "layer.1.output.dense"]
    assert render.short_layer_names(["a.weight"]) == ["a"]


def test_paths_figure_in_render():
    t = np.linspace(-0.25, 1.25, 7)
    pairs = ["ft-lora", "ft-randlora", "lora-randlora"]
    # two bumps of height 0.1 and 0.2 on a sloped chord, and a convex path (below its chord): no barrier
    loss = np.array([0.2 + 0.3 * t + 0.1 * np.sin(np.pi * t), 0.5 - 0.2 * t + 0.2 * np.sin(np.pi * t),
                     0.2 + 0.3 * t - 0.1 * np.sin(np.pi * t)])  # fmt: skip
    barriers = {}
    for k, p in enumerate(pairs):
        inside = (t >= 0) & (t <= 1)
        ends = (loss[k, t == 0][0], loss[k, t == 1][0])
        above = loss[k, inside] - ((1 - t[inside]) * ends[0] + t[inside] * ends[1])
        i = int(np.flatnonzero(inside)[np.argmax(above)])
        barriers[p] = {"barrier": above.max(), "t_max": t[i], "loss_max": loss[k, i], "loss_t0": ends[0],
                       "loss_t1": ends[1]}  # fmt: skip
    assert barriers["ft-lora"]["barrier"] == pytest.approx(0.1) and barriers["lora-randlora"]["barrier"] == 0.0
    fig = render.paths_figure({"t": t, "loss": loss, "pairs": pairs, "barriers": barriers}, "paths")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert legend[:3] == ["Full FT → LoRA  (barrier 0.1)", "Full FT → RandLoRA  (barrier 0.2)",
                          "LoRA → RandLoRA  (no barrier)"]  # fmt: skip
    # an arrow from the chord up to each bump's top, none on the convex path
    arrows = sorted((a.xy, a.xyann) for a in ax.texts if hasattr(a, "xyann"))
    assert arrows == sorted(((0.5, barriers[p]["loss_max"]), (0.5, barriers[p]["loss_max"] - barriers[p]["barrier"]))
                            for p in ("ft-lora", "ft-randlora"))  # fmt: skip
    assert legend[3:6] == ["Full FT", "LoRA", "RandLoRA"]
    assert [ln.get_color() for ln in ax.get_lines()[:1]] == [render.PAIR_STYLES["ft-lora"][0]]
    assert ax.get_title() == "paths"
