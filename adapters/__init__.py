"""The adapter core: datasets, models, fine-tuning methods (FT, LoRA, RandLoRA via peft),
training, and solutions with their dense weight updates ΔW. Never imports ``landscape``."""

# First, before anything here imports torch: the OpenMP wait policy must be in the environment
# when torch loads its OpenMP runtime (see adapters.threads; only what the user has not set).
from adapters import threads

threads.set_wait_policy()

import logging  # noqa: E402

# bitsandbytes (which peft imports whenever it is installed) warns on CPUs with AVX512-BF16 that the optional
# `kernels` package is missing: a kernel for its in-place CPU repacking only, which adapters.quant turns off.
# The warning is a stray line before the CLI's one-line errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Where `kernels` is installed (transformers pulls it in), bitsandbytes asks it for that kernel; under
# HF_HUB_OFFLINE it logs that the hub's publisher check is skipped: the same stray line, so the same silence.
logging.getLogger("kernels").setLevel(logging.ERROR)

from adapters.errors import UserError  # noqa: E402
from adapters.solution import Solution, load_solution, save_solution  # noqa: E402

__all__ = ["Solution", "UserError", "load_solution", "save_solution"]
