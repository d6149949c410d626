"""Datasets, splits and the batch path.

Every dataset loader returns a train and a test :class:`RawSplit`. Data that fits in
memory is held as one uint8 tensor (N, C, H, W) on the training device; a batch is a
tensor of example indices gathered in one indexing op, then augmented and normalised
as a batch on the device (:class:`Preprocess`). Data that does not fit stays a torch
``Dataset`` read through a ``DataLoader`` fed with the same index batches, so
curricula (subsets and orders of indices) work the same on both paths.

The validation split is carved from train (class-stratified, ``dataset.split_seed``);
it drives model selection. The test split is used for the final numbers only.

The modules, by concern: :mod:`.splits` (splits as loaded, stratified subsets),
:mod:`.sources` (the splits the engine iterates), :mod:`.preprocess` (normalisation and
augmentation on the device), :mod:`.checks` (of loaded data, before training),
:mod:`.bundle` (:func:`load_data`), and the loaders, registered in :data:`DATASETS`:
:mod:`.loaders` (the datasets kdcl knows by name, ``.npz`` arrays), :mod:`.images`
(image files: ``imagefolder``), :mod:`.manifest` (``csv``), :mod:`.huggingface` (``hf``) and :mod:`.text` (``text_csv``:
labelled texts, as token ids (:mod:`.tokens`) held in memory as an (N, L) int64 tensor).
"""

# The loader modules register their datasets on import.
from kdcl.data import huggingface, images, manifest, text  # noqa: F401
from kdcl.data.bundle import DataBundle, class_map, load_data, with_classes
from kdcl.data.loaders import DATASETS, register_dataset
from kdcl.data.preprocess import PADDINGS, Augment, FixedViews, Preprocess, StrongViews
from kdcl.data.sources import Batch, LoaderSource, Source, TensorSource
from kdcl.data.splits import RawSplit, interleave_classes, stratified_order, stratified_subset
from kdcl.data.tokens import TextEncoding, TextPreprocess
from kdcl.data.views import fixed_view_keys, step_keys

__all__ = [
    "DATASETS",
    "PADDINGS",
    "Augment",
    "FixedViews",
    "Batch",
    "DataBundle",
    "LoaderSource",
    "Preprocess",
    "RawSplit",
    "Source",
    "StrongViews",
    "TensorSource",
    "TextEncoding",
    "TextPreprocess",
    "class_map",
    "interleave_classes",
    "load_data",
    "register_dataset",
    "stratified_order",
    "fixed_view_keys",
    "step_keys",
    "stratified_subset",
    "with_classes",
]
