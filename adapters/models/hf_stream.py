"""A converting load of local safetensors files, one tensor at a time: :func:`load_pretrained` is
``from_pretrained`` with the checkpoint read by ``pread`` (:func:`streamed_state`) whenever the load casts or
quantises, so the peak is the converted model plus one source tensor and its conversion scratch (issue 20).
A 4-bit load quantises each source tensor :data:`QUANT_CHUNK` elements at a time on the CPU
(:func:`_chunked_4bit`), bit-identical to bitsandbytes' own ``quantize_4bit`` of the whole tensor, whose
full-size fp32 temporaries (|A|, the scaled copy, its clamp, the int32 codes: about 3× the tensor) were most of
the load's scratch; and each large matrix it quantises is read from a copy-on-write mapping of the file
(:class:`_Mapped`), a chunk's pages dropped as soon as the chunk is quantised, so no source tensor is resident
whole: the peak is the packed model + one chunk and its scratch, the heap's freed scratch given back between
tensors (measured on a 4-layer Qwen2-shaped model of 57 MB packed: 1.05× the model above the runtime, was 2.6×;
18 MB packed: 1.10×). A casting load (bf16 / fp16 from fp32 files) copies
each tensor from the same kind of mapping into its cast tensor :data:`CAST_CHUNK` elements at a time, each chunk's
pages dropped once copied (:meth:`_WholeRead._read_cast`): the peak is the cast model + one chunk (measured at the
Qwen2 shape, hidden 1024: 1.02× the bf16 model above the runtime, was 1.11×, one whole fp32 tensor beside its cast
copy). Re-exported by :mod:`adapters.models.hf`.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch
from torch import nn

from adapters import heap
from adapters.models.hf_hub import load_config


class _LazyState(dict):
    """Tensors read on demand from safetensors files; ``from_pretrained`` deep-copies its keyword arguments, and a
    file handle cannot be copied (nor needs to be)."""

    def __deepcopy__(self, memo: dict) -> _LazyState:
        return self


# Elements of a source tensor quantised at a time by a 4-bit load on the CPU (1 MB in fp32; a multiple of every
# bitsandbytes block size, and even, so the chunks' codes and block maxima concatenate into the whole tensor's).
QUANT_CHUNK = 1 << 18
# Source elements read and cast at a time by a casting load (bf16 / fp16 from fp32 files): 1 MB of fp32.
CAST_CHUNK = 1 << 18


class _Mapped:
    """A safetensors file mapped copy-on-write, for the source tensors a 4-bit load quantises in chunks: the
    quantiser reads one chunk's pages and drops them from the process right after (``MADV_DONTNEED``; they are
    never written), so a source tensor is never resident whole. Only tensors read without a cast are handed out
    from it, and :func:`_own_copies` gives any of them that the model keeps (not quantised) memory of its own."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(size))
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.start = 8 + size
        self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.address = self.bytes.data_ptr()

    def tensor(self, key: str) -> torch.Tensor | None:
        """The stored tensor viewed in the mapping (None when its offset does not suit its dtype)."""
        info = self.header[key]
        dtype = _SAFETENSORS_FLOATS.get(info["dtype"])
        a, b = info["data_offsets"]
        if dtype is None or (self.start + a) % dtype.itemsize:
            return None
        return self.bytes[self.start + a : self.start + b].view(dtype).view(info["shape"])

    def holds(self, t: torch.Tensor) -> bool:
        return self.address <= t.data_ptr() < self.address + len(self.mm)

    def drop(self, begin: int, end: int) -> None:
        """Drop from the process the mapped pages wholly inside the addresses [begin, end)."""
        a = -(-(begin - self.address) // mmap.PAGESIZE) * mmap.PAGESIZE
        b = (end - self.address) // mmap.PAGESIZE * mmap.PAGESIZE
        if b > a:
            self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)


def _mapping(file: Path) -> _Mapped | None:
    """``file`` mapped for the chunked quantiser; None where it cannot be (no ``MADV_DONTNEED``, a file system
    without mappings): its tensors are then read whole, as for a casting load."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        return _Mapped(file)
    except (OSError, ValueError, struct.error):
        return None


# The mappings of the 4-bit load in progress (read by the chunked quantiser).
_MAPPED: list[_Mapped] = []


def _drop_read(t: torch.Tensor, mapped: list[_Mapped] | None = None) -> None:
    """``t`` (a contiguous chunk of a source tensor) was read: drop its pages if it is in one of ``mapped`` (by
    default the load's, :data:`_MAPPED`)."""
    for m in _MAPPED if mapped is None else mapped:
        if m.holds(t):
            m.drop(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())


def _own_copies(model: nn.Module, mapped: list[_Mapped]) -> None:
    """Every parameter or buffer still viewing a mapping gets memory of its own (copied a chunk at a time, each
    chunk's pages dropped once copied); then every mapped page left is dropped."""
    _release_freed()  # the quantiser's freed scratch, before the copies add to the peak
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not any(m.holds(t) for m in mapped):
                    continue
                own = torch.empty_like(t)
                source, target = t.detach().reshape(-1), own.view(-1)
                for a in range(0, source.numel(), QUANT_CHUNK):
                    target[a : a + QUANT_CHUNK] = source[a : a + QUANT_CHUNK]
                    _drop_read(source[a : a + QUANT_CHUNK], mapped)
                if isinstance(t, nn.Parameter):
                    t.data = own  # the same Parameter: ties stay tied
                else:
                    table[name] = own
    for m in mapped:
        m.drop(m.address, m.address + len(m.mm))


class _WholeRead:
    """A safetensors slice whose whole read (``[...]``, what transformers' loader asks for) is ``get_tensor``:
    with the ``pread`` backend a slice reads into a buffer and copies it into the tensor, 2× the tensor at its
    peak, where ``get_tensor`` reads into the tensor itself (measured: 46 vs 23 MB for a 23 MB fp32 weight).
    Anything else (a partial slice, the shape, the dtype) is the slice's."""

    def __init__(self, handle, key: str, piece, mapped: _Mapped | None = None, source: _Mapped | None = None):
        self._handle, self._key, self._piece, self._mapped = handle, key, piece, mapped
        self._source = source  # the file's mapping, for a cast read (:meth:`_read_cast`)
        self.cast: torch.dtype | None = None  # set by load_pretrained: the dtype the tensor is read into

    def __getitem__(self, index):
        if index is Ellipsis:
            if self.cast is not None:
                return self._read_cast()
            mapped = self._mapped.tensor(self._key) if self._mapped is not None else None
            return mapped if mapped is not None else self._handle.get_tensor(self._key)
        return self._piece[index]

    def _read_cast(self) -> torch.Tensor:
        """The tensor in ``cast``, copied from the file's mapping :data:`CAST_CHUNK` elements at a time into the
        cast tensor, each chunk's pages dropped once copied: the load's peak is then the cast model + one chunk,
        not + one whole source tensor (a load hands each source tensor to transformers, which casts it whole: the
        fp32 source and its bf16 copy side by side, 1.11x the bf16 model at the Qwen2 shape). A safetensors slice
        cannot stand in for the mapping: with the ``pread`` backend, reading a few rows of a tensor reads all of
        it (measured: a 22.8 MB fp32 matrix raised the peak by 23 MB, read in 1 MB row slices). The same
        elementwise cast as ``Tensor.to``, so the same values bit for bit. Without a mapping (or at an offset
        that does not suit the dtype): the whole tensor, cast."""
        view = self._source.tensor(self._key) if self._source is not None else None
        if view is None:
            return self._handle.get_tensor(self._key).to(self.cast)
        out = torch.empty(view.shape, dtype=self.cast)
        source, target = view.reshape(-1), out.view(-1)
        done = source.data_ptr()  # the pages before it are dropped
        for a in range(0, source.numel(), CAST_CHUNK):
            target[a : a + CAST_CHUNK] = source[a : a + CAST_CHUNK]
            end = source[a : a + CAST_CHUNK].data_ptr() + min(CAST_CHUNK, source.numel() - a) * source.element_size()
            self._source.drop(done, end)  # whole pages only: a page the chunk ends in goes with the next chunk
            done = max(done, end // mmap.PAGESIZE * mmap.PAGESIZE)
        return out

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
    load converts them (cast to ``dtype`` or quantised); None when it does not.

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
    state.mapped = []
    converts = quantised
    for file in files:
        handle = safe_open(str(file), framework="pt", backend="pread")
        pieces = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (no iterator)
        stored = {key: _SAFETENSORS_FLOATS.get(piece.get_dtype()) for key, piece in pieces.items()}
        casts = any(s is not None and s != dtype for s in stored.values())
        converts = converts or casts
        # 4-bit: the chunked quantiser reads from the mapping; a plain load casts from it (_read_cast)
        mapped = _mapping(file) if quantised or casts else None
        if mapped is not None:
            state.mapped.append(mapped)
        for key, piece in pieces.items():
            # a large matrix read without a cast: from the mapping, for the chunked quantiser
            large = len(piece.get_shape()) == 2 and math.prod(piece.get_shape()) > QUANT_CHUNK
            quantiser = mapped if quantised and large and stored[key] == dtype else None
            source = mapped if not quantised and stored[key] not in (None, dtype) else None
            state[key] = _WholeRead(handle, key, piece, quantiser, source)
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
        _drop_read(flat[a : a + chunk])
    del codes, block_max
    _release_freed()
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


def _release_freed() -> None:
    """Give the heap's freed memory back to the system (:func:`adapters.heap.release_freed`). The chunked
    quantiser's temporaries are small, freed between chunks, and glibc keeps the freed space in its heap between
    the packed tensors: without this a 4-bit load peaked 6.6 MB above the packed model whatever its size, 3.0 MB
    with it (a 4-layer Qwen2-shaped model of 18.4 MB packed, hidden 512; one call per quantised tensor)."""
    heap.release_freed()


@contextlib.contextmanager
def _chunked_4bit(mapped: list[_Mapped]):
    """bitsandbytes' ``quantize_4bit`` is :func:`quantize_4bit_chunked` while a 4-bit load runs (``Params4bit``
    calls it through the module attribute when transformers places each weight), reading ``mapped`` sources;
    restored after."""
    try:
        import bitsandbytes.functional as F
    except ImportError:  # no 4-bit load without it: nothing to change
        yield
        return
    before = F.quantize_4bit
    quantize_4bit_chunked.original = before
    F.quantize_4bit = quantize_4bit_chunked
    _MAPPED[:] = mapped
    try:
        yield
    finally:
        F.quantize_4bit = before
        _MAPPED.clear()


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
    if "quantization_config" not in kwargs and not (getattr(cls, "_keep_in_fp32_modules", None)
                                                    or getattr(cls, "_keep_in_fp32_modules_strict", None)):  # fmt: skip
        # each tensor cast as it is read (_WholeRead._read_cast); a class that keeps some modules in fp32 reads
        # the fp32 source whole instead, as transformers casts it
        for read in state.values():
            if isinstance(read, _WholeRead) and read._source is not None:
                read.cast = dtype
    quantised = _chunked_4bit(state.mapped) if "quantization_config" in kwargs else contextlib.nullcontext()
    with _sequential_loading(), quantised:
        # the model class itself: the Auto classes refuse a state dict beside a folder
        model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    _own_copies(model, state.mapped)
    if (Path(where) / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(where)
    return model


__all__ = ["load_pretrained", "streamed_state"]
