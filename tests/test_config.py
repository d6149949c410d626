"""Every config option composes against the schema; bad values and unknown keys are refused by name."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import pytest
from helpers import compose_config
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kdcl.config import checks, schema
from kdcl.config.checks import composition_error, validate, validate_eval
from kdcl.config.options import (
    CONF_DIR,
    arch_label,
    base_keys,
    control_keys,
    distill_parts,
    option_folder,
    section_option,
    with_base_keys,
)
from kdcl.curricula import ORDERS, PACINGS, SCORERS
from kdcl.data import DATASETS
from kdcl.distill.losses import LOSSES
from kdcl.errors import KdclError
from kdcl.models.sources import model_ref
from kdcl.optim import OPTIMIZERS, SCHEDULES

GROUPS = ["teacher", "student", "dataset", "curriculum", "distill", "optimizer", "scheduler", "trainer", "scenario"]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in option_folder(group).glob("*.yaml"))


def check_names(cfg: dict) -> None:
    """Every name a config selects is registered (a model of another source by its source's check)."""
    for role in ("teacher", "student"):
        assert model_ref(cfg[role]).label == cfg[role]["name"]
    assert cfg["dataset"]["name"] in DATASETS
    assert cfg["distill"]["name"] in LOSSES
    assert cfg["optimizer"]["name"] in OPTIMIZERS and cfg["scheduler"]["name"] in SCHEDULES
    if cfg["curriculum"]["scorer"]:
        assert cfg["curriculum"]["scorer"] in SCORERS and cfg["curriculum"]["pacing"]["name"] in PACINGS


def test_every_group_is_a_folder_of_options():
    for group in [*GROUPS, "experiment"]:
        assert options(group), group
    assert {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "npz", "fake", "csv", "hf"} <= set(
        options("dataset")
    )
    assert {"kd", "mse", "none"} <= set(options("distill"))
    assert {"none", "teacher_loss"} <= set(options("curriculum"))
    assert {"resnet50_to_mobilenet", "cifar10_cpu"} <= set(EXPERIMENTS)


def missing_keys(cfg, path=""):
    """Keys left ``???``: a schema field no YAML file sets."""
    if isinstance(cfg, dict):
        return [k for key, v in cfg.items() for k in missing_keys(v, f"{path}{key}.")]
    return [path[:-1]] if cfg == "???" else []


# The keys a dataset option leaves for the user to set (``???``).
REQUIRED = {
    "npz": ["dataset.root=/data"],
    "imagefolder": ["dataset.root=/data"],
    "csv": ["dataset.root=/data"],
    "text_csv": ["dataset.root=/data"],
    "hf": ["dataset.path=/data"],
    "hf_text": ["dataset.path=/data"],
}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(compose_cfg, group):
    needs = {**REQUIRED, "custom": [f"{group}.name=cnn"]}
    for option in options(group):
        overrides = [f"{group}={option}", *needs.get(option, [])]
        cfg = compose_cfg(overrides)
        check_names(cfg)
        assert not missing_keys(cfg), (option, missing_keys(cfg))
        validate(OmegaConf.create(cfg))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_honours_quick_knobs(compose_cfg, experiment):
    cfg = compose_cfg([f"+experiment={experiment}", "trainer.epochs=1", "dataset.max_train_samples=64"])
    check_names(cfg)
    assert cfg["trainer"]["epochs"] == 1 and cfg["dataset"]["max_train_samples"] == 64


def test_cifar10_cpu_student_has_at_most_a_tenth_of_the_teachers_parameters(compose_cfg):
    from kdcl.models import count_params, create_model

    cfg = compose_cfg(["+experiment=cifar10_cpu"])
    params = {
        role: count_params(create_model(cfg[role]["name"], 10, (3, 32, 32), **cfg[role]["kwargs"]))
        for role in ("teacher", "student")
    }
    assert params["student"] <= params["teacher"] / 10
    assert cfg["curriculum"]["type"] == "none" and cfg["dataset"]["max_test_samples"] is None


def test_resnet50_to_mobilenet_recipe(compose_cfg):
    cfg = compose_cfg(["+experiment=resnet50_to_mobilenet"])
    assert (cfg["teacher"]["name"], cfg["student"]["name"], cfg["dataset"]["name"]) == (
        "resnet50",
        "mobilenet_v2",
        "cifar10",
    )
    assert cfg["trainer"]["epochs"] == 200 and cfg["scheduler"]["name"] == "cosine"
    assert (cfg["distill"]["alpha"], cfg["distill"]["temperature"]) == (0.9, 4.0)
    assert cfg["dataset"]["crop_padding"] == 4 and cfg["dataset"]["flip"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("distill.alpha=1.5", "distill.alpha"),
        ("distill.alpha=-0.1", "distill.alpha"),
        ("distill.temperature=0", "distill.temperature"),
        ("distill.temperature=-1", "distill.temperature"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("dataset.val_fraction=1.0", "dataset.val_fraction"),
        ("curriculum.pacing.start=0", "curriculum.pacing.start"),
        ("curriculum.pacing.full_at=1.5", "curriculum.pacing.full_at"),
    ],
)
def test_out_of_range_values_are_named(compose_cfg, override, key):
    with pytest.raises(KdclError, match=key.replace(".", r"\.")) as err:
        validate(OmegaConf.create(compose_cfg([override])))
    value = override.split("=")[1]
    assert (
        err.value.what == f"{key}={float(value)!r} is out of range"
        or err.value.what == f"{key}={value} is out of range"
    )
    assert err.value.fix == f"{key} must be {schema.lookup(schema.TrainConfig, key).allowed}"


# One value each rule refuses, for every key of the schemas with a range rule (option keys
# included); a rule added without an entry here fails test_every_rule_is_listed.
BAD = {
    "seed": -1,
    "trust_code": ["build"],  # an import path has a dot
    "cache_teacher_logits_mb": -1,
    "arms": {"a": {"distil": {}}},
    "assistants": [3],
    "teachers": "resnet8",
    "logger": ["csv"],  # the names are the keys of a mapping (logger=[csv] on the command line)
    "teacher.route_points": -1,
    "teacher._target_": "build",
    "student._target_": "build",
    "student.init_from_teacher": "trained",  # true, false or pretrained
    "born_again.generations": -1,
    "stages.teacher.epochs": 0,
    "stages.teacher.batch_size": 0,
    "stages.student.epochs": 0,
    "stages.student.batch_size": 0,
    "stages.teacher.label_smoothing": 1.0,
    "stages.student.label_smoothing": -0.1,
    "trainer.label_smoothing": 1.0,
    "trainer.mix": {"mixup": -0.2},
    "dataset.val_fraction": 0.0,
    "dataset.max_train_samples": 0,
    "dataset.max_test_samples": 0,
    "dataset.mean": "0.5",
    "dataset.std": [0.0],
    "dataset.crop_padding": -1,
    "dataset.num_workers": -1,
    "dataset.test_fraction": 1.0,
    "dataset.image_size": 0,
    "dataset.eval_crop_ratio": 0.0,
    "dataset.crop_scale": [0.5, 0.1],  # low above high
    "dataset.crop_ratio": [0.0, 1.0],
    "dataset.random_erasing": 1.5,
    "dataset.max_memory_gb": 0.0,
    "dataset.vocab_size": 0,
    "dataset.token_mask": 1.0,
    "dataset.data_files": 5,
    "dataset.train_samples": 0,
    "dataset.test_samples": 0,
    "dataset.image_shape": [3, 16],
    "dataset.num_classes": 1,
    "curriculum.pacing.start": 0.0,
    "curriculum.pacing.full_at": 1.5,
    "curriculum.adaptive_delta": -0.1,
    "curriculum.weight_start": 1.5,
    "curriculum.lambda_start": 0.0,
    "curriculum.mu": 0.0,
    "curriculum.start_classes": 0,
    "curriculum.add_classes": 0,
    "curriculum.every_epochs": 0,
    "curriculum.threshold": 1.5,
    "distill.alpha": 1.5,
    "distill.temperature": 0.0,
    "distill.alpha_start": -0.5,
    "distill.temperature_start": 0.0,
    "distill.learnable_temperature": {"ramp": 5},
    "distill.teacher_noise": -0.1,
    "distill.input_noise": -0.1,
    "distill.teacher_weights": [1, -1],
    "distill.teacher_cache_shard_mb": 0.0,
    "distill.teacher_cache_topk": 0,
    "optimizer.lr": 0.0,
    "optimizer.weight_decay": -1e-4,
    "optimizer.momentum": 1.0,
    "optimizer.betas": [0.9],
    "scheduler.warmup_epochs": -1.0,
    "scheduler.min_factor": 1.5,
    "scheduler.milestones": [0.5, 1.5],
    "scheduler.gamma": 0.0,
    "trainer.epochs": 0,
    "trainer.batch_size": 0,
    "trainer.eval_batch_size": 0,
    "trainer.device": "gpu",
    "trainer.amp": "maybe",
    "trainer.early_stopping_patience": 0,
    "trainer.checkpoint_every_steps": 0,
    "trainer.threads": 0,
    "trainer.devices": 0,
    "trainer.progress_every_s": 0,
    "trainer.grad_clip_norm": 0,
    "trainer.ema_decay": 1.0,
    "trainer.log_every_steps": 0,
    "scenario.tasks": 1,
    "scenario.class_order": [1, 1],
    "scenario.arms": [],
    "scenario.memory_per_class": -1,
    "scenario.warmup_epochs": -1,
    "scenario.lwf.lam": -1.0,
    "scenario.lwf.temperature": 0.0,
}
# Options under which the option keys exist.
WHERE = {
    "dataset.image_size": ["dataset=imagefolder", "dataset.root=/data"],
    **{
        f"dataset.{key}": ["dataset=imagefolder", "dataset.root=/data"]
        for key in ("eval_crop_ratio", "crop_scale", "crop_ratio", "random_erasing")
    },
    "dataset.max_memory_gb": ["dataset=csv", "dataset.root=/data"],
    "dataset.vocab_size": ["dataset=text_csv", "dataset.root=/data"],
    "dataset.token_mask": ["dataset=hf_text", "dataset.path=/data"],
    "dataset.data_files": ["dataset=hf", "dataset.path=/data"],
    "dataset.train_samples": ["dataset=fake"],
    "dataset.test_samples": ["dataset=fake"],
    "dataset.image_shape": ["dataset=fake"],
    "dataset.num_classes": ["dataset=fake"],
    "optimizer.betas": ["optimizer=adamw"],
    "scheduler.milestones": ["scheduler=step"],
    "scheduler.gamma": ["scheduler=step"],
    **{
        key: ["scenario=class_incremental"]
        for key in (
            "scenario.tasks",
            "scenario.class_order",
            "scenario.arms",
            "scenario.memory_per_class",
            "scenario.warmup_epochs",
            "scenario.lwf.lam",
            "scenario.lwf.temperature",
        )
    },
}


def ruled_keys(cls: type, prefix: str = "") -> dict[str, schema.Entry]:
    keys = {**(schema.entries(schema.option_keys(cls)) if schema.option_keys(cls) else {}), **schema.entries(cls)}
    out = {}
    for name, entry in keys.items():
        if dataclasses.is_dataclass(entry.type):
            out.update(ruled_keys(entry.type, f"{prefix}{name}."))
        elif entry.check is not None:
            out[prefix + name] = entry
    return out


def test_every_rule_is_listed():
    assert set(BAD) == set(ruled_keys(schema.TrainConfig))


@pytest.mark.parametrize("key", sorted(BAD))
def test_every_rule_is_reachable(compose_cfg, key):
    """Each rule is met by the configured value and refuses its bad one, through ``validate``,
    in a config where the key exists."""
    cfg = compose_cfg(WHERE.get(key, []))
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    assert name in node, f"{key} is in no composed config"
    validate(cfg)
    bad = copy.deepcopy(cfg)
    node = bad
    for part in parents:
        node = node[part]
    node[name] = BAD[key]
    with pytest.raises(KdclError) as err:
        validate(bad)
    allowed = ruled_keys(schema.TrainConfig)[key].allowed
    assert err.value.what.startswith(f"{key}=") and err.value.fix == f"{key} must be {allowed}"


def test_eval_keys_and_rules():
    cfg = compose_config(["checkpoint=x.pt", "dataset=digits"], config_name="eval")
    validate_eval(cfg)
    for key, value in [("batch_size", 0), ("device", "gpu")]:
        with pytest.raises(KdclError, match=f"^{key}="):
            validate_eval({**cfg, key: value})
    with pytest.raises(KdclError, match=r"dataset\.val_fraction"):
        validate_eval({**cfg, "dataset": {**cfg["dataset"], "val_fraction": 1.0}})


def composition_failure(overrides: list[str], config_name: str = "config") -> KdclError:
    with (
        initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"),
        pytest.raises(ConfigCompositionException) as raised,
    ):
        compose(config_name=config_name, overrides=overrides)
    err = composition_error(raised.value, schema.EvalConfig if config_name == "eval" else schema.TrainConfig)
    assert err is not None, raised.value
    return err


@pytest.mark.parametrize(
    ("override", "what", "fix"),
    [
        ("trainer.epochs=abc", "trainer.epochs='abc' is not an integer", "trainer.epochs must be an integer ≥ 1"),
        ("trainer.epochs=2.5", "trainer.epochs=2.5 is not an integer", "trainer.epochs must be an integer ≥ 1"),
        ("distill.alpha=high", "distill.alpha='high' is not a number", "distill.alpha must be a number in [0, 1]"),
        (
            "trainer.channels_last=maybe",
            "trainer.channels_last='maybe' is not true or false",
            "trainer.channels_last must be true or false",
        ),
        ("trainer.epochz=3", "trainer.epochz=3: trainer has no key 'epochz'", "did you mean trainer.epochs?"),
        ("distill.alpah=0.1", "distill.alpah=0.1: distill has no key 'alpah'", "did you mean distill.alpha?"),
        ("seeed=1", "seeed=1: the config has no key 'seeed'", "did you mean seed?"),
    ],
)
def test_composition_errors_name_key_value_and_what_is_allowed(override, what, fix):
    err = composition_failure([override])
    assert err.what == what and err.fix.startswith(fix)


def test_open_sections_keep_option_keys_and_refuse_others(compose_cfg):
    assert compose_cfg(["distill=dkd", "distill.tckd_weight=2"])["distill"]["tckd_weight"] == 2
    err = composition_failure(["distill=kd", "distill.tckd_weight=2"])  # a key of another loss
    assert "distill has no key 'tckd_weight'" in err.what and "distill=NAME" in err.fix
    # model kwargs are the factory's arguments: new ones need no "+"
    assert compose_cfg(["teacher=resnet50", "teacher.kwargs.cifar_stem=false"])["teacher"]["kwargs"] == {
        "cifar_stem": False
    }


def test_closed_sections_refuse_keys_the_schema_does_not_list(compose_cfg):
    cfg = compose_cfg(["+trainer.patience=3"])  # "+" gets it past Hydra, not past validate
    with pytest.raises(KdclError, match=r"^trainer\.patience=3: trainer has no key 'patience'") as err:
        validate(cfg)
    assert "early_stopping_patience" in err.value.fix


def test_saved_configs_are_type_checked_too(compose_cfg):
    """A resumed run's config is plain YAML: validate checks its types as composition would."""
    cfg = compose_cfg([])
    cfg["trainer"]["epochs"] = "abc"
    with pytest.raises(KdclError) as err:
        validate(cfg)
    assert err.value.what == "trainer.epochs='abc' is not an integer"


def test_arms_are_checked_as_they_run(compose_cfg):
    cfg = compose_cfg(["arms={kd_random: {curriculum: {order: random}}, hot: {distill: {temperature: 0}}}"])
    with pytest.raises(KdclError, match=r"^arms\.hot\.distill\.temperature=0 is out of range"):
        validate(cfg)
    cfg = compose_cfg(["arms={kd_random: {curriculum: {ordr: random}}}"])
    with pytest.raises(KdclError, match=r"arms\.kd_random\.curriculum has no key 'ordr'"):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("curriculum.order=hardest_first", "curriculum.order"),
        ("curriculum.pacing.name=cubic", "curriculum.pacing.name"),
        ("distill.sample_weight=trust", "distill.sample_weight"),
        ("curriculum.scorer=loss", "curriculum.scorer"),
        ("curriculum.weights=medium", "curriculum.weights"),
        ("distill.teacher_cache_store=cloud", "distill.teacher_cache_store"),
        ("distill.teacher_cache=views:0", "distill.teacher_cache"),
        ("distill.teacher_cache=views", "distill.teacher_cache"),
        ("distill.teacher_cache=no_aug:2", "distill.teacher_cache"),
        ("distill.teacher_cache=online", "distill.teacher_cache"),
    ],
)
def test_unknown_names_are_refused_before_training(compose_cfg, override, key):
    with pytest.raises(KdclError, match=key.replace(".", r"\.")) as err:
        validate(OmegaConf.create(compose_cfg([override])))
    assert "choose one of" in err.value.fix


@pytest.mark.parametrize(("key", "registry"), sorted(checks._registered_names().items()))
def test_named_keys_list_their_registry(compose_cfg, key, registry):
    """A key that names a registry entry: every entry passes and the refusal lists the
    registry's entries, not a list of names of its own (schema.py has no rule for the names;
    a mapping, ``trainer.mix``, names entries by its keys, and its rule is on the values)."""
    assert list(registry), key
    cfg = compose_cfg([])
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    by_keys = isinstance(node.get(name), dict)
    assert by_keys or schema.lookup(schema.TrainConfig, key).check is None
    for entry in registry:  # teacher_cache lists views:K (K ≥ 1)
        node[name] = {entry: 1.0} if by_keys else entry.replace(":K (K ≥ 1)", ":3")
        checks._check_names(cfg, {key: registry})
    node[name] = {"no_such_entry": 1.0} if by_keys else "no_such_entry"
    with pytest.raises(KdclError) as err:
        checks._check_names(cfg, {key: registry})
    named = f"{key}.no_such_entry" if by_keys else f"{key}='no_such_entry'"
    assert err.value.what == f"{named} is not a known {registry.kind}"
    assert err.value.fix == f"choose one of: {', '.join(registry)}"


def test_class_order_names_a_class_order(compose_cfg):
    from kdcl.scenarios import REGISTERED_NAMES
    from kdcl.scenarios.class_incremental import CLASS_ORDERS

    assert set(CLASS_ORDERS) == {"natural", *ORDERS}
    cfg = compose_cfg(["scenario=class_incremental"])
    for order in [*CLASS_ORDERS, [2, 0, 1]]:
        validate({**cfg, "scenario": {**cfg["scenario"], "class_order": order}}, registries=REGISTERED_NAMES)
    with pytest.raises(KdclError, match=r"^scenario\.class_order='alphabetical' is not a known class order") as err:
        validate({**cfg, "scenario": {**cfg["scenario"], "class_order": "alphabetical"}}, registries=REGISTERED_NAMES)
    assert err.value.fix == f"choose one of: {', '.join(CLASS_ORDERS)}"


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_has_its_option_file(name):
    """An arm that switches losses starts from conf/distill/<name>.yaml."""
    assert name in options("distill")
    assert OmegaConf.load(Path(CONF_DIR) / "distill" / f"{name}.yaml").name == name


def test_the_distill_split_is_the_schemas():
    """The control's keys are ControlConfig's fields, DistillConfig is them plus the loss's
    name, and conf/base/distill.yaml holds them all but alpha and temperature (each loss
    option sets those); each option's own split is the next test's."""
    control = {f.name for f in dataclasses.fields(schema.ControlConfig)}
    assert set(control_keys()) == control == {f.name for f in dataclasses.fields(schema.DistillConfig)} - {"name"}
    assert set(base_keys("distill")) == control - {"alpha", "temperature"}


@pytest.mark.parametrize("name", LOSSES.names())
def test_a_loss_options_section_splits_into_loss_and_control(name):
    """The section splits into the loss's constructor arguments and the control's keys,
    nothing left over; composed alone takes a control key (alpha)."""
    control = {f.name for f in dataclasses.fields(schema.ControlConfig)}
    section = section_option("distill", name)
    loss, typed_control = distill_parts(section)
    own = set(inspect.signature(LOSSES.get(name)).parameters)
    assert loss["name"] == name and set(loss) - {"name"} <= own
    assert set(loss) | control == set(section)
    assert vars(typed_control) == {k: section[k] for k in control}
    assert own & control == ({"alpha"} if name == "composed" else set())


def test_typed_sections_read_by_attribute_keep_an_open_sections_own_keys():
    cfg = compose_config(["optimizer=sgd", "+curriculum.pacing.c=5"])
    optimizer = schema.typed(schema.OptimizerConfig, cfg["optimizer"], "optimizer")
    assert isinstance(optimizer, schema.OptimizerConfig) and optimizer.lr == cfg["optimizer"]["lr"]
    assert vars(optimizer) == cfg["optimizer"]  # momentum and nesterov are attributes too
    curriculum = schema.typed(schema.CurriculumConfig, cfg["curriculum"], "curriculum")
    assert isinstance(curriculum.pacing, schema.PacingConfig) and curriculum.pacing.c == 5
    trainer = {k: v for k, v in cfg["trainer"].items() if k != "threads"}
    with pytest.raises(KdclError, match=r"^trainer\.threads has no value"):
        schema.typed(schema.TrainerConfig, trainer, "trainer")


def test_bench_keys_are_checked():
    cfg = compose_config([], config_name="bench")
    validate(cfg, schema.BenchConfig)
    for key, value in [("warmup", 0), ("steps", 0), ("views", 0), ("naive_workers", -1), ("parity_epochs", -1)]:
        with pytest.raises(KdclError, match=f"^bench.{key}="):
            validate({**cfg, "bench": {**cfg["bench"], key: value}}, schema.BenchConfig)
    with pytest.raises(KdclError, match="has no key 'bench'"):
        validate(cfg)  # a train config has no bench section


def test_a_section_saved_before_a_shared_key_existed_gets_the_base_value():
    """An older checkpoint's dataset (no crop_padding_mode) reads as one composed today; its own values win."""
    base = OmegaConf.load(Path(CONF_DIR) / "base" / "dataset.yaml")
    saved = {"name": "digits", "flip": not base.flip}
    completed = with_base_keys("dataset", saved)
    assert completed["crop_padding_mode"] == base.crop_padding_mode
    assert completed["flip"] is (not base.flip) and completed["name"] == "digits"
    assert set(completed) == set(base) | {"name"}


def test_the_arch_column_names_the_option_while_the_spec_builds_its_network(compose_cfg):
    def arch(*overrides: str) -> str:
        return arch_label(compose_cfg(list(overrides))["student"])

    assert arch("student=vgg_small") == "vgg_small"
    assert arch("student=vgg_small", "student.kwargs.width=16") == "vgg"  # no longer that option's network
    assert arch("student=resnet18", "student.name=resnet34") == "resnet34"
    assert arch("student=custom", "student.name=timm:resnet18") == "timm:resnet18"
