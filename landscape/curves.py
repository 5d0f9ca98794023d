"""python -m landscape.curves — a trained curve of low loss between two solutions (Garipov et al. 2018).

The straight line between two solutions may cross a ridge (:mod:`landscape.paths`); a curve with the same
endpoints can bend around it. As in dnn-mode-connectivity, the curve is a weighted sum of control points,
``θ(t) = Σ_k w_k(t)·θ_k``, with ``θ_0 = θ_A`` and ``θ_{n+1} = θ_B`` fixed (the two solutions' full weights
over the plane's parameters) and the ``n`` bends ``θ_1 … θ_n`` trainable:

- ``bezier``: a Bézier curve of degree n + 1, Bernstein weights ``w_k(t) = C(n+1, k)·t^k·(1 − t)^(n+1−k)``
  (one bend: the quadratic Bézier of the paper);
- ``polychain``: the polygonal chain through the control points, ``w_k(t) = max(0, 1 − |(n + 1)·t − k|)``.

At t = 0 and t = 1 every weight but one is exactly 0 and that one exactly 1, so θ(0) = θ_A and θ(1) = θ_B
bit for bit. The bends start on the straight line (bend k at ``(1 − α)·θ_A + α·θ_B``, α = k/(n + 1)), where
both kinds trace the straight line itself, and are trained to minimise ``E_{t ~ U(0, 1)} L(θ(t))``: one t
per optimizer step, drawn from the seeded global generator, on the run's training batches and objective,
the model run by ``torch.func.functional_call`` with the curve's weights. Training is
:func:`adapters.train.train` itself (AdamW, cosine schedule, gradient clipping, atomic checkpoints that
resume bit-exactly on CPU and only under the same key), with no weight decay: the objective is the loss
alone, and decay would pull the bends towards zero, away from both solutions.

The trained curve and the straight line are then evaluated at the same t on the run's evaluation set by
:class:`CurveEvaluator`, the paths' :class:`landscape.engine.grid.PlaneEvaluator` (the line bit-identical to the
paths' dense evaluation), each with its barrier (the height above the chord between the endpoint losses;
"no barrier" at or below it) and its peak above the endpoint mean, never called a barrier, both with their
paired standard errors (:func:`landscape.paths.barriers_with_se`).

Memory (U = one fp32 copy of the parameters the pair changes): the curve is held as offsets from W0; an
adapter's endpoint stays factored (its ΔW rebuilt per layer when used), another is one flat vector (FT's ΔW:
the solution's update, held once in the model's dtype: fp32, or bf16/fp16 on a half-precision base); the bends
are U each, and training adds their gradients (one per parameter, never concatenated) and AdamW's two moments:
4 × bends × U. θ(t) is built per module in a pre-hook and swapped back after its forward; the base model is
trained and evaluated in place, never copied.
``python -m experiments.benchmarks.llm_scale --stages curves curves_checkpointed`` measures it.

Writes under ``--out`` (default: the run folder), ``curves/``:

  <A>-<B>.npz          t (n,), loss / accuracy / loss_se (2, n) with rows ``paths`` = (curve, line), train_loss
  <A>-<B>.json         ``format_version`` (:data:`landscape.paths.FORMAT_VERSION`: 2, ``barrier`` the chord
                       barrier, as paths.json's); per path (curve, line) the keys of a paths.json pair (barrier,
                       barrier_se, peak_above_endpoint_mean, ...) and its mean loss; settings, training summary
  <A>-<B>.png          loss along the curve and along the straight line, chords and barriers drawn
  <A>-<B>.safetensors  the bends: ``bend<k>.<parameter name>``; kind, bends, pair in the metadata
  seed-K/<A>-<B>.*     on a run of ``--seeds N`` (:mod:`landscape.seeds`): the curve between seed K's solutions,
                       trained on seed K's batches; then each row of <A>-<B>.json also holds ``barrier_per_seed``
                       (the run's seed first), ``barrier_mean`` and ``barrier_ci95``. It costs N curves
                       (``--one-seed``: the run's seed only).

``--launcher local|slurm``: the training, the points and the files as submitit jobs (:mod:`landscape.curves_launch`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES, Classification
from adapters.progress import progress_bar
from adapters.quant import is_packed
from adapters.solution import base_solution
from landscape import paths, render
from landscape.curve_model import Curve, CurveModel, bezier_weights, curve_weights, polychain_weights, train_curve
from landscape.curves_cli import KINDS, PROG, ROWS, curve_folder, curve_info, curve_key, parse_pair
from landscape.engine import factored, store
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import Chart

__all__ = [
    "KINDS",
    "Curve",
    "CurveEvaluator",
    "CurveModel",
    "bezier_weights",
    "curve_weights",
    "evaluate_curve",
    "load_curve",
    "pair_curve",
    "main",
    "parse_pair",
    "polychain_weights",
    "train_curve",
    "trained_curve",
    "write_curve",
]


class CurveEvaluator(PlaneEvaluator):
    """The paths' evaluator on the chart ``θ(x, y)``: y = 0 the straight line ``θ_A + x·(θ_B − θ_A)`` (the
    paths' arithmetic: the same weights as :mod:`landscape.paths`), y = 1 the curve ``θ(x)``. One point per
    forward; the model's parameters on the curve are overwritten in place."""

    def __init__(
        self,
        model: nn.Module,
        curve: Curve,
        eval_set: EvalSet,
        device: torch.device | str,
        dtype: str = "float32",
        objective: Classification = OBJECTIVES["classification"],
    ):
        self.curve = curve.to(device)
        theta_a, theta_b = curve.split(curve.theta_a.detach()), curve.split(curve.theta_b.detach())
        u = {n: theta_b[n] - theta_a[n] for n in curve.names}
        zero = torch.zeros((), device=curve.theta_a.device)
        v = {n: zero.expand(w.shape) for n, w in theta_a.items()}  # the line has no y: no memory for it
        chart = Chart("line", theta_a, u, v, {"a": (0.0, 0.0), "b": (1.0, 0.0)})
        super().__init__(model, chart, eval_set, device, dtype, 1, objective)

    @torch.no_grad()
    def set_point(self, x: float, y: float) -> None:
        if y == 0.0:
            super().set_point(x, 0.0)
            return
        if y != 1.0:
            raise ValueError(f"a curve evaluator has y = 0 (the line) or 1 (the curve), not {y}")
        weights = self.curve.weights_at(x)
        for p, name in zip(self.params, self.names, strict=True):
            p.copy_(weights[name])


def evaluate_curve(
    curve: Curve,
    model: nn.Module,
    eval_set: EvalSet,
    device: torch.device | str,
    points: int = 21,
    dtype: str = "float32",
    objective: Classification = OBJECTIVES["classification"],
    progress: bool = True,
    store: store.SampleStore | None = None,
    only: Collection[tuple[int, int]] | None = None,
) -> dict | None:
    """Loss, accuracy and loss_se of the curve and of the straight line at ``points`` values of t in [0, 1],
    each path's barrier and peak above the endpoint mean (:func:`landscape.paths.barriers_with_se`) and mean
    loss over t. ``model``'s parameters on the curve are overwritten. Returns ``{"t", "paths": ("curve",
    "line"), "loss"/"accuracy"/"loss_se": (2, n), "barriers": {row: {...}}, "mean_loss": {row: float}, "seconds"}``.
    ``store``: points (row k, t's index j) with their per-sample losses, read back and added to (a launcher's,
    :mod:`landscape.curves_launch`); ``only``: these (k, j) alone, into ``store`` (returns None)."""
    t = paths.path_axis(points, 0.0)
    if curve.offset:  # W0 + offset(t), built per module beside the packed layers (landscape.engine.factored)
        evaluator = factored.FactoredEvaluator(model, offset_chart(curve, model), eval_set, device, dtype, 1,
                                               objective)  # fmt: skip
    else:
        evaluator = CurveEvaluator(model, curve, eval_set, device, dtype, objective)
    out = {k: np.full((len(ROWS), len(t)), np.nan) for k in ("loss", "accuracy", "loss_se")}
    barriers, start, stored = {}, time.perf_counter(), store.load() if store is not None else {}
    bar = progress_bar(total=len(ROWS) * len(t), desc="curve", disable=not progress, dynamic_ncols=True)
    for k, row in enumerate(ROWS):
        results = paths.stored_points(stored, k)
        todo = [j for j in range(len(t)) if j not in results and (only is None or (k, j) in only)]
        paths.evaluate_line(evaluator, t, todo, results, k, store, bar, row, y=1.0 if row == "curve" else 0.0)
        if only is not None:  # a launcher's points task: its points are in the store
            continue
        for j in range(len(t)):
            out["loss"][k, j], out["accuracy"][k, j], out["loss_se"][k, j] = (results[j].loss, results[j].accuracy,
                                                                              results[j].loss_se)  # fmt: skip
        barriers[row] = paths.barriers_with_se(t, out["loss"][k], [results[j].samples for j in range(len(t))])
    bar.close()
    if curve.offset:
        evaluator.close()
    if only is not None:
        return None
    mean = {row: float(np.mean(out["loss"][k])) for k, row in enumerate(ROWS)}
    seconds = round(time.perf_counter() - start, 3)
    return {"t": t, "paths": list(ROWS), **out, "barriers": barriers, "mean_loss": mean, "seconds": seconds}


def offset_chart(curve: Curve, model: nn.Module) -> factored.FactoredChart:
    """An offset curve as a factored chart on ``model``: y = 0 the straight line W0 + (1 − x)·Δ_A + x·Δ_B (the
    factored paths' arithmetic), y = 1 the curve W0 + Σ_k w_k(x)·offset_k; every term a stored fp32 tensor or a lazy
    endpoint's ΔW."""
    params = dict(model.named_parameters())
    bends = {f"bend{k + 1}": list(curve.split(b).values()) for k, b in enumerate(curve.bends)}
    controls = {"a": curve.end_parts("a"), **bends, "b": curve.end_parts("b")}
    # a lazy endpoint's terms stay lazy (built from the adapter's factors per point); all-zero stored terms go
    deltas = {key: {n: v for n, v in zip(curve.names, parts, strict=True)
                    if v is not None and (not isinstance(v, torch.Tensor) or v.any())}
              for key, parts in controls.items()}  # fmt: skip
    names = sorted(set().union(*(d.keys() for d in deltas.values())))
    weights = functools.partial(curve_weights, curve.kind, bends=curve.num_bends)
    return factored.FactoredChart("curve", {"a": (0.0, 0.0), "b": (1.0, 0.0)}, {}, {n: params[n] for n in names},
                                  deltas, ("curve", weights, tuple(controls)))  # fmt: skip


def write_curve(
    result: Mapping,
    curve: Curve,
    out_dir: str | Path,
    pair: tuple[str, str],
    info: Mapping | None = None,
    title: str | None = None,
    folder: str = "curves",
) -> list[Path]:
    """Write ``curves/<A>-<B>.{npz,json,png,safetensors}`` (``folder``/...) under ``out_dir`` atomically; returns
    them. ``result``: :func:`evaluate_curve`'s, optionally with ``train_loss``; ``info`` is merged into the JSON."""
    from safetensors.torch import save_file

    name = paths.pair_name(*pair)
    base = Path(out_dir) / folder / name
    files = [base.with_suffix(f".{ext}") for ext in ("npz", "json", "png", "safetensors")]
    train_loss = np.asarray(result.get("train_loss", []), dtype=np.float64)
    arrays = {k: np.asarray(result[k], dtype=np.float64) for k in ("t", "loss", "accuracy", "loss_se")}
    store.write_npz(files[0], **arrays, paths=np.array(ROWS), train_loss=train_loss)
    meta = {
        **(dict(info) if info else {}),
        "pair": name,
        "kind": curve.kind,
        "bends": curve.num_bends,
        "points": len(result["t"]),
        "format_version": paths.FORMAT_VERSION,
        "barrier_definition": paths.BARRIER_DEFINITION.replace("(1-t)*theta_A + t*theta_B", "theta(t)"),
        "chord_barrier_definition": paths.CHORD_BARRIER_DEFINITION.replace("(1-t)*theta_A + t*theta_B", "theta(t)"),
        "peak_above_endpoint_mean_definition": paths.PEAK_DEFINITION.replace("(1-t)*theta_A + t*theta_B", "theta(t)"),
        **{row: {**result["barriers"][row], "mean_loss": result["mean_loss"][row]} for row in ROWS},
        "seconds": result.get("seconds"),
    }
    store.write_json(files[1], meta)
    figure = {**result, "pair": name, "kind": curve.kind, "bends": curve.num_bends}
    fig = render.curve_figure(figure, title)
    store.write_with(files[2], lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    header = {
        "kind": curve.kind,
        "bends": str(curve.num_bends),
        "pair": name,
        "format": "landscape.curves/1",
        "offset": str(int(curve.offset)),
    }  # offset: the bends are offsets from W0, not full weights
    store.write_with(files[3], lambda tmp: save_file(curve.bend_weights(), str(tmp), metadata=header))
    return files


def load_curve(path: str | Path, theta_a: Mapping[str, torch.Tensor], theta_b: Mapping[str, torch.Tensor]) -> Curve:
    """The curve saved by :func:`write_curve` at ``path`` between the endpoints ``theta_a`` and ``theta_b`` (full
    weights, or offsets from W0 when the file says its bends are offsets: then ``theta_a``/``theta_b`` must be too)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if header.get("format") != "landscape.curves/1":
        raise UserError(f"{path} is not a curve written by {PROG}: pass a curves/<A>-<B>.safetensors file")
    curve = Curve(theta_a, theta_b, int(header["bends"]), header["kind"], offset=header.get("offset") == "1")
    expected = set(curve.bend_weights())
    if set(tensors) != expected:
        raise UserError(f"{path} holds other parameters than these endpoints: pass the endpoints it was trained on")
    with torch.no_grad():
        for k in range(curve.num_bends):
            curve.bends[k].copy_(torch.cat([tensors[f"bend{k + 1}.{n}"].float().reshape(-1) for n in curve.names]))
    return curve


def pair_curve(base: nn.Module, solutions: Mapping, pair: tuple[str, str], bends: int, kind: str) -> Curve:
    """The untrained curve between ``pair`` of ``solutions`` on ``base``, as offsets from W0 (θ(t) = W0 + offset(t))
    over the parameters the pair changes. Its endpoints are filled from each solution's lazy ΔW one parameter at a
    time (the curve's two flat endpoints, never a dict of every dense ΔW); it is evaluated factored on the base
    itself (no copy of the model) and, on a packed base, beside the packed layers, never written into them."""
    params = dict(base.named_parameters())
    deltas = {s: solutions[s].module_deltas(check=False) for s in pair}
    names = [n for n in params if any(n in d for d in deltas.values())]
    ends = [{n: deltas[s].get(n) for n in names} for s in pair]  # None: a parameter that solution leaves as W0
    # a dense endpoint (FT's ΔW) is held in a half-precision base's dtype, as the factored plane holds it: the
    # forward runs θ(t) rounded to it, and the ΔW between two half weights is exact in it (Sterbenz) wherever
    # the update is smaller than the weight
    dtypes = {params[n].dtype for n in names if not is_packed(params[n])}
    half = dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else None
    return Curve(ends[0], ends[1], bends, kind, offset=True, end_dtype=half or torch.float32)


def trained_curve(ctx, solutions, pair, args, device, out: Path, seed: int | None) -> tuple:
    """The curve between ``pair`` of ``solutions`` trained (or resumed from its checkpoint, which is kept):
    (curve, training config, key, checkpoint, training history)."""
    from adapters.io import key_digest
    from adapters.train import checkpoint_path
    from landscape.run import train_config

    curve = pair_curve(ctx.base, solutions, pair, args.bends, args.kind)
    ft = train_config(ctx.loaded, "ft", device, seed)
    lr = args.lr if args.lr is not None else ft.lr
    config = dataclasses.replace(ft, steps=args.steps or ft.steps, lr=lr, head_lr=lr, weight_decay=0.0,
                                 generate_eval=False)  # fmt: skip
    key = curve_key(ctx, pair, args, device, solutions, seed)
    ckpt = checkpoint_path(out / curve_folder(seed) / paths.pair_name(*pair), key)
    task = ctx.loaded.task
    history = train_curve(
        curve, ctx.base, task.train, task.dataset.train.labels, config, device, task.objective,
        checkpoint=ckpt, checkpoint_key=key_digest(key), augment=task.entry.augment, progress=not args.no_progress,
    )  # fmt: skip
    return curve, config, key, ckpt, history


def one_curve(ctx, solutions, pair, args, device, out: Path, seed: int | None, others: list) -> dict:
    """Train (or resume) and evaluate the curve between ``pair`` of ``solutions`` (``seed``: an extra training
    seed's, written under ``curves/seed-K/``; None: the run's own), write its files; returns its result. With
    ``others`` (the extra seeds' results) each row's barrier gets its value per seed, mean and t-interval.
    Under ``--launcher`` (the finish job) the points its array tasks computed are read back."""
    from landscape.seeds import over_seeds

    curve, config, key, ckpt, history = trained_curve(ctx, solutions, pair, args, device, out, seed)
    dtype = ctx.loaded.config.landscape_dtype(device.type)
    points = None
    if args.launcher is not None:
        from landscape.curves_launch import point_store

        points = point_store(out, seed, pair, key, args.points, dtype)
    # an offset curve is evaluated on the base itself (factored: its weights never written)
    result = evaluate_curve(curve, ctx.base, ctx.eval_set, device, args.points, dtype,
                            ctx.loaded.task.objective, progress=not args.no_progress, store=points)  # fmt: skip
    result["train_loss"] = history["train_loss"]
    for row in ROWS if others else ():
        values = [result["barriers"][row]["barrier"], *(o["barriers"][row]["barrier"] for o in others)]
        seeds = [ctx.loaded.config.seed, *(o["seed"] for o in others)]
        result["barriers"][row].update(over_seeds("barrier", values), seeds=seeds)
    meta = ctx.meta
    title = (f"{meta.get('model')} on {meta.get('dataset')}: trained {render.CURVE_KINDS[args.kind]} ({args.bends} "
             f"bend{'s' * (args.bends != 1)}) vs the straight line" + (f", seed {seed}" if seed else ""))  # fmt: skip
    info = curve_info(ctx, config, history, device, dtype)
    written = write_curve(result, curve, out, pair, info, title, curve_folder(seed))
    ckpt.unlink(missing_ok=True)  # only now: a kill before the files are written resumes from the checkpoint
    print("wrote " + ", ".join(str(p) for p in written))
    return {**result, "seed": seed}


# ----------------------------------------------------------------------------- command line ----


def _run(argv: Sequence[str] | None = None) -> None:
    from landscape.curves_cli import build_parser, check_args, cluster_config

    args = build_parser().parse_args(argv)
    pair = check_args(args)
    if args.launcher is not None:  # the curve as submitit jobs: submit, or gather and resubmit (landscape.launch)
        from landscape import curves_launch

        curves_launch.drive(args, pair, list(sys.argv[1:] if argv is None else argv), JOBS)
        return
    cluster_config(args, Path(args.run))  # cluster settings without --launcher: the run's one-line error
    run_curves(args, pair)


def open_curves(args, pair: tuple[str, str]):
    """The run reopened for the curves of ``pair``: (its context, the device, the output folder, {extra training
    seed: its solutions} of ``--seeds N``, empty with ``--one-seed``)."""
    from adapters import threads
    from adapters.solution import load_solution
    from landscape.cli import resolve_device
    from landscape.run import open_run, seed_solution_folders

    threads.configure(args.threads)
    device = resolve_device(args.device)
    ctx = open_run(args.run, device)
    if "base" in pair:
        ctx.solutions["base"] = base_solution(ctx.base, ctx.loaded.model_name)
    missing = [s for s in pair if s not in ctx.solutions]
    if missing:
        raise UserError(f"--pair {args.pair}: the run {args.run} has no {missing[0]} solution: pick two it has")
    out = Path(args.out) if args.out else ctx.run_dir
    extra = {} if args.one_seed else seed_solution_folders(ctx.run_dir, ctx.meta)
    seeds = {seed: {**ctx.solutions, **{s: load_solution(f, base=ctx.base, expect_method=s)
                                        for s, f in folders.items()}}
             for seed, folders in extra.items()}  # fmt: skip
    return ctx, device, out, seeds


def run_curves(args, pair: tuple[str, str]) -> None:
    """The curves of ``pair`` in this process (a launcher's finish job: their training and points on disk)."""
    ctx, device, out, extra = open_curves(args, pair)
    # --seeds N: each extra seed's curve, between its own solutions, trained on its seed's batches
    others = [one_curve(ctx, solutions, pair, args, device, out, seed, []) for seed, solutions in extra.items()]
    result = one_curve(ctx, ctx.solutions, pair, args, device, out, None, others)
    for row in ROWS:
        b = result["barriers"][row]
        spread = (f"; over {len(b['barrier_per_seed'])} seeds {b['barrier_mean']:.4f} [{b['barrier_ci95'][0]:.4f}, "
                  f"{b['barrier_ci95'][1]:.4f}]" if b.get("barrier_ci95") else "")  # fmt: skip
        peak = f"{b['peak_above_endpoint_mean']:.4f} ± {b['peak_above_endpoint_mean_se']:.4f}"
        print(f"{row:<6} mean loss {result['mean_loss'][row]:.4f}, {paths.barrier_text(b)}{spread}; peak above the "
              f"endpoint mean {peak}")  # fmt: skip


# ------------------------------------------------- the launcher's jobs (landscape.curves_launch) ----


def _open(argv: Sequence[str], seed: int | None):
    from landscape.curves_cli import build_parser, check_args

    args = build_parser().parse_args(argv)
    pair = check_args(args)
    ctx, device, out, extra = open_curves(args, pair)
    return args, pair, ctx, device, out, (ctx.solutions if seed is None else extra[seed])


def train_job(config, argv: list[str], seed: int | None) -> None:
    """A launcher's curve training: the bends trained (or resumed), the checkpoint kept for the points' tasks."""
    args, pair, ctx, device, out, solutions = _open(argv, seed)
    trained_curve(ctx, solutions, pair, args, device, out, seed)


def points_job(config, argv: list[str], seed: int | None, points: list[tuple[int, int]], shard: int) -> None:
    """A launcher's points task: the curve's ``points`` (row k, index of t j) not yet stored, with their per-sample
    losses, into ``.<A>-<B>-points/rank<shard>.npz``; the bends come from the training's checkpoint."""
    from landscape import curves_launch

    args, pair, ctx, device, out, solutions = _open(argv, seed)
    curve, _, key, _, _ = trained_curve(ctx, solutions, pair, args, device, out, seed)
    dtype = ctx.loaded.config.landscape_dtype(device.type)
    found = curves_launch.point_store(out, seed, pair, key, args.points, dtype, rank=shard)
    evaluate_curve(curve, ctx.base, ctx.eval_set, device, args.points, dtype,
                          ctx.loaded.task.objective, progress=False, store=found,
                          only=set(map(tuple, points)))  # fmt: skip


def finish_job(config, argv: list[str]) -> None:
    """A launcher's last job: the command in one process, every curve resumed and every point read back."""
    from landscape.curves_cli import build_parser, check_args

    args = build_parser().parse_args(argv)
    run_curves(args, check_args(args))


JOBS = {"train": train_job, "points": points_job, "finish": finish_job}


def main(argv: Sequence[str] | None = None) -> int:
    from landscape.cli import run_main

    return run_main(_run, argv, PROG)


if __name__ == "__main__":  # through the package's module: the launcher's jobs pickle as landscape.curves.*
    from landscape import curves

    sys.exit(curves.main())
