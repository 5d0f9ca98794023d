"""The forward precision a run uses: ``auto`` follows the hardware.

bf16 autocast halves the bytes a forward moves, but only where the device has bf16 arithmetic: on a CPU
without it every bf16 matmul is emulated (converted to fp32 and back), which made the ViT-B/32 image tower
7.1× slower than fp32 on an AVX2-only EPYC. So ``auto`` (:func:`resolve_dtype`) picks

- CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later), else float32;
- CPU: bfloat16 when ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` and torch is not held below
  them (``ATEN_CPU_CAPABILITY=default|avx2``, or ``ONEDNN_MAX_CPU_ISA`` below ``avx512_core_bf16``), else
  float32.

``ADAPTERS_NATIVE_BF16=1`` / ``=0`` overrides the detection (the test suite pins 0, so its numbers are fp32
on every machine). An explicit ``bfloat16``, ``float16`` or ``float32`` is always honoured.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapters.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
ENV = "ADAPTERS_NATIVE_BF16"
CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # the first found names the reason
# oneDNN's ISA caps in increasing order (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA); bf16 arithmetic from avx512_core_bf16
ONEDNN_ISAS = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni",
               "avx512_core_bf16", "avx512_core_fp16", "avx10_1_512", "avx512_core_amx", "avx10_1_512_amx",
               "avx512_core_amx_fp16", "avx10_1_512_amx_fp16", "all", "default")  # fmt: skip
BELOW_AVX512 = ("default", "avx2")  # ATEN_CPU_CAPABILITY values that keep torch's kernels off AVX-512


@dataclass(frozen=True)
class Precision:
    """A resolved forward dtype and why it was chosen (printed by the run, recorded in landscape.json)."""

    dtype: str
    reason: str

    def line(self) -> str:
        return f"precision: {self.dtype} ({self.reason})"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:  # not Linux: no flags, so fp32 unless told otherwise
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of a /proc/cpuinfo text (this machine's by default; the ``flags`` lines of every
    processor)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}  # speed, precision


def cpu_model_name(cpuinfo: str | None = None) -> str | None:
    """The first ``model name`` of a /proc/cpuinfo text (this machine's by default; None where there is none)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return None


def cpu_description(cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The CPU as a benchmark's table names it: the model, the instruction sets that set its speed and its native
    precision, and any variable that holds torch below them, e.g. ``AMD EPYC (AVX2, AVX-512, AVX512-BF16; held:
    ATEN_CPU_CAPABILITY=avx2)``: a timing taken so restricted is not one of the unrestricted CPU."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    env = os.environ if env is None else env
    flags = cpu_flags(cpuinfo)
    isa = ", ".join(name for flag, name in ISA_FLAGS.items() if flag in flags) or "no AVX2"
    held = [f"{var}={env[var]}" for var in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                            "DNNL_MAX_CPU_ISA") if env.get(var, "").strip()]  # fmt: skip
    name = cpu_model_name(cpuinfo) or platform.machine() or "unknown CPU"
    return f"{name} ({isa}; held: {' '.join(held)})" if held else f"{name} ({isa})"


def cpu_bf16(cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether this CPU runs bf16 natively and torch may use it, and why (``cpuinfo``/``env``: for tests)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    env = os.environ if env is None else env
    flags = cpu_flags(cpuinfo)
    found = [name for flag, name in CPU_FLAGS.items() if flag in flags]
    if not found:
        return False, "CPU has no AVX512-BF16 or AMX"
    capability = env.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if capability in BELOW_AVX512:
        return False, f"CPU has {found[0]} but ATEN_CPU_CAPABILITY={capability} keeps torch below it"
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = env.get(var, "").strip().lower()
        if not isa:
            continue
        if isa not in ONEDNN_ISAS:  # unknown cap: fp32 is never the slow choice
            return False, f"CPU has {found[0]} but {var}={isa} is not a oneDNN ISA this knows"
        if ONEDNN_ISAS.index(isa) < ONEDNN_ISAS.index("avx512_core_bf16"):
            return False, f"CPU has {found[0]} but {var}={isa} keeps oneDNN below it"
    if not torch.backends.mkldnn.is_available():  # no oneDNN: bf16 matmuls would be emulated
        return False, f"CPU has {found[0]} but this torch has no oneDNN"
    return True, f"CPU has {' and '.join(found)}"


def choose(name: str, device: torch.device | str, cpuinfo: str | None = None,
           env: Mapping[str, str] | None = None) -> Precision:  # fmt: skip
    """The forward dtype for the option value ``name`` (auto, float32, bfloat16, float16) on ``device``."""
    if name in DTYPES:
        return Precision(name, "as asked")
    if name != "auto":
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {name!r}")
    env = os.environ if env is None else env
    forced = env.get(ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise UserError(f"{ENV}={forced}: not 0 or 1: set {ENV}=1 (bf16) or 0 (fp32), or unset it")
        return Precision("bfloat16" if forced == "1" else "float32", f"auto: {ENV}={forced}")
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bfloat16", "auto: the GPU runs bf16")
        return Precision("float32", "auto: the GPU has no bf16")
    if kind == "cpu":
        native, why = cpu_bf16(cpuinfo, env)
        return Precision("bfloat16" if native else "float32", f"auto: {why}")
    return Precision("float32", f"auto: no bf16 detection for {kind}")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 natively (what ``auto`` picks bf16 for, ``ADAPTERS_NATIVE_BF16`` included):
    where a bf16 matmul is faster than an fp32 one rather than emulated through fp32."""
    return choose("auto", device).dtype == "bfloat16"


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """The forward dtype ``name`` means on ``device``: ``auto`` follows the hardware (module docstring)."""
    return choose(name, device).dtype


__all__ = [
    "ENV",
    "Precision",
    "choose",
    "cpu_bf16",
    "cpu_description",
    "cpu_flags",
    "cpu_model_name",
    "native_bf16",
    "resolve_dtype",
]
