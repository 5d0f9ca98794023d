"""Renderers write valid files, and never transpose the landscape (nx != ny on purpose)."""

from __future__ import annotations

import re

import numpy as np
import pytest

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
from landscape.store import write_npz


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
    assert set(COLORS) == set(LABELS) == {"ft", "lora", "randlora", "head_only"}
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
    markers = [t for t in fig.data if t.type == "scatter3d"]
    assert [t.name for t in markers] == ["RandLoRA", "LoRA", "Full FT"]
    assert [(t.x[0], t.y[0]) for t in markers] == [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]
    # markers sit just above the surface (lifted by 3% of the z range so they are not buried)
    lift = 0.03 * (np.nanmax(want) - np.nanmin(want))
    assert [t.z[0] for t in markers] == pytest.approx([1.0 + lift, 1.0 + lift, 0.5 + lift])
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
