"""``--seeds N`` (issue 22 point 1): N solutions per method with the seeds s..s+N−1 on the split, evaluation
samples and base of s; readings over seeds with scipy's t-interval; orderings "within noise" when the interval
holds 0; the barrier and sharpness over seeds; ``--seeds 1`` the run as it was."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from adapters.errors import UserError
from landscape import seeds
from tests.conftest import SEEDS_N as N
from tests.conftest import TINY_RUN, scipy_interval


def test_t_interval_is_scipys():
    values = [0.31, 0.27, 0.35, 0.30]
    mean, ci = seeds.t_interval(values)
    assert mean == pytest.approx(np.mean(values), abs=1e-15)
    assert ci == pytest.approx(scipy_interval(values), rel=1e-12)
    assert seeds.t_interval([0.5])[1] is None  # one seed: no interval


def test_ordering_reads_deeper_then_within_noise_on_a_constructed_case():
    a = [1.00, 1.10, 0.95]
    consistent = [1.20, 1.31, 1.14]  # b higher by about 0.2 on every seed: a deeper
    o = seeds.ordering("ft", "lora", a, consistent)
    diff = np.subtract(a, consistent)
    assert o["difference_per_seed"] == pytest.approx(diff.tolist())
    assert o["difference_ci95"] == pytest.approx(scipy_interval(diff), rel=1e-12)
    assert o["verdict"] == "deeper" and o["reading"] == "ft deeper than lora"
    assert seeds.ordering("lora", "ft", consistent, a)["verdict"] == "shallower"
    noisy = [1.20, 0.90, 1.14]  # the same mean gap, but the second seed reverses it: the interval holds 0
    o = seeds.ordering("ft", "lora", a, noisy)
    low, high = scipy_interval(np.subtract(a, noisy))
    assert low < 0 < high
    assert o["verdict"] == "within noise" and o["reading"] == "ft and lora within noise"


def test_n_seeds_give_n_distinct_solutions_per_method_with_the_stated_seeds(seeds_run):
    from adapters.solution import read_info

    for method in ("ft", "lora", "randlora"):
        folders = [seeds_run / "solutions" / method] + [seeds_run / "solutions" / f"seed-{k}" / method
                                                        for k in range(1, N)]  # fmt: skip
        infos = [read_info(f) for f in folders]
        assert [i["seed"] for i in infos] == list(range(N))
        keys = [i["train_key"] for i in infos]
        # the split, the evaluation examples and the base are --seed's; what trains varies with the seed
        assert all(k["examples"] == keys[0]["examples"] and k["base_fingerprint"] == keys[0]["base_fingerprint"]
                   for k in keys)  # fmt: skip
        assert [k["train_config"]["seed"] for k in keys] == list(range(N))
        if method == "randlora":
            assert [k["randlora"]["prng_key"] for k in keys] == list(range(N))  # the "seed" rule, per seed
        weights = [(f / "model.safetensors").read_bytes() if (f / "model.safetensors").exists()
                   else (f / "adapter_model.safetensors").read_bytes() for f in folders]  # fmt: skip
        assert len(set(weights)) == N
    assert not (seeds_run / "solutions" / "seed-1" / "head_only").exists()  # the baseline: one seed


def test_readings_over_seeds_equal_scipy_and_an_independent_evaluation(seeds_run):
    from adapters.solution import load_solution
    from adapters.train import evaluate
    from landscape.run import open_run

    meta = json.loads((seeds_run / "landscape.json").read_text())
    for method in ("ft", "lora", "randlora"):
        s = meta["solutions"][method]
        assert len(s["vertex_loss_per_seed"]) == N and s["vertex_loss_per_seed"][0] == s["vertex_loss"]
        for name in ("vertex_loss", "vertex_accuracy", "test_accuracy"):
            values = s[f"{name}_per_seed"]
            assert s[f"{name}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert s[f"{name}_ci95"] == pytest.approx(scipy_interval(values), rel=1e-9)
    # seed 2's FT vertex loss, again: W0 + ΔW in a copy of the base, the training loop's evaluate on the run's
    # evaluation samples (not the paths' engine)
    ctx = open_run(seeds_run)
    sol = load_solution(seeds_run / "solutions" / "seed-2" / "ft", base=ctx.base, expect_method="ft")
    model = copy.deepcopy(ctx.base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p += sol.delta().get(name, torch.zeros_like(p))
    from adapters.data import eval_subset

    task, config = ctx.loaded.task, ctx.loaded.config
    subset = eval_subset(task.dataset.train, config.eval_samples, config.seed)
    loss, _ = evaluate(model, task.entry.encode(subset.inputs), subset.labels, 8, "cpu")
    assert meta["solutions"]["ft"]["vertex_loss_per_seed"][2] == pytest.approx(loss, rel=1e-5)


def test_orderings_and_barriers_over_seeds(seeds_run):
    meta = json.loads((seeds_run / "landscape.json").read_text())
    sols = meta["solutions"]
    for pair, o in meta["seed_orderings"].items():
        a, b = pair.split("-")
        diff = np.subtract(sols[a]["vertex_loss_per_seed"], sols[b]["vertex_loss_per_seed"])
        assert o["difference_ci95"] == pytest.approx(scipy_interval(diff), rel=1e-9)
        low, high = o["difference_ci95"]
        assert o["verdict"] == ("deeper" if high < 0 else "shallower" if low > 0 else "within noise")
    paths_json = json.loads((seeds_run / "paths.json").read_text())
    seeds_json = json.loads((seeds_run / "seeds.json").read_text())
    for pair, info in paths_json["pairs"].items():
        per_seed = info["barrier_per_seed"]
        assert per_seed[0] == info["barrier"] and len(per_seed) == N
        assert per_seed[1:] == [seeds_json["per_seed"][str(k)]["barrier"][pair] for k in range(1, N)]
        assert info["barrier_ci95"] == pytest.approx(scipy_interval(per_seed), rel=1e-9, abs=1e-15)
        assert meta["paths"]["barrier_ci95"][pair] == info["barrier_ci95"]
    assert (seeds_run / "seeds.png").is_file()


def test_a_rerun_reuses_every_seed(seeds_run, wordnet_root, tmp_path, capsys):
    import shutil

    from landscape import connectivity
    from tests.nodraw import figures_not_drawn

    out = tmp_path / "again"
    shutil.copytree(seeds_run, out)
    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN, "--seeds", str(N)]
    with figures_not_drawn():
        assert connectivity.main(argv) == 0
    meta = json.loads((out / "landscape.json").read_text())
    assert {"seeds", "paths"} <= set(meta["reused_stages"])
    assert "done" not in "".join(line for line in capsys.readouterr().err.splitlines() if "[train_" in line)


def test_one_seed_leaves_the_output_as_it_was(seeds_run, tiny_wordnet_run):
    """--seeds 1 (the default, conftest's run) adds no key, file or stage; the extra seeds leave seed s's plane,
    vertex losses and barriers as they were."""
    one = json.loads((tiny_wordnet_run / "landscape.json").read_text())
    three = json.loads((seeds_run / "landscape.json").read_text())
    assert "seeds" not in one["config"] and three["config"]["seeds"] == N
    assert "seed_orderings" not in one and "seeds" not in one["stage_keys"]
    for method, s in one["solutions"].items():
        assert not [k for k in s if "per_seed" in k or k.endswith(("_mean", "_ci95"))]
        assert set(three["solutions"][method]) - set(s) <= {"seeds"} | {
            f"{q}_{e}"
            for q in ("vertex_loss", "vertex_accuracy", "test_accuracy")
            for e in ("per_seed", "mean", "ci95")
        }
        assert three["solutions"][method]["vertex_loss"] == s["vertex_loss"]
    assert not (tiny_wordnet_run / "seeds.json").exists() and not (tiny_wordnet_run / "solutions" / "seed-1").exists()
    pairs = json.loads((tiny_wordnet_run / "paths.json").read_text())["pairs"]
    assert not [k for p in pairs.values() for k in p if "seed" in k]
    with np.load(tiny_wordnet_run / "landscape.npz") as a, np.load(seeds_run / "landscape.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--seeds", "-1"], ["--seeds", "2", "--chart", "random"]])
def test_bad_seeds_fail_in_one_line_before_work(argv, tmp_path, capsys):
    from landscape import connectivity

    assert connectivity.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seeds" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_seeds_refuse_given_solutions():
    from landscape.config import resolve

    with pytest.raises(UserError, match="--seeds 2.*--solutions"):
        resolve({"seeds": 2, "solutions": ["ft=/nowhere"]})


def test_sharpness_reports_the_interval_over_seeds(seeds_run, tmp_path):
    from landscape import sharpness

    out = tmp_path / "sharp"
    out.mkdir()
    argv = ["--run", str(seeds_run), "--out", str(out), "--solutions", "lora", "--coordinates", "adapter",
            "--steps", "2", "--draws", "2", "--no-progress"]  # fmt: skip
    assert sharpness.main(argv) == 0
    entry = json.loads((out / "sharpness.json").read_text())["solutions"]["lora"]["adapter"]
    assert [e["seed"] for e in entry["per_seed"]] == list(range(N))
    assert entry["worst_case_per_seed"][0] == entry["worst_case"] and len(set(entry["worst_case_per_seed"])) == N
    for q in ("worst_case", "average_case"):
        assert entry[f"{q}_ci95"] == pytest.approx(scipy_interval(entry[f"{q}_per_seed"]), rel=1e-9)


def test_curves_give_the_barrier_over_seeds(seeds_run, tmp_path):
    from landscape import curves

    out = tmp_path / "curves_out"
    argv = ["--run", str(seeds_run), "--out", str(out), "--pair", "ft,lora", "--bends", "1", "--steps", "3",
            "--points", "3", "--no-progress"]  # fmt: skip
    assert curves.main(argv) == 0
    own = json.loads((out / "curves" / "ft-lora.json").read_text())
    others = [json.loads((out / "curves" / f"seed-{k}" / "ft-lora.json").read_text()) for k in range(1, N)]
    assert [o["train"]["seed"] for o in others] == list(range(1, N))  # each seed's curve on its seed's batches
    for row in ("curve", "line"):
        per_seed = own[row]["barrier_per_seed"]
        assert per_seed == [own[row]["barrier"], *(o[row]["barrier"] for o in others)]
        assert own[row]["barrier_ci95"] == pytest.approx(scipy_interval(per_seed), rel=1e-9, abs=1e-15)
    # seed 1's line starts at seed 1's FT solution, whose vertex loss the run's seeds.json holds
    seeds_json = json.loads((seeds_run / "seeds.json").read_text())
    assert others[0]["line"]["loss_t0"] == pytest.approx(seeds_json["per_seed"]["1"]["vertex_loss"]["ft"], rel=1e-6)
