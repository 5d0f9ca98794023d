"""python -m landscape.layerwise — layer-wise linear mode connectivity (Adilova et al., ICLR 2024): which blocks
of the model hold the barrier between two solutions.

For two solutions A and B and one **block** b of parameters (``--blocks layer``, the default: one transformer
layer, all its weights, with the parameters outside every layer grouped as ``embeddings`` and ``head``;
``--blocks module``: per layer and module kind, attention / mlp / norm), only b is interpolated:

- rest held at A: ``θ(t) = θ_A + t·M_b·(θ_B − θ_A)``; at t = 0 this is A, at t = 1 A with b taken from B;
- rest held at B: ``θ(t) = θ_B + (1 − t)·M_b·(θ_A − θ_B)``; at t = 0 B with b taken from A, at t = 1 B;

(M_b keeps b's entries), each for ``--points`` values of t in [0, 1]. Each path's chord barrier
max_t L(θ(t)) − ((1 − t)·L(θ(0)) + t·L(θ(1))) and its standard error paired over the evaluation samples are
:func:`landscape.paths.barriers_with_se`'s, on the paths' evaluation set, objective and precision. Only the blocks
A and B differ in are walked (a parameter neither solution changes is the same in both). Per pair the ``whole``
path (every block at once) is the straight path of ``paths.json``. The ends θ_A and θ_B are evaluated once per pair
and shared by the paths that hold them.

**Output** (under ``--out``, default the run folder; each file written atomically):

  layerwise.json  ``pairs``: per pair ``A-B``: ``whole`` and ``blocks`` → block → ``rest_at_A`` / ``rest_at_B``
                  → {``barrier``, ``barrier_se``, ``t_max``, ``loss`` (per t), ``loss_se``, ...}; ``t``, the
                  settings, the run's ``training_seed``, precision and evaluation set (``eval``: the digest of
                  its batches, :func:`landscape.engine.grid.eval_fingerprint`), ``passes``, ``seconds``
  layerwise.npz   ``barrier`` / ``barrier_se`` (pairs, blocks, 2 sides; NaN for a block a pair does not change),
                  ``loss`` (pairs, blocks, 2, points), ``t``, ``pairs``, ``blocks``, ``sides``
  layerwise.png / layerwise.pdf   barrier / SE per block × (pair, side) as a heatmap, the barriers in the cells
"""

from __future__ import annotations

import copy
import itertools
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES, Classification
from adapters.progress import progress_bar
from landscape.engine import store
from landscape.engine.grid import EvalSet, PlaneEvaluator, eval_fingerprint
from landscape.engine.plane import SOLUTIONS, Chart
from landscape.paths import CHORD_BARRIER_DEFINITION, barriers_with_se, pair_name

PROG = "python -m landscape.layerwise"
FORMAT = 1
GROUPINGS = ("layer", "module")
SIDES = ("rest_at_A", "rest_at_B")
FILES = tuple(f"layerwise.{ext}" for ext in ("json", "npz", "png", "pdf"))
DEFINITIONS = {
    "rest_at_A": "theta_A + t * M_b * (theta_B - theta_A): block b goes from A to B, the rest stays at A",
    "rest_at_B": "theta_B + (1 - t) * M_b * (theta_A - theta_B): block b goes from A to B, the rest stays at B",
    "barrier": CHORD_BARRIER_DEFINITION + " along the path; barrier_se paired over the evaluation samples",
    "whole": "every block at once: the straight path of paths.json",
}
# a stack of layers: BERT's encoder.layer.N, GPT-2's h.N, LLaMA's layers.N, ViT's blocks.N, EfficientNet's _blocks.N
LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|_?blocks|block)\.(\d+)\.")
KINDS = (("attention", ("attention", "attn", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")),
         ("norm", ("layernorm", "layer_norm", "norm", "ln_")),
         ("mlp", ("mlp", "intermediate", "output", "ffn", "fc", "gate", "up_proj", "down_proj")))  # fmt: skip

__all__ = ["GROUPINGS", "block_of", "blocks_of", "compute_layerwise", "default_pairs", "main", "write_layerwise"]


def block_of(name: str, grouping: str = "layer") -> str:
    """The block of parameter ``name``: ``layer N`` for a transformer layer's weights (``layer N attention`` /
    ``mlp`` / ``norm`` / ``other`` by module kind), else ``embeddings`` or ``head``."""
    m = LAYER.search(name)
    if m is None:
        return "embeddings" if any(k in name.lower() for k in ("embed", "wte", "wpe")) else "head"
    block = f"layer {int(m.group(1))}"
    if grouping == "layer":
        return block
    rest = name[m.end() :].lower()  # the kind from the module path inside the layer (norm before "output")
    kind = next((k for k, words in KINDS if any(w in rest for w in words)), "other")
    return f"{block} {kind}"


def _order(block: str) -> tuple:
    """embeddings, the layers by number, the head: the order of the figure's rows."""
    m = re.match(r"layer (\d+)(.*)", block)
    return (0, "", block) if m is None and block == "embeddings" else (2, "", block) if m is None else (
        1, int(m.group(1)), m.group(2))  # fmt: skip


def blocks_of(names: Sequence[str], grouping: str = "layer") -> dict[str, list[str]]:
    """{block: its parameter names}, blocks in model order (:func:`_order`)."""
    if grouping not in GROUPINGS:
        raise UserError(f"--blocks {grouping}: choose from {', '.join(GROUPINGS)}")
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(block_of(n, grouping), []).append(n)
    return {b: out[b] for b in sorted(out, key=_order)}


def default_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair of ``names``, in order."""
    return list(itertools.combinations(names, 2))


def _differs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], n: str) -> bool:
    if n in a and n in b:
        return not torch.equal(a[n], b[n])
    return bool(torch.any((a.get(n) if n in a else b[n]) != 0))


def compute_layerwise(
    base, solutions: Mapping, eval_set: EvalSet, device, pairs: Sequence[tuple[str, str]] | None = None,
    points: int = 5, grouping: str = "layer", dtype: str = "float32",
    objective: Classification = OBJECTIVES["classification"], progress: bool = True,
) -> dict:  # fmt: skip
    """The layer-wise paths of every pair in ``pairs`` (default: every pair of ``solutions``) and their barriers
    (module docstring). ``solutions``: {name: anything with ``delta()`` → {parameter: ΔW}}. ``base``'s weights are
    not modified (one working copy is)."""
    if points < 2:
        raise UserError(f"--points {points}: a path needs at least 2 points (0 and 1): try 5")
    if grouping not in GROUPINGS:
        raise UserError(f"--blocks {grouping}: choose from {', '.join(GROUPINGS)}")
    pairs = [tuple(p) for p in (pairs or default_pairs(list(solutions)))]
    for a, b in pairs:
        if a == b or a not in solutions or b not in solutions:
            raise UserError(f"--pair {a} {b}: two different solutions of {', '.join(solutions)}")
    from adapters.quant import packed_names

    if packed_names(base):
        raise UserError("layer-wise paths write weights into the base, which a packed 4-bit base cannot hold: "
                        "run without --load-4bit")  # fmt: skip
    start = time.perf_counter()
    t = np.linspace(0.0, 1.0, points)
    w0 = {n: p.detach().float() for n, p in base.named_parameters()}
    deltas = {s: {n: d.float() for n, d in solutions[s].delta().items()} for s in {x for p in pairs for x in p}}
    touched = sorted(set().union(*deltas.values()))  # every chart sets all of these: none keeps an old value
    model = copy.deepcopy(base)
    passes = 0
    zero = torch.zeros((), dtype=torch.float32)

    def theta(s: str) -> dict[str, torch.Tensor]:
        return {n: w0[n] + deltas[s][n] if n in deltas[s] else w0[n] for n in touched}

    def walk(origin, u, ts, name):
        nonlocal passes
        chart = Chart(name, origin, u, dict.fromkeys(origin, zero), {})
        ev = PlaneEvaluator(model, chart, eval_set, device, dtype, 1, objective)
        out = list(ev.evaluate_iter(((float(x), 0.0) for x in ts), keep_samples=True))
        passes += len(out)
        return out

    result_pairs = {}
    total = sum(len(t) - 2 + 2 * len(_pair_blocks(deltas, a, b, grouping)) * (len(t) - 1) + 2 for a, b in pairs)
    bar = progress_bar(total=total, desc="layerwise", disable=not progress, dynamic_ncols=True)
    for a, b in pairs:
        ta, tb = theta(a), theta(b)
        ends = walk(ta, {n: tb[n] - ta[n] for n in touched}, [0.0, 1.0], f"{a}-{b}")  # θ_A, θ_B: shared
        bar.update(2)
        blocks = _pair_blocks(deltas, a, b, grouping)
        whole = _path(t, ends[0], ends[1], walk(ta, {n: tb[n] - ta[n] for n in touched}, t[1:-1], "whole"))
        bar.update(len(t) - 2)
        entry = {"whole": whole, "blocks": {}}
        for block, names in blocks.items():
            inside = set(names)
            to_b = {n: tb[n] - ta[n] if n in inside else zero for n in touched}
            rest_a = walk(ta, to_b, t[1:], f"{block} rest at {a}")  # t = 0 is θ_A
            # rest at B, the block from A to B: origin θ_B with the block at A, moving by +t·(θ_B − θ_A) on it
            origin_b = {n: ta[n] if n in inside else tb[n] for n in touched}
            rest_b = walk(origin_b, to_b, t[:-1], f"{block} rest at {b}")  # t = 1 is θ_B
            entry["blocks"][block] = {"parameters": len(names), "rest_at_A": _path(t, ends[0], None, rest_a),
                                      "rest_at_B": _path(t, None, ends[1], rest_b)}  # fmt: skip
            bar.update(2 * (len(t) - 1))
            bar.set_postfix(pair=f"{a}-{b}", block=block)
        result_pairs[pair_name(a, b)] = entry
    bar.close()
    return {"t": t, "pairs": result_pairs, "grouping": grouping, "points": len(t), "eval_samples": eval_set.n,
            "eval": eval_fingerprint(eval_set), "passes": passes,
            "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def _pair_blocks(deltas, a: str, b: str, grouping: str) -> dict[str, list[str]]:
    """The blocks in which A and B differ, with the parameters of each they differ in."""
    names = sorted(set(deltas[a]) | set(deltas[b]))
    return blocks_of([n for n in names if _differs(deltas[a], deltas[b], n)], grouping)


def _path(t: np.ndarray, first, last, middle: Sequence) -> dict:
    """One path's barrier and losses from its results at t (``first`` / ``last``: a known end, or None when
    ``middle`` holds it)."""
    results = ([first] if first is not None else []) + list(middle) + ([last] if last is not None else [])
    loss = np.array([r.loss for r in results], dtype=np.float64)
    info = barriers_with_se(t, loss, [r.samples for r in results])
    keep = ("barrier", "barrier_se", "t_max", "loss_max", "loss_t0", "loss_t1")
    return {**{k: info[k] for k in keep}, "loss": loss.tolist(), "loss_se": [float(r.loss_se) for r in results],
            "accuracy": [r.accuracy for r in results]}  # fmt: skip


# --------------------------------------------------------------------------- outputs


def arrays(result: Mapping) -> dict[str, np.ndarray]:
    """The npz arrays: barrier / barrier_se (pairs, blocks, sides), loss (pairs, blocks, sides, points)."""
    pairs = list(result["pairs"])
    blocks = sorted({b for e in result["pairs"].values() for b in e["blocks"]}, key=_order)
    shape = (len(pairs), len(blocks), len(SIDES))
    out = {k: np.full(shape, np.nan) for k in ("barrier", "barrier_se")}
    out["loss"] = np.full((*shape, len(result["t"])), np.nan)
    for i, p in enumerate(pairs):
        for j, b in enumerate(blocks):
            for k, side in enumerate(SIDES):
                path = result["pairs"][p]["blocks"].get(b, {}).get(side)
                if path is not None:
                    out["barrier"][i, j, k], out["barrier_se"][i, j, k] = path["barrier"], path["barrier_se"]
                    out["loss"][i, j, k] = path["loss"]
    whole = [result["pairs"][p]["whole"] for p in pairs]
    return {**out, "t": np.asarray(result["t"], dtype=np.float64), "pairs": np.array(pairs, dtype=str),
            "blocks": np.array(blocks, dtype=str), "sides": np.array(SIDES),
            "whole_barrier": np.array([w["barrier"] for w in whole], dtype=np.float64),
            "whole_barrier_se": np.array([w["barrier_se"] for w in whole], dtype=np.float64)}  # fmt: skip


def write_layerwise(result: Mapping, out: str | Path, info: Mapping | None = None,
                    title: str = "layer-wise barriers") -> list[Path]:  # fmt: skip
    """layerwise.json, layerwise.npz and the figure under ``out`` (atomically)."""
    from landscape.render.layerwise import layerwise_figure

    out = Path(out)
    meta = {"format": FORMAT, **(dict(info) if info else {}), "t": [float(x) for x in result["t"]],
            **{k: result[k] for k in ("grouping", "points", "eval_samples", "eval", "passes", "seconds")},
            "sides": list(SIDES), "definitions": DEFINITIONS, "pairs": result["pairs"]}  # fmt: skip
    data = arrays(result)
    store.write_npz(out / "layerwise.npz", **data)
    store.write_json(out / "layerwise.json", meta)
    fig = layerwise_figure(data, title)
    store.write_with(out / "layerwise.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    store.write_with(out / "layerwise.pdf", lambda tmp: fig.savefig(tmp, format="pdf"))
    return [out / f for f in FILES]


def layerwise_stage(loaded, solutions: Mapping, eval_set: EvalSet, device, progress: bool = True) -> list[Path]:
    """``--layerwise`` of landscape.connectivity: every pair of the run's ft/lora/randlora, one layer at a time,
    with the defaults, on the plane's evaluation set and precision, written next to landscape.npz."""
    config = loaded.config
    chosen = {s: solutions[s] for s in SOLUTIONS if s in solutions}
    result = compute_layerwise(loaded.task.base, chosen, eval_set, device, None, 5, "layer",
                               config.landscape_dtype(torch.device(device).type), loaded.task.objective,
                               progress)  # fmt: skip
    info = {"dataset": config.dataset, "model": loaded.model_name, "eval_split": config.eval_split,
            "training_seed": config.seed, "seed": config.seed}  # fmt: skip
    title = f"{loaded.model_name} on {config.dataset}: layer-wise barriers"
    return write_layerwise(result, config.out_dir, info, title)


# ----------------------------------------------------------------------------- command line ----


def build_parser():
    from landscape.cli import Parser, add_run_options

    p = Parser(
        prog=PROG,
        description="Layer-wise linear mode connectivity: for each pair of the run's solutions, interpolate one "
        "block (a transformer layer) at a time with the rest held at either solution, and report each path's chord "
        "barrier with its paired standard error on the run's evaluation set (that of paths.json).",
        epilog="Example: python -m landscape.layerwise --run runs/wordnet --pair ft lora --points 5",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                   help="one pair of solutions (default: every pair of ft lora randlora in the run)")  # fmt: skip
    p.add_argument("--points", type=int, default=5, help="values of t in [0, 1] per path, ends included (default: 5)")
    p.add_argument("--blocks", default="layer", choices=GROUPINGS,
                   help="layer: one transformer layer (all its weights) per block; module: per layer and module "
                   "kind (attention, mlp, norm) (default: layer)")  # fmt: skip
    add_run_options(p, "layerwise.{json,npz,png,pdf}")
    return p


def _run(argv: Sequence[str] | None = None) -> None:
    from landscape import run as run_module

    args = build_parser().parse_args(argv)
    if args.points < 2:
        raise UserError(f"--points {args.points}: a path needs at least 2 points (0 and 1): try 5")
    if args.pair is not None and (args.pair[0] == args.pair[1] or any(s not in SOLUTIONS for s in args.pair)):
        raise UserError(f"--pair {' '.join(args.pair)}: two different solutions of {', '.join(SOLUTIONS)}")
    ctx, device = run_module.open_run_from_args(args)
    chosen = [s for s in SOLUTIONS if s in ctx.solutions]
    missing = [s for s in (args.pair or ()) if s not in ctx.solutions]
    if missing:
        raise UserError(f"--pair {' '.join(args.pair)}: the run {args.run} has no {missing[0]} solution")
    if len(chosen) < 2:
        raise UserError(f"the run {args.run} has {len(chosen)} solution(s): layer-wise paths need two")
    config = ctx.loaded.config
    dtype = config.landscape_dtype(device.type)  # the run's precision on this device, as paths.json
    pairs = [tuple(args.pair)] if args.pair else None
    result = compute_layerwise(ctx.base, {s: ctx.solutions[s] for s in chosen}, ctx.eval_set, device, pairs,
                               args.points, args.blocks, dtype, ctx.loaded.task.objective,
                               progress=not args.no_progress)  # fmt: skip
    meta = ctx.meta
    info = {k: meta.get(k) for k in ("dataset", "model", "eval_split")}
    info.update(run=str(ctx.run_dir), training_seed=config.seed, seed=config.seed, device=str(device), dtype=dtype)
    out = Path(args.out) if args.out else ctx.run_dir
    written = write_layerwise(result, out, info, f"{meta.get('model')} on {meta.get('dataset')}: layer-wise barriers")
    print("wrote " + ", ".join(str(p) for p in written))
    for pair, entry in result["pairs"].items():
        w = entry["whole"]
        print(f"{pair}: whole path barrier {w['barrier']:.4f} ± {w['barrier_se']:.4f}")
        for block, e in entry["blocks"].items():
            a, b = e["rest_at_A"], e["rest_at_B"]
            print(f"  {block:<22} rest at A {a['barrier']:.4f} ± {a['barrier_se']:.4f}; "
                  f"rest at B {b['barrier']:.4f} ± {b['barrier_se']:.4f}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import recipe_main

    return recipe_main(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
