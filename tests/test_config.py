"""Every config option composes; out-of-range values are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdcl.config import CONF_DIR
from kdcl.config import validate
from kdcl.curricula import PACINGS, SCORERS
from kdcl.data import DATASETS
from kdcl.errors import KdclError
from kdcl.losses import LOSSES
from kdcl.models import MODELS
from kdcl.optim import OPTIMIZERS, SCHEDULES

GROUPS = ["teacher", "student", "dataset", "curriculum", "distill", "optimizer", "scheduler", "trainer"]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def check_names(cfg: dict) -> None:
    """Every name a config selects is registered."""
    assert cfg["teacher"]["name"] in MODELS and cfg["student"]["name"] in MODELS
    assert cfg["dataset"]["name"] in DATASETS
    assert cfg["distill"]["name"] in LOSSES
    assert cfg["optimizer"]["name"] in OPTIMIZERS and cfg["scheduler"]["name"] in SCHEDULES
    if cfg["curriculum"]["scorer"]:
        assert cfg["curriculum"]["scorer"] in SCORERS and cfg["curriculum"]["pacing"]["name"] in PACINGS


def test_every_group_is_a_folder_of_options():
    for group in [*GROUPS, "experiment"]:
        assert options(group), group
    assert {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "npz", "fake"} <= set(options("dataset"))
    assert {"kd", "mse", "none"} <= set(options("distill"))
    assert {"none", "teacher_loss"} <= set(options("curriculum"))
    assert {"resnet50_to_mobilenet", "cifar10_cpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(compose_cfg, group):
    for option in options(group):
        overrides = [f"{group}={option}"] + (["dataset.root=/data"] if option == "npz" else [])
        cfg = compose_cfg(overrides)
        check_names(cfg)
        validate(OmegaConf.create(cfg))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_honours_quick_knobs(compose_cfg, experiment):
    cfg = compose_cfg([f"+experiment={experiment}", "trainer.epochs=1", "dataset.max_train_samples=64"])
    check_names(cfg)
    assert cfg["trainer"]["epochs"] == 1 and cfg["dataset"]["max_train_samples"] == 64


def test_resnet50_to_mobilenet_recipe(compose_cfg):
    cfg = compose_cfg(["+experiment=resnet50_to_mobilenet"])
    assert (cfg["teacher"]["name"], cfg["student"]["name"], cfg["dataset"]["name"]) == ("resnet50", "mobilenet_v2", "cifar10")
    assert cfg["trainer"]["epochs"] == 200 and cfg["scheduler"]["name"] == "cosine"
    assert (cfg["distill"]["alpha"], cfg["distill"]["temperature"]) == (0.9, 4.0)
    assert cfg["dataset"]["crop_padding"] == 4 and cfg["dataset"]["flip"]


@pytest.mark.parametrize(
    ("override", "key"),
    [("distill.alpha=1.5", "distill.alpha"), ("distill.alpha=-0.1", "distill.alpha"),
     ("distill.temperature=0", "distill.temperature"), ("trainer.epochs=0", "trainer.epochs"),
     ("optimizer.lr=0", "optimizer.lr"), ("dataset.val_fraction=1.0", "dataset.val_fraction"),
     ("curriculum.pacing.start=0", "curriculum.pacing.start")],
)
def test_out_of_range_values_are_named(compose_cfg, override, key):
    with pytest.raises(KdclError, match=key.replace(".", r"\.")) as err:
        validate(OmegaConf.create(compose_cfg([override])))
    assert err.value.fix and "must be" in err.value.fix


@pytest.mark.parametrize(
    ("override", "key"),
    [("curriculum.order=hardest_first", "curriculum.order"), ("curriculum.pacing.name=cubic", "curriculum.pacing.name"),
     ("distill.sample_weight=trust", "distill.sample_weight"), ("curriculum.scorer=loss", "curriculum.scorer")],
)
def test_unknown_names_are_refused_before_training(compose_cfg, override, key):
    with pytest.raises(KdclError, match=key.replace(".", r"\.")) as err:
        validate(OmegaConf.create(compose_cfg([override])))
    assert "choose one of" in err.value.fix


def test_every_loss_has_its_option_file():
    """An arm that switches losses starts from conf/distill/<name>.yaml."""
    assert set(LOSSES.names()) <= set(options("distill"))
    for name in LOSSES.names():
        assert OmegaConf.load(Path(CONF_DIR) / "distill" / f"{name}.yaml").name == name
