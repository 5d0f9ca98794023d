"""Spectral analysis of weight updates ΔW (full fine-tuning, LoRA, RandLoRA).

For each adapted layer we take the dense update ΔW of every solution, compute its
singular values in float32 and summarise them with a few rank measures:

- ``rank``: numerical rank with numpy.linalg.matrix_rank's default tolerance for float32,
- ``effective_rank``: Roy & Vetterli (2007), exp of the entropy of s / sum(s),
- ``stable_rank``: sum(s²) / max(s)²,
- ``energy_rank_90`` / ``energy_rank_99``: fewest singular values holding 90 % / 99 % of sum(s²).

LoRA's ΔW = B·A has rank ≤ r, RandLoRA's ΔW is generically full rank; these numbers make that
(and how the energy is spread) visible per layer. The library part is ``singular_values``,
``spectrum_metrics`` and ``analyse``; the command-line entry point lives at the bottom.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["singular_values", "spectrum_metrics", "analyse", "natural_key"]

ENERGY_LEVELS = (0.90, 0.99)


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10`` (digits compared as numbers)."""
    # re.split with a capture group alternates text and digit runs, always starting with text,
    # so keys of different names compare element-wise str-to-str and int-to-int.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """View an update as a matrix: 2-D as is, >2-D (conv kernels) as (shape[0], -1)."""
    if delta.ndim < 2:
        raise ValueError(f"need a 2-D (or higher) update, got shape {tuple(delta.shape)}")
    return delta if delta.ndim == 2 else delta.reshape(delta.shape[0], -1)


def singular_values(delta: torch.Tensor, device: str | torch.device | None = None) -> np.ndarray:
    """Singular values of ``delta`` in descending order, computed with torch in float32.

    ``device`` selects where the SVD runs (``None``: where ``delta`` already is); the GPU is
    much faster for the 768×3072 matrices of a ViT-B.
    """
    m = as_matrix(delta).detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("update contains NaN or inf; its singular values are undefined")
    return torch.linalg.svdvals(m).cpu().numpy()


def _energy_rank(s64: np.ndarray, q: float) -> int:
    energy = np.cumsum(s64**2)
    # first k (1-based) with cumulative energy >= q * total; clamp guards against rounding at the end
    k = int(np.searchsorted(energy, q * energy[-1], side="left")) + 1
    return min(k, len(s64))


def spectrum_metrics(s: np.ndarray, shape: tuple[int, int]) -> dict:
    """Rank measures of a matrix of ``shape`` with singular values ``s`` (any order, ≥ 0).

    An all-zero update gets 0 for every rank measure.
    """
    s32 = np.sort(np.asarray(s, dtype=np.float32))[::-1]
    s64 = s32.astype(np.float64)
    out: dict = {"singular_values": [float(v) for v in s32]}
    smax = float(s64[0]) if len(s64) else 0.0
    if smax <= 0.0:
        out.update(rank=0, effective_rank=0.0, stable_rank=0.0)
        out.update({f"energy_rank_{round(q * 100)}": 0 for q in ENERGY_LEVELS})
        return out
    # numpy.linalg.matrix_rank's default tolerance, as it applies to a float32 matrix
    tol = smax * max(shape) * float(np.finfo(np.float32).eps)
    p = s64 / s64.sum()
    p = p[p > 0]  # 0·log 0 = 0
    out["rank"] = int(np.count_nonzero(s64 > tol))
    out["effective_rank"] = float(math.exp(-float(np.sum(p * np.log(p)))))
    out["stable_rank"] = float(np.sum(s64**2) / smax**2)
    for q in ENERGY_LEVELS:
        out[f"energy_rank_{round(q * 100)}"] = _energy_rank(s64, q)
    return out


def _default_layers(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    solutions = list(deltas.values())
    common = set(solutions[0]).intersection(*solutions[1:]) if solutions else set()
    return sorted((n for n in common if all(sol[n].ndim == 2 for sol in solutions)), key=natural_key)


def analyse(
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    layers: Iterable[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict:
    """Spectrum metrics of every solution's update for each layer.

    ``deltas`` maps a solution name ("ft", "lora", "randlora", ...) to {parameter name: dense ΔW}.
    ``layers`` defaults to the 2-D parameters present in every solution, in natural order.
    Returns ``{"layers": [{"name", "shape": [out, in], <solution>: metrics, ...}, ...]}``
    with solutions in the order of ``deltas``.
    """
    names = _default_layers(deltas) if layers is None else list(layers)
    result = []
    for name in tqdm(names, desc="spectrum", unit="layer", disable=not progress):
        entry: dict = {"name": name}
        for solution, params in deltas.items():
            if name not in params:
                raise KeyError(f"solution {solution!r} has no parameter {name!r}")
            shape = tuple(as_matrix(params[name]).shape)
            if entry.setdefault("shape", list(shape)) != list(shape):
                raise ValueError(f"{name}: shape {list(shape)} in {solution!r} != {entry['shape']}")
            entry[solution] = spectrum_metrics(singular_values(params[name], device), shape)
        result.append(entry)
    return {"layers": result}


# ---------------------------------------------------------------------------------------------
# Command-line interface
# ---------------------------------------------------------------------------------------------

PROG = "python -m landscape.spectrum"


def adapted_layers(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The 2-D weights every solution changes, minus the classification head (trained in full by all)."""
    return [n for n in _default_layers(deltas) if not n.startswith("head.")]


def write_spectrum(solutions: Mapping, out, device=None, progress: bool = True) -> dict:
    """Analyse the ΔW of each solution and write ``spectrum.json`` and ``spectrum.png`` under ``out``."""
    from pathlib import Path

    from landscape import render, store

    out = Path(out)
    deltas = {name: sol.delta() for name, sol in solutions.items()}
    result = analyse(deltas, layers=adapted_layers(deltas), progress=progress, device=device)
    result["solutions"] = {
        name: {"method": sol.method, "rank": sol.info.get("rank"), "path": str(sol.path)}
        for name, sol in solutions.items()
    }
    store.write_json(out / "spectrum.json", result)
    render.spectrum_figure(result, out / "spectrum.png")
    return result


def build_parser():
    from landscape.cli import Parser

    p = Parser(
        prog=PROG,
        description="Singular-value spectra and rank metrics of the weight updates ΔW of the "
        "ft, lora and randlora solutions of a run (written by landscape.connectivity).",
    )
    p.add_argument("--run", required=True, help="run folder holding solutions/{ft,lora,randlora}")
    p.add_argument("--out", default=None, help="where to write spectrum.json/png (default: the run folder)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device for the SVDs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(argv=None) -> None:
    from pathlib import Path

    from adapters.errors import UserError
    from adapters.solution import load_solution
    from landscape.cli import resolve_device

    args = build_parser().parse_args(argv)
    run = Path(args.run)
    if not (run / "solutions").is_dir():
        raise UserError(f"{run} has no solutions/ folder: pass a run folder written by landscape.connectivity")
    solutions, base = {}, None
    for name in ("ft", "lora", "randlora"):
        sol = load_solution(run / "solutions" / name, base=base)
        base = sol.base
        solutions[name] = sol
    out = Path(args.out) if args.out else run
    write_spectrum(solutions, out, device=resolve_device(args.device), progress=not args.no_progress)
    print(f"wrote {out}/spectrum.json and {out}/spectrum.png")


def main(argv=None) -> int:
    from landscape.cli import run_main

    return run_main(_run, argv, PROG)


if __name__ == "__main__":
    import sys

    sys.exit(main())
