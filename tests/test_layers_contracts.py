"""The import contracts of ``pyproject.toml`` (``[tool.importlinter]``): kept by the code as it is, and broken by
an injected upward import, so the check is known to bite (issue 21 point 1)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "landscape", "experiments")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` run on the tree at ``root`` (its packages first on the path, no cache)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def copy_tree(dst: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    # the contracts analysed this tree (the solutions package exists here), not an installed copy
    assert "solution -> foreign -> deltas -> peft_config KEPT" in result.stdout.replace("\n", " ")


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # adapters reaching up into landscape, inside a function as the old circle did
        ("adapters/errors.py", "def _upward():\n    import landscape.config  # noqa\n", "Three floors"),
        # the bottom of the solutions package reaching up to the readers above it
        (
            "adapters/solutions/deltas.py",
            "def _upward():\n    from adapters.solutions import foreign  # noqa\n",
            "Solutions, one direction",
        ),
        # the old circle through a thin re-export
        (
            "adapters/solutions/foreign.py",
            "def _upward():\n    from adapters import solution  # noqa\n",
            "never goes back through its old names",
        ),
    ],
)
def test_injected_upward_import_fails(tmp_path, module, line, broken):
    root = copy_tree(tmp_path)
    with open(root / module, "a") as f:
        f.write("\n\n" + line)
    result = lint_imports(root)
    out = " ".join(result.stdout.split())
    assert result.returncode == 1, out
    assert "0 broken" not in out, out
    # the contract named is among the broken ones (its section under "Broken contracts")
    assert broken in out.split("Broken contracts", 1)[1], out
