"""Every analysis on a 4-bit (bitsandbytes NF4) base with its weights kept packed, on CPU.

A tiny random Llama loaded with ``--load-4bit`` (fp32 compute); LoRA and RandLoRA trained on it (QLoRA), and an
FT checkpoint brought as a dense direction. Each test checks against a reference independent of the plane code:

- the plane's vertices equal each solution's own evaluation: peft's own model with the adapter attached to the
  packed base, the FT model as a plain fp32 model, the base model itself (the third vertex without FT), on the
  same batches, to 1e-4; an inner point equals a dense fp32 model holding bitsandbytes' dequantised W0 plus the
  paper chart's combination of the solutions' ΔW, written in by the test;
- the packed codes are byte-identical after the plane, the paths, the random chart and curvature;
- the per-point cache gives bit-identical results with and without it, and builds each adapter product once per
  point (calls counted on the updates themselves), not once per batch;
- curvature in adapter coordinates through the packed layers (double backward) equals torch.func's
  forward-over-reverse HVP on the dense dequantised model with the same adapter;
- the whole commonsense pipeline (``--load-4bit``: train LoRA + RandLoRA, plane, grid, paths, spectrum,
  curvature top-1 in adapter coordinates, render) runs end to end (what CI runs).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm

bnb = pytest.importorskip("bitsandbytes")
TOL = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=24, n_test=2)


def _argv(llama: Path, data_root: Path, out: Path, *flags: str) -> list[str]:
    return ["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root), "--out", str(out),
            "--no-progress", "--device", "cpu", "--eval-samples", "12", "--load-4bit", *flags]  # fmt: skip


@pytest.fixture(scope="module")
def run4(llama, data_root, tmp_path_factory):
    """(loaded, solutions with an FT checkpoint added, an evaluation set of several batches)."""
    from adapters.data import eval_subset
    from adapters.solution import load_solution
    from landscape.cli import Stages
    from landscape.config import from_argv
    from landscape.engine.grid import EvalSet
    from landscape.run import load, train_solutions

    out = tmp_path_factory.mktemp("run4")
    loaded = load(from_argv(_argv(llama, data_root, out, "--train-steps", "3")))
    solutions = train_solutions(loaded, torch.device("cpu"), Stages(quiet=True))
    solutions["ft"] = load_solution(_ft_checkpoint(llama, out / "ft"), loaded.task.base, "ft", loaded.model_name)
    task = loaded.task
    subset = eval_subset(task.dataset.test, 12, 0)
    evals = EvalSet.prepare(task.entry.encode(subset.inputs), subset.labels, 4, "cpu")
    assert len(evals.batches) >= 2  # several batches: the per-point cache is reused across them
    return loaded, solutions, evals


def _ft_checkpoint(llama: Path, folder: Path) -> Path:
    """A fine-tuned model: every weight of the fp32 model moved a little, saved as a checkpoint."""
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in ft.parameters():
            p.add_(torch.randn_like(p), alpha=3e-2)
    ft.save_pretrained(folder)
    return folder


def _packed_bytes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _same_bytes(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = _packed_bytes(model)
    return set(now) == set(before) and all(torch.equal(now[n], before[n]) for n in before)


def _loss(forward, evals, objective) -> float:
    from adapters.objectives import score

    with torch.no_grad():
        return score(forward, evals.batches, evals.n, objective)[0].loss


def _dense(llama: Path, base4: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The fp32 scorer of ``llama`` with bitsandbytes' dequantised weights in place of the packed ones, then
    ``weights`` (name: tensor) written over it."""
    from adapters.models import build_base

    dense = build_base(f"hf:{llama}", ["x"], {"torch_dtype": "float32", "load_4bit": False, "cutoff_len": 256},
                       modality="lm")  # fmt: skip
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, module in base4.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = module.weight
                params[f"{name}.weight"].copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
        for name, w in (weights or {}).items():
            params[name].copy_(w)
    return dense.eval()


# --------------------------------------------------------------------------- the plane's vertices


@pytest.mark.parametrize("third", ["ft", "base"])
def test_plane_vertices_equal_each_solutions_own_evaluation(llama, run4, third):
    from adapters.deltas import load_adapter
    from adapters.solution import base_solution
    from landscape.engine import factored

    loaded, solutions, evals = run4
    base4, objective = loaded.task.base, loaded.task.objective
    before = _packed_bytes(base4)
    chosen = {s: solutions[s] for s in ("lora", "randlora")}
    chosen[third] = solutions["ft"] if third == "ft" else base_solution(base4, loaded.model_name)
    chart = factored.build_chart("paper", base4, {s: sol.module_deltas(check=False) for s, sol in chosen.items()})
    assert set(chart.vertices) == {third, "lora", "randlora"}
    assert set(chart.info["distances"]) == {f"{third}-lora", f"{third}-randlora", "lora-randlora"}
    with factored.FactoredEvaluator(base4, chart, evals, "cpu", objective=objective) as evaluator:
        at = {s: evaluator.evaluate(*chart.vertices[s]).loss for s in chart.vertices}
        inner = evaluator.evaluate(0.3, 0.4).loss
    for s in ("lora", "randlora"):  # peft's own model: the adapter attached to the packed base
        peft_model = load_adapter(Path(solutions[s].path), copy.deepcopy(base4)).eval()
        assert abs(at[s] - _loss(lambda i, m=peft_model: m(**i), evals, objective)) <= TOL
    if third == "ft":  # the FT model itself: a plain fp32 model with θ_FT
        from safetensors.torch import load_file

        theta = {
            f"backbone.{n}": t for n, t in load_file(str(Path(solutions["ft"].path) / "model.safetensors")).items()
        }
        ft_model = _dense(llama, base4, {n: t for n, t in theta.items() if n in dict(base4.named_parameters())})
        assert abs(at["ft"] - _loss(lambda i: ft_model(**i), evals, objective)) <= TOL
    else:  # the base model as loaded
        assert abs(at["base"] - _loss(lambda i: base4.eval()(**i), evals, objective)) <= TOL
    # an inner point: W0 (dequantised) + Σ c_s·ΔW_s written into a dense fp32 model, paper coefficients by hand
    x, y = 0.3, 0.4
    coef = {third: y, "lora": x - y / 2, "randlora": 1 - x - y / 2}
    w0 = {n: (bnb.functional.dequantize_4bit(p.data, p.quant_state) if getattr(p, "quant_state", None) is not None
              else p.detach()).float() for n, p in base4.named_parameters()}  # fmt: skip
    point = {}
    for s, sol in chosen.items():
        for n, d in sol.delta().items():
            point[n] = point.get(n, w0[n]) + coef[s] * d
    reference = _dense(llama, base4, point)
    assert abs(inner - _loss(lambda i: reference(**i), evals, objective)) <= TOL
    assert _same_bytes(base4, before)


def test_plane_storage_dense_is_refused_on_a_4bit_base(llama, data_root, tmp_path):
    from adapters.errors import UserError
    from landscape.config import from_argv

    with pytest.raises(UserError, match="--plane-storage dense") as err:
        from_argv(_argv(llama, data_root, tmp_path, "--plane-storage", "dense"))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the per-point cache


class _Counted:
    """A lazy ΔW that counts how often it is built (``__call__`` or ``add_to``)."""

    def __init__(self, delta, counts: dict, key: str):
        self.delta, self.counts, self.key, self.kind = delta, counts, key, "factored"

    def __call__(self):
        self.counts[self.key] = self.counts.get(self.key, 0) + 1
        return self.delta()

    def add_to(self, out, alpha):
        self.counts[self.key] = self.counts.get(self.key, 0) + 1
        return self.delta.add_to(out, alpha)


def test_per_point_cache_builds_each_product_once_per_point_with_identical_results(run4):
    from adapters.solution import base_solution
    from landscape.engine import factored

    loaded, solutions, evals = run4
    base4 = loaded.task.base
    deltas = {s: solutions[s].module_deltas(check=False) for s in ("lora", "randlora")}
    deltas["base"] = base_solution(base4).module_deltas()
    points = [(0.25, 0.5), (1.0, 0.0), (-0.5, 1.5)]
    results, counts = {}, {}
    for limit in (1 << 30, 0):
        chart = factored.build_chart("paper", base4, deltas, geometry=False)
        lazy = 0
        for s, per in chart.deltas.items():
            for n, d in per.items():
                if not isinstance(d, torch.Tensor):
                    per[n] = _Counted(d, counts.setdefault(limit, {}), f"{s}/{n}")
                    lazy += 1
        assert lazy == 2 * 10  # LoRA's and RandLoRA's 10 adapted weights
        # how often each adapted module runs per point: once per batch, or more where the scorer splits a batch
        # (a prompt's forward, then its answers continued from its cache); counted on one adapted layer
        forwards, calls = [], []
        layer = next(m for n, m in base4.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        with factored.FactoredEvaluator(
            base4, chart, evals, "cpu", objective=loaded.task.objective, cache_bytes=limit
        ) as evaluator:
            hook = layer.register_forward_pre_hook(lambda m, a, c=calls: c.append(1))
            results[limit] = []
            for x, y in points:
                calls.clear()
                results[limit].append(evaluator.evaluate(x, y))
                forwards.append(len(calls))
            hook.remove()
            info = evaluator.cache_info()
        assert min(forwards) >= len(evals.batches) >= 2
        active = [10 * sum(1 for s, c in chart.coefficients(x, y).items() if c != 0 and s != "base") for x, y in points]
        built = sum(counts[limit].values())  # the adapters' products actually computed
        assert built == (sum(active) if limit else sum(a * f for a, f in zip(active, forwards, strict=True))), built
        assert info["builds"] == (10 * len(points) if limit else 10 * sum(forwards))  # cached: once per module
        assert info["hits"] == (10 * sum(f - 1 for f in forwards) if limit else 0)
    for with_cache, without in zip(results[1 << 30], results[0], strict=True):
        assert with_cache.loss == without.loss and with_cache.accuracy == without.accuracy  # bit-identical


# --------------------------------------------------------------------------- random chart, paths, curvature


def test_random_chart_and_paths_keep_the_base_packed(llama, data_root, run4, tmp_path):
    from adapters.deltas import load_adapter
    from landscape import build, paths
    from landscape.config import from_argv

    loaded, solutions, evals = run4
    base4, objective = loaded.task.base, loaded.task.objective
    before = _packed_bytes(base4)
    config = from_argv(_argv(llama, data_root, tmp_path, "--chart", "random", "--center", "lora"))
    chart, evaluator = build.random_evaluator(config, solutions["lora"], "lora", evals, "cpu", "float32",
                                                  objective)  # fmt: skip
    centre, moved = evaluator.evaluate(0.0, 0.0).loss, evaluator.evaluate(1.0, -1.0).loss
    evaluator.close()
    peft_model = load_adapter(Path(solutions["lora"].path), copy.deepcopy(base4)).eval()
    assert abs(centre - _loss(lambda i: peft_model(**i), evals, objective)) <= TOL
    # the directions span the packed layers too (filter-normalised against their dequantised weights)
    packed = {f"{n}.weight" for n in before}
    assert packed <= {n for n, d in chart.deltas["u"].items() if d.any()} and moved != centre
    result = paths.compute_paths(base4, {s: solutions[s] for s in ("lora", "randlora", "ft")}, evals, "cpu", 3,
                                 progress=False, objective=objective)  # fmt: skip
    assert result["storage"] == "factored" and np.isfinite(result["loss"]).all()
    assert abs(result["loss"][2, 0] - _loss(lambda i: peft_model(**i), evals, objective)) <= TOL  # lora at t = 0
    assert _same_bytes(base4, before)


def test_curvature_in_adapter_coordinates_through_the_packed_layers(llama, run4):
    from landscape import curvature

    loaded, solutions, evals = run4
    base4 = loaded.task.base
    before = _packed_bytes(base4)
    for method in ("lora", "randlora"):
        model, names = curvature.adapter_coordinates(solutions[method])
        op = curvature.HessianOperator(model, names, evals, loaded.task.objective, mode="reverse-over-reverse")
        dense_solution = dataclasses.replace(solutions[method], base=_dense(llama, base4))
        ref_model, ref_names = curvature.adapter_coordinates(dense_solution)
        assert ref_names == names
        ref = curvature.HessianOperator(ref_model, names, evals, loaded.task.objective, mode="forward-over-reverse")
        g = torch.Generator().manual_seed(0)
        v = {n: torch.randn(p.shape, generator=g) for n, p in op.params.items()}
        hv, ref_hv = op.hvp(v), ref.hvp(v)
        assert ref.mode == "forward-over-reverse"
        scale = max(t.abs().max().item() for t in ref_hv.values())
        for n in names:
            torch.testing.assert_close(hv[n], ref_hv[n], rtol=1e-4, atol=1e-5 * scale)
    assert _same_bytes(base4, before)


# --------------------------------------------------------------------------- the whole pipeline


def test_commonsense_pipeline_on_a_4bit_base_end_to_end(llama, data_root, tmp_path, monkeypatch, capsys):
    from landscape import connectivity, curvature
    from landscape.run import load

    kept = {}

    def load_and_note(config):
        loaded = load(config)
        kept["base"], kept["bytes"] = loaded.task.base, _packed_bytes(loaded.task.base)
        return loaded

    monkeypatch.setattr(connectivity, "load", load_and_note)
    monkeypatch.setattr(curvature, "CurvatureSettings", functools.partial(
        curvature.CurvatureSettings, top_k=1, trace_probes=0, slq_probes=0, lanczos_vectors=8))  # fmt: skip
    out = tmp_path / "out"
    code = connectivity.main(_argv(llama, data_root, out, "--train-steps", "2", "--grid", "3", "--path-points", "3",
                                   "--curvature"))  # fmt: skip
    said = capsys.readouterr()
    assert code == 0, said.err
    assert "methods: lora randlora (--load-4bit" in said.out + said.err
    land = np.load(out / "landscape.npz")
    assert sorted(land["point_names"]) == ["base", "lora", "randlora"]
    assert land["loss"].shape == (3, 3) and np.isfinite(land["loss"]).all()
    assert list(json.loads((out / "paths.json").read_text())["pairs"]) == [
        "base-lora",
        "base-randlora",
        "lora-randlora",
    ]
    curv = json.loads((out / "curvature.json").read_text())["solutions"]
    for method in ("lora", "randlora"):
        assert len(curv[method]["adapter"]["eigenvalues"]) == 1
        assert "4 bits" in curv[method]["weights"]["skipped"]
    for name in ("spectrum.json", "landscape.png", "landscape.html", "paths.png", "curvature.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "solutions" / "ft").exists()
    assert _same_bytes(kept["base"], kept["bytes"])


# --------------------------------------------------------------------------- curves


def test_offset_curve_on_the_packed_base_matches_the_dense_dequantised_curve(llama, run4):
    from adapters.deltas import load_adapter
    from landscape import curves

    loaded, solutions, evals = run4
    base4, objective = loaded.task.base, loaded.task.objective
    before = _packed_bytes(base4)
    deltas = {s: solutions[s].delta() for s in ("lora", "randlora")}
    names = sorted(set(deltas["lora"]) | set(deltas["randlora"]))
    ends = [{n: deltas[s].get(n, torch.zeros_like(deltas["lora"][n])) for n in names} for s in ("lora", "randlora")]
    curve = curves.Curve(ends[0], ends[1], bends=1, offset=True)
    dense = _dense(llama, base4)
    w0 = dict(dense.named_parameters())
    thetas = [{n: w0[n].detach() + e[n] for n in names} for e in ends]
    reference = curves.Curve(thetas[0], thetas[1], bends=1)  # the same curve in full weights, on a dense model
    inputs, _ = evals.batches[0]
    for c, model in ((curve, copy.deepcopy(base4)), (reference, dense)):
        wrapper = curves.CurveModel(c, model, grad_accum=1 << 30)
        wrapper.calls, wrapper.t = 1, 0.3  # no new draw of t: the same point on both
        wrapper(**inputs).float().logsumexp(-1).sum().backward()
        wrapper.close()
    torch.testing.assert_close(curve.bends_grad(), reference.bends_grad(), rtol=1e-4, atol=1e-6)
    result = curves.evaluate_curve(curve, base4, evals, "cpu", points=3, objective=objective, progress=False)
    peft_model = load_adapter(Path(solutions["lora"].path), copy.deepcopy(base4)).eval()
    lora = _loss(lambda i: peft_model(**i), evals, objective)
    assert abs(result["loss"][0, 0] - lora) <= TOL and abs(result["loss"][1, 0] - lora) <= TOL  # t = 0: LoRA
    assert _same_bytes(base4, before)


def test_commands_on_a_4bit_run_use_the_base_vertex(llama, data_root, tmp_path, capsys):
    """paths, curves and curvature reopen a --load-4bit run (no FT): the base model is the third vertex."""
    from landscape import connectivity, curvature, curves, paths

    out = tmp_path / "run"
    assert (
        connectivity.main(_argv(llama, data_root, out, "--train-steps", "1", "--grid", "2", "--path-points", "2")) == 0
    )
    recorded = np.load(out / "paths.npz")["loss"]
    capsys.readouterr()
    assert (
        paths.main(
            ["--run", str(out), "--points", "2", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "p")]
        )
        == 0
    )
    said = capsys.readouterr()
    assert "warning" not in said.err and "base-lora" in said.out  # the endpoints' losses are the run's vertices
    np.testing.assert_allclose(np.load(tmp_path / "p" / "paths.npz")["loss"], recorded, rtol=0, atol=1e-6)
    assert curves.main(["--run", str(out), "--pair", "base,randlora", "--bends", "1", "--steps", "2", "--points", "3",
                        "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    curve = json.loads((out / "curves" / "base-randlora.json").read_text())
    assert curve["curve"]["loss_t0"] == pytest.approx(recorded[1, 0], abs=1e-5)  # t = 0: the base model
    assert curve["curve"]["loss_t1"] == pytest.approx(recorded[1, -1], abs=1e-5)  # t = 1: RandLoRA
    assert curvature.main(["--run", str(out), "--top-k", "1", "--trace-probes", "0", "--slq-probes", "0",
                           "--no-progress", "--device", "cpu", "--coordinates", "adapter"]) == 0  # fmt: skip
    assert set(json.loads((out / "curvature.json").read_text())["solutions"]) == {"lora", "randlora"}


@pytest.mark.parametrize("name", ["paper", "orthonormal"])
def test_base_vertex_dense_and_factored_charts_agree(name):
    """Without FT the base model (ΔW = 0) is the third vertex: the dense chart (plane.py, updates written into
    θ) and the factored one give the same vertices and geometry, named "base"."""
    from landscape.engine import factored, plane

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    params = dict(model.named_parameters())
    deltas = {s: {n: torch.randn_like(p) * 0.1 for n, p in params.items() if n.endswith("weight")}
              for s in ("lora", "randlora")}  # fmt: skip
    thetas = plane.solution_weights(params, {"ft": {}, **deltas})
    dense = plane.with_third(plane.build_chart(name, thetas), "base")
    fact = factored.build_chart(name, model, {"base": {}, **deltas})
    assert set(dense.vertices) == set(fact.vertices) == {"base", "lora", "randlora"}
    for s in dense.vertices:
        np.testing.assert_allclose(dense.vertices[s], fact.vertices[s], rtol=1e-6, atol=1e-9)
    for key in ("distances", "triangle_angles_deg"):
        assert set(dense.info[key]) == set(fact.info[key])
        for k in dense.info[key]:
            assert dense.info[key][k] == pytest.approx(fact.info[key][k], rel=1e-6)
    assert set(dense.info["distances"]) == {"base-lora", "base-randlora", "lora-randlora"}
    for s in ("base", "lora", "randlora"):  # the factored chart's point at each vertex is that solution
        at = fact.weights_at(*fact.vertices[s])
        for n in at:
            expected = params[n].detach() + deltas[s][n] if s != "base" and n in deltas[s] else params[n].detach()
            torch.testing.assert_close(at[n], expected, rtol=1e-5, atol=1e-6)
