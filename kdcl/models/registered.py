"""kdcl's own models, looked up by name in :data:`MODELS` (``mlp``, ``cnn``, ``vgg``, the CIFAR
ResNets, the other networks of the CIFAR-100 distillation benchmark (``wrn``, ``vgg_cifar``,
``shufflenet_v1``, ``shufflenet_v2``, ``mobilenet_v2_cifar``: :mod:`kdcl.models.cifar_nets`),
MobileNet-V1, the ImageNet benchmark's student (:mod:`kdcl.models.imagenet_nets`), and
torchvision's ResNets and MobileNets adapted to small images).

Every factory is called as ``fn(num_classes=..., input_shape=(C, H, W), pretrained=...,
**kwargs)`` and returns an ``nn.Module`` mapping ``(B, C, H, W)`` images to
``(B, num_classes)`` logits. Build them through :func:`kdcl.models.build_model` (or
:func:`create_registered`), which turns bad names and keywords into :class:`KdclError`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdcl.errors import KdclError
from kdcl.models import cifar_nets, imagenet_nets
from kdcl.models.cifar_nets import init_weights as _init_weights
from kdcl.models.torchvision_nets import CifarStem, InputShape, registered_network
from kdcl.registry import Registry

# inputs: what the model reads, images (B, C, H, W) or tokens (B, L) (kdcl.models.text_nets).
# revision: raised when a model's architecture changes under its name, so that the stage cache
# (kdcl.scenarios.stage_cache) no longer reuses what the old one trained.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model", traits={"inputs": "images", "revision": 0})
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


def _register_cifar_resnet(name: str, depth: int, wide: bool, doc: str) -> None:
    def factory(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
        return _cifar_resnet(name, depth, num_classes, input_shape, pretrained, wide=wide)

    factory.__doc__ = doc
    register_model(name)(factory)


for _name, _depth, _wide, _doc in (
    ("resnet8", 8, False, "CIFAR ResNet-8 (He et al. 2016), widths 16-32-64."),
    ("resnet20", 20, False, "CIFAR ResNet-20 (He et al. 2016), widths 16-32-64."),
    ("resnet32", 32, False, "CIFAR ResNet-32 (He et al. 2016), widths 16-32-64."),
    ("resnet56", 56, False, "CIFAR ResNet-56 (He et al. 2016), widths 16-32-64."),
    ("resnet110", 110, False, "CIFAR ResNet-110 (He et al. 2016), widths 16-32-64."),
    ("resnet8x4", 8, True, "CIFAR ResNet-8 with 4x widths 64-128-256 (Tian et al. 2020, CRD/RepDistiller)."),
    ("resnet32x4", 32, True, "CIFAR ResNet-32 with 4x widths 64-128-256 (Tian et al. 2020, CRD/RepDistiller)."),
):
    _register_cifar_resnet(_name, _depth, _wide, _doc)


# --- the other CIFAR networks of the distillation benchmarks (kdcl.models.cifar_nets) ----


@register_model("wrn")
def wrn(
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    depth: int = 40,
    widen_factor: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016), pre-activation blocks at widths
    16k-32k-64k; the CRD/RepDistiller teachers and students are WRN-40-2, WRN-16-2, WRN-40-1."""
    _no_pretrained("wrn", pretrained)
    _check_choice("wrn", "depth", depth, [d for d in range(10, 101) if (d - 4) % 6 == 0])
    return cifar_nets.wide_resnet(depth, widen_factor, num_classes, input_shape[0], dropout)


@register_model("vgg_cifar")
def vgg_cifar(num_classes: int, input_shape: InputShape, pretrained: bool = False, depth: int = 13) -> nn.Module:
    """VGG-depth with BatchNorm (Simonyan & Zisserman 2015) in the CIFAR layout of
    CRD/RepDistiller (Tian et al. 2020): five conv stages of 64-512 channels, one linear layer."""
    _no_pretrained("vgg_cifar", pretrained)
    _check_choice("vgg_cifar", "depth", depth, sorted(cifar_nets.VGG_STAGE_CONVS))
    return cifar_nets.vgg_bn(depth, num_classes, input_shape[0], min(input_shape[1:]))


@register_model("mobilenet_v2_cifar")
def mobilenet_v2_cifar(
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    width_mult: float = 0.5,
    expansion: int = 6,
) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018) for 32 px images as in CRD/RepDistiller (Tian et al.
    2020): stride-1 second stage, ``width_mult`` = 0.5 and expansion 6 are their ``mobile_half``."""
    _no_pretrained("mobilenet_v2_cifar", pretrained)
    return cifar_nets.mobilenet_v2_cifar(width_mult, expansion, num_classes, input_shape[0])


@register_model("shufflenet_v1")
def shufflenet_v1(
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    widths: Sequence[int] = (240, 480, 960),
    blocks: Sequence[int] = (4, 8, 4),
    groups: int = 3,
) -> nn.Module:
    """ShuffleNetV1 (Zhang et al. 2018) for 32 px images as in CRD/RepDistiller (Tian et al.
    2020): a 1x1 stem, no max-pool; by default g = 3 at widths 240-480-960 (the paper's 1x)."""
    _no_pretrained("shufflenet_v1", pretrained)
    return cifar_nets.shufflenet_v1(widths, blocks, groups, num_classes, input_shape[0])


@register_model("shufflenet_v2", revision=1)  # 1: the 1x1 stem of RepDistiller's code (was 3x3)
def shufflenet_v2(
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    net_size: float = 1.0,
    blocks: Sequence[int] = (3, 7, 3),
) -> nn.Module:
    """ShuffleNetV2 (Ma et al. 2018) for 32 px images as in CRD/RepDistiller (Tian et al.
    2020) and mdistiller: a 1x1 stride-1 stem (their 3x3 one is commented out), no max-pool;
    ``net_size`` 1.0 is the paper's 1x."""
    _no_pretrained("shufflenet_v2", pretrained)
    _check_choice("shufflenet_v2", "net_size", net_size, sorted(cifar_nets.SHUFFLENET_V2_WIDTHS))
    return cifar_nets.shufflenet_v2(net_size, blocks, num_classes, input_shape[0])


# --- ImageNet networks that torchvision does not ship (kdcl.models.imagenet_nets) -----


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes: int, input_shape: InputShape, pretrained: bool = False) -> nn.Module:
    """MobileNet-V1 (Howard et al. 2017), the ImageNet student of CRD and DKD/mdistiller
    (Tian et al. 2020; Zhao et al. 2022): 13 depthwise-separable blocks after a stride-2 stem,
    4.2M parameters at 1000 classes. The ImageNet layout at every image size (no CIFAR stem)."""
    _no_pretrained("mobilenet_v1", pretrained)
    return imagenet_nets.mobilenet_v1(num_classes, input_shape[0])


def _check_choice(model: str, key: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise KdclError(
            f"model {model!r}: {key}={value!r} is not one of {list(choices)}",
            fix=f"set kwargs.{key} to one of {list(choices)}",
        )


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
