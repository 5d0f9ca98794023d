"""Bad input found by probing the commands as a user would: each is refused in one line with exit code 2, before
any work where it can be known, with nothing written. Every case here failed on the code before its fix: a
traceback, a late failure, or (the damaged adapter) a silent ΔW = 0."""

from __future__ import annotations

import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from landscape import connectivity, curvature, paths, sharpness, spectrum
from tests.conftest import TINY_RUN, reseal


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("command", [paths, spectrum, curvature, sharpness])
def test_an_out_that_is_a_file_is_refused_before_work(command, tiny_wordnet_run, tmp_path, capsys):
    """They wrote their results only at the end, into a FileExistsError traceback."""
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert command.main(["--run", str(tiny_wordnet_run), "--out", str(out), "--no-progress"]) == 2
    assert "is an existing file, not a folder" in _one_line(capsys) and out.read_text() == "keep me"


def test_a_folder_where_a_file_is_read_is_one_line(tmp_path, capsys):
    """landscape.json, or a --config file, that is a folder: IsADirectoryError tracebacks before."""
    (tmp_path / "run" / "landscape.json").mkdir(parents=True)
    assert paths.main(["--run", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "landscape.json: Is a directory: fix that path" in _one_line(capsys)
    (tmp_path / "config.toml").mkdir()
    assert connectivity.main(["--config", str(tmp_path / "config.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "config.toml: Is a directory" in _one_line(capsys) and not (tmp_path / "out").exists()


def _bad(argv, wordnet_root, out, capsys) -> str:
    given = ["--dataset", "wordnet", "--data-root", str(wordnet_root), *TINY_RUN, *argv, "--out", str(out)]
    assert connectivity.main(given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err) and not out.exists()
    return err[-1]


def test_targets_that_match_nothing(wordnet_root, tmp_path, capsys):
    """--targets bogus raised ValueError in the rank matching; an empty list in a TOML file meant the default."""
    err = _bad(["--targets", "bogus"], wordnet_root, tmp_path / "a", capsys)
    assert "--targets bogus: matches no adaptable weight of tiny-bert" in err and "query" in err, err
    config = tmp_path / "run.toml"
    config.write_text("[adapters]\ntargets = []\n")
    assert "targets = []: names no module" in _bad(["--config", str(config)], wordnet_root, tmp_path / "b", capsys)


def test_damaged_native_adapters(tiny_wordnet_run, wordnet_root, tmp_path, capsys):
    """A LoRA folder of this toolkit missing some of its tensors was loaded with those layers at ΔW = 0 (peft only
    warns); without its weights file, or at another rank, the error named no file or tensor."""
    weights = "adapter_model.safetensors"
    lacking = shutil.copytree(tiny_wordnet_run / "solutions" / "lora", tmp_path / "lacking")
    tensors = load_file(lacking / weights)
    gone = [k for k in tensors if ".layer.1." in k]
    assert gone
    save_file({k: v for k, v in tensors.items() if k not in gone}, lacking / weights)
    reseal(lacking)  # saved so (not changed since: that is test_faults' refusal)
    err = _bad(["--solutions", f"lora={lacking}"], wordnet_root, tmp_path / "a", capsys)
    named = re.search(r"lacks the weight '([^']+)' \(and (\d+) more\): the weights file is incomplete", err)
    assert named and named[1] in gone and int(named[2]) == len(gone) - 1, err
    assert spectrum.main(["--solution", f"lora={lacking}", "--model", "tiny-bert", "--num-classes", "8",
                          "--out", str(tmp_path / "s"), "--no-progress"]) == 2  # fmt: skip
    assert "lacks the weight" in capsys.readouterr().err

    missing = shutil.copytree(tiny_wordnet_run / "solutions" / "lora", tmp_path / "missing")
    (missing / weights).unlink()
    err = _bad(["--solutions", f"lora={missing}"], wordnet_root, tmp_path / "b", capsys)
    assert f"has no {weights}: the adapter weights are missing" in err, err

    other_rank = shutil.copytree(tiny_wordnet_run / "solutions" / "lora", tmp_path / "rank")
    name = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file({**tensors, name: tensors[name][:1].clone()}, other_rank / weights)
    reseal(other_rank)
    err = _bad(["--solutions", f"lora={other_rank}"], wordnet_root, tmp_path / "c", capsys)
    assert "size mismatch for " in err and "lora_A" in err, err


def test_a_model_folder_without_weights(wordnet_root, tmp_path, capsys):
    """A folder holding config.json but no weights (a partial copy) got as far as transformers' OSError traceback."""
    from transformers import BertConfig

    model = tmp_path / "model"
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(model)
    err = _bad(["--model", f"hf:{model}"], wordnet_root, tmp_path / "out", capsys)
    assert f"model folder {model} has config.json but no weights" in err, err


def test_a_damaged_bases_record(tiny_wordnet_run, wordnet_root, tmp_path, capsys):
    """randlora_bases.json cut short said only "Expecting value: line 1 ..."; a JSON list was a traceback."""
    for i, text in enumerate(('{"default": ', '["not", "a", "record"]')):
        folder = shutil.copytree(tiny_wordnet_run / "solutions" / "randlora", tmp_path / f"randlora{i}")
        (folder / "randlora_bases.json").write_text(text)
        reseal(folder)
        err = _bad(["--solutions", f"randlora={folder}"], wordnet_root, tmp_path / f"out{i}", capsys)
        assert f"{folder}: randlora_bases.json is damaged" in err and "re-save the adapter" in err, err


def test_misplaced_solutions_get_the_right_fix(tiny_wordnet_run, wordnet_root, tmp_path, capsys):
    """Each was refused, but with a fix that failed in turn: a run folder said only "no solution.json"; the
    head-only baseline advised head_only= (not a --solutions name); an adapter's weights file advised ft=."""
    sols = tiny_wordnet_run / "solutions"
    err = _bad(["--solutions", f"ft={tiny_wordnet_run}"], wordnet_root, tmp_path / "a", capsys)
    assert f"is a run folder, not a solution: pass one of its solutions, {sols}/{{ft,lora,randlora}}" in err, err
    err = _bad(["--solutions", f"ft={sols / 'head_only'}"], wordnet_root, tmp_path / "b", capsys)
    assert "is the head-only baseline" in err and "head_only=" not in err, err
    weights = sols / "lora" / "adapter_model.safetensors"
    err = _bad(["--solutions", f"lora={weights}"], wordnet_root, tmp_path / "c", capsys)
    assert err.endswith(f"is the weights file of an adapter: pass its folder, lora={sols / 'lora'}"), err


def _experiment_cases(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    return [
        ("gpu_check", ["--smoke", "--steps", "0"], "argument --steps"),
        ("gpu_check", ["--smoke", "--points", "0"], "argument --points"),
        ("gpu_check", ["--smoke", "--eval-images", "-1"], "argument --eval-images"),
        ("gpu_check", ["--smoke", "--json", str(a_file / "r.json")], f"{a_file} is an existing file, not a folder"),
        ("benchmarks.llm_scale", ["--sizes", "0"], "argument --sizes"),
        ("benchmarks.llm_scale", ["--sizes", "-64"], "argument --sizes"),
        ("benchmarks.llm_scale", ["--quick", "--samples", "0"], "argument --samples"),
        ("benchmarks.llm_scale", ["--quick", "--json", str(tmp_path)], "is a folder: pass a file name"),
        ("benchmarks.llm_scale", ["--merge", str(tmp_path / "none.json")], "cannot read it as this benchmark's"),
        ("benchmarks.llm_scale", ["--merge", str(a_file)], "cannot read it as this benchmark's"),
        ("rehearsal", ["--model", "bogus"], "unknown --model 'bogus'"),
        ("rehearsal", ["--model", f"hf:{tmp_path / 'none'}"], "no such folder"),
        ("rehearsal", ["--json", str(a_file / "r.json")], f"{a_file} is an existing file, not a folder"),
    ]


def test_the_experiment_scripts_refuse_bad_input_before_work(tmp_path, capsys):
    """Each was a traceback (--sizes 0, --steps 0, a --merge file that is not JSON), a silent default (--samples 0),
    a late failure after the whole measurement (--json in a folder that cannot hold it), or files left behind
    (rehearsal's data/ for a model name it did not know)."""
    import importlib

    out = tmp_path / "out"
    for module, argv, needle in _experiment_cases(tmp_path):
        main = importlib.import_module(f"experiments.{module}").main
        extra = ["--out", str(out)] if module == "rehearsal" else []
        with pytest.raises(SystemExit) as e:
            main([*argv, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], (module, argv, err)
        assert not out.exists()


def test_a_checkpoint_with_another_head_size_names_num_classes(tiny_wordnet_run, tmp_path, capsys):
    """A classifier's checkpoint on a base built with another class count advised another --model, which cannot
    help: the fix is the class count, and with it the spectrum runs."""
    weights = tiny_wordnet_run / "solutions" / "ft" / "model.safetensors"
    n = load_file(weights)["task_head.bias"].shape[0]
    argv = ["--model", "tiny-bert", "--solution", f"ft={weights}", "--out", str(tmp_path / "s"), "--no-progress"]
    assert spectrum.main(argv) == 2
    assert _one_line(capsys).endswith(f"holds a head of {n} classes ('task_head.bias') but the base model tiny-bert "
                                      f"has 1: pass --num-classes {n}")  # fmt: skip
    assert spectrum.main([*argv, "--num-classes", str(n)]) == 0
