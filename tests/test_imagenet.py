"""MobileNet-V1 against its paper, and top-5 accuracy against a hand count."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config

from kdcl.data import load_data
from kdcl.errors import KdclError
from kdcl.models import count_macs, count_params, create_model
from kdcl.models.imagenet_nets import MOBILENET_V1_STAGES
from kdcl.train.engine import TrainSettings, evaluate, top5_accuracy

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- MobileNet-V1
def test_mobilenet_v1_has_the_papers_size():
    """Howard et al. 2017, Table 8: 1.0 MobileNet-224 has 4.2M parameters and 569M mult-adds."""
    model = create_model("mobilenet_v1", num_classes=1000, input_shape=(3, 224, 224))
    params, macs = count_params(model), count_macs(model, (3, 224, 224))
    assert round(params / 1e6, 1) == 4.2 and params == 4_231_976
    assert round(macs / 1e6) == 569


def test_mobilenet_v1_count_follows_its_layers():
    """Stem: 3x3 conv (3·32·9) and BN (2·32); each block: depthwise 9·c and pointwise c·o
    weights, a BN of 2c and of 2o parameters; the linear layer 1024·K + K."""
    params, c = 3 * 32 * 9 + 2 * 32, 32
    for stage in MOBILENET_V1_STAGES:
        for out, _ in stage:
            params += 9 * c + 2 * c + c * out + 2 * out
            c = out
    assert sum(len(stage) for stage in MOBILENET_V1_STAGES) == 13
    assert count_params(create_model("mobilenet_v1", num_classes=7, input_shape=(3, 32, 32))) == params + 1024 * 7 + 7


@pytest.mark.parametrize(("size", "sides"), [(224, [56, 28, 14, 7]), (64, [16, 8, 4, 2]), (32, [8, 4, 2, 1])])
def test_mobilenet_v1_stages_at_every_image_size(size: int, sides: list[int]):
    """The stage outputs are the maps CRD and DKD distil from: 128-1024 channels at 1/4 … 1/32."""
    model = create_model("mobilenet_v1", num_classes=12, input_shape=(3, size, size)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        x = model.stem(x)
        shapes = []
        for stage in model.stages:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
        assert model(torch.randn(2, 3, size, size)).shape == (2, 12)
    assert shapes == [(w, s, s) for w, s in zip([128, 256, 512, 1024], sides)]


def test_mobilenet_v1_has_no_pretrained_weights():
    with pytest.raises(KdclError, match="no pretrained weights exist for model 'mobilenet_v1'"):
        create_model("mobilenet_v1", num_classes=10, input_shape=(3, 32, 32), pretrained=True)


# --------------------------------------------------------------------------- top-5 accuracy
def test_top5_accuracy_by_hand():
    """Every row ranks class k at place k + 1; the labels 0, 1, 4, 5 sit at places 1, 2, 5, 6:
    one top-1 hit in four, three top-5 hits."""
    logits = -torch.arange(12.0).repeat(4, 1)
    labels = torch.tensor([0, 1, 4, 5])
    assert (logits.argmax(1) == labels).float().mean().item() == 0.25
    assert top5_accuracy(logits, labels) == 0.75


@pytest.mark.parametrize(("classes", "measured"), [(10, False), (11, True)])
def test_top5_accuracy_only_above_ten_classes(classes: int, measured: bool):
    value = top5_accuracy(torch.randn(6, classes), torch.zeros(6, dtype=torch.long))
    assert math.isnan(value) != measured


def test_evaluate_takes_top5_from_the_top1_logits():
    """One forward pass per batch gives both accuracies; counted by hand from the logits: the
    label's place is the number of logits above its own."""
    cfg = compose_config(["dataset=fake", "dataset.num_classes=20", "dataset.test_samples=40"])
    data = load_data(cfg["dataset"], CPU, False, 0)
    model = create_model("mlp", num_classes=20, input_shape=data.input_shape, hidden=(8,))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    trainer = TrainSettings(CPU, epochs=0, batch_size=16, eval_batch_size=16, amp=False)
    ev = evaluate(model, data.test, data, trainer)
    assert len(calls) == math.ceil(40 / 16)
    place = (ev.logits > ev.logits.gather(1, ev.labels[:, None])).sum(1)
    assert ev.acc == pytest.approx((place == 0).float().mean().item())
    assert ev.acc_top5 == pytest.approx((place < 5).float().mean().item())
    assert 0 < ev.acc_top5 < 1  # a case where the two differ is tested, not only 0 or 1
