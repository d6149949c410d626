"""``kdcl report``: the table, the pivot, seed statistics and selection on validation."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from test_cli import assert_clean_error

from kdcl.commands.report import arm_display, arm_table, collect, pivot
from kdcl.output import tables
from kdcl.output.stats import t_interval
from kdcl.output.tables import column_blocks

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (from tables)
T_975_DF1 = 12.706204736174707  # the same, 1 degree of freedom
PNG = b"\x89PNG\r\n\x1a\n"


def fake_job(
    folder: Path,
    overrides: list[str],
    distill: float,
    baseline: float,
    val: float,
    *,
    teacher: float = 0.95,
    last: dict[str, float] | None = None,
    arms: dict[str, float] | None = None,
    seed: int | None = None,
    without: tuple[str, ...] = (),
) -> None:
    """A finished job folder: overrides, a summary and a distill metrics table.

    ``last``: test_acc_last per model; ``arms``: extra summary rows (model -> test_acc, after distill);
    ``seed``: the summary's seed column; ``without``: models left out of the summary.
    """
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [
        {"model": "teacher", "test_acc": teacher, "best_val_acc": 0.96, "steps": 10, "seconds": 1.0, "params": 900},
        {
            "model": "baseline",
            "test_acc": baseline,
            "best_val_acc": val - 0.05,
            "steps": 10,
            "seconds": 1.0,
            "params": 100,
        },
        {
            "model": "distill",
            "test_acc": distill,
            "best_val_acc": val,
            "steps": 10,
            "seconds": 1.0,
            "params": 100,
            "kd_gain": distill - baseline,
            "teacher_agreement": 0.9,
        },
        *(
            {"model": arm, "test_acc": acc, "best_val_acc": val + 0.01, "steps": 12, "seconds": 1.0, "params": 100}
            for arm, acc in (arms or {}).items()
        ),
    ]
    for row in rows:
        row["test_acc_last"] = (last or {}).get(row["model"], math.nan)
        if seed is not None:
            row["seed"] = seed
    summary = pd.DataFrame([row for row in rows if row["model"] not in without])
    summary.to_csv(folder / "summary.csv", index=False)
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
            fake_job(
                sweep / str(job), ["+experiment=x", f"distill.alpha={alpha}", f"seed={seed}"], distill, baseline, val
            )
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


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda tmp: tmp / "missing", ["is not a folder"]),
        (lambda tmp: tmp, ["no finished runs"]),
    ],
    ids=["missing-folder", "no-runs"],
)
def test_report_without_runs_is_one_clear_error(cli, tmp_path, make, needles):
    assert_clean_error(cli("report", str(make(tmp_path))), *needles)


def test_report_on_a_real_two_by_two_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    train = cli(
        "train",
        "-m",
        "distill.alpha=0.5,0.9",
        "distill.temperature=2,4",
        "trainer.epochs=2",
        "dataset.max_train_samples=300",
        f"hydra.sweep.dir={sweep}",
    )
    assert train.returncode == 0, train.stderr
    logs = "".join((sweep / str(job) / "train.log").read_text() for job in range(4))
    assert logs.count("stored teacher in") == 1 and logs.count("reused teacher from cache") == 3
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


# --------------------------------------------------------------------------- arms over seeds
ARM_SEEDS = {  # seed -> model -> (test_acc at the best-validation epoch, test_acc_last)
    0: {"teacher": (0.90, 0.89), "baseline": (0.78, 0.77), "distill": (0.80, 0.79), "kd": (0.81, 0.80)},
    1: {"teacher": (0.92, 0.91), "baseline": (0.79, 0.78), "distill": (0.82, 0.81), "kd": (0.84, 0.80)},
    2: {"teacher": (0.94, 0.93), "baseline": (0.80, 0.82), "distill": (0.87, 0.84), "kd": (0.83, 0.83)},
}


def arm_sweep(folder: Path, order: list[int], without: dict[int, tuple[str, ...]] | None = None) -> Path:
    """One job per seed of ARM_SEEDS, job k holding seed ``order[k]`` (the seed in overrides and summary)."""
    for job, seed in enumerate(order):
        models = ARM_SEEDS[seed]
        fake_job(
            folder / str(job),
            ["+experiment=x", f"seed={seed}"],
            models["distill"][0],
            models["baseline"][0],
            0.85,
            teacher=models["teacher"][0],
            arms={"kd": models["kd"][0]},
            last={m: acc[1] for m, acc in models.items()},
            seed=seed,
            without=(without or {}).get(seed, ()),
        )
    return folder


def test_arms_over_seeds_match_a_hand_computation(cli, tmp_path):
    sweep = arm_sweep(tmp_path / "sweep", order=[2, 0, 1])  # job order is not seed order
    result = cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    assert "arms.csv" in result.stdout
    arms = pd.read_csv(sweep / "arms.csv")
    assert arms["arm"].tolist() == ["teacher", "baseline", "distill", "kd"]
    assert arms["seeds"].tolist() == [3, 3, 3, 3]
    arms = arms.set_index("arm")
    sem = T_975_DF2 / math.sqrt(3)  # ci95 = t(0.975, 2) · s / √3

    # teacher best 0.90, 0.92, 0.94: mean 0.92, deviations ∓0.02, 0 → s² = 0.0008 / 2, s = 0.02
    assert arms.at["teacher", "test_acc_mean"] == pytest.approx(0.92)
    assert arms.at["teacher", "test_acc_std"] == pytest.approx(0.02)
    assert arms.at["teacher", "test_acc_ci95"] == pytest.approx(sem * 0.02)
    # baseline last 0.77, 0.78, 0.82: mean 0.79, deviations −0.02, −0.01, +0.03 → s² = 0.0014 / 2
    assert arms.at["baseline", "test_acc_last_mean"] == pytest.approx(0.79)
    assert arms.at["baseline", "test_acc_last_std"] == pytest.approx(math.sqrt(0.0007))
    assert arms.at["baseline", "test_acc_last_ci95"] == pytest.approx(sem * math.sqrt(0.0007))
    # distill best 0.80, 0.82, 0.87: mean 0.83, s² = (0.0009 + 0.0001 + 0.0016) / 2 = 0.0013
    assert arms.at["distill", "test_acc_mean"] == pytest.approx(0.83)
    assert arms.at["distill", "test_acc_std"] == pytest.approx(math.sqrt(0.0013))
    assert arms.at["distill", "test_acc_ci95"] == pytest.approx(sem * math.sqrt(0.0013))
    # distill last 0.79, 0.81, 0.84: mean 2.44 / 3
    assert arms.at["distill", "test_acc_last_mean"] == pytest.approx(2.44 / 3)

    # paired gains, arm − baseline of the same seed (seeds 0, 1, 2):
    # distill best: 0.02, 0.03, 0.07 → mean 0.04, deviations −0.02, −0.01, +0.03 → s² = 0.0014 / 2
    assert arms.at["distill", "gain_mean"] == pytest.approx(0.04)
    assert arms.at["distill", "gain_std"] == pytest.approx(math.sqrt(0.0007))
    assert arms.at["distill", "gain_ci95"] == pytest.approx(sem * math.sqrt(0.0007))
    # distill last: 0.79 − 0.77, 0.81 − 0.78, 0.84 − 0.82 = 0.02, 0.03, 0.02 → mean 0.07 / 3,
    # deviations −0.01/3, +0.02/3, −0.01/3 → s² = (0.0006 / 9) / 2 = 0.0001 / 3
    assert arms.at["distill", "gain_last_mean"] == pytest.approx(0.07 / 3)
    assert arms.at["distill", "gain_last_std"] == pytest.approx(0.01 / math.sqrt(3))
    assert arms.at["distill", "gain_last_ci95"] == pytest.approx(sem * 0.01 / math.sqrt(3))
    # kd best: 0.03, 0.05, 0.03 → mean 0.11 / 3, s² = (0.0024 / 9) / 2 = 0.0004 / 3
    assert arms.at["kd", "gain_mean"] == pytest.approx(0.11 / 3)
    assert arms.at["kd", "gain_ci95"] == pytest.approx(sem * 0.02 / math.sqrt(3))
    # kd last: 0.03, 0.02, 0.01 → mean 0.02, s = 0.01
    assert arms.at["kd", "gain_last_mean"] == pytest.approx(0.02)
    assert arms.at["kd", "gain_last_ci95"] == pytest.approx(sem * 0.01)
    # a gain is a student's: none for the teacher, none for the baseline itself
    for arm in ("teacher", "baseline"):
        assert arms.loc[arm, ["gain_mean", "gain_ci95", "gain_last_mean", "gain_last_ci95"]].isna().all()

    assert arms.at["kd", "best_val_acc_mean"] == pytest.approx(0.86)
    assert (arms.at["teacher", "params"], arms.at["kd", "params"], arms.at["kd", "steps"]) == (900, 100, 12)

    section = (sweep / "report.md").read_text().split("## Arms over seeds")[1]
    # distill best 83.00 ± 3.61 %, interval 0.83 ∓ 0.0896; gain +4.00 points, 0.04 ∓ 0.0657
    assert "83.00 ± 3.61" in section and "[74.04, 91.96]" in section and "+4.00 [-2.57, 10.57]" in section


def test_arm_gains_pair_by_seed_when_an_arm_misses_one(cli, tmp_path):
    # jobs hold seeds 2, 0, 1; kd is missing from seed 0's job (the second job):
    # pairing by position would match kd's seed 1 with the baseline's seed 0
    sweep = arm_sweep(tmp_path / "sweep", order=[2, 0, 1], without={0: ("kd",)})
    result = cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    arms = pd.read_csv(sweep / "arms.csv").set_index("arm")
    assert arms.at["kd", "seeds"] == 2 and arms.at["kd", "pairs"] == 2 and arms.at["distill", "pairs"] == 3
    # kd best 0.84, 0.83 (seeds 1, 2): mean 0.835, s² = 2 · 0.005² / 1
    assert arms.at["kd", "test_acc_mean"] == pytest.approx(0.835)
    assert arms.at["kd", "test_acc_std"] == pytest.approx(0.005 * math.sqrt(2))
    # kd − baseline, seed 1: 0.84 − 0.79 = 0.05, seed 2: 0.83 − 0.80 = 0.03 → mean 0.04, s = 0.01·√2
    assert arms.at["kd", "gain_mean"] == pytest.approx(0.04)
    assert arms.at["kd", "gain_std"] == pytest.approx(0.01 * math.sqrt(2))
    assert arms.at["kd", "gain_ci95"] == pytest.approx(T_975_DF1 * 0.01 * math.sqrt(2) / math.sqrt(2))
    # last: seed 1: 0.80 − 0.78 = 0.02, seed 2: 0.83 − 0.82 = 0.01 → mean 0.015
    assert arms.at["kd", "gain_last_mean"] == pytest.approx(0.015)


def test_arms_of_a_single_run_have_no_spread(cli, tmp_path):
    run = tmp_path / "run"
    fake_job(run, ["+experiment=x"], 0.82, 0.79, 0.85, arms={"kd": 0.80}, last={"distill": 0.81, "baseline": 0.77})
    result = cli("report", str(run))
    assert result.returncode == 0, result.stderr
    arms = pd.read_csv(run / "arms.csv").set_index("arm")
    assert arms.index.tolist() == ["teacher", "baseline", "distill", "kd"]
    assert (arms["seeds"] == 1).all()
    assert arms.at["distill", "test_acc_mean"] == pytest.approx(0.82)
    assert arms.at["distill", "gain_mean"] == pytest.approx(0.03)  # 0.82 − 0.79, paired within the run
    assert arms.at["distill", "gain_last_mean"] == pytest.approx(0.04)  # 0.81 − 0.77
    assert arms.at["kd", "gain_mean"] == pytest.approx(0.01)
    spread = ["test_acc_std", "test_acc_ci95", "test_acc_last_std", "gain_std", "gain_ci95", "gain_last_ci95"]
    assert arms[spread].isna().all().all()
    assert math.isnan(arms.at["kd", "gain_last_mean"])  # kd has no last-epoch accuracy
    section = (run / "report.md").read_text().split("## Arms over seeds")[1]
    assert "82.00 ± —" in section and "+3.00 [—]" in section


def test_arms_without_a_baseline_have_no_gain(cli, tmp_path):
    run = tmp_path / "run"
    fake_job(run, [], 0.82, 0.79, 0.85, without=("baseline",))
    result = cli("report", str(run))
    assert result.returncode == 0, result.stderr
    arms = pd.read_csv(run / "arms.csv").set_index("arm")
    assert arms.index.tolist() == ["teacher", "distill"]
    assert arms[["gain_mean", "gain_last_mean"]].isna().all().all()


def test_arms_per_config_in_a_sweep_over_alpha(seeded_sweep, cli):
    result = cli("report", str(seeded_sweep))
    assert result.returncode == 0, result.stderr
    assert all((seeded_sweep / name).is_file() for name in ("report.csv", "seeds.csv", "arms.csv"))
    arms = pd.read_csv(seeded_sweep / "arms.csv")
    # the teacher is the same models in both configs: one row, its alpha empty, over its 3 seeds;
    # the baselines differ (their best_val_acc does), so each config lists its own
    assert list(zip(arms["distill.alpha"].astype(object).fillna("any"), arms["arm"])) == [
        ("any", "teacher"),
        (0.5, "baseline"),
        (0.5, "distill"),
        (0.9, "baseline"),
        (0.9, "distill"),
    ]
    assert arms.at[0, "seeds"] == 3 and math.isnan(arms.at[0, "gain_mean"])
    arms = arms.set_index(["distill.alpha", "arm"])
    assert arms.at[(0.5, "distill"), "gain_mean"] == pytest.approx(0.04)  # 0.02, 0.03, 0.07
    assert arms.at[(0.9, "distill"), "gain_mean"] == pytest.approx(0.12)  # 0.12, 0.12, 0.12
    assert arms.at[(0.9, "distill"), "gain_std"] == pytest.approx(0.0, abs=1e-12)
    assert arms.at[(0.9, "distill"), "test_acc_mean"] == pytest.approx(0.91)
    assert "## Arms over seeds" in (seeded_sweep / "report.md").read_text()


def test_top5_accuracy_in_the_jobs_and_the_arms(tmp_path):
    """The distilled student's test_acc_top5 per job, and every arm's over its seeds; runs
    without the column (10 classes or fewer, or made before it) show no top-5 column."""
    sweep = tmp_path / "sweep"
    for seed, top5 in enumerate((0.90, 0.94)):
        fake_job(sweep / str(seed), [f"seed={seed}"], 0.7, 0.6, 0.7, seed=seed)
        summary = pd.read_csv(sweep / str(seed) / "summary.csv")
        summary.assign(test_acc_top5=[0.99, 0.85, top5]).to_csv(sweep / str(seed) / "summary.csv", index=False)
    report = collect([sweep])
    assert report.jobs["test_acc_top5"].tolist() == [0.90, 0.94]
    arms = arm_table(report)
    distill = arms.set_index("arm").loc["distill"]
    # 0.90 and 0.94: mean 0.92, sample variance (0.02² + 0.02²) / 1
    assert distill["test_acc_top5_mean"] == pytest.approx(0.92)
    assert distill["test_acc_top5_std"] == pytest.approx(math.sqrt(0.0008))
    assert arm_display(report, arms).set_index("arm").loc["distill", "test_acc_top5 % (best)"] == "92.00 ± 2.83"

    older = tmp_path / "older"
    fake_job(older / "0", ["seed=0"], 0.7, 0.6, 0.7, seed=0)
    report = collect([older])
    assert report.jobs["test_acc_top5"].isna().all()
    assert "test_acc_top5 % (best)" not in arm_display(report, arm_table(report)).columns


def test_column_blocks_fit_the_room_and_repeat_the_first_column():
    # a column w wide takes w + 3 (padding and rule), the table 1 more: 1 + 8 + 13 = 22, + 13 = 35
    assert column_blocks([5, 10, 10, 10], 30) == [[0, 1], [0, 2], [0, 3]]
    assert column_blocks([5, 10, 10, 10], 35) == [[0, 1, 2], [0, 3]]
    assert column_blocks([5, 10, 10, 10], 48) == [[0, 1, 2, 3]]
    assert column_blocks([5, 60], 30) == [[0, 1]]  # too wide alone: a block of its own
    assert column_blocks([5], 30) == [[0]]


def test_a_wide_table_prints_in_blocks_of_whole_cells_within_100_columns(monkeypatch):
    console = Console(width=100, record=True, file=io.StringIO())
    monkeypatch.setattr(tables, "stdout", console)
    columns = ["arch", "distill", "curriculum", "test_acc", "test_acc_last", "best_val_acc", "teacher_agreement"]
    frame = pd.DataFrame(
        {
            "model": ["teacher", "baseline", "kd_length"],
            **{c: ["packaged:all-minilm-l6-v2", "kd", "length/easy_first"] for c in columns[:3]},
            **{c: [0.8974, 0.88681, 0.123456789] for c in columns[3:]},
        }
    )
    tables.print_table(frame, "kdcl summary")
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 100
    for value in ["packaged:all-minilm-l6-v2", "length/easy_first", "0.8868", "0.1235", *columns]:
        assert value in text  # no cell or header is cut
    blocks = text.count("┃ model")
    assert blocks >= 2 and text.count("kd_length") == blocks  # every block names its rows


def test_csv_floats_drop_float32_noise_and_keep_float64_values(tmp_path):
    values = np.array([0.10000000149011612, 0.8980262875556946, 679626240.0, 0.1, 123456789.123, np.nan, 2.0])
    assert list(tables.csv_floats(values)) == ["0.1", "0.8980263", "679626240.0", "0.1", "123456789.123", "", "2.0"]
    tables.write_csv(pd.DataFrame({"model": ["a", "b"], "acc": [0.10000000149011612, np.nan]}), tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == "model,acc\na,0.1\nb,\n"


def test_damaged_jobs_are_named_and_left_out_of_the_report(cli, tmp_path):
    sweep = tmp_path / "sweep"
    for job in range(6):
        fake_job(sweep / str(job), [f"seed={job}"], 0.80, 0.78, 0.85, seed=job)
    (sweep / "1" / "summary.csv").write_bytes(b"model,test_acc\n\xff\xfe,0.5\n")  # not UTF-8
    pd.DataFrame({"test_acc": [0.5]}).to_csv(sweep / "2" / "summary.csv", index=False)  # no model column
    (sweep / "3" / "summary.csv").unlink()
    (sweep / "3" / "pruned.json").write_text("{not json")
    (sweep / "4" / ".hydra" / "overrides.yaml").write_text("- !!python/object/apply:os.system ['true']\n")
    result = cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(sweep / "report.csv")["run"].tolist() == ["sweep/0", "sweep/5"]
    out = result.stdout + result.stderr
    for job in ("1", "2", "3", "4"):
        assert f"skipped: {sweep / job}: damaged, left out" in out
    assert "Traceback" not in out


def test_a_report_into_a_folder_that_cannot_be_made_is_one_message(cli, tmp_path):
    run = tmp_path / "run"
    fake_job(run, [], 0.82, 0.79, 0.85)
    (tmp_path / "file").write_text("")
    result = cli("report", str(run), "--out", str(tmp_path / "file" / "report"))
    assert_clean_error(result, f"cannot write the report into {tmp_path / 'file' / 'report'}", "pass --out DIR")
    assert not (run / "report.csv").exists()
