"""Merges of the solutions' updates: TIES and DARE equal peft.utils.merge_utils (``ties``, ``dare_linear``) on
the same ΔW tensors and seed, DARE's kept fraction and rescale, the projection onto the plane against numpy's
least squares, and the command on a tiny run: the (½, ½) task-arithmetic merge is the midpoint of the straight
path (paths.npz at t = 0.5), the endpoints are the run's vertex losses, one-line errors, and ``--merges`` as a
stage of the connectivity run."""

from __future__ import annotations

import json
import math

import numpy as np
import peft.utils.merge_utils as peft_merge
import pytest
import torch

from landscape import connectivity, merges
from landscape.engine.plane import CHARTS
from tests.conftest import TINY_RUN, assert_refused

SHAPES = {"a.weight": (7, 5), "b.weight": (13,), "c.weight": (4, 3, 2)}


def _deltas(seed: int, solutions: int = 3, missing: bool = True) -> list[dict[str, torch.Tensor]]:
    """``solutions`` random updates; with ``missing`` the second leaves out one parameter (its update is 0)."""
    g = torch.Generator().manual_seed(seed)
    out = [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(solutions)]
    if missing:
        del out[1]["b.weight"]
    return out


def _dense(deltas, name):
    like = next(d[name] for d in deltas if name in d)
    return [d.get(name, torch.zeros_like(like)) for d in deltas]


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.7, 1.3), (1.0, -0.4, 2.0)])
@pytest.mark.parametrize("top_k", [20.0, 50.0, 100.0])
def test_ties_equals_peft(weights, top_k):
    deltas = _deltas(len(weights) + int(top_k), len(weights))
    settings = merges.MergeSettings(top_k=top_k)
    ours = merges.merge("ties", deltas, weights, settings)
    assert sorted(ours) == sorted(SHAPES)
    for n, merged in ours.items():
        ref = peft_merge.ties(_dense(deltas, n), torch.tensor(weights), density=top_k / 100)
        torch.testing.assert_close(merged, ref, rtol=1e-6, atol=1e-7)
    # trimming really happened (20 %: at most a fifth of each update survives), and signs were elected
    if top_k == 20.0:
        kept = (ours["a.weight"] != 0).float().mean().item()
        assert 0 < kept <= len(weights) * 0.2 + 1e-9


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.7, 1.3)])
@pytest.mark.parametrize("drop", [0.9, 0.5, 0.0])
def test_dare_equals_peft_under_the_same_seed(weights, drop):
    """peft's dare_linear draws its masks from the global generator: after torch.manual_seed(seed), parameter by
    parameter in sorted order, the same numbers as the merge's own generator seeded with ``seed``."""
    deltas = _deltas(7, len(weights))
    seed = merges.merge_seed(3, [f"s{i}" for i in range(len(weights))])
    ours = merges.merge("dare", deltas, weights, merges.MergeSettings(drop=drop), seed=seed)
    torch.manual_seed(seed)
    for n in sorted(SHAPES):
        ref = peft_merge.dare_linear(_dense(deltas, n), torch.tensor(weights), density=1.0 - drop)
        torch.testing.assert_close(ours[n], ref, rtol=1e-6, atol=1e-7)
    again = merges.merge("dare", deltas, weights, merges.MergeSettings(drop=drop), seed=seed)
    assert all(torch.equal(again[n], ours[n]) for n in ours)  # seeded: reproducible
    if drop > 0:
        other = merges.merge("dare", deltas, weights, merges.MergeSettings(drop=drop), seed=seed + 1)
        assert not all(torch.equal(other[n], ours[n]) for n in ours)


def test_dare_keeps_a_fraction_1_minus_p_rescaled_exactly():
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) + 3.0  # no exact zeros
    for p in (0.9, 0.3):
        out = merges.dare([d], [1.0], p, torch.Generator().manual_seed(1))
        kept = out != 0
        n, q = d.numel(), 1 - p
        assert abs(kept.float().mean().item() - q) < 5 * math.sqrt(q * p / n)  # binomial: 5 standard errors
        torch.testing.assert_close(out[kept], d[kept] / q, rtol=0, atol=0)  # the rescale, exactly peft's


def test_task_arithmetic_is_the_weighted_sum_and_dare_at_p_0_equals_it():
    deltas = _deltas(11)
    w = (0.2, 0.5, 0.3)
    ta = merges.merge("task_arithmetic", deltas, w, merges.MergeSettings())
    no_drop = merges.merge("dare", deltas, w, merges.MergeSettings(drop=0.0))
    for n in SHAPES:
        naive = torch.zeros(SHAPES[n])
        for wi, d in zip(w, deltas, strict=True):
            if n in d:
                naive += wi * d[n]
        torch.testing.assert_close(ta[n], naive)
        torch.testing.assert_close(no_drop[n], naive)


def test_default_merges_and_seeds():
    plan = merges.default_merges(["ft", "lora", "randlora"])
    assert [p for p, _ in plan] == [
        ("ft", "lora"),
        ("ft", "randlora"),
        ("lora", "randlora"),
        ("ft", "lora", "randlora"),
    ]
    assert [w for _, w in plan] == [(0.5, 0.5)] * 3 + [(1 / 3, 1 / 3, 1 / 3)]
    assert merges.default_merges(["lora", "randlora"]) == [(("lora", "randlora"), (0.5, 0.5))]
    seeds = {merges.merge_seed(0, p) for p, _ in plan}
    assert len(seeds) == 4 and merges.merge_seed(0, ("ft", "lora")) != merges.merge_seed(1, ("ft", "lora"))


@pytest.mark.parametrize("chart", CHARTS)
def test_projection_equals_numpy_least_squares(chart):
    g = torch.Generator().manual_seed(5)
    names = {"w": (6, 4), "v": (5,)}
    deltas = {s: {n: torch.randn(sh, generator=g, dtype=torch.float64).float() for n, sh in names.items()}
              for s in ("ft", "lora", "randlora")}  # fmt: skip
    del deltas["lora"]["v"]  # a parameter LoRA does not change
    plane = merges.plane_chart(deltas, chart)
    flat = lambda d: np.concatenate([d.get(n, torch.zeros(names[n])).double().numpy().ravel() for n in sorted(names)])  # noqa: E731
    origin, u, v = flat(plane.origin), flat(plane.u), flat(plane.v)
    point = {n: torch.randn(sh, generator=g) for n, sh in names.items()}
    coords, off = merges.project(plane, point)
    a = np.stack([u, v], 1)
    ref, *_ = np.linalg.lstsq(a, flat(point) - origin, rcond=None)
    np.testing.assert_allclose(coords, ref, rtol=1e-6, atol=1e-9)  # fp32 products, summed in float64
    assert off == pytest.approx(np.linalg.norm(flat(point) - origin - a @ ref), rel=1e-6)
    assert off > 0.1
    # a task-arithmetic merge with weights summing to 1 lies on the plane, at the weighted vertices
    w = {"ft": 0.2, "lora": 0.5, "randlora": 0.3}
    ta = merges.merge("task_arithmetic", [deltas[s] for s in w], list(w.values()), merges.MergeSettings())
    coords, off = merges.project(plane, ta)
    expect = sum(wi * np.array(plane.vertices[s]) for s, wi in w.items())
    np.testing.assert_allclose(coords, expect, atol=1e-6)
    assert off < 1e-5 * math.sqrt(merges._dot(ta, ta))


def test_settings_are_checked():
    for bad, needle in [({"top_k": 0.0}, "--top-k"), ({"top_k": 100.5}, "--top-k"),
                        ({"top_k": float("nan")}, "--top-k"), ({"drop": 1.0}, "--drop"), ({"drop": -0.1}, "--drop"),
                        ({"kinds": ("soup",)}, "--kinds"), ({"kinds": ()}, "--kinds"),
                        ({"seed": -1}, "--seed"), ({"weights": (1.0,)}, "--weights"),
                        ({"weights": (0.5, float("inf"))}, "--weights")]:  # fmt: skip
        with pytest.raises(merges.UserError, match=needle):
            merges.MergeSettings(**bad).check()
    merges.MergeSettings(top_k=100.0, drop=0.0).check()  # the ends that are allowed


def test_merges_without_ft_are_evaluated_naively_and_placed_with_the_base_vertex(tiny_entry, one_torch_thread):
    """compute_merges on synthetic LoRA and RandLoRA updates (no FT: the base model is the plane's third vertex):
    each merge's loss and per-sample paired gap equal a plain forward of a model holding W0 + the merged ΔW."""
    import copy

    import torch.nn.functional as F

    from landscape.engine.grid import EvalSet
    from tests.synthetic import adapted_few, synthetic_solutions

    torch.manual_seed(0)
    model = tiny_entry.build(4)
    sols = synthetic_solutions(model, adapted_few(model), 0.05, seed=1)
    del sols["ft"]
    data, labels = tiny_entry.encode([f"text {i} " + "w " * (i % 5) for i in range(19)]), torch.arange(19) % 4
    eval_set = EvalSet.prepare(data, labels, 8, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = merges.MergeSettings(top_k=30.0, drop=0.5, seed=2)
    result = merges.compute_merges(model, sols, eval_set, "cpu", settings, progress=False)
    assert set(result["vertices"]) == {"base", "lora", "randlora"} and len(result["merges"]) == 3

    @torch.no_grad()
    def per_sample(delta):
        fresh = copy.deepcopy(model).eval()
        params = dict(fresh.named_parameters())
        for n, d in delta.items():
            params[n].add_(d)
        return F.cross_entropy(fresh(**data.batch(torch.arange(19))).float(), labels, reduction="none").double()

    ends = {s: per_sample(sols[s].delta()) for s in sols}
    deltas = [sols[s].delta() for s in ("lora", "randlora")]
    for m in result["merges"]:
        merged = merges.merge(m["kind"], deltas, m["weights"], settings, m.get("seed"))
        losses = per_sample(merged)
        best = min(ends, key=lambda s: float(ends[s].mean()))
        assert m["loss"] == pytest.approx(float(losses.mean()), rel=1e-5) and m["best_endpoint"] == best
        d = losses - ends[best]
        assert m["gap"] == pytest.approx(float(d.mean()), rel=1e-4, abs=1e-6)
        assert m["gap_se"] == pytest.approx(float(d.std() / math.sqrt(19)), rel=1e-3)
    ta = result["merges"][0]
    assert ta["kind"] == "task_arithmetic" and ta["coords"] == pytest.approx([0.5, 0.0], abs=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the base model is untouched


# ----------------------------------------------------------------------------- the command on a run


def test_command_on_a_run(tiny_wordnet_run, tmp_path):
    run_dir, out = tiny_wordnet_run, tmp_path / "m"
    assert merges.main(["--run", str(run_dir), "--out", str(out), "--seed", "4", "--no-progress"]) == 0
    result = json.loads((out / "merges.json").read_text())
    run = json.loads((run_dir / "landscape.json").read_text())
    assert result["seed"] == 4 and result["training_seed"] == run["config"]["seed"]
    assert result["settings"] == {"kinds": list(merges.KINDS), "top_k": 20.0, "drop": 0.9, "seed": 4, "weights": None}
    assert (
        result["chart"] == "paper"
        and result["eval_samples"] == run["eval_samples"]
        and "add_weighted" in result["note"]
    )
    for name, e in result["endpoints"].items():  # the plane's samples, objective and precision
        assert e["loss"] == pytest.approx(run["solutions"][name]["vertex_loss"], rel=1e-6)
        np.testing.assert_allclose(e["coords"], result["vertices"][name], atol=1e-6)
    assert len(result["merges"]) == 12
    paths = np.load(run_dir / "paths.npz")
    half = int(np.flatnonzero(paths["t"] == 0.5)[0])
    for m in result["merges"]:
        assert set(m) >= {
            "kind",
            "solutions",
            "weights",
            "loss",
            "loss_se",
            "gap",
            "gap_se",
            "coords",
            "off_plane_distance",
        }
        best = min(result["endpoints"][s]["loss"] for s in m["solutions"])
        assert m["gap"] == pytest.approx(m["loss"] - best, abs=1e-12) and m["gap_se"] > 0 and m["loss_se"] > 0
        assert ("seed" in m) == (m["kind"] == "dare")
        if m["kind"] == "task_arithmetic":  # on the plane, at the weighted vertices
            assert m["off_plane_distance"] < 1e-5 * m["delta_norm"]
            expect = sum(w * np.array(result["vertices"][s]) for s, w in zip(m["solutions"], m["weights"], strict=True))
            np.testing.assert_allclose(m["coords"], expect, atol=1e-6)
            if len(m["solutions"]) == 2:  # the midpoint of the straight path, from paths.npz
                k = list(paths["pairs"]).index("-".join(m["solutions"]))
                assert m["loss"] == pytest.approx(paths["loss"][k, half], rel=1e-6)
        else:
            assert m["off_plane_distance"] > 1e-3 * m["delta_norm"]
    _check_against_peft(run_dir, result)
    arrays = np.load(out / "merges.npz")
    assert arrays["coords"].shape == (12, 2) and list(arrays["kind"]) == [m["kind"] for m in result["merges"]]
    np.testing.assert_array_equal(arrays["gap"], [m["gap"] for m in result["merges"]])
    assert (out / "merges.png").stat().st_size > 10_000 and (out / "merges.pdf").stat().st_size > 1_000
    # one merge of the chosen solutions at the weights asked for
    argv = ["--solutions", "ft", "lora", "--weights", "0.25", "0.75", "--kinds", "task_arithmetic", "ties"]
    assert merges.main(["--run", str(run_dir), "--out", str(tmp_path / "w"), *argv, "--no-progress"]) == 0
    weighted = json.loads((tmp_path / "w" / "merges.json").read_text())
    assert [(m["kind"], m["solutions"], m["weights"]) for m in weighted["merges"]] == [
        ("task_arithmetic", ["ft", "lora"], [0.25, 0.75]), ("ties", ["ft", "lora"], [0.25, 0.75])]  # fmt: skip
    expect = 0.25 * np.array(weighted["vertices"]["ft"]) + 0.75 * np.array(weighted["vertices"]["lora"])
    np.testing.assert_allclose(weighted["merges"][0]["coords"], expect, atol=1e-6)
    _check_against_peft(run_dir, weighted)


def _check_against_peft(run_dir, result):
    """The TIES and DARE merges of ft + lora the command evaluated are peft's merges of the run's ΔW: their norms
    (recorded in merges.json) match peft's on the same tensors and seed."""
    from landscape.curvature import eval_fingerprint
    from landscape.run import open_run

    ctx = open_run(run_dir, "cpu")
    assert result["eval"] == eval_fingerprint(ctx.eval_set)  # the run's evaluation batches, those of paths.json
    d = [ctx.solutions[s].delta() for s in ("ft", "lora")]
    names = sorted(set(d[0]) | set(d[1]))
    for m in result["merges"]:
        if m["solutions"] != ["ft", "lora"] or m["kind"] == "task_arithmetic":
            continue
        if m["kind"] == "dare":
            torch.manual_seed(m["seed"])
        w = torch.tensor(m["weights"])
        parts = [_dense(d, n) for n in names]
        ref = [
            peft_merge.ties(p, w, 0.2) if m["kind"] == "ties" else peft_merge.dare_linear(p, w, 1 - 0.9) for p in parts
        ]
        assert m["delta_norm"] == pytest.approx(math.sqrt(sum(float((r.double() ** 2).sum()) for r in ref)), rel=1e-5)


def test_command_bad_input_exits_2_with_one_line(tiny_wordnet_run, tmp_path, capsys):
    run_dir, out = str(tiny_wordnet_run), tmp_path / "bad"
    cases = [
        (["--run", str(tmp_path / "nope")], "does not exist"),
        (["--run", run_dir, "--top-k", "0"], "--top-k"),
        (["--run", run_dir, "--top-k", "101"], "--top-k"),
        (["--run", run_dir, "--drop", "1"], "--drop"),
        (["--run", run_dir, "--drop", "-0.5"], "--drop"),
        (["--run", run_dir, "--kinds", "soup"], "--kinds"),
        (["--run", run_dir, "--seed", "-3"], "--seed"),
        (["--run", run_dir, "--solutions", "sgd", "lora"], "--solutions"),
        (["--run", run_dir, "--solutions", "lora", "lora"], "--solutions"),
        (["--run", run_dir, "--weights", "0.5", "0.5"], "--weights"),
        (["--run", run_dir, "--solutions", "ft", "lora", "--weights", "1", "2", "3"], "--weights"),
    ]
    assert_refused(merges.main, cases, out, capsys)


def test_stage_of_the_connectivity_run(tmp_path, wordnet_root, tiny_wordnet_run, no_figure_drawing):
    """``--merges`` writes the merges next to the run's outputs, on its evaluation set; without it (the shared
    run) there are none."""
    out = tmp_path / "run"
    assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN,
                              "--merges"]) == 0  # fmt: skip
    result = json.loads((out / "merges.json").read_text())
    run = json.loads((out / "landscape.json").read_text())
    assert len(result["merges"]) == 12 and result["seed"] == run["config"]["seed"] and run["config"]["merges"]
    assert "merges" in run["wall_time_s"] and all((out / f).is_file() for f in merges.FILES)
    for name, e in result["endpoints"].items():
        assert e["loss"] == pytest.approx(run["solutions"][name]["vertex_loss"], rel=1e-6)
    assert not any((tiny_wordnet_run / f).exists() for f in merges.FILES)
    assert not json.loads((tiny_wordnet_run / "landscape.json").read_text())["config"]["merges"]
