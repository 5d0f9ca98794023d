"""The grid benchmark's three evaluators agree: engine, paper loop and loss-landscapes at the same points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.benchmarks import grid as bench
from landscape.grid import EvalSet

pytest.importorskip("loss_landscapes")

NUM_CLASSES = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops: one thread avoids OpenMP barrier stalls when other jobs share the 2 cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_entry):
    model = tiny_entry.build(NUM_CLASSES).eval()
    texts = [f"sample {i} " + "word " * (i % 7) + "end" for i in range(19)]
    labels = torch.arange(len(texts)) % NUM_CLASSES
    encoded = tiny_entry.encode(texts)
    eval_set = EvalSet.prepare(encoded, labels, 8, "cpu")
    head = bench.fit_head(model, eval_set, NUM_CLASSES)
    targets = bench.adapted_weights(model, tiny_entry.targets)
    deltas = bench.synthetic_deltas(model, targets, head, scale=0.05, seed=0, lora_rank=2)
    return model, texts, labels, encoded, eval_set, deltas, targets, tiny_entry


def test_ll_points_follow_the_zig_zag():
    ab = bench.ll_points(3)
    assert ab.shape == (3, 3, 2)
    assert np.allclose(ab[:, 0, 0], [0, 1 / 3, 2 / 3])  # α = i/S, never 1
    assert np.allclose(ab[0, :, 1], [1 / 3, 2 / 3, 1])  # even columns: β one step up
    assert np.allclose(ab[1, :, 1], [0, 1 / 3, 2 / 3])  # odd columns: β from 0
    xy = bench.paper_xy(ab)
    assert np.allclose(xy[..., 0], ab[..., 0] + ab[..., 1] / 2) and np.allclose(xy[..., 1], ab[..., 1])


def test_synthetic_solutions_change_what_they_should(tiny):
    model, *_, deltas, targets, _ = tiny
    names = {n for n, _ in model.named_parameters()}
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
    xy = bench.paper_xy(bench.ll_points(steps))
    cpu = torch.device("cpu")
    eng, _, _ = bench.engine_losses(model, deltas, eval_set, cpu, xy)
    pap, _ = bench.paper_losses(model, deltas, texts, labels, entry.encode, cpu, xy, batch_size=8)
    batches = bench.plain_batches(encoded, labels, 8, cpu)
    ll, _ = bench.ll_losses(model, deltas, batches, len(labels), cpu, steps)
    assert eng.shape == pap.shape == ll.shape == (steps, steps)
    assert np.all(np.isfinite(eng))
    assert np.ptp(eng) > 1e-3  # the points really differ
    assert np.max(np.abs(eng - pap)) < 1e-5
    assert np.max(np.abs(eng - ll)) < 1e-4


def test_interleaved_run_gives_the_same_losses_and_times_every_method(tiny):
    model, texts, labels, encoded, eval_set, deltas, _, entry = tiny
    cpu = torch.device("cpu")
    batches = bench.plain_batches(encoded, labels, 8, cpu)
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
    alone, _, _ = bench.engine_losses(model, deltas, eval_set, cpu, bench.paper_xy(bench.ll_points(2)))
    assert np.array_equal(alone, eng)
    assert len(calls) == 4 and all(v > 0 for v in out["s_per_point"].values())


def test_paper_point_at_vertices_is_each_solution(tiny):
    model, texts, labels, _, eval_set, deltas, _, entry = tiny
    cpu = torch.device("cpu")
    states = bench.solution_state_dicts(model, deltas, cpu)
    net = bench.copy.deepcopy(model)
    for s, (x, y) in {"randlora": (0.0, 0.0), "lora": (1.0, 0.0), "ft": (0.5, 1.0)}.items():
        got = bench.paper_point(net, states, texts, labels, entry.encode, cpu, x, y, batch_size=8)
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
