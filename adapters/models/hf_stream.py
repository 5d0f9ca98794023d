"""A converting load of local safetensors files, one tensor at a time: :func:`load_pretrained` is
``from_pretrained`` with the checkpoint read by ``pread`` (:func:`streamed_state`) whenever the load casts or
quantises, so the peak is the converted model plus one source tensor and its conversion scratch (issue 20).
Re-exported by :mod:`adapters.models.hf`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from adapters.models.hf_hub import load_config


class _LazyState(dict):
    """Tensors read on demand from safetensors files; ``from_pretrained`` deep-copies its keyword arguments, and a
    file handle cannot be copied (nor needs to be)."""

    def __deepcopy__(self, memo: dict) -> _LazyState:
        return self


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_files(where: str) -> list[Path] | None:
    """The safetensors files of a local model folder (one file or an index of shards), or None."""
    folder = Path(where)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def streamed_state(where: str, dtype: torch.dtype, quantised: bool) -> _LazyState | None:
    """The checkpoint as tensors read one at a time with ``pread`` (safetensors' ``backend="pread"``), when the
    load converts them (cast to ``dtype`` or quantised); None when it does not (or cannot be read so).

    Why: transformers maps the files (``mmap``) and every page it reads for a conversion stays resident until
    the whole load ends, so a bf16 load of fp32 files peaked at 3× the bf16 model and a 4-bit load at 7-8×
    (issue 20). Read by ``pread``, each source tensor is a private buffer freed once converted: the peak is
    the converted model + one source tensor + the conversion's scratch. A load that keeps the file's dtype stays
    mapped (nothing is copied at all)."""
    files = _safetensors_files(where)
    if not files:
        return None
    from safetensors import safe_open

    state = _LazyState()
    converts = quantised
    try:
        for file in files:
            handle = safe_open(str(file), framework="pt", backend="pread")
            for key in handle.keys():  # noqa: SIM118 (safe_open has no iterator)
                piece = handle.get_slice(key)
                stored = _SAFETENSORS_FLOATS.get(piece.get_dtype())
                converts = converts or (stored is not None and stored != dtype)
                state[key] = piece
    except TypeError:  # a safetensors without the pread backend (< 0.7): transformers' own mapped load
        return None
    return state if converts else None


@contextlib.contextmanager
def _sequential_loading():
    """transformers' loader one tensor at a time (its thread pool materialises up to 4 source tensors at once,
    each of them in the file's dtype, ahead of the conversion: memory, not speed, bounds a large load)."""
    key = "HF_DEACTIVATE_ASYNC_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_pretrained(auto, where: str, **kwargs) -> nn.Module:
    """``auto.from_pretrained(where, **kwargs)`` (``auto`` an ``AutoModel*`` class), with a converting load of
    local safetensors files streamed tensor by tensor (:func:`streamed_state`)."""
    config = load_config(where)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    state = streamed_state(where, dtype, "quantization_config" in kwargs) if isinstance(dtype, torch.dtype) else None
    try:
        cls = auto._model_mapping[type(config)] if state is not None else None
    except (KeyError, ValueError):  # remote code or an unmapped config: transformers' own load
        cls = None
    if cls is None:
        return auto.from_pretrained(where, **kwargs)
    with _sequential_loading():
        # the model class itself: the Auto classes refuse a state dict beside a folder
        model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if (Path(where) / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(where)
    return model


__all__ = ["load_pretrained", "streamed_state"]
