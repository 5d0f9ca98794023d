"""Where a Hugging Face model comes from: ``hf:ID_OR_PATH`` resolved to a local folder (given, or a cached hub
snapshot) or, online, the hub id; its config and its tokenizer, each failing with one line that names the fix.
Used by :mod:`adapters.models.hf` (which re-exports these names), its streamed loader and its generation.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from adapters.errors import UserError

PREFIX = "hf:"
HUB_HOST = "huggingface.co"


def _looks_like_path(spec: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with slashes or a leading . / ~ is meant as a folder
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _cached_snapshot(spec: str) -> str | None:
    """The local snapshot folder of hub id ``spec`` in the Hugging Face cache, without any network access."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(spec, local_files_only=True)
    except Exception:  # not cached, incomplete, or not a valid repo id: all mean "not usable from the cache"
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def resolve(spec: str) -> str:
    """Where to load ``spec`` from: a local folder (given, or a cached hub snapshot) or, online, the hub id.

    Fails with one line when the folder lacks config.json, or the id is not cached and the hub is offline.
    """
    from adapters.network import hub_offline

    if not spec:
        raise UserError("--model hf: needs a hub id or a folder after 'hf:' (e.g. hf:Qwen/Qwen2-0.5B-Instruct)")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {path} has no config.json: pass a folder written by save_pretrained "
                "(config.json, weights and tokenizer)"
            )
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

        weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)  # sharded: its index
        if not any((path / name).is_file() for name in weights):
            raise UserError(
                f"model folder {path} has config.json but no weights ({' or '.join(weights[:2])}): pass the "
                "folder save_pretrained wrote, weights included"
            )
        return str(path.resolve())
    if _looks_like_path(spec):
        raise UserError(f"--model hf:{spec}: no such folder: pass an existing model folder or a hub id (org/name)")
    cached = _cached_snapshot(spec)
    if cached is not None:
        return cached
    if hub_offline(HUB_HOST):
        offline_env = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline_env else f"{HUB_HOST} is unreachable"
        raise UserError(
            f"hub model '{spec}' is not in the local Hugging Face cache and {why}: "
            f"pass a local folder (--model hf:/path/to/model) or download it first"
        )
    return spec


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_config(where: str):
    """The model's transformers config (one line naming the folder or id when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the model config of {where} ({_first_line(e)}): check the id or folder") from e


def is_causal_lm(config) -> bool:
    """Whether ``config`` describes a causal LM with its head (its saved architectures, else its model type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    archs = getattr(config, "architectures", None) or []
    if archs:
        classes = set(CAUSAL.values())
        return any(a in classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.model_type in CAUSAL


@functools.lru_cache(maxsize=4)
def tokenizer(where: str):
    """The model's tokenizer, padding on the right (``Encoded.batch`` trims the right end); pad = eos if none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"cannot load the tokenizer of {where} ({_first_line(e)}): save the model's tokenizer into the folder"
        ) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"the tokenizer of {where} has neither a pad nor an eos token: add one to it")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


__all__ = ["HUB_HOST", "PREFIX", "is_causal_lm", "load_config", "resolve", "tokenizer"]
