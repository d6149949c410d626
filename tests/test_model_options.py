"""Model options: one file in conf/models is an option of both ``teacher`` and ``student``
(kdcl.config.models), for composition, ``--help``, sweeps and the option readers alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kdcl.config.checks import validate
from kdcl.config.options import (
    CONF_DIR,
    MODEL_FOLDER,
    MODEL_GROUPS,
    model_option,
    option_folder,
    teacher_specs,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(CONF_DIR) / "models"
NAMES = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))
NAMED = [n for n in NAMES if OmegaConf.load(MODEL_DIR / f"{n}.yaml").name]  # custom names none: the command line does
TEACHER_BASE = {
    "kwargs": {},
    "pretrained": False,
    "_target_": None,
    "trust_remote_code": False,
    "checkpoint": None,
    "route_points": 0,
}
STUDENT_BASE = {
    "option": None,
    "kwargs": {},
    "pretrained": False,
    "_target_": None,
    "trust_remote_code": False,
    "init_from_teacher": False,
}


def listed(help_text: str, group: str) -> list[str]:
    """The options ``--help`` lists for ``group``."""
    line = next(line for line in help_text.splitlines() if line.startswith(f"{group}: "))
    return line.partition(": ")[2].split(", ")


def test_teacher_and_student_read_conf_model():
    assert NAMES and {"cnn", "mlp_small", "vgg", "vgg_small", "resnet50"} <= set(NAMES)
    assert all(option_folder(group) == MODEL_DIR for group in MODEL_GROUPS)


@pytest.mark.parametrize("name", NAMED)
def test_every_model_option_composes_as_teacher_and_as_student(compose_cfg, name):
    option = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml"))
    cfg = compose_cfg([f"teacher={name}", f"student={name}"])
    assert cfg["teacher"] == {**TEACHER_BASE, **option}  # the teacher-only keys come from config.yaml
    assert cfg["student"] == {**STUDENT_BASE, **option}
    validate(cfg)
    assert model_option(name) == {"pretrained": False, "_target_": None, "trust_remote_code": False, **option}
    common = {"kwargs": {}, "pretrained": False, "_target_": None, "trust_remote_code": False, "checkpoint": None}
    assert teacher_specs({"teachers": [name]}) == [{**common, **option}]


def test_the_model_folder_is_no_key_of_a_command(compose_cfg):
    """A folder of conf/ is a group to Hydra, and ``KEY=VALUE`` for a key named like a group
    that is not in the defaults list is refused: conf/models, not conf/model, so that
    ``kdcl eval model=NAME`` (a plain state_dict's model) stays a key."""
    cfg = compose_cfg(["checkpoint=weights.pth", "model=cnn", "model_kwargs={width: 8}"], config_name="eval")
    assert (cfg["model"], cfg["model_kwargs"]) == ("cnn", {"width": 8})
    for command in ("config", "bench", "eval"):
        assert MODEL_FOLDER not in compose_cfg(
            ["checkpoint=weights.pth"] if command == "eval" else [], config_name=command
        )


def test_experiments_override_the_model_groups(compose_cfg):
    cfg = compose_cfg(["+experiment=cifar10_cpu"])  # override /teacher: vgg, override /student: vgg_small
    assert (cfg["teacher"]["name"], cfg["teacher"]["kwargs"]) == ("vgg", {"width": 32})
    assert (cfg["student"]["name"], cfg["student"]["kwargs"]) == ("vgg", {"width": 8})


def test_an_unknown_model_option_lists_the_model_options():
    with (
        initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"),
        pytest.raises(ConfigCompositionException) as err,
    ):
        compose(config_name="config", overrides=["student=resnet51"])
    assert "Could not find 'student/resnet51'" in str(err.value)
    assert all(f"\t{name}\n" in str(err.value) + "\n" for name in NAMES)


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ("student=mlp,vgg_small", ["mlp", "vgg_small"]),
        ("student=glob(vgg*)", ["vgg", "vgg13", "vgg8", "vgg_small"]),
        ("student=glob(*)", NAMES),
    ],
)
def test_a_sweep_over_model_options_expands_to_one_job_per_option(sweep, expected):
    """``kdcl train -m student=...``: Hydra's basic sweeper expands the overrides (a glob
    lists the group's options) into one job per model option, and each job composes."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        [jobs] = BasicSweeper.split_arguments(parser.parse_overrides([sweep, "teacher=cnn"]), None)
        students = [compose(config_name="config", overrides=job).student for job in jobs]
    assert [job[0] for job in jobs] == [f"student={name}" for name in expected]
    for name, student in zip(expected, students):
        assert OmegaConf.to_container(student) == {**STUDENT_BASE, **model_option(name)}


def test_help_lists_every_model_option_in_both_groups(cli):
    result = cli("train", "--help")
    assert result.returncode == 0, result.stderr
    assert listed(result.stdout, "teacher") == NAMES and listed(result.stdout, "student") == NAMES


def test_a_users_config_folders_add_teacher_and_student_options(cli, tmp_path, compose_cfg):
    """``--config-dir`` / ``hydra.searchpath``: a user's teacher/ and student/ folders add
    options; one named as a kdcl option is not used (kdcl's conf/ comes first, as for every group)."""
    user = tmp_path / "user"
    for group in MODEL_GROUPS:
        (user / group).mkdir(parents=True)
        (user / group / "wide_mlp.yaml").write_text("name: mlp\nkwargs: {hidden: [512]}\n")
    (user / "teacher" / "vgg.yaml").write_text("name: vgg\nkwargs: {width: 7}\n")
    result = cli("train", f"--config-dir={user}", "teacher=wide_mlp", "student=wide_mlp", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.teacher.kwargs.hidden == [512] and cfg.student.kwargs.hidden == [512]
    help_text = cli("train", f"--config-dir={user}", "--help").stdout
    assert listed(help_text, "teacher") == sorted([*NAMES, "wide_mlp"]) == listed(help_text, "student")
    cfg = compose_cfg([f"hydra.searchpath=[file://{user}]", "teacher=wide_mlp", "student=vgg"])
    assert cfg["teacher"]["kwargs"] == {"hidden": [512]} and cfg["student"]["kwargs"] == {"width": 32}
    assert compose_cfg([f"hydra.searchpath=[file://{user}]", "teacher=vgg"])["teacher"]["kwargs"] == {"width": 32}


@pytest.mark.slow  # its own processes
def test_a_file_dropped_in_conf_model_is_an_option_of_both_groups(tmp_path):
    """A checkout with one more file in conf/models: ``--help`` lists it under teacher and
    student, both compose with it, and the option readers (``teachers=[...]``) find it."""
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "kdcl", checkout / "kdcl", ignore=ignore)
    shutil.copytree(ROOT / "conf", checkout / "conf", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    (checkout / "conf" / "models" / "wide_mlp.yaml").write_text("# A wide MLP.\nname: mlp\nkwargs: {hidden: [512]}\n")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("HYDRA_FULL_ERROR", None)

    def kdcl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )

    help_text = kdcl("-m", "kdcl", "train", "--help").stdout
    assert listed(help_text, "teacher") == sorted([*NAMES, "wide_mlp"]) == listed(help_text, "student")
    result = kdcl("-m", "kdcl", "train", "teacher=wide_mlp", "student=wide_mlp", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.teacher.kwargs.hidden == [512] == cfg.student.kwargs.hidden
    probe = kdcl(
        "-c",
        "from kdcl.config.options import CONF_DIR, teacher_specs; "
        "print(CONF_DIR); print(teacher_specs({'teachers': ['wide_mlp']}))",
    )
    assert probe.returncode == 0, probe.stderr
    conf_dir, specs = probe.stdout.splitlines()
    assert conf_dir == str(checkout / "conf")
    assert specs == str(
        [
            {
                "kwargs": {"hidden": [512]},
                "pretrained": False,
                "_target_": None,
                "trust_remote_code": False,
                "checkpoint": None,
                "name": "mlp",
            }
        ]
    )
