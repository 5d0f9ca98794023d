"""The gallery's "Instruments" part of a full section (experiments.figures): issue 23's instruments on the run's own
solutions, each run when its outputs are missing or older than the solutions (again with ``--force``), only for
runs made by the set's own command, like "Beyond the plane":

- merges of the solutions' updates (``python -m landscape.merges --run DIR``: merges.json / .png in the run);
- layer-wise barriers (``python -m landscape.layerwise --run DIR``: every pair, layerwise.json / .png);
- task-metric basins (``python -m landscape.basins --run DIR --eigen-tol 1e-3``: 5 random and the top-2
  eigen-directions, their Lanczos at a looser Ritz tolerance than the Hessian chart's, to fit the budget);
- curvature per block (``python -m landscape.curvature --run DIR --blocks`` with :data:`BLOCKS_ARGV`, fewer probes
  than its defaults and weight coordinates only: blocks.json / .png);
- the Hessian eigen-direction chart around RandLoRA (``--chart hessian --center randlora`` on the run's trained
  solutions, in the sibling folder ``runs/<name>-hessian``, like the random charts; run by
  :func:`experiments.figures.ensure_hessian`, which this module does not import).

Each part copies its figure into ``figures/`` and states its command, its wall time as its outputs record it and
the readings of :mod:`experiments.readings_instruments`.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from adapters.errors import UserError
from adapters.io import write_with
from experiments import readings_instruments as ri

HESSIAN_CENTER = "randlora"
# fp32 evaluation: the chart's check compares the loss's second difference with the eigenvalue, a change of ½λh² ≈ 1 %
# of the loss that bf16 rounding blurs (measured on Fashion-MNIST: the y axis 22 % off in bf16, 12 % in fp32)
HESSIAN_DTYPE = "float32"
# the recipes' own defaults, but for block curvature: 32 samples, 8 trace probes, one 12-step SLQ probe per block,
# a looser Lanczos tolerance and the weights only (comparable across FT, LoRA and RandLoRA), to fit the figures
# run's budget on 2 CPU cores (about 500 Hessian-vector products per task)
BLOCKS_ARGV = ["--samples", "32", "--trace-probes", "8", "--slq-probes", "1", "--slq-steps", "12", "--tol", "1e-2",
               "--coordinates", "weights"]  # fmt: skip
RECIPES = {  # kind: (module, arguments after --run DIR, output stem, heading)
    "merges": ("landscape.merges", [], "merges", "Merges of the solutions' updates"),
    "layerwise": ("landscape.layerwise", [], "layerwise", "Layer-wise barriers"),
    "basins": ("landscape.basins", ["--eigen-tol", "1e-3"], "basins", "Task-metric basins"),
    "blocks": ("landscape.curvature", ["--blocks", *BLOCKS_ARGV], "blocks", "Curvature per block"),
}
SOLUTIONS = ("ft", "lora", "randlora")


def recipe_argv(kind: str, run: Path) -> list[str]:
    return ["--run", str(run), *RECIPES[kind][1], "--no-progress"]


def hessian_output(name: str, runs: Path) -> Path:
    return runs / f"{name}-hessian"


def _solutions_time(run: Path) -> float:
    """The latest modification time of the run's three solutions' files (0 when none)."""
    times = [p.stat().st_mtime for s in SOLUTIONS for p in (run / "solutions" / s).glob("**/*") if p.is_file()]
    return max(times, default=0.0)


def _settings_match(result: dict) -> bool:
    """blocks.json made with :data:`BLOCKS_ARGV` (another --samples, probes or tolerance: recompute)."""
    wanted = dict(zip(BLOCKS_ARGV[0::2], BLOCKS_ARGV[1::2], strict=True))
    settings = result.get("settings", {})
    same = all(float(settings.get(k[2:].replace("-", "_"), "nan")) == float(v) for k, v in wanted.items()
               if k not in ("--samples", "--coordinates"))  # fmt: skip
    return (same and str(result.get("eval_samples")) == wanted["--samples"]
            and list(settings.get("coordinates", [])) == [wanted["--coordinates"]])  # fmt: skip


def done(kind: str, run: Path) -> bool:
    """Whether the run holds the instrument's output, made after its solutions (and, for block curvature, complete
    and with the gallery's settings)."""
    path = run / f"{RECIPES[kind][2]}.json"
    if not path.exists() or path.stat().st_mtime < _solutions_time(run):
        return False
    if kind == "blocks":
        result = json.loads(path.read_text())
        return bool(result.get("complete")) and _settings_match(result)
    return True


def stale(out: Path, run: Path) -> bool:
    """Whether the chart run in ``out`` is older than the run's solutions or evaluated in another precision than
    :data:`HESSIAN_DTYPE` (it is redone)."""
    path = out / "landscape.json"
    if not path.exists():
        return False
    return path.stat().st_mtime < _solutions_time(run) or json.loads(path.read_text()).get("dtype") != HESSIAN_DTYPE


def _shown(root: Path, prog: str, argv: list[str]) -> str:
    """A command as the gallery shows it: paths inside the repository ``root`` relative to it."""
    return " ".join([f"python -m {prog}", *argv]).replace(str(root) + "/", "")


def _rel(root: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _copy(source: Path, target: Path) -> Path:
    write_with(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def ensure(name: str, run: Path, force: bool, root: Path) -> None:
    """Run the recipes whose outputs are missing or stale (all of them with ``force``; block curvature reuses its
    entries by key even then). The Hessian chart is a connectivity run: :func:`experiments.figures.ensure_hessian`."""
    for kind, (module, _, _, heading) in RECIPES.items():
        if force or not done(kind, run):
            argv = recipe_argv(kind, run)
            print(f"[figures] {_shown(root, module, argv)}", file=sys.stderr)
            code = importlib.import_module(module).main(argv)
            if code != 0:
                raise UserError(f"the {heading.lower()} of '{name}' failed (exit {code}): see the message above, fix "
                                "it and rerun experiments.figures")  # fmt: skip


READINGS = {"merges": ri.merge_readings, "layerwise": ri.layerwise_readings, "basins": ri.basin_readings,
            "blocks": ri.block_readings}  # fmt: skip


def _recipe_part(kind: str, name: str, run: Path, figures_dir: Path, root: Path) -> str:
    module, _, stem, heading = RECIPES[kind]
    if not done(kind, run):
        return ""
    result = json.loads((run / f"{stem}.json").read_text())
    png = _copy(run / f"{stem}.png", figures_dir / f"{name}_{stem}.png")
    seconds = ri.seconds_of(kind, result)
    text = [f"**{heading}**: `{_shown(root, module, recipe_argv(kind, run))}` ({ri.time_text(seconds)}).", "",
            f"![{name} {stem}]({_rel(root, png)})", ""]  # fmt: skip
    return "\n".join(text + [f"- {r}" for r in READINGS[kind](result)] + [""])


def _hessian_part(name: str, runs: Path, figures_dir: Path, root: Path) -> str:
    out = hessian_output(name, runs)
    if not (out / "landscape.json").exists():
        return ""
    meta = json.loads((out / "landscape.json").read_text())
    png = _copy(out / "landscape.png", figures_dir / f"{name}_hessian.png")
    command = meta["command"].replace(str(root) + "/", "")
    seconds = ri.seconds_of("hessian", meta)
    text = [f"**Hessian eigen-directions** around {ri.LABELS[HESSIAN_CENTER]} (PyHessian's plane): `{command}` "
            f"({ri.time_text(seconds)}).", "", f"![{name} hessian]({_rel(root, png)})", ""]  # fmt: skip
    readings = ri.hessian_readings(meta, dict(np.load(out / "landscape.npz")))
    return "\n".join(text + [f"- {r}" for r in readings] + [""])


def section(name: str, run: Path, runs: Path, figures_dir: Path, root: Path) -> str:
    """The "Instruments" part of a full section, from the outputs that exist ('' when none); its heading states
    the instruments' total recorded time."""
    parts = [_recipe_part(k, name, run, figures_dir, root) for k in RECIPES]
    parts.append(_hessian_part(name, runs, figures_dir, root))
    parts = [p for p in parts if p]
    if not parts:
        return ""
    total = sum(ri.seconds_of(k, json.loads((run / f"{RECIPES[k][2]}.json").read_text())) for k in RECIPES
                if done(k, run))  # fmt: skip
    if (hessian_output(name, runs) / "landscape.json").exists():
        total += ri.seconds_of("hessian", json.loads((hessian_output(name, runs) / "landscape.json").read_text()))
    head = ["#### Instruments", "",
            "Merges, layer-wise barriers, task-metric basins, curvature per block and the Hessian eigen-direction "
            "chart on the run's own solutions, each rerun by `python -m experiments.figures` when its outputs are "
            f"missing; {ri.time_text(total)} in all as their outputs record it; every reading below comes from their "
            "JSON / NPZ files.", ""]  # fmt: skip
    return "\n".join(head + parts)
