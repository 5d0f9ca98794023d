"""The analysis: spectrum metrics, similarity to full fine-tuning and intruder dimensions of every layer's
update, for dictionaries of updates (:func:`analyse`) or for solutions (:func:`analyse_solutions`,
:func:`write_spectrum`).

Layers are processed in chunks of equal shape: off the CPU stacked (at most ``chunk_bytes`` of fp64
matrices resident at a time) for torch's batched calls; on the CPU (method "gram": LAPACK, matrix by
matrix) one layer at a time, as stacking would only copy. Values are read one chunk at a time, so a
lazy mapping of updates keeps memory bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from landscape.spectrum.decomposition import (
    METHODS,
    Decomp,
    LowRank,
    as_matrix,
    decompose,
    is_finite,
    lowrank_svd,
    matmul,
)
from landscape.spectrum.metrics import energy_beyond_rank, spectrum_metrics, write_csv
from landscape.spectrum.similarity import (
    ANGLE_KS,
    INTRUDER_THRESHOLDS,
    INTRUDER_TOP_K,
    OVERLAP_MAX_K,
    intruder_entry,
    intruder_max_cos,
    similarity_entry,
)
from landscape.spectrum.updates import adapted_layers, default_layers, solution_deltas

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
    deltas: Mapping[str, Mapping[str, torch.Tensor | LowRank]],
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
) -> dict:
    """Spectrum metrics of every solution's update for each layer.

    ``deltas`` maps a solution name ("ft", "lora", "randlora", ...) to {parameter name: ΔW}, ΔW a
    dense tensor (any dtype, >2-D viewed as (shape[0], -1)) or a :class:`LowRank` (LoRA factors:
    exact fast path). Values are read one chunk of layers at a time, so a lazy mapping keeps
    memory bounded. ``layers`` defaults to the 2-D parameters present in every solution, in
    natural order.

    Optional: ``base`` {parameter name: W0} adds intruder dimensions; ``rank`` (default: the r of
    the first :class:`LowRank` found) adds ``energy_beyond_rank`` and k = r to the angle set; the
    ``reference`` solution (default "ft"), when present, adds ``similarity_to_ft`` to the others.

    Returns ``{"layers": [{"name", "shape": [out, in], <solution>: metrics, ...}, ...],
    "settings": {...}}`` with solutions in the order of ``deltas`` (definitions: the docstrings of
    :mod:`landscape.spectrum.metrics` and :mod:`landscape.spectrum.similarity`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    names = default_layers(deltas) if layers is None else list(layers)
    if rank is None:
        rank = next((v.r for params in deltas.values() for v in params.values() if isinstance(v, LowRank)), None)
    ref = reference if reference in deltas else None
    shapes = _layer_shapes(deltas, names, base)
    opts = _Options(method, device, rank, tuple(angle_ks), overlap_max_k, intruder_top_k, tuple(intruder_thresholds))
    results: dict[str, dict] = {n: {"name": n, "shape": list(shapes[n])} for n in names}
    on_cpu = method == "gram" and _analysis_device(deltas, names, device).type == "cpu"
    with tqdm(total=len(names), desc="spectrum", unit="layer", disable=not progress) as bar:
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
            t = params[name]
            if t.ndim < 2:
                raise ValueError(f"need a 2-D (or higher) update, got shape {tuple(t.shape)}")
            shape = (int(t.shape[0]), int(math.prod(t.shape[1:])))
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}: shape {list(shape)} in {solution!r} != {list(shapes[name])}")
        if base is not None and (name not in base or tuple(as_matrix(base[name]).shape) != shapes[name]):
            raise KeyError(f"base weights lack {name!r} {list(shapes[name])}")
    return shapes


def _analysis_device(deltas: Mapping, names: list[str], device: str | torch.device | None) -> torch.device:
    """Where the analysis runs: ``device``, else where the updates are."""
    if device is not None:
        return torch.device(device)
    if not names:
        return torch.device("cpu")
    first = next(iter(deltas.values()))[names[0]]
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
    """Metrics, intruder dimensions and similarity of one chunk of layers of equal ``shape``, into ``results``."""
    d = min(shape)
    kvec = min(d, max([opts.overlap_max_k, *opts.angle_ks, opts.rank or 0]))  # vectors kept for the similarity
    w0 = d0 = None
    if base is not None:
        w0 = _stack([as_matrix(base[nm]).detach().to(device=opts.device, dtype=torch.float32) for nm in chunk])
        d0 = decompose(w0, None, opts.method)
    left: dict[str, tuple[np.ndarray, list[int]]] = {}
    for solution, params in deltas.items():
        updates = _decompose_updates(solution, chunk, [params[nm] for nm in chunk], d, kvec, opts)
        ranks = []
        for i, nm in enumerate(chunk):
            metrics = spectrum_metrics(updates.s[i], shape)
            if opts.rank:
                metrics["energy_beyond_rank"] = energy_beyond_rank(updates.s[i], opts.rank)
            ranks.append(metrics["rank"])
            results[nm][solution] = metrics
        left[solution] = (updates.u, ranks)
        if d0 is not None:
            max_cos = _intruders(w0, d0, updates, opts)
            for i, nm in enumerate(chunk):
                results[nm][solution]["intruders"] = intruder_entry(max_cos[i], opts.intruder_thresholds)
        del updates
    if ref is not None:
        _record_similarity(left, ref, chunk, d, kvec, opts, results)


def _decompose_updates(solution: str, chunk: list[str], items: list, d: int, kvec: int, opts: _Options) -> _Updates:
    """Singular values and top-``kvec`` left vectors of one solution's updates in a chunk: a LoRA update given by
    factors (all of one rank) without forming it, any other as a dense fp32 stack."""
    for nm, t in zip(chunk, items, strict=True):
        if not is_finite(t):
            raise ValueError(f"{solution!r} {nm}: update contains NaN or inf; its singular values are undefined")
    device = opts.device
    if all(isinstance(t, LowRank) for t in items) and len({t.r for t in items}) == 1:
        B = _stack([t.B.detach().to(device=device, dtype=torch.float64) for t in items])
        A = _stack([t.A.detach().to(device=device, dtype=torch.float64) for t in items])
        scale = torch.tensor([float(t.scale) for t in items], dtype=torch.float64, device=B.device)
        bs = B * scale[:, None, None]
        u, s, _ = lowrank_svd(bs, A)
        s_all = torch.zeros(len(items), d, dtype=torch.float64, device=B.device)
        s_all[:, : min(s.shape[1], d)] = s[:, :d]
        return _Updates(s_all.to(torch.float32).cpu().numpy(), u[..., :kvec].cpu().numpy(), bs=bs, a=A)
    dense = _stack(
        [(t.dense() if isinstance(t, LowRank) else as_matrix(t).detach()).to(device=device, dtype=torch.float32)
         for t in items]
    )  # fmt: skip
    dec = decompose(dense, kvec, opts.method)
    return _Updates(dec.s.to(torch.float32).cpu().numpy(), dec.left(kvec).cpu().numpy(), dense=dense)


def _intruders(w0: torch.Tensor, d0: Decomp, updates: _Updates, opts: _Options) -> np.ndarray:
    """(b, top_k) max |cos| of the top left singular vectors of W0 + ΔW against all of W0's.

    Frees ``updates.dense`` once W0 + ΔW is formed. A LoRA update stays factored: W0 + B·A from W0 in
    fp64 and, for the Gram method, its Gram matrix from W0's plus low-rank terms (no (out × in)² product).
    """
    gram = None
    if updates.dense is None:
        bs, A = updates.bs, updates.a
        w064 = w0.double() if d0.x is None else d0.x  # tall on the CPU: W0 in fp64 already there
        w = w064 + matmul(bs, A)
        if opts.method == "gram":
            if w0.shape[-2] >= w0.shape[-1]:
                c = matmul(matmul(w064.mT, bs), A)
                gram = d0.gram + c + c.mT + A.mT @ (bs.mT @ bs) @ A
            else:
                c = bs @ matmul(A, w064.mT)
                gram = d0.gram + c + c.mT + bs @ (A @ A.mT) @ bs.mT
    else:
        dense, updates.dense = updates.dense, None  # freed once W0 + ΔW is formed
        w = torch.from_numpy(w0.numpy() + dense.numpy()) if w0.device.type == "cpu" else w0 + dense
        del dense
    d1 = decompose(w, opts.intruder_top_k, opts.method, gram=gram, top_only=True)
    return intruder_max_cos(d0, d1, opts.intruder_top_k)


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
    }


# ------------------------------------------------------------------------------------- solutions ----


def analyse_solutions(solutions: Mapping, device: str | torch.device | None = None, progress: bool = True,
                      method: str = "gram") -> dict:  # fmt: skip
    """What ``python -m landscape.spectrum`` computes and writes to spectrum.json, for loaded solutions.

    ``solutions``: {name: :class:`adapters.solution.Solution`} on one base model (e.g. from
    :func:`adapters.solution.load_solutions`). Analyses the adapted layers every solution changes, the
    classification head excluded (:func:`landscape.spectrum.updates.adapted_layers`: 36 layers for
    MiniLM); a LoRA solution's layers from its factors, its rank r giving ``energy_beyond_rank`` and
    k = r; the ``ft`` solution (the one of method ft, whatever its name) as the similarity reference;
    intruder dimensions against the base model's weights. Returns :func:`analyse`'s result plus
    ``"solutions"``: {name: {"method", "rank", "path"}}.

    Takes about a minute on a CPU for MiniLM (three solutions); ``device="cuda"`` is much faster.
    """
    if not solutions:
        raise ValueError("no solutions to analyse")
    deltas = {name: solution_deltas(sol) for name, sol in solutions.items()}
    lora = next((s for s in solutions.values() if s.method == "lora"), None)
    rank = int(lora.info["rank"]) if lora is not None and lora.info.get("rank") else None
    ref = next((n for n, s in solutions.items() if s.method == "ft"), "ft")
    base = dict(next(iter(solutions.values())).base.named_parameters())
    result = analyse(deltas, layers=adapted_layers(deltas), progress=progress, device=device, base=base,
                     rank=rank, reference=ref, method=method)  # fmt: skip
    result["solutions"] = {
        name: {"method": sol.method, "rank": sol.info.get("rank"), "path": str(sol.path)}
        for name, sol in solutions.items()
    }
    return result


def has_similarity(spectrum: Mapping) -> bool:
    """Whether a spectrum holds similarity to a reference (an FT solution was analysed with others)."""
    key = f"similarity_to_{spectrum['settings'].get('reference')}"
    return any(isinstance(met, dict) and key in met for layer in spectrum["layers"] for met in layer.values())


def write_spectrum(solutions: Mapping, out: str | Path, device: str | torch.device | None = None,
                   progress: bool = True, method: str = "gram") -> list[Path]:  # fmt: skip
    """:func:`analyse_solutions`, written under ``out``: spectrum.json, spectrum.csv, spectrum.png, rank.png,
    rank.pdf, and similarity.png/pdf when there is an FT reference. Returns the paths written."""
    from landscape import render, store

    out = Path(out)
    result = analyse_solutions(solutions, device=device, progress=progress, method=method)
    written = [out / name for name in OUTPUTS[:5]]
    store.write_json(written[0], result)
    write_csv(result, written[1])
    render.spectrum_figure(result, written[2])
    render.rank_figure(result, written[3], written[4])
    if has_similarity(result):
        written += [out / "similarity.png", out / "similarity.pdf"]
        render.similarity_figure(result, written[5], written[6])
    return written
