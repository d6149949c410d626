"""torchvision's ImageNet networks, adapted to the data: its input channels, its number of
classes and, for small images, a CIFAR stem.

:func:`torchvision_network` builds any network of ``torchvision.models`` (the registered
``resnet18`` … ``mobilenet_v3_small`` and every ``torchvision:NAME``). The CIFAR stem is a
rule per network family (:data:`STEMS`, looked up by the network's class): ResNets get a
3×3 stride-1 first convolution and no max-pool, MobileNets a stride-1 first convolution.
A family without a rule keeps its ImageNet stem.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import MobileNetV2, MobileNetV3, ResNet

from kdcl.errors import KdclError
from kdcl.models.operations import call_with_kwargs, set_outputs

InputShape = tuple[int, int, int]
CifarStem = bool | Literal["auto"]


def torchvision_network(
    name: str,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool = False,
    cifar_stem: CifarStem = "auto",
    **kwargs: Any,
) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=..., weights=..., **kwargs)`` for
    ``input_shape`` = (C, H, W) images (``torchvision:NAME``): with ``pretrained`` its
    default ImageNet weights and a new output layer of ``num_classes``; the first
    convolution takes C channels and, where the family has a rule, the CIFAR stem
    (``cifar_stem``: auto = images of at most 64×64)."""
    small = _wants_cifar_stem(cifar_stem, input_shape)
    model = _download(name, pretrained, **({} if pretrained else {"num_classes": num_classes}), **kwargs)
    _adapt_stem(model, name, input_shape[0], small, cifar_stem)
    return set_outputs(model, num_classes) if pretrained else model


def registered_network(
    name: str, num_classes: int, input_shape: InputShape, pretrained: bool, cifar_stem: CifarStem
) -> nn.Module:
    """kdcl's own torchvision entries (``resnet18`` … ``mobilenet_v3_small``): as
    :func:`torchvision_network`, built in the order kdcl always has (ImageNet network, its
    stem, then a new output layer), so a seed gives the initial weights it always gave."""
    small = _wants_cifar_stem(cifar_stem, input_shape)
    model = _download(name, pretrained)
    _adapt_stem(model, name, input_shape[0], small, cifar_stem)
    return set_outputs(model, num_classes, keep=False)


def _adapt_stem(model: nn.Module, name: str, in_channels: int, small: bool, cifar_stem: CifarStem) -> None:
    rule = next((rule for family, rule in STEMS.items() if isinstance(model, family)), None)
    if rule is None and cifar_stem is True:
        raise KdclError(
            f"torchvision model {name!r} has no CIFAR stem rule (kdcl has one for ResNets and MobileNets)",
            fix="set kwargs.cifar_stem=auto or false for this model",
        )
    if rule is not None:
        rule(model, in_channels, small)


def _download(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``get_model(name, **kwargs)``, with its default ImageNet weights if ``pretrained``
    (downloaded once to ``$TORCH_HOME/hub/checkpoints``); an unknown name, a download or a
    load failure is one :class:`KdclError`."""
    if name not in torchvision.models.list_models():
        raise KdclError(
            f"torchvision has no model {name!r}",
            fix="choose a name of torchvision.models.list_models(), e.g. torchvision:resnet18",
        )
    if not pretrained:
        return call_with_kwargs(f"torchvision:{name}", torchvision.models.get_model, name, weights=None, **kwargs)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return call_with_kwargs(f"torchvision:{name}", torchvision.models.get_model, name, weights=weights, **kwargs)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        # URLError is an OSError; ValueError/UnpicklingError come from a damaged file.
        # torch.hub downloads to a temporary file and deletes it on failure, so no
        # half-downloaded checkpoint is left behind.
        filename = os.path.basename(urlparse(weights.url).path)
        checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
        cached = os.path.join(checkpoints, filename)
        damaged = f"delete the damaged file {cached}, then " if os.path.exists(cached) else ""
        raise KdclError(
            f"the pretrained ImageNet weights for model {name!r} could not be "
            f"downloaded or loaded ({type(e).__name__}: {e})",
            fix=(
                f"{damaged}connect to the internet once, or put the file {filename} in "
                f"$TORCH_HOME/hub/checkpoints (here: {checkpoints}; default "
                "~/.cache/torch/hub/checkpoints), or give the weights as a file "
                "(teacher.checkpoint=PATH), or set teacher.pretrained=false / "
                "student.pretrained=false"
            ),
        ) from e


def _wants_cifar_stem(cifar_stem: CifarStem, input_shape: InputShape) -> bool:
    if cifar_stem == "auto":
        return input_shape[1] <= 64 and input_shape[2] <= 64
    if isinstance(cifar_stem, bool):
        return cifar_stem
    raise KdclError(
        f"cifar_stem must be 'auto', true or false, got {cifar_stem!r}",
        fix="set kwargs.cifar_stem to auto, true or false",
    )


def _new_conv(conv: nn.Conv2d, in_channels: int, **overrides: Any) -> nn.Conv2d:
    """A freshly initialised copy of ``conv``'s layout with ``in_channels`` and overrides."""
    layout: dict[str, Any] = {
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }
    return nn.Conv2d(in_channels, conv.out_channels, **(layout | overrides))


def _resnet_stem(model: ResNet, in_channels: int, small: bool) -> None:
    """The CIFAR stem of a ResNet: a 3x3 stride-1 conv1 and no max-pool."""
    if small:
        model.conv1 = _new_conv(model.conv1, in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _new_conv(model.conv1, in_channels)


def _mobilenet_stem(model: MobileNetV2 | MobileNetV3, in_channels: int, small: bool) -> None:
    """The CIFAR stem of a MobileNet: its first convolution at stride 1."""
    stem = model.features[0]
    if in_channels != 3:
        stem[0] = _new_conv(stem[0], in_channels)
    if small:
        stem[0].stride = (1, 1)


# The CIFAR stem (and the first convolution's input channels) per network family.
STEMS: dict[type, Callable[[Any, int, bool], None]] = {
    ResNet: _resnet_stem,
    MobileNetV2: _mobilenet_stem,
    MobileNetV3: _mobilenet_stem,
}
