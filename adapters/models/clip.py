"""open_clip CLIP as a zero-shot classifier with both encoders trainable (the RandLoRA paper's setup).

- ``--model ViT-B-32`` (any open_clip architecture; ``clip`` = ViT-B-32) with ``--pretrained``
  ``openai`` (or another open_clip tag), ``none`` (random init, seeded) or a local checkpoint
  file (read by open_clip with ``weights_only=True``).
- Head: the L2-normalised text features of one prompt per class (default template
  ``"An image of {c}"``). logits = τ · norm(image features) · norm(text features)ᵀ with
  τ = exp(logit_scale) (CLIP's own temperature, 100 for the openai weights). ``paper_temperature``
  uses the raw ``logit_scale`` (≈ 4.6 for openai) as the paper's code does. ``logit_scale`` is
  frozen in every method, so the plane is over the encoders' weights alone.
- Text features are computed once per set of weights: with gradients on (training) at every
  forward; otherwise cached and recomputed only when a text-tower parameter changes (its
  version counter moves), e.g. once per grid point when the text tower is on the plane, once in
  total when it is not. Prompts are trimmed to their longest tokenised length: CLIP's text
  attention is causal and pools the end-of-text token, so the trimmed padding never mattered; the
  prefix all prompts share (start token and template words) runs once (tested against open_clip's
  ``encode_text``).
- Images are stored as uint8 ``(N, 3, S, S)`` as loaded (CIFAR-100 32 px, Food101/UCF101 224 px
  after CLIP's eval transform); the forward resizes to the model's input size on the device
  (bicubic) and normalises with CLIP's mean/std. Training augmentation: RandomResizedCrop(224,
  scale 0.5–1) + horizontal flip, batched on the device from a per-step seeded generator.
- Adapter targets: ``attn`` (q/k/v ``in_proj_weight``), ``c_fc``, ``c_proj`` in both towers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import UserError, first_line
from adapters.models.base import Encoded, ModelEntry, freeze_norm_statistics

DEFAULT_ARCH = "ViT-B-32"
TEMPLATE = "An image of {c}"
TARGETS = ("attn", "c_fc", "c_proj")
CONFIG_DIR = Path(__file__).with_name("clip_configs")  # reduced architectures for tests (clip-tiny)
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
HUB_HOST = "huggingface.co"


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - a dependency
        raise UserError("open_clip is not installed: run 'pip install open_clip_torch'") from e
    if CONFIG_DIR not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def architectures() -> list[str]:
    return sorted(_open_clip().list_models())


# --------------------------------------------------------------------------- weights


def _cached_weights(cfg: dict) -> str | None:
    """A local copy of the pretrained weights open_clip would download (HF cache or its URL cache)."""
    if cfg.get("file"):
        return cfg["file"] if Path(cfg["file"]).is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # 'org/name/' (default file names) or 'org/name/file'
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and Path(found).is_file():
                return found
    url = cfg.get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def _offline() -> bool:
    from adapters.network import hub_offline

    return hub_offline(HUB_HOST)


def resolve_pretrained(arch: str, pretrained: str | None) -> tuple[str | None, dict]:
    """(what to pass to open_clip as ``pretrained``, the tag's config) — fails fast when unavailable."""
    if pretrained is None or str(pretrained).lower() in ("none", "random"):
        return None, {}
    open_clip = _open_clip()
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained in tags:
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        local = _cached_weights(cfg)
        if local is not None:
            return local, cfg
        if _offline():
            raise UserError(
                f"the CLIP weights {arch}/{pretrained} are not in the local cache and {HUB_HOST} is unreachable: "
                "pass --pretrained PATH (an open_clip checkpoint file) or --pretrained none (random init)"
            )
        return pretrained, cfg
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    known = f"; open_clip tags for {arch}: {', '.join(tags)}" if tags else ""
    raise UserError(
        f"--pretrained {pretrained}: no such checkpoint file and not a pretrained tag of {arch}{known} "
        "(or pass --pretrained none)"
    )


# --------------------------------------------------------------------------- the classifier


def encode_text(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on prompts trimmed to ``tokens.shape[1]`` (causal: same result), with the
    prefix every prompt shares (the start token and the template's words before the class name) run once.

    Why: CLIP's text attention is causal, so the hidden states of a prefix common to all prompts are the same in
    every prompt; :func:`_shared_prefix_transformer` computes them once and continues each prompt from them (its
    keys and values at each layer). For "An image of {c}" that is 4 of CIFAR-100's 8 prompt tokens; a grid point
    over few samples spends a third of its time on the 100 class prompts: one of the CIFAR smoke's (16 images) ran
    1.09x faster (``python -m experiments.benchmarks.clip_text_prefix``). Towers it does not apply to
    (custom blocks, no causal mask, gradient checkpointing, sequence-first) run whole.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    if not isinstance(clip, CLIP):  # custom text towers (HF, SigLIP): their own full-length encoder
        return clip.encode_text(tokens)
    length = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    shared = shared_prefix_length(tokens) if _prefix_sharable(clip) else 0
    x = _shared_prefix_transformer(clip.transformer, x, mask, shared) if shared else clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return x


def shared_prefix_length(tokens: torch.Tensor) -> int:
    """Tokens at the start of every prompt that all prompts share, leaving each at least one of its own."""
    same = (tokens == tokens[:1]).all(dim=0).long()
    return min(int(same.cumprod(0).sum()), tokens.shape[1] - 1)


def _prefix_sharable(clip: nn.Module) -> bool:
    """Whether the text transformer is open_clip's plain causal stack of ``ResidualAttentionBlock`` (batch first),
    the one :func:`_shared_prefix_transformer` reproduces."""
    from open_clip.transformer import ResidualAttentionBlock

    transformer = clip.transformer
    return (
        clip.attn_mask is not None
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in transformer.resblocks)
    )


def _shared_prefix_transformer(transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor, shared: int):
    """``transformer(x, attn_mask=mask)`` for a causal ``mask`` when the first ``shared`` positions of ``x`` are the
    same in every row: those positions run once (row 0), the rest attend to them as keys and values.

    Each block is open_clip's ``ResidualAttentionBlock.forward`` with the prefix's layer input prepended to the keys
    and values; the prefix then advances through the same block on its own (causal: it never sees the rest).
    """
    prefix, rest = x[:1, :shared], x[:, shared:]
    to_rest, to_prefix = mask[shared:], mask[:shared, :shared]
    for block in transformer.resblocks:
        prefix_in = block.ln_1(prefix)
        keys = torch.cat([prefix_in.expand(rest.shape[0], -1, -1), block.ln_1(rest)], dim=1)
        rest = rest + block.ls_1(block.attention(q_x=keys[:, shared:], k_x=keys, v_x=keys, attn_mask=to_rest))
        rest = rest + block.ls_2(block.mlp(block.ln_2(rest)))
        prefix = block(prefix, attn_mask=to_prefix)
    return torch.cat([prefix.expand(rest.shape[0], -1, -1), rest], dim=1)


class CLIPClassifier(nn.Module):
    """τ · norm(image features) · norm(class-prompt text features)ᵀ; no separate head."""

    # The landscape engine evaluates one grid point per forward ("auto"): text features are
    # cached per set of weights, which a vmapped forward over several points cannot share.
    batch_grid_points = False

    def __init__(
        self, clip: nn.Module, tokens: torch.Tensor, mean, std, image_size: int, paper_temperature: bool = False
    ):
        super().__init__()
        self.clip = clip
        self.clip.logit_scale.requires_grad_(False)
        self.num_classes = tokens.shape[0]
        self.image_size = image_size
        self.paper_temperature = paper_temperature
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._text_cache: tuple | None = None

    def _text_params(self) -> list[torch.Tensor]:
        return [p for n, p in self.clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]

    def text_features(self) -> torch.Tensor:
        """Normalised class-prompt features (C, D); recomputed only when the text tower changed."""
        params = self._text_params()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._text_cache = None
            return F.normalize(encode_text(self.clip, self.prompt_tokens), dim=-1)
        key = tuple((p.data_ptr(), p._version) for p in params)
        autocast = torch.is_autocast_enabled(self.prompt_tokens.device.type)
        if self._text_cache is None or self._text_cache[0] != (key, autocast):
            with torch.no_grad():
                feats = F.normalize(encode_text(self.clip, self.prompt_tokens), dim=-1)
            self._text_cache = ((key, autocast), feats)
        return self._text_cache[1]

    def temperature(self) -> torch.Tensor:
        scale = self.clip.logit_scale
        return scale if self.paper_temperature else scale.exp()

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> the model's normalised input at ``image_size``."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.image_size).clamp(0, 1)  # fmt: skip
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(self.preprocess(pixels)), dim=-1)
        text = self.text_features()
        return self.temperature() * image @ text.to(image.dtype).t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> CLIPClassifier:
        self._text_cache = None
        super().train(mode)
        freeze_norm_statistics(self)  # ResNet towers (RN50, ...): statistics are not trained, as in Classifier
        return self


def build(
    num_classes: int,
    classes: Sequence[str] | None = None,
    arch: str = DEFAULT_ARCH,
    pretrained: str | None = "openai",
    template: str = TEMPLATE,
    paper_temperature: bool = False,
) -> CLIPClassifier:
    open_clip = _open_clip()
    if arch not in open_clip.list_models():
        raise UserError(f"unknown CLIP architecture '{arch}': choose an open_clip model, e.g. {DEFAULT_ARCH}")
    classes = list(classes) if classes is not None else [f"class {i}" for i in range(num_classes)]
    if len(classes) != num_classes:
        raise UserError(f"{len(classes)} class names for {num_classes} classes: pass the dataset's class names")
    if "{c}" not in template:
        raise UserError(f"--prompt-template '{template}' lacks '{{c}}' (the class name): e.g. '{TEMPLATE}'")
    source, cfg = resolve_pretrained(arch, pretrained)
    kwargs = {"force_quick_gelu": True} if cfg.get("quick_gelu") else {}
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # open_clip logs "random init" notes on the root logger
    try:
        clip = open_clip.create_model(arch, pretrained=source, **kwargs)
    except Exception as e:  # noqa: BLE001 - a user file (corrupt, pickled code refused, other model): one line
        raise UserError(
            f"cannot load CLIP {arch} weights from {source} ({first_line(e)}): pass a matching open_clip checkpoint"
        ) from None
    finally:
        root.setLevel(level)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    tokens = tokenizer([template.format(c=c) for c in classes])
    length = int((tokens != 0).sum(1).max())  # open_clip pads with 0; keep through the longest prompt
    tokens = tokens[:, : max(length, 2)].contiguous()
    visual = clip.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = cfg.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return CLIPClassifier(clip, tokens, tuple(mean), tuple(std), int(size), paper_temperature)


def encode(images: torch.Tensor) -> Encoded:
    """uint8 images as loaded, three channels; resized on the device by the model's forward."""
    x = images if images.dim() == 4 else images.unsqueeze(1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return Encoded({"pixels": x.contiguous()})


# --------------------------------------------------------------------------- augmentation


def _crop_box(height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (scale 0.5–1, ratio 3/4–4/3), from generator ``g``."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * torch.rand(1, generator=g).item())
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def make_augment(image_size: int = 224):
    """RandomResizedCrop(image_size, scale 0.5–1) + horizontal flip (p = 0.5), per sample, on the device."""

    def augment(inputs: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        pixels = inputs["pixels"]
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        out = torch.empty(x.shape[0], x.shape[1], image_size, image_size, dtype=x.dtype, device=x.device)
        for k in range(x.shape[0]):
            top, left, h, w = _crop_box(x.shape[-2], x.shape[-1], g)
            crop = x[k : k + 1, :, top : top + h, left : left + w]
            big = h > image_size or w > image_size
            out[k] = F.interpolate(crop, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                   antialias=big)[0].clamp(0, 1)  # fmt: skip
            if torch.rand(1, generator=g).item() < 0.5:
                out[k] = out[k].flip(-1)
        return {**inputs, "pixels": out}

    return augment


def entry(arch: str = DEFAULT_ARCH) -> ModelEntry:
    """The registry entry of one open_clip architecture."""
    image_size = 224
    try:
        vision = _open_clip().get_model_config(arch)["vision_cfg"]
        image_size = vision.get("image_size", 224)
        image_size = image_size if isinstance(image_size, int) else image_size[0]
    except (KeyError, TypeError):
        pass
    return ModelEntry(
        name=arch,
        modality="image",
        description=f"open_clip {arch}, zero-shot head from class prompts, both encoders adapted",
        build=lambda num_classes, **options: build(num_classes, arch=arch, **options),
        encode=encode,
        targets=TARGETS,
        defaults={
            "lr": {"ft": 1e-5, "lora": 1e-3, "randlora": 1e-3, "head_only": 0.0},
            "randlora_rank": 6,
            "lora_rank": 32,
            "weight_decay": 0.1,
            "pretrained": "openai",
        },
        augment=make_augment(image_size),
        options=("pretrained", "template", "paper_temperature"),
    )
