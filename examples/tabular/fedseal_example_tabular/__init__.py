"""A fedseal recipe for a 30-feature tabular dataset (binary diagnosis).

Install it at every site (``pip install -e examples/tabular``, or your own package built the
same way), allow it in ``client.toml``::

    [limits]
    allowed_models = ["mlp", "fedseal_example_tabular:recipe"]

(not ``"cnn"``: the built-in CNN takes square images only; a site whose data a listed model does
not fit skips it at start-up with a warning, and refuses to start only when none fits)

and name it at the coordinator, in ``server.toml``::

    [run]
    model = "fedseal_example_tabular:recipe"
    learning_rate = 0.005    # AdamW's rate, not SGD's (what the tests federate with)

What it does: per-feature standardisation fitted on each site's own training rows (the
features span four orders of magnitude; the statistics stay at the site), a one-hidden-layer
MLP with dropout, cross-entropy with a little label smoothing, AdamW with weight decay, and
three clinical metrics beside fedseal's loss, accuracy and macro-F1: ``sensitivity`` (recall
of label 1), ``specificity`` (recall of label 0) and ``auroc`` (of the label-1 score). The
coordinator averages each over the sites by their validation counts (a mean of per-site AUROCs,
not the AUROC of the pooled rows).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fedseal.client.recipe import Recipe, Standardize

__all__ = ["AUROC", "Sensitivity", "Specificity", "TabularMLP", "adamw", "recipe"]


class TabularMLP(nn.Module):
    """``F -> 32 -> C`` with ReLU and dropout (about 1k parameters for 30 features: a few
    hundred patients per site do not support more)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, 32),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)  # (B, F) standardised -> (B, C) logits
        return out


def adamw(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW at the coordinator's rate (clamped by the site), weight decay on weights only."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 1e-3}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


class _Recall:
    """Recall of one label: true positives / rows with that label (NaN without such rows)."""

    label = 1

    def __init__(self) -> None:
        self.hits = 0
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        mine = labels == self.label
        self.total += int(mine.sum())
        self.hits += int((logits.argmax(1)[mine] == self.label).sum())

    def compute(self) -> float:
        return self.hits / self.total if self.total else float("nan")


class Sensitivity(_Recall):
    """Recall of label 1 (malignant)."""

    label = 1


class Specificity(_Recall):
    """Recall of label 0 (benign)."""

    label = 0


class AUROC:
    """Area under the ROC curve of the label-1 score (softmax), by ranks with ties averaged
    (Mann-Whitney U). Keeps one score per validation row: fine for a site's validation part."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores.append(logits.softmax(1)[:, -1].detach().double().cpu())
        self.labels.append((labels == logits.shape[1] - 1).cpu())

    def compute(self) -> float:
        scores, positive = torch.cat(self.scores), torch.cat(self.labels)
        n_pos = int(positive.sum())
        n_neg = len(positive) - n_pos
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        ordered = scores.sort().values
        # 1-based ranks, tied scores sharing their mean rank: a score's equals hold the
        # positions left+1 .. right of the sorted scores.
        left = torch.searchsorted(ordered, scores, right=False)
        right = torch.searchsorted(ordered, scores, right=True)
        ranks = (left + right + 1).double() / 2
        u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
        return u / (n_pos * n_neg)


recipe = Recipe(
    model=TabularMLP,
    preprocess=Standardize(),
    loss=functools.partial(nn.functional.cross_entropy, label_smoothing=0.05),
    optimizer=adamw,
    metrics={"sensitivity": Sensitivity, "specificity": Specificity, "auroc": AUROC},
)
"""What the coordinator names as ``"fedseal_example_tabular:recipe"``."""
