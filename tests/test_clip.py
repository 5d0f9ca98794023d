"""The open_clip CLIP classifier, the paper recipe and the CLIP path of the main job.

References: open_clip's own ``encode_image`` / ``encode_text`` for the zero-shot head; the paper's
parameter counts (REFERENCE.md §2: LoRA-32 ≈ 6.9M, RandLoRA-6 ≈ 5.2M on ViT-B/32) for the budget.
A reduced architecture (``clip-tiny``, adapters/models/clip_configs) keeps the CPU runs short.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.models import clip, get_model
from landscape import connectivity
from tests.fakes import write_cifar100

CLASSES = ["apple", "aquarium fish", "bicycle", "maple tree"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return get_model("clip-tiny").create(CLASSES, {"pretrained": "none"})


def test_zero_shot_head_equals_open_clip(tiny):
    import open_clip

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer("clip-tiny")([f"An image of {c}" for c in CLASSES])  # full 77 tokens
    with torch.no_grad():
        image = F.normalize(tiny.clip.encode_image((images.float() / 255 - mean) / std), dim=-1)
        text = F.normalize(tiny.clip.encode_text(tokens), dim=-1)
        want = tiny.clip.logit_scale.exp() * image @ text.T
        torch.testing.assert_close(tiny(pixels=images), want, rtol=1e-5, atol=1e-5)
        tiny.paper_temperature = True
        try:
            raw = tiny.clip.logit_scale * image @ text.T
            torch.testing.assert_close(tiny(pixels=images), raw, rtol=1e-5, atol=1e-5)
        finally:
            tiny.paper_temperature = False


def test_text_features_once_per_text_weights(tiny, monkeypatch):
    calls = []
    real = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda *a: calls.append(1) or real(*a))
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    tiny._text_cache = None
    with torch.no_grad():
        tiny(pixels=images)
        tiny(pixels=images)
        assert len(calls) == 1  # cached while the text tower is unchanged
        tiny.clip.visual.conv1.weight.add_(0.0)  # an image-tower write: still cached
        tiny(pixels=images)
        assert len(calls) == 1
        tiny.clip.transformer.resblocks[0].mlp.c_fc.weight.add_(0.0)  # a text-tower write (a grid point)
        tiny(pixels=images)
        assert len(calls) == 2
    tiny(pixels=images).sum().backward()  # training: recomputed with gradients every forward
    assert len(calls) == 3 and tiny.clip.token_embedding.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_text_features_recomputed_under_autocast(tiny):
    with torch.no_grad():
        tiny._text_cache = None
        plain = tiny.text_features().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = tiny.text_features()
            assert tiny._text_cache[0][1] is True  # not the fp32 features from the cache
        torch.testing.assert_close(tiny.text_features(), plain, rtol=0, atol=0)  # fp32 again outside it
    assert under_autocast.dtype == torch.bfloat16 and plain.dtype == torch.float32
    torch.testing.assert_close(under_autocast.float(), plain, atol=2e-2, rtol=0)


@pytest.mark.parametrize("method", ["ft", "lora", "randlora"])
def test_shared_prompt_prefix_runs_once_with_open_clips_values_and_gradients(method):
    """The text tower runs the prompts' common prefix once (counted at the first MLP), and its features and their
    gradients (each method's trainable parameters, adapters on attention included) equal open_clip's own
    ``encode_text`` over the full 77-token prompts."""
    import open_clip

    from adapters.methods import MethodSpec, attach

    torch.manual_seed(0)
    model = get_model("clip-tiny").create(CLASSES, {"pretrained": "none"})
    model = attach(model, MethodSpec(method, rank={"lora": 4, "randlora": 2}.get(method), seed=0), clip.TARGETS)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for p in model.parameters():  # LoRA's B starts at zero: move every trainable tensor off its initial value
        if p.requires_grad:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    tokens = inner.prompt_tokens
    full = open_clip.get_tokenizer("clip-tiny")([f"An image of {c}" for c in CLASSES])
    shared = clip.shared_prefix_length(tokens)
    assert shared == 4  # <start> an image of
    trainable = [p for p in model.parameters() if p.requires_grad]
    projection = torch.randn(
        len(CLASSES), inner.clip.text_projection.shape[1], generator=torch.Generator().manual_seed(1)
    )

    def features_and_grads(encode):
        value = encode()
        grads = torch.autograd.grad((value * projection).sum(), trainable, allow_unused=True)
        return value.detach(), grads

    rows = []
    hook = inner.clip.transformer.resblocks[0].mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:2]))
    try:
        got, got_grads = features_and_grads(lambda: clip.encode_text(inner.clip, tokens))
    finally:
        hook.remove()
    n, length = tokens.shape
    assert sum(a * b for a, b in rows) == n * (length - shared) + shared  # each shared token once
    want, want_grads = features_and_grads(lambda: inner.clip.encode_text(full))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any(g is not None and g.abs().sum() > 0 for g in want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:  # to fp32 rounding of the gradient's scale (RandLoRA's λ, γ sum many products: 2e-5 of it seen)
            assert (g - w).abs().max() <= 1e-4 * w.abs().max()


def test_resize_of_small_images_matches_torch_bicubic(tiny):
    big = get_model("ViT-B-32")  # entry only: 224 px input
    assert big.name == "ViT-B-32" and big.targets == clip.TARGETS
    tiny.image_size = 64
    try:
        x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        got = tiny.preprocess(x)
        ref = F.interpolate(x.float() / 255, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
        torch.testing.assert_close(got, (ref - tiny.mean) / tiny.std)
    finally:
        tiny.image_size = 32


def test_augmentation_is_seeded_random_resized_crop():
    augment = clip.make_augment(24)
    x = {"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}
    a = augment(x, torch.Generator().manual_seed(3))["pixels"]
    b = augment(x, torch.Generator().manual_seed(3))["pixels"]
    c = augment(x, torch.Generator().manual_seed(4))["pixels"]
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # scale 0.5–1 of the area, ratio 3/4–4/3 (or the central fallback)
        top, left, h, w = clip._crop_box(32, 32, g)
        assert 0.5 * 1024 * 0.9 <= h * w <= 1024 and top + h <= 32 and left + w <= 32


def test_pretrained_path_and_bad_values(tiny, tmp_path):
    file = tmp_path / "tiny.pt"
    torch.save(tiny.clip.state_dict(), file)
    loaded = get_model("clip-tiny").create(CLASSES, {"pretrained": str(file)})
    for (n, p), q in zip(tiny.clip.state_dict().items(), loaded.clip.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    from adapters.errors import UserError

    with pytest.raises(UserError, match="no such checkpoint file"):
        get_model("clip-tiny").create(CLASSES, {"pretrained": str(tmp_path / "missing.pt")})
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load CLIP clip-tiny weights"):
        get_model("clip-tiny").create(CLASSES, {"pretrained": str(tmp_path / "corrupt.pt")})
    with pytest.raises(UserError, match="lacks '\\{c\\}'"):
        get_model("clip-tiny").create(CLASSES, {"pretrained": "none", "template": "a photo"})


def test_vit_b32_budgets_are_the_papers():
    from adapters.methods import MethodSpec, attach, lora_params, randlora_params, target_shapes, trainable_params

    torch.manual_seed(0)
    base = get_model("clip").create([f"c{i}" for i in range(10)], {"pretrained": "none"})
    shapes = target_shapes(base, clip.TARGETS)
    assert len(shapes) == 72  # 12 blocks × (q/k/v, c_fc, c_proj) × 2 towers
    assert lora_params(shapes, 32) == 6_881_280  # the paper: ~6.9M
    assert randlora_params(shapes, 6) == 5_170_320  # the paper: ~5.2M
    model = attach(base, MethodSpec("randlora", rank=6), clip.TARGETS)
    assert trainable_params(model) == 5_170_320


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_train=200, n_test=50)
    return root


def test_clip_end_to_end_on_cifar100(cifar_root, tmp_path):
    out = tmp_path / "run"
    code = connectivity.main(["--dataset", "cifar100", "--model", "clip-tiny", "--pretrained", "none",
                              "--data-root", str(cifar_root), "--train-steps", "2", "--grid", "3",
                              "--eval-samples", "16", "--batch-size", "16", "--grad-accum", "2",
                              "--path-points", "3", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    for name in ("landscape.npz", "landscape.json", "landscape.html", "landscape.png", "spectrum.json",
                 "spectrum.csv", "paths.json", "rank.png", "similarity.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["preset"] == "paper" and meta["model"] == "clip-tiny"
    assert meta["model_options"] == {"pretrained": "none", "template": "An image of {c}", "paper_temperature": False}
    sols = meta["solutions"]
    assert sols["head_only"]["trainable_params"] == 0  # zero-shot baseline
    assert sols["lora"]["rank"] == 32 and sols["randlora"]["rank"] == 6  # the paper's ranks
    data = np.load(out / "landscape.npz")
    assert np.isfinite(data["loss"]).all()
    key = json.loads((out / "solutions" / "ft" / "solution.json").read_text())["train_key"]["train_config"]
    assert key["weight_decay"] == 0.1 and key["augment"] and key["grad_accum"] == 2 and key["lr"] == 1e-5
    from adapters.solution import load_solution

    alone = load_solution(out / "solutions" / "randlora")  # rebuilds the random-init base from the seed
    assert alone.info["model_options"]["pretrained"] == "none" and alone.delta()
    spec = json.loads((out / "spectrum.json").read_text())
    layers = spec["layers"] if "layers" in spec else spec
    assert any("attn.in_proj_weight" in str(name) for name in layers)  # q/k/v analysed


def test_offline_error_names_data_and_weights(tmp_path, capsys, monkeypatch):
    """In this process (a real process's exit status 2 and single stderr line are checked in test_cli and
    test_config): the one line, and how soon it comes."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    started = time.perf_counter()
    code = connectivity.main(["--dataset", "cifar100", "--data-root", str(empty), "--out", str(tmp_path / "out")])
    assert time.perf_counter() - started < 30
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--data-root" in lines[0] and "CLIP weights ViT-B-32/openai" in lines[0] and "--pretrained" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'six'\n")
    assert connectivity.main(["--dataset", "cifar100", "--config", str(bad)]) == 2
    assert "wrong type" in capsys.readouterr().err
    bad.write_text("[training]\nepochs = 6\n")
    assert connectivity.main(["--dataset", "cifar100", "--config", str(bad)]) == 2
    assert "unknown section [training]" in capsys.readouterr().err


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    from experiments import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--smoke", "--steps", "1", "--points", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["training"]) == {"ft", "lora", "randlora"}
    assert report["training"]["lora"]["trainable_params"] > report["training"]["randlora"]["trainable_params"]
    assert report["grid"]["images_per_s"] > 0 and 0 < report["grid"]["utilization"] < 1


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    import copy

    from adapters.methods import MethodSpec, attach

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = attach(copy.deepcopy(tiny), MethodSpec("randlora", rank=4), clip.TARGETS).train()
        model.get_base_model().set_grad_checkpointing(checkpointing)
        with torch.no_grad():  # non-zero λ so every path carries gradient
            for name, p in model.named_parameters():
                if "randlora_lambda" in name:
                    p.normal_(generator=torch.Generator().manual_seed(1))
        F.cross_entropy(model(pixels=x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_training_leaves_the_batchnorm_statistics_of_a_resnet_tower_alone():
    """ResNet towers (RN50, ...) have BatchNorm: training must not move running statistics that no
    solution saves (they stay at their pretrained values, as in every other model)."""
    import open_clip
    from torch.nn.modules.batchnorm import _BatchNorm

    from adapters.train import TrainConfig, train

    torch.manual_seed(0)
    vision = {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 32}  # ModifiedResNet, as RN50
    text = {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 2, "layers": 1}
    model = open_clip.CLIP(16, vision_cfg=vision, text_cfg=text)
    assert type(model.visual).__name__ == "ModifiedResNet"
    tokens = torch.tensor([[1, 2 + c, 15, 0, 0] for c in range(len(CLASSES))])  # 15: end of text (the argmax)
    classifier = clip.CLIPClassifier(model, tokens, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, 32)
    norms = {n: m for n, m in classifier.named_modules() if isinstance(m, _BatchNorm)}
    assert len(norms) > 10
    stats = {f"{n}.{b}": t.clone() for n, m in norms.items() for b, t in m.named_buffers()}
    weights = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: an idle second OpenMP thread only spins
    try:
        train(classifier, clip.encode(images), torch.arange(8) % len(CLASSES), TrainConfig(steps=2, batch_size=8),
              progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    moved = [n for n, p in classifier.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert any(n.startswith("clip.visual.") for n in moved)  # the image tower did train
    buffers = dict(classifier.named_buffers())
    for name, before in stats.items():
        assert torch.equal(buffers[name], before), f"{name} changed in training"
