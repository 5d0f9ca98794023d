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


# --- the RandLoRA paper's image datasets (CIFAR-100, Food-101, UCF101 middle frames) ---------------


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2's cPickle wrote the CIFAR files: protocol 2, str/bytes as BINSTRING,
    numpy's array rebuilder named ``numpy.core.multiarray._reconstruct`` (whatever numpy writes today)."""
    import io
    import pickle

    reconstruct = np.zeros(1).__reduce__()[0]

    class Py2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_py2_str(self, obj):
            data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
            if len(data) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
            self.memoize(obj)

        def save_global(self, obj, name=None):
            if obj is reconstruct:
                self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
                self.memoize(obj)
            else:
                super().save_global(obj, name)

        dispatch[bytes] = save_py2_str
        dispatch[str] = save_py2_str

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_fake_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows (CHW): noise plus an 8x8 top-left block coloured by the label."""
    images = rng.integers(0, 60, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for k, c in enumerate(labels):
        images[k, :, :8, :8] = np.array([40 + 20 * (c // 10), 40 + 20 * (c % 10), 230], dtype=np.uint8)[:, None, None]
    return images.reshape(len(labels), -1)


CIFAR_FINE_NAMES = [f"thing_{i:02d}" for i in range(100)]  # underscores as in "aquarium_fish"


def write_cifar100(folder: str | Path, n_train: int = 200, n_test: int = 50, seed: int = 0,
                   archive: bool = False) -> Path:  # fmt: skip
    """Write ``folder/cifar-100-python/{train,test,meta}`` as the original Python 2 pickles
    (``archive``: ``folder/cifar-100-python.tar.gz`` instead). Labels cycle through the 100 classes."""
    import io
    import tarfile

    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100)
        files[split] = py2_pickle({
            b"filenames": [f"{CIFAR_FINE_NAMES[c]}_s_{k:06d}.png".encode() for k, c in enumerate(fine)],
            b"batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1".encode(),
            b"fine_labels": [int(c) for c in fine],
            b"coarse_labels": [int(c) // 5 for c in fine],
            b"data": cifar_fake_images(fine, rng),
        })  # fmt: skip
    files["meta"] = py2_pickle({
        b"fine_label_names": [n.encode() for n in CIFAR_FINE_NAMES],
        b"coarse_label_names": [f"super_{j:02d}".encode() for j in range(20)],
    })  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        path = folder / "cifar-100-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path
    out = folder / "cifar-100-python"
    out.mkdir(exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def write_jpeg(path: Path, label: int, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """A real JPEG (w, h = size): noise plus a centred block coloured by ``label``."""
    from PIL import Image

    w, h = size
    pixels = rng.integers(0, 50, size=(h, w, 3), dtype=np.uint8)
    pixels[h // 4 : h - h // 4, w // 4 : w - w // 4] = [60 + 40 * (label % 5), 60 + 40 * (label // 5 % 5), 220]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)


FOOD_NAMES = ["apple_pie", "baby_back_ribs", "caesar_salad", "donuts", "eggs_benedict", "french_fries",
              "garlic_bread", "hot_dog"]  # fmt: skip


def write_food101(folder: str | Path, classes: int = 5, per_class: int = 6, seed: int = 0) -> Path:
    """Write ``folder/food-101/{images/<class>/<id>.jpg, meta/classes.txt, meta/{train,test}.json}``.

    Per class the first two thirds of the ids are train, the rest test; image sizes vary
    (landscape and portrait) so the resize + centre crop is exercised."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(folder) / "food-101"
    names = [FOOD_NAMES[i] if i < len(FOOD_NAMES) else f"dish_{i}" for i in range(classes)]
    n_train = max(1, (2 * per_class) // 3)
    train, test = {}, {}
    for c, name in enumerate(names):
        ids = [str(i) for i in rng.choice(10**6, size=per_class, replace=False)]
        for k, i in enumerate(ids):
            size = (40 + 7 * k, 30 + 3 * c) if k % 2 else (30 + 3 * c, 44 + 5 * k)
            write_jpeg(root / "images" / name / f"{i}.jpg", c, rng, size)
        train[name] = [f"{name}/{i}" for i in ids[:n_train]]
        test[name] = [f"{name}/{i}" for i in ids[n_train:]]
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("".join(n + "\n" for n in names))
    (root / "meta" / "train.json").write_text(json.dumps(train))
    (root / "meta" / "test.json").write_text(json.dumps(test))
    return root


UCF_NAMES = ["Apply_Eye_Makeup", "Archery", "Baby_Crawling", "Balance_Beam", "Band_Marching", "Baseball_Pitch"]


def write_ucf101(folder: str | Path, classes: int = 4, per_class: int = 5, seed: int = 0) -> Path:
    """Write ``folder/ucf101/{UCF-101-midframes/<Class>/v_<Class>_gXX_c01.jpg, split_zhou_UCF101.json}``.

    Per class: one video for val, one for test, the rest train (per_class >= 3)."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(folder) / "ucf101"
    split = {"train": [], "val": [], "test": []}
    for c in range(classes):
        name = UCF_NAMES[c] if c < len(UCF_NAMES) else f"Action_{c}"
        for k in range(per_class):
            rel = f"{name}/v_{name.replace('_', '')}_g{k + 8:02d}_c01.jpg"
            write_jpeg(root / "UCF-101-midframes" / rel, c, rng, (48 + 4 * k, 36))
            key = "val" if k == 0 else "test" if k == 1 else "train"
            split[key].append([rel, c, name])
    (root / "split_zhou_UCF101.json").write_text(json.dumps(split))
    return root
