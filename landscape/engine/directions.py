"""Random directions around one solution: the loss surface f(α, β) = L(θ* + α·δ + β·η) of Li et al. 2018.

Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018; code: tomgoldstein/loss-landscape;
also the PyPI package ``loss-landscapes``): two Gaussian directions δ, η over every parameter of the model,
each rescaled to the scale of the weights it perturbs, around one solution θ* (``--center``). The chart is
a :class:`landscape.engine.plane.Chart` (origin θ*, U = δ, V = η; :func:`landscape.engine.plane.random_chart`), so the
grid engine (:class:`~landscape.engine.grid.PlaneEvaluator` itself: the same cost per point as any plane), the
grid store, resume, torchrun and the renderers work unchanged. ``random-line`` is the 1-D cut along δ.

Normalisation (``norm``, the names of ``loss-landscapes``):

- ``filter`` (default): each filter — a slice along dim 0 of a tensor with ≥ 2 dimensions: a row of a Linear
  weight (or of an Embedding, an attention ``in_proj_weight``), an output channel of a convolution — is
  rescaled to the norm of the same filter of θ*: ``d_f ← d_f·‖θ*_f‖ / (‖d_f‖ + 1e-10)`` (Li et al.'s guard:
  a filter of θ* that is all zero, such as a zero-initialised head row, gets a zero direction).
- ``layer``: each parameter tensor rescaled to the norm of θ*'s tensor.
- ``model``: the whole direction rescaled to the norm of θ* over the parameters that have a direction.

``ignore``: ``biasbn`` (default; Li et al.'s ``--xignore biasbn``) gives every parameter with ≤ 1 dimension
(biases, LayerNorm / BatchNorm scales and shifts, scalars such as CLIP's logit scale) a zero direction: it
stays at θ*. ``none`` gives them random directions too; under ``filter`` a 1-D tensor is ONE filter,
normalised as a whole (Li et al. copy θ* into such a direction instead; ``loss-landscapes`` also rescales
each element to |θ*_i|: neither is a random direction).

Drawing: one CPU ``torch.Generator`` seeded with ``seed`` draws δ for every parameter in the model's order,
then η, in fp32: the same numbers on every device, and a line gets the δ of the plane of the same seed.
``--draws K`` repeats the draw K times around the same centre (:mod:`landscape.draws`): draw 0 uses the direction
seed itself, draw k > 0 the seed :func:`draw_seed` derives from it and k; :func:`redraw` writes a draw's
directions into a chart in place, so one evaluator serves every draw.
δ and η are not orthogonalised: Li et al. rely on random directions in millions of dimensions being nearly
orthogonal; their cosine is recorded in ``chart.info["directions"]`` (landscape.json).

Coordinates (``coordinates``):

- ``weights`` (default): θ* = W0 + ΔW_centre over ALL parameters. For an adapter centre θ* differs from W0
  only in the adapted weights and the head, but the directions span the whole model, as in Li et al.
- ``adapter`` (a LoRA / RandLoRA centre): the coordinates are the adapter's own parameters in the centre's
  peft model (loaded with peft on a copy of the base): LoRA's A and B factors, RandLoRA's λ and γ, and the
  trained copy of the head — the landscape the optimiser actually sees. Factor matrices and the head's
  weight are filter-normalised per row; RandLoRA's λ (r × N) and γ (N × min(in, out)), the diagonal
  scalings of the shared random bases, whose rows are not filters of anything, are normalised as a layer
  (each tensor to its norm in θ*) under ``filter``. :class:`AdapterEvaluator` is a PlaneEvaluator over
  those parameters of the peft model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES, Classification
from adapters.quant import dequantized_weight, is_packed
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import Chart, random_chart

if TYPE_CHECKING:
    from adapters.solution import Solution

NORMS = ("filter", "layer", "model")
IGNORES = ("biasbn", "none")
COORDINATES = ("weights", "adapter")
CENTERS = ("ft", "lora", "randlora")
CENTER_VERTEX = "center"  # the vertex (and solutions key) of a centre given as a folder
EPS = 1e-10  # Li et al.'s guard against a zero direction norm
LAYER_RULE = ("randlora_lambda", "randlora_gamma")  # adapter coordinates normalised as a layer under "filter"


def _check(norm: str, ignore: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be one of {IGNORES}, not {ignore!r}")


@torch.no_grad()
def filter_normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d`` with each filter (slice along dim 0) rescaled in place to the norm of ``w``'s; a ≤ 1-D tensor is
    one filter."""
    if d.dim() <= 1:
        return d.mul_(w.norm() / (d.norm() + EPS))
    scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + EPS)
    return d.mul_(scale.view(-1, *([1] * (d.dim() - 1))))


@torch.no_grad()
def normalize(
    direction: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    norm: str = "filter",
    ignore: str = "biasbn",
    layer_rule: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Rescale ``direction`` in place to the scale of ``weights`` (θ*) by ``norm``, zeroing ≤ 1-D parameters
    under ``ignore="biasbn"`` (module docstring); ``layer_rule``: names normalised as a layer under ``filter``."""
    _check(norm, ignore)
    for n, d in direction.items():
        w = weights[n].detach().to(d.device, torch.float32)
        if ignore == "biasbn" and w.dim() <= 1 and n not in layer_rule:
            d.zero_()
        elif norm == "filter" and n not in layer_rule:
            filter_normalize(d, w)
        elif norm in ("filter", "layer"):
            d.mul_(w.norm() / (d.norm() + EPS))
    if norm == "model":  # float64 sums: millions of terms
        kept = [n for n, d in direction.items() if not (ignore == "biasbn" and d.dim() <= 1 and n not in layer_rule)]
        w_norm = math.sqrt(sum(float(weights[n].detach().double().square().sum()) for n in kept))
        d_norm = math.sqrt(sum(float(direction[n].double().square().sum()) for n in kept))
        for n in kept:
            direction[n].mul_(w_norm / (d_norm + EPS))
    return direction


def draw_directions(
    weights: dict[str, torch.Tensor],
    seed: int,
    norm: str = "filter",
    ignore: str = "biasbn",
    count: int = 2,
    layer_rule: Collection[str] = (),
) -> list[dict[str, torch.Tensor]]:
    """``count`` normalised Gaussian directions shaped like ``weights`` (fp32, on the weights' devices), drawn
    by one CPU generator seeded with ``seed``: every parameter of the first direction, then of the second."""
    _check(norm, ignore)
    g = torch.Generator().manual_seed(int(seed))
    draw = lambda w: torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.device)  # noqa: E731
    raw = [{n: draw(w) for n, w in weights.items()} for _ in range(count)]  # every δ value, then every η value
    return [normalize(d, weights, norm, ignore, layer_rule) for d in raw]


def draw_seed(seed: int, k: int) -> int:
    """The seed of draw ``k`` around a centre: ``seed`` itself for draw 0 (so one draw is the single-draw chart
    of before), else numpy's ``SeedSequence([seed, k])``'s first 31-bit word: deterministic, and unlike seed + k
    not the draw 0 of a neighbouring seed (``--seeds`` trains with s, s + 1, …) but for a 1-in-2³¹ chance."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0]) & 0x7FFFFFFF


def layer_rule(names: Collection[str], coordinates: str) -> list[str]:
    """The parameters normalised as a layer under ``filter``: RandLoRA's λ, γ in adapter coordinates."""
    if coordinates != "adapter":
        return []
    return [n for n in names if any(f".{k}." in f".{n}." for k in LAYER_RULE)]


@torch.no_grad()
def redraw(chart: Chart, seed: int) -> list[float]:
    """Write the directions of ``seed`` into ``chart`` in place (U, and V unless a line), drawn around its origin
    with the rule ``chart.info["directions"]`` records; every tensor keeps its identity, so an evaluator holding
    them evaluates the new draw. Returns the directions' norms."""
    info = chart.info["directions"]
    line = chart.name == "random-line"
    rule = layer_rule(list(chart.origin), info["coordinates"])
    dirs = draw_directions(chart.origin, seed, info["norm"], info["ignore"], 1 if line else 2, rule)
    for target, d in zip((chart.u, chart.v), dirs, strict=False):
        for n, t in d.items():
            target[n].copy_(t)
    return [math.sqrt(_flat_dot(d, d)) for d in dirs]


def _flat_dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(torch.sum(a[n].double() * b[n].double()) for n in a))


def draw_chart(
    weights: dict[str, torch.Tensor],
    vertex: str,
    seed: int,
    norm: str = "filter",
    ignore: str = "biasbn",
    line: bool = False,
    layer_rule: Collection[str] = (),
    coordinates: str = "weights",
) -> Chart:
    """The random chart around ``weights`` (θ*, the origin, kept as given when fp32: it must not share memory with
    the parameters an evaluator writes); δ (and η unless ``line``) drawn and normalised by
    :func:`draw_directions`; ``chart.info["directions"]`` records how."""
    center = {n: w.detach().float() for n, w in weights.items()}
    dirs = draw_directions(center, seed, norm, ignore, 1 if line else 2, layer_rule)
    moving = [n for n, d in dirs[0].items() if d.any()]
    norms = [math.sqrt(_flat_dot(d, d)) for d in dirs]
    info = {
        "seed": int(seed), "norm": norm, "ignore": ignore, "coordinates": coordinates, "center": vertex,
        "parameters": len(center), "parameters_moved": len(moving),
        "elements_moved": sum(center[n].numel() for n in moving), "center_norm": math.sqrt(_flat_dot(center, center)),
        "direction_norms": norms,
        "cosine": None if line else _flat_dot(dirs[0], dirs[1]) / max(norms[0] * norms[1], 1e-300),
        "reference": "Li et al. 2018, filter-normalized random directions",
    }  # fmt: skip
    return random_chart(center, dirs[0], None if line else dirs[1], vertex, {"directions": info})


# --------------------------------------------------------------------------- the centre


def center_weights(solution: Solution) -> dict[str, torch.Tensor]:
    """θ* = W0 + ΔW of ``solution`` over every floating-point parameter of its base model (fp32); a packed
    (4-bit) weight counts as the dequantised one it computes with."""
    delta = solution.delta()
    out = {}
    for n, p in solution.base.named_parameters():
        if not p.is_floating_point() and not is_packed(p):
            continue
        w = dequantized_weight(p) if is_packed(p) else p.detach().float()
        out[n] = w + delta[n].to(w.device) if n in delta else w.clone()
    return out


def center_of(center: str, solutions: dict[str, Solution]) -> tuple[str, Solution]:
    """(vertex name, solution) of the centre: ``ft`` / ``lora`` / ``randlora``, or the folder given
    (``solutions["center"]``, :func:`load_center`)."""
    name = center if center in CENTERS else CENTER_VERTEX
    return name, solutions[name]


# --------------------------------------------------------------------------- adapter coordinates


def adapter_folder(solution: Solution) -> Path:
    """The peft adapter folder of a LoRA / RandLoRA solution written by this tool, else a UserError."""
    from adapters.methods import ADAPTERS

    folder = Path(solution.path)
    source = solution.info.get("source")
    if solution.method not in ADAPTERS or source is not None or not (folder / "adapter_config.json").exists():
        raise UserError(
            f"--coordinates adapter needs a LoRA or RandLoRA solution folder written by this tool, and {folder} is "
            f"a {source or solution.method} solution: pass --coordinates weights or an adapter centre"
        )
    return folder


def adapter_model(solution: Solution) -> nn.Module:
    """The centre's peft model on a private copy of its base (the base model itself is never touched)."""
    from adapters.deltas import load_adapter

    return load_adapter(adapter_folder(solution), copy.deepcopy(solution.base))


def adapter_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's own parameters of a peft model, by name: each tuner layer's adapter parameters (LoRA's
    A / B, RandLoRA's λ / γ) and the trained copies of ``modules_to_save`` (the head), in the model's order."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    own: set[int] = set()
    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            own.update(id(p) for p in module.modules_to_save.parameters())
        elif isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                own.update(id(p) for p in getattr(module, attr).parameters())
    return {n: p for n, p in peft_model.named_parameters() if id(p) in own}


class AdapterEvaluator(PlaneEvaluator):
    """A :class:`PlaneEvaluator` whose plane lives in the adapter parameters of the centre's peft model.

    Point (x, y) sets every adapter parameter to a* + x·δ + y·η (a*: the centre's trained values; δ, η drawn
    over those parameters, module docstring) in place and runs the peft model: the frozen base weights never
    move. Same interface (``evaluate``, ``evaluate_iter``, ``eval_set``, ``autocast``, ``points_per_forward``,
    ``note``, ``objective``, ``chart``) and the same cost per point as the peft model's forward.
    """

    def __init__(
        self,
        solution: Solution,
        eval_set: EvalSet,
        device: torch.device | str,
        seed: int,
        norm: str = "filter",
        ignore: str = "biasbn",
        line: bool = False,
        dtype: str = "float32",
        points_per_forward: int | str = 1,
        objective: Classification = OBJECTIVES["classification"],
        vertex: str | None = None,
    ):
        model = adapter_model(solution)
        center = {n: p.detach().float().clone() for n, p in adapter_parameters(model).items()}  # a*, not aliased
        rule = layer_rule(list(center), "adapter")
        chart = draw_chart(center, vertex or solution.method, seed, norm, ignore, line, rule, "adapter")
        super().__init__(model, chart, eval_set, device, dtype, points_per_forward, objective)


def note(info: dict) -> str:
    """What a random chart's axes mean, for the figures."""
    d = info["directions"]
    where = "its adapter parameters" if d["coordinates"] == "adapter" else "all weights"
    fixed = "; biases and norm parameters fixed" if d["ignore"] == "biasbn" else ""
    line = len(d["direction_norms"]) == 1
    point, dirs = ("θ* + α·δ", "δ") if line else ("θ* + α·δ + β·η", "δ, η")
    draws = info.get("draws")
    shown = "" if not draws or draws["count"] == 1 else f"; draw 0 of {draws['count']}, spread in landscape.json"
    return (
        f"random directions (Li et al. 2018) around {d['center']} over {where}: {point}, "
        f"{d['norm']}-normalised Gaussian {dirs} (seed {d['seed']}{fixed}{shown})"
    )


__all__ = [
    "CENTERS",
    "COORDINATES",
    "IGNORES",
    "NORMS",
    "AdapterEvaluator",
    "adapter_model",
    "adapter_parameters",
    "center_of",
    "center_weights",
    "draw_chart",
    "draw_directions",
    "draw_seed",
    "filter_normalize",
    "layer_rule",
    "normalize",
    "redraw",
]
