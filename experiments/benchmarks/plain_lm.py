"""The baseline every language-model throughput figure is a ratio against: a plain transformers loop.

What a researcher writes without this toolkit to score multiple-choice answers: each answer
candidate as its own sequence ``prompt + candidate``, right-padded into batches of ``batch_size``
sequences, ``model(input_ids=..., attention_mask=...)`` over the whole sequence, then a gather of the
answer tokens' log-probabilities from the full-vocabulary logits. One grid point per pass: nothing
is shared between candidates or between points.

Examples are token ids, ``(prompt_ids, [candidate_ids, ...])``, so the loop needs no tokenizer and a
benchmark can fabricate them for any vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

Example = tuple[Sequence[int], Sequence[Sequence[int]]]


def sequences(examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Every (prompt + candidate) sequence with the number of its answer tokens, in example order."""
    return [(list(prompt) + list(cand), len(cand)) for prompt, cands in examples for cand in cands]


@torch.no_grad()
def plain_loop(model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 8,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, int, float]:  # fmt: skip
    """Score every candidate with one plain forward per batch of sequences.

    Returns ``(scores, tokens, seconds)``: the summed answer-token log-probability of each candidate
    (in :func:`sequences` order), the number of tokens fed to the model (padding included, as it is
    computed), and the wall time.
    """
    seqs = sequences(examples)
    scores, tokens = [], 0
    start = time.perf_counter()
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (seq, _) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, (seq, answer) in enumerate(chunk):
            scores.append(logp[row, len(seq) - 1 - answer : len(seq) - 1].sum().cpu())
        tokens += ids.numel()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return torch.stack(scores), tokens, time.perf_counter() - start


def fabricate_examples(n: int, vocab: int, prompt_len: int = 48, answer_len: int = 3, candidates: int = 4,
                       seed: int = 0) -> list[Example]:  # fmt: skip
    """``n`` random examples shaped like the commonsense suite (a prompt, several short candidates)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab, (plen,), generator=g).tolist()
        cands = [torch.randint(3, vocab, (answer_len,), generator=g).tolist() for _ in range(candidates)]
        out.append((prompt, cands))
    return out
