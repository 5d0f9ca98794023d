"""Trained curves between two solutions (landscape.curves): the curve's weights against hand computations,
endpoints exact, its loss against a naive evaluation and the paths', training lowers the loss along it, a
killed curve training resumes bit-exactly, and the command works on a tiny run (exit 2 on bad input)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.train import TrainConfig
from landscape import curves, paths
from landscape.engine.grid import EvalSet
from landscape.engine.plane import solution_weights
from tests.synthetic import Crash, adapted_few, die_on_call, synthetic_solutions

N_CLASSES = 4


def test_weights_against_hand_computation():
    # quadratic Bézier (1 bend) at t = 1/4: (3/4)², 2·(1/4)·(3/4), (1/4)²
    assert curves.bezier_weights(0.25, 1) == pytest.approx([0.5625, 0.375, 0.0625], abs=1e-15)
    # cubic (2 bends) at t = 1/2: 1/8, 3/8, 3/8, 1/8
    assert curves.bezier_weights(0.5, 2) == pytest.approx([0.125, 0.375, 0.375, 0.125], abs=1e-15)
    # quartic (3 bends) at t = 1/4: C(4, k)·(1/4)^k·(3/4)^(4−k)
    want = [81 / 256, 108 / 256, 54 / 256, 12 / 256, 1 / 256]
    assert curves.bezier_weights(0.25, 3) == pytest.approx(want, abs=1e-15)
    # polygonal chain through 2 bends (3 segments): t = 1/2 is the middle of the second segment
    assert curves.polychain_weights(0.5, 2) == pytest.approx([0.0, 0.5, 0.5, 0.0], abs=1e-15)
    assert curves.polychain_weights(0.25, 2) == pytest.approx([0.25, 0.75, 0.0, 0.0], abs=1e-15)
    assert curves.polychain_weights(0.75, 1) == pytest.approx([0.0, 0.5, 0.5], abs=1e-15)
    for kind in curves.KINDS:
        for bends in (1, 2, 3, 5):
            w0, w1 = curves.curve_weights(kind, 0.0, bends), curves.curve_weights(kind, 1.0, bends)
            assert w0 == [1.0] + [0.0] * (bends + 1) and w1 == [0.0] * (bends + 1) + [1.0], (kind, bends)
            for t in np.random.default_rng(bends).uniform(size=5):
                w = curves.curve_weights(kind, t, bends)
                assert sum(w) == pytest.approx(1.0, abs=1e-12) and min(w) >= 0.0


def _solutions(model, seed=0, scale=0.3):
    """Synthetic solutions: ft changes everything, lora/randlora a few matrices and the head."""
    return synthetic_solutions(model, adapted_few(model), scale, seed)


@pytest.fixture(scope="module")
def setup(tiny_entry):
    torch.manual_seed(0)
    model = tiny_entry.build(N_CLASSES)
    sols = _solutions(model)
    thetas = solution_weights(dict(model.named_parameters()), {s: sols[s].delta() for s in sols})
    texts = [f"sample {i} " + "word " * (i % 7) for i in range(48)]
    data, labels = tiny_entry.encode(texts), torch.arange(48) % N_CLASSES
    eval_set = EvalSet.prepare(data, labels, 16, "cpu")
    return model, sols, thetas, data, labels, eval_set


def _bent(thetas, a, b, bends, kind, seed=1):
    """A curve whose bends are moved off the line (so nothing below holds by the line alone)."""
    curve = curves.Curve(thetas[a], thetas[b], bends, kind)
    with torch.no_grad():
        curve.bends.add_(0.2 * torch.randn(curve.bends.shape, generator=torch.Generator().manual_seed(seed)))
    return curve


def test_endpoints_exact_and_curve_against_formula(setup):
    thetas = setup[2]
    a, b = thetas["ft"], thetas["lora"]
    for kind in curves.KINDS:
        for bends in (1, 3):
            curve = _bent(thetas, "ft", "lora", bends, kind)
            start, end = curve.weights_at(0.0), curve.weights_at(1.0)
            for n in a:
                assert torch.equal(start[n], a[n]) and torch.equal(end[n], b[n]), (kind, bends, n)
    # quadratic Bézier by hand: (1 − t)²·θ_A + 2t(1 − t)·θ_1 + t²·θ_B
    curve = _bent(thetas, "ft", "lora", 1, "bezier")
    bend = curve.split(curve.bends[0].detach())
    got = curve.weights_at(0.3)
    for n in a:
        want = 0.49 * a[n] + 0.42 * bend[n] + 0.09 * b[n]
        torch.testing.assert_close(got[n].detach(), want, rtol=1e-5, atol=1e-6)
    # polygonal chain through 2 bends at t = 1/2: the midpoint of the two bends
    curve = _bent(thetas, "ft", "lora", 2, "polychain")
    b1, b2 = (curve.split(curve.bends[k].detach()) for k in (0, 1))
    got = curve.weights_at(0.5)
    for n in a:
        torch.testing.assert_close(got[n].detach(), 0.5 * b1[n] + 0.5 * b2[n], rtol=1e-6, atol=1e-7)


def test_untrained_curve_is_the_straight_line(setup):
    thetas = setup[2]
    a, b = thetas["lora"], thetas["randlora"]
    for kind in curves.KINDS:
        curve = curves.Curve(a, b, 3, kind)
        for t in (0.1, 0.37, 0.5, 0.9):
            got = curve.weights_at(t)
            for n in a:
                torch.testing.assert_close(got[n].detach(), (1 - t) * a[n] + t * b[n], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def _naive_loss(model, weights, data, labels):
    fresh = copy.deepcopy(model)
    state = fresh.state_dict()
    state.update({n: w.detach().clone() for n, w in weights.items()})
    fresh.load_state_dict(state)
    fresh.eval()
    return F.cross_entropy(fresh(**data.batch(torch.arange(len(labels)))).float(), labels).item()


def test_evaluation_against_paths_and_naive(setup, tmp_path):
    model, sols, thetas, data, labels, eval_set = setup
    curve = _bent(thetas, "ft", "randlora", 1, "bezier")
    result = curves.evaluate_curve(curve, copy.deepcopy(model), eval_set, "cpu", points=5, progress=False)
    line = paths.compute_paths(model, sols, eval_set, "cpu", points=5, progress=False)
    k = line["pairs"].index("ft-randlora")
    t = result["t"]
    assert t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and result["paths"] == ["curve", "line"]
    # the straight line is the paths' line, and the curve's ends are the solutions (the paths' losses at 0, 1)
    np.testing.assert_allclose(result["loss"][1], line["loss"][k], rtol=1e-6, atol=1e-7)
    assert result["loss"][0, 0] == pytest.approx(line["loss"][k, 0], rel=1e-6)
    assert result["loss"][0, -1] == pytest.approx(line["loss"][k, -1], rel=1e-6)
    assert abs(result["loss"][0, 2] - result["loss"][1, 2]) > 1e-3  # the bent curve is not the line
    # an interior point equals a naive evaluation of the hand-computed weights
    bend = curve.split(curve.bends[0].detach())
    at = {n: 0.5625 * thetas["ft"][n] + 0.375 * bend[n] + 0.0625 * thetas["randlora"][n] for n in bend}
    assert result["loss"][0, 1] == pytest.approx(_naive_loss(model, at, data, labels), rel=1e-5, abs=1e-6)
    for k, row in enumerate(result["paths"]):
        want = paths.loss_barrier(t, result["loss"][k])
        assert {key: result["barriers"][row][key] for key in want} == want
        assert result["mean_loss"][row] == pytest.approx(result["loss"][k].mean())
    written = curves.write_curve(result, curve, tmp_path, ("ft", "randlora"), info={"seed": 0})
    assert [p.name for p in written] == [f"ft-randlora.{e}" for e in ("npz", "json", "png", "safetensors")]
    loaded = curves.load_curve(written[3], thetas["ft"], thetas["randlora"])
    assert loaded.kind == "bezier" and loaded.num_bends == 1 and torch.equal(loaded.bends, curve.bends)
    meta = json.loads(written[1].read_text())
    assert meta["curve"]["chord_barrier"] == result["barriers"]["curve"]["chord_barrier"] and meta["seed"] == 0
    assert meta["format_version"] == paths.FORMAT_VERSION == 2
    for row in curves.ROWS:  # the barrier is the chord barrier; Frankle's quantity has its own name
        assert meta[row]["barrier"] == meta[row]["chord_barrier"] == result["barriers"][row]["chord_barrier"]
        assert meta[row]["barrier_se"] == meta[row]["chord_barrier_se"]
        assert meta[row]["peak_above_endpoint_mean"] == result["barriers"][row]["peak_above_endpoint_mean"]
    assert meta["barrier_definition"] == meta["chord_barrier_definition"] and "(1-t)*L(theta_A)" in meta[
        "barrier_definition"]  # fmt: skip
    assert meta["peak_above_endpoint_mean_definition"].endswith("(L(theta_A) + L(theta_B)) / 2")
    assert not list(tmp_path.glob("**/.*tmp*")), "temporary files left behind"


def test_killed_curve_training_resumes_bit_exactly(setup, tmp_path):
    model, sols, thetas, data, labels, _ = setup
    config = TrainConfig(steps=7, batch_size=8, lr=1e-3, head_lr=1e-3, weight_decay=0.0, seed=3)

    def run(base, checkpoint=None):
        curve = curves.Curve(thetas["lora"], thetas["randlora"], 2, "bezier")
        history = curves.train_curve(curve, base, data, labels, config, checkpoint=checkpoint, checkpoint_every=2,
                                     checkpoint_key="k", progress=False)  # fmt: skip
        return curve, history

    reference, ref_history = run(copy.deepcopy(model))
    crashing = copy.deepcopy(model)
    die_on_call(crashing, 6)  # dies during step 6; the checkpoint of step 4 survives
    ckpt = tmp_path / "curve.ckpt"
    with pytest.raises(Crash):
        run(crashing, ckpt)
    assert ckpt.exists()
    resumed, history = run(copy.deepcopy(model), ckpt)  # a new process rebuilds everything
    assert history["resumed_at_step"] == 4 and history["train_loss"] == ref_history["train_loss"]
    assert torch.equal(resumed.bends, reference.bends)
    assert not torch.equal(reference.bends, curves.Curve(thetas["lora"], thetas["randlora"], 2).bends)  # it moved
    # another key starts over instead of resuming
    curve = curves.Curve(thetas["lora"], thetas["randlora"], 2, "bezier")
    other = curves.train_curve(curve, copy.deepcopy(model), data, labels, config, checkpoint=ckpt,
                               checkpoint_every=2, checkpoint_key="other", progress=False)  # fmt: skip
    assert other["resumed_at_step"] == 0


def test_curve_gradient_against_a_naive_forward_with_and_without_checkpointing(tmp_path):
    """The bends' gradient through CurveModel's hooks (θ(t) built per module, a tied embedding in both of its
    holders) equals autograd through a plain functional_call of the hand-computed weights; under gradient
    checkpointing (each layer's θ(t) built again in its backward) it is the same gradient."""
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM

    from adapters.models.base import set_checkpointing
    from tests.llm_models import save_tiny_causal_lm

    model = AutoModelForCausalLM.from_pretrained(save_tiny_causal_lm(tmp_path / "lm", "qwen2"))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.layers.0.mlp.down_proj.weight",  # the last layer of a block: the recomputation ends in it
             "model.norm.weight"]  # fmt: skip
    ends = [{n: 0.05 * torch.randn(params[n].shape, generator=g) for n in names} for _ in range(2)]
    inputs = {"input_ids": torch.randint(0, 50, (2, 7), generator=g)}
    t, w = 0.3, curves.bezier_weights(0.3, 1)

    def loss(out):
        return out.logits.float().logsumexp(-1).sum()

    sizes = [params[n].numel() for n in names]
    bend = torch.cat([0.5 * ends[0][n].reshape(-1) + 0.5 * ends[1][n].reshape(-1) for n in names]).view(1, -1)
    bend.requires_grad_()
    parts = bend.view(-1).split(sizes)  # the untrained bend: the midpoint, as Curve starts it
    naive = {n: params[n].detach() + w[0] * ends[0][n] + w[1] * parts[i].view(params[n].shape) + w[2] * ends[1][n]
             for i, n in enumerate(names)}  # fmt: skip
    want_loss = loss(functional_call(model, naive, args=(), kwargs=inputs))
    want_loss.backward()
    got = {}
    for checkpointing in (False, True):
        curve = curves.Curve(ends[0], ends[1], bends=1, offset=True)
        wrapper = curves.CurveModel(curve, model, grad_accum=1 << 30)
        set_checkpointing(model, checkpointing)
        model.train(checkpointing)  # transformers checkpoints only in train mode (the model has no dropout)
        wrapper.calls, wrapper.t = 1, t
        value = loss(wrapper(**inputs))
        value.backward()
        # every W0 swapped back, after the backward's recomputation too (no θ(t) left in a module)
        assert all(p is params[n] for n, p in model.named_parameters()), checkpointing
        wrapper.close()
        got[checkpointing] = curve.bends_grad()
        assert value.item() == pytest.approx(want_loss.item(), rel=1e-5)
    torch.testing.assert_close(got[False], bend.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-7)


def test_dense_endpoint_on_a_bf16_base_held_in_bf16_and_exact(setup):
    """On a bf16 base a dense endpoint (FT's ΔW) is held in bf16, half the fp32 bytes (as the factored plane holds
    it), and the curve's weights at that end are still the FT model's: equal wherever the update is smaller than
    the weight (Sterbenz: the difference of two bf16 numbers within a factor 2 is a bf16 number), within one
    bf16 spacing elsewhere; the curve's loss there is the naive loss of the FT weights."""
    from adapters.solution import Solution

    base, _, _, data, labels, eval_set = setup
    model = copy.deepcopy(base).to(torch.bfloat16)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    theta = {"ft": {}, "lora": {}}
    for n, w in params.items():  # FT moves every weight by about 1 % of its size, LoRA a few matrices by 10 %
        theta["ft"][n] = (w.float() * (1 + 0.01 * torch.randn(w.shape, generator=g))).bfloat16()
    for n in adapted_few(model):
        theta["lora"][n] = (params[n].float() + 0.1 * params[n].float().std() * torch.randn(params[n].shape)).bfloat16()
    sols = {s: Solution(path=None, info={"method": s}, metrics={}, base=model,
                        _delta={n: w.float() - params[n].float() for n, w in t.items()})
            for s, t in theta.items()}  # fmt: skip
    curve = curves.pair_curve(model, sols, ("ft", "lora"), 1, "bezier")
    assert curve.theta_a.dtype == torch.bfloat16 and curve.theta_a.element_size() == 2  # was fp32 (4 bytes)
    controls, weights = curve.controls(), curves.curve_weights("bezier", 0.0, 1)
    for i, n in enumerate(curve.names):  # the weights CurveModel swaps in at t = 0: W0 + offset, rounded once
        got = (params[n] + curve.term(controls, weights, i)).to(torch.bfloat16)
        want, w0 = theta["ft"][n].float(), params[n].float()
        near = (want.abs() >= w0.abs() / 2) & (want.abs() <= 2 * w0.abs()) & (want * w0 > 0)
        assert torch.equal(got.float()[near], want[near]), n
        spacing = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert ((got.float() - want).abs() <= spacing).all(), n
    result = curves.evaluate_curve(curve, model, eval_set, "cpu", points=2, progress=False)
    want = _naive_loss(model, theta["ft"], data, labels)
    assert result["loss"][0, 0] == pytest.approx(want, rel=1e-2) and result["loss"][1, 0] == result["loss"][0, 0]


def test_foreign_adapter_endpoint_added_from_its_factors_never_merged(tmp_path):
    """A peft adapter brought from elsewhere: its lazy ΔW (whose call merges the layer in fp64, several times the
    layer's bytes) is added to θ(t) from its factors (one addmm) in training's forward: never called, and the
    bends' gradient is the one through the dense, materialised endpoint."""
    from peft import RandLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.solution import load_solution
    from tests.llm_models import save_tiny_causal_lm

    base = AutoModelForCausalLM.from_pretrained(save_tiny_causal_lm(tmp_path / "lm", "qwen2"))
    peft_model = get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    peft_model.save_pretrained(tmp_path / "randlora")
    foreign = load_solution(tmp_path / "randlora", base=base, expect_method="randlora", model="base")
    deltas = foreign.module_deltas(check=False)
    g = torch.Generator().manual_seed(1)
    dense_a = {n: 0.02 * torch.randn(d.shape, generator=g) for n, d in deltas.items()}  # an FT-like endpoint
    calls = []
    for d in deltas.values():
        d._compute = (lambda f: lambda: calls.append(1) or f())(d._compute)
    inputs = {"input_ids": torch.randint(0, 50, (2, 7), generator=g)}
    grads = []
    for end_b in (deltas, {n: d() for n, d in deltas.items()}):  # lazy, then materialised (the reference)
        calls.clear()
        curve = curves.Curve(dense_a, end_b, bends=1, offset=True)
        wrapper = curves.CurveModel(curve, base, grad_accum=1 << 30)
        wrapper.calls, wrapper.t = 1, 0.4
        wrapper(**inputs).logits.float().logsumexp(-1).sum().backward()
        wrapper.close()
        grads.append(curve.bends_grad())
        if end_b is deltas:
            assert curve.lazy and not calls, "the foreign adapter's ΔW was merged during training"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


class _Normed(torch.nn.Module):
    """The tiny model with a batch norm on its logits: train mode moves its running statistics."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.norm = inner, torch.nn.BatchNorm1d(N_CLASSES)

    def forward(self, **inputs):
        return self.norm(self.inner(**inputs))


def test_curve_training_leaves_the_base_as_it_was(setup):
    """Training runs on the caller's model itself (no copy of its weights): its parameters, their flags, its
    modules' modes and its buffers (batch-norm statistics, which train mode moves) are all as before."""
    model, _, thetas, data, labels, _ = setup
    base = _Normed(copy.deepcopy(model)).eval()
    next(base.parameters()).requires_grad_(False)  # mixed flags, each to be restored as it was
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ends = [{f"inner.{n}": w for n, w in thetas[s].items()} for s in ("lora", "randlora")]
    curve = curves.Curve(ends[0], ends[1], 1, "bezier")
    start = curve.bends.detach().clone()
    config = TrainConfig(steps=3, batch_size=8, lr=1e-3, head_lr=1e-3, weight_decay=0.0, seed=3)
    curves.train_curve(curve, base, data, labels, config, progress=False)
    assert not torch.equal(curve.bends, start)  # it trained, through the batch norm in train mode
    after = base.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the base's weights or statistics changed"
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not any(m.training for m in base.modules())


# ---------------------------------------------------------------------------- tiny run + CLI ----


@pytest.fixture
def run_dir(tiny_wordnet_run):
    """The main job's tiny run (conftest: shared with other test files, read only)."""
    return tiny_wordnet_run


def test_cli_trains_a_curve_of_lower_loss(run_dir, tmp_path):
    argv = ["--run", str(run_dir), "--pair", "ft,randlora", "--bends", "1", "--steps", "30", "--lr", "3e-3",
            "--points", "3", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert curves.main(argv) == 0
    folder = tmp_path / "curves"
    got = np.load(folder / "ft-randlora.npz")
    meta = json.loads((folder / "ft-randlora.json").read_text())
    ran = np.load(run_dir / "paths.npz")
    k = list(ran["pairs"]).index("ft-randlora")
    # the straight line is the run's path; the curve's ends are the solutions
    np.testing.assert_allclose(got["t"], ran["t"])
    np.testing.assert_allclose(got["loss"][1], ran["loss"][k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["loss"][0, [0, -1]], ran["loss"][k, [0, -1]], rtol=1e-6, atol=1e-7)
    # training lowered the loss along the curve below the straight line's (where it started)
    assert meta["curve"]["mean_loss"] < meta["line"]["mean_loss"] - 1e-3
    assert got["loss"][0, 1] < got["loss"][1, 1]
    assert len(got["train_loss"]) == 30 and meta["train"]["steps"] == 30 and meta["bends"] == 1
    for row in ("curve", "line"):
        assert {"barrier", "barrier_se", "chord_barrier", "chord_barrier_se", "chord_t_max", "peak_above_endpoint_mean",
                "peak_above_endpoint_mean_se"} <= set(meta[row])  # fmt: skip
        assert meta[row]["barrier"] == meta[row]["chord_barrier"]
    assert (folder / "ft-randlora.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "ft-randlora.safetensors").stat().st_size > 0
    assert not list(folder.glob(".*")), "the checkpoint goes once the curve is written"


def test_cli_bad_input_exits_2(run_dir, tmp_path, capsys):
    def bad(argv):
        assert curves.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0]
        return err[0]

    run = ["--run", str(run_dir), "--out", str(tmp_path)]
    for pair in ("ft,foo", "ft,ft", "ft", "ft,lora,randlora", "head_only,ft"):
        message = bad([*run, "--pair", pair])
        assert "--pair" in message and "ft,lora" in message, message
    # the pair is checked before the run is opened
    assert "--pair" in bad(["--run", str(tmp_path / "nope"), "--pair", "ft,x"])
    assert "does not exist" in bad(["--run", str(tmp_path / "nope"), "--pair", "ft,lora"])
    assert "at least 1 bend" in bad([*run, "--pair", "ft,lora", "--bends", "0"])
    assert "--steps" in bad([*run, "--pair", "ft,lora", "--steps", "0"])
    assert "--lr" in bad([*run, "--pair", "ft,lora", "--lr", "-1"])
    assert "at least 2 points" in bad([*run, "--pair", "ft,lora", "--points", "1"])
    with pytest.raises(SystemExit) as exit_:  # argparse's own check of the choices
        curves.main([*run, "--pair", "ft,lora", "--kind", "spline"])
    assert exit_.value.code == 2 and "--kind" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/curves*")), "bad input must write nothing"
