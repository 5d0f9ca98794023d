"""FSDP2 full fine-tuning under torchrun (2 gloo processes on the CPU), against one process.

Sharded FT in fp32 at lr 1e-3 ends where one unsharded process ends (relative weight-update difference
≤ 1e-4, the issue's bound); a run killed right after a sharded checkpoint (torch.distributed.checkpoint) and
launched again ends bit-equal to an uninterrupted sharded run, and one whose shard was damaged starts over. The
weights compared are the ones :func:`adapters.fsdp.full_state_dict` consolidates on rank 0, so consolidation is
checked too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters import compat
from tests.conftest import free_port
from tests.fsdp_worker import init_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# the sharded runs below are on the CPU, where FSDP2 trains right from torch 2.9 (refused before it, tested)
needs_cpu_fsdp = pytest.mark.skipif(not compat.fsdp_runs_on_cpu(), reason=f"FSDP2 on the CPU needs torch >= "
                                    f"{compat.FSDP_CPU_TORCH}; this is {torch.__version__}")  # fmt: skip


def _run(args: list[str], procs: int | None, expect: int = 0) -> str:
    launch = [sys.executable]
    if procs:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", free_port()]
    done = subprocess.run([*launch, "-m", "tests.fsdp_worker", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _run([str(out / "one.safetensors")], None)
    _run([str(out / "two.safetensors"), str(out / "ck-full")], 2)
    return out


@needs_cpu_fsdp
def test_two_processes_match_one(runs):
    one, two, init = (load_file(p) for p in (runs / "one.safetensors", runs / "two.safetensors",
                                             init_path(runs / "one.safetensors")))  # fmt: skip
    assert set(one) == set(two) == set(init) and len(one) > 30  # every FT parameter, consolidated
    assert all(two[k].dtype == torch.float32 and two[k].shape == one[k].shape for k in one)
    u1 = torch.cat([(one[k] - init[k]).flatten() for k in one])
    u2 = torch.cat([(two[k] - init[k]).flatten() for k in one])
    assert u1.norm() > 1e-2  # it trained
    assert (u1 - u2).norm() / u1.norm() <= 1e-4
    for k in one:  # per tensor too, where the update is not rounding noise (a key bias's gradient is exactly 0)
        d1 = (one[k] - init[k]).norm()
        if d1 > 1e-5:
            assert (one[k] - two[k]).norm() / d1 <= 1e-3, k


@needs_cpu_fsdp
def test_kill_and_resume_is_bit_equal(runs):
    ck = runs / "ck-killed"
    _run([str(runs / "killed.safetensors"), str(ck), "4"], 2, expect=1)  # both ranks exit hard after step 4's save
    assert (ck / "extra.pt").exists() and not (runs / "killed.safetensors").exists()
    assert "resumed at step 4" in _run([str(runs / "killed.safetensors"), str(ck)], 2)
    full, resumed = load_file(runs / "two.safetensors"), load_file(runs / "killed.safetensors")
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)


@needs_cpu_fsdp
def test_a_damaged_shard_is_not_resumed(runs):
    """A sharded checkpoint's files carry no checksum: a byte flipped in a shard (a failing disk) was resumed from
    as wrong numbers. extra.pt records each file's sha256; the launch after the kill starts over, and ends
    bit-equal to the uninterrupted run."""
    ck, out = runs / "ck-damaged", runs / "damaged.safetensors"
    _run([str(out), str(ck), "4"], 2, expect=1)
    shard = max(ck.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    log = _run([str(out), str(ck)], 2)
    assert f"({shard.name} differs from the sha256 saved with it); starting over" in log, log
    assert "resumed at step 0" in log, log
    full, again = load_file(runs / "two.safetensors"), load_file(out)
    assert set(full) == set(again) and all(torch.equal(full[k], again[k]) for k in full)


def test_fsdp_bad_inputs_exit_2_before_work(wordnet_root, tmp_path, capsys, monkeypatch):
    from landscape import connectivity
    from tests.conftest import TINY_RUN

    def bad(*extra: str) -> str:
        out = tmp_path / "out"
        argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN, "--fsdp"]
        assert connectivity.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and "Traceback" not in "\n".join(err) and not out.exists()
        return err[-1]

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "torchrun" in bad("--methods", "ft")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check runs before any process group
    assert "no FT solution" in bad("--methods", "lora", "randlora")
    assert "no FT solution" in bad("--load-4bit")  # its default methods are the adapters
    fp16 = bad("--torch-dtype", "float16")  # no loss scaling in the sharded training: refused at config time
    assert "error: --torch-dtype float16: cannot train under --fsdp" in fp16 and "bfloat16 or float32" in fp16
    with monkeypatch.context() as m:  # torch 2.7 and 2.8 (the floor is 2.7): FSDP2 on the CPU trains wrongly
        m.setattr(torch, "__version__", "2.8.0+cpu")
        old = bad("--methods", "ft", "--device", "cpu")
        assert "shards CPU tensors from torch 2.9 on, and this is torch 2.8.0+cpu" in old
        assert "install torch>=2.9" in old
    from landscape import config as run_config  # bfloat16 (no loss scaling) is accepted with --fsdp

    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), *TINY_RUN, "--fsdp", "--torch-dtype", "bfloat16"]
    if compat.fsdp_runs_on_cpu() or torch.cuda.is_available():
        assert run_config.from_argv(argv, "prog", "").torch_dtype == "bfloat16"
    else:  # this torch, on this CPU
        assert "from torch 2.9 on" in bad("--torch-dtype", "bfloat16")


@needs_cpu_fsdp
def test_connectivity_fsdp_run_saves_a_plain_fp32_solution(wordnet_root, tmp_path):
    """``--fsdp`` end to end under torchrun (FT sharded, the adapters under DDP): the FT solution is consolidated
    into the toolkit's solution folder (fp32 safetensors), which the plane and
    the spectra of that run read."""
    from adapters.solutions.solution import load_solution
    from tests.conftest import TINY_RUN

    out = tmp_path / "run"
    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN,
            "--fsdp"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "tests.nodraw", "landscape.connectivity", *argv]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train ft] FSDP2: " in done.stdout + done.stderr and "from 2 shards" in done.stdout + done.stderr
    folder = out / "solutions" / "ft"
    tensors = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    assert tensors and all(v.dtype == torch.float32 for v in tensors.values() if v.is_floating_point())
    assert not list(out.glob("solutions/.*.dcp"))  # the sharded checkpoint is removed once the solution is saved
    solution = load_solution(folder, expect_method="ft")
    assert solution.info["method"] == "ft"
    meta = (out / "landscape.json").read_text()
    assert '"ft"' in meta and (out / "landscape.npz").exists() and (out / "spectrum.json").exists()


@needs_cpu_fsdp
def test_weights_and_adamw_state_are_sharded(runs):
    """Each rank's checkpoint shard holds about half of the fp32 weights and AdamW's two moments
    (12 bytes per parameter in all): no rank keeps a full copy of either."""
    params = sum(v.numel() for v in load_file(runs / "two.safetensors").values())
    shards = sorted((runs / "ck-full").glob("__*_0.distcp"))
    assert len(shards) == 2
    sizes = [f.stat().st_size for f in shards]
    assert 12 * params <= sum(sizes) <= 1.1 * 12 * params  # fp32 weights + exp_avg + exp_avg_sq, once
    assert all(0.4 * sum(sizes) <= s <= 0.6 * sum(sizes) for s in sizes)


@needs_cpu_fsdp
def test_each_rank_materialises_only_its_shard(tmp_path):
    """Building the sharded FT model (:func:`adapters.fsdp.sharded_copy`: on the meta device, each rank's shards
    materialised, the weights broadcast from rank 0 tensor by tensor) raises a rank's peak RSS above its loaded
    bf16 base by about its fp32 shard; the deep copy it replaced first held the whole model in fp32."""
    peaks = {}
    for mode in ("copy", "meta"):
        _run(["--rss", str(tmp_path / f"{mode}.json"), mode, "bfloat16"], 2)
        record = json.loads((tmp_path / f"{mode}.json").read_text())
        full = record["fp32_model_bytes"]
        peaks[mode] = [r["built_peak_above_base"] for r in record["ranks"]]
    assert all(p >= full for p in peaks["copy"])  # a full fp32 copy (then sharded)
    assert all(p <= 0.8 * full for p in peaks["meta"])  # its half (1/2 of the fp32 model) and one tensor's buffer
    assert all(m <= 0.75 * c for m, c in zip(peaks["meta"], peaks["copy"], strict=True))


def test_a_float16_model_under_fsdp_is_a_user_error_before_sharding():
    """A float16 model reaching the sharded training (--torch-dtype auto on a float16 checkpoint: the config check
    sees only an explicit float16) is refused with the fix, before anything is sharded or trained."""
    import torch.distributed as dist

    from adapters.errors import UserError
    from adapters.models import get_model
    from adapters.train import TrainConfig, train

    entry = get_model("tiny-bert")
    model = entry.build(4).half()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="--torch-dtype bfloat16 or float32"):
            train(model, entry.encode(["a b", "c d"]), torch.tensor([0, 1]), TrainConfig(steps=1, batch_size=2),
                  progress=False, fsdp=True)  # fmt: skip
    finally:
        dist.destroy_process_group()
    assert all(type(p) is torch.nn.Parameter and torch.equal(p, before[n]) for n, p in model.named_parameters())
