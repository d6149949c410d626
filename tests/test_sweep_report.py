"""``kdcl report``: the table, the pivot, seed statistics and selection on validation."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from kdcl.stats import t_interval
from kdcl.sweep_report import collect, pivot
from test_cli import assert_clean_error

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (from tables)
PNG = b"\x89PNG\r\n\x1a\n"


def fake_job(folder: Path, overrides: list[str], distill: float, baseline: float, val: float) -> None:
    """A finished job folder: overrides, a summary and a distill metrics table."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    pd.DataFrame([
        {"model": "teacher", "test_acc": 0.95, "best_val_acc": 0.96, "steps": 10, "seconds": 1.0},
        {"model": "baseline", "test_acc": baseline, "best_val_acc": val - 0.05, "steps": 10, "seconds": 1.0},
        {"model": "distill", "test_acc": distill, "best_val_acc": val, "steps": 10, "seconds": 1.0,
         "kd_gain": distill - baseline, "teacher_agreement": 0.9},
    ]).to_csv(folder / "summary.csv", index=False)
    (folder / "distill").mkdir()
    pd.DataFrame({"epoch": [1, 2], "val_acc": [val - 0.1, val]}).to_csv(folder / "distill" / "metrics.csv", index=False)


@pytest.fixture
def seeded_sweep(tmp_path):
    """Two configs (alpha 0.5, 0.9) × three seeds; alpha=0.9 is better on test but worse on validation."""
    sweep = tmp_path / "sweep"
    values = {  # alpha -> per seed (distill test_acc, baseline test_acc, distill best_val_acc)
        0.5: [(0.80, 0.78, 0.85), (0.82, 0.79, 0.86), (0.87, 0.80, 0.84)],
        0.9: [(0.90, 0.78, 0.80), (0.91, 0.79, 0.81), (0.92, 0.80, 0.79)],
    }
    job = 0
    for alpha, seeds in values.items():
        for seed, (distill, baseline, val) in enumerate(seeds):
            fake_job(sweep / str(job), ["+experiment=x", f"distill.alpha={alpha}", f"seed={seed}"], distill, baseline, val)
            job += 1
    (sweep / "multirun.yaml").write_text("{}\n")
    return sweep


def test_seed_aggregation_matches_a_hand_computation(seeded_sweep, cli):
    result = cli("report", str(seeded_sweep))
    assert result.returncode == 0, result.stderr
    seeds = pd.read_csv(seeded_sweep / "seeds.csv").set_index("distill.alpha")
    row = seeds.loc[0.5]
    assert row["seeds"] == 3
    # test_acc 0.80, 0.82, 0.87: mean 0.83, squared deviations .0009 + .0001 + .0016 over n−1 = 2
    assert row["test_acc_mean"] == pytest.approx(0.83)
    assert row["test_acc_std"] == pytest.approx(math.sqrt(0.0013))
    assert row["test_acc_ci95"] == pytest.approx(T_975_DF2 * math.sqrt(0.0013) / math.sqrt(3))
    # paired difference distill − baseline per seed: 0.02, 0.03, 0.07
    assert row["kd_gain_mean"] == pytest.approx(0.04)
    assert row["kd_gain_std"] == pytest.approx(math.sqrt(0.0007))
    assert row["kd_gain_ci95"] == pytest.approx(T_975_DF2 * math.sqrt(0.0007) / math.sqrt(3))
    assert seeds.loc[0.9, "best_val_acc_mean"] == pytest.approx(0.80)
    report_md = (seeded_sweep / "report.md").read_text()
    assert "0.8300 ± 0.0361" in report_md and "[0.7404, 0.9196]" in report_md


def test_selection_uses_validation_never_test(seeded_sweep, cli):
    result = cli("report", str(seeded_sweep), "--out", str(seeded_sweep / "out"))
    assert result.returncode == 0, result.stderr
    # alpha=0.5: validation 0.85 (best), test 0.83; alpha=0.9: validation 0.80, test 0.91
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("selected on validation"))
    assert "distill.alpha=0.5" in line and "best_val_acc 0.8500" in line and "test_acc 0.8300" in line
    assert "selected on validation" in (seeded_sweep / "out" / "report.md").read_text()


def test_t_interval_edge_cases():
    mean, std, half = t_interval([0.5])
    assert mean == 0.5 and math.isnan(std) and math.isnan(half)
    assert all(math.isnan(v) for v in t_interval([]))
    mean, std, half = t_interval([1.0, 2.0, float("nan"), 3.0])  # NaNs are ignored
    assert (mean, std) == (2.0, 1.0) and half == pytest.approx(T_975_DF2 / math.sqrt(3))


@pytest.mark.parametrize(("make", "needles"), [
    (lambda tmp: tmp / "missing", ["is not a folder"]),
    (lambda tmp: tmp, ["no finished runs"]),
], ids=["missing-folder", "no-runs"])
def test_report_without_runs_is_one_clear_error(cli, tmp_path, make, needles):
    assert_clean_error(cli("report", str(make(tmp_path))), *needles)


def test_report_on_a_real_two_by_two_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    train = cli("train", "-m", "distill.alpha=0.5,0.9", "distill.temperature=2,4", "trainer.epochs=2",
                "dataset.max_train_samples=300", f"hydra.sweep.dir={sweep}")
    assert train.returncode == 0, train.stderr
    logs = "".join((sweep / str(job) / "train.log").read_text() for job in range(4))
    assert logs.count("stored teacher") == 1 and logs.count("reused teacher from cache") == 3
    assert logs.count("stored baseline") == 1 and logs.count("reused baseline from cache") == 3

    result = cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(sweep / "report.csv")
    assert table["run"].tolist() == [f"sweep/{job}" for job in range(4)]
    expected = {}
    for _, row in table.iterrows():
        summary = pd.read_csv(tmp_path / row["run"] / "summary.csv").set_index("model")
        assert row["test_acc"] == summary.loc["distill", "test_acc"]
        assert row["best_val_acc"] == summary.loc["distill", "best_val_acc"]
        assert row["kd_gain"] == summary.loc["distill", "kd_gain"]
        assert row["teacher_test_acc"] == summary.loc["teacher", "test_acc"]
        assert row["baseline_test_acc"] == summary.loc["baseline", "test_acc"]
        expected[row["distill.alpha"], row["distill.temperature"]] = summary.loc["distill", "test_acc"]
    assert sorted(expected) == [(0.5, 2), (0.5, 4), (0.9, 2), (0.9, 4)]

    grid = pivot(collect([sweep]).jobs, "distill.alpha", "distill.temperature", "test_acc")
    assert grid.index.tolist() == [0.5, 0.9] and grid.columns.tolist() == [2, 4]
    for (alpha, temperature), acc in expected.items():
        assert grid.loc[alpha, temperature] == acc
    report_md = (sweep / "report.md").read_text()
    assert "## distill.alpha × distill.temperature" in report_md
    for acc in expected.values():
        assert f"{acc:.4g}" in report_md
    for png in ("heatmap.png", "curves.png"):
        data = (sweep / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
