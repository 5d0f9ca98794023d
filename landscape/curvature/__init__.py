"""Curvature of the loss at a solution — ``python -m landscape.curvature``: the top Hessian eigenvalues
(Lanczos), the Hessian's trace (Hutchinson) and its spectral density (stochastic Lanczos quadrature).

**Objective.** H = ∇²L(θ) of the run's objective, the mean loss over the run's evaluation set —
the same objective (:mod:`adapters.objectives`) and the same samples as the plane and the paths
(``--samples N``: the first N of the same seeded permutation). The model is in eval mode (dropout
off; BatchNorm normalises with its frozen running statistics), fp32 (``--hvp-dtype float64``: float64).

**Under torchrun** (``torchrun --nproc-per-node K -m landscape.curvature -- --run DIR ...``; the ``--`` keeps
torchrun from reading ``--run`` as its ``--run-path``) each process holds a contiguous shard of the samples; each
product is the processes' products averaged with their shards' sample counts as weights, the solvers run
identically on every process (same products, same seeded probes), and rank 0 writes.


**What lives where** (each module's docstring says how and why):

- :mod:`~landscape.curvature.settings` — :class:`CurvatureSettings` (checked before any loading) and the names
  every part shares (coordinates, weight sets, dtypes).
- :mod:`~landscape.curvature.hessian` — :class:`HessianOperator`: Hessian-vector products of the run's objective
  (reverse-over-forward, forward-over-reverse, double backward), and the rewrites that let a product
  differentiate peft's RandLoRA layers (the factored product, without the scaled bases) and bitsandbytes' 4-bit
  layers.
- :mod:`~landscape.curvature.solvers` — top-k eigenvalues (Lanczos with ARPACK's residual test, its basis in
  host memory through :mod:`landscape.lanczos`), Hutchinson's trace, SLQ's density, the seeded probes (by index
  range, and their parts combined: :func:`trace_probes`, :func:`density_probes`, :func:`combine_trace`,
  :func:`combine_density`, for a job array).
- :mod:`~landscape.curvature.stage` — the coordinates at a solution (dense weights or the adapter's own) and
  :func:`curvature_stage`, which writes curvature.json entry by entry, reused by key.
- :mod:`~landscape.curvature.figure` — curvature.png / .pdf.
- :mod:`~landscape.curvature.blocks` — ``--blocks``: per block (a transformer layer, or ``--block-by module``)
  the top eigenvalue and trace of the block's diagonal Hessian, and the blocks' spectral heterogeneity (JS
  distances of their SLQ densities); blocks.json / .png / .pdf.
- :mod:`~landscape.curvature.cli` — the command line (``__main__`` runs it).

The names below are re-exported for the callers (:mod:`landscape.connectivity`, :mod:`landscape.sharpness`, the
benchmarks, the README's API). A test that replaces a name replaces it in the module that uses it.
"""

from __future__ import annotations

from landscape.curvature.blocks import BLOCK_BY, block_curvature, blocks_stage
from landscape.curvature.cli import PROG, build_parser, main, settings_from
from landscape.curvature.figure import curvature_figure, write_figure
from landscape.curvature.hessian import HVP_MODES, HessianOperator, batch_loss
from landscape.curvature.settings import (
    ADAPTER_METHODS,
    COORDINATES,
    DTYPES,
    LANCZOS_VECTORS,
    NO_ADAPTER,
    PACKED_WEIGHTS,
    SOLUTION_CHOICES,
    WEIGHT_SETS,
    CurvatureSettings,
)
from landscape.curvature.solvers import (
    broadened_density,
    combine_density,
    combine_trace,
    curvature_at,
    density_probes,
    hutchinson_trace,
    lanczos,
    slq_density,
    top_eigenvalues,
    trace_probes,
)
from landscape.curvature.stage import (
    adapter_coordinates,
    curvature_stage,
    entry_key,
    entry_operator,
    summary,
    weight_coordinates,
    weight_names,
)
from landscape.engine.grid import eval_fingerprint

__all__ = [
    "ADAPTER_METHODS",
    "BLOCK_BY",
    "COORDINATES",
    "DTYPES",
    "HVP_MODES",
    "LANCZOS_VECTORS",
    "NO_ADAPTER",
    "PACKED_WEIGHTS",
    "PROG",
    "SOLUTION_CHOICES",
    "WEIGHT_SETS",
    "CurvatureSettings",
    "HessianOperator",
    "adapter_coordinates",
    "batch_loss",
    "block_curvature",
    "blocks_stage",
    "broadened_density",
    "build_parser",
    "combine_density",
    "combine_trace",
    "curvature_at",
    "curvature_figure",
    "curvature_stage",
    "density_probes",
    "entry_key",
    "entry_operator",
    "eval_fingerprint",
    "hutchinson_trace",
    "lanczos",
    "main",
    "settings_from",
    "slq_density",
    "summary",
    "top_eigenvalues",
    "trace_probes",
    "weight_coordinates",
    "weight_names",
    "write_figure",
]
