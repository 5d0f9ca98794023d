"""Curvature per block — ``python -m landscape.curvature --blocks``: the top eigenvalue, the Hutchinson trace
and the SLQ spectral density of each block's diagonal Hessian H_bb, and the blocks' heterogeneity as in
Zhang et al. (NeurIPS 2024, "Why Transformers Need Adam: A Hessian Perspective").

**Blocks.** A block is one transformer layer (every chosen parameter of ``layer N``; the rest are
``embeddings`` or ``head``), or with ``block_by="module"`` one module kind inside a layer (attention, MLP,
norm): :func:`landscape.layerwise.blocks_of`'s naming (BERT, GPT-2, LLaMA and ViT names).

**Per block** b with parameters θ_b: H_bb = ∂²L/∂θ_b², the diagonal block of the whole Hessian H. Its top
eigenvalue by Lanczos (:func:`~landscape.curvature.solvers.top_eigenvalues` on a
:class:`~landscape.curvature.hessian.HessianOperator` over the block's names only: its products are H_bb·v);
by Cauchy's interlacing theorem it never exceeds H's top eigenvalue. Its trace from the whole Hessian's
Hutchinson probes: tr H_bb ≈ mean over Rademacher z of z_bᵀ(Hz)_b (unbiased, E[zzᵀ] = I), so the block
traces cost no product beyond the whole trace's and, probe by probe, sum to the whole estimate zᵀHz (the
same probes as :func:`~landscape.curvature.solvers.hutchinson_trace`, so the whole trace is curvature.json's).
The price: its variance also holds the block's coupling to the others (‖H_bc‖_F² per probe for each other block c),
so its SE can exceed that of probes of H_bb alone; the SE is reported beside each trace. Only the top
eigenvalue is computed per block (``--top-k`` is the whole-Hessian command's).

**Heterogeneity.** Each block's SLQ density (its own probes), broadened by Gaussians of one σ on one grid
common to the blocks of an entry (σ = ``broadening`` × the range of all their nodes), normalised to a
distribution over the grid; ``js_distance[i][j]`` is the Jensen–Shannon distance (base 2, in [0, 1]) between
blocks i and j (scipy's ``jensenshannon``, computed so that an underflowing tail stays finite).
``blocks.png`` / ``.pdf``: per solution and coordinates, that blocks × blocks heatmap beside the blocks' top
eigenvalues.

**Output** (atomic; ``blocks.npz`` holds the arrays, :func:`arrays`). ``blocks.json``, an entry saved as
soon as it is done under a key of what determines it (a rerun reuses the entries whose key matches):
``solutions`` → name → ``coordinates`` → {``trace``, ``trace_se``, ``top_eigenvalue``, ``blocks``: [{``name``,
``trace``, ``trace_se``, ``top_eigenvalue``, ...}], ``js_distance``, ...}, with the settings, the seed and
``block_by``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from adapters.errors import UserError
from adapters.io import key_digest, write_json, write_npz
from adapters.quant import packed_names
from landscape.curvature.hessian import HessianOperator
from landscape.curvature.settings import CurvatureSettings, skip_reason
from landscape.curvature.solvers import _rademacher, _stream_seed, slq_density, top_eigenvalues
from landscape.engine.grid import EvalSet

BLOCK_BY = ("layer", "module")
JS_DEFINITION = ("Jensen-Shannon distance (base 2) between two blocks' SLQ densities, Gaussian-broadened with one "
                 "sigma on one grid common to the entry's blocks and normalised over the grid")  # fmt: skip


def check_block_by(block_by: str) -> None:
    if block_by not in BLOCK_BY:
        raise UserError(f"--block-by {block_by!r}: choose one of {', '.join(BLOCK_BY)}")


def group_blocks(names: Sequence[str], block_by: str = "layer") -> dict[str, list[str]]:
    """{block: its parameter names (in the given order)}, blocks in model order."""
    from landscape.layerwise import blocks_of

    check_block_by(block_by)
    return blocks_of(names, block_by)


def blocked_hutchinson(op: HessianOperator, blocks: Mapping[str, Sequence[str]], probes: int, seed: int = 0) -> dict:
    """The whole trace and every block's, from the same ``probes`` Rademacher vectors (module docstring):
    per probe, zᵀHz and each block's z_bᵀ(Hz)_b (they sum to zᵀHz); means and standard errors of the means."""
    start, before = time.perf_counter(), op.hvps
    offsets = dict(zip(op.names, np.cumsum([0, *op.sizes[:-1]]).tolist(), strict=True))
    sizes = dict(zip(op.names, op.sizes, strict=True))
    generator = torch.Generator().manual_seed(_stream_seed(seed, 1))  # hutchinson_trace's stream: the same probes
    whole, per = [], {b: [] for b in blocks}
    for _ in range(probes):
        z = _rademacher(op.dim, generator, op.dtype)
        zhz = (z.double() * op.flat_hvp(z).double().cpu()).numpy()
        whole.append(float(zhz.sum()))
        for b, names in blocks.items():
            per[b].append(float(sum(zhz[offsets[n] : offsets[n] + sizes[n]].sum() for n in names)))

    def stats(samples: list[float]) -> dict:
        x = np.asarray(samples)
        se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
        return {"trace": float(x.mean()), "trace_se": se, "samples": samples}

    return {"whole": stats(whole), "blocks": {b: stats(s) for b, s in per.items()}, "probes": probes,
            "hvps": op.hvps - before, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def common_densities(
    densities: Sequence[Mapping], points: int, broadening: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Every block's SLQ nodes and weights broadened on one grid with one σ: (grid, (blocks, points), σ)."""
    flat = np.concatenate([np.asarray(t, dtype=np.float64).ravel() for d in densities for t in d["nodes"]])
    lo, hi = float(flat.min()), float(flat.max())
    sigma = broadening * (hi - lo) if hi > lo else broadening * max(abs(hi), 1.0)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    rows = []
    for d in densities:
        values = np.zeros_like(grid)
        for t, w in zip(d["nodes"], d["weights"], strict=True):
            x = (grid[:, None] - np.asarray(t)[None, :]) / sigma
            values += (np.exp(-0.5 * x * x) * np.asarray(w)[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
        rows.append(values / len(d["nodes"]))
    return grid, np.stack(rows), float(sigma)


def js_distances(values: np.ndarray) -> np.ndarray:
    """Pairwise Jensen–Shannon distances (base 2) between the rows of ``values`` (densities on one grid).
    Computed as Σ p·log2(2p / (p + q)) rather than through the midpoint m = (p + q) / 2 (scipy's way): half of
    a subnormal density value rounds to m = 0 under p > 0, an infinite term, where a tail underflows."""
    p = values / values.sum(1, keepdims=True)
    n = len(p)
    out = np.zeros((n, n))

    def half(a: np.ndarray, b: np.ndarray) -> float:  # KL(a ‖ (a + b) / 2) in bits
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(2 * a[nz] / (a[nz] + b[nz]))))

    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = math.sqrt(max(0.5 * half(p[i], p[j]) + 0.5 * half(p[j], p[i]), 0.0))
    return out


def block_curvature(
    model: torch.nn.Module, names: Sequence[str], eval_set: EvalSet, objective, settings: CurvatureSettings,
    block_by: str = "layer", micro_batch: int | None = None, distributed: bool = False,
) -> dict:  # fmt: skip
    """One (solution, coordinates) entry of blocks.json: the whole Hessian's top eigenvalue and trace, and per
    block its top eigenvalue, trace (from the whole probes) and SLQ density; the blocks' JS distances.
    ``distributed``: under torchrun, every rank calls it and the products are shared (:class:`HessianOperator`)."""
    start = time.perf_counter()
    groups = group_blocks(names, block_by)
    whole = HessianOperator(model, names, eval_set, objective, settings.dtype, micro_batch=micro_batch,
                            distributed=distributed)  # fmt: skip
    eigen = top_eigenvalues(whole, 1, settings.tol, settings.seed, settings.lanczos_vectors)
    traces = blocked_hutchinson(whole, groups, settings.trace_probes, settings.seed) if settings.trace_probes else None
    hvps, blocks, densities = whole.hvps, [], []
    for b, chosen in groups.items():  # the same model: each operator differentiates its block's parameters only
        op = HessianOperator(model, chosen, eval_set, objective, settings.dtype, mode=whole.mode,
                             micro_batch=micro_batch, distributed=distributed)  # fmt: skip
        e = top_eigenvalues(op, 1, settings.tol, settings.seed, settings.lanczos_vectors)
        t = traces["blocks"][b] if traces else {"trace": None, "trace_se": None}
        entry = {"name": b, "parameters": len(chosen), "dim": op.dim, "trace": t["trace"], "trace_se": t["trace_se"],
                 "top_eigenvalue": e["eigenvalues"][0], "eigen_converged": e["converged"],
                 "eigen_method": e["method"]}  # fmt: skip
        if settings.slq_probes:
            d = slq_density(op, settings.slq_steps, settings.slq_probes, settings.seed, settings.density_points,
                            settings.broadening)  # fmt: skip
            densities.append(d)
            entry["density"] = {k: d[k] for k in ("nodes", "weights", "mean", "trace_estimate")}
        entry["hvps"] = op.hvps
        hvps += op.hvps
        blocks.append(entry)
    result = {"dim": whole.dim, "loss": whole.loss, "top_eigenvalue": eigen["eigenvalues"][0],
              "eigen_converged": eigen["converged"], "trace": traces["whole"]["trace"] if traces else None,
              "trace_se": traces["whole"]["trace_se"] if traces else None,
              "trace_probes": settings.trace_probes, "blocks": blocks, "hvp_mode": whole.mode}  # fmt: skip
    if densities:
        grid, values, sigma = common_densities(densities, settings.density_points, settings.broadening)
        result["density"] = {"grid": grid.tolist(), "values": values.tolist(), "sigma": sigma}
        js = js_distances(values)
        result["js_distance"] = js.tolist()
        for i, entry in enumerate(blocks):  # a block's heterogeneity: its mean distance to the other blocks
            entry["js_mean"] = float(js[i].sum() / max(len(blocks) - 1, 1))
        result["js_definition"] = JS_DEFINITION
    result.update(hvps=hvps, seconds=round(time.perf_counter() - start, 3))
    return result


def blocks_stage(
    source, solutions: Mapping, eval_set: EvalSet, out: str | Path, settings: CurvatureSettings,
    block_by: str = "layer", device: torch.device | str = "cpu", plane_solutions: Mapping | None = None,
    info: Mapping | None = None, distributed: bool = False,
) -> dict:  # fmt: skip
    """Block curvature of every solution in every coordinates of ``settings``: blocks.json (after each entry)
    and blocks.png / .pdf under ``out``; returns what blocks.json holds. ``distributed``: as
    :func:`~landscape.curvature.stage.curvature_stage`'s (every torchrun rank calls it, rank 0 writes)."""
    from adapters.solution import delta_fingerprint, fingerprint
    from landscape.curvature.hessian import distributed_ranks
    from landscape.curvature.stage import _agreed, _previous, adapter_coordinates, weight_coordinates, weight_names
    from landscape.engine.grid import eval_fingerprint

    settings.check()
    check_block_by(block_by)
    if not solutions:
        raise UserError("--blocks: the run has no solutions to measure: train them with landscape.connectivity")
    task = getattr(source, "loaded", source).task
    out = Path(out)
    names = weight_names(task.base, task.entry.targets, settings.weight_set, plane_solutions or solutions,
                         settings.include_head)  # fmt: skip
    common = {"settings": settings.key(), "base": fingerprint(task.base), "eval": eval_fingerprint(eval_set),
              "objective": task.objective.name, "weights": names, "block_by": block_by}  # fmt: skip
    rank, world = distributed_ranks() if distributed else (0, 1)
    previous = _agreed(_previous(out / "blocks.json"), world)
    result = {**(dict(info) if info else {}), "settings": settings.to_dict(), "seed": settings.seed,
              "block_by": block_by, "eval_samples": eval_set.n, "device": str(device), "world_size": world,
              "complete": False, "solutions": {}}  # fmt: skip
    write = (lambda: write_json(out / "blocks.json", result)) if rank == 0 else (lambda: None)  # noqa: E731
    packed_base = bool(packed_names(task.base))
    for name, solution in solutions.items():
        result["solutions"][name] = per = {}
        for coordinates in settings.coordinates:
            skipped = skip_reason(solution.method, coordinates, packed_base)
            if skipped:
                per[coordinates] = {"skipped": skipped}
                continue
            key = key_digest({**common, "coordinates": coordinates, "solution": delta_fingerprint(solution)})
            old = previous.get(name, {}).get(coordinates, {})
            if old.get("key") == key:  # a rerun (after a kill) reuses what it finished
                per[coordinates] = {**old, "reused": True}
                continue
            flags = [(p, p.requires_grad) for p in solution.base.parameters()]
            try:
                if coordinates == "weights":
                    model, chosen = weight_coordinates(solution, names)
                else:
                    model, chosen = adapter_coordinates(solution, settings.include_head, settings.dtype, device)
                entry = block_curvature(model.to(device), chosen, eval_set, task.objective, settings, block_by,
                                        settings.hvp_batch, distributed)  # fmt: skip
                per[coordinates] = {"key": key, **entry}
            finally:  # the operators froze parameters an adapter's skeleton shares with the base: put back
                for p, flag in flags:
                    p.requires_grad_(flag)
            write()
    result["complete"] = True
    if rank == 0:
        write()
        write_npz(out / "blocks.npz", **arrays(result))
        write_blocks_figure(result, out, (info or {}).get("title"))
    return result


def arrays(result: Mapping) -> dict[str, np.ndarray]:
    """blocks.npz: per ``SOLUTION/COORDINATES/`` the block names, their top eigenvalues, traces and SEs, the
    JS distances and the common-grid densities (rows = blocks)."""
    out = {}
    for name, per in result["solutions"].items():
        for coordinates, e in per.items():
            if "blocks" not in e:
                continue
            at = f"{name}/{coordinates}/"
            out[at + "names"] = np.asarray([b["name"] for b in e["blocks"]])
            for k in ("top_eigenvalue", "trace", "trace_se"):
                out[at + k] = np.asarray([np.nan if b[k] is None else b[k] for b in e["blocks"]], dtype=np.float64)
            if "js_distance" in e:
                out[at + "js_distance"] = np.asarray(e["js_distance"])
                out[at + "density_grid"] = np.asarray(e["density"]["grid"])
                out[at + "density_values"] = np.asarray(e["density"]["values"])
    return out


def blocks_figure(result: Mapping, title: str | None = None):
    """First row: block × (solution, coordinates) heatmaps of each block's mean JS distance to the other blocks
    beside its top eigenvalue; then per entry the blocks' JS distances (left) beside their top eigenvalues
    (right, with the whole Hessian's as a line)."""
    from matplotlib.figure import Figure

    from landscape.render import LABELS

    rows = [(n, c, e) for n, per in result["solutions"].items() for c, e in per.items() if "blocks" in e]
    fig = Figure(figsize=(11, 3.8 * (len(rows) + 1)), layout="constrained")
    axes = fig.subplots(len(rows) + 1, 2, squeeze=False)
    if rows:
        _summary_row(fig, axes[0], rows, LABELS)
    for (name, coordinates, entry), (ax_js, ax_eig) in zip(rows, axes[1:], strict=False):
        labels = [b["name"] for b in entry["blocks"]]
        where = f"{LABELS.get(name, name)}, {coordinates}"
        if "js_distance" in entry:
            im = ax_js.imshow(np.asarray(entry["js_distance"]), vmin=0, vmax=1, cmap="viridis")
            fig.colorbar(im, ax=ax_js, label="JS distance")
            ax_js.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax_js.set_yticks(range(len(labels)), labels, fontsize=7)
        ax_js.set_title(f"spectral heterogeneity ({where})")
        top = [b["top_eigenvalue"] for b in entry["blocks"]]
        ax_eig.barh(range(len(labels)), top, color="#4477aa")
        ax_eig.axvline(entry["top_eigenvalue"], color="k", ls="--", lw=1, label="whole Hessian")
        if min(top) > 0 and entry["top_eigenvalue"] / min(top) >= 10:  # a log axis where they span decades
            ax_eig.set_xscale("log")
        ax_eig.set_yticks(range(len(labels)), labels, fontsize=7)
        ax_eig.invert_yaxis()
        ax_eig.set(xlabel="top eigenvalue of the block's Hessian", title=f"top eigenvalue per block ({where})")
        ax_eig.legend(fontsize=8)
        ax_eig.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    return fig


def _summary_row(fig, axes, rows: list, labels: Mapping) -> None:
    """Blocks (rows) × entries (columns): mean JS distance to the other blocks, and log10 top eigenvalue."""
    blocks = list(dict.fromkeys(b["name"] for _, _, e in rows for b in e["blocks"]))
    columns = [f"{labels.get(n, n)}\n{c}" for n, c, _ in rows]
    for ax, key, what in ((axes[0], "js_mean", "mean JS distance to the other blocks"),
                          (axes[1], "top_eigenvalue", "log10 top eigenvalue of the block")):  # fmt: skip
        grid = np.full((len(blocks), len(rows)), np.nan)
        for j, (_, _, e) in enumerate(rows):
            for b in e["blocks"]:
                value = b.get(key)
                if value is not None and key == "top_eigenvalue":
                    value = math.log10(value) if value > 0 else None  # a negative top: left blank
                grid[blocks.index(b["name"]), j] = np.nan if value is None else value
        im = ax.imshow(grid, aspect="auto", cmap="viridis", **({"vmin": 0, "vmax": 1} if key == "js_mean" else {}))
        fig.colorbar(im, ax=ax, label=what)
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_title(f"per block and solution: {what}", fontsize=9)


def write_blocks_figure(result: Mapping, out: str | Path, title: str | None = None) -> list[Path]:
    from adapters.io import write_with

    fig = blocks_figure(result, title)
    out = Path(out)
    write_with(out / "blocks.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    write_with(out / "blocks.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / "blocks.png", out / "blocks.pdf"]
