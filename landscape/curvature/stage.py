"""The curvature stage: the coordinates at a solution (weights or adapter) and :func:`curvature_stage`, which
measures every solution in every coordinates and writes curvature.json entry by entry.

**Coordinates.** ``weights``: the dense weights at the solution, θ = W0 + ΔW (:meth:`Solution.model`).
By default (``weight_set="adapted"``) the adapted weights (:func:`adapters.methods.adapted_weights`,
the same for every solution) plus the classification head: every solution is measured in the same
space, the one the adapters move in. ``weight_set="plane"``: every parameter any of the run's
solutions changes — what :func:`landscape.engine.plane.solution_weights` puts on the plane; with a full
fine-tuning solution that is every parameter of the model. ``adapter``: the coordinates the
optimiser of a LoRA / RandLoRA solution sees — LoRA's A and B factors, RandLoRA's λ and γ (and the
head), as parameters of the solution's peft model loaded from its folder; full fine-tuning has no
adapter (its optimiser's coordinates are the weights), so its ``adapter`` entry is skipped.


**Outputs** (under ``--out``, default the run folder, written atomically): ``curvature.json`` — the
settings and seed, and per solution and coordinates the eigenvalues, trace ± standard error,
density grid and values (and the quadrature nodes and weights), the loss and gradient norm at the
point, the number of HVPs and the seconds of each part (and the entry's CPU seconds), the Lanczos
residual / |θ| after each step (``eigen.residuals``); ``curvature.png`` / ``.pdf`` — top
eigenvalues and densities of the solutions side by side. ``world_size``: the torchrun processes whose
products were averaged (1: one process). Each (solution, coordinates) entry is
saved as soon as it is done, under a key of everything that determines it (settings, the
solution's ΔW, the evaluation samples, the objective); a rerun after a kill reuses the entries
whose key matches and computes the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from adapters.errors import UserError
from adapters.io import key_digest, write_json
from adapters.progress import progress_bar
from adapters.quant import packed_names
from adapters.solution import Solution, delta_fingerprint
from landscape.curvature.figure import write_figure
from landscape.curvature.hessian import HessianOperator, distributed_ranks
from landscape.curvature.settings import ADAPTER_METHODS, DTYPES, NO_ADAPTER, CurvatureSettings, skip_reason
from landscape.curvature.solvers import curvature_at
from landscape.engine.grid import EvalSet, eval_fingerprint


def weight_names(
    base: nn.Module, targets: Sequence[str], weight_set: str, plane_solutions: Mapping[str, Solution], head: bool
) -> list[str]:
    """Names of the weight coordinates (module docstring), in the model's parameter order."""
    from adapters.methods import adapted_weights
    from adapters.models.base import HEAD

    if weight_set == "plane":
        # the names only: each solution's ΔW streamed one parameter at a time, never all dense at once
        chosen = {name for s in plane_solutions.values() for name, _ in s.streamed_deltas()}
    else:
        chosen = set(adapted_weights(base, targets))
    is_head = lambda n: n.startswith(HEAD + ".")  # noqa: E731
    return [n for n, _ in base.named_parameters() if (n in chosen and not is_head(n)) or (head and is_head(n))]


def weight_coordinates(solution: Solution, names: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """The dense model at the solution (a copy of the base with ΔW applied) and the weight names."""
    return solution.model(), list(names)


def adapter_coordinates(
    solution: Solution, head: bool = True, dtype: str = "float32", device: torch.device | str | None = None
) -> tuple[nn.Module, list[str]]:
    """The solution's peft model, loaded from its folder, and the names of what its optimiser trained:
    LoRA's A/B, RandLoRA's λ/γ, and (``head``) the classification head peft saves with them.

    The adapter is attached to a skeleton of the base that shares its tensors (no second copy of the weights)
    when the base's floating-point tensors are already in ``dtype`` and every tensor is on ``device`` (the
    operator's conversion or move would otherwise convert or move the shared base), else to a copy."""
    from peft import PeftModel

    from adapters.deltas import skeleton
    from adapters.methods.randlora_saving import BASES_FILE, verify_bases
    from adapters.solution import peft_config_of

    folder = solution.path
    base = solution.base
    floating = [t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()]
    target = torch.device(device) if device is not None else None
    shared = all(t.dtype == DTYPES[dtype] for t in floating) and (target is None or all(
        t.device.type == target.type and target.index in (None, t.device.index)
        for t in (*base.parameters(), *base.buffers())))  # fmt: skip
    with warnings.catch_warnings():  # "bases regenerated from the PRNG key": verified just below
        warnings.filterwarnings("ignore", message=".*save_projection.*")
        model = PeftModel.from_pretrained(skeleton(base) if shared else copy.deepcopy(base), folder,
                                          config=peft_config_of(folder), is_trainable=True)  # fmt: skip
    if (folder / BASES_FILE).exists():
        try:
            verify_bases(model, folder)
        except ValueError as e:
            raise UserError(f"{folder}: {e}") from None
    names = [n for n, p in model.named_parameters() if p.requires_grad and (head or "modules_to_save" not in n)]
    return model, names


def _previous(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old.get("solutions", {}) if isinstance(old, dict) else {}


def _operator(
    solution: Solution, coordinates: str, names: Sequence[str], task, eval_set: EvalSet, settings: CurvatureSettings,
    device: torch.device | str, distributed: bool = False,
) -> HessianOperator:  # fmt: skip
    """The operator of one (solution, coordinates) entry (``names``: the weight coordinates' names)."""
    flags = [(p, p.requires_grad) for p in solution.base.parameters()]
    if coordinates == "weights":
        model, chosen = weight_coordinates(solution, names)
    else:
        model, chosen = adapter_coordinates(solution, settings.include_head, settings.dtype, device)
    # bitsandbytes' 4-bit matmul is an autograd.Function without setup_context, which torch.func's
    # forward-over-reverse refuses (measured with bitsandbytes 0.50.2 on CPU): a packed base goes by
    # reverse-over-forward (its layers through _PackedMatmul), else by double backward (the note says why)
    mode = "auto"
    try:
        return HessianOperator(model.to(device), chosen, eval_set, task.objective, settings.dtype, mode=mode,
                               micro_batch=settings.hvp_batch, distributed=distributed)  # fmt: skip
    finally:  # the operator (and peft) froze parameters an adapter's skeleton shares with the base: put back
        for p, flag in flags:
            p.requires_grad_(flag)


def entry_operator(
    source, solution: Solution, coordinates: str, eval_set: EvalSet, settings: CurvatureSettings,
    device: torch.device | str = "cpu", plane_solutions: Mapping[str, Solution] | None = None,
) -> HessianOperator:  # fmt: skip
    """The :class:`HessianOperator` that :func:`curvature_stage` measures for one (solution, coordinates) entry.

    For spreading an entry's probes over jobs (a job array): each job builds the operator and computes its
    probe range with :func:`~landscape.curvature.solvers.trace_probes` /
    :func:`~landscape.curvature.solvers.density_probes` (``settings.seed``, ``settings.slq_steps``); the driver
    joins the parts with :func:`~landscape.curvature.solvers.combine_trace` /
    :func:`~landscape.curvature.solvers.combine_density` (``settings.density_points``, ``settings.broadening``).
    ``source``, ``eval_set``, ``plane_solutions``: as :func:`curvature_stage`'s."""
    task = getattr(source, "loaded", source).task
    if coordinates == "adapter" and solution.method not in ADAPTER_METHODS:
        raise ValueError(f"a {solution.method} solution has no adapter: {NO_ADAPTER}")
    names = weight_names(task.base, task.entry.targets, settings.weight_set, plane_solutions or {"": solution},
                         settings.include_head) if coordinates == "weights" else []  # fmt: skip
    return _operator(solution, coordinates, names, task, eval_set, settings, device)


def _common(task, eval_set: EvalSet, settings: CurvatureSettings, names: Sequence[str]) -> dict:
    """What every entry's key holds besides its coordinates and solution."""
    from adapters.solution import fingerprint

    return {"settings": settings.key(), "base": fingerprint(task.base), "eval": eval_fingerprint(eval_set),
            "objective": task.objective.name, "weights": list(names)}  # fmt: skip


def entry_key(
    source, solution: Solution, coordinates: str, eval_set: EvalSet, settings: CurvatureSettings,
    plane_solutions: Mapping[str, Solution],
) -> str:  # fmt: skip
    """The key :func:`curvature_stage` gives the entry of ``solution`` in ``coordinates`` when it measures
    ``plane_solutions`` (its ``solutions``): a job array's probe parts are stored under it, so only parts of the
    same entry (settings, solution, samples, objective) are combined."""
    task = getattr(source, "loaded", source).task
    names = weight_names(task.base, task.entry.targets, settings.weight_set, plane_solutions, settings.include_head)
    common = _common(task, eval_set, settings, names)
    return key_digest({**common, "coordinates": coordinates, "solution": delta_fingerprint(solution)})


def _compute_entry(
    name: str, solution: Solution, coordinates: str, names: Sequence[str], task, eval_set: EvalSet,
    settings: CurvatureSettings, device: torch.device | str, progress: bool, scratch: Path | None = None,
    distributed: bool = False, probes: bool = True,
) -> dict:  # fmt: skip
    """One (solution, coordinates) entry, computed (``probes=False``: its eigenvalues only, ``probes_apart``)."""
    op = _operator(solution, coordinates, names, task, eval_set, settings, device, distributed)
    op.scratch = scratch
    # one tick per HVP: each Lanczos iteration, trace probe and SLQ step (whole lines in a log)
    bar = progress_bar(desc=f"curvature {name}/{coordinates}", unit="hvp", disable=not progress, dynamic_ncols=True)
    op.on_hvp = lambda: bar.update(1)
    measured = settings if probes else dataclasses.replace(settings, trace_probes=0, slq_probes=0)
    try:
        return {**curvature_at(op, measured, bar), "device": str(device), **({} if probes else {"probes_apart": True})}
    finally:
        bar.close()


def curvature_stage(
    source,
    solutions: Mapping[str, Solution],
    eval_set: EvalSet,
    out: str | Path,
    settings: CurvatureSettings,
    device: torch.device | str = "cpu",
    progress: bool = True,
    plane_solutions: Mapping[str, Solution] | None = None,
    info: Mapping | None = None,
    distributed: bool = False,
    probes: bool = True,
) -> dict:
    """Curvature of every solution in every coordinates of ``settings``; writes curvature.json after each
    entry and curvature.png/.pdf at the end, under ``out``; returns what curvature.json holds.

    ``source``: an :class:`landscape.run.OpenRun` or a :class:`landscape.run.Loaded` (its task gives the
    base model, the adapter targets and the objective). ``plane_solutions``: whose changed parameters make
    ``weight_set="plane"`` (default ``solutions``). ``info`` is merged into curvature.json (its ``title``
    also heads the figure). Entries of an earlier curvature.json in ``out`` with the same key are reused.

    ``distributed``: every torchrun rank calls this together; the products are averaged over the ranks' shards of
    the evaluation samples (:class:`HessianOperator`), the solvers run identically on every rank, rank 0's reading
    of curvature.json decides what is reused, and only rank 0 writes (every rank returns the result). Without
    it, the call uses no collective: it computes on its own process's samples, all of them, and writes.

    ``probes=False`` (a launcher's eigenvalue task): each entry gets its eigenvalues only and is marked
    ``"probes_apart": true``, its key still the full settings'; the trace and density probes are other tasks'
    (:func:`~landscape.curvature.solvers.trace_probes`, :func:`~landscape.curvature.solvers.density_probes`,
    under :func:`entry_key`), joined to it by the launcher. Such an entry is never reused as a whole one.
    """
    settings.check()
    task = getattr(source, "loaded", source).task
    out = Path(out)
    names = weight_names(task.base, task.entry.targets, settings.weight_set, plane_solutions or solutions,
                         settings.include_head)  # fmt: skip
    common = _common(task, eval_set, settings, names)
    rank, world = distributed_ranks() if distributed else (0, 1)
    previous = _agreed(_previous(out / "curvature.json"), world)
    # world_size: how many processes shared the products (not in the entries' key: the same sums, to rounding)
    result = {**(dict(info) if info else {}), "settings": settings.to_dict(), "seed": settings.seed,
              "eval_samples": eval_set.n, "device": str(device), "world_size": world, "complete": False,
              "solutions": {}}  # fmt: skip
    write = (lambda: write_json(out / "curvature.json", result)) if rank == 0 else (lambda: None)  # noqa: E731
    packed_base = bool(packed_names(task.base))
    for name, solution in solutions.items():
        result["solutions"][name] = per = {}
        delta = delta_fingerprint(solution)
        for coordinates in settings.coordinates:
            skipped = skip_reason(solution.method, coordinates, packed_base)
            if skipped:
                per[coordinates] = {"skipped": skipped}
                continue
            key = key_digest({**common, "coordinates": coordinates, "solution": delta})
            old = previous.get(name, {}).get(coordinates, {})
            if old.get("key") == key and (not probes or not old.get("probes_apart")):
                per[coordinates] = {**old, "reused": True}
            else:
                entry = _compute_entry(name, solution, coordinates, names, task, eval_set, settings, device,
                                       progress and rank == 0, out, distributed, probes)  # fmt: skip
                per[coordinates] = {"key": key, **entry}
            write()  # saved as it completes: a rerun resumes here
    result["complete"] = True
    write()
    if rank == 0:
        write_figure(result, out, (info or {}).get("title"))
    return result


def _agreed(previous: dict, world: int) -> dict:
    """Rank 0's earlier entries, on every rank (so every rank reuses and computes the same entries)."""
    if world > 1:
        import torch.distributed as dist

        box = [previous]
        dist.broadcast_object_list(box, src=0)
        previous = box[0]
    return previous


def summary(result: Mapping) -> dict:
    """The headline numbers of curvature.json per solution and coordinates (for landscape.json):
    top eigenvalues, trace ± SE, dimension and HVPs; a skipped entry keeps its reason."""
    keep = ("eigenvalues", "trace", "trace_se", "dim", "hvps", "skipped")
    return {name: {c: {k: e[k] for k in keep if k in e} for c, e in per.items()}
            for name, per in result["solutions"].items()}  # fmt: skip
