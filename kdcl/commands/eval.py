"""``kdcl eval``: test a checkpoint on its dataset's test split (or another dataset)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kdcl.commands.job import output_dir, plain_config
from kdcl.config.checks import validate_eval
from kdcl.data import load_data
from kdcl.errors import KdclError
from kdcl.models import build_model, count_macs, count_params, model_ref, size_mb
from kdcl.output.tables import print_table, write_csv
from kdcl.train.checkpoint import (
    checked_spec,
    checkpoint_data,
    is_kdcl,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
)
from kdcl.train.engine import TrainSettings, evaluate, resolve_device
from kdcl.trust import CodePolicy

log = logging.getLogger(__name__)


def run_eval(
    checkpoint: str,
    dataset: dict[str, Any] | None,
    device_name: str,
    batch_size: int,
    out: Path,
    model_spec: dict[str, Any] | None = None,
    policy: CodePolicy | None = None,
) -> pd.DataFrame:
    """Evaluate ``checkpoint`` and write ``eval.csv``, ``eval_per_class.csv`` and ``confusion.csv``.

    A checkpoint of a class-incremental task (its ``classes``: the dataset class of each
    output) is tested on the examples of those classes.

    A kdcl checkpoint describes itself (a model of any source; one of ``_target_`` needs its
    package importable and ``policy``'s leave to call it, :mod:`kdcl.trust`); a plain
    ``state_dict`` file (torchvision's, say) needs ``model_spec`` (name, of any source, and
    kwargs) and a dataset."""
    ckpt, policy = read_checkpoint(checkpoint), policy or CodePolicy()
    device = resolve_device(device_name)
    if is_kdcl(ckpt):
        checked_spec(ckpt, policy, checkpoint)  # before the data loads: refused code is refused first
        data = checkpoint_data(ckpt, dataset, device)
        model = model_from_checkpoint(ckpt, policy, checkpoint).to(device)
        name, stage = ckpt["model"]["name"], ckpt.get("stage")
    else:
        if not model_spec or not dataset:
            raise KdclError(
                f"{checkpoint} is a plain state_dict, which does not say what model or data it is for",
                fix="add model=NAME (e.g. resnet18) and dataset=NAME to the command",
            )
        data = load_data(dataset, device, False, 0)
        name, stage = model_ref(model_spec).label, "state_dict"
        model = build_model(model_spec, data.num_classes, data.input_shape, data_kwargs=data.model_kwargs)
        load_weights(model, ckpt, f"{checkpoint} as model {name!r}")
        model = model.to(device)
    trainer = TrainSettings(
        device, epochs=0, batch_size=batch_size, eval_batch_size=batch_size, amp=device.type == "cuda"
    )
    result = evaluate(model, data.test, data, trainer)
    preds, labels = result.logits.argmax(1).numpy(), result.labels.numpy()
    classes = list(range(data.num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    per_class = pd.DataFrame(
        {"class": data.class_names, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    confusion = pd.DataFrame(
        confusion_matrix(labels, preds, labels=classes), index=data.class_names, columns=data.class_names
    )
    summary = pd.DataFrame(
        [
            {
                "checkpoint": str(Path(checkpoint).resolve()),
                "model": name,
                "stage": stage,
                "dataset": data.name,
                "split": "test",
                "examples": len(labels),
                "acc": result.acc,
                "acc_top5": result.acc_top5,
                "loss": result.loss,
                "macro_f1": float(f1.mean()),
                "params": count_params(model),
                "macs": count_macs(model, data.input_shape),
                "size_mb": round(size_mb(model), 4),
                "batch_size": batch_size,
                "latency_ms_per_batch": latency_ms(model, data, trainer),
                "device": str(device),
            }
        ]
    )
    write_csv(summary, out / "eval.csv")
    write_csv(per_class, out / "eval_per_class.csv")
    confusion.rename_axis("true \\ predicted").to_csv(out / "confusion.csv")
    print_table(
        summary,
        f"kdcl eval — {checkpoint}",
        [
            "model",
            "stage",
            "dataset",
            "examples",
            "acc",
            "acc_top5",
            "loss",
            "macro_f1",
            "params",
            "macs",
            "latency_ms_per_batch",
        ],
    )
    print_table(per_class, "per class (test)")
    print_table(confusion.reset_index(names="true \\ pred"), "confusion matrix (rows: true, columns: predicted)")
    return summary


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, data, trainer: TrainSettings, repeats: int = 10) -> float:
    """Mean forward time of one test batch (after one warm-up pass), in milliseconds."""
    model.eval()
    idx = torch.arange(min(len(data.test), trainer.eval_batch_size))
    _, x, _ = next(data.test.batches([idx]))
    x = data.preprocess(x, train=False)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    with trainer.autocast():
        model(x)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync()
    return (time.perf_counter() - start) / repeats * 1000


def eval_command(cfg: DictConfig) -> None:
    """``kdcl eval``: one checkpoint on a test split, into ``eval.csv``."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise KdclError("no checkpoint given", fix="kdcl eval checkpoint=PATH/TO/best.pt")
    plain = plain_config(cfg)
    validate_eval(plain)
    model = {"name": plain["model"], "kwargs": plain["model_kwargs"] or {}} if plain["model"] else None
    run_eval(
        cfg.checkpoint, plain.get("dataset"), cfg.device, cfg.batch_size, output_dir(), model, CodePolicy.of(plain)
    )
    log.info("wrote %s", output_dir() / "eval.csv")
