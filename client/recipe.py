"""A site's own model and training, in one typed object: the :class:`Recipe`.

Usage (a package installed at the site, e.g. ``pip install -e examples/tabular``)::

    # my_consortium_model/__init__.py
    import torch
    from torch import nn
    from fedseal.client.recipe import Recipe, Standardize

    def make_model(num_features: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(num_features, 32), nn.ReLU(), nn.Linear(32, num_classes))

    recipe = Recipe(
        model=make_model,                                     # (features, classes) -> module
        preprocess=Standardize(),                             # fitted on this site's rows
        loss=nn.functional.cross_entropy,                     # (logits, labels) -> 0-d loss
        optimizer=lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr),
        metrics={"recall-1": PositiveRecall},                 # extra evaluation metrics
    )

The coordinator names it ``model = "my_consortium_model:recipe"`` in ``server.toml [run]``;
each site lists the same name in ``client.toml [limits] allowed_models``. The name is resolved
with ``importlib`` against code *installed at the site*: the coordinator never sends code.
``"mlp"`` and ``"cnn"`` are the built-in recipes (:data:`fedseal.client.models.BUILTIN_RECIPES`):
a model and nothing else, so fedseal's defaults below. A name whose attribute is a plain model
factory (not a ``Recipe``) is wrapped as ``Recipe(model=factory)``, as before recipes existed.

What a recipe decides, and fedseal's default for each field left ``None``:

* ``model``: called as ``model(num_features=F, num_classes=C)`` (the site's dataset gives F and
  C) under a ``torch`` RNG seeded by the coordinator's run seed, so every site builds the same
  initial weights. It takes ``(B, F)`` float32 features and returns ``(B, C)`` logits. Every
  entry of its ``state_dict()`` is averaged across sites as a float32 tensor (avoid integer
  buffers such as BatchNorm's ``num_batches_tracked``).
* ``preprocess``: a :class:`Preprocessing`. Its :meth:`~Preprocessing.fit` sees one pass over
  the site's *training* part (CPU float32 batches, streamed: it never holds the table) and
  returns a row-wise :data:`Transform`, applied to every batch's features, on the training
  device and in float32, before the model, in training and in evaluation. The fitted state
  (e.g. means and standard deviations) never leaves the site; so each site standardises with
  its own statistics. Default: none (features as stored).
* ``loss``: ``loss(logits, labels)`` returns the batch's mean loss as a 0-d tensor; used in
  training and as the evaluation ``loss``. Default: cross-entropy.
* ``optimizer``: ``optimizer(model, learning_rate)`` with the model already on its device and
  the coordinator's learning rate clamped by the site's ``[limits]``. Default: SGD with
  momentum 0.9 (fused on CUDA).
* ``step``: ``step(model, features, labels, loss)`` returns the loss to minimise for one
  batch (e.g. augmentation, mixup, an auxiliary term). Default: ``loss(model(features),
  labels)``. fedseal then adds the FedProx term when asked, back-propagates, clips the
  gradient norm and steps the optimizer.
* ``augment``: an :class:`Augment`, applied on the fly to every *training* batch (never to
  evaluation, nor to the pass that fits ``preprocess``), e.g. random flips or crops of images:
  ``augment(features, labels, generator)`` gets CPU float32 features shaped ``(B, *feature_shape)``
  (the manifest's shape, e.g. ``(B, 3, 32, 32)``, scaled by its ``feature_scale``) and int64
  labels ``(B,)``, and returns new ``(features, labels)`` of the same shapes and dtypes. It runs
  in the data loader as each batch is made (in its worker processes when the site has
  ``num_workers``), before ``preprocess`` and the move to the device: nothing is materialised
  beyond the batch, and no augmented copy of the data is ever written. Its randomness must come
  from ``generator`` (a ``torch.Generator`` keyed by the training seed, epoch and loader worker,
  so from the site's secret: reproducible at the site, unpredictable to the coordinator), not
  from ``torch``'s global RNG. It must be picklable (a module-level function or class
  instance) so that loader workers and training ranks can run it. Default: none.
* ``metrics``: extra evaluation metrics by name, each a zero-argument factory of a
  :class:`Metric` (a class works); they are reported beside ``loss``, ``accuracy`` and
  ``macro-f1`` and averaged across sites by their validation counts.

What stays the site's whatever the recipe says: the limits on epochs, batch size, learning
rate and gradient clipping (``[limits]``), the device (CUDA with bf16 autocast if present,
else CPU), the shuffling order and the seed of ``torch``'s RNG during training (from the
site's secret, so a recipe using dropout or random augmentation is reproducible at the site and
unpredictable to the coordinator), and which recipes run at all (``allowed_models``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import torch
from torch import nn

from fedseal.client.errors import SiteError

__all__ = [
    "RESERVED_METRICS",
    "Augment",
    "LossFn",
    "Metric",
    "MetricFactory",
    "ModelFactory",
    "OptimizerFactory",
    "Preprocessing",
    "Recipe",
    "RecipeError",
    "Standardize",
    "TrainStep",
    "Transform",
]

ModelFactory = Callable[..., nn.Module]
"""Called as ``factory(num_features=F, num_classes=C)``; returns the model."""

Transform = Callable[[torch.Tensor], torch.Tensor]
"""A fitted preprocessing: ``(B, F)`` float32 features on the device -> ``(B, F')`` float32."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits (B, C), labels (B,) int64)`` -> the batch's mean loss, a 0-d tensor."""

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]
"""``optimizer(model, learning_rate)``: the model is on its training device; the rate is
clamped by the site's limits."""

RESERVED_METRICS = frozenset({"num-examples", "loss", "accuracy", "macro-f1", "train-loss"})
"""Names fedseal reports itself; a recipe's metric may not take one."""

_METRIC_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")


class RecipeError(SiteError):
    """A recipe cannot be used or failed at this site (unknown, not installed, not a model,
    or one of its parts raised). The message names the recipe and why, in one line.

    Attributes:
        name: The recipe's name as the coordinator sent it.
        reason: Why.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"recipe {name!r}: {reason}")
        self.name = name
        self.reason = reason


class Preprocessing(Protocol):
    """Fitted once on a site's training part; the result transforms every batch."""

    def fit(self, features: Iterable[torch.Tensor], /) -> Transform:
        """Return the transform for the rows ``features`` yields (CPU float32 ``(B, F)``
        batches, one unshuffled pass over the training part)."""
        ...


class Augment(Protocol):
    """A training-only, per-batch transform of the streamed rows (module docstring, ``augment``).

    Example (random horizontal flips of ``(B, C, H, W)`` images)::

        def flip(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            mask = torch.rand(len(x), generator=gen) < 0.5
            return torch.where(mask[:, None, None, None], x.flip(-1), x), y
    """

    def __call__(
        self, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, /
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` of the same shapes and dtypes (float32, int64), new or in place."""
        ...


class TrainStep(Protocol):
    """One batch's training objective (see the module docstring, ``step``)."""

    def __call__(
        self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, loss: LossFn, /
    ) -> torch.Tensor:
        """The 0-d loss to minimise for this batch (features already preprocessed)."""
        ...


class Metric(Protocol):
    """An evaluation metric accumulated batch by batch (memory is the metric's own choice)."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor, /) -> None:
        """Add one batch: float32 logits ``(B, C)`` and int64 labels ``(B,)`` on the device."""
        ...

    def compute(self) -> float:
        """The metric over every batch added."""
        ...


MetricFactory = Callable[[], Metric]
"""Makes a fresh :class:`Metric` for one evaluation (a ``Metric`` class itself works)."""


@dataclass(frozen=True, slots=True, eq=False)
class Recipe:
    """A site's model and how to train and evaluate it (module docstring: each field).

    Raises:
        TypeError: A field that must be callable is not.
        ValueError: A metric name is not ``[a-z][a-z0-9_-]{0,39}`` or is one fedseal reports.
    """

    model: ModelFactory
    preprocess: Preprocessing | None = None
    loss: LossFn | None = None
    optimizer: OptimizerFactory | None = None
    step: TrainStep | None = None
    metrics: Mapping[str, MetricFactory] = field(default_factory=dict)
    augment: Augment | None = None

    def __post_init__(self) -> None:
        for what, value in (("model", self.model), ("loss", self.loss), ("optimizer", self.optimizer),
                            ("step", self.step), ("augment", self.augment)):  # fmt: skip
            if value is not None and not callable(value):
                raise TypeError(f"Recipe.{what} must be callable, got {type(value).__name__}")
        if self.preprocess is not None and not callable(getattr(self.preprocess, "fit", None)):
            raise TypeError("Recipe.preprocess must have a fit(features) method")
        for name, factory in self.metrics.items():
            if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
                raise ValueError(f"Recipe.metrics: name {name!r} is not [a-z][a-z0-9_-]{{0,39}}")
            if name in RESERVED_METRICS:
                raise ValueError(f"Recipe.metrics: {name!r} is reported by fedseal itself")
            if not callable(factory):
                raise TypeError(f"Recipe.metrics[{name!r}] must be a factory of a Metric")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))


class Standardize:
    """Preprocessing: per-feature ``(x - mean) / std`` with the site's own training statistics.

    The statistics are computed in float64 in one streaming pass; a constant feature (std below
    ``eps``) is only centred. They stay at the site: the model learns from standardised inputs
    everywhere, each site with its own scale (what a consortium with a shared data dictionary
    would instead fix as constants in its recipe).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def fit(self, features: Iterable[torch.Tensor]) -> Transform:
        total: torch.Tensor | None = None
        total_sq: torch.Tensor | None = None
        rows = 0
        for batch in features:
            x = batch.to(torch.float64).reshape(len(batch), -1)
            total = x.sum(0) if total is None else total + x.sum(0)
            total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
            rows += len(x)
        if total is None or total_sq is None or rows == 0:
            raise ValueError("Standardize: no rows to fit")
        mean = total / rows
        std = (total_sq / rows - mean * mean).clamp_min(0).sqrt()
        scale = torch.where(std < self.eps, torch.ones_like(std), std)
        return _Affine(mean.float(), (1 / scale).float())


class _Affine:
    """``(x - shift) * factor`` per feature, the constants moved to the batch's device once."""

    def __init__(self, shift: torch.Tensor, factor: torch.Tensor) -> None:
        self.shift = shift
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift.device != x.device:
            self.shift, self.factor = self.shift.to(x.device), self.factor.to(x.device)
        return (x - self.shift) * self.factor
