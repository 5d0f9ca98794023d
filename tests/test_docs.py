"""The front door and the docs site: the README stays short, the site builds with no warning, and every shell
command in the docs runs (or says what it needs).

Convention for a shell command in README.md or docs/**/*.md: a fenced ```bash block is followed (after at most
blank lines) by one HTML comment that says how its test runs it:

- ``<!-- test: ARGS -->``: every ``python -m MODULE ...`` (or ``torchrun ... -m MODULE ...``) command of the block
  runs, with ARGS appended (the small overrides that make it fast: argparse lets a later flag win), in a scratch
  folder whose ``runs/wordnet`` is a copy of the shared tiny run (``conftest.tiny_wordnet_run``: tiny-bert on the
  tiny WordNet); it must exit 0. A main job on WordNet also gets ``--data-root`` of the tiny WordNet, as the shared
  run was made, so with that run's settings it reuses the run's stages; a CIFAR-100 run's ``--data-root`` gets a
  small fake CIFAR-100 in the real format (its ARGS then pick a tiny model with no download). A command without
  shell syntax runs in this process (its module's ``main``; a ``$(python -c "...")`` in it is evaluated here first),
  one with other shell syntax or ``torchrun`` under bash with the venv's python first on PATH. ``bash
  scripts/setup.sh`` made the environment this runs in, and ``python -m pytest`` is this suite: neither is rerun; the
  README's test command must be the one ``.ci/run`` runs.
- ``<!-- needs: WHAT -->`` (``gpu``, ``slurm``, ``data``: data or weights that are not offline): not run here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
README_MAX_LINES = 250
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
MARK = re.compile(r"^<!-- (test|needs): ?(.*?) ?-->$")
NEEDS = {"gpu", "slurm", "data"}
SHELL = set("$`|<>;()")  # a command with any of these runs under bash, not in this process


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    commands: tuple[str, ...]  # one per line, continuation lines joined, comments dropped
    kind: str  # "test" or "needs"
    arg: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced shell block of a page with the mark after it (kind "" when it has none)."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        mark = MARK.match(lines[i].strip()) if i < len(lines) else None
        commands = [c for c in _commands(body) if c]
        out.append(Block(str(path.relative_to(ROOT)), start, tuple(commands), *(mark.groups() if mark else ("", ""))))
    return out


def _commands(body: list[str]) -> list[str]:
    joined = "\n".join(body).replace("\\\n", " ")
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines() if not line.lstrip().startswith("#")]


ALL = [b for page in PAGES for b in blocks(page)]


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / image).is_file(), image
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
    assert len(re.findall(r"!\[", text)) == 3  # three figures


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = [c for b in ALL if b.page == "README.md" for c in b.commands]
    assert ci in readme, f"{ci!r} is not a command of the README"


def test_every_shell_block_says_how_it_is_tested():
    assert ALL, "no shell block found"
    unmarked = [b.id for b in ALL if not b.kind]
    assert not unmarked, f"shell blocks without <!-- test: ... --> or <!-- needs: ... -->: {unmarked}"
    unknown = [b.id for b in ALL if b.kind == "needs" and b.arg not in NEEDS]
    assert not unknown, f"needs: one of {sorted(NEEDS)}: {unknown}"


def test_the_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed: bash scripts/setup.sh --test installs the docs extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "<!-- cli:" not in cli and cli.count("usage:") >= 20  # the options, from the parsers
    assert (tmp_path / "site" / "figures" / "wordnet_landscape.png").is_file()  # figures/ served to the pages
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "load_solution" in api and "open_run" in api  # mkdocstrings rendered the API


def _segments(command: str) -> list[str]:
    """The parts of a command line that this test runs: its ``python -m`` / ``torchrun -m`` commands but pytest."""
    run = []
    for part in (p.strip() for p in command.split("&&")):
        if re.match(r"^bash scripts/setup\.sh\b", part):  # made the environment this test runs in
            continue
        if re.match(r"^(\S*/)?python3? -m pytest\b", part):  # this suite (the README's is .ci/run's, tested above)
            continue
        assert re.search(r"\b(python3?|torchrun)\b.* -m [\w.]+", part), f"not a python -m command: {part!r}"
        run.append(part)
    return run


def _wordnet(part: str, root: Path) -> list[str]:
    """The tiny WordNet for a main job on WordNet, as the shared run was made (the data root is in its keys)."""
    if " landscape.connectivity" not in part or "--data-root" in part:
        return []
    dataset = re.search(r"--dataset[ =](\S+)", part)
    return ["--data-root", str(root)] if dataset is None or dataset.group(1) == "wordnet" else []


SUBSTITUTION = re.compile(r'\$\(python3? -c "([^"$`]*)"\)')


def _fake_cifar100(part: str, scratch: Path) -> None:
    """A CIFAR-100 run's ``--data-root`` holds a small fake in the real format (the real set is not offline)."""
    from tests.fakes import write_cifar100

    if re.search(r"--dataset[ =]cifar100\b", part) and (root := re.search(r"--data-root[ =](\S+)", part)):
        write_cifar100(scratch / root.group(1), n_train=200, n_test=50)


def _substitute(part: str) -> str:
    """``$(python -c "CODE")`` replaced by what CODE prints, run here (a second interpreter costs seconds)."""

    def printed(match: re.Match) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(match.group(1), {})
        return out.getvalue().strip()

    return SUBSTITUTION.sub(printed, part)


def _in_process(part: str, extra: list[str]) -> int:
    words = shlex.split(part)
    words = words[words.index("-m") + 1 :]
    module = importlib.import_module(words[0])
    main = getattr(module, "main", None) or importlib.import_module(words[0] + ".cli").main
    return main([*words[1:], *extra])


UNIQUE = {(b.commands, b.arg): b for b in reversed(ALL) if b.kind == "test"}  # the same block on two pages: once


@pytest.mark.parametrize("block", list(UNIQUE.values()), ids=lambda b: b.id)
def test_each_documented_command_runs(block, tiny_wordnet_run, wordnet_root, tmp_path, monkeypatch):
    """Each command in a scratch folder whose runs/wordnet is a copy of the shared tiny run: the recipes over a run
    read it, and the main job's own command, with the tiny run's settings, reuses its stages."""
    scratch = tmp_path / "scratch"
    shutil.copytree(tiny_wordnet_run, scratch / "runs" / "wordnet")
    monkeypatch.chdir(scratch)
    for command in block.commands:
        for part in _segments(command):
            _fake_cifar100(part, scratch)
            part, extra = _substitute(part), [*_wordnet(part, wordnet_root), *shlex.split(block.arg)]
            if SHELL & set(part) or part.startswith("torchrun"):
                part = re.sub(r"^\S*/python3?\b", "python", part)  # the venv's python, first on PATH
                env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
                proc = subprocess.run(["bash", "-c", f"{part} {shlex.join(extra)}"], env=env, capture_output=True,
                                      text=True, timeout=900)  # fmt: skip
                assert proc.returncode == 0, f"{part}\n{proc.stderr[-3000:]}"
            else:
                assert _in_process(part, extra) == 0, part


class _Parsed(Exception):
    """Raised by the patched parser once a command line parsed: nothing after the parse runs."""


INLINE = re.compile(r"`((?:[A-Z_]+=\S+ )*(?:/usr/bin/time )?(?:python3?|torchrun[^`]*?) -m [\w.]+[^`]*)`")
PLACEHOLDER = re.compile(r"…|\.\.\.|\||\{|<|\$|\b[A-Z][A-Z0-9_]*\b(?!=)")  # a synopsis, not a command line
EXAMPLE = {"DIR": "runs/x", "PATH": "x.json", "C": "ft", "V": "fp32", "MODEL": "tiny-bert"}  # placeholder: a value


def _example(words: str) -> str:
    """A synopsis' placeholders replaced by example values, its optional options ([--x N]) kept."""
    words = words.replace("[", "").replace("]", "")
    return " ".join(EXAMPLE.get(w, w) for w in words.split())


def inline_commands() -> list[tuple[str, str]]:
    """The commands quoted in running text (page, command), with example values for the common placeholders; those
    with other placeholders (``NAME=PATH ...``) are synopses, left out."""
    found = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # the fenced blocks are run above
        text = re.sub(r"^#.*$", "", text, flags=re.M)  # a heading names a command, without its options
        for command in INLINE.findall(" ".join(text.split())):
            words = _example(command[command.index("-m ") :])
            if " -" in words and not PLACEHOLDER.search(words):
                found.append((str(page.relative_to(ROOT)), words))
    return sorted(set(found))


def test_every_command_quoted_in_the_text_parses(monkeypatch):
    """The options of every command quoted in the pages' text are options its parser accepts (parsed, not run)."""
    import argparse

    commands = inline_commands()
    assert len(commands) > 20  # the pages quote many commands: a broken pattern must not pass silently
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    failed = []
    for page, command in commands:
        words = shlex.split(command)[1:]
        module = importlib.import_module(words[0])
        main = getattr(module, "main", None) or importlib.import_module(words[0] + ".cli").main
        try:
            code = main(words[1:])
            failed.append(f"{page}: {command} (returned {code} before parsing its options)")
        except _Parsed:
            pass
        except SystemExit as e:
            failed.append(f"{page}: {command} (exit {e.code})")
    assert not failed, "\n".join(failed)
