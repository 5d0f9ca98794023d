"""The analysis layer: what a user runs over solutions of one model, and the engine under it.

- Recipes (each a short list of stages over one validated run configuration, each with its CLI,
  ``python -m landscape.<name>``): :mod:`~landscape.connectivity` (the plane through FT, LoRA and RandLoRA, the
  main job), :mod:`~landscape.paths` (1-D paths and their barriers), :mod:`~landscape.curves` (Bezier curves
  between two solutions), :mod:`~landscape.curvature` (Hessian eigenvalues and traces by Lanczos / Hutchinson),
  :mod:`~landscape.spectrum` (singular-value spectra and ranks of each ΔW).
- The run: :mod:`~landscape.config` (preset ← TOML ← command line, validated once), :mod:`~landscape.cli`
  (argument types, error handling), :mod:`~landscape.run` (loading a run: data, model, solutions, evaluation
  set), :mod:`~landscape.stages` (stage keys, what each stage reads), :mod:`~landscape.report`,
  :mod:`~landscape.seeds` (``--seeds N``: readings over training seeds with their t-interval).
- :mod:`landscape.engine`: charts and directions, the dense and factored evaluators, the store.
- :mod:`landscape.render`: figures, one module per family (surface, lines, spectra; one style for all).
"""

import adapters  # noqa: F401  first: sets the OpenMP wait policy before anything imports torch (adapters.threads)
