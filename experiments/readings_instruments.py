"""The gallery's readings of the instruments of issue 23: sentences of measured numbers made from the JSON / npz
contents of merges (``merges.json``), layer-wise barriers (``layerwise.json``), task-metric basins
(``basins.json``), curvature per block (``blocks.json``) and the Hessian eigen-direction chart (its run's
``landscape.json`` and ``landscape.npz``), each with its standard errors or its spread over draws, "within noise"
where a difference is within 2 SE, and the instrument's wall time as its outputs record it (:func:`seconds_of`).
The caller reads the files; nothing here touches the disk.
"""

from __future__ import annotations

import math

import numpy as np

from experiments.readings import LABELS, NOISE_SE, _within, ranked_by_spread

KINDS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare": "DARE"}


def _pm(value: float, se: float | None) -> str:
    """``value ± se`` to 4 significant digits (the SE to 2), "(within noise)" when within 2 SE of zero."""
    if se is None:
        return f"{value:.4g}"
    return f"{value:.4g} ± {se:.2g}{' (within noise)' if _within(value, se) else ''}"


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _names(solutions) -> str:
    return " + ".join(_label(s) for s in solutions)


def seconds_of(kind: str, result: dict) -> float:
    """The wall time an instrument's output records (s): merges / layerwise / basins their ``seconds``; block
    curvature the sum of its entries' (an entry reused by key keeps the time of the run that computed it); the
    Hessian chart's run its ``wall_time_total_s`` (else the sum of its stages')."""
    if kind == "blocks":
        entries = [e for per in result["solutions"].values() for e in per.values() if "seconds" in e]
        return float(sum(e["seconds"] for e in entries))
    if kind == "hessian":
        return float(result.get("wall_time_total_s", sum(result["wall_time_s"].values())))
    return float(result["seconds"])


def time_text(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


# ------------------------------------------------------------------------------------------------ merges


def merge_readings(result: dict) -> list[str]:
    """Per kind, each merge's gap (merged loss − its best endpoint's) with its paired SE, and which merges are
    above / below the best endpoint beyond 2 SE; the distances off the plane; the time."""
    out = []
    for kind, label in KINDS.items():
        merges = [m for m in result["merges"] if m["kind"] == kind]
        if not merges:
            continue
        gaps = ", ".join(f"{_names(m['solutions'])} {_pm(m['gap'], m['gap_se'])}" for m in merges)
        above = [_names(m["solutions"]) for m in merges if not _within(m["gap"], m["gap_se"]) and m["gap"] > 0]
        below = [_names(m["solutions"]) for m in merges if not _within(m["gap"], m["gap_se"]) and m["gap"] < 0]
        verdict = (f"above the best endpoint beyond {NOISE_SE:g} SE: {', '.join(above) or 'none'}; below it: "
                   f"{', '.join(below) or 'none'}")  # fmt: skip
        out.append(f"{label} (weights {_weights(merges)}): merged loss − best endpoint's: {gaps} ({verdict}).")
    off = {KINDS[k]: [m["off_plane_distance"] for m in result["merges"] if m["kind"] == k] for k in KINDS}
    out.append("Distance off the plane (weight-space units): " + ", ".join(
        f"{k} {min(v):.3g}–{max(v):.3g}" for k, v in off.items() if v) + "; a task-arithmetic merge with weights "
        "summing to 1 lies on the plane.")  # fmt: skip
    out.append(f"{len(result['merges'])} merges, {result['passes']} passes over the {result['eval_samples']} "
               f"evaluation samples of paths.json in {time_text(seconds_of('merges', result))}.")  # fmt: skip
    return out


def _weights(merges: list[dict]) -> str:
    shown = dict.fromkeys("(" + ", ".join(f"{w:.3g}" for w in m["weights"]) + ")" for m in merges)
    return " and ".join(shown)


# -------------------------------------------------------------------------------------- layer-wise barriers


def layerwise_readings(result: dict) -> list[str]:
    """Per pair, the whole path's chord barrier and the blocks whose barrier (rest held at A or at B) exceeds
    2 SE, with the largest; the time."""
    out = []
    for pair, entry in result["pairs"].items():
        a, b = pair.split("-", 1)
        whole = entry["whole"]
        held, largest = [], None
        for block, sides in entry["blocks"].items():
            for side in result["sides"]:
                e = sides[side]
                if largest is None or e["barrier"] > largest[2]["barrier"]:
                    largest = (block, side, e)
                if not _within(e["barrier"], e["barrier_se"]) and e["barrier"] > 0:
                    held.append(f"{block} (rest at {_label(a if side == 'rest_at_A' else b)}: "
                                f"{_pm(e['barrier'], e['barrier_se'])})")  # fmt: skip
        text = (
            f"{_label(a)}–{_label(b)}: the whole path's barrier {_pm(whole['barrier'], whole['barrier_se'])}; "
            f"blocks with a barrier beyond {NOISE_SE:g} SE: {', '.join(held) or 'none (every block within noise)'}"
        )
        if largest is not None:
            block, side, e = largest
            text += (f"; largest {block}, rest at {_label(a if side == 'rest_at_A' else b)}, "
                     f"{_pm(e['barrier'], e['barrier_se'])}")  # fmt: skip
        out.append(text + f" ({len(entry['blocks'])} blocks walked).")
    out.append(f"{result['points']} points per path, {result['passes']} passes over the {result['eval_samples']} "
               f"evaluation samples in {time_text(seconds_of('layerwise', result))}.")  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- task-metric basins


def basin_readings(result: dict) -> list[str]:
    """Per solution its accuracy, the random radius over draws (mean, SD, min–max; censored draws), the eigen
    radii beside their eigenvalues and the loss sharpness when recorded; the random radii ranked only beyond
    their spread over draws; the time."""
    out, radii = [], {}
    for name, s in result["solutions"].items():
        found = np.asarray([d["radius"] for d in s["random"] if d["radius"] is not None], dtype=float)
        censored = len(s["random"]) - len(found)
        if len(found):
            radii[name] = found
            text = (f"{_label(name)} (accuracy {s['accuracy']:.4f}): random radius (units of the direction) "
                    f"{found.mean():.4g} "
                    f"(SD {found.std(ddof=1) if len(found) > 1 else float('nan'):.3g}; "
                    f"{found.min():.4g}–{found.max():.4g} over {len(found)} draws")  # fmt: skip
        else:
            top = max(d.get("censored_at") or 0 for d in s["random"])
            text = f"{_label(name)} (accuracy {s['accuracy']:.4f}): no random draw left the basin up to r = {top:.4g} ("
        text += f"{'; ' if len(found) else ''}{censored} censored)" if censored else ")"
        eig = [f"{e['axis']} (λ {e['eigenvalue']:.4g}): " + (f"{e['radius']:.4g}" if e["radius"] is not None
               else f"> {e['censored_at']:.4g}") for e in s.get("eigen") or []]  # fmt: skip
        if eig:
            text += "; along the top Hessian eigenvectors (weight-space norm) " + ", ".join(eig)
        sharp = (s.get("loss_sharpness") or {}).get("weights", {}).get("worst_case")
        if isinstance(sharp, int | float):  # sharpness.json's, when the run folder holds one
            text += f"; worst-case loss sharpness {sharp:.4g}"
        out.append(text + ".")
    if len(radii) >= 2:
        out.append("Random radii: " + ranked_by_spread(radii).replace("flattest", "narrowest") + ".")
    criterion = result.get("criterion") or f"epsilon {result.get('epsilon')}"
    out.append(f"Criterion: accuracy below the solution's own by more than {criterion}; {result['draws']} random "
               f"directions per solution (seeded from seed {result['seed']}), {result['evaluations']} evaluations "
               f"of {result['eval_samples']} samples in {time_text(seconds_of('basins', result))}.")  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- curvature per block


def block_readings(result: dict) -> list[str]:
    """Per solution and coordinates: the whole Hessian's top eigenvalue and trace ± SE, the block with the largest
    top eigenvalue and the spread of the blocks' (max / min), the largest block trace (and whether it leads the
    next beyond 2 SE), the mean JS distance; interlacing checked; the time."""
    out = []
    for name, per in result["solutions"].items():
        for coordinates, e in per.items():
            if "blocks" not in e:
                continue
            blocks = e["blocks"]
            top = sorted(blocks, key=lambda b: b["top_eigenvalue"], reverse=True)
            positive = [b["top_eigenvalue"] for b in blocks if b["top_eigenvalue"] > 0]
            ratio = f"{max(positive) / min(positive):.3g}×" if positive else "–"
            text = (f"{_label(name)}, {coordinates}: whole Hessian top eigenvalue {e['top_eigenvalue']:.4g}"
                    + ("" if e.get("trace") is None else f", trace {_pm(e['trace'], e['trace_se'])}")
                    + f"; largest block top eigenvalue {top[0]['name']} {top[0]['top_eigenvalue']:.4g}, the blocks' "
                    f"span max/min {ratio} over {len(blocks)} blocks")  # fmt: skip
            traced = [b for b in blocks if b.get("trace") is not None]
            if len(traced) >= 2:
                first, second = sorted(traced, key=lambda b: b["trace"], reverse=True)[:2]
                se = math.hypot(first["trace_se"], second["trace_se"])
                lead = "within noise of" if _within(first["trace"] - second["trace"], se) else "beyond 2 SE above"
                text += (
                    f"; largest block trace {first['name']} {first['trace']:.4g} ± {first['trace_se']:.2g}, "
                    f"{lead} the next ({second['name']} {second['trace']:.4g} ± {second['trace_se']:.2g})"
                )
            if "js_distance" in e:
                js = np.asarray(e["js_distance"])
                off = js[~np.eye(len(js), dtype=bool)]
                text += f"; JS distance between blocks mean {off.mean():.3f} (max {off.max():.3f})" if len(off) else ""
            tol = result["settings"].get("tol", 1e-3)
            ok = top[0]["top_eigenvalue"] <= e["top_eigenvalue"] * (1 + tol) + 1e-12
            text += f"; no block above the whole (interlacing): {'holds' if ok else 'FAILS'}"
            out.append(text + ".")
    hvps = sum(e.get("hvps", 0) for per in result["solutions"].values() for e in per.values())
    out.append(f"Blocks by {result['block_by']}; {hvps} Hessian-vector products on {result['eval_samples']} samples "
               f"in {time_text(seconds_of('blocks', result))}.")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ the Hessian eigen chart


def hessian_readings(meta: dict, data: dict) -> list[str]:
    """The chart's eigenvalues, its range and the loss's rise at the axes' ends against the quadratic model's,
    the second-difference check; the time."""
    lam = meta["chart_eigenvalues"]
    x, y, loss = np.asarray(data["x"]), np.asarray(data["y"]), np.asarray(data["loss"])
    i0, j0 = int(np.argmin(np.abs(y))), int(np.argmin(np.abs(x)))  # the row y = 0 and the column x = 0
    centre = float(loss[i0, j0])
    rise = (meta.get("chart_geometry") or {}).get("hessian", {}).get("rise")
    chosen = f", chosen so that ½λ1α² = {rise:g}" if rise is not None else ""
    out = [f"Top-2 Hessian eigenvalues at {_label(meta['config']['center'])}: λ1 = {lam[0]:.4g}, λ2 = {lam[1]:.4g}; "
           f"axes over ±{x.max():.4g}{chosen} (unit eigenvectors in {meta['config'].get('coordinates', 'weights')} "
           "coordinates)."]  # fmt: skip
    rises = []
    for axis, line, coord, value in (("x", loss[i0, :], x, lam[0]), ("y", loss[:, j0], y, lam[1])):
        edge = 0.5 * (float(line[0]) + float(line[-1])) - centre
        rises.append(f"{axis}: {edge:.4g} (½λα² = {0.5 * value * float(coord.max()) ** 2:.4g})")
    out.append("Mean rise of the loss at the axes' ends over the centre: " + ", ".join(rises) + ".")
    check = meta.get("chart_check") or {}
    axes = check.get("axes") or []
    if axes:
        out.append(f"Second difference at the centre (h = {check['step']:.3g}) vs eigenvalue: "
                   + ", ".join(f"{a['axis']} {a['second_difference']:.4g} vs {a['eigenvalue']:.4g}" for a in axes)
                   + ".")  # fmt: skip
    out.append(f"The chart's run took {time_text(seconds_of('hessian', meta))}.")
    return out
