"""The engine under every analysis: where the weights of a point come from and what its loss is.

- :mod:`~landscape.engine.plane`: charts, the maps from plane coordinates (x, y) to weights (the paper's plane, the
  orthonormal one, random filter-normalised directions).
- :mod:`~landscape.engine.directions`: random directions around a centre, in all weights or in adapter coordinates.
- :mod:`~landscape.engine.grid`: the dense evaluator (writes a chart point into a model, scores the fixed
  evaluation set, several points per vmapped forward) and the resumable grid loop.
- :mod:`~landscape.engine.factored`: the same evaluation with adapters kept as factors beside the base layers
  (packed 4-bit bases, large models); its chart and the dense-or-factored choice in
  :mod:`~landscape.engine.factored_chart`.
- :mod:`~landscape.engine.store`: atomic, resumable files of points and stages.

Nothing here reads the run configuration or the command line; recipes (:mod:`landscape.connectivity`,
:mod:`landscape.paths`, ...) build charts and evaluators from them and hand them here.
"""
