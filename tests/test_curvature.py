"""Curvature at a solution: Hessian-vector products, Lanczos top eigenvalues, Hutchinson trace and SLQ
density against the exact Hessian of tiny models (torch.autograd.functional.hessian + numpy), adapter
coordinates against a closed-form LoRA loss and against double backward through peft's own RandLoRA, and
the command on a tiny run folder (outputs, the run's vertex losses, resume, one-line errors)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES
from adapters.solution import Solution
from landscape import curvature
from landscape.curvature import hessian, solvers
from landscape.engine.grid import EvalSet
from tests.conftest import TINY_RUN, assert_refused
from tests.synthetic import synthetic_solutions

CE = OBJECTIVES["classification"]
trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 (the declared floor) has trapz only


class TinyNet(nn.Module):
    """8 → 20 → 4 with tanh: 264 parameters, a Hessian with positive and negative eigenvalues."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 20)
        self.task_head = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_head(torch.tanh(self.l1(x)))


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, 30 samples in two batches of unequal size, and its exact Hessian (float64)."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.randn(30, 8), torch.randint(0, 4, (30,))
    eval_set = EvalSet([({"x": x[:11]}, y[:11]), ({"x": x[11:]}, y[11:])], 30)
    names = [n for n, _ in model.named_parameters()]
    exact = exact_hessian(
        model, names, lambda m, p: F.cross_entropy(torch.func.functional_call(m, p, (x.double(),)), y)
    )
    return model, eval_set, names, exact


def exact_hessian(model: nn.Module, names, loss) -> np.ndarray:
    """Hessian of ``loss(model64, params)`` w.r.t. ``names`` (flattened in order) by autograd, float64."""
    model64 = copy.deepcopy(model).double()
    params = dict(model64.named_parameters())
    shapes, sizes = [params[n].shape for n in names], [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(w: torch.Tensor) -> torch.Tensor:
        return loss(model64, {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)})

    return torch.autograd.functional.hessian(f, flat, vectorize=True).numpy()


def operator(model, names, eval_set, dtype="float64", mode="auto"):
    return curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, dtype, mode)


def dense(op: curvature.HessianOperator) -> np.ndarray:
    """The operator's matrix, column by column (dim HVPs)."""
    return np.stack([op.matvec(np.eye(op.dim)[j]) for j in range(op.dim)], axis=1)


@pytest.mark.parametrize("mode", ["reverse-over-forward", "forward-over-reverse", "reverse-over-reverse"])
def test_hvp_equals_exact_hessian_times_v(tiny, mode):
    model, eval_set, names, exact = tiny
    op = operator(model, names, eval_set, mode=mode)
    v = np.random.default_rng(1).standard_normal(op.dim)
    np.testing.assert_allclose(op.matvec(v), exact @ v, rtol=1e-10, atol=1e-12 * np.abs(exact).max())
    assert op.hvps == 1 and op.mode == mode
    # the loss at the point is the mean cross-entropy over all 30 samples, whatever the batching
    x, y = (torch.cat([b[0]["x"] for b in eval_set.batches]), torch.cat([b[1] for b in eval_set.batches]))
    with torch.no_grad():
        assert op.loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6)


def test_top_eigenvalues_equal_eigvalsh(tiny):
    model, eval_set, names, exact = tiny
    reference = np.linalg.eigvalsh(exact)[::-1]
    assert reference.min() < 0 < reference.max()  # an indefinite Hessian: "LA" must not return |λ|-largest
    op = operator(model, names, eval_set)
    result = curvature.top_eigenvalues(op, 5, tol=1e-10, seed=3)
    np.testing.assert_allclose(result["eigenvalues"], reference[:5], rtol=1e-6)
    assert result["hvps"] == op.hvps > 0 and result["converged"]
    # fp32 products, the default tolerance: still within 1e-4 relative
    op32 = operator(model, names, eval_set, "float32")
    np.testing.assert_allclose(curvature.top_eigenvalues(op32, 5)["eigenvalues"], reference[:5], rtol=1e-4)


def test_lanczos_stops_when_the_residuals_meet_tol(tiny):
    """The stopping rule: at tol 1e-3, stopped before the Krylov space is full (264 coordinates), and each
    eigenvalue within tol·|θ| of the exact one (the residual bound); the true residual ‖Hx − θx‖ of each
    returned Ritz value's eigenvector, recomputed with the exact Hessian, is below tol·|θ| too."""
    model, eval_set, names, exact = tiny
    reference = np.linalg.eigvalsh(exact)[::-1][:5]
    op = operator(model, names, eval_set)
    stop = solvers._RitzTest(5, 1e-3)
    v0 = torch.from_numpy(np.random.default_rng(7).standard_normal(op.dim))
    alpha, beta, basis = curvature.lanczos(op, v0 / torch.linalg.vector_norm(v0), 60, stop)
    assert stop.done and len(alpha) < 60 and op.hvps == len(alpha)
    theta, s = np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
    top = np.argsort(theta)[::-1][:5]
    ritz = np.array(basis.data[: len(alpha)]).T @ s[:, top]
    basis.close()
    residual = np.linalg.norm(exact @ ritz - ritz * theta[top], axis=0)
    assert np.all(residual <= 1e-3 * np.abs(theta[top]) * (1 + 1e-6))
    assert np.all(np.abs(stop.values - reference) <= 1e-3 * np.abs(reference))


def test_top_eigenvalues_past_the_vector_cap_finish_with_arpack(tiny):
    """Six Lanczos vectors cannot give the top 5 to 1e-10: ARPACK takes over from the top Ritz vectors
    and the eigenvalues still equal numpy's; every product of both solvers is counted."""
    model, eval_set, names, exact = tiny
    op = operator(model, names, eval_set)
    result = curvature.top_eigenvalues(op, 5, tol=1e-10, seed=3, max_vectors=6)
    np.testing.assert_allclose(result["eigenvalues"], np.linalg.eigvalsh(exact)[::-1][:5], rtol=1e-6)
    assert "eigsh" in result["method"] and result["converged"] and result["hvps"] == op.hvps > 6


def test_top_eigenvalues_of_a_small_block_are_exact(tiny):
    """k >= dim: the Hessian block of the head's bias (4 × 4) is built from HVPs and diagonalised."""
    model, eval_set, names, exact = tiny
    start = sum(dict(model.named_parameters())[n].numel() for n in names[:-1])
    op = operator(model, ["task_head.bias"], eval_set)
    result = curvature.top_eigenvalues(op, 4)
    np.testing.assert_allclose(result["eigenvalues"], np.linalg.eigvalsh(exact[start:, start:])[::-1], rtol=1e-9,
                               atol=1e-12)  # fmt: skip
    assert result["hvps"] == 4 and result["method"].startswith("exact")


def test_hutchinson_trace_within_its_standard_error(tiny):
    model, eval_set, names, exact = tiny
    trace = float(np.trace(exact))
    op = operator(model, names, eval_set, mode="reverse-over-reverse")
    few = curvature.hutchinson_trace(op, 30, seed=0)
    assert few["hvps"] == 30 and few["trace_se"] > 0
    assert abs(few["trace"] - trace) <= 4 * few["trace_se"]
    many = curvature.hutchinson_trace(op, 400, seed=1)
    assert abs(many["trace"] - trace) <= 4 * many["trace_se"]
    assert many["trace_se"] < 0.3 * few["trace_se"]  # the error shrinks like 1/sqrt(probes)
    assert abs(many["trace"] - trace) < 0.1 * abs(trace) + 0.1 * np.abs(np.linalg.eigvalsh(exact)).sum()
    # each sample is zᵀHz for a ±1 vector z: the exact Hessian gives the same numbers for the same z
    generator = torch.Generator().manual_seed(solvers._stream_seed(0, 1))
    z = [solvers._rademacher(op.dim, generator, torch.float64).numpy() for _ in range(30)]
    np.testing.assert_allclose(few["samples"], [zi @ exact @ zi for zi in z], rtol=1e-9)


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_dim(tiny):
    model, eval_set, names, exact = tiny
    op = operator(model, names, eval_set, mode="reverse-over-reverse")
    result = curvature.slq_density(op, steps=12, probes=8, seed=0)
    grid, values = np.asarray(result["grid"]), np.asarray(result["values"])
    assert trapezoid(values, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.all(values >= 0) and result["hvps"] == 12 * 8
    mean = trapezoid(grid * values, grid)
    assert mean == pytest.approx(result["mean"], abs=1e-6 * np.ptp(grid))
    # Gauss quadrature is exact for degree 1: the mean is the probes' mean of uᵀHu, u = z/‖z‖ (same z)
    generator = torch.Generator().manual_seed(solvers._stream_seed(0, 2))
    z = [solvers._rademacher(op.dim, generator, torch.float64).numpy() for _ in range(8)]
    assert result["mean"] == pytest.approx(np.mean([zi @ exact @ zi for zi in z]) / op.dim, rel=1e-8)
    per_probe = [zi @ exact @ zi / op.dim for zi in z]
    se = np.std(per_probe, ddof=1) / math.sqrt(len(per_probe))
    assert abs(result["mean"] - np.trace(exact) / op.dim) <= 4 * se


def test_slq_with_dim_steps_finds_the_exact_spectrum(tiny):
    model, eval_set, names, exact = tiny
    op = operator(model, names, eval_set, mode="reverse-over-reverse")
    result = curvature.slq_density(op, steps=op.dim, probes=1, seed=0)
    nodes, reference = np.asarray(result["nodes"][0]), np.linalg.eigvalsh(exact)
    scale = np.abs(reference).max()
    assert max(np.abs(reference - t).min() for t in nodes) < 1e-8 * scale  # every node is an eigenvalue
    assert nodes.max() == pytest.approx(reference.max(), rel=1e-9)
    assert nodes.min() == pytest.approx(reference.min(), rel=1e-9)
    assert sum(result["weights"][0]) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------- adapter coordinates


def _peft_folder(tmp_path, model, config, randomise):
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if randomise(name):
                p.normal_(0, 0.3)  # away from the zero initialisation, where B's block would vanish
    peft_model.save_pretrained(tmp_path)
    return peft_model


def test_lora_adapter_coordinates_equal_the_hessian_of_the_factors(tiny, tmp_path):
    from peft import LoraConfig

    model, eval_set, _, _ = tiny
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["l1"], modules_to_save=["task_head"], lora_dropout=0.0)
    trained = _peft_folder(tmp_path, model, config, lambda n: "lora_" in n)
    solution = Solution(path=tmp_path, info={"method": "lora"}, metrics={}, base=model)
    loaded, names = curvature.adapter_coordinates(solution)
    assert sorted(n.split(".")[-3] for n in names if "lora_" in n) == ["lora_A", "lora_B"]
    assert sum("modules_to_save" in n for n in names) == 2  # the head's weight and bias
    op = curvature.HessianOperator(loaded, names, eval_set, CE, "float64")
    trained_params = dict(trained.named_parameters())
    x = torch.cat([b[0]["x"] for b in eval_set.batches]).double()
    y = torch.cat([b[1] for b in eval_set.batches])
    w1, b1 = (model.l1.weight.detach().double(), model.l1.bias.detach().double())
    shapes = [trained_params[n].shape for n in names]
    flat = torch.cat([trained_params[n].detach().double().reshape(-1) for n in names])

    def closed_form(w: torch.Tensor) -> torch.Tensor:  # W1 + (alpha / r)·B·A, then tanh, then the head
        p = dict(zip(names, (t.view(s) for t, s in zip(w.split([s.numel() for s in shapes]), shapes, strict=True)),
                     strict=True))  # fmt: skip
        a, b = (p[next(n for n in names if k in n)] for k in ("lora_A", "lora_B"))
        hw, hb = (p[next(n for n in names if n.endswith(f"modules_to_save.default.{k}"))] for k in ("weight", "bias"))
        hidden = torch.tanh(x @ (w1 + 2.0 * b @ a).T + b1)
        return F.cross_entropy(hidden @ hw.T + hb, y)

    reference = torch.autograd.functional.hessian(closed_form, flat).numpy()
    np.testing.assert_allclose(dense(op), reference, rtol=1e-9, atol=1e-12 * np.abs(reference).max())
    assert op.loss == pytest.approx(float(closed_form(flat)), rel=1e-12)


def test_randlora_adapter_hvp_equals_double_backward_through_peft(tiny, tmp_path):
    """The plain product swapped in for peft's UniqueBaseGrad gives the Hessian peft's own backward does."""
    from peft import RandLoraConfig

    model, eval_set, _, _ = tiny
    config = RandLoraConfig(r=4, target_modules=["l1"], modules_to_save=["task_head"], projection_prng_key=7,
                            randlora_dropout=0.0)  # fmt: skip
    _peft_folder(tmp_path, model, config, lambda n: "randlora_" in n)
    solution = Solution(path=tmp_path, info={"method": "randlora"}, metrics={}, base=model)
    loaded, names = curvature.adapter_coordinates(solution, head=False)
    assert sorted({n.split(".")[-2] for n in names}) == ["randlora_gamma", "randlora_lambda"]
    reference_model = copy.deepcopy(loaded).double()
    op = curvature.HessianOperator(loaded, names, eval_set, CE, "float64", mode="forward-over-reverse")
    v = np.random.default_rng(2).standard_normal(op.dim)
    hv = op.matvec(v)
    assert op.mode == "forward-over-reverse" and op.note is None
    params = dict(reference_model.named_parameters())
    ps = [params[n] for n in names]
    vs = [t.view(p.shape) for t, p in zip(torch.from_numpy(v).split([p.numel() for p in ps]), ps, strict=True)]
    reference_model.requires_grad_(False)
    for p in ps:
        p.requires_grad_(True)
    loss = sum(F.cross_entropy(reference_model(**inputs), target, reduction="sum") for inputs, target in
               ((({"x": i["x"].double()}), t) for i, t in eval_set.batches)) / eval_set.n  # fmt: skip
    grads = torch.autograd.grad(loss, ps, create_graph=True)  # through peft's UniqueBaseGrad.backward
    dot = sum((g * w).sum() for g, w in zip(grads, vs, strict=True))
    reference = torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, ps)])
    np.testing.assert_allclose(hv, reference.numpy(), rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    from peft.tuners.randlora import layer

    assert layer.UniqueBaseGrad is not hessian._PlainUniqueBaseGrad  # put back after the computation


def test_settings_are_checked():
    for bad in ({"top_k": 0}, {"tol": 0.0}, {"tol": float("nan")}, {"slq_steps": 1}, {"coordinates": ("hessian",)},
                {"weight_set": "all"}, {"trace_probes": -1}, {"hvp_batch": 0}):  # fmt: skip
        with pytest.raises(UserError) as e:
            curvature.CurvatureSettings(**bad).check()
        assert "\n" not in str(e.value) and ":" in str(e.value)
    curvature.CurvatureSettings().check()
    # --hvp-batch splits the products' passes (same sums): not part of an entry's reuse key
    split = curvature.CurvatureSettings(hvp_batch=2)
    split.check()
    assert split.key() == curvature.CurvatureSettings().key()
    args = curvature.build_parser().parse_args(["--run", "r", "--hvp-batch", "3"])
    assert curvature.settings_from(args).hvp_batch == 3


def _synthetic_solutions(model, scale=0.2):
    """ft changes every parameter, lora/randlora l1.weight and the head (ΔW given, no folders)."""
    return synthetic_solutions(model, ["l1.weight", "task_head.weight", "task_head.bias"], scale, 5, named=False)


def test_stage_saves_each_entry_and_resumes(tiny, tmp_path):
    from types import SimpleNamespace

    model, eval_set, names, _ = tiny
    source = SimpleNamespace(task=SimpleNamespace(base=model, entry=SimpleNamespace(targets=("l1",)), objective=CE))
    solutions = _synthetic_solutions(model)
    assert curvature.weight_names(model, ("l1",), "adapted", solutions, True) == [
        "l1.weight", "task_head.weight", "task_head.bias"]  # fmt: skip
    assert curvature.weight_names(model, ("l1",), "plane", solutions, False) == ["l1.weight", "l1.bias"]
    settings = curvature.CurvatureSettings(top_k=3, trace_probes=4, slq_probes=1, slq_steps=5, coordinates=("weights",))
    first = curvature.curvature_stage(source, solutions, eval_set, tmp_path, settings, progress=False)
    on_disk = json.loads((tmp_path / "curvature.json").read_text())
    assert on_disk["complete"] and (tmp_path / "curvature.png").exists() and (tmp_path / "curvature.pdf").exists()
    x, y = (torch.cat([b[0]["x"] for b in eval_set.batches]), torch.cat([b[1] for b in eval_set.batches]))
    loss = lambda m, p: F.cross_entropy(torch.func.functional_call(m, p, (x.double(),)), y)  # noqa: E731
    chosen = ["l1.weight", "task_head.weight", "task_head.bias"]
    for name, solution in solutions.items():  # each entry is the Hessian at θ = W0 + ΔW in the chosen weights
        entry = on_disk["solutions"][name]["weights"]
        exact = exact_hessian(solution.model(), chosen, loss)
        np.testing.assert_allclose(entry["eigenvalues"], np.linalg.eigvalsh(exact)[::-1][:3], rtol=1e-4)
        assert entry["dim"] == exact.shape[0] and entry["hvps"] == entry["eigen"]["hvps"] + 4 + 5
    # killed after the first entry (the file is written atomically after each one): resume reuses it
    partial = {**on_disk, "complete": False, "solutions": {"ft": on_disk["solutions"]["ft"]}}
    (tmp_path / "curvature.json").write_text(json.dumps(partial))
    again = curvature.curvature_stage(source, solutions, eval_set, tmp_path, settings, progress=False)
    assert again["solutions"]["ft"]["weights"]["reused"] and again["complete"]
    for name in ("lora", "randlora"):
        a, b = first["solutions"][name]["weights"], again["solutions"][name]["weights"]
        assert "reused" not in b and b["eigenvalues"] == a["eigenvalues"] and b["trace"] == a["trace"]
    # a solution trained again (another ΔW): its entry is computed again, the others reused
    moved = dict(solutions, lora=_synthetic_solutions(model, scale=0.3)["lora"])
    last = curvature.curvature_stage(source, moved, eval_set, tmp_path, settings, progress=False)
    assert last["solutions"]["ft"]["weights"]["reused"] and last["solutions"]["randlora"]["weights"]["reused"]
    assert "reused" not in last["solutions"]["lora"]["weights"]
    assert last["solutions"]["lora"]["weights"]["eigenvalues"] != first["solutions"]["lora"]["weights"]["eigenvalues"]


# --------------------------------------------------------------------------- the command on a run


FAST = ["--top-k", "2", "--trace-probes", "3", "--slq-probes", "1", "--slq-steps", "4", "--no-progress"]


@pytest.fixture
def run_dir(tiny_wordnet_run):
    """The session's finished tiny run (tests/conftest.py); the tests write elsewhere or into a copy."""
    return tiny_wordnet_run


def test_command_on_a_run_writes_curvature(run_dir, tmp_path):
    out = tmp_path / "c"
    assert curvature.main(["--run", str(run_dir), "--out", str(out), *FAST]) == 0
    assert (out / "curvature.png").stat().st_size > 0 and (out / "curvature.pdf").stat().st_size > 0
    result = json.loads((out / "curvature.json").read_text())
    assert result["complete"] and result["seed"] == 0 and result["settings"]["top_k"] == 2
    run = json.loads((run_dir / "landscape.json").read_text())
    for name in ("ft", "lora", "randlora"):
        weights = result["solutions"][name]["weights"]
        eig = weights["eigenvalues"]
        assert len(eig) == 2 and eig[0] >= eig[1] and weights["hvps"] == weights["eigen"]["hvps"] + 3 + 4
        assert weights["trace_se"] > 0 and len(weights["density"]["grid"]) == len(weights["density"]["values"])
        # the objective and the samples are the plane's: the loss at the point is the run's vertex loss
        assert weights["loss"] == pytest.approx(run["solutions"][name]["vertex_loss"], rel=1e-5)
        if name == "ft":
            assert "skipped" in result["solutions"][name]["adapter"]
        else:  # the peft model (adapter coordinates) and the merged weights are the same point
            adapter = result["solutions"][name]["adapter"]
            assert adapter["loss"] == pytest.approx(weights["loss"], rel=1e-5) and adapter["dim"] < weights["dim"]
            assert adapter["hvp_mode"] == "reverse-over-forward"  # RandLoRA's too: its factored product


def test_connectivity_curvature_stage_equals_the_command(
    run_dir, wordnet_root, tmp_path, monkeypatch, no_figure_drawing
):
    """``--curvature`` on the connectivity run: curvature.json and figure in the run folder, the headline in
    landscape.json, the same numbers as ``python -m landscape.curvature`` on that run (same objective,
    samples and seed), and a rerun reuses every entry. (The stage's settings are the command's defaults;
    fewer probes here, the same on both sides, to keep the test short.)"""
    import functools
    import shutil

    from landscape import connectivity

    few = {"top_k": 2, "trace_probes": 3, "slq_probes": 1, "slq_steps": 4}
    monkeypatch.setattr(curvature, "CurvatureSettings", functools.partial(curvature.CurvatureSettings, **few))

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN, "--curvature"]
    assert connectivity.main(argv) == 0
    staged = json.loads((out / "curvature.json").read_text())
    meta = json.loads((out / "landscape.json").read_text())
    assert staged["complete"] and staged["seed"] == meta["seed"] and (out / "curvature.png").exists()
    assert "curvature" in meta["wall_time_s"] and "train_ft" in meta["reused_stages"]  # solutions reused
    for name in ("ft", "lora", "randlora"):
        for coordinates, entry in staged["solutions"][name].items():
            assert meta["curvature"][name][coordinates].get("eigenvalues") == entry.get("eigenvalues")
    assert "skipped" in meta["curvature"]["ft"]["adapter"]
    command = tmp_path / "command"
    assert curvature.main(["--run", str(out), "--out", str(command), "--solutions", "randlora", "--coordinates",
                           "adapter", *FAST]) == 0  # fmt: skip
    alone = json.loads((command / "curvature.json").read_text())["solutions"]["randlora"]["adapter"]
    entry = staged["solutions"]["randlora"]["adapter"]
    np.testing.assert_allclose(alone["eigenvalues"], entry["eigenvalues"], rtol=1e-9)
    assert alone["trace"] == pytest.approx(entry["trace"], rel=1e-9) and alone["loss"] == entry["loss"]
    assert connectivity.main(argv) == 0
    again = json.loads((out / "curvature.json").read_text())
    assert all(e.get("reused") for per in again["solutions"].values() for e in per.values() if "key" in e)


def test_command_bad_input_exits_2_with_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [
        (["--run", str(tmp_path / "nope")], "does not exist"),
        (["--run", str(run_dir), "--top-k", "0"], "--top-k"),
        (["--run", str(run_dir), "--tol", "2"], "--tol"),
        (["--run", str(run_dir), "--coordinates", "hessian"], "--coordinates"),
        (["--run", str(run_dir), "--slq-steps", "1"], "--slq-steps"),
        (["--run", str(run_dir), "--trace-probes", "-1"], "--trace-probes"),
        (["--run", str(run_dir), "--solutions", "ft", "--coordinates", "adapter"], "nothing to measure"),
    ]
    assert_refused(curvature.main, cases, out, capsys)


def test_benchmark_packs_dict_inputs_for_pyhessian(tiny_entry):
    """PyHessian calls model(tensor): the benchmark's wrapper gives the model's outputs on the dict batch."""
    from experiments.benchmarks.curvature import PackedInputs

    torch.manual_seed(0)
    model = tiny_entry.build(3).eval()
    nn.init.normal_(model.task_head.weight)  # the head starts at zero: outputs would be 0 whatever the inputs
    inputs = tiny_entry.encode(["a short gloss", "a somewhat longer gloss of a noun"]).batch(torch.arange(2))
    wrapped = PackedInputs(model, list(inputs))
    packed = PackedInputs.pack(inputs)
    assert packed.shape[0] == 2  # PyHessian weights each batch by inputs.size(0)
    with torch.no_grad():
        expected = model(**inputs)
        torch.testing.assert_close(wrapped(packed), expected, rtol=0, atol=0)
        assert not torch.allclose(expected[0], expected[1])


class TinyConvNet(nn.Module):
    """1×1 convolutions (the layers the toolkit's own RandLoRA wraps, as in EfficientNet) and a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.task_head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["reverse-over-forward", "forward-over-reverse"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hvps_through_the_toolkits_conv_randlora_repeat(dtype, mode):
    """The toolkit's RandLoRA convolution caches its base slices (adapters.methods.randlora.SharedBases): a
    slice made inside a torch.func transform must not be cached, or the next HVP gets a tensor bound to a
    finished transform. Three HVPs with forward mode in λ/γ coordinates equal double backward."""
    from adapters.methods import MethodSpec, attach

    torch.manual_seed(0)
    model = attach(TinyConvNet(), MethodSpec("randlora", rank=2), ("conv",))
    with torch.no_grad():  # away from peft's zero init
        for name, p in model.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                p.normal_().div_(4)
    names = [n for n, p in model.named_parameters() if "randlora_lambda" in n or "randlora_gamma" in n]
    assert names
    x, y = torch.randn(12, 3, 4, 4), torch.randint(0, 4, (12,))
    eval_set = EvalSet([({"x": x}, y)], 12)
    forward = operator(model, names, eval_set, dtype, mode=mode)
    double = operator(model, names, eval_set, dtype, mode="reverse-over-reverse")
    rng = np.random.default_rng(2)
    for _ in range(3):
        v = rng.standard_normal(forward.dim)
        expected = double.matvec(v)
        np.testing.assert_allclose(forward.matvec(v), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert forward.mode == mode and forward.hvps == 3


def test_hvps_score_only_the_gold_continuation():
    """A causal LM's answer loss: the operator runs the gold candidate alone (gold_only, the default) and its
    products equal those of the full-candidate loss (which reads only the gold answers) to fp64 rounding,
    while the backbone sees one sequence per sample instead of one per candidate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.models.hf import CausalLMScorer
    from adapters.objectives import AnswerLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    model = CausalLMScorer(LlamaForCausalLM(config))
    batches = []
    for b in range(2):  # (B=3 samples, C=4 candidates, T=8) with answers at the last 2-3 positions
        ids = torch.randint(3, 50, (3, 4, 8))
        mask = torch.ones_like(ids)
        answer = torch.zeros_like(ids)
        answer[..., 5 + b :] = 1
        batches.append(({"input_ids": ids, "attention_mask": mask, "answer_mask": answer}, torch.tensor([0, 3, 1])))
    eval_set = EvalSet(batches, 6)
    names = ["backbone.model.layers.0.mlp.down_proj.weight", "backbone.model.layers.0.self_attn.q_proj.weight"]
    rows = []
    model.backbone.model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                                   with_kwargs=True)  # fmt: skip
    ops = {gold: curvature.HessianOperator(copy.deepcopy(model), names, eval_set, AnswerLoss(), "float64",
                                           gold_only=gold) for gold in (True, False)}  # fmt: skip
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(ops[True].dim))
    products = {}
    for gold, op in ops.items():
        rows.clear()
        products[gold] = op.flat_hvp(v)
        assert sum(rows) == (6 if gold else 24)  # one sequence per sample, not C = 4
    torch.testing.assert_close(products[True], products[False], rtol=1e-10, atol=1e-12)
    assert ops[True].loss == pytest.approx(ops[False].loss, rel=1e-12)


def test_pieces_run_without_their_trailing_padding():
    """A causal LM's micro-batch runs only up to its longest real sequence (its trailing columns of padding cut):
    the backbone sees each piece's own length, and the products and loss equal the double backward (torch's
    ``autograd.functional.hvp``) of the untrimmed batch's answer loss (fp64, its cross-entropy in fp32 on both
    sides: to fp32 rounding; cutting a real token moves them by 1e-2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.models.hf import CausalLMScorer
    from adapters.objectives import AnswerLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    model = CausalLMScorer(LlamaForCausalLM(config)).double().eval()
    lengths = torch.tensor([5, 6, 6, 9, 10, 12])  # right-padded to 14: the last 2 columns are padding everywhere
    ids = torch.randint(3, 50, (6, 2, 14))
    mask = (torch.arange(14) < lengths[:, None, None]).long().expand(6, 2, 14).clone()
    answer = ((torch.arange(14) >= lengths[:, None, None] - 2) & (mask == 1)).long()
    inputs, target = {"input_ids": ids, "attention_mask": mask, "answer_mask": answer}, torch.tensor([0, 1, 1, 0, 1, 0])
    names = ["backbone.model.layers.0.mlp.down_proj.weight", "backbone.model.layers.0.self_attn.v_proj.weight"]
    seen = []
    model.backbone.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[-1]),
                                                   with_kwargs=True)  # fmt: skip
    op = curvature.HessianOperator(copy.deepcopy(model), names, EvalSet([(inputs, target)], 6), AnswerLoss(),
                                   "float64", micro_batch=2)  # fmt: skip
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(op.dim))
    product = op.flat_hvp(v)
    assert seen == [6, 9, 12]  # pieces (5, 6), (6, 9), (10, 12): each its own longest, none the batch's 14

    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def loss(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat, strict=True)), args=(), kwargs=inputs)
        return AnswerLoss().loss(out, target, reduction="sum") / 6

    parts = [p.reshape(s) for p, s in zip(v.split([params[n].numel() for n in names]), shapes, strict=True)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        value, reference = torch.autograd.functional.hvp(loss, tuple(params[n].detach() for n in names), tuple(parts))
    torch.testing.assert_close(product, torch.cat([r.reshape(-1) for r in reference]), rtol=1e-5, atol=1e-7)
    assert op.loss == pytest.approx(float(value), rel=1e-6)
