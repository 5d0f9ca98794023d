"""Training checkpoints: a run killed mid-training resumes to bit-identical weights (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.methods import MethodSpec, attach
from adapters.train import TrainConfig, train
from tests.synthetic import Crash, die_on_call


@pytest.mark.parametrize("method", ["ft", "randlora"])
def test_killed_training_resumes_to_the_same_weights(tiny_entry, tmp_path, method):
    texts = [f"gloss number {i} " + "word " * (i % 6) for i in range(40)]
    data, labels = tiny_entry.encode(texts), torch.arange(40) % 4
    config = TrainConfig(steps=9, batch_size=8, lr=1e-3, seed=3)
    base = tiny_entry.build(4)

    def fresh():
        torch.manual_seed(0)
        return attach(
            copy.deepcopy(base), MethodSpec(method, rank=4 if method == "randlora" else None), tiny_entry.targets
        )

    reference = fresh()
    ref_history = train(reference, data, labels, config, progress=False)

    crashing = fresh()
    die_on_call(crashing, 6)  # dies during step 6; the checkpoint of step 4 survives
    ckpt = tmp_path / "train.ckpt"
    with pytest.raises(Crash):
        train(crashing, data, labels, config, progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert ckpt.exists()

    resumed = fresh()  # a new process would rebuild the model from scratch
    history = train(resumed, data, labels, config, progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert history["resumed_at_step"] == 4 and ckpt.exists()  # kept: the caller removes it once the solution is saved
    assert history["train_loss"] == ref_history["train_loss"]
    ref_params, got = dict(reference.named_parameters()), dict(resumed.named_parameters())
    for name, p in ref_params.items():
        assert torch.equal(p, got[name]), name


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """ft and randlora trained by DDP over 2 gloo processes, in one torchrun launch: {method: weights file}."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    out = tmp_path_factory.mktemp("two")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port()]
    proc = subprocess.run([*launch, "-m", "tests.ddp_worker", str(out), "ft", "randlora"], timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {method: out / f"{method}.safetensors" for method in ("ft", "randlora")}


@pytest.mark.parametrize("method", ["ft", "randlora"])
def test_torchrun_two_processes_train_like_one(two_processes, tmp_path, method):
    """DDP over 2 gloo processes with the same global batch ends at the weights of one process (this one,
    with one thread like each of them)."""
    from safetensors.torch import load_file

    from tests import ddp_worker

    threads = torch.get_num_threads()
    try:
        ddp_worker.main(tmp_path, [method])
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(tmp_path / f"{method}.safetensors"), load_file(two_processes[method])
    assert a.keys() == b.keys()
    for name in a:  # equal up to fp32 reduction order (gradients summed across processes)
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_accumulation_equals_the_whole_batch(tiny_entry, monkeypatch):
    """grad_accum micro-batches give the whole batch's gradient (fp32 summation order aside).

    Compared on the gradient each step hands to clipping: Adam's first steps are ~lr·sign(g),
    so weights would amplify last-bit differences of near-zero gradients.
    """
    texts = [f"gloss number {i} " + "word " * (i % 6) for i in range(40)]
    data, labels = tiny_entry.encode(texts), torch.arange(40) % 4
    base = tiny_entry.build(4)
    clip = torch.nn.utils.clip_grad_norm_
    grads = {}
    for accum in (1, 2, 4):
        seen = grads.setdefault(accum, [])
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                            lambda ps, c, _s=seen: _s.append([p.grad.clone() for p in ps]) or clip(ps, c))  # fmt: skip
        torch.manual_seed(0)
        model = attach(copy.deepcopy(base), MethodSpec("ft"), tiny_entry.targets)
        for module in model.modules():  # dropout masks depend on how the batch is cut
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        train(model, data, labels, TrainConfig(steps=1, batch_size=8, lr=1e-3, seed=3, grad_accum=accum),
              progress=False)  # fmt: skip
    for accum in (2, 4):
        for got, want in zip(grads[accum][0], grads[1][0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="not divisible"):
        train(model, data, labels, TrainConfig(steps=1, batch_size=8, grad_accum=3), progress=False)


def test_a_checkpoint_holds_the_weights_themselves_and_a_view_compactly(tmp_path, monkeypatch):
    """The training checkpoint stores each trainable parameter without copying it (full fine-tuning would hold a
    second copy of every weight while writing, on the GPU too), except one that views part of a larger storage,
    which is stored compact (torch.save writes a view's whole storage): read back from the file, each holds only its
    own elements, equal to the trained values."""
    from torch import nn

    from adapters import train as training
    from adapters.models.base import Encoded

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(6, 5), nn.Linear(5, 3)
            self.second.weight = nn.Parameter(torch.randn(3, 400)[:, :5])  # a view of a 3 × 400 storage

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    torch.manual_seed(0)
    model = TwoLayers()
    states = []
    write = training.write_torch
    monkeypatch.setattr(training, "write_torch", lambda path, state: (states.append(state), write(path, state)))
    ckpt = tmp_path / "train.ckpt"
    data, labels = Encoded({"x": torch.randn(16, 6)}), torch.arange(16) % 3
    train(model, data, labels, TrainConfig(steps=2, batch_size=8, lr=1e-2, seed=0), progress=False,
          checkpoint=ckpt, checkpoint_every=1)  # fmt: skip
    params = dict(model.named_parameters())
    saved = states[-1]["params"]
    assert len(states) == 2 and saved["first.weight"].data_ptr() == params["first.weight"].data_ptr()  # no copy
    loaded = torch.load(ckpt, weights_only=True)["params"]
    for name, p in params.items():
        assert torch.equal(loaded[name], p.detach()), name
        assert loaded[name].untyped_storage().nbytes() == p.numel() * p.element_size(), name
