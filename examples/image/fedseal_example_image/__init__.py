"""A fedseal recipe for 28x28 grey-scale images (MNIST-5k, or any square single-channel image
flattened to ``side * side`` features in ``[0, 1]``).

Install it at every site (``pip install -e examples/image``), allow it in ``client.toml``::

    [limits]
    allowed_models = ["mlp", "cnn", "fedseal_example_image:recipe"]

and name it at the coordinator, in ``server.toml``::

    [run]
    model = "fedseal_example_image:recipe"
    learning_rate = 0.002     # Adam's rate

What it does: normalisation with fixed constants (MNIST's published pixel mean and standard
deviation: the same at every site, so nothing is fitted), a small CNN with dropout, a training
step that shifts each batch by up to two pixels (augmentation drawn from ``torch``'s RNG, which
fedseal seeds from the site's secret), Adam, and two metrics beside fedseal's:
``top2-accuracy`` and ``worst-class-recall`` (the recall of the class the model serves worst).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedseal.client.recipe import LossFn, Recipe, Transform

__all__ = [
    "DigitCNN",
    "Normalize",
    "TopKAccuracy",
    "WorstClassRecall",
    "adam",
    "recipe",
    "shift_step",
]


class DigitCNN(nn.Module):
    """Two 3x3 conv blocks, dropout and a linear head (about 51k parameters at 28x28)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        side = round(num_features**0.5)
        if side * side != num_features or side % 4:
            raise ValueError(
                f"DigitCNN needs square images with a side divisible by 4, got {num_features} features"
            )
        self.side = side
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)  # (B, 1, 28, 28) -> (B, 16, 28, 28)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # (B, 16, 14, 14) -> (B, 32, 14, 14)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(32 * (side // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(len(x), 1, self.side, self.side)  # (B, 784) -> (B, 1, 28, 28)
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 16, 14, 14)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 32, 7, 7)
        out: torch.Tensor = self.head(self.drop(x.flatten(1)))  # (B, C)
        return out


class Normalize:
    """Preprocessing with fixed constants: ``(x - mean) / std`` (nothing fitted)."""

    def __init__(self, mean: float = 0.1307, std: float = 0.3081) -> None:
        self.mean = mean
        self.std = std

    def fit(self, features: Iterable[torch.Tensor]) -> Transform:
        mean, std = self.mean, self.std
        return lambda x: (x - mean) / std


def shift_step(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, loss: LossFn
) -> torch.Tensor:
    """The batch shifted by up to two pixels in each direction (one draw per batch), then the
    loss: the model learns digits that are not centred exactly."""
    side = round(features.shape[1] ** 0.5)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,)))
    images = features.view(len(features), side, side).roll(shifts=(dy, dx), dims=(1, 2))
    return loss(model(images.reshape(len(features), -1)), labels)


def adam(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Adam at the coordinator's rate (clamped by the site)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate)


class TopKAccuracy:
    """Share of rows whose label is among the ``k`` largest logits."""

    def __init__(self, k: int = 2) -> None:
        self.k = k
        self.hits = 0
        self.rows = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        top = logits.topk(min(self.k, logits.shape[1]), dim=1).indices
        self.hits += int((top == labels[:, None]).any(1).sum())
        self.rows += len(labels)

    def compute(self) -> float:
        return self.hits / self.rows if self.rows else float("nan")


class WorstClassRecall:
    """The lowest per-class recall over the classes present (O(classes) memory)."""

    def __init__(self) -> None:
        self.hits: torch.Tensor | None = None
        self.totals: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = logits.shape[1]
        hit = (logits.argmax(1) == labels).long().cpu()
        totals = torch.bincount(labels.cpu(), minlength=n)[:n]
        hits = torch.bincount(labels.cpu(), weights=hit.double(), minlength=n)[:n].long()
        self.hits = hits if self.hits is None else self.hits + hits
        self.totals = totals if self.totals is None else self.totals + totals

    def compute(self) -> float:
        if self.hits is None or self.totals is None or not bool((self.totals > 0).any()):
            return float("nan")
        present = self.totals > 0
        return float((self.hits[present].double() / self.totals[present].double()).min())


recipe = Recipe(
    model=DigitCNN,
    preprocess=Normalize(),
    optimizer=adam,
    step=shift_step,
    metrics={"top2-accuracy": TopKAccuracy, "worst-class-recall": WorstClassRecall},
)
"""What the coordinator names as ``"fedseal_example_image:recipe"`` (cross-entropy: the
default loss)."""
