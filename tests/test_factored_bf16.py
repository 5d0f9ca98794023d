"""bf16 weights of the factored plane built by bf16 arithmetic, where the device multiplies bf16 natively (issue 20
point 4): RandLoRA's bf16 factors give peft's own ΔW within their rounding bound, every weight a module sees is the
fp32 sum within the bound of the bf16 operations that built it, the grid's losses stay within a bf16 rounding of
the loss built exactly, and fp32 weights are built exactly as before (bit-identical with the flag on or off).

Bounds use bf16's unit roundoff U = 2⁻⁸ (|round(x) − x| ≤ U·|x|): a product of two rounded factors is off by at most
2U·Σ_k |F_ik·S_kj| (plus fp32 accumulation, far below), and each bf16 operation rounds its result once more."""

from __future__ import annotations

import pytest
import torch

from adapters.objectives import OBJECTIVES

U = 2.0**-8  # bf16's unit roundoff
ANSWER = OBJECTIVES["answer"]
POINTS = [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0), (0.3, 0.6), (4.0, -3.0)]  # the vertices, inside, far outside


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny random Qwen2 (hidden 64, 2 layers: RandLoRA layers with out > in and out < in) with its own ft, lora
    and randlora solutions (llm_scale's case), loaded in bf16; the evaluation set of 6 fabricated samples."""
    from experiments.benchmarks.llm_scale_cases import examples, make_case
    from experiments.benchmarks.llm_scale_worker import _load, _solutions
    from landscape.engine.grid import EvalSet

    folder = tmp_path_factory.mktemp("bf16grid")
    make_case(folder, "qwen2-0.5b", 64, 2)
    _, model = _load(folder, "bfloat16")
    _, data, labels = examples(6, 16)
    return folder, model, _solutions(folder, "own", model), EvalSet.prepare(data, labels, 6, "cpu")


def _chart(model, solutions):
    from landscape.engine import factored

    return factored.build_chart("paper", model, {s: sol.module_deltas(check=False) for s, sol in solutions.items()})


def _factors(folder, model) -> dict[str, tuple]:
    """{weight name: (module, its peft class)} of the lora and randlora adapters' Linear layers."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.randlora.layer import Linear as RandLoraLinear

    from adapters.deltas import load_adapter
    from adapters.solutions.peft_config import PEFT_PREFIX

    out = {}
    for method in ("lora", "randlora"):
        peft_model = load_adapter(folder / "own" / method, model)
        for name, m in peft_model.named_modules():
            if type(m) in (LoraLinear, RandLoraLinear):
                out.setdefault(method, {})[f"{name.removeprefix(PEFT_PREFIX)}.weight"] = m
    return out


def _abs_product(method: str, m) -> torch.Tensor:
    """Σ_k |F_ik·S_kj|·scaling of the factors the bf16 product multiplies (its rounding bound without 2U)."""
    from adapters.solutions.bf16_products import randlora_factors

    if method == "lora":
        f, s = m.lora_B["default"].weight, m.lora_A["default"].weight
    else:
        f, s = randlora_factors(m)
    return (f.float().abs() @ s.float().abs()) * m.scaling["default"]


def test_randlora_bf16_factors_give_pefts_delta_within_their_rounding(case):
    from adapters.solutions.bf16_products import randlora_factors

    folder, model, *_ = case
    layers = _factors(folder, model)["randlora"]
    assert {m.out_features < m.in_features for m in layers.values()} == {True, False}  # both layouts
    for name, m in layers.items():
        first, second = randlora_factors(m)
        assert first.dtype == second.dtype == torch.bfloat16 and first.stride(-1) == second.stride(-1) == 1, name
        got = (first.float() @ second.float()) * m.scaling["default"]
        want = m.get_delta_weight("default").float()
        bound = 2.01 * U * _abs_product("randlora", m) + 1e-6 * want.abs().max()
        assert ((got - want).abs() <= bound).all(), name
        assert (got - want).abs().max() > 0  # rounded: the bf16 path was taken
        assert randlora_factors(m)[int(m.out_features < m.in_features)].data_ptr() in (
            first.data_ptr(), second.data_ptr())  # the shared basis' bf16 copy is made once  # fmt: skip


def _seen_weights(model, chart, eval_set, point, names) -> dict[str, torch.Tensor]:
    from landscape.engine import factored

    modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    seen = {}
    with factored.FactoredEvaluator(model, chart, eval_set, "cpu", objective=ANSWER) as evaluator:

        def keep(mod, args, n):  # returns None: a pre-hook's return value would replace the inputs
            seen.setdefault(n, mod.weight.detach().clone())

        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: keep(mod, a, n)) for n, m in modules.items()]
        try:
            evaluator.evaluate(*point)
        finally:
            for h in hooks:
                h.remove()
    return seen


def test_each_bf16_weight_is_the_fp32_sum_within_the_bound_of_its_bf16_operations(case, monkeypatch):
    """W0 + Σ c_s·ΔW_s as each module sees it, against the fp32 sum: at most one rounding U per operation (the
    copy/first add, each adapter's addmm) of |W0| + Σ|c_s·ΔW_s|, plus 2U·|c|·Σ_k|F·S| per adapter product."""
    folder, model, solutions, eval_set = case
    monkeypatch.setenv("ADAPTERS_NATIVE_BF16", "1")
    chart = _chart(model, solutions)
    factors = _factors(folder, model)
    names = sorted(factors["randlora"])
    for point in POINTS:
        coef = chart.coefficients(*point)
        seen = _seen_weights(model, chart, eval_set, point, names)
        for n in names:
            w0 = chart.base[n].detach().float()
            terms = [(c, d) for s, d in chart.terms(n) if (c := coef.get(s, 0.0)) != 0.0]
            want = w0 + sum(c * (d.float() if isinstance(d, torch.Tensor) else d()) for c, d in terms)
            size = w0.abs() + sum(abs(c) * (d.float() if isinstance(d, torch.Tensor) else d()).abs() for c, d in terms)
            bound = (len(terms) + 1) * U * size + sum(
                2.01 * U * abs(coef[s]) * _abs_product(s, factors[s][n]) for s in ("lora", "randlora") if coef[s]
            )
            assert seen[n].dtype == torch.bfloat16
            assert ((seen[n].float() - want).abs() <= bound).all(), (point, n)


def test_bf16_grid_losses_stay_within_a_bf16_rounding_of_the_exact_build(case, monkeypatch):
    """The grid's losses with bf16-built weights against the same bf16 model with every weight the fp32 sum rounded
    once (the flag off): within U·|loss| (one bf16 rounding of the loss); both within 2⁻⁶·|loss| of the fp32 model
    holding the same W0 (what the bf16 forward itself costs, measured ≈ 1e-3 here)."""
    import copy

    from landscape.engine import factored

    _, model, solutions, eval_set = case
    losses = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("ADAPTERS_NATIVE_BF16", flag)
        with factored.FactoredEvaluator(
            model, _chart(model, solutions), eval_set, "cpu", objective=ANSWER
        ) as evaluator:
            losses[flag] = [evaluator.evaluate(*p).loss for p in POINTS]
    monkeypatch.setenv("ADAPTERS_NATIVE_BF16", "1")
    fp32 = copy.deepcopy(model).float()  # the same W0, upcast exactly; the solutions' ΔW against it
    from experiments.benchmarks.llm_scale_worker import _solutions

    folder = case[0]
    with factored.FactoredEvaluator(
        fp32, _chart(fp32, _solutions(folder, "own", fp32)), eval_set, "cpu", objective=ANSWER
    ) as ev:
        exact = [ev.evaluate(*p).loss for p in POINTS]
    for new, old, ref in zip(losses["1"], losses["0"], exact, strict=True):
        assert abs(new - old) <= U * abs(old)
        assert abs(new - ref) <= 2.0**-6 * abs(ref) and abs(old - ref) <= 2.0**-6 * abs(ref)
    assert losses["1"] != losses["0"]  # the bf16 build was taken


def test_fp32_weights_ignore_the_bf16_flag(case, monkeypatch):
    """fp32 weights are built exactly as before whatever the device: bit-identical losses with the flag on and off."""
    import copy

    from experiments.benchmarks.llm_scale_worker import _solutions
    from landscape.engine import factored

    folder, model, _, eval_set = case
    fp32 = copy.deepcopy(model).float()
    losses = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("ADAPTERS_NATIVE_BF16", flag)
        with factored.FactoredEvaluator(
            fp32, _chart(fp32, _solutions(folder, "own", fp32)), eval_set, "cpu", objective=ANSWER
        ) as ev:
            losses[flag] = [ev.evaluate(*p).loss for p in POINTS]
    assert losses["1"] == losses["0"]


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_packed_linears_run_one_dense_matmul_equal_to_adding_the_update_beside(case, compute, monkeypatch):
    """On a 4-bit base each packed Linear runs x·(dequantised W0 + Σ c·ΔW)ᵀ at a point: the same losses as the packed
    kernel's output plus x·ΔWᵀ beside it (fp32 compute: the same sums in another order, 1e-6; bf16 compute with
    bf16-built weights: U·|loss|), the codes byte-identical and the layers' own forward back after close."""
    pytest.importorskip("bitsandbytes")
    from adapters.models import hf
    from adapters.quant import is_packed
    from experiments.benchmarks.llm_scale_worker import _solutions
    from landscape.engine import factored

    folder, _, _, eval_set = case
    monkeypatch.setenv("ADAPTERS_NATIVE_BF16", "1")
    model = hf.entry(str(folder / "base"), "lm", {"load_4bit": True, "torch_dtype": compute}).build(0).eval()
    packed = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and is_packed(m.weight)]
    codes = [m.weight.data.clone() for m in packed]
    chart = _chart(model, _solutions(folder, "own", model))
    losses = {}
    for mode in ("beside", "dense"):
        if mode == "beside":  # a forward set on the instance already: the evaluator leaves it and adds beside
            for m in packed:
                m.forward = m.forward
        with factored.FactoredEvaluator(model, chart, eval_set, "cpu", objective=ANSWER) as evaluator:
            assert len(evaluator._swapper.dense_layers) == (len(packed) if mode == "dense" else 0)
            losses[mode] = [evaluator.evaluate(*p).loss for p in POINTS]
        assert all(("forward" in m.__dict__) == (mode == "beside") for m in packed)
        for m in packed:
            m.__dict__.pop("forward", None)
    assert all(torch.equal(m.weight.data, c) for m, c in zip(packed, codes, strict=True))
    tol = 1e-6 if compute == "float32" else U
    for dense, beside in zip(losses["dense"], losses["beside"], strict=True):
        assert abs(dense - beside) <= tol * abs(beside)
