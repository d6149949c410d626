"""Teacher and student networks, looked up by name in :data:`MODELS`.

Every factory is called as ``fn(num_classes=..., input_shape=(C, H, W), pretrained=...,
**kwargs)`` and returns an ``nn.Module`` mapping ``(B, C, H, W)`` images to
``(B, num_classes)`` logits. Use :func:`create_model` rather than calling factories
directly: it turns bad names and keywords into :class:`KdclError`.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from kdcl.errors import KdclError
from kdcl.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register

InputShape = tuple[int, int, int]
CifarStem = bool | Literal["auto"]


def create_model(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` for ``input_shape`` = (C, H, W) images."""
    factory = MODELS.get(name)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise KdclError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    arguments = {"num_classes": num_classes, "input_shape": shape, "pretrained": pretrained}
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


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Size of the state_dict tensors (parameters and buffers) in megabytes."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one example of shape ``input_shape``.

    One MAC is one multiplication added to an accumulator; the count is half the FLOPs that
    ``torch.utils.flop_counter.FlopCounterMode`` reports, which counts a multiply-add as two
    FLOPs. It covers the ops that counter knows: convolutions, linear layers and matrix
    products (mm, addmm, bmm, attention); elementwise ops (BatchNorm, activations, pooling,
    additions, softmax) are not counted. The pass runs in eval mode under ``torch.no_grad``
    on a zero input on the model's device; every module's train/eval mode is restored and
    no BatchNorm running statistic changes."""
    from torch.utils.flop_counter import FlopCounterMode

    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for module, training in modes.items():
            module.train(training)
    return counter.get_total_flops() // 2


def freeze(model: nn.Module) -> nn.Module:
    """A model as a teacher: eval mode, no gradients, BatchNorm folded into its convolutions."""
    return fold_batchnorm(model.eval().requires_grad_(False))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place, for a
    frozen model in eval mode (a teacher): ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` with
    ``σ = √(running_var + ε)``, and the BatchNorm becomes an ``Identity``. The outputs are
    unchanged up to float rounding, module names stay (feature hooks on a folded
    BatchNorm see the folded convolution's output, the same values), and one pass over
    the activations per BatchNorm is saved. A model torch.fx cannot trace is left as it is.
    """
    from torch.fx import symbolic_trace
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = symbolic_trace(model).graph
    except Exception:  # data-dependent control flow: no folding
        return model
    modules = dict(model.named_modules())
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(modules.get(node.target), nn.BatchNorm2d) or getattr(source, "op", None) != "call_module":
            continue
        conv, bn = modules.get(source.target), modules[node.target]
        if isinstance(conv, nn.Conv2d) and len(source.users) == 1 and bn.track_running_stats:
            _replace(model, source.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            _replace(model, node.target, nn.Identity())
    return model


def classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's output layer and its name: its last ``nn.Linear`` (every registered model
    ends in one; a test checks it)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdclError(
            f"{type(model).__name__} has no nn.Linear output layer to grow",
            fix="use a model that ends in a linear classifier",
        )
    return linears[-1]


def grow_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give the output layer ``num_classes`` outputs, in place (class-incremental learning):
    the existing outputs keep their weights and come first; the new ones are initialised as
    ``nn.Linear`` initialises them, from torch's global generator."""
    name, old = classifier(model)
    if num_classes < old.out_features:
        raise KdclError(f"cannot shrink the output layer from {old.out_features} to {num_classes} outputs")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        if old.bias is not None:
            new.bias[: old.out_features] = old.bias
    _replace(model, name, new)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


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


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    """``torchvision.models.<name>``, with its default ImageNet weights if ``pretrained``."""
    builder = torchvision.models.get_model_builder(name)
    if not pretrained:
        return builder(weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return builder(weights=weights)
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
                "~/.cache/torch/hub/checkpoints), or set teacher.pretrained=false / "
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


def _torchvision_resnet(
    name: str,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool,
    cifar_stem: CifarStem,
) -> nn.Module:
    """A torchvision ResNet; the CIFAR stem is a 3x3 stride-1 conv1 and no max-pool."""
    small = _wants_cifar_stem(cifar_stem, input_shape)
    model = _torchvision_model(name, pretrained)
    in_channels = input_shape[0]
    if small:
        model.conv1 = _new_conv(model.conv1, in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _new_conv(model.conv1, in_channels)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _torchvision_mobilenet(
    name: str,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool,
    cifar_stem: CifarStem,
) -> nn.Module:
    """A torchvision MobileNet; the CIFAR stem makes the first conv stride 1."""
    small = _wants_cifar_stem(cifar_stem, input_shape)
    model = _torchvision_model(name, pretrained)
    stem = model.features[0]
    in_channels = input_shape[0]
    if in_channels != 3:
        stem[0] = _new_conv(stem[0], in_channels)
    if small:
        stem[0].stride = (1, 1)
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def _register_torchvision(name: str, build: Any, doc: str) -> None:
    def factory(
        num_classes: int,
        input_shape: InputShape,
        pretrained: bool = False,
        cifar_stem: CifarStem = "auto",
    ) -> nn.Module:
        return build(name, num_classes, input_shape, pretrained, cifar_stem)

    factory.__doc__ = doc
    register_model(name)(factory)


for _name, _build, _doc in (
    ("resnet18", _torchvision_resnet, "torchvision ResNet-18 (He et al. 2016)."),
    ("resnet34", _torchvision_resnet, "torchvision ResNet-34 (He et al. 2016)."),
    ("resnet50", _torchvision_resnet, "torchvision ResNet-50 with bottleneck blocks (He et al. 2016)."),
    ("mobilenet_v2", _torchvision_mobilenet, "torchvision MobileNetV2 (Sandler et al. 2018)."),
    ("mobilenet_v3_small", _torchvision_mobilenet, "torchvision MobileNetV3-Small (Howard et al. 2019)."),
):
    _register_torchvision(_name, _build, _doc)
