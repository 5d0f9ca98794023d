"""WordNet 3.0 noun glosses classified into lexicographer categories (a real text task).

Reads ``data.noun`` (apt ``wordnet-base``): each data line is
``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the input text is the gloss's
definition (cut before the first example sentence), the label its lexicographer file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from adapters.data.base import Dataset, Split
from adapters.errors import UserError

# The 45 standard lexicographer file names; lex_filenum indexes this list.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

# Concrete noun categories with >= 2000 synsets each in WordNet 3.0.
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "noun.animal", "noun.artifact", "noun.body", "noun.food",
    "noun.location", "noun.person", "noun.plant", "noun.substance",
)  # fmt: skip

SYSTEM_DIR = Path("/usr/share/wordnet")


def candidate_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for data.noun: an explicit data_root only; else $WNHOME, then SYSTEM_DIR."""
    if data_root is not None:
        roots = [Path(data_root)]
    else:
        roots = [Path(os.environ["WNHOME"])] if os.environ.get("WNHOME") else []
        roots.append(SYSTEM_DIR)
    return [d for root in roots for d in (root, root / "dict")]


def find_data_noun(data_root: str | os.PathLike | None = None) -> Path:
    """Path of the first data.noun found in :func:`candidate_dirs`, else UserError."""
    dirs = candidate_dirs(data_root)
    for d in dirs:
        if (d / "data.noun").is_file():
            return d / "data.noun"
    raise UserError(
        f"WordNet data.noun not found (looked in: {', '.join(map(str, dirs))}): install it with "
        "'apt-get install wordnet-base', set $WNHOME, or pass --data-root DIR"
    )


def definition(gloss: str) -> str:
    """The definition part of a gloss: everything before the first example sentence."""
    return gloss.split('; "', 1)[0].strip()


@functools.lru_cache(maxsize=4)
def _parse_cached(path: str, mtime_ns: int, size: int) -> dict[str, list[tuple[int, str]]]:
    def bad(lineno: int, why: str) -> UserError:
        return UserError(
            f"cannot parse WordNet file {path} line {lineno} ({why}): "
            "reinstall it with 'apt-get install --reinstall wordnet-base' or pass a valid --data-root"
        )

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"cannot read WordNet file {path} ({e}): "
            "reinstall it with 'apt-get install --reinstall wordnet-base' or pass a valid --data-root"
        ) from e
    out: dict[str, list[tuple[int, str]]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("  ") or not line.strip():
            continue  # license header
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 6:
            raise bad(lineno, "expected 'offset lex_filenum ss_type w_cnt word lex_id ... | gloss'")
        if not (fields[0].isdigit() and fields[1].isdigit()):
            raise bad(lineno, "offset and lex_filenum must be decimal numbers")
        lex = int(fields[1])
        if lex >= len(LEXNAMES):
            raise bad(lineno, f"lex_filenum {lex} is not one of the {len(LEXNAMES)} lexicographer files")
        out.setdefault(LEXNAMES[lex], []).append((int(fields[0]), definition(gloss)))
    if not out:
        raise bad(0, "no data lines")
    return out


def parse_data_noun(path: str | os.PathLike) -> dict[str, list[tuple[int, str]]]:
    """{lexicographer name: [(offset, definition), ...] in file order} of a data.noun file."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise UserError(f"cannot read WordNet file {p} ({e}): pass a valid --data-root") from e
    return _parse_cached(str(p), st.st_mtime_ns, st.st_size)


def load(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int = 500,
    test_per_class: int = 100,
    categories: tuple[str, ...] | list[str] = DEFAULT_CATEGORIES,
) -> Dataset:
    """Balanced gloss -> category dataset; per category a seeded permutation, test first, then train."""
    categories = list(categories)
    unknown = [c for c in categories if c not in LEXNAMES]
    if unknown or len(set(categories)) != len(categories) or len(categories) < 2:
        raise UserError(
            f"bad WordNet categories {categories}: give >= 2 distinct lexicographer names "
            f"such as {', '.join(DEFAULT_CATEGORIES[:3])}"
        )
    if train_per_class < 1 or test_per_class < 1:
        raise UserError(f"train_per_class={train_per_class}, test_per_class={test_per_class}: both must be >= 1")
    path = find_data_noun(data_root)
    synsets = parse_data_noun(path)
    need = train_per_class + test_per_class
    g = torch.Generator().manual_seed(int(seed))
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    counts = {}
    for label, cat in enumerate(categories):
        items = synsets.get(cat, [])
        counts[cat] = len(items)
        if len(items) < need:
            raise UserError(
                f"WordNet category {cat} in {path} has {len(items)} synsets, fewer than the {need} "
                f"requested ({train_per_class} train + {test_per_class} test): ask for fewer per class"
            )
        perm = torch.randperm(len(items), generator=g).tolist()
        for name, sel in (("test", perm[:test_per_class]), ("train", perm[test_per_class:need])):
            parts[name][0].extend(items[i][1] for i in sel)
            parts[name][1].extend([label] * len(sel))
    splits = {}
    for name, (texts, labels) in parts.items():
        order = torch.randperm(len(texts), generator=g).tolist()  # interleave classes
        splits[name] = Split([texts[i] for i in order], torch.tensor(labels, dtype=torch.long)[order])
    return Dataset(
        name="wordnet",
        modality="text",
        classes=categories,
        train=splits["train"],
        test=splits["test"],
        source=str(path),
        info={
            "seed": seed,
            "categories": categories,
            "synsets_per_category": counts,
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
        },
    )
