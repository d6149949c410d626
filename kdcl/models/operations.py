"""Operations on any model, whatever its source: parameters, size and MACs; freezing a
teacher (BatchNorm folded into its convolutions); the output layer (found, replaced, grown);
a probe forward pass that checks a model takes the data's inputs; a student initialised
from its teacher's layers."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from kdcl.errors import KdclError

T = TypeVar("T")

# Model options set kwargs for their own model, and they stay when name or _target_ changes.
KWARGS_FIX = (
    "remove the key from teacher.kwargs / student.kwargs (a model option's kwargs stay when "
    "name or _target_ is changed: replace them, e.g. 'student.kwargs={}')"
)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Size of the state_dict tensors (parameters and buffers) in megabytes."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one example of shape ``input_shape``.

    One MAC is one multiplication added to an accumulator; the count is half the FLOPs that
    ``torch.utils.flop_counter.FlopCounterMode`` reports, which counts a multiply-add as two
    FLOPs. It covers the ops that counter knows: convolutions, linear layers and matrix
    products (mm, addmm, bmm, attention); elementwise ops (BatchNorm, activations, pooling,
    additions, softmax) are not counted. LSTMs, which that counter does not see, add
    ``4·H·(I + H)`` per token, direction and layer (:func:`lstm_macs`). The pass runs in eval
    mode under ``torch.no_grad`` on a zero input, or for a text model (``input_shape = (L,)``,
    token embeddings) on L token ids other than padding (a full-length text), on the model's device; every module's
    train/eval mode is restored and no BatchNorm running statistic changes."""
    from torch.utils.flop_counter import FlopCounterMode

    tensor: torch.Tensor | None = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    tokens = len(input_shape) == 1 and any(isinstance(m, nn.Embedding) for m in model.modules())
    example = (
        torch.ones(1, *input_shape, dtype=torch.long, device=device)
        if tokens
        else torch.zeros(1, *input_shape, device=device)
    )
    lstms = [m for m in model.modules() if isinstance(m, nn.LSTM)]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        for module, training in modes.items():
            module.train(training)
    steps = int(input_shape[0]) if tokens else 0
    return counter.get_total_flops() // 2 + sum(lstm_macs(lstm) * steps for lstm in lstms)


def lstm_macs(lstm: nn.LSTM) -> int:
    """An LSTM's multiply-accumulates per time step: ``4·H·(I_l + H)`` per layer l and
    direction, I_l the layer's input width (its four gates' input and recurrent products)."""
    directions = 2 if lstm.bidirectional else 1
    width = lstm.hidden_size
    inputs = [lstm.input_size] + [width * directions] * (lstm.num_layers - 1)
    return sum(4 * width * (i + width) * directions for i in inputs)


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, its 4-D weights in the channels_last memory format when
    ``channels_last`` (``trainer.channels_last``: how every model of a run, and of ``kdcl
    bench``, is laid out), else contiguous."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # Module.to takes memory_format, which its overloads leave out


def freeze(model: nn.Module) -> nn.Module:
    """A model as a teacher: eval mode, no gradients, BatchNorm folded into its convolutions.
    (Parameter by parameter: a TorchScript module has no ``requires_grad_``.)"""
    for parameter in model.eval().parameters():
        parameter.requires_grad_(False)
    return fold_batchnorm(model)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place, for a
    frozen model in eval mode (a teacher): ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` with
    ``σ = √(running_var + ε)``, and the BatchNorm becomes an ``Identity``. The outputs are
    unchanged up to float rounding, module names stay (feature hooks on a folded
    BatchNorm see the folded convolution's output, the same values), and one pass over
    the activations per BatchNorm is saved. A model torch.fx cannot trace is left as it is.
    """
    from torch.fx import symbolic_trace
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = symbolic_trace(model).graph
    except Exception:  # data-dependent control flow: no folding
        return model
    modules = dict(model.named_modules())
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if source is None or getattr(source, "op", None) != "call_module":
            continue
        if not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv, bn = modules.get(source.target), modules[node.target]
        if isinstance(conv, nn.Conv2d) and len(source.users) == 1 and bn.track_running_stats:
            _replace(model, source.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            _replace(model, node.target, nn.Identity())
    return model


def classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's output layer and its name: its last ``nn.Linear`` (every registered model
    ends in one; a test checks it)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdclError(
            f"{type(model).__name__} has no nn.Linear output layer to grow",
            fix="use a model that ends in a linear classifier",
        )
    return linears[-1]


def grow_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give the output layer ``num_classes`` outputs, in place (class-incremental learning):
    the existing outputs keep their weights and come first; the new ones are initialised as
    ``nn.Linear`` initialises them, from torch's global generator."""
    name, old = classifier(model)
    if num_classes < old.out_features:
        raise KdclError(f"cannot shrink the output layer from {old.out_features} to {num_classes} outputs")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        if old.bias is not None:
            new.bias[: old.out_features] = old.bias
    _replace(model, name, new)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def set_outputs(model: nn.Module, num_classes: int, keep: bool = True) -> nn.Module:
    """A new output layer (the last ``nn.Linear``) of ``num_classes`` outputs, in place;
    with ``keep`` one that has them already stays (a pretrained head, or one built for them)."""
    name, old = classifier(model)
    if not keep or old.out_features != num_classes:
        _replace(model, name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return model


def check_forward(model: nn.Module, input_shape: Sequence[int], num_classes: int, label: str) -> None:
    """One forward pass on two zero images of ``input_shape`` in eval mode, without
    gradients: the model must return a ``(2, num_classes)`` tensor. A model that cannot take
    the data's inputs is found here, before anything trains, as one :class:`KdclError`.
    Every module's train/eval mode is restored."""
    shape = tuple(int(d) for d in input_shape)
    tensor = next(iter(model.parameters()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, device=device))
    except Exception as e:  # any failure of a foreign network's forward is the input's
        raise KdclError(
            f"model {label} cannot take the data's inputs of shape {shape} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            fix="choose a model for this image size and channel count, or set its kwargs "
            "(e.g. img_size for a timm vision transformer)",
        ) from None
    finally:
        for module, training in modes.items():
            module.train(training)
    found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if found != (2, num_classes):
        raise KdclError(
            f"model {label} gives outputs {found} for a batch of 2, expected (2, {num_classes}): "
            f"one logit per class of the data",
            fix=f"use a model with {num_classes} outputs that returns one logits tensor",
        )


def call_with_kwargs(label: str, build: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``build(*args, **kwargs)`` for the model ``label``; a keyword it does not take (from
    ``teacher.kwargs`` / ``student.kwargs``) is one :class:`KdclError`."""
    try:
        return build(*args, **kwargs)
    except TypeError as e:
        if "keyword argument" not in str(e):
            raise
        raise KdclError(f"model {label}: {e}", fix=f"{label} does not take it: {KWARGS_FIX}") from None


# The index K of a stacked layer in a parameter's name: bert.encoder.layer.K.…, transformer.layer.K.…
LAYER_INDEX = re.compile(r"(?<=\.layer\.)\d+(?=\.)")


def copy_teacher_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """DistilBERT's initialisation (Sanh et al. 2019, "DistilBERT, a distilled version of
    BERT"): the student of L_s stacked layers takes its layer k from the teacher's layer
    ``k·⌊L_t / L_s⌋`` (one layer in two for half the depth), and every other tensor
    (embeddings, pooler, head) from the teacher's tensor of the same name, where the shapes
    agree. A stacked layer is a module path ``….layer.K.…``. Returns the names copied.

    Every tensor of the student's layers must find its teacher tensor, or it is one
    :class:`KdclError`: the student must be the teacher's architecture with fewer layers."""
    student_state, teacher_state = student.state_dict(), teacher.state_dict()

    def depth(state: dict[str, torch.Tensor]) -> int:
        return 1 + max((int(m.group()) for name in state if (m := LAYER_INDEX.search(name))), default=-1)

    fix = (
        "give the student the teacher's architecture with fewer layers (the same width, heads and "
        "feed-forward size), or set student.init_from_teacher=false"
    )
    student_depth, teacher_depth = depth(student_state), depth(teacher_state)
    if not student_depth or teacher_depth < student_depth:
        raise KdclError(
            f"student.init_from_teacher takes the teacher's stacked layers (….layer.K.…), but the student "
            f"has {student_depth} and the teacher {teacher_depth}",
            fix=fix,
        )
    stride = teacher_depth // student_depth
    copied, missing = {}, []
    for name, tensor in student_state.items():
        source = LAYER_INDEX.sub(lambda m: str(int(m.group()) * stride), name)
        if source in teacher_state and teacher_state[source].shape == tensor.shape:
            copied[name] = teacher_state[source]
        elif LAYER_INDEX.search(name):
            missing.append(name)
    if missing:
        raise KdclError(
            f"student.init_from_teacher: {len(missing)} tensors of the student's layers have no teacher "
            f"tensor of the same name and shape (the first: {missing[0]})",
            fix=fix,
        )
    student.load_state_dict(copied, strict=False)
    return sorted(copied)
