"""The one loss/accuracy accumulation against a plain per-sample loop, and the paired standard error."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adapters.objectives import OBJECTIVES, paired_se, score


def _batches(g: torch.Generator):
    return [({"x": torch.randn(n, 5, generator=g)}, torch.randint(0, 3, (n,), generator=g)) for n in (4, 7, 2)]


def test_score_equals_a_plain_loop_and_keeps_the_samples():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=g)
    batches = _batches(g)
    forward = lambda inputs: inputs["x"] @ weight.T  # noqa: E731
    result = score(forward, batches, 13, OBJECTIVES["classification"], keep_samples=True)[0]
    losses, right = [], 0
    for inputs, target in batches:  # the naive reference: one sample at a time
        for i in range(len(target)):
            logits = forward({"x": inputs["x"][i : i + 1]})
            losses.append(F.cross_entropy(logits, target[i : i + 1]).item())
            right += int(logits.argmax() == target[i])
    ref = np.array(losses)
    assert np.allclose(result.samples.numpy(), ref, atol=1e-6)
    assert abs(result.loss - ref.mean()) < 1e-6 and result.accuracy == right / 13
    assert abs(result.loss_se - ref.std(ddof=1) / np.sqrt(13)) < 1e-6


def test_paired_standard_error_is_that_of_the_per_sample_differences():
    g = torch.Generator().manual_seed(1)
    shared = torch.rand(50, generator=g, dtype=torch.float64) * 5  # each sample's difficulty, common to both
    a, b = shared + 0.01 * torch.randn(50, generator=g, dtype=torch.float64), shared
    d = (a - b).numpy()
    assert abs(paired_se(a, b) - d.std(ddof=1) / np.sqrt(50)) < 1e-12
    unpaired = np.hypot(a.numpy().std(ddof=1), b.numpy().std(ddof=1)) / np.sqrt(50)
    assert paired_se(a, b) < unpaired / 10  # the shared difficulty cancels
