"""The parity benchmark's own pieces: the plain-PyTorch reference and the paired comparison.

The reference must build kdcl's architectures (so that it can take a kdcl teacher's weights)
and train on exactly the examples it is given (two independently drawn training splits had
shifted every kdcl − reference pair alike)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kdcl.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import parity  # noqa: E402
import reference_kd  # noqa: E402


@pytest.mark.parametrize(("arch", "width"), [("cnn", 8), ("vgg", 8), ("vgg", 32)])
def test_the_reference_builds_kdcls_architectures(arch: str, width: int):
    ours = create_model(arch, num_classes=10, input_shape=(3, 32, 32), width=width).eval()
    theirs = reference_kd.ARCHS[arch](width).eval()
    theirs.load_state_dict(ours.state_dict())  # same module names and shapes, or this raises
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_the_reference_trains_on_the_given_examples(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 300), ("test", 50)):
        np.savez(tmp_path / f"{part}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    chosen = np.sort(rng.choice(300, 120, replace=False))
    pd.DataFrame({"index": chosen, "label": chosen % 10}).to_csv(tmp_path / "scores.csv", index=False)
    args = argparse.Namespace(
        data=str(tmp_path),
        split_seed=0,
        train_samples=150,
        val_fraction=0.2,
        test_samples=None,
        train_indices=tmp_path / "scores.csv",
    )
    splits = reference_kd.load_splits(args)
    x, y = splits["train"]
    assert torch.equal(y, torch.from_numpy(chosen % 10))
    pixels = np.load(tmp_path / "train.npz")["x"][chosen]
    mean, std = torch.tensor(reference_kd.CIFAR_MEAN), torch.tensor(reference_kd.CIFAR_STD)
    assert torch.allclose(
        x,
        (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1),
        atol=1e-6,
    )
    val = splits["val"][0]
    assert len(val) == round(150 * 0.2)
    assert not (val.flatten(1)[:, None] == x.flatten(1)[None]).all(2).any()  # validation: other examples


def test_parity_is_the_mean_paired_difference_within_one_standard_error():
    kdcl = pd.DataFrame(
        {"model": "distill", "seed": [0, 1, 2], "test_acc": [0.50, 0.52, 0.51], "test_acc_last": [0.50, 0.50, 0.50]}
    )
    reference = pd.DataFrame(
        {"model": "distill", "seed": [2, 0, 1], "test_acc": [0.52, 0.51, 0.52], "test_acc_last": [0.49, 0.49, 0.49]}
    )
    table = parity.paired(kdcl, reference).set_index(["model", "metric"])
    best = table.loc[("distill", "test_acc")]
    # Paired by seed: differences −0.01, 0.00, −0.01; mean −0.02/3; sample std √(1/3)·0.01.
    assert best["diff"] == pytest.approx(-0.02 / 3)
    assert best["se"] == pytest.approx(math.sqrt(1 / 3) * 0.01 / math.sqrt(3))
    assert not best["parity"]  # |−0.0067| > 0.0033
    assert table.loc[("distill", "test_acc_last"), "parity"]  # kdcl ahead by 0.01 on every seed
