"""Spectral analysis of weight updates ΔW (full fine-tuning, LoRA, RandLoRA).

For each adapted layer the update ΔW of every solution is decomposed and summarised: its singular
values and rank measures (:mod:`~landscape.spectrum.metrics`), its subspace's similarity to full
fine-tuning's and the intruder dimensions of W0 + ΔW (:mod:`~landscape.spectrum.similarity`).

- :mod:`~landscape.spectrum.metrics`: singular values → rank measures, energy; the scalar table (CSV);
- :mod:`~landscape.spectrum.decomposition`: the linear algebra (Gram method through LAPACK or torch,
  fp32 SVD, LoRA factors never made dense: :class:`LowRank`, :func:`lowrank_svd`);
- :mod:`~landscape.spectrum.similarity`: principal angles, overlap curves, intruder dimensions;
- :mod:`~landscape.spectrum.updates`: which layers, and a solution's updates (LoRA's factors through peft);
- :mod:`~landscape.spectrum.floor`: the rounding floor of a ΔW between half-precision weights;
- :mod:`~landscape.spectrum.analysis`: :func:`analyse` (dictionaries of updates),
  :func:`analyse_solutions` (loaded solutions, what the command line computes) and
  :func:`write_spectrum` (its files);
- :mod:`~landscape.spectrum.cli`: ``python -m landscape.spectrum --run DIR`` or
  ``--solution NAME=PATH ... --out DIR``.
"""

from landscape.spectrum.analysis import OUTPUTS, analyse, analyse_solutions, has_similarity, write_spectrum
from landscape.spectrum.cli import PROG, build_parser, main, run_solutions
from landscape.spectrum.decomposition import METHODS, LowRank, as_matrix, lowrank_svd, singular_values
from landscape.spectrum.metrics import ENERGY_LEVELS, energy_beyond_rank, scalar_rows, spectrum_metrics, write_csv
from landscape.spectrum.similarity import (
    ANGLE_KS,
    INTRUDER_THRESHOLDS,
    INTRUDER_TOP_K,
    OVERLAP_MAX_K,
    intruder_cosines,
    overlap_curve,
    principal_angles,
)
from landscape.spectrum.updates import adapted_layers, lora_factors, natural_key, solution_deltas

__all__ = [
    "ANGLE_KS",
    "ENERGY_LEVELS",
    "INTRUDER_THRESHOLDS",
    "INTRUDER_TOP_K",
    "METHODS",
    "OUTPUTS",
    "OVERLAP_MAX_K",
    "PROG",
    "LowRank",
    "adapted_layers",
    "analyse",
    "analyse_solutions",
    "as_matrix",
    "build_parser",
    "energy_beyond_rank",
    "has_similarity",
    "intruder_cosines",
    "lora_factors",
    "lowrank_svd",
    "main",
    "natural_key",
    "overlap_curve",
    "principal_angles",
    "run_solutions",
    "scalar_rows",
    "singular_values",
    "solution_deltas",
    "spectrum_metrics",
    "write_csv",
    "write_spectrum",
]
