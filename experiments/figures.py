"""python -m experiments.figures — regenerate every figure under figures/ and the README gallery.

Runs the connectivity job for each run of the set whose outputs are missing (offline set:
wordnet + MiniLM and fashion-mnist + EfficientNet-Lite0; ``--paper`` adds the CLIP runs of
experiments/paper when their data and weights are present), copies the figures into
``figures/`` and rewrites the README section between the gallery markers with the measured
numbers read from each run's JSON files. Nothing in the gallery is typed by hand.

The full sections of the offline set (not the compared ``hf:`` run) also get "Beyond the plane": a random
plane around RandLoRA and a random line through each solution (``--chart random`` / ``random-line`` on the
run's trained solutions, in sibling folders ``runs/<name>-random*``), the curvature at each solution
(:mod:`landscape.curvature`, ``curvature.json`` in the run) and a trained ft–lora curve
(:mod:`landscape.curves`, ``curves/`` in the run). Each is run when its outputs are missing (again with
``--force``), only for runs made by the set's own command, and read back with its standard errors.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.errors import UserError
from adapters.io import atomic_folder, write_text, write_with
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
LABELS = {"head_only": "head only (baseline)", "ft": "full fine-tuning", "lora": "LoRA", "randlora": "RandLoRA"}


def resolve_argv(argv: list[str]) -> list[str]:
    """``hf:MINILM`` stands for the installed MiniLM folder (an ordinary Hugging Face model folder)."""
    from adapters.models import minilm

    return [f"hf:{minilm.model_path()}" if a == "hf:MINILM" else a for a in argv]


def ensure_run(name: str, argv: list[str], runs: Path, force: bool) -> Path:
    argv = resolve_argv(argv)
    out = runs / name
    if force or not (out / "landscape.json").exists():
        print(f"[figures] running {' '.join(argv)} --out {out}", file=sys.stderr)
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
        f"{meta['device']} ({meta['dtype']}), seed {meta['seed']}.",
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
    return "\n".join(lines)


NOISE_SE = 2.0  # a difference counts as measured when it exceeds 2 standard errors


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


def readings(meta: dict, spec: dict) -> list[str]:
    sols = meta["solutions"]
    out = []
    base = sols["head_only"]["test_accuracy"]
    n_test = meta.get("test_samples")
    beat = [k for k in ("ft", "lora", "randlora") if sols[k]["test_accuracy"] > base]
    line = (
        f"{len(beat)} of 3 solutions beat the head-only baseline's test accuracy ({base:.4f}): "
        f"{', '.join(LABELS[k] for k in beat) or 'none'}"
    )
    if n_test:  # binomial standard error of each accuracy on n_test samples
        se = {k: (sols[k]["test_accuracy"] * (1 - sols[k]["test_accuracy"]) / n_test) ** 0.5 for k in sols}
        noisy = [
            LABELS[k]
            for k in beat
            if sols[k]["test_accuracy"] - base < NOISE_SE * (se[k] ** 2 + se["head_only"] ** 2) ** 0.5
        ]
        line += (
            f" ({n_test} test samples; within noise: {', '.join(noisy)})"
            if noisy
            else f" ({n_test} test samples; each by more than 2 SE)"
        )
    out.append(line + ".")
    out.append(_depth(sols, meta.get("vertex_gap_se") or {}))
    layers = spec["layers"]
    r_lora = sols["lora"]["rank"]
    lora_ranks = [layer["lora"]["rank"] for layer in layers]
    rl_ranks = [layer["randlora"]["rank"] for layer in layers]
    full = [min(layer["shape"]) for layer in layers]
    out.append(
        f"LoRA (r = {r_lora}): numerical rank of ΔW {min(lora_ranks)}–{max(lora_ranks)} over "
        f"{len(layers)} layers (never above r: {all(r <= r_lora for r in lora_ranks)})."
    )
    out.append(
        f"RandLoRA (r = {sols['randlora']['rank']}): numerical rank {min(rl_ranks)}–{max(rl_ranks)} "
        f"(full rank is {min(full)}–{max(full)}); mean effective rank "
        + ", ".join(
            f"{LABELS[k]} {np.mean([layer[k]['effective_rank'] for layer in layers]):.1f}"
            for k in ("ft", "lora", "randlora")
        )
        + "."
    )
    out += _similarity(layers, r_lora)
    geo = meta.get("chart_geometry", {}).get("distances")
    if geo:
        out.append("Weight-space distances: " + ", ".join(f"{k} {v:.2f}" for k, v in geo.items()) + ".")
    if meta.get("paths"):
        out.append(_barriers(meta["paths"]))
    check = meta.get("bf16_check")
    if check:
        verdict = "below" if check["bf16_below_smallest_gap"] else "NOT below"
        out.append(
            f"bf16 vs fp32 at the vertices: max difference {check['max_abs_diff_bf16_vs_fp32']:.2g}, {verdict} the "
            f"smallest vertex-loss gap ({check['smallest_vertex_loss_gap']:.2g})."
        )
    return out


def _within(diff: float, se: float) -> bool:
    return abs(diff) <= NOISE_SE * se


def _depth(sols: dict, gap_se: dict) -> str:
    """The vertex losses in order, each step marked '<' when it exceeds 2 standard errors of the paired
    difference (same evaluation samples), else '≈'."""

    def step_se(a: str, b: str) -> float:
        se = gap_se.get(f"{a}-{b}", gap_se.get(f"{b}-{a}"))
        if se is None:  # runs from before the paired errors: the two errors combined, which overstates the noise
            se = ((sols[a].get("vertex_loss_se") or 0.0) ** 2 + (sols[b].get("vertex_loss_se") or 0.0) ** 2) ** 0.5
        return se

    losses = {k: (sols[k]["vertex_loss"], None) for k in ("ft", "lora", "randlora")}
    text, ses, note = _ordered(losses, step_se)
    shown = ", ".join(f"{se:.4f}" for se in ses)
    return f"Depth on the plane (vertex loss, lowest first): {text} (SE of each step, paired: {shown}; {note})."


def _barriers(paths: dict) -> str:
    """Both barriers of each straight path with their paired SE, each marked "within noise" (2 SE) when so;
    runs from before the chord barrier give the first alone."""
    chord, chord_se = paths.get("chord_barrier") or {}, paths.get("chord_barrier_se") or {}
    parts = []
    for pair, value in paths["barrier"].items():
        text = f"{pair} {_pm(value, (paths.get('barrier_se') or {}).get(pair))}"
        if pair in chord:
            text += f", above the chord {_pm(chord[pair], chord_se.get(pair))}"
        parts.append(text)
    if not chord:
        return "Barriers on the straight paths (max loss − mean endpoint loss, ± paired SE): " + ", ".join(parts) + "."
    return (
        "Barriers on the straight paths (± paired SE; max loss − mean endpoint loss, Frankle et al. 2020, and max "
        "of loss − the chord (1 − t)·L(0) + t·L(1), Entezari et al. 2022): " + "; ".join(parts) + "."
    )


def _similarity(layers: list[dict], k: int) -> list[str]:
    """Which adapter's update is closer to full fine-tuning's, and intruder dimensions, from spectrum.json."""
    out = []
    means = {}
    for method in ("lora", "randlora"):
        curves = [layer[method].get("similarity_to_ft", {}).get("overlap") for layer in layers]
        curves = [c for c in curves if c]
        if curves:
            kk = min(k, min(len(c) for c in curves))
            means[method] = (float(np.mean([c[kk - 1] for c in curves])), kk)
    if len(means) == 2:
        closer = max(means, key=lambda m: means[m][0])
        out.append(
            f"Overlap of the top-{means['lora'][1]} singular subspace with full fine-tuning's (mean over layers; "
            "1 = same subspace): "
            + ", ".join(f"{LABELS[m]} {v:.3f}" for m, (v, _) in means.items())
            + f" — {LABELS[closer]}'s update is closer to full fine-tuning's at this k."
        )
    counts = {}
    for method in ("ft", "lora", "randlora"):
        vals = [layer[method].get("intruders", {}).get("count", {}).get("0.5") for layer in layers]
        vals = [v for v in vals if v is not None]
        if vals:
            counts[method] = sum(vals)
    if counts:
        out.append(
            "Intruder dimensions (top-10 singular vectors of W0 + ΔW with max |cos| < 0.5 to every singular "
            "vector of W0), summed over layers: " + ", ".join(f"{LABELS[m]} {c}" for m, c in counts.items()) + "."
        )
    return out


# ------------------------------------------------------------------------------ beyond the plane

# Full sections that get the "Beyond the plane" analyses (the compared hf: run does not).
BEYOND = ("wordnet", "fashion-mnist")
TRIO = ("ft", "lora", "randlora")
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
    words = json.loads((out / "landscape.json").read_text())["command"].split()[3:]  # after python -m PROG
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


def _check(code: int, what: str) -> None:
    if code != 0:
        raise UserError(f"{what} failed (exit {code}): see the message above, fix it and rerun experiments.figures")


def ensure_beyond(name: str, run: Path, runs: Path, force: bool) -> None:
    """Run the analyses beyond the plane whose outputs are missing (all of them with ``force``): the random
    plane and lines (landscape.connectivity), the curvature (landscape.curvature: its entries are reused by key
    even then) and the ft-lora curve (landscape.curves)."""
    from landscape import curvature, curves

    argv = resolve_argv(OFFLINE[name])
    for key, out in random_outputs(name, runs).items():
        chart, center = ("random", PLANE_CENTER) if key == "plane" else ("random-line", key)
        _seed_head_only(run, out)
        ensure_run(out.name, random_argv(argv, run, chart, center), runs, force)
    if force or not _curvature_done(run / "curvature.json"):
        print(f"[figures] {_shown('landscape.curvature', curvature_argv(run))}", file=sys.stderr)
        _check(curvature.main(curvature_argv(run)), f"the curvature of '{name}'")
    if force or not (run / "curves" / f"{'-'.join(CURVE_PAIR)}.json").exists():
        print(f"[figures] {_shown('landscape.curves', curve_argv(run))}", file=sys.stderr)
        _check(curves.main(curve_argv(run)), f"the {'-'.join(CURVE_PAIR)} curve of '{name}'")


def _pm(value: float, se: float | None, digits: int = 4) -> str:
    """``value ± se``, marked "(within noise)" when within 2 standard errors of zero; the value alone without SE."""
    if se is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}{' (within noise)' if _within(value, se) else ''}"


def _ordered(values: dict[str, tuple[float, float | None]], step_se, fmt: str = ".4f") -> tuple[str, list[float], str]:
    """``values`` {name: (value, se or None)} lowest first, each step '<' beyond 2 SE of the difference, else '≈';
    ``step_se(a, b)`` gives that SE. Returns the text, the steps' SEs and a note on the marks."""
    order = sorted(values, key=lambda k: values[k][0])

    def shown(k: str) -> str:
        value, se = values[k]
        return f"{LABELS[k]} {value:{fmt}}" + ("" if se is None else f" ± {se:{fmt}}")

    text, ses, noisy = shown(order[0]), [], False
    for a, b in zip(order, order[1:], strict=False):
        se = step_se(a, b)
        close = _within(values[b][0] - values[a][0], se)
        ses.append(se)
        noisy |= close
        text += f" {'≈' if close else '<'} {shown(b)}"
    return text, ses, "'≈': within noise (2 SE)" if noisy else "every step larger than 2 SE"


def _at(x: np.ndarray, value: float) -> int:
    hits = np.flatnonzero(np.isclose(x, value, atol=1e-9))
    if not len(hits):
        raise UserError(f"the random line has no point at α = {value:g}: rerun it over the default window [-1, 1]")
    return int(hits[0])


def line_rise(x: np.ndarray, loss: np.ndarray, loss_se: np.ndarray, alpha: float = 1.0) -> tuple[float, float]:
    """Sharpness along a random line: (L(−α) + L(+α))/2 − L(0) and its standard error. Only each point's SE is
    stored, so they combine as if independent; the points share their evaluation samples, and the positive
    correlation that brings makes this an overestimate of the noise."""
    i, j, k = _at(x, -alpha), _at(x, 0.0), _at(x, alpha)
    rise = 0.5 * (loss[i] + loss[k]) - loss[j]
    se = (0.25 * loss_se[i] ** 2 + 0.25 * loss_se[k] ** 2 + loss_se[j] ** 2) ** 0.5
    return float(rise), float(se)


def _rises(lines: dict[str, dict], alpha: float) -> str:
    """The solutions' rises at ±alpha, flattest first, each step marked against 2 SE of the difference."""
    rises = {c: line_rise(d["x"], d["loss"][0], d["loss_se"][0], alpha) for c, d in lines.items()}
    text, ses, note = _ordered(rises, lambda a, b: (rises[a][1] ** 2 + rises[b][1] ** 2) ** 0.5)
    return f"{text} (SE of each step: {', '.join(f'{v:.4f}' for v in ses)}; {note})"


def line_minimum(x: np.ndarray, loss: np.ndarray, loss_se: np.ndarray) -> tuple[float, float, float] | None:
    """None when the line is lowest at its centre α = 0; else (α of the lowest point, L(0) − L(α), its SE)."""
    j, m = _at(x, 0.0), int(np.argmin(loss))
    if m == j:
        return None
    return float(x[m]), float(loss[j] - loss[m]), float((loss_se[j] ** 2 + loss_se[m] ** 2) ** 0.5)


def rise_readings(lines: dict[str, dict], directions: dict) -> list[str]:
    """Readings of the 1-D random lines {centre: landscape.npz content (row 0)}: rises ordered, odd minima."""
    step = float(min(v for v in next(iter(lines.values()))["x"] if v > 0))  # the grid's first step from 0
    out = [
        f"Loss rise at |α| = 1 along a random line through each solution, (L(−1) + L(+1))/2 − L(0) ± SE, flattest "
        f"first: {_rises(lines, 1.0)}; at the first grid step, |α| = {step:g}: {_rises(lines, step)}. The "
        f"directions are {directions['norm']}-normalised Gaussians (Li et al. 2018) with the same seed "
        f"({directions['seed']}) for every centre, rescaled to each solution's own filters, over all "
        f"{directions['elements_moved']:,} weights they move (ignore = {directions['ignore']}); each point's SE is "
        "over the run's evaluation samples and the SEs combine as if independent (the stored files keep no "
        "per-sample losses), which overstates the noise of differences on the same samples."
    ]
    for c, d in lines.items():
        low = line_minimum(d["x"], d["loss"][0], d["loss_se"][0])
        if low is not None:
            out.append(
                f"The line through {LABELS[c]} is lowest at α = {low[0]:+.1f}, not at the solution: "
                f"L(0) − L({low[0]:+.1f}) = {_pm(low[1], low[2])}."
            )
    return out


def centre_check(lines: dict[str, dict], run_meta: dict) -> str:
    """The lines' loss at α = 0 against the run's vertex losses: the same solutions on the same samples."""
    gaps = {
        c: abs(float(d["loss"][0][_at(d["x"], 0.0)]) - run_meta["solutions"][c]["vertex_loss"])
        for c, d in lines.items()
    }
    return (
        f"At α = 0 the lines give the run's vertex losses to within {max(gaps.values()):.1e} (largest difference, "
        f"{LABELS[max(gaps, key=gaps.get)]}): the run's own solutions on its own evaluation samples."
    )


def ends_vs_chance(lines: dict[str, dict], classes: int) -> str:
    """The lines' losses at α = ±1 beside ln C, the cross-entropy of a uniform guess over C classes: a rise that
    ends there measures how soon the model forgets, not how sharp the basin is."""
    ends = [float(d["loss"][0][_at(d["x"], a)]) for d in lines.values() for a in (-1.0, 1.0)]
    return (
        f"At α = ±1 the lines' losses are {min(ends):.3f}–{max(ends):.3f}, against ln {classes} = "
        f"{math.log(classes):.3f} for a uniform guess over the {classes} classes."
    )


def plane_readings(meta: dict, data: dict) -> list[str]:
    """The 2-D random plane: how it was drawn, the loss at its centre and where the grid is lowest."""
    d = meta["chart_geometry"]["directions"]
    x, y, loss, se = data["x"], data["y"], data["loss"], data["loss_se"]
    i0, j0 = _at(y, 0.0), _at(x, 0.0)
    i, j = np.unravel_index(int(np.argmin(loss)), loss.shape)
    where = "at the centre"
    if (i, j) != (i0, j0):  # the centre is not the lowest point: by how much, and is that beyond the noise
        gap = _pm(float(loss[i0, j0] - loss[i, j]), float(np.hypot(se[i0, j0], se[i, j])))
        where = f"at (α, β) = ({x[j]:+.1f}, {y[i]:+.1f}), {gap} below the centre"
    return [
        f"Random plane around {LABELS[d['center']]}: δ, η {d['norm']}-normalised Gaussians, seed {d['seed']}, "
        f"ignore = {d['ignore']}, cosine(δ, η) = {d['cosine']:.1e}; loss at the centre {loss[i0, j0]:.4f} ± "
        f"{se[i0, j0]:.4f}, lowest grid point {where}; over the grid the loss spans {loss.min():.4f}–{loss.max():.4f}."
    ]


def trace_step_se(result: dict, a: str, b: str, coordinates: str = "weights") -> float:
    """Paired standard error of tr H_a − tr H_b: the same Rademacher probes z_i for every solution, so the SE of
    the mean of z_iᵀH_a z_i − z_iᵀH_b z_i (much smaller than the two SEs combined when the Hessians are alike)."""
    za, zb = (
        np.asarray(result["solutions"][s][coordinates]["hutchinson"]["samples"], dtype=np.float64) for s in (a, b)
    )
    if za.shape != zb.shape or len(za) < 2:
        raise UserError("curvature.json entries with different probe counts: rerun landscape.curvature on the run")
    return float((za - zb).std(ddof=1) / len(za) ** 0.5)


def _top(entry: dict) -> str:
    flag = "" if entry.get("eigen", {}).get("converged", True) else " (NOT converged)"
    return f"{max(entry['eigenvalues']):.4g}{flag}"


def curvature_readings(result: dict) -> list[str]:
    """Top eigenvalue and trace per solution in weight coordinates (traces ordered with paired SEs), the adapter
    coordinates' apart (another space), the settings and the time, all from curvature.json."""
    st, sols = result["settings"], result["solutions"]
    weights = {s: sols[s]["weights"] for s in TRIO if "eigenvalues" in sols.get(s, {}).get("weights", {})}
    traces = {s: (e["trace"], e["trace_se"]) for s, e in weights.items()}
    text, ses, note = _ordered(traces, lambda a, b: trace_step_se(result, a, b), ".4g")
    dim = next(iter(weights.values()))["dim"]
    out = [
        f"Settings: the first {result['eval_samples']} of the run's evaluation samples, seed {result['seed']}; top-"
        f"{st['top_k']} eigenvalues by Lanczos (each to {st['tol']:g} relative), the trace by Hutchinson over "
        f"{st['trace_probes']} Rademacher probes, the density by SLQ ({st['slq_probes']} probe × {st['slq_steps']} "
        "steps).",
        f"Weight coordinates (the {dim:,} adapted weights + head, the same space for every solution): top eigenvalue "
        + ", ".join(f"{LABELS[s]} {_top(e)}" for s, e in weights.items())
        + f"; trace, lowest first: {text} (paired SE of each step over the same {st['trace_probes']} probes: "
        + ", ".join(f"{v:.3g}" for v in ses)
        + f"; {note}).",
    ]
    adapter = {s: sols[s]["adapter"] for s in TRIO if "eigenvalues" in sols.get(s, {}).get("adapter", {})}
    if adapter:
        out.append(
            "Adapter coordinates (what each optimiser moves: LoRA's A, B, RandLoRA's λ, γ, each + head; other spaces, "
            "not ranked against the weights): "
            + "; ".join(
                f"{LABELS[s]} ({e['dim']:,}) top eigenvalue {_top(e)}"
                + ("" if e.get("trace") is None else f", trace {e['trace']:.4g} ± {e['trace_se']:.4g}")
                for s, e in adapter.items()
            )
            + "."
        )
    entries = [e for per in sols.values() for e in per.values() if "seconds" in e]
    hvps = sum(e["hvps"] for e in entries)
    out.append(
        f"Wall time {sum(e['seconds'] for e in entries) / 60:.1f} min for {hvps:,} Hessian-vector products over "
        f"{len(entries)} entries ({sum(e['seconds'] for e in entries) / max(hvps, 1):.1f} s each on average)."
    )
    return out


def curve_readings(meta: dict, data: dict | None = None) -> list[str]:
    """Both barriers on the trained curve vs on the straight line (± paired SE), where each path peaks, the curve's
    lowest point (from curves/A-B.npz when given) and the time, from curves/A-B.json."""
    from landscape.render import CURVE_KINDS

    c, line, train = meta["curve"], meta["line"], meta["train"]
    ends = c["t_max"] == line["t_max"] and c["t_max"] in (0.0, 1.0)
    peaks = (
        f"both peak at the end t = {c['t_max']:g}, where this barrier is half the endpoints' gap whatever the path"
        if ends
        else f"peaks at t = {c['t_max']:g} on the curve, {line['t_max']:g} on the line"
    )
    out = [
        f"{CURVE_KINDS.get(meta['kind'], meta['kind'])} {meta['pair']} ({meta['bends']} bends, {train['steps']} "
        f"steps of one t each, lr {train['lr']:g}; {meta['points']} values of t on the {meta['eval_samples']} "
        f"evaluation samples): barrier (max loss − mean endpoint loss) on the curve "
        f"{_pm(c['barrier'], c['barrier_se'])} vs the straight line {_pm(line['barrier'], line['barrier_se'])} "
        f"— {peaks}; above the chord on the curve {_pm(c['chord_barrier'], c['chord_barrier_se'])} vs the line "
        f"{_pm(line['chord_barrier'], line['chord_barrier_se'])}; mean loss along the curve {c['mean_loss']:.4f}, "
        f"along the line {line['mean_loss']:.4f}."
    ]
    if data is not None:
        out += _curve_low(data, c)
    out.append(f"Wall time: training {train['train_seconds'] / 60:.1f} min, evaluation {meta['seconds'] / 60:.1f} min.")
    return out


def _curve_low(data: dict, c: dict) -> list[str]:
    """The curve's lowest point when it is below both endpoints, by how much (SEs of the two points combined as if
    independent: no per-sample losses are stored) — a sign that the endpoints are not at the bottom of their basin."""
    loss, se, t = data["loss"][0], data["loss_se"][0], data["t"]
    m = int(np.argmin(loss))
    if m in (0, len(t) - 1):
        return []
    low = 0 if loss[0] <= loss[-1] else len(t) - 1  # the lower endpoint
    gap, gap_se = float(loss[low] - loss[m]), float(np.hypot(se[low], se[m]))
    return [
        f"The curve dips below both ends: lowest at t = {t[m]:g}, loss {loss[m]:.4f}, "
        f"{_pm(gap, gap_se)} below the lower end (t = {t[low]:g}, {c['loss_t0'] if low == 0 else c['loss_t1']:.4f}; "
        "the two points' SEs combined as if independent, which overstates the noise of a difference on the same "
        "samples)."
    ]


def random_lines_figure(lines: dict[str, dict], directions: dict, title: str, png: Path) -> None:
    """The 1-D random lines through each solution on one axes: loss vs α with ±SE bands."""
    from matplotlib.figure import Figure

    from landscape.render import COLORS

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for c, d in lines.items():
        x, loss, se = d["x"], d["loss"][0], d["loss_se"][0]
        ax.fill_between(x, loss - se, loss + se, color=COLORS[c], alpha=0.25, linewidth=0)
        ax.plot(x, loss, "o-", color=COLORS[c], markersize=3.5, label=f"{LABELS[c]} (θ* + α·δ)")
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    losses = np.concatenate([d["loss"][0] for d in lines.values()])
    log = bool(losses.min() > 0 and losses.max() > 10 * losses.min())  # a basin and walls 10× higher: show both
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(f"α (δ: {directions['norm']}-normalised Gaussian, seed {directions['seed']})")
    ax.set_ylabel(f"loss ({'log scale; ' if log else ''}band: ± SE)")
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
    readings = [
        *plane_readings(metas["plane"], plane),
        *rise_readings(lines, directions),
        centre_check(lines, run_meta),
    ]
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


def rewrite_readme(text: str, readme: Path) -> None:
    body = readme.read_text()
    if START not in body or END not in body:
        raise UserError(f"{readme} has no {START} … {END} markers: add them where the gallery goes")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(readme, f"{head}{START}\n{text}\n{END}{tail}")


def _run(argv: Sequence[str] | None) -> None:
    p = Parser(prog="python -m experiments.figures", description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs"), help="where the runs live (default: runs/)")
    p.add_argument("--paper", action="store_true", help="add the CLIP paper runs (needs their data and weights)")
    p.add_argument("--force", action="store_true", help="rerun even when a run's outputs exist")
    p.add_argument("--only", nargs="+", default=None, help="only these runs (names of the set)")
    p.add_argument("--figures", default=str(ROOT / "figures"), help="where the figures go (default: figures/)")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose gallery is rewritten")
    args = p.parse_args(argv)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    every = todo = {**OFFLINE, **(PAPER if args.paper else {})}
    if args.only:
        unknown = sorted(set(args.only) - set(todo))
        if unknown:
            raise UserError(f"unknown run(s) {', '.join(unknown)}: choose from {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only}
    parts = []
    for name, run_argv in every.items():
        out = Path(args.runs) / name
        if name in todo:
            out = ensure_run(name, run_argv, Path(args.runs), args.force)
            if name in BEYOND and made_by_set(out, run_argv):  # a run of other settings gets no such part
                ensure_beyond(name, out, Path(args.runs), args.force)
        elif not (out / "landscape.json").exists():
            continue  # --only left out a run that does not exist: no section for it
        if name in COMPARED:
            parts.append(comparison(name, out, Path(args.runs) / COMPARED[name]))
        else:
            parts.append(section(name, out, figures))  # --only reruns its runs; the others keep their section
    rewrite_readme("\n".join(parts), Path(args.readme))
    print(f"[figures] wrote figures/ and the README gallery ({', '.join(todo)})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_run, argv, "python -m experiments.figures")


if __name__ == "__main__":
    sys.exit(main())
