"""python -m landscape.spectrum: the spectra of a run's solutions (--run) or of given solutions (--solution).

``--solution NAME=PATH`` takes this tool's solution folders and solutions trained elsewhere
(:mod:`adapters.foreign`: peft adapters of every type that merges, full checkpoints) on one base model:
``--model`` (``--base`` is its earlier spelling; an ``hf:`` causal LM is built as the answer scorer, any
other ``hf:`` model as an encoder), by default the solutions' own or an adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from landscape.spectrum.analysis import write_spectrum
from landscape.spectrum.decomposition import METHODS

PROG = "python -m landscape.spectrum"


def build_parser():
    from landscape.cli import Parser, out_folder, positive_int

    p = Parser(
        prog=PROG,
        description="Singular-value spectra, rank metrics, similarity to full fine-tuning and intruder dimensions "
        "of the weight updates ΔW of saved solutions: the ft, lora and randlora solutions of a run (--run), or "
        "solution folders given one by one (--solution NAME=PATH ...).",
    )
    p.add_argument(
        "--run",
        default=None,
        help="run folder written by landscape.connectivity (its ft, lora and randlora solutions: its own, or those "
        "it was given with --solutions)",
    )
    p.add_argument(
        "--solution",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="solutions: folders written by this tool, peft adapter folders of any type that merges (LoRA, DoRA, "
        "RandLoRA, VeRA, LoHa, LoKr, AdaLoRA, ...), or full checkpoints (a transformers model folder, a "
        ".safetensors or a state-dict .pt/.pth/.bin file: method ft); NAME is free (the ft one is the similarity "
        "reference, the lora one gives r)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the base model (e.g. hf:DIR): default the solutions' solution.json, else an adapter's "
        "base_model_name_or_path (as hf:); needed for full checkpoints",
    )
    p.add_argument("--base", default=None, help="the same as --model (its earlier spelling)")
    p.add_argument("--num-classes", type=int, default=None, help="class count of the base model's head")
    p.add_argument("--out", type=out_folder, default=None, help="where to write the outputs (default: the run folder)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device for the SVDs")
    p.add_argument("--method", default="gram", choices=METHODS, help="fp64 Gram eigendecomposition or fp32 SVD")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_solutions(run_dir: str | Path) -> dict:
    """The ft, lora and randlora solutions of a run folder, on one base model: the run's own, or the folders it
    was given with --solutions (recorded in its landscape.json)."""
    from adapters.solution import load_solution
    from landscape.run import read_meta, solution_folders

    solutions, base = {}, None
    for name, folder in solution_folders(run_dir, read_meta(run_dir)).items():
        solutions[name] = load_solution(folder, base=base, expect_method=name)
        base = solutions[name].base
    return solutions


def _run(argv: Sequence[str] | None = None) -> None:
    from adapters import threads
    from adapters.errors import UserError
    from adapters.solution import load_solutions
    from landscape.cli import parse_named_paths, resolve_device

    args = build_parser().parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError("--num-classes must be >= 1")
    if args.run is None and not args.solution:
        raise UserError("pass --run DIR (a run folder) or --solution NAME=PATH ... (solution folders)")
    if args.run is not None and args.solution:
        raise UserError("pass --run DIR or --solution NAME=PATH ..., not both")
    if args.model is not None and args.base is not None and args.model != args.base:
        raise UserError(f"--model {args.model} and --base {args.base} differ: pass one of them (--base is --model)")
    if args.solution:
        named = parse_named_paths(args.solution, "--solution")
        if args.out is None:
            raise UserError("--solution needs --out DIR (where to write the results)")
    threads.configure(args.threads)
    device = resolve_device(args.device)
    if args.solution:
        solutions = load_solutions(named, args.model or args.base, args.num_classes)
    else:
        solutions = run_solutions(args.run)
    out = Path(args.out) if args.out else Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    written = write_spectrum(solutions, out, device=device, progress=not args.no_progress, method=args.method)
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import recipe_main

    return recipe_main(_run, argv, PROG)
