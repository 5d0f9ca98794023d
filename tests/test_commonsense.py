"""The commonsense dataset (LLM-Adapters format): fabricated files in the real layout round-trip.

References are independent of the loader: the Alpaca templates and answer sets are written out here,
the written records are read back with plain ``json``, and every loaded sample is matched to the record
it came from through the marker the fabricator puts in each question (:mod:`tests.llm_data`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapters.data import DATASETS, eval_subset, load_dataset
from adapters.data import commonsense as cs
from adapters.errors import UserError
from landscape import config
from tests.llm_data import ALL, marker, n_options, record, write_commonsense, write_json

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
TEST_WORDS = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": ["answer1", "answer2", "answer3"],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
    "ARC-Challenge": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "ARC-Easy": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "openbookqa": ["answer1", "answer2", "answer3", "answer4"],
}
# (task, options in the record) -> the training family the loader must infer from the answer format
FAMILY = {
    ("boolq", 2): "boolq", ("piqa", 2): "piqa", ("social_i_qa", 3): "answer1-3", ("hellaswag", 4): "hellaswag",
    ("winogrande", 2): "winogrande", ("ARC-Challenge", 4): "answer1-4", ("ARC-Challenge", 5): "answer1-5",
    ("ARC-Easy", 4): "answer1-4", ("ARC-Easy", 3): "answer1-3", ("openbookqa", 4): "answer1-4",
}  # fmt: skip
FAMILIES = sorted(set(FAMILY.values()))


def written(root: Path) -> dict[tuple[str, str, int], dict]:
    """Every record written under ``root``, read back with plain json, by its marker."""
    files = [root / "ft-training_set" / "commonsense_170k.json", *root.glob("dataset/*/test.json")]
    return {marker(r["instruction"]): r for f in files for r in json.loads(f.read_text())}


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_round_trip_prompts_candidates_labels(tmp_path):
    root = write_commonsense(tmp_path, n_train=24, n_test=4)
    ds = load_dataset("commonsense", data_root=tmp_path)
    entry = DATASETS["commonsense"]
    assert (entry.modality, entry.load) == ("lm", cs.load)
    assert (ds.name, ds.modality, ds.objective, ds.source) == ("commonsense", "lm", "answer", str(root))
    assert ds.classes == list(ALL)
    assert ds.info["train_file"] == str(root / "ft-training_set" / "commonsense_170k.json")
    assert ds.info["tasks"] == list(ALL) and ds.info["seed"] == 0
    truth = written(root)
    assert len(ds.train) == 24 * 8 and len(ds.test) == 4 * 8
    seen = set()
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        assert split.labels.dtype == torch.int64
        for item, label in zip(split.inputs, split.labels.tolist(), strict=True):
            task, where, i = marker(item["prompt"])
            assert where == split_name
            rec = truth[(task, where, i)]
            seen.add((task, where, i))
            assert item["prompt"] == NO_INPUT.format(instruction=rec["instruction"])
            words = TEST_WORDS[task] if where == "test" else TEST_WORDS[task][: n_options(task, i)]
            assert item["candidates"] == [f"the correct answer is {w}" for w in words]
            assert item["candidates"][label] == rec["output"] and words[label] == rec["answer"] == item["answer"]
            assert item["task"] == (task if where == "test" else FAMILY[(task, n_options(task, i))])
    assert len(seen) == len(truth)  # every written record loaded exactly once (None = all)
    assert ds.info["train_available"] == dict(Counter(FAMILY[(t, n_options(t, i))] for t in ALL for i in range(24)))
    assert ds.info["test_counts"] == dict.fromkeys(ALL, 4)


def test_task_inference_every_answer_format(tmp_path):
    formats = {  # the last line of the instruction -> (family, candidate words)
        "true/false": ("boolq", ["true", "false"]),
        "solution1/solution2": ("piqa", ["solution1", "solution2"]),
        "solution 1/solution2": ("piqa", ["solution1", "solution2"]),  # a spacing variant seen in the literature
        "answer1/answer2/answer3": ("answer1-3", ["answer1", "answer2", "answer3"]),
        "ending1/ending2/ending3/ending4": ("hellaswag", ["ending1", "ending2", "ending3", "ending4"]),
        "option1/option2": ("winogrande", ["option1", "option2"]),
        "answer1/answer2/answer3/answer4": ("answer1-4", ["answer1", "answer2", "answer3", "answer4"]),
        "answer1/answer2/answer3/answer4/answer5": ("answer1-5", [f"answer{k}" for k in range(1, 6)]),
    }
    records = []
    for k, (line, (_, words)) in enumerate(formats.items()):
        records.append({"instruction": f"Q{k}: Answer format: x/y?\n\nAnswer format: {line}", "input": "",
                        "output": f"the correct answer is {words[-1]}", "answer": words[-1]})  # fmt: skip
    write_json(tmp_path / "commonsense_170k.json", records)
    write_json(tmp_path / "dataset" / "boolq" / "test.json", [record("boolq", "test", 0)])
    ds = cs.load(tmp_path, tasks="boolq")
    pairs = zip(ds.train.inputs, ds.train.labels.tolist(), strict=True)
    got = {int(re.search(r"Q(\d+):", s["prompt"])[1]): (s, y) for s, y in pairs}
    assert len(got) == len(formats)
    for k, (family, words) in enumerate(formats.values()):
        sample, label = got[k]
        assert sample["task"] == family and label == len(words) - 1  # the gold answer is the last word
        assert sample["candidates"] == [f"the correct answer is {w}" for w in words]
    for bad in (("answer1", "answer3"), ("yes", "no"), ("answer1", "ending2"), ("answer1",), ("answer2", "answer1")):
        assert cs.family_of(bad) is None


def test_per_task_sampling_counts_and_seed(tmp_path):
    write_commonsense(tmp_path, n_train=24, n_test=4)
    ds = cs.load(tmp_path, train_per_class=3, test_per_class=2, seed=5)
    assert Counter(s["task"] for s in ds.train.inputs) == dict.fromkeys(FAMILIES, 3)
    assert Counter(marker(s["prompt"])[0] for s in ds.test.inputs) == dict.fromkeys(ALL, 2)
    assert ds.info["train_counts"] == dict.fromkeys(FAMILIES, 3) and ds.info["seed"] == 5
    again = cs.load(tmp_path, train_per_class=3, test_per_class=2, seed=5)
    assert [s["prompt"] for s in again.train.inputs] == [s["prompt"] for s in ds.train.inputs]
    assert torch.equal(again.test.labels, ds.test.labels)
    other = cs.load(tmp_path, train_per_class=3, test_per_class=2, seed=6)
    assert {s["prompt"] for s in other.train.inputs} != {s["prompt"] for s in ds.train.inputs}
    # ARC-Challenge's 12 five-option records are the whole answer1-5 family
    msg = one_line_error(cs.load, tmp_path, train_per_class=13)
    assert "answer1-5 has 12" in msg and "train_per_class" in msg
    assert "boolq has 4" in one_line_error(cs.load, tmp_path, test_per_class=5)
    assert "train_per_class=0" in one_line_error(cs.load, tmp_path, train_per_class=0)


def test_tasks_filter_and_unknown_task(tmp_path):
    write_commonsense(tmp_path, n_train=6, n_test=3, tasks=("boolq", "ARC-Easy"))
    for tasks in ("ARC-Easy,boolq", ["arc-easy", "boolq"], "boolq, ARC-Easy,"):
        ds = load_dataset("commonsense", data_root=tmp_path, tasks=tasks)
        assert ds.classes == ["boolq", "ARC-Easy"] and ds.info["tasks"] == ["boolq", "ARC-Easy"]
        assert Counter(s["task"] for s in ds.test.inputs) == {"boolq": 3, "ARC-Easy": 3}
    ds = cs.load(tmp_path, tasks=["ARC-Easy"])
    assert ds.classes == ["ARC-Easy"] and {s["task"] for s in ds.test.inputs} == {"ARC-Easy"}
    assert all(s["candidates"] == [f"the correct answer is answer{k}" for k in range(1, 6)] for s in ds.test.inputs)
    msg = one_line_error(cs.load, tmp_path, tasks="boolq,nope")
    assert "nope" in msg and "choose from boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Challenge" in msg
    one_line_error(cs.load, tmp_path, tasks=[])
    with pytest.raises(UserError, match="unknown option.*bogus.*tasks"):
        load_dataset("commonsense", data_root=tmp_path, bogus=1)
    # the default (all eight tasks) needs every test file: the six absent ones are named
    msg = one_line_error(cs.load, tmp_path)
    absent = [t for t in ALL if t not in ("boolq", "ARC-Easy")]
    assert all(str(tmp_path / "dataset" / t / "test.json") in msg for t in absent)
    assert str(tmp_path / "dataset" / "boolq" / "test.json") not in msg and "training file" not in msg


def test_missing_files_one_line(tmp_path, monkeypatch):
    msg = one_line_error(cs.load, tmp_path / "empty")
    root = tmp_path / "empty"
    for name in ("commonsense_170k.json", "commonsense_15k.json"):
        assert str(root / name) in msg and str(root / "ft-training_set" / name) in msg
    assert all(str(root / "dataset" / t / "test.json") in msg for t in ALL)
    assert "LLM-Adapters" in msg and "--data-root" in msg
    # the default root is data/commonsense under the working directory
    write_commonsense(tmp_path / "data" / "commonsense", n_train=2, n_test=1)
    monkeypatch.chdir(tmp_path)
    ds = cs.load()
    assert ds.source == str(Path("data") / "commonsense") and len(ds.test) == 8
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert str(Path("data") / "commonsense" / "commonsense_170k.json") in one_line_error(cs.load)


def test_corrupt_files_name_the_file_and_record(tmp_path):
    write_commonsense(tmp_path, n_train=4, n_test=2)
    test_file = tmp_path / "dataset" / "piqa" / "test.json"
    test_file.write_text(test_file.read_text()[:50])
    assert str(test_file) in one_line_error(cs.load, tmp_path)
    write_json(test_file, {"not": "a list"})
    assert str(test_file) in one_line_error(cs.load, tmp_path)
    records = [record("piqa", "test", i) for i in range(4)]
    del records[2]["answer"]
    write_json(test_file, records)
    msg = one_line_error(cs.load, tmp_path)
    assert str(test_file) in msg and "record 2" in msg and "answer" in msg
    records = [record("piqa", "test", i) for i in range(4)]
    records[1]["answer"] = "solution3"
    write_json(test_file, records)
    msg = one_line_error(cs.load, tmp_path)
    assert str(test_file) in msg and "record 1" in msg and "solution3" in msg
    train_file = tmp_path / "ft-training_set" / "commonsense_170k.json"
    records = [record("social_i_qa", "train", i) for i in range(5)]
    records[3]["answer"] = "answer4"  # not in answer1/answer2/answer3
    write_json(train_file, records)
    msg = one_line_error(cs.load, tmp_path, tasks="boolq")
    assert str(train_file) in msg and "record 3" in msg
    records[3] = {**record("boolq", "train", 0), "instruction": "no format line here"}
    write_json(train_file, records)
    msg = one_line_error(cs.load, tmp_path, tasks="boolq")
    assert str(train_file) in msg and "record 3" in msg and "Answer format" in msg


def test_layouts_and_15k_fallback(tmp_path):
    write_commonsense(tmp_path, n_train=3, n_test=1, train_file="commonsense_170k.json")  # at the root
    assert cs.load(tmp_path).info["train_file"] == str(tmp_path / "commonsense_170k.json")
    (tmp_path / "commonsense_170k.json").unlink()
    write_json(tmp_path / "ft-training_set" / "commonsense_15k.json", [record("boolq", "train", i) for i in range(2)])
    ds = cs.load(tmp_path)
    assert ds.info["train_file"] == str(tmp_path / "ft-training_set" / "commonsense_15k.json")
    assert {marker(s["prompt"]) for s in ds.train.inputs} == {("boolq", "train", 0), ("boolq", "train", 1)}
    write_commonsense(tmp_path, n_train=3, n_test=1)  # a 170k anywhere wins over a 15k, unless asked for the 15k
    shutil.copy(tmp_path / "ft-training_set" / "commonsense_15k.json", tmp_path / "commonsense_15k.json")
    assert cs.load(tmp_path).info["train_file"] == str(tmp_path / "ft-training_set" / "commonsense_170k.json")
    assert cs.load(tmp_path, train_file="commonsense_15k.json").info["train_file"] == str(
        tmp_path / "commonsense_15k.json"
    )
    shutil.rmtree(tmp_path / "ft-training_set")
    (tmp_path / "commonsense_15k.json").unlink()
    assert "commonsense_15k.json" in one_line_error(cs.load, tmp_path, train_file="commonsense_15k.json")


def test_input_template_and_candidate_texts(tmp_path):
    records = [
        {"instruction": "Pick.\n\nAnswer format: solution1/solution2", "input": "a context",
         "output": "solution2 fits, so the correct answer is solution2", "answer": "solution2"},
        {"instruction": "Pick.\n\nAnswer format: true/false", "output": "I think so", "answer": "true"},
    ]  # fmt: skip
    write_json(tmp_path / "commonsense_170k.json", records)
    write_json(tmp_path / "dataset" / "boolq" / "test.json", [record("boolq", "test", 0)])
    ds = cs.load(tmp_path, tasks="boolq")
    by_answer = {s["answer"]: (s, y) for s, y in zip(ds.train.inputs, ds.train.labels.tolist(), strict=True)}
    s, y = by_answer["solution2"]
    assert s["prompt"] == WITH_INPUT.format(instruction=records[0]["instruction"], input="a context")
    assert s["candidates"] == ["solution2 fits, so the correct answer is solution1", records[0]["output"]]
    assert y == 1
    s, y = by_answer["true"]  # "input" absent = empty; output without the word: the default response
    assert s["prompt"] == NO_INPUT.format(instruction=records[1]["instruction"])
    assert s["candidates"] == ["the correct answer is true", "the correct answer is false"] and y == 0


def test_subset_keeps_dict_records(tmp_path):
    write_commonsense(tmp_path, n_train=2, n_test=2)
    ds = cs.load(tmp_path)
    sub = ds.test.subset([3, 0, 3])
    assert sub.inputs == [ds.test.inputs[3], ds.test.inputs[0], ds.test.inputs[3]]
    assert sub.labels.tolist() == [ds.test.labels[3].item(), ds.test.labels[0].item(), ds.test.labels[3].item()]
    ev = eval_subset(ds.train, 5, seed=1)
    assert len(ev) == 5 and len({s["prompt"] for s in ev.inputs}) == 5
    for s, y in zip(ev.inputs, ev.labels.tolist(), strict=True):
        assert ds.train.labels[ds.train.inputs.index(s)].item() == y  # each record keeps its own label


def test_paper_preset_loads():
    path = Path(config.PAPER_DIR) / "commonsense.toml"
    values = config.read_toml(path)
    assert values["epochs"] == 1 and values["batch_size"] == 16 and values["grad_accum"] == 1
    assert values["lr"] == {"ft": 1e-4, "lora": 1e-4, "randlora": 1e-4}
    assert values["randlora_rank"] == 30 and values["randlora_alpha"] == 2 * 30
    assert values["randlora_dropout"] == 0.05 and values["projection_prng_key"] == "seed-formula"
    assert values["cutoff_len"] == 256 and values["grad_checkpointing"] is True
    assert values["model"] == "hf:Qwen/Qwen2-0.5B-Instruct"
    cfg = config.resolve({"dataset": "commonsense", "preset": "paper"})
    assert cfg.preset == "paper" and cfg.randlora_rank == 30 and cfg.epochs == 1
