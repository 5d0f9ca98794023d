"""Training seeds (``--seeds N``): a run's readings over N solutions per method, each with a 95 % t-interval.

The variation between training runs is usually larger than the evaluation samples' noise that the paired
standard errors cover, so with ``--seeds N`` > 1 every method is trained with the seeds s, s + 1, ..., s + N − 1
(s = ``--seed``; :func:`landscape.run.train_solutions`, the extra seeds under ``solutions/seed-K/``). The seed
varies the batches, the adapters' init and RandLoRA's bases; the split, the evaluation samples and the base stay
s's, so every per-seed reading is on the same samples and the seeds' differences are paired.

The plane is s's. For each extra seed the straight paths between its solutions are evaluated on the run's
evaluation set and precision (:func:`landscape.paths.compute_paths`; with ``--path-points 0`` only their ends):
they give that seed's vertex losses and accuracies, and its chord barrier per pair. The readings
(:func:`combine`), in landscape.json:

- per method in ``solutions``: ``vertex_loss_per_seed`` (N values, seed s first), ``vertex_loss_mean``,
  ``vertex_loss_ci95`` ([low, high]), and the same for ``vertex_accuracy`` and ``test_accuracy``;
  ``vertex_loss`` stays seed s's;
- ``seed_orderings``: per pair of methods A-B the per-seed differences L_A − L_B of the vertex losses, their
  mean and t(N − 1) interval; "A deeper than B" when the interval lies below 0, "shallower" above, else
  "within noise";
- per pair in ``paths`` (and paths.json): ``barrier_per_seed``, ``barrier_mean``, ``barrier_ci95`` beside
  ``barrier`` / ``barrier_se``, which stay seed s's.

The interval is mean ± t_{0.975, N−1}·sd/√N (sd with N − 1 in the denominator), scipy's ``t.interval``.
Cost: each extra seed trains every method once more and evaluates its three paths (about the run's training
and paths stages again). The extra seeds' readings are written to ``seeds.json`` and keyed in stages.json
(stage ``seeds``), so a rerun reuses them; ``seeds.png`` draws the vertex losses per seed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

CONFIDENCE = 0.95
FILE = "seeds.json"
FIGURE = "seeds.png"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, list[float] | None]:
    """(mean, [low, high]) of ``values``: the two-sided t-interval mean ± t_{(1+c)/2, N−1}·sd/√N; None for N < 2."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, [mean - half, mean + half]


def over_seeds(name: str, values: Sequence[float | None]) -> dict:
    """``{name}_per_seed``, ``{name}_mean``, ``{name}_ci95`` of ``values`` (None throughout when one is missing)."""
    if any(v is None for v in values):
        return {f"{name}_per_seed": list(values), f"{name}_mean": None, f"{name}_ci95": None}
    mean, ci = t_interval(values)
    return {f"{name}_per_seed": [float(v) for v in values], f"{name}_mean": mean, f"{name}_ci95": ci}


def verdict(ci: Sequence[float]) -> str:
    """The reading of an interval of L_A − L_B: A "deeper" (below 0), "shallower" (above 0), or "within noise"."""
    low, high = ci
    return "deeper" if high < 0 else "shallower" if low > 0 else "within noise"


def ordering(a: str, b: str, loss_a: Sequence[float], loss_b: Sequence[float]) -> dict:
    """The ordering of two methods over seeds: the per-seed differences of their vertex losses, their mean and
    t-interval, and its :func:`verdict` for ``a`` against ``b``."""
    diff = [float(x) - float(y) for x, y in zip(loss_a, loss_b, strict=True)]
    mean, ci = t_interval(diff)
    word = verdict(ci)
    reading = f"{a} and {b} within noise" if word == "within noise" else f"{a} {word} than {b}"
    return {"difference_per_seed": diff, "difference_mean": mean, "difference_ci95": ci, "verdict": word,
            "reading": reading}  # fmt: skip


# ----------------------------------------------------------------------------- the extra seeds' readings


def train_extra(loaded, device, stages, log, previous: Mapping) -> None:
    """Train (or reuse, or resume) every method's solution for each extra seed of ``--seeds``, in
    ``solutions/seed-K/METHOD``, each keyed in its folder and noted in stages.json as ``train_METHOD_seedK``."""
    from adapters.io import key_digest
    from landscape.run import seed_folder, train_key, train_solutions, train_stage_name, training_seeds

    config = loaded.config
    for seed in training_seeds(config)[1:]:
        for method in train_solutions(loaded, device, stages, seed):
            name = train_stage_name(method, seed, config.seed)
            if name not in stages.seconds:  # reused: keeps the time of the run that trained it
                stages.reuse(name, previous, say=False)
            folder = seed_folder(config.out_dir, method, seed, config.seed).relative_to(config.out_dir)
            log.keep(name, key_digest(train_key(loaded, method, device, seed)), [folder], stages.seconds.get(name))


def stage_keys(loaded, device, inputs: Mapping[str, str], keys: dict) -> None:
    """With ``--seeds`` > 1: the ``seeds`` stage's key in ``keys`` (the paths' inputs and every extra seed's
    training keys), and the paths' key extended by it (paths.json then holds the intervals over seeds)."""
    from adapters.io import key_digest
    from landscape import stages as stage_log
    from landscape.run import train_key, training_seeds

    config = loaded.config
    if config.seeds == 1:
        return
    trained = {str(seed): {m: key_digest(train_key(loaded, m, device, seed)) for m in config.method_set()}
               for seed in training_seeds(config)[1:]}  # fmt: skip
    keys["seeds"] = key_digest({"paths": stage_log.stage_key("paths", config, inputs), "seeds": trained,
                                "format": 1})  # fmt: skip
    keys["paths"] = key_digest({"paths": keys["paths"], "seeds": keys["seeds"]})


def seeds_stage(
    loaded, solutions: Mapping, evaluator, device, stages, log, keys: Mapping, written: list
) -> dict | None:
    """Each extra seed's paths on the run's evaluation set and precision, and its :func:`readings`, written to
    seeds.json ({seed: readings}); reused from stages.json when its key is unchanged. None with one seed."""
    from adapters.io import write_json
    from adapters.solution import load_solution
    from landscape import paths
    from landscape.run import seed_folder, training_seeds

    config, out = loaded.config, loaded.config.out_dir
    if config.seeds == 1:
        return None
    record = log.reusable("seeds", keys["seeds"])
    if record is not None and "summary" in record:
        stages.reuse("seeds", {"wall_time_s": log.seconds()})
        return record["summary"]
    log.forget("seeds")
    seeds, methods, extra = training_seeds(config), config.method_set(), {}
    with stages("seeds"):
        for seed in seeds[1:]:
            chosen = {m: load_solution(seed_folder(out, m, seed, config.seed), base=loaded.task.base,
                                       expect_method=m) for m in methods}  # fmt: skip
            if "base" in solutions:  # no FT: the base model is the third vertex, as on the plane
                chosen["base"] = solutions["base"]
            result = paths.compute_paths(
                loaded.task.base, chosen, evaluator.eval_set, device, config.path_points or 2,
                config.path_extend if config.path_points else 0.0, progress=config.progress,
                points_per_forward=evaluator.points_per_forward, dtype=config.landscape_dtype(device.type),
                objective=loaded.task.objective, storage=evaluator.chart.info.get("storage", "dense"),
                share_ends=True,
            )  # fmt: skip
            extra[str(seed)] = readings(result, {m: chosen[m] for m in methods}, bool(config.path_points))
            del chosen, result
        write_json(out / FILE, {"seeds": seeds, "run_seed": config.seed, "eval_samples": evaluator.eval_set.n,
                                "path_points": config.path_points, "per_seed": extra})  # fmt: skip
    written.append(out / FILE)
    log.record("seeds", keys["seeds"], [out / FILE], stages.seconds["seeds"], summary=extra)
    return extra


def finish(loaded, summary: dict, extra: Mapping | None, written: list) -> dict | None:
    """The over-seed readings of the run's ``summary`` (:func:`combine`) and seeds.png; returns the orderings
    (landscape.json ``seed_orderings``), None with one seed."""
    from landscape.run import training_seeds

    if extra is None:
        return None
    config = loaded.config
    methods = [m for m in config.method_set() if m in summary]
    orderings = combine(summary, extra, training_seeds(config), methods)
    title = f"{loaded.model_name} on {config.dataset}: vertex loss per training seed"
    written.append(figure({m: summary[m] for m in methods}, config.out_dir / FIGURE, title))
    return orderings


def readings(result: Mapping, solutions: Mapping, with_paths: bool = True) -> dict:
    """One extra seed's readings from its paths (:func:`landscape.paths.compute_paths`): per method its vertex
    loss and accuracy (the ends t = 0, 1) and test metrics, per pair its barrier (None with ends only)."""
    t = np.asarray(result["t"])
    i0, i1 = int(np.flatnonzero(t == 0.0)[0]), int(np.flatnonzero(t == 1.0)[0])
    out: dict = {"vertex_loss": {}, "vertex_accuracy": {}, "test_accuracy": {}, "test_loss": {}}
    for k, pair in enumerate(result["pairs"]):
        for name, j in zip(pair.split("-"), (i0, i1), strict=True):
            out["vertex_loss"][name] = float(result["loss"][k, j])
            out["vertex_accuracy"][name] = float(result["accuracy"][k, j])
    for name, sol in solutions.items():
        out["test_accuracy"][name] = sol.metrics.get("test_accuracy")
        out["test_loss"][name] = sol.metrics.get("test_loss")
    out["barrier"] = {p: b["barrier"] if with_paths else None for p, b in result["barriers"].items()}
    out["barrier_se"] = {p: b["barrier_se"] if with_paths else None for p, b in result["barriers"].items()}
    return out


def add_barriers(barriers: Mapping[str, dict], extra: Mapping[str, dict], seeds: Sequence[int]) -> None:
    """Beside each pair's ``barrier`` (the run's seed) in ``barriers`` (paths.json's ``pairs``): the barrier
    per seed, its mean and t-interval, from the extra seeds' :func:`readings` ``extra`` ({seed: ...})."""
    for pair, info in barriers.items():
        values = [info["barrier"], *(extra[str(k)]["barrier"].get(pair) for k in seeds[1:])]
        info.update(over_seeds("barrier", values), seeds=list(seeds))


def combine(summary: dict, extra: Mapping[str, dict], seeds: Sequence[int], methods: Sequence[str]) -> dict:
    """Add the over-seed readings to the run's per-solution ``summary`` (landscape.json ``solutions``: seed s's
    values first, then ``extra``'s) and return the orderings of every pair of ``methods``."""
    rest = [extra[str(k)] for k in seeds[1:]]
    for m in methods:
        summary[m]["seeds"] = list(seeds)
        for name in ("vertex_loss", "vertex_accuracy", "test_accuracy"):
            summary[m].update(over_seeds(name, [summary[m].get(name), *(r[name].get(m) for r in rest)]))
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
    return {f"{a}-{b}": ordering(a, b, summary[a]["vertex_loss_per_seed"], summary[b]["vertex_loss_per_seed"])
            for a, b in pairs}  # fmt: skip


def lines(summary: Mapping, orderings: Mapping, path_summary: Mapping | None) -> list[str]:
    """The printed report of the seeds: each method's vertex loss mean [interval], the orderings, the barriers."""
    first = next((s for s in summary.values() if s.get("vertex_loss_per_seed")), None)
    if first is None:
        return []
    n = len(first["vertex_loss_per_seed"])
    out = [f"over {n} training seeds (seeds {', '.join(map(str, first['seeds']))}; mean [95 % t-interval]):"]
    for name, s in summary.items():
        if s.get("vertex_loss_ci95"):
            low, high = s["vertex_loss_ci95"]
            values = ", ".join(f"{v:.4f}" for v in s["vertex_loss_per_seed"])
            line = f"  {name:<9} vertex loss {s['vertex_loss_mean']:.4f} [{low:.4f}, {high:.4f}] ({values})"
            for key, label in (("vertex_accuracy", "vertex accuracy"), ("test_accuracy", "test accuracy")):
                if s.get(f"{key}_ci95"):
                    line += f"; {label} {s[f'{key}_mean']:.4f} [{s[f'{key}_ci95'][0]:.4f}, {s[f'{key}_ci95'][1]:.4f}]"
            out.append(line)
    for pair, o in orderings.items():
        low, high = o["difference_ci95"]
        a, b = pair.split("-")
        out.append(f"  ordering {a} − {b}: {o['difference_mean']:+.4f} [{low:+.4f}, {high:+.4f}]: {o['reading']}")
    for pair, ci in ((path_summary or {}).get("barrier_ci95") or {}).items():
        if ci is not None:
            mean = path_summary["barrier_mean"][pair]
            out.append(f"  path {pair:<14} barrier {mean:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] over seeds")
    return out


def print_report(summary: Mapping, orderings: Mapping | None, path_summary: Mapping | None) -> None:
    for line in lines(summary, orderings or {}, path_summary):
        print(line, file=sys.stdout)


def figure(summary: Mapping, path: str | Path, title: str) -> Path:
    """seeds.png: each method's vertex loss per seed (dots, labelled by seed), its mean and 95 % t-interval."""
    from matplotlib.figure import Figure

    from landscape.engine.store import write_with
    from landscape.render.style import COLORS, LABELS

    names = [m for m, s in summary.items() if s.get("vertex_loss_per_seed")]
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, m in enumerate(names):
        s = summary[m]
        values = s["vertex_loss_per_seed"]
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + offsets, values, color=COLORS.get(m, "0.3"), s=18, zorder=3)
        for x, v, seed in zip(i + offsets, values, s["seeds"], strict=True):
            ax.annotate(str(seed), (x, v), textcoords="offset points", xytext=(4, 2), fontsize=6, color="0.35")
        if s.get("vertex_loss_ci95"):
            low, high = s["vertex_loss_ci95"]
            mean = s["vertex_loss_mean"]
            ax.errorbar(
                i + 0.3, mean, yerr=[[mean - low], [high - mean]], fmt="D", markersize=4, color="0.2", capsize=4
            )
    ax.set_xticks(range(len(names)), [LABELS.get(m, m) for m in names], fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.3)
    ax.set_ylabel("vertex loss (evaluation samples)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title + "\ndots: one per training seed; bar: mean and 95 % t-interval", fontsize=8)
    path = Path(path)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    return path


__all__ = [
    "CONFIDENCE",
    "add_barriers",
    "combine",
    "figure",
    "finish",
    "lines",
    "ordering",
    "over_seeds",
    "print_report",
    "readings",
    "seeds_stage",
    "stage_keys",
    "t_interval",
    "train_extra",
    "verdict",
]
