"""Teacher and student networks.

A model spec names a network by ``name`` (a kdcl model, ``torchvision:NAME``,
``timm:NAME``, ``hf:PATH_OR_ID``) or ``_target_`` (a callable of your own);
:func:`build_model` builds it for the data (:mod:`kdcl.models.sources`). Every network maps
``(B, C, H, W)`` images, or (B, L) token ids for text, to ``(B, num_classes)`` logits.

- :mod:`kdcl.models.registered`: kdcl's own models, the :data:`MODELS` registry;
- :mod:`kdcl.models.cifar_nets`: the CIFAR networks of the distillation benchmarks (WRN, VGG, ShuffleNet, MobileNetV2);
- :mod:`kdcl.models.text_nets`: text models over token ids (``bert``, ``bilstm``, ``text_cnn``, ``bow``);
- :mod:`kdcl.models.torchvision_nets`: torchvision's networks adapted to the data (CIFAR stem);
- :mod:`kdcl.models.sources`: the model sources, the :data:`SOURCES` registry;
- :mod:`kdcl.models.operations`: what works on any model (counts, freezing, the output layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from kdcl.models import text_nets  # noqa: F401  (registers the text models)
from kdcl.models.operations import (
    check_forward,
    classifier,
    copy_teacher_layers,
    count_macs,
    count_params,
    fold_batchnorm,
    freeze,
    grow_head,
    size_mb,
    to_device,
)
from kdcl.models.registered import MODELS, register_model
from kdcl.models.sources import (
    SOURCES,
    TARGET,
    ModelRef,
    build_model,
    load_hf_directory,
    model_ref,
    model_revision,
    optional_import,
    register_source,
    saved_spec,
)

__all__ = [
    "MODELS",
    "SOURCES",
    "TARGET",
    "ModelRef",
    "build_model",
    "check_forward",
    "classifier",
    "copy_teacher_layers",
    "count_macs",
    "count_params",
    "create_model",
    "fold_batchnorm",
    "freeze",
    "grow_head",
    "load_hf_directory",
    "model_ref",
    "model_revision",
    "optional_import",
    "register_model",
    "register_source",
    "saved_spec",
    "size_mb",
    "to_device",
]


def create_model(
    name: str, num_classes: int, input_shape: Sequence[int], pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """The model named ``name`` (any source's name: ``resnet20``, ``timm:resnet18``, ...) with
    ``kwargs``, for ``input_shape`` = (C, H, W) images: :func:`build_model` of that spec."""
    return build_model({"name": name, "kwargs": kwargs}, num_classes, tuple(input_shape), pretrained)
