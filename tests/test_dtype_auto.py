"""``auto`` precision follows the hardware (adapters.precision): the decision table on fabricated /proc/cpuinfo
texts and environments, explicit dtypes honoured, and on a tiny Llama run the printed choice, its record in
landscape.json, and the dtype the forwards actually ran in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.errors import UserError
from adapters.precision import ENV, choose, cpu_description, cpu_flags, resolve_dtype
from landscape.config import PAPER_DATASETS, PAPER_DIR, RunConfig
from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm

PLAIN = "flags\t\t: fpu sse sse2 avx avx2 fma"  # an AVX2-only CPU (the EPYC of issue 20)
AVX512_BF16 = PLAIN + " avx512f avx512bw avx512_bf16"
AMX = PLAIN + " avx512f amx_tile amx_bf16 amx_int8"


def cpuinfo(flags_line: str, processors: int = 2) -> str:
    """A /proc/cpuinfo text of ``processors`` identical processors."""
    one = "processor\t: {}\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\n" + flags_line + "\nbugs\t\t: spectre\n"
    return "\n".join(one.format(k) for k in range(processors))


@pytest.mark.parametrize(
    ("flags", "env", "dtype", "why"),
    [
        (PLAIN, {}, "float32", "no AVX512-BF16 or AMX"),
        (AVX512_BF16, {}, "bfloat16", "AVX512-BF16"),
        (AMX, {}, "bfloat16", "AMX-BF16"),
        (AVX512_BF16, {"ATEN_CPU_CAPABILITY": "avx2"}, "float32", "ATEN_CPU_CAPABILITY=avx2"),
        (AMX, {"ATEN_CPU_CAPABILITY": "default"}, "float32", "ATEN_CPU_CAPABILITY=default"),
        (AMX, {"ATEN_CPU_CAPABILITY": "avx512"}, "bfloat16", "AMX-BF16"),
        (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "float32", "ONEDNN_MAX_CPU_ISA=avx2"),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "float32", "ONEDNN_MAX_CPU_ISA=avx512_core_vnni"),
        (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "bfloat16", "AVX512-BF16"),
        (AMX, {"DNNL_MAX_CPU_ISA": "avx512_core_amx"}, "bfloat16", "AMX-BF16"),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "avx9000"}, "float32", "not a oneDNN ISA"),
        (PLAIN, {ENV: "1"}, "bfloat16", f"{ENV}=1"),  # the override wins over the detection, both ways
        (AMX, {ENV: "0"}, "float32", f"{ENV}=0"),
    ],
)
def test_auto_on_cpu_follows_cpuinfo_and_environment(flags, env, dtype, why):
    chosen = choose("auto", "cpu", cpuinfo=cpuinfo(flags), env=env)
    assert chosen.dtype == dtype and why in chosen.reason and chosen.reason.startswith("auto: "), chosen
    assert chosen.line() == f"precision: {dtype} ({chosen.reason})"


def test_cpuinfo_flags_are_read_from_every_flags_line():
    assert {"avx2", "amx_bf16", "avx512_bf16"} <= cpu_flags(cpuinfo(AMX) + "\n" + cpuinfo(AVX512_BF16, 1))
    assert "amx_bf16" not in cpu_flags("processor : 0\nmodel name : amx_bf16 lookalike\n")  # flags lines only


def test_a_benchmarks_cpu_names_the_model_its_instruction_sets_and_what_holds_torch_below_them():
    """Timings restricted to AVX2 on an AVX-512 machine (the README's emulation of the slower kind) say so in the
    CPU they name; unrestricted ones do not."""
    assert cpu_description(cpuinfo(PLAIN), env={}) == "Test CPU (AVX2)"
    assert cpu_description(cpuinfo(AMX), env={}) == "Test CPU (AVX2, AVX-512, AMX)"
    held = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "HOME": "/"}
    assert cpu_description(cpuinfo(AVX512_BF16), env=held) == (
        "Test CPU (AVX2, AVX-512, AVX512-BF16; held: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 "
        "ONEDNN_MAX_CPU_ISA=AVX2)"
    )
    assert cpu_description("processor : 0\nflags : sse2\n", env={}).endswith("(no AVX2)")  # no model name line


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("flags", [PLAIN, AMX])
def test_explicit_dtypes_are_honoured_on_any_hardware(dtype, flags):
    for env in ({}, {ENV: "0"}, {ENV: "1"}):
        assert choose(dtype, "cpu", cpuinfo=cpuinfo(flags), env=env).dtype == dtype
    assert resolve_dtype(dtype, "cuda") == dtype


def test_auto_on_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose("auto", "cuda", env={}).dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert choose("auto", torch.device("cuda", 0), env={}).dtype == "float32"


def test_bad_override_and_bad_name_are_refused():
    with pytest.raises(UserError, match=f"{ENV}=yes"):
        choose("auto", "cpu", cpuinfo=cpuinfo(AMX), env={ENV: "yes"})
    with pytest.raises(ValueError, match="fp8"):
        choose("fp8", "cpu")


def test_the_defaults_and_the_paper_configs_are_auto():
    from adapters.compat import tomllib

    assert RunConfig().dtype == "auto" and RunConfig().train_dtype == "auto"
    for dataset in PAPER_DATASETS:  # the paper's recipes (a rehearsal may pin its own)
        path = PAPER_DIR / f"{dataset}.toml"
        config = tomllib.loads(path.read_text())
        assert config["train"]["dtype"] == "auto" and config["landscape"]["dtype"] == "auto", path.name


def test_the_suite_runs_in_fp32():
    """tests/conftest.py pins the override, so every test's numbers are fp32 on every machine."""
    assert resolve_dtype("auto", "cpu") == "float32"


# ------------------------------------------------------------------------------------------ on a run


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=16, n_test=4)


class ForwardDtypes:
    """Every nn.Linear forward's (autocast on, autocast dtype, output dtype) while installed."""

    def __init__(self):
        self.seen: set[tuple[bool, torch.dtype, torch.dtype]] = set()

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
                self.seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype))

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def outputs(self) -> set[torch.dtype]:
        return {out for _, _, out in self.seen}


def _run(capsys, llama, data_root, out, *flags) -> tuple[list[str], ForwardDtypes]:
    from landscape import connectivity

    capsys.readouterr()
    with ForwardDtypes() as dtypes:
        code = connectivity.main(["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root),
                                  "--train-steps", "1", "--grid", "3", "--eval-samples", "6", "--path-points", "3",
                                  "--out", str(out), "--no-progress", *flags])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == 0, err
    return err, dtypes


def test_the_run_says_what_it_chose_records_it_and_runs_it(llama, data_root, tmp_path, capsys, monkeypatch,
                                                           no_figure_drawing):  # fmt: skip
    # the suite's default: auto is fp32, and no forward runs under autocast
    err, dtypes = _run(capsys, llama, data_root, tmp_path / "fp32")
    line = f"precision: float32 (auto: {ENV}=0)"
    loaded = next(i for i, e in enumerate(err) if e.startswith("[load] done"))  # the inputs are checked by then
    assert line in err and loaded < err.index(line) < min(i for i, e in enumerate(err) if e.startswith("[train"))
    assert dtypes.outputs == {torch.float32} and not any(on for on, _, _ in dtypes.seen)
    meta = json.loads((tmp_path / "fp32" / "landscape.json").read_text())
    assert meta["precision"] == {"dtype": "float32", "reason": f"auto: {ENV}=0", "train": "float32"}

    # an explicit --dtype bfloat16 gets bf16 for the landscape even where auto would not (training stays fp32)
    err, dtypes = _run(capsys, llama, data_root, tmp_path / "fp32", "--dtype", "bfloat16", "--restart")
    assert "precision: bfloat16 (as asked); training forward: float32" in err
    assert (True, torch.bfloat16, torch.bfloat16) in dtypes.seen  # the grid and paths ran in bf16
    meta = json.loads((tmp_path / "fp32" / "landscape.json").read_text())
    assert meta["precision"]["dtype"] == "bfloat16" and meta["dtype"] == "bfloat16"

    # native bf16 (forced as on an AMX / AVX512-BF16 CPU): auto is bf16 for training and the landscape
    monkeypatch.setenv(ENV, "1")
    err, dtypes = _run(capsys, llama, data_root, tmp_path / "bf16")
    assert f"precision: bfloat16 (auto: {ENV}=1)" in err
    assert (True, torch.bfloat16, torch.bfloat16) in dtypes.seen
    meta = json.loads((tmp_path / "bf16" / "landscape.json").read_text())
    assert meta["precision"] == {"dtype": "bfloat16", "reason": f"auto: {ENV}=1", "train": "bfloat16"}
    trained = json.loads((tmp_path / "bf16" / "solutions" / "lora" / "solution.json").read_text())
    assert trained["precision"]["autocast"] == "bfloat16" and trained["precision"]["master_weights"] == "float32"


def test_bad_input_fails_before_the_precision_line(tmp_path, capsys):
    from landscape import connectivity

    code = connectivity.main(["--dataset", "commonsense", "--model", "hf:" + str(tmp_path / "no-such-model"),
                              "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                              "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "precision" not in err[0], err
