"""The fast RandLoRA forward (adapters.methods.randlora) against peft's own RandLoRA layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapters.methods import MethodSpec, attach
from adapters.methods.randlora import (
    choose_path,
    delta_weight,
    disable_fast_randlora,
    enable_fast_randlora,
    last_choices,
    path_costs,
    randlora_layers,
    threshold_tokens,
)
from tests.made import MadeTensors

TARGETS = ("up", "down", "square")
RTOL = 1e-5  # of the reference's largest magnitude: fp32 sums in another order


class Toy(nn.Module):
    """Linears with out > in (up), out < in (down) and out = in (square), and a head."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24)
        self.square = nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.square(torch.tanh(self.down(torch.tanh(self.up(x))))))


def _randlora(seed: int = 0, rank: int = 5):
    from peft import RandLoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = RandLoraConfig(r=rank, randlora_alpha=4.0 * rank, target_modules=list(TARGETS), projection_prng_key=seed)
    model = get_peft_model(Toy(), config)
    with torch.no_grad():  # away from peft's zero init, so every gradient is non-trivial
        for name, p in model.named_parameters():
            if "randlora_lambda" in name:
                p.normal_()
            elif "randlora_gamma" in name:
                p.normal_().div_(p.shape[-1])
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "randlora_" in n}


def _run(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, _grads(model)


def _assert_close(a, b):
    torch.testing.assert_close(a, b, atol=RTOL * float(b.detach().abs().max()) + 1e-7, rtol=0.0)


@pytest.mark.parametrize("mode", ["materialized", "factored", "auto"])
@pytest.mark.parametrize("keep_weight", [True, False])
def test_matches_peft_outputs_and_gradients(mode, keep_weight):
    ref = _randlora()
    fast = copy.deepcopy(ref)
    enable_fast_randlora(fast, mode, keep_weight=keep_weight)
    x = torch.randn(4, 9, 24)
    y_ref, gx_ref, g_ref = _run(ref, x)
    y, gx, g = _run(fast, x)
    _assert_close(y, y_ref)
    _assert_close(gx, gx_ref)
    assert set(g) == set(g_ref) and len(g) == 2 * len(TARGETS)
    for name in g_ref:
        assert g_ref[name].abs().max() > 0, name
        _assert_close(g[name], g_ref[name])
    if mode != "auto":
        assert set(last_choices(fast).values()) == {mode}


def test_delta_weight_equals_peft():
    model = _randlora()
    enable_fast_randlora(model, "materialized")
    layers = randlora_layers(model)
    shapes = {layer.get_base_layer().weight.shape for layer in layers.values()}
    assert shapes == {(40, 24), (24, 40), (24, 24)}
    for layer in layers.values():
        with torch.no_grad():
            _assert_close(delta_weight(layer), layer.get_delta_weight("default"))


def test_auto_choice_follows_token_count_and_is_exact_either_way():
    ref = _randlora()
    fast = copy.deepcopy(ref)
    plan = enable_fast_randlora(fast, "auto")
    square = plan["base_model.model.square"]
    k = square["rank"] * square["num_bases"]
    assert square["train_threshold_tokens"] == threshold_tokens(24, 24, 5, square["num_bases"])
    for tokens in (2, 400):  # below and above every layer's threshold
        x = torch.randn(tokens, 24)
        expected = {
            n: choose_path(info["shape"][1], info["shape"][0], info["rank"], info["num_bases"], tokens)
            for n, info in plan.items()
        }
        y_ref, gx_ref, g_ref = _run(ref, x)
        ref.zero_grad(set_to_none=True)
        y, gx, g = _run(fast, x)
        fast.zero_grad(set_to_none=True)
        assert last_choices(fast) == expected
        assert set(expected.values()) == ({"factored"} if tokens == 2 else {"materialized"})
        _assert_close(y, y_ref)
        _assert_close(gx, gx_ref)
        for name in g_ref:
            _assert_close(g[name], g_ref[name])
    # the documented counts: square layer, K >= d, keep_weight: T·K·(2·(in+out)+d) vs D·d·(2K+T)
    assert path_costs(24, 24, 5, square["num_bases"], 100) == (100 * k * (2 * 48 + 24), 24 * 24 * (2 * k + 100))


def test_eval_no_grad_and_disabled_adapter_match_peft():
    ref = _randlora()
    fast = copy.deepcopy(ref)
    enable_fast_randlora(fast, "materialized")
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        _assert_close(fast.eval()(x), ref.eval()(x))
        with fast.disable_adapter(), ref.disable_adapter():
            _assert_close(fast(x), ref(x))


def test_bases_cached_once_per_shape_and_refreshed_on_change():
    model = _randlora()
    enable_fast_randlora(model, "materialized")
    shared = {id(layer._fast_randlora.shared) for layer in randlora_layers(model).values()}
    assert len(shared) == 1  # one cache for all layers
    cache = next(iter(randlora_layers(model).values()))._fast_randlora.shared
    x = torch.randn(2, 24)
    for _ in range(3):
        model(x).sum().backward()
    assert cache.conversions == 2  # (40, 24) and (24, 40) share one slice, (24, 24) the other: once each
    with torch.no_grad():
        model.base_model.randlora_B["default"].mul_(2.0)  # in place: the cache notices
    ref = copy.deepcopy(model)
    disable_fast_randlora(ref)
    _assert_close(model(x), ref(x))


def test_attach_uses_fast_path_by_default():
    fast = attach(Toy(), MethodSpec("randlora", rank=4), TARGETS)
    plain = attach(Toy(), MethodSpec("randlora", rank=4), TARGETS, fast_randlora=False)
    assert all("_fast_randlora" in m.__dict__ for m in randlora_layers(fast).values())
    assert not any("_fast_randlora" in m.__dict__ for m in randlora_layers(plain).values())


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    from peft import PeftModel

    model = _randlora()
    enable_fast_randlora(model, "materialized")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 24)).pow(2).mean().backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Toy(), tmp_path)  # the same base weights as _randlora(0)
    saved = {n: p for n, p in model.named_parameters() if "randlora_" in n}
    got = dict(loaded.named_parameters())
    assert saved and all(torch.equal(got[n], p) for n, p in saved.items())
    x = torch.randn(5, 24)
    with torch.no_grad():
        enable_fast_randlora(loaded, "materialized")
        _assert_close(loaded.eval()(x), model.eval()(x))


def test_compact_save_regenerates_identical_bases(tmp_path):
    from peft import PeftModel

    from adapters.methods.randlora_saving import BASES_FILE, save_compact, verify_bases

    model = _randlora()
    save_compact(model, tmp_path / "compact")
    model.save_pretrained(tmp_path / "full")
    size = (tmp_path / "compact" / "adapter_model.safetensors").stat().st_size
    assert size < (tmp_path / "full" / "adapter_model.safetensors").stat().st_size / 2
    from safetensors.torch import load_file

    compact, full = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("compact", "full"))
    want = {k: v for k, v in full.items() if ".randlora_A" not in k and ".randlora_B" not in k}
    assert len(want) < len(full) and compact.keys() == want.keys()  # peft's own save: its tensors less the bases
    assert all(torch.equal(compact[k], want[k]) for k in want)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Toy(), tmp_path / "compact")
    verify_bases(loaded, tmp_path / "compact")
    for layer, ref in zip(randlora_layers(loaded).values(), randlora_layers(model).values(), strict=True):
        assert torch.equal(layer.get_delta_weight("default"), ref.get_delta_weight("default"))
    (tmp_path / "compact" / BASES_FILE).write_text((tmp_path / "compact" / BASES_FILE).read_text().replace("a", "b"))
    with pytest.raises(ValueError, match="differ"):
        verify_bases(loaded, tmp_path / "compact")


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_fast_training_step_saves_nothing_that_does_not_grow_with_the_tokens(storage):
    # the toolkit's RandLoRA training (attach: the fast forward) on a Qwen2-shaped causal LM keeps for the backward
    # only batch-sized tensors: no weight-sized scaled basis or low-precision basis copy per layer, as peft's own
    # forward keeps (the reference, which must show them for this test to mean anything)
    from transformers import AutoModelForCausalLM

    from experiments.benchmarks.llm_scale_cases import RANKS, TARGETS, scaled_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(scaled_config("qwen2-0.5b", 128, layers=2, vocab=64)).to(storage)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=storage == torch.bfloat16)

    def token_free_saved_bytes(fast: bool) -> int:
        model = attach(copy.deepcopy(base), MethodSpec("randlora", rank=RANKS["randlora"]), TARGETS, fast_randlora=fast)
        owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

        def saved(tokens: int) -> set[int]:
            sizes: set[int] = set()

            def pack(t):
                if t.untyped_storage().data_ptr() not in owned:
                    sizes.add(t.untyped_storage().nbytes())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:  # held until the backward
                loss = model(input_ids=torch.zeros(1, tokens, dtype=torch.long)).logits.float().sum()
            loss.backward()
            return sizes

        return sum(b for b in saved(3) & saved(7) if b > 128 * 4)  # in both: sized by no token count (nor a vector)

    assert token_free_saved_bytes(fast=False) > 128 * 128 * 2  # peft's forward: a scaled basis per layer at least
    assert token_free_saved_bytes(fast=True) == 0


def test_factored_path_under_bf16_autocast_matches_peft():
    ref = _randlora()
    fast = copy.deepcopy(ref)
    enable_fast_randlora(fast, "factored")
    x = torch.randn(4, 9, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, gx_ref, g_ref = _run(ref, x)
        y, gx, g = _run(fast, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    for a, b in [(y, y_ref), (gx, gx_ref), *((g[n], g_ref[n]) for n in g_ref)]:
        # both round the same products to bf16 (8 bits of mantissa), in another order
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * float(b.abs().max()), rtol=0.0)


def test_fast_forward_beside_a_4bit_base_matches_peft_bitsandbytes_layer():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import RandLoraConfig, get_peft_model

    from adapters.quant import disable_cpu_repacking

    torch.manual_seed(0)
    toy = Toy()
    for name in TARGETS:
        dense = getattr(toy, name)
        packed = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                   compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
        packed.load_state_dict(dense.state_dict())
        setattr(toy, name, packed.to("cpu"))  # quantised here
    disable_cpu_repacking(toy)
    ref = get_peft_model(toy, RandLoraConfig(r=5, randlora_alpha=20.0, target_modules=list(TARGETS)))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "randlora_" in name:
                p.normal_().div_(p.shape[-1] if "gamma" in name else 1.0)
    fast = copy.deepcopy(ref)
    plan = enable_fast_randlora(fast, "auto")
    assert len(plan) == len(TARGETS)  # peft's bitsandbytes layers are found and given the fast forward
    assert {info["mode"] for info in plan.values()} == {"factored"}
    assert not any("train_threshold_tokens" in info for info in plan.values())
    x = torch.randn(4, 100, 24)  # enough tokens that auto would materialize a dense layer
    y_ref, gx_ref, g_ref = _run(ref, x)
    y, gx, g = _run(fast, x)
    assert set(last_choices(fast).values()) == {"factored"}  # beside the packed layer, never W + s·ΔW
    _assert_close(y, y_ref)
    _assert_close(gx, gx_ref)
    for name in g_ref:
        assert g_ref[name].abs().max() > 0, name
        _assert_close(g[name], g_ref[name])


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_a_double_backward_through_the_fast_forward_fails_loudly(mode):
    # its backward is not differentiable in λ, γ: an HVP by double backward must not come back silently incomplete
    model = _randlora()
    enable_fast_randlora(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(model(torch.randn(3, 24)).pow(2).sum(), params, create_graph=True)
    disable_fast_randlora(model)  # peft's own forward: the double backward works
    grads = torch.autograd.grad(model(torch.randn(3, 24)).pow(2).sum(), params, create_graph=True)
    assert all(h is not None for h in torch.autograd.grad(sum(g.sum() for g in grads), params))


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])  # in < out (S = first), in > out (Sᵀ = second)
def test_factored_step_never_makes_the_whole_scaled_factor(shape):
    # the per-layer scratch of a training step: S = λ·A·γ (K×d) and G = ∂L/∂S are made in blocks, so no tensor of a
    # step is half of S; peft's own forward (the reference) makes S whole. Every tensor the step makes is recorded.
    from peft import RandLoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(*shape)), RandLoraConfig(r=4, target_modules=["0"]))
    layer = randlora_layers(model)["base_model.model.0"]
    scaled_numel = layer.r["default"] * layer.num_bases * min(shape)  # K×d
    x = torch.randn(4, shape[0])

    def largest_made(fast: bool) -> int:
        (enable_fast_randlora if fast else disable_fast_randlora)(model, *(["factored"] if fast else []))
        model(x).sum().backward()  # the bases cache is filled outside the recording
        with MadeTensors() as made:
            model(x).pow(2).sum().backward()
        return max(made.numels)

    assert largest_made(fast=False) >= scaled_numel
    assert largest_made(fast=True) < scaled_numel / 2
