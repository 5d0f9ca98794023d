"""The paper's generation-based evaluation of a causal LM (LLM-Adapters' ``commonsense_evaluate.py``): beam
search after each prompt, the first match of the task's answer pattern, accuracy per task. Re-exported by
:mod:`adapters.models.hf`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapters.errors import UserError
from adapters.models.base import ModelEntry
from adapters.models.hf_hub import PREFIX, resolve, tokenizer

# LLM-Adapters' answer extraction (commonsense_evaluate.py): the first match in the generated text.
ANSWERS_1_5 = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": ANSWERS_1_5,
    "arc-challenge": ANSWERS_1_5,
    "arc-easy": ANSWERS_1_5,
    "openbookqa": ANSWERS_1_5,
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


# --------------------------------------------------------------------------- generation-based accuracy


def answer_pattern(task: str) -> str:
    """LLM-Adapters' answer pattern of a commonsense task (case-insensitive task name)."""
    pattern = ANSWER_PATTERNS.get(task.lower())
    if pattern is None:
        raise UserError(f"no answer pattern for task '{task}': use one of {', '.join(ANSWER_PATTERNS)}")
    return pattern


def extract_answer(task: str, text: str) -> str:
    """The first match of the task's answer pattern in ``text`` ('' when none)."""
    found = re.search(answer_pattern(task), text)
    return found.group(0) if found else ""


def _tokenizer_of(tokenizer_or_entry):
    if isinstance(tokenizer_or_entry, ModelEntry):
        return tokenizer(resolve(tokenizer_or_entry.name.removeprefix(PREFIX)))
    return tokenizer_or_entry


def generation_config(tok, max_new_tokens: int, num_beams: int):
    """The paper's decoding (LLM-Adapters: beam search, no sampling); no penalties from the model's defaults."""
    from transformers import GenerationConfig

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )


@torch.no_grad()
def _generate_batch(model: nn.Module, prompts: list[list[int]], pad: int, config) -> torch.Tensor:
    """Generated token ids after the prompts (left-padded to one width), ``(B, new tokens)``."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return out[:, width:].cpu()


def generate_texts(
    scorer: nn.Module,
    tokenizer_or_entry,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 4,
) -> list[str]:
    """Per prompt, the text the model generates after it (special tokens dropped).

    Prompts are batched by length (left padding within a batch) to waste little compute on padding.
    """
    tok = _tokenizer_of(tokenizer_or_entry)
    model = getattr(scorer, "backbone", scorer)  # through peft's wrappers too
    config = generation_config(tok, max_new_tokens, num_beams)
    ids = tok(list(prompts))["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts = [""] * len(ids)
    training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            new = _generate_batch(model, [ids[i] for i in index], config.pad_token_id, config)
            for i, text in zip(index, tok.batch_decode(new, skip_special_tokens=True), strict=True):
                texts[i] = text
    finally:
        model.train(training)
    return texts


def generate_answers(
    scorer: nn.Module,
    tokenizer_or_entry,
    records: Sequence[Mapping],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 4,
) -> list[str]:
    """Per record, the answer extracted from the text generated after its prompt ('' if none)."""
    for record in records:
        answer_pattern(record["task"])  # an unknown task fails before any generation
    prompts = [r["prompt"] for r in records]
    texts = generate_texts(scorer, tokenizer_or_entry, prompts, batch_size, max_new_tokens, num_beams)
    return [extract_answer(r["task"], text) for r, text in zip(records, texts, strict=True)]


def generate_accuracy(
    scorer: nn.Module,
    tokenizer_or_entry,
    records: Sequence[Mapping],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 4,
) -> dict:
    """The paper's evaluation: generated answer == ``record["answer"]``.

    Returns ``{"accuracy", "per_task": {task: {"accuracy", "n"}}, "n"}``.
    """
    if not records:
        raise UserError("no records to evaluate: pass a non-empty split")
    predicted = generate_answers(scorer, tokenizer_or_entry, records, batch_size, max_new_tokens, num_beams)
    per_task: dict[str, list[bool]] = {}
    for record, answer in zip(records, predicted, strict=True):
        per_task.setdefault(record["task"], []).append(answer == record["answer"])
    hits = [h for v in per_task.values() for h in v]
    return {
        "accuracy": sum(hits) / len(hits),
        "per_task": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())},
        "n": len(hits),
    }


__all__ = [
    "ANSWER_PATTERNS",
    "answer_pattern",
    "extract_answer",
    "generate_accuracy",
    "generate_answers",
    "generate_texts",
    "generation_config",
]
