"""Model factories the start-up recipe tests name as ``"tests.client._start_up_recipes:NAME"``."""

from __future__ import annotations

from torch import nn


def picky(num_features: int, num_classes: int) -> nn.Module:
    """Takes one shape only, and says so the way a factory should: ``ValueError``."""
    if num_features != 784:
        raise ValueError(f"takes 784 features only, got {num_features}")
    return nn.Linear(num_features, num_classes)


def broken_factory(num_features: int, num_classes: int) -> nn.Module:
    """Broken whatever the shape: not a shape complaint."""
    raise AttributeError("'NoneType' object has no attribute 'hidden'")
