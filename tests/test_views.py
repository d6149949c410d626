"""Images read per sample: the training and evaluation views (kdcl.data.views), the decoders,
the persistent DataLoader workers, and exact resume on folder data."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import comparable, compose_config, stop_after
from PIL import Image
from torchvision.transforms import v2

from kdcl.config.checks import validate
from kdcl.data import LoaderSource, load_data
from kdcl.data.images import DECODERS, EncodedImage
from kdcl.data.views import SampleViews, ViewSettings, resized_crop_box, step_keys, view_generator
from kdcl.distill.feeds import FeedInputs, build_feed
from kdcl.distill.teachers import Teachers
from kdcl.errors import KdclError
from kdcl.models import create_model
from kdcl.scenarios.record import run_record
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import engine
from kdcl.train.resume import Interrupted

CPU = torch.device("cpu")
REFERENCE = ViewSettings(image_size=24, train_view="random_resized_crop", eval_crop_ratio=0.875)


def photo(height: int = 60, width: int = 90, seed: int = 0) -> torch.Tensor:
    """A smooth uint8 RGB image (gradients plus a little noise), as a decoder returns one."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    channels = [(xx * 255 / width), (yy * 255 / height), ((xx + yy) * 127 / (width + height))]
    image = np.stack(channels) + rng.normal(0, 8, (3, height, width))
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- the transforms, pinned
def test_crop_boxes_follow_the_inception_rule_and_are_pinned_by_the_seed():
    boxes = [resized_crop_box(60, 90, (0.08, 1.0), (3 / 4, 4 / 3), view_generator(0, key)) for key in range(400)]
    for box in boxes:  # inside the image, a share of the area in the scale range, the ratio in range
        assert box.top >= 0 and box.top + box.height <= 60 and box.left >= 0 and box.left + box.width <= 90
        share, aspect = box.height * box.width / (60 * 90), box.width / box.height
        assert 0.08 * 0.85 <= share <= 1.0 and 3 / 4 * 0.85 <= aspect <= 4 / 3 * 1.15  # rounding to pixels
    shares = [b.height * b.width / 5400 for b in boxes]
    assert 0.35 < np.mean(shares) < 0.6  # uniform in [0.08, 1] where it fits: about half the area
    again = [resized_crop_box(60, 90, (0.08, 1.0), (3 / 4, 4 / 3), view_generator(0, key)) for key in range(400)]
    assert again == boxes  # the seed and the key pin every box
    assert [resized_crop_box(60, 90, (0.08, 1.0), (3 / 4, 4 / 3), view_generator(1, k)) for k in range(400)] != boxes


def test_a_crop_that_never_fits_falls_back_to_the_centre_box_clamped_to_the_ratio():
    """A 10×200 strip at scale 1 fits no box of ratio ≤ 4/3: the centre box of ratio 4/3."""
    box = resized_crop_box(10, 200, (1.0, 1.0), (3 / 4, 4 / 3), view_generator(0, 0))
    assert (box.height, box.width) == (10, round(10 * 4 / 3)) and box.left == (200 - 13) // 2 and box.top == 0


def test_the_evaluation_view_is_the_reference_resize_then_centre_crop():
    image = photo()
    reference = v2.Compose([v2.Resize(round(24 / 0.875), antialias=True), v2.CenterCrop(24)])(image)
    assert torch.equal(SampleViews(REFERENCE).evaluation(image), reference)
    whole = SampleViews(ViewSettings(image_size=24)).evaluation(image)  # ratio 1: resized to 24, centre square
    assert torch.equal(whole, v2.CenterCrop(24)(v2.Resize(24, antialias=True)(image)))


def test_a_training_view_is_its_box_resized_and_maybe_mirrored():
    image, views = photo(), SampleViews(REFERENCE, seed=3)
    for key in range(6):
        generator = view_generator(3, key)  # the draws the view makes, in its order
        box = resized_crop_box(60, 90, REFERENCE.crop_scale, REFERENCE.crop_ratio, generator)
        mirrored = torch.rand(1, generator=generator).item() < 0.5
        expected = v2.functional.resized_crop(image, box.top, box.left, box.height, box.width, [24, 24], antialias=True)
        assert torch.equal(views.training(image, key), expected.flip(-1) if mirrored else expected)
    assert not torch.equal(views.training(image, 0), views.training(image, 1))


def test_random_erasing_fills_a_box_with_the_mean_colour():
    settings = ViewSettings(image_size=24, train_view="random_resized_crop", random_erasing=1.0)
    views = SampleViews(settings, seed=0, fill=[1, 2, 3])
    erased = views.training(photo(), 0)
    filled = (erased == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all(0)
    assert 0.02 * 576 * 0.7 <= filled.sum() <= 0.33 * 576 * 1.3  # one box of 2-33 % of the area


def test_automatic_augmentation_is_drawn_from_the_key():
    settings = ViewSettings(image_size=24, train_view="random_resized_crop", auto_augment="trivial_augment_wide")
    views = SampleViews(settings, seed=0)
    assert torch.equal(views.training(photo(), 5), views.training(photo(), 5))
    plain = SampleViews(ViewSettings(image_size=24, train_view="random_resized_crop"), seed=0)
    assert any(not torch.equal(views.training(photo(), k), plain.training(photo(), k)) for k in range(8))


def test_step_keys_are_distinct_across_steps():
    keys = torch.cat([step_keys(step, 64) for step in range(50)])
    assert len(keys.unique()) == len(keys)


def test_the_decoders_agree_and_a_damaged_file_is_one_message(tmp_path):
    rgb = photo(20, 30).permute(1, 2, 0).numpy()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.bmp")  # a format torchvision.io does not decode: PIL does
    for name in ("a.png", "a.bmp"):
        encoded = EncodedImage((tmp_path / name).read_bytes(), name, "fix it")
        assert torch.equal(DECODERS.get("torchvision")(encoded), torch.from_numpy(rgb).permute(2, 0, 1))
        assert torch.equal(DECODERS.get("pil")(encoded), torch.from_numpy(rgb).permute(2, 0, 1))
    with pytest.raises(KdclError, match="cannot decode broken.jpg"):
        DECODERS.get("torchvision")(EncodedImage(b"\xff\xd8 not really", "broken.jpg", "fix it"))


# --------------------------------------------------------------------------- on a folder of JPEGs
def jpeg_folder(root, classes: int = 3, per_class: dict | None = None):
    """root/{train,test}/<class>/<i>.jpg: smooth images of 40×52 px, each class its own tint."""
    for split, count in (per_class or {"train": 16, "test": 6}).items():
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = photo(40, 52, seed=100 * c + i).numpy().copy()
                image[c] = np.clip(image[c].astype(int) + 25, 0, 255)
                Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i}.jpg", quality=90)
    return root


def folder_cfg(root, *overrides: str) -> dict:
    return compose_config(
        [
            "dataset=imagefolder",
            f"dataset.root={root}",
            "dataset.image_size=16",
            "dataset.val_fraction=0.25",
            "trainer.batch_size=8",
            "teacher=cnn_small",
            "student=mlp_small",
            *overrides,
        ]
    )


def test_workers_persist_across_passes_and_training_batches_are_views(tmp_path):
    cfg = folder_cfg(jpeg_folder(tmp_path), "dataset.num_workers=2")
    data = load_data(cfg["dataset"], CPU, False, 0)
    train = data.train
    assert isinstance(train, LoaderSource) and data.preprocess.augments
    idx = [torch.arange(8), torch.arange(8, 16)]
    first = [x for _, x, _ in train.batches(idx, [step_keys(0, 8), step_keys(1, 8)])]
    workers = [w.pid for w in train.loader._iterator._workers]
    again = [x for _, x, _ in train.batches(idx, [step_keys(0, 8), step_keys(1, 8)])]
    assert [w.pid for w in train.loader._iterator._workers] == workers  # the same processes
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same keys, the same pixels
    evaluated = [x for _, x, _ in train.batches(idx)]  # no keys: the evaluation view
    assert not torch.equal(evaluated[0], first[0])
    assert torch.equal(evaluated[0][0], train.dataset[int(train.origin[0])][0])


def test_resume_mid_epoch_on_folder_data_gives_the_identical_table(tmp_path, monkeypatch):
    cfg = folder_cfg(jpeg_folder(tmp_path / "data"), "trainer.epochs=2", "baseline=false", "curriculum=none")
    reference = tmp_path / "reference"
    run_pipeline(cfg, reference)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", stop_after("distill", 7))  # 5 steps an epoch: mid-way through epoch 2
        with pytest.raises(Interrupted):
            run_pipeline(cfg, run_dir)
    run_pipeline(cfg, run_dir)
    for table in ("summary.csv", "distill/metrics.csv", "teacher/metrics.csv"):
        pd.testing.assert_frame_equal(comparable(reference, table), comparable(run_dir, table))
    steps = pd.read_csv(reference / "distill" / "metrics.csv")["step"].tolist()
    assert steps == [5, 10] and math.isfinite(pd.read_csv(reference / "summary.csv")["test_acc"].iloc[0])


def test_views_drawn_per_sample_are_refused_where_they_cannot_work(tmp_path):
    root = jpeg_folder(tmp_path)
    with pytest.raises(KdclError, match="crop_padding or dataset.flip would crop or flip it again"):
        load_data(folder_cfg(root, "dataset.flip=true")["dataset"], CPU, False, 0)
    cfg = folder_cfg(root, "distill.teacher_cache=no_aug", "trainer.epochs=1")
    with pytest.raises(KdclError, match="no_aug"):
        run_pipeline(cfg, tmp_path / "run")


@pytest.mark.parametrize("topk", [None, 3], ids=["all-logits", "top-K"])
def test_stored_soft_labels_of_folder_data_are_the_teachers_on_the_same_crops(tmp_path, topk):
    """FKD's setting: K fixed crops per image, the teacher's logits of each stored (on disk,
    top-K); every step the student sees exactly the crop whose logits it is given, so the
    stored logits equal the teacher's on the pixels the student trains on (K = C exactly)."""
    root = jpeg_folder(tmp_path / "data")
    cfg = folder_cfg(root, "dataset.num_workers=0")
    data = load_data(cfg["dataset"], CPU, False, 0)
    torch.manual_seed(0)
    teacher = create_model("cnn", 3, (3, 16, 16), width=8).eval()
    inputs = FeedInputs(
        preprocess=data.preprocess,
        train=data.train,
        teacher_at=lambda step: Teachers([teacher]),
        autocast=nullcontext,
        num_classes=3,
        batch_size=8,
        seed=0,
        views=2,
        store="disk",
        directory=tmp_path / "cache",
        shard_mb=1.0,
        topk=topk,
    )
    feed = build_feed("views:2", inputs)
    idx = torch.arange(8)
    for epoch in (1, 2):  # two epochs: every example's other view
        keys = feed.view_keys(0, epoch, idx)
        ((_, x, y),) = data.train.batches([idx], [keys])
        shown, stored = feed(0, epoch, idx, x, y)
        with torch.inference_mode():
            online = teacher(shown)
        assert torch.allclose(stored, online, atol=0.02, rtol=0.01)  # fp16 storage
    assert not torch.equal(feed.view_keys(0, 1, idx), feed.view_keys(0, 2, idx))
    run = folder_cfg(root, "distill.teacher_cache=views:2", f"distill.teacher_cache_topk={topk or 'null'}")
    summary = run_pipeline({**run, "trainer": {**run["trainer"], "epochs": 1}}, tmp_path / "run")
    assert set(summary["model"]) == {"teacher", "baseline", "distill"}


def test_stored_soft_labels_are_kept_in_the_stage_cache_resumed_and_checked(tmp_path):
    """On disk with the stage cache on, the run's teacher's stored views go to a keyed folder
    of the cache: a later job finds every shard filled and runs no teacher pass; a fill cut
    off half-way fills only its unfilled shards; a damaged shard is one message naming the folder."""
    root = jpeg_folder(tmp_path / "data")
    keys = [
        "distill.teacher_cache=views:2",
        "distill.teacher_cache_store=disk",
        "distill.teacher_cache_shard_mb=0.0001",  # a few examples a shard
        "cache=true",
        f"cache_dir={tmp_path / 'cache'}",
        "trainer.epochs=1",
        "baseline=false",
    ]
    cfg = folder_cfg(root, *keys)
    first = run_pipeline(cfg, tmp_path / "first").set_index("model")
    (store,) = (tmp_path / "cache").glob("soft_labels-*")
    markers = sorted(store.glob("shard_*.filled"))
    assert len(markers) > 2 and len(markers) == len(list(store.glob("shard_*_logits.npy")))
    stamps = {p: p.stat().st_mtime_ns for p in store.glob("shard_*.npy")}
    markers[1].unlink()  # as if the fill had stopped before shard 1 was marked
    second = run_pipeline(cfg, tmp_path / "second").set_index("model")
    refilled = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert refilled == set(store.glob("shard_0001_*.npy"))  # the other shards were read, not recomputed
    assert second.loc["distill", "test_acc"] == first.loc["distill", "test_acc"]
    np.save(store / "shard_0000_logits.npy", np.zeros(3, dtype=np.float16))  # damaged
    with pytest.raises(KdclError, match=f"the teacher cache in {store} cannot be used(.|\\n)*delete {store}"):
        run_pipeline(cfg, tmp_path / "third")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.teacher_cache=none"], "no distillation of this config keeps one"),
        (
            ["distill.teacher_cache=views:2", "distill.teacher_cache_store=memory", "cache=true"],
            "teacher_cache_store=memory",
        ),
        (["distill.teacher_cache=views:2", "distill.teacher_cache_store=disk", "cache=false"], "cache=False"),
        (
            ["distill.teacher_cache=views:2", "distill.teacher_cache_store=disk", "cache=true", "teachers=[cnn,mlp]"],
            "teachers list",
        ),
    ],
)
def test_a_record_pass_that_no_later_job_could_read_is_refused(tmp_path, overrides, message):
    cfg = compose_config(["scenario=record", *overrides])
    validate(cfg)
    with pytest.raises(KdclError, match=message) as err:
        run_record(cfg, tmp_path)
    assert (
        "distill.teacher_cache=views:K distill.teacher_cache_store=disk cache=true" in err.value.fix
        or "teachers" in message
    )
    assert not any(tmp_path.iterdir())  # refused before anything ran
