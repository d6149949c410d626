"""What a stage gets of the data (:class:`DataBundle`): :func:`load_data` loads a dataset,
checks it, carves the validation split and builds the sources."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcl.data.checks import check_carve, check_labels, check_shapes, image_shape
from kdcl.data.images import DecodedImages
from kdcl.data.loaders import DATASETS
from kdcl.data.preprocess import Preprocess, check_padding
from kdcl.data.sources import Source, make_source, worker_count
from kdcl.data.splits import RawSplit, stratified_order, stratified_subset
from kdcl.data.tokens import TextEncoding, TextPreprocess
from kdcl.errors import KdclError


@dataclass
class DataBundle:
    """Everything a stage needs to know about the data."""

    name: str
    train: Source
    val: Source
    test: Source
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]  # images: (C, H, W); text: (max_length,)
    mean: list[float]  # images: per-channel normalisation; text: empty
    std: list[float]
    preprocess: Preprocess | TextPreprocess
    class_ids: list[int] | None = None  # the dataset's class of each label (None: label = class)
    text: TextEncoding | None = None  # text data: its tokenizer (None: images)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keywords every model of this data is built with: text models take the
        vocabulary's size and the pad id; image models nothing."""
        return {} if self.text is None else {"vocab_size": self.text.vocab_size, "pad_id": self.text.pad_id}


def class_map(classes: Sequence[int], num_classes: int) -> Tensor:
    """label → its position in ``classes``, −1 for a label not in it."""
    mapping = torch.full((num_classes,), -1, dtype=torch.long)
    mapping[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return mapping


def with_classes(data: DataBundle, classes: Sequence[int], train: np.ndarray | None = None) -> DataBundle:
    """``data`` restricted to the labels ``classes``, relabelled by position in ``classes``
    (``classes[k]`` becomes label k), so that a model with ``len(classes)`` outputs trains
    and tests on them (class-incremental tasks, and ``kdcl eval`` of such a model).

    Test keeps every example of ``classes``. ``train`` (positions in ``data.train``) keeps
    those training examples instead of all of ``classes``', and validation then keeps the
    classes they are of.
    """
    mapping = class_map(classes, data.num_classes)
    if train is None:
        train = np.flatnonzero((mapping[data.train.labels] >= 0).numpy())

    def keep(source: Source, labels: Sequence[int] | np.ndarray) -> Source:
        return source.subset(np.flatnonzero(np.isin(source.labels.numpy(), labels)), mapping)

    ids = data.class_ids or list(range(data.num_classes))
    trained = np.unique(data.train.labels.numpy()[train])
    return replace(
        data,
        train=data.train.subset(train, mapping),
        val=keep(data.val, trained),
        test=keep(data.test, classes),
        num_classes=len(classes),
        class_names=[data.class_names[c] for c in classes],
        class_ids=[ids[c] for c in classes],
    )


def load_data(cfg: dict[str, Any], device: torch.device, channels_last: bool, seed: int) -> DataBundle:
    """Load ``cfg["name"]``, carve the validation split and build the sources (images or
    token ids: :func:`image_inputs`, :func:`text_inputs`)."""
    loader = DATASETS.get(cfg["name"])
    train, test, class_names = loader(cfg)
    check_labels(cfg["name"], train.y, test.y, class_names)
    input_shape = image_shape(train)
    check_shapes(cfg["name"], input_shape, image_shape(test))
    split_seed = cfg["split_seed"]
    pool = stratified_subset(train.y, cfg["max_train_samples"], split_seed)
    order = stratified_order(train.y[pool], split_seed)
    n_val = int(round(len(pool) * cfg["val_fraction"]))
    val_idx, train_idx = np.sort(pool[order[:n_val]]), np.sort(pool[order[n_val:]])
    test_idx = stratified_subset(test.y, cfg["max_test_samples"], split_seed)
    for split_name, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx)):
        if len(idx) == 0:
            raise KdclError(
                f"the {split_name} split of dataset {cfg['name']!r} is empty",
                fix="raise dataset.max_train_samples / dataset.max_test_samples or lower dataset.val_fraction",
            )
    check_carve(cfg, train.y, pool, train_idx, class_names)
    num_workers = worker_count(cfg["num_workers"])
    inputs = image_inputs if train.text is None else text_inputs
    mean, std, preprocess = inputs(cfg, train, train_idx, input_shape, device, channels_last, seed)
    return DataBundle(
        name=cfg["name"],
        train=make_source(train, train_idx, device, num_workers),
        val=make_source(train, val_idx, device, num_workers),
        test=make_source(test, test_idx, device, num_workers),
        num_classes=len(class_names),
        class_names=list(class_names),
        input_shape=input_shape,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        preprocess=preprocess,
        text=train.text,
    )


def image_inputs(
    cfg: dict[str, Any],
    train: RawSplit,
    train_idx: np.ndarray,
    input_shape: tuple[int, ...],
    device: torch.device,
    channels_last: bool,
    seed: int,
) -> tuple[list[float], list[float], Preprocess]:
    """Images: the normalisation (``dataset.mean``/``std``, or measured on the training
    split) and the batch step that normalises and augments; images read per sample get
    their training views seeded by the run (:mod:`kdcl.data.views`)."""
    mean, std = cfg["mean"], cfg["std"]
    if mean is None or std is None:
        mean, std = channel_stats(train, train_idx)
    padding_mode = cfg["crop_padding_mode"]
    check_padding(padding_mode, cfg["crop_padding"], input_shape)
    drawn = False
    if isinstance(train.dataset, DecodedImages):  # its training views, for this run's seed and mean colour
        train.dataset.views = train.dataset.views.with_seed(seed, [round(255 * m) for m in mean])
        drawn = train.dataset.views.settings.augments
    preprocess = Preprocess(
        mean, std, cfg["crop_padding"], cfg["flip"], device, channels_last, seed, padding_mode, augmented_views=drawn
    )
    return mean, std, preprocess


def text_inputs(
    cfg: dict[str, Any],
    train: RawSplit,
    train_idx: np.ndarray,
    input_shape: tuple[int, ...],
    device: torch.device,
    channels_last: bool,
    seed: int,
) -> tuple[list[float], list[float], TextPreprocess]:
    """Token ids: no normalisation; the batch step cuts padding and masks tokens
    (``dataset.token_mask``). The image augmentations are refused."""
    image_only = {key: cfg[key] for key in ("crop_padding", "flip") if cfg[key]}
    if image_only:
        raise KdclError(
            f"dataset {cfg['name']!r} is text, but {', '.join(f'dataset.{k}={v}' for k, v in image_only.items())} "
            "augments images",
            fix="set dataset.crop_padding=0 dataset.flip=false",
        )
    assert train.text is not None  # the split of a text dataset
    token_mask = cfg.get("token_mask", 0.0)
    mask_id, special_ids = train.text.mask_and_special_ids() if token_mask else (None, ())
    return [], [], TextPreprocess(train.text.pad_id, device, seed, token_mask, mask_id, special_ids)


def channel_stats(split: RawSplit, indices: np.ndarray, limit: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale, from up to ``limit`` training images."""
    idx = indices[:limit]
    if split.x is not None:
        x = split.x[idx]
    else:
        assert split.dataset is not None  # a split without x is read per sample
        x = np.stack([split.dataset[int(i)][0].numpy() for i in idx])
    x = x.astype(np.float64) / 255
    std = x.std(axis=(0, 2, 3))
    return x.mean(axis=(0, 2, 3)).tolist(), np.where(std > 0, std, 1.0).tolist()
