"""A foreign RandLoRA adapter's bases are read once (issue 20 point 3).

peft's ``save_pretrained`` writes RandLoRA's shared random bases once per adapted layer (7.5× a small model's own
bytes), and peft's loader read the whole file: a foreign plane peaked at 8× the model. :func:`adapters.solutions.
deltas.read_adapter_file` reads each copy after the first one at a time and makes it the first tensor. Checked
against peft's own loader (the reference): the same ΔW per module, and the copies share one tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.solutions import deltas as D
from tests.llm_models import save_tiny_causal_lm

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from peft import RandLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("shared")
    base_dir = save_tiny_causal_lm(root / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=TARGETS, projection_prng_key=3))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    peft_model.save_pretrained(root / "randlora")
    return base, root / "randlora"


def test_copies_of_the_bases_are_one_tensor(saved):
    _, folder = saved
    state = D.read_adapter_file(folder / "adapter_model.safetensors")
    from safetensors.torch import load_file

    whole = load_file(folder / "adapter_model.safetensors")
    assert state.keys() == whole.keys()
    for k in whole:
        assert torch.equal(state[k], whole[k]), k
    for suffix in (".randlora_A", ".randlora_B"):
        copies = [v for k, v in state.items() if suffix in k]
        assert len(copies) >= 2 * len(TARGETS)  # the file holds one per adapted layer (2 layers)
        assert len({v.data_ptr() for v in copies}) == 1, f"{suffix}: copies not shared"


def test_deltas_equal_peft_own_loading(saved):
    from peft import PeftModel

    base, folder = saved
    ours = D.merged_deltas(D.load_adapter(folder, base, quiet=True), base, str(folder))[0]
    reference = PeftModel.from_pretrained(copy.deepcopy(base), folder)  # peft's own loader, whole file
    modules = dict(reference.named_modules())
    assert ours
    for name, delta in ours.items():
        module = modules[D.PEFT_PREFIX + name.removesuffix(".weight")]
        want = module.get_delta_weight("default").float()
        torch.testing.assert_close(delta(), want, rtol=1e-5, atol=1e-7)


def test_a_differing_copy_stays_its_own(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    state = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in sorted(state) if k.endswith(".randlora_B"))
    state[key] = state[key] + 1
    save_file(state, tmp_path / "a.safetensors")
    read = D.read_adapter_file(tmp_path / "a.safetensors")
    assert torch.equal(read[key], state[key])
    others = [v for k, v in read.items() if k.endswith(".randlora_B") and k != key]
    assert all(v.data_ptr() != read[key].data_ptr() for v in others)


@pytest.fixture(scope="module")
def foreign_lora(tmp_path_factory, saved):
    from peft import LoraConfig, get_peft_model

    base, _ = saved
    root = tmp_path_factory.mktemp("lora")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    peft_model.save_pretrained(root)
    return root


@pytest.mark.parametrize("which", ["lora", "randlora"])
def test_foreign_adapters_add_from_their_factors(saved, foreign_lora, which, monkeypatch):
    """A foreign LoRA / RandLoRA on the plane: W0 + c·ΔW built from the factors (one addmm), never by merging a
    dense fp64 copy of the layer: counted by instrumenting merge_module. Values: peft's merge (the reference)."""
    base, randlora = saved
    folder = foreign_lora if which == "lora" else randlora
    deltas = D.merged_deltas(D.load_adapter(folder, base, quiet=True), base, str(folder))[0]
    params = dict(base.named_parameters())
    references = {name: d() for name, d in deltas.items()}  # merge_module: peft's merge, fp64
    merges = []
    original = D.merge_module
    monkeypatch.setattr(D, "merge_module", lambda *a, **k: merges.append(1) or original(*a, **k))
    for name, delta in deltas.items():
        out = params[name].detach().float().clone()
        delta.add_to(out, 0.5)
        torch.testing.assert_close(out, params[name].float() + 0.5 * references[name], rtol=1e-5, atol=1e-6)
    assert merges == [], f"{len(merges)} dense merges for {len(deltas)} plane weights"
