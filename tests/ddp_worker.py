"""Trains a tiny dropout-free BERT for a few steps per method and saves its weights: run alone or under torchrun.

``python -m tests.ddp_worker OUT_DIR METHOD...`` writes ``OUT_DIR/METHOD.safetensors`` for each method (one
launch for all of them: a torchrun launch costs seconds of imports in every process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from adapters.methods import MethodSpec, attach
from adapters.models import get_model
from adapters.train import TrainConfig, train


def train_one(out: str | os.PathLike, method: str) -> None:
    entry = get_model("tiny-bert")
    base = entry.build(4)
    for m in base.modules():  # dropout would draw different masks in 1 and 2 processes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    model = attach(base, MethodSpec(method, rank=4 if method != "ft" else None), entry.targets)
    texts = [f"gloss {i} " + "word " * (i % 5) for i in range(48)]
    train(model, entry.encode(texts), torch.arange(48) % 4, TrainConfig(steps=5, batch_size=8, seed=1), progress=False)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, out)


def main(out_dir: str | os.PathLike, methods: list[str]) -> None:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    for method in methods:
        train_one(Path(out_dir) / f"{method}.safetensors", method)
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still works (gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
