"""How the C heap hands memory back during training: keep freed blocks for the next step, then return them.

Why this exists. torch's CPU tensors come from glibc ``malloc``. glibc serves every block above its mmap
threshold (128 KiB growing to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when
it is freed, so a training step that allocates its activations and gradients (~8 GB for a ViT-B/32 step
over 128 images) and frees them again faults every page of them back in on the next step. Measured on
the 2-core EPYC restricted to AVX2 (three full fine-tuning steps of ViT-B/32, 128 images each, fresh processes
alternating, 3 pairs; ``python -m experiments.benchmarks.heap_policy --avx2``): 4.9-5.4 M minor page faults and
19-22 s of system CPU with glibc's defaults, 1.6-1.7 M and 9-10 s with freed memory kept in the heap
(``mallopt(M_MMAP_MAX, 0)``, no trim); 1.16x faster by the medians (66.5 against 77.0 s), faster in every pair.

Adapters on the same model: LoRA r = 32 1.26x (62.5 against 78.8 s), RandLoRA r = 6 1.07x (91.5 against 97.5 s;
``--method lora`` / ``randlora``).

The price is fragmentation: a freed block that does not fit the next request stays in the heap beside it. Against
glibc's own dynamic default, which already serves blocks up to 32 MiB from its heap, that is little: peak RSS above
the base while training (``python -m experiments.benchmarks.llm_scale --glibc-malloc``, the switch at 1 and at 0,
Qwen2-0.5B shape at hidden 512 / 1024 / 2048) LoRA and RandLoRA 0.92-1.14x on fp32 and bf16 bases, 0.80-1.06x on a
4-bit base up to hidden 1024; ViT-B/32 LoRA +6-9 %, RandLoRA -1 to +3 %; full fine-tuning +5-13 % (against a fixed
1 MiB threshold). But on a 4-bit base at hidden 2048 LoRA's peak was 3.6x and RandLoRA's 1.7x: the weights
bitsandbytes dequantises for each layer (87 MiB in fp32 at that size, 224 MiB at Llama-3-8B), above glibc's 32 MiB
cap, are mapped and returned per layer by glibc, and kept by the policy beside the next request. So
:func:`worth_keeping` applies it to training and to the dense plane's evaluation
(:meth:`landscape.engine.grid.PlaneEvaluator.evaluate_iter`) on the CPU unless the model holds packed 4-bit
weights, around the training loop or the points (:func:`kept_freed_memory`; nested uses: the outermost turns it on
and off), and the heap is trimmed when they end: the stages after them see the RSS they would have had. glibc
only: elsewhere (musl, macOS, Windows) it does nothing, and so it does when the user set the knobs it turns
themselves (:data:`USER_KEYS`: their policy wins). The evaluation: the main job's 11 × 11 grid (MiniLM, the EPYC
restricted to AVX2, the whole process under the policy's settings against glibc's defaults, one pair) faulted 0.37
M pages in with 9 s of system CPU instead of 22.4 M and 52 s, 186 against 211 s, peak 1.76 against 1.67 GB.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adapters.quant import is_packed

# mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
# Restored on exit. Setting any of these turns glibc's dynamic thresholds off for the rest of the process, so
# the exit sets the state that rule converges to once a process has freed a large block (mmap threshold at its
# 32 MiB cap, trim threshold twice that) and glibc's default count of mmapped blocks.
DEFAULT_MMAP_MAX, CONVERGED_MMAP_THRESHOLD = 65536, 32 << 20
CONVERGED_TRIM_THRESHOLD = 2 * CONVERGED_MMAP_THRESHOLD
# -1: "disables trimming completely" (mallopt(3)): freed memory at the heap's top stays there.
NEVER_TRIM = -1
# A user's setting of the knobs it turns (GLIBC_TUNABLES may hold them) wins; others (an mmap threshold) stay.
USER_KEYS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
# ADAPTERS_KEEP_FREED_MEMORY: 0 never (glibc's defaults throughout: less memory, more page faults), 1 for every
# CPU training and evaluation (a 4-bit base too), unset: the default rule (:func:`worth_keeping`).
SWITCH = "ADAPTERS_KEEP_FREED_MEMORY"
_depth = 0  # open kept_freed_memory contexts: only the outermost turns the policy on and off


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None where the C library is another one (looked up once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def applies(environ: dict | None = None) -> bool:
    """Whether :func:`kept_freed_memory` changes anything here: glibc, not switched off (:data:`SWITCH`), and
    no malloc policy of the user's own for the knobs it turns."""
    env = os.environ if environ is None else environ
    if env.get(SWITCH, "1") == "0" or any(k in env for k in USER_KEYS):
        return False
    return _glibc() is not None


def _restored(environ) -> dict[int, int]:
    """The thresholds set on exit: a user's own MALLOC_MMAP_THRESHOLD_ (with glibc's static trim default) or the
    converged dynamic state."""
    user = environ.get("MALLOC_MMAP_THRESHOLD_", "")
    if user.isdigit():
        return {M_MMAP_THRESHOLD: int(user), M_TRIM_THRESHOLD: 128 * 1024}
    return {M_MMAP_THRESHOLD: CONVERGED_MMAP_THRESHOLD, M_TRIM_THRESHOLD: CONVERGED_TRIM_THRESHOLD}


def worth_keeping(model: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether training ``model`` on ``device`` should keep its freed memory: on the CPU, unless the model holds
    packed 4-bit weights, whose dequantised copies (one weight each, larger than glibc's 32 MiB mmap cap at real
    sizes) would then stay in the heap beside the next request instead of returning to the system (module
    docstring)."""
    if torch.device(device).type != "cpu":
        return False
    return not any(is_packed(p) for p in model.parameters())


def wanted(model: torch.nn.Module, device: torch.device | str, environ: dict | None = None) -> bool:
    """Whether training or evaluating ``model`` on ``device`` asks for :func:`kept_freed_memory`: never off the
    CPU; on it, as :data:`SWITCH` says (``1``: always, ``0``: never), else by :func:`worth_keeping`."""
    setting = (os.environ if environ is None else environ).get(SWITCH)
    if torch.device(device).type != "cpu" or setting == "0":
        return False
    return setting == "1" or worth_keeping(model, device)


def release_freed() -> None:
    """Give the heap's free memory back to the system (glibc's ``malloc_trim(0)``; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def kept_freed_memory() -> Iterator[bool]:
    """Inside: freed blocks stay in the heap (no mmap per block, no trim). On exit: blocks above 32 MiB mmapped
    again (the thresholds above), and the heap's free memory returned to the system (``malloc_trim``). Yields
    whether it applied."""
    global _depth
    if not applies():
        yield False
        return
    libc = _glibc()
    if _depth == 0:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:  # the outermost exit restores (an evaluation inside a training loop leaves it on)
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            for param, value in _restored(os.environ).items():
                libc.mallopt(param, value)
            release_freed()


def keeping(model: torch.nn.Module, device: torch.device | str) -> contextlib.AbstractContextManager:
    """:func:`kept_freed_memory` where :func:`wanted` asks for it for ``model`` on ``device``, else nothing: the
    context a training loop or a run of evaluation points goes in."""
    return kept_freed_memory() if wanted(model, device) else contextlib.nullcontext(False)
