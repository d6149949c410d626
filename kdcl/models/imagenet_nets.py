"""The ImageNet networks of the distillation benchmarks that torchvision does not ship:
MobileNet-V1 (Howard et al. 2017), the student of the ResNet-50 → MobileNet-V1 pair of
CRD (Tian et al. 2020) and DKD/mdistiller (Zhao et al. 2022).

Built from :func:`kdcl.models.cifar_nets.conv_bn` in the common frame
:class:`~kdcl.models.cifar_nets.PooledClassifier` (``stem``, ``stages.N``, ``head``, global
average pool, linear ``fc``), so the feature methods find its stage outputs as they find
those of the CIFAR networks.
"""

from __future__ import annotations

from torch import nn

from kdcl.models.cifar_nets import PooledClassifier, conv_bn

# Howard et al. 2017, Table 1: the depthwise-separable blocks as (output channels, stride),
# grouped into stages that end where the resolution next halves, so each stage's output is
# one of the feature maps (128, 256, 512, 1024 channels at 1/4 … 1/32 of the input) that
# the CRD and DKD code distil from. The paper's table lists the last block at stride 2 on a
# 7×7 map; like every implementation (and its 7×7 average pool), it runs at stride 1.
MOBILENET_V1_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1), (128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2), *((512, 1),) * 5),
    ((1024, 2), (1024, 1)),
)
MOBILENET_V1_STEM = 32  # channels of the stride-2 3x3 convolution before the blocks


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A 3x3 depthwise convolution (with the stride), BN, ReLU, then a 1x1 pointwise
    convolution, BN, ReLU (Howard et al. 2017, Fig. 3): 9·c_in + c_in·c_out weights where a
    full 3x3 convolution has 9·c_in·c_out."""
    return nn.Sequential(
        conv_bn(in_channels, in_channels, 3, stride, groups=in_channels),
        conv_bn(in_channels, out_channels, 1),
    )


def mobilenet_v1(num_classes: int, in_channels: int) -> nn.Module:
    """MobileNet-V1 at width 1.0: a 3x3 stride-2 conv-BN-ReLU stem of 32 channels, the 13
    depthwise-separable blocks of :data:`MOBILENET_V1_STAGES`, global average pool, linear.
    Five stride-2 layers: a 224 px image ends at 7×7, a 32 px one at 1×1 (any size works).
    4,231,976 parameters at 1000 classes (the paper's 4.2M)."""
    channels = MOBILENET_V1_STEM
    stages: list[nn.Module] = []
    for blocks in MOBILENET_V1_STAGES:
        layers = []
        for out_channels, stride in blocks:
            layers.append(depthwise_separable(channels, out_channels, stride))
            channels = out_channels
        stages.append(nn.Sequential(*layers))
    stem = conv_bn(in_channels, MOBILENET_V1_STEM, 3, 2)
    return PooledClassifier(stem, stages, nn.Identity(), channels, num_classes)
