"""A converting load (bf16 from fp32 files, 4-bit) reads the checkpoint tensor by tensor (issue 20 point 3).

transformers maps safetensors files and every page it reads for a conversion stays resident until the load
ends: a bf16 load of fp32 files peaked at 3× the bf16 model, a 4-bit one at 7-8×. :func:`adapters.models.hf.
streamed_state` reads each tensor with ``pread`` instead. Checked here against transformers' own mapped load
of the same folder (the reference): the same weights bit for bit (bf16, and 4-bit's packed codes and
statistics), that the streamed path is the one taken (by instrumenting ``from_pretrained``), and that a load
which keeps the file's dtype stays transformers' own mapped load.
"""

from __future__ import annotations

import pytest
import torch

from adapters.models import hf
from tests.llm_models import save_tiny_causal_lm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "base")


def _calls(monkeypatch) -> list[dict]:
    """Record the state dicts given to the concrete class's from_pretrained."""
    from transformers import PreTrainedModel

    seen: list[dict] = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append({"state_dict": kwargs.get("state_dict"), "where": args[0] if args else None})
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return seen


def test_bf16_load_is_streamed_and_equals_the_mapped_load(llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = _calls(monkeypatch)
    model = hf.entry(str(llama), "lm", {"torch_dtype": "bfloat16"}).build(0)
    assert any(isinstance(c["state_dict"], hf._LazyState) for c in seen), "the bf16 load did not stream"
    reference = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    ours, theirs = model.backbone.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype == torch.bfloat16
        assert torch.equal(ours[k], theirs[k]), k
    assert model.backbone.generation_config.eos_token_id == reference.generation_config.eos_token_id


def test_fp32_load_stays_mapped(llama):
    assert hf.streamed_state(str(llama), torch.float32, quantised=False) is None
    assert hf.streamed_state(str(llama), torch.bfloat16, quantised=False) is not None
    assert hf.streamed_state(str(llama), torch.float32, quantised=True) is not None
    assert hf.streamed_state(str(llama.parent), torch.bfloat16, quantised=False) is None  # no weights there


def test_4bit_load_is_streamed_and_packs_the_same_codes(llama, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    hf.set_4bit_device("cpu")
    seen = _calls(monkeypatch)
    model = hf.entry(str(llama), "lm", {"load_4bit": True}).build(0)
    assert any(isinstance(c["state_dict"], hf._LazyState) for c in seen), "the 4-bit load did not stream"
    reference = AutoModelForCausalLM.from_pretrained(llama, **hf._load_kwargs(hf.check_options({"load_4bit": True})))
    ours = dict(model.backbone.named_parameters())
    theirs = dict(reference.named_parameters())
    packed = 0
    for name, p in theirs.items():
        q = ours[name]
        assert torch.equal(q.data.view(torch.uint8), p.data.view(torch.uint8)) if q.dtype == torch.uint8 else \
            torch.equal(q.data.float(), p.data.float()), name  # fmt: skip
        if getattr(p, "quant_state", None) is not None:
            packed += 1
            assert torch.equal(q.quant_state.absmax, p.quant_state.absmax), name
            assert torch.equal(q.quant_state.state2.absmax, p.quant_state.state2.absmax), name
    assert packed > 0
