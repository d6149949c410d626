"""Intermediate features by module path: forward hooks, layer aliases, adapters.

Feature distillation reads a model's intermediate activations without rewriting the
model. A layer is named by its path in ``model.named_modules()`` (``layer3``,
``stages.1``, ``6`` for the seventh module of an ``nn.Sequential``); ``PATH:input``
names the module's input instead of its output, and ``PATH:K`` element K of a module that
returns a tuple (``bert.encoder.layer.0.attention.self:1``: a Transformer layer's
attention probabilities, which ``distill=attention_maps`` reads). A forward hook keeps the latest
value while a :class:`FeatureTap` is active (a module called several times per forward,
such as a shared ReLU, keeps its last call).

Aliases pick layers by what the model computes, found with one probe forward pass in
eval mode that lists the module calls in the order they return. Only maps that can be
hooked unambiguously count: modules called once per forward, outside blocks that change
the resolution (``nn.Sequential`` containers are transparent):

- ``auto:last_conv``: the last module whose output is a spatial map (B, C, H, W), H·W > 1
  (``10`` for ``cnn``, ``stages`` for the CIFAR ResNets, ``layer4`` for torchvision
  ResNets, ``features`` for MobileNets);
- ``auto:stages``: one map per spatial resolution, the last module at each (``2, 6, 10``
  for ``cnn``; ``stages.0, stages.1, stages`` for the CIFAR ResNets; ``layer1`` …
  ``layer4`` for torchvision ResNets);
- ``auto:penultimate``: the input of the last ``nn.Linear`` (the feature vector the
  classifier sees; ``13:input`` for ``cnn``, ``fc:input`` for the ResNets).

A layer's pre-activation value (:func:`preactivation_layers`, ReviewKD's teacher maps as
the authors take them) is the input of the ``nn.ReLU`` that gives its output: the last
ReLU to return by the time the layer returns (a residual block's sum before its final
ReLU), checked on one forward pass (the layer's output must be that ReLU's output). A model
whose layers end without a ReLU may name the value itself in an attribute
``preactivation_layers``, a dict from a layer path to a reference (the wide ResNets: a
stage's output enters the next block through BN-ReLU, and that ReLU's input is its
pre-activation value, as in mdistiller).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.errors import KdclError
from kdcl.registry import Registry

ALIASES: Registry[Callable[[nn.Module, list[Call]], list[str]]] = Registry("layer alias")
register_alias = ALIASES.register


class FeatureTap:
    """Hooks on ``model`` that keep the latest output (``PATH:input``: input; ``PATH:K``:
    element K of a tuple output) of each layer.

    A context manager: ``with FeatureTap(model, refs) as features`` registers the hooks,
    ``features[ref]`` holds the value of the last forward pass, and leaving the block
    (normally or by an exception) removes every hook. Values are copies, so an in-place
    operation that follows the layer (``ReLU(inplace=True)``) cannot change them.
    A layer that returns a tuple (a Hugging Face Transformer layer: hidden states first)
    gives its first element. With no model or no layers it does nothing.
    """

    def __init__(self, model: nn.Module | None, refs: Sequence[str]):
        self.model = model
        self.refs = list(dict.fromkeys(refs))
        self.features: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[str, Tensor]:
        if self.model is None:
            return self.features
        try:
            for ref in self.refs:
                path, _, point = ref.partition(":")
                module = self.model.get_submodule(path)
                if point == "input":
                    self._handles.append(module.register_forward_pre_hook(self._keep(ref, lambda args, out: args[0])))
                elif point.isdigit():
                    self._handles.append(module.register_forward_hook(self._keep(ref, partial(_element, int(point)))))
                else:
                    self._handles.append(module.register_forward_hook(self._keep(ref, lambda args, out: out)))
        except BaseException:
            self.__exit__()
            raise
        return self.features

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()

    def _keep(self, ref: str, pick: Callable[[tuple, Any], Any]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any = None) -> None:
            value = pick(args, output)
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
                value = value[0]
            if not isinstance(value, Tensor):
                raise KdclError(
                    f"layer {ref!r} gives a {type(value).__name__}, not a tensor",
                    fix="choose a module whose output is one tensor",
                )
            self.features[ref] = value.clone()

        return hook


# --------------------------------------------------------------------------- names and aliases
def _element(k: int, args: tuple, output: Any) -> Any:
    """Element ``k`` of a module's tuple output (``PATH:K``); None when it has fewer."""
    return output[k] if isinstance(output, (tuple, list)) and len(output) > k else None


class AliasUnavailable(Exception):
    """The model has no layer of the kind an alias asks for."""


@dataclass
class Call:
    """One module call of a probe forward pass; shapes without the batch (None: not a tensor)."""

    path: str
    input: tuple[int, ...] | None
    output: tuple[int, ...] | None

    @property
    def is_map(self) -> bool:
        return self.output is not None and len(self.output) == 3 and self.output[1] * self.output[2] > 1


def _map_outputs(model: nn.Module, calls: list[Call]) -> list[Call]:
    """The calls whose output is a spatial map and can be hooked unambiguously: modules
    called once, outside any block that changes the resolution (a non-``nn.Sequential``
    module whose output size differs from its input's, e.g. a strided bottleneck)."""
    counts = Counter(call.path for call in calls)
    blocks = [
        call.path + "."
        for call in calls
        if call.input is not None
        and call.output is not None
        and call.input[1:] != call.output[1:]
        and not isinstance(model.get_submodule(call.path), nn.Sequential)
    ]
    return [
        call
        for call in calls
        if call.is_map and counts[call.path] == 1 and not any(call.path.startswith(block) for block in blocks)
    ]


@register_alias("auto:last_conv")
def last_conv(model: nn.Module, calls: list[Call]) -> list[str]:
    """The last module whose output is a spatial map."""
    maps = _map_outputs(model, calls)
    if not maps:
        raise AliasUnavailable("no module that outputs a spatial feature map (B, C, H, W)")
    return [maps[-1].path]


@register_alias("auto:stages")
def stages(model: nn.Module, calls: list[Call]) -> list[str]:
    """The last module of every run of equal spatial resolution, shallow to deep."""
    picked: list[Call] = []
    for call in _map_outputs(model, calls):
        if picked and (picked[-1].output or ())[1:] == (call.output or ())[1:]:
            picked[-1] = call
        else:
            picked.append(call)
    if not picked:
        raise AliasUnavailable("no module that outputs a spatial feature map (B, C, H, W)")
    return [call.path for call in picked]


@register_alias("auto:penultimate")
def penultimate(model: nn.Module, calls: list[Call]) -> list[str]:
    """The input of the last ``nn.Linear`` to run (the classifier's feature vector)."""
    linears = [call.path for call in calls if isinstance(model.get_submodule(call.path), nn.Linear)]
    if not linears:
        raise AliasUnavailable("no nn.Linear module in its forward pass")
    return [f"{linears[-1]}:input"]


@torch.no_grad()
def _in_eval(model: nn.Module, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with ``model`` in eval mode (no BatchNorm statistics change), then restore its mode."""
    training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(training)


def probe(model: nn.Module, example: Tensor) -> list[Call]:
    """Every non-root module call of one forward pass, in the order the calls return."""
    calls: list[Call] = []

    def shape(value: Any) -> tuple[int, ...] | None:
        return tuple(value.shape[1:]) if isinstance(value, Tensor) else None

    def record(module: nn.Module, args: tuple, output: Any, path: str) -> None:
        calls.append(Call(path, shape(args[0]) if args else None, shape(output)))

    handles = [m.register_forward_hook(partial(record, path=path)) for path, m in model.named_modules() if path]
    try:
        _in_eval(model, lambda: model(example))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def resolve_layers(model: nn.Module, spec: str | Sequence[str], role: str, example: Tensor) -> list[str]:
    """Module references (``PATH``, ``PATH:input`` or ``PATH:K``) for a layer spec: a path, an alias or a list of them.

    An unknown path is a :class:`KdclError` listing the model's module paths and the aliases.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    names = [path for path, _ in model.named_modules() if path]
    refs: list[str] = []
    for item in specs:
        if item in ALIASES:
            try:
                refs += ALIASES.get(item)(model, probe(model, example))
            except AliasUnavailable as why:
                raise KdclError(
                    f"{role} layer {item!r}: {type(model).__name__} has {why}",
                    fix=f"name a layer of the {role} ({', '.join(names)}), another alias "
                    f"({', '.join(a for a in ALIASES.names() if a != item)}), or use a "
                    f"convolutional {role} (e.g. {role}=cnn_small)",
                ) from None
            continue
        path, _, point = str(item).partition(":")
        if path not in names or not (point in ("", "input") or point.isdigit()):
            raise KdclError(
                f"the {role} model ({type(model).__name__}) has no layer {item!r}",
                fix=f"use a module path of the {role} (optionally PATH:input, or PATH:K for element K "
                f"of a tuple output): {', '.join(names)}; "
                f"or an alias: {', '.join(ALIASES.names())}",
            )
        refs.append(str(item))
    return refs


def pair_layers(student: list[str], teacher: list[str], student_spec: Any, teacher_spec: Any) -> list[tuple[str, str]]:
    """Student/teacher layer pairs. Equal counts pair in order; an alias that gives a
    different number of layers on each side (``auto:stages``) pairs from the deepest."""
    if len(student) != len(teacher):
        if not (isinstance(student_spec, str) and isinstance(teacher_spec, str)):
            raise KdclError(
                f"distill.student_layer names {len(student)} layers but distill.teacher_layer {len(teacher)}",
                fix="give both as lists of the same length (one student layer per teacher layer)",
            )
        n = min(len(student), len(teacher))
        student, teacher = student[len(student) - n :], teacher[len(teacher) - n :]
    return list(zip(student, teacher))


def feature_shapes(model: nn.Module, refs: Sequence[str], example: Tensor) -> list[tuple[int, ...]]:
    """The shape (without the batch) of each layer's value on ``example``."""
    with FeatureTap(model, refs) as features:
        _in_eval(model, lambda: model(example))
        return [tuple(features[ref].shape[1:]) for ref in refs]


def preactivation_layers(model: nn.Module, refs: Sequence[str], role: str, example: Tensor) -> list[str]:
    """The reference of each layer's value before its last activation: the model's own
    ``preactivation_layers`` entry for the layer if it has one, else ``RELU:input`` for the
    last ``nn.ReLU`` to return by the time the layer returns (the last inside it, the layer
    itself if a ReLU, or before it for a layer that passes a map on, such as an identity
    head), provided that the layer's output is that ReLU's output on ``example``. Any other
    layer is a :class:`KdclError`."""
    declared = getattr(model, "preactivation_layers", None) or {}
    calls = probe(model, example)
    found: list[str] = []
    for ref in refs:
        if ref in declared:
            found.append(declared[ref])
            continue
        returns = [i for i, call in enumerate(calls) if call.path == ref]
        relus = [
            call.path
            for call in calls[: returns[-1] + 1 if returns else 0]
            if isinstance(model.get_submodule(call.path), nn.ReLU)
        ]
        candidate = f"{relus[-1]}:input" if relus else None
        if candidate is not None:
            with FeatureTap(model, [ref, candidate]) as features:
                _in_eval(model, lambda: model(example))
                if not torch.equal(F.relu(features[candidate]), features[ref]):
                    candidate = None
        if candidate is None:
            raise KdclError(
                f"the {role}'s pre-activation maps: layer {ref!r} of {type(model).__name__} does not end in an "
                "nn.ReLU, so it has no value before its last activation to hook (the pre-activation map is the "
                "input of the ReLU that gives a layer's output)",
                fix=f"keep the {role}'s maps after their activation (distill.teacher_maps=post_activation), name "
                f"{role} layers that end in an nn.ReLU, or give the model a preactivation_layers attribute "
                "(a dict from a layer path to the reference of its pre-activation value, e.g. 'head.1:input')",
            )
        found.append(candidate)
    return found


# --------------------------------------------------------------------------- adapters and maps
def adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], pair: tuple[str, str]) -> nn.Module:
    """The regressor from a student feature to the teacher's width (FitNets' "regressor"):
    a 1×1 convolution between maps, a linear layer between vectors, and between token
    sequences (L, D) a linear layer per token (TinyBERT's ``H_s W_h``, Jiao et al. 2020)."""
    if len(student_shape) == len(teacher_shape) == 3:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
    if len(student_shape) == len(teacher_shape) in (1, 2):
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    raise KdclError(
        f"student layer {pair[0]!r} gives shape {student_shape} but teacher layer {pair[1]!r} gives {teacher_shape}",
        fix="pair maps with maps (B, C, H, W), token sequences with token sequences (B, L, D) or vectors "
        "with vectors (B, D), "
        "e.g. distill.student_layer=auto:penultimate distill.teacher_layer=auto:penultimate",
    )


def require_maps(shapes: Sequence[tuple[int, ...]], refs: Sequence[str], role: str, method: str) -> None:
    """``method`` needs spatial maps; say which layer is not one."""
    for ref, shape in zip(refs, shapes):
        if len(shape) != 3:
            raise KdclError(
                f"distill={method} needs spatial feature maps (B, C, H, W), but {role} layer {ref!r} gives (B, "
                f"{', '.join(map(str, shape))})",
                fix=f"choose convolutional {role} layers, or a convolutional {role} (e.g. student=cnn_small, or "
                "+experiment=cifar10_cpu); fitnet also takes vectors: "
                "distill.student_layer=auto:penultimate distill.teacher_layer=auto:penultimate",
            )


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps to the other's H×W (as RepDistiller does); vectors pass."""
    if a.dim() != 4 or a.shape[2:] == b.shape[2:]:
        return a, b
    if a.shape[2] * a.shape[3] > b.shape[2] * b.shape[3]:
        return F.adaptive_avg_pool2d(a, (b.shape[2], b.shape[3])), b
    return a, F.adaptive_avg_pool2d(b, (a.shape[2], a.shape[3]))


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis (2017): ``Q = vec(Σ_c |A_c|^p) / ‖vec(Σ_c |A_c|^p)‖₂``, per example (B, H·W)."""
    q = feature.float().abs().pow(p).sum(1).flatten(1)
    return F.normalize(q, dim=1)
