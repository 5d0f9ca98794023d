"""The analysis: spectrum metrics, similarity to full fine-tuning and intruder dimensions of every layer's
update, for dictionaries of updates (:func:`analyse`) or for solutions (:func:`analyse_solutions`,
:func:`write_spectrum`), and the spectra of the weights themselves, W0 and W0 + ΔW (WeightWatcher-style
context for each update).

Streaming: layers are processed in chunks of equal shape, and an update is read only when its chunk is
reached, so a mapping of lazy updates (:func:`landscape.spectrum.updates.lazy_deltas`: one parameter's ΔW
computed on call) keeps one chunk of one solution resident at a time; each chunk's updates are released
before the next is read. :func:`analyse_solutions` streams this way: each solution's ΔW of a layer is
computed from its files when the analysis reaches that layer (safetensors read per tensor, peft adapters
per module; LoRA layers from their factors, never dense). Off the CPU the chunks are stacked for torch's
batched calls, at most ``chunk_bytes`` of fp64 matrices each (a large layer alone); on the CPU (method
"gram": LAPACK, matrix by matrix) one layer at a time, as stacking would only copy.

spectrum.json (what :func:`analyse` returns; definitions in :mod:`landscape.spectrum.metrics` and
:mod:`landscape.spectrum.similarity`)::

    {"layers": [{"name": parameter name, "shape": [out, in],
                 "base": W0's weight spectrum (below; when the base weights are given and weight_spectra),
                 <solution>: {"singular_values": ΔW's, descending, "rank", "effective_rank", "stable_rank",
                              "energy_rank_90", "energy_rank_99", ["energy_beyond_rank"],
                              ["similarity_to_<reference>"], ["intruders"],
                              ["weight_spectrum"]: the weight spectrum of W0 + ΔW,
                              ["noise_floor", "below_floor", "rank_above_floor"]}, ...}, ...],
     "settings": {..., "weight_spectra": bool, ["rounding_floor": {solution: dtype or None}]},
     "solutions": {name: {"method", "rank", "path"}}}        (analyse_solutions only)

A weight spectrum (:func:`landscape.spectrum.metrics.weight_metrics`) is the full set of singular values
of the weight matrix (fp64 Gram eigenvalues on the CPU, as for ΔW) with its rank measures, its spectral
norm ``s_max`` and Frobenius norm; ``relative_update`` in each solution's ``weight_spectrum`` is
‖ΔW‖_F / ‖W0‖_F. Costs about one more Gram matrix and eigenvalue pass per layer and solution (W0's
comes with the intruder test); ``weight_spectra=False`` skips it.

Rounding floor (:mod:`landscape.spectrum.floor`; with ``base`` and ``floor_dtypes``, which
:func:`analyse_solutions` always gives): ``noise_floor`` is the expected largest singular value of the
rounding noise of W0 in the dtype that rounded the solution's weights (its magnitude follows |W0|, not ΔW),
``below_floor`` flags each of ``singular_values`` below it, ``rank_above_floor`` counts those above, and the
``intruders`` entry gains ``noise_ratio`` / ``limited_by_rounding`` per top vector. They are None for an
adapter's ΔW built from its factors (no rounded weights in it); an update between fp32 weights gets the
fp32 floor (u = 2^-24), tiny but stated. Only a ΔW with θ or W0 stored in bf16/fp16 has a floor that matters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.progress import progress_bar
from landscape.spectrum.decomposition import (
    METHODS,
    Decomp,
    LowRank,
    as_matrix,
    decompose,
    is_finite,
    lowrank_svd,
    matmul,
    one_blas_thread,
)
from landscape.spectrum.floor import floor_dtype, floor_entry, intruder_floor_entry, noise_floor
from landscape.spectrum.metrics import (
    BASE_KEY,
    WEIGHT_KEY,
    energy_beyond_rank,
    spectrum_metrics,
    weight_metrics,
    write_csv,
)
from landscape.spectrum.similarity import (
    ANGLE_KS,
    INTRUDER_THRESHOLDS,
    INTRUDER_TOP_K,
    OVERLAP_MAX_K,
    intruder_entry,
    intruder_max_cos,
    similarity_entry,
)
from landscape.spectrum.updates import (
    adapted_layers,
    default_layers,
    drops_zero_updates,
    is_lazy,
    lazy_deltas,
    matrix_shape,
    shape_of,
)

OUTPUTS = ("spectrum.json", "spectrum.csv", "spectrum.png", "rank.png", "rank.pdf", "similarity.png", "similarity.pdf")


@dataclass(frozen=True)
class _Options:
    """The settings of one :func:`analyse` call that every chunk of layers uses."""

    method: str
    device: str | torch.device | None
    rank: int | None
    angle_ks: tuple[int, ...]
    overlap_max_k: int
    intruder_top_k: int
    intruder_thresholds: tuple[float, ...]
    weight_spectra: bool = True
    floor_dtypes: Mapping[str, torch.dtype | None] | None = None  # per solution (with base): module docstring


@dataclass
class _Updates:
    """One solution's updates in a chunk of layers: all singular values, the top left singular vectors, and
    what the intruder test needs (the dense stack, or LoRA's factors: B scaled, and A)."""

    s: np.ndarray  # (b, d) float32, descending
    u: np.ndarray  # (b, m, kvec)
    dense: torch.Tensor | None = None
    bs: torch.Tensor | None = None
    a: torch.Tensor | None = None


def analyse(
    deltas: Mapping[str, Mapping],
    layers: Iterable[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    rank: int | None = None,
    reference: str = "ft",
    method: str = "gram",
    angle_ks: Sequence[int] = ANGLE_KS,
    overlap_max_k: int = OVERLAP_MAX_K,
    intruder_top_k: int = INTRUDER_TOP_K,
    intruder_thresholds: Sequence[float] = INTRUDER_THRESHOLDS,
    chunk_bytes: int = 512 * 2**20,
    weight_spectra: bool = True,
    floor_dtypes: Mapping[str, torch.dtype | None] | None = None,
) -> dict:
    """Spectrum metrics of every solution's update for each layer.

    ``deltas`` maps a solution name ("ft", "lora", "randlora", ...) to {parameter name: ΔW}, ΔW a
    dense tensor (any dtype, >2-D viewed as (shape[0], -1)), a :class:`LowRank` (LoRA factors:
    exact fast path) or a lazy update (a zero-argument callable with a ``shape`` returning the dense
    ΔW: :func:`landscape.spectrum.updates.lazy_deltas`). Values are read one chunk of layers at a time
    and released before the next chunk (module docstring), so lazy updates keep memory bounded.
    ``layers`` defaults to the 2-D parameters present in every solution, in natural order.

    Optional: ``base`` {parameter name: W0} adds intruder dimensions and, with ``weight_spectra``, the
    weight spectra of W0 and of each W0 + ΔW; ``rank`` (default: the r of the first LoRA :class:`LowRank`
    found) adds ``energy_beyond_rank`` and k = r to the angle set; the ``reference`` solution (default
    "ft"), when present, adds ``similarity_to_ft`` to the others. ``floor_dtypes`` {solution: dtype that
    rounded its weights, or None}, with ``base``, adds the rounding floor (module docstring) to those solutions.

    Returns ``{"layers": [{"name", "shape": [out, in], ["base": ...], <solution>: metrics, ...}, ...],
    "settings": {...}}`` with solutions in the order of ``deltas`` (layout: the module docstring).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    names = default_layers(deltas) if layers is None else list(layers)
    if rank is None:
        rank = next((v.r for params in deltas.values() for v in params.values()
                     if isinstance(v, LowRank) and v.kind == "lora"), None)  # fmt: skip
    ref = reference if reference in deltas else None
    shapes = _layer_shapes(deltas, names, base)
    floors = None if base is None or floor_dtypes is None else {k: floor_dtypes.get(k) for k in deltas}
    opts = _Options(method, device, rank, tuple(angle_ks), overlap_max_k, intruder_top_k, tuple(intruder_thresholds),
                    weight_spectra and base is not None, floors)  # fmt: skip
    results: dict[str, dict] = {n: {"name": n, "shape": list(shapes[n])} for n in names}
    on_cpu = method == "gram" and _analysis_device(deltas, names, device).type == "cpu"
    # On the CPU, OpenBLAS on one thread for the whole analysis, not only inside the LAPACK calls: after a
    # two-thread syrk its idle thread spins on the second core while the single-thread LAPACK and torch's own
    # threads run. The CIFAR smoke's spectra (72 ViT-B/32 layers, three solutions, 2 cores restricted to AVX2,
    # alternating): 39.7 / 37.6 -> 27.7 / 29.8 s, with half the CPU time.
    blas = one_blas_thread() if on_cpu else contextlib.nullcontext()
    with blas, progress_bar(total=len(names), desc="spectrum", unit="layer", disable=not progress) as bar:
        for chunk in _chunks(names, shapes, 1 if on_cpu else chunk_bytes):
            _analyse_chunk(chunk, shapes[chunk[0]], deltas, base, ref, opts, results)
            bar.update(len(chunk))
    return {"layers": [results[n] for n in names], "settings": _settings(opts, ref, base is not None)}


def _layer_shapes(deltas: Mapping, names: list[str], base: Mapping | None) -> dict[str, tuple[int, int]]:
    """The matrix shape (out, in) of each layer, checked to be the same in every solution and in ``base``."""
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        for solution, params in deltas.items():
            if name not in params:
                raise KeyError(f"solution {solution!r} has no parameter {name!r}")
            full = shape_of(params[name])
            if len(full) < 2:
                raise ValueError(f"need a 2-D (or higher) update, got shape {full}")
            shape = matrix_shape(full)
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}: shape {list(shape)} in {solution!r} != {list(shapes[name])}")
        if base is not None and (name not in base or _base_shape(base, name) != shapes[name]):
            raise KeyError(f"base weights lack {name!r} {list(shapes[name])}")
    return shapes


def _base_shape(base: Mapping, name: str) -> tuple[int, int]:
    """The matrix shape of W0 (a :class:`BaseWeights` tells it without dequantising a packed weight)."""
    if isinstance(base, BaseWeights):
        return matrix_shape(base.shape(name))
    return tuple(as_matrix(base[name]).shape)


def _analysis_device(deltas: Mapping, names: list[str], device: str | torch.device | None) -> torch.device:
    """Where the analysis runs: ``device``, else where the updates are (a lazy update: the CPU)."""
    if device is not None:
        return torch.device(device)
    if not names:
        return torch.device("cpu")
    first = next(iter(deltas.values()))[names[0]]
    if is_lazy(first):
        return torch.device("cpu")
    return (first.B if isinstance(first, LowRank) else first).device


def _chunks(names: list[str], shapes: dict[str, tuple[int, int]], chunk_bytes: int) -> list[list[str]]:
    """Layers grouped by shape (in order of first appearance), each group cut into chunks within the budget."""
    groups: dict[tuple[int, int], list[str]] = {}
    for n in names:
        groups.setdefault(shapes[n], []).append(n)
    out = []
    for (m, n), members in groups.items():
        per = max(1, chunk_bytes // (m * n * 8 * 4))  # fp64 copies: X, W0 + ΔW, products
        out += [members[i : i + per] for i in range(0, len(members), per)]
    return out


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, without a copy for a single tensor."""
    return ts[0][None] if len(ts) == 1 else torch.stack(ts)


def _analyse_chunk(chunk: list[str], shape: tuple[int, int], deltas: Mapping, base: Mapping | None,
                   ref: str | None, opts: _Options, results: dict[str, dict]) -> None:  # fmt: skip
    """Metrics, intruder dimensions, weight spectra and similarity of one chunk of layers of equal ``shape``,
    into ``results``. One solution's updates of the chunk are resident at a time."""
    d = min(shape)
    kvec = min(d, max([opts.overlap_max_k, *opts.angle_ks, opts.rank or 0]))  # vectors kept for the similarity
    w0 = d0 = s0 = None
    w0_of: dict[str, torch.Tensor] = {}
    if base is not None:
        w0 = _stack([as_matrix(base[nm]).detach().to(device=opts.device, dtype=torch.float32) for nm in chunk])
        w0_of = dict(zip(chunk, w0, strict=True))  # the floors read W0 from here (a 4-bit one dequantised once)
        d0 = decompose(w0, None, opts.method)
        s0 = d0.s.cpu().numpy()  # all singular values of W0: its weight spectrum comes with the intruder test
        if opts.weight_spectra:
            for i, nm in enumerate(chunk):
                results[nm][BASE_KEY] = weight_metrics(s0[i], shape)
    left: dict[str, tuple[np.ndarray, list[int]]] = {}
    for solution, params in deltas.items():
        dtype = opts.floor_dtypes.get(solution) if opts.floor_dtypes is not None else None
        # the floor follows W0's magnitude in the dtype that rounded this solution's weights (None: adapters)
        floors = [noise_floor(w0_of[nm], dtype) if dtype is not None else None for nm in chunk]
        updates = _decompose_updates(solution, chunk, [params[nm] for nm in chunk], d, kvec, opts)
        ranks = []
        for i, nm in enumerate(chunk):
            metrics = spectrum_metrics(updates.s[i], shape)
            if opts.rank:
                metrics["energy_beyond_rank"] = energy_beyond_rank(updates.s[i], opts.rank)
            if opts.floor_dtypes is not None:
                metrics.update(floor_entry(metrics["singular_values"], floors[i]))
            ranks.append(metrics["rank"])
            results[nm][solution] = metrics
        left[solution] = (updates.u, ranks)
        if d0 is not None:
            max_cos, weight_s, strength = _intruders(w0, d0, updates, opts, with_strength=dtype is not None)
            for i, nm in enumerate(chunk):
                results[nm][solution]["intruders"] = intruder_entry(max_cos[i], opts.intruder_thresholds)
                if opts.floor_dtypes is not None:
                    results[nm][solution]["intruders"].update(
                        intruder_floor_entry(strength[i] if strength is not None else [], floors[i])
                    )
                if weight_s is not None:
                    results[nm][solution][WEIGHT_KEY] = weight_metrics(weight_s[i], shape, updates.s[i], s0[i])
        del updates
    if ref is not None:
        _record_similarity(left, ref, chunk, d, kvec, opts, results)


def _dense(solution: str, name: str, value, device) -> torch.Tensor:
    """One update as a dense fp32 matrix on ``device`` (a lazy one computed now); NaN/inf: ValueError."""
    t = value() if is_lazy(value) else value.dense() if isinstance(value, LowRank) else value
    if not is_finite(t):
        raise ValueError(f"{solution!r} {name}: update contains NaN or inf; its singular values are undefined")
    return as_matrix(t).detach().to(device=device, dtype=torch.float32)


def _decompose_updates(solution: str, chunk: list[str], items: list, d: int, kvec: int, opts: _Options) -> _Updates:
    """Singular values and top-``kvec`` left vectors of one solution's updates in a chunk: a LoRA update given by
    factors (all of one rank) without forming it, any other as a dense fp32 stack (lazy updates computed here,
    one at a time)."""
    device = opts.device
    if all(isinstance(t, LowRank) and _factored(t, d) for t in items) and len({t.r for t in items}) == 1:
        for nm, t in zip(chunk, items, strict=True):
            if not is_finite(t):
                raise ValueError(f"{solution!r} {nm}: update contains NaN or inf; its singular values are undefined")
        B = _stack([t.B.detach().to(device=device, dtype=torch.float64) for t in items])
        A = _stack([t.A.detach().to(device=device, dtype=torch.float64) for t in items])
        scale = torch.tensor([float(t.scale) for t in items], dtype=torch.float64, device=B.device)
        bs = B * scale[:, None, None]
        u, s, _ = lowrank_svd(bs, A)
        s_all = torch.zeros(len(items), d, dtype=torch.float64, device=B.device)
        s_all[:, : min(s.shape[1], d)] = s[:, :d]
        return _Updates(s_all.to(torch.float32).cpu().numpy(), u[..., :kvec].cpu().numpy(), bs=bs, a=A)
    dense = _stack([_dense(solution, nm, t, device) for nm, t in zip(chunk, items, strict=True)])
    dec = decompose(dense, kvec, opts.method)
    return _Updates(dec.s.to(torch.float32).cpu().numpy(), dec.left(kvec).cpu().numpy(), dense=dense)


def _factored(t: LowRank, d: int) -> bool:
    """Whether a factored update is analysed from its factors: LoRA's always (r ≪ d), RandLoRA's when its
    K = bases × r is at most half of min(out, in). peft gives RandLoRA K ≥ min(out, in) bases (full rank by
    design): then the QR factorisations and the K × K SVD cost more than the product B·A (one layer, fp32,
    exactly peft's ``get_delta_weight``) and its Gram matrix, so that layer's ΔW is formed."""
    return t.kind == "lora" or 2 * t.r <= d


def _intruders(w0: torch.Tensor, d0: Decomp, updates: _Updates, opts: _Options,
               with_strength: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
    """(b, top_k) max |cos| of the top left singular vectors u_i of W0 + ΔW against all of W0's, with
    ``opts.weight_spectra`` all singular values of W0 + ΔW (b, d) (fp64 Gram, values only), else None, and with
    ``with_strength`` the update's share of each top vector, ‖ΔWᵀ u_i‖ (b, top_k), else None.

    Frees ``updates.dense`` once W0 + ΔW is formed. A LoRA update stays factored: W0 + B·A from W0 in
    fp64 and, for the Gram method, its Gram matrix from W0's plus low-rank terms (no (out × in)² product).
    """
    gram = None
    if updates.dense is None:
        bs, A = updates.bs, updates.a
        gram = d0.gram if opts.method == "gram" else None  # W0's first: its temporaries gone before W's exist
        w064 = d0.x  # tall on the CPU: W0 in fp64
        w064 = w0.double() if w064 is None else w064
        w = matmul(bs, A)
        w += w064  # = W0 + B·A (addition commutes exactly), without a second (out × in) fp64 temporary
        if gram is not None:
            # ((G0 + C) + Cᵀ) + low-rank term, summed in place: the same values with fewer d × d temporaries
            if w0.shape[-2] >= w0.shape[-1]:
                c = matmul(matmul(w064.mT, bs), A)
                gram = gram + c
                gram += c.mT
                gram += A.mT @ (bs.mT @ bs) @ A
            else:
                c = bs @ matmul(A, w064.mT)
                gram = gram + c
                gram += c.mT
                gram += bs @ (A @ A.mT) @ bs.mT
            del c
        del w064
    else:
        dense, updates.dense = updates.dense, None  # freed once W0 + ΔW is formed
        w = torch.from_numpy(w0.numpy() + dense.numpy()) if w0.device.type == "cpu" else w0 + dense
        del dense
    if opts.weight_spectra:
        # one fp64 Gram matrix and one tridiagonalisation give all the values (the weight spectrum) and the
        # intruder test's top vectors (more accurate than an fp32 Gram matrix of their own, at a third less work)
        d1 = decompose(w, opts.intruder_top_k, opts.method, gram=gram)
        weight_s = d1.s.cpu().numpy()
    else:  # only the top vectors: an fp32 Gram matrix resolves them
        d1 = decompose(w, opts.intruder_top_k, opts.method, gram=gram, top_only=True)
        weight_s = None
    strength = None
    if with_strength:  # ΔW = (W0 + ΔW) − W0 again, rather than holding the dense update alongside
        u = d1.left(min(opts.intruder_top_k, d1.s.shape[1])).to(torch.float64)
        if updates.bs is not None:
            strength = torch.linalg.vector_norm(updates.a.mT @ (updates.bs.mT @ u), dim=-2)
        else:
            delta = w.to(torch.float64) - w0.to(device=w.device, dtype=torch.float64)
            strength = torch.linalg.vector_norm(delta.mT @ u, dim=-2)
            del delta
        strength = strength.cpu().numpy()
    return intruder_max_cos(d0, d1, opts.intruder_top_k), weight_s, strength


def _record_similarity(left: dict[str, tuple[np.ndarray, list[int]]], ref: str, chunk: list[str], d: int,
                       kvec: int, opts: _Options, results: dict[str, dict]) -> None:  # fmt: skip
    """``similarity_to_<ref>`` of every other solution, from the left vectors above each update's rank."""
    ks = sorted({k for k in (*opts.angle_ks, *([opts.rank] if opts.rank else [])) if 1 <= k <= d})
    kmax = min(opts.overlap_max_k, d)
    u_ref, r_ref = left[ref]
    for solution, (u_a, r_a) in left.items():
        if solution == ref:
            continue
        for i, nm in enumerate(chunk):
            qa, qb = u_a[i][:, : min(r_a[i], kvec)], u_ref[i][:, : min(r_ref[i], kvec)]
            results[nm][solution][f"similarity_to_{ref}"] = similarity_entry(qa, qb, ks, kmax)


def _settings(opts: _Options, ref: str | None, intruders: bool) -> dict:
    return {
        "method": opts.method,
        "lora_rank": opts.rank,
        "reference": ref,
        "angle_ks": sorted({*opts.angle_ks, *([opts.rank] if opts.rank else [])}),
        "overlap_max_k": opts.overlap_max_k,
        "intruders": {"top_k": opts.intruder_top_k, "thresholds": list(opts.intruder_thresholds), "vectors": "left"}
        if intruders
        else None,
        "weight_spectra": opts.weight_spectra,
        **({"rounding_floor": {k: None if v is None else str(v).removeprefix("torch.")
                               for k, v in opts.floor_dtypes.items()}} if opts.floor_dtypes is not None else {}),
    }  # fmt: skip


# ------------------------------------------------------------------------------------- solutions ----


def analyse_solutions(solutions: Mapping, device: str | torch.device | None = None, progress: bool = True,
                      method: str = "gram", weight_spectra: bool = True) -> dict:  # fmt: skip
    """What ``python -m landscape.spectrum`` computes and writes to spectrum.json, for loaded solutions.

    ``solutions``: {name: :class:`adapters.solution.Solution`} on one base model (e.g. from
    :func:`adapters.solution.load_solutions`). Analyses the adapted layers every solution changes, the
    classification head excluded (:func:`landscape.spectrum.updates.adapted_layers`: 36 layers for
    MiniLM); a LoRA solution's layers from its factors, its rank r giving ``energy_beyond_rank`` and
    k = r; the ``ft`` solution (the one of method ft, whatever its name) as the similarity reference;
    intruder dimensions against the base model's weights, and (``weight_spectra``) the weight spectra of
    W0 and of each W0 + ΔW. Returns :func:`analyse`'s result plus ``"solutions"``: {name: {"method",
    "rank", "path"}}.

    Streams layer by layer (module docstring): each solution's ΔW of a layer is computed from its files
    (:meth:`~adapters.solution.Solution.module_deltas`) when the analysis reaches that layer and released
    before the next, so the memory beyond the base model is a few times the largest layer, whatever the
    model's size. The values are those of the solutions' dense ``delta()``: a layer where one of this tool's
    solutions has an all-zero ΔW is left out, as its ``delta()`` leaves such updates out (a solution trained
    elsewhere keeps them: :func:`~landscape.spectrum.updates.drops_zero_updates`); NaN/inf raises
    :class:`~adapters.errors.UserError` when the layer is reached (loading a solution checks it first).

    Takes about a minute on a CPU for MiniLM (three solutions); ``device="cuda"`` is much faster.
    """
    if not solutions:
        raise ValueError("no solutions to analyse")
    deltas = {name: lazy_deltas(sol, f"solution {name} ({sol.path})") for name, sol in solutions.items()}
    lora = next((s for s in solutions.values() if s.method == "lora"), None)
    rank = int(lora.info["rank"]) if lora is not None and lora.info.get("rank") else None
    ref = next((n for n, s in solutions.items() if s.method == "ft"), "ft")
    base_model = next(iter(solutions.values())).base
    base = BaseWeights(base_model)  # a packed 4-bit W0 dequantised when its layer is reached, then released
    if device is None:  # where the lazy updates are computed: the base model's device
        device = next(base_model.parameters()).device
    floors = {name: floor_dtype(sol) for name, sol in solutions.items()}  # what rounded each one's weights
    result = analyse(deltas, layers=adapted_layers(deltas), progress=progress, device=device, base=base,
                     rank=rank, reference=ref, method=method, weight_spectra=weight_spectra,
                     floor_dtypes=floors)  # fmt: skip
    # this tool's delta() leaves all-zero updates out, so a layer such a solution does not change is not analysed
    droppers = [n for n, sol in solutions.items() if drops_zero_updates(sol)]
    result["layers"] = [layer for layer in result["layers"] if all(layer[n]["rank"] > 0 for n in droppers)]
    result["solutions"] = {
        name: {"method": sol.method, "rank": sol.info.get("rank"), "path": str(sol.path)}
        for name, sol in solutions.items()
    }
    return result


class BaseWeights(Mapping):
    """{parameter name: W0} of a model as the analysis reads it: a bitsandbytes 4-bit weight dequantised to fp32
    on each access (the weight the layer computes with, one layer at a time, never kept), any other parameter
    as it is. ``shape(name)`` gives the logical (out, in) shape without dequantising."""

    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.named_parameters())

    def __getitem__(self, name: str) -> torch.Tensor:
        from adapters.quant import dequantized_weight, is_packed

        p = self._params[name]
        return dequantized_weight(p) if is_packed(p) else p

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def shape(self, name: str) -> torch.Size:
        from adapters.quant import logical_shape

        return logical_shape(self._params[name])


def has_similarity(spectrum: Mapping) -> bool:
    """Whether a spectrum holds similarity to a reference (an FT solution was analysed with others)."""
    key = f"similarity_to_{spectrum['settings'].get('reference')}"
    return any(isinstance(met, dict) and key in met for layer in spectrum["layers"] for met in layer.values())


def write_spectrum(solutions: Mapping, out: str | Path, device: str | torch.device | None = None,
                   progress: bool = True, method: str = "gram", weight_spectra: bool = True) -> list[Path]:  # fmt: skip
    """:func:`analyse_solutions`, written under ``out``: spectrum.json, spectrum.csv, spectrum.png, rank.png,
    rank.pdf, and similarity.png/pdf when there is an FT reference. Returns the paths written."""
    from landscape import render
    from landscape.engine import store

    out = Path(out)
    result = analyse_solutions(solutions, device=device, progress=progress, method=method,
                               weight_spectra=weight_spectra)  # fmt: skip
    written = [out / name for name in OUTPUTS[:5]]
    store.write_json(written[0], result)
    write_csv(result, written[1])
    render.spectrum_figure(result, written[2])
    render.rank_figure(result, written[3], written[4])
    if has_similarity(result):
        written += [out / "similarity.png", out / "similarity.pdf"]
        render.similarity_figure(result, written[5], written[6])
    return written
