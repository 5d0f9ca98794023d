"""Writers of tiny data in the real on-disk formats, so tests can run the real loaders.

``write_wordnet`` writes a WordNet 3.0 style ``data.noun``; ``write_fashion_mnist`` writes the
four gzip (or raw) idx files. The content is synthetic but learnable: glosses use
category-specific words, images carry a class-dependent bright block.
"""

from __future__ import annotations

import gzip as gzip_module
import random
import struct
from pathlib import Path

import numpy as np

from adapters.data.wordnet import DEFAULT_CATEGORIES, LEXNAMES

HEADER = [
    "This software and database is being provided to you, the LICENSEE, by",
    "Princeton University under the following license. (synthetic test copy)",
    "",
    "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.",
]
VOCAB = {
    "noun.animal": ["mammal", "bird", "fish", "fur", "wings", "claws", "breeds", "hunts", "tail"],
    "noun.artifact": ["device", "tool", "machine", "built", "metal", "instrument", "container", "used"],
    "noun.body": ["organ", "tissue", "muscle", "bone", "gland", "nerve", "skin", "blood"],
    "noun.food": ["dish", "cooked", "sauce", "baked", "eaten", "flavor", "sweet", "served"],
    "noun.location": ["region", "city", "town", "river", "country", "capital", "district", "port"],
    "noun.person": ["someone", "person", "worker", "who", "expert", "leader", "member", "woman"],
    "noun.plant": ["shrub", "tree", "leaves", "flowers", "genus", "herb", "seeds", "grows"],
    "noun.substance": ["compound", "chemical", "liquid", "acid", "mineral", "gas", "solution", "element"],
}
FILLER = ["a", "an", "the", "of", "with", "that", "is", "small", "large", "common", "any", "in"]


def _gloss(cat: str, rng: random.Random) -> str:
    words = VOCAB.get(cat) or [f"{cat.split('.')[-1]}word{i}" for i in range(6)]
    text = " ".join(rng.choice(FILLER) + " " + rng.choice(words) for _ in range(rng.randint(2, 5)))
    if rng.random() < 0.5:
        text += f'; "the {rng.choice(words)} was here"'  # example sentence, not part of the definition
    return text


def write_wordnet(folder: str | Path, per_category: int = 30, categories=DEFAULT_CATEGORIES,
                  seed: int = 0) -> Path:  # fmt: skip
    """Write ``folder/data.noun`` with ``per_category`` synsets per category (interleaved)."""
    rng = random.Random(seed)
    path = Path(folder) / "data.noun"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"  {i} {text}  " for i, text in enumerate(HEADER, 1)]
    offset = sum(len(s) + 1 for s in lines)
    for i in range(per_category):
        for cat in categories:
            lex = LEXNAMES.index(cat)
            word = f"{cat.split('.')[-1]}_thing_{i}"
            line = f"{offset:08d} {lex:02d} n 01 {word} 0 001 @ 00001740 n 0000 | {_gloss(cat, rng)}  "
            lines.append(line)
            offset += len(line) + 1  # real offsets are byte offsets of the line
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def _idx(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def fake_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright 7x7 block whose place in a 2x5 grid is the label."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for k, c in enumerate(labels):
        r, q = divmod(int(c), 5)
        images[k, 4 + 12 * r : 11 + 12 * r, 1 + 5 * q : 6 + 5 * q] = 220
    return images


def write_fashion_mnist(folder: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                        gzip: bool = True) -> Path:  # fmt: skip
    """Write the four Fashion-MNIST idx files (``.gz`` if gzip) with class-balanced labels."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        for kind, magic, array in (("images-idx3", 2051, fake_images(labels, rng)),
                                   ("labels-idx1", 2049, labels)):  # fmt: skip
            data = _idx(magic, array)
            name = f"{split}-{kind}-ubyte"
            if gzip:
                (folder / f"{name}.gz").write_bytes(gzip_module.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)
    return folder
