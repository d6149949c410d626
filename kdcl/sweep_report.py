"""``kdcl report PATH [PATH ...]``: one table over runs and sweeps, with pivots, seeds and plots.

Every job folder under a PATH that holds a ``summary.csv`` is one row: its command-line
overrides (``.hydra/overrides.yaml``) as columns, next to its summary metrics. Jobs that
differ only in ``seed`` are aggregated (mean ± std and a 95% t-interval). The best
config is chosen on validation accuracy (the distilled student's ``best_val_acc``); its
test accuracy is reported, and nothing is ranked by test accuracy.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from kdcl.errors import KdclError
from kdcl.failures import FAILED_FILE
from kdcl.plots import heatmaps, learning_curves
from kdcl.report import markdown_table, print_table, stdout, write_csv
from kdcl.stats import LEVEL, aggregate

# report column -> (summary row, summary column); unprefixed columns are the distilled student's.
METRICS = {
    "best_val_acc": ("distill", "best_val_acc"),
    "test_acc": ("distill", "test_acc"),
    "test_acc_last": ("distill", "test_acc_last"),
    "kd_gain": ("distill", "kd_gain"),  # distill − baseline test_acc of the same seed: a paired difference
    "teacher_agreement": ("distill", "teacher_agreement"),
    "steps": ("distill", "steps"),
    "seconds": ("distill", "seconds"),
    "teacher_test_acc": ("teacher", "test_acc"),
    "baseline_test_acc": ("baseline", "test_acc"),
    "baseline_best_val_acc": ("baseline", "best_val_acc"),
}
SHOWN = ["best_val_acc", "test_acc", "kd_gain", "teacher_test_acc", "baseline_test_acc", "steps", "seconds"]
SELECT_BY = "best_val_acc"  # validation: the only metric that ranks configs
AGGREGATED = ["best_val_acc", "test_acc", "kd_gain", "baseline_test_acc"]
PIVOTED = ["best_val_acc", "test_acc", "kd_gain"]
PLOTTED = ["test_acc", "kd_gain"]
DEFAULT_PIVOT = ("distill.alpha", "distill.temperature")
SEED = "seed"


@dataclass
class Report:
    """The jobs found under the report's paths."""

    jobs: pd.DataFrame  # one row per job: run, override keys, METRICS
    keys: list[str]  # the override columns
    curves: dict[str, pd.DataFrame]  # run -> its distill/metrics.csv
    skipped: list[str]  # job folders without a summary, with the reason

    @property
    def swept(self) -> list[str]:
        """Override keys that take more than one value."""
        return [k for k in self.keys if self.jobs[k].nunique(dropna=False) > 1]

    @property
    def factors(self) -> list[str]:
        """The swept keys that make a config: all but the seed."""
        return [k for k in self.swept if k != SEED]

    def configs(self) -> pd.DataFrame:
        """One row per config (all overrides but the seed): mean, std and interval over its seeds."""
        return aggregate(self.jobs, [k for k in self.keys if k != SEED], AGGREGATED)

    def selected(self) -> pd.Series:
        """The config with the highest mean validation accuracy (the first one on ties)."""
        configs = self.configs().astype(object)  # a row keeps each column's type
        return configs.loc[configs[f"{SELECT_BY}_mean"].astype(float).idxmax()]

    @staticmethod
    def label(row: pd.Series, keys: list[str], short: bool = False) -> str:
        """The values of ``keys`` in a row, e.g. ``distill.alpha=0.9 distill.temperature=4``."""
        return " ".join(f"{k.split('.')[-1] if short else k}={row[k]}" for k in keys) or "the only config"


# --------------------------------------------------------------------------- reading
def _natural(path: Path) -> list[Any]:
    """Sort key: job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_jobs(path: Path) -> tuple[list[Path], list[str]]:
    """Job folders under ``path`` with a summary, and a note for each job folder without one."""
    if not path.is_dir():
        raise KdclError(f"{path} is not a folder", fix="pass run or sweep folders, e.g. outputs/multirun/DATE/TIME")
    folders = {p.parent.parent for p in path.rglob(".hydra/overrides.yaml")} | {p.parent for p in path.rglob("summary.csv")}
    done, skipped = [], []
    for job in sorted(folders, key=_natural):
        if (job / "summary.csv").is_file():
            done.append(job)
        else:
            failed = job / FAILED_FILE
            skipped.append(failed.read_text().strip() if failed.is_file() else f"{job}: no summary.csv (unfinished?)")
    return done, skipped


def read_overrides(job: Path, parser: OverridesParser) -> dict[str, Any]:
    """A job's command-line overrides as {key: value}; {} for a run without ``.hydra/``."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    values = {}
    for override in parser.parse_overrides(yaml.safe_load(path.read_text()) or []):
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        value = override.value()
        scalar = value is None or isinstance(value, (bool, int, float, str))
        values[key] = value if scalar else override.get_value_element_as_str()
    return values


def read_summary(job: Path) -> dict[str, Any]:
    """The report's metric columns from a job's ``summary.csv``."""
    summary = pd.read_csv(job / "summary.csv").set_index("model")
    return {col: summary.at[model, field] if model in summary.index and field in summary.columns else math.nan
            for col, (model, field) in METRICS.items()}


def collect(paths: list[Path]) -> Report:
    """Every job under ``paths``, in order (job 10 after job 9)."""
    parser = OverridesParser.create()
    rows, keys, curves, skipped = [], {}, {}, []
    for base in paths:
        jobs, notes = find_jobs(base)
        skipped += notes
        for job in jobs:
            run = str(job.relative_to(base.parent))
            overrides = read_overrides(job, parser)
            keys.update(dict.fromkeys(overrides))
            rows.append({"run": run, **overrides, **read_summary(job)})
            if (job / "distill" / "metrics.csv").is_file():
                curves[run] = pd.read_csv(job / "distill" / "metrics.csv")
    if not rows:
        raise KdclError(f"no finished runs (summary.csv) under {', '.join(map(str, paths))}",
                        fix="pass the folder of a kdcl train run or sweep (outputs/train/... or outputs/multirun/...)")
    jobs = pd.DataFrame(rows).reindex(columns=["run", *keys, *METRICS])
    return Report(jobs, list(keys), curves, skipped)


# --------------------------------------------------------------------------- tables
def pivot(jobs: pd.DataFrame, rows: str, cols: str, metric: str) -> pd.DataFrame:
    """``metric`` on a ``rows`` × ``cols`` grid: the mean over each cell's jobs (seeds, other keys)."""
    return jobs.pivot_table(index=rows, columns=cols, values=metric, aggfunc="mean")


def pivot_keys(report: Report, requested: list[str] | None) -> tuple[str, str] | None:
    """The heatmap's two keys: ``--pivot``, else alpha × temperature, else the first two swept keys."""
    if requested:
        wrong = [k for k in requested if k not in report.factors]
        if wrong:
            raise KdclError(f"--pivot {' '.join(wrong)}: not a swept key of these runs",
                            fix=f"choose two of: {', '.join(report.factors) or '(nothing was swept)'}")
        return requested[0], requested[1]
    if set(DEFAULT_PIVOT) <= set(report.factors):
        return DEFAULT_PIVOT
    return (report.factors[0], report.factors[1]) if len(report.factors) >= 2 else None


def seed_table(report: Report, configs: pd.DataFrame) -> pd.DataFrame:
    """Configs with their seeds: each metric as ``mean ± std`` and its 95% interval."""
    shown = configs[[*report.factors, "seeds"]].copy()
    for m in AGGREGATED:
        mean, std, half = (configs[f"{m}_{stat}"] for stat in ("mean", "std", "ci95"))
        shown[m] = [f"{a:.4f} ± {s:.4f}" for a, s in zip(mean, std)]
        shown[f"{m} {LEVEL:.0%} CI"] = [f"[{a - h:.4f}, {a + h:.4f}]" for a, h in zip(mean, half)]
    return shown


def grid_table(grid: pd.DataFrame) -> pd.DataFrame:
    """A pivot as a flat table: the row key, then one column per column value."""
    flat = grid.set_axis([f"{grid.columns.name}={c}" for c in grid.columns], axis=1)
    return flat.reset_index()


def selection_text(report: Report) -> str:
    """The config chosen on validation, with its test accuracy."""
    best = report.selected()
    seeds = int(best["seeds"])
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    text = (f"selected on validation ({SELECT_BY} of the distilled student{over}): {report.label(best, report.factors)} — "
            f"best_val_acc {best[f'{SELECT_BY}_mean']:.4f}, test_acc {best['test_acc_mean']:.4f}")
    if seeds > 1:
        text += f" ± {best['test_acc_std']:.4f} ({LEVEL:.0%} CI ±{best['test_acc_ci95']:.4f})"
    return text


# --------------------------------------------------------------------------- output
def write_report(report: Report, out: Path, keys: tuple[str, str] | None) -> list[Path]:
    """Print the tables and write report.csv, report.md, the PNGs (and seeds.csv); return the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.csv", out / "report.md"]
    write_csv(report.jobs, files[0])
    print_table(report.jobs, f"kdcl report — {len(report.jobs)} jobs", ["run", *report.swept, *SHOWN])
    md = ["# kdcl report", "", f"{len(report.jobs)} jobs. Unprefixed metrics are the distilled student's; "
          "`kd_gain` = distill − baseline test_acc of the same seed.", ""]
    selection = selection_text(report)
    md += ["## Selected on validation", "", selection, "", "## Jobs", "", markdown_table(report.jobs), ""]

    configs = report.configs()
    if (configs["seeds"] > 1).any():
        seeds = seed_table(report, configs)
        write_csv(configs, out / "seeds.csv")
        files.append(out / "seeds.csv")
        print_table(seeds, f"over seeds: mean ± std and {LEVEL:.0%} t-interval (kd_gain: paired, distill − baseline)")
        md += ["## Over seeds", "", f"Mean ± std and {LEVEL:.0%} t-interval; `kd_gain` is the paired difference "
               "distill − baseline per seed.", "", markdown_table(seeds), ""]

    if keys:
        rows, cols = keys
        grids = {m: pivot(report.jobs, rows, cols, m) for m in PIVOTED}
        grids = {m: g for m, g in grids.items() if g.size}
        md += [f"## {rows} × {cols}", "", "Mean over the jobs in each cell (seeds and other swept keys).", ""]
        for m, grid in grids.items():
            md += [f"### {m}", "", markdown_table(grid_table(grid)), ""]
            print_table(grid_table(grid), f"{m}: {rows} × {cols}")
        plotted = {m: grids[m] for m in PLOTTED if m in grids}
        heatmaps(plotted, out / "heatmap.png", f"distilled student: {rows} × {cols}")
        files.append(out / "heatmap.png")
        md += ["![heatmaps](heatmap.png)", ""]

    curves = {f"{row['run']} {report.label(row, report.swept, short=True)}": report.curves[row["run"]]
              for _, row in report.jobs.iterrows() if row["run"] in report.curves}
    if curves:
        learning_curves(curves, out / "curves.png", "distilled student: validation accuracy per epoch")
        files.append(out / "curves.png")
        md += ["## Learning curves", "", "![learning curves](curves.png)", ""]
    if report.skipped:
        md += ["## Skipped", "", *(f"- {note}" for note in report.skipped), ""]
    files[1].write_text("\n".join(md))

    stdout.print(selection, highlight=False, soft_wrap=True)
    for note in report.skipped:
        stdout.print(f"skipped: {note}", highlight=False, soft_wrap=True)
    stdout.print(f"wrote {', '.join(f.name for f in files)} in {out}", highlight=False, soft_wrap=True)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kdcl report",
        description="One table over kdcl runs and sweeps: overrides next to metrics, an alpha × temperature "
                    "pivot, seed statistics, learning curves. The best config is chosen on validation accuracy.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="run or sweep folders (searched for job folders holding summary.csv)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the report goes (default: the first PATH)")
    parser.add_argument("--pivot", nargs=2, metavar=("ROW", "COL"),
                        help="two swept keys for the heatmap (default: distill.alpha distill.temperature)")
    args = parser.parse_args(argv)
    report = collect(args.paths)
    write_report(report, args.out or args.paths[0], pivot_keys(report, args.pivot))
