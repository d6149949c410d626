"""Report figures (PNG): pivot heatmaps and learning curves.

Drawn on matplotlib ``Figure`` objects, which render with the Agg backend and need no
display and no global pyplot state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def heatmaps(grids: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """One annotated heatmap per grid (rows × columns of a pivot), side by side."""
    fig = Figure(figsize=(5.5 * len(grids), 4.5), layout="constrained")
    fig.suptitle(title)
    for ax, (name, grid) in zip(fig.subplots(1, len(grids), squeeze=False)[0], grids.items()):
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        ax.set_xlabel(str(grid.columns.name))
        ax.set_ylabel(str(grid.index.name))
        ax.set_title(name)
        middle = np.nanmean(values)
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.4f}", ha="center", va="center", color="white" if v < middle else "black")
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)


def learning_curves(curves: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """Validation accuracy per epoch, one line per job (``epoch`` and ``val_acc`` columns)."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, metrics in curves.items():
        ax.plot(metrics["epoch"], metrics["val_acc"], marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val_acc")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
