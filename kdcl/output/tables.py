"""Metrics tables: per-epoch CSVs, the run summary, and their console and Markdown rendering."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=200)  # files and CI: no wrapping of wide tables


class MetricsTable:
    """A per-epoch CSV, rewritten atomically after every row (a killed run keeps whole rows).

    ``keep_before_epoch`` keeps the rows of epochs a resumed stage has already finished
    and drops any later ones, so resuming never duplicates a row.
    """

    def __init__(self, path: Path, keep_before_epoch: int = 1):
        self.path = path
        self.frame = pd.DataFrame()
        if keep_before_epoch > 1 and path.is_file():
            old = pd.read_csv(path)
            self.frame = old[old["epoch"] < keep_before_epoch]

    def append(self, row: dict[str, Any]) -> None:
        new = pd.DataFrame([row])
        self.frame = new if self.frame.empty else pd.concat([self.frame, new], ignore_index=True)
        write_csv(self.frame, self.path)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


def print_table(frame: pd.DataFrame, title: str, columns: Iterable[str] | None = None) -> None:
    """Render (some columns of) a table with rich."""
    columns = [c for c in (columns or frame.columns) if c in frame.columns]
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
