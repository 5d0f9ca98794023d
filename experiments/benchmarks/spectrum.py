"""Benchmark: the full spectral analysis of a ViT-B/32-sized CLIP versus a naive numpy loop.

    python -m experiments.benchmarks.spectrum [--json PATH] [--quick] [--method {gram,svd}]

Synthetic but realistic updates with the real ViT-B/32 layer shapes of both towers (vision
width 768: attn in_proj 2304×768, out_proj 768×768, mlp c_fc 3072×768, c_proj 768×3072;
text width 512: 1536×512, 512×512, 2048×512, 512×2048; 12 blocks each, 96 layers; ``--quick``:
2 blocks each):

- W0: Gaussian / √in plus 8 strong rank-one spikes (a pretrained-like spectrum with a head);
- ft: dense, a rank-8 task component plus full-rank noise;
- lora: factors B (out×32), A (32×in), all non-zero, the task component inside, scale 2;
- randlora: peft's formula ΔW = s Σ_i B_i Λ_i A Γ_i (r = 6, N = ⌈d/6⌉ bases, random λ, γ) plus
  half the task component: dense and full rank.

Both sides compute the SAME metrics for every layer and solution: all singular values and the
rank measures, energy beyond r = 32, principal angles (k = 1, 4, 16, 32) and the overlap curve
(k ≤ 64) against ft, and intruder dimensions (top-10 left singular vectors of W0 + ΔW against all
of W0's). The naive side calls numpy.linalg.svd (full_matrices=False) layer by layer on W0 (once
per layer), on each dense ΔW and on each W0 + ΔW; ours is ``landscape.spectrum.analyse`` (LoRA
from its factors). Data generation is outside both timings. Results are compared: singular
values, overlap curves, principal angles, intruder cosines and counts.

Threads: ``--threads`` (default 1) caps torch and every BLAS/LAPACK library loaded in the process
(numpy's and scipy's OpenBLAS, torch's OpenMP) to the same count, for both sides; scipy is imported
before the cap so that its own OpenBLAS is covered too (the JSON lists the thread pools).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from adapters import threads
from landscape.spectrum import LowRank, analyse, overlap_curve, principal_angles, spectrum_metrics

LORA_R = 32
RANDLORA_R = 6
TASK_RANK = 8
TOWERS = {
    "visual.transformer": 768,  # vision width
    "transformer": 512,  # text width
}


def layer_shapes(blocks: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for prefix, w in TOWERS.items():
        for b in range(blocks):
            p = f"{prefix}.resblocks.{b}"
            shapes[f"{p}.attn.in_proj_weight"] = (3 * w, w)
            shapes[f"{p}.attn.out_proj.weight"] = (w, w)
            shapes[f"{p}.mlp.c_fc.weight"] = (4 * w, w)
            shapes[f"{p}.mlp.c_proj.weight"] = (w, 4 * w)
    return shapes


def make_layer(shape: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    m, n = shape

    def randn(*s):
        return torch.randn(*s, generator=g)

    w0 = randn(m, n) / math.sqrt(n)
    spikes = torch.linspace(4.0, 1.5, 8)
    w0 += (randn(m, 8) / math.sqrt(m) * spikes) @ (randn(8, n) / math.sqrt(n))
    x, y = randn(m, TASK_RANK) / math.sqrt(m), randn(n, TASK_RANK) / math.sqrt(n)
    task = 0.05 * x @ y.T
    ft = task + 1e-3 * randn(m, n)
    b = torch.cat([x * 0.1, 0.005 * randn(m, LORA_R - TASK_RANK) / math.sqrt(m)], dim=1)
    a = torch.cat([y.T * 0.25, 0.005 * randn(LORA_R - TASK_RANK, n) / math.sqrt(n)], dim=0)
    lora = LowRank(b, a, 2.0)
    big, small = max(m, n), min(m, n)
    nb = math.ceil(small / RANDLORA_R)
    bases_b = randn(big, nb * RANDLORA_R).to(torch.bfloat16).float()  # peft creates the bases in bf16
    base_a = randn(RANDLORA_R, small).to(torch.bfloat16).float()
    lam = 0.02 * randn(nb * RANDLORA_R)
    gam = randn(nb, small) / small
    # Σ_i B_i Λ_i A Γ_i = [B_1 Λ_1 | ... | B_N Λ_N] · [A Γ_1; ...; A Γ_N]
    rl = (bases_b * lam) @ (base_a[None] * gam[:, None, :]).reshape(nb * RANDLORA_R, small)
    rl = (rl if m >= n else rl.T) * 2.0 + 0.5 * task
    return w0, {"ft": ft, "lora": lora, "randlora": rl.contiguous()}


def naive(base: dict, dense: dict, names: list[str], rank: int, ks: list[int], kmax: int, top: int, eps: list):
    """Layer by layer with numpy.linalg.svd on dense matrices; the same metrics as ``analyse``."""
    out = {}
    for name in names:
        w0 = base[name].numpy()
        shape = w0.shape
        u0 = np.linalg.svd(w0, full_matrices=False)[0]
        layer, lefts = {}, {}
        for sol, params in dense.items():
            d = params[name].numpy()
            u, s, _ = np.linalg.svd(d, full_matrices=False)
            met = spectrum_metrics(s, shape)
            s64 = s.astype(np.float64)
            met["energy_beyond_rank"] = float(np.sum(s64[rank:] ** 2) / np.sum(s64**2))
            lefts[sol] = u[:, : min(met["rank"], max(kmax, rank))]
            u1 = np.linalg.svd(w0 + d, full_matrices=False)[0][:, :top]
            mc = np.abs(u1.T @ u0).max(axis=1)
            met["intruders"] = {"max_cos": mc.tolist(), "count": {str(t): int(np.sum(mc < t)) for t in eps}}
            layer[sol] = met
        for sol in dense:
            if sol != "ft":
                qa, qb = lefts[sol], lefts["ft"]
                layer[sol]["similarity_to_ft"] = {
                    "principal_angles_deg": {str(k): principal_angles(qa[:, :k], qb[:, :k]).tolist() for k in ks},
                    "overlap": overlap_curve(qa, qb, min(kmax, *shape)).tolist(),
                }
        out[name] = layer
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.spectrum", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="2 blocks per tower instead of 12")
    p.add_argument("--method", default="gram", choices=("gram", "svd"))
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch AND numpy's BLAS/LAPACK, the same on both sides (default 1: on a shared 2-core "
        "machine, 2-thread LAPACK calls stall at OpenMP barriers whenever another process holds a core, and single "
        "calls swing 10x)",
    )
    return p


def limit_threads(n: int) -> None:
    """``n`` threads for torch and every BLAS/LAPACK library of the process, scipy's own OpenBLAS included."""
    threads.configure(n)
    import scipy.linalg  # noqa: F401  (load scipy's own OpenBLAS now, so that the limit below reaches it too)

    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)  # numpy's OpenBLAS (and torch's OpenMP/MKL where visible)
    except ImportError:  # pragma: no cover
        pass


def generate(shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict, dict]:
    """W0 per layer, the three solutions' updates (LoRA as factors), and the same updates all dense."""
    base, deltas = {}, {"ft": {}, "lora": {}, "randlora": {}}
    for i, name in enumerate(shapes):
        base[name], sols = make_layer(shapes[name], seed=i)
        for s, v in sols.items():
            deltas[s][name] = v
    dense = {s: {n: (v.dense() if isinstance(v, LowRank) else v) for n, v in p_.items()} for s, p_ in deltas.items()}
    return base, deltas, dense


def differences(ours: dict, ref: dict, solutions) -> dict:
    """Largest differences between ours and the naive loop over every layer and solution."""
    abs_d = rel_d = elem_d = ov_d = mc_d = ang_d = 0.0
    intruder_mismatch = 0
    for layer in ours["layers"]:
        shape = layer["shape"]
        for sol in solutions:
            a = np.asarray(layer[sol]["singular_values"], np.float64)
            b = np.asarray(ref[layer["name"]][sol]["singular_values"], np.float64)
            diff = np.abs(a - b)
            abs_d, rel_d = max(abs_d, float(diff.max())), max(rel_d, float(diff.max() / b[0]))
            tol = b[0] * max(shape) * np.finfo(np.float32).eps
            above = b > tol
            elem_d = max(elem_d, float((diff[above] / b[above]).max()))
            if layer[sol]["intruders"]["count"] != ref[layer["name"]][sol]["intruders"]["count"]:
                intruder_mismatch += 1
            mca = np.asarray(layer[sol]["intruders"]["max_cos"], np.float64)
            mc_d = max(mc_d, float(np.abs(mca - ref[layer["name"]][sol]["intruders"]["max_cos"]).max()))
            if sol != "ft":
                oa = np.asarray(layer[sol]["similarity_to_ft"]["overlap"])
                ob = np.asarray(ref[layer["name"]][sol]["similarity_to_ft"]["overlap"])
                ov_d = max(ov_d, float(np.abs(oa - ob).max()))
                for k, angles in layer[sol]["similarity_to_ft"]["principal_angles_deg"].items():
                    want = ref[layer["name"]][sol]["similarity_to_ft"]["principal_angles_deg"][k]
                    ang_d = max(ang_d, float(np.abs(np.asarray(angles) - want).max()))
    return {
        "max_abs_diff_singular_values": abs_d,
        "max_rel_diff_singular_values": rel_d,
        "rel_diff_definition": "max over layers and solutions of max_i |s_i - s_i^naive| / s_1^naive",
        "max_elementwise_rel_diff_above_rank_tol": elem_d,
        "max_abs_diff_overlap_curve": ov_d,
        "max_abs_diff_intruder_max_cos": mc_d,
        "max_abs_diff_principal_angles_deg": ang_d,
        "intruder_count_mismatches": intruder_mismatch,
    }


def thread_pools() -> list[dict] | None:
    try:
        from threadpoolctl import threadpool_info

        return [{"api": d["internal_api"], "num_threads": d["num_threads"]} for d in threadpool_info()]
    except ImportError:  # pragma: no cover
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    limit_threads(args.threads)
    shapes = layer_shapes(2 if args.quick else 12)
    names = list(shapes)
    t0 = time.perf_counter()
    base, deltas, dense = generate(shapes)
    gen_s = time.perf_counter() - t0
    print(f"generated {len(names)} layers × 3 solutions in {gen_s:.1f} s", file=sys.stderr)

    load_before = os.getloadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    # weight_spectra=False: the naive loop computes ΔW's spectra and intruders only, so compare like for like
    ours = analyse(deltas, layers=names, base=base, rank=LORA_R, method=args.method, device=args.device,
                   weight_spectra=False)  # fmt: skip
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    settings = ours["settings"]
    ks, kmax = settings["angle_ks"], settings["overlap_max_k"]
    top, eps = settings["intruders"]["top_k"], settings["intruders"]["thresholds"]
    print(f"ours: {ours_s:.1f} s", file=sys.stderr)
    c0, t0 = time.process_time(), time.perf_counter()
    ref = naive(base, dense, names, LORA_R, ks, kmax, top, eps)
    naive_s, naive_cpu = time.perf_counter() - t0, time.process_time() - c0
    load_after = os.getloadavg()
    print(f"naive: {naive_s:.1f} s", file=sys.stderr)

    result = {
        "ours_s": round(ours_s, 3),
        "naive_s": round(naive_s, 3),
        "speedup": round(naive_s / ours_s, 2),
        "ours_cpu_s": round(ours_cpu, 3),
        "naive_cpu_s": round(naive_cpu, 3),
        "cpu_time_ratio": round(naive_cpu / ours_cpu, 2),
        **differences(ours, ref, deltas),
        "layers": len(names),
        "solutions": list(deltas),
        "shapes": sorted({f"{m}x{n}" for m, n in shapes.values()}),
        "ours_computes": (
            f"landscape.spectrum.analyse(method={args.method!r}, device={args.device!r}): method 'gram' on the CPU, "
            "per layer through LAPACK (scipy): fp64 Gram matrices by syrk and tridiagonalisation (sytrd); W0: all "
            "eigenvectors of the tridiagonal matrix (stevd), Householder Q applied to the intruder vectors only; "
            "ft and randlora ΔW: all eigenvalues (sterf) and the top-64 eigenvectors (stemr + back-transformation); "
            "W0+ΔW of each solution: fp32 Gram, top-10 eigenvectors only; LoRA ΔW exactly from its factors "
            "(QR + r×r SVD), its W0+ΔW Gram from W0's plus low-rank terms; then all metrics (method 'svd': fp32 "
            "torch.linalg.svd of the stacked matrices)"
        ),
        "naive_computes": (
            "per layer: numpy.linalg.svd(W0, full_matrices=False) once, and per solution numpy.linalg.svd on the "
            "dense ΔW and on W0+ΔW (full_matrices=False, with vectors); then the same metrics with the same helper "
            "functions"
        ),
        "metrics": "singular values, rank, effective/stable rank, energy ranks, energy beyond r=32, principal angles "
        f"k={ks}, overlap curve k<=64 vs ft, intruders (top {top}, eps {eps})",
        "data_generation_s": round(gen_s, 2),
        "threads_requested": args.threads,
        "torch_num_threads": torch.get_num_threads(),
        "threadpools": thread_pools(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "quick": args.quick,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from landscape.engine.store import write_text

        write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
