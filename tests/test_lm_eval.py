"""Causal-LM evaluation: shared prompt forwards and token-budget batches, against independent references.

- :class:`adapters.models.lm_scoring.CausalLMScorer`'s shared-prompt path (one prefix forward per sample with a
  KV cache, each candidate continued from a copy of it, logits only at answer positions) equals the plain
  transformers loop :func:`experiments.benchmarks.plain_lm.plain_loop` (each candidate its own sequence,
  ``model(**batch)`` + a gather) and a direct one-sequence-at-a-time loop, to 1e-5 in fp32, on tiny random
  Llama, Qwen2 and Phi-3 models: right padding, prompts of different lengths, multi-token answers, padding
  candidates, candidates that differ before their answer (a BPE merge across the boundary), an answer right
  after the first token (nothing to share);
- ``gold=`` scores the gold candidates alone; training mode, autograd and the fallback for other model
  families give the same numbers (the fallback warns once);
- :meth:`adapters.models.base.Encoded.token_batches` respects its budget and covers every sample once; the
  evaluation set's batching follows ``--eval-tokens`` and the scores do not; the grid's point losses equal
  the full-sequence path's; ``eval_tokens`` is in the grid's key and not in the training key.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from tests.llm_data import write_commonsense
from tests.llm_models import config, save_tiny_causal_lm

VOCAB = 300


def _model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(family, VOCAB)).eval()


def _examples() -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, candidates) with several shapes: candidate counts 1-4, answers of 1-4 tokens, prompts of 0-15,
    answers that begin alike (LLM-Adapters' "the correct answer is ..."), one that is all of that common part."""
    from experiments.benchmarks.plain_lm import fabricate_examples

    out = fabricate_examples(5, VOCAB, prompt_len=14, answer_len=3, candidates=4, seed=3)
    prompt, cands = out[1]
    out[1] = (prompt, [cands[0][:1], cands[1] + [7], cands[2][:2]])  # 3 candidates of 1, 4 and 2 tokens
    out.append(([1], [[5, 6], [8]]))  # the answer right after the first token: only that token is shared
    out.append((out[0][0][:9], [[11, 12, 13]]))  # one candidate
    out.append(([], [[5, 6, 7], [8, 9]]))  # no prompt, candidates apart from their first token: nothing to share
    out.append((out[2][0][:6], [[20, 21, 5], [20, 21, 6, 7], [20, 21], [20, 22]]))  # scored tokens shared
    return out


def _encode(examples, merged: bool = False):
    """(B, C, T) right-padded inputs of ``examples``. ``merged``: in each sample's second candidate the prompt's
    last token is replaced, as a BPE merge across the prompt/answer boundary does, so the candidates' common
    prefix is shorter than the prompt."""
    c = max(len(cands) for _, cands in examples)
    t = max(len(p) + len(x) for p, cands in examples for x in cands)
    ids = torch.zeros(len(examples), c, t, dtype=torch.long)
    mask, answer = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (prompt, cands) in enumerate(examples):
        for j, cand in enumerate(cands):
            seq = list(prompt) + list(cand)
            if merged and j == 1 and len(prompt) > 1:
                seq[len(prompt) - 1] = 4
            ids[i, j, : len(seq)] = torch.tensor(seq)
            mask[i, j, : len(seq)] = 1
            answer[i, j, len(prompt) : len(seq)] = True
    return {"input_ids": ids, "attention_mask": mask, "answer_mask": answer}


def _direct(model, batch) -> torch.Tensor:
    """(B, C) summed answer-token cross-entropy, one candidate at a time, full logits, no padding at all."""
    ids, mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    out = torch.zeros(ids.shape[:2])
    for b in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            n = int(mask[b, c].sum())
            if n == 0:
                continue
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[b, c, :n][None]).logits[0].float(), -1)
            t = answer[b, c, 1:n].nonzero().squeeze(-1) + 1
            out[b, c] = -logp[t - 1, ids[b, c, t]].sum()
    return out


class _Calls:
    """Counts the decoder's forwards and the token positions they compute."""

    def __init__(self, module):
        self.calls, self.tokens = 0, 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.tokens += kwargs["input_ids"].numel()


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("pack", [True, False])
def test_shared_prompts_equal_the_plain_loop(family, merged, pack):
    from adapters.models.lm_scoring import CausalLMScorer
    from experiments.benchmarks.plain_lm import plain_loop

    model, examples = _model(family), _examples()
    batch = _encode(examples, merged)
    scorer = CausalLMScorer(model, pack_candidates=pack).eval()
    calls = _Calls(scorer._decoder())
    with torch.no_grad():
        out = scorer(**batch)
    # the full-sequence forward of the sample that shares nothing, then the prefixes and their continuations
    # packed into one forward (pack) or the prefixes with a KV cache and the continuations from it
    assert calls.calls == (2 if pack else 3)
    real = batch["attention_mask"].any(-1)
    assert out[..., 1].tolist() == batch["answer_mask"][..., 1:].sum(-1).float().tolist()
    assert (out[~real] == 0).all()
    want = _direct(model, batch)
    torch.testing.assert_close(out[..., 0], want, rtol=0, atol=1e-5)
    if not merged:  # the plain transformers loop over the same examples (its own padding and batches; it scores
        # an answer after a prompt, so not the sample without one)
        prompted = [i for i, (prompt, _) in enumerate(examples) if prompt]
        plain, _, _ = plain_loop(model, [examples[i] for i in prompted], batch_size=5)
        torch.testing.assert_close(-out[prompted, :, 0][real[prompted]], plain, rtol=0, atol=1e-5)


def test_packed_candidates_under_eager_attention_equal_the_direct_loop():
    """The eager attention adds its mask: the packed forward's block mask goes in additive form."""
    from transformers import AutoModelForCausalLM

    from adapters.models.lm_scoring import CausalLMScorer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config("qwen2", VOCAB), attn_implementation="eager").eval()
    batch = _encode(_examples(), merged=True)
    scorer = CausalLMScorer(model).eval()
    assert scorer._packs(scorer._decoder())
    with torch.no_grad():
        out = scorer(**batch)
    torch.testing.assert_close(out[..., 0], _direct(model, batch), rtol=0, atol=1e-5)


def test_shared_prompts_compute_fewer_positions():
    """A sample's common prefix runs once: for 4 candidates of ``[30, 31] + 3 tokens`` after a 40-token prompt,
    the prompt and the answers' common start once per sample, only the candidates' own tokens per candidate;
    the LM head runs once per sample for the positions inside the common prefix (the last of them predicts
    each candidate's first own token) and once per candidate after it. Counted here from the token lists."""
    from adapters.models.lm_scoring import CausalLMScorer
    from experiments.benchmarks.plain_lm import fabricate_examples

    examples = fabricate_examples(4, VOCAB, prompt_len=40, answer_len=3, candidates=4)
    examples = [(p + [3] * (40 - len(p)), [[30, 31, *c] for c in cands]) for p, cands in examples]
    batch, model = _encode(examples), _model("llama")
    scorer = CausalLMScorer(model).eval()
    calls = _Calls(scorer._decoder())
    rows = []
    scorer.backbone.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    with torch.no_grad():
        scorer(**batch)
    want_tokens = want_rows = 0
    for prompt, cands in examples:
        seqs = [prompt + c for c in cands]
        common = next(i for i in range(len(seqs[0]) + 1) if i == min(map(len, seqs)) or len({s[i] for s in seqs}) > 1)
        want_tokens += common + sum(len(s) - common for s in seqs)
        scored = [range(len(prompt) - 1, len(s) - 1) for s in seqs]  # logits positions predicting answer tokens
        want_rows += len({p for r in scored for p in r if p < common}) + sum(p >= common for r in scored for p in r)
    assert calls.tokens == want_tokens == 4 * 42 + 16 * 3  # 40 + 2 shared tokens per sample, 3 own per candidate
    assert sum(rows) == want_rows == 4 * 3 + 16 * 2
    scorer.share_prompts = False
    with torch.no_grad():
        scorer(**batch)
    assert calls.tokens - want_tokens == 16 * 45


def test_gold_training_autograd_and_fallback_give_the_same_numbers(monkeypatch):
    from adapters.models import lm_scoring
    from adapters.models.lm_scoring import CausalLMScorer

    model, batch = _model("qwen2"), _encode(_examples())
    scorer = CausalLMScorer(model).eval()
    with torch.no_grad():
        want = scorer(**batch)
    gold = torch.tensor([0, 2, 1, 3, 0, 1, 0, 1, 2])
    with torch.no_grad():
        only = scorer(**batch, gold=gold)
    picked = torch.zeros_like(want, dtype=torch.bool)
    picked[torch.arange(len(gold)), gold] = True
    torch.testing.assert_close(only[picked], want[picked], rtol=0, atol=1e-5)
    assert (only[~picked] == 0).all()
    with torch.enable_grad():  # autograd on (curvature's HVPs): the full path, differentiable
        torch.testing.assert_close(scorer(**batch), want, rtol=0, atol=1e-5)
    scorer.train()  # training: the full path, no warning (a tiny model without dropout gives the same numbers)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        torch.testing.assert_close(scorer(**batch), want, rtol=0, atol=1e-5)
    scorer.eval()
    monkeypatch.setattr(lm_scoring, "SHARED_FAMILIES", frozenset())  # an unknown family
    with pytest.warns(RuntimeWarning, match="not known to be decoder"), torch.no_grad():
        torch.testing.assert_close(scorer(**batch), want, rtol=0, atol=1e-5)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # once
        scorer(**batch)


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_shared_prompts_through_peft_adapters(method):
    """LoRA / RandLoRA attached by peft around the scorer: shared prompts equal full sequences, ``gold=`` passes."""
    from adapters.methods import MethodSpec, attach
    from adapters.models.lm_scoring import CausalLMScorer

    batch = _encode(_examples())
    torch.manual_seed(0)
    model = attach(CausalLMScorer(_model("llama")), MethodSpec(method, rank=2), ("q_proj", "v_proj", "up_proj"))
    for p in model.parameters():
        if p.requires_grad:  # B = 0 would leave ΔW = 0
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    scorer = next(m for m in model.modules() if isinstance(m, CausalLMScorer))
    gold = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    with torch.no_grad():
        shared, only = model(**batch), model(**batch, gold=gold)
        scorer.share_prompts = False
        full = model(**batch)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(only[:, 0], full[:, 0], rtol=0, atol=1e-5)
    assert (only[:, 1:] == 0).all()


def test_token_batches_respect_the_budget_and_cover_every_sample():
    from adapters.models.base import Encoded

    g = torch.Generator().manual_seed(0)
    n, c, t = 40, 4, 30
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    counts = torch.randint(1, c + 1, (n,), generator=g)
    mask = torch.zeros(n, c, t, dtype=torch.long)
    for i in range(n):
        mask[i, : counts[i], : lengths[i]] = 1
    data = Encoded({"input_ids": torch.ones_like(mask), "attention_mask": mask}, lengths=lengths)
    assert data.has_candidates and data.sequences().tolist() == counts.tolist()
    for budget in (1, 100, 500, 10**6):
        parts = data.token_batches(budget)
        seen = torch.cat(parts)
        assert sorted(seen.tolist()) == list(range(n))
        assert lengths[seen].diff().ge(0).all()  # length order
        for part in parts:
            padded = int(counts[part].sum()) * int(lengths[part].max())
            assert padded <= budget or len(part) == 1
        if budget == 10**6:
            assert len(parts) == 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=24, n_test=4)


def _loaded(llama, data_root, out, *flags):
    from landscape.config import from_argv
    from landscape.run import load

    argv = ["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root), "--out", str(out),
            "--no-progress", "--eval-samples", "24", *flags]  # fmt: skip
    return load(from_argv(argv))


def test_eval_tokens_changes_batching_not_numbers_and_keys_the_grid_only(llama, data_root, tmp_path):
    from adapters.data import eval_subset
    from adapters.objectives import score
    from landscape.connectivity import check_grid_store
    from landscape.engine.grid import EvalSet, PlaneEvaluator
    from landscape.engine.plane import SOLUTIONS, build_chart, solution_weights
    from landscape.run import eval_set, train_key

    device = torch.device("cpu")
    small = _loaded(llama, data_root, tmp_path / "a", "--eval-tokens", "200")
    large = _loaded(llama, data_root, tmp_path / "b", "--eval-tokens", "100000")
    evals = {k: eval_set(loaded, "cpu") for k, loaded in (("small", small), ("large", large))}
    assert len(evals["small"].batches) > 3 and len(evals["large"].batches) == 1
    for inputs, _ in evals["small"].batches:
        rows = int(inputs["attention_mask"].any(-1).sum())
        assert rows * inputs["input_ids"].shape[-1] <= 200 or inputs["input_ids"].shape[0] == 1
    assert eval_set(_loaded(llama, data_root, tmp_path / "c"), "cpu").n == 24  # the default budget: 8192 on CPU

    base = small.task.base.eval()
    objective = small.task.objective
    forward = lambda inputs: base(**inputs)  # noqa: E731
    results = {k: score(forward, e.batches, e.n, objective, keep_samples=True)[0] for k, e in evals.items()}
    assert abs(results["small"].loss - results["large"].loss) < 1e-5
    assert results["small"].accuracy == results["large"].accuracy

    # the grid's point losses: shared prompts and token batches against the full path on the old batching
    # (before this change: 16 × eval_batch tokens counted per sample, whatever its candidates)
    params = dict(base.named_parameters())
    g = torch.Generator().manual_seed(0)
    names = [n for n in params if n.endswith(("q_proj.weight", "up_proj.weight"))]
    deltas = {s: {n: 0.05 * torch.randn(params[n].shape, generator=g) for n in names} for s in SOLUTIONS}
    chart = build_chart("paper", solution_weights(params, deltas))
    points = [(0.0, 0.0), (1.0, 0.0), (0.3, 0.7), (-0.2, 1.1)]
    new = PlaneEvaluator(base, chart, evals["small"], device, objective=objective).evaluate_many(points)
    subset = eval_subset(small.task.dataset.train, 24, 0)  # the run's evaluation subset (seed 0)
    data = small.task.entry.encode(subset.inputs)
    old_batches = EvalSet([(data.batch(i), subset.labels[i]) for i in data.length_order().split(5)], 24)
    plain = type(base)(base.backbone, share_prompts=False)
    old = PlaneEvaluator(plain, chart, old_batches, device, objective=objective).evaluate_many(points)
    for a, b in zip(new, old, strict=True):
        assert abs(a.loss - b.loss) < 1e-5 and a.accuracy == b.accuracy

    # keys: the grid's settings hold eval_tokens, the training key does not
    stores = [check_grid_store(loaded, device, 0) for loaded in (small, large)]
    assert stores[0].config["eval_tokens"] == 200 and stores[1].config["eval_tokens"] == 100000
    assert stores[0].config != stores[1].config
    assert train_key(small, "lora", device) == train_key(large, "lora", device)


def test_eval_tokens_must_be_positive():
    from adapters.errors import UserError
    from landscape.config import from_argv

    with pytest.raises(UserError, match="--eval-tokens 0: must be an integer >= 1"):
        from_argv(["--eval-tokens", "0"])
    assert from_argv([]).eval_tokens_for("cpu") == 8192 and from_argv([]).eval_tokens_for("cuda") == 65536
    lm = ["--dataset", "commonsense", "--model", "hf:Qwen/Qwen2-0.5B-Instruct"]
    assert from_argv([*lm, "--eval-tokens", "300"]).eval_tokens_for("cuda") == 300
