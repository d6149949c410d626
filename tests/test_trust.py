"""A file from elsewhere never makes kdcl run code (kdcl.trust, docs/config.md#safe-loading).

Each case crafts the file or folder a hostile sender would, runs what a user would run, and
checks: exit 2 (or the one KdclError in-process), one message naming what was refused and
the opt-in, no traceback, and nothing called: a victim file keeps its contents and a
sentinel file is never created.
"""

from __future__ import annotations

import ast
import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICK, compose_config

from kdcl.errors import KdclError
from kdcl.files import write_replacing
from kdcl.models import build_model
from kdcl.scenarios.standard import load_predictions, run_pipeline
from kdcl.train.checkpoint import FORMAT, model_from_checkpoint, save_checkpoint
from kdcl.trust import CodePolicy, check_saved_config

DIGITS = [1, 8, 8]
KDCL = Path(__file__).resolve().parents[1] / "kdcl"
PRECIOUS = "keep me\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file the crafted input tries to empty (logging.basicConfig(filename=victim, filemode='w'))."""
    path = tmp_path / "victim.txt"
    path.write_text(PRECIOUS)
    return path


def evil_target(victim: Path) -> dict:
    """A checkpoint's model section that picks a function of the standard library and its arguments."""
    return {
        "source": "_target_",
        "name": "logging.basicConfig",
        "_target_": "logging.basicConfig",
        "kwargs": {"filename": str(victim), "filemode": "w", "force": True},
    }


def crafted_checkpoint(path: Path, model: dict) -> Path:
    """A kdcl checkpoint for the digits data that loads under weights_only=True: plain values only."""
    torch.save(
        {
            "format": FORMAT,
            "stage": "teacher",
            "model": model,
            "num_classes": 10,
            "input_shape": DIGITS,
            "normalization": {"mean": [0.0], "std": [1.0]},
            "config": {"dataset": {"name": "digits"}},
            "state_dict": {},
        },
        path,
    )
    return path


def evil_hf_dir(root: Path, sentinel: Path) -> Path:
    """An HF model folder whose config.json maps the auto classes to its own Python, which
    creates ``sentinel`` when imported."""
    folder = root / "evil_hf"
    folder.mkdir()
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"}
    config = {"model_type": "evil_net", "auto_map": auto_map, "num_labels": 10, "num_channels": 1}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n")
    return folder


def refused(result, *phrases: str) -> None:
    """Exit 2, one message holding ``phrases``, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and output.count("error:") == 1, output
    for phrase in phrases:
        assert phrase in output, (phrase, output)


# --------------------------------------------------------------------------- 1. a checkpoint picks a function
@pytest.mark.parametrize("command", ["eval", "export", "teacher.checkpoint"])
def test_a_checkpoints_target_is_not_called(cli, tmp_path, victim, command):
    evil = crafted_checkpoint(tmp_path / "evil.pt", evil_target(victim))
    args = {
        "eval": ["eval", f"checkpoint={evil}"],
        "export": ["export", f"checkpoint={evil}", "format=torchscript"],
        "teacher.checkpoint": ["train", f"teacher.checkpoint={evil}", "trainer.epochs=1"],
    }[command]
    result = cli(*args, f"hydra.run.dir={tmp_path / 'out'}")
    refused(result, "_target_=logging.basicConfig", "trust_code=[logging.basicConfig]", "nothing was imported")
    assert victim.read_text() == PRECIOUS


def test_a_stage_cache_entrys_target_is_not_called(tmp_path, victim):
    """A cache entry's best.pt rewritten to name a function: the next run that hits it refuses."""
    cfg = compose_config([*QUICK, "trainer.epochs=1", "cache=true", f"cache_dir={tmp_path / 'cache'}"])
    cfg = {**cfg, "baseline": False, "curriculum": {**cfg["curriculum"], "type": "none"}}
    run_pipeline(cfg, tmp_path / "first")
    (entry,) = (tmp_path / "cache").glob("*/files/best.pt")
    ckpt = torch.load(entry, weights_only=True)
    torch.save({**ckpt, "model": evil_target(victim)}, entry)
    with pytest.raises(KdclError, match=r"_target_=logging.basicConfig(.|\n)*nothing was imported") as err:
        run_pipeline(cfg, tmp_path / "second")
    assert "trust_code=[logging.basicConfig]" in err.value.fix
    assert victim.read_text() == PRECIOUS


def test_the_user_names_the_target_a_checkpoint_may_rebuild(tmp_path):
    """Named by the user's config or by trust_code, the same target rebuilds; another is refused."""
    net = build_model({"_target_": "tiny_nets.tiny_cnn"}, 10, tuple(DIGITS))
    ckpt = {
        "model": {"source": "_target_", "name": "tiny_nets.tiny_cnn", "_target_": "tiny_nets.tiny_cnn", "kwargs": {}},
        "num_classes": 10,
        "input_shape": DIGITS,
        "state_dict": net.state_dict(),
    }
    for policy in (
        CodePolicy.of({"teacher": {"_target_": "tiny_nets.tiny_cnn"}, "trust_code": False}),
        CodePolicy.of({"trust_code": ["tiny_nets.tiny_cnn"]}),
        CodePolicy.of({"trust_code": True}),
    ):
        assert isinstance(model_from_checkpoint(ckpt, policy, "best.pt"), torch.nn.Module)
    for policy in (CodePolicy.of({"trust_code": False}), CodePolicy.of({"trust_code": ["tiny_nets.other"]})):
        with pytest.raises(KdclError, match="best.pt names code to run, _target_=tiny_nets.tiny_cnn"):
            model_from_checkpoint(ckpt, policy, "best.pt")
    bad_kwargs = {**ckpt, "model": {**ckpt["model"], "kwargs": {"width": torch.zeros(1)}}}
    with pytest.raises(KdclError, match="not plain numbers"):
        model_from_checkpoint(bad_kwargs, CodePolicy(any_target=True), "best.pt")


def test_policy_collects_every_target_of_the_users_config():
    cfg = {
        "teacher": {"_target_": "a.build"},
        "teachers": [{"_target_": "b.build"}, "cnn"],
        "assistants": [{"name": "x", "_target_": None}],
        "trust_code": ["c.build"],
    }
    assert CodePolicy.of(cfg) == CodePolicy(named=frozenset({"a.build", "b.build", "c.build"}))


# --------------------------------------------------------------------------- 2. a checkpoint asks for remote code
def test_a_checkpoints_trust_remote_code_is_refused(cli, tmp_path):
    sentinel = tmp_path / "ran"
    folder = evil_hf_dir(tmp_path, sentinel)
    evil = crafted_checkpoint(
        tmp_path / "evil.pt", {"source": "hf", "name": f"hf:{folder}", "kwargs": {"trust_remote_code": True}}
    )
    result = cli("eval", f"checkpoint={evil}", f"hydra.run.dir={tmp_path / 'out'}")
    refused(result, "trust_remote_code", "never takes that from a file")
    assert not sentinel.exists()


# --------------------------------------------------------------------------- 3. remote code in an HF folder
@pytest.mark.parametrize("given_as", ["teacher.checkpoint", "teacher.name"])
def test_an_hf_folders_own_code_is_refused_without_a_prompt(cli, tmp_path, given_as):
    sentinel = tmp_path / "ran"
    folder = evil_hf_dir(tmp_path, sentinel)
    model = (
        [f"teacher.checkpoint={folder}"]
        if given_as == "teacher.checkpoint"
        else ["teacher=custom", f"teacher.name=hf:{folder}"]
    )
    result = cli("train", *model, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'out'}")
    refused(result, "ships its own Python code", "teacher.trust_remote_code=true", "nothing of it was run")
    assert not sentinel.exists()


@pytest.mark.parametrize("allowed", [False, True])
def test_trust_remote_code_reaches_transformers_only_from_the_users_spec(monkeypatch, tmp_path, allowed):
    """Every transformers load is told trust_remote_code: False unless the user's spec says true."""
    transformers = pytest.importorskip("transformers")
    seen = []

    def from_pretrained(ref, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    spec = {"name": f"hf:{tmp_path}", "trust_remote_code": allowed}
    with pytest.raises(KdclError, match="could not be downloaded or found"):
        build_model(spec, 10, tuple(DIGITS))
    assert seen == [allowed]
    with pytest.raises(KdclError, match="trust_remote_code is in its kwargs"):
        build_model({"name": f"hf:{tmp_path}", "kwargs": {"trust_remote_code": True}}, 10, tuple(DIGITS))
    with pytest.raises(KdclError, match="runs no code of a model's files"):
        build_model({"name": "cnn", "trust_remote_code": True}, 10, tuple(DIGITS))


# --------------------------------------------------------------------------- 4. torch.load
def torch_load_calls_without_weights_only() -> list[str]:
    """Every call of torch.load in the package whose weights_only is not the literal True."""
    found = []
    for path in sorted(KDCL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{path.relative_to(KDCL.parent)}:{node.lineno}")
    return found


def test_every_torch_load_passes_weights_only_true():
    assert torch_load_calls_without_weights_only() == []


class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_a_planted_predictions_pickle_runs_nothing_even_when_torch_is_told_to_unpickle(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel, planted = tmp_path / "ran", tmp_path / "teacher" / "test_predictions.pt"
    planted.parent.mkdir()
    torch.save(_Payload(sentinel), planted)
    with pytest.raises(KdclError, match="not the stage's test predictions(.|\n)*nothing in it was run"):
        load_predictions(planted, 5)
    assert not sentinel.exists()
    torch.save(torch.zeros(4, dtype=torch.int32), planted)  # a tensor of another length is damage too
    with pytest.raises(KdclError, match="delete the cache entry"):
        load_predictions(planted, 5)


# --------------------------------------------------------------------------- 5. resuming a folder from elsewhere
def saved_run(root: Path, teacher: dict, **top) -> Path:
    """A run folder whose saved config names ``teacher``."""
    cfg = compose_config(QUICK)
    cfg = {**cfg, "teacher": {**cfg["teacher"], **teacher}, **top}
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_resuming_a_folder_that_names_code_stops_before_anything_runs(cli, tmp_path, victim):
    target = {"_target_": "logging.basicConfig", "kwargs": evil_target(victim)["kwargs"]}
    run = saved_run(tmp_path / "run", target)
    result = cli("train", f"resume={run}", f"hydra.run.dir={tmp_path / 'log'}")
    refused(result, "teacher._target_=logging.basicConfig", "a run folder is code", "trust_code=true")
    assert victim.read_text() == PRECIOUS
    assert not (run / "teacher").exists()


def test_a_saved_config_names_code_only_as_far_as_the_command_does():
    user = compose_config([])
    saved = {**user, "teacher": {**user["teacher"], "_target_": "my_pkg.nets.build", "trust_remote_code": True}}
    with pytest.raises(KdclError, match=r"teacher._target_=my_pkg.nets.build, teacher.trust_remote_code=true"):
        check_saved_config(saved, user, "DIR/.hydra/config.yaml")
    repeated = {**user, "teacher": {**user["teacher"], "_target_": "my_pkg.nets.build", "trust_remote_code": True}}
    check_saved_config(saved, repeated, "DIR")  # the command repeats both: allowed
    check_saved_config(saved, {**user, "trust_code": True}, "DIR")
    with pytest.raises(KdclError, match="trust_code=true"):  # the saved leave is the file's word
        check_saved_config({**user, "trust_code": True}, user, "DIR")
    check_saved_config(user, user, "DIR")


# --------------------------------------------------------------------------- 6. writes do not follow links
def test_a_link_planted_at_a_checkpoints_name_is_replaced_not_followed(tmp_path, victim):
    planted = tmp_path / "best.pt"
    planted.symlink_to(victim)
    save_checkpoint(planted, torch.nn.Linear(2, 2), {"stage": "teacher"})
    assert victim.read_text() == PRECIOUS
    assert not planted.is_symlink() and torch.load(planted, weights_only=True)["stage"] == "teacher"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert oct(planted.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
        ),
    ],
)
def test_a_full_disk_is_one_message_and_leaves_the_old_file_whole(tmp_path, failure):
    path = tmp_path / "best.pt"
    path.write_text("the epoch before")

    def write(tmp):
        tmp.write_text("half")
        raise failure

    with pytest.raises(KdclError, match=f"cannot write {path}: no space left on the disk") as err:
        write_replacing(path, write)
    assert "run the same command again" in err.value.fix
    assert path.read_text() == "the epoch before" and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    with pytest.raises(ValueError):  # any other failure is not taken for a full disk
        write_replacing(path, lambda tmp: (_ for _ in ()).throw(ValueError("bad")))
