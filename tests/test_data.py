"""Splits, loaders and the batched preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcl.data import PADDINGS, Augment, Preprocess, load_data, stratified_subset
from kdcl.errors import KdclError

CPU = torch.device("cpu")


def dataset_cfg(compose_cfg, *overrides: str) -> dict:
    return compose_cfg([*overrides])["dataset"]


def test_stratified_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    idx = stratified_subset(labels, 100, seed=0)
    assert len(idx) == 100 and len(set(idx)) == 100
    counts = np.bincount(labels[idx], minlength=4)
    assert np.all(np.abs(counts - [10, 20, 30, 40]) <= 1)
    assert not np.array_equal(idx, stratified_subset(labels, 100, seed=1))


def test_digits_splits_are_disjoint_and_sized(compose_cfg):
    cfg = dataset_cfg(compose_cfg)
    data = load_data(cfg, CPU, channels_last=False, seed=0)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    n_test = len(data.test)
    assert n_test == round(1797 * cfg["test_fraction"])
    assert len(data.train) + len(data.val) == 1797 - n_test
    assert len(data.val) == round((1797 - n_test) * cfg["val_fraction"])
    assert not set(data.train.origin) & set(data.val.origin)
    assert np.bincount(data.val.labels.numpy()).min() >= 10  # stratified: every class present


def test_max_train_samples_is_a_stratified_subset(compose_cfg):
    cfg = dataset_cfg(compose_cfg, "dataset.max_train_samples=200", "dataset.val_fraction=0.25")
    data = load_data(cfg, CPU, channels_last=False, seed=0)
    assert (len(data.train), len(data.val)) == (150, 50)
    assert np.bincount(data.train.labels.numpy(), minlength=10).min() >= 13
    again = load_data(cfg, CPU, channels_last=False, seed=5)  # the run seed does not move the split
    assert np.array_equal(data.train.origin, again.train.origin)


def test_empty_split_is_a_clear_error(compose_cfg):
    cfg = dataset_cfg(compose_cfg, "dataset.max_train_samples=2", "dataset.val_fraction=0.1")
    with pytest.raises(KdclError, match="validation split .* is empty"):
        load_data(cfg, CPU, channels_last=False, seed=0)


def test_batches_gather_by_index(compose_cfg):
    data = load_data(dataset_cfg(compose_cfg), CPU, channels_last=False, seed=0)
    idx = torch.tensor([5, 0, 17])
    ((got_idx, x, y),) = data.train.batches([idx])
    assert torch.equal(got_idx, idx)
    assert torch.equal(x, data.train.x[idx]) and torch.equal(y, data.train.labels[idx])
    assert x.dtype == torch.uint8 and x.shape == (3, 1, 8, 8)


def test_preprocess_normalizes_without_augmentation_at_eval():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    pre = Preprocess(mean, std, crop_padding=2, flip=True, device=CPU, channels_last=False, seed=0)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(pre(x, train=False), expected, atol=1e-5)


@pytest.mark.parametrize(
    "mode, numpy_pad", [("reflect", {"mode": "reflect"}), ("zeros", {"mode": "constant", "constant_values": 0})]
)
def test_random_crop_is_a_window_of_the_padded_image(mode, numpy_pad):
    p = 2
    x = torch.randint(1, 256, (32, 2, 5, 7), dtype=torch.uint8)
    pre = Preprocess(
        [0, 0],
        [1 / 255, 1 / 255],
        crop_padding=p,
        flip=False,
        device=CPU,
        channels_last=False,
        seed=0,
        padding_mode=mode,
    )
    out = pre(x, train=True).round().to(torch.uint8)  # mean 0, std 1/255: the raw pixel values
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), **numpy_pad))
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 7])
        ]
        assert matches, f"example {i} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 5  # the offsets vary per example


IMAGE = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
# The window at offset (0, 0) of IMAGE padded by 1 pixel, and at offset (2, 1).
CORNER = {
    "reflect": [[5, 4, 5], [2, 1, 2], [5, 4, 5]],
    "zeros": [[0, 0, 0], [0, 1, 2], [0, 4, 5]],
    "mean": [[100, 100, 100], [100, 1, 2], [100, 4, 5]],
}
BOTTOM = {
    "reflect": [[4, 5, 6], [7, 8, 9], [4, 5, 6]],
    "zeros": [[4, 5, 6], [7, 8, 9], [0, 0, 0]],
    "mean": [[4, 5, 6], [7, 8, 9], [100, 100, 100]],
}


@pytest.mark.parametrize("mode", sorted(CORNER))
def test_each_padding_mode_fills_the_border_with_its_pixels(mode):
    """Pixel values (mean 100/255, std 1/255: normalised value = pixel − 100) of two crops."""
    x = torch.tensor(IMAGE, dtype=torch.uint8).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
    pre = Preprocess(
        [100 / 255], [1 / 255], crop_padding=1, flip=False, device=CPU, channels_last=False, seed=0, padding_mode=mode
    )
    out = pre.apply(x, Augment(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([False, False])))
    pixels = (out + 100).round()[:, 0]
    assert torch.equal(pixels[0], torch.tensor(CORNER[mode], dtype=torch.float))
    assert torch.equal(pixels[1], torch.tensor(BOTTOM[mode], dtype=torch.float))


@pytest.mark.parametrize("mode", sorted(CORNER))
def test_torchvision_keywords_of_each_padding_mode_give_the_same_border(mode):
    """``kdcl bench``'s torchvision loop (PIL images) pads as kdcl does (the mean colour to the nearest uint8)."""
    from torchvision.transforms import functional as tvf

    mean, std, p = [0.3, 0.5, 0.7], [0.2, 0.25, 0.3], 2
    x = torch.randint(0, 256, (1, 3, 5, 6), dtype=torch.uint8)
    pre = Preprocess(mean, std, crop_padding=p, flip=False, device=CPU, channels_last=False, seed=0, padding_mode=mode)
    padded = tvf.pil_to_tensor(tvf.pad(tvf.to_pil_image(x[0]), p, **PADDINGS.get(mode).torchvision(mean)))[None]
    for dy, dx in [(0, 0), (2 * p, 2 * p), (1, 3)]:
        ours = pre.apply(x, Augment(torch.tensor([dy]), torch.tensor([dx]), torch.tensor([False])))
        theirs = pre.normalize(padded[:, :, dy : dy + 5, dx : dx + 6])
        assert torch.allclose(ours, theirs, atol=0.5 / 255 / min(std) if mode == "mean" else 1e-5)


def test_reflect_padding_wider_than_the_image_is_refused_before_training(compose_cfg):
    cfg = dataset_cfg(compose_cfg, "dataset.crop_padding=8")  # digits: 8×8 images
    with pytest.raises(KdclError, match="crop_padding=8 cannot be reflected") as err:
        load_data(cfg, CPU, channels_last=False, seed=0)
    assert "crop_padding_mode=mean" in err.value.fix
    cfg = dataset_cfg(compose_cfg, "dataset.crop_padding=8", "dataset.crop_padding_mode=zeros")
    assert load_data(cfg, CPU, channels_last=False, seed=0).preprocess.padding_mode == "zeros"


def test_flip_mirrors_about_half_the_examples():
    x = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8)
    pre = Preprocess([0], [1 / 255], crop_padding=0, flip=True, device=CPU, channels_last=False, seed=0)
    out = pre(x, train=True).round().to(torch.uint8)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same | mirrored)
    assert 120 < mirrored.sum() < 280


@pytest.mark.parametrize("layout", ["NHWC", "NHW"])
def test_npz_directory(tmp_path, compose_cfg, layout):
    rng = np.random.default_rng(0)
    shape = (60, 6, 6, 3) if layout == "NHWC" else (60, 6, 6)
    for part in ("train", "test"):
        np.savez(tmp_path / f"{part}.npz", x=rng.integers(0, 256, shape, dtype=np.uint8), y=np.arange(60) % 3)
    data = load_data(dataset_cfg(compose_cfg, "dataset=npz", f"dataset.root={tmp_path}"), CPU, False, 0)
    channels = 3 if layout == "NHWC" else 1
    assert data.input_shape == (channels, 6, 6) and data.num_classes == 3
    assert len(data.train) + len(data.val) == 60 and len(data.test) == 60


def test_npz_missing_names_dataset_root(tmp_path, compose_cfg):
    with pytest.raises(KdclError, match="dataset.root"):
        load_data(dataset_cfg(compose_cfg, "dataset=npz", f"dataset.root={tmp_path}"), CPU, False, 0)


def test_torchvision_dataset_missing_offline(tmp_path, compose_cfg):
    cfg = dataset_cfg(compose_cfg, "dataset=mnist", f"dataset.root={tmp_path}")
    with pytest.raises(KdclError) as err:
        load_data(cfg, CPU, False, 0)
    assert "dataset.root" in str(err.value) and "dataset.download" in str(err.value)


def test_loader_path_gives_the_same_batches_as_memory(compose_cfg):
    """The DataLoader path (data read per sample) and the tensor path agree."""
    base = ["dataset=fake", "dataset.train_samples=40", "dataset.test_samples=8"]
    mem = load_data(dataset_cfg(compose_cfg, *base), CPU, False, 0)
    disk = load_data(dataset_cfg(compose_cfg, *base, "dataset.in_memory=false"), CPU, False, 0)
    assert np.array_equal(mem.train.origin, disk.train.origin)
    assert mem.mean == pytest.approx(disk.mean)
    batches = [torch.tensor([3, 1, 4]), torch.tensor([0, 2])]
    for (i1, x1, y1), (i2, x2, y2) in zip(mem.train.batches(batches), disk.train.batches(batches)):
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_imagefolder_reads_files_per_sample(tmp_path, compose_cfg):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / part / cls / f"{i}.png")
    cfg = dataset_cfg(compose_cfg, "dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=16")
    data = load_data(cfg, CPU, False, 0)
    assert data.class_names == ["cat", "dog"] and data.input_shape == (3, 16, 16)
    assert len(data.train) + len(data.val) == 24 and len(data.test) == 8
    ((_, x, y),) = data.test.batches([torch.arange(8)])
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8 and y.tolist() == [0] * 4 + [1] * 4


def test_imagefolder_missing_names_dataset_root(tmp_path, compose_cfg):
    cfg = dataset_cfg(compose_cfg, "dataset=imagefolder", f"dataset.root={tmp_path}")
    with pytest.raises(KdclError, match="dataset.root"):
        load_data(cfg, CPU, False, 0)


# --------------------------------------------------------------------------- checks on load
def write_npz(root, train: dict, test: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train.npz", **train)
    np.savez(root / "test.npz", **(train if test is None else test))


def images(n: int, shape=(6, 6)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def load_npz(compose_cfg, root, *overrides: str):
    cfg = dataset_cfg(compose_cfg, "dataset=npz", f"dataset.root={root}", *overrides)
    return load_data(cfg, CPU, False, 0)


def test_npz_without_x_or_y_names_the_file_and_its_arrays(tmp_path, compose_cfg):
    write_npz(tmp_path, {"images": images(30), "y": np.arange(30) % 3})
    with pytest.raises(KdclError, match=r"train\.npz has no array 'x' \(it holds: images, y\)"):
        load_npz(compose_cfg, tmp_path)


def test_npz_x_and_y_of_different_lengths(tmp_path, compose_cfg):
    write_npz(tmp_path, {"x": images(30), "y": np.arange(29) % 3})
    with pytest.raises(KdclError, match=r"train\.npz: x holds 30 images but y holds 29 labels"):
        load_npz(compose_cfg, tmp_path)


@pytest.mark.parametrize(
    ("labels", "overrides", "message"),
    [
        (np.arange(30) % 3 - 1, [], r"the train split has labels -1 outside 0\.\.1"),
        (
            np.arange(30) % 3,
            ["dataset.class_names=[a,b]"],
            r"labels 2 outside 0\.\.1 \(the dataset has 2 classes: a, b\)",
        ),
        ((np.arange(30) % 3) + 0.5, [], r"labels must be integer class indices, found float64 labels such as 0\.5"),
    ],
    ids=["negative", "beyond-class-names", "non-integer"],
)
def test_labels_outside_the_classes_are_refused(tmp_path, compose_cfg, labels, overrides, message):
    write_npz(tmp_path, {"x": images(30), "y": labels})
    with pytest.raises(KdclError, match=message):
        load_npz(compose_cfg, tmp_path, *overrides)


def test_whole_float_labels_still_load(tmp_path, compose_cfg):
    write_npz(tmp_path, {"x": images(30), "y": (np.arange(30) % 3).astype(np.float32)})
    assert load_npz(compose_cfg, tmp_path).num_classes == 3


def test_test_classes_the_training_split_never_has(tmp_path, compose_cfg):
    write_npz(tmp_path, {"x": images(30), "y": np.arange(30) % 2}, {"x": images(30), "y": np.arange(30) % 3})
    with pytest.raises(KdclError, match="the test split has classes the training split never has: 2"):
        load_npz(compose_cfg, tmp_path)


def test_train_and_test_images_of_different_shapes(tmp_path, compose_cfg):
    y = np.arange(30) % 3
    write_npz(tmp_path, {"x": images(30), "y": y}, {"x": images(30, (8, 8, 3)), "y": y})
    with pytest.raises(KdclError, match="train images are 6×6 with 1 channel but test images are 8×8 with 3 channels"):
        load_npz(compose_cfg, tmp_path)


def test_class_too_small_for_the_validation_carve(tmp_path, compose_cfg):
    """A class of one example goes wholly to one side of the carve: with val_fraction 0.6, to validation."""
    y = np.concatenate([np.arange(40) % 2, [2]])
    write_npz(tmp_path, {"x": images(41), "y": y})
    with pytest.raises(KdclError, match="class '2' has 1 training example, and the validation carve") as err:
        load_npz(compose_cfg, tmp_path, "dataset.val_fraction=0.6")
    assert "takes all 1: none is left to train on" in err.value.what and "at least 2" in err.value.fix
    assert len(load_npz(compose_cfg, tmp_path).train) == 37  # val_fraction 0.1: the class trains, as before


def test_max_train_samples_too_small_for_every_class(compose_cfg):
    cfg = dataset_cfg(compose_cfg, "dataset.max_train_samples=10", "dataset.val_fraction=0.1")  # digits: 1 per class
    with pytest.raises(KdclError, match="dataset.max_train_samples=10 keeps 1 of them") as err:
        load_data(cfg, CPU, False, 0)
    assert "raise dataset.max_train_samples" in err.value.fix


def image_folder(root, corrupt: str | None = None) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (root / part / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / part / cls / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"not an image")


def test_imagefolder_undecodable_training_image_is_named_on_load(tmp_path, compose_cfg):
    image_folder(tmp_path, corrupt="train/dog/4.png")
    cfg = dataset_cfg(compose_cfg, "dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=8")
    with pytest.raises(
        KdclError, match=r"cannot decode image file .*train/dog/4\.png \(not an image file PIL can identify\)"
    ):
        load_data(cfg, CPU, False, 0)  # the channel statistics read the training images


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_undecodable_image_read_later_is_named(tmp_path, compose_cfg, workers):
    image_folder(tmp_path, corrupt="test/dog/1.png")
    cfg = dataset_cfg(
        compose_cfg,
        "dataset=imagefolder",
        f"dataset.root={tmp_path}",
        "dataset.image_size=8",
        f"dataset.num_workers={workers}",
    )
    data = load_data(cfg, CPU, False, 0)
    with pytest.raises(KdclError) as err:
        list(data.test.batches([torch.arange(4)]))
    assert err.value.what.startswith("cannot decode image file") and "test/dog/1.png" in err.value.what
    assert "Traceback" not in err.value.what and "remove it" in err.value.fix
