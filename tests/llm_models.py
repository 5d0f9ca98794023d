"""Tiny randomly initialised causal LMs saved with ``save_pretrained``, with a real fast tokenizer, for tests.

Llama, Qwen2 and Phi-3 configurations of a few thousand parameters; the tokenizer is a byte-level BPE
trained here on a few sentences (offline), with ``<s>`` prepended like Llama's and ``</s>`` as eos.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: the correct answer is true false",
    "solution1 solution2 answer1 answer2 answer3 answer4 answer5 ending1 ending2 ending3 ending4 option1 option2",
    "Answer format: Please answer the following question with true or false. Question: is the sky blue?",
]


def tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 300):
    """A byte-level BPE trained on ``corpus`` (default: a few prompt sentences), ``<s>`` prepended, ``</s>`` eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def config(family: str, vocab_size: int):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "phi3":
        return Phi3Config(**{**common, "pad_token_id": 2})
    raise ValueError(family)


def save_tiny_causal_lm(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """A random ``family`` causal LM and its tokenizer saved in ``path`` (created); returns the path."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config(family, len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
