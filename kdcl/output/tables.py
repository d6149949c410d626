"""Metrics tables: per-epoch CSVs, the run summary, and their console and Markdown rendering."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from kdcl.files import write_replacing

# Tables go to stdout at the terminal's width; elsewhere (files, CI, Slurm) at $COLUMNS, else 100.
stdout = Console()
if not stdout.is_terminal and "COLUMNS" not in os.environ:
    stdout = Console(width=100)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add the row of epoch ``row["epoch"]`` to the per-epoch CSV ``path``, rewritten
    atomically (a killed run keeps whole rows). Rows of that epoch and later ones are
    dropped first, so a resumed stage never duplicates a row."""
    frame = pd.DataFrame([row])
    if path.is_file():
        earlier = pd.read_csv(path).query(f"epoch < {int(row['epoch'])}")
        frame = frame if earlier.empty else pd.concat([earlier, frame], ignore_index=True)
    write_csv(frame, path)


def labelled(frame: pd.DataFrame, columns: Mapping[str, Any]) -> pd.DataFrame:
    """``frame`` with a column per entry of ``columns`` it does not have yet (a swept
    ``distill=kd,dkd`` is the summary's ``distill`` column already), its value on every
    row, right after ``model`` (a sweep job's swept keys in its summary)."""
    frame = frame.copy()
    new = {name: value for name, value in columns.items() if name not in frame.columns}
    for i, (name, value) in enumerate(new.items(), start=1):
        frame.insert(i, name, [value] * len(frame))
    return frame


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically: a reader sees the old file or the new one, never half.
    Its floats as :func:`csv_floats` writes them."""
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = csv_floats(frame[column].to_numpy(dtype=np.float64))
    write_replacing(path, lambda tmp: frame.to_csv(tmp, index=False))


def csv_floats(values: np.ndarray) -> np.ndarray:
    """Floats as text: a value that is exactly a float32 (what torch measured) in the
    shortest digits that give that float32 back (``0.1``, not ``0.10000000149011612``);
    any other value, and whole numbers, as Python writes a float; NaN as an empty cell."""
    single = values.astype(np.float32)
    measured = (single.astype(np.float64) == values) & (values != np.round(values))
    text = np.where(measured, single.astype(str), values.astype(str)).astype(object)
    text[np.isnan(values)] = ""
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


# Columns a printed table leaves out when no row holds a value: top-5 accuracy, measured
# for more than 10 classes only (the CSVs keep them, empty).
PRINTED_WHEN_MEASURED = {"test_acc_top5", "acc_top5"}


def print_table(frame: pd.DataFrame, title: str, columns: Iterable[str] | None = None) -> None:
    """Render (some columns of) a table with rich, every cell whole: where the columns do
    not fit the console's width, in blocks of columns one under the other, each led by the
    first column (the rows' names) (:func:`column_blocks`). A column of
    :data:`PRINTED_WHEN_MEASURED` is shown only where some row holds a value."""
    columns = [
        c
        for c in (columns or frame.columns)
        if c in frame.columns and (c not in PRINTED_WHEN_MEASURED or frame[c].notna().any())
    ]
    cells = {c: [_fmt(v) for v in frame[c]] for c in columns}
    widths = [max([len(c), *map(len, cells[c])]) for c in columns]
    for i, block in enumerate(column_blocks(widths, stdout.width)):
        table = Table(title=title if i == 0 else None)
        for c in (columns[j] for j in block):
            table.add_column(c, justify="right" if pd.api.types.is_numeric_dtype(frame[c]) else "left", no_wrap=True)
        for r in range(len(frame)):
            table.add_row(*(cells[columns[j]][r] for j in block))
        stdout.print(table)


def column_blocks(widths: list[int], room: int) -> list[list[int]]:
    """The columns of a table, by index, in blocks that each fit ``room`` characters when
    drawn (a column of text ``w`` wide takes ``w + 3``: its padding and a rule, and the table
    one more for its left border). Every block starts with column 0; the others follow in
    order, a new block where the next one does not fit (alone, it gets a block of its own)."""
    blocks: list[list[int]] = []
    used = room  # no block open yet
    for j, width in enumerate(widths[1:], start=1):
        if used + width + 3 > room:
            blocks.append([0])
            used = 1 + widths[0] + 3
        blocks[-1].append(j)
        used += width + 3
    return blocks or [[0]]


def markdown_table(frame: pd.DataFrame) -> str:
    """A table as Markdown, its numbers formatted like the console tables."""
    lines = [list(map(str, frame.columns)), ["---"] * len(frame.columns)]
    lines += [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
