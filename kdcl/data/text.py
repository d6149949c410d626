"""The ``text_csv`` dataset: labelled texts in a CSV (or TSV) file per split.

``root/train.csv`` and ``root/test.csv`` (``dataset.train_file``, ``dataset.test_file``;
a ``.tsv`` file is read tab-separated unless ``dataset.delimiter`` says otherwise) hold a
header line and one example per row. The text is the ``dataset.text_columns`` joined with
``dataset.text_separator`` (AG News: title and description); labels are class names or
class indices 0..C−1 (:func:`kdcl.data.images.class_indices`, as for image manifests).

The texts become ids (:mod:`kdcl.data.tokens`) with a BPE tokenizer trained on the
training file, or with ``dataset.tokenizer`` (an HF model directory's); a checkpoint's
tokenizer (``dataset.trained_tokenizer``, set by ``kdcl eval``) is used as it is.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from kdcl.data.checks import abbreviated
from kdcl.data.images import class_indices
from kdcl.data.loaders import register_dataset
from kdcl.data.splits import RawSplit
from kdcl.data.tokens import TextEncoding, check_max_length, model_tokenizer, trained_tokenizer
from kdcl.errors import DATA_DIR_HINT, KdclError
from kdcl.packaged import resolve

log = logging.getLogger(__name__)


@register_dataset("text_csv")
def text_csv(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """Texts and labels of ``root/train.csv`` and ``root/test.csv`` as (N, max_length) ids."""
    check_max_length(cfg["max_length"])
    root = Path(cfg["root"]).expanduser()
    columns = list(cfg["text_columns"])
    if not columns:
        raise KdclError("dataset.text_columns is empty", fix="name the column(s) holding the text, e.g. [text]")
    rows = {
        split: read_texts(root / cfg[f"{split}_file"], columns, cfg["label_column"], cfg["text_separator"], cfg)
        for split in ("train", "test")
    }
    labels, class_names = class_indices(
        f"{root} (train and test files)", {split: y for split, (_, y) in rows.items()}, cfg["class_names"]
    )
    train, test = encoded_splits(cfg, {split: texts for split, (texts, _) in rows.items()}, labels)
    return train, test, class_names


# A token holds at most this many characters (WordPiece's longest word; a BPE piece is
# shorter): a text is cut to this many per token of dataset.max_length before tokenizing,
# which keeps every token the model sees and bounds the memory one long line takes.
CHARS_PER_TOKEN = 100


def encoded_splits(cfg: dict, texts: dict[str, list[str]], labels: dict[str, np.ndarray]) -> tuple[RawSplit, RawSplit]:
    """The train and test texts as ids (:func:`text_encoding`), each cut first to
    ``CHARS_PER_TOKEN · max_length`` characters, with a warning where any was."""
    limit = CHARS_PER_TOKEN * cfg["max_length"]
    for split, values in texts.items():
        long = sum(len(text) > limit for text in values)
        if long:
            log.warning(
                "%s: %d %s split text(s) longer than %d characters cut to that before tokenizing "
                "(dataset.max_length=%d tokens are kept of each)",
                cfg["name"],
                long,
                split,
                limit,
                cfg["max_length"],
            )
            texts = {**texts, split: [text[:limit] for text in values]}
    encoding = text_encoding(cfg, texts["train"])
    train, test = (RawSplit(labels[split], encoding.encode(texts[split]), text=encoding) for split in ("train", "test"))
    return train, test


def record_lines(path: Path, delimiter: str) -> np.ndarray:
    """The line of ``path`` each row of data starts on (the header is line 1; a quoted field
    may span lines, and blank lines hold no row), as a reader of the file counts them."""
    starts, end = [], 0
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file, delimiter=delimiter)
        for row in reader:
            if row:
                starts.append(end + 1)
            end = reader.line_num
    return np.array(starts[1:])


def text_encoding(cfg: dict, train_texts: list[str]) -> TextEncoding:
    """A checkpoint's tokenizer as saved, an HF model's, or one trained on ``train_texts``."""
    if cfg.get("trained_tokenizer"):
        return TextEncoding(**cfg["trained_tokenizer"])
    if cfg["tokenizer"]:
        return model_tokenizer(resolve(cfg["tokenizer"]), cfg["max_length"])
    return trained_tokenizer(train_texts, cfg["vocab_size"], cfg["lowercase"], cfg["max_length"])


def read_texts(path: Path, text_columns: list[str], label_column: str, separator: str, cfg: dict):
    """The texts (the text columns joined) and labels of one file; a file that is missing,
    unreadable, without its columns, empty, or with a row without text or label, is one
    :class:`KdclError`."""
    import pandas as pd

    header = ",".join([label_column, *text_columns])
    if not path.is_file():
        raise KdclError(
            f"{path.absolute()} not found",
            fix=f"point dataset.root at a folder holding {cfg['train_file']} and {cfg['test_file']} "
            f"(header line {header}), or name the files with dataset.train_file and dataset.test_file; "
            f"{DATA_DIR_HINT}",
        )
    delimiter = cfg["delimiter"] or ("\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, sep=delimiter)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise KdclError(
            f"{path} is not a readable CSV file ({err})",
            fix=f"write it as UTF-8 text: a header line {header}, then one row per example",
        ) from None
    missing = [c for c in (label_column, *text_columns) if c not in table.columns]
    if missing:
        raise KdclError(
            f"{path} has no column {' or '.join(repr(c) for c in missing)} "
            f"(its columns: {abbreviated(table.columns) or 'none'})",
            fix="set dataset.text_columns and dataset.label_column to the names of its columns",
        )
    if table.empty:
        raise KdclError(f"{path} holds no examples", fix=f"write a header line {header}, then one row per example")
    texts = table[text_columns].apply(lambda row: separator.join(v.strip() for v in row if v.strip()), axis=1)
    for what, values in (("text", texts), (label_column, table[label_column].str.strip())):
        blank = np.flatnonzero(values.to_numpy() == "")
        if len(blank):
            blank = record_lines(path, delimiter)[blank]
            several = len(blank) > 1
            raise KdclError(
                f"{path}: line{'s' if several else ''} {abbreviated(blank)} ha{'ve' if several else 's'} no {what}",
                fix=f"give every row a {what}, or remove the rows without one",
            )
    return texts.tolist(), table[label_column].str.strip().tolist()
