"""RandLoRA / LoRA on attention ``in_proj_weight`` and on convolutions (adapters.methods.layers).

Reference for RandLoRA: peft's own ``randlora.layer.Linear`` of the equivalent (out, in) shape, on
the same shared bases with the same λ, γ. Reference for the forwards: torch's own
``nn.MultiheadAttention`` / ``F.conv2d`` with the weight ``W + ΔW`` set by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.methods import MethodSpec, attach, lora_params, randlora_params, target_shapes, trainable_params
from adapters.methods.layers import linear_shape

E, HEADS = 12, 3


class Net(nn.Module):
    """Attention (in_proj 36×12), a 3×3 conv (6 × 4·3·3 = 6×36) and a Linear 12→20."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(E, 20)

    def forward(self, tokens, pixels):
        a, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc(a).sum() + self.conv(pixels).sum()


def _randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _adapted(method: str, rank: int, targets=("attn", "conv", "fc")):
    torch.manual_seed(0)
    base = Net()
    model = attach(copy.deepcopy(base), MethodSpec(method, rank=rank, seed=3), targets)
    _randomise(model)
    return base, model


def _layer(model, name):
    return dict(model.named_modules())[f"base_model.model.{name}"]


def _peft_linear_twin(layer, shape):
    """peft's RandLoRA Linear of ``shape`` on ``layer``'s shared bases, with ``layer``'s λ and γ."""
    from peft.tuners.randlora.layer import Linear

    out, inp = shape
    config = copy.copy(layer_config[0])
    twin = Linear(nn.Linear(inp, out), layer.randlora_A, layer.randlora_B, "default", config, r=layer.r["default"])
    with torch.no_grad():
        twin.randlora_lambda["default"].copy_(layer.randlora_lambda["default"])
        twin.randlora_gamma["default"].copy_(layer.randlora_gamma["default"])
    return twin


layer_config: list = []


@pytest.fixture()
def randlora():
    base, model = _adapted("randlora", 4)
    layer_config[:] = [model.peft_config["default"]]
    return base, model


@pytest.mark.parametrize("name", ["attn", "conv"])
def test_randlora_delta_equals_peft_linear(randlora, name):
    base, model = randlora
    layer = _layer(model, name)
    shape = linear_shape(getattr(base, name))
    twin = _peft_linear_twin(layer, shape)
    ours = layer.get_delta_weight("default")
    ref = twin.get_delta_weight("default").float()
    assert ours.reshape(shape).shape == ref.shape
    torch.testing.assert_close(ours.reshape(shape), ref, rtol=1e-5, atol=1e-6)
    # λ / γ gradients of the same scalar function of ΔW
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    g_ours = torch.autograd.grad((ours.reshape(shape) * probe).sum(), [layer.randlora_lambda["default"],
                                 layer.randlora_gamma["default"]])  # fmt: skip
    g_ref = torch.autograd.grad((twin.get_delta_weight("default").float() * probe).sum(),
                                [twin.randlora_lambda["default"], twin.randlora_gamma["default"]])  # fmt: skip
    for a, b in zip(g_ours, g_ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_randlora_forwards_equal_torch_with_merged_weight(randlora):
    base, model = randlora
    g = torch.Generator().manual_seed(7)
    tokens, pixels = torch.randn(2, 5, E, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    attn, conv = _layer(model, "attn"), _layer(model, "conv")
    ref_attn = copy.deepcopy(base.attn)
    ref_attn.in_proj_weight.data += attn.get_delta_weight("default").detach()
    got, _ = attn(tokens, tokens, tokens, need_weights=False)
    want, _ = ref_attn(tokens, tokens, tokens, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = base.conv.weight + conv.get_delta_weight("default").detach()
    torch.testing.assert_close(conv(pixels), F.conv2d(pixels, w, base.conv.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_randlora_merge_and_unload_equals_delta(randlora):
    base, model = randlora
    deltas = {n: _layer(model, n).get_delta_weight("default").detach() for n in ("attn", "conv")}
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged.attn.in_proj_weight, base.attn.in_proj_weight + deltas["attn"])
    torch.testing.assert_close(merged.conv.weight, base.conv.weight + deltas["conv"])
    assert isinstance(merged.attn, nn.MultiheadAttention) and isinstance(merged.conv, nn.Conv2d)


def test_shared_bases_cover_every_target_and_equal_peft_for_linears(monkeypatch):
    import peft.tuners.randlora.model as randlora_model
    from peft import RandLoraConfig, get_peft_model

    # attention (36×12) is the largest: the one pair of bases covers it, for every layer type
    base, model = _adapted("randlora", 4)
    a, b = _layer(model, "attn").randlora_A["default"], _layer(model, "attn").randlora_B["default"]
    assert _layer(model, "fc").randlora_B["default"] is b  # one shared copy
    assert b.shape[0] >= 36 and a.shape[-1] >= 12
    # a model of Linears alone: exactly the bases of peft's own sizing rule
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8))
    ours = attach(copy.deepcopy(mlp), MethodSpec("randlora", rank=4, seed=3), ("0", "2"), fast_randlora=False)
    cls = randlora_model.RandLoraModel
    monkeypatch.setattr(cls, "_find_dim", cls._peft_find_dim)
    theirs = get_peft_model(copy.deepcopy(mlp), RandLoraConfig(r=4, target_modules=["0", "2"], projection_prng_key=3))
    for key in ("randlora_A", "randlora_B"):
        want = getattr(dict(theirs.named_modules())["base_model.model.0"], key)["default"]
        got = getattr(dict(ours.named_modules())["base_model.model.0"], key)["default"]
        assert torch.equal(got, want)


@pytest.mark.parametrize("method,rank", [("lora", 3), ("randlora", 4), ("randlora", 5)])
def test_budget_closed_form_equals_peft_count(method, rank):
    base, model = _adapted(method, rank)
    shapes = target_shapes(base, ("attn", "conv", "fc"))
    assert sorted(shapes) == sorted([(3 * E, E), (6, 36), (20, E)])
    count = lora_params if method == "lora" else randlora_params
    assert trainable_params(model) == count(shapes, rank)


def test_lora_in_proj_only_and_forward():
    base, model = _adapted("lora", 3)
    attn = _layer(model, "attn")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("out_proj" in n for n in names)  # q/k/v only, unlike peft's own MHA LoRA
    a, b = attn.lora_A["default"].weight, attn.lora_B["default"].weight
    delta = attn.get_delta_weight("default")
    torch.testing.assert_close(delta, (b @ a) * attn.scaling["default"])
    tokens = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(2))
    ref = copy.deepcopy(base.attn)
    ref.in_proj_weight.data += delta.detach()
    torch.testing.assert_close(attn(tokens, tokens, tokens)[0], ref(tokens, tokens, tokens)[0], rtol=1e-5, atol=1e-6)
    loss = attn(tokens, tokens, tokens)[0].sum()
    loss.backward()
    assert a.grad is not None and b.grad is not None and base.attn.in_proj_weight.grad is None
