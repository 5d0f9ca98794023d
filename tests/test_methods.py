"""Budget matching and the rank of adapter updates, against peft itself and numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adapters.methods import (
    MethodSpec,
    attach,
    lora_params,
    match_lora_rank,
    match_randlora_rank,
    randlora_params,
    target_shapes,
    trainable_params,
)
from adapters.solution import load_solution, save_solution


@pytest.fixture(scope="module")
def base(tiny_entry):
    return tiny_entry.build(5)


def _head_params(model) -> int:
    return sum(p.numel() for p in model.task_head.parameters())


@pytest.mark.parametrize("rank", [1, 3, 4, 7])
def test_closed_form_counts_equal_peft(base, tiny_entry, rank):
    shapes = target_shapes(base, tiny_entry.targets)
    for method, closed in (("lora", lora_params), ("randlora", randlora_params)):
        model = attach(copy.deepcopy(base), MethodSpec(method, rank), tiny_entry.targets)
        assert trainable_params(model) - _head_params(base) == closed(shapes, rank)


def test_budget_matching_is_the_argmin(base, tiny_entry):
    shapes = target_shapes(base, tiny_entry.targets)
    for r in (1, 2, 4, 8, 16):
        target = randlora_params(shapes, r)
        best = match_lora_rank(shapes, r)
        brute = min(range(1, 33), key=lambda k: (abs(lora_params(shapes, k) - target), k))
        assert best == brute
        target = lora_params(shapes, r)
        brute = min(range(1, 33), key=lambda k: (abs(randlora_params(shapes, k) - target), k))
        assert match_randlora_rank(shapes, r) == brute


def test_lowering_randlora_rank_raises_its_count():
    shapes = [(96, 32), (32, 32)]
    assert randlora_params(shapes, 2) > randlora_params(shapes, 8) > randlora_params(shapes, 32)


def _randomise_adapter(model, seed: int) -> None:
    """Generic adapter values. RandLoRA's λ, γ get magnitudes in [0.5, 1.5] (random signs): Gaussian
    diagonals make ΔW full rank too, but often so ill-conditioned that fp32 rounding hides the rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:
                magnitude = torch.rand(p.shape, generator=g) + 0.5
                sign = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
                p.copy_(0.1 * magnitude * sign if "randlora_" in name else 0.1 * torch.randn(p.shape, generator=g))


def test_update_ranks_randlora_full_lora_at_most_r(base, tiny_entry, tmp_path):
    rank = 4
    for method in ("lora", "randlora"):
        model = attach(copy.deepcopy(base), MethodSpec(method, rank), tiny_entry.targets)
        _randomise_adapter(model, seed=1)
        info = {"method": method, "model": "tiny-bert", "num_classes": 5, "rank": rank}
        save_solution(tmp_path / method, model, info, {})
        delta = load_solution(tmp_path / method, base=base).delta()
        layers = [n for n in delta if not n.startswith("task_head.")]
        assert len(layers) == len(target_shapes(base, tiny_entry.targets))
        for name in layers:
            d = delta[name].numpy()  # float32: numpy uses the float32 tolerance
            numeric_rank = np.linalg.matrix_rank(d)
            if method == "lora":
                assert numeric_rank == rank, name
            else:
                assert numeric_rank == min(d.shape), name


def test_delta_equals_merged_weights_minus_base(base, tiny_entry, tmp_path):
    """Solution.delta() equals peft's own merge (merge_and_unload) minus the base weights."""
    model = attach(copy.deepcopy(base), MethodSpec("randlora", 4), tiny_entry.targets)
    _randomise_adapter(model, seed=2)
    save_solution(tmp_path / "r", model, {"method": "randlora", "model": "tiny-bert", "num_classes": 5}, {})
    delta = load_solution(tmp_path / "r", base=base).delta()
    merged = dict(model.merge_and_unload().named_parameters())
    for name, p in base.named_parameters():
        expected = merged[name].detach() - p.detach()
        got = delta.get(name, torch.zeros_like(p))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_randlora_solution_is_compact_and_a_tampered_basis_checksum_is_refused(base, tiny_entry, tmp_path):
    import json

    from adapters.errors import UserError

    model = attach(copy.deepcopy(base), MethodSpec("randlora", 4), tiny_entry.targets)
    _randomise_adapter(model, seed=3)
    save_solution(tmp_path / "r", model, {"method": "randlora", "model": "tiny-bert", "num_classes": 5}, {})
    config = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert config["save_projection"] is False  # bases regenerated from the seed, not stored
    expected = dict(model.merge_and_unload().named_parameters())
    delta = load_solution(tmp_path / "r", base=base).delta()
    name = "backbone.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(delta[name], expected[name].detach() - dict(base.named_parameters())[name].detach())
    record = tmp_path / "r" / "randlora_bases.json"
    text = record.read_text()
    record.write_text(text.replace(text[text.index('"sha256"') + 12 : text.index('"sha256"') + 20], "00000000"))
    with pytest.raises(UserError, match="differ"):
        load_solution(tmp_path / "r", base=base)
