"""Figures, one module per figure family; every name the recipes, experiments and tests use is re-exported here
(``from landscape.render import COLORS, landscape_html``, ``render.paths_figure(...)``).

- :mod:`~landscape.render.style`: one colour and one label per method (:data:`COLORS`, :data:`LABELS`), the
  colour scale, the paper's display clipping (:func:`clip_for_display`), the chart's axis titles and note
  (:func:`chart_note`), and the atomic save every matplotlib figure goes through;
- :mod:`~landscape.render.surface_html`: the interactive landscape (plotly: 3-D surface and contour map,
  ``landscape.html``), the markers lifted clear of the surface (:func:`marker_z`);
- :mod:`~landscape.render.surface_static`: the same landscape in matplotlib (``landscape.png`` / ``.pdf``);
- :mod:`~landscape.render.lines`: loss along the straight paths (:func:`paths_figure`) and along a trained curve
  (:func:`curve_figure`), with their barriers;
- :mod:`~landscape.render.spectrum`: the spectra, ranks and subspace similarity of the weight updates ΔW.

Landscape display follows the RandLoRA paper: losses above 1.2 × the largest loss of the three solutions are
clipped so the basins stay readable; plotly ``Surface`` with the ``tempo_r`` colour scale and z-contours
projected onto the floor, plus a contour map. Unlike the paper's plotting code we do NOT transpose z:
``loss[i, j]`` is drawn at ``(x[j], y[i])`` in every figure.
"""

from __future__ import annotations

from landscape.render.lines import CURVE_KINDS, PAIR_STYLES, curve_figure, paths_figure
from landscape.render.spectrum import (
    RANK_FIG_WIDTH,
    rank_figure,
    short_layer_names,
    similarity_figure,
    spectrum_figure,
)
from landscape.render.spectrum import (
    _rank_figure as _rank_figure,  # drawn unsaved by the tests
)
from landscape.render.style import AXIS_TITLES, COLORS, COLORSCALE, LABELS, TEMPO_R, chart_note, clip_for_display
from landscape.render.surface_html import (
    ASPECT_Z,
    BOX_SCALE,
    CAMERA_EYE,
    landscape_figure,
    landscape_html,
    line_figure_html,
    marker_z,
)
from landscape.render.surface_static import _static_figure as _static_figure  # drawn unsaved by the tests
from landscape.render.surface_static import landscape_static, line_figure

__all__ = [
    "COLORS",
    "LABELS",
    "clip_for_display",
    "landscape_figure",
    "landscape_html",
    "landscape_static",
    "line_figure",
    "line_figure_html",
    "chart_note",
    "curve_figure",
    "marker_z",
    "PAIR_STYLES",
    "paths_figure",
    "rank_figure",
    "short_layer_names",
    "similarity_figure",
    "spectrum_figure",
    # the constants of each family
    "AXIS_TITLES",
    "ASPECT_Z",
    "BOX_SCALE",
    "CAMERA_EYE",
    "COLORSCALE",
    "CURVE_KINDS",
    "RANK_FIG_WIDTH",
    "TEMPO_R",
]
