"""Recipes the recipe tests name as ``"tests.client._recipes:NAME"`` (what a site installs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedseal.client.recipe import Recipe, Standardize, Transform


def small_mlp(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(num_features, 8), nn.ReLU(), nn.Linear(8, num_classes))


class RowCount:
    """A metric: the number of rows evaluated (as a float)."""

    def __init__(self) -> None:
        self.rows = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.rows += len(labels)

    def compute(self) -> float:
        return float(self.rows)


class CountingStandardize(Standardize):
    """:class:`Standardize` that counts its fits (class-wide, reset by the tests)."""

    fits = 0

    def fit(self, features: Iterable[torch.Tensor]) -> Transform:
        CountingStandardize.fits += 1
        return super().fit(features)


def _broken_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("boom in the loss")


#: Standardised inputs, SGD, a metric: the site's own recipe.
counted = Recipe(
    model=small_mlp,
    preprocess=CountingStandardize(),
    optimizer=lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
    metrics={"rows-seen": RowCount},
)

#: A loss that raises: training fails inside the recipe's code.
broken_loss = Recipe(model=small_mlp, loss=_broken_loss)

#: A model that expects another number of features than the data has.
wrong_width = Recipe(
    model=lambda num_features, num_classes: nn.Linear(num_features + 1, num_classes)
)

#: Not a recipe and not callable.
not_a_recipe = 42
