"""Shared command-line plumbing: one-line errors and exit code 2 for bad input."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from adapters.errors import UserError

# Errors that name a path of the wrong kind or one this user cannot write: bad input, not a bug.
PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)


def out_folder_problem(out: str | Path) -> str | None:
    """Why ``out`` cannot be an output folder (None if it can): its nearest existing ancestor must be a folder
    this process can write; checked before any work, so that no result is lost at the end."""
    path = Path(out).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return (
            "is an existing file, not a folder" if existing == path else f"lies under {existing}, a file, not a folder"
        )
    try:  # a real write, not os.access: root passes that everywhere, also where nothing can be written (/proc)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        where = "is a folder" if existing == path else f"lies in {existing}, a folder"
        return f"{where} you cannot write ({e.strerror})"
    return None


def out_folder(value: str) -> str:
    """argparse type of an --out folder (see :func:`out_folder_problem`)."""
    problem = out_folder_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{value} {problem}: pass a folder (new or existing) you can write")
    return value


def out_file(value: str) -> str:
    """argparse type of a file to write (``--json``): not a folder, in a folder this process can write; checked
    before any work, so that a long run's report is not lost at its end."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder: pass a file name to write")
    parent = path.absolute().parent
    problem = out_folder_problem(parent)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {value}: {parent} {problem}: pass a file in a folder you "
                                         "can write")  # fmt: skip
    return value


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D102
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_main(body: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None, prog: str) -> int:
    """Run a CLI body; a UserError becomes one line on stderr and exit code 2.

    Deprecation notices that transformers, peft and torch address to library authors (e.g. peft calling a
    renamed transformers method) are silenced here: they are ours to act on, and on stderr they would break
    the one-line error promise."""
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch)(\.|$)")
            body(argv)
    except UserError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except OSError as e:
        if e.errno in PATH_ERRNOS and e.filename:  # a path the user gave, or a folder they cannot write
            sys.stderr.write(f"{prog}: error: {e.filename}: {e.strerror}: fix that path (a file where a file is read, "
                             "a folder you can write for outputs); finished work is kept and resumed\n")  # fmt: skip
            return 2
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        sys.stderr.write(f"{prog}: error: no space left on the device{where}: free space and rerun the same command "
                         "(finished work is kept and resumed)\n")  # fmt: skip
        return 2
    return 0


def recipe_main(body: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None, prog: str) -> int:
    """:func:`run_main` for a recipe over a finished run, with argparse's exit (its one-line error, --help) returned
    as the exit code instead of raised."""
    try:
        return run_main(body, argv, prog)
    except SystemExit as e:  # argparse's one-line error (Parser) or --help, as a return code
        return e.code if isinstance(e.code, int) else 2


def add_run_options(p: argparse.ArgumentParser, writes: str) -> None:
    """The options every recipe over a finished run shares: device, output folder, threads, progress."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument("--out", type=out_folder, default=None, help=f"where to write {writes} (default: the run folder)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class Stages:
    """Wall time per stage of a recipe, printed as it goes."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        self.reused: set[str] = set()

    def reuse(self, name: str, previous: dict, say: bool = True) -> None:
        """A stage whose earlier result is kept: its time is the earlier run's (when it recorded one)."""
        seconds = (previous.get("wall_time_s") or {}).get(name)
        if seconds is not None:
            self.seconds[name] = seconds
        self.reused.add(name)
        if say and not self.quiet:
            print(f"[{name}] reused from the earlier run (same inputs)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
        if not self.quiet:
            print(f"[{name}] done in {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


def versions() -> dict:
    """Python and package versions, recorded in every output's metadata."""
    import importlib.metadata as md
    import platform

    found = {"python": platform.python_version()}
    for pkg in ("torch", "peft", "transformers", "numpy", "scipy", "plotly", "matplotlib", "safetensors"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found


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


def _bounded(kind: type, low: float, strict: bool, name: str, what: str) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` above ``low`` (strictly or not); its error says which."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _bounded(int, 1, False, "positive_int", "an integer >= 1")  # e.g. --threads
nonnegative_int = _bounded(int, 0, False, "nonnegative_int", "an integer >= 0")  # e.g. basins' --draws
positive_float = _bounded(float, 0, True, "positive_float", "a number > 0")  # e.g. a radius
nonnegative_float = _bounded(float, 0, False, "nonnegative_float", "a number >= 0")  # e.g. an accuracy drop


def points_per_forward_arg(text: str) -> int | str:
    """argparse type of ``--points-per-forward``: ``auto`` or a positive integer."""
    try:
        return text if text == "auto" else positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', not {text!r}") from None


def parse_named_paths(items, option: str, names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """``NAME=PATH`` items as {name: Path}; ``names`` (optional) restricts NAME; each name once."""
    parsed: dict[str, Path] = {}
    allowed = f" with NAME one of {', '.join(names)}" if names else ""
    for item in [items] if isinstance(items, str) else items:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path or (names and name not in names):
            raise UserError(f"{option} takes NAME=PATH{allowed} (got '{item}')")
        if name in parsed:
            raise UserError(f"{option} {name} is given twice: pass each name once")
        parsed[name] = Path(path)
    return parsed
