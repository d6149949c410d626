"""Users' own image data: ``dataset=csv`` (manifests of image files) and ``dataset=hf`` (a
Hugging Face ``datasets`` dataset), built in each test from a few tiny PNGs."""

from __future__ import annotations

import os

# Offline before ``datasets`` is first imported (it reads these once): no test waits on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import QUICK  # noqa: E402
from PIL import Image  # noqa: E402

from kdcl.data import LoaderSource, TensorSource, load_data  # noqa: E402
from kdcl.errors import KdclError  # noqa: E402

CPU = torch.device("cpu")
SIZE = 6  # the images' size: image_size=SIZE keeps every pixel
CLASSES = ("cat", "dog")
COUNTS = {"train": 10, "test": 4}  # images per class


def pixels(split: str, cls: int, i: int) -> np.ndarray:
    """A distinct (SIZE, SIZE, 3) uint8 image for every (split, class, index)."""
    seed = (list(COUNTS).index(split), cls, i)
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def examples(split: str) -> list[tuple[str, int, np.ndarray]]:
    """(relative path, class index, pixels) of every image of ``split``, classes interleaved."""
    return [
        (f"images/{split}/{CLASSES[c]}_{i}.png", c, pixels(split, c, i)) for i in range(COUNTS[split]) for c in (0, 1)
    ]


def write_images(root) -> None:
    for split in COUNTS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for path, _, image in examples(split):
            Image.fromarray(image).save(root / path)


def write_manifests(root, label=lambda c: CLASSES[c], header="path,label") -> None:
    write_images(root)
    for split in COUNTS:
        rows = [f"{path},{label(c)}" for path, c, _ in examples(split)]
        (root / f"{split}.csv").write_text("\n".join([header, *rows]) + "\n")


def write_class_folders(root) -> None:
    """The same images as root/<split>/<class>/<name>.png."""
    for split in COUNTS:
        for path, c, image in examples(split):
            folder = root / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / path.rsplit("/", 1)[1])


def expected(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 3, SIZE, SIZE) and class indices of ``split``, in the manifest's order."""
    rows = examples(split)
    return np.stack([image.transpose(2, 0, 1) for _, _, image in rows]), np.array([c for _, c, _ in rows])


def load_csv(compose_cfg, root, *overrides: str):
    cfg = compose_cfg(["dataset=csv", f"dataset.root={root}", f"dataset.image_size={SIZE}", *overrides])
    return load_data(cfg["dataset"], CPU, False, 0)


def assert_test_split_is(data, x: np.ndarray, y: np.ndarray) -> None:
    """``data``'s test split holds ``x`` and ``y`` (all of it, in order)."""
    ((_, got_x, got_y),) = data.test.batches([torch.arange(len(y))])
    assert got_x.dtype == torch.uint8
    assert np.array_equal(got_x.numpy(), x) and np.array_equal(got_y.numpy(), y)


# --------------------------------------------------------------------------- csv
def test_csv_loads_the_listed_images_with_their_class_names(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    data = load_csv(compose_cfg, tmp_path)
    assert data.class_names == list(CLASSES) and data.input_shape == (3, SIZE, SIZE)
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 8
    assert_test_split_is(data, *expected("test"))
    x, y = expected("train")
    assert np.array_equal(data.train.x.numpy(), x[data.train.origin])  # held in memory, decoded at load
    assert np.array_equal(data.train.labels.numpy(), y[data.train.origin])


def test_csv_whole_number_labels_are_class_indices(tmp_path, compose_cfg):
    write_manifests(tmp_path, label=lambda c: str(1 - c))
    data = load_csv(compose_cfg, tmp_path, "dataset.class_names=[first,second]")
    assert data.class_names == ["first", "second"]
    x, y = expected("test")
    assert_test_split_is(data, x, 1 - y)


def test_csv_class_names_give_the_order_of_named_classes(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    data = load_csv(compose_cfg, tmp_path, "dataset.class_names=[dog,cat]")
    assert data.class_names == ["dog", "cat"]
    x, y = expected("test")
    assert_test_split_is(data, x, 1 - y)
    with pytest.raises(KdclError, match=r"labels dog are not among dataset\.class_names \(cat, bird\)"):
        load_csv(compose_cfg, tmp_path, "dataset.class_names=[cat,bird]")


NORMALISATION = ["dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]"]


def test_csv_honours_the_dataset_knobs(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    knobs = ["dataset.max_train_samples=12", "dataset.val_fraction=0.25", "dataset.max_test_samples=4"]
    data = load_csv(compose_cfg, tmp_path, *knobs, "dataset.image_size=4", *NORMALISATION)
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 4)
    assert data.input_shape == (3, 4, 4) and (data.mean, data.std) == ([0.5] * 3, [0.25] * 3)
    assert np.bincount(data.test.labels.numpy()).tolist() == [2, 2]  # stratified
    per_sample = load_csv(compose_cfg, tmp_path, *knobs, "dataset.image_size=4", "dataset.in_memory=false")
    assert np.array_equal(per_sample.train.origin, data.train.origin)
    batch = [torch.tensor([2, 0, 5])]
    ((_, x_mem, y_mem),) = data.train.batches(batch)
    ((_, x_disk, y_disk),) = per_sample.train.batches(batch)
    assert torch.equal(x_mem, x_disk) and torch.equal(y_mem, y_disk)


@pytest.mark.parametrize(
    ("manifest", "message", "fix"),
    [
        (
            "file,label\nimages/a.png,cat\n",
            r"train\.csv has no column 'path' \(its columns: file, label\)",
            "path,label",
        ),
        ("path,label\n", r"train\.csv lists no images", "one row per image"),
        ("", r"train\.csv lists no images", "one row per image"),
        ("path,label\nimages/train/cat_0.png,cat\nimages/train/dog_0.png,\n", r"train\.csv: line 3 has no label", ""),
        (
            "path,label\nimages/train/cat_0.png,cat\nimages/train/cat_9x.png,cat\n",
            r"train\.csv lists 1 image file that does not exist: .*images/train/cat_9x\.png",
            "relative to",
        ),
    ],
    ids=["missing-column", "header-only", "empty-file", "blank-label", "missing-file"],
)
def test_csv_bad_manifest_is_one_clear_message(tmp_path, compose_cfg, manifest, message, fix):
    write_manifests(tmp_path)
    (tmp_path / "train.csv").write_text(manifest)
    with pytest.raises(KdclError, match=message) as err:
        load_csv(compose_cfg, tmp_path)
    assert fix in err.value.fix


def test_csv_missing_manifest_names_dataset_root(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    (tmp_path / "test.csv").unlink()
    with pytest.raises(KdclError, match=r"test\.csv not found") as err:
        load_csv(compose_cfg, tmp_path)
    assert "dataset.root" in err.value.fix


@pytest.mark.parametrize("workers", [0, 1])
def test_csv_undecodable_image_is_named_on_load(tmp_path, compose_cfg, workers):
    write_manifests(tmp_path)
    (tmp_path / "images/test/dog_3.png").write_bytes(b"not an image")
    with pytest.raises(KdclError, match=r"^cannot decode image file .*images/test/dog_3\.png") as err:
        load_csv(compose_cfg, tmp_path, f"dataset.num_workers={workers}")  # decoded by DataLoader workers
    assert "Traceback" not in err.value.what and "test.csv" in err.value.fix


def test_imagefolder_in_memory_decodes_every_image_at_load(tmp_path, compose_cfg):
    write_class_folders(tmp_path)
    overrides = ["dataset=imagefolder", f"dataset.root={tmp_path}", f"dataset.image_size={SIZE}"]
    cfg = compose_cfg([*overrides, "dataset.train_view=resize_crop"])["dataset"]
    per_sample = load_data(cfg, CPU, False, 0)
    in_memory = load_data({**cfg, "in_memory": True}, CPU, False, 0)
    assert isinstance(per_sample.test, LoaderSource) and isinstance(in_memory.test, TensorSource)
    ((_, x, y),) = per_sample.test.batches([torch.arange(8)])
    assert torch.equal(in_memory.test.x, x) and torch.equal(in_memory.test.labels, y)
    (tmp_path / "test/dog/dog_1.png").write_bytes(b"not an image")
    load_data(cfg, CPU, False, 0)  # per sample: found only when the test split is read
    with pytest.raises(KdclError, match=r"cannot decode image file .*test/dog/dog_1\.png"):
        load_data({**cfg, "in_memory": True}, CPU, False, 0)
    drawn = compose_cfg(overrides)["dataset"]  # imagefolder's own training view is drawn per sample
    with pytest.raises(KdclError, match="train_view=random_resized_crop(.|\n)*dataset.in_memory=false"):
        load_data({**drawn, "in_memory": True}, CPU, False, 0)


def write_test_labels(root, label) -> None:
    rows = [f"{path},{label(c)}" for path, c, _ in examples("test")]
    (root / "test.csv").write_text("\n".join(["path,label", *rows]) + "\n")


def test_csv_test_class_the_training_split_never_has(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    write_test_labels(tmp_path, lambda c: "bird" if c else "cat")
    with pytest.raises(KdclError, match="the test split has classes the training split never has: bird"):
        load_csv(compose_cfg, tmp_path)


def test_csv_class_index_outside_the_classes(tmp_path, compose_cfg):
    write_manifests(tmp_path, label=str)
    write_test_labels(tmp_path, lambda c: c - 1)
    with pytest.raises(KdclError, match=r"the test split has labels -1 outside 0\.\.1"):
        load_csv(compose_cfg, tmp_path)


def test_csv_carve_too_small_for_a_class(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join([*lines, "images/test/cat_0.png,bird"]) + "\n")
    with pytest.raises(KdclError, match="class 'bird' has 1 training example, and the validation carve"):
        load_csv(compose_cfg, tmp_path, "dataset.val_fraction=0.6")


def test_images_over_the_memory_cap_are_refused_before_decoding(tmp_path, compose_cfg):
    write_manifests(tmp_path)
    (tmp_path / "images/test/dog_3.png").write_bytes(b"not an image")  # never read: refused first
    with pytest.raises(KdclError, match=r"takes 0\.0 GB, over dataset\.max_memory_gb=1e-06") as err:
        load_csv(compose_cfg, tmp_path, "dataset.max_memory_gb=0.000001")
    assert "dataset.in_memory=false" in err.value.fix


# --------------------------------------------------------------------------- hf
@pytest.fixture
def hf():
    return pytest.importorskip("datasets")


def load_hf(compose_cfg, path, *overrides: str):
    cfg = compose_cfg(["dataset=hf", f"dataset.path={path}", f"dataset.image_size={SIZE}", *overrides])
    return load_data(cfg["dataset"], CPU, False, 0)


def save_dataset_dict(hf, folder) -> None:
    """train and test splits with an Image column and a ClassLabel, saved with save_to_disk."""
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=list(CLASSES))})
    splits = {
        split: hf.Dataset.from_dict(
            {"image": [Image.fromarray(image) for _, _, image in examples(split)], "label": expected(split)[1]},
            features=features,
        )
        for split in COUNTS
    }
    hf.DatasetDict(splits).save_to_disk(str(folder))


def test_hf_saved_dataset_dict_loads_with_equal_pixels_and_labels(tmp_path, compose_cfg, hf):
    save_dataset_dict(hf, tmp_path / "saved")
    data = load_hf(compose_cfg, tmp_path / "saved")
    assert data.class_names == list(CLASSES)  # from the ClassLabel
    assert_test_split_is(data, *expected("test"))
    x, y = expected("train")
    assert np.array_equal(data.train.x.numpy(), x[data.train.origin])
    per_sample = load_hf(
        compose_cfg,
        tmp_path / "saved",
        "dataset.in_memory=false",
        "dataset.max_test_samples=4",
        "dataset.num_workers=1",
    )
    assert len(per_sample.test) == 4 and per_sample.train.labels.tolist() == y[per_sample.train.origin].tolist()
    ((_, x_disk, _),) = per_sample.train.batches([torch.tensor([1, 3])])
    assert np.array_equal(x_disk.numpy(), x[per_sample.train.origin[[1, 3]]])


def test_hf_imagefolder_builder_reads_local_files(tmp_path, compose_cfg, hf):
    write_class_folders(tmp_path)
    data = load_hf(compose_cfg, "imagefolder", f"dataset.data_dir={tmp_path}")
    assert data.class_names == list(CLASSES)
    ((_, x, y),) = data.test.batches([torch.arange(8)])
    x_want, y_want = expected("test")
    order = np.lexsort((np.arange(8) // 2, y_want))  # the builder lists files class by class, in name order
    assert np.array_equal(x.numpy(), x_want[order]) and np.array_equal(y.numpy(), y_want[order])


def test_hf_csv_builder_with_paths_and_named_labels(tmp_path, compose_cfg, hf):
    write_manifests(tmp_path, header="file,animal")
    data = load_hf(
        compose_cfg,
        "csv",
        f"dataset.data_dir={tmp_path}",
        "dataset.data_files={train: train.csv, test: test.csv}",
        "dataset.image_column=file",
        "dataset.label_column=animal",
    )
    assert data.class_names == list(CLASSES)
    assert_test_split_is(data, *expected("test"))


@pytest.mark.parametrize(
    ("overrides", "message", "fix"),
    [
        (["dataset.test_split=validation"], r"has no split 'validation' \(its splits: train, test\)", "test_split"),
        (["dataset.label_column=target"], r"has no column 'target' \(its columns: image, label\)", "label_column"),
        (["dataset.image_column=label"], r"column 'label' of .* holds ClassLabel", "image_column"),
    ],
    ids=["split", "column", "not-images"],
)
def test_hf_bad_split_or_column_is_one_clear_message(tmp_path, compose_cfg, hf, overrides, message, fix):
    save_dataset_dict(hf, tmp_path / "saved")
    with pytest.raises(KdclError, match=message) as err:
        load_hf(compose_cfg, tmp_path / "saved", *overrides)
    assert fix in err.value.fix


def test_hf_single_saved_dataset_asks_for_a_dataset_dict(tmp_path, compose_cfg, hf):
    hf.Dataset.from_dict({"label": [0, 1]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(KdclError, match="holds a single Dataset saved with save_to_disk, not a DatasetDict") as err:
        load_hf(compose_cfg, tmp_path / "one")
    assert "DatasetDict(train=..., test=...)" in err.value.fix


def test_hf_undecodable_image_names_its_row(tmp_path, compose_cfg, hf):
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=list(CLASSES))})
    rows = [{"bytes": b"not an image", "path": None}] + [
        Image.fromarray(image) for _, _, image in examples("train")[1:]
    ]
    split = hf.Dataset.from_dict({"image": rows, "label": expected("train")[1]}, features=features)
    hf.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(KdclError, match=r"cannot decode the image of row 0 of split 'train'"):
        load_hf(compose_cfg, tmp_path / "saved")


def test_hf_hub_id_offline_says_how_to_bring_the_data(compose_cfg, hf, monkeypatch):
    monkeypatch.setattr(hf.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdclError, match="the Hugging Face Hub cannot be reached") as err:
        load_hf(compose_cfg, "someone/some-images")
    assert "save_to_disk(DIR)" in err.value.fix and "dataset.path=DIR" in err.value.fix


def test_hf_without_the_datasets_package_names_the_extra(tmp_path, compose_cfg, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(KdclError, match="needs the Hugging Face datasets package") as err:
        load_hf(compose_cfg, tmp_path)
    assert "kdcl[data]" in err.value.fix


# --------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_trains_on_csv_and_hf(cli, tmp_path, hf):
    write_manifests(tmp_path / "csv")
    save_dataset_dict(hf, tmp_path / "saved")
    for option, source in (("csv", f"dataset.root={tmp_path / 'csv'}"), ("hf", f"dataset.path={tmp_path / 'saved'}")):
        run = tmp_path / f"run_{option}"
        result = cli("train", *QUICK, f"dataset={option}", source, f"dataset.image_size={SIZE}", f"hydra.run.dir={run}")
        assert result.returncode == 0, result.stdout + result.stderr
        summary = pd.read_csv(run / "summary.csv").set_index("model")
        assert {"teacher", "distill"} <= set(summary.index)
        assert summary.loc["distill", "test_acc"] >= 0
