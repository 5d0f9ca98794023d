"""The gallery's "Instruments" part (experiments.instruments, experiments.readings_instruments): the readings on
small synthetic JSON / NPZ contents against values computed here by hand, numpy or the statistics module; and on a
tiny run, the instruments run when their outputs are missing (not again when present and newer than the
solutions), their figures copied and their sentences made of the numbers their outputs hold."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics

import numpy as np
import pytest

from experiments import figures, instruments
from experiments import readings_instruments as ri


def _merge(kind, solutions, gap, se, off=0.0) -> dict:
    return {"kind": kind, "solutions": solutions, "weights": [1 / len(solutions)] * len(solutions), "gap": gap,
            "gap_se": se, "off_plane_distance": off}  # fmt: skip


def test_merge_readings_mark_each_gap_against_two_paired_ses():
    result = {"passes": 9, "eval_samples": 64, "seconds": 150.0, "merges": [
        _merge("task_arithmetic", ["ft", "lora"], 0.05, 0.01),  # above, 5 SE
        _merge("task_arithmetic", ["ft", "randlora"], 0.015, 0.01),  # within noise
        _merge("task_arithmetic", ["lora", "randlora"], -0.03, 0.01),  # below, 3 SE
        _merge("ties", ["ft", "lora"], 0.2, 0.02, off=1.5), _merge("ties", ["ft", "lora", "randlora"], 0.1, 0.02, 2.5),
    ]}  # fmt: skip
    out = ri.merge_readings(result)
    assert out[0].startswith("task arithmetic (weights (0.5, 0.5)): merged loss − best endpoint's: full")
    assert "full fine-tuning + LoRA 0.05 ± 0.01, full fine-tuning + RandLoRA 0.015 ± 0.01 (within noise)" in out[0]
    assert "above the best endpoint beyond 2 SE: full fine-tuning + LoRA; below it: LoRA + RandLoRA" in out[0]
    assert out[1].startswith("TIES (weights (0.5, 0.5) and (0.333, 0.333, 0.333))") and "below it: none" in out[1]
    assert "task arithmetic 0–0, TIES 1.5–2.5" in out[2]
    assert out[3] == "5 merges, 9 passes over the 64 evaluation samples of paths.json in 2.5 min."


def _side(barrier, se) -> dict:
    return {"barrier": barrier, "barrier_se": se}


def test_layerwise_readings_list_the_blocks_beyond_noise_and_the_largest():
    result = {"sides": ["rest_at_A", "rest_at_B"], "points": 5, "passes": 40, "eval_samples": 32, "seconds": 12.5,
              "pairs": {"ft-randlora": {"whole": _side(0.04, 0.01), "blocks": {
                  "layer 0": {"rest_at_A": _side(0.001, 0.002), "rest_at_B": _side(0.003, 0.002)},
                  "layer 1": {"rest_at_A": _side(0.05, 0.01), "rest_at_B": _side(0.02, 0.015)}}}}}  # fmt: skip
    (pair, time) = ri.layerwise_readings(result)
    assert pair.startswith("full fine-tuning–RandLoRA: the whole path's barrier 0.04 ± 0.01;")
    assert "beyond 2 SE: layer 1 (rest at full fine-tuning: 0.05 ± 0.01); largest layer 1" in pair
    assert (
        "(2 blocks walked)" in pair and time == "5 points per path, 40 passes over the 32 evaluation samples in 12.5 s."
    )
    quiet = json.loads(json.dumps(result))
    quiet["pairs"]["ft-randlora"]["blocks"]["layer 1"]["rest_at_A"] = _side(0.01, 0.01)
    assert "none (every block within noise)" in ri.layerwise_readings(quiet)[0]


def _draws(radii) -> list[dict]:
    return [{"radius": r, "censored_at": None if r is not None else 8.192} for r in radii]


def test_basin_readings_report_the_spread_over_draws_and_rank_only_beyond_it():
    result = {"draws": 3, "seed": 0, "seeds": [11, 12, 13], "evaluations": 120, "eval_samples": 64, "seconds": 30.0,
              "criterion": "2 paired SE", "solutions": {
                  "ft": {"accuracy": 0.9, "random": _draws([0.1, 0.2, 0.3]), "eigen": [
                      {"axis": "x", "eigenvalue": 12.0, "radius": 0.5}, {"axis": "y", "eigenvalue": 3.0,
                                                                          "radius": None, "censored_at": 9.0}]},
                  "lora": {"accuracy": 0.85, "random": _draws([0.5, 0.6, None])},
                  "randlora": {"accuracy": 0.8, "random": _draws([None, None, None])}}}  # fmt: skip
    out = ri.basin_readings(result)
    sd = statistics.stdev([0.1, 0.2, 0.3])
    assert out[0].startswith(
        f"full fine-tuning (accuracy 0.9000): random radius (units of the direction) 0.2 (SD {sd:.3g}; "
        "0.1–0.3 over 3 draws)"
    )
    assert "eigenvectors (weight-space norm) x (λ 12): 0.5, y (λ 3): > 9" in out[0]
    assert (
        f"random radius (units of the direction) 0.55 (SD {statistics.stdev([0.5, 0.6]):.3g}; 0.5–0.6 over 2 "
        "draws; 1 censored)" in out[1]
    )
    assert "no random draw left the basin up to r = 8.192 (3 censored)" in out[2]
    assert "narrowest first, beyond the spread of draws" in out[3] and "full fine-tuning 0.2000" in out[3]
    assert "3 random directions per solution (seeded from seed 0), 120 evaluations of 64 samples in 30.0 s" in out[4]


def test_block_readings_against_numpy():
    js = np.array([[0.0, 0.2, 0.4], [0.2, 0.0, 0.6], [0.4, 0.6, 0.0]])
    blocks = [{"name": "embeddings", "top_eigenvalue": 2.0, "trace": 5.0, "trace_se": 1.0},
              {"name": "layer 0", "top_eigenvalue": 8.0, "trace": 20.0, "trace_se": 2.0},
              {"name": "layer 1", "top_eigenvalue": 4.0, "trace": 17.0, "trace_se": 2.0}]  # fmt: skip
    entry = {"top_eigenvalue": 9.0, "trace": 42.0, "trace_se": 3.0, "blocks": blocks, "js_distance": js.tolist(),
             "hvps": 100, "seconds": 90.0}  # fmt: skip
    result = {"block_by": "layer", "eval_samples": 64, "settings": {"tol": 1e-2},
              "solutions": {"lora": {"weights": entry, "adapter": {**entry, "seconds": 30.0}},
                            "ft": {"adapter": {"skipped": "no adapter"}}}}  # fmt: skip
    out = ri.block_readings(result)
    assert out[0].startswith("LoRA, weights: whole Hessian top eigenvalue 9, trace 42 ± 3")
    assert "largest block top eigenvalue layer 0 8, the blocks' span max/min 4× over 3 blocks" in out[0]
    lead = "within noise of" if 20 - 17 <= 2 * math.hypot(2, 2) else "beyond"
    assert f"largest block trace layer 0 20 ± 2, {lead} the next (layer 1 17 ± 2)" in out[0]
    assert f"JS distance between blocks mean {js[~np.eye(3, dtype=bool)].mean():.3f} (max 0.600)" in out[0]
    assert "(interlacing): holds" in out[0] and len(out) == 3
    assert out[2] == "Blocks by layer; 200 Hessian-vector products on 64 samples in 2.0 min."
    blocks[1]["top_eigenvalue"] = 9.5  # above the whole beyond the tolerance
    assert "(interlacing): FAILS" in ri.block_readings(result)[0]


def test_hessian_readings_of_a_quadratic_bowl_give_half_lambda_alpha_squared():
    x = y = np.linspace(-2.0, 2.0, 5)
    lam = [3.0, 0.5]
    loss = 1.0 + 0.5 * lam[0] * x[None, :] ** 2 + 0.5 * lam[1] * y[:, None] ** 2  # rows: y, columns: x
    check = {"step": 0.2, "axes": [{"axis": "x", "eigenvalue": 3.0, "second_difference": 3.01},
                                   {"axis": "y", "eigenvalue": 0.5, "second_difference": 0.49}]}  # fmt: skip
    meta = {"chart_eigenvalues": lam, "config": {"center": "randlora", "coordinates": "weights"},
            "chart_geometry": {"hessian": {"rise": 6.0}}, "chart_check": check, "wall_time_total_s": 75.0,
            "wall_time_s": {"grid": 1.0}}  # fmt: skip
    out = ri.hessian_readings(meta, {"x": x, "y": y, "loss": loss})
    assert (
        out[0]
        == "Top-2 Hessian eigenvalues at RandLoRA: λ1 = 3, λ2 = 0.5; axes over ±2, chosen so that ½λ1α² = 6 (unit "
        "eigenvectors in weights coordinates)."
    )
    assert "x: 6 (½λα² = 6), y: 1 (½λα² = 1)" in out[1]
    assert "(h = 0.2) vs eigenvalue: x 3.01 vs 3, y 0.49 vs 0.5" in out[2] and out[3].endswith("took 1.2 min.")


FAST_BLOCKS = ["--samples", "16", "--trace-probes", "3", "--slq-probes", "1", "--slq-steps", "4", "--tol", "1e-2",
               "--coordinates", "weights"]  # fmt: skip


def test_instruments_run_when_missing_and_their_sentences_hold_the_measured_numbers(
    tmp_path, monkeypatch, wordnet_root, tiny_wordnet_run, no_figure_drawing
):
    from tests.conftest import TINY_RUN

    monkeypatch.setattr(figures, "ROOT", tmp_path)
    monkeypatch.setitem(figures.OFFLINE, "wordnet", ["--dataset", "wordnet", "--data-root", str(wordnet_root),
                                                     *TINY_RUN])  # fmt: skip
    monkeypatch.setattr(instruments, "BLOCKS_ARGV", FAST_BLOCKS)
    monkeypatch.setitem(instruments.RECIPES, "blocks", ("landscape.curvature", ["--blocks", *FAST_BLOCKS], "blocks",
                                                        "Curvature per block"))  # fmt: skip
    runs, fig = tmp_path / "runs", tmp_path / "figures"
    run = runs / "wordnet"
    shutil.copytree(tiny_wordnet_run, run)
    fig.mkdir()
    assert instruments.section("wordnet", run, runs, fig, tmp_path) == ""  # nothing measured yet
    instruments.ensure("wordnet", run, False, tmp_path)
    figures.ensure_hessian("wordnet", run, runs, False)
    for stem in ("merges", "layerwise", "basins", "blocks"):
        assert instruments.done(stem, run) and (run / f"{stem}.png").is_file()
    hessian = runs / "wordnet-hessian"
    meta = json.loads((hessian / "landscape.json").read_text())
    assert meta["chart"] == "hessian" and meta["config"]["center"] == "randlora" and meta["dtype"] == "float32"
    stamps = {p: p.stat().st_mtime_ns for p in [*run.glob("*.json"), hessian / "landscape.json"]}
    instruments.ensure("wordnet", run, False, tmp_path)  # every output present: nothing runs again
    figures.ensure_hessian("wordnet", run, runs, False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    (hessian / "landscape.json").write_text(json.dumps({**meta, "dtype": "bfloat16"}))  # a chart made in bf16
    figures.ensure_hessian("wordnet", run, runs, False)  # is redone in fp32
    meta = json.loads((hessian / "landscape.json").read_text())
    assert meta["dtype"] == "float32"

    text = instruments.section("wordnet", run, runs, fig, tmp_path)
    assert text.startswith("#### Instruments")
    for stem in ("merges", "layerwise", "basins", "blocks", "hessian"):
        assert f"](figures/wordnet_{stem}.png)" in text and (fig / f"wordnet_{stem}.png").is_file()
    merges = json.loads((run / "merges.json").read_text())
    first = merges["merges"][0]
    assert ri._pm(first["gap"], first["gap_se"]) in text
    assert f"`python -m landscape.merges --run runs/wordnet --no-progress` ({ri.time_text(merges['seconds'])})" in text
    layerwise = json.loads((run / "layerwise.json").read_text())
    whole = layerwise["pairs"]["ft-lora"]["whole"]
    assert f"the whole path's barrier {ri._pm(whole['barrier'], whole['barrier_se'])}" in text
    basins = json.loads((run / "basins.json").read_text())
    assert f"{basins['evaluations']} evaluations of {basins['eval_samples']} samples" in text
    blocks = json.loads((run / "blocks.json").read_text())
    top = blocks["solutions"]["lora"]["weights"]["top_eigenvalue"]
    assert f"LoRA, weights: whole Hessian top eigenvalue {top:.4g}" in text and "(interlacing): holds" in text
    assert f"λ1 = {meta['chart_eigenvalues'][0]:.4g}, λ2 = {meta['chart_eigenvalues'][1]:.4g}" in text
    assert "--chart hessian --center randlora --solutions ft=runs/wordnet/solutions/ft" in text
    total = sum(ri.seconds_of(k, json.loads((run / f"{k}.json").read_text())) for k in instruments.RECIPES)
    assert f"; {ri.time_text(total + ri.seconds_of('hessian', meta))} in all" in text

    later = max(p.stat().st_mtime for p in run.glob("*.json")) + 10  # a solution retrained later: all stale
    os.utime(next(p for p in (run / "solutions" / "lora").glob("**/*") if p.is_file()), (later, later))
    assert not any(instruments.done(kind, run) for kind in instruments.RECIPES)


def test_blocks_made_with_other_settings_are_redone(tmp_path):
    argv = dict(zip(instruments.BLOCKS_ARGV[0::2], instruments.BLOCKS_ARGV[1::2], strict=True))
    settings = {k[2:].replace("-", "_"): float(v) for k, v in argv.items() if k not in ("--samples", "--coordinates")}
    settings["coordinates"] = [argv["--coordinates"]]
    result = {"complete": True, "eval_samples": int(argv["--samples"]), "settings": settings}
    (tmp_path / "blocks.json").write_text(json.dumps(result))
    assert instruments.done("blocks", tmp_path)
    changes = [{"eval_samples": int(argv["--samples"]) + 1}, {"complete": False},
               {"settings": {**settings, "slq_steps": settings["slq_steps"] + 1}},
               {"settings": {**settings, "coordinates": ["weights", "adapter"]}}]  # fmt: skip
    for change in changes:
        (tmp_path / "blocks.json").write_text(json.dumps({**result, **change}))
        assert not instruments.done("blocks", tmp_path), change


@pytest.mark.parametrize(
    "name", ["backbone._blocks.3._expand_conv.weight", "encoder.layer.3.attention.self.query.weight"]
)
def test_layer_blocks_of_efficientnet_and_bert(name):
    from landscape.layerwise import block_of

    assert block_of(name) == "layer 3"
