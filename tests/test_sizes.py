"""Sizes that fit in a head (issue 21): no file over 600 lines and no function over 80 lines in adapters/,
landscape/ and experiments/.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (decorators not counted; methods and nested
functions count on their own, and inside the function that holds them). Files and functions still over the limit,
in files other branches are editing, are named in :data:`ALLOWED_LONG_FILES` and :data:`ALLOWED_LONG_FUNCTIONS`;
the lists only shrink: an entry that is back under the limit fails too, so it is removed in the commit that
shrinks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "landscape", "experiments")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

# Files over MAX_FILE_LINES today, being split in their own branches (issue 21 point 3).
ALLOWED_LONG_FILES: dict[str, str] = {}
# Functions over MAX_FUNCTION_LINES today, in files other branches are editing: "path:function" -> why.
ALLOWED_LONG_FUNCTIONS = {}


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append((node.name, node.lineno, lines))
    return sorted(found, key=lambda f: f[1])


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_walk_sees_the_packages():
    rel = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert {"adapters/train.py", "landscape/connectivity.py", "experiments/figures.py"} <= rel
    assert len(rel) > 50


def test_no_function_over_80_lines():
    found = [
        f"{p.relative_to(ROOT).as_posix()}:{line} {name} ({n} lines)"
        for p in sources()
        for name, line, n in long_functions(p.read_text(encoding="utf-8"))
        if f"{p.relative_to(ROOT).as_posix()}:{name}" not in ALLOWED_LONG_FUNCTIONS
    ]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them into readable steps): {found}"


def test_no_file_over_600_lines():
    found = {}
    for p in sources():
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES and p.relative_to(ROOT).as_posix() not in ALLOWED_LONG_FILES:
            found[p.relative_to(ROOT).as_posix()] = n
    assert not found, f"files over {MAX_FILE_LINES} lines (split them by concern): {found}"


@pytest.mark.parametrize("path", sorted(ALLOWED_LONG_FILES))
def test_the_allowlist_names_only_files_still_too_long(path):
    file = ROOT / path
    assert file.is_file(), f"{path} is gone: remove it from ALLOWED_LONG_FILES"
    n = len(file.read_text(encoding="utf-8").splitlines())
    assert n > MAX_FILE_LINES, f"{path} has {n} lines now: remove it from ALLOWED_LONG_FILES"


@pytest.mark.parametrize("entry", sorted(ALLOWED_LONG_FUNCTIONS))
def test_the_allowlist_names_only_functions_still_too_long(entry):
    path, name = entry.split(":")
    file = ROOT / path
    assert file.is_file(), f"{path} is gone: remove {entry} from ALLOWED_LONG_FUNCTIONS"
    long = [n for n, _, _ in long_functions(file.read_text(encoding="utf-8"))]
    assert name in long, f"{entry} fits in {MAX_FUNCTION_LINES} lines now: remove it from ALLOWED_LONG_FUNCTIONS"


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines - 3))  # + def, docstring, return
    return f"{indent}def {name}(a):\n{indent}    '''doc'''\n{body}{indent}    return a\n"


def test_the_check_catches_a_long_function_method_or_nested_one():
    """The count is end_lineno - lineno + 1 of the def: 80 lines pass, 81 fail, wherever the def sits."""
    assert long_functions(_function("fits", 80)) == []
    assert long_functions(_function("long", 81)) == [("long", 1, 81)]
    method = "class C:\n" + "    @staticmethod\n" + _function("m", 81, indent="    ")
    assert long_functions(method) == [("m", 3, 81)]
    nested = "async def outer():\n" + _function("inner", 81, indent="    ")
    assert [(n, k) for n, _, k in long_functions(nested)] == [("outer", 82), ("inner", 81)]
