"""The gallery's readings: the sentences and tables of numbers that experiments.figures writes into the README,
made from each run's JSON and npz contents (never from files: the caller reads them), with their standard errors.

- the plane's main section: who beats the head-only baseline, depth of each basin, barriers (heights above the
  chord) beside the peaks above the endpoint mean, ranks and the similarity of each adapter's update to full
  fine-tuning's (:func:`readings`);
- "Beyond the plane": the random lines' rises and minima (:func:`line_rise`, :func:`rise_readings`), the random
  plane (:func:`plane_readings`), the curvature at each solution (:func:`curvature_readings`) and a trained
  curve (:func:`curve_readings`);
- random charts with several draws of the directions (``--draws``): each sharpness with its spread over the
  draws (SD, min, max), ranked only beyond that spread (:func:`draw_readings`, :func:`ranked_by_spread`), the
  step scales beside the collapse level (:func:`ends_vs_level`) and the plane's draws (:func:`plane_draw_reading`).
"""

from __future__ import annotations

import math

import numpy as np

from adapters.errors import UserError

LABELS = {"head_only": "head only (baseline)", "ft": "full fine-tuning", "lora": "LoRA", "randlora": "RandLoRA"}
TRIO = ("ft", "lora", "randlora")

NOISE_SE = 2.0  # a difference counts as measured when it exceeds 2 standard errors


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


def _upgraded(paths: dict) -> dict:
    """A landscape.json "paths" summary in the current format (:data:`landscape.paths.FORMAT_VERSION`): a summary
    from before it (no ``peak_above_endpoint_mean``) had Frankle's quantity as ``barrier`` and the chord barrier,
    when recorded, as ``chord_barrier``; its numbers are renamed, never read under the other meaning."""
    if "peak_above_endpoint_mean" in paths:
        return paths
    old = dict(paths)
    new = {"peak_above_endpoint_mean": old.pop("barrier", {}), "peak_above_endpoint_mean_se": old.pop("barrier_se", {})}
    old.pop("t_max", None)
    if old.get("chord_barrier"):
        new.update(barrier=old["chord_barrier"], barrier_se=old.get("chord_barrier_se") or {})
    return {**old, **new}


def _barrier_pm(value: float, se: float | None) -> str:
    """A chord barrier ``value ± se`` as :func:`_pm` writes it, or "no barrier" for a path at or below its chord."""
    from landscape.paths import has_barrier

    return _pm(value, se) if has_barrier(value) else "no barrier"


def _barriers(paths: dict) -> str:
    """The barrier of each straight path (its height above the chord, "no barrier" at or below it) and its peak
    above the endpoint mean, never called a barrier, each ± paired SE and marked "within noise" (2 SE) when so;
    runs from before the chord barrier give the peak alone."""
    paths = _upgraded(paths)
    peak, peak_se = paths["peak_above_endpoint_mean"], paths.get("peak_above_endpoint_mean_se") or {}
    out = []
    if paths.get("barrier"):
        se = paths.get("barrier_se") or {}
        out.append(
            "Barriers on the straight paths (max over t of L(t) − the chord (1 − t)·L(0) + t·L(1), Entezari et al. "
            "2022, ± paired SE): " + "; ".join(f"{p} {_barrier_pm(v, se.get(p))}" for p, v in paths["barrier"].items())
            + "."
        )  # fmt: skip
    out.append(
        "Peak above the endpoint mean, max L(t) − (L(0) + L(1))/2 (Frankle et al. 2020; not a barrier: half the "
        "endpoints' gap on a monotone path), ± paired SE: " + "; ".join(f"{p} {_pm(v, peak_se.get(p))}"
                                                                       for p, v in peak.items()) + "."
    )  # fmt: skip
    return " ".join(out)


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


def _upgraded_path(entry: dict) -> dict:
    """One path of a curves/A-B.json (or a paths.json pair) in the current format: an entry from before it (no
    ``peak_above_endpoint_mean``) had Frankle's quantity as ``barrier``, at ``t_max``, and the chord barrier as
    ``chord_barrier``, at ``chord_t_max``."""
    if "peak_above_endpoint_mean" in entry:
        return entry
    return {**entry, "peak_above_endpoint_mean": entry["barrier"], "peak_above_endpoint_mean_se": entry["barrier_se"],
            "peak_t": entry["t_max"], "barrier": entry["chord_barrier"], "barrier_se": entry["chord_barrier_se"],
            "t_max": entry.get("chord_t_max")}  # fmt: skip


def _barrier_on(entry: dict, where: str) -> str:
    """``no barrier on <where>`` for a path at or below its chord, else ``a barrier of X ± SE on <where>``."""
    from landscape.paths import has_barrier

    if not has_barrier(entry["barrier"]):
        return f"no barrier on {where}"
    return f"a barrier of {_pm(entry['barrier'], entry['barrier_se'])} on {where}"


def curve_readings(meta: dict, data: dict | None = None) -> list[str]:
    """The barrier (height above the chord, "no barrier" at or below it) and the peak above the endpoint mean on
    the trained curve vs on the straight line (± paired SE), where the peaks are, the curve's lowest point (from
    curves/A-B.npz when given) and the time, from curves/A-B.json."""
    from landscape.render import CURVE_KINDS

    c, line, train = _upgraded_path(meta["curve"]), _upgraded_path(meta["line"]), meta["train"]
    ends = c["peak_t"] == line["peak_t"] and c["peak_t"] in (0.0, 1.0)
    peaks = (
        f"both at the end t = {c['peak_t']:g}, where it is half the endpoints' gap whatever the path"
        if ends
        else f"at t = {c['peak_t']:g} on the curve, {line['peak_t']:g} on the line"
    )
    out = [
        f"{CURVE_KINDS.get(meta['kind'], meta['kind'])} {meta['pair']} ({meta['bends']} bends, {train['steps']} "
        f"steps of one t each, lr {train['lr']:g}; {meta['points']} values of t on the {meta['eval_samples']} "
        f"evaluation samples): above the chord (1 − t)·L(0) + t·L(1), {_barrier_on(c, 'the curve')} and "
        f"{_barrier_on(line, 'the straight line')}; peak above the endpoint mean (not a barrier) "
        f"{_pm(c['peak_above_endpoint_mean'], c['peak_above_endpoint_mean_se'])} on the curve and "
        f"{_pm(line['peak_above_endpoint_mean'], line['peak_above_endpoint_mean_se'])} on the line, {peaks}; mean "
        f"loss along the curve {c['mean_loss']:.4f}, along the line {line['mean_loss']:.4f}."
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


# --------------------------------------------------------------------------- several draws of the directions


def _spread_text(values: np.ndarray) -> str:
    """``mean (SD s; min–max)`` over per-draw values (SD with ddof = 1, as landscape.draws records it)."""
    from landscape.draws import spread

    s = spread(values)
    return f"{s['mean']:.4f} (SD {s['sd']:.4f}; {s['min']:.4f}–{s['max']:.4f})"


def ranked_by_spread(values: dict[str, np.ndarray]) -> str:
    """{solution: its per-draw sharpness} flattest first when every step of the order holds beyond the spread of
    draws (the min–max ranges of neighbours do not overlap), else "within the spread of draws" and no order."""
    shown = lambda c: f"{LABELS[c]} {_spread_text(values[c])}"  # noqa: E731
    if min(len(v) for v in values.values()) < 2:
        return "one draw of directions: no spread to rank against, no ranking: " + ", ".join(map(shown, values))
    order = sorted(values, key=lambda c: float(np.mean(values[c])))
    overlaps = [(a, b) for a, b in zip(order, order[1:], strict=False) if np.max(values[a]) >= np.min(values[b])]
    if not overlaps:
        ranked = " < ".join(map(shown, order))
        return f"flattest first, beyond the spread of draws (no min–max ranges overlap): {ranked}"
    pairs = ", ".join(f"{LABELS[a]} and {LABELS[b]}" for a, b in overlaps)
    return f"within the spread of draws (min–max over draws overlap: {pairs}), no ranking: " + ", ".join(
        map(shown, values)
    )


def _steps(data: dict) -> set[float]:
    """The steps α > 0 of a line's grid that hold ±α with no collapsed point at ±α in any draw."""
    from landscape.draws import _index

    x, collapsed = data["x"], np.asarray(data["collapsed"])
    out = set()
    for a in (float(v) for v in x if v > 0):
        jm, jp = _index(x, -a), _index(x, a)
        if jm is not None and not collapsed[:, 0, [jm, jp]].any():
            out.add(round(a, 12))
    return out


def draw_readings(lines: dict[str, dict]) -> list[str]:
    """The random lines {centre: landscape.npz content with every draw} read with their spread over draws: each
    solution's rise (L(−α) + L(+α))/2 − L(0) per draw, at the largest step α that every line's grid holds with no
    collapsed point at ±α (the lines' step scales may differ), and at the smallest such step; ranked only beyond
    the spread."""
    from landscape.draws import rises

    common = sorted(set.intersection(*(_steps(d) for d in lines.values())))
    count = min(len(d["draw_seeds"]) for d in lines.values())
    head = (
        f"Loss rise along a random line through each solution, (L(−α) + L(+α))/2 − L(0) per draw of the direction "
        f"({count} draws, seeds {', '.join(str(s) for s in next(iter(lines.values()))['draw_seeds'])}), mean (SD; "
        "min–max over the draws)"
    )
    if not common:
        return [head + ": no step α holds uncollapsed points on every line, no sharpness reported."]
    out = []
    for alpha, which in ((common[-1], "the largest step every line holds below the collapse level"),
                         (common[0], "the first such step")):  # fmt: skip
        values = {c: rises(d["x"], d["y"], np.asarray(d["draw_loss"]), alpha) for c, d in lines.items()}
        out.append(f"at α = {alpha:g} ({which}): {ranked_by_spread(values)}")
        if len(common) == 1:
            break
    return [head + "; " + "; ".join(out) + "."]


def ends_vs_level(lines: dict[str, dict]) -> str:
    """The lines' step scales and their losses at the ends over every draw, beside the collapse level (the loss of
    a uniform prediction), and how many points are flagged collapsed (left out of the sharpness)."""
    level = float(next(iter(lines.values()))["collapse_level"])
    ends = [float(v) for d in lines.values() for v in np.asarray(d["draw_loss"])[:, 0, [0, -1]].ravel()]
    flagged = sum(int(np.asarray(d["collapsed"]).sum()) for d in lines.values())
    total = sum(np.asarray(d["collapsed"]).size for d in lines.values())
    scales = ", ".join(f"{LABELS[c]} ±{float(d['x'][-1]):g}" for c, d in lines.items())
    return (
        f"Step scales (the α range of each line, halved from ±1 until every draw's ends are below the collapse "
        f"level): {scales}; losses at the ends over all draws {min(ends):.3f}–{max(ends):.3f}, against the "
        f"collapse level {level:.3f} (a uniform prediction); {flagged} of {total} points flagged collapsed and left "
        "out of the sharpness."
    )


def plane_draw_reading(meta: dict) -> str | None:
    """The random plane's draws: the rise at the scale (mean over δ and η) with its spread, the collapsed points."""
    d = meta["chart_geometry"].get("draws")
    if not d or "sharpness" not in d:
        return None
    sharp = d["sharpness"]["at_scale"]
    rise = (
        f"rise at α = {sharp['alpha']:g} (the mean of the rises along δ and η) {sharp['mean']:.4f} (SD "
        f"{sharp['sd']:.4f}; {sharp['min']:.4f}–{sharp['max']:.4f} over the draws)"
        if sharp.get("per_draw")
        else "no step without collapsed points: no rise reported"
    )
    scale = d["step"]["scale"]
    return (
        f"Random plane over {d['count']} draws of δ, η (seeds {', '.join(map(str, d['seeds']))}), axes ±"
        f"{scale if scale is not None else 'as configured'}: {rise}; {d['collapsed_points']} of "
        f"{int(np.asarray(d['collapsed_per_draw']).size)} points at or above the collapse level "
        f"{d['collapse_level']:.3f} ({d['collapse_rule']})."
    )
