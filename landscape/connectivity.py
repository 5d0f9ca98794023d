"""python -m landscape.connectivity — the main job.

Trains (or loads) three solutions of one pretrained model on one dataset — full fine-tuning, LoRA and
RandLoRA at matched trainable-parameter budgets — plus a head-only baseline, evaluates the loss on the
plane through the three solutions and along the straight paths between them, analyses the spectra of
their weight updates, and writes the output contract under --out:

  solutions/{ft,lora,randlora,head_only}/   the solutions (safetensors / peft format)
  landscape.npz   x, y, loss, accuracy, loss_se, points, point_names
  landscape.json  the resolved configuration, seeds, versions, wall time per stage, per-solution summary
  landscape.html  interactive 3D surface (plotly, self-contained)
  landscape.png / landscape.pdf   static surface + contour map
  paths.npz / paths.json / paths.png / paths.pdf   loss along the lines between pairs (landscape.paths)
  spectrum.json / spectrum.csv / spectrum.png / rank.png / similarity.png   spectra of each ΔW (landscape.spectrum)
  curvature.json / curvature.png / curvature.pdf   with --curvature: Hessian eigenvalues, trace, density
                                                   at each solution (landscape.curvature)
  merges.json / merges.npz / merges.png / merges.pdf   with --merges: task arithmetic, TIES and DARE merges of the
                                                   solutions' ΔW on the plane (landscape.merges)
  layerwise.json / layerwise.npz / layerwise.png / layerwise.pdf   with --layerwise: each layer's barrier between
                                                   every pair, the rest held at either end (landscape.layerwise)
  basins.json / basins.npz / basins.png / basins.pdf   with --basins: each solution's accuracy radius along random
                                                   and Hessian eigen-directions (landscape.basins)
  blocks.json / blocks.npz / blocks.png / blocks.pdf   with --blocks: the curvature per transformer layer at each
                                                   solution (python -m landscape.curvature --blocks)
  stages.json     one record per finished stage (its key, what it read, its files), written as each finishes:
                  a rerun reuses the paths and spectra whose inputs are unchanged (landscape.stages)

The recipe is the sequence of stages in :func:`run`; each stage is a function of the configuration
and the previous stages' results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters import distributed, threads
from adapters.errors import UserError
from adapters.io import key_digest
from landscape import build, curvature, paths, render, report, seeds, spectrum
from landscape import config as run_config
from landscape import stages as stage_log
from landscape.cli import Stages, resolve_device, run_main
from landscape.engine import directions, factored, store
from landscape.engine.grid import PlaneEvaluator, run_grid
from landscape.engine.plane import RANDOM_CHARTS, SOLUTIONS
from landscape.engine.store import GridStore, StaleGrid
from landscape.report import metadata, print_summary, summarise
from landscape.run import (
    METHOD_ORDER,
    Loaded,
    load,
    solution_keys,
    train_autocast,
    train_key,
    train_solutions,
)
from landscape.run import training_seeds as run_training_seeds

PROG = "python -m landscape.connectivity"
DESCRIPTION = (
    "Train full fine-tuning, LoRA and RandLoRA solutions (or load them) and map the loss landscape on the plane "
    "through them, the straight paths between them, and the singular-value spectra of their weight updates."
)


def run(argv: Sequence[str] | None = None) -> Path:
    config = run_config.from_argv(argv, PROG, DESCRIPTION)
    if config.launcher is not None:  # the work as submitit jobs: submit, or gather and resubmit (landscape.launch)
        from landscape import launch

        return launch.drive(config, list(sys.argv[1:] if argv is None else argv), JOBS)
    return run_with(config, argv)


@dataclass
class Prepared:
    """What the grid needs: the run loaded, its solutions trained or reused, the plane and its grid store."""

    loaded: Loaded
    solutions: dict
    chart: object
    xs: np.ndarray
    ys: np.ndarray
    evaluator: object
    grid_store: GridStore
    inputs: dict
    precision: dict


def prepare(config, device, rank: int, stages, log, previous: dict, train: bool = True) -> Prepared:
    """Load the run, train (or reuse) its solutions, build the plane and its grid store (keyed by the solutions).
    ``train=False`` (a launcher's grid shard): the solutions must be trained already; extra seeds are skipped."""
    with stages("load"):
        loaded = load(config)
        center = build.load_center(config, loaded.task.base, loaded.model_name)  # --center PATH, else None
        grid_store = check_grid_store(loaded, device, rank)  # before any training: a stale grid fails now
    precision = announce_precision(loaded, device, rank)  # inputs checked; the long work starts here
    solutions = train_solutions(loaded, device, stages, train=train)
    if "ft" not in solutions:  # the base model is the third vertex (of the plane, and of the paths)
        from adapters.solution import base_solution

        solutions["base"] = base_solution(loaded.task.base, loaded.model_name)
    if center is not None:
        solutions[directions.CENTER_VERTEX] = center
    if train:
        note_training(loaded, solutions, device, stages, log, previous)
        seeds.train_extra(loaded, device, stages, log, previous)  # --seeds N: the other seeds' solutions
    with stages("plane"):
        chart, xs, ys, evaluator = build.plane(loaded, solutions, device)
        deltas = solution_fingerprints(solutions)
        inputs = stage_log.run_inputs(loaded, deltas, evaluator, device, precision["dtype"])
        # the examples' digest too: data edited in place, or another tokenizer, must not meet old grid points
        grid_store.set_solutions({"deltas": deltas, "x": xs, "y": ys, "eval": inputs["eval"]})
    return Prepared(loaded, solutions, chart, xs, ys, evaluator, grid_store, inputs, precision)


def run_with(config, argv: Sequence[str] | None, launched: dict | None = None) -> Path:
    """The run of ``config`` in this process (under torchrun: in each). ``launched``: a launcher's final job
    (``{"name": ..., "shards": N}``, recorded in landscape.json), whose training and grid are on disk."""
    started = time.perf_counter()
    threads.configure(config.threads)
    device = resolve_device(config.device)  # under torchrun: GPU LOCAL_RANK
    rank, world = distributed.init(device.type)
    if config.batch_size % world:
        raise UserError(f"--batch-size {config.batch_size} is not divisible by the {world} torchrun processes")
    stages, out, log = Stages(quiet=rank != 0), config.out_dir, stage_log.StageLog(config.out_dir, write=rank == 0)
    previous = {"wall_time_s": log.seconds()}  # reused stages keep the times of the run that computed them
    prep = prepare(config, device, rank, stages, log, previous)
    loaded, solutions, chart, xs, ys, evaluator = (prep.loaded, prep.solutions, prep.chart, prep.xs, prep.ys,
                                                   prep.evaluator)  # fmt: skip
    grid_store, inputs, precision = prep.grid_store, prep.inputs, prep.precision
    with stages("grid"):
        result = evaluate_grid(evaluator, xs, ys, grid_store, config)
        if config.chart in RANDOM_CHARTS:  # the other draws of the directions (landscape.draws)
            result["draws"] = build.random_draws(config, evaluator, xs, ys, result, grid_store)
    if rank != 0:  # the other ranks share curvature's products (rank 0 reaches it after the paths and spectra)
        curvature_stage(loaded, solutions, evaluator, device, stages, [])
        return out
    summary = summarise(loaded, solutions, chart, xs, ys, result, evaluator)
    arrays = landscape_arrays(chart, xs, ys, result)
    written = [out / "landscape.npz"]
    store.write_npz(written[0], **arrays)
    keys = stage_keys(loaded, device, inputs)
    log.record("grid", keys["grid"], written, stages.seconds.get("grid"))
    extra = seeds.seeds_stage(loaded, solutions, evaluator, device, stages, log, keys, written)
    path_summary = paths_stage(loaded, solutions, evaluator, device, stages, log, keys, written, extra)
    orderings = seeds.finish(loaded, summary, extra, written)  # over seeds, into summary; None with one seed
    if log.reusable("spectrum", keys["spectrum"]):
        stages.reuse("spectrum", previous)
    else:
        log.forget("spectrum")
        with stages("spectrum"):
            chosen = {s: solutions[s] for s in SOLUTIONS if s in solutions}  # the base vertex has no ΔW
            files = spectrum.write_spectrum(chosen, out, device, config.progress)
        written += files
        log.record("spectrum", keys["spectrum"], files, stages.seconds["spectrum"],
                   stage_log.stage_key("spectrum", config, inputs))  # fmt: skip
    curvature_summary = curvature_stage(loaded, solutions, evaluator, device, stages, written)
    if curvature_summary is not None:
        log.record("curvature", keys["curvature"], [f"curvature.{e}" for e in ("json", "png", "pdf")],
                   stages.seconds["curvature"])  # fmt: skip
    written += merges_stage(loaded, solutions, evaluator, device, stages)
    written += layerwise_stage(loaded, solutions, evaluator, device, stages)
    written += basins_stage(loaded, solutions, evaluator, device, stages)
    written += blocks_stage(loaded, solutions, evaluator, device, stages)
    with stages("render"):
        figures = render_landscape(loaded, chart, arrays, summary)
    written += figures
    log.record("render", keys["grid"], figures, stages.seconds["render"])  # drawn from the grid's result
    meta = metadata(loaded, chart, xs, ys, result, summary, path_summary, evaluator, device, world)
    if curvature_summary is not None:
        meta["curvature"] = curvature_summary
    if orderings is not None:
        meta["seed_orderings"] = orderings
    if launched is not None:
        meta["launcher"] = launched
    meta.update(wall_time_s=stages.seconds, reused_stages=sorted(stages.reused), stage_keys=keys, precision=precision,
                wall_time_total_s=round(time.perf_counter() - started, 1),
                command=" ".join([PROG, *(argv if argv is not None else sys.argv[1:])]))  # fmt: skip
    store.write_json(out / "landscape.json", meta)
    print_summary([out / "landscape.json", *written], summary, stages.seconds, path_summary, orderings)
    return out


def note_training(loaded: Loaded, solutions, device, stages, log, previous: dict) -> None:
    """The run's solutions in stages.json (their folders hold their keys): those reused from the earlier run
    keep its training times."""
    config = loaded.config
    for method in METHOD_ORDER:
        if f"train_{method}" not in stages.seconds and method not in config.solutions:
            stages.reuse(f"train_{method}", previous, say=False)
        if method in solutions and method not in config.solutions:
            log.keep(f"train_{method}", key_digest(train_key(loaded, method, device)), [f"solutions/{method}"],
                     stages.seconds.get(f"train_{method}"))  # fmt: skip


def vertex_names(chart) -> list[str]:
    """The chart's vertices in output order: ft, lora, randlora for the planes through them; a random chart's centre."""
    return [s for s in SOLUTIONS if s in chart.vertices] + [s for s in chart.vertices if s not in SOLUTIONS]


def landscape_arrays(chart, xs, ys, result) -> dict[str, np.ndarray]:
    """The content of landscape.npz."""
    names = vertex_names(chart)
    return {
        "x": xs, "y": ys, "loss": result["loss"], "accuracy": result["accuracy"], "loss_se": result["loss_se"],
        "points": np.array([chart.vertices[s] for s in names], dtype=np.float64).reshape(-1, 2),
        "point_names": np.array(names), **result.get("draws", {}),
    }  # fmt: skip


def stage_keys(loaded: Loaded, device, inputs: dict) -> dict[str, str]:
    """Every stage's key (:mod:`landscape.stages`); with ``--seeds N`` the seeds' key, and the paths' extended by it."""
    keys = {s: stage_log.stage_digest(s, loaded.config, inputs) for s in stage_log.STAGE_READS}
    seeds.stage_keys(loaded, device, inputs, keys)
    return keys


def path_store(config, key: str, rank: int = 0) -> store.SampleStore | None:
    """A launcher run's path points (``.paths/rank<K>.npz``, keyed by the paths' stage key); None without one."""
    if config.launcher is None:
        return None
    points = store.SampleStore(config.out_dir / ".paths", {"paths": key}, {}, rank=rank)
    points.drop_stale()
    return points


def path_args(loaded: Loaded, evaluator, device) -> dict:
    """:func:`paths.compute_paths`' settings in a run: the plane's evaluation set, precision and storage; a dense
    plane's evaluator itself, which carries the lines between its vertices (a random chart's: not used)."""
    config = loaded.config
    factored_chart = isinstance(evaluator, factored.FactoredEvaluator) and config.chart not in RANDOM_CHARTS
    return {"eval_set": evaluator.eval_set, "device": device, "points": config.path_points,
            "extend": config.path_extend, "progress": config.progress, "objective": loaded.task.objective,
            "points_per_forward": evaluator.points_per_forward, "dtype": config.landscape_dtype(device.type),
            "storage": evaluator.chart.info.get("storage", "dense"),
            "chart": evaluator.chart if factored_chart else None,
            "plane": evaluator if isinstance(evaluator, PlaneEvaluator) else None}  # fmt: skip


def paths_stage(loaded: Loaded, solutions, evaluator, device, stages, log, keys, written, extra=None) -> dict | None:
    """The 1-D paths between the solutions, on the plane's evaluation set and precision (reused when unchanged:
    ``log``'s record of the same key). ``extra``: the other training seeds' readings (:mod:`landscape.seeds`),
    whose barriers join each pair's as ``barrier_per_seed``, ``barrier_mean``, ``barrier_ci95``."""
    config, out = loaded.config, loaded.config.out_dir
    if not config.path_points:
        return None
    record = log.reusable("paths", keys["paths"])
    if record is not None and "summary" in record:
        stages.reuse("paths", {"wall_time_s": log.seconds()})
        return record["summary"]
    log.forget("paths")
    args = path_args(loaded, evaluator, device)
    dtype = args["dtype"]
    with stages("paths"):
        result = paths.compute_paths(
            loaded.task.base, solutions, **args, store=path_store(config, keys["paths"]),  # a launcher's path tasks
            known=report.vertex_results(evaluator.chart, evaluator),  # the vertices: evaluated once, shared
        )  # fmt: skip
        info = {"dataset": config.dataset, "model": loaded.model_name, "seed": config.seed,
                "eval_split": config.eval_split, "dtype": dtype}  # fmt: skip
        title = f"{loaded.model_name} on {config.dataset}: linear paths"
        if extra is not None:
            seeds.add_barriers(result["barriers"], extra, run_training_seeds(config))
        files = paths.write_paths(result, out, info=info, title=title)
    written += files
    summary = paths.summary(result)
    log.record("paths", keys["paths"], files, stages.seconds["paths"], summary=summary)
    return summary


def curvature_stage(loaded: Loaded, solutions, evaluator, device, stages, written) -> dict | None:
    """``--curvature``: :mod:`landscape.curvature` at the three solutions with its default settings and the run's
    seed, on the plane's evaluation set; its entries are reused by key (curvature.json) when unchanged. Under
    torchrun every rank calls it: the products are averaged over the ranks' shards of the samples, rank 0 writes."""
    if not loaded.config.curvature:
        return None
    config, out = loaded.config, loaded.config.out_dir
    settings = curvature.CurvatureSettings(seed=config.seed)
    chosen = {s: solutions[s] for s in SOLUTIONS if s in solutions}
    info = {"dataset": config.dataset, "model": loaded.model_name, "eval_split": config.eval_split,
            "title": f"{loaded.model_name} on {config.dataset}: curvature at the solutions"}  # fmt: skip
    if config.launcher is not None:  # the entries its array tasks computed: reused by key below
        gather_curvature(out, settings)
    with stages("curvature"):
        result = curvature.curvature_stage(loaded, chosen, evaluator.eval_set, out, settings, device,
                                           progress=config.progress, info=info, distributed=True)  # fmt: skip
    written += [out / f"curvature.{ext}" for ext in ("json", "png", "pdf")]
    return curvature.summary(result)


def gather_curvature(out: Path, settings) -> None:
    """A launcher run: the entries of its curvature tasks (``.curvature/SOLUTION-COORDINATES/curvature.json``, the
    eigenvalues, with the parts of the probe tasks beside it joined in) join curvature.json's, where
    :func:`curvature.curvature_stage` reuses each whose key is the run's."""
    import json

    from landscape.launch.probes import join

    def read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and isinstance(data.get("solutions"), dict) else {}

    current = read(out / "curvature.json") or {"solutions": {}}
    for path in sorted((out / ".curvature").glob("*/curvature.json")):
        for name, per in read(path).get("solutions", {}).items():
            for coordinates, entry in per.items() if isinstance(per, dict) else ():
                if isinstance(entry, dict) and "key" in entry and entry.get("probes_apart"):
                    entry = join(entry, path.parent, settings)  # None: a part is missing, computed here
                if isinstance(entry, dict) and "key" in entry:
                    current["solutions"].setdefault(name, {})[coordinates] = entry
    store.write_json(out / "curvature.json", current)


def merges_stage(loaded: Loaded, solutions, evaluator, device, stages) -> list[Path]:
    """``--merges``: :mod:`landscape.merges` with its defaults and the run's seed, on the plane's evaluation set
    and precision (merges.json, .npz, .png, .pdf next to landscape.npz); nothing without the flag."""
    if not loaded.config.merges:
        return []
    from landscape import merges

    with stages("merges"):
        return merges.merges_stage(loaded, solutions, evaluator.eval_set, device, loaded.config.progress)


def layerwise_stage(loaded: Loaded, solutions, evaluator, device, stages) -> list[Path]:
    """``--layerwise``: :mod:`landscape.layerwise` with its defaults on the plane's evaluation set and precision
    (layerwise.json, .npz, .png, .pdf next to landscape.npz); nothing without the flag."""
    if not loaded.config.layerwise:
        return []
    from landscape import layerwise

    with stages("layerwise"):
        return layerwise.layerwise_stage(loaded, solutions, evaluator.eval_set, device, loaded.config.progress)


def basins_stage(loaded: Loaded, solutions, evaluator, device, stages) -> list[Path]:
    """``--basins``: :mod:`landscape.basins` with its defaults and the run's seed on the plane's evaluation set and
    precision (basins.json, .npz, .png, .pdf next to landscape.npz); nothing without the flag."""
    if not loaded.config.basins:
        return []
    from landscape import basins

    with stages("basins"):
        return basins.basins_stage(loaded, solutions, evaluator.eval_set, device, loaded.config.progress)


def blocks_stage(loaded: Loaded, solutions, evaluator, device, stages) -> list[Path]:
    """``--blocks``: ``python -m landscape.curvature --blocks`` with its defaults and the run's seed on the plane's
    evaluation set (blocks.json, .npz, .png, .pdf next to landscape.npz; entries reused by key); nothing without
    the flag."""
    config = loaded.config
    if not config.blocks:
        return []
    from landscape.curvature.blocks import blocks_stage as measure

    chosen = {s: solutions[s] for s in SOLUTIONS if s in solutions}
    info = {"dataset": config.dataset, "model": loaded.model_name, "eval_split": config.eval_split,
            "run": str(config.out_dir),
            "title": f"{loaded.model_name} on {config.dataset}: curvature per layer at the solutions"}  # fmt: skip
    with stages("blocks"):
        measure(loaded, chosen, evaluator.eval_set, config.out_dir, curvature.CurvatureSettings(seed=config.seed),
                device=device, plane_solutions=solutions, info=info)  # fmt: skip
    return [config.out_dir / f"blocks.{ext}" for ext in ("json", "npz", "png", "pdf")]


def render_landscape(loaded: Loaded, chart, arrays: dict, summary: dict) -> list[Path]:
    config, out = loaded.config, loaded.config.out_dir
    data = {**arrays, "vertex_loss": np.array([summary[s]["vertex_loss"] for s in vertex_names(chart)]),
            "chart": config.chart, "distances": chart.info.get("distances")}  # fmt: skip
    title = (
        f"{loaded.model_name} on {config.dataset}: loss on the plane through FT, LoRA, RandLoRA ({config.chart} chart)"
    )
    if config.chart in RANDOM_CHARTS:
        data.update(note=directions.note(chart.info), clip_factor=RANDOM_CLIP_FACTOR)
        name = render.LABELS.get(vertex_names(chart)[0], "the solution")
        cut = "a random line" if config.chart == "random-line" else "a random plane"
        title = f"{loaded.model_name} on {config.dataset}: loss on {cut} through {name} (Li et al. 2018)"
    elif config.chart == build.HESSIAN:
        data.update(clip_factor=RANDOM_CLIP_FACTOR)
        name = render.LABELS.get(vertex_names(chart)[0], "the solution")
        lam = ", ".join(f"{x:.4g}" for x in chart.info["hessian"]["eigenvalues"])
        title = f"{loaded.model_name} on {config.dataset}: loss on the top-2 Hessian eigenvectors at {name} (λ = {lam})"
    render.landscape_html(data, out / "landscape.html", title)
    render.landscape_static(data, out / "landscape.png", out / "landscape.pdf", title)
    return [out / f"landscape.{ext}" for ext in ("html", "png", "pdf")]


def check_grid_store(loaded: Loaded, device, rank: int) -> GridStore:
    """The grid checkpoint folder of the run, checked against the run's settings before any training."""
    config = loaded.config
    settings = {
        "model": loaded.model_name, "model_options": loaded.model_options, "base": loaded.base_fingerprint,
        "chart": config.chart, "dtype": config.landscape_dtype(device.type), "grid": config.grid,
        "x_range": config.x_range, "y_range": config.y_range, "objective": loaded.task.objective.name,
        "eval": [config.dataset, config.eval_split, config.eval_samples, config.seed, config.data_root, loaded.sizes],
        "solutions": solution_keys(loaded, device),
    }  # fmt: skip
    if config.chart in RANDOM_CHARTS:  # only then, so the other charts' grids keep their keys
        settings["random_chart"] = build.grid_settings(config)
    if config.chart == build.HESSIAN:  # its centre and coordinates (the axes follow from them and the seed)
        settings["hessian_chart"] = {"center": config.center, "coordinates": config.coordinates}
    if loaded.task.objective.name == "answer":  # causal LMs' evaluation batches (likewise only there)
        settings["eval_tokens"] = config.eval_tokens_for(device.type)
    grid_store = GridStore(config.out_dir / ".grid", settings, rank=rank)
    if config.restart and rank == 0:
        grid_store.clear()
    distributed.wait_for_all()
    try:
        grid_store.check()
    except StaleGrid as e:
        raise stale(config, e) from None
    return grid_store


def announce_precision(loaded: Loaded, device, rank: int) -> dict:
    """The forward precision of the landscape (and of training, when it differs), printed once with the reason:
    ``auto`` follows the hardware (:mod:`adapters.precision`). Recorded in landscape.json as ``precision``."""
    from adapters.precision import choose
    from adapters.train import storage_dtype
    from adapters.upcast import computes_in_fp32

    forward = choose(loaded.config.dtype, device)
    autocast = train_autocast(loaded, device)
    training = "float32" if autocast == "none" else autocast
    line = forward.line() + ("" if training == forward.dtype else f"; training forward: {training}")
    if computes_in_fp32(loaded.task.base) and "float32" in (forward.dtype, training):  # adapters.upcast
        line += f"; the {storage_dtype(loaded.task.base)} weights are widened to float32 in a float32 forward"
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    return {"dtype": forward.dtype, "reason": forward.reason, "train": training}


# Random charts: the display clips losses above this × the centre's loss (the planes through three solutions: 1.2):
# a filter-normalised direction soon leaves the basin for losses far above chance, which would flatten it.
RANDOM_CLIP_FACTOR = 10.0


def stale(config, error: Exception) -> UserError:
    return UserError(
        f"{config.out_dir / '.grid'}: {error}: rerun with --restart to discard them, or pick another --out"
    )


def solution_fingerprints(solutions) -> dict[str, str]:
    from adapters.solution import delta_fingerprint

    # the base vertex (no FT solution), the centre of a random chart given as a folder, if any
    names = [*SOLUTIONS, "base", directions.CENTER_VERTEX]
    return {s: delta_fingerprint(solutions[s]) for s in names if s in solutions}


def evaluate_grid(evaluator, xs, ys, grid_store: GridStore, config) -> dict:
    try:
        return run_grid(evaluator, xs, ys, store=grid_store, progress=config.progress)
    except StaleGrid as e:
        raise stale(config, e) from None


# ------------------------------------------------------------------ the launcher's jobs (landscape.launch)


def _job_device(config):
    threads.configure(config.threads)
    return resolve_device(config.device)


def train_job(config, method: str, seed: int) -> None:
    """A launcher's training job: the solution of ``method`` with training seed ``seed`` (reused when trained,
    resumed from its checkpoint when a previous attempt died)."""
    device = _job_device(config)
    train_solutions(load(config), device, Stages(), seed, methods=(method,))


def grid_job(config, points: list[tuple[int, int]], shard: int, draw: int = 0) -> None:
    """A launcher's grid shard: the grid ``points`` (i, j) not yet on disk, checkpointed one by one in
    ``.grid/rank<shard>.npz`` (:class:`GridStore`): the model loads once for the whole chunk. ``draw`` k > 0: the
    points of a random chart's draw k (its directions, its store ``.grid/draw-k``), as :func:`build.random_draws`."""
    device = _job_device(config)
    prep = prepare(config, device, shard, Stages(), stage_log.StageLog(config.out_dir, write=False), {}, train=False)
    grid_store = prep.grid_store
    if draw:
        directions.redraw(prep.evaluator.chart, directions.draw_seed(build.direction_seed(config), draw))
        grid_store = build.draw_store(config, grid_store, draw)
    try:
        run_grid(prep.evaluator, prep.xs, prep.ys, store=grid_store, progress=False, points=points)
    except StaleGrid as e:
        raise stale(config, e) from None


def path_job(config, points: list[tuple[int, int]], shard: int) -> None:
    """A launcher's path task: the path points (pair k, index of t j) not yet on disk, with their per-sample
    losses, into ``.paths/rank<shard>.npz`` (:class:`store.SampleStore`); the finish job reads them back."""
    device = _job_device(config)
    prep = prepare(config, device, 0, Stages(), stage_log.StageLog(config.out_dir, write=False), {}, train=False)
    keys = stage_keys(prep.loaded, device, prep.inputs)
    args = {**path_args(prep.loaded, prep.evaluator, device), "progress": False}
    paths.compute_paths(prep.loaded.task.base, prep.solutions, **args, store=path_store(config, keys["paths"], shard),
                        only=set(map(tuple, points)))  # fmt: skip


def _curvature_prep(config, coordinates: str):
    """A curvature task's device, prepared run, solutions measured, settings and entry folder."""
    device = _job_device(config)
    prep = prepare(config, device, 0, Stages(), stage_log.StageLog(config.out_dir, write=False), {}, train=False)
    chosen = {s: prep.solutions[s] for s in SOLUTIONS if s in prep.solutions}
    settings = curvature.CurvatureSettings(seed=config.seed, coordinates=(coordinates,))
    return device, prep, chosen, settings, config.out_dir / ".curvature"


def curvature_job(config, name: str, coordinates: str) -> None:
    """A launcher's curvature task: the top eigenvalues of the entry of solution ``name`` in ``coordinates``
    (``--curvature``'s settings and seed), into ``.curvature/NAME-COORDINATES/curvature.json``; its trace and
    density probes are :func:`probes_job`'s; the finish job joins them (:func:`gather_curvature`)."""
    device, prep, chosen, settings, folder = _curvature_prep(config, coordinates)
    curvature.curvature_stage(prep.loaded, {name: chosen[name]}, prep.evaluator.eval_set,
                              folder / f"{name}-{coordinates}", settings, device, progress=False,
                              plane_solutions=chosen, probes=False)  # fmt: skip


def probes_job(config, name: str, coordinates: str, parts: list[tuple[str, int, int]]) -> None:
    """A launcher's probe task: the ``parts`` (kind, start, stop) of the entry of solution ``name`` in
    ``coordinates``, the trace or density probes start .. stop - 1 each, into
    ``.curvature/NAME-COORDINATES/KIND-START-STOP.json`` under the entry's key (a part already there is kept);
    the operator is built once for them all."""
    import time

    from landscape.launch import probes

    device, prep, chosen, settings, folder = _curvature_prep(config, coordinates)
    eval_set = prep.evaluator.eval_set
    key = curvature.entry_key(prep.loaded, chosen[name], coordinates, eval_set, settings, chosen)
    paths = {part: probes.part_path(folder / f"{name}-{coordinates}", *part) for part in map(tuple, parts)}
    todo = [part for part, path in paths.items() if probes.read_part(path, key) is None]
    if not todo:
        return
    op = curvature.entry_operator(prep.loaded, chosen[name], coordinates, eval_set, settings, device, chosen)
    for kind, start, stop in todo:
        cpu = time.process_time()  # as an entry's cpu_seconds: the solver's, not the operator's building
        if kind == "trace":
            part = curvature.trace_probes(op, settings.seed, start, stop)
        else:
            part = curvature.density_probes(op, settings.slq_steps, settings.seed, start, stop)
        probes.write_part(paths[kind, start, stop], key, {**part, "cpu_seconds": round(time.process_time() - cpu, 3)})


def finish_job(config, argv: list[str], launched: dict) -> None:
    """A launcher's last job: the run in one process, with every solution and grid point reused from disk (the
    paths, spectra, curvature and figures computed here), landscape.json recording ``launched`` and the wall time
    of each job before it."""
    from landscape.launch import plan

    run_with(config, argv, {**launched, "job_seconds": plan.job_seconds(config)})


JOBS = {"train": train_job, "grid": grid_job, "path": path_job, "curvature": curvature_job, "probes": probes_job,
        "finish": finish_job}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    code = run_main(run, argv, PROG)
    if distributed.active():
        if code == 0:
            distributed.wait_for_all()  # the other ranks wait until rank 0 has written every output
        distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
