"""Shared fixtures: a tiny BERT classifier and tiny datasets written in the real formats."""

from __future__ import annotations

import os

import pytest

# Before torch: `import adapters` puts the OpenMP wait policy in the environment (adapters.threads),
# which torch's OpenMP runtime reads once, when it loads.
import adapters  # noqa: F401

# isort: split
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_entry():
    from adapters.models import get_model

    return get_model("tiny-bert")


@pytest.fixture(scope="session")
def wordnet_root(tmp_path_factory):
    from tests.fakes import write_wordnet

    folder = tmp_path_factory.mktemp("wordnet")
    write_wordnet(folder, per_category=40)
    return folder


def free_port() -> str:
    """A TCP port nothing listens on now (for torchrun's rendezvous in tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
