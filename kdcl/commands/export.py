"""``kdcl export``: a checkpoint's model as an ONNX or TorchScript file, checked and timed.

``checkpoint=PATH`` writes the file and ``export.csv``: the model's size (params, MACs per
image, file size), the largest difference between the exported model's outputs and
PyTorch's on test inputs (the export fails over ``tolerance``) and its CPU latency at
batch 1 and 64 with one thread and with every core. ``run=RUN_DIR`` does this for every
model of a training run with a checkpoint (the rows of its ``summary.csv``) and adds
``compression.csv``: each model's test accuracy, size and latency next to the teacher's.

Every model runs on the CPU in fp32. The exported model takes what the PyTorch model
takes: a float batch ``(N, C, H, W)`` normalised with the checkpoint's ``normalization``
(mean and std per channel), or for text an int64 batch ``(N, L)`` of token ids from the
checkpoint's tokenizer, right-padded with its pad id; it returns the logits ``(N, classes)``.
The batch size is free, and so is a text model's sequence length L (checked at the test
batch's length and at half of it).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdcl.commands.job import plain_config
from kdcl.config.checks import check
from kdcl.config.schema import ExportConfig
from kdcl.errors import KdclError
from kdcl.files import writable_folder
from kdcl.models import count_macs, count_params
from kdcl.output.tables import print_table, write_csv
from kdcl.train.checkpoint import checked_spec, checkpoint_data, load_checkpoint, model_from_checkpoint
from kdcl.trust import CodePolicy

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 64)
THREAD_COUNTS = ("1thread", "all_threads")  # one thread; every core (all_threads())
Runner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Format:
    """An export format: its file suffix, and how to write, and run, a model in it."""

    suffix: str
    require: Callable[[], None]  # raises a KdclError when the format's packages are missing
    save: Callable[[nn.Module, Tensor, Path], None]  # (model, example batch, path)
    load: Callable[[Path, int], Runner]  # (path, threads) -> batch to logits


def _no_requirement() -> None:
    """TorchScript ships with PyTorch."""


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise KdclError(
            f"format=onnx needs the packages onnx and onnxruntime ({err})",
            fix="pip install kdcl[export] (or pass format=torchscript)",
        ) from None


def _save_onnx(model: nn.Module, example: Tensor, path: Path) -> None:
    """The TorchScript-based exporter (``dynamo=False``): it needs ``onnx`` alone, where the
    ``torch.export``-based one also needs ``onnxscript``. The batch axis stays free, and
    the sequence axis of token ids."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PyTorch's notice that this exporter is the older one
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": free_axes(example), "logits": {0: "batch"}},
        )


def free_axes(example: Tensor) -> dict[int, str]:
    """The input axes an export leaves free: the batch, and the sequence of (N, L) token ids."""
    return {0: "batch", 1: "sequence"} if is_tokens(example) else {0: "batch"}


def is_tokens(x: Tensor) -> bool:
    """Whether ``x`` is a batch of token ids (N, L) rather than images."""
    return x.dim() == 2 and not x.is_floating_point()


def _load_onnx(path: Path, threads: int) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _save_torchscript(model: nn.Module, example: Tensor, path: Path) -> None:
    """A trace of the forward pass (every registered model has one path through it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch's deprecation notice for torch.jit
        torch.jit.save(torch.jit.trace(model, example), str(path))


def _load_torchscript(path: Path, threads: int) -> Runner:
    """A TorchScript module; its threads are PyTorch's, set around the timing (:func:`torch_threads`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path))

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(x)

    return run


FORMATS = {
    "onnx": Format(".onnx", _require_onnx, _save_onnx, _load_onnx),
    "torchscript": Format(".torchscript.pt", _no_requirement, _save_torchscript, _load_torchscript),
}


def all_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_column(batch: int, threads: str) -> str:
    """The column of ``export.csv`` with the latency at ``batch`` and ``threads`` (one of THREAD_COUNTS)."""
    return f"latency_ms_b{batch}_{threads}"


def latency_ms(run: Runner, x: Tensor, warmup: int, repeats: int) -> float:
    """Median time of one forward pass of batch ``x`` over ``repeats`` timed passes after
    ``warmup`` untimed ones, in milliseconds."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def check_inputs(ckpt: dict[str, Any], count: int) -> tuple[Tensor, str]:
    """Up to ``count`` normalised inputs (text: token ids) from the test split of the
    checkpoint's dataset, and ``"test"``; where that dataset cannot be loaded here (its files
    are elsewhere, say), ``count`` seeded random inputs of the checkpoint's input shape
    (standard-normal images, or ids other than padding) and ``"random"``."""
    try:
        data = checkpoint_data(ckpt, None, torch.device("cpu"))
    except KdclError as err:
        log.warning("testing on random inputs: the checkpoint's dataset does not load here (%s)", err.what)
        generator = torch.Generator().manual_seed(0)
        shape = (count, *ckpt["input_shape"])
        if len(shape) == 2:  # token ids: any id of the vocabulary but the pad id (0 in kdcl's tokenizers)
            return torch.randint(1, ckpt["model"]["kwargs"]["vocab_size"], shape, generator=generator), "random"
        return torch.randn(*shape, generator=generator), "random"
    _, x, _ = next(data.test.batches([torch.arange(min(len(data.test), count))]))
    return data.preprocess(x, train=False), "test"


@dataclass(frozen=True)
class Exportable:
    """A model to export: its name (its row of the run's summary, or the checkpoint's stage),
    its checkpoint (path and contents) and, from the run's summary, its test accuracy."""

    name: str
    path: Path
    ckpt: dict[str, Any]
    test_acc: float | None = None


def export_model(model: Exportable, fmt: str, out_file: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Export ``model`` to ``out_file``, check its outputs against PyTorch's and time it;
    returns its row of ``export.csv``."""
    ckpt = model.ckpt
    net = model_from_checkpoint(ckpt, CodePolicy.of(settings), model.path).eval()
    x, inputs = check_inputs(ckpt, settings["check_examples"])
    log.info("exporting %s (%s) to %s", model.path, ckpt["model"]["name"], out_file)
    backend, other = FORMATS[fmt], next(f for f in FORMATS if f != fmt)
    with torch.no_grad():
        try:
            backend.save(net, x[:2], out_file)
        except RuntimeError as err:  # an op the exporter does not support, a forward pass it cannot trace
            raise KdclError(
                f"PyTorch cannot export {model.path} (model {ckpt['model']['name']!r}) to {fmt}: {err}",
                fix=f"try format={other}",
            ) from None
    run = backend.load(out_file, all_threads())
    batches = [x, x[:, : max(1, x.shape[1] // 2)]] if is_tokens(x) else [x]  # text: a second length
    with torch.no_grad():
        diff = max((run(b) - net(b)).abs().max().item() for b in batches)
    if not diff <= settings["tolerance"]:  # also refuses NaN
        out_file.unlink()
        raise KdclError(
            f"the {fmt} export of {model.path} does not reproduce PyTorch: its outputs differ by up to {diff:.3g} "
            f"on {len(x)} {inputs} inputs{' (two sequence lengths)' if len(batches) > 1 else ''}, over tolerance={settings['tolerance']:g} (the file was removed)",
            fix=f"try format={other}, or raise tolerance=… if that difference is acceptable",
        )
    row = {
        "model": model.name,
        "arch": ckpt.get("arch") or ckpt["model"]["name"],  # checkpoints before arch held the name alone
        "stage": ckpt.get("stage"),
        "dataset": ckpt.get("dataset"),
        "checkpoint": str(model.path.resolve()),
        "format": fmt,
        "file": str(out_file.resolve()),
        "file_mb": out_file.stat().st_size / 1e6,
        "params": count_params(net),
        "macs": count_macs(net, tuple(ckpt["input_shape"])),
        "inputs": inputs,
        "examples": len(x),
        "max_abs_diff": diff,
        "threads": all_threads(),
    }
    for threads in THREAD_COUNTS:
        count = all_threads() if threads == "all_threads" else 1
        with torch_threads(count):
            run = backend.load(out_file, count)
            for batch in LATENCY_BATCHES:
                xb = x[torch.arange(batch) % len(x)]  # the inputs repeated up to the batch size
                row[latency_column(batch, threads)] = latency_ms(run, xb, settings["warmup"], settings["repeats"])
    return row


def run_models(run: Path) -> list[Exportable]:
    """The models of training run ``run`` that have a checkpoint: the rows of its
    ``summary.csv``, each checkpoint read. A model's file is looked for in the run
    directory first (a run moved after training), then where the summary says it was
    written (a teacher loaded from another run)."""
    summary_file = run / "summary.csv"
    if not summary_file.is_file():
        raise KdclError(
            f"{run} holds no summary.csv: it is not a finished kdcl train run",
            fix="pass run=RUN_DIR, the directory of a finished kdcl train run (outputs/train/DATE/TIME)",
        )
    summary = pd.read_csv(summary_file)
    if "checkpoint" not in summary:
        summary["checkpoint"] = None
    summary = summary[summary["checkpoint"].notna()]  # an ensemble's row has no file of its own
    if summary.empty:
        raise KdclError(
            f"no model in {summary_file} has a checkpoint",
            fix="pass a run of the standard scenario (teacher, baseline, distill), or export one file with checkpoint=PATH",
        )
    models = []
    for name, recorded, acc in zip(summary["model"], summary["checkpoint"], summary["test_acc"]):
        candidates = [run / name / Path(recorded).name, Path(recorded)]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise KdclError(
                f"the checkpoint of {name!r} in {summary_file} is missing: neither {candidates[0]} nor {recorded} exists",
                fix="pass a complete run directory, or export the models one by one with checkpoint=PATH",
            )
        models.append(Exportable(name, found, load_checkpoint(found), float(acc)))
    return models


def chosen_models(settings: dict[str, Any]) -> list[Exportable]:
    """The models ``settings`` (the validated config) asks to export, every checkpoint read
    and checked, and the format's packages there: every error of the input comes before
    any work."""
    if (settings["checkpoint"] is None) == (settings["run"] is None):
        raise KdclError(
            "kdcl export takes one of checkpoint= and run=, " + ("not both" if settings["run"] else "and got neither"),
            fix="kdcl export checkpoint=PATH/best.pt  (one model)  or  kdcl export run=RUN_DIR  (every model of a run)",
        )
    FORMATS[settings["format"]].require()
    if settings["run"] is not None:
        models = run_models(Path(settings["run"]).expanduser())
    else:
        path = Path(settings["checkpoint"]).expanduser()
        ckpt = load_checkpoint(path)
        models = [Exportable(ckpt.get("stage") or "model", path, ckpt)]
    for model in models:  # the code each file names, before anything is built
        checked_spec(model.ckpt, CodePolicy.of(settings), model.path)
    return models


def compression_table(exports: pd.DataFrame, accuracy: list[float | None]) -> pd.DataFrame:
    """One row per model: its test accuracy (from the run's summary), size and one-thread
    latency, and the teacher's divided by its own (``*_x``: how many times smaller or
    faster; NaN without a teacher row). ``acc_vs_teacher``: its test accuracy minus the teacher's."""
    table = pd.DataFrame(
        {
            "model": exports["model"],
            "arch": exports["arch"],
            "test_acc": accuracy,
            "params": exports["params"],
            "macs": exports["macs"],
            "file_mb": exports["file_mb"],
            "latency_ms_b1": exports[latency_column(1, "1thread")],
            "latency_ms_b64": exports[latency_column(64, "1thread")],
        }
    )
    teacher = table[table["model"] == "teacher"]
    if teacher.empty:
        log.warning("no teacher row in the run's summary: the ratios against the teacher are left empty")
    ref = teacher.iloc[0] if not teacher.empty else pd.Series(math.nan, index=table.columns)
    table["acc_vs_teacher"] = table["test_acc"] - ref["test_acc"]
    for column, ratio in (
        ("params", "params_smaller_x"),
        ("macs", "macs_smaller_x"),
        ("file_mb", "file_smaller_x"),
        ("latency_ms_b1", "speedup_b1_x"),
        ("latency_ms_b64", "speedup_b64_x"),
    ):
        table[ratio] = ref[column] / table[column]
    return table


def write_exports(models: list[Exportable], settings: dict[str, Any], out: Path) -> pd.DataFrame:
    """Export every model into ``out`` (``NAME.onnx`` or ``NAME.torchscript.pt``) and write
    ``export.csv``; for a run (``settings["run"]``), ``compression.csv`` too. Returns ``export.csv``'s table."""
    fmt = settings["format"]
    exports = pd.DataFrame([export_model(m, fmt, out / f"{m.name}{FORMATS[fmt].suffix}", settings) for m in models])
    write_csv(exports, out / "export.csv")
    latency = [latency_column(b, t) for t in THREAD_COUNTS for b in LATENCY_BATCHES]
    shown = ["model", "arch", "params", "macs", "file_mb", "inputs", "max_abs_diff", *latency]
    print_table(exports, f"kdcl export — {fmt}", shown)
    log.info("wrote %s", out / "export.csv")
    if settings["run"] is not None:
        compression = compression_table(exports, [m.test_acc for m in models])
        write_csv(compression, out / "compression.csv")
        print_table(compression, f"what compression bought — {settings['run']} ({fmt}, CPU, 1 thread)")
        log.info("wrote %s", out / "compression.csv")
    return exports


def export_command(cfg: DictConfig) -> None:
    """``kdcl export``: ``checkpoint=PATH`` or ``run=RUN_DIR`` into ``export.csv`` (and ``compression.csv``)."""
    settings = plain_config(cfg)
    check(settings, ExportConfig)
    models = chosen_models(settings)
    write_exports(models, settings, export_folder(settings))


def export_folder(settings: dict[str, Any]) -> Path:
    """Where the exported files and tables go: ``out``, else ``export/`` beside the
    checkpoint (``checkpoint=``) or in the run folder (``run=``); made, and checked writable,
    before anything is exported."""
    if settings["out"]:
        folder = Path(settings["out"])
    elif settings["checkpoint"]:
        folder = Path(settings["checkpoint"]).expanduser().parent / "export"
    else:
        folder = Path(settings["run"]) / "export"
    return writable_folder(folder.expanduser(), "the exports", "pass out=DIR, a folder you can write")
