"""``--model hf:ID_OR_PATH``: tiny random transformers models saved in tmp_path, checked against plain references.

References: HF's own causal-LM loss (labels = -100 on the prompt), ``model.generate`` one record at a time,
the built-in ``minilm`` entry, explicit module-name lists per architecture.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from adapters.errors import UserError
from adapters.methods.budget import adapted_weights, matches_target
from adapters.models import build_base, get_model, hf, is_hf, minilm, model_names

WORDS = (
    "### Instruction: Response: please answer the question is correct choose true false solution1 solution2 "
    "option1 option2 answer1 answer2 answer3 answer4 answer5 ending1 ending2 ending3 ending4 a b c d e f g h"
).split()
SPECIALS = ["<unk>", "<s>", "</s>"]
RECORDS = [
    {
        "prompt": "### Instruction: please answer the question a b c ### Response:",
        "candidates": [" the correct answer is true", " the correct answer is false"],
        "task": "boolq",
        "answer": "true",
    },
    {
        "prompt": "### Instruction: choose d e ### Response:",
        "candidates": [f" the correct answer is ending{k}" for k in range(1, 5)],
        "task": "hellaswag",
        "answer": "ending2",
    },
    {
        "prompt": "### Instruction: f g h a b c d e please choose ### Response:",
        "candidates": [" the correct answer is option1", " the correct answer is option2"],
        "task": "winogrande",
        "answer": "option1",
    },
    {
        "prompt": "### Instruction: the question a ### Response:",
        "candidates": [" the correct answer is solution1", " the correct answer is solution2"],
        "task": "piqa",
        "answer": "solution2",
    },
]


def make_tokenizer():
    """A word-level tokenizer over WORDS that adds a BOS, like Llama's (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_causal(folder, family: str = "llama"):
    """A tiny random causal LM of ``family`` with the word-level tokenizer, written by save_pretrained."""
    import transformers

    size = {"vocab_size": len(SPECIALS) + len(WORDS), "bos_token_id": 1, "eos_token_id": 2}
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, num_key_value_heads=2, **size),
        "qwen2": lambda: transformers.Qwen2Config(**common, num_key_value_heads=2, **size),
        "phi3": lambda: transformers.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0, **size),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common, **size),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]())
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(save_causal(tmp_path_factory.mktemp("llama")))


def test_names_and_dispatch():
    assert is_hf("hf:org/x") and not is_hf("minilm") and not is_hf(get_model("minilm"))
    assert "hf:ID_OR_PATH" in model_names()
    assert get_model("minilm") is get_model("minilm", "text", None)


@pytest.mark.parametrize("path", ["shared", "keep_logits", "full_logits"])
def test_scorer_equals_hf_loss_per_candidate(llama_dir, monkeypatch, path):
    if path == "full_logits":  # the path for transformers without ``logits_to_keep``: the full logits
        monkeypatch.setattr(hf.CausalLMScorer, "_keeps_logits", lambda self: False)
    entry = get_model("hf:" + llama_dir, "lm")
    assert entry.options == hf.OPTIONS and entry.defaults["randlora_rank"] == 30
    enc = entry.encode(RECORDS)
    scorer = build_base(entry.name, ["unused"], None, seed=0, modality="lm").eval()
    assert isinstance(scorer, hf.CausalLMScorer)
    scorer.share_prompts = path == "shared"  # else every candidate as its own full sequence
    from adapters.methods import has_head

    assert not has_head(scorer)
    batch = enc.batch(slice(None))
    with torch.no_grad():
        out = scorer(**batch)
    assert out.shape == (len(RECORDS), 4, 2) and out.dtype == torch.float32
    for b, record in enumerate(RECORDS):
        for c in range(4):
            if c >= len(record["candidates"]):
                assert out[b, c].tolist() == [0.0, 0.0]  # padding candidate: count 0
                continue
            length = int(batch["attention_mask"][b, c].sum())
            seq = batch["input_ids"][b, c, :length]
            labels = seq.clone()
            labels[~batch["answer_mask"][b, c, :length]] = -100
            with torch.no_grad():
                loss = scorer.backbone(input_ids=seq[None], labels=labels[None]).loss
            count = int(batch["answer_mask"][b, c, 1:length].sum())
            assert out[b, c, 1].item() == count > 0
            torch.testing.assert_close(out[b, c, 0] / count, loss, rtol=1e-6, atol=1e-6)


def test_scorer_gradients_and_checkpointing(llama_dir):
    """LoRA gradients through the scorer are the same with activation checkpointing on."""
    from adapters.methods import MethodSpec, attach

    entry = get_model("hf:" + llama_dir, "lm")
    batch = entry.encode(RECORDS[:2]).batch(slice(None))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)  # the same LoRA initialisation in both runs
        model = attach(build_base(entry.name, ["x"], seed=0, modality="lm"), MethodSpec("lora", rank=2), entry.targets)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p)  # B = 0 would leave lora_A without a gradient
        if checkpointing:
            model.base_model.model.set_grad_checkpointing(True)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        model(**batch)[..., 0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_encoder_masks_prompt_and_scores_candidate_plus_eos(llama_dir):
    tok = hf.tokenizer(hf.resolve(llama_dir))
    enc = get_model("hf:" + llama_dir, "lm").encode(RECORDS)
    ids, mask, answer = (enc.tensors[k] for k in ("input_ids", "attention_mask", "answer_mask"))
    assert ids.dtype == mask.dtype == torch.int64 and answer.dtype == torch.bool and ids.shape == (4, 4, ids.shape[2])
    for b, record in enumerate(RECORDS):
        prompt = [tok.bos_token_id] + tok.convert_tokens_to_ids(record["prompt"].split())
        real = []
        for c, cand in enumerate(record["candidates"]):
            want = tok.convert_tokens_to_ids(cand.split()) + [tok.eos_token_id]
            length = int(mask[b, c].sum())
            real.append(length)
            assert ids[b, c, :length].tolist() == prompt + want
            assert ids[b, c, answer[b, c]].tolist() == want
            assert answer[b, c, : len(prompt)].sum() == 0 and mask[b, c, length:].sum() == 0
        assert mask[b, len(record["candidates"]) :].sum() == 0
        assert enc.lengths[b] == max(real)
    trimmed = enc.batch(torch.tensor([0, 3]))  # Encoded.batch trims the last dimension
    assert trimmed["input_ids"].shape[-1] == int(enc.lengths[[0, 3]].max())


def test_left_truncation_keeps_bos_and_answer(llama_dir):
    tok = hf.tokenizer(hf.resolve(llama_dir))
    record = {**RECORDS[2], "candidates": [" the correct answer is option1"]}
    enc = get_model("hf:" + llama_dir, "lm", {"cutoff_len": 10}).encode([record])
    ids, answer = enc.tensors["input_ids"][0, 0], enc.tensors["answer_mask"][0, 0]
    want = tok.convert_tokens_to_ids(record["candidates"][0].split()) + [tok.eos_token_id]
    prompt = tok.convert_tokens_to_ids(record["prompt"].split())
    assert ids.tolist() == [tok.bos_token_id] + prompt[-(10 - 1 - len(want)) :] + want
    assert ids[answer].tolist() == want
    with pytest.raises(UserError, match="--cutoff-len") as err:
        get_model("hf:" + llama_dir, "lm", {"cutoff_len": 6}).encode([record])
    assert "\n" not in str(err.value)


def test_text_classifier_on_a_decoder_mean_pools_real_tokens(llama_dir):
    """A causal LM's backbone as a classifier: right padding, mean over real tokens = each text run alone."""
    texts = ["a b c d e f", "the question", "please answer the question is correct"]
    entry = get_model("hf:" + llama_dir, "text", {"cutoff_len": 5})
    model = build_base(entry.name, list("xyz"), seed=0).eval()
    enc = entry.encode(texts)
    assert enc.tensors["attention_mask"][1].tolist() == [1, 1, 1, 0, 0] and enc.lengths.tolist() == [5, 3, 5]
    with torch.no_grad():
        features = model.features(**enc.batch(slice(None)))
        for i in range(len(texts)):
            ids = enc.tensors["input_ids"][i, : int(enc.lengths[i])]
            alone = model.backbone(input_ids=ids[None]).last_hidden_state[0].mean(0)
            torch.testing.assert_close(features[i], alone, rtol=1e-5, atol=1e-6)


def _matched(model: nn.Module, targets) -> set[str]:
    """Every module peft would wrap for ``targets`` (its suffix rule over all modules)."""
    return {n for n, _ in model.named_modules() if n and matches_target(n, targets)}


@pytest.mark.parametrize(
    "family, names",
    [
        ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]),
        ("qwen2", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]),
        ("phi3", ["self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    ],
)
def test_default_targets_per_family(tmp_path, family, names):
    entry = get_model("hf:" + str(save_causal(tmp_path, family)), "lm")
    scorer = entry.create(["x"])
    assert entry.targets == hf.targets_for(scorer)
    expected = {f"backbone.model.layers.{i}.{n}" for i in range(2) for n in names}
    assert _matched(scorer, entry.targets) == expected
    assert set(adapted_weights(scorer, entry.targets)) == {f"{n}.weight" for n in expected}


def test_default_targets_generic_rule_excludes_head(tmp_path):
    """GPT-NeoX is in no family table: every Linear but its output head, and nothing else."""
    entry = get_model("hf:" + str(save_causal(tmp_path, "gpt_neox")), "lm")
    scorer = entry.create(["x"])
    linears = {n for n, m in scorer.named_modules() if isinstance(m, nn.Linear)}
    # the head is `embed_out` before transformers 5.x renamed it `lm_head`: found by identity, not by name
    head = next(n for n, m in scorer.named_modules() if m is scorer.backbone.get_output_embeddings())
    assert head in linears and len(linears) == 2 * 4 + 1
    assert _matched(scorer, entry.targets) == linears - {head}
    assert entry.targets == hf.targets_for(scorer)


def test_minilm_folder_is_the_builtin_minilm():
    glosses = ["a domesticated carnivorous mammal", "the act of running quickly", "a small bright star"]
    entry = get_model("hf:" + str(minilm.model_path()), "text")
    assert entry.targets == minilm.TARGETS and entry.defaults == minilm.ENTRY.defaults
    ours, builtin = build_base(entry.name, list("abcd"), seed=0), build_base("minilm", list("abcd"), seed=0)
    assert ours.state_dict().keys() == builtin.state_dict().keys()  # no pooler, same names
    head = torch.randn(4, builtin.task_head.in_features, generator=torch.Generator().manual_seed(0))
    for model in (ours, builtin):
        model.task_head.weight.data.copy_(head)
        model.eval()
    a, b = entry.encode(glosses), minilm.ENTRY.encode(glosses)
    assert torch.equal(a.tensors["input_ids"], b.tensors["input_ids"]) and torch.equal(a.lengths, b.lengths)
    with torch.no_grad():
        logits, reference = ours(**a.batch(slice(None))), builtin(**b.batch(slice(None)))
    assert logits.abs().max() > 0.01
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_errors_are_one_line(tmp_path, monkeypatch, llama_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        get_model("hf:nobody/no-such-model", "text")
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message and "nobody/no-such-model" in message and "HF_HUB_OFFLINE" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty has no config\.json") as err:
        get_model(f"hf:{empty}", "lm")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such folder"):
        get_model(f"hf:{tmp_path}/missing", "lm")
    with pytest.raises(UserError, match="not a causal language model") as err:
        get_model("hf:" + str(minilm.model_path()), "lm")
    assert "\n" not in str(err.value) and str(minilm.model_path().resolve()) in str(err.value)
    with pytest.raises(UserError, match="--torch-dtype"):
        get_model("hf:" + llama_dir, "lm", {"torch_dtype": "fp8"})


def test_load_4bit_without_bitsandbytes_is_one_line(llama_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(UserError, match="pip install bitsandbytes") as err:  # on CPU too: no CUDA needed
        get_model("hf:" + llama_dir, "lm", {"load_4bit": True})
    assert "\n" not in str(err.value)


# batches of 3 mix prompt lengths (left padding); batches of 2 hold equal lengths
@pytest.mark.parametrize("num_beams, batch_size", [(1, 3), (2, 3), (2, 2)])
def test_generate_accuracy_equals_per_record_loop(llama_dir, num_beams, batch_size):
    entry = get_model("hf:" + llama_dir, "lm")
    scorer = entry.create(["x"]).eval()
    tok = hf.tokenizer(hf.resolve(llama_dir))
    answers = [w for w in WORDS if re.fullmatch(r"true|false|solution\d|option\d|answer\d|ending\d", w)]
    with torch.no_grad():  # make answer words likely, so the extracted answers are not all empty
        scorer.backbone.lm_head.weight[tok.convert_tokens_to_ids(answers)] *= 4
    records = RECORDS * 2
    reference, texts = [], []
    for record in records:
        inputs = tok(record["prompt"], return_tensors="pt")
        out = scorer.backbone.generate(
            **inputs, max_new_tokens=6, num_beams=num_beams, do_sample=False, pad_token_id=tok.eos_token_id
        )
        text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        texts.append(text)
        found = re.findall(hf.ANSWER_PATTERNS[record["task"].lower()], text)
        reference.append(found[0] if found else "")
    kwargs = {"batch_size": batch_size, "max_new_tokens": 6, "num_beams": num_beams}
    assert hf.generate_texts(scorer, tok, [r["prompt"] for r in records], **kwargs) == texts
    assert hf.generate_answers(scorer, entry, records, **kwargs) == reference
    assert any(reference)
    result = hf.generate_accuracy(scorer, tok, records, **kwargs)
    hits = [p == r["answer"] for p, r in zip(reference, records, strict=True)]
    assert result["n"] == len(records) and result["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert result["per_task"]["boolq"] == {"accuracy": (hits[0] + hits[4]) / 2, "n": 2}
    with pytest.raises(UserError, match="no answer pattern for task 'gsm8k'"):
        hf.generate_accuracy(scorer, tok, [{**records[0], "task": "gsm8k"}])
