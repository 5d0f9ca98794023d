"""Task-metric basins (landscape.basins): the ladder + bisection radius equals a naive dense scan's first failing
radius within the stated resolution on tiny-bert (weights set by hand, accuracy drop and paired SE in numpy); the
paired SE equals numpy's; one-line errors; ``--basins`` as a connectivity stage (the default run has none)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from adapters.solution import Solution
from landscape import basins, connectivity
from landscape.engine.directions import center_weights, draw_directions, draw_seed
from landscape.engine.grid import EvalSet
from tests.conftest import TINY_RUN, assert_refused

N = 60


def test_paired_se_equals_numpy():
    rng = np.random.default_rng(0)
    e0 = (rng.random(200) < 0.1).astype(np.float64)
    e = np.where(rng.random(200) < 0.3, 1.0 - e0, e0)
    drop, se = basins.accuracy_drop(torch.from_numpy(e0), torch.from_numpy(e))
    d = e - e0
    assert drop == pytest.approx(d.mean(), rel=1e-12) and drop == pytest.approx((1 - e0).mean() - (1 - e).mean())
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=1e-12)
    assert se < math.sqrt(e.var(ddof=1) / e.size + e0.var(ddof=1) / e0.size)  # pairing removes shared samples


def test_find_radius_on_a_step():
    """A criterion failing from r = 0.3: the bracket holds 0.3 and is the stated resolution wide."""
    got = basins.find_radius(lambda r: r >= 0.3, 0.01, steps=10, bisections=6)
    assert got["radius_low"] < 0.3 <= got["radius"] and got["resolution"] == pytest.approx((0.32 - 0.16) / 64)
    assert got["evaluations"] == 6 + 6
    never = basins.find_radius(lambda r: False, 0.01, steps=5)
    assert never["radius"] is None and never["censored_at"] == pytest.approx(0.16)


def _setup(tiny_entry):
    """tiny-bert with a random confident head, labelled by its own predictions (accuracy 1 at θ*)."""
    torch.manual_seed(0)
    model = tiny_entry.build(4)
    data = tiny_entry.encode([f"text {i} " + "w " * (i % 7) + "x " * (i % 3) for i in range(N)])
    g = torch.Generator().manual_seed(3)
    delta = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    delta["task_head.weight"] = 3 * torch.randn(model.task_head.weight.shape, generator=g)
    sol = Solution(path=None, info={"method": "ft"}, metrics={}, base=model, _delta=delta)
    with torch.no_grad():
        fresh = copy.deepcopy(model).eval()
        for n, p in fresh.named_parameters():
            p.add_(delta[n])
        labels = fresh(**data.batch(torch.arange(N))).argmax(-1)
    return model, data, labels, EvalSet.prepare(data, labels, 16, "cpu"), {"ft": sol}


@torch.no_grad()
def _errors(model, data, labels, weights) -> np.ndarray:
    fresh = copy.deepcopy(model).eval()
    for n, p in fresh.named_parameters():
        p.copy_(weights[n])
    return (fresh(**data.batch(torch.arange(N))).argmax(-1) != labels).double().numpy()


def test_radius_equals_a_dense_scan(tiny_entry, one_torch_thread):
    model, data, labels, eval_set, sols = _setup(tiny_entry)
    result = basins.compute_basins(model, sols, eval_set, "cpu", draws=2, seed=5, start=0.01, steps=10,
                                   bisections=4, progress=False)  # fmt: skip
    entry = result["solutions"]["ft"]
    assert entry["accuracy"] == 1.0 and result["seeds"] == [draw_seed(5, 0), draw_seed(5, 1)]
    center = center_weights(sols["ft"])
    e0 = _errors(model, data, labels, center)
    for k, got in enumerate(entry["random"]):
        d = draw_directions(center, draw_seed(5, k), "filter", "biasbn", 1)[0]

        def naive_fails(r, d=d):
            e = _errors(model, data, labels, {n: center[n] + r * d[n] for n in center})
            diff = e - e0
            return diff.mean() > 2 * diff.std(ddof=1) / math.sqrt(N)

        for r, failed in got["trace"]:  # every step of the search: the criterion as numpy computes it
            assert failed == naive_fails(r), (k, r)
        assert got["radius"] is not None and got["resolution"] == pytest.approx(got["radius"] - got["radius_low"])
        step = got["resolution"] / 4
        dense = next(r for r in np.arange(1, 4 * got["radius"] / step) * step if naive_fails(r))
        assert abs(dense - got["radius"]) <= got["resolution"] + step, (k, dense, got)
    radii = [g["radius"] for g in entry["random"]]
    s = entry["random_summary"]
    assert s["mean"] == pytest.approx(np.mean(radii)) and s["sd"] == pytest.approx(np.std(radii, ddof=1))
    assert basins.arrays(result)["random_radius"].shape == (1, 2)


def test_command_on_a_run(tiny_wordnet_run, tmp_path):
    run_dir, out = tiny_wordnet_run, tmp_path / "b"
    assert basins.main(["--run", str(run_dir), "--out", str(out), "--draws", "2", "--steps", "8",
                        "--bisections", "2", "--eigen-tol", "1e-3", "--no-progress"]) == 0  # fmt: skip
    result = json.loads((out / "basins.json").read_text())
    run = json.loads((run_dir / "landscape.json").read_text())
    assert result["training_seed"] == run["config"]["seed"] and result["eval_samples"] == run["eval_samples"]
    assert result["seeds"] == [draw_seed(run["config"]["seed"], k) for k in range(2)]
    assert set(result["solutions"]) == {"ft", "lora", "randlora"}
    for entry in result["solutions"].values():
        assert len(entry["random"]) == 2 and len(entry["eigen"]) == 2
        lam = [e["eigenvalue"] for e in entry["eigen"]]
        assert lam[0] >= lam[1] and entry["eigen_accuracy"] == pytest.approx(entry["accuracy"])
        assert entry["eigen_info"]["tol"] == 1e-3  # the Lanczos ran at the tolerance asked for
        for e in entry["random"] + entry["eigen"]:  # the bracket's ends were evaluated: failing, and safe (or 0)
            seen = {r: f for r, f in e["trace"]}
            if e["radius"] is None:
                assert not any(seen.values()) and e["censored_at"] == max(seen)
            else:
                assert seen[e["radius"]] and (e["radius_low"] == 0 or not seen[e["radius_low"]])
    data = np.load(out / "basins.npz")
    assert data["random_radius"].shape == (3, 2) and data["eigen_radius"].shape == (3, 2)
    assert (out / "basins.png").stat().st_size > 10_000 and (out / "basins.pdf").stat().st_size > 1_000


def test_loss_sharpness_beside_the_radii(tmp_path):
    """sharpness.json's readings per solution and coordinates are copied beside the radii; npz holds the worst case."""
    result = {"draws": 1, "seeds": [0], "solutions": {s: {"accuracy": 0.5, "random": [
        {"radius": 0.1, "censored_at": None}]} for s in ("ft", "lora")}}  # fmt: skip
    sharp = {"solutions": {"ft": {"weights": {"worst_case": 0.25, "average_case": 0.01, "average_se": 0.002,
                                              "trajectory": [1, 2]}, "adapter": {"note": "no adapter"}}}}  # fmt: skip
    (tmp_path / "sharpness.json").write_text(json.dumps(sharp))
    basins.attach_sharpness(result, tmp_path)
    assert result["solutions"]["ft"]["loss_sharpness"] == {"weights": {"worst_case": 0.25, "average_case": 0.01,
                                                                       "average_se": 0.002}}  # fmt: skip
    assert "loss_sharpness" not in result["solutions"]["lora"]
    data = basins.arrays(result)
    assert data["loss_sharpness"][0] == 0.25 and np.isnan(data["loss_sharpness"][1])


def test_command_bad_input_exits_2_with_one_line(tiny_wordnet_run, tmp_path, capsys):
    run_dir, out = str(tiny_wordnet_run), tmp_path / "bad"
    cases = [
        (["--run", str(tmp_path / "nope")], "does not exist"),
        (["--run", run_dir, "--draws", "-1"], "--draws"),
        (["--run", run_dir, "--epsilon", "-0.1"], "--epsilon"),
        (["--run", run_dir, "--draws", "0", "--no-eigen"], "--draws 0"),
        (["--run", run_dir, "--start", "0"], "--start"),
        (["--run", run_dir, "--steps", "0"], "--steps"),
        (["--run", run_dir, "--bisections", "-1"], "--bisections"),
        (["--run", run_dir, "--start", "nan"], "--start"),
        (["--run", run_dir, "--eigen-tol", "0"], "--eigen-tol"),
    ]
    assert_refused(basins.main, cases, out, capsys)


def test_stage_of_the_connectivity_run(tmp_path, wordnet_root, tiny_wordnet_run, no_figure_drawing):
    """``--basins`` writes the basins next to the run's outputs; without it (the shared run) none."""
    out = tmp_path / "run"
    assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN,
                              "--basins"]) == 0  # fmt: skip
    result = json.loads((out / "basins.json").read_text())
    run = json.loads((out / "landscape.json").read_text())
    assert run["config"]["basins"] and "basins" in run["wall_time_s"] and result["draws"] == basins.DEFAULT_DRAWS
    assert set(result["solutions"]) == {"ft", "lora", "randlora"}
    assert all((out / f).is_file() for f in basins.FILES)
    assert not any((tiny_wordnet_run / f).exists() for f in basins.FILES)
    assert not json.loads((tiny_wordnet_run / "landscape.json").read_text())["config"]["basins"]
