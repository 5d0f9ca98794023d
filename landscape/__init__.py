"""The analysis layer: run configuration, charts, the grid engine, paths, spectra, rendering, recipes."""

import adapters  # noqa: F401  first: sets the OpenMP wait policy before anything imports torch (adapters.threads)
