"""The paper recipes, figure regeneration and benchmarks."""

import adapters  # noqa: F401  first: sets the OpenMP wait policy before anything imports torch (adapters.threads)
