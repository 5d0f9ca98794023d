"""Full fine-tuning of a tiny dropout-free BERT for a few steps, alone or sharded with FSDP2 under torchrun.

``python -m tests.fsdp_worker OUT.safetensors [CKPT_DIR [DIE_AT_STEP]]`` trains FT (fp32, lr 1e-3) and writes
the trained parameters to OUT (alone, also the initial ones to :func:`init_path`; under torchrun, rank 0
writes them consolidated from the shards by :func:`adapters.fsdp.full_state_dict`).
With CKPT_DIR, a sharded checkpoint is written every 2 steps; with
DIE_AT_STEP, every process hard-exits (``os._exit``, no cleanup: as a kill) right after the checkpoint of that
step is written, so a second launch resumes from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from adapters import fsdp
from adapters.methods import MethodSpec, attach
from adapters.models import get_model
from adapters.train import TrainConfig, train

STEPS = 6


def init_path(out: str | os.PathLike) -> Path:
    """Where a single-process run writes its initial trainable parameters."""
    return Path(out).with_suffix(".init.safetensors")


def main(out: str, ckpt: str | None = None, die_at: int | None = None) -> None:
    torch.set_num_threads(1)
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    if die_at is not None:
        save = fsdp.save_checkpoint

        def save_then_die(path, model, optimizer, extra):
            save(path, model, optimizer, extra)
            if int(extra["step"]) == die_at:
                os._exit(3)

        fsdp.save_checkpoint = save_then_die
    entry = get_model("tiny-bert")
    base = entry.build(4)
    for m in base.modules():  # dropout would draw different masks in 1 and 2 processes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    model = attach(base, MethodSpec("ft"), entry.targets)
    if not sharded:  # the starting point, for the relative weight-update difference
        save_file({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, init_path(out))
    texts = [f"gloss {i} " + "word " * (i % 5) for i in range(48)]
    config = TrainConfig(steps=STEPS, batch_size=8, lr=1e-3, seed=1)
    history = train(model, entry.encode(texts), torch.arange(48) % 4, config, progress=False, fsdp=sharded,
          checkpoint=Path(ckpt) if ckpt else None, checkpoint_every=2)  # fmt: skip
    if sharded:
        state = fsdp.full_state_dict(model)
    else:
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if not sharded or dist.get_rank() == 0:
        save_file(state, out)
        print(f"resumed at step {history['resumed_at_step']}")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *(int(a) for a in sys.argv[3:4]))
