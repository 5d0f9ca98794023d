"""Synthetic solutions for the tests: seeded random updates of a tiny model, in memory or saved as real
solution folders, and a forward that dies on a chosen call (a crash in the middle of a training step)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from adapters.solution import Solution


def synthetic_solutions(
    model: nn.Module, adapted: Sequence[str], scale: float, seed: int = 0, named: bool = True
) -> dict[str, Solution]:
    """ft changes every parameter, lora / randlora the ``adapted`` ones, each by scale·N(0, 1) from one seeded
    generator (in that order); ΔW held in memory, no folders (``named``: each solution's path is its name)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    deltas = {"ft": {n: scale * torch.randn(p.shape, generator=g) for n, p in params.items()}}
    for s in ("lora", "randlora"):
        deltas[s] = {n: scale * torch.randn(params[n].shape, generator=g) for n in adapted}
    return {s: Solution(path=Path(s) if named else None, info={"method": s}, metrics={}, base=model, _delta=d)
            for s, d in deltas.items()}  # fmt: skip


def adapted_few(model: nn.Module) -> list[str]:
    """A few of tiny-bert's matrices (query, value) and the head: what the synthetic adapters change."""
    return [n for n, _ in model.named_parameters()
            if n.endswith(("query.weight", "value.weight")) or n.startswith("task_head.")]  # fmt: skip


def save_perturbed_solutions(base: nn.Module, entry, out: Path, num_classes: int, scale: float) -> dict[str, Path]:
    """ft, LoRA (r 4) and RandLoRA (r 4) of ``base`` attached as the toolkit does, every trainable tensor moved by
    scale·N(0, 1) (one generator seeded 0, in that order), saved with save_solution under ``out/<method>``."""
    from adapters.methods import MethodSpec, attach
    from adapters.solution import fingerprint, save_solution

    g = torch.Generator().manual_seed(0)
    folders = {}
    for method, rank in (("ft", None), ("lora", 4), ("randlora", 4)):
        model = attach(copy.deepcopy(base), MethodSpec(method, rank=rank), entry.targets)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g))
        info = {"name": method, "method": method, "model": entry.name, "num_classes": num_classes,
                "rank": rank, "base_fingerprint": fingerprint(base)}  # fmt: skip
        folders[method] = out / method
        save_solution(folders[method], model, info, {})
    return folders


class Crash(Exception):
    """The failure :func:`die_on_call` injects."""


def die_on_call(model: nn.Module, call: int) -> None:
    """Make ``model``'s forward raise :class:`Crash` on its ``call``-th call (1-based), as a process dying there."""
    forward, calls = model.forward, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash
        return forward(*args, **kwargs)

    model.forward = dying
