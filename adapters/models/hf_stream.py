"""A converting load of local safetensors files, one tensor at a time: :func:`load_pretrained` is
``from_pretrained`` with the checkpoint read by ``pread`` (:func:`streamed_state`) whenever the load casts or
quantises, so the peak is the converted model plus one source tensor and its conversion scratch (issue 20).
A 4-bit load quantises each source tensor :data:`QUANT_CHUNK` elements at a time on the CPU
(:func:`_chunked_4bit`), bit-identical to bitsandbytes' own ``quantize_4bit`` of the whole tensor, whose
full-size fp32 temporaries (|A|, the scaled copy, its clamp, the int32 codes: about 3× the tensor) were most of
the load's scratch. Re-exported by :mod:`adapters.models.hf`.
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


# Elements of a source tensor quantised at a time by a 4-bit load on the CPU (4 MB in fp32; a multiple of every
# bitsandbytes block size, and even, so the chunks' codes and block maxima concatenate into the whole tensor's).
QUANT_CHUNK = 1 << 20


class _WholeRead:
    """A safetensors slice whose whole read (``[...]``, what transformers' loader asks for) is ``get_tensor``:
    with the ``pread`` backend a slice reads into a buffer and copies it into the tensor, 2× the tensor at its
    peak, where ``get_tensor`` reads into the tensor itself (measured: 46 vs 23 MB for a 23 MB fp32 weight).
    Anything else (a partial slice, the shape, the dtype) is the slice's."""

    def __init__(self, handle, key: str, piece):
        self._handle, self._key, self._piece = handle, key, piece

    def __getitem__(self, index):
        if index is Ellipsis:
            return self._handle.get_tensor(self._key)
        return self._piece[index]

    def __getattr__(self, name: str):
        return getattr(self._piece, name)


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
                state[key] = _WholeRead(handle, key, piece)
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


def quantize_4bit_chunked(A: torch.Tensor, absmax=None, out=None, blocksize=None, compress_statistics=False,
                          quant_type="fp4", quant_storage=torch.uint8, chunk: int | None = None):  # fmt: skip
    """``bitsandbytes.functional.quantize_4bit`` (same arguments, same result bit for bit) with the blockwise
    kernel run on ``chunk`` (default :data:`QUANT_CHUNK`) elements at a time: its temporaries are a chunk's, not
    the tensor's. NF4/FP4 codes and block maxima depend on their own block only, and a chunk is whole blocks (the
    padding of an odd count is the last chunk's), so they concatenate exactly; the statistics' double
    quantisation then runs, as bitsandbytes runs it, on the whole tensor's block maxima (1/64 of its elements).
    What it does not cover (CUDA, the deprecated ``absmax``/``out`` arguments, a storage other than uint8, a
    tensor of one chunk) goes to bitsandbytes."""
    import bitsandbytes.functional as F

    original = getattr(quantize_4bit_chunked, "original", F.quantize_4bit)
    blocksize = 64 if blocksize is None else blocksize
    chunk = QUANT_CHUNK if chunk is None else chunk
    simple = A.device.type == "cpu" and absmax is None and out is None and quant_storage == torch.uint8
    if not simple or A.numel() <= chunk or chunk % (2 * blocksize) or A.dtype not in _SAFETENSORS_FLOATS.values():
        return original(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)
    flat, n = A.reshape(-1), A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    maxima = torch.empty(-(-n // blocksize), dtype=torch.float32)
    for a in range(0, n, chunk):
        codes, block_max = torch.ops.bitsandbytes.quantize_4bit.default(flat[a : a + chunk], blocksize, quant_type,
                                                                        quant_storage)  # fmt: skip
        packed[a // 2 : a // 2 + codes.shape[0]] = codes
        maxima[a // blocksize : a // blocksize + block_max.numel()] = block_max
    code = F.get_4bit_type(quant_type, device=A.device)
    if not compress_statistics:
        state = F.QuantState(absmax=maxima, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                             quant_type=quant_type)  # fmt: skip
        return packed, state
    offset = maxima.mean()
    qabsmax, state2 = F.quantize_blockwise(maxima - offset, blocksize=256)
    state = F.QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                         quant_type=quant_type, offset=offset, state2=state2)  # fmt: skip
    return packed, state


@contextlib.contextmanager
def _chunked_4bit():
    """bitsandbytes' ``quantize_4bit`` is :func:`quantize_4bit_chunked` while a 4-bit load runs (``Params4bit``
    calls it through the module attribute when transformers places each weight); restored after."""
    try:
        import bitsandbytes.functional as F
    except ImportError:  # no 4-bit load without it: nothing to change
        yield
        return
    before = F.quantize_4bit
    quantize_4bit_chunked.original = before
    F.quantize_4bit = quantize_4bit_chunked
    try:
        yield
    finally:
        F.quantize_4bit = before


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
    quantised = _chunked_4bit() if "quantization_config" in kwargs else contextlib.nullcontext()
    with _sequential_loading(), quantised:
        # the model class itself: the Auto classes refuse a state dict beside a folder
        model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if (Path(where) / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(where)
    return model


__all__ = ["load_pretrained", "streamed_state"]
