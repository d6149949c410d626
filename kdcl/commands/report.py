"""``kdcl report PATH [PATH ...]``: one table over runs and sweeps, with pivots, seeds and plots.

Every job folder under a PATH that holds a ``summary.csv`` is one row: its command-line
overrides (``.hydra/overrides.yaml``) as columns, next to its summary metrics. A trial that
``kdcl tune`` pruned is a row too, its ``status`` ``pruned``: the best validation accuracy
it reached before it stopped, and no test metrics (it was never tested); it takes no part
in the selection, the seed statistics, the pivots or the arms. Jobs that
differ only in ``seed`` are aggregated (mean ± std and a 95% t-interval). The best
config is chosen on validation accuracy (the distilled student's ``best_val_acc``); its
test accuracy is reported, and nothing is ranked by test accuracy.

Every model row of the summaries (an *arm*: teacher, baseline, distill, kd, ...) is also
aggregated per config over its seeds (``arms.csv``), with its paired gain over the
baseline of the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from kdcl.commands.failures import FAILED_FILE, PRUNED_FILE
from kdcl.errors import KdclError
from kdcl.files import writable_folder
from kdcl.output.plots import heatmaps, learning_curves
from kdcl.output.stats import LEVEL, aggregate, t_interval
from kdcl.output.tables import markdown_table, print_table, stdout, write_csv

# report column -> (summary row, summary column); unprefixed columns are the distilled student's.
METRICS = {
    "best_val_acc": ("distill", "best_val_acc"),
    "test_acc": ("distill", "test_acc"),
    "test_acc_top5": ("distill", "test_acc_top5"),  # NaN for 10 classes or fewer, and in runs made before it
    "test_acc_last": ("distill", "test_acc_last"),
    "kd_gain": ("distill", "kd_gain"),  # distill − baseline test_acc of the same seed: a paired difference
    "teacher_agreement": ("distill", "teacher_agreement"),
    "steps": ("distill", "steps"),
    "seconds": ("distill", "seconds"),
    "teacher_test_acc": ("teacher", "test_acc"),
    "baseline_test_acc": ("baseline", "test_acc"),
    "baseline_best_val_acc": ("baseline", "best_val_acc"),
}
SHOWN = [
    "best_val_acc",
    "test_acc",
    "test_acc_top5",
    "kd_gain",
    "teacher_test_acc",
    "baseline_test_acc",
    "steps",
    "seconds",
]
SELECT_BY = "best_val_acc"  # validation: the only metric that ranks configs
AGGREGATED = ["best_val_acc", "test_acc", "kd_gain", "baseline_test_acc"]
PIVOTED = ["best_val_acc", "test_acc", "kd_gain"]
# heatmap.png's panels, each titled: validation first (what the report selects on), then
# test accuracy, shown as what it is, a report, never a choice
PLOTTED = {
    "best_val_acc": "best_val_acc (validation: choose on this)",
    "test_acc": "test_acc (test: report it, never choose on it)",
}
DEFAULT_PIVOT = ("distill.alpha", "distill.temperature")
SEED = "seed"
STAGE_CURVES = "stage_curves.png"  # a run's own figure (run_figures), beside the report's curves.png
STATUS = "status"  # finished, or pruned (a kdcl tune trial stopped early)

# per arm: the summary columns kept, the accuracies aggregated over seeds, and the paired gains
ARM_COLUMNS = ["test_acc", "test_acc_top5", "test_acc_last", "best_val_acc", "params", "steps"]
# best-validation epoch ("best", top-1 and top-5), last epoch ("last")
ARM_ACCURACIES = ["test_acc", "test_acc_top5", "test_acc_last"]
GAINS = {"gain": "test_acc", "gain_last": "test_acc_last"}  # gain column -> the accuracy it pairs
BASELINE = "baseline"
TEACHER = "teacher"
PAIR = "pair"  # what pairs an arm with the baseline: the seed


@dataclass
class Report:
    """The jobs found under the report's paths."""

    jobs: pd.DataFrame  # one row per job: run, override keys, STATUS, METRICS
    models: pd.DataFrame  # one row per job and summary row: run, override keys, arm, pair, ARM_COLUMNS
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

    @property
    def finished(self) -> pd.DataFrame:
        """The jobs that ran to the end (all but pruned trials)."""
        return self.jobs[self.jobs[STATUS] == "finished"]

    @property
    def pruned(self) -> int:
        return int((self.jobs[STATUS] == "pruned").sum())

    def configs(self) -> pd.DataFrame:
        """One row per finished config (all overrides but the seed): mean, std and interval over its seeds."""
        return aggregate(self.finished, [k for k in self.keys if k != SEED], AGGREGATED)

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
    """Job folders under ``path`` with a summary (or pruned), and a note for each other job folder."""
    if not path.is_dir():
        raise KdclError(f"{path} is not a folder", fix="pass run or sweep folders, e.g. outputs/multirun/DATE/TIME")
    folders = {p.parent.parent for p in path.rglob(".hydra/overrides.yaml")} | {
        p.parent for p in path.rglob("summary.csv")
    }
    done, skipped = [], []
    for job in sorted(folders, key=_natural):
        if (job / "summary.csv").is_file() or (job / PRUNED_FILE).is_file():
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


def job_metrics(summary: pd.DataFrame) -> dict[str, Any]:
    """The report's metric columns (METRICS) from a job's ``summary.csv``."""
    summary = summary.set_index("model")
    return {
        col: summary.at[model, field] if model in summary.index and field in summary.columns else math.nan
        for col, (model, field) in METRICS.items()
    }


def pruned_metrics(job: Path) -> dict[str, Any]:
    """A pruned trial's metric columns: the best validation accuracy of its distilled student
    when it stopped (``pruned.json``); nothing else was measured."""
    record = json.loads((job / PRUNED_FILE).read_text())
    return {**dict.fromkeys(METRICS, math.nan), "best_val_acc": record["best_val_acc"]}


def model_rows(summary: pd.DataFrame, seed: Any, run: str) -> pd.DataFrame:
    """Every model row of a job's ``summary.csv``: ``arm``, ``pair`` and ARM_COLUMNS (NaN where absent).

    ``pair`` is the seed: the summary's ``seed`` column, else the ``seed`` override (``seed``),
    else the job itself (a job's models share its seed).
    """
    models = summary.reindex(columns=["model", *ARM_COLUMNS]).rename(columns={"model": "arm"})
    fallback = f"job {run}" if seed is None else seed
    seeds = summary[SEED] if SEED in summary.columns else [math.nan] * len(summary)
    models.insert(1, PAIR, [fallback if pd.isna(s) else s for s in seeds])
    return models


# What a damaged job's files raise when read: unreadable or non-UTF-8 files, CSV without
# rows, JSON or YAML that does not parse (a YAML tag naming Python), a missing column or key.
DAMAGED = (OSError, ValueError, KeyError, yaml.YAMLError, OverrideParseException)


@dataclass
class Job:
    """What a report reads of one job folder."""

    row: dict[str, Any]  # its row of the jobs table
    overrides: dict[str, Any]
    models: pd.DataFrame | None  # its summary's model rows (None: a pruned trial)
    curve: pd.DataFrame | None  # its distilled student's metrics.csv


def read_job(job: Path, run: str, parser: OverridesParser) -> Job:
    """A job folder's overrides, summary (or pruned record) and learning curve; a damaged
    file raises one of :data:`DAMAGED`."""
    overrides = read_overrides(job, parser)
    if (job / "summary.csv").is_file():
        summary = pd.read_csv(job / "summary.csv")
        if "model" not in summary.columns:
            raise KeyError("summary.csv has no model column")
        row = {"run": run, **overrides, STATUS: "finished", **job_metrics(summary)}
        models = model_rows(summary, overrides.get(SEED), run).assign(**{"run": run, **overrides})
    else:
        row, models = {"run": run, **overrides, STATUS: "pruned", **pruned_metrics(job)}, None
    metrics = job / "distill" / "metrics.csv"
    return Job(row, overrides, models, pd.read_csv(metrics) if metrics.is_file() else None)


def collect(paths: list[Path]) -> Report:
    """Every job under ``paths``, in order (job 10 after job 9); a job whose files are
    damaged is skipped with a note naming it and why."""
    parser = OverridesParser.create()
    rows, models, keys, curves, skipped = [], [], {}, {}, []
    for base in paths:
        jobs, notes = find_jobs(base)
        skipped += notes
        for folder in jobs:
            run = str(folder.relative_to(base.parent))
            try:
                job = read_job(folder, run, parser)
            except DAMAGED as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                skipped.append(f"{folder}: damaged, left out ({type(err).__name__}: {reason})")
                continue
            keys.update(dict.fromkeys(job.overrides))
            rows.append(job.row)
            if job.models is not None:
                models.append(job.models)
            if job.curve is not None:
                curves[run] = job.curve
    if not models:
        pruned = f" ({len(rows)} pruned trials)" if rows else ""
        raise KdclError(
            f"no finished runs (summary.csv) under {', '.join(map(str, paths))}{pruned}",
            fix="pass the folder of a kdcl train run, sweep or search (outputs/train/..., outputs/multirun/..., outputs/tune/...)",
        )
    jobs = pd.DataFrame(rows).reindex(columns=["run", *keys, STATUS, *METRICS])
    models = pd.concat(models, ignore_index=True).reindex(columns=["run", *keys, "arm", PAIR, *ARM_COLUMNS])
    return Report(jobs, models, list(keys), curves, skipped)


# --------------------------------------------------------------------------- tables
def pivot(jobs: pd.DataFrame, rows: str, cols: str, metric: str) -> pd.DataFrame:
    """``metric`` on a ``rows`` × ``cols`` grid: the mean over each cell's jobs (seeds, other keys)."""
    return jobs.pivot_table(index=rows, columns=cols, values=metric, aggfunc="mean")


def pivot_keys(report: Report, requested: list[str] | None) -> tuple[str, str] | None:
    """The heatmap's two keys: ``--pivot``, else alpha × temperature, else the first two swept keys."""
    if requested:
        wrong = [k for k in requested if k not in report.factors]
        if wrong:
            raise KdclError(
                f"--pivot {' '.join(wrong)}: not a swept key of these runs",
                fix=f"choose two of: {', '.join(report.factors) or '(nothing was swept)'}",
            )
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
    text = (
        f"selected on validation ({SELECT_BY} of the distilled student{over}): {report.label(best, report.factors)} — "
        f"best_val_acc {best[f'{SELECT_BY}_mean']:.4f}, test_acc {best['test_acc_mean']:.4f}"
    )
    if seeds > 1:
        text += f" ± {best['test_acc_std']:.4f} ({LEVEL:.0%} CI ±{best['test_acc_ci95']:.4f})"
    return text


# --------------------------------------------------------------------------- arms over seeds
def spread(name: str, values: pd.Series) -> dict[str, float]:
    """``<name>_mean``, ``<name>_std`` and ``<name>_ci95`` of values x_1..x_n (NaNs ignored).

    mean = Σx_i / n, std s = √(Σ(x_i − mean)² / (n − 1)), ci95 = t_{0.975, n−1}·s/√n:
    the 95% t-interval is mean ± ci95 (std and ci95 are NaN for n < 2).
    """
    mean, std, half = t_interval(values, LEVEL)
    return {f"{name}_mean": mean, f"{name}_std": std, f"{name}_ci95": half}


def paired_differences(runs: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> pd.Series:
    """d_s = arm_s − baseline_s for each run of the arm, s its seed; NaN where the baseline has no seed s.

    baseline_s is the mean of the baseline's runs with seed s (one, unless jobs repeat a seed).
    """
    partner = baseline.groupby(PAIR, sort=False)[metric].mean()
    return runs[metric] - runs[PAIR].map(partner)


def arm_stats(runs: pd.DataFrame, baseline: pd.DataFrame | None) -> dict[str, Any]:
    """One arm of one config over its seeds (``runs``: one row per seed).

    ``seeds`` = n; spread() of test_acc, test_acc_top5 and test_acc_last; the paired gains ``gain``
    (test_acc) and ``gain_last`` (test_acc_last): spread() of d_s = arm_s − baseline_s over
    the seeds s both have (``pairs`` of them), NaN for the baseline itself or without one;
    ``best_val_acc_mean``; ``params`` and ``steps`` of the first run.
    """
    gains = {
        gain: paired_differences(runs, baseline, metric) if baseline is not None else pd.Series([math.nan])
        for gain, metric in GAINS.items()
    }
    row: dict[str, Any] = {"seeds": len(runs), "pairs": int(gains["gain"].notna().sum())}
    for metric in ARM_ACCURACIES:
        row.update(spread(metric, runs[metric]))
    for gain, diffs in gains.items():
        row.update(spread(gain, diffs))
    row["best_val_acc_mean"] = runs["best_val_acc"].mean()
    row.update(params=runs["params"].iloc[0], steps=runs["steps"].iloc[0])
    return row


def arm_order(arms: pd.Series) -> list[str]:
    """The arms in the order the summaries list them, the teacher first."""
    return sorted(dict.fromkeys(arms), key=lambda arm: arm != TEACHER)


def arm_table(report: Report) -> pd.DataFrame:
    """One row per config (its swept keys but the seed) and arm, in arm_order(): arm_stats().
    An arm whose every config trained the same models (the teacher and the baseline, which
    no distillation key changes, taken from the stage cache) has one row, its swept keys
    empty. The gain is a student's: the teacher and the baseline have none."""
    models, by = report.models, report.factors
    groups = list(models.groupby(by, dropna=False, sort=False)) if by else [((), models)]
    shared = [arm for arm in (TEACHER, BASELINE) if by and same_in_every_config(models, arm, by)]
    rows = []
    for arm in shared:
        runs = models[models["arm"] == arm].drop_duplicates(PAIR)
        rows.append({**dict.fromkeys(by), "arm": arm, **arm_stats(runs, None)})
    for keys, config in groups:
        baseline = config[config["arm"] == BASELINE]
        for arm in arm_order(models["arm"]):
            runs = config[config["arm"] == arm]
            if len(runs) and arm not in shared:
                partner = baseline if len(baseline) and arm not in (TEACHER, BASELINE) else None
                rows.append({**dict(zip(by, keys)), "arm": arm, **arm_stats(runs, partner)})
    return pd.DataFrame(rows)


def same_in_every_config(models: pd.DataFrame, arm: str, by: list[str]) -> bool:
    """Whether ``arm`` gave the same numbers, seed by seed, in every config of ``by``."""
    runs = models[models["arm"] == arm]
    if runs.empty:
        return False
    measured = runs[[PAIR, *ARM_COLUMNS]].astype(str)
    return len(measured.drop_duplicates()) == runs[PAIR].nunique()


def percent(x: float) -> str:
    """An accuracy (a fraction) in percent with 2 decimals; ``—`` for NaN."""
    return "—" if pd.isna(x) else f"{100 * x:.2f}"


def mean_std_text(mean: float, std: float) -> str:
    """``mean ± std`` in percent; ``—`` for a missing accuracy, ``mean ± —`` with one seed."""
    return "—" if pd.isna(mean) else f"{percent(mean)} ± {percent(std)}"


def interval_text(mean: float, half: float) -> str:
    """``[lo, hi]`` in percent, lo, hi = mean ∓ half; ``—`` without an interval (one seed)."""
    return "—" if pd.isna(half) else f"[{percent(mean - half)}, {percent(mean + half)}]"


def gain_text(mean: float, half: float) -> str:
    """A paired gain as ``+x.xx [lo, hi]`` (percentage points); ``—`` without a baseline, ``[—]`` with one seed."""
    interval = "[—]" if pd.isna(half) else interval_text(mean, half)
    return "—" if pd.isna(mean) else f"{100 * mean:+.2f} {interval}"


def count_text(x: float) -> str:
    """A count (params, steps) with thousands separators; ``—`` for NaN."""
    return "—" if pd.isna(x) else f"{int(x):,}"


def arm_display(report: Report, arms: pd.DataFrame) -> pd.DataFrame:
    """arm_table() for reading: accuracies in percent as ``mean ± std`` and ``[lo, hi]``,
    gains in percentage points as ``+x.xx [lo, hi]``."""
    shown = arms[[*report.factors, "arm", "seeds"]].copy()
    for metric, label in (("test_acc", "best"), ("test_acc_last", "last")):
        mean, std, half = (arms[f"{metric}_{stat}"] for stat in ("mean", "std", "ci95"))
        shown[f"{metric} % ({label})"] = [mean_std_text(a, s) for a, s in zip(mean, std)]
        shown[f"{label} {LEVEL:.0%} CI"] = [interval_text(a, h) for a, h in zip(mean, half)]
    if arms["test_acc_top5_mean"].notna().any():
        mean, std = arms["test_acc_top5_mean"], arms["test_acc_top5_std"]
        shown["test_acc_top5 % (best)"] = [mean_std_text(a, s) for a, s in zip(mean, std)]
    for gain, label in (("gain", "best"), ("gain_last", "last")):
        shown[f"gain ({label})"] = [gain_text(a, h) for a, h in zip(arms[f"{gain}_mean"], arms[f"{gain}_ci95"])]
    shown["best_val_acc %"] = arms["best_val_acc_mean"].map(percent)
    shown["params"] = arms["params"].map(count_text)
    shown["steps"] = arms["steps"].map(count_text)
    return shown


def arm_section(report: Report, out: Path) -> list[str]:
    """Write ``arms.csv``, print the arms table, and return the report.md section."""
    arms = arm_table(report)
    write_csv(arms, out / "arms.csv")
    shown = arm_display(report, arms)
    print_table(
        shown, f"arms over seeds: mean ± std and {LEVEL:.0%} t-interval, in %; gain = arm − baseline of the same seed"
    )
    return [
        "## Arms over seeds",
        "",
        "Every model of the summaries, per config, over its seeds. Test accuracy in % at the epoch of best "
        "validation accuracy (best) and at the last epoch (last): mean ± sample std and the "
        f"{LEVEL:.0%} t-interval mean ± t(0.975, n−1)·s/√n (— with one seed). Gain: the paired difference "
        "arm − baseline of the same seed, in percentage points, its mean and 95% t-interval over the seeds "
        "both have.",
        "",
        markdown_table(shown),
        "",
    ]


# --------------------------------------------------------------------------- output
def write_report(report: Report, out: Path, keys: tuple[str, str] | None) -> list[Path]:
    """Print the tables and write report.csv, report.md, arms.csv, the PNGs (and seeds.csv); return the files."""
    writable_folder(out, "the report", "pass --out DIR, a folder you can write")
    files = [out / "report.csv", out / "report.md"]
    write_csv(report.jobs, files[0])
    pruned = f", {report.pruned} of them pruned" if report.pruned else ""
    status = [STATUS] if report.pruned else []
    print_table(report.jobs, f"kdcl report — {len(report.jobs)} jobs{pruned}", ["run", *report.swept, *status, *SHOWN])
    md = [
        "# kdcl report",
        "",
        f"{len(report.jobs)} jobs{pruned}. Unprefixed metrics are the distilled student's; "
        "`kd_gain` = distill − baseline test_acc of the same seed."
        + (" A pruned trial stopped early: its best_val_acc so far, no test metrics." if pruned else ""),
        "",
    ]
    selection = selection_text(report)
    md += ["## Selected on validation", "", selection, "", "## Jobs", "", markdown_table(report.jobs), ""]

    configs = report.configs()
    if (configs["seeds"] > 1).any():
        seeds = seed_table(report, configs)
        write_csv(configs, out / "seeds.csv")
        files.append(out / "seeds.csv")
        print_table(seeds, f"over seeds: mean ± std and {LEVEL:.0%} t-interval (kd_gain: paired, distill − baseline)")
        md += [
            "## Over seeds",
            "",
            f"Mean ± std and {LEVEL:.0%} t-interval; `kd_gain` is the paired difference distill − baseline per seed.",
            "",
            markdown_table(seeds),
            "",
        ]
    md += arm_section(report, out)
    files.append(out / "arms.csv")

    if keys:
        rows, cols = keys
        grids = {m: pivot(report.finished, rows, cols, m) for m in PIVOTED}
        grids = {m: g for m, g in grids.items() if g.size}
        md += [f"## {rows} × {cols}", "", "Mean over the jobs in each cell (seeds and other swept keys).", ""]
        for m, grid in grids.items():
            md += [f"### {m}", "", markdown_table(grid_table(grid)), ""]
            print_table(grid_table(grid), f"{m}: {rows} × {cols}")
        plotted = {title: grids[m] for m, title in PLOTTED.items() if m in grids}
        heatmaps(plotted, out / "heatmap.png", f"distilled student: {rows} × {cols}")
        files.append(out / "heatmap.png")
        md += ["![heatmaps](heatmap.png)", ""]

    curves = {
        f"{row['run']} {report.label(row, report.swept, short=True)}{' (pruned)' * (row[STATUS] == 'pruned')}": report.curves[
            row["run"]
        ]
        for _, row in report.jobs.iterrows()
        if row["run"] in report.curves
    }
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


def run_figures(run_dir: Path) -> list[Path]:
    """The figures of one run, for its experiment trackers: ``stage_curves.png``, the validation
    accuracy per epoch of each of its stages (from their ``metrics.csv``), and every PNG the
    run wrote in its directory."""
    curves = {
        str(path.parent.relative_to(run_dir)): pd.read_csv(path)
        for path in sorted(run_dir.rglob("metrics.csv"), key=_natural)
    }
    if curves:
        learning_curves(curves, run_dir / STAGE_CURVES, f"validation accuracy per epoch — {run_dir.name}")
    return sorted(run_dir.glob("*.png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kdcl report",
        description="One table over kdcl runs and sweeps: overrides next to metrics, an alpha × temperature "
        "pivot, seed statistics, learning curves. The best config is chosen on validation accuracy.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="run or sweep folders (searched for job folders holding summary.csv)",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the report goes (default: the first PATH)")
    parser.add_argument(
        "--pivot",
        nargs=2,
        metavar=("ROW", "COL"),
        help="two swept keys for the heatmap (default: distill.alpha distill.temperature)",
    )
    args = parser.parse_args(argv)
    report = collect(args.paths)
    write_report(report, args.out or args.paths[0], pivot_keys(report, args.pivot))
