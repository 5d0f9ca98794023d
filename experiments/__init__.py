"""The paper's recipes and what regenerates the results: ``paper/`` (the TOML recipes), ``figures.py`` (every
figure and the gallery; ``readings.py``: the gallery's sentences of numbers), ``rehearsal.py`` (the commonsense
pipeline at LLM shape on CPU), ``gpu_check.py`` (the same on a GPU), ``benchmarks/`` (every performance figure)."""

import adapters  # noqa: F401  first: sets the OpenMP wait policy before anything imports torch (adapters.threads)
