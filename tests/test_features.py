"""Intermediate features: layer names and aliases, hooks that come off, adapters that train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import compose_config
from torch import nn

from kdcl.config.options import loss_option, loss_spec
from kdcl.distill.features import FeatureTap, preactivation_layers, resolve_layers
from kdcl.distill.losses import AttentionFusion, LossContext, create_loss, hierarchical_context_loss
from kdcl.errors import KdclError
from kdcl.models import create_model
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import assemble

SHAPE = (3, 16, 16)


def example() -> torch.Tensor:
    return torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "kwargs", "alias", "expected"),
    [
        ("cnn", {"width": 4}, "auto:last_conv", ["10"]),
        ("cnn", {"width": 4}, "auto:stages", ["2", "6", "10"]),
        ("cnn", {"width": 4}, "auto:penultimate", ["13:input"]),
        ("resnet8", {}, "auto:stages", ["stages.0", "stages.1", "stages"]),
        ("resnet8", {}, "auto:penultimate", ["fc:input"]),
        ("mlp", {"hidden": [8]}, "auto:penultimate", ["3:input"]),
    ],
)
def test_aliases_name_the_documented_layers(name, kwargs, alias, expected):
    model = create_model(name, 10, SHAPE, **kwargs)
    assert resolve_layers(model, alias, "student", example()) == expected
    assert hooks(model) == 0  # the probe's hooks are gone


def test_stages_skip_layers_inside_downsampling_blocks():
    """torchvision's ResNet-50 strides inside its bottlenecks and reuses one ReLU per block:
    the stage outputs are still layer1 … layer4."""
    model = create_model("resnet50", 10, (3, 32, 32))
    assert resolve_layers(model, "auto:stages", "teacher", torch.zeros(2, 3, 32, 32)) == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]


def test_unknown_layer_lists_the_module_paths():
    model = create_model("cnn", 10, SHAPE, width=4)
    with pytest.raises(KdclError, match="has no layer 'layer3'") as err:
        resolve_layers(model, ["6", "layer3"], "student", example())
    assert "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13" in err.value.fix
    assert "auto:stages" in err.value.fix


def test_mlp_has_no_maps_for_spatial_aliases():
    model = create_model("mlp", 10, SHAPE, hidden=[8])
    with pytest.raises(KdclError, match="no module that outputs a spatial feature map") as err:
        resolve_layers(model, "auto:last_conv", "student", example())
    assert "auto:penultimate" in err.value.fix


def test_tap_keeps_outputs_and_inputs_and_removes_its_hooks():
    model = create_model("cnn", 10, SHAPE, width=4).eval()
    x = example()
    with FeatureTap(model, ["10", "13:input"]) as features:
        assert hooks(model) == 2
        logits = model(x)
    assert hooks(model) == 0 and features == {}
    with torch.no_grad():
        body = model[:11](x)
    # (values checked inside a fresh tap: leaving the block clears them)
    with FeatureTap(model, ["10", "13:input"]) as features:
        model(x)
        assert torch.allclose(features["10"], body)
        assert torch.allclose(features["13:input"], body.mean((2, 3)))
    assert logits.shape == (4, 10)


def test_tap_copies_values_that_an_inplace_op_would_change():
    model = create_model("cnn", 10, SHAPE, width=4).eval()  # 9 is a BatchNorm followed by ReLU(inplace)
    with FeatureTap(model, ["9"]) as features:
        model(example())
        assert (features["9"] < 0).any()


def test_hooks_come_off_after_an_error():
    model = create_model("cnn", 10, SHAPE, width=4)
    with pytest.raises(RuntimeError, match="boom"), FeatureTap(model, ["2", "6"]):
        assert hooks(model) == 2
        raise RuntimeError("boom")
    assert hooks(model) == 0


def test_gradients_reach_the_adapters_and_the_student_not_the_teacher():
    torch.manual_seed(0)
    student = create_model("cnn", 10, SHAPE, width=4)
    teacher = create_model("cnn", 10, SHAPE, width=8)
    loss = create_loss(
        loss_spec({"name": "composed", "alpha": 0.9, "losses": [{"name": "fitnet", "weight": 100.0}, {"name": "at"}]})
    )
    loss.bind(student, teacher, example(), num_examples=4)
    fitnet = loss.parts[0]
    assert fitnet.pairs == [("10", "10")] and isinstance(fitnet.adapters[0], nn.Conv2d)
    assert fitnet.adapters[0].in_channels == 16 and fitnet.adapters[0].out_channels == 32
    assert loss.layers() == (["10", "2", "6", "10"], ["10", "2", "6", "10"])
    x, y = example(), torch.arange(4)
    student_layers, teacher_layers = loss.layers()
    with FeatureTap(student, student_layers) as fs, FeatureTap(teacher, teacher_layers) as ft:
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        out = loss(logits, teacher_logits, y, 0.9, 4.0, LossContext(1, fs, ft))
        out["loss"].mean().backward()
    assert out["hint"].gt(0).all() and out["at"].gt(0).all()
    adapter = fitnet.adapters[0]
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert list(loss.parameters()) == list(adapter.parameters())  # what the optimizer gets besides the student


# --------------------------------------------------------------------------- ReviewKD
def hcl_reference(fs: np.ndarray, ft: np.ndarray) -> np.ndarray:
    """Chen et al. (2021): full-resolution MSE plus the 4×4, 2×2, 1×1 pooled MSEs below H,
    weighted 1/2, 1/4, 1/8, over the sum of the weights; per example."""

    def pool(x, level):
        n, c, h, w = x.shape
        return x.reshape(n, c, level, h // level, level, w // level).mean(axis=(3, 5))

    loss, total, weight = ((fs - ft) ** 2).reshape(len(fs), -1).mean(1), 1.0, 1.0
    for level in (4, 2, 1):
        if level < fs.shape[2]:
            weight /= 2
            loss = loss + weight * ((pool(fs, level) - pool(ft, level)) ** 2).reshape(len(fs), -1).mean(1)
            total += weight
    return loss / total


@pytest.mark.parametrize("size", [8, 2])
def test_hierarchical_context_loss_equals_formula(size):
    g = torch.Generator().manual_seed(size)
    fs, ft = torch.randn(3, 5, size, size, generator=g), torch.randn(3, 5, size, size, generator=g)
    expected = hcl_reference(fs.numpy().astype(np.float64), ft.numpy().astype(np.float64))
    assert hierarchical_context_loss(fs, ft).numpy() == pytest.approx(expected, rel=1e-5)


def test_reviewkd_fusions_start_as_the_authors_do():
    """kaiming_uniform_(a=1) on the 1×1 and 3×3 convolutions: gain √(2 / (1 + a²)) = 1, so
    the weights are uniform in ±√(3 / fan_in), whose standard deviation is 1 / √fan_in."""
    torch.manual_seed(0)
    fusion = AttentionFusion(64, 32, 48, fuse=True)
    for conv, fan_in in ((fusion.narrow[0], 64 * 1 * 1), (fusion.widen[0], 32 * 3 * 3)):
        w = conv.weight.detach()
        assert w.abs().max() <= (3 / fan_in) ** 0.5
        assert w.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)


def test_reviewkd_reviews_from_the_deepest_level_and_trains_its_fusions():
    """Every student level is fused with the deeper ones (the deepest alone has no attention),
    resized and widened to its teacher map; the loss is the warmed-up sum of the levels' HCL,
    and the gradient reaches the fusions and the student, not the teacher."""
    torch.manual_seed(0)
    student = create_model("cnn", 10, SHAPE, width=4)
    teacher = create_model("cnn", 10, SHAPE, width=8)
    loss = create_loss({**loss_option("reviewkd"), "warmup_epochs": 4})
    loss.bind(student, teacher, example(), num_examples=4)
    assert [f.attention is None for f in loss.fusions] == [False, False, True]
    x, y = example(), torch.arange(4)
    s_layers, t_layers = loss.layers()
    with FeatureTap(student, s_layers) as fs, FeatureTap(teacher, t_layers) as ft:
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        out = loss(logits, teacher_logits, y, 0.0, 4.0, LossContext(1, fs, ft))
        reviewed, deeper, expected = {}, None, 0
        for j in (2, 1, 0):
            reviewed[j], deeper = loss.fusions[j](fs[s_layers[j]], deeper, tuple(ft[t_layers[j]].shape[2:]))
            assert reviewed[j].shape == ft[t_layers[j]].shape
            expected = expected + hierarchical_context_loss(reviewed[j], ft[t_layers[j]])
        out["loss"].mean().backward()
    assert torch.allclose(out["hcl"], expected)
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(out["loss"], ce + 0.25 * expected)  # β = 1, epoch 1 of a 4-epoch warm-up
    assert all(p.grad is not None for p in loss.fusions.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------- ReviewKD as mdistiller
def reviewkd(**keys) -> nn.Module:
    return create_loss({**loss_option("reviewkd"), "warmup_epochs": 0, **keys})


def teacher_maps(loss: nn.Module, teacher: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's value at each of the loss's teacher layers on ``x`` (eval mode)."""
    refs = loss.layers()[1]
    with FeatureTap(teacher, refs) as values, torch.no_grad():
        teacher(x)
        return [values[ref] for ref in refs]


def test_resnet_pre_activation_maps_are_the_block_sums_before_the_last_relu():
    """A CIFAR ResNet stage ends in a BasicBlock, ``relu(bn2(conv2(relu(bn1(conv1(h))))) + shortcut(h))``:
    its pre-activation map is the sum inside, recomputed here from the block's modules. The
    default keeps the stage outputs, the sums after the ReLU."""
    torch.manual_seed(0)
    teacher = create_model("resnet20", 10, SHAPE).eval()
    student = create_model("cnn", 10, SHAPE, width=4)
    x = example()
    sums, posts = [], []
    with torch.no_grad():
        h = teacher.stem(x.clone())
        for stage in teacher.stages:
            for block in stage:
                inner = torch.relu(block.bn1(block.conv1(h)))
                total = block.bn2(block.conv2(inner)) + block.shortcut(h)
                h = torch.relu(total)
            sums.append(total)
            posts.append(h)
    pre = reviewkd(teacher_maps="pre_activation")
    pre.bind(student, teacher, x, num_examples=4)
    assert pre.layers()[1] == ["stages.0.2.relu:input", "stages.1.2.relu:input", "stages.2.2.relu:input"]
    for got, expected in zip(teacher_maps(pre, teacher, x), sums, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)
        assert (got < 0).any()  # before the ReLU: negative values survive
    post = reviewkd()
    post.bind(student, teacher, x, num_examples=4)
    assert post.layers()[1] == ["stages.0", "stages.1", "stages"]
    for got, expected in zip(teacher_maps(post, teacher, x), posts, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)


def test_wrn_pre_activation_maps_are_the_bn_outputs_the_stages_enter():
    """A WRN stage ends in a sum; mdistiller's pre-activation map is what the next BN-ReLU's
    ReLU receives: the next stage's first ``bn1`` of it, and for the last stage the head's BN."""
    torch.manual_seed(0)
    teacher = create_model("wrn", 10, SHAPE, depth=10, widen_factor=1).eval()
    x = example()
    with torch.no_grad():
        s0 = teacher.stages[0](teacher.stem(x))
        s1 = teacher.stages[1](s0)
        s2 = teacher.stages[2](s1)
        expected = [teacher.stages[1][0].bn1(s0), teacher.stages[2][0].bn1(s1), teacher.head[0](s2)]
    loss = reviewkd(teacher_maps="pre_activation")
    loss.bind(create_model("cnn", 10, SHAPE, width=4), teacher, x, num_examples=4)
    for got, want in zip(teacher_maps(loss, teacher, x), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet8", {}, ["stages.0.0.relu:input", "stages.1.0.relu:input", "stages.2.0.relu:input"]),
        ("cnn", {"width": 4}, ["2:input", "6:input", "10:input"]),  # the stages are ReLUs
        # the identity head passes on the last stage's map: the ReLU before it gives it
        (
            "vgg_cifar",
            {"depth": 8},
            ["stem.0.2:input", "stages.0.1.2:input", "stages.1.1.2:input", "stages.3.0.2:input"],
        ),
    ],
)
def test_pre_activation_layers_are_the_inputs_of_the_relus_that_give_the_stages(name, kwargs, expected):
    model = create_model(name, 10, SHAPE, **kwargs)
    refs = resolve_layers(model, "auto:stages", "teacher", example())
    assert preactivation_layers(model, refs, "teacher", example()) == expected


def test_pre_activation_maps_of_a_layer_without_a_final_relu_are_an_error():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(16, 2))
    loss = reviewkd(teacher_maps="pre_activation", student_layer="2", teacher_layer="2")
    with pytest.raises(KdclError, match="layer '2' of Sequential does not end in an nn.ReLU") as err:
        loss.bind(create_model("cnn", 10, SHAPE, width=4), teacher, example(), num_examples=4)
    assert "teacher_maps=post_activation" in err.value.fix


def test_reviewkd_choices_are_checked():
    with pytest.raises(KdclError, match="teacher_maps='preact' is not a choice"):
        reviewkd(teacher_maps="preact")
    with pytest.raises(KdclError, match="pooled_level='yes'"):
        reviewkd(pooled_level="yes")


def test_pooled_level_adds_one_fusion_at_1x1_compared_by_the_mse():
    """The pooled features (the classifier's input) of both models are the deepest level: one
    more fusion, without attention, at 1×1, whose term is the plain MSE; the stage levels
    fuse the pooled level's fused map in."""
    torch.manual_seed(0)
    student = create_model("cnn", 10, SHAPE, width=4)
    teacher = create_model("cnn", 10, SHAPE, width=8)
    x, y = example(), torch.arange(4)
    plain = reviewkd()
    plain.bind(student, teacher, x, num_examples=4)
    loss = reviewkd(pooled_level=True)
    loss.bind(student, teacher, x, num_examples=4)
    assert len(loss.fusions) == len(plain.fusions) + 1 == 4
    assert [f.attention is None for f in loss.fusions] == [False, False, False, True]
    assert loss.pairs[:3] == plain.pairs and loss.pairs[3] == ("13:input", "13:input")
    assert loss.teacher_sizes[3] == (1, 1) and loss.fusions[3].widen[0].out_channels == 32
    s_layers, t_layers = loss.layers()
    with FeatureTap(student, s_layers) as fs, FeatureTap(teacher, t_layers) as ft:
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
            pooled_t = teacher[:13](x)  # average pool and flatten: the teacher's pooled feature
        out = loss(logits, teacher_logits, y, 0.0, 4.0, LossContext(1, fs, ft))
        assert torch.equal(ft["13:input"], pooled_t)
        reviewed, deeper = loss.fusions[3](fs["13:input"][:, :, None, None], None, (1, 1))
        assert reviewed.shape == (4, 32, 1, 1)
        mse = ((reviewed[:, :, 0, 0] - pooled_t) ** 2).mean(1)
        assert torch.allclose(hierarchical_context_loss(reviewed, pooled_t[:, :, None, None]), mse)
        expected = mse
        for j in (2, 1, 0):
            r, deeper = loss.fusions[j](fs[s_layers[j]], deeper, tuple(ft[t_layers[j]].shape[2:]))
            expected = expected + hierarchical_context_loss(r, ft[t_layers[j]])
    assert torch.allclose(out["hcl"], expected)


def test_reviewkd_mdistiller_option_selects_both_choices_and_trains(tmp_path):
    """``distill=reviewkd_mdistiller`` composes to pre-activation teacher maps and a pooled
    level (``distill=reviewkd`` to neither), and a one-epoch run hooks the teacher's ReLU
    inputs and both classifiers' inputs."""
    default = compose_config(["distill=reviewkd"])["distill"]
    assert (default["teacher_maps"], default["pooled_level"]) == ("post_activation", False)
    quick = ["trainer.epochs=1", "dataset.max_train_samples=128", "trainer.batch_size=32"]
    cfg = compose_config(
        [
            *quick,
            "teacher=cnn_small",
            "student=cnn_small",
            "distill=reviewkd_mdistiller",
            "distill.warmup_epochs=1",
            "curriculum=none",
            "baseline=false",
        ]
    )
    assert (cfg["distill"]["teacher_maps"], cfg["distill"]["pooled_level"]) == ("pre_activation", True)
    taps = []

    class Recorded(FeatureTap):
        def __init__(self, model, refs):
            super().__init__(model, refs)
            taps.append(self.refs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assemble, "FeatureTap", Recorded)
        summary = run_pipeline(cfg, tmp_path).set_index("model")
    assert ["2", "6", "10", "13:input"] in taps  # the student's maps after their ReLU, and its pooled feature
    assert ["2:input", "6:input", "10:input", "13:input"] in taps  # the teacher's before
    assert np.isfinite(summary.loc["distill", "test_acc"])
