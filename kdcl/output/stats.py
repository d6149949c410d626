"""Means over seeds with t-distribution confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats  # installed with scikit-learn

LEVEL = 0.95


def t_interval(values: Iterable[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean, sample standard deviation and half-width of the two-sided ``level`` t-interval.

    NaNs are ignored; with fewer than two values the spread and the interval are NaN.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return float(x.mean()), std, half


def aggregate(table: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per distinct ``by`` (a config): the number of rows (seeds) and, per metric,
    ``<metric>_mean``, ``<metric>_std`` and ``<metric>_ci95`` (the interval's half-width)."""
    groups = table.groupby(by, dropna=False, sort=False) if by else [((), table)]
    rows = []
    for keys, group in groups:
        row = {**dict(zip(by, keys)), "seeds": len(group)}
        for metric in metrics:
            mean, std, half = t_interval(group[metric], LEVEL)
            row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": half})
        rows.append(row)
    return pd.DataFrame(rows)
