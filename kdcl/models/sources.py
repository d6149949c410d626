"""Model sources: where the network of a model spec comes from.

A model spec (the ``teacher`` and ``student`` sections, an entry of ``teachers`` or
``assistants``, a checkpoint's ``model``) names its network by ``name``, whose prefix
chooses the source, or by ``_target_``:

- ``resnet20`` (no prefix): a kdcl model (:data:`kdcl.models.registered.MODELS`);
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, ...)``, with kdcl's CIFAR stem
  where the family has one;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=..., num_classes=C, in_chans=...)``;
- ``hf:PATH_OR_ID``: ``transformers.AutoModelForImageClassification`` (images) or
  ``AutoModelForSequenceClassification`` (token ids) from a local directory or a hub id,
  wrapped so that ``forward(x)`` returns the logits tensor;
- ``packaged:NAME``: a Hugging Face model directory that ships in a Python package
  (:mod:`kdcl.packaged`), extracted once and read as ``hf:`` reads a directory;
- ``_target_: pkg.module.fn``: your own callable, given ``num_classes``, ``input_shape``
  and the spec's ``kwargs``, returning an ``nn.Module``.

Each source is an entry of :data:`SOURCES`, called as ``fn(ref, num_classes=...,
input_shape=(C, H, W), pretrained=..., **kwargs)``. timm and transformers are optional
(the ``models`` extra); a source that needs a missing one says so.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from kdcl.errors import KdclError
from kdcl.models.operations import KWARGS_FIX, call_with_kwargs
from kdcl.models.registered import MODELS, create_registered
from kdcl.models.torchvision_nets import InputShape, torchvision_network
from kdcl.packaged import PACKAGED_MODELS, packaged_dir
from kdcl.registry import Registry
from kdcl.trust import REMOTE_CODE_KEY, TARGET_KEY, remote_code_refused

# check: a test of the source's name, run before anything is built; remote_code: whether the
# source can run Python its model's files ship (it then takes ``trust_remote_code``).
SOURCES: Registry[Callable[..., nn.Module]] = Registry("model source", traits={"check": None, "remote_code": False})
register_source = SOURCES.register

BUILTIN = "kdcl"  # the source of a name without a prefix
TARGET = TARGET_KEY  # the spec key, and the source, of a callable of your own
MODELS_EXTRA = 'pip install "kdcl[models]" (timm, transformers, safetensors)'
NAME_FORMS = (
    "a kdcl model (resnet20, ...), torchvision:NAME, timm:NAME, hf:PATH_OR_ID, packaged:NAME, or _target_=pkg.module.fn"
)
OFFLINE_FIX = (
    "download them once where there is internet (they are cached: ~/.cache/huggingface, "
    "~/.cache/torch), or give local weights instead: teacher.checkpoint=PATH (a state_dict, "
    ".safetensors, TorchScript file or Hugging Face model directory) or name=hf:LOCAL_DIR; "
    "or set pretrained=false"
)


@dataclass(frozen=True)
class ModelRef:
    """Which source builds a spec's network, and what the source calls it."""

    source: str
    ref: str

    @property
    def label(self) -> str:
        """The model as the summary's ``arch`` column and the messages show it."""
        return self.ref if self.source in (BUILTIN, TARGET) else f"{self.source}:{self.ref}"


def model_revision(spec: Mapping[str, Any]) -> int:
    """The revision of a kdcl model's architecture (its registry trait ``revision``, raised
    when the network changes under its name); 0 for a model of any other source."""
    ref = model_ref(spec)
    return MODELS.trait(ref.ref, "revision") if ref.source == BUILTIN else 0


def model_ref(spec: Mapping[str, Any]) -> ModelRef:
    """The source and reference of a model spec: its ``_target_`` when set, else its
    ``name`` (``timm:resnet18`` → timm, resnet18; ``resnet20`` → kdcl, resnet20). An unknown
    prefix or kdcl model is one :class:`KdclError`, found without building anything."""
    if spec.get(TARGET):
        return ModelRef(TARGET, spec[TARGET])
    if not spec.get("name"):
        raise KdclError(
            "a model spec names no model: it has neither a name nor a _target_",
            fix=f"name it as {NAME_FORMS}, e.g. student=custom student.name=timm:resnet18",
        )
    prefix, colon, rest = spec["name"].partition(":")
    found = ModelRef(prefix, rest) if colon else ModelRef(BUILTIN, spec["name"])
    if found.source not in SOURCES or found.source == TARGET:  # a callable is given as _target_, not as a name
        raise KdclError(
            f"model {spec['name']!r}: unknown model source {found.source!r}",
            fix=f"name a model as {NAME_FORMS}",
        )
    check = SOURCES.trait(found.source, "check")
    if check is not None:
        check(found.ref)
    return found


def build_model(
    spec: Mapping[str, Any],
    num_classes: int,
    input_shape: tuple[int, ...],
    pretrained: bool = False,
    data_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The network of model ``spec`` (``name`` or ``_target_``, and ``kwargs``) for
    ``input_shape`` = (C, H, W) images or (L,) token ids and ``num_classes`` outputs, with
    its source's pretrained weights when ``pretrained``. ``data_kwargs``: keywords the data
    gives every model (text: ``vocab_size``, ``pad_id``; the spec's own kwargs win). Every
    bad name, keyword, missing package or failed download is one :class:`KdclError`."""
    ref = model_ref(spec)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (1, 3):
        raise KdclError(f"input_shape must be (channels, height, width) or (length,), got {tuple(input_shape)}")
    own, given = dict(spec.get("kwargs") or {}), dict(data_kwargs or {})
    if REMOTE_CODE_KEY in own:
        raise KdclError(
            f"model {ref.label}: trust_remote_code is in its kwargs, and kdcl takes that permission only from "
            "the model spec of your own command, never from kwargs (a checkpoint's kwargs are a file's word)",
            fix="remove it from the kwargs; if you trust the model's code, set teacher.trust_remote_code=true "
            "(or student.trust_remote_code=true)",
        )
    if SOURCES.trait(ref.source, "remote_code"):
        given[REMOTE_CODE_KEY] = spec.get(REMOTE_CODE_KEY) is True
    elif spec.get(REMOTE_CODE_KEY):
        raise KdclError(
            f"model {ref.label}: trust_remote_code=true, but its source runs no code of a model's files",
            fix="set trust_remote_code=false (it applies to hf: models)",
        )
    if "vocab_size" in given and own.get("vocab_size", given["vocab_size"]) != given["vocab_size"]:
        raise KdclError(
            f"model {ref.label} embeds a vocabulary of {own['vocab_size']} tokens, but the data's "
            f"tokenizer has {given['vocab_size']}",
            fix="drop the model's kwargs.vocab_size (the tokenizer sets it), or give the data the "
            "tokenizer the model was trained with (dataset.tokenizer=DIR, or the same dataset.vocab_size)",
        )
    return SOURCES.get(ref.source)(ref.ref, num_classes, shape, pretrained, **{**given, **own})


def saved_spec(spec: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records of the model ``spec`` built: its source, name (the
    ``_target_`` path for a callable), kwargs and ``_target_``, enough to rebuild it without
    the run. A model that needs more than its spec to be rebuilt without its source's files
    (an HF model: its config) says so in ``rebuild_kwargs``, added to the kwargs."""
    ref = model_ref(spec)
    saved = {
        "source": ref.source,
        "name": ref.label,
        "kwargs": {**dict(spec.get("kwargs") or {}), **getattr(model, "rebuild_kwargs", {})},
    }
    return {**saved, TARGET: ref.ref} if ref.source == TARGET else saved


def optional_import(module: str, user: str, extra: str = MODELS_EXTRA) -> ModuleType:
    """``import module`` for ``user`` (``model timm:resnet18``); missing, it is one
    :class:`KdclError` naming its package and the ``extra`` that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]
        raise KdclError(f"{user} needs the package {package}, which is not installed", fix=extra) from None


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HUB_TIMEOUT_S = 3.0


@functools.cache
def hub_unreachable() -> bool:
    """Whether this machine has no route to the Hugging Face Hub: its host does not resolve,
    or does not answer within :data:`HUB_TIMEOUT_S`. Asked once a process, and never behind a
    proxy (the Hub may answer through it where a direct connection fails)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return True
    return False


def hub_offline_when_unreachable() -> None:
    """Without a route to the Hub, put huggingface_hub (and so transformers and timm) in its
    offline mode: files in the local cache still load, and a missing one fails at once rather
    than after the client's retries (about 40 s)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # the source that needs it says so
        return
    if not constants.HF_HUB_OFFLINE and hub_unreachable():
        logging.getLogger("kdcl").info(
            "%s is unreachable: Hugging Face files come from the local cache only", constants.ENDPOINT
        )
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def hub_files(label: str, what: str) -> Iterator[None]:
    """Turn a failure to download or find ``what`` of model ``label`` (offline, an unknown
    id, a missing file) into one :class:`KdclError`; offline, a file to fetch from the Hub
    fails at once (:func:`hub_offline_when_unreachable`; a local directory needs no Hub)."""
    if not Path(label.partition(":")[2]).expanduser().is_dir():
        hub_offline_when_unreachable()
    try:
        yield
    except OSError as e:  # requests' and huggingface_hub's errors are OSErrors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KdclError(
            f"{what} of model {label} could not be downloaded or found locally ({type(e).__name__}: {reason})",
            fix=OFFLINE_FIX,
        ) from None


# --------------------------------------------------------------------------- the sources
def _known_model(name: str) -> None:
    if name not in MODELS:
        raise KdclError(
            f"unknown model {name!r}",
            fix=f"choose one of: {', '.join(MODELS)}; or a model of another source: {NAME_FORMS}",
        )


@register_source(BUILTIN, check=_known_model)
def kdcl_model(ref: str, num_classes: int, input_shape: InputShape, pretrained: bool, **kwargs: Any) -> nn.Module:
    """A registered kdcl model."""
    return create_registered(ref, num_classes, input_shape, pretrained, **kwargs)


@register_source("torchvision")
def torchvision_model(
    ref: str, num_classes: int, input_shape: InputShape, pretrained: bool, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(ref, ...)`` (:func:`torchvision_network`)."""
    return torchvision_network(ref, num_classes, input_shape, pretrained, **kwargs)


@register_source("timm")
def timm_model(ref: str, num_classes: int, input_shape: InputShape, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(ref, pretrained=..., num_classes=C, in_chans=channels, **kwargs)``;
    its pretrained weights come from the Hugging Face hub."""
    timm = optional_import("timm", f"model timm:{ref}")
    if not timm.is_model(ref):
        close = difflib.get_close_matches(ref.split(".")[0], timm.list_models(), n=5)
        raise KdclError(
            f"timm has no model {ref!r}",
            fix=(f"did you mean timm:{close[0]}? (also close: {', '.join(close[1:])}); " if close else "")
            + "choose a name of timm.list_models()",
        )
    with hub_files(f"timm:{ref}", "the pretrained weights"):
        return call_with_kwargs(
            f"timm:{ref}",
            timm.create_model,
            ref,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=input_shape[0],
            **kwargs,
        )


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The config of a ``transformers`` model, as plain JSON values."""
    config: Any = model.config
    return json.loads(config.to_json_string())


class HFImageClassifier(nn.Module):
    """A ``transformers`` image classifier as a kdcl model: ``forward(x)`` returns the logits
    tensor. Its modules are the HF model's under ``model.`` (``model.resnet.encoder.stages.1``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def rebuild_kwargs(self) -> dict[str, Any]:
        """The HF config, as plain JSON values: a checkpoint rebuilds the network from it,
        without the directory or the hub."""
        return {"config": hf_config(self.model)}

    def forward(self, x):
        return self.model(pixel_values=x).logits


class HFTextClassifier(nn.Module):
    """A ``transformers`` sequence classifier as a kdcl text model: ``forward(ids)`` takes
    (B, L) token ids right-padded with ``pad_id`` and returns the logits tensor; the
    attention mask is ``ids != pad_id``. Its modules are the HF model's under ``model.``
    (``model.bert.encoder.layer.1``)."""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    @property
    def rebuild_kwargs(self) -> dict[str, Any]:
        """The HF config and the pad id: a checkpoint rebuilds the network from them."""
        return {"config": hf_config(self.model), "pad_id": self.pad_id}

    def forward(self, ids):
        ids = ids.long()
        return self.model(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits


def check_fits_tokens(config: Any, label: str, vocab_size: int | None, max_length: int, pretrained: bool) -> None:
    """A pretrained text model reads the ids of its own tokenizer: refuse a tokenizer with
    more ids than the model embeds, and any model whose positions are fewer than the data's
    ``max_length``, before training."""
    positions = getattr(config, "max_position_embeddings", max_length)
    if max_length > positions:
        raise KdclError(
            f"model {label} reads at most {positions} tokens, but dataset.max_length={max_length}",
            fix=f"set dataset.max_length={positions} or lower",
        )
    if pretrained and vocab_size is not None and vocab_size > config.vocab_size:
        raise KdclError(
            f"model {label} embeds {config.vocab_size} token ids, but the data's tokenizer has {vocab_size}",
            fix=f"use the model's own tokenizer: dataset.tokenizer={label.removeprefix('hf:')} (its directory)",
        )


def from_saved_config(transformers: ModuleType, auto: Any, config: dict[str, Any]) -> nn.Module:
    """A model of ``auto``'s task with fresh weights for the HF ``config`` a checkpoint saved
    (``rebuild_kwargs``): the architecture without the directory or the hub. Only a model
    type transformers itself defines is rebuilt: the config's ``auto_map`` is not followed."""
    saved = dict(config)
    model_type = saved.pop("model_type", None)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **saved)
    except ValueError:
        raise KdclError(
            f"a checkpoint's Hugging Face config has model_type {model_type!r}, which transformers does not define",
            fix="use a checkpoint of a model transformers defines (its code is not taken from a file)",
        ) from None
    with remote_code_refused(f"the saved model {model_type!r}"):
        return auto.from_config(hf_config, trust_remote_code=False)


def hf_text_model(
    transformers: ModuleType,
    ref: str,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool,
    config: dict[str, Any] | None,
    trust_remote_code: bool,
    vocab_size: int | None = None,
    pad_id: int = 0,
    **kwargs: Any,
) -> HFTextClassifier:
    """``AutoModelForSequenceClassification`` of ``ref`` for token ids: pretrained, with its
    own vocabulary (use its tokenizer: ``dataset.tokenizer``); else fresh weights for
    ``ref``'s config with the data's vocabulary and pad id."""
    auto = transformers.AutoModelForSequenceClassification
    if config is not None:
        return HFTextClassifier(from_saved_config(transformers, auto, config), pad_id)
    remote = {"trust_remote_code": trust_remote_code}
    with hub_files(f"hf:{ref}", "the config"), remote_code_refused(f"hf:{ref}"):
        hf_config = transformers.AutoConfig.from_pretrained(ref, num_labels=num_classes, **remote, **kwargs)
    check_fits_tokens(hf_config, f"hf:{ref}", vocab_size, input_shape[0], pretrained)
    with remote_code_refused(f"hf:{ref}"):
        if not pretrained:
            hf_config.vocab_size, hf_config.pad_token_id = vocab_size or hf_config.vocab_size, pad_id
            return HFTextClassifier(auto.from_config(hf_config, **remote), pad_id)
        with hub_files(f"hf:{ref}", "the weights"):
            model = auto.from_pretrained(ref, config=hf_config, ignore_mismatched_sizes=True, **remote)
    return HFTextClassifier(model, pad_id)


@register_source("hf", remote_code=True)
def hf_model(
    ref: str,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool,
    config: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``AutoModelForImageClassification`` of the local directory or hub id ``ref``: with
    ``pretrained`` ``from_pretrained(ref, num_labels=C, ignore_mismatched_sizes=True)`` (the
    weights, a new head where the classes differ), else fresh weights for ``ref``'s config.
    ``config`` (what a checkpoint saves) rebuilds the architecture without ``ref``'s files.
    Other ``kwargs`` go to the config (``hidden_sizes``, ``depths``, ...). For token ids
    ((L,) inputs) the model is a sequence classifier (:func:`hf_text_model`).
    ``trust_remote_code`` is passed to every load: the repository's own Python runs only when
    the model spec allows it (:mod:`kdcl.trust`)."""
    transformers = optional_import("transformers", f"model hf:{ref}")
    # Its load report and progress bars list, among others, the new head's weights as not in the
    # checkpoint, which is what kdcl asks for; errors still show.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if len(input_shape) == 1:
        return hf_text_model(
            transformers, ref, num_classes, input_shape, pretrained, config, trust_remote_code, **kwargs
        )
    auto = transformers.AutoModelForImageClassification
    if config is not None:
        return HFImageClassifier(from_saved_config(transformers, auto, config))
    given = {"num_labels": num_classes, "num_channels": input_shape[0], "trust_remote_code": trust_remote_code}
    with (
        hub_files(f"hf:{ref}", "the weights" if pretrained else "the config"),
        remote_code_refused(f"hf:{ref}"),
    ):
        if pretrained:
            model = auto.from_pretrained(ref, ignore_mismatched_sizes=True, **given, **kwargs)
        else:
            hf_config = transformers.AutoConfig.from_pretrained(ref, **given, **kwargs)
            model = auto.from_config(hf_config, trust_remote_code=trust_remote_code)
    return HFImageClassifier(model)


def load_hf_directory(
    path: Path, num_classes: int, input_shape: Sequence[int], trust_remote_code: bool = False
) -> HFImageClassifier:
    """A trained HF image classifier saved with ``save_pretrained`` in ``path``, as it is:
    its head must already have ``num_classes`` outputs (a new head would be untrained). Its
    own Python (``auto_map``) runs only with ``trust_remote_code``."""
    transformers = optional_import("transformers", f"the Hugging Face model directory {path}")
    remote = {"trust_remote_code": trust_remote_code}
    with hub_files(f"hf:{path}", "the config"), remote_code_refused(f"hf:{path}"):
        config = transformers.AutoConfig.from_pretrained(path, **remote)
    found = {"classes": config.num_labels, "channels": getattr(config, "num_channels", input_shape[0])}
    wanted = {"classes": num_classes, "channels": input_shape[0]}
    if found != wanted:
        raise KdclError(
            f"the Hugging Face model in {path} does not fit the data: it has "
            f"{found['classes']} classes and {found['channels']} input channels, the data "
            f"{wanted['classes']} and {wanted['channels']}",
            fix="fine-tune it for this dataset first (as a student: student.name=hf:DIR "
            "student.pretrained=true), or choose the dataset it was trained on",
        )
    with hub_files(f"hf:{path}", "the weights"), remote_code_refused(f"hf:{path}"):
        return HFImageClassifier(transformers.AutoModelForImageClassification.from_pretrained(path, **remote))


@register_source("packaged", check=PACKAGED_MODELS.get)
def packaged_model(
    ref: str,
    num_classes: int,
    input_shape: InputShape,
    pretrained: bool,
    config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A model that ships in a Python package (:mod:`kdcl.packaged`): the ``hf`` source on
    its directory, extracted once. A checkpoint's ``config`` rebuilds the architecture
    without the package."""
    directory = ref if config is not None else str(packaged_dir(ref))
    return hf_model(directory, num_classes, input_shape, pretrained, config=config, **kwargs)


@register_source(TARGET)
def target_model(ref: str, num_classes: int, input_shape: InputShape, pretrained: bool, **kwargs: Any) -> nn.Module:
    """Your callable ``ref`` (``pkg.module.fn``), called as ``fn(num_classes=C,
    input_shape=(C, H, W), **kwargs)`` (and ``pretrained=True`` when asked, if it takes it);
    it must return an ``nn.Module``."""
    build = locate(ref)
    arguments = {"num_classes": num_classes, "input_shape": input_shape, **kwargs}
    if pretrained:
        arguments["pretrained"] = True
    try:
        inspect.signature(build).bind(**arguments)
    except TypeError as e:
        raise KdclError(
            f"_target_={ref}: {e}",
            fix=f"{ref} must take num_classes, input_shape"
            + (", pretrained (or set pretrained=false)" if pretrained else "")
            + f" and the spec's kwargs ({', '.join(kwargs) or 'none'}); or {KWARGS_FIX}",
        ) from None
    model = build(**arguments)
    if not isinstance(model, nn.Module):
        raise KdclError(
            f"_target_={ref} returned a {type(model).__name__}, not an nn.Module",
            fix=f"make {ref} return the network (a torch.nn.Module)",
        )
    return model


def locate(path: str) -> Any:
    """The object at import path ``pkg.module.name``; one :class:`KdclError` if its module
    cannot be imported (the package is not installed or not on ``PYTHONPATH``) or lacks it."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise KdclError(f"_target_={path!r} is not an import path", fix="write it as pkg.module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KdclError(
            f"_target_={path}: the module {module_name!r} cannot be imported ({e})",
            fix="install the package that holds it, or add its folder to PYTHONPATH "
            "(kdcl eval needs it too, to rebuild the model from a checkpoint)",
        ) from None
    if not callable(getattr(module, attribute, None)):
        raise KdclError(
            f"_target_={path}: module {module_name!r} has no callable {attribute!r}",
            fix=f"name a function or class defined in {module_name}",
        )
    return getattr(module, attribute)
