"""The GPU path: no sync inside a training step, bf16 autocast, ``torch.compile`` against
eager, DDP over NCCL, and each stage's peak GPU memory (``max_memory_mb``).

Tests marked ``gpu`` skip without CUDA (conftest); ``benchmarks/gpu_check.sh`` runs them on
a GPU machine. The rest check on the CPU what the CPU can show of the same features.
"""

from __future__ import annotations

import copy
import functools
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import QUICK, STEP_SETTINGS, compose_config
from torch import nn

from kdcl import distributed
from kdcl.models import create_model, freeze
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import engine
from kdcl.train.engine import TrainSettings, peak_memory_mb, reset_peak_memory

CUDA = ["trainer.device=cuda"]
STAGES = ["teacher", "baseline", "distill"]


def stage_metrics(run_dir: Path, stage: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / stage / "metrics.csv")


# --------------------------------------------------------------------------- no sync inside a step
@pytest.fixture
def steps_raise_on_sync(monkeypatch):
    """Every ``engine.train_step`` after the first runs under
    ``torch.cuda.set_sync_debug_mode("error")``: a step that waits for the device raises.
    (The first step may initialise libraries lazily.) The non-finite-loss checks between
    steps run under ``"warn"``, and the syncs they make are counted: they show that the
    debug mode sees syncs at all. Returns ``[steps taken, syncs of the checks]``."""
    counts = [0, 0]
    step, check = engine.train_step, engine.Meter.check_finite

    def strict_step(*args, **kwargs):
        counts[0] += 1
        if counts[0] == 1:
            return step(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def counted_check(self, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return check(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts[1] += sum("synchroniz" in str(w.message) for w in caught)

    monkeypatch.setattr(engine, "train_step", strict_step)
    monkeypatch.setattr(engine.Meter, "check_finite", counted_check)
    monkeypatch.setattr(engine, "FINITE_CHECK_EVERY", 5)
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", list(STEP_SETTINGS.values()), ids=list(STEP_SETTINGS))
def test_no_step_syncs_between_the_finite_checks(tmp_path, steps_raise_on_sync, overrides):
    run_pipeline(compose_config([*QUICK, *CUDA, "student=cnn_small", *overrides]), tmp_path)
    steps, check_syncs = steps_raise_on_sync
    assert steps > 50  # teacher, baseline and distill: 2 epochs of 17 steps each
    assert check_syncs >= steps // engine.FINITE_CHECK_EVERY  # the checks do sync, and are seen doing it


# --------------------------------------------------------------------------- bf16 autocast
@pytest.mark.gpu
@pytest.mark.parametrize("distill", ["kd", "dkd", "fitnet", "ctkd"])
def test_bf16_autocast_trains_with_finite_losses(tmp_path, distill):
    cfg = compose_config(
        [*QUICK, *CUDA, "trainer.amp=true", "student=cnn_small", "curriculum=none", f"distill={distill}"]
    )
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    for stage in STAGES:
        metrics = stage_metrics(tmp_path, stage)
        losses = metrics[[c for c in metrics.columns if c.startswith("train_") or c == "val_loss"]]
        assert np.isfinite(losses.to_numpy()).all(), stage
        assert (metrics["max_memory_mb"] > 0).all()  # the stage's peak GPU memory is recorded
    assert summary.loc["teacher", "test_acc"] > 0.2  # it learnt (chance: 0.1)


# --------------------------------------------------------------------------- torch.compile
def trained_copies(device: torch.device, steps: int = 3) -> tuple[list[float], list[float], nn.Module, nn.Module]:
    """The same CNN trained ``steps`` SGD steps eagerly and compiled (``trainer.compile``), on
    the same batches: each step's loss, and both models."""
    torch.manual_seed(0)
    eager = create_model("cnn", 10, (3, 16, 16), width=8).to(device, memory_format=torch.channels_last)
    settings = TrainSettings(device, epochs=1, batch_size=32, eval_batch_size=32, amp=False, compile=True)
    compiled = settings.prepare(copy.deepcopy(eager))
    batches = [
        (torch.randn(32, 3, 16, 16, device=device), torch.randint(0, 10, (32,), device=device)) for _ in range(steps)
    ]
    losses = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        losses.append([])
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[-1].append(loss.item())
    return losses[0], losses[1], eager, compiled


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)],
)
def test_compiled_student_and_teacher_match_eager(device):
    """Compiled kernels fuse and reorder float arithmetic: the same losses and weights within
    rounding, and a compiled frozen teacher gives the eager teacher's logits. (On a GPU the
    convolutions may round their inputs to TF32, cuDNN's default, if the two pick different
    kernels: a looser bound, still far below what a wrong kernel gives.)"""
    rel = {"cpu": 1e-4, "cuda": 1e-3}[device]
    device = torch.device(device)
    torch._dynamo.reset()  # compile afresh, and count the graphs it captures here
    torch._dynamo.utils.counters.clear()
    eager_losses, compiled_losses, eager, compiled = trained_copies(device)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path did compile
    assert compiled_losses == pytest.approx(eager_losses, rel=rel, abs=rel / 10)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=10 * rel, atol=rel, msg=name)
    teacher = freeze(copy.deepcopy(eager))
    settings = TrainSettings(device, epochs=1, batch_size=32, eval_batch_size=32, amp=False, compile=True)
    compiled_teacher = settings.prepare(freeze(copy.deepcopy(eager)))
    x = torch.randn(64, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(compiled_teacher(x), teacher(x), rtol=10 * rel, atol=rel)


def test_every_compiled_model_keeps_its_own_compiled_variants(monkeypatch):
    """torch.compile keeps at most ``recompile_limit`` compiled variants per call frame, and
    models whose forward torch defines (``nn.Sequential``) would share one: past the limit
    they run uncompiled. Each model ``trainer.compile`` prepares has a frame of its own.
    (Dynamo's tracing alone, without Inductor's code generation: the frames are the point.)"""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    settings = TrainSettings(torch.device("cpu"), epochs=1, batch_size=2, eval_batch_size=2, amp=False, compile=True)
    models = torch._dynamo.config.recompile_limit + 2
    for width in range(1, models + 1):
        settings.prepare(nn.Sequential(nn.Linear(4, width), nn.ReLU()))(torch.randn(2, 4))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == models  # every one compiled


# --------------------------------------------------------------------------- DDP over NCCL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_rank(rank: int, port: int, out: Path) -> None:
    """One rank, joined as ``kdcl train`` under torchrun joins (``init_from_env``)."""
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed.init_from_env()
    try:
        on_gpu, on_cpu = torch.ones(3, device="cuda"), torch.ones(2)
        dist.all_reduce(on_gpu)  # NCCL
        dist.all_reduce(on_cpu)  # gloo: kdcl's stop flags and counts travel on the CPU
        torch.manual_seed(0)
        model = create_model("cnn", 10, (3, 16, 16), width=8).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), device_ids=[0])
        x, y = torch.randn(16, 3, 16, 16, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
        for net in (model, ddp):  # one SGD step each: DDP's gradient all-reduce runs over NCCL
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        summary = run_pipeline(compose_config([*QUICK, *CUDA, "teacher=mlp", "trainer.epochs=1"]), out / "run")
        torch.save(
            {
                "backend": str(dist.get_backend()),
                "device": str(distributed.device(torch.device("cuda"))),
                "sums": (on_gpu.cpu(), on_cpu),
                "weights": (model.state_dict(), ddp.module.state_dict()),
                "steps": summary["steps"].tolist(),
            },
            out / "rank0.pt",
        )
    finally:
        distributed.shutdown()


@pytest.mark.gpu
def test_ddp_over_nccl_on_one_gpu(tmp_path):
    """What one GPU can show of DDP (one NCCL rank; two ranks need two GPUs, and
    tests/test_distributed.py runs them on the CPU with gloo): the process group kdcl joins
    under torchrun carries CUDA tensors over NCCL and CPU ones over gloo, DDP's gradient
    all-reduce trains as a plain model does, and a whole run trains inside the group."""
    mp.spawn(_nccl_rank, args=(_free_port(), tmp_path), nprocs=1)
    got = torch.load(tmp_path / "rank0.pt")
    assert "nccl" in got["backend"] and got["device"] == "cuda:0"
    assert torch.equal(got["sums"][0], torch.ones(3)) and torch.equal(got["sums"][1], torch.ones(2))
    plain, ddp = got["weights"]
    for name, w in plain.items():
        torch.testing.assert_close(ddp[name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert got["steps"] and all(s > 0 for s in got["steps"])


# --------------------------------------------------------------------------- peak memory
@pytest.mark.gpu
def test_the_peak_memory_counts_from_its_reset():
    device = torch.device("cuda")
    held = torch.cuda.memory_allocated(device) / 2**20  # what earlier tests left allocated
    reset_peak_memory(device)
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    assert peak_memory_mb(device) >= held + 63.9
    del big
    reset_peak_memory(device)
    small = torch.empty(2**20, dtype=torch.uint8, device=device)
    assert held + 0.9 <= peak_memory_mb(device) < held + 64
    del small


def test_each_stage_has_a_peak_memory_column_empty_on_a_cpu(tmp_path):
    run_pipeline(compose_config([*QUICK, "trainer.device=cpu", "teacher=mlp", "trainer.epochs=1"]), tmp_path)
    for stage in STAGES:
        metrics = stage_metrics(tmp_path, stage)
        columns = list(metrics.columns)
        assert columns[columns.index("samples_per_s") + 1] == "max_memory_mb"
        assert metrics["max_memory_mb"].isna().all()
        header, row = (tmp_path / stage / "metrics.csv").read_text().splitlines()[:2]
        assert row.split(",")[header.split(",").index("max_memory_mb")] == ""  # an empty cell, not "nan"
