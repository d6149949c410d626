"""Models from torchvision, timm, Hugging Face and your own callables (``_target_``), and
teacher weights made outside kdcl: built for the data, saved and rebuilt by ``kdcl eval``,
loaded as teachers, and every failure one message. Offline and small."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
import torch
from helpers import QUICK
from test_cli import assert_clean_error

from kdcl.config.checks import validate
from kdcl.data import load_data
from kdcl.errors import KdclError
from kdcl.models import build_model, count_params, create_model, model_ref, saved_spec
from kdcl.models.sources import HUB_TIMEOUT_S, PROXY_VARIABLES, hub_files, hub_unreachable
from kdcl.scenarios.stage_cache import stage_key
from kdcl.scenarios.standard import check_losses, run_pipeline, start_run, teacher_stage
from kdcl.train.checkpoint import model_from_checkpoint
from kdcl.train.engine import TrainSettings, evaluate
from kdcl.train.weights import load_teacher, safetensors_file
from kdcl.trust import CodePolicy

TESTS = Path(__file__).resolve().parent
DIGITS = (1, 8, 8)  # the default dataset's images
TIMM = {"name": "timm:test_resnet", "kwargs": {}}
TORCHVISION = {"name": "torchvision:mobilenet_v3_small", "kwargs": {"width_mult": 0.25}}
TARGET = {"name": "cnn", "_target_": "tiny_nets.tiny_cnn", "kwargs": {"width": 4}}


def tiny_hf_config(num_labels: int = 10):
    from transformers import ResNetConfig

    return ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_channels=1, num_labels=num_labels
    )


@pytest.fixture
def hf_dir(tmp_path):
    """A directory holding only the config of a tiny HF ResNet (``config.save_pretrained``)."""
    tiny_hf_config().save_pretrained(tmp_path / "hf_resnet")
    return tmp_path / "hf_resnet"


@pytest.fixture
def target_importable(monkeypatch):
    """tests/ on PYTHONPATH, so that a CLI subprocess imports ``tiny_nets`` as a user's package."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def specs(hf_dir: Path) -> dict[str, dict]:
    return {"timm": TIMM, "torchvision": TORCHVISION, "hf": {"name": f"hf:{hf_dir}", "kwargs": {}}, "_target_": TARGET}


# --------------------------------------------------------------------------- building and rebuilding
@pytest.mark.parametrize("kind", ["timm", "torchvision", "hf", "_target_"])
def test_each_source_builds_for_the_data_and_its_checkpoint_spec_rebuilds_it(kind, hf_dir, tmp_path):
    spec = specs(hf_dir)[kind]
    torch.manual_seed(0)
    model = build_model(spec, 10, DIGITS).eval()
    x = torch.randn(3, *DIGITS)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 10)
    saved = saved_spec(spec, model)
    assert saved["source"] == kind == model_ref(spec).source
    payload = {"model": saved, "num_classes": 10, "input_shape": list(DIGITS), "state_dict": model.state_dict()}
    torch.save(payload, tmp_path / "ckpt.pt")
    (tmp_path / "hf_resnet" / "config.json").unlink()  # a checkpoint needs no HF directory
    policy = CodePolicy(named=frozenset({TARGET["_target_"]}))  # the user names their callable
    rebuilt = model_from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True), policy, "ckpt.pt").eval()
    assert torch.equal(rebuilt(x), logits)


def test_torchvision_source_applies_the_cifar_stem_rule():
    small = create_model("torchvision:resnet18", 10, (3, 32, 32))
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert count_params(small) == count_params(create_model("resnet18", 10, (3, 32, 32)))
    large = create_model("torchvision:resnet18", 10, (3, 224, 224))
    assert large.conv1.kernel_size == (7, 7) and large.fc.out_features == 10
    mobile = create_model("torchvision:mobilenet_v3_small", 10, (1, 32, 32), width_mult=0.25)
    assert mobile.features[0][0].stride == (1, 1) and mobile.features[0][0].in_channels == 1
    with pytest.raises(KdclError, match="no CIFAR stem rule(.|\n)*cifar_stem=auto"):
        create_model("torchvision:squeezenet1_1", 10, (3, 32, 32), cifar_stem=True)


def test_timm_model_for_the_data_and_its_bad_names():
    model = create_model("timm:test_resnet", 10, DIGITS)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.get_classifier().out_features == 10 and first_conv.in_channels == 1
    with pytest.raises(KdclError, match="timm:test_resnet(.|\n)*widht(.|\n)*does not take it(.|\n)*student.kwargs={}"):
        create_model("timm:test_resnet", 10, DIGITS, widht=3)
    with pytest.raises(KdclError, match="timm has no model 'resnet_nope'"):
        create_model("timm:resnet_nope", 10, DIGITS)
    with pytest.raises(KdclError, match="timm has no model 'resnet_18'") as err:
        create_model("timm:resnet_18", 10, DIGITS)
    assert err.value.fix.startswith("did you mean timm:resnet18?")


# --------------------------------------------------------------------------- failures, one message each
def test_unknown_source_and_missing_packages(monkeypatch, tmp_path):
    with pytest.raises(KdclError, match="unknown model source 'tf'(.|\n)*timm:NAME"):
        model_ref({"name": "tf:resnet"})
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in ("timm:test_resnet", f"hf:{tmp_path}"):
        with pytest.raises(KdclError, match=r"needs the package (timm|transformers)(.|\n)*kdcl\[models\]"):
            create_model(name, 10, DIGITS)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(KdclError, match=r"w.safetensors needs the package safetensors,(.|\n)*kdcl\[models\]"):
        safetensors_file(tmp_path / "w.safetensors", TORCHVISION, None, "teacher.checkpoint", CodePolicy())


def test_target_that_cannot_be_imported_or_built(tmp_path):
    with pytest.raises(KdclError, match="cannot be imported(.|\n)*PYTHONPATH(.|\n)*kdcl eval"):
        build_model({"_target_": "no_such_package.nets.build"}, 10, DIGITS)
    with pytest.raises(KdclError, match="returned a str, not an nn.Module"):
        build_model({"_target_": "tiny_nets.not_a_network"}, 10, DIGITS)
    with pytest.raises(KdclError, match="unexpected keyword argument 'depth'(.|\n)*kwargs=\\{\\}"):
        build_model({"_target_": "tiny_nets.tiny_cnn", "kwargs": {"depth": 3}}, 10, DIGITS)
    # kdcl eval of a checkpoint whose package is gone: the same message
    ckpt = {"model": {"source": "_target_", "name": "gone.nets.build", "_target_": "gone.nets.build", "kwargs": {}}}
    with pytest.raises(KdclError, match="'gone.nets' cannot be imported(.|\n)*PYTHONPATH"):
        model_from_checkpoint(
            {**ckpt, "num_classes": 10, "input_shape": list(DIGITS), "state_dict": {}}, CodePolicy(any_target=True), "c"
        )


def test_the_custom_option_takes_a_name_or_target_without_other_kwargs(compose_cfg):
    cfg = compose_cfg(["student=custom", "student.name=timm:test_resnet", "teacher=custom", "teacher._target_=a.b"])
    assert cfg["student"]["kwargs"] == {} == cfg["teacher"]["kwargs"]
    validate(cfg)
    with pytest.raises(KdclError, match="names no model(.|\n)*student=custom student.name=timm:resnet18"):
        validate(compose_cfg(["student=custom"]))


def test_target_composes_validates_and_is_never_instantiated(compose_cfg):
    cfg = compose_cfg(["teacher._target_=never_imported_pkg.nets.build", "student._target_=tiny_nets.tiny_cnn"])
    assert cfg["teacher"]["_target_"] == "never_imported_pkg.nets.build"
    validate(cfg)
    assert "never_imported_pkg" not in sys.modules
    with pytest.raises(KdclError, match="teacher._target_='build' is not allowed"):
        validate(compose_cfg(["teacher._target_=build"]))


def test_offline_pretrained_is_one_message(monkeypatch, hf_dir):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail without retries
    fix = "(.|\n)*fix: download them once where there is internet(.|\n)*teacher.checkpoint=PATH"
    with pytest.raises(
        KdclError, match=f"the pretrained weights of model timm:test_resnet could not be downloaded{fix}"
    ):
        create_model("timm:test_resnet", 10, DIGITS, pretrained=True)
    with pytest.raises(KdclError, match=f"the weights of model hf:org/no-such-model could not be downloaded{fix}"):
        create_model("hf:org/no-such-model", 10, DIGITS, pretrained=True)
    with pytest.raises(KdclError, match=f"the config of model hf:org/no-such-model could not be downloaded{fix}"):
        create_model("hf:org/no-such-model", 10, DIGITS)
    with pytest.raises(KdclError, match=f"the weights of model hf:{hf_dir}"):  # a directory without weights
        create_model(f"hf:{hf_dir}", 10, DIGITS, pretrained=True)


def test_an_unreachable_hub_is_read_from_the_cache_only_without_retries(monkeypatch, tmp_path):
    """No route to the Hub: one probe, then huggingface_hub's offline mode, so a file not in
    the cache fails without the client's retries (each of which sleeps); for a local
    directory or behind a proxy, no probe."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    probes, sleeps = [], []

    def no_route(address, timeout):
        probes.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    hub_unreachable.cache_clear()
    try:
        with hub_files(f"hf:{tmp_path}", "the config"):
            assert probes == []  # a local directory needs no Hub
        with pytest.raises(KdclError, match="the config of model hf:org/no-such-model could not be downloaded"):
            create_model("hf:org/no-such-model", 10, DIGITS)
        assert probes == [((urlsplit(huggingface_hub.constants.ENDPOINT).hostname, 443), HUB_TIMEOUT_S)]
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and sleeps == []
        hub_unreachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
        assert not hub_unreachable() and len(probes) == 1  # the Hub may answer through the proxy
    finally:
        hub_unreachable.cache_clear()


@pytest.mark.slow
def test_offline_pretrained_stops_the_cli_before_training(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = ["student=custom", "student.name=timm:test_resnet", "student.pretrained=true"]
    result = cli("train", *args, f"hydra.run.dir={out}")
    assert_clean_error(result, "the pretrained weights of model timm:test_resnet", "teacher.checkpoint=PATH")
    assert result.returncode == 2 and not (out / "teacher" / "metrics.csv").exists()  # nothing trained


# --------------------------------------------------------------------------- teacher weights from files
def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    torch.save(model.state_dict(), path)


def save_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    torch.jit.save(torch.jit.trace(model.eval(), torch.zeros(1, *DIGITS)), path)


@pytest.mark.parametrize(
    ("save", "filename"),
    [(save_state_dict, "weights.pth"), (save_safetensors, "weights.safetensors"), (save_torchscript, "scripted.pt")],
    ids=["state_dict", "safetensors", "torchscript"],
)
def test_foreign_weights_load_as_the_teacher_they_came_from(compose_cfg, tmp_path, save, filename):
    file = tmp_path / filename
    cfg = compose_cfg(
        [*QUICK, "teacher=custom", f"teacher.name={TORCHVISION['name']}", "teacher.kwargs.width_mult=0.25"]
    )
    assert cfg["teacher"]["kwargs"] == TORCHVISION["kwargs"]
    run = start_run({**cfg, "teacher": {**cfg["teacher"], "checkpoint": str(file)}}, tmp_path / "run")
    torch.manual_seed(3)
    original = build_model(TORCHVISION, run.data.num_classes, run.data.input_shape)
    _, x, _ = next(run.data.train.batches([torch.arange(256)]))
    with torch.no_grad():  # BatchNorm statistics of its own, which eval mode then uses
        original.train()(run.data.preprocess(x, train=False))
    save(original.eval(), file)
    expected = evaluate(original, run.data.test, run.data, run.trainer)
    check_losses(run)
    teacher_stage(run)
    row = run.rows["teacher"]
    assert row["test_acc"] == pytest.approx(expected.acc, abs=1e-9)
    assert torch.allclose(run.test_logits["teacher"], expected.logits, atol=1e-5)
    assert row["seconds"] == 0 and not (tmp_path / "run" / "teacher" / "metrics.csv").exists()  # evaluated, not trained


def test_hf_directory_loads_as_a_teacher(compose_cfg, tmp_path):
    from transformers import AutoModelForImageClassification

    cfg = compose_cfg(QUICK)
    data = load_data(cfg["dataset"], torch.device("cpu"), False, cfg["seed"])
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(tiny_hf_config()).save_pretrained(tmp_path / "trained")
    loaded = load_teacher(tmp_path / "trained", cfg["teacher"], data, "teacher.checkpoint", CodePolicy())
    again = build_model({"name": f"hf:{tmp_path / 'trained'}"}, 10, DIGITS, pretrained=True).eval()
    x = torch.randn(2, *DIGITS)
    assert loaded.arch == f"hf:{tmp_path / 'trained'}" and torch.allclose(loaded.model.eval()(x), again(x))


def test_mismatched_weights_are_one_message_expected_vs_found(compose_cfg, tmp_path):
    from transformers import AutoModelForImageClassification

    cfg = compose_cfg(QUICK)
    data = load_data(cfg["dataset"], torch.device("cpu"), False, cfg["seed"])
    five = build_model(TORCHVISION, 5, DIGITS)
    save_state_dict(five, tmp_path / "five.pth")
    save_torchscript(five, tmp_path / "five.pt")
    AutoModelForImageClassification.from_config(tiny_hf_config(num_labels=3)).save_pretrained(tmp_path / "three")
    spec = {**cfg["teacher"], **TORCHVISION}
    with pytest.raises(KdclError) as info:
        load_teacher(tmp_path / "five.pth", spec, data, "teacher.checkpoint", CodePolicy())
    message = str(info.value)
    assert "do not fit" in message and "(5, " in message and "(10, " in message and "head of 10 outputs" in message
    with pytest.raises(KdclError, match=r"gives outputs \(2, 5\) for a batch of 2, expected \(2, 10\)"):
        load_teacher(tmp_path / "five.pt", spec, data, "teacher.checkpoint", CodePolicy())
    with pytest.raises(KdclError, match="has 3 classes and 1 input channels, the data 10 and 1(.|\n)*fine-tune"):
        load_teacher(tmp_path / "three", spec, data, "teacher.checkpoint", CodePolicy())
    with pytest.raises(KdclError, match="directory without config.json(.|\n)*safetensors"):
        load_teacher(tmp_path, spec, data, "teacher.checkpoint", CodePolicy())


def test_a_teacher_that_does_not_fit_stops_the_run_before_anything_trains(compose_cfg, tmp_path):
    save_state_dict(build_model(TORCHVISION, 5, DIGITS), tmp_path / "five.pth")
    cfg = compose_cfg(QUICK)
    cfg["teachers"] = ["cnn_small", {**TORCHVISION, "checkpoint": str(tmp_path / "five.pth")}]  # the second
    with pytest.raises(KdclError, match="five.pth as model torchvision:mobilenet_v3_small(.|\n)*do not fit"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "teacher" / "metrics.csv").exists()


# --------------------------------------------------------------------------- the CLI, end to end
@pytest.mark.slow
@pytest.mark.parametrize(
    "models",
    [
        ["teacher=custom", "teacher.name=timm:test_resnet", "student=custom", "student.name=hf:HF_DIR"],
        [
            "teacher=custom",
            "teacher._target_=tiny_nets.tiny_cnn",
            "teacher.kwargs.width=8",
            "student=custom",
            f"student.name={TORCHVISION['name']}",
            "student.kwargs.width_mult=0.25",
        ],
    ],
    ids=["timm-teacher-hf-student", "target-teacher-torchvision-student"],
)
def test_cli_trains_each_source_and_eval_reproduces_it(cli, tmp_path, hf_dir, target_importable, models):
    run_dir = tmp_path / "run"
    overrides = [m.replace("HF_DIR", str(hf_dir)) for m in models]
    train = cli("train", *QUICK, "trainer.epochs=1", "baseline=false", *overrides, f"hydra.run.dir={run_dir}")
    assert train.returncode == 0, train.stderr
    summary = pd.read_csv(run_dir / "summary.csv").set_index("model")
    assert summary.loc["teacher", "arch"] in " ".join(overrides)
    named = [o.partition("=")[2] for o in overrides if o.startswith("teacher._target_=")]
    trust = [f"trust_code=[{','.join(named)}]"] if named else []  # the user names the callable to rebuild it
    for stage in ("teacher", "distill"):
        eval_dir = tmp_path / f"eval_{stage}"
        result = cli("eval", f"checkpoint={run_dir / stage / 'best.pt'}", *trust, f"hydra.run.dir={eval_dir}")
        assert result.returncode == 0, result.stderr
        ev = pd.read_csv(eval_dir / "eval.csv").iloc[0]
        assert ev["acc"] == pytest.approx(summary.loc[stage, "test_acc"], abs=1e-9)
        assert ev["model"] == summary.loc[stage, "arch"]


def test_stage_cache_key_has_a_target_only_when_one_is_set(compose_cfg):
    """Entries stored before _target_ existed still hit: a null _target_ is not in the key."""
    cpu = TrainSettings(torch.device("cpu"), epochs=1, batch_size=64, eval_batch_size=512, amp=False)
    plain = stage_key(compose_cfg([]), "teacher", cpu)["model"]
    assert "_target_" not in plain and plain["name"] == "cnn"
    custom = stage_key(compose_cfg(["teacher._target_=tiny_nets.tiny_cnn"]), "teacher", cpu)["model"]
    assert custom["_target_"] == "tiny_nets.tiny_cnn"
