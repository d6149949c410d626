"""Tests for kdcl.models and the model options in conf/models (both teacher and student options)."""

from __future__ import annotations

import re
import socket
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kdcl.errors import KdclError
from kdcl.models import MODELS, count_macs, count_params, create_model, size_mb
from kdcl.models.registered import models_of

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize("num_classes", [10, 7])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 32, 32)], ids=["1x8x8", "3x32x32"])
@pytest.mark.parametrize("name", models_of("images"))
def test_model_gives_logits(name: str, input_shape: tuple[int, int, int], num_classes: int):
    model = create_model(name, num_classes=num_classes, input_shape=input_shape).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, *input_shape))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


# He et al. 2016 (Table 6) and RepDistiller; RepDistiller's x4 counts (1.23M, 7.43M) are
# at 100 classes, and 90 fewer classes remove 90 * 257 = 0.023M parameters.
@pytest.mark.parametrize(
    ("name", "millions"),
    [("resnet20", 0.27), ("resnet56", 0.86), ("resnet8x4", 1.21), ("resnet32x4", 7.41)],
)
def test_cifar_resnet_parameter_counts(name: str, millions: float):
    params = count_params(create_model(name, num_classes=10, input_shape=(3, 32, 32)))
    assert params / 1e6 == pytest.approx(millions, rel=0.03)


def test_count_params_and_size_mb():
    model = create_model("mlp", num_classes=3, input_shape=(1, 2, 2), hidden=[5])
    assert count_params(model) == (4 * 5 + 5) + (5 * 3 + 3)
    assert size_mb(model) == pytest.approx(count_params(model) * 4 / 1e6)


def test_count_macs_of_one_layer():
    assert count_macs(nn.Linear(8, 4), (8,)) == 8 * 4
    assert count_macs(nn.Conv2d(3, 16, 3, padding=1, bias=False), (3, 32, 32)) == 3 * 16 * 9 * 32 * 32


def test_count_macs_of_vgg_is_the_sum_over_its_convs_and_linear():
    w, classes = 8, 10
    model = create_model("vgg", num_classes=classes, input_shape=(3, 32, 32), width=w)
    # stage_convs (2, 1, 1) at resolutions 32, 16, 8 (ceil-mode pooling), then 4w -> K
    convs = [(3, w, 32), (w, w, 32), (w, 2 * w, 16), (2 * w, 4 * w, 8)]
    expected = sum(c_in * c_out * 9 * side * side for c_in, c_out, side in convs) + 4 * w * classes
    assert count_macs(model, (3, 32, 32)) == expected


@pytest.mark.parametrize("training", [True, False])
def test_count_macs_leaves_the_model_as_it_was(training: bool):
    model = create_model("vgg", num_classes=10, input_shape=(3, 32, 32), width=8).train(training)
    with torch.no_grad():  # non-trivial BatchNorm statistics, which a train-mode pass would move
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 32, 32))
    assert all(m.training == training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _first_conv_resnet(model: nn.Module) -> nn.Conv2d:
    return model.conv1


def _first_conv_mobilenet(model: nn.Module) -> nn.Conv2d:
    return model.features[0][0]


def test_resnet18_cifar_stem_only_for_small_inputs():
    small = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = create_model("resnet18", num_classes=10, input_shape=(3, 224, 224))
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    forced = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), cifar_stem=False)
    assert forced.conv1.stride == (2, 2)


def test_mobilenet_v2_cifar_stem_only_for_small_inputs():
    small = create_model("mobilenet_v2", num_classes=10, input_shape=(3, 32, 32))
    assert _first_conv_mobilenet(small).stride == (1, 1)
    large = create_model("mobilenet_v2", num_classes=10, input_shape=(3, 224, 224))
    assert _first_conv_mobilenet(large).stride == (2, 2)
    forced = create_model("mobilenet_v2", num_classes=10, input_shape=(3, 224, 224), cifar_stem=True)
    assert _first_conv_mobilenet(forced).stride == (1, 1)


@pytest.mark.parametrize(
    ("name", "first_conv", "kernel"),
    [("resnet50", _first_conv_resnet, 7), ("mobilenet_v3_small", _first_conv_mobilenet, 3)],
)
def test_torchvision_first_conv_takes_in_channels(name, first_conv, kernel):
    conv = first_conv(create_model(name, num_classes=10, input_shape=(1, 224, 224)))
    assert conv.in_channels == 1
    assert conv.kernel_size == (kernel, kernel)
    assert conv.stride == (2, 2)


def test_pretrained_offline_raises_kdcl_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # fail fast where the network drops packets
    try:
        create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), pretrained=True)
    except KdclError as e:
        message = str(e)
    else:
        pytest.skip("the ImageNet weights could be downloaded: not offline")
    finally:
        socket.setdefaulttimeout(previous_timeout)
    assert "resnet18" in message
    assert "resnet18-f37072fd.pth" in message
    assert "pretrained=false" in message
    leftovers = list((tmp_path / "hub" / "checkpoints").glob("*"))
    assert leftovers == []


def test_pretrained_without_weights_raises_kdcl_error():
    with pytest.raises(KdclError, match="no pretrained weights.*resnet20(.|\n)*pretrained=false"):
        create_model("resnet20", num_classes=10, input_shape=(3, 32, 32), pretrained=True)


def test_unknown_model_lists_choices():
    with pytest.raises(KdclError, match="unknown model 'resnet21'") as info:
        create_model("resnet21", num_classes=10, input_shape=(3, 32, 32))
    assert all(name in str(info.value) for name in MODELS.names())


def test_unknown_kwarg_names_model_and_keyword():
    with pytest.raises(KdclError, match="'mlp'.*'widht'") as info:
        create_model("mlp", num_classes=10, input_shape=(1, 8, 8), widht=3)
    assert "hidden" in str(info.value)


def test_bad_cifar_stem_value():
    with pytest.raises(KdclError, match="cifar_stem"):
        create_model("resnet18", num_classes=10, input_shape=(3, 32, 32), cifar_stem="yes")


def _yaml_files(directory: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CONF / directory).glob("*.yaml"))}


def test_a_model_option_is_one_file():
    """conf/models holds the options of both groups; there is no per-group copy to keep in step."""
    assert _yaml_files("models"), "conf/models holds no YAML files"
    assert not (CONF / "teacher").exists() and not (CONF / "student").exists()


# The options of kdcl's own models (a packaged model's count is tested in tests/test_packaged.py).
NAMED_OPTIONS = sorted(
    name for name, text in _yaml_files("models").items() if ":" not in (yaml.safe_load(text)["name"] or ":")
)


@pytest.mark.parametrize("option", NAMED_OPTIONS)
def test_model_option_builds_with_stated_parameter_count(option: str):
    text = _yaml_files("models")[option]
    config = yaml.safe_load(text)
    assert set(config) == {"option", "name", "kwargs"}
    assert config["option"] == option.removesuffix(".yaml")  # the arch column's name: the option's own
    assert config["name"] in MODELS
    # The comment states the count at 10 classes, 3x32x32 images or a vocabulary of 8000
    # tokens (64 per text), rounded to its last digit.
    shape, data_kwargs, inputs = {
        "images": ((3, 32, 32), {}, "3x32x32 input"),
        "tokens": ((64,), {"vocab_size": 8000, "pad_id": 0}, "8000-token vocabulary"),
    }[MODELS.trait(config["name"], "inputs")]
    model = create_model(config["name"], num_classes=10, input_shape=shape, **data_kwargs, **config["kwargs"])
    stated = re.search(rf"([\d.]+)([KM]) parameters at 10 classes, {inputs}", text)
    assert stated, f"{option}: no parameter count in the comment"
    number, unit = Decimal(stated[1]), {"K": 10**3, "M": 10**6}[stated[2]]
    half_digit = Decimal(1).scaleb(number.as_tuple().exponent) / 2
    assert abs(Decimal(count_params(model)) - number * unit) <= half_digit * unit


@pytest.mark.parametrize("width", [8, 32])
def test_vgg_parameter_count_and_full_resolution_stem(width: int):
    """Two 3x3 convolutions at full resolution (3→w, w→w), then w→2w and 2w→4w after pools:
    9·(3w + w² + 2w² + 8w²) conv weights, two BatchNorm parameters per channel, a 4w→10 linear."""
    model = create_model("vgg", num_classes=10, input_shape=(3, 32, 32), width=width)
    convs = 9 * (3 * width + width**2 + 2 * width**2 + 8 * width**2)
    norms = 2 * (width + width + 2 * width + 4 * width)
    assert count_params(model) == convs + norms + 4 * width * 10 + 10
    full_resolution = model[:6](torch.randn(1, 3, 32, 32))  # conv-BN-ReLU twice, before the first pool
    assert full_resolution.shape == (1, width, 32, 32)


@pytest.mark.parametrize("stage_convs", [(2, 2, 1), (1, 1, 2), (3, 1, 1)])
def test_vgg_stage_convs_follow_the_docstring_formula(stage_convs):
    """9·(C·w + (a−1)·w² + 2w² + (b−1)·4w² + 8w² + (c−1)·16w²) + 2 per BN channel + 4w·K + K."""
    a, b, c, w = *stage_convs, 8
    model = create_model("vgg", num_classes=10, input_shape=(3, 32, 32), width=w, stage_convs=list(stage_convs))
    convs = 9 * (3 * w + (a - 1) * w**2 + 2 * w**2 + (b - 1) * 4 * w**2 + 8 * w**2 + (c - 1) * 16 * w**2)
    norms = 2 * (a * w + b * 2 * w + c * 4 * w)
    assert count_params(model) == convs + norms + 4 * w * 10 + 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_refuses_a_stage_without_convolutions():
    with pytest.raises(KdclError, match="stage_convs"):
        create_model("vgg", num_classes=10, input_shape=(3, 32, 32), stage_convs=[2, 0, 1])
