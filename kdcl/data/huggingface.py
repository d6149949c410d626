"""The ``hf`` and ``hf_text`` datasets: a Hugging Face ``datasets`` dataset of images or of
texts (the optional extra ``kdcl[data]``).

``dataset.path`` is read in one of three ways:

- a folder written by ``DatasetDict.save_to_disk`` → ``datasets.load_from_disk(path)``;
- a builder (``imagefolder``, ``csv``, ``parquet``, ``json``, …) reading local files →
  ``datasets.load_dataset(path, data_dir=dataset.data_dir, data_files=dataset.data_files)``;
- a Hub id (``user/name``) → ``datasets.load_dataset(path)``, which needs internet the first
  time (offline, the error says how to bring the data over).

Splits ``dataset.train_split`` and ``dataset.test_split`` are used; the image column holds
images (a ``datasets.Image`` feature) or image file paths, the label column a
``ClassLabel`` (its names become the class names), class indices or class names. The
images are decoded like ``imagefolder``'s (:mod:`kdcl.data.images`), with the same
messages for an image that cannot be decoded. ``hf_text`` joins ``dataset.text_columns``
instead and tokenizes them as ``text_csv`` does (:mod:`kdcl.data.text`): SST-2, AG News,
IMDB and the like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcl.data.checks import abbreviated
from kdcl.data.images import EncodedImage, class_indices, image_splits, read_file
from kdcl.data.loaders import register_dataset
from kdcl.data.splits import RawSplit
from kdcl.data.text import encoded_splits
from kdcl.data.tokens import check_max_length
from kdcl.errors import KdclError

# The files save_to_disk writes: a DatasetDict's, and a single Dataset's.
SAVED_DICT, SAVED_DATASET = "dataset_dict.json", "state.json"
FORMS = (
    "a folder written by DatasetDict.save_to_disk, a builder (imagefolder, csv, parquet, json) "
    "with dataset.data_dir or dataset.data_files, or a Hub id (needs internet)"
)


def import_datasets() -> Any:
    """The ``datasets`` package; missing, a :class:`KdclError` naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise KdclError(
            "dataset=hf needs the Hugging Face datasets package, which is not installed",
            fix='install kdcl with its data extra: pip install "kdcl[data]"',
        ) from None
    return datasets


def load_splits(datasets: Any, cfg: dict) -> Any:
    """The DatasetDict ``dataset.path`` names (see the module's docstring)."""
    path = cfg["path"]
    folder = Path(path).expanduser()
    if (folder / SAVED_DATASET).is_file():
        raise KdclError(
            f"{folder} holds a single Dataset saved with save_to_disk, not a DatasetDict of splits",
            fix="save both splits together: DatasetDict(train=..., test=...).save_to_disk(path)",
        )
    if (folder / SAVED_DICT).is_file():
        return datasets.load_from_disk(str(folder))
    try:
        return datasets.load_dataset(path, data_dir=cfg["data_dir"], data_files=cfg["data_files"])
    except ConnectionError as err:  # the Hub could not be reached, or offline mode is on (HF_DATASETS_OFFLINE)
        raise KdclError(
            f"dataset.path={path!r} is no local dataset, and the Hugging Face Hub cannot be reached to fetch it ({err})",
            fix=f"where there is internet, run datasets.load_dataset({path!r}).save_to_disk(DIR); "
            "copy DIR here and set dataset.path=DIR",
        ) from None
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, … for what it cannot read
        raise KdclError(
            f"cannot load Hugging Face dataset {path!r} ({type(err).__name__}: {err})",
            fix=f"set dataset.path to {FORMS}",
        ) from None


class ImageColumn:
    """``read(i)`` of a Hugging Face dataset's image column: images stored as bytes or as file
    paths (relative ones against ``base``). The dataset holds that column only, undecoded."""

    def __init__(self, dataset: Any, column: str, described: str, base: Path):
        self.dataset, self.column, self.described, self.base = dataset, column, described, base

    def __call__(self, i: int) -> EncodedImage:
        value = self.dataset[i][self.column]
        stored = value if isinstance(value, dict) else {"bytes": None, "path": value}
        fix = f"replace or remove row {i} of {self.described}"
        if stored["bytes"] is not None:
            return EncodedImage(stored["bytes"], f"the image of row {i} of {self.described}", fix)
        if not stored["path"]:
            raise KdclError(f"row {i} of {self.described} has no image", fix=fix)
        file = self.base / stored["path"]  # an absolute path stays as it is
        return read_file(str(file), fix)


def image_column(datasets: Any, split: Any, column: str, described: str, base: Path) -> ImageColumn:
    """The image column of ``split``, undecoded: a ``datasets.Image`` feature or file paths."""
    feature = split.features[column]
    images = split.select_columns([column])
    if isinstance(feature, datasets.Image):
        return ImageColumn(images.cast_column(column, datasets.Image(decode=False)), column, described, base)
    if isinstance(feature, datasets.Value) and "string" in feature.dtype:
        return ImageColumn(images, column, described, base)
    raise KdclError(
        f"column {column!r} of {described} holds {feature}, neither images nor image file paths",
        fix="set dataset.image_column to a column of images (datasets.Image) or of image file paths",
    )


def split_of(loaded: Any, role: str, cfg: dict, columns: list[str], keys: str) -> Any:
    """The split ``dataset.{role}_split`` of ``loaded``, checked to have ``columns`` (the
    config ``keys`` that name them, for the fix)."""
    path, name = cfg["path"], cfg[f"{role}_split"]
    if name not in loaded:
        raise KdclError(
            f"Hugging Face dataset {path!r} has no split {name!r} (its splits: {abbreviated(loaded)})",
            fix=f"set dataset.{role}_split to one of them",
        )
    split = loaded[name]
    missing = [key for key in columns if key not in split.column_names]
    if missing:
        raise KdclError(
            f"split {name!r} of Hugging Face dataset {path!r} has no column "
            f"{' or '.join(repr(k) for k in missing)} (its columns: {abbreviated(split.column_names)})",
            fix=f"set {keys} to its columns",
        )
    return split


def labelled(datasets: Any, cfg: dict, splits: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The class indices of each split's label column, and the class names (a ``ClassLabel``'s
    names unless ``dataset.class_names`` gives them)."""
    label_key = cfg["label_column"]
    label_feature = splits["train"].features[label_key]
    names = cfg["class_names"] or (label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None)
    return class_indices(
        f"Hugging Face dataset {cfg['path']!r}", {role: list(split[label_key]) for role, split in splits.items()}, names
    )


@register_dataset("hf")
def hugging_face(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """A Hugging Face dataset's train and test splits, resized to ``dataset.image_size``; held
    in memory unless ``dataset.in_memory=false``."""
    datasets = import_datasets()
    loaded = load_splits(datasets, cfg)
    path, image_key = cfg["path"], cfg["image_column"]
    columns, keys = [image_key, cfg["label_column"]], "dataset.image_column and dataset.label_column"
    splits = {role: split_of(loaded, role, cfg, columns, keys) for role in ("train", "test")}
    labels, class_names = labelled(datasets, cfg, splits)
    base = Path(cfg["data_dir"] or ".").expanduser()
    read = {
        role: image_column(datasets, split, image_key, f"split {cfg[f'{role}_split']!r} of {path}", base)
        for role, split in splits.items()
    }
    return *image_splits(cfg, read, labels), class_names


@register_dataset("hf_text")
def hugging_face_text(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """A Hugging Face dataset of labelled texts: ``dataset.text_columns`` joined with
    ``dataset.text_separator``, tokenized as ``text_csv`` is (a BPE vocabulary trained on the
    train split, or ``dataset.tokenizer``), held in memory as (N, max_length) ids."""
    check_max_length(cfg["max_length"])
    datasets = import_datasets()
    loaded = load_splits(datasets, cfg)
    text_keys = list(cfg["text_columns"])
    if not text_keys:
        raise KdclError("dataset.text_columns is empty", fix="name the column(s) holding the text, e.g. [text]")
    columns, keys = [*text_keys, cfg["label_column"]], "dataset.text_columns and dataset.label_column"
    splits = {role: split_of(loaded, role, cfg, columns, keys) for role in ("train", "test")}
    labels, class_names = labelled(datasets, cfg, splits)
    texts = {
        role: joined_texts(split, text_keys, cfg, f"split {cfg[f'{role}_split']!r} of {cfg['path']}")
        for role, split in splits.items()
    }
    train, test = encoded_splits(cfg, texts, labels)
    return train, test, class_names


def joined_texts(split: Any, columns: list[str], cfg: dict, described: str) -> list[str]:
    """Each row's text columns, stripped and joined; a row without text is one :class:`KdclError`."""
    table = split.select_columns(columns).to_dict()
    texts = [
        cfg["text_separator"].join(str(v).strip() for v in values if v is not None and str(v).strip())
        for values in zip(*(table[c] for c in columns))
    ]
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise KdclError(
            f"row{'s' if len(empty) > 1 else ''} {abbreviated(empty)} of {described} ha{'ve' if len(empty) > 1 else 's'} no text",
            fix="give every row a text, or remove the rows without one (Dataset.filter)",
        )
    return texts
