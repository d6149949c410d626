"""Distributed training (DDP) on CPU with gloo: a rank's share of a batch, the collectives
in two real processes, and 2-process runs of ``kdcl train`` against one process.

Tolerance: with no BatchNorm (MLP teacher and student) and no augmentation (digits) a
2-process run computes the same global-batch gradients as one process, only summed in
another order (each rank's part, then the all-reduce), so losses agree to float32
rounding (observed: ≤ 1e-6 relative) and every model's test accuracy to within one test
example (observed: equal). With BatchNorm the ranks normalise their own half of each batch
and the results differ more (the README gives figures); those models are not compared here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compose_config
from test_cli import assert_clean_error

from kdcl import distributed
from kdcl.cli import main as kdcl_main
from kdcl.config.options import distill_parts
from kdcl.curricula import DataSchedule
from kdcl.data import Preprocess, load_data
from kdcl.distill.control import DistillControl
from kdcl.distill.feeds import OnlineTeacher
from kdcl.distill.losses import LossContext, create_loss
from kdcl.distill.teachers import Teachers
from kdcl.distributed import Part
from kdcl.models import create_model
from kdcl.train.engine import Meter, Stage, TrainSettings, evaluate, train_step

# Every stage long enough (3 epochs × 34 steps of 16) for a stop signal to land inside the run.
ARGS = [
    "teacher=mlp",
    "trainer.epochs=3",
    "dataset.max_train_samples=900",
    "trainer.batch_size=16",
    "trainer.checkpoint_every_steps=7",
    "cache=false",
]
TEST_EXAMPLES = 359  # digits' test split
TIMING = ["seconds", "samples_per_s", "max_memory_mb", "checkpoint"]


# --------------------------------------------------------------------------- a rank's share
@pytest.mark.parametrize("size", [11, 3, 1])
def test_parts_cover_the_global_batch_and_give_its_mean(size):
    batch, world = torch.arange(100, 100 + size), 3
    parts = [Part(size, r, world) for r in range(world)]
    taken = [p.take(batch) for p in parts]
    assert sorted(torch.cat(taken).tolist()) == batch.tolist()  # every example once, an empty part when size < world
    values = torch.randn(size, dtype=torch.float64)
    # DDP averages the ranks' gradients, so the ranks' terms averaged must be the global mean.
    assert sum(p.mean(p.take(values)) for p in parts) / world == pytest.approx(values.mean().item())
    assert Part(size).take(batch) is batch and Part(size).mean(values) == values.mean()


def test_augmenting_the_parts_augments_the_batch_as_one_process_does():
    x = torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8)
    whole = Preprocess(
        [0.5] * 3, [0.25] * 3, crop_padding=2, flip=True, device=torch.device("cpu"), channels_last=False, seed=7
    )
    expected = whole(x, train=True)
    for r in range(3):  # each rank, from the same generator state
        rank = Preprocess([0.5] * 3, [0.25] * 3, 2, True, torch.device("cpu"), False, seed=7)
        part = Part(len(x), r, 3)
        assert torch.equal(rank(part.take(x), train=True, part=part), part.take(expected))
        assert torch.equal(rank.generator.get_state(), whole.generator.get_state())  # ranks stay in step


# --------------------------------------------------------------------------- two real processes
def _steps(dataset: dict, distill: dict) -> dict:
    """Two optimizer steps of a CTKD student (its temperature trains outside the model) on
    global batches of 11 and 1 examples — uneven parts, and an empty one on rank 1 — with
    crop and flip, then one validation pass. Returns what every rank must agree on."""
    torch.manual_seed(0)
    data = load_data(dataset, torch.device("cpu"), False, seed=0)
    data.preprocess.crop_padding, data.preprocess.flip = 1, True
    model = create_model("mlp", data.num_classes, data.input_shape, hidden=[16])
    teacher = Teachers(
        [create_model("mlp", data.num_classes, data.input_shape, hidden=[8]).eval().requires_grad_(False)]
    )
    loss_spec, control_cfg = distill_parts(distill)
    loss_fn = create_loss(loss_spec)
    control = DistillControl(control_cfg, total_steps=2, steps_per_epoch=2, rank=None)
    optimizer = torch.optim.SGD(
        [{"params": model.parameters()}, {"params": control.parameters()}], lr=0.5, momentum=0.9
    )
    feed = OnlineTeacher(
        SimpleNamespace(preprocess=data.preprocess, teacher_at=lambda step: teacher, autocast=nullcontext, strong=None)
    )
    stage = Stage(
        name="test",
        model=model,
        loss_fn=loss_fn,
        control=control,
        plan=DataSchedule(torch.arange(len(data.train)), 11, 0),
        optimizer=optimizer,
        lr_schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        out_dir=Path("unused"),
        meta={},
        feed=feed,
    )
    trainer = TrainSettings(torch.device("cpu"), epochs=1, batch_size=11, eval_batch_size=7, amp=False)
    replica, meter = replace(stage, model=distributed.wrap(model)), Meter()
    for step, batch in enumerate([torch.arange(3, 36, 3), torch.tensor([40])]):
        part = distributed.parts([batch])[0]
        local = next(data.train.batches([part.take(batch)]))
        train_step(replica, trainer, step, local, meter, LossContext(), part)
    meter.collect()
    return {
        "weights": model.state_dict(),
        "temperature": control.ctkd.value().detach(),
        "sums": meter.sums,
        "count": meter.count,
        "val": evaluate(model, data.val, data, trainer).logits,
        "rng": data.preprocess.generator.get_state(),
        "any": distributed.any_rank(distributed.rank()),
    }


def _rank(rank: int, world: int, init: str, dataset: dict, distill: dict, out: Path) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_steps(dataset, distill), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # its own processes
def test_two_processes_train_and_evaluate_as_one(tmp_path):
    cfg = compose_config(["distill=ctkd", "dataset.max_train_samples=100"])
    one = _steps(cfg["dataset"], cfg["distill"])
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'init'}", cfg["dataset"], cfg["distill"], tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        for name, w in one["weights"].items():
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["temperature"], one["temperature"], rtol=1e-5, atol=1e-6)
        assert got["count"] == one["count"] == 12
        for k, v in one["sums"].items():
            torch.testing.assert_close(got["sums"][k].float(), v.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["val"], one["val"], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["rng"], one["rng"]) and got["any"] == 1
    assert torch.equal(ranks[0]["val"], ranks[1]["val"])  # every rank sees the same logits: the same decisions
    for name in one["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])


# --------------------------------------------------------------------------- a shared soft-label store
def _stored_views(directory: Path) -> tuple[torch.Tensor, int]:
    """The teacher cache views:3 of 40 generated images on disk in ``directory`` (shards of
    6 examples): every stored logit, and how many examples this process's teacher ran on."""
    import numpy as np

    from kdcl.data import TensorSource
    from kdcl.distill.feeds import FeedInputs, build_feed

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), rng.integers(0, 4, 40)
    cpu = torch.device("cpu")
    source = TensorSource.from_arrays(x, y, np.arange(40), cpu)
    pre = Preprocess([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True, device=cpu, channels_last=False, seed=0)
    torch.manual_seed(0)
    model = create_model("cnn", 4, (3, 8, 8), width=4).eval()
    seen = []

    def teacher(views, labels=None):
        seen.append(len(views))
        return model(views)

    teacher.eval = lambda: teacher
    shard_mb = 6 * 3 * 4 * 2 / 2**20  # 6 examples of 3 views of 4 fp16 logits
    inputs = FeedInputs(pre, source, lambda step: teacher, nullcontext, 4, 8, 0, 3, "disk", directory, shard_mb)
    feed = build_feed("views:3", inputs)
    every = torch.arange(40).repeat_interleave(3)
    return feed.logits.get(every, torch.arange(3).repeat(40)), sum(seen)


def _store_rank(rank: int, world: int, init: str, directory: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_stored_views(directory), out / f"store{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # its own processes
def test_ranks_fill_one_store_each_its_share_of_the_shards(tmp_path):
    """FKD's record pass under DDP: one folder, 7 shards dealt out to 2 processes (4 and 3),
    each running the teacher on its shards' examples only; every process then reads all of
    them, the logits one process would have stored."""
    alone, passes = _stored_views(tmp_path / "one")
    assert passes == 3 * 40
    shared = tmp_path / "shared"
    mp.spawn(_store_rank, args=(2, f"file://{tmp_path / 'init'}", shared, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"store{r}.pt") for r in range(2)]
    assert [seen for _, seen in ranks] == [3 * (6 * 3 + 4), 3 * 6 * 3]  # shards 0, 2, 4, 6 (of 4 examples); 1, 3, 5
    for logits, _ in ranks:
        assert torch.equal(logits, alone)
    assert len(list(shared.glob("shard_*.filled"))) == 7 and not list(shared.glob("rank*"))


# --------------------------------------------------------------------------- kdcl train with 2 processes
def _kdcl(args: list[str], cwd: Path, torchrun: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    return subprocess.Popen(
        [sys.executable, *launcher, "-m", "kdcl", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def _table(run_dir: Path, name: str) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / name)
    return frame.drop(columns=[c for c in TIMING if c in frame.columns])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in one process and, through trainer.devices=2, in two (started together)."""
    root = tmp_path_factory.mktemp("ddp")
    single, ddp = (
        _kdcl([*ARGS, f"hydra.run.dir={root / 'one'}"], root),
        _kdcl([*ARGS, "trainer.devices=2", f"hydra.run.dir={root / 'two'}"], root),
    )
    return root / "one", root / "two", _finish(single), _finish(ddp)


@pytest.mark.slow
def test_two_processes_write_one_set_of_artifacts_and_match_one_process(runs):
    one, two, _, out = runs
    assert _files(two) == _files(one)  # the same files once: no per-rank copies, one log, one .hydra/
    assert out.count("kdcl summary") == 1 and "Traceback" not in out
    assert (two / ".hydra" / "overrides.yaml").read_text().count("trainer.devices=2") == 1
    log = (two / "train.log").read_text()
    assert log.count("distill epoch 3/3") == 1 and "training with 2 processes" in log
    a, b = _table(one, "summary.csv").set_index("model"), _table(two, "summary.csv").set_index("model")
    assert list(a.index) == list(b.index) == ["teacher", "baseline", "distill"]
    assert (a["test_acc"] - b["test_acc"]).abs().max() <= 1 / TEST_EXAMPLES  # within one test example
    pd.testing.assert_series_equal(a["steps"], b["steps"])
    for stage in a.index:
        x, y = _table(one, f"{stage}/metrics.csv"), _table(two, f"{stage}/metrics.csv")
        pd.testing.assert_frame_equal(x, y, rtol=1e-5)  # same pool, order, lr, losses; rounding only


@pytest.mark.slow
def test_torchrun_stop_and_resume_gives_the_uninterrupted_results(runs, tmp_path):
    """torchrun without hydra.run.dir: the ranks agree on one dated run directory; SIGTERM to
    torchrun stops both ranks after one step, saved; running again finishes as if never stopped."""
    _, reference, _, _ = runs
    proc = _kdcl(ARGS, tmp_path, torchrun=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("outputs/train/*/*/baseline/resume.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    [run_dir] = tmp_path.glob("outputs/train/*/*")  # one directory for both ranks
    assert proc.returncode != 0, out  # torchrun itself exits 1 on a signal (trainer.devices=N: 128 + 15)
    assert out.count("SIGTERM: stopped stage") == 1 and not (run_dir / "summary.csv").exists()
    again = _finish(_kdcl([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path, torchrun=True))
    assert "resuming" in again and "not trained again" in again
    assert _files(run_dir) == _files(reference)
    pd.testing.assert_frame_equal(_table(reference, "summary.csv"), _table(run_dir, "summary.csv"))
    for stage in ("teacher", "baseline", "distill"):  # the interrupted epoch's train_* sums add up in another order
        pd.testing.assert_frame_equal(
            _table(reference, f"{stage}/metrics.csv"), _table(run_dir, f"{stage}/metrics.csv"), rtol=1e-6
        )


# --------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_too_little_data_for_the_processes_is_one_clear_error(tmp_path):
    proc = _kdcl(["trainer.devices=2", "dataset.max_test_samples=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    out, _ = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    assert_clean_error(result, "the test split has 1 example(s), fewer than the 2 processes")
    assert proc.returncode == 2 and out.count("error:") == 1


def test_a_global_batch_smaller_than_the_processes_is_refused_before_launch(cli):
    assert_clean_error(cli("train", "trainer.devices=2", "trainer.batch_size=1"), "must be at least 2")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["eval", "checkpoint=x.pt"], "kdcl eval runs in one process"),
        (["train", "-m", "distill.alpha=0.1,0.9"], "cannot run under torchrun"),
    ],
)
def test_commands_torchrun_cannot_run_are_refused(monkeypatch, capsys, args, needle):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts rank 0
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stop:
        kdcl_main(args)
    assert stop.value.code == 2 and needle in capsys.readouterr().err


def test_the_slurm_example_composes_one_task_with_four_gpus():
    """The README's sweep on Slurm: one task per job, trainer.devices starts the 4 ranks."""
    from hydra import compose, initialize_config_dir

    from kdcl.config.options import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=4", "trainer.devices=4"],
        )
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.gpus_per_node == 4
    assert cfg.trainer.devices == 4
    assert "/.submitit/" in cfg.hydra.launcher.submitit_folder  # resolves ${kdcl_now:...} in the sweep dir
