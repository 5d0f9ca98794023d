"""Any Hugging Face transformers model as a toolkit model: ``--model hf:ID_OR_PATH``.

``ID_OR_PATH`` is a local folder written by ``save_pretrained`` (config.json, weights, tokenizer) or a hub
id; a hub id is read from the local Hugging Face cache when it is there, downloaded otherwise, and
refused in seconds, with one line, when it is not cached and the hub is offline (``HF_HUB_OFFLINE``
or unreachable). What the model becomes depends on the dataset's modality:

- ``text`` (classification): ``AutoModel`` as the backbone, mean pooling over the attention mask
  and a zero-initialised linear head: :class:`adapters.models.minilm.MiniLMClassifier`'s maths, so
  ``hf:<MiniLM's folder>`` is the built-in ``minilm`` model. Encoder: the model's tokenizer, padded
  right, truncated to ``cutoff_len`` tokens.
- ``lm`` (a causal-LM dataset: records ``{"prompt", "candidates", "task", "answer"}``):
  ``AutoModelForCausalLM`` wrapped by :class:`adapters.models.lm_scoring.CausalLMScorer`, which returns per
  candidate response the summed next-token cross-entropy over its answer tokens and their count (the prompt is masked,
  as LLM-Adapters does with ``train_on_inputs=False``). Sequences longer than ``cutoff_len`` lose
  tokens from the LEFT of the prompt, so the scored answer stays whole (a deviation: LLM-Adapters
  truncates the right end). :func:`generate_accuracy` is the paper's generation-based evaluation.

Build options (``--torch-dtype``, ``--load-4bit``, ``--cutoff-len``) are baked into the entry, so the
encoder and the model agree. ``--load-4bit``: bitsandbytes NF4 (double-quantised statistics, compute in the
``--torch-dtype``), placed on the run's device (CUDA, or the CPU: :func:`set_4bit_device`), then the QLoRA recipe
(:func:`_prepare_4bit`); the wrappers expose ``is_loaded_in_4bit`` so peft wraps the packed layers in its own
4-bit tuner layers. Adapter targets default per architecture family (:func:`targets_for`).

Around it: :mod:`adapters.models.hf_hub` (resolving ``ID_OR_PATH``, the config, the tokenizer),
:mod:`adapters.models.hf_stream` (the converting load, one tensor at a time), :mod:`adapters.models.hf_generate`
(the generation-based accuracy) and :mod:`adapters.models.lm_scoring` (the scorer); their public names are
re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapters.errors import UserError
from adapters.models import minilm
from adapters.models.base import Encoded, ModelEntry, _Quantised, set_checkpointing
from adapters.models.hf_generate import (
    ANSWER_PATTERNS,
    answer_pattern,
    extract_answer,
    generate_accuracy,
    generate_answers,
    generate_texts,
    generation_config,
)
from adapters.models.hf_hub import HUB_HOST, PREFIX, is_causal_lm, load_config, resolve, tokenizer
from adapters.models.hf_stream import _LazyState, load_pretrained, streamed_state
from adapters.models.lm_scoring import CausalLMScorer
from adapters.upcast import compute_in_fp32

MODALITIES = ("text", "lm")
OPTIONS = ("torch_dtype", "load_4bit", "cutoff_len")
DEFAULT_OPTIONS = {"torch_dtype": "float32", "load_4bit": False, "cutoff_len": 256}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}

# The RandLoRA seed's targets for Llama-like decoders (attention q/k/v, MLP up/down).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
LLAMA_FAMILY = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "olmo3",
    "granite", "smollm3", "helium", "cohere", "stablelm",
)  # fmt: skip
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(LLAMA_FAMILY, LLAMA_TARGETS),
    "phi3": ("qkv_proj", "gate_up_proj", "down_proj"),  # Phi-3 fuses q/k/v and gate/up
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), minilm.TARGETS),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
}
# Output heads, never adapted by the generic rule (any dotted component of a module name).
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "task_head", "pooler"})

TEXT_DEFAULTS = minilm.ENTRY.defaults
LM_DEFAULTS = {"lr": {"ft": 2e-5, "lora": 2e-4, "randlora": 1e-4, "head_only": 1e-4}, "randlora_rank": 30}

# --------------------------------------------------------------------------- options and loading


def check_options(options: Mapping | None) -> dict:
    """The build options with defaults filled in (None = default); a bad value is a UserError."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise UserError(f"hf: models take no option {', '.join(unknown)}: use {', '.join(OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **given}
    if opts["torch_dtype"] not in DTYPES:
        raise UserError(f"--torch-dtype {opts['torch_dtype']}: choose one of {', '.join(DTYPES)}")
    cutoff = opts["cutoff_len"]
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 2:
        raise UserError(f"--cutoff-len {cutoff}: must be an integer >= 2: pass a larger value")
    opts["load_4bit"] = bool(opts["load_4bit"])
    return opts


# bitsandbytes on the CPU: NF4 kernels from 0.46 (the torch.library backends), but 0.46-0.48 quantise other codes
# than the streamed load's chunked quantiser reproduces (tests/test_streamed_load.py); 0.50.0 and 0.50.2 pass
BNB_FLOOR = "0.50"


def check_4bit() -> None:
    """``--load-4bit`` needs bitsandbytes (CUDA or, from :data:`BNB_FLOOR`, CPU): checked before any loading."""
    import importlib.metadata
    import importlib.util

    from packaging.version import Version

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load-4bit needs bitsandbytes, which is not installed: run 'pip install bitsandbytes'")
    version = importlib.metadata.version("bitsandbytes")
    if not torch.cuda.is_available() and Version(version) < Version(BNB_FLOOR):
        raise UserError(f"--load-4bit on CPU needs bitsandbytes >= {BNB_FLOOR} (installed: {version}): "
                        "run 'pip install -U bitsandbytes'")  # fmt: skip


# Where --load-4bit places the packed weights (bitsandbytes quantises them as they are loaded onto it):
# None = the current CUDA device when there is one, else the CPU (set_4bit_device: the run's --device).
_4BIT_DEVICE: torch.device | None = None


def set_4bit_device(device: torch.device | str | None) -> None:
    """Load 4-bit bases onto ``device`` from now on (None: the current CUDA device if any, else the CPU)."""
    global _4BIT_DEVICE
    _4BIT_DEVICE = None if device is None else torch.device(device)


def four_bit_device() -> torch.device:
    """The device 4-bit bases are loaded onto (:func:`set_4bit_device`)."""
    if _4BIT_DEVICE is not None:
        return _4BIT_DEVICE
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(torch_dtype: str) -> torch.dtype:
    """The 4-bit layers' compute dtype: the run's ``--torch-dtype`` (float32 by default, so the CPU and the
    fp32 tests compute exactly); ``auto``: bfloat16 where CUDA runs it, else float32."""
    dtype = DTYPES[torch_dtype]
    if dtype != "auto":
        return dtype
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def _load_kwargs(opts: dict) -> dict:
    """from_pretrained keyword arguments for the dtype and 4-bit options."""
    import transformers
    from packaging.version import Version

    # transformers renamed torch_dtype to dtype in 4.56 (the old name warns in 5.x)
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs = {key: DTYPES[opts["torch_dtype"]]}
    if opts["load_4bit"]:
        check_4bit()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(opts["torch_dtype"]),
        )
        kwargs["device_map"] = {"": four_bit_device()}  # 4-bit weights are quantised as they are placed
    return kwargs


# --------------------------------------------------------------------------- the models


class HFClassifier(_Quantised, minilm.MiniLMClassifier):
    """MiniLM's mean pooling + zero linear head on any ``AutoModel`` (features cast to the head's dtype)."""

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # fp32 models: a no-op, so hf:<MiniLM> equals the built-in minilm exactly
        return super().features(input_ids, attention_mask).to(self.task_head.weight.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_checkpointing(self.backbone, enable)


def _prepare_4bit(model: nn.Module) -> nn.Module:
    """The QLoRA recipe on a 4-bit model: peft's ``prepare_model_for_kbit_training`` (norms and every unpacked
    parameter in fp32, the base frozen), and no in-place repacking of the weights on CPU
    (:func:`adapters.quant.disable_cpu_repacking`)."""
    from peft import prepare_model_for_kbit_training

    from adapters.quant import disable_cpu_repacking

    # checkpointing stays the run's choice (--grad-checkpointing), not peft's default
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    disable_cpu_repacking(model)
    return model


def _pooling_kwargs(config) -> dict:
    """``add_pooling_layer=False`` for backbones that have one (BERT's pooler would train without gradients)."""
    import inspect

    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config)]
    except (KeyError, ValueError):
        return {}
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def build(
    num_classes: int, classes: Sequence[str] | None = None, *, where: str, modality: str, baked: dict, **options
) -> nn.Module:
    """The base model: :class:`HFClassifier` (``text``) or :class:`CausalLMScorer` (``lm``, classes unused)."""
    from transformers import AutoModel, AutoModelForCausalLM

    opts = check_options({**baked, **{k: v for k, v in options.items() if v is not None}})
    kwargs = _load_kwargs(opts)
    _quiet_transformers()
    if modality == "lm":
        model = load_pretrained(AutoModelForCausalLM, where, **kwargs)
        return CausalLMScorer(_prepared(model, opts))
    backbone = load_pretrained(AutoModel, where, **kwargs, **_pooling_kwargs(load_config(where)))
    backbone = _prepared(backbone, opts)
    return HFClassifier(backbone, _hidden_size(backbone.config), num_classes)


def _prepared(model: nn.Module, opts: dict) -> nn.Module:
    """A 4-bit base the QLoRA way (:func:`_prepare_4bit`: its unpacked weights fp32, bitsandbytes multiplies in its
    compute dtype); any other: a model stored in bf16/fp16 multiplies in fp32 unless autocast says otherwise
    (:mod:`adapters.upcast`: its own forward would run every matmul in half precision, emulated on a CPU without
    it, whatever ``--dtype`` asked for)."""
    if opts["load_4bit"]:
        return _prepare_4bit(model)
    compute_in_fp32(model)  # a no-op on an fp32 model
    return model


def _hidden_size(config) -> int:
    for name in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise UserError(f"cannot tell the hidden size of a {config.model_type} model: it is not a text encoder")


# --------------------------------------------------------------------------- adapter targets


def _config_of(model: nn.Module):
    for candidate in (model, getattr(model, "backbone", None)):
        config = getattr(candidate, "config", None)
        if config is not None:
            return config
    return None


def targets_for(model: nn.Module) -> tuple[str, ...]:
    """Default adapter targets (module-name suffixes, peft's rule) for a transformers model or its wrapper.

    The family's projections when ``config.model_type`` is known (:data:`FAMILY_TARGETS`); otherwise
    every ``nn.Linear`` except the output heads (:data:`HEAD_NAMES`, the output embeddings).
    """
    config = _config_of(model)
    known = FAMILY_TARGETS.get(getattr(config, "model_type", None))
    return known if known is not None else linear_suffixes(model)


def linear_suffixes(model: nn.Module) -> tuple[str, ...]:
    """The shortest suffix names that select exactly the non-head ``nn.Linear`` modules of ``model``."""
    hf = getattr(model, "backbone", model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    targets = [
        n for n, m in modules.items()
        if isinstance(m, nn.Linear) and m is not head and not HEAD_NAMES.intersection(n.split("."))
    ]  # fmt: skip
    chosen = set(targets)
    # every dotted suffix of a module peft must not wrap: a target suffix must be none of them
    blocked = {".".join(n.split(".")[i:]) for n in modules if n and n not in chosen for i in range(n.count(".") + 1)}
    out: dict[str, None] = {}
    for name in targets:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if suffix not in blocked:
                out[suffix] = None
                break
    return tuple(out)


def _config_targets(config, modality: str) -> tuple[str, ...]:
    """Default targets from the config alone: the family table, or the generic rule on a weightless model."""
    known = FAMILY_TARGETS.get(config.model_type)
    if known is not None:
        return known
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):  # module names only: no memory, no weights read
        if modality == "lm":
            return targets_for(CausalLMScorer(AutoModelForCausalLM.from_config(config)))
        backbone = AutoModel.from_config(config, **_pooling_kwargs(config))
        return targets_for(HFClassifier(backbone, _hidden_size(config), 1))


# --------------------------------------------------------------------------- encoders


def encode_text(texts: Sequence[str], *, where: str, cutoff_len: int) -> Encoded:
    """Classification inputs exactly as :func:`adapters.models.minilm.encode`, truncated to ``cutoff_len``."""
    tok = tokenizer(where)(list(texts), padding=True, truncation=True, max_length=cutoff_len, return_tensors="pt")
    mask = tok["attention_mask"]
    return Encoded({"input_ids": tok["input_ids"], "attention_mask": mask}, lengths=mask.sum(1))


def candidate_ids(
    full: list[int], prompt_len: int, eos: int, bos: int | None, cutoff_len: int
) -> tuple[list[int], int]:
    """(token ids, prompt length) of one candidate: ``tok(prompt + candidate)`` + eos, the prompt cut on the left.

    The answer tokens are those beyond ``prompt_len`` (LLM-Adapters' ``train_on_inputs=False`` mask). When the
    sequence is longer than ``cutoff_len``, prompt tokens go from the left (after the BOS, which stays) so
    the answer stays whole; at least one token precedes it, to predict its first token.
    """
    ids = list(full)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    prompt_len = min(prompt_len, len(ids) - 1)  # the eos is always scored
    excess = len(ids) - cutoff_len
    if excess > 0:
        if excess > prompt_len - 1:
            raise ValueError(f"its answer takes {len(ids) - prompt_len} tokens, and --cutoff-len {cutoff_len} "
                             "leaves room for at most one token less")  # fmt: skip
        keep = 1 if bos is not None and ids[0] == bos else 0
        ids = ids[:keep] + ids[keep + excess :]
        prompt_len -= excess
    return ids, prompt_len


def encode_lm(records: Sequence[Mapping], *, where: str, cutoff_len: int) -> Encoded:
    """Causal-LM records -> ``input_ids``/``attention_mask`` (N, C, T) int64, ``answer_mask`` (N, C, T) bool.

    C is the most candidates of any record (missing ones are all-padding rows); ``lengths`` holds the
    longest real candidate per record, so ``Encoded.batch`` trims the common right padding.
    """
    tok = tokenizer(where)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if eos is None:
        raise UserError(f"the tokenizer of {where} has no eos token: a causal LM's answers end with one")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = tok([r["prompt"] for r in records])["input_ids"]
    fulls = iter(tok([r["prompt"] + c for r in records for c in r["candidates"]])["input_ids"])
    rows: list[list[tuple[list[int], int]]] = []
    for i, (record, prompt) in enumerate(zip(records, prompts, strict=True)):
        try:
            rows.append([candidate_ids(next(fulls), len(prompt), eos, bos, cutoff_len) for _ in record["candidates"]])
        except ValueError as e:
            raise UserError(f"record {i} ({record.get('task', '?')}): {e}: raise --cutoff-len") from e
    n, c = len(rows), max((len(r) for r in rows), default=0)
    t = max((len(ids) for r in rows for ids, _ in r), default=1)
    input_ids = torch.full((n, c, t), pad, dtype=torch.int64)
    attention = torch.zeros((n, c, t), dtype=torch.int64)
    answer = torch.zeros((n, c, t), dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, (ids, prompt_len) in enumerate(row):
            input_ids[i, j, : len(ids)] = torch.tensor(ids)
            attention[i, j, : len(ids)] = 1
            answer[i, j, prompt_len : len(ids)] = True
    lengths = attention.sum(-1).amax(-1)
    return Encoded({"input_ids": input_ids, "attention_mask": attention, "answer_mask": answer}, lengths=lengths)


# --------------------------------------------------------------------------- the entry


def entry(spec: str, modality: str, options: Mapping | None = None) -> ModelEntry:
    """The registry entry of ``hf:spec`` for a ``text`` (classification) or ``lm`` dataset.

    Everything that can fail fast is checked here, before any weights are read: the options, the
    folder or cached id, the config, a causal LM for ``lm``, 4-bit's needs, the tokenizer.
    """
    if modality not in MODALITIES:
        raise UserError(f"hf: models take text or lm datasets, not {modality}: pick another --model")
    opts = check_options(options)
    where = resolve(spec)
    config = load_config(where)
    if modality == "lm" and not is_causal_lm(config):
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UserError(
            f"{where} holds {archs}, not a causal language model: the {modality} datasets need one "
            "(an AutoModelForCausalLM checkpoint, e.g. hf:Qwen/Qwen2-0.5B-Instruct)"
        )
    if opts["load_4bit"]:
        check_4bit()
    tokenizer(where)  # a missing tokenizer fails now, not after the weights are loaded
    encoder = encode_lm if modality == "lm" else encode_text
    what = "causal LM, answer loss over candidate responses" if modality == "lm" else "mean pooling + linear head"
    return ModelEntry(
        name=PREFIX + spec,
        modality=modality,
        description=f"{spec} ({config.model_type}, transformers), {what}",
        build=functools.partial(build, where=where, modality=modality, baked=opts),
        encode=functools.partial(encoder, where=where, cutoff_len=opts["cutoff_len"]),
        targets=_config_targets(config, modality),
        defaults=LM_DEFAULTS if modality == "lm" else TEXT_DEFAULTS,
        options=OPTIONS,
    )


__all__ = [
    "ANSWER_PATTERNS",
    "HUB_HOST",
    "PREFIX",
    "CausalLMScorer",
    "HFClassifier",
    "answer_pattern",
    "build",
    "candidate_ids",
    "check_options",
    "encode_lm",
    "encode_text",
    "entry",
    "generation_config",
    "load_config",
    "load_pretrained",
    "streamed_state",
    "_LazyState",
    "extract_answer",
    "generate_accuracy",
    "generate_answers",
    "generate_texts",
    "is_causal_lm",
    "linear_suffixes",
    "resolve",
    "targets_for",
    "tokenizer",
]
