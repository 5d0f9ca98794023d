"""The plane held factored, evaluated on the base model itself: :class:`FactoredEvaluator` and the hooks
behind it. The chart it evaluates (θ(x, y) = W0 + Σ_s c_s(x, y)·ΔW_s, :func:`build_chart`) and the choice of
storage (:func:`choose_storage`) live in :mod:`landscape.engine.factored_chart` and are re-exported here,
the import path the recipes and the tests use.

:class:`FactoredEvaluator` has :class:`~landscape.engine.grid.PlaneEvaluator`'s interface (``run_grid``, the
paths and the report use it unchanged) but evaluates ON THE BASE MODEL ITSELF: W0 stays in the
parameters; a forward pre-hook on each module that uses a plane parameter builds W0 + Σ c_s·ΔW_s into a
scratch tensor (a view of a flat buffer from a pool shared by all modules, so a few buffers of the
largest parameter's size serve the whole model; half-precision weights are summed in fp32 in chunks
and rounded once, except bf16 weights on a device that multiplies bf16 natively
(:func:`adapters.precision.native_bf16`), built by bf16 operations with fp32 accumulation within the bound
:func:`landscape.engine.factored_chart.combine` states, as fast as the forward's own matmuls) and swaps it in
(``module._parameters[name]``); a forward hook swaps W0 back. The
adapters' ΔW are built from their factors, for peft's Linear layers by one ``addmm`` into the scratch
(:meth:`adapters.deltas.Delta.add_to`, no ΔW-sized temporary), once per point: a module's combined
weight is kept for the point's later batches while the kept total stays under :data:`CACHE_BYTES` and
:data:`CACHE_SHARE` of the model's bytes (beyond it, or with ``cache_bytes=0``, it is rebuilt per
batch, holding nothing dense for it).

On a 4-bit base (``--load-4bit``, :mod:`adapters.quant`) a packed weight cannot take W0 + ΔW. A packed ``Linear``
(bitsandbytes' ``Linear4bit``) that uses its own weight gets an instance ``forward`` for the evaluator's life
(:func:`_dense_forward`; a pre-hook cannot change the forward that runs): at a point that moves it, the pre-hook
builds its dequantised W0 + Σ c_s·ΔW_s in the layer's compute dtype (the same pool and cache) and the forward is
one matmul with it, where adding ``x·ΔWᵀ`` beside the packed kernel's output cost a second matmul of the layer's
size (in fp32) per batch. Any other packed weight's module gets ``x·(Σ c_s·ΔW_s)ᵀ`` (fp32, the weight's logical
shape) added to its output by the forward hook, beside it. Either way the adapters' updates and a dense one (an FT
checkpoint's θ_FT − dequantised W0) alike; the packed codes are never written; ``--plane-storage dense`` is refused.

The weights are built outside the forward's bf16 autocast, in the weights' own precision, as the dense
plane builds them. Exact zero coefficients are skipped (adding 0·ΔW changes
nothing), so the arithmetic is a function of the point alone: a vertex gets bit-identical weights
inside or outside a grid.

Which module uses a parameter: its owner, unless the owner's forward never runs (``nn.MultiheadAttention``
reads ``out_proj.weight`` itself; CLIP's ``encode_text`` reads the root's ``positional_embedding``):
one forward of the first evaluation batch finds the modules that run, and such parameters are
swapped by the nearest ancestor that does. Tied parameters are swapped in every module that holds
them. A parameter read outside the forward of its holder is not supported. Models that cache what
they compute from their weights (CLIP's text features) drop those caches in ``eval()``, which
:meth:`FactoredEvaluator.set_point` calls: the weights change here without their version counters
moving. Hooks are removed by :meth:`FactoredEvaluator.close` (or when the evaluator is garbage
collected); the base model's parameters are never written.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from adapters.objectives import OBJECTIVES, Classification, PointResult, score
from adapters.precision import native_bf16
from adapters.quant import dequantize_into, is_packed, logical_shape
from landscape.engine.factored_chart import (
    DENSE_COPIES,
    HALF,
    HALF_CHUNK,
    STORAGES,
    THIRD_VERTICES,
    DeltaLike,
    FactoredChart,
    affine_chart,
    available_memory,
    build_chart,
    choose_storage,
    combine,
    resolve_device,
)
from landscape.engine.grid import EvalSet
from landscape.engine.plane import SOLUTIONS

# Bytes of per-point products kept between the batches of one point (module docstring, "per-point cache"):
# a module's combined weight (or, on a packed layer, its combined ΔW) is built from the adapters' factors
# once per point and reused by every batch while the total stays under this; 0 rebuilds it for every batch.
# At most CACHE_SHARE of the model's own bytes (as stored: packed weights count packed), so the plane stays
# within its memory target (≤ 1.5 × the model, issue 20) whatever the model's size.
CACHE_BYTES = 1 << 30
CACHE_SHARE = 0.1

__all__ = [
    "CACHE_BYTES",
    "CACHE_SHARE",
    "DENSE_COPIES",
    "STORAGES",
    "THIRD_VERTICES",
    "FactoredChart",
    "FactoredEvaluator",
    "affine_chart",
    "available_memory",
    "build_chart",
    "choose_storage",
    "combine",
    "line_evaluators",
]


# --------------------------------------------------------------------------- the evaluator


class _Pool:
    """Flat scratch buffers per (dtype, device), lent as views shaped like a parameter: a module's pre-hook
    takes the smallest free buffer that is large enough (else makes one) and gives it back after the module
    ran, so a few buffers of the largest parameters' size serve every module."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.allocated_bytes = 0  # every buffer ever made (they are kept for reuse)

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self.free.setdefault((dtype, device), [])
        fits = [k for k, buf in enumerate(free) if buf.numel() >= numel]
        if fits:
            return free.pop(min(fits, key=lambda k: free[k].numel()))
        buf = torch.empty(numel, dtype=dtype, device=device)
        self.allocated_bytes += buf.numel() * buf.element_size()
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.free.setdefault((buf.dtype, buf.device), []).append(buf)


def _compute_dtype(layer: nn.Module, w0: torch.Tensor) -> torch.dtype:
    """The dtype a packed layer multiplies in: bitsandbytes' ``compute_dtype``, else what it dequantises to."""
    return getattr(layer, "compute_dtype", None) or w0.quant_state.dtype


def _dense_forward(layer: nn.Module, swapper: _Swapper) -> Callable:
    """A packed Linear's forward (set as its instance attribute while the evaluator lives: a pre-hook cannot change
    the forward that runs): at a point that moves it, x·Wᵀ + b with W the point's logical weight that the pre-hook
    built, the input and bias cast to the compute dtype and the output back as bitsandbytes' own forward does;
    otherwise the layer's own forward."""
    own = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        built = swapper.dense.get(id(layer))
        if built is None:
            return own(x, *args, **kwargs)
        weight = built[0]
        bias = layer.bias.to(weight.dtype) if layer.bias is not None else None
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward


class _Unset:
    """A handle (``remove()``) that deletes a module's instance ``forward``, as the hooks' handles remove them."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


# (module owning the parameter, attribute, W0, its terms)
_Entry = tuple[nn.Module, str, torch.Tensor, list[tuple[str, DeltaLike]]]


def _lazy(terms: list[tuple[str, DeltaLike]], coef: Mapping[str, float]) -> bool:
    """Whether a term with a non-zero coefficient is rebuilt from factors (worth keeping for the point)."""
    return any(not isinstance(d, torch.Tensor) and coef.get(s, 0.0) != 0.0 for s, d in terms)


class _Swapper:
    """What the hooks do; holds no reference to the evaluator, so the evaluator can be garbage collected.

    An ordinary parameter is swapped: W0 + Σ c_s·ΔW_s goes into ``module._parameters`` while the module runs. A
    packed (4-bit) weight cannot hold that, so its module's output gets ``x·(Σ c_s·ΔW_s)ᵀ`` added by the forward
    hook, beside the packed layer's own ``x·W0ᵀ`` (``beside``); the packed codes are never written.

    Per-point cache: what a module's pre-hook builds from the adapters' factors (its combined weight, or its
    combined ΔW beside a packed layer) is kept for the point while the total stays under ``cache_bytes`` and
    reused by every later batch of that evaluation; :meth:`drop_cache` drops it after each. Weights made only of
    stored terms are not kept: rebuilding them is one add, cheaper than holding a copy.
    """

    def __init__(self, cache_bytes: int = CACHE_BYTES, bf16: bool = False):
        self.coef: dict[str, float] = {}
        self.bf16 = bf16  # bf16 weights are built by bf16 arithmetic (combine's ``bf16``)
        self.active = False  # hooks act only inside the evaluator's own evaluate()
        self.pool = _Pool()
        self.live: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]] = []  # swapped, innermost last
        self.beside: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}  # id(module) -> [(ΔW, buf)]
        self.dense: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # id(packed Linear) -> (weight, buf)
        self.dense_layers: set[int] = set()  # the packed Linears whose forward is _dense_forward
        self.cache_bytes = cache_bytes
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.stats = {"builds": 0, "hits": 0, "bytes": 0, "peak_bytes": 0}

    def new_point(self, coef: dict[str, float]) -> None:
        self.drop_cache()
        self.coef = coef

    def drop_cache(self) -> None:
        """Forget the point's products: they live for one evaluation (its batches) only, so nothing is served
        after the weights changed under them (``report.fp32_weights`` upcasts W0 in place) or held between points."""
        self.cache.clear()
        self.stats["bytes"] = 0

    def _built(self, owner: nn.Module, attr: str, w0: torch.Tensor, terms, packed: bool, dense: bool = False):
        """(tensor, pool buffer to give back or None): the module's combined weight, or for a packed weight its
        combined ΔW (fp32, logical shape) or with ``dense`` its dequantised W0 + Σ c·ΔW (the layer's compute dtype),
        from the cache or built now."""
        key = (id(owner), attr)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats["hits"] += 1
            return hit, None
        shape = logical_shape(w0) if packed else w0.shape
        dtype = (_compute_dtype(owner, w0) if dense else torch.float32) if packed else w0.dtype
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        keep = _lazy(terms, self.coef) and self.stats["bytes"] + nbytes <= self.cache_bytes
        buf = None if keep else self.pool.take(numel, dtype, w0.device)
        out = torch.empty(shape, dtype=dtype, device=w0.device) if keep else buf[:numel].view(shape)
        if dense:  # dequantised straight into ``out`` where the dtypes allow (combine then adds in place)
            base = dequantize_into(w0, out)
        else:
            base = torch.zeros((), dtype=dtype, device=w0.device).expand(shape) if packed else w0
        # bf16 weights on a device that multiplies bf16 natively: summed in bf16 (combine's ``bf16``, its error
        # bound), as fast as the forward's own matmuls; other half weights through an fp32 accumulator
        bf16 = self.bf16 and dtype == torch.bfloat16
        acc = self.pool.take(min(numel, HALF_CHUNK), torch.float32, w0.device) if dtype in HALF and not bf16 else None
        # the forward may run under bf16 autocast; the weights (and the adapters' ΔW) are built as the dense
        # plane builds them, outside it
        with torch.autocast(w0.device.type, enabled=False):
            combine(base, terms, self.coef, out, acc, bf16)
        if acc is not None:
            self.pool.give(acc)
        self.stats["builds"] += 1
        if keep:
            self.cache[key] = out
            self.stats["bytes"] += nbytes
            self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self.stats["bytes"])
        return out, buf

    def _moves(self, terms) -> bool:
        """Whether the point moves this parameter away from W0 (a term with a non-zero coefficient)."""
        return any(self.coef.get(s, 0.0) != 0.0 for s, _ in terms)

    @torch.no_grad()
    def pre(self, entries: list[_Entry], module: nn.Module | None = None) -> None:
        if not self.active:
            return
        for owner, attr, w0, terms in entries:
            if not self._moves(terms):
                continue  # every coefficient 0: the point's weight is W0 itself, which the module holds
            if is_packed(w0) and id(owner) in self.dense_layers and owner is module:
                # a packed Linear runs, for this point, x·(dequantised W0 + Σ c·ΔW)ᵀ: one matmul, not the packed
                # kernel's plus one beside it (module docstring; its forward is _dense_forward); codes never written
                self.dense[id(owner)] = self._built(owner, attr, w0, terms, True, dense=True)
                continue
            if is_packed(w0):
                self.beside.setdefault(id(owner), []).append(self._built(owner, attr, w0, terms, True))
                continue
            weight, buf = self._built(owner, attr, w0, terms, False)
            owner._parameters[attr] = weight
            self.live.append((owner, attr, w0, buf))

    def post(self, module: nn.Module, entries: list[_Entry], args: tuple, output):
        if not self.active:
            return None
        self.restore(sum(1 for e in entries if not is_packed(e[2]) and self._moves(e[3])))  # those pre() swapped
        _, buf = self.dense.pop(id(module), (None, None))
        if buf is not None:
            self.pool.give(buf)
        side = self.beside.pop(id(module), None)
        if not side:
            return None
        if not isinstance(output, torch.Tensor):  # the forward raised: give the buffers back, change nothing
            for _, buf in side:
                if buf is not None:
                    self.pool.give(buf)
            return None
        x = args[0]
        for delta, buf in side:
            # the packed layer's own output is x·W0ᵀ (+ bias); the point adds x·ΔWᵀ beside it, in ΔW's
            # precision (or the forward's autocast), as peft's adapter layers add theirs
            output = output + torch.nn.functional.linear(x.to(delta.dtype), delta).to(output.dtype)
            if buf is not None:
                self.pool.give(buf)
        return output

    def restore(self, count: int | None = None) -> None:
        """Swap W0 back into the last ``count`` swapped parameters (all when None)."""
        for _ in range(len(self.live) if count is None else min(count, len(self.live))):
            owner, attr, w0, buf = self.live.pop()
            owner._parameters[attr] = w0
            if buf is not None:
                self.pool.give(buf)
        if count is None:
            for _, buf in self.dense.values():
                if buf is not None:
                    self.pool.give(buf)
            self.dense.clear()
            for side in self.beside.values():
                for _, buf in side:
                    if buf is not None:
                        self.pool.give(buf)
            self.beside.clear()


def _detach(handles: list, swapper: _Swapper, model: nn.Module, training: bool) -> None:
    """Finalizer: remove the hooks, put W0 back everywhere, restore the train/eval mode."""
    swapper.restore()
    for h in handles:
        h.remove()
    handles.clear()
    swapper.pool.free.clear()
    swapper.cache.clear()
    model.train(training)


def _modules_that_run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> set[int]:
    """ids of the modules whose forward runs on ``inputs`` (one probe forward at the current weights)."""
    ran: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: ran.add(id(mod))) for m in model.modules()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return ran


def holders(model: nn.Module, names: Iterable[str], probe: dict[str, torch.Tensor] | None) -> dict:
    """{module whose hooks swap: [(owner module, attribute, parameter, name)]}: each of the parameters ``names``
    in every module holding it (tied weights), hoisted to the nearest ancestor that runs on ``probe`` (one
    no-grad forward) when its owner's forward never does (None: no probe, every owner). Also used by the trained
    curves (:mod:`landscape.curves`), whose hooks build θ(t) differentiably."""
    params = dict(model.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the chart's parameter {missing[0]!r} is not a parameter of the model")
    wanted = {id(params[n]): n for n in names}
    ran = _modules_that_run(model, probe) if probe is not None else None
    parents = {id(c): m for m in model.modules() for c in m.children()}
    found: dict[nn.Module, list[tuple[nn.Module, str, torch.Tensor, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is None or id(p) not in wanted:
                continue
            holder = module
            while ran is not None and id(holder) not in ran and id(holder) in parents:
                holder = parents[id(holder)]
            if ran is not None and id(holder) not in ran:
                continue  # the forward never uses it: nothing to swap
            found.setdefault(holder, []).append((module, attr, p, wanted[id(p)]))
    return found


class FactoredEvaluator:
    """Evaluates the loss at chart points on the base model itself (module docstring).

    The interface of :class:`landscape.engine.grid.PlaneEvaluator` (``eval_set``, ``autocast``,
    ``points_per_forward`` = 1, ``note``, ``objective``, :meth:`evaluate`, :meth:`evaluate_iter`,
    :meth:`evaluate_many`, :meth:`set_point`). The model is moved to ``device`` and set to eval mode;
    :meth:`close` (or ``with``) removes the hooks and restores its mode and device.
    """

    def __init__(
        self,
        model: nn.Module,
        chart: FactoredChart,
        eval_set: EvalSet,
        device: torch.device | str,
        dtype: str = "float32",
        points_per_forward: int | str = 1,
        objective: Classification = OBJECTIVES["classification"],
        cache_bytes: int | None = None,
    ):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, not {dtype}")
        self.autocast = dtype == "bfloat16"  # bf16 autocast of the forward; weights keep the model's dtype
        self.device = resolve_device(device)
        self.model, self.chart, self.eval_set, self.objective = model, chart, eval_set, objective
        self.points_per_forward = 1
        self.note = None if points_per_forward in (1, "auto") else (
            f"the factored plane evaluates one point per forward ({points_per_forward} were asked for)"
        )  # fmt: skip
        first = next(model.parameters(), None)
        self._home = first.device if first is not None else self.device
        training = model.training
        model.to(self.device).eval()
        chart.to(self.device)
        probe = eval_set.batches[0][0] if eval_set.batches else None
        try:
            swapped = {h: [(m, a, p, chart.terms(n)) for m, a, p, n in entries]
                       for h, entries in holders(model, chart.names, probe).items()}  # fmt: skip
        except BaseException:
            model.train(training)
            raise
        if cache_bytes is None:
            stored = sum(p.numel() * p.element_size() for p in model.parameters())
            cache_bytes = min(CACHE_BYTES, int(CACHE_SHARE * stored))
        self._swapper = swapper = _Swapper(cache_bytes, native_bf16(self.device))
        handles = []
        for holder, entries in swapped.items():  # packed Linears that use their own weight: a dense forward
            if (
                "forward" not in holder.__dict__
                and any(o is holder and a == "weight" and is_packed(w) for o, a, w, _ in entries)
                and isinstance(holder, nn.Linear)
            ):
                swapper.dense_layers.add(id(holder))
                holder.forward = _dense_forward(holder, swapper)
                handles.append(_Unset(holder))
        # The hooks hold the swapper, never the evaluator: the evaluator can then be garbage collected.
        for holder, entries in swapped.items():
            handles.append(holder.register_forward_pre_hook(lambda m, a, e=entries, s=swapper: s.pre(e, m)))
            handles.append(holder.register_forward_hook(lambda m, a, o, e=entries, s=swapper: s.post(m, e, a, o),
                                                        always_call=True))  # fmt: skip
        self._handles = handles
        self._finalizer = weakref.finalize(self, _detach, handles, swapper, model, training)

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the scratch tensors the hooks allocated (reused across modules and points)."""
        return self._swapper.pool.allocated_bytes

    def cache_info(self) -> dict[str, int]:
        """The per-point cache: ``builds`` (module products built from the terms), ``hits`` (batches that reused
        one), ``bytes`` held now (0 between evaluations), ``peak_bytes`` the most held at once, ``limit`` (unless
        told, :data:`CACHE_BYTES` or :data:`CACHE_SHARE` of the model's bytes if less; 0: off)."""
        return {**self._swapper.stats, "limit": self._swapper.cache_bytes}

    @torch.no_grad()
    def set_point(self, x: float, y: float) -> None:
        """The point the next forward evaluates at (weights are built as each module runs)."""
        if not self._finalizer.alive:
            raise RuntimeError("this FactoredEvaluator is closed")
        self._swapper.new_point(self.chart.coefficients(x, y))
        first = next(self.model.parameters(), None)
        if first is not None and first.device != self.device:  # another evaluator's close() moved it home
            self.model.to(self.device)
        self.model.eval()  # drops caches computed from the weights (module docstring)

    @torch.no_grad()
    def evaluate(self, x: float, y: float, keep_samples: bool = False) -> PointResult:
        self.set_point(x, y)
        forward = lambda inputs: self.model(**inputs)  # noqa: E731
        batches, n = self.eval_set.batches, self.eval_set.n
        self._swapper.active = True
        try:
            return score(forward, batches, n, self.objective, bf16=self.autocast, keep_samples=keep_samples)[0]
        finally:
            self._swapper.active = False
            self._swapper.restore()  # after an exception inside a forward too
            self._swapper.drop_cache()

    def evaluate_iter(self, points: Iterable[tuple[float, float]], keep_samples: bool = False) -> Iterator[PointResult]:
        """Results at ``points`` in order, one point per forward."""
        for x, y in points:
            yield self.evaluate(float(x), float(y), keep_samples=keep_samples)

    def evaluate_many(self, points: Iterable[tuple[float, float]]) -> list[PointResult]:
        return list(self.evaluate_iter(points))

    def close(self, restore_device: bool = True) -> None:
        """Remove the hooks and restore the model's train/eval mode (and device, unless told not to)."""
        if self._finalizer.alive:
            self._finalizer()
            if restore_device and self._home != self.device:
                self.model.to(self._home)

    def __enter__(self) -> FactoredEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def line_evaluators(
    base_model: nn.Module,
    solutions: Mapping,
    eval_set: EvalSet,
    device: torch.device | str,
    dtype: str = "float32",
    objective: Classification = OBJECTIVES["classification"],
    chart: FactoredChart | None = None,
) -> Callable[[str, str, str], FactoredEvaluator]:
    """For :func:`landscape.paths.compute_paths`: a function (A, B, name) → the evaluator of the line from
    A to B. ``chart``: a factored chart through the solutions whose updates are shared (else one is built
    from ``solutions[s].module_deltas()``, without geometry)."""
    if chart is None:
        deltas = {s: solutions[s].module_deltas(check=False) for s in (*SOLUTIONS, "base") if s in solutions}
        chart = build_chart("paper", base_model, deltas, geometry=False)

    def make(a: str, b: str, name: str) -> FactoredEvaluator:
        return FactoredEvaluator(base_model, chart.line(a, b, name), eval_set, device, dtype, 1, objective)

    return make
