"""A model stored in bf16/fp16 computes in fp32 outside autocast (:mod:`adapters.upcast`).

References, none of them the code under test: transformers' own forward of the same model with its bf16 values
held in fp32 (widening is exact, so the two must agree bit for bit); plain fp32 tensor operations for the
product, its gradient, its tangent and its vmap; peft's LoRA on that fp32 copy for a training gradient; and the
tensors the autograd graph saves (the fp32 reference saves its fp32 weights, so the check can see them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from adapters import upcast
from tests.llm_models import save_tiny_causal_lm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


def _models(llama, dtype: str = "bfloat16"):
    """(the toolkit's model stored in ``dtype``, transformers' fp32 model holding the same values)."""
    from adapters.models import build_base

    stored = build_base(f"hf:{llama}", [], {"torch_dtype": dtype}, modality="lm").backbone
    reference = build_base(f"hf:{llama}", [], {"torch_dtype": "float32"}, modality="lm").backbone
    with torch.no_grad():
        for (name, p), (ref_name, r) in zip(stored.named_parameters(), reference.named_parameters(), strict=True):
            assert name == ref_name
            r.copy_(p.float())  # exact: every bf16/fp16 value is an fp32 value
        for (_, b), (_, r) in zip(stored.named_buffers(), reference.named_buffers(), strict=True):
            r.copy_(b)
    return stored, reference


def _ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_model_computes_exactly_the_fp32_forward(llama, dtype):
    stored, reference = _models(llama, dtype)
    assert upcast.computes_in_fp32(stored) and not upcast.computes_in_fp32(reference)
    assert all(p.dtype == getattr(torch, dtype) for p in stored.parameters())  # the storage is untouched
    with torch.no_grad():
        out, ref = stored(input_ids=_ids()).logits, reference(input_ids=_ids()).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_autocast_still_decides(llama):
    """Under bf16 autocast the model runs as transformers runs it (bf16 compute), not widened."""
    stored, _ = _models(llama)
    plain = _models(llama)[0]
    for m in plain.modules():  # the same model without the widening: its instance forwards removed
        m.__dict__.pop("forward", None)
    assert not any(getattr(m, upcast.MARK, False) and "forward" in m.__dict__ for m in plain.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = stored(input_ids=_ids()).logits, plain(input_ids=_ids()).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _saved_weight_copies(model: nn.Module, loss_fn) -> list[tuple]:
    """fp32 tensors shaped like one of ``model``'s frozen Linear weights that the graph of ``loss_fn`` saves."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    found = []

    def pack(t):
        if t.dtype == torch.float32 and (tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes):
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return found


def test_lora_gradients_match_fp32_and_the_graph_keeps_no_fp32_weights(llama):
    from peft import LoraConfig, get_peft_model

    stored, reference = _models(llama)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    models = [get_peft_model(model, lora) for model in (stored, reference)]
    trainable = [{n: p for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert trainable[0].keys() == trainable[1].keys() and trainable[0]
    with torch.no_grad():  # the same adapter on both (peft draws it before casting it to fp32 beside a bf16 base)
        for name, p in trainable[0].items():
            assert p.dtype == torch.float32
            trainable[1][name].copy_(p)
    ids = _ids()
    found = []
    for model in models:

        def loss(m=model):
            return F.cross_entropy(m(input_ids=ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

        found.append(_saved_weight_copies(model, loss))
    for name, p in trainable[0].items():
        torch.testing.assert_close(p.grad, trainable[1][name].grad, rtol=1e-5, atol=1e-7)
    assert found[1], "the fp32 reference saves its weights: the check sees such tensors"
    assert not found[0], f"the half model's graph keeps fp32 copies of weights: {found[0]}"


@pytest.mark.parametrize("chunk", [None, 5 * 7])  # whole, and W widened 5 rows (of 7 columns) at a time
def test_product_and_its_derivatives_equal_plain_fp32(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(upcast, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 7, generator=g).to(torch.bfloat16)
    # fp64 inputs: the product runs in x's dtype, so chunked sums and derivatives compare at fp64 rounding
    x = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    dense = weight.double()
    torch.testing.assert_close(upcast._UpcastLinear.apply(x, weight), F.linear(x, dense), rtol=1e-12, atol=1e-12)
    # reverse mode, twice (the input's gradient is itself this product, differentiable)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(upcast._UpcastLinear.apply(xr, weight).sin().sum(), xr, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), xr)
    xd = x.clone().requires_grad_()
    (rx,) = torch.autograd.grad(F.linear(xd, dense).sin().sum(), xd, create_graph=True)
    (rrx,) = torch.autograd.grad(rx.square().sum(), xd)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ggx, rrx, rtol=1e-12, atol=1e-12)
    # forward mode (torch.func.jvp, as curvature's forward-over-reverse) and vmap (the grid's points)
    tangent = torch.randn(x.shape, generator=g, dtype=torch.float64)
    _, jv = torch.func.jvp(lambda v: upcast._UpcastLinear.apply(v, weight), (x,), (tangent,))
    torch.testing.assert_close(jv, F.linear(tangent, dense), rtol=1e-12, atol=1e-12)
    stacked = torch.stack([x, 2 * x])
    batched = torch.func.vmap(lambda v: upcast._UpcastLinear.apply(v, weight))(stacked)
    torch.testing.assert_close(batched, F.linear(stacked, dense), rtol=1e-12, atol=1e-12)


def test_other_modules_widen_their_own_parameters():
    """A LayerNorm and a Linear with a bias stored in bf16: fp32 results equal to their fp32 copies', a trainable
    bf16 weight still gets its gradient, and autocast or fp32 weights leave the module's own forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Embedding(4, 6)).to(torch.bfloat16)
    reference = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Embedding(4, 6))
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert upcast.compute_in_fp32(model) == 3 and upcast.compute_in_fp32(model) == 0  # idempotent
    x = torch.randn(2, 6)
    out = model[1](model[0](x))
    torch.testing.assert_close(out, reference[1](reference[0](x)), rtol=0, atol=0)
    emb = model[2](torch.tensor([1, 3]))
    assert emb.dtype == torch.float32 and torch.equal(emb, reference[2](torch.tensor([1, 3])))
    model[1].weight.requires_grad_(True)
    model[1](model[0](x)).sum().backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0](x).dtype == torch.bfloat16


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 24)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("mode", ["materialized", "factored"])
def test_fast_randlora_on_a_widened_bf16_base_computes_in_fp32(mode):
    """The toolkit's RandLoRA forward (adapters.methods.randlora), which reads the base weight itself, multiplies
    in fp32 on a widened bf16 base too: bit for bit what it computes on an fp32 copy holding the same values, and
    peft's own RandLoRA there to fp32 rounding."""
    import copy

    from peft import RandLoraConfig, get_peft_model

    from adapters.methods.randlora import enable_fast_randlora

    torch.manual_seed(0)
    half = _Toy().to(torch.bfloat16)
    reference = copy.deepcopy(half).float()
    upcast.compute_in_fp32(half)
    config = RandLoraConfig(r=4, randlora_alpha=16.0, target_modules=["up", "down"], projection_prng_key=0)
    models = [get_peft_model(half, config), get_peft_model(reference, config)]
    with torch.no_grad():
        for (name, p), (_, r) in zip(*(m.named_parameters() for m in models), strict=True):
            if "randlora_lambda" in name or "randlora_gamma" in name:  # away from peft's zero init
                p.copy_(torch.randn(p.shape) / p.shape[-1])
                r.copy_(p)
        for b, r in zip(*(m.buffers() for m in models), strict=True):
            r.copy_(b.float())  # the same shared bases, whatever dtype peft kept them in
    models.append(copy.deepcopy(models[1]))  # peft's own forward on the fp32 copy
    for model in models[:2]:
        enable_fast_randlora(model, mode)
    x = torch.randn(3, 5, 24)
    outs = []
    for model in models:
        xr = x.clone().requires_grad_()
        y = model(xr)
        y.square().sum().backward()
        outs.append([y.detach(), xr.grad, *(p.grad for p in model.parameters() if p.requires_grad)])
    widened, fp32, peft_fp32 = outs
    assert widened[0].dtype == torch.float32 and len(widened) == 2 + 4
    for a, b, c in zip(widened, fp32, peft_fp32, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5 * float(c.abs().max()))  # fp32 sums in another order
