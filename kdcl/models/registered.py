"""kdcl's own models, looked up by name in :data:`MODELS` (``mlp``, ``cnn``, ``vgg``, the CIFAR
ResNets, and torchvision's ResNets and MobileNets adapted to small images).

Every factory is called as ``fn(num_classes=..., input_shape=(C, H, W), pretrained=...,
**kwargs)`` and returns an ``nn.Module`` mapping ``(B, C, H, W)`` images to
``(B, num_classes)`` logits. Build them through :func:`kdcl.models.build_model` (or
:func:`create_registered`), which turns bad names and keywords into :class:`KdclError`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdcl.errors import KdclError
from kdcl.models.torchvision_nets import CifarStem, InputShape, registered_network
from kdcl.registry import Registry

# inputs: what the model reads, images (B, C, H, W) or tokens (B, L) (kdcl.models.text_nets).
MODELS = Registry("model", traits={"inputs": "images"})
register_model = MODELS.register


def models_of(inputs: str) -> list[str]:
    """The registered models that read ``inputs`` (images or tokens)."""
    return [name for name in MODELS.names() if MODELS.trait(name, "inputs") == inputs]


def create_registered(
    name: str, num_classes: int, input_shape: InputShape, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name``; a model of other inputs than the data's (images
    for text, or the reverse), or a keyword its factory does not take, is one
    :class:`KdclError`."""
    factory = MODELS.get(name)
    inputs = "tokens" if len(input_shape) == 1 else "images"
    if MODELS.trait(name, "inputs") != inputs:
        raise KdclError(
            f"model {name!r} reads {MODELS.trait(name, 'inputs')}, but the data gives {inputs}",
            fix=f"choose a model of {inputs}: {', '.join(models_of(inputs))}",
        )
    arguments = {"num_classes": num_classes, "input_shape": input_shape, "pretrained": pretrained}
    signature = inspect.signature(factory)
    try:
        signature.bind(**arguments, **kwargs)
    except TypeError as e:
        accepted = [p for p in signature.parameters if p not in arguments]
        raise KdclError(
            f"model {name!r}: {e}",
            fix=f"{name!r} accepts the kwargs: {', '.join(accepted) or '(none)'}",
        ) from None
    return factory(**arguments, **kwargs)


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise KdclError(
            f"no pretrained weights exist for model {name!r}",
            fix="set teacher.pretrained=false / student.pretrained=false",
        )


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm (as torchvision and RepDistiller do)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- small models ----------------------------------------------------------------


@register_model("mlp")
def mlp(
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    hidden: Sequence[int] = (100, 100),
    dropout: float = 0.0,
) -> nn.Module:
    """Multi-layer perceptron on the flattened image: [Linear-ReLU(-Dropout)] per hidden width."""
    _no_pretrained("mlp", pretrained)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@register_model("cnn")
def cnn(num_classes: int, input_shape: InputShape, pretrained: bool = False, width: int = 32) -> nn.Module:
    """Small CNN: three conv3x3-BN-ReLU blocks (w, 2w, 4w), max-pools, global average pool."""
    _no_pretrained("cnn", pretrained)
    model = nn.Sequential(
        *_conv_bn_relu(input_shape[0], width),
        nn.MaxPool2d(2, ceil_mode=True),
        *_conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2, ceil_mode=True),
        *_conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
    _init_weights(model)
    return model


@register_model("vgg")
def vgg(
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    width: int = 32,
    stage_convs: Sequence[int] = (2, 1, 1),
) -> nn.Module:
    """VGG-style CNN (Simonyan & Zisserman 2015) sized for a CPU: three stages of
    conv3x3-BN-ReLU at widths w, 2w, 4w (``stage_convs`` convolutions each, by default two
    at full resolution, then one, then one), a max-pool between stages, global average
    pool, linear.

    Parameters at C input channels and K classes, with (a, b, c) = ``stage_convs``:
    9·(C·w + (a−1)·w² + 2w² + (b−1)·4w² + 8w² + (c−1)·16w²) conv weights, 2 BatchNorm
    parameters per channel, 4w·K + K in the linear layer.

    Against ``cnn`` the default adds one full-resolution convolution (w·w·9 more weights):
    at w=32, 104K parameters and about 20M multiply-adds on a 3×32×32 input, against 95K
    and 10M; pooling right after the first convolution costs ``cnn`` accuracy for its size."""
    _no_pretrained("vgg", pretrained)
    if len(stage_convs) != 3 or min(stage_convs) < 1:
        raise KdclError(
            f"vgg: stage_convs={list(stage_convs)} must be three counts ≥ 1",
            fix="e.g. student.kwargs.stage_convs=[2,1,1] (convolutions at widths w, 2w, 4w)",
        )
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for stage, convs in enumerate(stage_convs):
        if stage:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        for _ in range(convs):
            layers += _conv_bn_relu(channels, width * 2**stage)
            channels = width * 2**stage
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    _init_weights(model)
    return model


# --- CIFAR ResNets (He et al. 2016, Sec. 4.2; widths as in RepDistiller/CRD) --------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2: a 3x3 stem, three stages of n BasicBlocks, global pool, fc."""

    def __init__(
        self,
        depth: int,
        stem_width: int,
        widths: tuple[int, int, int],
        num_classes: int,
        in_channels: int,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = stem_width
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _cifar_resnet(
    name: str,
    depth: int,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool,
    wide: bool = False,
) -> nn.Module:
    """Widths 16-32-64 (stem 16), or with ``wide`` 64-128-256 (stem 32) as RepDistiller's x4."""
    _no_pretrained(name, pretrained)
    stem_width, widths = (32, (64, 128, 256)) if wide else (16, (16, 32, 64))
    return CifarResNet(depth, stem_width, widths, num_classes, input_shape[0])


@register_model("resnet8")
def resnet8(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
    """CIFAR ResNet-8 (He et al. 2016), widths 16-32-64."""
    return _cifar_resnet("resnet8", 8, num_classes, input_shape, pretrained)


@register_model("resnet20")
def resnet20(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016), widths 16-32-64."""
    return _cifar_resnet("resnet20", 20, num_classes, input_shape, pretrained)


@register_model("resnet56")
def resnet56(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
    """CIFAR ResNet-56 (He et al. 2016), widths 16-32-64."""
    return _cifar_resnet("resnet56", 56, num_classes, input_shape, pretrained)


@register_model("resnet8x4")
def resnet8x4(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
    """CIFAR ResNet-8 with 4x widths 64-128-256 (Tian et al. 2020, CRD/RepDistiller)."""
    return _cifar_resnet("resnet8x4", 8, num_classes, input_shape, pretrained, wide=True)


@register_model("resnet32x4")
def resnet32x4(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
    """CIFAR ResNet-32 with 4x widths 64-128-256 (Tian et al. 2020, CRD/RepDistiller)."""
    return _cifar_resnet("resnet32x4", 32, num_classes, input_shape, pretrained, wide=True)


# --- torchvision ImageNet models, adapted to the input and number of classes ------


def _register_torchvision(name: str, doc: str) -> None:
    def factory(
        num_classes: int,
        input_shape: InputShape,
        pretrained: bool = False,
        cifar_stem: CifarStem = "auto",
    ) -> nn.Module:
        return registered_network(name, num_classes, input_shape, pretrained, cifar_stem)

    factory.__doc__ = doc
    register_model(name)(factory)


for _name, _doc in (
    ("resnet18", "torchvision ResNet-18 (He et al. 2016), CIFAR stem for small inputs."),
    ("resnet34", "torchvision ResNet-34 (He et al. 2016), CIFAR stem for small inputs."),
    ("resnet50", "torchvision ResNet-50 with bottleneck blocks (He et al. 2016), CIFAR stem for small inputs."),
    ("mobilenet_v2", "torchvision MobileNetV2 (Sandler et al. 2018), stride-1 stem for small inputs."),
    ("mobilenet_v3_small", "torchvision MobileNetV3-Small (Howard et al. 2019), stride-1 stem for small inputs."),
):
    _register_torchvision(_name, _doc)
