"""Full fine-tuning of a tiny dropout-free BERT for a few steps, alone or sharded with FSDP2 under torchrun.

``python -m tests.fsdp_worker OUT.safetensors [CKPT_DIR [DIE_AT_STEP]]`` trains FT (fp32, lr 1e-3) and writes
the trained parameters to OUT (alone, also the initial ones to :func:`init_path`; under torchrun, rank 0
writes them consolidated from the shards by :func:`adapters.fsdp.full_state_dict`).
With CKPT_DIR, a sharded checkpoint is written every 2 steps; with
DIE_AT_STEP, every process hard-exits (``os._exit``, no cleanup: as a kill) right after the checkpoint of that
step is written, so a second launch resumes from it.

``torchrun ... -m tests.fsdp_worker --rss OUT.json copy|meta float32|bfloat16 [HIDDEN [LAYERS]]`` measures each
rank's peak RSS above the loaded base while FT is sharded (:func:`rss`).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from adapters import fsdp
from adapters.methods import MethodSpec, attach
from adapters.models import get_model
from adapters.train import TrainConfig, fp32_masters, train

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
    if sharded:  # as train_solution does it: built on the meta device, each rank materialises its shards
        model = fsdp.sharded_copy(base, lambda m: attach(m, MethodSpec("ft"), entry.targets), "cpu")
    else:
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
        # everything is written: skip the interpreter's teardown, where gloo's threads once aborted a rank under
        # load ("terminate called without an active exception", exit -6, after the results were saved)
        sys.stdout.flush()
        os._exit(0)


def _rss() -> tuple[int, int]:
    """(resident, peak resident since the last :func:`_reset_peak`) bytes of this process (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS, after returning freed heap."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def rss(out: str, mode: str, dtype: str, hidden: int = 512, layers: int = 8) -> None:
    """Per-rank peak RSS of sharding FT over the ranks (under torchrun), above the loaded base: ``copy`` (a deep
    copy of the base in fp32, then sharded: the former path) or ``meta`` (:func:`adapters.fsdp.sharded_copy`),
    while the model is built, then through one AdamW step. Rank 0 writes every rank's numbers to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=32000)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(getattr(torch, dtype))
    params = sum(p.numel() for p in base.parameters())
    _reset_peak()
    start = _rss()[0]
    prepare = lambda m: attach(m, MethodSpec("ft"), ("q_proj",))  # noqa: E731
    if mode == "copy":
        model = prepare(copy.deepcopy(base))
        fp32_masters({n: p for n, p in model.named_parameters() if p.requires_grad})
        fsdp.shard(model)
    else:
        model = fsdp.sharded_copy(base, prepare, "cpu")
    built = _rss()[1] - start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    stepped = _rss()[1] - start
    numbers = {"rank": dist.get_rank(), "built_peak_above_base": built, "step_peak_above_base": stepped}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, numbers)
    if dist.get_rank() == 0:
        record = {"mode": mode, "dtype": dtype, "params": params, "fp32_model_bytes": 4 * params,
                  "world": dist.get_world_size(), "ranks": every}  # fmt: skip
        Path(out).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--rss":
        rss(sys.argv[2], sys.argv[3], sys.argv[4], *(int(a) for a in sys.argv[5:7]))
    else:
        main(sys.argv[1], *(sys.argv[2:3]), *(int(a) for a in sys.argv[3:4]))
