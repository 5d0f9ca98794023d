"""The LLM-Adapters commonsense-reasoning data (the RandLoRA paper's LLM recipe) as answer-scoring samples.

Files (the LLM-Adapters repository's layout, under ``--data-root``, default ``data/commonsense``):

- training: ``commonsense_170k.json`` (else ``commonsense_15k.json``), at the root or under
  ``ft-training_set/``; a JSON list of records ``{"instruction", "input", "output", "answer"}``
  (``input`` may be absent: read as empty);
- tests: ``dataset/<task>/test.json`` for the eight tasks of :data:`TASKS`, records of the same format.

Every sample becomes ``{"prompt", "candidates", "task", "answer"}``: the Alpaca prompt (:func:`prompt`),
one response text per candidate answer word (:func:`candidate_texts`: the record's ``output`` with its
answer word replaced, so the gold candidate is ``output`` itself), the task and the gold word; the
split's label is the gold candidate's index. A test record's candidates are its task's fixed answer
set (:data:`TASK_ANSWERS`; ARC keeps answer1-5 even for four-option questions, as the paper's
answer regex does). A training record does not name its task: its candidates are the words of
its ``Answer format: a/b/...`` line and its task *family* is named after them (:func:`family_of`):
``boolq``, ``piqa``, ``hellaswag``, ``winogrande`` (their formats are unique to them), and
``answer1-3`` / ``answer1-4`` / ``answer1-5`` for the answerN formats, which social_i_qa, ARC and
openbookqa share (ARC questions with 3 or 5 options have the 3- or 5-word format).

``tasks`` selects the test tasks only: training draws from the whole training file, as the paper.
A record without a recognised answer format, or whose answer is not among its candidates, is an
input error naming the file and the record (never silently skipped: a skipped record would change
what is trained or scored on without notice).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters.data.base import Dataset, Split, balanced_indices
from adapters.errors import UserError

TASKS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa",
)  # fmt: skip


def _numbered(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


TASK_ANSWERS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": _numbered("solution", 2),
    "social_i_qa": _numbered("answer", 3),
    "hellaswag": _numbered("ending", 4),
    "winogrande": _numbered("option", 2),
    "ARC-Challenge": _numbered("answer", 5),
    "ARC-Easy": _numbered("answer", 5),
    "openbookqa": _numbered("answer", 4),
}

# Training families whose numbered format belongs to one task only; answerN formats are named "answer1-N".
STEM_TASKS = {"solution": "piqa", "ending": "hellaswag", "option": "winogrande"}
NUMBERED = re.compile(r"(answer|solution|ending|option)(\d+)")
FORMAT_LINE = re.compile(r"Answer format:[ \t]*([^\n]*)")

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

DEFAULT_ROOT = Path("data") / "commonsense"
TRAIN_FILES = ("commonsense_170k.json", "commonsense_15k.json")
TRAIN_DIR = "ft-training_set"
REQUIRED_KEYS = ("instruction", "output", "answer")
SOURCE = "the LLM-Adapters repository (github.com/AGI-Edgerunners/LLM-Adapters)"


def prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt of LLM-Adapters / the RandLoRA paper (with the input block when ``input`` is set)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def candidate_texts(output: str, answer: str, candidates: Sequence[str]) -> list[str]:
    """One response per candidate: ``output`` with its last whole-word ``answer`` replaced by the candidate
    (the gold candidate is ``output`` exactly); ``"the correct answer is {c}"`` when output lacks the word."""
    hits = list(re.finditer(rf"\b{re.escape(answer)}\b", output)) if answer else []
    if not hits:
        return [f"the correct answer is {c}" for c in candidates]
    start, end = hits[-1].span()
    return [output[:start] + c + output[end:] for c in candidates]


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names (a list, or one comma-separated string; case-insensitive) in the canonical order of TASKS."""
    if tasks is None:
        return list(TASKS)
    items = tasks.split(",") if isinstance(tasks, str) else [p for t in tasks for p in str(t).split(",")]
    by_lower = {t.lower(): t for t in TASKS}
    names = [i.strip() for i in items if i.strip()]
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown or not names:
        problem = f"unknown commonsense task(s) {', '.join(unknown)}" if unknown else "no commonsense task given"
        raise UserError(f"{problem}: choose from {', '.join(TASKS)}")
    chosen = {by_lower[n.lower()] for n in names}
    return [t for t in TASKS if t in chosen]


def answer_format(instruction: str) -> tuple[str, ...] | None:
    """The words of the instruction's last ``Answer format: a/b/...`` line, lower-cased, spaces removed."""
    lines = FORMAT_LINE.findall(instruction)
    if not lines:
        return None
    words = tuple(re.sub(r"\s+", "", w).lower().rstrip(".") for w in lines[-1].split("/"))
    return words if all(words) else None


def family_of(words: Sequence[str] | None) -> str | None:
    """The task family of an answer format (module docstring), or None when it is not one the data uses."""
    if words is None or len(words) < 2:
        return None
    if tuple(words) == TASK_ANSWERS["boolq"]:
        return "boolq"
    parts = [NUMBERED.fullmatch(w) for w in words]
    if not all(parts) or len({p.group(1) for p in parts}) != 1:
        return None
    stem = parts[0].group(1)
    if [int(p.group(2)) for p in parts] != list(range(1, len(words) + 1)):
        return None
    task = STEM_TASKS.get(stem)
    return task if task and tuple(words) == TASK_ANSWERS[task] else f"{stem}1-{len(words)}"


# --- files ----------------------------------------------------------------------------------------


def data_dir(data_root: str | os.PathLike | None = None) -> Path:
    """The folder read: ``data_root`` when given, else ``data/commonsense`` under the working directory."""
    return Path(data_root) if data_root is not None else DEFAULT_ROOT


def train_candidates(root: Path, train_file: str | os.PathLike | None = None) -> list[Path]:
    """Training files looked for, in order: 170k then 15k, each at the root then under ft-training_set/;
    an explicit ``train_file`` is looked for under the root, its ft-training_set/, then as given."""
    if train_file is None:
        return [d / name for name in TRAIN_FILES for d in (root, root / TRAIN_DIR)]
    p = Path(train_file)
    return list(dict.fromkeys([root / p, root / TRAIN_DIR / p, p]))


def find_files(
    root: Path, tasks: Sequence[str], train_file: str | os.PathLike | None = None
) -> tuple[Path, dict[str, Path]]:
    """(the training file, {task: its test file}); one UserError naming every missing file."""
    looked = train_candidates(root, train_file)
    train = next((p for p in looked if p.is_file()), None)
    tests = {t: root / "dataset" / t / "test.json" for t in tasks}
    missing = [] if train else [f"no training file (looked for {', '.join(map(str, looked))})"]
    absent = [str(p) for p in tests.values() if not p.is_file()]
    if absent:
        missing.append(f"no test file {', '.join(absent)}")
    if missing:
        raise UserError(
            f"commonsense data missing under {root}: {'; '.join(missing)}: get {TRAIN_DIR}/{TRAIN_FILES[0]} and "
            f"dataset/<task>/test.json from {SOURCE}, then pass --data-root DIR holding them "
            "(or --tasks with the tasks you have)"
        )
    return train, tests


def read_records(path: Path) -> list[dict[str, str]]:
    """The records of one LLM-Adapters JSON file, checked: a list of objects with string fields."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt commonsense file {path} ({e}): re-download it from {SOURCE}") from None
    if not isinstance(data, list) or not data:
        what = "an empty list" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        raise UserError(f"commonsense file {path} holds {what}, not a list of records: re-download it from {SOURCE}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad = "is not a JSON object"
        elif lacking := [k for k in REQUIRED_KEYS if k not in rec]:
            bad = f"lacks {', '.join(lacking)}"
        elif wrong := [k for k in (*REQUIRED_KEYS, "input") if k in rec and not isinstance(rec[k], str)]:
            bad = f"has non-string {', '.join(wrong)}"
        else:
            continue
        raise UserError(
            f"commonsense file {path} record {i} {bad} (records need string fields instruction, input, "
            f"output, answer): fix the record or re-download the file from {SOURCE}"
        )
    return data


# --- samples --------------------------------------------------------------------------------------


def sample(record: dict[str, str], task: str, candidates: Sequence[str]) -> tuple[dict, int]:
    """(the sample dict, the gold candidate's index) of one checked record."""
    texts = candidate_texts(record["output"], record["answer"], candidates)
    item = {
        "prompt": prompt(record["instruction"], record.get("input", "")),
        "candidates": texts,
        "task": task,
        "answer": record["answer"],
    }
    return item, list(candidates).index(record["answer"])


def _not_a_candidate(path: Path, i: int, answer: str, candidates: Sequence[str]) -> UserError:
    return UserError(
        f"commonsense file {path} record {i}: answer {answer!r} is not one of its candidates "
        f"{'/'.join(candidates)}: fix the record or re-download the file from {SOURCE}"
    )


def train_families(records: list[dict[str, str]], path: Path) -> list[str]:
    """The task family of every training record (from its answer format), its answer checked."""
    out = []
    for i, rec in enumerate(records):
        words = answer_format(rec["instruction"])
        family = family_of(words)
        if family is None:
            raise UserError(
                f"commonsense file {path} record {i}: no recognised 'Answer format: ...' line in its instruction "
                "(expected true/false or e.g. answer1/answer2/answer3): fix the record or re-download the file "
                f"from {SOURCE}"
            )
        if rec["answer"] not in words:
            raise _not_a_candidate(path, i, rec["answer"], words)
        out.append(family)
    return out


def _choose(groups: list[str], per_class: int | None, seed: int, what: str, option: str) -> torch.Tensor:
    """Seeded ``per_class`` indices per group name (None: all), via balanced_indices on group ids."""
    code = {g: k for k, g in enumerate(dict.fromkeys(groups))}  # ids in order of first appearance
    if per_class is not None:
        short = {g: n for g, n in Counter(groups).items() if n < per_class}
        if short:
            shown = ", ".join(f"{g} has {n}" for g, n in short.items())
            raise UserError(
                f"{option}={per_class} but {what} {shown}: pass {option} <= {min(short.values())} or None (all)"
            )
    ids = torch.tensor([code[g] for g in groups], dtype=torch.long)
    return balanced_indices(ids, per_class, seed)


def _split(samples: list[tuple[dict, int]]) -> Split:
    return Split([s for s, _ in samples], torch.tensor([y for _, y in samples], dtype=torch.long))


def _train_split(path: Path, per_class: int | None, seed: int) -> tuple[Split, dict[str, int]]:
    records = read_records(path)
    families = train_families(records, path)
    idx = _choose(families, per_class, seed, "training task families", "train_per_class").tolist()
    chosen = []
    for i in idx:
        words = answer_format(records[i]["instruction"])
        chosen.append(sample(records[i], families[i], words))
    return _split(chosen), dict(sorted(Counter(families).items()))


def _test_split(paths: dict[str, Path], per_class: int | None, seed: int) -> tuple[Split, dict[str, int]]:
    pool: list[tuple[dict, str]] = []
    for task, path in paths.items():
        for i, rec in enumerate(read_records(path)):
            if rec["answer"] not in TASK_ANSWERS[task]:
                raise _not_a_candidate(path, i, rec["answer"], TASK_ANSWERS[task])
            pool.append((rec, task))
    tasks = [t for _, t in pool]
    idx = _choose(tasks, per_class, seed, "test tasks", "test_per_class").tolist()
    return _split([sample(pool[i][0], pool[i][1], TASK_ANSWERS[pool[i][1]]) for i in idx]), dict(Counter(tasks))


def load(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    tasks: str | Sequence[str] | None = None,
    train_file: str | os.PathLike | None = None,
) -> Dataset:
    """The commonsense dataset: ``train_per_class`` training records per task family and ``test_per_class``
    test records per task (seeded; None = all). ``tasks`` (a list or "a,b"; default all eight) selects the test
    tasks; training always draws from every record of the training file (the paper trains on all eight
    tasks at once). ``train_file``: a file name or path instead of the 170k/15k search."""
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name}={value!r}: must be an integer >= 1 or None (all records): fix the value")
    task_list = parse_tasks(tasks)
    root = data_dir(data_root)
    train_path, test_paths = find_files(root, task_list, train_file)
    train, train_available = _train_split(train_path, train_per_class, seed)
    test, test_available = _test_split(test_paths, test_per_class, seed + 1)
    return Dataset(
        name="commonsense",
        modality="lm",
        classes=task_list,
        train=train,
        test=test,
        source=str(root),
        info={
            "seed": seed,
            "tasks": task_list,
            "train_file": str(train_path),
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "train_counts": dict(sorted(Counter(s["task"] for s in train.inputs).items())),
            "test_counts": {t: sum(s["task"] == t for s in test.inputs) for t in task_list},
            "train_available": train_available,
            "test_available": test_available,
        },
        objective="answer",
    )
