"""Curvature's memory, counted rather than timed: the tensors alive during a Hessian-vector product and a
Lanczos run, tracked op by op (a pass-through dispatch mode that records every new storage and a weak
reference that drops it when freed), and RandLoRA's factored product against peft's own forward and
peft's own double backward.

- An HVP in RandLoRA's λ/γ coordinates on a stack of adapted layers holds at most a few tensors of the
  size of one layer's scaled basis S = λ·A·γ at once, however many layers: the product never forms S
  (reverse mode over forward mode, :func:`landscape.curvature.hessian._randlora_product`). ``torch.func``'s
  forward-over-reverse with peft's forward keeps S, its tangent and its gradient for every layer (the test
  fails on that code: 40 at once for 6 layers; double backward 24).
- The top-k Lanczos keeps at most k + 4 coordinate-sized torch tensors alive (its basis is numpy, on the host).
"""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapters.objectives import OBJECTIVES
from adapters.quant import disable_cpu_repacking
from landscape import curvature
from landscape.curvature import hessian
from landscape.engine.grid import EvalSet

CE = OBJECTIVES["classification"]


class LiveTensors(TorchDispatchMode):
    """Storages created inside the block that are alive, op by op: the most at once of those with at least
    ``numel`` elements (``peak_count``) and their sizes then. Storages that existed before (``exclude``, e.g.
    the model's weights seen through views) are not counted."""

    def __init__(self, numel: int, exclude: set[int] = frozenset()):
        super().__init__()
        self.numel, self.exclude = numel, set(exclude)
        self.live: dict[int, int] = {}
        self.peak_count, self.at_peak = 0, []

    def _drop(self, key: int) -> None:
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.numel() < self.numel:
                continue
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()
            except RuntimeError:  # a tensor without storage (zero tensors of forward mode)
                continue
            if key in self.live or key in self.exclude or storage.nbytes() < self.numel * t.element_size():
                continue
            self.live[key] = storage.nbytes() // t.element_size()
            weakref.finalize(storage, self._drop, key)
        if len(self.live) > self.peak_count:
            self.peak_count, self.at_peak = len(self.live), sorted(self.live.values())
        return out


def _pointers(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


class Stack(nn.Module):
    """``layers`` square tanh layers and a head: RandLoRA's bases are d × d per layer, the tokens few."""

    def __init__(self, d: int, layers: int, classes: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.task_head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.task_head(x)


def _randlora(model: nn.Module, r: int, targets: str | list[str]):
    from peft import RandLoraConfig, get_peft_model

    config = RandLoraConfig(r=r, target_modules=targets, projection_prng_key=3, randlora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                p.normal_(0, 0.3)  # away from peft's initialisation (γ = 1)
    names = [n for n, p in peft_model.named_parameters() if "randlora_lambda" in n or "randlora_gamma" in n]
    return peft_model, names


def test_an_hvp_holds_no_scaled_basis_per_layer():
    torch.manual_seed(0)
    d, layers, r = 96, 6, 8  # N = 12 bases per layer, S = r·N·d = d² = 9,216 elements; tokens: 4 samples
    model, names = _randlora(Stack(d, layers), r, r"layers\.\d+")
    eval_set = EvalSet([({"x": torch.randn(4, d)}, torch.tensor([0, 1, 2, 0]))], 4)
    op = curvature.HessianOperator(model, names, eval_set, CE, "float64")
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(op.dim))
    op.flat_hvp(v)  # the mode is chosen on the first product
    assert op.mode == "reverse-over-forward" and op.note is None
    basis = r * op.model.base_model.model.layers[0].num_bases * d
    tracker = LiveTensors(basis, _pointers(op.model))
    with tracker:
        op.flat_hvp(v)
    # a layer's transients only (the factored product's chunks stay below S: 4 tokens × N × d); torch.func's
    # forward-over-reverse through peft's forward (the default before) held 40 at once, double backward 24
    assert tracker.peak_count <= 2, tracker.at_peak


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
@pytest.mark.parametrize("chunk", [None, 1])
def test_factored_randlora_equals_peft(shape, chunk, monkeypatch):
    """The factored product gives peft's forward (in < out, in > out, square; in token chunks of any size),
    and its reverse-over-forward HVPs equal double backward through peft's own forward and backward."""
    torch.manual_seed(1)
    d_in, d_out = shape
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 3))
    peft_model, names = _randlora(model, 4, ["0"])
    peft_model = peft_model.double()
    if chunk is not None:
        monkeypatch.setattr(hessian, "RANDLORA_CHUNK_ELEMENTS", chunk)  # one token per chunk
    x = torch.randn(5, 2, d_in, dtype=torch.float64)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        expected = layer(x)
        with hessian._factored_randlora(peft_model):
            assert "forward" in layer.__dict__
            got = layer(x)
    assert "forward" not in layer.__dict__  # peft's forward is back
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    eval_set = EvalSet([({"input": x[:, 0]}, torch.tensor([0, 1, 2, 0, 1]))], 5)
    forward = curvature.HessianOperator(copy.deepcopy(peft_model), names, eval_set, CE, "float64",
                                        mode="reverse-over-forward")  # fmt: skip
    double = curvature.HessianOperator(copy.deepcopy(peft_model), names, eval_set, CE, "float64",
                                       mode="reverse-over-reverse")  # fmt: skip
    v = np.random.default_rng(2).standard_normal(forward.dim)
    reference = double.matvec(v)
    np.testing.assert_allclose(forward.matvec(v), reference, rtol=1e-9, atol=1e-12 * np.abs(reference).max())
    assert forward.loss == pytest.approx(double.loss, rel=1e-12)
    assert forward.grad_norm == pytest.approx(double.grad_norm, rel=1e-9)


def test_reverse_over_forward_through_attention_and_cross_entropy():
    """softmax and log_softmax (attention, the LM loss) have forward-mode formulas that work in place unless a
    dispatch mode is active; the product runs under one (without it: "modified by an inplace operation"), and
    equals torch.func's forward-over-reverse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.models.hf import CausalLMScorer
    from adapters.objectives import AnswerLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip
    model = CausalLMScorer(LlamaForCausalLM(config))
    ids = torch.randint(3, 40, (3, 2, 7))
    answer = torch.zeros_like(ids)
    answer[..., 4:] = 1
    eval_set = EvalSet([({"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_mask": answer},
                         torch.tensor([0, 1, 1]))], 3)  # fmt: skip
    names = ["backbone.model.layers.0.self_attn.q_proj.weight", "backbone.model.layers.1.mlp.down_proj.weight"]
    ops = {mode: curvature.HessianOperator(copy.deepcopy(model), names, eval_set, AnswerLoss(), "float64", mode)
           for mode in ("reverse-over-forward", "forward-over-reverse")}  # fmt: skip
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(ops["reverse-over-forward"].dim))
    products = {mode: op.flat_hvp(v) for mode, op in ops.items()}
    # the scorer's cross-entropy runs in fp32 (lm_scoring casts the logits): fp32 agreement, in another order
    reference = products["forward-over-reverse"]
    torch.testing.assert_close(products["reverse-over-forward"], reference, rtol=1e-4,
                               atol=1e-5 * float(reference.abs().max()))  # fmt: skip
    assert ops["reverse-over-forward"].mode == "reverse-over-forward" and ops["reverse-over-forward"].note is None


def test_lanczos_holds_at_most_k_plus_4_coordinate_vectors():
    """The top-k eigenvalues (Lanczos, then ARPACK's restarts when it has not converged): torch tensors of the
    coordinates' size alive at once stay within k + 4; the basis is numpy on the host."""
    torch.manual_seed(0)
    model = Stack(24, 2)
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(16, 24), torch.randint(0, 3, (16,))
    op = curvature.HessianOperator(copy.deepcopy(model), names, EvalSet([({"x": x}, y)], 16), CE, "float32")
    k = 2
    tracker = LiveTensors(op.dim, _pointers(op.model))
    with tracker:
        result = curvature.top_eigenvalues(op, k, tol=1e-6, max_vectors=5)  # 5 steps: ARPACK takes over
    assert "eigsh" in result["method"] and result["hvps"] > 5
    assert 0 < tracker.peak_count <= k + 4, tracker.at_peak


def test_micro_batches_give_the_same_products():
    """``micro_batch`` splits the evaluation batches (of 11 and 19 samples) into pieces of 4: the same loss,
    gradient norm and products, with fewer samples per forward."""
    torch.manual_seed(0)
    model = Stack(8, 2)
    x, y = torch.randn(30, 8), torch.randint(0, 3, (30,))
    eval_set = EvalSet([({"x": x[:11]}, y[:11]), ({"x": x[11:]}, y[11:])], 30)
    names = [n for n, _ in model.named_parameters()]
    whole = curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, "float64")
    pieces = curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, "float64", micro_batch=4)
    assert [len(t) for _, t in pieces.batches] == [4, 4, 3, 4, 4, 4, 4, 3] and len(whole.batches) == 2
    v = np.random.default_rng(0).standard_normal(whole.dim)
    np.testing.assert_allclose(pieces.matvec(v), whole.matvec(v), rtol=1e-10, atol=1e-13)
    assert pieces.loss == pytest.approx(whole.loss, rel=1e-12)
    assert pieces.grad_norm == pytest.approx(whole.grad_norm, rel=1e-10)


@pytest.mark.parametrize("samples", [6, 40])
def test_reverse_over_forward_through_4bit_layers_equals_double_backward(samples):
    """A bitsandbytes NF4 base (CPU) with RandLoRA on its packed layers: the products go by reverse mode over
    forward mode (:class:`landscape.curvature.hessian._PackedMatmul` gives the packed matmul a tangent) and equal
    double backward through bitsandbytes' own Function; the packed bytes are untouched. 6 tokens: RandLoRA's
    factored product; 40 (more than d = 32): peft's bitsandbytes layer's own, with its UniqueBaseGrad swapped."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    d = 32
    model = Stack(d, 2)
    for i, layer in enumerate(model.layers):
        packed = bnb.nn.Linear4bit(d, d, compute_dtype=torch.float32, quant_type="nf4")
        packed.load_state_dict(layer.state_dict())
        model.layers[i] = packed.to("cpu")  # quantised here
    assert all(getattr(layer.weight, "quant_state", None) is not None for layer in model.layers)
    disable_cpu_repacking(model)  # as the toolkit's loading does (bitsandbytes' in-place CPU repacking off)
    peft_model, names = _randlora(model, 4, r"layers\.\d+")
    codes = [layer.weight.clone() for layer in model.layers]
    eval_set = EvalSet([({"x": torch.randn(samples, d)}, torch.arange(samples) % 3)], samples)
    forward = curvature.HessianOperator(peft_model, names, eval_set, CE, "float32")
    double = curvature.HessianOperator(peft_model, names, eval_set, CE, "float32", mode="reverse-over-reverse")
    v = np.random.default_rng(0).standard_normal(forward.dim)
    reference = double.matvec(v)
    # fp32 products in two orders of differentiation: 1.8e-4 relative at most on torch 2.7, 1e-4 on 2.14
    np.testing.assert_allclose(forward.matvec(v), reference, rtol=5e-4, atol=1e-5 * np.abs(reference).max())
    assert forward.mode == "reverse-over-forward" and forward.note is None
    assert forward.loss == pytest.approx(double.loss, rel=1e-6)
    assert all(torch.equal(c, layer.weight) for c, layer in zip(codes, model.layers, strict=True))
