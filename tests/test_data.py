"""Dataset loaders: fake files in the real formats round-trip, determinism, errors, real data."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapters.data import dataset_names, fashion_mnist, load_dataset, wordnet
from adapters.data.base import Split, balanced_indices, eval_subset
from adapters.errors import UserError
from tests.fakes import write_fashion_mnist, write_wordnet

REAL_WORDNET = Path("/usr/share/wordnet/data.noun")
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def parse_fake_noun(path: Path) -> dict[str, set[str]]:
    """Independent parse: {lexname: {definition}} by plain line splitting."""
    out: dict[str, set[str]] = {}
    for line in path.read_text().split("\n"):
        if not line or line[:2] == "  ":
            continue
        head, gloss = line.split(" | ")
        lex = wordnet.LEXNAMES[int(head.split(" ")[1])]
        out.setdefault(lex, set()).add(gloss.split('; "')[0].strip())
    return out


def read_idx_manual(path: Path) -> tuple[tuple[int, ...], bytes]:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    magic = struct.unpack(">i", raw[:4])[0]
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    assert magic in (2049, 2051)
    return dims, raw[4 + 4 * ndim :]


# --- base helpers -----------------------------------------------------------------------------------


def test_balanced_indices_deterministic_and_balanced():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 12)
    a = balanced_indices(labels, 5, seed=3)
    assert torch.equal(a, balanced_indices(labels, 5, seed=3))
    assert not torch.equal(a, balanced_indices(labels, 5, seed=4))
    assert len(set(a.tolist())) == 15 and Counter(labels[a].tolist()) == {0: 5, 1: 5, 2: 5}
    assert len(balanced_indices(labels, None, seed=0)) == len(labels)
    with pytest.raises(UserError, match="only 7 samples"):
        balanced_indices(labels, 8, seed=0)


def test_split_subset_and_eval_subset():
    s = Split(["a", "b", "c", "d"], torch.tensor([0, 1, 0, 1]))
    sub = s.subset([3, 0])
    assert sub.inputs == ["d", "a"] and sub.labels.tolist() == [1, 0]
    img = Split(torch.arange(4 * 4, dtype=torch.uint8).reshape(4, 2, 2), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(img.subset(torch.tensor([2])).inputs[0], img.inputs[2])
    e = eval_subset(s, 3, seed=1)
    assert len(e) == 3 and e.inputs == eval_subset(s, 3, seed=1).inputs
    assert sorted(eval_subset(s, None, seed=1).inputs) == ["a", "b", "c", "d"]
    assert len(eval_subset(s, 100, seed=1)) == 4


# --- WordNet ----------------------------------------------------------------------------------------


def test_wordnet_fake_round_trip(tmp_path):
    path = write_wordnet(tmp_path, per_category=30)
    truth = parse_fake_noun(path)
    ds = load_dataset("wordnet", data_root=tmp_path, train_per_class=20, test_per_class=8)
    assert ds.modality == "text" and ds.classes == list(wordnet.DEFAULT_CATEGORIES)
    assert ds.source == str(path)
    for split, n in ((ds.train, 20), (ds.test, 8)):
        assert len(split) == n * 8 and split.labels.dtype == torch.int64
        assert Counter(split.labels.tolist()) == {c: n for c in range(8)}
        for text, label in zip(split.inputs, split.labels.tolist(), strict=True):
            assert text in truth[ds.classes[label]] and '"' not in text
    assert set(ds.train.inputs).isdisjoint(ds.test.inputs)


def test_wordnet_determinism_and_dict_subfolder(tmp_path):
    write_wordnet(tmp_path / "dict", per_category=30)
    a = wordnet.load(tmp_path, seed=0, train_per_class=10, test_per_class=5)
    b = wordnet.load(tmp_path, seed=0, train_per_class=10, test_per_class=5)
    c = wordnet.load(tmp_path, seed=1, train_per_class=10, test_per_class=5)
    assert a.train.inputs == b.train.inputs and torch.equal(a.test.labels, b.test.labels)
    assert a.train.inputs != c.train.inputs


def test_wordnet_wnhome_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("WNHOME", raising=False)
    with pytest.raises(UserError, match="apt-get install wordnet-base"):
        wordnet.load()
    with pytest.raises(UserError, match="apt-get install wordnet-base"):
        wordnet.load(tmp_path / "missing")
    write_wordnet(tmp_path / "wn", per_category=12)
    monkeypatch.setenv("WNHOME", str(tmp_path / "wn"))
    assert len(wordnet.load(train_per_class=4, test_per_class=2).train) == 32
    with pytest.raises(UserError, match="fewer than the 13 requested"):
        wordnet.load(train_per_class=10, test_per_class=3)
    with pytest.raises(UserError, match="lexicographer"):
        wordnet.load(categories=["noun.animal", "noun.bogus"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.noun").write_text("  header\n00001740 03 n 01 entity 0 000 no gloss here\n")
    with pytest.raises(UserError, match=str(bad / "data.noun")):
        wordnet.load(bad)


# --- Fashion-MNIST ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fake_round_trip(tmp_path, gz):
    folder = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=60, n_test=20, gzip=gz)
    suffix = ".gz" if gz else ""
    dims, pixels = read_idx_manual(folder / f"train-images-idx3-ubyte{suffix}")
    _, raw_labels = read_idx_manual(folder / f"train-labels-idx1-ubyte{suffix}")
    assert dims == (60, 28, 28)
    ds = load_dataset("fashion-mnist", data_root=tmp_path, train_per_class=6, test_per_class=2)
    assert ds.modality == "image" and len(ds.classes) == 10 and ds.classes[0] == "T-shirt/top"
    assert ds.train.inputs.shape == (60, 28, 28) and ds.train.inputs.dtype == torch.uint8
    assert ds.test.inputs.shape == (20, 28, 28)
    assert Counter(ds.train.labels.tolist()) == {c: 6 for c in range(10)}
    # every loaded image is the written image with the written label
    written = {pixels[k * 784 : (k + 1) * 784]: raw_labels[k] for k in range(60)}
    for img, label in zip(ds.train.inputs, ds.train.labels.tolist(), strict=True):
        assert written[img.numpy().tobytes()] == label
    # learnable: the class block is bright
    r, q = divmod(int(ds.train.labels[0]), 5)
    assert ds.train.inputs[0, 4 + 12 * r : 11 + 12 * r, 1 + 5 * q : 6 + 5 * q].min() == 220


def test_fashion_mnist_determinism(tmp_path):
    write_fashion_mnist(tmp_path, n_train=100, n_test=20)
    a = fashion_mnist.load(tmp_path, seed=0, train_per_class=5, test_per_class=2)
    b = fashion_mnist.load(tmp_path, seed=0, train_per_class=5, test_per_class=2)
    c = fashion_mnist.load(tmp_path, seed=1, train_per_class=5, test_per_class=2)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_fashion_mnist_missing_and_offline(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load(tmp_path / "missing")

    def offline(root):
        raise OSError("network unreachable")

    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none1")
    monkeypatch.setattr(fashion_mnist, "CACHE_ROOT", tmp_path / "none2")
    monkeypatch.setattr(fashion_mnist, "_download", offline)
    with pytest.raises(UserError, match="download failed.*apt-get install dataset-fashion-mnist"):
        fashion_mnist.load()


@pytest.mark.parametrize("damage", ["truncate_gz", "truncate_data", "magic", "labels_count"])
def test_fashion_mnist_corrupt(tmp_path, damage):
    write_fashion_mnist(tmp_path, n_train=20, n_test=10)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncate_gz":
        target.write_bytes(target.read_bytes()[:-40])
    elif damage == "truncate_data":
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-5]))
    elif damage == "magic":
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(struct.pack(">i", 2049) + raw[4:]))
    else:
        target = tmp_path / "train-labels-idx1-ubyte.gz"
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(struct.pack(">ii", 2049, 19) + raw[8:-1]))
    with pytest.raises(UserError, match=str(target)):
        fashion_mnist.load(tmp_path, train_per_class=1, test_per_class=1)


def test_unknown_dataset_and_option():
    assert dataset_names() == ["cifar100", "commonsense", "fashion-mnist", "food101", "ucf101", "wordnet"]
    choices = "cifar100, commonsense, fashion-mnist, food101, ucf101, wordnet"
    with pytest.raises(UserError, match=f"unknown dataset 'cifar10': choose one of {choices}"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="unknown option"):
        load_dataset("wordnet", batch=3)


# --- real installed data ----------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_WORDNET.is_file(), reason="apt wordnet-base not installed")
def test_real_wordnet():
    ds = load_dataset("wordnet", data_root=REAL_WORDNET.parent)
    assert len(ds.train) == 500 * 8 and len(ds.test) == 100 * 8
    assert Counter(ds.train.labels.tolist()) == {c: 500 for c in range(8)}
    assert all(n >= 1500 for n in ds.info["synsets_per_category"].values())
    # train/test hold disjoint synsets; a few distinct synsets share an identical definition
    assert len(set(ds.train.inputs) & set(ds.test.inputs)) < 20
    assert all(t and '; "' not in t for t in ds.train.inputs)


@pytest.mark.skipif(not (REAL_FMNIST / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="apt dataset-fashion-mnist not installed")  # fmt: skip
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", data_root=REAL_FMNIST, train_per_class=None, test_per_class=100)
    assert ds.train.inputs.shape == (60000, 28, 28) and len(ds.test) == 1000
    assert Counter(ds.train.labels.tolist()) == {c: 6000 for c in range(10)}
    with gzip.open(REAL_FMNIST / "train-labels-idx1-ubyte.gz") as f:
        magic, n = struct.unpack(">ii", f.read(8))
        first = f.read(1)[0]
    assert (magic, n) == (2049, 60000)
    # balanced_indices permutes, so find where original sample 0 went
    idx = balanced_indices(
        torch.from_numpy(fashion_mnist.read_idx(REAL_FMNIST / "train-labels-idx1-ubyte.gz", 2049).astype("int64")),
        None,
        seed=0,
    )
    assert int(ds.train.labels[(idx == 0).nonzero()[0, 0]]) == first == 9
