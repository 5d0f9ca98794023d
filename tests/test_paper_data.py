"""The paper's image datasets (CIFAR-100, Food-101, UCF101 frames): fakes in the real formats round-trip."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from adapters import network
from adapters.data import DATASETS, cifar100, dataset_names, food101, load_dataset, ucf101
from adapters.errors import UserError
from tests.fakes import CIFAR_FINE_NAMES, write_cifar100, write_food101, write_ucf101


def clip_eval(path: Path, size: int) -> bytes:
    """Independent reference decode: torchvision's Resize(size, bicubic) + CenterCrop(size), CHW bytes."""
    t = transforms.Compose([transforms.Resize(size, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size)])
    with Image.open(path) as im:
        return np.asarray(t(im.convert("RGB"))).transpose(2, 0, 1).tobytes()


def test_registry():
    assert {"cifar100", "food101", "ucf101"} <= set(dataset_names())
    assert all(DATASETS[n].modality == "image" for n in ("cifar100", "food101", "ucf101"))
    with pytest.raises(UserError, match="unknown option.*image_size"):
        load_dataset("cifar100", image_size=64)


# --- CIFAR-100 --------------------------------------------------------------------------------------


def test_cifar100_round_trip(tmp_path):
    folder = write_cifar100(tmp_path, n_train=200, n_test=50)
    ds = load_dataset("cifar100", data_root=tmp_path)
    assert ds.modality == "image" and ds.source == str(folder)
    assert ds.classes == [n.replace("_", " ") for n in CIFAR_FINE_NAMES]
    assert ds.info["raw_class_names"] == CIFAR_FINE_NAMES
    for split, n in (("train", 200), ("test", 50)):
        with open(folder / split, "rb") as f:  # independent read of what was written (plain pickle)
            written = pickle.load(f, encoding="bytes")
        truth = {row.tobytes(): lab for row, lab in zip(written[b"data"], written[b"fine_labels"], strict=True)}
        got = getattr(ds, split)
        assert got.inputs.shape == (n, 3, 32, 32) and got.inputs.dtype == torch.uint8
        assert got.labels.dtype == torch.int64
        assert Counter(got.labels.tolist()) == Counter(written[b"fine_labels"])
        for img, label in zip(got.inputs, got.labels.tolist(), strict=True):
            assert truth[img.numpy().tobytes()] == label  # row-major CHW, label kept
    # learnable: the class-coloured block is in channel order R, G, B
    c = int(ds.train.labels[0])
    assert ds.train.inputs[0, :, 0, 0].tolist() == [40 + 20 * (c // 10), 40 + 20 * (c % 10), 230]


def test_cifar100_archive_equals_folder_and_balanced(tmp_path):
    write_cifar100(tmp_path / "a", n_train=300, n_test=100)
    archive = write_cifar100(tmp_path / "b", n_train=300, n_test=100, archive=True)
    assert archive.name == "cifar-100-python.tar.gz" and not (tmp_path / "b" / "cifar-100-python").exists()
    a = cifar100.load(tmp_path / "a", train_per_class=2, test_per_class=1)
    b = cifar100.load(tmp_path / "b", train_per_class=2, test_per_class=1)
    assert b.source == str(archive) and not (tmp_path / "b" / "cifar-100-python").exists()  # read in place
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.labels, b.test.labels)
    assert Counter(a.train.labels.tolist()) == {c: 2 for c in range(100)} and len(a.test) == 100
    write_cifar100(tmp_path / "b", n_train=100, n_test=100)  # unpacked files win over the archive
    assert cifar100.load(tmp_path / "b").source == str(tmp_path / "b" / "cifar-100-python")


def test_cifar100_determinism(tmp_path):
    write_cifar100(tmp_path, n_train=300, n_test=100)
    a = cifar100.load(tmp_path, seed=0, train_per_class=2)
    b = cifar100.load(tmp_path, seed=0, train_per_class=2)
    c = cifar100.load(tmp_path, seed=1, train_per_class=2)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.inputs, b.test.inputs)
    assert not torch.equal(a.train.inputs, c.train.inputs)


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.getoutput"])
def test_cifar100_refuses_code_in_pickle(tmp_path, target):
    import subprocess

    marker = tmp_path / "pwned"
    func = {"os.system": os.system, "builtins.eval": eval, "subprocess.getoutput": subprocess.getoutput}[target]
    arg = f"open({str(marker)!r}, 'w')" if target == "builtins.eval" else f"touch {marker}"
    folder = write_cifar100(tmp_path, n_train=100, n_test=100)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": _Exploit(func, arg)}))
    module, name = func.__module__, func.__name__
    with pytest.raises(UserError, match=rf"refusing to load {folder / 'meta'}: its pickle references {module}\.{name}"):
        cifar100.load(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "shape", "labels", "not_dict"])
def test_cifar100_corrupt(tmp_path, damage):
    folder = write_cifar100(tmp_path, n_train=100, n_test=100)
    target = folder / "train"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "shape":
        target.write_bytes(pickle.dumps({b"data": np.zeros((100, 1024), np.uint8), b"fine_labels": [0] * 100}))
    elif damage == "labels":
        target.write_bytes(pickle.dumps({b"data": np.zeros((100, 3072), np.uint8), b"fine_labels": [100] * 100}))
    else:
        target.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError, match=f"corrupt CIFAR-100 file {target}"):
        cifar100.load(tmp_path)


def test_cifar100_missing_and_offline_fast(tmp_path, monkeypatch):
    missing = r"CIFAR-100 not found under .*missing.*cifar-100-python/ \(torchvision layout\)"
    with pytest.raises(UserError, match=missing):
        cifar100.load(tmp_path / "missing")
    calls = []

    def offline(root):
        calls.append(root)
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar100, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setattr(cifar100, "_download", offline)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"download failed \(offline\?.*pass --data-root DIR holding cifar-100-python/"):
        load_dataset("cifar100")
    assert time.perf_counter() - start < 30 and calls == [tmp_path / "cache"]


def test_downloads_are_used_when_they_land_and_refused_when_nothing_does(tmp_path, monkeypatch):
    """Without --data-root a download runs once into the cache: what it leaves there (the torchvision layout of
    each set, written by the fakes) is what loads; a download that returns having written nothing usable is one
    line naming the folders looked in and the fix."""
    for module, write, name, size in ((cifar100, write_cifar100, "CIFAR-100", {}),
                                      (food101, write_food101, "Food-101", {"image_size": 8})):  # fmt: skip
        cache = tmp_path / name
        monkeypatch.setattr(module, "CACHE_ROOT", cache)
        calls = []
        monkeypatch.setattr(module, "_download", lambda root, calls=calls: calls.append(root))
        with pytest.raises(
            UserError, match=rf"{name}: the download left nothing usable under {re.escape(str(cache))}.*--data-root"
        ):
            module.load(None, **size)
        monkeypatch.setattr(
            module, "_download", lambda root, write=write, calls=calls: (calls.append(root), write(root))
        )
        assert len(module.load(None, **size).test) > 0
        assert calls == [cache, cache]
        module.load(None, **size)  # found in the cache: no download
        assert calls == [cache, cache]


def test_fetch_online_fails_fast_and_restores_timeout(monkeypatch):
    """The real download path: an unreachable host is refused before torchvision is touched."""
    for k in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = socket.getdefaulttimeout()
    fetched = []
    start = time.perf_counter()
    with pytest.raises(OSError, match="unreachable"):
        network.fetch_online(lambda: fetched.append(1), "127.0.0.1", port)
    assert time.perf_counter() - start < 5 and not fetched

    def seen_timeout():
        fetched.append(socket.getdefaulttimeout())
        raise RuntimeError("server said no")

    with socket.socket() as server:  # reachable: fetch runs under the short timeout, restored after an error
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(RuntimeError):
            network.fetch_online(seen_timeout, "127.0.0.1", server.getsockname()[1])
    assert fetched == [network.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


# --- Food-101 ---------------------------------------------------------------------------------------


def test_food101_round_trip(tmp_path):
    root = write_food101(tmp_path, classes=5, per_class=6)
    names = (root / "meta" / "classes.txt").read_text().split()
    ds = load_dataset("food101", data_root=tmp_path, image_size=24)
    assert ds.source == str(root) and ds.classes == [n.replace("_", " ") for n in names]
    assert ds.classes[0] == "apple pie" and ds.info["raw_class_names"] == names
    for split, per in (("train", 4), ("test", 2)):
        listing = json.loads((root / "meta" / f"{split}.json").read_text())
        truth = {clip_eval(root / "images" / f"{s}.jpg", 24): names.index(c) for c, ids in listing.items() for s in ids}
        got = getattr(ds, split)
        assert got.inputs.shape == (5 * per, 3, 24, 24) and got.inputs.dtype == torch.uint8
        assert Counter(got.labels.tolist()) == {c: per for c in range(5)}
        for img, label in zip(got.inputs, got.labels.tolist(), strict=True):
            assert truth[img.numpy().tobytes()] == label
    # the class-coloured centre survives the resize + crop (JPEG noise aside)
    c = int(ds.train.labels[0])
    assert np.abs(ds.train.inputs[0, :, 12, 12].numpy().astype(int) - [60 + 40 * c, 60, 220]).max() < 30


def test_food101_subsets_determinism_and_default_size(tmp_path):
    write_food101(tmp_path, classes=3, per_class=9)
    a = food101.load(tmp_path / "food-101", seed=0, train_per_class=2, test_per_class=1, image_size=16)
    b = food101.load(tmp_path, seed=0, train_per_class=2, test_per_class=1, image_size=16)
    c = food101.load(tmp_path, seed=1, train_per_class=2, test_per_class=1, image_size=16)
    assert a.train.inputs.shape == (6, 3, 16, 16) and len(a.test) == 3
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert food101.load(tmp_path, train_per_class=1, test_per_class=1).train.inputs.shape == (3, 3, 224, 224)
    with pytest.raises(UserError, match="image_size must be a positive integer"):
        food101.load(tmp_path, train_per_class=1, test_per_class=1, image_size=0)


def test_food101_errors(tmp_path, monkeypatch):
    root = write_food101(tmp_path, classes=2, per_class=3)
    first = json.loads((root / "meta" / "train.json").read_text())["apple_pie"][0]  # "apple_pie/<id>"
    victim = root / "images" / f"{first}.jpg"
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=f"cannot decode image {victim}"):
        food101.load(tmp_path, image_size=8)
    victim.unlink()
    with pytest.raises(UserError, match=f"image {victim} is missing"):
        food101.load(tmp_path, image_size=8)
    (root / "meta" / "test.json").write_text('{"pizza": ["pizza/1"]}')
    with pytest.raises(UserError, match="class 'pizza' is not in meta/classes.txt"):
        food101.load(tmp_path, image_size=8)
    with pytest.raises(UserError, match="Food-101 not found under .*food-101/ \\(torchvision layout"):
        food101.load(tmp_path / "missing")
    monkeypatch.setattr(food101, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setattr(food101, "_download", lambda root: (_ for _ in ()).throw(OSError("offline")))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"download failed \(offline\?"):
        load_dataset("food101")
    assert time.perf_counter() - start < 30


# --- UCF101 middle frames ---------------------------------------------------------------------------


def test_ucf101_round_trip(tmp_path):
    root = write_ucf101(tmp_path, classes=4, per_class=5)
    split = json.loads((root / "split_zhou_UCF101.json").read_text())
    ds = load_dataset("ucf101", data_root=tmp_path, image_size=20)
    assert ds.source == str(root)
    assert ds.classes == ["Apply Eye Makeup", "Archery", "Baby Crawling", "Balance Beam"]
    assert ds.info["raw_class_names"] == ["Apply_Eye_Makeup", "Archery", "Baby_Crawling", "Balance_Beam"]
    for key, got, per in (("train", ds.train, 3), ("test", ds.test, 1)):
        truth = {clip_eval(root / "UCF-101-midframes" / rel, 20): lab for rel, lab, _ in split[key]}
        assert got.inputs.shape == (4 * per, 3, 20, 20) and got.inputs.dtype == torch.uint8
        assert Counter(got.labels.tolist()) == {c: per for c in range(4)}
        for img, label in zip(got.inputs, got.labels.tolist(), strict=True):
            assert truth[img.numpy().tobytes()] == label
    with_val = ucf101.load(root, image_size=20, include_val=True, train_per_class=4)
    assert len(with_val.train) == 16 and ds.info["split_sizes"] == {"train": 12, "val": 4, "test": 4}


def test_ucf101_determinism_and_errors(tmp_path):
    write_ucf101(tmp_path, classes=3, per_class=6)
    a = ucf101.load(tmp_path, seed=0, train_per_class=2, image_size=12)
    b = ucf101.load(tmp_path, seed=0, train_per_class=2, image_size=12)
    c = ucf101.load(tmp_path, seed=1, train_per_class=2, image_size=12)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.labels, c.train.labels) or not torch.equal(a.train.inputs, c.train.inputs)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"UCF101 middle frames not found .*UCF-101-midframes\.zip and "
                                        r"split_zhou_UCF101\.json .*CoOp.*DATASETS\.md"):  # fmt: skip
        load_dataset("ucf101", data_root=tmp_path / "missing")
    assert time.perf_counter() - start < 5
    split_file = tmp_path / "ucf101" / "split_zhou_UCF101.json"
    table = json.loads(split_file.read_text())
    table["test"][0][2] = "Renamed"
    split_file.write_text(json.dumps(table))
    with pytest.raises(UserError, match=f"corrupt UCF101 split file {split_file}.*label"):
        ucf101.load(tmp_path, image_size=12)
    table["test"][0] = ["../../etc/passwd", 0, table["train"][0][2]]
    split_file.write_text(json.dumps(table))
    with pytest.raises(UserError, match="is not relative"):
        ucf101.load(tmp_path, image_size=12)


def test_tar_member_names(tmp_path):
    """The archive the fake writes has torchvision's member names."""
    archive = write_cifar100(tmp_path, n_train=100, n_test=100, archive=True)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"]
