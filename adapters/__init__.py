"""The adapter core: datasets, models, fine-tuning methods (FT, LoRA, RandLoRA via peft),
training, and solutions with their dense weight updates ΔW. Never imports ``landscape``."""

# First, before anything here imports torch: the OpenMP wait policy must be in the environment
# when torch loads its OpenMP runtime (see adapters.threads; only what the user has not set).
from adapters import threads

threads.set_wait_policy()

from adapters.errors import UserError  # noqa: E402
from adapters.solution import Solution, load_solution, save_solution  # noqa: E402

__all__ = ["Solution", "UserError", "load_solution", "save_solution"]
