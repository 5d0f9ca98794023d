"""``python -m landscape.curvature``: the command line over :func:`landscape.curvature.stage.curvature_stage`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.errors import UserError
from adapters.quant import packed_names
from landscape.curvature.blocks import BLOCK_BY, blocks_stage, check_block_by
from landscape.curvature.settings import (
    COORDINATES,
    DTYPES,
    LANCZOS_VECTORS,
    SOLUTION_CHOICES,
    WEIGHT_SETS,
    CurvatureSettings,
    skip_reason,
)
from landscape.curvature.stage import curvature_stage

PROG = "python -m landscape.curvature"


def build_parser():
    from landscape.cli import Parser, add_run_options, positive_int

    def count(text: str) -> int:  # an integer >= 0 (0 skips)
        import argparse

        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
        return int(text)

    p = Parser(
        prog=PROG,
        description="Curvature of the loss at the solutions of a run (written by landscape.connectivity): top "
        "Hessian eigenvalues (Lanczos), Hessian trace (Hutchinson) and spectral density (SLQ).",
        epilog="Example: python -m landscape.curvature --run runs/wordnet --solutions lora randlora --top-k 5",
    )
    p.add_argument("--run", required=True, help="run folder holding landscape.json and solutions/")
    p.add_argument("--solutions", nargs="+", choices=SOLUTION_CHOICES, default=None,
                   help="solutions to measure (default: those of ft lora randlora the run has)")  # fmt: skip
    p.add_argument("--top-k", type=positive_int, default=5, help="top Hessian eigenvalues (default: 5)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="Lanczos tolerance: each Ritz residual <= tol x |eigenvalue| (default: 1e-3)")  # fmt: skip
    p.add_argument("--lanczos-vectors", type=positive_int, default=LANCZOS_VECTORS,
                   help="most Lanczos vectors held (float64, the coordinates' size) before ARPACK's restarts take "
                   f"over (default: {LANCZOS_VECTORS})")  # fmt: skip
    p.add_argument("--trace-probes", type=count, default=30, help="Hutchinson probes, 0 skips (default: 30)")
    p.add_argument("--slq-probes", type=count, default=2, help="SLQ probes, 0 skips the density (default: 2)")
    p.add_argument("--slq-steps", type=positive_int, default=40, help="Lanczos steps per SLQ probe (default: 40)")
    p.add_argument(
        "--coordinates",
        choices=("weights", "adapter", "both"),
        default="both",
        help="dense weights at the solution, the adapter's own parameters, or both (default: both)",
    )
    p.add_argument("--weight-set", choices=WEIGHT_SETS, default="adapted",
                   help="weights coordinates: the adapted weights + head, or every parameter the solutions change "
                   "(the plane's) (default: adapted)")  # fmt: skip
    p.add_argument("--no-head", action="store_true", help="leave the classification head out of the coordinates")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=None,
        help="evaluation samples: the first N of the run's seeded permutation of its evaluation split, so fewer "
        "than the run's are a subset of them (default: the run's evaluation set)",
    )
    p.add_argument("--hvp-batch", type=positive_int, default=None,
                   help="samples per forward of a Hessian-vector product: fewer hold fewer activations, same "
                   "products (default: the evaluation batches)")  # fmt: skip
    p.add_argument("--hvp-dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the products: the model and its inputs converted to it (float64: the reference "
                   "for checks, twice the memory and several times the time) (default: float32)")  # fmt: skip
    p.add_argument("--blocks", action="store_true",
                   help="curvature per block instead: each block's top eigenvalue, trace and spectral density, and "
                   "the blocks' Jensen-Shannon distances (blocks.{json,png,pdf})")  # fmt: skip
    p.add_argument("--block-by", choices=BLOCK_BY, default="layer",
                   help="with --blocks: a block is a transformer layer, or a module kind in a layer (attention, "
                   "mlp, norm) (default: layer)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of every random probe (default: 0)")
    add_run_options(p, "curvature.{json,png,pdf}")
    return p


def settings_from(args) -> CurvatureSettings:
    coordinates = COORDINATES if args.coordinates == "both" else (args.coordinates,)
    settings = CurvatureSettings(
        top_k=args.top_k, tol=args.tol, lanczos_vectors=args.lanczos_vectors, trace_probes=args.trace_probes,
        slq_probes=args.slq_probes, slq_steps=args.slq_steps, coordinates=coordinates, weight_set=args.weight_set,
        include_head=not args.no_head, seed=args.seed, hvp_batch=args.hvp_batch, dtype=args.hvp_dtype,
    )  # fmt: skip
    settings.check()
    return settings


def _run(argv: Sequence[str] | None = None) -> None:
    from adapters import distributed
    from landscape import run as run_module
    from landscape.cli import resolve_device

    argv = list(sys.argv[1:] if argv is None else argv)
    # torchrun's own parser takes --run for an abbreviation of its --run-path: the documented torchrun command
    # passes our options after a "--", which some Python versions hand on to us
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    settings = settings_from(args)  # every setting is checked before any loading
    check_block_by(args.block_by)
    # under torchrun every process joins (before loading: rank 0 alone reports it), takes its shard of the
    # samples, and only rank 0 writes and prints
    rank, _ = distributed.init(resolve_device(args.device).type)
    ctx, device = run_module.open_run_from_args(args, with_eval_set=args.samples is None)
    eval_set = run_module.eval_set_with(ctx, device, args.samples)
    meta = ctx.meta
    info = {k: meta.get(k) for k in ("dataset", "model", "eval_split")}
    info.update(run=str(ctx.run_dir), title=f"{meta.get('model')} on {meta.get('dataset')}: curvature at the solutions")
    out = Path(args.out) if args.out else ctx.run_dir
    chosen = args.solutions or [s for s in SOLUTION_CHOICES if s in ctx.solutions]  # --load-4bit: no ft
    missing = [s for s in chosen if s not in ctx.solutions]
    if missing:
        raise UserError(f"--solutions {' '.join(chosen)}: the run {args.run} has no {missing[0]} solution")
    solutions = {s: ctx.solutions[s] for s in dict.fromkeys(chosen)}
    packed = bool(packed_names(ctx.base))
    reasons = {skip_reason(s.method, c, packed) for s in solutions.values() for c in settings.coordinates}
    if reasons and None not in reasons:  # every entry would be skipped: nothing to measure
        fix = "measure lora or randlora with --coordinates adapter" if packed else \
            "add lora or randlora, or pass --coordinates weights"  # fmt: skip
        raise UserError(f"--solutions {' '.join(solutions)} --coordinates {args.coordinates}: nothing to measure "
                        f"({sorted(reasons)[0]}): {fix}")  # fmt: skip
    if args.blocks:
        _run_blocks(args, ctx, solutions, eval_set, out, settings, device, info)
        return
    result = curvature_stage(ctx, solutions, eval_set, out, settings, device, progress=not args.no_progress,
                             plane_solutions=ctx.solutions, info=info, distributed=True)  # fmt: skip
    if rank != 0:
        return
    print(f"wrote {out / 'curvature.json'}, {out / 'curvature.png'}, {out / 'curvature.pdf'}")
    for name, per in result["solutions"].items():
        for coordinates, e in per.items():
            if "eigenvalues" not in e:
                continue
            trace = "" if e.get("trace") is None else f"; trace {e['trace']:.4g} ± {e['trace_se']:.2g}"
            top = ", ".join(f"{v:.4g}" for v in e["eigenvalues"])
            print(f"{name:<9} {coordinates:<8} dim {e['dim']:>10,}: top eigenvalues {top}{trace} ({e['hvps']} HVPs)")


def _run_blocks(args, ctx, solutions, eval_set, out: Path, settings, device, info: dict) -> None:
    from adapters import distributed

    if not solutions:
        raise UserError(f"--blocks: the run {args.run} has no solutions: train them with landscape.connectivity")
    info = {**info, "title": info["title"].replace("curvature", f"curvature per {args.block_by}")}
    result = blocks_stage(ctx, solutions, eval_set, out, settings, args.block_by, device,
                          plane_solutions=ctx.solutions, info=info, distributed=True)  # fmt: skip
    if not distributed.is_lead():
        return
    print(f"wrote {out / 'blocks.json'}, {out / 'blocks.png'}, {out / 'blocks.pdf'}")
    for name, per in result["solutions"].items():
        for coordinates, e in per.items():
            if "blocks" not in e:
                continue
            trace = "" if e["trace"] is None else f"; trace {e['trace']:.4g} ± {e['trace_se']:.2g}"
            print(f"{name:<9} {coordinates:<8} top eigenvalue {e['top_eigenvalue']:.4g}{trace} ({e['hvps']} HVPs)")
            for b in e["blocks"]:
                t = "" if b["trace"] is None else f"; trace {b['trace']:.4g} ± {b['trace_se']:.2g}"
                print(f"  {b['name']:<22} dim {b['dim']:>10,}: top eigenvalue {b['top_eigenvalue']:.4g}{t}")


def main(argv: Sequence[str] | None = None) -> int:
    from adapters import distributed
    from landscape.cli import recipe_main

    joined = not distributed.active()  # a caller's own process group (a script running several) stays up
    code = recipe_main(_run, argv, PROG)
    if distributed.active():
        if code == 0:
            distributed.wait_for_all()  # the other ranks wait until rank 0 has written every output
        if joined:
            distributed.shutdown()
    return code
