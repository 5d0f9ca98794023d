"""python -m experiments.figures — regenerate every figure under figures/ and the README gallery.

Runs the connectivity job for each run of the set whose outputs are missing (offline set:
wordnet + MiniLM and fashion-mnist + EfficientNet-Lite0; ``--paper`` adds the CLIP runs of
experiments/paper when their data and weights are present), copies the figures into
``figures/`` and rewrites the README section between the gallery markers with the measured
numbers read from each run's JSON files. Nothing in the gallery is typed by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.errors import UserError
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
    order = sorted(("ft", "lora", "randlora"), key=lambda k: sols[k]["vertex_loss"])
    text = f"{LABELS[order[0]]} {sols[order[0]]['vertex_loss']:.4f}"
    noisy, shown = False, []
    for a, b in zip(order, order[1:], strict=False):
        se = gap_se.get(f"{a}-{b}", gap_se.get(f"{b}-{a}"))
        if se is None:  # runs from before the paired errors: the two errors combined, which overstates the noise
            se = ((sols[a].get("vertex_loss_se") or 0.0) ** 2 + (sols[b].get("vertex_loss_se") or 0.0) ** 2) ** 0.5
        close = _within(sols[b]["vertex_loss"] - sols[a]["vertex_loss"], se)
        noisy |= close
        shown.append(f"{se:.4f}")
        text += f" {'≈' if close else '<'} {LABELS[b]} {sols[b]['vertex_loss']:.4f}"
    note = "'≈': within noise (2 SE)" if noisy else "every step larger than 2 SE"
    return (
        f"Depth on the plane (vertex loss, lowest first): {text} (SE of each step, paired: {', '.join(shown)}; {note})."
    )


def _barriers(paths: dict) -> str:
    """Both barriers of each straight path with their paired SE, each marked "within noise" (2 SE) when so;
    runs from before the chord barrier give the first alone."""

    def reading(value: float, se: float | None) -> str:
        if se is None:
            return f"{value:.4f}"
        return f"{value:.4f} ± {se:.4f}{' (within noise)' if _within(value, se) else ''}"

    chord, chord_se = paths.get("chord_barrier") or {}, paths.get("chord_barrier_se") or {}
    parts = []
    for pair, value in paths["barrier"].items():
        text = f"{pair} {reading(value, (paths.get('barrier_se') or {}).get(pair))}"
        if pair in chord:
            text += f", above the chord {reading(chord[pair], chord_se.get(pair))}"
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


def rewrite_readme(text: str, readme: Path) -> None:
    body = readme.read_text()
    if START not in body or END not in body:
        raise UserError(f"{readme} has no {START} … {END} markers: add them where the gallery goes")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


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
