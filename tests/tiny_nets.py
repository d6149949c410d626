"""Networks of a user's own package, for ``_target_`` in the tests (importable from tests/)."""

from __future__ import annotations

from torch import nn


def tiny_cnn(num_classes: int, input_shape: tuple[int, int, int], width: int = 4) -> nn.Module:
    """One conv-BN-ReLU block, global average pool, linear."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def not_a_network(num_classes: int, input_shape: tuple[int, int, int]) -> str:
    """A builder that forgets to return its network."""
    return "a network"
