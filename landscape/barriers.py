"""What counts as a barrier, in one place below both the path analyses and the renderers.

The barrier of a path is its chord barrier, max over t of L(t) − ((1 − t)·L(0) + t·L(1))
(:func:`landscape.paths.loss_barrier` computes it); a path at or below its chord has none.
"""

from __future__ import annotations

from collections.abc import Mapping

# a path exactly on its chord can rise this much above it from rounding alone
NO_BARRIER_ATOL = 1e-12


def has_barrier(value: float) -> bool:
    """Whether a chord barrier ``value`` is a barrier at all: a path at or below its chord (0) has none."""
    return value > NO_BARRIER_ATOL


def barrier_text(info: Mapping, digits: int = 4) -> str:
    """One path's barrier as printed: ``barrier X ± SE at t = T``, or ``no barrier`` for a path at or below
    its chord. ``info``: a path's entry of paths.json (:func:`barriers_with_se`)."""
    if not has_barrier(info["barrier"]):
        return "no barrier"
    se = info.get("barrier_se")
    pm = "" if se is None else f" ± {se:.{digits}f}"
    return f"barrier {info['barrier']:.{digits}f}{pm} at t = {info['t_max']:.3f}"
