"""Layer-wise barriers (landscape.layerwise): each block's paths equal a naive loop over t that sets the weights by
hand and runs a plain forward (losses, chord barrier, paired SE); a pair differing in one layer only puts the whole
barrier there (other blocks' paths are flat); on a tiny run the whole-model path equals paths.json's straight path,
the t = 0 end with the rest at A equals A's vertex loss; one-line errors; ``--layerwise`` as a connectivity stage."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.solution import Solution
from landscape import connectivity, layerwise
from landscape.engine.grid import EvalSet
from tests.conftest import TINY_RUN, assert_refused

N = 19


def test_blocks_of_names():
    names = ["backbone.embeddings.word_embeddings.weight", "backbone.encoder.layer.0.attention.self.query.weight",
             "backbone.encoder.layer.0.attention.output.LayerNorm.bias", "backbone.encoder.layer.0.output.dense.weight",
             "backbone.encoder.layer.10.intermediate.dense.weight", "backbone.encoder.layer.2.output.dense.bias",
             "model.layers.3.mlp.down_proj.weight", "task_head.weight"]  # fmt: skip
    blocks = layerwise.blocks_of(names)
    assert list(blocks) == ["embeddings", "layer 0", "layer 2", "layer 3", "layer 10", "head"]
    assert len(blocks["layer 0"]) == 3 and blocks["head"] == ["task_head.weight"]
    kinds = [layerwise.block_of(n, "module") for n in names[1:4]]
    assert kinds == ["layer 0 attention", "layer 0 attention", "layer 0 mlp"]
    assert layerwise.block_of("h.1.ln_1.weight", "module") == "layer 1 norm"


def _setup(tiny_entry, n: int = N):
    torch.manual_seed(0)
    model = tiny_entry.build(4)
    data, labels = tiny_entry.encode([f"text {i} " + "w " * (i % 5) for i in range(n)]), torch.arange(n) % 4
    return model, data, labels, EvalSet.prepare(data, labels, 8, "cpu")


def _solutions(model, deltas):
    return {s: Solution(path=Path(s), info={"method": s}, metrics={}, base=model, _delta=d) for s, d in deltas.items()}


@torch.no_grad()
def _naive_path(model, data, labels, ta, tb, names, hold, t):
    """Per-sample losses along the block's path by hand: the block's weights (1 − t)·θ_A + t·θ_B, the rest θ_hold."""
    out = []
    for x in t:
        fresh = copy.deepcopy(model).eval()
        for n, p in fresh.named_parameters():
            if n in ta:
                p.copy_((1 - x) * ta[n] + x * tb[n] if n in names else (ta if hold == "A" else tb)[n])
        logits = fresh(**data.batch(torch.arange(N))).float()
        out.append(F.cross_entropy(logits, labels, reduction="none").double())
    return out


def _naive_barrier(t, samples):
    """Chord barrier and its paired SE by hand (numpy): the mean over samples of l(t*) − chord at the argmax."""
    loss = np.array([float(s.mean()) for s in samples])
    above = loss - ((1 - t) * loss[0] + t * loss[-1])
    k = int(np.argmax(above))
    d = (samples[k] - ((1 - t[k]) * samples[0] + t[k] * samples[-1])).numpy()
    return above[k], d.std(ddof=1) / math.sqrt(len(d)), loss


def test_block_paths_equal_a_naive_loop(tiny_entry, one_torch_thread):
    from tests.synthetic import adapted_few, synthetic_solutions

    model, data, labels, eval_set = _setup(tiny_entry)
    sols = synthetic_solutions(model, adapted_few(model), 0.3, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = layerwise.compute_layerwise(model, sols, eval_set, "cpu", [("ft", "lora")], points=4, progress=False)
    t = result["t"]
    entry = result["pairs"]["ft-lora"]
    assert list(entry["blocks"]) == ["embeddings", "layer 0", "layer 1", "head"]  # ft changes every parameter
    w0 = dict(model.named_parameters())
    ta = {n: w0[n].detach() + d for n, d in sols["ft"].delta().items()}
    tb = {n: w0[n].detach() + sols["lora"].delta().get(n, 0) for n in ta}
    blocks = layerwise.blocks_of(sorted(ta))
    barriers = []
    for block, got in entry["blocks"].items():
        for side, hold in (("rest_at_A", "A"), ("rest_at_B", "B")):
            ref_b, ref_se, ref_loss = _naive_barrier(t, _naive_path(model, data, labels, ta, tb, set(blocks[block]),
                                                                    hold, t))  # fmt: skip
            np.testing.assert_allclose(got[side]["loss"], ref_loss, rtol=1e-5)
            assert got[side]["barrier"] == pytest.approx(ref_b, rel=1e-4, abs=1e-6)
            assert got[side]["barrier_se"] == pytest.approx(ref_se, rel=1e-3, abs=1e-7)
            barriers.append(ref_b)
    assert max(barriers) > 1e-3  # the check saw a real barrier, not only flat paths
    whole_b, whole_se, whole_loss = _naive_barrier(t, _naive_path(model, data, labels, ta, tb, set(ta), "A", t))
    np.testing.assert_allclose(entry["whole"]["loss"], whole_loss, rtol=1e-5)
    assert entry["whole"]["barrier"] == pytest.approx(whole_b, rel=1e-4, abs=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the base model is untouched


def _permuted_pair(tiny_entry):
    """A: tiny-bert with a large random head, labelled by its own predictions (a confident, low-loss solution). B: A
    with layer 1's MLP units permuted (the same function, so the same loss) and a tiny shift elsewhere; C: A with
    only that permutation. Between A and B the averaged units of layer 1 make a barrier."""
    model, data, _, _ = _setup(tiny_entry, 4 * N)  # enough samples that the barrier stands out of its SE
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    a = {n: 0.1 * torch.randn(w.shape, generator=g) for n, w in w0.items()}
    a["task_head.weight"] = 3 * torch.randn(w0["task_head.weight"].shape, generator=g)  # the head starts at 0
    theta_a = {n: w0[n] + a[n] for n in w0}
    with torch.no_grad():
        fresh = copy.deepcopy(model).eval()
        for n, p in fresh.named_parameters():
            p.copy_(theta_a[n])
        labels = fresh(**data.batch(torch.arange(4 * N))).argmax(-1)
    perm = torch.randperm(w0["backbone.encoder.layer.1.intermediate.dense.bias"].numel(), generator=g)
    theta_c = dict(theta_a)
    for n in ("intermediate.dense.weight", "intermediate.dense.bias"):
        key = f"backbone.encoder.layer.1.{n}"
        theta_c[key] = theta_a[key][perm]
    key = "backbone.encoder.layer.1.output.dense.weight"
    theta_c[key] = theta_a[key][:, perm]
    c = {n: d if theta_c[n] is theta_a[n] else theta_c[n] - w0[n] for n, d in a.items()}  # elsewhere exactly A's
    b = {n: d if ".layer.1." in n else d + 1e-3 * torch.randn(d.shape, generator=g) for n, d in c.items()}
    return model, EvalSet.prepare(data, labels, 8, "cpu"), _solutions(model, {"a": a, "b": b, "c": c})


def test_a_pair_differing_in_one_layer_puts_the_barrier_there(tiny_entry, one_torch_thread):
    """Layer 1 holds the barrier (well above 2 SE, as large as the whole path's); every other block's barrier is 0
    within 2 SE or negligible beside it; blocks equal in both solutions are not walked at all."""
    model, eval_set, sols = _permuted_pair(tiny_entry)
    result = layerwise.compute_layerwise(model, sols, eval_set, "cpu", [("a", "b"), ("a", "c")], points=5,
                                         progress=False)  # fmt: skip
    entry = result["pairs"]["a-b"]
    assert list(entry["blocks"]) == ["embeddings", "layer 0", "layer 1", "head"]
    held = entry["blocks"]["layer 1"]
    for side in layerwise.SIDES:
        assert held[side]["barrier"] > 2 * held[side]["barrier_se"] > 0
        for block, e in entry["blocks"].items():
            if block != "layer 1":
                b, se = e[side]["barrier"], e[side]["barrier_se"]
                assert b <= 2 * se or b < 1e-3 * held[side]["barrier"], (block, side, b, se)
    whole = entry["whole"]
    assert abs(held["rest_at_A"]["barrier"] - whole["barrier"]) < 2 * whole["barrier_se"]
    only = result["pairs"]["a-c"]  # A and C differ in layer 1 alone: its path is the whole straight path
    assert list(only["blocks"]) == ["layer 1"]  # the blocks equal in a and c are not walked
    for side in layerwise.SIDES:
        assert only["blocks"]["layer 1"][side]["barrier"] == pytest.approx(only["whole"]["barrier"], rel=1e-6)
    by_kind = layerwise.compute_layerwise(model, sols, eval_set, "cpu", [("a", "c")], points=3, grouping="module",
                                          progress=False)  # fmt: skip
    assert list(by_kind["pairs"]["a-c"]["blocks"]) == ["layer 1 mlp"]
    data = layerwise.arrays(result)
    assert data["barrier"].shape == (2, 4, 2) and np.isnan(data["barrier"][1, [0, 1, 3]]).all()


def test_command_on_a_run(tiny_wordnet_run, tmp_path):
    run_dir, out = tiny_wordnet_run, tmp_path / "lw"
    assert layerwise.main(["--run", str(run_dir), "--out", str(out), "--points", "3", "--no-progress"]) == 0
    result = json.loads((out / "layerwise.json").read_text())
    run = json.loads((run_dir / "landscape.json").read_text())
    paths = json.loads((run_dir / "paths.json").read_text())
    paths_npz = np.load(run_dir / "paths.npz")
    assert result["training_seed"] == run["config"]["seed"] and result["eval_samples"] == run["eval_samples"]
    assert result["t"] == list(paths_npz["t"])  # the tiny run's paths have 3 points too: the same t
    for pair, entry in result["pairs"].items():
        a, b = pair.split("-")
        k = list(paths_npz["pairs"]).index(pair)
        # every block at once: the straight path of paths.json, evaluated independently there
        np.testing.assert_allclose(entry["whole"]["loss"], paths_npz["loss"][k], rtol=1e-6)
        assert entry["whole"]["barrier"] == pytest.approx(paths["pairs"][pair]["barrier"], rel=1e-5, abs=1e-7)
        assert entry["blocks"]
        for block in entry["blocks"].values():
            assert block["rest_at_A"]["loss"][0] == pytest.approx(run["solutions"][a]["vertex_loss"], rel=1e-6)
            assert block["rest_at_B"]["loss"][-1] == pytest.approx(run["solutions"][b]["vertex_loss"], rel=1e-6)
            assert all(block[s]["barrier"] >= 0 and block[s]["barrier_se"] >= 0 for s in layerwise.SIDES)
    from landscape.engine.grid import eval_fingerprint
    from landscape.run import open_run

    assert result["eval"] == eval_fingerprint(open_run(run_dir, "cpu").eval_set)
    arrays = np.load(out / "layerwise.npz")
    pairs = list(result["pairs"])
    assert list(arrays["pairs"]) == pairs and arrays["barrier"].shape[::2] == (len(pairs), 2)
    j = list(arrays["blocks"]).index("head")
    assert arrays["barrier"][0, j, 0] == result["pairs"][pairs[0]]["blocks"]["head"]["rest_at_A"]["barrier"]
    assert (out / "layerwise.png").stat().st_size > 10_000 and (out / "layerwise.pdf").stat().st_size > 1_000
    assert layerwise.main(["--run", str(run_dir), "--out", str(tmp_path / "one"), "--pair", "lora", "randlora",
                           "--points", "2", "--no-progress"]) == 0  # fmt: skip
    one = json.loads((tmp_path / "one" / "layerwise.json").read_text())
    assert list(one["pairs"]) == ["lora-randlora"]


def test_command_bad_input_exits_2_with_one_line(tiny_wordnet_run, tmp_path, capsys):
    run_dir, out = str(tiny_wordnet_run), tmp_path / "bad"
    cases = [
        (["--run", str(tmp_path / "nope")], "does not exist"),
        (["--run", run_dir, "--points", "1"], "--points"),
        (["--run", run_dir, "--pair", "lora", "lora"], "--pair"),
        (["--run", run_dir, "--pair", "sgd", "lora"], "--pair"),
        (["--run", run_dir, "--blocks", "heads"], "--blocks"),
    ]
    assert_refused(layerwise.main, cases, out, capsys)


def test_stage_of_the_connectivity_run(tmp_path, wordnet_root, tiny_wordnet_run, no_figure_drawing):
    """``--layerwise`` writes the layer-wise barriers next to the run's outputs; without it (the shared run) none."""
    out = tmp_path / "run"
    assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN,
                              "--layerwise"]) == 0  # fmt: skip
    result = json.loads((out / "layerwise.json").read_text())
    run = json.loads((out / "landscape.json").read_text())
    assert run["config"]["layerwise"] and "layerwise" in run["wall_time_s"] and result["points"] == 5
    assert set(result["pairs"]) == {"ft-lora", "ft-randlora", "lora-randlora"}
    for pair, entry in result["pairs"].items():
        a = pair.split("-")[0]
        for block in entry["blocks"].values():
            assert block["rest_at_A"]["loss"][0] == pytest.approx(run["solutions"][a]["vertex_loss"], rel=1e-6)
    assert all((out / f).is_file() for f in layerwise.FILES)
    assert not any((tiny_wordnet_run / f).exists() for f in layerwise.FILES)
    assert not json.loads((tiny_wordnet_run / "landscape.json").read_text())["config"]["layerwise"]
