"""Training checkpoints: a run killed mid-training resumes to bit-identical weights (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.methods import MethodSpec, attach
from adapters.train import TrainConfig, train


class Crash(Exception):
    pass


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
    forward, calls = crashing.forward, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6; the checkpoint of step 4 survives
            raise Crash
        return forward(*args, **kwargs)

    crashing.forward = dying
    ckpt = tmp_path / "train.ckpt"
    with pytest.raises(Crash):
        train(crashing, data, labels, config, progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert ckpt.exists()

    resumed = fresh()  # a new process would rebuild the model from scratch
    history = train(resumed, data, labels, config, progress=False, checkpoint=ckpt, checkpoint_every=2)
    assert history["resumed_at_step"] == 4 and not ckpt.exists()
    assert history["train_loss"] == ref_history["train_loss"]
    ref_params, got = dict(reference.named_parameters()), dict(resumed.named_parameters())
    for name, p in ref_params.items():
        assert torch.equal(p, got[name]), name
