"""The gallery's "Beyond the plane" readings (experiments.figures) on small synthetic JSON / NPZ contents,
against values computed here by hand or with the statistics module: nothing is trained or evaluated."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from adapters.errors import UserError
from experiments import figures

X = np.linspace(-1.0, 1.0, 5)  # -1, -0.5, 0, 0.5, 1


def _line(loss, se) -> dict:
    return {"x": X, "y": np.zeros(1), "loss": np.array([loss], float), "loss_se": np.array([se], float)}


def test_line_rise_is_the_mean_of_both_ends_minus_the_centre_with_independent_ses():
    rise, se = figures.line_rise(X, np.array([0.5, 0.3, 0.2, 0.4, 0.7]), np.array([0.02, 0.0, 0.01, 0.0, 0.04]))
    assert rise == pytest.approx((0.5 + 0.7) / 2 - 0.2)  # 0.4
    assert se == pytest.approx(math.sqrt(0.02**2 / 4 + 0.04**2 / 4 + 0.01**2))
    with pytest.raises(UserError, match="no point at α = -1"):
        figures.line_rise(np.linspace(-0.5, 0.5, 5), np.zeros(5), np.zeros(5))


def test_line_minimum_off_the_centre_is_reported_with_its_se():
    se = np.array([0.01, 0.02, 0.03, 0.04, 0.05])
    assert figures.line_minimum(X, np.array([0.5, 0.3, 0.2, 0.4, 0.7]), se) is None
    alpha, gap, gap_se = figures.line_minimum(X, np.array([0.5, 0.1, 0.2, 0.4, 0.7]), se)
    assert (alpha, gap, gap_se) == (-0.5, pytest.approx(0.1), pytest.approx(math.hypot(0.03, 0.02)))


def test_rise_readings_order_the_solutions_and_mark_noise_and_odd_minima():
    lines = {
        "ft": _line([0.9, 0.4, 0.3, 0.5, 1.1], [0.01] * 5),  # rise 0.7
        "lora": _line([0.35, 0.25, 0.2, 0.22, 0.45], [0.01] * 5),  # rise 0.2
        "randlora": _line([0.36, 0.1, 0.2, 0.32, 0.46], [0.01] * 5),  # rise 0.21, lowest at α = -0.5
    }
    directions = {"norm": "filter", "seed": 7, "elements_moved": 1234, "ignore": "biasbn"}
    out = figures.rise_readings(lines, directions)
    step = math.sqrt(2) * math.sqrt(0.01**2 / 2 + 0.01**2)  # SE of a difference of two rises
    assert "LoRA 0.2000 ± 0.0122 ≈ RandLoRA 0.2100 ± 0.0122 < full fine-tuning 0.7000 ± 0.0122" in out[0]
    # at the first step, |α| = 0.5: ft (0.4 + 0.5)/2 − 0.3, LoRA (0.25 + 0.22)/2 − 0.2, RandLoRA (0.1 + 0.32)/2 − 0.2
    assert "|α| = 0.5: RandLoRA 0.0100 ± 0.0122 ≈ LoRA 0.0350 ± 0.0122 < full fine-tuning 0.1500 ± 0.0122" in out[0]
    assert f"SE of each step: {step:.4f}, {step:.4f}" in out[0] and "seed (7)" in out[0] and "1,234" in out[0]
    assert len(out) == 2 and "RandLoRA is lowest at α = -0.5" in out[1]
    assert f"0.1000 ± {math.hypot(0.01, 0.01):.4f}" in out[1] and "within noise" not in out[1]


def _entry(samples: list[float], top: float, converged: bool = True, dim: int = 100) -> dict:
    x = np.asarray(samples)
    return {
        "dim": dim,
        "eigenvalues": [top, top / 2],
        "eigen": {"converged": converged},
        "trace": float(x.mean()),
        "trace_se": float(x.std(ddof=1) / math.sqrt(len(x))),
        "hutchinson": {"samples": samples},
        "hvps": 10,
        "seconds": 30.0,
    }


def _curvature() -> dict:
    base = [100.0, -50.0, 80.0, -20.0, 30.0]  # probe-to-probe spread far larger than the solutions' differences
    ft = [b + d for b, d in zip(base, [10, 11, 9, 10, 10], strict=True)]
    rl = [b + d for b, d in zip(base, [1, -1, 0.5, -0.5, 0], strict=True)]
    return {
        "settings": {"top_k": 2, "tol": 1e-3, "trace_probes": 10, "slq_probes": 1, "slq_steps": 20},
        "seed": 0,
        "eval_samples": 64,
        "complete": True,
        "solutions": {
            "ft": {"weights": _entry(ft, 12.3456), "adapter": {"skipped": "no adapter"}},
            "lora": {"weights": _entry(base, 5.0), "adapter": _entry(base, 2.5, dim=20)},
            "randlora": {"weights": _entry(rl, 4.0, converged=False), "adapter": _entry(rl, 0.75, dim=30)},
        },
    }


def test_trace_differences_use_the_paired_se_over_the_same_probes():
    result = _curvature()
    diff = [10, 11, 9, 10, 10]
    assert figures.trace_step_se(result, "ft", "lora") == pytest.approx(statistics.stdev(diff) / math.sqrt(5))
    out = figures.curvature_readings(result)
    assert "first 64" in out[0] and "10 Rademacher probes" in out[0] and "to 0.001 relative" in out[0]
    # ft is 10 above with a paired SE of 0.61: beyond noise although each trace's own SE is about 28
    se = {
        k: statistics.stdev(e["weights"]["hutchinson"]["samples"]) / math.sqrt(5)
        for k, e in result["solutions"].items()
    }
    assert (
        f"LoRA 28 ± {se['lora']:.4g} ≈ RandLoRA 28 ± {se['randlora']:.4g} < full fine-tuning 38 ± {se['ft']:.4g}"
        in out[1]
    )
    paired = [statistics.stdev([1, -1, 0.5, -0.5, 0]), statistics.stdev([9, 12, 8.5, 10.5, 10])]
    assert f"same 10 probes: {paired[0] / math.sqrt(5):.3g}, {paired[1] / math.sqrt(5):.3g};" in out[1]
    assert "full fine-tuning 12.35, LoRA 5, RandLoRA 4 (NOT converged)" in out[1] and "100 adapted" in out[1]
    assert "LoRA (20) top eigenvalue 2.5" in out[2] and "RandLoRA (30) top eigenvalue 0.75" in out[2]
    assert "2.5 min for 50 Hessian-vector products over 5 entries (3.0 s each" in out[3]


def test_curve_readings_report_the_barrier_and_the_peak_on_curve_and_line():
    meta = {
        "pair": "ft-lora", "kind": "bezier", "bends": 3, "points": 5, "eval_samples": 320, "seconds": 90.0,
        "format_version": 2, "train": {"steps": 150, "lr": 2e-5, "train_seconds": 120.0},
        "curve": {"barrier": 0.0, "barrier_se": 0.0, "t_max": 0.0, "peak_above_endpoint_mean": 0.001,
                  "peak_above_endpoint_mean_se": 0.002, "peak_t": 1.0, "mean_loss": 0.2, "loss_t0": 0.3,
                  "loss_t1": 0.32},
        "line": {"barrier": 0.012, "barrier_se": 0.004, "t_max": 0.5, "peak_above_endpoint_mean": 0.02,
                 "peak_above_endpoint_mean_se": 0.005, "peak_t": 0.5, "mean_loss": 0.21},
    }  # fmt: skip
    out = figures.curve_readings(meta)
    assert (
        "above the chord (1 − t)·L(0) + t·L(1), no barrier on the curve and a barrier of 0.0120 ± 0.0040 on the "
        "straight line;" in out[0]
    )
    assert (
        "peak above the endpoint mean (not a barrier) 0.0010 ± 0.0020 (within noise) on the curve and "
        "0.0200 ± 0.0050 on the line, at t = 1 on the curve, 0.5 on the line;" in out[0]
    )
    # a curves JSON from before format 2 reads the same: its barrier was the peak, its chord barrier the barrier
    old = {**meta, "curve": {**meta["curve"], "barrier": 0.001, "barrier_se": 0.002, "t_max": 1.0,
                             "chord_barrier": 0.0, "chord_barrier_se": 0.0, "chord_t_max": 0.0},
           "line": {**meta["line"], "barrier": 0.02, "barrier_se": 0.005, "chord_barrier": 0.012,
                    "chord_barrier_se": 0.004, "chord_t_max": 0.5}}  # fmt: skip
    for entry in (old["curve"], old["line"]):
        del entry["peak_above_endpoint_mean"], entry["peak_above_endpoint_mean_se"], entry["peak_t"]
    assert figures.curve_readings(old) == out
    assert "Bézier curve ft-lora (3 bends, 150 steps" in out[0] and "lr 2e-05" in out[0]
    assert out[1] == "Wall time: training 2.0 min, evaluation 1.5 min."
    # with the npz: the curve's dip below its lower end (t = 0), SEs combined as if independent
    data = {"t": np.linspace(0, 1, 5), "loss": np.array([[0.3, 0.25, 0.2, 0.28, 0.32]]),
            "loss_se": np.array([[0.01, 0.01, 0.02, 0.01, 0.01]])}  # fmt: skip
    low = figures.curve_readings({**meta, "line": {**meta["line"], "peak_t": 1.0}}, data)
    assert "both at the end t = 1, where it is half the endpoints' gap whatever the path" in low[0]
    assert (
        f"lowest at t = 0.5, loss 0.2000, 0.1000 ± {math.hypot(0.01, 0.02):.4f} below the lower end (t = 0, 0.3000"
        in low[1]
    )


def test_plane_readings_find_the_lowest_grid_point():
    x = y = np.linspace(-1.0, 1.0, 3)
    loss = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.1], [0.9, 0.9, 0.9]])
    meta = {"chart_geometry": {"directions": {"center": "randlora", "norm": "filter", "seed": 0,
                                              "ignore": "biasbn", "cosine": 1e-4}}}  # fmt: skip
    (text,) = figures.plane_readings(meta, {"x": x, "y": y, "loss": loss, "loss_se": np.full((3, 3), 0.03)})
    assert f"at (α, β) = (+1.0, +0.0), 0.4000 ± {math.hypot(0.03, 0.03):.4f} below the centre" in text
    assert "loss at the centre 0.5000 ± 0.0300" in text and "spans 0.1000–0.9000" in text


def test_beyond_section_reads_the_files_and_links_the_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    runs, fig = tmp_path / "runs", tmp_path / "figures"
    run = runs / "wordnet"
    run.mkdir(parents=True)
    fig.mkdir()
    directions = {"center": "randlora", "norm": "filter", "seed": 0, "ignore": "biasbn", "cosine": 0.0,
                  "elements_moved": 10}  # fmt: skip
    for key, out in figures.random_outputs("wordnet", runs).items():
        out.mkdir(parents=True)
        center = {**directions, "center": "randlora" if key == "plane" else key}
        meta = {"model": "m", "dataset": "d", "wall_time_s": {"train_head_only": 6.0, "grid": 54.0},
                "reused_stages": [], "chart_geometry": {"directions": center}}  # fmt: skip
        (out / "landscape.json").write_text(json.dumps(meta))
        (out / "landscape.png").write_bytes(b"png")
        ny = 5 if key == "plane" else 1
        grid = np.tile([0.5, 0.3, 0.2, 0.4, 0.7], (ny, 1))
        np.savez(out / "landscape.npz", x=X, y=X if ny == 5 else np.zeros(1), loss=grid, loss_se=grid * 0 + 0.01)
    vertex = {"ft": 0.2, "lora": 0.2005, "randlora": 0.1999}
    run_meta = {"solutions": {k: {"vertex_loss": v} for k, v in vertex.items()}, "classes": list("abcdefgh")}
    (run / "landscape.json").write_text(json.dumps(run_meta))
    (run / "curvature.json").write_text(json.dumps(_curvature()))
    (run / "curvature.png").write_bytes(b"png")
    text = figures.beyond_section("wordnet", run, runs, fig)
    assert text.startswith("#### Beyond the plane")
    for png in ("random_plane", "random_lines", "curvature"):
        assert f"](figures/wordnet_{png}.png)" in text and (fig / f"wordnet_{png}.png").stat().st_size > 0
    assert "--center C --solutions ft=runs/wordnet/solutions/ft" in text and "--out runs/wordnet-random-line-C" in text
    assert "(1.0 min); a random line" in text and "trained again for these charts: head only (baseline)" in text
    assert "to within 5.0e-04 (largest difference, LoRA)" in text  # |0.2 − 0.2005|: the lines' centres
    assert f"losses are 0.500–0.700, against ln 8 = {math.log(8):.3f} for a uniform guess" in text
    assert "landscape.curvature --run runs/wordnet --samples 64" in text and "curve between" not in text  # no curve


def test_made_by_set_and_curvature_done(tmp_path):
    (tmp_path / "landscape.json").write_text(
        json.dumps({"command": f"python -m landscape.connectivity --dataset wordnet --out {tmp_path} --no-progress"})
    )
    assert figures.made_by_set(tmp_path, ["--dataset", "wordnet"])
    assert not figures.made_by_set(tmp_path, ["--dataset", "fashion-mnist"])
    path = tmp_path / "curvature.json"
    assert not figures._curvature_done(path)
    result = _curvature()
    path.write_text(json.dumps(result))
    assert figures._curvature_done(path)
    path.write_text(json.dumps({**result, "eval_samples": 320}))
    assert not figures._curvature_done(path)
    path.write_text(json.dumps({**result, "complete": False}))
    assert not figures._curvature_done(path)
