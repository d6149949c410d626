"""The ImageNet benchmark: MobileNet-V1 against its paper, top-5 accuracy against a hand
count, the recipes of conf/experiment/imagenet (composed, validated, their networks taking
torchvision's weights), and one recipe run end to end on a small folder of JPEG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from helpers import compose_config
from hydra import compose, initialize_config_dir

from kdcl.commands.job import plain_config
from kdcl.config.checks import validate
from kdcl.config.options import CONF_DIR
from kdcl.data import load_data
from kdcl.errors import KdclError
from kdcl.models import build_model, count_macs, count_params, create_model
from kdcl.models.imagenet_nets import MOBILENET_V1_STAGES
from kdcl.scenarios.record import run_record
from kdcl.scenarios.standard import SUMMARY_COLUMNS, run_pipeline
from kdcl.train.engine import TrainSettings, evaluate, top5_accuracy

CPU = torch.device("cpu")
RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "experiment" / "imagenet").glob("*.yaml"))
# recipe -> (teacher, student, DKD's β), from mdistiller's configs/imagenet/<pair>/dkd.yaml
PAIRS = {
    "resnet34_resnet18": ("resnet34", "resnet18", 0.5),
    "resnet50_mobilenet_v1": ("resnet50", "mobilenet_v1", 2.0),
}
GIVEN = ["dataset.root=/data/imagenet", "teacher.checkpoint=/weights/teacher.pth"]  # the data (required), the teacher


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


# --------------------------------------------------------------------------- recipes
def test_the_suite_holds_every_pair():
    assert sorted(PAIRS) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_to_the_benchmark_recipe(recipe: str):
    cfg = compose_config([f"+experiment=imagenet/{recipe}", *GIVEN])
    validate(cfg)
    teacher, student, beta = PAIRS[recipe]
    assert (cfg["teacher"]["name"], cfg["student"]["name"]) == (teacher, student)
    assert cfg["teacher"]["checkpoint"] == "/weights/teacher.pth" and not cfg["teacher"]["pretrained"]
    data = cfg["dataset"]
    assert (data["name"], data["root"], data["image_size"]) == ("imagefolder", "/data/imagenet", 224)
    views = (data["train_view"], data["eval_crop_ratio"], data["crop_scale"], data["flip"], data["crop_padding"])
    assert views == ("random_resized_crop", 0.875, [0.08, 1.0], False, 0)  # the reference view, 256 → 224
    assert (data["mean"], data["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (cfg["trainer"]["epochs"], cfg["trainer"]["batch_size"]) == (100, 512)
    assert cfg["optimizer"] == {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    assert cfg["scheduler"]["name"] == "step" and cfg["scheduler"]["gamma"] == 0.1
    assert [round(m * 100) for m in cfg["scheduler"]["milestones"]] == [30, 60, 90]
    assert cfg["curriculum"]["name"] == "none"
    dkd = {k: cfg["distill"][k] for k in ("name", "temperature", "tckd_weight", "nckd_weight", "warmup_epochs")}
    assert dkd == {"name": "dkd", "temperature": 1.0, "tckd_weight": 1.0, "nckd_weight": beta, "warmup_epochs": 1}
    assert cfg["arms"] == {"kd": {"distill": {"name": "kd", "alpha": 0.5, "temperature": 1.0}}}


def test_recipe_asks_for_the_data():
    """``kdcl train`` reads the config as :func:`plain_config` does: the missing folder is one message."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=imagenet/resnet34_resnet18"])
    with pytest.raises(KdclError, match="dataset.root is required but has no value"):
        plain_config(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_torchvision_weights_fit_the_recipes_networks(recipe: str):
    """The teacher's weights file is torchvision's state_dict: the recipe's teacher (and the
    ResNet-18 student) take it key for key and shape for shape at 1000 classes."""
    cfg = compose_config([f"+experiment=imagenet/{recipe}", *GIVEN])
    for role in ("teacher", "student"):
        name = cfg[role]["name"]
        if name in torchvision.models.list_models():
            model = build_model(cfg[role], 1000, (3, 64, 64))  # small images keep the ImageNet stem
            model.load_state_dict(torchvision.models.get_model(name, weights=None).state_dict())


# --------------------------------------------------------------------------- end to end
def jpeg_folder(root: Path, classes: int, per_split: dict[str, int], side: int = 80) -> Path:
    """``root/<split>/class_NN/K.JPEG``: random ``side``×``side`` colour images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.JPEG", quality=80)
    return root


@pytest.mark.slow
def test_resnet50_mobilenet_v1_runs_end_to_end_on_jpeg_files(tmp_path: Path):
    """``+experiment=imagenet/resnet50_mobilenet_v1`` on 12 classes of 80 px JPEGs at 64 px: the
    record pass (``scenario=record``) stores the teacher's soft labels, then a run of one epoch
    of one step per stage replays them, then ``kdcl eval`` of the distilled student. 12 classes, so
    that top-5 accuracy is measured (above 10) and not 1 by construction (5 of 12). The teacher
    is an untrained ResNet-50 given as a state_dict (``teacher.checkpoint``, the recipe's own
    path; no pretrained weights: there is no internet here), evaluated and not trained."""
    from kdcl.commands.eval import run_eval

    root = jpeg_folder(tmp_path / "images", 12, {"train": 5, "test": 2})
    cfg = compose_config(["+experiment=imagenet/resnet50_mobilenet_v1", f"dataset.root={root}"])
    teacher = build_model(cfg["teacher"], 12, (3, 64, 64))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    cfg = compose_config(
        [
            "+experiment=imagenet/resnet50_mobilenet_v1",
            f"dataset.root={root}",
            f"teacher.checkpoint={tmp_path / 'teacher.pth'}",
            "dataset.image_size=64",
            "dataset.max_train_samples=48",  # 4 a class: 1 for validation, 3 to train on
            "dataset.val_fraction=0.25",
            "dataset.num_workers=0",
            "trainer.epochs=1",
            "trainer.batch_size=36",  # one step a stage
            "logger=[]",
            "distill.teacher_cache=views:2",  # stored soft labels: 2 crops an image, top-5 logits, on disk
            "distill.teacher_cache_topk=5",
            "distill.teacher_cache_store=disk",
            "cache=true",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    validate(cfg)
    run_record({**cfg, "scenario": {"name": "record"}}, tmp_path / "record")  # records the teacher's soft labels
    (store,) = (tmp_path / "cache").glob("soft_labels-*")
    recorded = pd.read_csv(tmp_path / "record" / "soft_labels.csv")
    assert recorded["distill"].tolist() == ["distill", "kd"] and set(recorded["folder"]) == {str(store)}
    stamps = {p: p.stat().st_mtime_ns for p in store.glob("shard_*.npy")}
    out = tmp_path / "run"
    run_pipeline(cfg, out)  # replays them: no shard written
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["model"]) == ["teacher", "baseline", "distill", "kd"]
    assert summary["test_acc_top5"].between(0, 1).all()
    assert (summary["test_acc_top5"] >= summary["test_acc"]).all()
    rows = summary.set_index("model")
    assert not (out / "teacher" / "metrics.csv").exists()  # evaluated, not trained
    student = create_model("mobilenet_v1", num_classes=12, input_shape=(3, 64, 64))
    assert rows.loc["distill", "params"] == count_params(student)
    assert rows.loc["distill", "distill"] == "dkd" and rows.loc["kd", "distill"] == "kd"
    metrics = pd.read_csv(out / "distill" / "metrics.csv")
    assert metrics["step"].tolist() == [1] and metrics["val_acc_top5"].between(0, 1).all()

    (tmp_path / "eval").mkdir()
    evaluated = run_eval(str(out / "distill" / "best.pt"), None, "cpu", 16, tmp_path / "eval")
    on_disk = pd.read_csv(tmp_path / "eval" / "eval.csv")
    assert on_disk.loc[0, "examples"] == 24
    assert on_disk.loc[0, "acc_top5"] == pytest.approx(rows.loc["distill", "test_acc_top5"])
    assert evaluated.loc[0, "acc"] == pytest.approx(rows.loc["distill", "test_acc"])
