"""The ``csv`` dataset: image files listed in a manifest per split, one ``path,label`` row
per image.

Paths are relative to the manifest's folder (or absolute). Labels are class names, or
class indices 0..C−1 when every label of both manifests is a whole number
(:func:`kdcl.data.images.class_indices`). Every listed file must exist when the data
loads; the images are then decoded like ``imagefolder``'s (:mod:`kdcl.data.images`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcl.data.checks import abbreviated
from kdcl.data.images import ImageFiles, class_indices, image_splits
from kdcl.data.loaders import register_dataset
from kdcl.data.splits import RawSplit
from kdcl.errors import KdclError


@register_dataset("csv")
def csv_manifest(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """Images listed in ``root/train.csv`` and ``root/test.csv`` (``dataset.train_manifest``,
    ``dataset.test_manifest``), resized to ``dataset.image_size``; held in memory unless
    ``dataset.in_memory=false``."""
    root = Path(cfg["root"]).expanduser()
    manifests = {split: root / cfg[f"{split}_manifest"] for split in ("train", "test")}
    rows = {split: read_manifest(path, cfg["image_column"], cfg["label_column"]) for split, path in manifests.items()}
    labels, class_names = class_indices(
        f"{root} (train and test manifests)", {split: y for split, (_, y) in rows.items()}, cfg["class_names"]
    )
    read = {
        split: ImageFiles(
            paths, fix=f"replace the file with a readable image, or remove its row from {manifests[split]}"
        )
        for split, (paths, _) in rows.items()
    }
    return *image_splits(cfg, read, labels), class_names


def read_manifest(path: Path, image_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """The image paths (resolved against the manifest's folder) and labels a manifest lists;
    a manifest that is missing, unreadable, empty, without its columns or with blank cells,
    or that lists files that do not exist, is one :class:`KdclError`."""
    import pandas as pd

    header = f"{image_column},{label_column}"
    if not path.is_file():
        raise KdclError(
            f"{path} not found",
            fix=f"point dataset.root at a folder holding train.csv and test.csv (header line {header}), "
            "or name the files with dataset.train_manifest and dataset.test_manifest",
        )
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise KdclError(
            f"{path} is not a readable CSV file ({err})",
            fix=f"write it as text: a header line {header}, then one row per image",
        ) from None
    missing = [column for column in (image_column, label_column) if column not in table.columns]
    if missing and len(table.columns):
        raise KdclError(
            f"{path} has no column {' or '.join(repr(c) for c in missing)} (its columns: {abbreviated(table.columns)})",
            fix=f"start it with the header line {header}, or set dataset.image_column and dataset.label_column "
            "to the names of its columns",
        )
    if table.empty:
        raise KdclError(f"{path} lists no images", fix=f"write a header line {header}, then one row per image")
    for column in (image_column, label_column):
        blank = np.flatnonzero(table[column].str.strip() == "") + 2  # line numbers: the header is line 1
        if len(blank):
            several = len(blank) > 1
            raise KdclError(
                f"{path}: line{'s' if several else ''} {abbreviated(blank)} ha{'ve' if several else 's'} no {column}",
                fix=f"give every row a {column}, or remove the rows without one",
            )
    paths = [str(path.parent / p.strip()) for p in table[image_column]]  # an absolute path stays as it is
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        several = len(absent) > 1
        raise KdclError(
            f"{path} lists {len(absent)} image file{'s' if several else ''} that do{'' if several else 'es'} "
            f"not exist: {abbreviated(absent, 3)}",
            fix=f"correct the paths (relative to {path.parent}) or remove those rows",
        )
    return paths, [label.strip() for label in table[label_column]]
