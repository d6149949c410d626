"""The CIFAR networks of the distillation benchmarks (CRD/RepDistiller, Tian et al. 2020;
mdistiller, Zhao et al. 2022): wide ResNets, VGGs with BatchNorm, ShuffleNetV1/V2 and
MobileNetV2 at CIFAR resolution, with the layouts those benchmarks train.

They share :func:`conv_bn` (convolution, BatchNorm, optional ReLU) and :func:`init_weights`;
each family is one class configured by its depth, widths or stage table, and the named
variants (``wrn40_2``, ``vgg13``, ...) are options of ``conf/models``. Every network ends in
global average pooling and a linear layer named ``fc`` (so ``auto:penultimate`` is
``fc:input``); the stage outputs are the modules ``stem``, ``stages.N`` and ``head`` (or
``final_norm``) that ``auto:stages`` picks (docs/methods.md has the table).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm (as torchvision and RepDistiller do); linear
    layers keep PyTorch's default initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
    bias: bool = False,
) -> nn.Sequential:
    """Convolution ("same" padding), BatchNorm, then ReLU unless ``relu`` is false."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PooledClassifier(nn.Module):
    """The common frame: ``stem``, ``stages``, ``head``, global average pool, linear ``fc``.
    A model whose stages end without a ReLU may set ``preactivation_layers``
    (:func:`kdcl.distill.features.preactivation_layers`)."""

    preactivation_layers: dict[str, str]

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups (Zhang et al. 2018, Sec. 3.1)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# --- wide ResNets (Zagoruyko & Komodakis 2016) -------------------------------------


class PreActBlock(nn.Module):
    """WRN basic block, pre-activation: BN-ReLU-conv3x3 twice; a 1x1 convolution on the
    activated input when the shape changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(activated)))))
        return out + (x if self.projection is None else self.projection(activated))


def wide_resnet(depth: int, widen_factor: int, num_classes: int, in_channels: int, dropout: float = 0.0) -> nn.Module:
    """WRN-depth-k: a 3x3 stem of 16 channels, three stages of (depth − 4)/6 pre-activation
    blocks at 16k, 32k, 64k channels (strides 1, 2, 2), BN-ReLU (``head``), pool, fc."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"WRN depth must be 6n+4 with n ≥ 1, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    stages, channels = [], 16
    for i, width in enumerate(widths):
        blocks = []
        for j in range(blocks_per_stage):
            blocks.append(PreActBlock(channels, width, 2 if i > 0 and j == 0 else 1, dropout))
            channels = width
        stages.append(nn.Sequential(*blocks))
    stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
    head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    model = PooledClassifier(stem, stages, head, channels, num_classes)
    # A stage ends in a sum, not a ReLU: its pre-activation value (kdcl/distill/features.py)
    # is the input of the BN-ReLU it enters next, the first block's ``relu1`` of the next
    # stage or the head's ReLU (mdistiller's WRN ``preact_feats``).
    after = [f"stages.{i + 1}.0.relu1:input" for i in range(len(widths) - 1)] + ["head.1:input"]
    model.preactivation_layers = {
        **{f"stages.{i}": ref for i, ref in enumerate(after)},
        "stages": "head.1:input",
        "head": "head.1:input",
    }
    return model


# --- VGG with BatchNorm, CIFAR layout (Simonyan & Zisserman 2015; RepDistiller) -----

# Convolutions per stage (widths 64, 128, 256, 512, 512) for each depth: depth counts the
# convolutions plus three fully connected layers of the ImageNet VGG; the CIFAR version
# keeps one linear layer.
VGG_STAGE_CONVS: dict[int, tuple[int, ...]] = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)


def vgg_bn(depth: int, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Five stages of conv3x3 (with bias)-BN-ReLU at 64, 128, 256, 512, 512 channels; a 2x2
    max-pool after each of the first three stages, and after the fourth only for inputs of
    64 px or more (so the last two stages of a 32 px image both run at 4x4), then global
    average pool and one linear layer."""
    if depth not in VGG_STAGE_CONVS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_STAGE_CONVS)}, got {depth}")
    stages: list[nn.Module] = []
    channels = in_channels
    for i, (convs, width) in enumerate(zip(VGG_STAGE_CONVS[depth], VGG_WIDTHS, strict=True)):
        pooled = 0 < i < 4 or (i == 4 and image_size >= 64)
        layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if pooled else []
        for _ in range(convs):
            layers.append(conv_bn(channels, width, bias=True))
            channels = width
        stages.append(nn.Sequential(*layers))
    return PooledClassifier(stages[0], stages[1:], nn.Identity(), channels, num_classes)


# --- MobileNetV2 at CIFAR resolution (Sandler et al. 2018; RepDistiller) --------------


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (with the stride), linear 1x1 projection; a residual when
    the shape is kept. The expansion convolution is there even at ratio 1 (as RepDistiller)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.layers = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


# (expansion, channels, blocks, stride) per stage; "T" stands for the expansion argument.
# The second stage runs at stride 1 (ImageNet: 2) for 32 px images.
MOBILENET_V2_STAGES: tuple[tuple[int | str, int, int, int], ...] = (
    (1, 16, 1, 1),
    ("T", 24, 2, 1),
    ("T", 32, 3, 2),
    ("T", 64, 4, 2),
    ("T", 96, 3, 1),
    ("T", 160, 3, 2),
    ("T", 320, 1, 1),
)


def mobilenet_v2_cifar(width_mult: float, expansion: int, num_classes: int, in_channels: int) -> nn.Module:
    """A stride-2 3x3 stem of 32·w channels, the seven inverted-residual stages of
    :data:`MOBILENET_V2_STAGES` at w times their widths, a 1x1 convolution to 1280 channels
    (``head``; more when w > 1), pool, fc. RepDistiller's ``mobile_half`` is w = 0.5, T = 6."""
    channels = int(32 * width_mult)
    stem = conv_bn(in_channels, channels, 3, 2)
    stages: list[nn.Module] = []
    for ratio, width, blocks, stride in MOBILENET_V2_STAGES:
        out_channels = int(width * width_mult)
        layers = []
        for j in range(blocks):
            layers.append(
                InvertedResidual(channels, out_channels, stride if j == 0 else 1, 1 if ratio == 1 else expansion)
            )
            channels = out_channels
        stages.append(nn.Sequential(*layers))
    last = 1280 if width_mult <= 1.0 else int(1280 * width_mult)
    return PooledClassifier(stem, stages, conv_bn(channels, last, 1), last, num_classes)


# --- ShuffleNetV1 (Zhang et al. 2018), CIFAR version of RepDistiller ----------------


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 (groups g, except on the 24-channel stem output), channel shuffle,
    depthwise 3x3 (with the stride), grouped 1x1; a residual sum, or at stride 2 a
    concatenation with the 3x3 average-pooled input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        mid = out_channels // 4
        first_groups = 1 if in_channels == 24 else groups
        self.reduce = conv_bn(in_channels, mid, 1, groups=first_groups)
        self.shuffle = ChannelShuffle(first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, out_channels, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.depthwise(self.shuffle(self.reduce(x))))
        if self.shortcut is None:
            return self.relu(out + x)
        return self.relu(torch.cat([out, self.shortcut(x)], 1))


def shufflenet_v1(
    widths: Sequence[int], blocks: Sequence[int], groups: int, num_classes: int, in_channels: int
) -> nn.Module:
    """A 1x1 stem of 24 channels, then per stage a stride-2 unit (its output concatenated
    with the pooled input to make the stage width) and stride-1 units; pool, fc."""
    stages: list[nn.Module] = []
    channels = 24
    for width, count in zip(widths, blocks, strict=True):
        units = [ShuffleUnitV1(channels, width - channels, 2, groups)]
        units += [ShuffleUnitV1(width, width, 1, groups) for _ in range(count - 1)]
        stages.append(nn.Sequential(*units))
        channels = width
    return PooledClassifier(conv_bn(in_channels, 24, 1), stages, nn.Identity(), channels, num_classes)


# --- ShuffleNetV2 (Ma et al. 2018), CIFAR version of RepDistiller ------------------


class ShuffleUnitV2(nn.Module):
    """Stride 1: half the channels pass, the other half go through 1x1, depthwise 3x3 (no
    ReLU), 1x1; concatenated and shuffled. Stride 2 (``out_channels`` given): both halves
    are computed from the whole input, each at half the output width, downsampled."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        self.down = out_channels is not None
        self.left: nn.Sequential | None
        if out_channels is not None:
            half = out_channels // 2
            self.left = nn.Sequential(
                conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False),
                conv_bn(in_channels, half, 1),
            )
            branch_in = in_channels
        else:
            half = branch_in = in_channels // 2
            self.left = None
        self.right = nn.Sequential(
            conv_bn(branch_in, half, 1),
            conv_bn(half, half, 3, 2 if self.down else 1, groups=half, relu=False),
            conv_bn(half, half, 1),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left is not None:
            return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))
        passed, processed = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([passed, self.right(processed)], 1))


# Stage widths and final 1x1 width per net size (Ma et al. 2018, Table 5).
SHUFFLENET_V2_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


def shufflenet_v2(net_size: float, blocks: Sequence[int], num_classes: int, in_channels: int) -> nn.Module:
    """A 1x1 stride-1 stem of 24 channels (RepDistiller's code), three stages of one stride-2 unit and ``blocks``
    stride-1 units, a 1x1 convolution (``head``), pool, fc."""
    if net_size not in SHUFFLENET_V2_WIDTHS:
        raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(SHUFFLENET_V2_WIDTHS)}, got {net_size}")
    *widths, last = SHUFFLENET_V2_WIDTHS[net_size]
    stages: list[nn.Module] = []
    channels = 24
    for width, count in zip(widths, blocks, strict=True):
        stages.append(nn.Sequential(ShuffleUnitV2(channels, width), *(ShuffleUnitV2(width) for _ in range(count))))
        channels = width
    return PooledClassifier(conv_bn(in_channels, 24, 1), stages, conv_bn(channels, last, 1), last, num_classes)
