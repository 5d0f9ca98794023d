"""Scoring answer candidates with a causal LM: one prompt forward shared by a sample's candidates.

:class:`CausalLMScorer` wraps an ``AutoModelForCausalLM`` as the toolkit's model for causal-LM datasets:
``(B, C, T)`` inputs (C candidate sequences ``prompt + answer`` per sample, right-padded) give ``(B, C, 2)`` =
the summed next-token cross-entropy over each candidate's answer tokens and their count
(:class:`adapters.objectives.AnswerLoss` turns those into the loss and accuracy).

**Shared prompts.** In evaluation (``eval()`` and no autograd) the candidates of one sample share their prompt: the
longest prefix common to all of them runs once through the decoder, answer tokens included (LLM-Adapters' answers
all begin "the correct answer is"), and so does the LM head at the prefix's scored positions (their logits see only
shared tokens; each candidate's target is its own). Where the attention takes a custom 4-D mask (``sdpa``,
``eager``), the prefix and every candidate's continuation go through ONE forward as a packed row ``[prefix,
continuation 1, continuation 2, ...]`` with explicit positions and a block mask (each continuation sees the prefix
and itself, causally): every layer runs once per batch, which is what lets the factored plane build each layer's
weights once per batch. Otherwise the prefix runs with a KV cache and every candidate continues from a copy of it
(the cache expanded over the batch's candidates, one row per candidate), with explicit positions and an attention
mask over ``[prefix, continuation]``; ``pack_candidates=False`` takes that path too. Only the hidden states at
scored positions go through the LM head: the vocabulary projection of a whole sequence is the largest activation of
an LLM (T × 151,936 for Qwen2). For C candidates of a prompt of P tokens and answers of A tokens, S of them common,
this computes P + S + C·(A − S) token positions instead of C·(P + A), and S + 1 + C·(A − S − 1) rows of logits
instead of C·(P + A). On the rehearsal's fabricated commonsense data (16 samples, 53 candidates, 4-layer Qwen2-0.5B
shape, one AVX2 thread) sharing the answers' common start took an evaluation from 431 to 289 GFLOP, 5.4 to 3.7 s.

**Full sequences** (the plain path, also what training uses): each candidate as its own sequence through
the whole model (``logits_to_keep`` limits the head to the scored positions where the model takes it).
It is taken in training mode, with autograd on (curvature's Hessian-vector products differentiate the
loss), when ``share_prompts`` is False, and for model families whose forward is not known to be
``decoder → lm_head`` (:data:`SHARED_FAMILIES`; logit soft-capping or scaling would be skipped), or whose
decoder takes no cache argument, or has sliding-window layers: those warn once (``RuntimeWarning``) and
give the same numbers, slower. Both paths agree to fp32 rounding (tests/test_lm_eval.py: ≤ 1e-5 against a
plain per-candidate loop on tiny Llama, Qwen2 and Phi-3 models).

``gold=`` scores only each sample's gold candidate (the others give (0, 0), like padding candidates): what
a loss needs, where accuracy does not matter (curvature).

The batches themselves are cut by a token budget (:meth:`adapters.models.base.Encoded.token_batches`,
:func:`default_eval_tokens`), so a batch of long prompts with many candidates holds fewer samples.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from adapters.models.base import _Quantised, set_checkpointing

# Families whose CausalLM forward is exactly ``lm_head(decoder(...).last_hidden_state)``: no logit
# soft-capping (Gemma 2/3), scaling (Granite, Cohere) or extra heads after the decoder.
SHARED_FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "stablelm", "helium", "smollm3",
})  # fmt: skip
# Config attributes that, when set, change the logits after lm_head: such a model keeps the full path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")

# Evaluation batch sizes in tokens (padded candidate tokens per batch): --eval-tokens' default.
EVAL_TOKENS = {"cpu": 8192, "cuda": 65536}


def default_eval_tokens(device: torch.device | str) -> int:
    """The evaluation token budget for ``device``: 65,536 on CUDA, 8,192 elsewhere."""
    return EVAL_TOKENS.get(torch.device(device).type, EVAL_TOKENS["cpu"])


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier); None when it takes neither."""
    parameters = inspect.signature(type(module).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)  # per-layer types (sliding windows) from the config
    except TypeError:  # transformers without config-aware caches
        return DynamicCache()


class CausalLMScorer(_Quantised, nn.Module):
    """Scores candidate responses with a causal LM: ``(B, C, T)`` inputs -> ``(B, C, 2)`` float32.

    ``[..., 0]``: the summed next-token cross-entropy (fp32, from the logits) over the candidate's answer
    tokens (logits at t-1 predict token t where ``answer_mask[t]``); ``[..., 1]``: their count. A row
    whose attention mask is all zero is a padding candidate: it is not run and gives (0, 0). Rows are
    right-padded. ``share_prompts``: use the shared-prompt path when it applies (module docstring).
    """

    # Rows are selected by content (data-dependent shapes): one grid point per forward, never vmapped.
    batch_grid_points = False

    def __init__(self, backbone: nn.Module, share_prompts: bool = True, pack_candidates: bool = True):
        super().__init__()
        self.backbone = backbone
        self.share_prompts = share_prompts
        self.pack_candidates = pack_candidates
        self._warned = False

    # ------------------------------------------------------------------------ entry

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_mask: torch.Tensor,
        gold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = input_ids.shape[:-1]
        t = input_ids.shape[-1]
        c = shape[-1] if len(shape) >= 2 else 1  # a 2-D input: every row is its own sample
        ids = input_ids.reshape(-1, c, t)
        mask = attention_mask.reshape(ids.shape).bool()
        if gold is not None:  # only the gold candidates run; the rest are padding
            mask = mask & (torch.arange(c, device=ids.device) == gold.reshape(-1, 1))[..., None]
        counted = answer_mask.reshape(ids.shape).bool()[..., 1:] & mask[..., 1:]  # token t scored from logits t-1
        if self._use_shared(ids, mask):
            nll = self._shared_nll(ids, mask, counted)
        else:
            nll = self._full_nll(ids, mask, counted)
        out = torch.stack([nll, counted.sum(-1).to(torch.float32)], -1)
        return out.view(*shape, 2)

    def _use_shared(self, ids: torch.Tensor, mask: torch.Tensor) -> bool:
        if not self.share_prompts or self.training or torch.is_grad_enabled():
            return False
        why = self._unsupported()
        if why is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"causal-LM scoring: {why}; scoring every candidate as a full sequence (same numbers, "
                              "slower)", RuntimeWarning, stacklevel=3)  # fmt: skip
            return False
        # right padding (the encoders' layout): every row's real tokens come first
        lengths = mask.sum(-1, keepdim=True)
        return bool((mask == (torch.arange(mask.shape[-1], device=mask.device) < lengths)).all())

    def _unsupported(self) -> str | None:
        """Why the shared-prompt path cannot run on this model (None: it can)."""
        config = getattr(self.backbone, "config", None)
        family = getattr(config, "model_type", None)
        if family not in SHARED_FAMILIES:
            return f"model family {family!r} is not known to be decoder + lm_head"
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
            return f"{family} transforms its logits after lm_head"
        if cache_argument(self._decoder()) is None:
            return f"the {family} decoder takes no KV cache"
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return f"{family} has sliding-window layers"
        return None

    def _decoder(self) -> nn.Module:
        get = getattr(self.backbone, "get_decoder", None)
        decoder = get() if get is not None else None
        return decoder if decoder is not None and decoder is not self.backbone else self.backbone.model

    # ------------------------------------------------------------------------ full sequences

    def _full_nll(self, ids: torch.Tensor, mask: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Per row (B, C): every real candidate as its own sequence through the whole model."""
        flat_ids, flat_mask = ids.flatten(0, 1), mask.flatten(0, 1)
        out = torch.zeros(flat_ids.shape[0], dtype=torch.float32, device=ids.device)
        rows = flat_mask.any(-1).nonzero().squeeze(-1)
        if rows.numel():
            nll = self._sequence_nll(flat_ids[rows], flat_mask[rows].long(), counted.flatten(0, 1)[rows])
            out = out.index_copy(0, rows, nll.to(torch.float32))
        return out.view(ids.shape[:2])

    def _sequence_nll(self, ids: torch.Tensor, mask: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Per row, the summed cross-entropy of the tokens ``counted`` marks (positions 1.. of ``ids``)."""
        if self._unsupported() is None:
            # The decoder, then the LM head at exactly the scored (row, position) pairs: the union of the rows'
            # positions (below) is most of a length-sorted batch, and with autograd (curvature's HVPs) the
            # vocabulary projection of those positions dominated the product (~18 s per HVP, Qwen2's 151,936 words).
            hidden = self._decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            row, col = counted.nonzero(as_tuple=True)  # logits position col scores token col + 1
            logits = self.backbone.get_output_embeddings()(hidden[row, col])
            nll = F.cross_entropy(logits.float(), ids[row, col + 1], reduction="none")
            return torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add(0, row, nll)
        # Only the positions some row scores go through the LM head.
        positions = counted.any(0).nonzero().squeeze(-1)  # logits positions t - 1
        kwargs = {"logits_to_keep": positions} if self._keeps_logits() else {}
        logits = self.backbone(input_ids=ids, attention_mask=mask, **kwargs).logits
        if not kwargs:
            logits = logits[:, positions]
        targets = ids[:, positions + 1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return torch.where(counted[:, positions], nll, torch.zeros_like(nll)).sum(-1)

    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(type(self.backbone).forward).parameters

    # ------------------------------------------------------------------------ shared prompts

    def _shared_nll(self, ids: torch.Tensor, mask: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Per row (B, C): each sample's common prefix once through the decoder with a KV cache, each candidate
        continued from a copy of it, the LM head only at the scored positions."""
        b, c, t = ids.shape
        device = ids.device
        out = torch.zeros(b, c, dtype=torch.float32, device=device)
        real = mask.any(-1)  # (B, C)
        lengths = mask.sum(-1)  # (B, C)
        first = real.to(torch.int8).argmax(-1)  # a real candidate per sample, the prefix's reference
        reference = ids.gather(1, first.view(b, 1, 1).expand(b, 1, t))
        common = ((ids == reference) & mask).to(torch.int32).cumprod(-1).sum(-1)  # common prefix with it
        big = torch.iinfo(torch.int64).max
        # the prefix every real candidate shares, answer tokens included ("the correct answer is ...")
        shared = torch.where(real, common.long(), big).amin(-1)  # (B,)
        has = real.any(-1)
        full = has & (shared < 1)  # nothing to share (e.g. an answer right after the first token)
        if bool(full.any()):
            out[full] = self._full_nll(ids[full], mask[full], counted[full])
        keep = (has & (shared >= 1)).nonzero().squeeze(-1)
        if keep.numel() == 0:
            return out
        ids, mask, counted, real, lengths = ids[keep], mask[keep], counted[keep], real[keep], lengths[keep]
        shared, first = shared[keep], first[keep]
        decoder = self._decoder()
        sample, cand = real.nonzero(as_tuple=True)  # (R,) every real candidate, grouped by sample
        start = shared[sample]  # (R,)
        rest = lengths[sample, cand] - start
        span = max(int(rest.max()), 1)
        positions = start[:, None] + torch.arange(span, device=device)  # absolute positions (R, W)
        inside = positions < lengths[sample, cand][:, None]
        at = positions.clamp(max=t - 1)
        rows_ids = ids[sample, cand]  # (R, T)
        prefixes = ids[torch.arange(len(keep), device=device), first]  # (B', T): each sample's reference row
        args = (decoder, prefixes, shared, rows_ids, sample, rest, positions, inside, at)
        hidden, prefix_hidden = self._packed_hidden(*args) if self._packs(decoder) else self._cached_hidden(*args)

        # 3. logits only where a token is scored: hidden at position p predicts token p + 1; in the prefix once
        # per sample, whatever number of its candidates score that position
        rows_counted = counted[sample, cand]  # (R, T - 1)
        per_row = self._prefix_nll(prefix_hidden, rows_counted, start, sample, rows_ids)
        wanted = F.pad(rows_counted, (0, 1)).gather(1, at) & inside  # (R, W)
        row, col = wanted.nonzero(as_tuple=True)
        targets = rows_ids.gather(1, (at + 1).clamp(max=t - 1))[row, col]
        logits = self.backbone.get_output_embeddings()(hidden[row, col])
        per_row.index_add_(0, row, F.cross_entropy(logits.float(), targets, reduction="none"))
        kept = torch.zeros(len(keep), c, dtype=torch.float32, device=device)
        kept[sample, cand] = per_row
        out[keep] = kept
        return out

    def _prefix_nll(self, prefix_hidden, counted, start, sample, rows_ids) -> torch.Tensor:
        """(R,) each candidate's summed cross-entropy over its scored positions inside its sample's shared prefix
        (p < start: the logits at p see only shared tokens, so one LM-head row and one log-softmax per sample and
        position serve all its candidates; the target, token p + 1, is the candidate's own)."""
        width = min(prefix_hidden.shape[1], counted.shape[1])
        inside = counted[:, :width] & (torch.arange(width, device=counted.device) < start[:, None])  # (R, width)
        out = torch.zeros(len(sample), dtype=torch.float32, device=counted.device)
        row, col = inside.nonzero(as_tuple=True)
        if row.numel() == 0:
            return out
        pairs, which = torch.unique(sample[row] * width + col, return_inverse=True)  # distinct (sample, position)
        logits = self.backbone.get_output_embeddings()(prefix_hidden[pairs // width, pairs % width])
        logp = F.log_softmax(logits.float(), -1)
        return out.index_add_(0, row, -logp[which, rows_ids[row, col + 1]])

    def _packs(self, decoder: nn.Module) -> bool:
        """Whether the prefix and its continuations can run as one packed sequence: the attention takes a custom
        4-D mask (``sdpa``: a boolean one; ``eager``: an additive one) and positions given explicitly."""
        config = getattr(decoder, "config", None) or self.backbone.config
        return self.pack_candidates and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")

    def _packed_hidden(self, decoder, prefixes, shared, rows_ids, sample, rest, positions, inside, at):
        """(R, W, H) hidden states of every candidate's continuation and (B', max shared, H) of the prefixes (a
        row's positions from its ``shared`` on are not its prefix), from ONE decoder forward per batch: each
        sample's row is ``[prefix, continuation 1, continuation 2, ...]``, a continuation attending causally to
        the prefix and to itself only, at its own absolute positions. The same maths as the KV-cache path
        (:meth:`_cached_hidden`) and the same token positions (P + C·A per sample), but every layer runs once
        per batch instead of twice, so a factored plane builds each layer's weights once per batch."""
        b, device = len(prefixes), prefixes.device
        r = len(sample)
        # where each continuation starts in its sample's packed row: after the prefix and the earlier ones
        before = rest.cumsum(0) - rest  # exclusive running total over all rows (grouped by sample)
        first_row = torch.full((b,), r, dtype=torch.long, device=device).scatter_reduce(
            0, sample, torch.arange(r, device=device), "amin"
        )
        offset = shared[sample] + before - before[first_row[sample]]  # (R,)
        total = shared.clone().index_add_(0, sample, rest)  # (B',) packed lengths
        width = int(total.max())
        steps = torch.arange(width, device=device)
        packed = torch.zeros(b, width, dtype=prefixes.dtype, device=device)
        packed[:, : min(width, prefixes.shape[1])] = prefixes[:, :width]
        packed.masked_fill_(steps >= shared[:, None], 0)
        position_ids = torch.where(steps < shared[:, None], steps, 0).expand(b, -1).clone()
        segment = torch.where(steps < shared[:, None], -1, -2).expand(b, -1).clone()  # -1 prefix, -2 padding
        dest = offset[:, None] + torch.arange(positions.shape[1], device=device)  # (R, W) packed positions
        rows = sample[:, None].expand_as(dest)
        packed[rows[inside], dest[inside]] = rows_ids.gather(1, at)[inside]
        position_ids[rows[inside], dest[inside]] = positions[inside]
        segment[rows[inside], dest[inside]] = torch.arange(r, device=device)[:, None].expand_as(dest)[inside]
        real = segment != -2
        visible = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])  # (B', q, k)
        allowed = visible & real[:, None, :] & real[:, :, None] & (steps[None, :] <= steps[:, None])
        allowed = (allowed | torch.eye(width, dtype=torch.bool, device=device))[:, None]  # no empty padding rows
        config = getattr(decoder, "config", None) or self.backbone.config
        if config._attn_implementation == "eager":  # an additive mask
            dtype = next(decoder.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        hidden = decoder(input_ids=packed, attention_mask=allowed, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # fmt: skip
        return hidden[rows, dest.clamp(max=width - 1)], hidden[:, : int(shared.max())]

    def _cached_hidden(self, decoder, prefixes, shared, rows_ids, sample, rest, positions, inside, at):
        """(R, W, H) hidden states of every candidate's continuation and (B', max shared, H) of the prefixes, in
        two decoder forwards: the prefixes with a KV cache, then every candidate from a copy of its sample's
        cache."""
        device = prefixes.device
        argument = cache_argument(decoder)
        config = getattr(decoder, "config", None) or self.backbone.config
        # 1. the prefixes, right-padded to the longest one (a padded query still sees the real tokens before it)
        width = int(shared.max())
        steps = torch.arange(width, device=device)
        prefix_mask = steps < shared[:, None]  # (B', Lp)
        prefix_ids = prefixes[:, :width].masked_fill(~prefix_mask, 0)
        cache = _new_cache(config)
        prefix_hidden = decoder(input_ids=prefix_ids, attention_mask=prefix_mask.long(),
                                position_ids=steps.expand(len(prefixes), -1), use_cache=True,
                                **{argument: cache}).last_hidden_state  # fmt: skip
        # 2. every real candidate continues from its sample's cache (one copy per candidate)
        suffix = rows_ids.gather(1, at).masked_fill(~inside, 0)
        cache.batch_select_indices(sample)
        attention = torch.cat([prefix_mask[sample], inside], 1).long()
        hidden = decoder(input_ids=suffix, attention_mask=attention, position_ids=positions, use_cache=True,
                         **{argument: cache}).last_hidden_state  # fmt: skip
        return hidden, prefix_hidden

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_checkpointing(self.backbone, enable)


__all__ = ["EVAL_TOKENS", "SHARED_FAMILIES", "CausalLMScorer", "cache_argument", "default_eval_tokens"]
