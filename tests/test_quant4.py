"""4-bit (bitsandbytes NF4) bases on CPU: loading, QLoRA training, ΔW beside packed weights, the method set.

Each test checks against a reference independent of the code under test:

- ``--load-4bit`` gives ``bnb.nn.Linear4bit`` layers whose forward equals the fp32 model with bitsandbytes' own
  quantise → dequantise round trip of each weight put in (``bitsandbytes.functional``, not ``adapters.quant``);
- LoRA and RandLoRA train on it: the loss falls, only adapter parameters change, the packed bytes do not;
- the ΔW of a trained adapter on the packed base equals peft's own ``merge_and_unload`` on a dense copy whose
  weights are bitsandbytes' dequantised ones (tool-written and peft-written adapter folders);
- an FT checkpoint's direction is θ_FT − ``dequantize_4bit`` (base), so W0 + ΔW gives θ_FT back;
- ``--methods ft`` with ``--load-4bit``, and a 4-bit solution on an unquantised base, exit 2 with one line;
- a foreign RandLoRA adapter saved with its projections counts only λ and γ as trainable (peft's own count).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import pytest
import torch

from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=24, n_test=2)


def _argv(llama: Path, data_root: Path, out: Path, *flags: str) -> list[str]:
    return ["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root), "--out", str(out),
            "--no-progress", "--device", "cpu", "--eval-samples", "16", *flags]  # fmt: skip


def _load(llama: Path, data_root: Path, out: Path, *flags: str):
    from landscape.config import from_argv
    from landscape.run import load

    return load(from_argv(_argv(llama, data_root, out, *flags)))


@pytest.fixture(scope="module")
def run4(llama, data_root, tmp_path_factory):
    """A --load-4bit run whose solutions train_solutions made (3 steps each): (loaded, solutions)."""
    from landscape.cli import Stages
    from landscape.run import train_solutions

    out = tmp_path_factory.mktemp("run4")
    loaded = _load(llama, data_root, out, "--load-4bit", "--train-steps", "3")
    solutions = train_solutions(loaded, torch.device("cpu"), Stages(quiet=True))
    return loaded, solutions


def _packed(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every 4-bit layer: transformers quantises all the decoder's Linears (not the LM head), targets or not."""
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _reference_dequantised(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own NF4 round trip of ``weight`` (double-quantised statistics, as --load-4bit loads)."""
    codes, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    return bnb.functional.dequantize_4bit(codes, state).float()


def _dense_dequantised(llama: Path, base4: torch.nn.Module) -> torch.nn.Module:
    """The fp32 scorer of ``llama`` with every packed weight of ``base4`` replaced by bitsandbytes' dequantisation."""
    from adapters.models import build_base

    dense = build_base(f"hf:{llama}", ["x"], {"torch_dtype": "float32", "load_4bit": False, "cutoff_len": 256},
                       modality="lm")  # fmt: skip
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, module in _packed(base4).items():
            w = module.weight
            params[f"{name}.weight"].copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
    return dense


# --------------------------------------------------------------------------- (a) loading


def test_load_4bit_on_cpu_gives_linear4bit_computing_the_nf4_weights(llama, data_root, tmp_path):
    loaded = _load(llama, data_root, tmp_path, "--load-4bit")
    base4 = loaded.task.base
    from adapters.models import build_base
    from adapters.quant import base_quantization, dequantized_weight, is_packed, logical_shape

    dense = build_base(f"hf:{llama}", ["x"], modality="lm")
    dense_params = dict(dense.named_parameters())
    packed = _packed(base4)
    assert len(packed) == 2 * 7  # q k v o gate up down of both layers
    for name, module in packed.items():
        w0 = dense_params[f"{name}.weight"].detach()
        assert module.weight.dtype == torch.uint8 and module.weight.device.type == "cpu" and is_packed(module)
        assert logical_shape(module) == w0.shape and module.weight.numel() * 2 == w0.numel()
        torch.testing.assert_close(dequantized_weight(module), _reference_dequantised(w0), rtol=0, atol=0)
    assert base_quantization(base4) == {"quantization": "nf4", "compute_dtype": "float32", "torch_dtype": "float32"}
    reference = _dense_dequantised(llama, base4).eval()
    batch = loaded.task.train.batch(torch.arange(4))
    with torch.no_grad():
        torch.testing.assert_close(base4.eval()(**batch), reference(**batch), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- (b) QLoRA training


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_adapters_train_beside_the_packed_weights(llama, data_root, tmp_path, method):
    from adapters.methods import attach
    from adapters.train import evaluate, train
    from landscape.run import method_spec, train_config

    loaded = _load(llama, data_root, tmp_path, "--load-4bit")
    config = train_config(loaded, method, torch.device("cpu"))
    config.steps, config.lr, config.batch_size = 12, 2e-2, 8
    model = attach(copy.deepcopy(loaded.task.base), method_spec(loaded, method), loaded.task.entry.targets)
    layer = model.get_submodule("base_model.model.backbone.model.layers.0.self_attn.q_proj")
    assert type(layer).__module__ == f"peft.tuners.{method}.bnb" and type(layer).__name__ == "Linear4bit"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(f".{method}_" in n for n in adapter)
    assert all(model.get_parameter(n).dtype == torch.float32 for n in adapter)  # fp32 adapter weights
    data, labels = loaded.task.train, loaded.task.dataset.train.labels
    start = evaluate(model, data, labels, 64, objective=loaded.task.objective)[0]
    train(model, data, labels, config, progress=False, objective=loaded.task.objective)
    end = evaluate(model, data, labels, 64, objective=loaded.task.objective)[0]
    assert end < start - 0.03, (start, end)  # the whole training set's answer loss
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= adapter  # packed codes, norms, embeddings: bit-identical
    assert any(".lambda" in n or "lora_B" in n or "_gamma" in n for n in changed)


# --------------------------------------------------------------------------- (c) ΔW beside the packed base


def _peft_merge_reference(dense: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """{weight name: merged − W} of the adapter in ``folder`` merged by peft into a copy of ``dense``, in fp64 (the
    factors and W are fp32, so this is exact to fp64 rounding: no fp32 rounding of W + ΔW in the reference)."""
    from peft import PeftModel

    from adapters.solution import peft_config_of

    weights = {n: p.detach().double() for n, p in dense.named_parameters()}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(dense), folder, config=peft_config_of(folder)).double()
    merged = peft_model.merge_and_unload()
    out = {n: (p.detach() - weights[n]).float() for n, p in merged.named_parameters()}
    return {n: d for n, d in out.items() if d.any()}


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_adapter_delta_on_packed_base_equals_peft_merge_on_dequantised_copy(llama, run4, method, tmp_path):
    from adapters.solution import load_solution

    loaded, solutions = run4
    base4 = loaded.task.base
    reference = _peft_merge_reference(_dense_dequantised(llama, base4), Path(solutions[method].path))
    deltas = solutions[method].delta()
    assert set(deltas) == set(reference) and len(deltas) == 2 * len(TARGETS)
    for name, d in deltas.items():
        assert d.dtype == torch.float32 and d.shape == reference[name].shape
        torch.testing.assert_close(d, reference[name], rtol=1e-5, atol=1e-6 * reference[name].abs().max().item())
    if method == "lora":  # the same adapter saved by peft itself: a foreign folder, ΔW through merged_deltas
        peft_model = _peft_model_of(solutions[method], base4)
        peft_model.save_pretrained(tmp_path / "peft-lora")
        foreign = load_solution(tmp_path / "peft-lora", base4, "lora", loaded.model_name).delta()
        assert set(foreign) == set(reference)
        for name, d in foreign.items():
            torch.testing.assert_close(d, reference[name], rtol=1e-5, atol=1e-6 * reference[name].abs().max().item())


def _peft_model_of(solution, base: torch.nn.Module):
    from adapters.deltas import load_adapter

    return load_adapter(Path(solution.path), base)


def test_4bit_run_trains_only_the_adapters_and_records_the_quantisation(run4, capsys):
    loaded, solutions = run4
    assert loaded.config.method_set() == ("lora", "randlora")
    assert set(solutions) == {"head_only", "lora", "randlora"}
    assert not (loaded.config.out_dir / "solutions" / "ft").exists()
    for method in ("lora", "randlora"):
        info = solutions[method].info
        assert info["base_quantization"] == {"quantization": "nf4", "compute_dtype": "float32",
                                             "torch_dtype": "float32"}  # fmt: skip
        assert info["train_key"]["quantization"] == info["base_quantization"]
        assert info["train_key"]["model_options"]["load_4bit"] is True


# --------------------------------------------------------------------------- (d) FT on 4-bit refused


def _main(capsys, *args: str) -> tuple[int, list[str]]:
    from landscape import connectivity

    capsys.readouterr()
    code = connectivity.main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_ft_on_a_4bit_base_exits_2_with_one_line_before_loading(llama, data_root, tmp_path, capsys, monkeypatch):
    import adapters.models.hf as hf

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hf, "build", no_loading)
    out = tmp_path / "out"
    start = time.monotonic()
    code, lines = _main(capsys, *_argv(llama, data_root, out, "--load-4bit", "--methods", "ft", "lora"))
    assert time.monotonic() - start < 20
    assert code == 2 and len(lines) == 1, lines
    assert "--methods" in lines[0] and "--load-4bit" in lines[0] and "--solutions ft=" in lines[0]
    assert not out.exists()


def test_method_set_defaults_and_toml(tmp_path):
    from landscape.config import from_argv

    base = ["--dataset", "commonsense", "--model", "hf:x"]
    assert from_argv(base).method_set() == ("ft", "lora", "randlora")
    assert from_argv([*base, "--load-4bit"]).method_set() == ("lora", "randlora")
    line = ["--path-points", "0", "--chart", "random-line", "--center"]  # one solution: no plane, no paths
    assert from_argv([*base, "--methods", "randlora", "ft", *line, "ft"]).method_set() == ("ft", "randlora")
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nmethods = ["lora"]\n[model]\nload_4bit = true\n[landscape]\nchart = "random-line"\n'
                    'center = "lora"\npath_points = 0\n')  # fmt: skip
    assert from_argv(["--config", str(toml), "--dataset", "commonsense"]).method_set() == ("lora",)
    from adapters.errors import UserError

    with pytest.raises(UserError, match="must be one or more of"):
        from_argv([*base, "--methods", "dora"])


# --------------------------------------------------------------------------- (e) an FT checkpoint on 4 bits


def test_ft_checkpoint_direction_is_theta_minus_dequantised_base(llama, run4, tmp_path):
    from transformers import AutoModelForCausalLM

    from adapters.solution import load_solution

    loaded, _ = run4
    base4 = loaded.task.base
    ft = AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in ft.parameters():
            p.add_(torch.randn_like(p), alpha=1e-3)  # a fine-tuned model: every weight moved a little
    ft.save_pretrained(tmp_path / "ft")
    theta = {f"backbone.{n}": p.detach() for n, p in ft.named_parameters()}
    solution = load_solution(tmp_path / "ft", base4, "ft", loaded.model_name)
    deltas = solution.delta()
    packed = {f"{n}.weight": m for n, m in _packed(base4).items()}
    assert set(packed) <= set(deltas) and solution.info["trainable_params"] == sum(t.numel() for t in theta.values())
    base_params = dict(base4.named_parameters())
    worst, exact, total = 0.0, 0, 0
    for name, d in deltas.items():
        w = base_params[name]
        w0 = bnb.functional.dequantize_4bit(w.data, w.quant_state) if name in packed else w.detach()
        assert d.shape == theta[name].shape and d.dtype == torch.float32
        torch.testing.assert_close(d, theta[name] - w0.float(), rtol=0, atol=0)
        # The FT vertex W0 + 1·ΔW is θ_FT up to fp32 rounding: ΔW's and the sum's, each at most half a unit in
        # the last place of the larger operand (exact wherever θ_FT and W0 are within a factor 2: Sterbenz).
        vertex = w0.float() + d
        bound = torch.finfo(torch.float32).eps * torch.maximum(d.abs(), theta[name].abs())
        worst = max(worst, ((vertex - theta[name]).abs() - bound).max().item())
        exact += int((vertex == theta[name]).sum())
        total += vertex.numel()
    assert worst <= 0.0, worst
    assert exact / total > 0.95  # measured: 98.8 % of the entries bit-exact


# --------------------------------------------------------------------------- (f) quantisation mismatch


def test_4bit_solution_on_an_unquantised_base_exits_2_with_one_line(llama, data_root, run4, tmp_path, capsys):
    _, solutions = run4
    out = tmp_path / "out"
    code, lines = _main(capsys, *_argv(llama, data_root, out, "--train-steps", "1", "--solutions",
                                       f"lora={solutions['lora'].path}"))  # fmt: skip
    assert code == 2 and len(lines) == 1, lines
    assert "4-bit (nf4)" in lines[0] and "pass --load-4bit" in lines[0]
    assert not (out / "solutions").exists()


# --------------------------------------------------------------------------- foreign RandLoRA count


def test_foreign_randlora_counts_only_lambda_and_gamma(llama, tmp_path):
    from peft import RandLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.solution import load_solutions

    model = AutoModelForCausalLM.from_pretrained(llama)
    config = RandLoraConfig(r=4, target_modules=list(TARGETS), save_projection=True, projection_prng_key=0)
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # peft's own: λ and γ
    peft_model.save_pretrained(tmp_path / "randlora")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "randlora" / "adapter_model.safetensors"), "pt") as f:
        saved = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # bases once per layer, λ, γ
    solutions = load_solutions({"randlora": tmp_path / "randlora"}, f"hf:{llama}")
    assert solutions["randlora"].info["trainable_params"] == trainable < saved


def test_dtype_mismatch_is_refused_and_compute_dtype_noted(run4, tmp_path, capsys):
    import json
    import shutil

    from adapters.errors import UserError
    from adapters.solution import load_solution

    loaded, solutions = run4
    folder = tmp_path / "lora"
    shutil.copytree(solutions["lora"].path, folder)
    info = json.loads((folder / "solution.json").read_text())
    info["base_quantization"]["compute_dtype"] = "bfloat16"
    (folder / "solution.json").write_text(json.dumps(info))
    capsys.readouterr()
    load_solution(folder, loaded.task.base, "lora")  # same weights, other rounding: loads, with a note
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "bfloat16" in note[0] and "float32" in note[0], note
    info["base_quantization"]["torch_dtype"] = "bfloat16"
    (folder / "solution.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="pass --torch-dtype bfloat16") as err:
        load_solution(folder, loaded.task.base, "lora")
    assert "\n" not in str(err.value)


def test_qlora_adapters_stay_fp32_on_a_bf16_base_and_ft_is_refused(llama, data_root, tmp_path):
    from adapters.methods import attach
    from adapters.quant import base_quantization
    from landscape.run import method_spec

    loaded = _load(llama, data_root, tmp_path, "--load-4bit", "--torch-dtype", "bfloat16")
    assert base_quantization(loaded.task.base) == {"quantization": "nf4", "compute_dtype": "bfloat16",
                                                   "torch_dtype": "bfloat16"}  # fmt: skip
    from adapters.errors import UserError
    from adapters.methods import MethodSpec

    with pytest.raises(UserError, match="full fine-tuning cannot train a base loaded in 4 bits"):
        attach(loaded.task.base, MethodSpec("ft"), loaded.task.entry.targets)  # the Python API refuses it too
    assert not any(p.requires_grad for p in loaded.task.base.parameters())
    batch = loaded.task.train.batch(torch.arange(2))
    for method in ("lora", "randlora"):
        model = attach(copy.deepcopy(loaded.task.base), method_spec(loaded, method), loaded.task.entry.targets)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
        model(**batch)[..., 0].sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_spectra_on_a_4bit_base_from_the_factors_and_the_dequantised_base(llama, run4):
    """The spectral analysis of adapters on a packed base: W0's spectrum is that of bitsandbytes' dequantised
    weight (one layer at a time), each ΔW's that of peft's merge on a dequantised dense copy (numpy's SVD)."""
    import numpy as np

    from landscape.spectrum import analyse_solutions

    loaded, solutions = run4
    base4 = loaded.task.base
    dense = _dense_dequantised(llama, base4)
    w0s = {n: p.detach().double() for n, p in dense.named_parameters()}
    result = analyse_solutions({m: solutions[m] for m in ("lora", "randlora")}, progress=False)
    assert len(result["layers"]) == 2 * len(TARGETS)
    for method in ("lora", "randlora"):
        reference = _peft_merge_reference(dense, Path(solutions[method].path))
        for layer in result["layers"]:
            s0 = np.linalg.svd(w0s[layer["name"]].numpy(), compute_uv=False)
            assert np.abs(np.asarray(layer["base"]["singular_values"]) - s0).max() <= 1e-6 * s0[0]
            s_d = np.linalg.svd(reference[layer["name"]].double().numpy(), compute_uv=False)
            got = np.asarray(layer[method]["singular_values"])
            assert np.abs(got - s_d).max() <= 1e-5 * s_d[0], (method, layer["name"])
