"""The adapter core: datasets, models, fine-tuning methods (FT, LoRA, RandLoRA via peft),
training, and solutions with their dense weight updates ΔW. Never imports ``landscape``."""

from adapters.errors import UserError
from adapters.solution import Solution, load_solution, save_solution

__all__ = ["Solution", "UserError", "load_solution", "save_solution"]
