"""The settings of :mod:`landscape.curvature` and the names every part of it shares: which coordinates,
which weights, which dtypes, and :class:`CurvatureSettings` (checked before any loading)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from adapters.errors import UserError

SOLUTION_CHOICES = ("ft", "lora", "randlora")
COORDINATES = ("weights", "adapter")
WEIGHT_SETS = ("adapted", "plane")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ADAPTER_METHODS = ("lora", "randlora")
LANCZOS_VECTORS = 60  # float64 vectors of the coordinates' size held (on the host) by the top-k Lanczos
NO_ADAPTER = "its optimiser's coordinates are the weights"
PACKED_WEIGHTS = "the base is packed in 4 bits (--load-4bit): its weights cannot be coordinates; see adapter"


def skip_reason(method: str, coordinates: str, packed_base: bool) -> str | None:
    """Why a ``method`` solution has no curvature in ``coordinates`` (None when it has)."""
    if coordinates == "adapter" and method not in ADAPTER_METHODS:
        return f"a {method} solution has no adapter: {NO_ADAPTER}"
    if coordinates == "weights" and packed_base:
        return PACKED_WEIGHTS
    return None


@dataclass(frozen=True)
class CurvatureSettings:
    """What to compute at each solution (:mod:`landscape.curvature.solvers`); ``trace_probes`` / ``slq_probes``
    = 0 skips."""

    top_k: int = 5
    tol: float = 1e-3  # each Ritz pair's residual ‖Hx − θx‖ <= tol·|θ| (ARPACK's test)
    lanczos_vectors: int = LANCZOS_VECTORS  # most Lanczos steps before ARPACK's restarts take over
    trace_probes: int = 30
    slq_probes: int = 2
    slq_steps: int = 40
    coordinates: tuple[str, ...] = COORDINATES
    weight_set: str = "adapted"
    include_head: bool = True
    seed: int = 0
    density_points: int = 400
    broadening: float = 0.01  # σ of the density's Gaussians, as a fraction of the range of the nodes
    dtype: str = "float32"
    hvp_batch: int | None = None  # samples per HVP forward (None: the evaluation batches); same products

    def check(self) -> None:
        """UserError naming the first bad setting and its fix."""
        ints = {"top_k": (self.top_k, 1), "trace_probes": (self.trace_probes, 0), "slq_probes": (self.slq_probes, 0),
                "slq_steps": (self.slq_steps, 2), "density_points": (self.density_points, 10),
                "lanczos_vectors": (self.lanczos_vectors, 2)}  # fmt: skip
        if self.hvp_batch is not None:
            ints["hvp_batch"] = (self.hvp_batch, 1)
        for name, (value, low) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{_flag(name)} {value!r}: must be an integer >= {low}: pass a value >= {low}")
        for name, value in (("tol", self.tol), ("broadening", self.broadening)):
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value < 1):
                default = CurvatureSettings.__dataclass_fields__[name].default
                raise UserError(f"{_flag(name)} {value!r}: must be a number in (0, 1): try {default}")
        bad = [c for c in self.coordinates if c not in COORDINATES]
        if bad or not self.coordinates:
            raise UserError(f"--coordinates {' '.join(map(str, self.coordinates))}: choose weights, adapter or both")
        if self.weight_set not in WEIGHT_SETS:
            raise UserError(f"--weight-set {self.weight_set!r}: choose one of {', '.join(WEIGHT_SETS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "coordinates": list(self.coordinates)}

    def key(self) -> dict:
        """Every setting that changes an entry's numbers (which coordinates are asked for does not)."""
        # nor how the products' passes are split (hvp_batch): the same sums, to rounding
        return {k: v for k, v in self.to_dict().items() if k not in ("coordinates", "hvp_batch")}


def _flag(name: str) -> str:
    """The command-line flag of a setting (the library's messages name the flags too)."""
    return "--" + name.replace("_", "-")
