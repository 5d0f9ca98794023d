"""The grid benchmark's cases and what each needs: the model and evaluation samples of each case
(:func:`minilm_case`, :func:`efficientnet_case`, :func:`vit_case`), the three synthetic solutions
(:func:`synthetic_deltas`, a fitted head: :func:`fit_head`), the useful FLOPs of one grid point and the
measured matmul peak. The measurements themselves are in :mod:`experiments.benchmarks.grid`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from adapters.methods import adapted_weights
from adapters.models.base import HEAD, Classifier, Encoded
from adapters.objectives import OBJECTIVES
from experiments.benchmarks.peers import sync
from landscape.engine.grid import EvalSet

Deltas = dict[str, dict[str, torch.Tensor]]

# --------------------------------------------------------------------------- the three solutions


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


@torch.no_grad()
def fit_head(model: Classifier, eval_set: EvalSet, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A nearest-centroid head on the base model's features (cosine logits times a searched temperature)."""
    feats, labels = [], []
    for inputs, target in eval_set.batches:
        feats.append(model.features(**inputs).float().cpu())
        labels.append(target.cpu())
    f, y = torch.cat(feats), torch.cat(labels)
    mean = f.mean(0)
    centroids = torch.stack([f[y == c].mean(0) if (y == c).any() else mean for c in range(num_classes)])
    w = centroids - mean
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = (f - mean) / (f - mean).norm(dim=1, keepdim=True).clamp_min(1e-12)  # cosine logits before temperature
    cos = z @ w.T
    # The best temperature, but no sharper than a mean loss of 0.1·log(C): few samples per class would
    # otherwise give a near-zero loss everywhere, where agreement between the methods proves little.
    loss = OBJECTIVES["classification"].loss
    losses = {float(t): float(loss(t * cos, y)) for t in np.geomspace(1, 30, 25)}
    floor = 0.1 * float(np.log(num_classes))
    allowed = {t: v for t, v in losses.items() if v >= floor} or {min(losses): 0.0}
    best_t = min(allowed, key=allowed.get)
    # logits = t·cos(f − mean, w_c) ≈ t/‖f − mean‖ · (f − mean)·w_c: a Linear with the typical norm folded in
    scale = best_t / float((f - mean).norm(dim=1).mean().clamp_min(1e-12))
    weight = scale * w
    return weight, -(weight @ mean)


def synthetic_deltas(
    model: nn.Module,
    targets: Sequence[str],
    head: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float = 1e-2,
    seed: int = 0,
    lora_rank: int = 8,
) -> Deltas:
    """ΔW of three synthetic solutions (CPU fp32): ft every trainable parameter, lora/randlora the
    adapted weights ``targets``; each + the fitted ``head`` (None: the model has no trainable head)."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def noise(ref: torch.Tensor, shape=None) -> torch.Tensor:
        return torch.randn(shape or ref.shape, generator=g) * (scale * max(rms(ref), 1e-8))

    def head_delta() -> dict[str, torch.Tensor]:
        if head is None:
            return {}
        head_w, head_b = head
        return {f"{HEAD}.weight": head_w + noise(head_w), f"{HEAD}.bias": head_b + noise(head_w, head_b.shape)}

    deltas: Deltas = {"ft": {n: noise(p) for n, p in params.items() if not n.startswith(HEAD + ".")} | head_delta()}
    lora = {}
    for n in targets:
        w = params[n].reshape(params[n].shape[0], -1)
        b = torch.randn(w.shape[0], lora_rank, generator=g)
        a = torch.randn(lora_rank, w.shape[1], generator=g)
        d = b @ a
        lora[n] = (d * (scale * rms(w) / max(rms(d), 1e-12))).reshape(params[n].shape)
    deltas["lora"] = lora | head_delta()
    deltas["randlora"] = {n: noise(params[n]) for n in targets} | head_delta()
    return deltas


# --------------------------------------------------------------------------- FLOPs and peak


def bert_useful_flops(model: Classifier, lengths: torch.Tensor, num_classes: int) -> float:
    """Forward FLOPs over the real (non-padded) tokens of every sample."""
    cfg = model.backbone.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    matrix = sum(p.numel() for p in model.backbone.encoder.parameters() if p.dim() == 2)
    t = lengths.double()
    return float(2 * matrix * t.sum() + 4 * layers * d * (t * t).sum() + 2 * d * num_classes * len(t))


def counted_flops(
    model: nn.Module, inputs: dict[str, torch.Tensor], train_mode: bool = False, forwards: int = 1
) -> float:
    """FLOPs of ``forwards`` forwards in a row, counted by FlopCounterMode (train_mode avoids fused
    inference kernels). ``model.train`` starts them afresh (CLIP drops its cached text features)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.train(train_mode)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _ in range(forwards):
            model(**inputs)
    model.train(was)
    return float(counter.get_total_flops())


def point_flops(model: nn.Module, inputs: dict[str, torch.Tensor], n: int, train_mode: bool = False) -> dict:
    """Forward FLOPs of one grid point over ``n`` samples, counted on the batch ``inputs``.

    The second of two forwards in a row does the per-batch work alone; the first also does what a
    model computes once per set of weights (CLIP's class-prompt text features). Returns
    ``per_sample``, ``once`` (per set of weights) and ``total`` = once + n · per_sample.
    """
    size = next(iter(inputs.values())).shape[0]
    one = counted_flops(model, inputs, train_mode)
    per_batch = counted_flops(model, inputs, train_mode, forwards=2) - one
    once = max(one - per_batch, 0.0)
    return {"per_sample": per_batch / size, "once": once, "total": once + per_batch / size * n}


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best 2n³/t over ``repeats`` timings of an n × n ``torch.mm``."""
    n = 8192 if device.type == "cuda" else 2048
    inner = 10 if device.type == "cuda" else 1
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    device: torch.device
    model: nn.Module
    raw: list[str] | torch.Tensor
    labels: torch.Tensor
    encode: Callable[[Sequence | torch.Tensor], Encoded]
    targets: list[str]  # the adapted weights (adapters.methods.adapted_weights): the adapters' plane
    num_classes: int
    useful_flops: Callable[[nn.Module, Encoded, EvalSet], float]  # forward FLOPs per point
    info: dict = field(default_factory=dict)


def _bert_flops(case_classes: int):
    return lambda model, encoded, eval_set: bert_useful_flops(model, encoded.lengths, case_classes)


def _image_flops(train_mode: bool = False):
    def flops(model, encoded, eval_set):
        inputs, _ = eval_set.batches[0]
        return point_flops(model, inputs, eval_set.n, train_mode)["total"]

    return flops


def _offline_case(name: str, model_name: str, dataset: str, samples: int, seed: int, flops, info: dict) -> Case:
    """A CPU case on an offline model and dataset: a fixed evaluation subset of the training split."""
    from adapters.data import eval_subset, load_dataset
    from adapters.models import get_model

    entry = get_model(model_name)
    data = load_dataset(dataset, seed=seed)
    subset = eval_subset(data.train, samples, seed)
    model = entry.build(len(data.classes))
    return Case(
        name, torch.device("cpu"), model, subset.inputs, subset.labels, entry.encode,
        list(adapted_weights(model, entry.targets)), len(data.classes), flops(len(data.classes)),
        {**info, "data": data.source},
    )  # fmt: skip


def minilm_case(samples: int, seed: int = 0) -> Case:
    return _offline_case("minilm-wordnet", "minilm", "wordnet", samples, seed, _bert_flops,
                         {"model": "all-MiniLM-L6-v2"})  # fmt: skip


def efficientnet_case(samples: int, seed: int = 0) -> Case:
    return _offline_case("efficientnet-fashion-mnist", "efficientnet-lite0", "fashion-mnist", samples, seed,
                         lambda classes: _image_flops(), {"model": "EfficientNet-Lite0 @ 64 px"})  # fmt: skip


def synthetic_images(samples: int, num_classes: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic classes: uint8 (N, 3, size, size), a fixed random pattern per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (samples,), generator=g)
    patterns = torch.rand(num_classes, 3, size, size, generator=g) * 255
    noisy = patterns[labels] + 60 * torch.randn(samples, 3, size, size, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8), labels


def vit_case(samples: int, seed: int, device: torch.device, num_classes: int = 100, arch: str = "ViT-B-32") -> Case:
    """The adapters' own CLIP (``arch``, random init from ``seed``) with its zero-shot head, on synthetic images."""
    from adapters.models import build_base, get_model

    entry = get_model(arch)
    model = build_base(arch, [f"class {c}" for c in range(num_classes)], {"pretrained": "none"}, seed)
    raw, labels = synthetic_images(samples, num_classes, seed)
    return Case(
        "vit-b32-cifar", device, model, raw, labels, entry.encode, list(adapted_weights(model, entry.targets)),
        num_classes, _image_flops(train_mode=True),
        {"model": f"adapters' CLIP {arch} (pretrained none), zero-shot head, both towers adapted",
         "data": f"synthetic uint8 32 px images -> {model.image_size} px in the model's forward"},
    )  # fmt: skip
