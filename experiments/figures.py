"""python -m experiments.figures — regenerate every figure under figures/ and the gallery (docs/gallery.md).

Runs the connectivity job for each run of the set whose outputs are missing (offline set:
wordnet + MiniLM and fashion-mnist + EfficientNet-Lite0; ``--paper`` adds the CLIP runs of
experiments/paper when their data and weights are present), copies the figures into
``figures/`` and rewrites the gallery page's section between the gallery markers with the measured
numbers read from each run's JSON files. Nothing in the gallery is typed by hand.

The full sections of the offline set (not the compared ``hf:`` run) also get "Beyond the plane": a random
plane around RandLoRA and a random line through each solution (``--chart random`` / ``random-line`` on the
run's trained solutions, in sibling folders ``runs/<name>-random*``), the curvature at each solution
(:mod:`landscape.curvature`, ``curvature.json`` in the run) and a trained ft–lora curve
(:mod:`landscape.curves`, ``curves/`` in the run). Each is run when its outputs are missing (again with
``--force``), only for runs made by the set's own command, and read back with its standard errors. The random
charts run with the default ``--draws 5`` (a chart from before ``--draws`` is redone): their sharpness is read
with its spread over the draws and ranked only beyond it (:func:`experiments.readings.draw_readings`).
The sentences of numbers themselves are made in :mod:`experiments.readings`; this module runs, copies and writes.
The same full sections get "Instruments" (:mod:`experiments.instruments`): merges, layer-wise barriers, task-metric
basins, curvature per block and a Hessian eigen-direction chart (``runs/<name>-hessian``), run when missing.

The full sections' runs train ``--seeds N`` solutions per method (default 3; the compared ``hf:`` run one), and the
claims table of the README and of docs/claims.md (between its own markers, :mod:`experiments.claims`) tests the
paper's claims on them: each with its interval over the seeds and a verdict. A run of the set made with another
number of seeds is made again (the job reuses the stages whose keys are unchanged). The table's caption states this
command's wall time against ``--budget-minutes`` (default 360: the whole offline set from nothing, 3 seeds, on this
project's 2-core CPU machine, estimated from the gallery's recorded stage times; a run over it says so) and the
runs' stage times.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.errors import UserError
from adapters.io import atomic_folder, write_text, write_with
from experiments import claims, instruments
from experiments.readings import (
    LABELS,
    TRIO,
    centre_check,
    curvature_readings,
    curve_readings,
    draw_readings,
    ends_vs_chance,
    ends_vs_level,
    plane_draw_reading,
    plane_readings,
    readings,
    rise_readings,
)
from experiments.readings import _barriers as _barriers  # re-exported, as before the split
from experiments.readings import line_minimum as line_minimum
from experiments.readings import line_rise as line_rise
from experiments.readings import trace_step_se as trace_step_se
from landscape import connectivity
from landscape.cli import Parser, run_main

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"
OFFLINE = {
    "wordnet": ["--dataset", "wordnet"],
    "fashion-mnist": ["--dataset", "fashion-mnist"],
    "wordnet-hf": ["--dataset", "wordnet", "--model", "hf:MINILM"],  # the same MiniLM through --model hf:
}
# Runs shown as a comparison with another run of the set instead of a full section.
COMPARED = {"wordnet-hf": "wordnet"}
HF_TOLERANCE = 0.02  # the hf: entry must reach the built-in entry's test accuracies within this
PAPER = {name: ["--dataset", name, "--preset", "paper"] for name in ("cifar100", "food101", "ucf101")}
FIGURES = ("landscape.png", "paths.png", "spectrum.png", "rank.png", "similarity.png")


def resolve_argv(argv: list[str]) -> list[str]:
    """``hf:MINILM`` stands for the installed MiniLM folder (an ordinary Hugging Face model folder)."""
    from adapters.models import minilm

    return [f"hf:{minilm.model_path()}" if a == "hf:MINILM" else a for a in argv]


def _old_barriers(path: Path, key: str | None = None) -> bool:
    """Whether the JSON at ``path`` (its ``key``: landscape.json's "paths") holds barriers from before
    :data:`landscape.paths.FORMAT_VERSION`, which called Frankle's quantity the barrier: they are redone (a rerun
    of the main job reuses its solutions and grid and computes the paths again)."""
    from landscape.paths import FORMAT_VERSION

    record = json.loads(path.read_text())
    record = record.get(key) if key else record
    return bool(record) and record.get("format_version", 1) < FORMAT_VERSION


def set_argv(name: str, seeds: int) -> list[str]:
    """The set's command of run ``name``: a full section's run trains ``seeds`` solutions per method."""
    return [*OFFLINE.get(name, PAPER.get(name, [])), *(["--seeds", str(seeds)] if name in BEYOND and seeds > 1 else [])]


def _other_seeds(out: Path, argv: list[str]) -> bool:
    """Whether the run in ``out`` is the set's command ``argv`` but for its number of seeds: it is made again."""
    path = out / "landscape.json"
    if not path.exists():
        return False
    words, n = list(argv), 1
    if "--seeds" in words:
        i = words.index("--seeds")
        n = int(words[i + 1])
        del words[i : i + 2]
    meta = json.loads(path.read_text())
    command = meta["command"].split()
    if "--seeds" in command:
        i = command.index("--seeds")
        del command[i : i + 2]
    meta = {**meta, "command": " ".join(command)}
    return _made_by(meta, words) and len(claims.seeds_of(meta)) != n


def ensure_run(name: str, argv: list[str], runs: Path, force: bool) -> Path:
    argv = resolve_argv(argv)
    out = runs / name
    if (force or not (out / "landscape.json").exists() or _old_barriers(out / "landscape.json", "paths")
            or _other_seeds(out, argv)):  # fmt: skip
        print(f"[figures] running {' '.join(argv)} --out {out}", file=sys.stderr)
        if force and (out / ".grid").is_dir():  # a redone run's checkpointed points are of its old settings
            shutil.rmtree(out / ".grid")
        code = connectivity.main([*argv, "--out", str(out), "--no-progress"])
        if code != 0:
            raise UserError(f"the run '{name}' failed (exit {code}): see the message above")
    return out


def screenshot(html: Path, png: Path) -> bool:
    """Headless Chromium screenshot of a landscape.html, networking disabled; False if no Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return False
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--proxy-server=http://127.0.0.1:9",
        "--window-size=1500,700",
        "--virtual-time-budget=10000",
        f"--screenshot={png}",
        html.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, timeout=180).returncode == 0 and png.exists()


def _rel(path: Path) -> str:
    """Path as the README links it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def section(name: str, out: Path, figures: Path) -> str:
    meta = json.loads((out / "landscape.json").read_text())
    spec = json.loads((out / "spectrum.json").read_text())
    lines = [f"### {meta['model']} on {meta['dataset']}", ""]
    minutes = sum(meta["wall_time_s"].values()) / 60  # reused stages keep the times of the run that computed them
    lines += [
        f"`{meta['command'].replace(str(ROOT) + '/', '')}` — stages took {minutes:.1f} min in all on "
        f"{meta['device']} ({meta['dtype']}), {_seeds_text(claims.seeds_of(meta))}.",
        "",
    ]
    for fig in FIGURES:
        if (out / fig).exists():
            target = figures / f"{name}_{fig}"
            shutil.copyfile(out / fig, target)
            lines += [f"![{name} {fig[:-4]}]({_rel(target)})", ""]
    shot = figures / f"{name}_landscape_html.png"
    if screenshot(out / "landscape.html", shot):
        lines += [
            "The interactive `landscape.html` (headless Chromium, networking disabled):",
            "",
            f"![{name} landscape.html]({_rel(shot)})",
            "",
        ]
    n = meta["eval_samples"]
    lines += [
        "| solution | trainable params | rank | test accuracy | test loss | "
        f"vertex loss ({n} {meta['eval_split']} samples) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sols = meta["solutions"]
    for key in ("head_only", "ft", "lora", "randlora"):
        s = sols[key]
        vl = "–" if s.get("vertex_loss") is None else f"{s['vertex_loss']:.4f}"
        lines.append(
            f"| {LABELS[key]} | {s['trainable_params']:,} | {s['rank'] or '–'} | {s['test_accuracy']:.4f} | "
            f"{s['test_loss']:.4f} | {vl} |"
        )
    lines += [
        "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in meta["wall_time_s"].items()) + ".",
        "",
    ]
    lines += ["Measured readings:", ""] + [f"- {r}" for r in readings(meta, spec)] + [""]
    if name in BEYOND:
        lines.append(beyond_section(name, out, out.parent, figures))
        lines.append(instruments.section(name, out, out.parent, figures, ROOT))
    return "\n".join(lines)


def _seeds_text(seeds: list[int]) -> str:
    return (
        f"seed {seeds[0]}" if len(seeds) == 1 else f"training seeds {seeds[0]}–{seeds[-1]} (the plane: seed {seeds[0]})"
    )


def comparison(name: str, out: Path, reference: Path) -> str:
    """The hf: run beside the built-in run it must match: test accuracy per solution and the largest gap."""
    meta, ref = (json.loads((p / "landscape.json").read_text()) for p in (out, reference))
    command = meta["command"].replace(str(ROOT) + "/", "")
    lines = [
        f"### The same MiniLM through `--model hf:` ({meta['dataset']})",
        "",
        f"`{command}` (the installed MiniLM folder as an ordinary Hugging Face model folder: `AutoModel` + mean "
        f"pooling + a linear head, default targets of the BERT family; it truncates at `--cutoff-len` 256 tokens "
        f"where the built-in entry truncates at 32, which changes a few long glosses), beside the built-in "
        f"`{ref['model']}`:",
        "",
        "| solution | test accuracy, built-in | test accuracy, hf: | difference |",
        "|---|---:|---:|---:|",
    ]
    gaps = []
    for key in ("head_only", "ft", "lora", "randlora"):
        a, b = ref["solutions"][key]["test_accuracy"], meta["solutions"][key]["test_accuracy"]
        gaps.append(abs(a - b))
        lines.append(f"| {LABELS[key]} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    verdict = "within" if max(gaps) <= HF_TOLERANCE else "NOT within"
    lines += ["", f"Largest difference {max(gaps):.4f}: {verdict} {HF_TOLERANCE} of the built-in entry "
              f"({meta['solutions']['ft']['trainable_params']:,} vs {ref['solutions']['ft']['trainable_params']:,} "
              "trainable parameters in full fine-tuning).", ""]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------ beyond the plane

# Full sections that get the "Beyond the plane" analyses (the compared hf: run does not).
BEYOND = ("wordnet", "fashion-mnist")
PLANE_CENTER = "randlora"  # the 2-D random plane's centre; the 1-D lines are centred on each of TRIO
CURVATURE_ARGV = ["--samples", "64", "--trace-probes", "10", "--slq-probes", "1", "--slq-steps", "20"]
CURVE_PAIR = ("ft", "lora")


def random_outputs(name: str, runs: Path) -> dict[str, Path]:
    """Where the random charts of run ``name`` go: ``plane`` and one 1-D line per centre of TRIO."""
    return {"plane": runs / f"{name}-random", **{c: runs / f"{name}-random-line-{c}" for c in TRIO}}


def random_argv(argv: list[str], run: Path, chart: str, center: str) -> list[str]:
    """The connectivity command of a random chart around one of the run's trained solutions (never retrained)."""
    solutions = [f"{s}={run / 'solutions' / s}" for s in TRIO]
    return [*argv, "--chart", chart, "--center", center, "--solutions", *solutions, "--path-points", "0"]


def curvature_argv(run: Path) -> list[str]:
    return ["--run", str(run), *CURVATURE_ARGV, "--no-progress"]


def curve_argv(run: Path) -> list[str]:
    return ["--run", str(run), "--pair", ",".join(CURVE_PAIR), "--no-progress"]


def _shown(prog: str, argv: list[str]) -> str:
    """A command as the gallery shows it: paths inside the repository relative to it."""
    return " ".join([f"python -m {prog}", *argv]).replace(str(ROOT) + "/", "")


def made_by_set(out: Path, argv: list[str]) -> bool:
    """Whether the run in ``out`` was made by the set's command ``argv`` (the analyses' settings are the set's)."""
    return _made_by(json.loads((out / "landscape.json").read_text()), argv)


def _made_by(meta: dict, argv: list[str]) -> bool:
    words = meta["command"].split()[3:]  # after python -m PROG
    if "--out" in words:
        i = words.index("--out")
        del words[i : i + 2]
    return [w for w in words if w != "--no-progress"] == resolve_argv(argv)


def _seed_head_only(run: Path, out: Path) -> None:
    """Copy the run's head-only baseline into a random chart's folder: the job reuses it when its training key
    matches (it checks), instead of training the baseline again for every chart."""
    source, target = run / "solutions" / "head_only", out / "solutions" / "head_only"
    if source.is_dir() and not target.exists():
        with atomic_folder(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)


def _curvature_done(path: Path) -> bool:
    """curvature.json complete and made with the gallery's settings (another --samples or probes: recompute)."""
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    wanted = dict(zip(CURVATURE_ARGV[2::2], CURVATURE_ARGV[3::2], strict=True))  # --trace-probes 10 ...
    settings = result.get("settings", {})
    same = all(str(settings.get(k[2:].replace("-", "_"))) == v for k, v in wanted.items())
    return bool(result.get("complete")) and same and str(result.get("eval_samples")) == CURVATURE_ARGV[1]


def _one_draw(out: Path) -> bool:
    """Whether the random chart in ``out`` is from before ``--draws`` (no draws recorded): it is redone."""
    path = out / "landscape.json"
    return path.exists() and "draws" not in json.loads(path.read_text())["chart_geometry"]


def _check(code: int, what: str) -> None:
    if code != 0:
        raise UserError(f"{what} failed (exit {code}): see the message above, fix it and rerun experiments.figures")


def ensure_beyond(name: str, run: Path, runs: Path, force: bool, with_instruments: bool = True) -> None:
    """Run the analyses beyond the plane whose outputs are missing (all of them with ``force``): the random
    plane and lines (landscape.connectivity), the curvature (landscape.curvature: its entries are reused by key
    even then) and the ft-lora curve (landscape.curves)."""
    from landscape import curvature, curves

    argv = resolve_argv(OFFLINE[name])
    for key, out in random_outputs(name, runs).items():
        chart, center = ("random", PLANE_CENTER) if key == "plane" else ("random-line", key)
        _seed_head_only(run, out)
        ensure_run(out.name, random_argv(argv, run, chart, center), runs, force or _one_draw(out))
    if force or not _curvature_done(run / "curvature.json"):
        print(f"[figures] {_shown('landscape.curvature', curvature_argv(run))}", file=sys.stderr)
        _check(curvature.main(curvature_argv(run)), f"the curvature of '{name}'")
    curve_json = run / "curves" / f"{'-'.join(CURVE_PAIR)}.json"
    if force or not curve_json.exists() or _old_barriers(curve_json):
        print(f"[figures] {_shown('landscape.curves', curve_argv(run))}", file=sys.stderr)
        _check(curves.main(curve_argv(run)), f"the {'-'.join(CURVE_PAIR)} curve of '{name}'")
    if with_instruments:
        instruments.ensure(name, run, force, ROOT)  # merges, layer-wise barriers, basins, curvature per block
        ensure_hessian(name, run, runs, force)


def ensure_hessian(name: str, run: Path, runs: Path, force: bool) -> None:
    """The Hessian eigen-direction chart around RandLoRA on the run's solutions (runs/<name>-hessian), when missing
    or older than the solutions."""
    out = instruments.hessian_output(name, runs)
    _seed_head_only(run, out)
    chart = random_argv(resolve_argv(OFFLINE[name]), run, "hessian", instruments.HESSIAN_CENTER)
    ensure_run(out.name, [*chart, "--dtype", instruments.HESSIAN_DTYPE], runs, force or instruments.stale(out, run))


def random_lines_figure(lines: dict[str, dict], directions: dict, title: str, png: Path) -> None:
    """The 1-D random lines through each solution on one axes: loss vs α of draw 0 with its ±SE band, the
    min–max band over every draw of the direction (runs with several draws), and the collapse level."""
    from matplotlib.figure import Figure

    from landscape.render import COLORS

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    draws = all("draw_loss" in d for d in lines.values())
    for c, d in lines.items():
        x, loss, se = d["x"], d["loss"][0], d["loss_se"][0]
        if draws:
            ax.fill_between(x, d["draw_loss_min"][0], d["draw_loss_max"][0], color=COLORS[c], alpha=0.15, linewidth=0)
        ax.fill_between(x, loss - se, loss + se, color=COLORS[c], alpha=0.3, linewidth=0)
        ax.plot(x, loss, "o-", color=COLORS[c], markersize=3.5, label=f"{LABELS[c]} (θ* + α·δ, draw 0)")
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    if draws and np.isfinite(level := float(next(iter(lines.values()))["collapse_level"])):
        ax.axhline(level, color="0.3", linewidth=0.8, linestyle="--", label=f"collapse level {level:.3f}")
    losses = np.concatenate([d["loss"][0] for d in lines.values()])
    log = bool(losses.min() > 0 and losses.max() > 10 * losses.min())  # a basin and walls 10× higher: show both
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(f"α (δ: {directions['norm']}-normalised Gaussian, seed {directions['seed']})")
    count = min(len(d["draw_seeds"]) for d in lines.values()) if draws else 1
    bands = f"dark: ± SE; light: min–max of {count} draws" if draws else "band: ± SE"
    ax.set_ylabel(f"loss ({'log scale; ' if log else ''}{bands})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def _copy(source: Path, target: Path) -> Path:
    write_with(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def _trained(meta: dict) -> list[str]:
    """Solutions a connectivity run trained itself (not given, not reused from its folder)."""
    reused = set(meta.get("reused_stages") or [])
    return [k[len("train_") :] for k in meta["wall_time_s"] if k.startswith("train_") and k not in reused]


def _random_part(name: str, run: Path, runs: Path, figures: Path) -> str:
    outs = random_outputs(name, runs)
    if not all((o / "landscape.json").exists() for o in outs.values()):
        return ""
    metas = {k: json.loads((o / "landscape.json").read_text()) for k, o in outs.items()}
    lines = {c: dict(np.load(outs[c] / "landscape.npz")) for c in TRIO}
    argv = resolve_argv(OFFLINE[name])
    plane_cmd = _shown("landscape.connectivity", [*random_argv(argv, run, "random", PLANE_CENTER), "--out",
                                                  str(outs["plane"])])  # fmt: skip
    line_cmd = _shown("landscape.connectivity", [*random_argv(argv, run, "random-line", "C"), "--out",
                                                 str(runs / f"{name}-random-line-C")])  # fmt: skip
    minutes = {k: m.get("wall_time_total_s", sum(m["wall_time_s"].values())) / 60 for k, m in metas.items()}
    trained = sorted({s for m in metas.values() for s in _trained(m)})
    directions = metas[TRIO[0]]["chart_geometry"]["directions"]
    plane_png = _copy(outs["plane"] / "landscape.png", figures / f"{name}_random_plane.png")
    lines_png = figures / f"{name}_random_lines.png"
    title = f"{metas['plane']['model']} on {metas['plane']['dataset']}: random lines (Li et al. 2018)"
    random_lines_figure(lines, directions, title, lines_png)
    retrained = ", ".join(LABELS[s] for s in trained) if trained else "nothing"
    text = [
        f"**Random directions** (Li et al. 2018). A random plane around {LABELS[PLANE_CENTER]}: `{plane_cmd}` "
        f"({minutes['plane']:.1f} min); a random line through each solution: `{line_cmd}` for C = "
        f"{', '.join(TRIO)} (" + ", ".join(f"{minutes[c]:.1f}" for c in TRIO) + " min). The three solutions are "
        f"the run's, loaded from its folder; trained again for these charts: {retrained}.",
        "",
        f"![{name} random plane]({_rel(plane_png)})",
        "",
        f"![{name} random lines]({_rel(lines_png)})",
        "",
    ]
    plane = dict(np.load(outs["plane"] / "landscape.npz"))
    run_meta = json.loads((run / "landscape.json").read_text())
    readings = [*plane_readings(metas["plane"], plane)]
    if plane_draw_reading(metas["plane"]):
        readings.append(plane_draw_reading(metas["plane"]))
    if all("draw_loss" in d for d in lines.values()):  # every draw kept: sharpness with its spread
        readings += [*draw_readings(lines), centre_check(lines, run_meta), ends_vs_level(lines)]
    else:  # a run from before --draws: one draw
        readings += [*rise_readings(lines, directions), centre_check(lines, run_meta)]
        if run_meta.get("classes"):
            readings.append(ends_vs_chance(lines, len(run_meta["classes"])))
    return "\n".join(text + [f"- {r}" for r in readings] + [""])


def _curvature_part(name: str, run: Path, figures: Path) -> str:
    if not _curvature_done(run / "curvature.json"):
        return ""
    result = json.loads((run / "curvature.json").read_text())
    png = _copy(run / "curvature.png", figures / f"{name}_curvature.png")
    text = [
        "**Curvature** at each solution (the Hessian of the run's loss on its evaluation samples): "
        f"`{_shown('landscape.curvature', curvature_argv(run))}`.",
        "",
        f"![{name} curvature]({_rel(png)})",
        "",
    ]
    return "\n".join(text + [f"- {r}" for r in curvature_readings(result)] + [""])


def _curve_part(name: str, run: Path, figures: Path) -> str:
    pair = "-".join(CURVE_PAIR)
    folder = run / "curves"
    if not (folder / f"{pair}.json").exists():
        return ""
    png = _copy(folder / f"{pair}.png", figures / f"{name}_curve_{pair}.png")
    text = [
        f"**A curve between {LABELS[CURVE_PAIR[0]]} and {LABELS[CURVE_PAIR[1]]}** (Garipov et al. 2018): "
        f"`{_shown('landscape.curves', curve_argv(run))}`.",
        "",
        f"![{name} curve {pair}]({_rel(png)})",
        "",
    ]
    readings = curve_readings(json.loads((folder / f"{pair}.json").read_text()), dict(np.load(folder / f"{pair}.npz")))
    return "\n".join(text + [f"- {r}" for r in readings] + [""])


def beyond_section(name: str, run: Path, runs: Path, figures: Path) -> str:
    """The "Beyond the plane" part of a full section, from the analyses' outputs that exist ('' when none)."""
    parts = [p for p in (_random_part(name, run, runs, figures), _curvature_part(name, run, figures),
                         _curve_part(name, run, figures)) if p]  # fmt: skip
    if not parts:
        return ""
    head = [
        "#### Beyond the plane",
        "",
        "Three analyses that leave the plane through the three solutions, each rerun by `python -m "
        "experiments.figures` when its outputs are missing; every reading below comes from their JSON / NPZ files.",
        "",
    ]
    return "\n".join(head + parts)


def rewrite_readme(text: str, readme: Path, markers: tuple[str, str] = (START, END), what: str = "the gallery") -> None:
    body = readme.read_text()
    start, end = markers
    if start not in body or end not in body:
        raise UserError(f"{readme} has no {start} … {end} markers: add them where {what} goes")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text(readme, f"{head}{start}\n{text}\n{end}{tail}")


def _runs_minutes(run: Path, runs: Path) -> float:
    """The recorded stage time of a full section's run and of its random charts (minutes; the curvature and the
    curve record no total)."""
    metas = [run / "landscape.json", *(o / "landscape.json" for o in random_outputs(run.name, runs).values())]
    total = sum((m := json.loads(p.read_text())).get("wall_time_total_s", sum(m["wall_time_s"].values()))
                for p in metas if p.exists())  # fmt: skip
    return total / 60


def claims_text(runs: Path, seconds: float, budget: float) -> str:
    """The claims table over the full sections' runs that exist, its caption stating the wall times."""
    tasks, commands, minutes, missing = {}, [], 0.0, []
    for name in BEYOND:
        out = runs / name
        if not ((out / "landscape.json").exists() and (out / "spectrum.json").exists()):
            missing.append(name)
        else:
            meta = json.loads((out / "landscape.json").read_text())
            tasks[f"{meta['model']} on {meta['dataset']}"] = (meta, json.loads((out / "spectrum.json").read_text()))
            commands.append(f"`{meta['command'].replace(str(ROOT) + '/', '')}` ({meta['device']}, "
                            f"{_seeds_text(claims.seeds_of(meta))})")  # fmt: skip
            minutes += _runs_minutes(out, runs)
    if not tasks:
        return "No run of the set to test the claims on yet: run `python -m experiments.figures`."
    within = "within" if seconds / 60 <= budget else "OVER"
    caption = (
        f"Measured on {'; '.join(commands)}. The last `python -m experiments.figures` took "
        f"{seconds / 60:.1f} min ({within} its budget of {budget:g} min, `--budget-minutes`); the stages of "
        f"these runs and their random charts took {minutes:.1f} min in all when they were computed."
        + (f" Not measured yet: {', '.join(missing)} (its run is not finished; rerun the command)." if missing else "")
    )
    return claims.table(tasks, caption)


def _run(argv: Sequence[str] | None) -> None:
    p = Parser(prog="python -m experiments.figures", description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs"), help="where the runs live (default: runs/)")
    p.add_argument("--paper", action="store_true", help="add the CLIP paper runs (needs their data and weights)")
    p.add_argument("--force", action="store_true", help="rerun even when a run's outputs exist")
    p.add_argument("--only", nargs="+", default=None, help="only these runs (names of the set)")
    p.add_argument("--figures", default=str(ROOT / "figures"), help="where the figures go (default: figures/)")
    p.add_argument("--gallery", default=str(ROOT / "docs" / "gallery.md"), help="page whose gallery is rewritten")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose claims table is rewritten")
    p.add_argument("--claims-page", default=str(ROOT / "docs" / "claims.md"), help="docs page of the claims table")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of the full sections' runs (default 3)")
    p.add_argument("--budget-minutes", type=float, default=360.0, help="wall-time budget stated with the claims")
    p.add_argument("--skip-instruments", action="store_true",
                   help="do not run the Instruments part's recipes (merges, layer-wise, basins, blocks, Hessian chart; "
                   "hours on the CPU): their sections show the outputs that exist")  # fmt: skip
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.seeds < 1 or args.budget_minutes <= 0:
        raise UserError("--seeds must be at least 1 and --budget-minutes above 0: pass e.g. --seeds 3")
    gallery = Path(args.gallery)
    if not gallery.is_file() or START not in (body := gallery.read_text()) or END not in body:  # before hours of runs
        raise UserError(f"{gallery} has no {START} … {END} markers: add them where the gallery goes")
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    every = todo = {**OFFLINE, **(PAPER if args.paper else {})}
    if args.only:
        unknown = sorted(set(args.only) - set(todo))
        if unknown:
            raise UserError(f"unknown run(s) {', '.join(unknown)}: choose from {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only}
    parts = []
    for name in every:
        run_argv = set_argv(name, args.seeds)
        out = Path(args.runs) / name
        if name in todo:
            out = ensure_run(name, run_argv, Path(args.runs), args.force)
            if name in BEYOND and made_by_set(out, run_argv):  # a run of other settings gets no such part
                ensure_beyond(name, out, Path(args.runs), args.force, with_instruments=not args.skip_instruments)
        elif not (out / "landscape.json").exists():
            continue  # --only left out a run that does not exist: no section for it
        if name in COMPARED:
            parts.append(comparison(name, out, Path(args.runs) / COMPARED[name]))
        else:
            parts.append(section(name, out, figures))  # --only reruns its runs; the others keep their section
    rewrite_readme("\n".join(parts), gallery)
    seconds = time.perf_counter() - started
    table = None
    for page in (Path(args.readme), Path(args.claims_page)):  # the same table in the README and in the docs
        if page.is_file() and claims.START in page.read_text():  # a page without the claims markers gets no table
            table = table or claims_text(Path(args.runs), seconds, args.budget_minutes)
            rewrite_readme(table, page, (claims.START, claims.END), "the claims table")
        else:
            print(f"[figures] {page} has no {claims.START} marker: no claims table written", file=sys.stderr)
    if seconds / 60 > args.budget_minutes:
        print(
            f"[figures] over budget: {seconds / 60:.1f} min > --budget-minutes {args.budget_minutes:g}", file=sys.stderr
        )
    print(f"[figures] wrote figures/ and the gallery in {gallery} ({', '.join(todo)})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_run, argv, "python -m experiments.figures")


if __name__ == "__main__":
    sys.exit(main())
