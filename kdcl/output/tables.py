"""Metrics tables: per-epoch CSVs, the run summary, and their console and Markdown rendering."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from kdcl.files import write_replacing

stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=200)  # files and CI: no wrapping of wide tables


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add the row of epoch ``row["epoch"]`` to the per-epoch CSV ``path``, rewritten
    atomically (a killed run keeps whole rows). Rows of that epoch and later ones are
    dropped first, so a resumed stage never duplicates a row."""
    frame = pd.DataFrame([row])
    if path.is_file():
        earlier = pd.read_csv(path).query(f"epoch < {int(row['epoch'])}")
        frame = frame if earlier.empty else pd.concat([earlier, frame], ignore_index=True)
    write_csv(frame, path)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically: a reader sees the old file or the new one, never half."""
    write_replacing(path, lambda tmp: frame.to_csv(tmp, index=False))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


# Columns a printed table leaves out when no row holds a value: top-5 accuracy, measured
# for more than 10 classes only (the CSVs keep them, empty).
PRINTED_WHEN_MEASURED = {"test_acc_top5", "acc_top5"}


def print_table(frame: pd.DataFrame, title: str, columns: Iterable[str] | None = None) -> None:
    """Render (some columns of) a table with rich; a column of :data:`PRINTED_WHEN_MEASURED`
    only where some row holds a value."""
    columns = [
        c
        for c in (columns or frame.columns)
        if c in frame.columns and (c not in PRINTED_WHEN_MEASURED or frame[c].notna().any())
    ]
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if frame[c].dtype == object else "right")
    for _, row in frame.iterrows():
        table.add_row(*(_fmt(row[c]) for c in columns))
    stdout.print(table)


def markdown_table(frame: pd.DataFrame) -> str:
    """A table as Markdown, its numbers formatted like the console tables."""
    lines = [list(map(str, frame.columns)), ["---"] * len(frame.columns)]
    lines += [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
