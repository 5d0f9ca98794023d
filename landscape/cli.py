"""Shared command-line plumbing: one-line errors and exit code 2 for bad input."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from adapters.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D102
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_main(body: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None, prog: str) -> int:
    """Run a CLI body; a UserError becomes one line on stderr and exit code 2."""
    try:
        body(argv)
    except UserError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    return 0


def resolve_device(name: str, rank: int = 0):
    """auto -> cuda when present; under torchrun each process takes GPU LOCAL_RANK."""
    import os

    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device '{name}': choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)
