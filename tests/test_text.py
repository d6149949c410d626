"""Text data and models: tokenizer, padding and masks, the text_csv dataset, the text
scorers, a BERT → BiLSTM run in-process and its evaluation, and the errors of bad input.
All on generated sentences whose topic words depend on the class."""

from __future__ import annotations

import csv
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import comparable, compose_config, stop_after
from test_export import export_in_process, exported_outputs, pytorch_outputs

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from kdcl.commands.eval import run_eval  # noqa: E402
from kdcl.curricula import SCORERS, ScoreContext  # noqa: E402
from kdcl.data import TensorSource, TextPreprocess, load_data  # noqa: E402
from kdcl.data.tokens import trained_tokenizer  # noqa: E402
from kdcl.distill import feeds  # noqa: E402
from kdcl.distill.losses import ATTENTION_GAPS, LossContext, create_loss  # noqa: E402
from kdcl.errors import KdclError  # noqa: E402
from kdcl.models import copy_teacher_layers, count_macs, create_model  # noqa: E402
from kdcl.scenarios.standard import run_pipeline  # noqa: E402
from kdcl.train import engine  # noqa: E402
from kdcl.train.checkpoint import load_checkpoint  # noqa: E402
from kdcl.train.resume import Interrupted  # noqa: E402

TOPICS = {
    "sports": ["goal", "match", "team", "score", "win", "coach", "league"],
    "money": ["stock", "market", "price", "bank", "trade", "profit", "shares"],
    "space": ["rocket", "planet", "orbit", "star", "launch", "moon", "telescope"],
}
COMMON = ["the", "a", "of", "and", "to", "in", "on", "with", "for", "new"]


def sentences(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (label, title, body) rows: the class's topic words among common ones."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = [r.choice(TOPICS[label] + COMMON) for _ in range(r.randint(4, 14))]
        rows.append((label, words[0].title(), " ".join(words)))
    return rows


def write_table(
    path: Path, rows: list[tuple], header: tuple = ("label", "title", "body"), delimiter: str = ","
) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    write_table(root / "train.csv", sentences(200, seed=0))
    write_table(root / "test.csv", sentences(60, seed=1))
    return root


TEXT_KEYS = ["dataset.text_columns=[title,body]", "dataset.vocab_size=120", "dataset.max_length=12"]


def text_cfg(root: Path, *overrides: str) -> dict:
    return compose_config(["dataset=text_csv", f"dataset.root={root}", *TEXT_KEYS, *overrides])


def load(root: Path, *overrides: str):
    return load_data(text_cfg(root, *overrides)["dataset"], torch.device("cpu"), False, 0)


# --------------------------------------------------------------------------- tokenizer, padding, masks
def test_tokenizer_training_is_deterministic_and_frames_each_text():
    texts = [" ".join(row[1:]) for row in sentences(50, seed=3)]
    first, second = (trained_tokenizer(texts, 200, True, 8) for _ in range(2))
    assert first == second  # the same vocabulary, ids and pad id
    assert first.pad_id == 0 and first.vocab_size <= 200
    ids = first.encode(["Goal goal GOAL", "the"])
    tokenizer = first.tokenizer()
    cls, sep, goal = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "▁goal"))
    assert ids.shape == (2, 8)
    assert ids[0, :5].tolist() == [cls, goal, goal, goal, sep]  # lowercased, framed
    assert (ids[0, 5:] == 0).all() and ids[1, 3:].tolist() == [0] * 5  # right-padded with the pad id
    long = first.encode(["goal " * 30])
    assert long.shape == (1, 8) and long[0, -1] == sep  # truncated to max_length, the frame kept


def test_batch_is_cut_to_its_longest_example():
    """The source cuts each batch to its longest text, from lengths kept on the CPU."""
    x = np.array([[2, 5, 6, 3, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0]])
    source = TensorSource.from_arrays(x, np.zeros(3), np.arange(3), torch.device("cpu"), pad_id=0)
    cut = [
        ids.tolist() for _, ids, _ in source.batches([torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([2])])
    ]
    assert cut == [[[2, 5, 6, 3], [2, 7, 3, 0]], [[2, 3, 0], [2, 7, 3]], [[2, 3]]]
    ((_, ids, _),) = source.subset(np.array([1, 2]), torch.arange(1)).batches([torch.tensor([1, 0])])
    assert ids.tolist() == [[2, 3, 0], [2, 7, 3]]
    pre = TextPreprocess(pad_id=0, device=torch.device("cpu"), seed=0)
    assert pre(ids, train=True).tolist() == pre(ids, train=False).tolist()


def test_token_masking_masks_ordinary_tokens_at_its_rate_in_training_only():
    special = (2, 3)  # [CLS], [SEP]; the pad id 0 is never masked either
    pre = TextPreprocess(pad_id=0, device=torch.device("cpu"), seed=0, token_mask=0.25, mask_id=1, special_ids=special)
    x = torch.randint(4, 50, (400, 30))
    x[:, 0], x[:, 20], x[:, 21:] = 2, 3, 0
    x[0, 21:] = torch.tensor([8, 9, 3, 0, 0, 0, 0, 0, 0])  # the longest example
    masked = pre.training(x, torch.arange(len(x)), epoch=1)
    assert masked.shape == x.shape
    changed = masked != x
    assert (masked[changed] == 1).all()
    assert not changed[:, 0].any() and not changed[1:, 20:].any()  # the frame and the padding stay
    assert abs(changed[:, 1:20].float().mean().item() - 0.25) < 0.02  # 7,600 draws: 4.5 standard errors
    assert pre(x, train=False).equal(x)
    again = TextPreprocess(
        pad_id=0, device=torch.device("cpu"), seed=0, token_mask=0.25, mask_id=1, special_ids=special
    )
    assert again.training(x, torch.arange(len(x)), epoch=1).equal(
        masked
    )  # keyed by the seed: a resumed run masks the same tokens
    assert not pre.training(x, torch.arange(len(x)), epoch=2).equal(masked)  # and afresh every epoch


def test_token_masking_uses_the_vocabularys_unknown_token(text_root):
    data = load(text_root, "dataset.token_mask=0.5")
    encoding = data.text.tokenizer()
    pre = data.preprocess
    assert pre.mask_id == encoding.token_to_id("[UNK]")
    assert set(pre.special.tolist()) == {encoding.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}


@pytest.mark.parametrize("name", ["bert", "bilstm", "text_cnn", "bow"])
def test_padding_does_not_change_a_models_logits(name):
    torch.manual_seed(0)
    kwargs = {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32} if name == "bert" else {}
    model = create_model(name, 3, (10,), vocab_size=30, pad_id=0, **kwargs).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 9, 3, 0, 0]])
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 3)
        assert torch.allclose(model(padded), logits, atol=1e-5)
        assert not torch.allclose(model(ids[:, :3]), logits, atol=1e-5)  # the tokens do count


def test_image_model_on_text_is_refused():
    with pytest.raises(KdclError, match="reads images, but the data gives tokens"):
        create_model("resnet8", 3, (12,), vocab_size=30, pad_id=0)


# --------------------------------------------------------------------------- the dataset
def test_text_csv_loads_ids_labels_and_vocabulary(text_root):
    data = load(text_root)
    assert data.class_names == ["money", "space", "sports"]  # names, sorted
    assert data.input_shape == (12,) and data.text.max_length == 12
    assert data.model_kwargs == {"vocab_size": data.text.vocab_size, "pad_id": 0}
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 60
    ids = data.train.x
    assert ids.dtype == torch.int64 and ids.shape[1] == 12 and int(ids.max()) < data.text.vocab_size
    raw = pd.read_csv(text_root / "train.csv")
    first = int(data.train.origin[0])
    row = raw.iloc[first]
    expected = data.text.encode([f"{row['title']} {row['body']}"])[0]
    assert ids[0].tolist() == expected.tolist()  # title and body joined with the separator
    assert data.class_names[int(data.train.y[0])] == row["label"]


def test_tsv_file_and_index_labels(tmp_path):
    rows = [(i % 2, text) for i, (_, _, text) in enumerate(sentences(20, seed=2))]
    for part in ("train", "test"):
        write_table(tmp_path / f"{part}.tsv", rows, header=("y", "text"), delimiter="\t")
    data = load(
        tmp_path,
        "dataset.train_file=train.tsv",
        "dataset.test_file=test.tsv",
        "dataset.text_columns=[text]",
        "dataset.label_column=y",
    )
    assert data.num_classes == 2 and data.class_names == ["0", "1"]


@pytest.mark.parametrize(
    ("change", "overrides", "message"),
    [
        (None, ["dataset.text_columns=[headline]"], "has no column 'headline'"),
        ("empty_text", [], r"line 3 has no text"),
        ("newline_then_empty", [], r"line 5 has no text"),  # row 1 spans lines 2 and 3
        (None, ["dataset.class_names=[money,space]"], r"labels sports are not among dataset.class_names"),
        ("index_labels", ["dataset.class_names=[a,b]"], r"labels 2 outside 0..1"),
        (
            None,
            ["dataset.tokenizer=/nonexistent/tokenizer"],
            "dataset.tokenizer=/nonexistent/tokenizer: no such directory",
        ),
        (None, ["dataset.max_length=0"], r"dataset.max_length=0: an example must keep at least one token"),
        (None, ["dataset.flip=true"], r"is text, but dataset.flip=True augments images"),
        (None, ["dataset.train_file=missing.csv"], "missing.csv not found"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, change, overrides, message):
    rows = sentences(12, seed=4)
    if change == "empty_text":
        rows[1] = (rows[1][0], " ", "")
    if change == "newline_then_empty":
        rows[0] = (rows[0][0], rows[0][1], "two\nlines")
        rows[2] = (rows[2][0], " ", "")
    if change == "index_labels":
        rows = [(i % 3, title, body) for i, (_, title, body) in enumerate(rows)]
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "test.csv", rows)
    with pytest.raises(KdclError, match=message) as info:
        load(tmp_path, *overrides)
    assert info.value.fix


def test_a_huge_text_is_cut_before_tokenizing_with_a_warning(tmp_path, caplog):
    """A text is cut to 100 characters per token of max_length (12: 1,200) first: its ids are
    those of its first 1,200 characters, which hold more than the 12 tokens kept."""
    rows = sentences(12, seed=4)
    huge = " ".join(["goal"] * 20_000)  # 100k characters on one line
    rows[0] = (rows[0][0], "Goal", huge)
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "test.csv", sentences(6, seed=5))
    with caplog.at_level(logging.WARNING):
        data = load(tmp_path)
    assert "1 train split text(s) longer than 1200 characters cut" in caplog.text
    [ids] = [split.x[i] for split in (data.train, data.val) for i in np.flatnonzero(split.origin == 0)]
    assert ids.tolist() == data.text.encode([f"Goal {huge}"[:1200]])[0].tolist()


def test_tokenizer_of_a_model_directory(tmp_path, text_root):
    from transformers import PreTrainedTokenizerFast

    encoding = trained_tokenizer([" ".join(r[1:]) for r in sentences(50, seed=5)], 80, True, 10)
    fast = PreTrainedTokenizerFast(tokenizer_object=encoding.tokenizer(), pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "model")
    data = load(text_root, f"dataset.tokenizer={tmp_path / 'model'}")
    assert data.text.vocab_size == encoding.vocab_size and data.text.pad_id == 0
    with pytest.raises(KdclError, match="no tokenizer could be read"):
        load(text_root, f"dataset.tokenizer={tmp_path}")


@pytest.fixture(scope="module")
def hf_bert_dir(text_root, tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier with its own tokenizer, saved as a Hugging Face
    model directory (what a user downloads or fine-tunes elsewhere)."""
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("hf_bert")
    encoding = trained_tokenizer([" ".join(r[1:]) for r in sentences(200, seed=0)], 100, True, 12)
    fast = PreTrainedTokenizerFast(tokenizer_object=encoding.tokenizer(), pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(directory)
    config = BertConfig(
        vocab_size=encoding.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def test_hf_text_model_loads_its_weights_and_reads_the_data_tokens(hf_bert_dir, text_root):
    from transformers import BertForSequenceClassification

    data = load(text_root, f"dataset.tokenizer={hf_bert_dir}")
    model = create_model(f"hf:{hf_bert_dir}", 3, data.input_shape, pretrained=True, **data.model_kwargs).eval()
    saved = BertForSequenceClassification.from_pretrained(hf_bert_dir).eval()
    ids = data.train.x[:5]
    mask = (ids != data.text.pad_id).long()
    assert torch.allclose(model(ids), saved(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    fresh = create_model(f"hf:{hf_bert_dir}", 3, data.input_shape, pretrained=False, **data.model_kwargs)
    assert not torch.allclose(fresh.model.classifier.weight, saved.classifier.weight)


@pytest.mark.slow
def test_hf_text_teacher_trains_and_eval_rebuilds_it_from_the_checkpoint(hf_bert_dir, text_root, tmp_path):
    cfg = text_cfg(
        text_root,
        f"dataset.tokenizer={hf_bert_dir}",
        "teacher=custom",
        f"teacher.name=hf:{hf_bert_dir}",
        "teacher.pretrained=true",
        "student=bow",
        "trainer.epochs=1",
        "curriculum=none",
        "distill.teacher_cache=no_aug",
    )
    summary = run_pipeline(cfg, tmp_path / "run").set_index("model")
    assert summary.loc["teacher", "arch"] == f"hf:{hf_bert_dir}"
    frame = run_eval(str(tmp_path / "run" / "teacher" / "best.pt"), None, "cpu", 64, tmp_path, None)
    assert frame["acc"].iloc[0] == pytest.approx(summary.loc["teacher", "test_acc"])


def test_model_and_tokenizer_that_do_not_fit_are_refused(hf_bert_dir, text_root, tmp_path):
    data = load(text_root, "dataset.vocab_size=120")  # a BPE vocabulary larger than the model's
    with pytest.raises(KdclError, match=r"embeds \d+ token ids, but the data's tokenizer has 120") as info:
        create_model(f"hf:{hf_bert_dir}", 3, data.input_shape, pretrained=True, **data.model_kwargs)
    assert f"dataset.tokenizer={hf_bert_dir}" in info.value.fix
    long = load(text_root, f"dataset.tokenizer={hf_bert_dir}", "dataset.max_length=20")
    with pytest.raises(KdclError, match="reads at most 16 tokens, but dataset.max_length=20"):
        create_model(f"hf:{hf_bert_dir}", 3, long.input_shape, pretrained=True, **long.model_kwargs)
    cfg = text_cfg(text_root, *TINY_RUN, "teacher.kwargs.vocab_size=50")
    with pytest.raises(KdclError, match="embeds a vocabulary of 50 tokens, but the data's tokenizer has 120"):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "teacher").exists()  # refused before training


def test_student_starts_from_every_other_teacher_layer():
    """DistilBERT's initialisation: a 2-layer student of a 4-layer teacher's width takes
    the teacher's layers 0 and 2, its embeddings, pooler and head."""
    shape = {"heads": 2, "intermediate": 32, "dropout": 0.0, "vocab_size": 50}
    torch.manual_seed(0)
    teacher = create_model("bert", 3, (12,), layers=4, hidden=16, **shape)
    student = create_model("bert", 3, (12,), layers=2, hidden=16, **shape)
    copied = copy_teacher_layers(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    for k, j in ((0, 0), (1, 2)):
        name = f"bert.encoder.layer.{k}.attention.self.query.weight"
        assert name in copied and torch.equal(s[name], t[f"bert.encoder.layer.{j}.attention.self.query.weight"])
    for name in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[name], t[name])
    with pytest.raises(KdclError, match="have no teacher tensor of the same name and shape") as info:
        copy_teacher_layers(create_model("bert", 3, (12,), layers=2, hidden=8, **shape), teacher)
    assert "student.init_from_teacher=false" in info.value.fix
    with pytest.raises(KdclError, match="the student has 0 and the teacher 4"):
        copy_teacher_layers(create_model("bilstm", 3, (12,), vocab_size=50), teacher)


def test_student_that_cannot_start_from_the_teacher_is_refused_before_training(text_root, tmp_path):
    cfg = text_cfg(text_root, *TINY_RUN, "student.init_from_teacher=true")  # a BiLSTM student
    with pytest.raises(KdclError, match="student.init_from_teacher takes the teacher's stacked layers"):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "teacher").exists()


def test_a_student_from_the_teachers_pretrained_weights_needs_a_pretrained_teacher(text_root, tmp_path):
    tiny = [o for o in TINY_RUN if not o.startswith("student")]
    cfg = text_cfg(text_root, *tiny, "student=bert_tiny1", "student.init_from_teacher=pretrained")
    with pytest.raises(KdclError, match="but teacher.pretrained is false") as info:
        run_pipeline(cfg, tmp_path)
    assert "teacher.pretrained=true" in info.value.fix and "student.init_from_teacher=true" in info.value.fix
    assert not (tmp_path / "teacher").exists()


@pytest.fixture(scope="module")
def hf_texts(tmp_path_factory) -> Path:
    """The generated sentences as a Hugging Face DatasetDict saved to disk, labels a ClassLabel."""
    datasets = pytest.importorskip("datasets")
    names = sorted(TOPICS)
    features = datasets.Features(
        {"title": datasets.Value("string"), "body": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )

    def split(rows):
        return datasets.Dataset.from_dict(
            {"title": [r[1] for r in rows], "body": [r[2] for r in rows], "label": [names.index(r[0]) for r in rows]},
            features=features,
        )

    root = tmp_path_factory.mktemp("hf_texts") / "saved"
    datasets.DatasetDict(train=split(sentences(200, seed=0)), test=split(sentences(60, seed=1))).save_to_disk(str(root))
    return root


def hf_text_cfg(path: Path, *overrides: str) -> dict:
    return compose_config(["dataset=hf_text", f"dataset.path={path}", *TEXT_KEYS, *overrides])


def test_hf_text_dataset_reads_the_saved_splits_as_the_csv_does(hf_texts, text_root):
    """The same rows from a saved DatasetDict and from CSV files give the same ids and labels."""
    from_hf = load_data(hf_text_cfg(hf_texts)["dataset"], torch.device("cpu"), False, 0)
    from_csv = load(text_root)
    assert from_hf.class_names == from_csv.class_names == sorted(TOPICS)
    assert torch.equal(from_hf.train.x, from_csv.train.x) and torch.equal(from_hf.test.y, from_csv.test.y)


def test_hf_text_dataset_refuses_missing_columns_and_empty_texts(hf_texts, tmp_path):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(KdclError, match="has no column 'headline'") as info:
        load_data(hf_text_cfg(hf_texts, "dataset.text_columns=[headline]")["dataset"], torch.device("cpu"), False, 0)
    assert "dataset.text_columns and dataset.label_column" in info.value.fix
    saved = datasets.load_from_disk(str(hf_texts))
    blank = saved["train"].map(lambda row, i: {"title": "", "body": " "} if i == 3 else row, with_indices=True)
    datasets.DatasetDict(train=blank, test=saved["test"]).save_to_disk(str(tmp_path / "blank"))
    with pytest.raises(KdclError, match="row 3 of split 'train' of .* has no text"):
        load_data(hf_text_cfg(tmp_path / "blank")["dataset"], torch.device("cpu"), False, 0)


@pytest.mark.slow
def test_hf_text_run_and_its_eval(hf_texts, tmp_path):
    cfg = hf_text_cfg(hf_texts, *TINY_RUN, "trainer.epochs=1", "baseline=false")
    summary = run_pipeline(cfg, tmp_path / "run").set_index("model")
    frame = run_eval(str(tmp_path / "run" / "distill" / "best.pt"), None, "cpu", 64, tmp_path, None)
    assert frame["acc"].iloc[0] == pytest.approx(summary.loc["distill", "test_acc"])


# --------------------------------------------------------------------------- scorers
def test_length_and_rarity_rank_planted_examples():
    # Token 5 is in every text; 9 in one only: the text holding it is the rarest.
    tokens = torch.tensor([[2, 5, 5, 3, 0, 0], [2, 5, 9, 3, 0, 0], [2, 5, 5, 5, 5, 3], [2, 3, 0, 0, 0, 0]])
    ctx = ScoreContext(labels=torch.zeros(4, dtype=torch.long), teacher_logits=torch.zeros(4, 2), seed=0, tokens=tokens)
    assert SCORERS.get("length")(ctx).tolist() == [4, 4, 6, 2]
    rarity = SCORERS.get("rarity")(ctx)
    counts = {2: 4, 3: 4, 5: 7, 9: 1}
    assert rarity[1].item() == pytest.approx((1 / 4 + 1 / 7 + 1 / 1 + 1 / 4) / 4)
    assert rarity.argmax().item() == 1 and rarity[3].item() == pytest.approx(1 / counts[2])
    images = ScoreContext(labels=torch.zeros(2, dtype=torch.long), teacher_logits=torch.zeros(2, 2), seed=0)
    from kdcl.curricula import ScoreUnavailable

    with pytest.raises(ScoreUnavailable, match="this run's data is images"):
        SCORERS.get("length")(images)


# --------------------------------------------------------------------------- a run
TINY_RUN = [
    "teacher=bert_tiny4",
    "teacher.kwargs={layers: 2, hidden: 32, heads: 2, intermediate: 64, dropout: 0.0}",
    "student=bilstm",
    "student.kwargs={embed: 16, hidden: 16, dropout: 0.0}",
    "optimizer=adamw",
    "optimizer.lr=3e-3",
    "trainer.epochs=4",
    "trainer.batch_size=16",
    "curriculum=length",
    "distill.teacher_cache=no_aug",
]


# The tiny BERT teacher of TINY_RUN and a 1-layer BERT student, distilled without a baseline or curriculum.
BERT_TO_BERT = [
    *TINY_RUN[:2],
    "student=bert_tiny1",
    "student.kwargs={layers: 1, hidden: 16, heads: 2, intermediate: 32, dropout: 0.0}",
    "baseline=false",
    "curriculum=none",
]


@pytest.fixture(scope="module")
def tiny_run(text_root, tmp_path_factory):
    cfg = text_cfg(text_root, *TINY_RUN)
    out = tmp_path_factory.mktemp("run")
    return cfg, out, run_pipeline(cfg, out).set_index("model")


@pytest.mark.slow
def test_bert_teacher_to_bilstm_student_run(tiny_run):
    cfg, out, summary = tiny_run
    assert list(summary.index) == ["teacher", "baseline", "distill"]
    assert summary.loc["teacher", "arch"] == "bert" and summary.loc["distill", "arch"] == "bilstm"
    assert summary.loc["teacher", "test_acc"] > 0.6  # topic words: learnable in 4 epochs
    for stage in ("teacher", "baseline", "distill"):
        metrics = pd.read_csv(out / stage / "metrics.csv")
        assert metrics["epoch"].tolist() == [1, 2, 3, 4]
        ckpt = load_checkpoint(out / stage / "best.pt")
        assert ckpt["input_shape"] == [12] and ckpt["tokenizer"]["max_length"] == 12
        assert ckpt["model"]["kwargs"]["vocab_size"] == ckpt["tokenizer"]["vocab_size"]
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(ckpt["tokenizer"]["tokenizer_json"])
    scores = pd.read_csv(out / "curriculum" / "scores.csv")
    assert (scores["difficulty"] == scores["d_length"]).all()  # the length curriculum ranks by tokens
    assert scores["d_length"].between(3, 12).all()
    distill = pd.read_csv(out / "distill" / "metrics.csv")
    assert {"train_ce", "train_kd"} <= set(distill.columns) and distill["train_kd"].notna().all()


@pytest.mark.slow
def test_eval_reproduces_the_summarys_test_accuracy(tiny_run, tmp_path):
    _, out, summary = tiny_run
    frame = run_eval(str(out / "distill" / "best.pt"), None, "cpu", 64, tmp_path, None)
    assert frame["acc"].iloc[0] == pytest.approx(summary.loc["distill", "test_acc"])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_text_models_export_with_a_free_sequence_length(tiny_run, tmp_path, fmt):
    """The BERT teacher and the BiLSTM students of a run, exported, reproduce PyTorch on
    token ids of the test batch's length and of other lengths."""
    pytest.importorskip("onnxruntime")
    _, out, _ = tiny_run
    table = export_in_process([f"run={out}", f"format={fmt}"], tmp_path / "export").set_index("model")
    assert list(table.index) == ["teacher", "baseline", "distill"]
    assert (table["inputs"] == "test").all() and (table["max_abs_diff"] < 1e-4).all()
    ids = load_checkpoint(out / "distill" / "best.pt")["tokenizer"]
    g = torch.Generator().manual_seed(0)
    for stage in ("teacher", "distill"):
        for length in (12, 5):
            x = torch.randint(1, ids["vocab_size"], (3, length), generator=g)
            x[0, length // 2 :] = ids["pad_id"]  # a shorter text, padded
            exported = exported_outputs(Path(table.loc[stage, "file"]), x)
            assert torch.allclose(exported, pytorch_outputs(out / stage / "best.pt", x), atol=1e-5)


def test_lstm_macs_are_counted_per_token():
    model = create_model("bilstm", 3, (10,), vocab_size=30, embed=8, hidden=6)
    lstm = 10 * 2 * 4 * 6 * (8 + 6)  # tokens · directions · gates · H · (I + H)
    head = 12 * 6 + 6 * 3
    assert count_macs(model, (10,)) == lstm + head


@pytest.mark.slow
def test_a_text_run_resumed_after_a_stop_gives_the_identical_tables(tiny_run, tmp_path, monkeypatch):
    """Stopped in the distill stage's second epoch (13 steps an epoch), then run again:
    the tokenizer, the cached teacher logits and the length curriculum come back the same."""
    cfg, reference, _ = tiny_run
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", stop_after("distill", 20))
        with pytest.raises(Interrupted):
            run_pipeline(cfg, tmp_path)
    assert (tmp_path / "distill" / "resume.pt").is_file()
    run_pipeline(cfg, tmp_path)
    for table in ("summary.csv", "distill/metrics.csv", "baseline/metrics.csv"):
        pd.testing.assert_frame_equal(comparable(reference, table), comparable(tmp_path, table))
    assert not list(tmp_path.rglob("resume.pt"))


@pytest.mark.slow
def test_hidden_state_distillation_from_bert_layers(text_root, tmp_path):
    """TinyBERT-style: the student BERT's layer 0 regressed onto the teacher's layer 1."""
    cfg = text_cfg(
        text_root,
        *BERT_TO_BERT,
        "trainer.epochs=1",
        "distill=fitnet",
        "distill.student_layer=bert.encoder.layer.0",
        "distill.teacher_layer=bert.encoder.layer.1",
    )
    run_pipeline(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert metrics["train_hint"].iloc[0] > 0


@pytest.mark.parametrize("measure", ["mse", "kl"])
def test_attention_map_loss_equals_its_formula(measure):
    """TinyBERT's MSE and MiniLM's KL between (B, H, L, L) attention probabilities, per
    example; maps of different head counts are compared head-averaged."""
    g = torch.Generator().manual_seed(0)
    a_s = torch.softmax(torch.randn(3, 2, 5, 5, generator=g), -1)
    a_t = torch.softmax(torch.randn(3, 2, 5, 5, generator=g), -1)
    loss = create_loss(
        {"name": "attention_maps", "beta": 2.0, "measure": measure, "student_layer": "s", "teacher_layer": "t"}
    )
    loss.connect([("s", "t")], [((2, 5, 5), (2, 5, 5))])
    if measure == "mse":
        expected = ((a_s - a_t) ** 2).mean(dim=(1, 2, 3))
    else:
        expected = (a_t * (a_t.log() - a_s.log())).sum(-1).mean(dim=(1, 2))
    y, logits = torch.zeros(3, dtype=torch.long), torch.zeros(3, 4)
    out = loss(logits, logits, y, 0.0, 1.0, LossContext(1, {"s": a_s}, {"t": a_t}))
    assert out["attention"] == pytest.approx(expected, rel=1e-5)
    assert out["loss"] == pytest.approx(torch.log(torch.tensor(4.0)) + 2.0 * expected, rel=1e-5)  # CE of uniform logits
    four_heads = a_t.repeat(1, 2, 1, 1)  # a teacher of 4 heads, each pair identical: the same head average
    out = loss(logits, logits, y, 0.0, 1.0, LossContext(1, {"s": a_s}, {"t": four_heads}))
    averaged = ATTENTION_GAPS[measure](a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True))
    assert out["attention"] == pytest.approx(averaged, rel=1e-5)


def test_attention_maps_switch_the_models_to_eager_attention_for_their_stage_only():
    """``bind`` makes both BERTs return their attention probabilities (eager attention);
    ``release`` gives the teacher, which teaches later stages, its own implementation back."""
    student, teacher = (
        create_model("bert", 3, (8,), vocab_size=20, pad_id=0, layers=1, hidden=8, heads=2, intermediate=16)
        for _ in range(2)
    )
    before = teacher.bert.config._attn_implementation
    loss = create_loss(
        {
            "name": "attention_maps",
            "beta": 1.0,
            "measure": "kl",
            "student_layer": "bert.encoder.layer.0.attention.self:1",
            "teacher_layer": "bert.encoder.layer.0.attention.self:1",
        }
    )
    loss.bind(student, teacher, torch.randint(1, 20, (2, 8)), 10)
    assert student.bert.config._attn_implementation == teacher.bert.config._attn_implementation == "eager" != before
    loss.release()
    assert teacher.bert.config._attn_implementation == before


@pytest.mark.slow
def test_attention_map_distillation_between_berts(text_root, tmp_path):
    """The student BERT's attention of layer 0 distilled from the teacher's layer 1 (MiniLM's KL)."""
    cfg = text_cfg(
        text_root,
        *BERT_TO_BERT,
        "trainer.epochs=2",
        "distill=attention_maps",
        "distill.measure=kl",
        "distill.teacher_layer=bert.encoder.layer.1.attention.self:1",
    )
    run_pipeline(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert (metrics["train_attention"] > 0).all()
    assert metrics["train_attention"].iloc[1] < metrics["train_attention"].iloc[0]  # the student learns the maps
    wrong = text_cfg(
        text_root,
        *TINY_RUN[:2],
        "trainer.epochs=1",
        "distill=attention_maps",
        "student=bert_tiny1",
        "distill.student_layer=bert.encoder.layer.0",  # hidden states, not a map
        "distill.teacher_layer=bert.encoder.layer.1.attention.self:1",
    )
    with pytest.raises(KdclError, match="compares attention maps"):
        run_pipeline(wrong, tmp_path / "wrong")


def test_a_text_is_masked_alike_in_any_batch_by_its_seed_its_epoch_and_its_place():
    """Text i's masks in epoch e are a function of (the stage's seed, i, e, place): the same
    in a shuffled sub-batch cut shorter, and for a cache's view e − 1; other epochs and seeds
    differ; special tokens never masked; about p of the ordinary ones masked."""
    pad, mask, cls, sep = 0, 1, 2, 3
    pre = TextPreprocess(pad, torch.device("cpu"), seed=5, token_mask=0.3, mask_id=mask, special_ids=[cls, sep])
    g = torch.Generator().manual_seed(0)
    n, length = 60, 24
    x = torch.randint(4, 100, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    x[torch.arange(length) >= lengths[:, None]] = pad
    x[:, 0], x[torch.arange(n), lengths - 1] = cls, sep
    idx = torch.arange(n)
    full = pre.training(x, idx, epoch=2)
    some = torch.randperm(n, generator=g)[:20]
    assert torch.equal(pre.training(x[some, :12], some, epoch=2), full[some, :12])
    view, phase = pre.fixed_views(n, 3, torch.Generator())
    assert torch.equal(view(x, idx, torch.full_like(idx, 1)), full) and not phase.any()  # view 1 = epoch 2
    assert not torch.equal(pre.training(x, idx, epoch=3), full)
    pre.reseed(6)
    assert not torch.equal(pre.training(x, idx, epoch=2), full)
    assert torch.equal(pre(x, train=True), x)  # outside training(), ids pass through
    special = torch.isin(x, torch.tensor([pad, cls, sep]))
    assert torch.equal(full[special], x[special])
    masked = (full == mask)[~special].float()
    rate, spread = masked.mean().item(), (0.3 * 0.7 / masked.numel()) ** 0.5
    assert abs(rate - 0.3) < 4 * spread


def test_the_keyed_hash_is_lowbias32():
    """:func:`mix32` in int64 tensors equals Wellons' lowbias32 in Python's exact integers."""
    from kdcl.data.tokens import mix32

    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, *random.Random(0).sample(range(2**32), 200)]
    assert mix32(torch.tensor(values)).tolist() == [lowbias32(x) for x in values]


def test_a_views_cache_of_masked_texts_teaches_what_the_online_teacher_does(text_root, tmp_path, monkeypatch):
    """``distill.teacher_cache=views:2`` over 2 epochs: the student trains on exactly the masked
    texts an online run gives it (a text's view v is its masking in epoch v + 1), each with
    the teacher's stored logits of that text, and no step runs the teacher."""
    taught = {"online": [], "cached": []}  # (the teacher runs at this step, the student's input)
    online, cached = feeds.OnlineTeacher.__call__, feeds.CachedViews.__call__

    def spy_online(self, step, epoch, idx, x, y, part=None, mix=None):
        views, logits = online(self, step, epoch, idx, x, y, part, mix)
        taught["online"].append((self.teacher_at is not None, views))
        return views, logits

    def spy_cached(self, step, epoch, idx, x, y, part=None, mix=None):
        views, logits = cached(self, step, epoch, idx, x, y, part, mix)
        assert torch.equal(logits, self.logits.get(idx, self.view(idx, epoch)))  # the stored logits of that view
        taught["cached"].append((False, views))
        return views, logits

    monkeypatch.setattr(feeds.OnlineTeacher, "__call__", spy_online)
    monkeypatch.setattr(feeds.CachedViews, "__call__", spy_cached)
    unk = load(text_root).text.tokenizer().token_to_id("[UNK]")
    masked = [*TINY_RUN, "trainer.epochs=2", "dataset.token_mask=0.3", "baseline=false", "curriculum=none"]
    run_pipeline(text_cfg(text_root, *masked, "distill.teacher_cache=none"), tmp_path / "online")
    online_inputs = [views for teaches, views in taught["online"] if teaches]  # the distilled student's
    taught["online"].clear()
    run_pipeline(text_cfg(text_root, *masked, "distill.teacher_cache=views:2"), tmp_path / "cached")
    assert not any(teaches for teaches, _ in taught["online"])  # the teacher trained, then never ran again
    cached_inputs = [views for _, views in taught["cached"]]
    assert len(cached_inputs) == len(online_inputs) > 0
    assert all(torch.equal(a, b) for a, b in zip(cached_inputs, online_inputs))
    assert any((views == unk).any() for views in cached_inputs)  # masked texts


def test_a_teacher_cache_of_unmasked_texts_with_token_masking_is_refused_before_training(text_root, tmp_path):
    cfg = text_cfg(text_root, *TINY_RUN, "dataset.token_mask=0.1", "distill.teacher_cache=no_aug")
    with pytest.raises(KdclError, match="no_aug is for runs without augmentation") as err:
        run_pipeline(cfg, tmp_path)
    assert "distill.teacher_cache=views:K" in err.value.fix
    assert not (tmp_path / "teacher").exists()


def test_a_run_on_masked_tokens_teaches_online_and_its_test_split_is_unmasked(text_root, tmp_path, monkeypatch):
    seen = []  # what the online teacher is given in training
    online = feeds.OnlineTeacher.__call__

    def spy(self, step, epoch, idx, x, y, part=None, mix=None):
        views, logits = online(self, step, epoch, idx, x, y, part, mix)
        if self.teacher_at is not None:
            seen.append((views, x))
        return views, logits

    monkeypatch.setattr(feeds.OnlineTeacher, "__call__", spy)
    unk = load(text_root).text.tokenizer().token_to_id("[UNK]")
    cfg = text_cfg(text_root, *TINY_RUN, "trainer.epochs=1", "dataset.token_mask=0.3", "distill.teacher_cache=none")
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    masked = [(views == unk) & (x[:, : views.shape[1]] != unk) for views, x in seen]
    assert seen and sum(m.sum().item() for m in masked) > 0  # the teacher labels masked texts
    assert (tmp_path / "distill" / "metrics.csv").is_file() and summary.loc["distill", "steps"] > 0
    frame = run_eval(str(tmp_path / "distill" / "best.pt"), None, "cpu", 64, tmp_path, None)
    assert frame["acc"].iloc[0] == pytest.approx(summary.loc["distill", "test_acc"])  # evaluated unmasked


def test_strong_views_with_text_are_refused(text_root, tmp_path):
    cfg = text_cfg(text_root, *TINY_RUN, "distill=mlkd")
    with pytest.raises(KdclError, match="distill=mlkd distils on strongly augmented views of images"):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "teacher").exists()  # refused before anything trained


def test_text_without_the_extra_names_it(text_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers → ImportError
    with pytest.raises(KdclError, match="needs the package tokenizers") as info:
        load(text_root)
    assert 'pip install "kdcl[text]"' in info.value.fix
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(KdclError, match="model bert needs the package transformers") as info:
        create_model("bert", 3, (8,), vocab_size=20, pad_id=0)
    assert "kdcl[text]" in info.value.fix


def test_feature_tap_takes_the_first_element_of_a_tuple_output():
    from torch import nn

    from kdcl.distill.features import FeatureTap

    class PairLayer(nn.Module):  # returns (hidden states, attention) as Hugging Face layers may
        def forward(self, x):
            return x * 2, x.sum()

    model = nn.Sequential(PairLayer())
    with FeatureTap(model, ["0"]) as features:
        model[0](torch.ones(2, 3, 4))
        assert torch.equal(features["0"], torch.full((2, 3, 4), 2.0))
