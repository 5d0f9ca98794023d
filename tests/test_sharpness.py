"""Adaptive sharpness: the worst case and the average case against their closed forms at the minimum of a
quadratic (½ρ²·λmax and ½ρ²/d·trace of diag|w|·H·diag|w|, numpy), invariance under a rescaling that keeps
the function (where plain sharpness changes), and the command on a tiny run folder (outputs, the run's
vertex losses, one-line errors)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from adapters.objectives import OBJECTIVES
from landscape import sharpness
from landscape.engine.grid import EvalSet
from tests.conftest import assert_refused

CE = OBJECTIVES["classification"]


def quadratic(d: int = 6, seed: int = 0):
    """L(w) = ½(w − w*)ᵀH(w − w*) + c with a PSD H and w* of nonzero entries; A = diag|w*|·H·diag|w*|."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    h = q @ np.diag([10.0, 4.0, 2.0, 1.0, 0.5, 0.1][:d]) @ q.T
    w_star = rng.uniform(0.5, 2.0, d) * rng.choice([-1.0, 1.0], d)
    a = np.diag(np.abs(w_star)) @ h @ np.diag(np.abs(w_star))
    ht, ct, wt = torch.from_numpy(h), 0.7, torch.from_numpy(w_star)

    def fn(p):
        r = p["w"] - wt
        return 0.5 * r @ ht @ r + ct

    return sharpness.FunctionLoss(fn, {"w": wt.clone()}), h, a


def test_worst_case_at_a_quadratic_minimum_is_half_rho2_lambda_max():
    """At w = w*, L(w + |w|⊙u) − L(w) = ½uᵀAu: the max over ‖u‖ ≤ ρ is ½ρ²λmax(A), reached on the sphere
    along A's top eigenvector. The ascent gets there (A's eigen-gap makes it a fast power iteration) and
    never above it (every iterate is feasible)."""
    loss, h, a = quadratic()
    lam = np.linalg.eigvalsh(a)[::-1]
    assert lam[1] / lam[0] < 0.8  # a gap: the closed form is reached in the steps given
    rho = 0.01
    result = sharpness.worst_case(loss, rho, steps=60, seed=3)
    closed = 0.5 * rho**2 * lam[0]
    assert result["value"] == pytest.approx(closed, rel=1e-6)
    assert max(result["values"]) <= closed * (1 + 1e-9) and result["u_norm"] == pytest.approx(rho, rel=1e-9)
    assert result["values"][0] < result["value"]  # the random start is not the answer: the ascent did the work
    # plain sharpness (scale 1): the same recipe gives ½ρ²·λmax(H)
    plain = sharpness.worst_case(loss, rho, steps=60, seed=3, adaptive=False)
    assert plain["value"] == pytest.approx(0.5 * rho**2 * np.linalg.eigvalsh(h)[-1], rel=1e-6)


def test_worst_case_away_from_the_minimum_equals_a_search_of_the_circle():
    """Away from w* the gradient counts too: the max over ‖u‖ ≤ ρ of gᵀ·diag|w|·u + ½uᵀAu (a convex quadratic)
    lies on the circle ‖u‖ = ρ (2-D), found here by evaluating 200 000 angles; the ascent reaches it."""
    h = np.array([[3.0, 1.0], [1.0, 2.0]])
    w_star, w = np.array([0.4, -1.5]), np.array([1.0, -0.7])
    ht, wst = torch.from_numpy(h), torch.from_numpy(w_star)
    loss = sharpness.FunctionLoss(lambda p: 0.5 * (p["w"] - wst) @ ht @ (p["w"] - wst), {"w": torch.from_numpy(w)})
    rho = 0.3
    theta = np.linspace(0, 2 * np.pi, 200_000, endpoint=False)
    u = rho * np.stack([np.cos(theta), np.sin(theta)], 1)
    r = w + np.abs(w) * u - w_star
    best = (0.5 * np.einsum("ni,ij,nj->n", r, h, r)).max() - 0.5 * (w - w_star) @ h @ (w - w_star)
    result = sharpness.worst_case(loss, rho, steps=40, step_size=0.5, seed=1)
    assert result["value"] == pytest.approx(best, rel=1e-6)


def test_average_case_at_a_quadratic_minimum_is_half_rho2_trace_over_d_within_its_se():
    loss, _, a = quadratic()
    rho, d = 0.01, a.shape[0]
    result = sharpness.average_case(loss, rho, draws=400, seed=5)
    closed = 0.5 * rho**2 / d * np.trace(a)
    assert abs(result["value"] - closed) <= 3 * result["se"]
    assert 0 < result["se"] < 0.2 * closed and len(result["values"]) == 400
    assert result["min"] >= 0  # at a minimum of a convex quadratic no draw goes down


class TwoLayer(nn.Module):
    """x → W2·W1·x (no bias): W1·c, W2/c is the same function."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7, bias=False)
        self.l2 = nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.l1(x))


def test_adaptive_sharpness_is_invariant_to_a_function_preserving_rescaling():
    """Layers rescaled by c and 1/c: the same logits, the same adaptive sharpness (worst and average, the
    same seeded start and draws), while plain sharpness changes — through the run-loss path (EvalLoss over
    an evaluation set and the classification objective)."""
    torch.manual_seed(0)
    model = TwoLayer()
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    eval_set = EvalSet([({"x": x[:10]}, y[:10]), ({"x": x[10:]}, y[10:])], 24)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.l1.weight.mul_(4.0)
        scaled.l2.weight.div_(4.0)
        torch.testing.assert_close(scaled(x), model(x))
    names = ["l1.weight", "l2.weight"]
    settings = sharpness.SharpnessSettings(rho=0.2, steps=5, draws=6, dtype="float64")
    plain = sharpness.SharpnessSettings(rho=0.2, steps=5, draws=6, dtype="float64", adaptive=False)

    def measure(m, s):
        return sharpness.sharpness_at(sharpness.EvalLoss(copy.deepcopy(m), names, eval_set, CE, "float64"), s)

    a, b = measure(model, settings), measure(scaled, settings)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    assert a["worst_case"] > 0 and a["worst_case"] == pytest.approx(b["worst_case"], rel=1e-9)
    assert a["average_case"] == pytest.approx(b["average_case"], rel=1e-9, abs=1e-15)
    np.testing.assert_allclose(a["worst"]["values"], b["worst"]["values"], rtol=1e-9, atol=1e-15)
    pa, pb = measure(model, plain), measure(scaled, plain)
    assert abs(pa["worst_case"] - pb["worst_case"]) > 0.1 * max(pa["worst_case"], pb["worst_case"])
    # EvalLoss is the mean cross-entropy over all 24 samples, whatever the batching; its gradient is autograd's
    loss = sharpness.EvalLoss(copy.deepcopy(model).double(), names, eval_set, CE, "float64")
    value, grad = loss.value_and_grad(loss.params)
    params = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    ref = nn.functional.cross_entropy(torch.func.functional_call(model.double(), params, (x.double(),)), y)
    ref.backward()
    assert value == pytest.approx(float(ref), rel=1e-12)
    for n in names:
        torch.testing.assert_close(grad[n], params[n].grad, rtol=1e-10, atol=1e-12)


def test_lora_rescaling_b_c_a_over_c_keeps_adaptive_sharpness_in_adapter_coordinates():
    """A peft LoRA with B·c, A/c (the same ΔW = B·A, the same function): adaptive sharpness in the adapter's
    own coordinates is unchanged, plain sharpness is not."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["l1", "l2"], init_lora_weights=False))
    model = model.double()  # rescaled in float64: c·A, B/c rounded at 1e-16, not at float32's 1e-7
    x = x.double()
    eval_set = EvalSet([({"x": x}, y)], 20)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all("lora_" in n for n in names)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in scaled.named_parameters():
            if "lora_B" in n:
                p.mul_(5.0)
            elif "lora_A" in n:
                p.div_(5.0)
        torch.testing.assert_close(scaled(x=x), model(x=x))

    def measure(m, adaptive):
        s = sharpness.SharpnessSettings(rho=0.3, steps=4, draws=4, dtype="float64", adaptive=adaptive)
        return sharpness.sharpness_at(sharpness.EvalLoss(copy.deepcopy(m), names, eval_set, CE, "float64"), s)

    a, b = measure(model, True), measure(scaled, True)
    assert a["worst_case"] > 0 and a["worst_case"] == pytest.approx(b["worst_case"], rel=1e-9)
    assert a["average_case"] == pytest.approx(b["average_case"], rel=1e-9, abs=1e-15)
    pa, pb = measure(model, False), measure(scaled, False)
    assert abs(pa["worst_case"] - pb["worst_case"]) > 0.1 * max(pa["worst_case"], pb["worst_case"])


def test_settings_are_checked():
    for bad, needle in [({"rho": 0.0}, "--rho"), ({"steps": 0}, "--steps"), ({"draws": 1}, "--draws"),
                        ({"xi": -1.0}, "--xi"), ({"step_size": float("nan")}, "--step-size"),
                        ({"coordinates": ("hessian",)}, "--coordinates"), ({"dtype": "half"}, "--dtype")]:  # fmt: skip
        with pytest.raises(sharpness.UserError, match=needle):
            sharpness.SharpnessSettings(**bad).check()


# ----------------------------------------------------------------------------- the command on a run

FAST = ["--steps", "2", "--draws", "2", "--no-progress"]


@pytest.fixture
def run_dir(tiny_wordnet_run):
    """The session's finished tiny run (tests/conftest.py); the tests write elsewhere."""
    return tiny_wordnet_run


def test_command_on_a_run_writes_sharpness(run_dir, tmp_path):
    out = tmp_path / "s"
    assert sharpness.main(["--run", str(run_dir), "--out", str(out), *FAST]) == 0
    result = json.loads((out / "sharpness.json").read_text())
    run = json.loads((run_dir / "landscape.json").read_text())
    assert result["complete"] and result["seed"] == 0 and result["measure"] == "adaptive"
    assert result["training_seed"] == run["config"]["seed"] and result["settings"]["steps"] == 2
    for name in ("ft", "lora", "randlora"):
        weights = result["solutions"][name]["weights"]
        # the objective and the samples are the plane's: the loss at the point is the run's vertex loss
        assert weights["loss"] == pytest.approx(run["solutions"][name]["vertex_loss"], rel=1e-5)
        assert weights["worst_case"] == max(weights["worst"]["values"]) > 0  # the ascent goes up
        assert len(weights["worst"]["values"]) == 3 and len(weights["average"]["values"]) == 2
        assert weights["average_se"] >= 0 and weights["passes"] == 1 + 3 + 2
        assert weights["resolution"] == pytest.approx(np.finfo(np.float32).eps * weights["loss"])
        if name == "ft":
            assert "skipped" in result["solutions"][name]["adapter"]
        else:  # the peft model (adapter coordinates) and the merged weights are the same point
            adapter = result["solutions"][name]["adapter"]
            assert adapter["loss"] == pytest.approx(weights["loss"], rel=1e-5) and adapter["dim"] < weights["dim"]
            assert adapter["worst_case"] > 0
    # the weight coordinates are the same space for every solution: the same seeded start and draws (paired)
    dims = {result["solutions"][n]["weights"]["dim"] for n in ("ft", "lora", "randlora")}
    assert len(dims) == 1
    # a rerun reuses every entry (same key); another rho recomputes them
    assert sharpness.main(["--run", str(run_dir), "--out", str(out), "--solutions", "lora", *FAST]) == 0
    again = json.loads((out / "sharpness.json").read_text())["solutions"]["lora"]
    assert all(e["reused"] and e["worst_case"] == result["solutions"]["lora"][c]["worst_case"]
               for c, e in again.items())  # fmt: skip
    assert sharpness.main(["--run", str(run_dir), "--out", str(out), "--solutions", "lora", "--rho", "0.2",
                           *FAST]) == 0  # fmt: skip
    other = json.loads((out / "sharpness.json").read_text())["solutions"]["lora"]
    assert not any(e.get("reused") for e in other.values())
    assert other["weights"]["worst_case"] > result["solutions"]["lora"]["weights"]["worst_case"]
    # --samples: the first 8 of the run's evaluation set, another loss than the whole set's
    few = tmp_path / "few"
    assert sharpness.main(["--run", str(run_dir), "--out", str(few), "--solutions", "lora", "--samples", "8",
                           *FAST]) == 0  # fmt: skip
    few_result = json.loads((few / "sharpness.json").read_text())
    assert few_result["eval_samples"] == 8 < run["eval_samples"] == result["eval_samples"]
    few_loss = few_result["solutions"]["lora"]["weights"]["loss"]
    assert np.isfinite(few_loss) and few_loss != pytest.approx(result["solutions"]["lora"]["weights"]["loss"], rel=1e-4)


def test_command_bad_input_exits_2_with_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [
        (["--run", str(tmp_path / "nope")], "does not exist"),
        (["--run", str(run_dir), "--rho", "0"], "--rho"),
        (["--run", str(run_dir), "--rho", "nan"], "--rho"),
        (["--run", str(run_dir), "--steps", "0"], "--steps"),
        (["--run", str(run_dir), "--draws", "1"], "--draws"),
        (["--run", str(run_dir), "--coordinates", "hessian"], "--coordinates"),
        (["--run", str(run_dir), "--solutions", "sgd"], "--solutions"),
        (["--run", str(run_dir), "--dtype", "float16"], "--dtype"),
    ]
    assert_refused(sharpness.main, cases, out, capsys)
