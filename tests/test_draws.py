"""Several draws of random directions (landscape.draws): K draws are K distinct direction sets with the recorded
seeds and one centre, each draw's grid equals a chart drawn afresh with its seed, the spread keys equal numpy's
over the stored per-draw losses, a point above ln C is flagged collapsed and left out of the sharpness, the
step scale keeps every draw's ends below ln C, the ranking says "within the spread" when draws overlap, the
--draws option's checks, and the command line end to end."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.models.base import Encoded
from experiments import readings
from landscape import config as run_config
from landscape import connectivity, draws
from landscape.engine import directions
from landscape.engine.grid import EvalSet, PlaneEvaluator, run_grid
from landscape.engine.plane import centred_axis
from tests.test_directions import tiny as tiny  # noqa: F401 (the fixture: tiny-bert and its solutions)

CLASSES = 3
SEED = 11


@pytest.fixture(scope="module")
def fitted():
    """A small MLP fitted to 3 separable classes (its loss far below ln 3) and its evaluation set."""
    torch.manual_seed(0)
    x = torch.randn(48, 6)
    y = (x @ torch.randn(6, CLASSES)).argmax(1)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    model = Wrapped(net).eval()
    return model, EvalSet.prepare(Encoded({"features": x}), y, 16, "cpu")


class Wrapped(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def _evaluator(model, evals, seed: int, line: bool = True) -> PlaneEvaluator:
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    chart = directions.draw_chart(weights, "ft", seed, line=line)
    return PlaneEvaluator(copy.deepcopy(model), chart, evals, "cpu")


def _grid(model, evals, xs, ys, seed: int, line: bool = True) -> np.ndarray:
    """The loss grid of a chart drawn afresh with ``seed`` on a fresh evaluator: the reference for a redrawn draw."""
    return run_grid(_evaluator(model, evals, seed, line), xs, ys, progress=False)["loss"]


def test_k_draws_are_distinct_direction_sets_with_recorded_seeds_and_one_centre(fitted):
    model, evals = fitted
    xs, ys, k = centred_axis(5) * 0.5, np.zeros(1), 3
    ev = _evaluator(model, evals, SEED)
    arrays = draws.evaluate_draws(ev, xs, ys, run_grid(ev, xs, ys, progress=False), k, SEED, progress=False)
    seeds = arrays["draw_seeds"].tolist()
    assert seeds[0] == SEED and len(set(seeds)) == k and seeds == [directions.draw_seed(SEED, i) for i in range(k)]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sets = [directions.draw_directions(weights, s, count=1)[0] for s in seeds]
    moved = [n for n, w in weights.items() if w.dim() > 1]
    for a in range(k):
        for b in range(a + 1, k):
            assert all(not torch.equal(sets[a][n], sets[b][n]) for n in moved)
    loss = arrays["draw_loss"]
    assert loss.shape == (k, 1, 5) and np.ptp(loss[:, 0, -1]) > 1e-4  # the draws' ends differ
    assert np.all(loss[:, 0, 2] == loss[0, 0, 2])  # the same centre in every draw: the model's own loss
    assert loss[0, 0, 2] == pytest.approx(_mean_loss(model, evals), abs=1e-6)
    for i, s in enumerate(seeds):  # draw i redrawn in place = a chart drawn afresh with its seed
        np.testing.assert_array_equal(loss[i], _grid(model, evals, xs, ys, s))
    for n in weights:  # the chart holds draw 0 again
        assert torch.equal(ev.chart.u[n], sets[0][n])


def _mean_loss(model, evals) -> float:
    with torch.no_grad():
        total = sum(F.cross_entropy(model(**x), t, reduction="sum").item() for x, t in evals.batches)
    return total / evals.n


def test_spread_keys_equal_numpy_over_the_stored_losses(fitted):
    model, evals = fitted
    xs, ys, k = centred_axis(5) * 0.2, centred_axis(3) * 0.2, 4
    ev = _evaluator(model, evals, SEED, line=False)
    arrays = draws.evaluate_draws(ev, xs, ys, run_grid(ev, xs, ys, progress=False), k, SEED, progress=False)
    level = math.log(CLASSES)
    out = draws.summary(xs, ys, arrays, level)
    loss = np.array(out["loss_per_draw"])
    np.testing.assert_array_equal(loss, arrays["draw_loss"])
    assert out["collapsed_points"] == 0 and out["seeds"] == arrays["draw_seeds"].tolist()
    # the plane's rise per draw by hand: the mean of the rises along δ (row y = 0) and along η (column x = 0)
    along_x = 0.5 * (loss[:, 1, 0] + loss[:, 1, 4]) - loss[:, 1, 2]
    along_y = 0.5 * (loss[:, 0, 2] + loss[:, 2, 2]) - loss[:, 1, 2]
    want = 0.5 * (along_x + along_y)
    sharp = out["sharpness"]["at_scale"]
    assert sharp["alpha"] == 0.2
    np.testing.assert_allclose(sharp["per_draw"], want, rtol=0, atol=1e-12)
    assert sharp["sd"] == pytest.approx(np.std(want, ddof=1), abs=1e-12)
    assert (sharp["min"], sharp["max"]) == (pytest.approx(want.min(), abs=1e-12), pytest.approx(want.max(), abs=1e-12))
    per_point = draws.spread_arrays(arrays, level)
    np.testing.assert_allclose(per_point["draw_loss_sd"], np.std(loss, axis=0, ddof=1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(per_point["draw_loss_min"], loss.min(axis=0))
    np.testing.assert_array_equal(per_point["draw_loss_max"], loss.max(axis=0))


def test_a_point_above_ln_c_is_flagged_collapsed_and_left_out_of_sharpness(fitted):
    model, evals = fitted
    xs, ys, k = np.array([-40.0, -0.2, -0.1, 0.0, 0.1, 0.2, 40.0]), np.zeros(1), 2
    ev = _evaluator(model, evals, SEED)
    arrays = draws.evaluate_draws(ev, xs, ys, run_grid(ev, xs, ys, progress=False), k, SEED, progress=False)
    level, loss = math.log(CLASSES), arrays["draw_loss"]
    assert np.all(loss[:, 0, [0, -1]] > level) and np.all(loss[:, 0, 1:-1] < level)  # the construction holds
    out = draws.summary(xs, ys, arrays, level)
    collapsed = np.array(out["collapsed_per_draw"])
    np.testing.assert_array_equal(collapsed, loss >= level)
    np.testing.assert_array_equal(draws.spread_arrays(arrays, level)["collapsed"], collapsed)
    assert out["collapsed_points"] == 2 * k
    sharp = out["sharpness"]["at_scale"]
    assert sharp["alpha"] == 0.2  # α = 40 left out
    np.testing.assert_allclose(sharp["per_draw"], 0.5 * (loss[:, 0, 1] + loss[:, 0, 5]) - loss[:, 0, 3], atol=1e-12)
    assert out["sharpness"]["first_step"]["alpha"] == 0.1


def test_step_scale_keeps_every_draws_ends_below_the_level(fitted):
    model, evals = fitted
    level, k = math.log(CLASSES), 3
    centre = _mean_loss(model, evals)
    # a level just above the centre: the probe must shrink the scale below 1
    tight = centre + 0.05
    ev = _evaluator(model, evals, SEED)
    a, record = draws.probe_scale(ev, k, SEED, tight)
    assert a < 1 and record["scale"] == a and record["probes"]
    for i in range(k):  # independently: every draw's ends at ±a are below the level
        ends = _grid(model, evals, np.array([-a, 0.0, a]), np.zeros(1), directions.draw_seed(SEED, i))
        assert ends[0, [0, 2]].max() < tight
    worst = max(_grid(model, evals, np.array([-2 * a, 2 * a]), np.zeros(1), directions.draw_seed(SEED, i)).max()
                for i in range(k))  # fmt: skip
    assert worst >= tight  # one halving less would not do
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(ev.chart.u[n], directions.draw_directions(weights, SEED, count=1)[0][n]) for n in weights)
    assert draws.probe_scale(ev, k, SEED, level)[0] <= 1.0
    assert draws.step_scale(lambda i, s: [9.0], 2, level, centre_loss=level + 1) == (1.0, [])  # centre collapsed


def test_ranking_says_within_the_spread_when_draws_overlap():
    apart = {"ft": np.array([0.10, 0.12, 0.11]), "lora": np.array([0.20, 0.22, 0.25])}
    text = readings.ranked_by_spread(apart)
    assert text.startswith("flattest first, beyond the spread") and text.index("full fine") < text.index("LoRA")
    mean, sd = np.mean(apart["lora"]), np.std(apart["lora"], ddof=1)
    assert f"LoRA {mean:.4f} (SD {sd:.4f}; 0.2000–0.2500)" in text
    overlapping = {"ft": np.array([0.10, 0.30, 0.11]), "lora": np.array([0.20, 0.22, 0.25])}
    text = readings.ranked_by_spread(overlapping)
    assert "within the spread of draws" in text and "no ranking" in text and "<" not in text
    assert "one draw" in readings.ranked_by_spread({"ft": np.array([0.1]), "lora": np.array([0.2])})


def test_draw_readings_compare_lines_at_a_step_every_grid_holds():
    """Lines with different step scales (±1 and ±0.5 on 5 points) are compared at α = 0.5, the largest step both
    grids hold without collapsed points."""

    def line(x, loss):
        loss = np.asarray(loss, float)[:, None, :]
        return {"x": np.asarray(x, float), "y": np.zeros(1), "draw_loss": loss, "collapsed": loss >= math.log(10),
                "draw_seeds": np.arange(len(loss)), "collapse_level": np.array(math.log(10))}  # fmt: skip

    lines = {
        "ft": line([-1, -0.5, 0, 0.5, 1], [[0.9, 0.5, 0.3, 0.5, 0.9], [0.8, 0.6, 0.3, 0.6, 0.8]]),  # 0.2, 0.3
        "lora": line([-0.5, -0.25, 0, 0.25, 0.5], [[1.3, 0.5, 0.3, 0.5, 1.3], [1.5, 0.6, 0.3, 0.6, 1.5]]),  # 1, 1.2
    }
    (text,) = readings.draw_readings(lines)
    assert "at α = 0.5 (the largest step" in text and "beyond the spread" in text
    assert "full fine-tuning 0.2500 (SD 0.0707; 0.2000–0.3000) < LoRA 1.1000" in text
    lines["ft"]["draw_loss"][1, 0, [1, 3]] = 1.6  # draw 1 of ft now rises by 1.3 at 0.5: the ranges overlap
    (text,) = readings.draw_readings(lines)
    assert "within the spread of draws" in text


def test_draws_option_checks_and_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[landscape]\nchart = "random-line"\ndraws = 3\n')
    assert run_config.from_argv(["--config", str(toml)]).draws == 3
    assert run_config.from_argv([]).draws == 5 and "draws" not in run_config.from_argv([]).to_dict()
    with pytest.raises(run_config.UserError, match=r"^--draws 0: must be an integer >= 1"):
        run_config.from_argv(["--chart", "random", "--draws", "0"])
    with pytest.raises(run_config.UserError, match="--draws 3 applies to --chart random / random-line only"):
        run_config.from_argv(["--draws", "3"])


def test_cli_draws_0_is_a_one_line_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert connectivity.main(["--chart", "random-line", "--draws", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--draws 0" in err and not out.exists()


def test_cli_random_line_keeps_every_draw(wordnet_root, tmp_path):
    out = tmp_path / "line"
    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--model", "tiny-bert", "--train-steps", "2",
            "--grid", "3", "--eval-samples", "16", "--path-points", "0", "--train-per-class", "12",
            "--test-per-class", "4", "--no-progress", "--out", str(out), "--chart", "random-line", "--center",
            "lora", "--draws", "2", "--methods", "lora"]  # fmt: skip
    assert connectivity.main(argv) == 0
    data = dict(np.load(out / "landscape.npz"))
    meta = json.loads((out / "landscape.json").read_text())
    d = meta["chart_geometry"]["draws"]
    assert data["draw_loss"].shape == (2, 1, 3) and np.array_equal(data["draw_loss"][0], data["loss"])
    assert d["count"] == 2 and d["seeds"] == data["draw_seeds"].tolist() == [0, directions.draw_seed(0, 1)]
    assert d["collapse_level"] == pytest.approx(math.log(len(meta["classes"])))
    np.testing.assert_array_equal(np.array(d["loss_per_draw"]), data["draw_loss"])
    np.testing.assert_array_equal(data["collapsed"], data["draw_loss"] >= d["collapse_level"])
    assert meta["config"]["draws"] == 2 and d["step"]["rule"].startswith("a = 1 halved")


def test_collapse_level_is_ln_c_for_classes_and_ln_v_over_an_lms_vocabulary():
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from adapters.objectives import OBJECTIVES
    from tests.llm_models import config

    task = SimpleNamespace(objective=OBJECTIVES["classification"], dataset=SimpleNamespace(classes=list("abcdefghij")))
    assert draws.collapse_level(task)[0] == pytest.approx(math.log(10))
    lm = nn.ModuleDict({"scorer": AutoModelForCausalLM.from_config(config("llama", 300))})  # wrapped, as the scorer
    level, rule = draws.collapse_level(SimpleNamespace(objective=OBJECTIVES["answer"], base=lm))
    assert level == pytest.approx(math.log(300)) and "300-token vocabulary" in rule


def test_ends_vs_level_counts_the_collapsed_points_and_reads_the_scales():
    level = math.log(10)
    loss = np.array([[[3.0, 1.0, 0.5, 1.2, 2.0]], [[2.1, 1.1, 0.5, 1.0, 1.9]]])
    lines = {"ft": {"x": np.linspace(-0.25, 0.25, 5), "draw_loss": loss, "collapsed": loss >= level,
                    "collapse_level": np.array(level)}}  # fmt: skip
    text = readings.ends_vs_level(lines)
    assert "full fine-tuning ±0.25" in text and "1.900–3.000" in text and "1 of 10 points flagged collapsed" in text
    assert f"collapse level {level:.3f}" in text


def test_redraw_in_adapter_coordinates_equals_a_fresh_draw_of_that_seed(tiny):
    """RandLoRA's λ, γ are normalised as a layer: a draw written in place follows the same rule as the evaluator
    drawn afresh with that seed (same directions, same loss at a point off the centre)."""
    _, solutions, evals = tiny
    ev = directions.AdapterEvaluator(solutions["randlora"], evals, "cpu", seed=3)
    seed = directions.draw_seed(3, 1)
    directions.redraw(ev.chart, seed)
    fresh = directions.AdapterEvaluator(solutions["randlora"], evals, "cpu", seed=seed)
    for n in fresh.chart.u:
        assert torch.equal(ev.chart.u[n], fresh.chart.u[n]) and torch.equal(ev.chart.v[n], fresh.chart.v[n]), n
    assert ev.evaluate(0.5, -0.5).loss == fresh.evaluate(0.5, -0.5).loss


def test_draws_resume_from_their_grid_stores(fitted, tmp_path):
    """Each draw checkpoints into its own store: a second pass reads every point back and evaluates none."""
    from landscape.engine.store import GridStore

    model, evals = fitted
    xs, ys, k = centred_axis(5) * 0.2, np.zeros(1), 3

    def store(i: int) -> GridStore:
        s = GridStore(tmp_path / f"draw-{i}", {"draw": i})
        s.set_solutions({"x": xs.tolist()})
        return s

    ev = _evaluator(model, evals, SEED)
    first = run_grid(ev, xs, ys, progress=False)
    done = draws.evaluate_draws(ev, xs, ys, first, k, SEED, store, progress=False)
    again = draws.evaluate_draws(ev, xs, ys, first, k, SEED, store, progress=False)
    assert done["points_computed_draws"] == (k - 1) * 5 and again["points_computed_draws"] == 0
    np.testing.assert_array_equal(again["draw_loss"], done["draw_loss"])


def test_figures_redo_a_random_chart_from_before_draws(tmp_path):
    from experiments import figures

    (tmp_path / "landscape.json").write_text(json.dumps({"chart_geometry": {"directions": {}}}))
    assert figures._one_draw(tmp_path)
    (tmp_path / "landscape.json").write_text(json.dumps({"chart_geometry": {"directions": {}, "draws": {}}}))
    assert not figures._one_draw(tmp_path) and not figures._one_draw(tmp_path / "missing")
