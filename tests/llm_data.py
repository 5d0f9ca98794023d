"""Fabricated LLM-Adapters commonsense files in the real format, for tests (deterministic, no randomness).

:func:`write_commonsense` writes ``ft-training_set/commonsense_170k.json`` and ``dataset/<task>/test.json``
with records ``{"instruction", "input", "output", "answer"}`` whose instructions follow the released
files' wording per task and end in their ``Answer format: ...`` line, outputs
``"the correct answer is X"``. Every question carries a marker ``(<task> <split> <i>)`` so a test can
find which written record a loaded sample came from (:func:`marker`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

ALL: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa",
)  # fmt: skip

MARKER = re.compile(r"\((\S+) (train|test) (\d+)\)")


def n_options(task: str, i: int) -> int:
    """Options of record ``i``: fixed per task; ARC alternates 4/5 (Challenge) and 4/3 (Easy) like the real data."""
    if task == "ARC-Challenge":
        return 4 if i % 2 == 0 else 5
    if task == "ARC-Easy":
        return 4 if i % 2 == 0 else 3
    return {"boolq": 2, "piqa": 2, "social_i_qa": 3, "hellaswag": 4, "winogrande": 2, "openbookqa": 4}[task]


def _numbered(label: str, n: int, text: str) -> str:
    return "".join(f"\n\n{label}{k}: {text} {k}" for k in range(1, n + 1))


def instruction(task: str, split: str, i: int) -> str:
    """The instruction of record ``i`` of ``task``, in the wording of the LLM-Adapters files."""
    tag, n = f"({task} {split} {i})", n_options(task, i)
    if task == "boolq":
        question = f"Please answer the following question with true or false, question: is {tag} true?"
        return question + "\n\nAnswer format: true/false"
    if task == "piqa":
        body = f"Please choose the correct solution to the question: {tag} make a pillow"
        return body + _numbered("Solution", n, "do") + "\n\nAnswer format: solution1/solution2"
    if task == "hellaswag":
        body = f"Please choose the correct ending to complete the given sentence: Cooking: {tag} a man"
        return body + _numbered("Ending", n, "then") + "\n\nAnswer format: ending1/ending2/ending3/ending4"
    if task == "winogrande":
        body = f"Please choose the correct answer to fill in the blank to complete the given sentence: {tag} _ ate."
        return body + _numbered("Option", n, "Ian") + "\n\nAnswer format: option1/option2"
    words = "/".join(f"answer{k}" for k in range(1, n + 1))  # social_i_qa, ARC, openbookqa
    body = f"Please choose the correct answer to the question: {tag} what?" + _numbered("Answer", n, "this")
    return body + f"\n\nAnswer format: {words}"


def gold_word(task: str, i: int) -> str:
    """The answer word of record ``i`` (spread over the options, deterministic)."""
    n = n_options(task, i)
    k = (5 * i + len(task)) % n
    if task == "boolq":
        return ("true", "false")[k]
    stem = {"piqa": "solution", "hellaswag": "ending", "winogrande": "option"}.get(task, "answer")
    return f"{stem}{k + 1}"


def record(task: str, split: str, i: int) -> dict[str, str]:
    word = gold_word(task, i)
    return {
        "instruction": instruction(task, split, i),
        "input": "",
        "output": f"the correct answer is {word}",
        "answer": word,
    }


def marker(text: str) -> tuple[str, str, int]:
    """(task, split, index) of the fabricated record a prompt was built from."""
    m = MARKER.search(text)
    assert m is not None, text
    return m.group(1), m.group(2), int(m.group(3))


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return path


def write_commonsense(
    root: Path,
    n_train: int = 24,
    n_test: int = 4,
    tasks: Sequence[str] = ALL,
    *,
    train_file: str = "ft-training_set/commonsense_170k.json",
) -> Path:
    """Write ``n_train`` training records per task (one file, task after task) and ``n_test`` test records
    per task under ``root`` (LLM-Adapters layout); returns ``root``."""
    root = Path(root)
    write_json(root / train_file, [record(t, "train", i) for t in tasks for i in range(n_train)])
    for t in tasks:
        write_json(root / "dataset" / t / "test.json", [record(t, "test", i) for i in range(n_test)])
    return root
