"""The grid benchmark's three evaluators agree: engine, paper loop and loss-landscapes at the same points.

The peers (paper loop, loss-landscapes) live in :mod:`experiments.benchmarks.peers`; the cases, the
engine timing and the table in :mod:`experiments.benchmarks.grid`. The checks against plain
``cross_entropy`` below are independent of both and of :mod:`adapters.objectives`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adapters.methods import adapted_weights
from experiments.benchmarks import grid as bench
from experiments.benchmarks import peers
from landscape.engine.grid import EvalSet

pytest.importorskip("loss_landscapes")

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_entry):
    model = tiny_entry.build(NUM_CLASSES).eval()
    texts = [f"sample {i} " + "word " * (i % 7) + "end" for i in range(19)]
    labels = torch.arange(len(texts)) % NUM_CLASSES
    encoded = tiny_entry.encode(texts)
    eval_set = EvalSet.prepare(encoded, labels, 8, "cpu")
    head = bench.fit_head(model, eval_set, NUM_CLASSES)
    targets = list(adapted_weights(model, tiny_entry.targets))
    deltas = bench.synthetic_deltas(model, targets, head, scale=0.05, seed=0, lora_rank=2)
    return model, texts, labels, encoded, eval_set, deltas, targets, tiny_entry


def test_ll_points_follow_the_zig_zag():
    ab = peers.ll_points(3)
    assert ab.shape == (3, 3, 2)
    assert np.allclose(ab[:, 0, 0], [0, 1 / 3, 2 / 3])  # α = i/S, never 1
    assert np.allclose(ab[0, :, 1], [1 / 3, 2 / 3, 1])  # even columns: β one step up
    assert np.allclose(ab[1, :, 1], [0, 1 / 3, 2 / 3])  # odd columns: β from 0
    xy = peers.paper_xy(ab)
    assert np.allclose(xy[..., 0], ab[..., 0] + ab[..., 1] / 2) and np.allclose(xy[..., 1], ab[..., 1])


def test_synthetic_solutions_change_what_they_should(tiny):
    model, *_, deltas, targets, _ = tiny
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(deltas["ft"]) == names
    assert (
        set(deltas["lora"]) == set(deltas["randlora"]) == set(targets) | {f"{bench.HEAD}.weight", f"{bench.HEAD}.bias"}
    )
    w = targets[0]
    assert torch.linalg.matrix_rank(deltas["lora"][w]) == 2
    assert torch.linalg.matrix_rank(deltas["randlora"][w]) == min(deltas["randlora"][w].shape)


def test_engine_paper_loop_and_loss_landscapes_agree(tiny):
    model, texts, labels, encoded, eval_set, deltas, _, entry = tiny
    steps = 2
    xy = peers.paper_xy(peers.ll_points(steps))
    cpu = torch.device("cpu")
    eng, _, _ = bench.engine_losses(model, deltas, eval_set, cpu, xy)
    pap, _ = peers.paper_losses(model, deltas, texts, labels, entry.encode, cpu, xy, batch_size=8)
    batches = peers.plain_batches(encoded, labels, 8, cpu)
    ll, _ = peers.ll_losses(model, deltas, batches, len(labels), cpu, steps)
    assert eng.shape == pap.shape == ll.shape == (steps, steps)
    assert np.all(np.isfinite(eng))
    assert np.ptp(eng) > 1e-3  # the points really differ
    assert np.max(np.abs(eng - pap)) < 1e-5
    assert np.max(np.abs(eng - ll)) < 1e-4


def test_interleaved_run_gives_the_same_losses_and_times_every_method(tiny):
    model, texts, labels, encoded, eval_set, deltas, _, entry = tiny
    cpu = torch.device("cpu")
    batches = peers.plain_batches(encoded, labels, 8, cpu)
    calls = []
    out = bench.interleaved_grid(
        model, deltas, eval_set, batches, texts, labels, entry.encode, cpu, steps=2, same_batches=True,
        between=lambda: calls.append(1), batch_size=8,
    )  # fmt: skip
    losses = out["losses"]
    assert set(losses) == {"engine", "paper_loop", "loss_landscapes", "loss_landscapes_same_batches"}
    eng = losses["engine"]
    assert np.max(np.abs(eng - losses["paper_loop"])) < 1e-5
    for k in ("loss_landscapes", "loss_landscapes_same_batches"):
        assert np.max(np.abs(eng - losses[k])) < 1e-4, k
    # the same points as the separate building blocks
    alone, _, _ = bench.engine_losses(model, deltas, eval_set, cpu, peers.paper_xy(peers.ll_points(2)))
    assert np.array_equal(alone, eng)
    assert len(calls) == 4 and all(v > 0 for v in out["s_per_point"].values())


def test_paper_point_at_vertices_is_each_solution(tiny):
    model, texts, labels, _, eval_set, deltas, _, entry = tiny
    cpu = torch.device("cpu")
    states = peers.solution_state_dicts(model, deltas, cpu)
    net = copy.deepcopy(model)
    for s, (x, y) in {"randlora": (0.0, 0.0), "lora": (1.0, 0.0), "ft": (0.5, 1.0)}.items():
        got = peers.paper_point(net, states, texts, labels, entry.encode, cpu, x, y, batch_size=8)
        net.load_state_dict(states[s])
        with torch.no_grad():
            logits = torch.cat([net(**inputs) for inputs, _ in eval_set.batches])
            target = torch.cat([t for _, t in eval_set.batches])
        assert abs(got - float(torch.nn.functional.cross_entropy(logits, target))) < 1e-5, s


def test_useful_flops_counts_real_tokens(tiny):
    model = tiny[0]
    cfg = model.backbone.config
    matrix = sum(p.numel() for p in model.backbone.encoder.parameters() if p.dim() == 2)
    lengths = torch.tensor([3, 5])
    got = bench.bert_useful_flops(model, lengths, NUM_CLASSES)
    want = 2 * matrix * 8 + 4 * cfg.num_hidden_layers * cfg.hidden_size * (9 + 25) + 2 * cfg.hidden_size * 4 * 2
    assert got == want


def test_table_marks_skipped_cases():
    text = bench.table([{"name": "vit-b32-cifar", "skipped": "no CUDA device"}])
    assert "vit-b32-cifar | skipped: no CUDA device" in text


# --------------------------------------------------------------------------- the CLIP case (adapters' own model)


@pytest.fixture(scope="module")
def clip_case():
    return bench.vit_case(12, seed=0, device=torch.device("cpu"), num_classes=3, arch="clip-tiny")


def test_clip_case_puts_both_towers_adapted_weights_on_the_plane(clip_case):
    from adapters.models.clip import CLIPClassifier

    model = clip_case.model
    assert isinstance(model, CLIPClassifier) and not hasattr(model, bench.HEAD)
    # independent of adapters.methods: the paper's q/k/v, c_fc and c_proj weights of both towers, by name
    suffixes = ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    want = [n for n, _ in model.named_parameters() if n.endswith(suffixes)]
    assert sorted(clip_case.targets) == sorted(want)
    assert any(n.startswith("clip.visual.") for n in want) and any(n.startswith("clip.transformer.") for n in want)
    assert not any("out_proj" in n for n in clip_case.targets)
    deltas = bench.synthetic_deltas(model, clip_case.targets, None, scale=0.05, seed=0, lora_rank=2)
    assert set(deltas["lora"]) == set(deltas["randlora"]) == set(clip_case.targets)
    assert "clip.logit_scale" not in deltas["ft"]  # frozen in every method: not on the plane


def test_clip_case_runs_and_the_three_methods_agree(clip_case, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype=torch.float32, repeats=5: 1e12)
    r = bench.run_case(clip_case, steps=2, delta_scale=0.05, log=lambda s: None)
    eng = np.array(r["loss_engine"])
    assert len(eng) == 4 and np.all(np.isfinite(eng)) and np.ptp(eng) > 1e-4
    assert r["max_abs_diff_engine_vs_paper_loop"] < 1e-5
    assert r["max_abs_diff_engine_vs_loss_landscapes"] < 1e-4
    assert r["adapted_weights"] == len(clip_case.targets)
    assert "engine_batched_skipped" in r  # CLIP asks for one grid point per forward
    assert r["useful_flops_per_point"] > 0 and "vit-b32-cifar" in bench.table([r])


def test_clip_paper_point_at_a_vertex_is_a_fresh_model(clip_case):
    """The text tower is on the plane: a model rebuilt from scratch (no cached text features) gives the same loss."""
    model = clip_case.model.eval()
    deltas = bench.synthetic_deltas(model, clip_case.targets, None, scale=0.05, seed=0, lora_rank=2)
    cpu = torch.device("cpu")
    states = peers.solution_state_dicts(model, deltas, cpu)
    net = copy.deepcopy(model)
    peers.paper_point(net, states, clip_case.raw, clip_case.labels, clip_case.encode, cpu, 0.0, 0.0, batch_size=5)
    got = peers.paper_point(net, states, clip_case.raw, clip_case.labels, clip_case.encode, cpu, 0.5, 1.0, 5)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(states["ft"])
    fresh.eval()  # drops any cached text features
    with torch.no_grad():
        logits = fresh(**clip_case.encode(clip_case.raw).tensors)
    assert abs(got - float(torch.nn.functional.cross_entropy(logits, clip_case.labels))) < 1e-5


def test_point_flops_count_text_features_once(clip_case, tiny):
    inputs = clip_case.encode(clip_case.raw[:4]).tensors
    f = bench.point_flops(clip_case.model, inputs, 100, train_mode=True)
    assert f["once"] > 0 and f["per_sample"] > 0 and f["total"] == f["once"] + 100 * f["per_sample"]
    eval_set = tiny[4]
    g = bench.point_flops(tiny[0], eval_set.batches[0][0], 10)
    assert g["once"] == 0 and g["per_sample"] > 0
