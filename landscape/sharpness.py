"""python -m landscape.sharpness — adaptive sharpness (p = 2) at the solutions of a run, worst case and
average case, in the adapter's own coordinates and in the full weight space.

**Definition** (Kwon et al. 2021, ASAM; Andriushchenko et al. 2023, "A modern look at the relationship
between sharpness and generalization"). At a point w of the chosen coordinates (d numbers), with the
element-wise scale s = max(|w|, ξ) (ξ = ``--xi``, default 1e-8: an entry that is exactly 0 — a bias at
its init — still gets a tiny room instead of none; ASAM adds a floor of this kind too) and a perturbation
written δ = s ⊙ u:

- worst case  S_max(w, ρ) = max over ‖u‖₂ ≤ ρ of L(w + s ⊙ u) − L(w)   (i.e. ‖δ ⊘ s‖₂ ≤ ρ),
- average case S_avg(w, ρ) = E over u ~ N(0, ρ²/d · I) of L(w + s ⊙ u) − L(w),

L the run's objective, the mean loss over the run's evaluation set (the same samples, objective, eval mode
and precision as :class:`landscape.curvature.HessianOperator`, whose loss this module evaluates). With
``adaptive=False`` (s = 1) the same two numbers are plain (non-adaptive) sharpness, for comparison.

**Estimation.** The worst case is a maximisation, estimated from below by projected gradient ascent in the
rescaled variable u (Andriushchenko et al.'s recipe): a random start on the sphere ‖u‖ = ρ (a seeded
Gaussian direction), then ``steps`` steps u ← Π_ρ(u + η·ρ·g/‖g‖), g = ∇_u L(w + s ⊙ u) = s ⊙ ∇L (one
forward and backward pass over the evaluation set each), Π_ρ the projection onto the ball ‖u‖ ≤ ρ, η =
``step_size`` (default 1: a step of length ρ). The reported value is the largest L − L(w) over all the
iterates (each is a feasible point, so it is a lower bound of S_max; more steps can only raise it). At a
minimum of a quadratic the ascent is a power iteration on I + A/‖Au‖·ρ, A = diag(s)·H·diag(s), and the
value tends to the closed form ½ρ²·λmax(A) (tests). The average case is the mean over ``draws`` Gaussian
draws of u, with the standard error of that mean; every draw's value is kept. Every draw derives from
``seed`` (recorded), per coordinates: the same start and draws for every solution with the same
coordinates, so the solutions' differences are paired.

**Invariance.** Rescaling entries of w by positive factors that leave the function unchanged — a LoRA's
B·c, A/c in adapter coordinates, a ReLU or linear layer's weights by c and the next one's by 1/c — maps
s ⊙ u to the same change of the function: the adaptive readings are unchanged (up to the floor ξ), where
plain sharpness (s = 1) is not. It is not invariant to rotations of the factors (B·R, R⁻¹·A), which no
element-wise measure is.

**Coordinates.** ``adapter``: what the adapter's optimiser trained (LoRA's A and B, RandLoRA's λ and γ, and
the head), :func:`landscape.curvature.adapter_coordinates`; full fine-tuning has no adapter and its entry
is skipped. ``weights``: the adapted weights W0 + ΔW and the head, :func:`landscape.curvature.weight_coordinates`
(the same space for every solution). The two are different quantities, reported side by side: a ball in
adapter coordinates moves ΔW along the adapter's low-rank (or random-basis) manifold only, scaled by the
factors' magnitudes; a ball in weight coordinates moves every entry of W0 + ΔW, scaled by its magnitude.
Neither bounds the other (Flat-LoRA, ICML 2025, contrasts them).

**Output** (under ``--out``, default the run folder, written atomically after each entry):
``sharpness.json`` — settings, ``seed``, the run's ``training_seed``, and per solution and coordinates
``worst_case``, ``average_case`` ± ``average_se``, the loss at the point, its ``resolution`` (the spacing of
floating-point numbers at L(w) in the passes' precision: a difference of that order is rounding; float64,
``--dtype``, resolves smaller ones), the dimension, and the details (ascent trajectory, every draw).
Each entry carries a key of everything that determines it (settings, the solution's ΔW, the evaluation
samples, the objective): a rerun, or a run killed half-way, reuses the entries whose key matches.
Training seeds: on a run of ``--seeds N`` > 1 (:mod:`landscape.seeds`) every entry, whose keys stay those
of the run's own seed s, gains a ``per_seed`` list (seed s's numbers, then a keyed entry per extra seed,
measured at ``solutions/seed-K/``'s solution with the same settings, start and draws) and over the N seeds
``worst_case_per_seed`` / ``_mean`` / ``_ci95`` and the same for ``average_case``: the 95 % t-interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from adapters.errors import UserError
from adapters.io import key_digest, write_json
from adapters.objectives import Classification
from adapters.progress import progress_bar
from adapters.quant import packed_names
from adapters.solution import Solution
from landscape import curvature
from landscape.engine.grid import EvalSet

PROG = "python -m landscape.sharpness"
FORMAT = 1
SOLUTION_CHOICES = curvature.SOLUTION_CHOICES
COORDINATES = curvature.COORDINATES
DTYPES = ("float32", "float64")

__all__ = [
    "COORDINATES",
    "EvalLoss",
    "FunctionLoss",
    "SharpnessSettings",
    "average_case",
    "main",
    "scales",
    "sharpness_at",
    "sharpness_stage",
    "worst_case",
]


@dataclass(frozen=True)
class SharpnessSettings:
    """What to compute at each solution (module docstring)."""

    rho: float = 0.1
    steps: int = 10
    step_size: float = 1.0  # η: each ascent step moves u by η·ρ along the normalised gradient
    draws: int = 10
    xi: float = 1e-8  # floor of the scale |w|
    adaptive: bool = True
    coordinates: tuple[str, ...] = COORDINATES
    include_head: bool = True
    seed: int = 0
    dtype: str = "float32"

    def check(self) -> None:
        """UserError naming the first bad setting and its fix."""
        for name, low in (("steps", 1), ("draws", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                why = " (a standard error needs two)" if name == "draws" else ""
                raise UserError(f"--{name} {value!r}: must be an integer >= {low}{why}: pass a value >= {low}")
        for name, strict in (("rho", True), ("step_size", True), ("xi", False)):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and math.isfinite(value) and (value > 0 if strict else value >= 0)
            if not ok:
                default = SharpnessSettings.__dataclass_fields__[name].default
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {value!r}: must be a finite number {'>' if strict else '>='} 0: try {default}")
        bad = [c for c in self.coordinates if c not in COORDINATES]
        if bad or not self.coordinates:
            raise UserError(f"--coordinates {' '.join(map(str, self.coordinates))}: choose weights, adapter or both")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "coordinates": list(self.coordinates)}

    def key(self) -> dict:
        """Every setting that changes an entry's numbers (which coordinates are asked for does not)."""
        return {k: v for k, v in self.to_dict().items() if k != "coordinates"}


def _stream_seed(seed: int, stream: int) -> int:
    """An independent integer seed per random stream (ascent start, Gaussian draws)."""
    return int(np.random.SeedSequence([seed, stream, 22]).generate_state(1)[0])


# --------------------------------------------------------------------------- the loss as a function of w


class Loss(Protocol):
    """What the estimators need: the point w and the loss (and its gradient) at any point of its shape."""

    params: dict[str, torch.Tensor]

    def value(self, params: Mapping[str, torch.Tensor]) -> float: ...

    def value_and_grad(self, params: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]: ...


class FunctionLoss:
    """A differentiable function of a dict of tensors at ``params`` (tests, the Python API)."""

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], params: Mapping[str, torch.Tensor]):
        self.fn = fn
        self.params = {n: p.detach() for n, p in params.items()}
        self.passes = 0

    def value(self, params: Mapping[str, torch.Tensor]) -> float:
        self.passes += 1
        with torch.no_grad():
            return float(self.fn(params))

    def value_and_grad(self, params: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        self.passes += 1
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            loss = self.fn(leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return float(loss.detach()), {n: torch.zeros_like(p) if g is None else g
                             for (n, p), g in zip(leaves.items(), grads, strict=True)}  # fmt: skip


class EvalLoss:
    """The mean loss over ``eval_set`` of ``model`` as a function of its parameters ``names``: the loss of
    :class:`landscape.curvature.HessianOperator` (same batches — a causal LM's gold continuation only —,
    precision, eval mode), evaluated at other values of those parameters through ``functional_call``. The
    model's parameters stop requiring gradients and, for float64, it is converted: pass a copy you own."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        eval_set: EvalSet,
        objective: Classification,
        dtype: str = "float32",
        micro_batch: int | None = None,
    ):
        op = curvature.HessianOperator(model, names, eval_set, objective, dtype, micro_batch=micro_batch)
        self.model, self.names, self.batches, self.n = op.model, op.names, op.batches, op.n
        self.objective, self.params, self.dim = op.objective, op.params, op.dim
        self.passes = 0  # passes over the evaluation set
        self.on_pass: Callable[[], None] | None = None

    def _batch(self, params: Mapping[str, torch.Tensor], inputs: dict, target: torch.Tensor) -> torch.Tensor:
        outputs = torch.func.functional_call(self.model, dict(params), args=(), kwargs=inputs)
        return curvature.batch_loss(self.objective, outputs, target) / self.n

    def _counted(self) -> None:
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass()

    def value(self, params: Mapping[str, torch.Tensor]) -> float:
        with torch.no_grad():
            total = sum(float(self._batch(params, i, t)) for i, t in self.batches)
        self._counted()
        return total

    def value_and_grad(self, params: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        grad = {n: torch.zeros_like(p) for n, p in leaves.items()}
        total = 0.0
        with torch.enable_grad():
            for inputs, target in self.batches:  # one backward per batch: one batch's activations at a time
                loss = self._batch(leaves, inputs, target)
                for n, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True),
                                strict=True):  # fmt: skip
                    if g is not None:
                        grad[n] += g
                total += float(loss.detach())
        self._counted()
        return total, grad


# --------------------------------------------------------------------------- estimators


def scales(params: Mapping[str, torch.Tensor], xi: float, adaptive: bool = True) -> dict[str, torch.Tensor]:
    """s = max(|w|, ξ) per entry (adaptive), or 1 (plain sharpness)."""
    if not adaptive:
        return {n: torch.ones_like(p) for n, p in params.items()}
    return {n: p.detach().abs().clamp_min(xi) for n, p in params.items()}


def _norm(t: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in t.values()))


def _gaussian(params: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Standard normal entries shaped like ``params``, drawn in float64 on the host (the same numbers on every
    device and in every precision), then cast."""
    return {n: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device, p.dtype)
            for n, p in params.items()}  # fmt: skip


def _at(params: Mapping[str, torch.Tensor], s: Mapping[str, torch.Tensor], u: Mapping[str, torch.Tensor]) -> dict:
    return {n: params[n] + s[n] * u[n] for n in params}


def worst_case(
    loss: Loss, rho: float, steps: int = 10, step_size: float = 1.0, seed: int = 0, xi: float = 1e-8,
    adaptive: bool = True, base: float | None = None,
) -> dict:  # fmt: skip
    """max over ‖u‖ ≤ ρ of L(w + s ⊙ u) − L(w), from below: projected normalised gradient ascent in u from
    a seeded random point of the sphere (module docstring); the largest value over the iterates."""
    start = time.perf_counter()
    w = loss.params
    s = scales(w, xi, adaptive)
    base = loss.value(w) if base is None else base
    u = _gaussian(w, torch.Generator().manual_seed(_stream_seed(seed, 0)))
    norm = _norm(u)
    u = {n: v * (rho / norm) for n, v in u.items()}
    values, grad_norms = [], []
    for step in range(steps + 1):
        point = _at(w, s, u)
        if step == steps:  # the last iterate: its value only
            values.append(loss.value(point) - base)
            break
        value, g = loss.value_and_grad(point)
        values.append(value - base)
        gu = {n: g[n] * s[n] for n in g}  # the chain rule through w + s ⊙ u
        g_norm = _norm(gu)
        grad_norms.append(g_norm)
        if g_norm == 0 or not math.isfinite(g_norm):
            break  # a stationary (or non-finite) point: no direction to ascend
        u = {n: u[n] + gu[n] * (step_size * rho / g_norm) for n in u}
        u_norm = _norm(u)
        if u_norm > rho:
            u = {n: v * (rho / u_norm) for n, v in u.items()}
    best = int(np.nanargmax(values)) if np.isfinite(values).any() else 0
    return {"value": float(values[best]), "best_step": best, "values": [float(v) for v in values],
            "grad_norms": grad_norms, "u_norm": _norm(u), "steps": steps, "step_size": step_size,
            "start": "seeded Gaussian direction on the sphere ||u|| = rho", "seed": _stream_seed(seed, 0),
            "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def average_case(
    loss: Loss, rho: float, draws: int = 10, seed: int = 0, xi: float = 1e-8, adaptive: bool = True,
    base: float | None = None,
) -> dict:  # fmt: skip
    """Mean over ``draws`` u ~ N(0, ρ²/d·I) of L(w + s ⊙ u) − L(w), its standard error and every draw."""
    start = time.perf_counter()
    w = loss.params
    s = scales(w, xi, adaptive)
    base = loss.value(w) if base is None else base
    dim = sum(p.numel() for p in w.values())
    generator = torch.Generator().manual_seed(_stream_seed(seed, 1))
    values = []
    for _ in range(draws):
        u = {n: v * (rho / math.sqrt(dim)) for n, v in _gaussian(w, generator).items()}
        values.append(loss.value(_at(w, s, u)) - base)
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"value": float(x.mean()), "se": se, "sd": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
            "min": float(x.min()), "max": float(x.max()), "values": values, "draws": draws,
            "seed": _stream_seed(seed, 1), "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def sharpness_at(loss: Loss, settings: SharpnessSettings) -> dict:
    """Both estimates at one point: one entry of sharpness.json."""
    start = time.perf_counter()
    base = loss.value(loss.params)
    kw = {"seed": settings.seed, "xi": settings.xi, "adaptive": settings.adaptive, "base": base}
    worst = worst_case(loss, settings.rho, settings.steps, settings.step_size, **kw)
    average = average_case(loss, settings.rho, settings.draws, **kw)
    dtype = next(iter(loss.params.values())).dtype
    return {
        "dim": sum(p.numel() for p in loss.params.values()),
        "parameters": len(loss.params),
        "loss": base,
        # the spacing of floating-point numbers at L(w) in the passes' precision: a difference L(w + δ) − L(w)
        # of this order is rounding (float32 at L ≈ 2: 2.4e-7), so a smaller average case reads "not resolved"
        "resolution": float(torch.finfo(dtype).eps * abs(base)),
        "worst_case": worst["value"],
        "average_case": average["value"],
        "average_se": average["se"],
        "worst": worst,
        "average": average,
        "passes": getattr(loss, "passes", None),
        "seconds": round(time.perf_counter() - start, 3),
    }


# --------------------------------------------------------------------------- the stage


def _previous(path: Path) -> dict:
    """The solutions of an earlier sharpness.json (none if absent or unreadable)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old.get("solutions", {}) if isinstance(old, dict) else {}


def _entry(name: str, solution: Solution, coordinates: str, names: Sequence[str], task, eval_set: EvalSet,
           settings: SharpnessSettings, device, progress: bool) -> dict:  # fmt: skip
    flags = [(p, p.requires_grad) for p in solution.base.parameters()]
    try:
        if coordinates == "weights":
            model, chosen = curvature.weight_coordinates(solution, names)
        else:
            model, chosen = curvature.adapter_coordinates(solution, settings.include_head, settings.dtype, device)
        loss = EvalLoss(model.to(device), chosen, eval_set, task.objective, settings.dtype)
    finally:  # the loss (and peft) froze parameters an adapter's skeleton shares with the base: put back
        for p, flag in flags:
            p.requires_grad_(flag)
    total = 1 + settings.steps + 1 + settings.draws  # passes: L(w), the ascent's steps + last iterate, the draws
    bar = progress_bar(total=total, desc=f"sharpness {name}/{coordinates}", unit="pass", disable=not progress,
                       dynamic_ncols=True)  # fmt: skip
    loss.on_pass = lambda: bar.update(1)
    try:
        return {**sharpness_at(loss, settings), "device": str(device)}
    finally:
        bar.close()


def sharpness_stage(
    source,
    solutions: Mapping[str, Solution],
    eval_set: EvalSet,
    out: str | Path,
    settings: SharpnessSettings,
    device: torch.device | str = "cpu",
    progress: bool = True,
    plane_solutions: Mapping[str, Solution] | None = None,
    info: Mapping | None = None,
    seed_solutions: Callable[[int, str], Solution] | None = None,
    seeds: Sequence[int] = (),
) -> dict:
    """Sharpness of every solution in every coordinates of ``settings``; writes ``out``/sharpness.json after
    each entry; returns what it holds. ``source``: an :class:`landscape.run.OpenRun` or a ``Loaded``.
    ``seeds``: the run's training seeds (its own first) and ``seed_solutions(seed, name)`` the solution of an
    extra one: each entry gets its ``per_seed`` readings and t-intervals (module docstring)."""
    from adapters.solution import delta_fingerprint, fingerprint

    settings.check()
    task = getattr(source, "loaded", source).task
    out = Path(out)
    names = curvature.weight_names(task.base, task.entry.targets, "adapted", plane_solutions or solutions,
                                   settings.include_head)  # fmt: skip
    common = {"settings": settings.key(), "base": fingerprint(task.base), "objective": task.objective.name,
              "eval": curvature.eval_fingerprint(eval_set), "weights": names, "format": FORMAT}  # fmt: skip
    previous = _previous(out / "sharpness.json")
    result = {"format": FORMAT, **(dict(info) if info else {}), "settings": settings.to_dict(),
              "seed": settings.seed, "measure": "adaptive" if settings.adaptive else "plain",
              "eval_samples": eval_set.n, "objective": task.objective.name, "device": str(device),
              "complete": False, "solutions": {}}  # fmt: skip
    for name, solution in solutions.items():
        result["solutions"][name] = per = {}
        for coordinates in settings.coordinates:
            if coordinates == "adapter" and solution.method not in curvature.ADAPTER_METHODS:
                per[coordinates] = {"skipped": f"a {solution.method} solution has no adapter: {curvature.NO_ADAPTER}"}
            elif coordinates == "weights" and packed_names(task.base):
                per[coordinates] = {"skipped": curvature.PACKED_WEIGHTS}
            else:
                key = key_digest({**common, "coordinates": coordinates, "solution": delta_fingerprint(solution)})
                old = previous.get(name, {}).get(coordinates, {})
                if old.get("key") == key:  # the same settings, point and samples: the same numbers
                    per[coordinates] = {**old, "reused": True}
                else:
                    entry = _entry(name, solution, coordinates, names, task, eval_set, settings, device, progress)
                    per[coordinates] = {"key": key, **entry}
                if len(seeds) > 1:
                    run_entry = {"common": common, "task": task, "eval_set": eval_set, "names": names}
                    _over_seeds(per[coordinates], old, name, coordinates, seeds, seed_solutions, run_entry,
                                settings, device, progress)  # fmt: skip
            write_json(out / "sharpness.json", result)  # saved as each entry completes
    result["complete"] = True
    write_json(out / "sharpness.json", result)
    return result


def _over_seeds(entry: dict, old: Mapping, name: str, coordinates: str, seeds: Sequence[int], load: Callable,
                run: Mapping, settings: SharpnessSettings, device, progress: bool) -> None:  # fmt: skip
    """``entry`` (seed ``seeds[0]``'s) gains ``per_seed`` (each extra seed's entry, reused from ``old``'s by key)
    and the worst and average cases' mean and t-interval over the seeds."""
    from adapters.solution import delta_fingerprint
    from landscape.seeds import over_seeds

    kept = {e.get("seed"): e for e in old.get("per_seed") or [] if isinstance(e, dict)}
    per_seed = [{"seed": seeds[0], **{k: entry[k] for k in ("worst_case", "average_case", "average_se", "loss")}}]
    for seed in seeds[1:]:
        solution = load(seed, name)
        key = key_digest({**run["common"], "coordinates": coordinates, "solution": delta_fingerprint(solution)})
        if kept.get(seed, {}).get("key") == key:
            per_seed.append({**kept[seed], "reused": True})
        else:
            found = _entry(f"{name}@seed{seed}", solution, coordinates, run["names"], run["task"], run["eval_set"],
                           settings, device, progress)  # fmt: skip
            per_seed.append({"seed": seed, "key": key, **found})
    entry["per_seed"] = per_seed
    for quantity in ("worst_case", "average_case"):
        entry.update(over_seeds(quantity, [e[quantity] for e in per_seed]))


# ----------------------------------------------------------------------------- command line ----


def build_parser():
    from landscape.cli import Parser, add_run_options, positive_int

    d = SharpnessSettings()
    p = Parser(
        prog=PROG,
        description="Adaptive sharpness (p = 2; Kwon et al. 2021, Andriushchenko et al. 2023) at the solutions of a "
        "run: worst case max over ||delta / |w| ||_2 <= rho of L(w + delta) - L(w) by projected gradient ascent, "
        "and the average over Gaussian draws, in adapter and weight coordinates.",
        epilog="Example: python -m landscape.sharpness --run runs/wordnet --rho 0.1 --steps 10 --draws 10",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--solutions", nargs="+", choices=SOLUTION_CHOICES, default=None,
                   help="solutions to measure (default: those of ft lora randlora the run has)")  # fmt: skip
    p.add_argument("--rho", type=float, default=d.rho, help=f"radius of the ball in u = delta / |w| (default: {d.rho})")
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help=f"projected gradient-ascent steps of the worst case (default: {d.steps})")  # fmt: skip
    p.add_argument("--step-size", type=float, default=d.step_size,
                   help=f"each ascent step's length, as a fraction of rho (default: {d.step_size})")  # fmt: skip
    p.add_argument("--draws", type=int, default=d.draws, help=f"draws of the average case (default: {d.draws})")
    p.add_argument("--xi", type=float, default=d.xi, help=f"floor of the scale |w| (default: {d.xi})")
    p.add_argument("--plain", action="store_true", help="plain sharpness (scale 1) instead of adaptive")
    p.add_argument("--coordinates", nargs="+", default=list(COORDINATES),
                   help="weights (W0 + dW, head), adapter (its own parameters), or both (default: both)")  # fmt: skip
    p.add_argument("--no-head", action="store_true", help="leave the classification head out of the coordinates")
    p.add_argument("--dtype", default=d.dtype, help="precision of the passes: float32 or float64 (default: float32)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="evaluation samples: the first N of the run's evaluation set (default: all of it)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the ascent's start and the draws (default: 0)")
    add_run_options(p, "sharpness.json")
    return p


def settings_from(args) -> SharpnessSettings:
    coordinates = COORDINATES if "both" in args.coordinates else tuple(dict.fromkeys(args.coordinates))
    settings = SharpnessSettings(
        rho=args.rho, steps=args.steps, step_size=args.step_size, draws=args.draws, xi=args.xi,
        adaptive=not args.plain, coordinates=coordinates, include_head=not args.no_head, seed=args.seed,
        dtype=args.dtype,
    )  # fmt: skip
    settings.check()
    return settings


def _run(argv: Sequence[str] | None = None) -> None:
    from landscape import run as run_module

    args = build_parser().parse_args(argv)
    settings = settings_from(args)  # every setting is checked before any loading
    ctx, device = run_module.open_run_from_args(args, with_eval_set=args.samples is None)
    chosen = args.solutions or [s for s in SOLUTION_CHOICES if s in ctx.solutions]
    missing = [s for s in chosen if s not in ctx.solutions]
    if missing:
        raise UserError(f"--solutions {' '.join(chosen)}: the run {args.run} has no {missing[0]} solution")
    eval_set = run_module.eval_set_with(ctx, device, args.samples)
    meta = ctx.meta
    info = {k: meta.get(k) for k in ("dataset", "model", "eval_split")}
    info.update(run=str(ctx.run_dir), training_seed=ctx.loaded.config.seed)
    out = Path(args.out) if args.out else ctx.run_dir
    solutions = {s: ctx.solutions[s] for s in dict.fromkeys(chosen)}
    extra = run_module.seed_solution_folders(ctx.run_dir, meta)  # --seeds N: the other seeds' solutions

    def load(seed: int, name: str) -> Solution:
        from adapters.solution import load_solution

        return load_solution(extra[seed][name], base=ctx.base, expect_method=name)

    seeds = [ctx.loaded.config.seed, *extra] if extra else []
    if seeds:
        info["training_seeds"] = seeds
    result = sharpness_stage(ctx, solutions, eval_set, out, settings, device, progress=not args.no_progress,
                             plane_solutions=ctx.solutions, info=info, seed_solutions=load, seeds=seeds)  # fmt: skip
    print(f"wrote {out / 'sharpness.json'} ({result['measure']} sharpness, rho {settings.rho})")
    for name, per in result["solutions"].items():
        for coordinates, e in per.items():
            if "worst_case" in e:
                rounding = (f" (below the {settings.dtype} resolution {e['resolution']:.2g}: try --dtype float64)"
                            if abs(e["average_case"]) < e["resolution"] else "")  # fmt: skip
                average = f"{e['average_case']:.3g} ± {e['average_se']:.2g}{rounding}"
                print(f"{name:<9} {coordinates:<8} dim {e['dim']:>10,}: loss {e['loss']:.4g}; worst case "
                      f"{e['worst_case']:.4g}; average {average}")  # fmt: skip
            if e.get("worst_case_ci95"):
                (wl, wh), (al, ah) = e["worst_case_ci95"], e["average_case_ci95"]
                print(f"{'':<18} over {len(e['per_seed'])} training seeds (mean [95 % t-interval]): worst case "
                      f"{e['worst_case_mean']:.4g} [{wl:.4g}, {wh:.4g}]; average {e['average_case_mean']:.3g} "
                      f"[{al:.3g}, {ah:.3g}]")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import recipe_main

    return recipe_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
