"""The factored plane's chart: the base model plus only what differs between the solutions, and the choice
between the dense and the factored plane. The evaluator that runs it is :mod:`landscape.engine.factored`.

The dense plane (:mod:`landscape.engine.plane` + :class:`landscape.engine.grid.PlaneEvaluator`) holds θ_s = W0 + ΔW_s
for the three solutions, the chart's origin, U and V, and writes origin + x·U + y·V into a copy of
the model: about six dense fp32 copies of the model. That cannot study an 8B LLM. Here every point of
an affine chart through the solutions is written as an affine combination of their updates,

    θ(x, y) = W0 + Σ_s c_s(x, y)·ΔW_s,   Σ_s c_s = 1,

with barycentric coefficients from the chart's vertices: paper chart c_randlora = 1 − x − y/2,
c_ft = y, c_lora = x − y/2; orthonormal chart (origin RandLoRA, unit u towards LoRA, v by
Gram–Schmidt of FT − RandLoRA, as :func:`landscape.engine.plane.orthonormal_chart`) c_ft = y/‖v_raw‖,
c_lora = (x − along·c_ft)/‖LoRA − RandLoRA‖, c_randlora = 1 − c_ft − c_lora; a line from A to B
(:mod:`landscape.paths`) c_A = 1 − t, c_B = t.

:func:`build_chart` makes a :class:`FactoredChart` by streaming once over the parameters with the
solutions' lazy updates (:func:`adapters.deltas.module_deltas`), one parameter in memory at a time:
"stored" updates (full fine-tuning's, every parameter it changes, and the adapters' heads) are kept,
once, in the model's dtype; "factored" ones (the adapters' layers) stay what peft rebuilds them from.
The orthonormal chart and the geometry (pairwise distances, triangle angles: the same values as
``plane.geometry_from_gram``) come from the 3 × 3 Gram matrix of the pairwise differences of the updates,
accumulated in float64 over chunks of each parameter and released.

The third vertex of a plane is FT's update or, when no FT solution exists (the default under
``--load-4bit``), the base model itself (``"base"``: ΔW = 0), in FT's place in both charts.

:func:`choose_storage` picks ``dense`` or ``factored`` for ``auto``: factored when the dense plane
(≈ 13 × the parameters' bytes in fp32, as measured) would need more than half of the memory available.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from adapters.errors import UserError
from adapters.quant import dequantized_weight, is_packed, packed_names
from landscape.engine.plane import CHARTS, SOLUTIONS, difference_gram, geometry_from_gram

STORAGES = ("auto", "dense", "factored")
# fp32 copies of the parameters the dense plane holds at its peak (the thetas, origin/U/V, a working copy): measured
# 13.11-13.22 at hidden 256-1024 (experiments.benchmarks.memory, docs/reference/performance.md) and 14.5 on a
# 4-layer Qwen2-0.5B shape (the rehearsal's fp32 plane: 12.7 GB peak RSS, 1.9 GB after loading, 0.75 GB model)
DENSE_COPIES = 13
HALF = (torch.float16, torch.bfloat16)
HALF_CHUNK = 1 << 20  # elements of the fp32 accumulator of half-precision weights
THIRD_VERTICES = ("ft", "base")  # the plane's third vertex: FT, or the base model itself (ΔW = 0)

DeltaLike = torch.Tensor | Callable[[], torch.Tensor]

__all__ = [
    "STORAGES",
    "FactoredChart",
    "affine_chart",
    "available_memory",
    "build_chart",
    "choose_storage",
    "combine",
    "resolve_device",
]


# --------------------------------------------------------------------------- storage choice


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:N``), so it compares equal to the tensors' devices."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for the plane: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable on CPU (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def choose_storage(storage: str, base_model: nn.Module, device: torch.device | str) -> str:
    """``dense`` or ``factored`` for the requested ``storage``; ``auto``: factored when the dense plane,
    ≈ :data:`DENSE_COPIES` fp32 copies of the model's floating-point parameters (full fine-tuning changes
    them all), would need more than half of :func:`available_memory` (the rest of the run holds the solutions
    and a batch's activations besides)."""
    if storage not in STORAGES:
        raise UserError(f"unknown plane storage '{storage}': choose one of {', '.join(STORAGES)}")
    if packed_names(base_model):  # a 4-bit base cannot hold W0 + ΔW: every point is applied beside it
        if storage == "dense":
            raise UserError("--plane-storage dense cannot write W0 + ΔW into a base loaded with --load-4bit: "
                            "use --plane-storage factored or auto")  # fmt: skip
        return "factored"
    if storage != "auto":
        return storage
    need = DENSE_COPIES * 4 * sum(p.numel() for p in base_model.parameters() if p.is_floating_point())
    free = available_memory(device)
    return "factored" if free is not None and need > free / 2 else "dense"


# --------------------------------------------------------------------------- the chart


@dataclass
class FactoredChart:
    """An affine chart through the solutions, held as W0 and each solution's ΔW (module docstring).

    ``base``: W0 of the plane parameters (the base model's own tensors, not copies); ``deltas``: per
    solution its non-zero ΔW, a tensor (stored, in the model's dtype) or a callable returning it
    (rebuilt from factors); ``form``: how coefficients follow from (x, y): ``("paper",)``,
    ``("orthonormal", |LoRA − RandLoRA|, |v_raw|, along)`` or ``("line", A, B)``.
    """

    name: str
    vertices: dict[str, tuple[float, float]]
    info: dict
    base: dict[str, torch.Tensor]
    deltas: dict[str, dict[str, DeltaLike]]
    form: tuple = ("paper",)
    _device: torch.device | None = field(default=None, repr=False)
    third: str = "ft"  # the name of the vertex in FT's place: "ft", or "base" (the base model, ΔW = 0)

    @property
    def solutions(self) -> tuple[str, ...]:
        """The solutions in the order their terms are added."""
        return tuple(self.deltas)

    @property
    def names(self) -> list[str]:
        """The plane parameters: those any of the chart's solutions changes."""
        return sorted(set().union(*(d.keys() for d in self.deltas.values())))

    def coefficients(self, x: float, y: float) -> dict[str, float]:
        """c_s(x, y) per solution: θ(x, y) = W0 + Σ c_s·ΔW_s with Σ c_s = 1."""
        x, y = float(x), float(y)
        kind = self.form[0]
        if kind == "paper":
            return {self.third: y, "lora": x - y / 2, "randlora": 1.0 - x - y / 2}
        if kind == "orthonormal":
            norm_u, norm_v, along = self.form[1:]
            c_ft = y / norm_v
            c_lora = (x - along * c_ft) / norm_u  # exactly 0 at the FT vertex, 1 at LoRA's
            return {self.third: c_ft, "lora": c_lora, "randlora": 1.0 - c_ft - c_lora}
        if kind == "line":
            a, b = self.form[1:]
            return {a: 1.0 - x, b: x}
        if kind == "affine":  # a random chart: θ* + x·δ + y·η
            return {"center": 1.0, "u": x, "v": y}
        if kind == "curve":  # landscape.curves' offsets: y = 0 the line from "a" to "b", y = 1 the curve
            weights, controls = self.form[1:]
            if y == 0.0:
                return {"a": 1.0 - x, "b": x}
            return dict(zip(controls, weights(x), strict=True))
        raise ValueError(f"unknown chart form {self.form!r}")

    def terms(self, name: str) -> list[tuple[str, DeltaLike]]:
        """(solution, ΔW) of parameter ``name``, in the fixed order of :attr:`solutions`."""
        return [(s, self.deltas[s][name]) for s in self.solutions if name in self.deltas[s]]

    def weights_at(self, x: float, y: float) -> dict[str, torch.Tensor]:
        """Dense θ(x, y) of every plane parameter (new tensors; the evaluator's arithmetic)."""
        coef = self.coefficients(x, y)
        out = {}
        for n in self.names:
            w0 = self.base[n].detach()
            if is_packed(w0):  # the logical weight a packed layer computes with, fp32
                w0 = dequantized_weight(w0)
            acc = (
                torch.empty(min(w0.numel(), HALF_CHUNK), dtype=torch.float32, device=w0.device)
                if w0.dtype in HALF
                else None
            )
            out[n] = combine(w0, self.terms(n), coef, torch.empty_like(w0), acc)
        return out

    def line(self, a: str, b: str, name: str = "line") -> FactoredChart:
        """The line from solution ``a`` (x = 0) to ``b`` (x = 1), sharing this chart's updates (nothing copied)."""
        deltas = {a: self.deltas[a], b: self.deltas[b]}
        return FactoredChart(name, {"a": (0.0, 0.0), "b": (1.0, 0.0)}, {}, self.base, deltas, ("line", a, b),
                             self._device, self.third)  # fmt: skip

    @torch.no_grad()
    def to(self, device: torch.device | str) -> FactoredChart:
        """Move the stored updates and the adapters' factors to ``device``, in place (charts made by
        :meth:`line` share them); W0 stays in the base model, which its evaluator moves."""
        device = resolve_device(device)
        if self._device == device:
            return self
        for per in self.deltas.values():
            for n, d in per.items():
                if isinstance(d, torch.Tensor):
                    per[n] = d.to(device)
                elif hasattr(d, "to"):
                    d.to(device)
        self._device = device
        return self

    def stored_bytes(self) -> int:
        """Bytes of the updates held dense (full fine-tuning's and the heads)."""
        return sum(d.numel() * d.element_size() for per in self.deltas.values() for d in per.values()
                   if isinstance(d, torch.Tensor))  # fmt: skip


def combine(
    w0: torch.Tensor,
    terms: list[tuple[str, DeltaLike]],
    coef: Mapping[str, float],
    out: torch.Tensor,
    acc: torch.Tensor | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """``out`` ← W0 + Σ c_s·ΔW_s, terms in order, exact zero coefficients skipped (``out`` may be ``W0``'s
    shape viewed in a larger buffer). ``acc``: a flat fp32 buffer for half-precision weights: the sum is
    accumulated in fp32, ``acc.numel()`` elements at a time, and rounded once into ``out``.

    ``bf16`` (``out`` bf16, ``acc`` None; for a device that multiplies bf16 natively): the sum is formed in ``out``
    itself, each term added by one bf16 operation that computes in fp32 and rounds once (a stored ΔW by ``add_``,
    an adapter's product from its bf16-rounded factors by one ``addmm``, :meth:`adapters.deltas.Delta.add_to`), so
    nothing of the weight's size is built in fp32. Against the fp32 sum rounded once (U = 2⁻⁸, bf16's unit
    roundoff), each operation rounds the partial sum once more (U of |W0| + Σ|c_s·ΔW_s|) and an adapter's product
    adds at most 2U·Σ_k|c·F_ik·S_kj| (its factors' rounding, ≈ 2U·|c·ΔW|): of the order of the rounding of W0
    itself (U·|W0|, in both) wherever |c·ΔW| ≲ |W0|, as along the plane. With one stored term and no adapter (the
    parameters only FT changes) the result is the fp32 sum rounded once, as before."""
    active = [(c, d) for s, d in terms if (c := coef.get(s, 0.0)) != 0.0]
    if bf16 and acc is None and active and isinstance(active[0][1], torch.Tensor):
        # W0 + c·ΔW in one pass into ``out`` (CPU's in-place bf16 add_ runs about 3× slower than this)
        c, d = active.pop(0)
        torch.add(w0, d.to(out.device), alpha=c, out=out)
        w0 = out
    if acc is None:
        if w0 is not out:
            out.copy_(w0)
        for c, d in active:
            if isinstance(d, torch.Tensor):
                out.add_(d.to(out.device), alpha=c)
            elif hasattr(d, "add_to"):  # adapters.deltas.Delta: from the factors, no ΔW-sized temporary
                d.add_to(out, c, bf16=True) if bf16 else d.add_to(out, c)
            else:
                out.add_(d().to(out.device), alpha=c)
        return out
    # the lazy terms are materialised once each (fp32, full size); the sum goes through ``acc`` in chunks
    parts = [(c, (d if isinstance(d, torch.Tensor) else d()).to(out.device).reshape(-1)) for c, d in active]
    flat_w0, flat_out, n = w0.reshape(-1), out.view(-1), w0.numel()
    for a in range(0, n, acc.numel()):
        b = min(n, a + acc.numel())
        chunk = acc[: b - a]
        chunk.copy_(flat_w0[a:b])
        for c, t in parts:
            chunk.add_(t[a:b], alpha=c)
        flat_out[a:b].copy_(chunk)
    return out


def build_chart(
    name: str,
    base: nn.Module | Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, DeltaLike]],
    geometry: bool = True,
) -> FactoredChart:
    """The factored ``name`` chart (``paper`` or ``orthonormal``) through the ft, lora and randlora updates.

    ``base``: the base model (or its named parameters); ``deltas``: per solution ``{parameter: ΔW}`` as
    :meth:`adapters.solution.Solution.module_deltas` gives them (a :class:`adapters.deltas.Delta` of kind
    ``stored`` is kept dense in the model's dtype, of kind ``factored`` kept lazy) or plain tensors (kept)
    or other callables (kept lazy). One pass over the parameters; ``geometry``: also the distances and
    angles of ``plane.geometry_from_gram`` (the orthonormal chart needs them anyway). UserError on NaN/inf.
    """
    if name not in CHARTS:
        raise UserError(f"unknown chart '{name}': choose one of {', '.join(CHARTS)}")
    third = next((s for s in THIRD_VERTICES if s in deltas), "ft")  # "base": the base model in FT's place
    roles = {"ft": third, "lora": "lora", "randlora": "randlora"}
    missing = [roles[s] for s in SOLUTIONS if roles[s] not in deltas]
    if missing:
        raise UserError(f"the plane needs the solutions ft (or the base), lora and randlora; missing: "
                        f"{', '.join(missing)}")  # fmt: skip
    params = dict(base.named_parameters()) if isinstance(base, nn.Module) else dict(base)
    kept, gram = _stream(params, {s: deltas[roles[s]] for s in SOLUTIONS}, geometry or name == "orthonormal")
    kept = {roles[s]: kept[s] for s in SOLUTIONS}
    info = _rename(geometry_from_gram(gram), third) if gram is not None else {}
    names = sorted(set().union(*(d.keys() for d in kept.values())))
    chart_base = {n: params[n] for n in names}
    if name == "paper":
        vertices = {"randlora": (0.0, 0.0), "lora": (1.0, 0.0), third: (0.5, 1.0)}
        return FactoredChart("paper", vertices, info, chart_base, kept, ("paper",), third=third)
    norm_u = math.sqrt(max(gram[2, 2], 0.0))
    if norm_u == 0:
        raise UserError("the LoRA and RandLoRA solutions are identical: no orthonormal plane through them")
    along = float(gram[1, 2]) / norm_u
    norm_v = math.sqrt(max(float(gram[1, 1]) - along * along, 0.0))
    if norm_v <= 1e-12 * math.sqrt(max(gram[1, 1], 0.0)):
        raise UserError("the three solutions are collinear: no plane through them")
    vertices = {"randlora": (0.0, 0.0), "lora": (norm_u, 0.0), third: (along, norm_v)}
    return FactoredChart("orthonormal", vertices, info, chart_base, kept, ("orthonormal", norm_u, norm_v, along),
                         third=third)  # fmt: skip


@torch.no_grad()
def affine_chart(base: nn.Module, chart) -> FactoredChart:
    """A dense chart ``origin + x·U + y·V`` (:class:`landscape.engine.plane.Chart`, e.g. Li et al.'s random chart) as a
    factored one on ``base``: W0 + 1·(origin − W0) + x·U + y·V, every term stored in fp32 (as the dense chart holds
    them), so a 4-bit base evaluates it beside its packed layers. Terms that are zero are left out."""
    params = dict(base.named_parameters())
    kept: dict[str, dict[str, DeltaLike]] = {"center": {}, "u": {}, "v": {}}
    for n, origin in chart.origin.items():
        w0 = params[n]
        w = dequantized_weight(w0) if is_packed(w0) else w0.detach().float()
        for key, t in (("center", origin.to(w.device) - w), ("u", chart.u[n]), ("v", chart.v[n])):
            if t.any():
                kept[key][n] = t.float()
    names = sorted(set().union(*(d.keys() for d in kept.values())))
    return FactoredChart(chart.name, dict(chart.vertices), dict(chart.info), {n: params[n] for n in names}, kept,
                         ("affine",))  # fmt: skip


def _rename(geometry: dict, third: str) -> dict:
    """``geometry``'s keys with the third vertex's name in place of ``ft`` (distances "base-lora", angles "base")."""
    if third == "ft":
        return geometry
    swap = lambda key: "-".join(third if part == "ft" else part for part in key.split("-"))  # noqa: E731
    return {k: {swap(name): value for name, value in v.items()} for k, v in geometry.items()}


def _stream(
    params: dict[str, torch.Tensor], deltas: dict[str, Mapping[str, DeltaLike]], need_gram: bool
) -> tuple[dict[str, dict[str, DeltaLike]], np.ndarray | None]:
    """One pass over the parameters: what to keep per solution, and the Gram matrix of the differences."""
    names = sorted(set().union(*(d.keys() for d in deltas.values())))
    unknown = [n for n in names if n not in params]
    if unknown:
        raise UserError(f"the solutions change {unknown[0]!r}, which the base model lacks: use solutions of this model")
    kept: dict[str, dict[str, DeltaLike]] = {s: {} for s in deltas}
    gram = np.zeros((3, 3)) if need_gram else None
    with torch.no_grad():
        for n in names:
            w0, current = params[n], {}
            for s, per in deltas.items():
                if n not in per:
                    continue
                d, lazy = _materialise(per[n], n, s)
                if not d.any():  # Solution.delta() leaves all-zero updates out too
                    continue
                # a packed weight's stored ΔW stays fp32: it is applied beside the layer, never cast to its codes
                kept[s][n] = per[n] if lazy else d.to(torch.float32 if is_packed(w0) else w0.dtype)
                current[s] = d
            if gram is not None and current:
                gram += difference_gram([current.get(s) for s in SOLUTIONS], next(iter(current.values())).numel())
            del current
    return kept, gram


def _materialise(value: DeltaLike, name: str, solution: str) -> tuple[torch.Tensor, bool]:
    """(ΔW in fp32, whether to keep it lazy); UserError on NaN/inf."""
    if isinstance(value, torch.Tensor):
        d, lazy = value.detach().float(), False
    else:
        d, lazy = value(), getattr(value, "kind", "factored") == "factored"
    if not torch.isfinite(d).all():
        from adapters.deltas import Delta, non_finite_message

        raise UserError(
            non_finite_message(value) if isinstance(value, Delta)
            else f"the {solution} solution's update of '{name}' has NaN/inf: the training diverged; re-train it"
        )  # fmt: skip
    return d, lazy
