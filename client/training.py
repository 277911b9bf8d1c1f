"""Local training and evaluation at a site: a plain loop a reader can hold in their head.

Usage::

    from fedseal.client.training import SiteLimits, TrainRequest, train, evaluate
    limits = SiteLimits()                                   # what this site allows
    req = limits.clamp(TrainRequest(epochs=5, batch_size=64, learning_rate=0.05))
    result = train(model, data.x_train, data.y_train, req, seed=1)   # streamed from the shards
    result = train(model, x, y, req, seed=1)                # or arrays: x (N, 784) float32, y (N,) int64
    metrics = evaluate(model, data.x_val, data.y_val)       # loss, accuracy, macro-F1

    # a site's own recipe (fedseal.client.recipe): its preprocessing is fitted once on the
    # training part, then the loop runs the recipe's loss, optimizer, step and metrics
    transform = fit_preprocessing(recipe, data.x_train)
    train(model, data.x_train, data.y_train, req, seed=1, recipe=recipe, transform=transform)
    evaluate(model, data.x_val, data.y_val, recipe=recipe, transform=transform).extra

Data comes in one of two forms. Arrays (``x``/``y`` numpy) are copied to the device once and
indexed there: right for small in-memory data and benchmarks. A site's dataset comes as a
:class:`BatchSource` (:class:`fedseal.client.site_data.SiteSplit`: batches streamed from its
Parquet shards, memory bounded by a buffer), passed either directly (:func:`train_stream`,
:func:`evaluate_stream`) or as the :class:`StreamedFeatures`/:class:`StreamedLabels` pair that
``SiteData.x_train``/``y_train`` return, so that ``train(model, data.x_train, data.y_train, ...)``
streams. Either way ``TrainResult.num_examples`` is the number of rows one epoch actually trained
on (counted, and checked against the source's length), which is the weight secure aggregation
gives the update.

The coordinator proposes epochs, batch size and learning rate; the site clamps them to its own
limits (``SiteLimits``), so a coordinator cannot make a site burn unbounded compute. The device
is chosen automatically (CUDA if present, else CPU) unless ``devices`` (``[training] devices``,
:class:`fedseal.client.distributed.Devices`) says otherwise; when it names several, a streamed
training runs one DistributedDataParallel rank per device (:mod:`fedseal.client.distributed`),
its result that of this loop on the same global batches. On CUDA the forward pass runs under bf16
autocast. Gradients are clipped to ``clip_norm`` before every step. ``torch``'s RNG is seeded
with the training seed for the duration of training (forked, so the caller's RNG is untouched),
which makes a recipe's dropout or random augmentation reproducible for a seed.

Without a recipe (or with a built-in one) the loop is fedseal's default: cross-entropy, SGD
with momentum 0.9, no preprocessing. A :class:`~fedseal.client.recipe.Recipe` replaces any of
these; the limits, clipping, device, seeding and counting above stay the loop's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedseal.client.recipe import LossFn, Recipe, RecipeError, TrainStep, Transform
from fedseal.client.train_checkpoint import Preempted, Progress, TrainingCheckpoint

if TYPE_CHECKING:  # distributed imports this module; it is imported when several ranks train
    from fedseal.client.distributed import Devices

__all__ = [
    "BatchSource",
    "EvalResult",
    "Features",
    "Labels",
    "SiteLimits",
    "StreamedFeatures",
    "StreamedLabels",
    "TrainRequest",
    "TrainResult",
    "check_recipe",
    "evaluate",
    "evaluate_stream",
    "fit_preprocessing",
    "pick_device",
    "train",
    "train_stream",
    "warm_up",
]

log = logging.getLogger("fedseal.client.training")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """Training hyper-parameters for one round (sent by the coordinator)."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    clip_norm: float = 5.0
    #: FedProx: weight of the proximal term ``mu/2 * ||w - w_global||^2`` (0 = plain SGD).
    proximal_mu: float = 0.0


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Upper bounds a site puts on what a coordinator may ask for."""

    max_epochs: int = 5
    max_batch_size: int = 512
    max_learning_rate: float = 1.0
    max_clip_norm: float = 100.0
    max_proximal_mu: float = 100.0

    def clamp(self, req: TrainRequest) -> TrainRequest:
        """Return ``req`` with every field clamped into ``[1 or tiny, limit]``."""
        return TrainRequest(
            epochs=min(max(1, int(req.epochs)), self.max_epochs),
            batch_size=min(max(1, int(req.batch_size)), self.max_batch_size),
            learning_rate=min(max(1e-8, float(req.learning_rate)), self.max_learning_rate),
            clip_norm=min(max(1e-6, float(req.clip_norm)), self.max_clip_norm),
            proximal_mu=min(max(0.0, float(req.proximal_mu)), self.max_proximal_mu),
        )


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training produced (the weights stay in the model).

    Attributes:
        num_examples: Rows one epoch trained on (the example count secure aggregation weights by).
        mean_loss: Mean training loss over all steps.
        steps: Optimiser steps over all epochs.
    """

    num_examples: int
    mean_loss: float
    steps: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Local evaluation metrics.

    Attributes:
        num_examples: Rows evaluated.
        loss: Mean loss per row (the recipe's loss; cross-entropy by default).
        accuracy: Share of rows whose largest logit is the label.
        macro_f1: Per-class F1 averaged over the classes present or predicted.
        extra: The recipe's own metrics by name (empty without a recipe's ``metrics``).
    """

    num_examples: int
    loss: float
    accuracy: float
    macro_f1: float
    extra: Mapping[str, float] = field(default_factory=dict)


class BatchSource(Protocol):
    """A dataset read as a stream of ``(features float32 [B, ...], labels int64 [B])`` batches.

    ``num_rows`` is the exact number of rows one full pass yields; a pass is deterministic for
    ``(seed, epoch, shuffle)``. Implemented by :class:`fedseal.client.site_data.SiteSplit`.
    """

    @property
    def num_rows(self) -> int:
        """Rows per pass."""
        ...

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterable[Batch]:
        """One pass over the rows in batches of at most ``batch_size``."""
        ...


def _materialise(source: BatchSource, column: int, dtype: npt.DTypeLike | None) -> npt.NDArray[Any]:
    """One unshuffled pass of ``source`` gathered into an array (column 0: features, 1: labels)."""
    parts = [
        batch[column].numpy()
        for batch in source.batches(batch_size=8192, seed=0, epoch=0, shuffle=False)
    ]
    if not parts:
        raise ValueError("the stream has no rows")
    out = np.concatenate(parts)
    if len(out) != source.num_rows:
        raise ValueError(f"streamed {len(out)} rows, the source has {source.num_rows}")
    return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(frozen=True, slots=True)
class StreamedFeatures:
    """Stands where a feature array would: the features of a streamed :class:`BatchSource`.

    ``len()`` is the exact row count. ``np.asarray(features)`` (or any numpy function given it)
    materialises every row in file order, aligned with the labels' ``np.asarray``: for small
    data and baselines only, as it holds the whole part in memory.
    """

    source: BatchSource

    def __len__(self) -> int:
        return self.source.num_rows

    def __array__(
        self, dtype: npt.DTypeLike | None = None, copy: bool | None = None
    ) -> npt.NDArray[Any]:
        return _materialise(self.source, 0, dtype)


@dataclass(frozen=True, slots=True)
class StreamedLabels:
    """Stands where a label array would: the labels of a streamed :class:`BatchSource`.

    ``len()`` is the exact row count; ``np.asarray(labels)`` materialises them (see
    :class:`StreamedFeatures`).
    """

    source: BatchSource

    def __len__(self) -> int:
        return self.source.num_rows

    def __array__(
        self, dtype: npt.DTypeLike | None = None, copy: bool | None = None
    ) -> npt.NDArray[Any]:
        return _materialise(self.source, 1, dtype)


Features = npt.NDArray[np.float32] | StreamedFeatures
Labels = npt.NDArray[np.int64] | StreamedLabels

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""A recipe's loss of one batch, ``(model, features, labels) -> 0-d loss``."""

_FIT_BATCH_ROWS = 8192


@dataclass(frozen=True, slots=True)
class _Hooks:
    """What a recipe changes in the loop; every field ``None``: fedseal's defaults, run by the
    very code the built-in models always ran."""

    transform: Transform | None = None
    objective: Objective | None = None
    loss: LossFn | None = None
    recipe: Recipe | None = None

    @classmethod
    def of(cls, recipe: Recipe | None, transform: Transform | None) -> _Hooks:
        """The hooks of ``recipe`` with its fitted ``transform``.

        Raises:
            ValueError: The recipe preprocesses and no transform was given, or a transform was
                given for a recipe without preprocessing.
        """
        if recipe is None:
            if transform is not None:
                raise ValueError("a transform was given without the recipe it was fitted for")
            return _DEFAULT_HOOKS
        if (recipe.preprocess is None) != (transform is None):
            raise ValueError(
                "the recipe's preprocessing needs its fitted transform: pass "
                "transform=fit_preprocessing(recipe, x_train)"
                if transform is None
                else "a transform was given for a recipe without preprocessing"
            )
        loss, step = recipe.loss, recipe.step
        objective: Objective | None = None
        if step is not None:
            objective = _step_objective(
                step, loss if loss is not None else nn.functional.cross_entropy
            )
        elif loss is not None:
            objective = _loss_objective(loss)
        return cls(transform=transform, objective=objective, loss=loss, recipe=recipe)

    def features(self, xb: torch.Tensor) -> torch.Tensor:
        """A batch's features as the model takes them (the recipe's transform, if any)."""
        if self.transform is None:
            return xb
        out = self.transform(xb)
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or len(out) != len(xb):
            raise ValueError(
                f"the recipe's transform returned {_shape(out)} for a batch of {len(xb)} rows"
            )
        return out

    def optimizer(
        self, model: nn.Module, req: TrainRequest, device: torch.device
    ) -> torch.optim.Optimizer:
        """The recipe's optimizer, or :func:`optimizer_for`'s default."""
        factory = self.recipe.optimizer if self.recipe is not None else None
        if factory is None:
            return optimizer_for(model, req, device)
        opt = factory(model, req.learning_rate)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"the recipe's optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt

    def metrics(self) -> dict[str, Any]:
        """Fresh instances of the recipe's metrics for one evaluation."""
        if self.recipe is None:
            return {}
        return {name: factory() for name, factory in self.recipe.metrics.items()}


_DEFAULT_HOOKS = _Hooks()


def _step_objective(step: TrainStep, loss: LossFn) -> Objective:
    def objective(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return step(model, xb, yb, loss)

    return objective


def _loss_objective(loss: LossFn) -> Objective:
    def objective(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return loss(model(xb), yb)

    return objective


def _shape(value: object) -> str:
    return (
        f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """``torch``'s RNG seeded with ``seed`` inside, restored afterwards (on ``device`` too)."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def fit_preprocessing(recipe: Recipe, x: Features) -> Transform | None:
    """Fit ``recipe``'s preprocessing on the training features ``x`` (one unshuffled pass in
    CPU float32 batches of at most 8192 rows); ``None`` for a recipe without one.

    Raises:
        ValueError: ``x`` is empty.
        TypeError: ``fit`` did not return a callable transform.
        fedseal.client.data.DatasetError: Streamed data only: a shard fails mid-stream.
    """
    if recipe.preprocess is None:
        return None
    if len(x) == 0:
        raise ValueError("bad training data: no rows to fit the preprocessing on")
    features: Iterable[torch.Tensor]
    if isinstance(x, StreamedFeatures):
        source = x.source
        features = (
            xb
            for xb, _ in source.batches(batch_size=_FIT_BATCH_ROWS, seed=0, epoch=0, shuffle=False)
        )
    else:
        arr = x
        features = (
            torch.from_numpy(np.ascontiguousarray(arr[i : i + _FIT_BATCH_ROWS], dtype=np.float32))
            for i in range(0, len(arr), _FIT_BATCH_ROWS)
        )
    transform = recipe.preprocess.fit(features)
    if not callable(transform):
        raise TypeError(
            f"the preprocessing's fit() returned {type(transform).__name__}, not a callable transform"
        )
    return transform


def _stream_source(x: Features, y: Labels, what: str) -> BatchSource | None:
    """The streamed source behind ``(x, y)``, or ``None`` for two arrays.

    Raises:
        ValueError: ``x`` and ``y`` are not both arrays or both views of the same source.
    """
    if isinstance(x, StreamedFeatures) or isinstance(y, StreamedLabels):
        if not (
            isinstance(x, StreamedFeatures)
            and isinstance(y, StreamedLabels)
            and x.source is y.source
        ):
            raise ValueError(f"bad {what} data: features and labels must come from the same stream")
        return x.source
    return None


def warm_up(num_features: int, num_classes: int) -> None:
    """Run two tiny SGD steps once, so torch's lazy kernel set-up (seconds on a busy CPU) happens
    at start-up rather than inside the first round's stage timeout."""
    model = nn.Sequential(nn.Linear(num_features, 8), nn.ReLU(), nn.Linear(8, num_classes))
    x = np.zeros((4, num_features), np.float32)
    y = np.zeros(4, np.int64)
    train(model, x, y, TrainRequest(epochs=1, batch_size=2), seed=0)
    evaluate(model, x, y, num_classes=num_classes)


def pick_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    clip_norm: float,
    device: torch.device,
    prox: _Proximal | None = None,
    *,
    objective: Objective | None = None,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One optimizer step (bf16 autocast on CUDA, gradient clipping, FedProx term if ``prox``)
    on the batch's cross-entropy, or on ``objective(model, xb, yb)`` (a recipe's loss or step);
    returns the batch's data loss (without the proximal term) as a 0-d float32 tensor on the
    device: reading it would wait for the GPU, so the loops keep them and read them once.

    ``loss_scale`` multiplies the data loss before the backward pass (not the proximal term,
    not the returned loss): a data-parallel rank's share of the global batch
    (:mod:`fedseal.client.distributed`, rule 3)."""
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        if objective is None:
            loss = nn.functional.cross_entropy(model(xb), yb)
        else:
            loss = objective(model, xb, yb)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError(f"the recipe's loss returned {_shape(loss)}, not a 0-d tensor")
    data_loss = loss.detach().float()
    if loss_scale != 1.0:
        loss = loss * loss_scale
    if prox is not None:
        loss = loss + prox.term(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return data_loss


def optimizer_for(
    model: nn.Module, req: TrainRequest, device: torch.device
) -> torch.optim.Optimizer:
    """SGD with momentum 0.9; on CUDA the fused implementation (one kernel per step for all
    parameters instead of a few per parameter group: the demo models' steps are launch-bound)."""
    fused = True if device.type == "cuda" else None
    return torch.optim.SGD(model.parameters(), lr=req.learning_rate, momentum=0.9, fused=fused)


class Losses:
    """The steps' losses, kept on the device and read once: :meth:`add` holds up to
    :data:`FOLD_EVERY` of them, then folds them into one float64 running sum (one kernel per
    ``FOLD_EVERY`` steps, memory bounded however long the training)."""

    FOLD_EVERY = 256

    def __init__(self) -> None:
        self.steps = 0
        self._pending: list[torch.Tensor] = []
        self._total: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        self._pending.append(loss)
        self.steps += 1
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        part = torch.stack(self._pending).double().sum()
        self._total = part if self._total is None else self._total + part
        self._pending = []

    def mean(self) -> float:
        """Mean loss over all steps (0.0 for none): the one wait for the device."""
        total = self.total()
        return 0.0 if self.steps == 0 else total / self.steps

    def total(self) -> float:
        """Sum of the losses so far (a wait for the device)."""
        if self._pending:
            self._fold()
        return 0.0 if self._total is None else float(self._total)

    def restore(self, steps: int, total: float) -> None:
        """Continue from ``steps`` losses summing to ``total`` (a resumed training)."""
        self.steps, self._pending = steps, []
        self._total = torch.tensor(total, dtype=torch.float64)


def _save_checkpoint(
    checkpoint: TrainingCheckpoint, model: nn.Module, opt: torch.optim.Optimizer, progress: Progress
) -> None:
    """Write the checkpoint (a write that fails is logged: training goes on without it); when
    the site is being stopped, then raise :class:`Preempted`."""
    try:
        checkpoint.save(model, opt, progress)
    except OSError as exc:
        log.warning("training checkpoint %s not written: %s", checkpoint.directory, exc)
    if checkpoint.stop_requested:
        raise Preempted(
            f"the site is stopping: training paused at epoch {progress.epoch + 1}, batch "
            f"{progress.batch} ({progress.steps} steps), checkpoint {checkpoint.directory}"
        )


class _Proximal:
    """FedProx's proximal term ``mu/2 * sum ||w - w0||^2`` against the round's global weights."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = mu
        self.anchor = [p.detach().clone() for p in model.parameters()]

    @classmethod
    def of(cls, model: nn.Module, req: TrainRequest) -> _Proximal | None:
        return cls(model, req.proximal_mu) if req.proximal_mu > 0 else None

    def term(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=self.anchor[0].device if self.anchor else None)
        for p, a in zip(model.parameters(), self.anchor, strict=True):
            total = total + ((p - a) ** 2).sum()
        return (self.mu / 2) * total


def train(
    model: nn.Module,
    x: Features,
    y: Labels,
    req: TrainRequest,
    seed: int,
    *,
    recipe: Recipe | None = None,
    transform: Transform | None = None,
    devices: Devices | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``req.epochs`` epochs: SGD (momentum 0.9) on cross-entropy,
    or ``recipe``'s optimizer, loss and step.

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        x: Features, shape (N, F) float32, or a site split's :class:`StreamedFeatures`.
        y: Labels, shape (N,) int64, or the same split's :class:`StreamedLabels`.
        req: Hyper-parameters, already clamped by the site's limits.
        seed: Seed for the shuffling order and ``torch``'s RNG (the round number mixed with a
            site secret).
        recipe: The site's recipe (``None``: fedseal's default training).
        transform: ``recipe``'s preprocessing, fitted (:func:`fit_preprocessing`); required
            exactly when the recipe has one.
        devices: ``[training] devices`` (``None``: :func:`pick_device`). Streamed data trains
            on every device it resolves to (:func:`train_stream`); arrays train in this process
            on the first.
        checkpoint: Streamed data in one process: resume from / write the training's
            checkpoint (:func:`train_stream`); arrays ignore it.

    Raises:
        ValueError: If ``x`` and ``y`` disagree in length or kind, or are empty; the transform
            is missing or unexpected; the recipe's loss is not a 0-d tensor.
        fedseal.client.data.DatasetError: Streamed data only: a shard fails mid-stream (names it).
        fedseal.client.site_data.SiteDataError: Streamed data only: the rows differ from the
            split's count (the data changed since it was loaded).
        fedseal.client.distributed.DevicesError: ``devices`` names a device this machine lacks.
        fedseal.client.distributed.RankError: Streamed data on several ranks: a rank failed.
    """
    source = _stream_source(x, y, "training")
    if source is not None:
        return train_stream(
            model, source, req, seed=seed, recipe=recipe, transform=transform, devices=devices,
            checkpoint=checkpoint,
        )  # fmt: skip
    if (
        not isinstance(x, np.ndarray)
        or not isinstance(y, np.ndarray)
        or len(x) != len(y)
        or len(x) == 0
    ):
        raise ValueError(f"bad training data: {len(x)} features rows, {len(y)} labels")
    if recipe is not None and recipe.augment is not None:
        raise ValueError("the recipe's augment applies to a site's streamed data, not to arrays")
    hooks = _Hooks.of(recipe, transform)
    device = pick_device() if devices is None else devices.resolve()[0]
    model.to(device).train()
    try:
        opt = hooks.optimizer(model, req, device)
        prox = _Proximal.of(model, req)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        losses = Losses()
        with _seeded(seed, device):
            for _ in range(req.epochs):
                order = torch.randperm(len(xt), generator=gen).to(device)
                for start in range(0, len(xt), req.batch_size):
                    idx = order[start : start + req.batch_size]
                    xb = hooks.features(xt[idx])
                    losses.add(
                        train_step(
                            model,
                            opt,
                            xb,
                            yt[idx],
                            req.clip_norm,
                            device,
                            prox,
                            objective=hooks.objective,
                        )
                    )
        mean_loss = losses.mean()
    finally:
        model.to("cpu")
    return TrainResult(num_examples=len(x), mean_loss=mean_loss, steps=losses.steps)


def train_stream(
    model: nn.Module,
    source: BatchSource,
    req: TrainRequest,
    *,
    seed: int,
    recipe: Recipe | None = None,
    transform: Transform | None = None,
    devices: Devices | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> TrainResult:
    """Train ``model`` in place on batches streamed from ``source`` (same loop as :func:`train`).

    Epoch ``e`` reads ``source.batches(batch_size=req.batch_size, seed=seed, epoch=e,
    shuffle=True)``; each batch is moved to the device as it arrives (pinned memory and
    non-blocking copies on CUDA), so memory is what the source buffers plus one batch.

    When ``devices`` resolves to several devices, the site process spawns one rank per device
    and trains with DistributedDataParallel, each rank on a disjoint shard of the source, the
    weights loaded back into ``model`` (:func:`fedseal.client.distributed.train_ranks`: the
    rules, and how the result equals this loop's on the same global batches).

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        source: The training rows.
        req: Hyper-parameters, already clamped by the site's limits.
        seed: Seed for the shuffling order and ``torch``'s RNG.
        recipe: The site's recipe (``None``: fedseal's default training).
        transform: ``recipe``'s fitted preprocessing (see :func:`train`).
        devices: ``[training] devices`` (``None``: one process on :func:`pick_device`).
        checkpoint: One process: where this training's checkpoint is
            (:mod:`fedseal.client.train_checkpoint`). The loop resumes from it (weights,
            optimizer, torch RNG, epoch and batch: the result is the uninterrupted one), writes
            it every ``checkpoint.every_steps`` steps, and when the site is being stopped writes
            it and raises :class:`~fedseal.client.train_checkpoint.Preempted`. Several ranks
            start over (a preempted multi-rank training repeats its round's work).

    Returns:
        The result; ``num_examples`` is the number of rows each epoch trained on (over all
        ranks).

    Raises:
        ValueError: The source is empty, or an epoch yielded another number of rows than
            ``source.num_rows``; the transform is missing or unexpected; the recipe's loss is
            not a 0-d tensor.
        fedseal.client.data.DatasetError: A shard fails mid-stream (raised by the source).
        fedseal.client.distributed.DevicesError: ``devices`` names a device this machine lacks,
            or the training cannot be sent to the ranks.
        fedseal.client.distributed.RankError: Several ranks: one failed (its error, one line).
        fedseal.client.train_checkpoint.Preempted: The site is being stopped (checkpoint saved).
    """
    expected = source.num_rows
    if expected <= 0:
        raise ValueError("bad training data: the stream has no rows")
    hooks = _Hooks.of(recipe, transform)
    if recipe is not None and recipe.augment is not None:  # training passes only, in the stream
        with_augment = getattr(source, "with_augment", None)
        if with_augment is None:
            raise ValueError("the recipe's augment needs a site's streamed split (SiteSplit.with_augment)")
        source = with_augment(recipe.augment)
    ranks = (pick_device(),) if devices is None else devices.resolve()
    if len(ranks) > 1:
        from fedseal.client.distributed import train_ranks

        return train_ranks(
            model,
            source,
            req,
            seed=seed,
            devices=ranks,
            recipe=recipe,
            transform=transform,
            timeout_s=devices.timeout_s if devices is not None else 600.0,
        )
    device = ranks[0]
    model.to(device).train()
    losses = Losses()
    try:
        opt = hooks.optimizer(model, req, device)
        prox = _Proximal.of(model, req)  # anchored at the global weights, before any resume
        with _seeded(seed, device):
            start = checkpoint.load(model, opt) if checkpoint is not None else None
            if start is not None:
                losses.restore(start.steps, start.loss_sum)
                log.info(
                    "resuming training from its checkpoint: epoch %d, batch %d (%d steps done)",
                    start.epoch + 1, start.batch, start.steps,
                )
            for epoch in range(start.epoch if start is not None else 0, req.epochs):
                resumed = start is not None and epoch == start.epoch
                rows = start.rows if resumed and start is not None else 0
                skip = start.batch if resumed and start is not None else 0
                for batch, (xb, yb) in enumerate(source.batches(
                    batch_size=req.batch_size, seed=seed, epoch=epoch, shuffle=True
                )):
                    if batch < skip:  # trained before the checkpoint (the order is the seed's)
                        continue
                    xb = hooks.features(xb.to(device, non_blocking=True))
                    yb = yb.to(device, non_blocking=True)
                    losses.add(
                        train_step(
                            model,
                            opt,
                            xb,
                            yb,
                            req.clip_norm,
                            device,
                            prox,
                            objective=hooks.objective,
                        )
                    )
                    rows += len(yb)
                    if checkpoint is not None and (checkpoint.due(losses.steps) or checkpoint.stop_requested):
                        _save_checkpoint(checkpoint, model, opt, Progress(epoch, batch + 1, losses.steps, losses.total(), rows))
                if rows != expected:
                    raise ValueError(
                        f"bad training data: epoch {epoch} streamed {rows} rows, the source has {expected}"
                    )
        mean_loss = losses.mean()
    finally:
        model.to("cpu")
    return TrainResult(num_examples=expected, mean_loss=mean_loss, steps=losses.steps)


class _Confusion:
    """Running loss sum and per-class counts (true positives, predicted, actual): O(classes) memory."""

    def __init__(self, num_classes: int, hooks: _Hooks = _DEFAULT_HOOKS) -> None:
        self.loss_fn = hooks.loss
        self.metrics = hooks.metrics()
        self.rows = 0
        self.correct = 0
        self.loss = 0.0
        self.tp = np.zeros(num_classes, np.int64)
        self.pp = np.zeros(num_classes, np.int64)
        self.ap = np.zeros(num_classes, np.int64)

    def add(self, logits: torch.Tensor, yb: torch.Tensor) -> None:
        if self.loss_fn is None:
            self.loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        else:
            batch_loss = self.loss_fn(logits, yb)
            if not isinstance(batch_loss, torch.Tensor) or batch_loss.ndim != 0:
                raise ValueError(
                    f"the recipe's loss returned {_shape(batch_loss)}, not a 0-d tensor"
                )
            self.loss += float(batch_loss) * len(yb)
        for metric in self.metrics.values():
            metric.update(logits, yb)
        pred = logits.argmax(1).cpu().numpy()
        y = yb.cpu().numpy()
        hit = pred == y
        counts = [np.bincount(v, minlength=len(self.tp)) for v in (y[hit], pred, y)]
        width = max(len(c) for c in counts)
        if width > len(self.tp):  # a label or prediction beyond num_classes: grow, keep counting
            self.tp, self.pp, self.ap = (
                np.pad(a, (0, width - len(a))) for a in (self.tp, self.pp, self.ap)
            )
        for acc, c in zip((self.tp, self.pp, self.ap), counts, strict=True):
            acc[: len(c)] += c
        self.rows += len(y)
        self.correct += int(hit.sum())

    def result(self) -> EvalResult:
        denom = (self.pp + self.ap).astype(np.float64)
        present = denom > 0
        f1 = np.divide(
            2 * self.tp.astype(np.float64), denom, out=np.zeros_like(denom), where=present
        )
        return EvalResult(
            num_examples=self.rows,
            loss=self.loss / self.rows,
            accuracy=self.correct / self.rows,
            macro_f1=float(f1[present].mean()) if present.any() else 0.0,
            extra={name: float(metric.compute()) for name, metric in self.metrics.items()},
        )


def _evaluate_batches(
    model: nn.Module, batches: Iterable[Batch], num_classes: int, hooks: _Hooks = _DEFAULT_HOOKS
) -> EvalResult | None:
    device = pick_device()
    model.to(device).eval()
    acc = _Confusion(num_classes, hooks)
    try:
        for xb, yb in batches:
            xb = hooks.features(xb.to(device, non_blocking=True))
            yb = yb.to(device, non_blocking=True)
            acc.add(model(xb).float(), yb)
    finally:
        model.to("cpu")
    return acc.result() if acc.rows else None


def _array_batches(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], batch_size: int
) -> Iterator[Batch]:
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
        yb = torch.from_numpy(np.ascontiguousarray(y[start : start + batch_size], dtype=np.int64))
        yield xb, yb


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Features,
    y: Labels,
    *,
    num_classes: int = 10,
    batch_size: int = 1024,
    recipe: Recipe | None = None,
    transform: Transform | None = None,
) -> EvalResult:
    """Loss (cross-entropy, or the recipe's), accuracy, macro-F1 and the recipe's own metrics
    of ``model`` on ``(x, y)``.

    Macro-F1 averages the per-class F1 over the classes present in ``y`` or predicted. Metrics
    are accumulated batch by batch (per-class counts), so memory does not grow with the data.

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        x: Features (N, F) float32, or a site split's :class:`StreamedFeatures`.
        y: Labels (N,) int64, or the same split's :class:`StreamedLabels`.
        num_classes: Number of classes (width of the per-class counts).
        batch_size: Rows per forward pass.
        recipe: The site's recipe (``None``: cross-entropy, no extra metrics).
        transform: ``recipe``'s preprocessing as fitted on the *training* data
            (:func:`fit_preprocessing`); required exactly when the recipe has one.

    Raises:
        ValueError: If ``x`` and ``y`` disagree in length or kind, or are empty; the transform
            is missing or unexpected.
        fedseal.client.data.DatasetError: Streamed data only: a shard fails mid-stream.
    """
    source = _stream_source(x, y, "evaluation")
    if source is not None:
        return evaluate_stream(
            model,
            source,
            num_classes=num_classes,
            batch_size=batch_size,
            recipe=recipe,
            transform=transform,
        )
    if (
        not isinstance(x, np.ndarray)
        or not isinstance(y, np.ndarray)
        or len(x) != len(y)
        or len(x) == 0
    ):
        raise ValueError(f"bad evaluation data: {len(x)} features rows, {len(y)} labels")
    hooks = _Hooks.of(recipe, transform)
    result = _evaluate_batches(model, _array_batches(x, y, batch_size), num_classes, hooks)
    if result is None:  # unreachable: x is not empty
        raise ValueError("bad evaluation data: no rows")
    return result


@torch.no_grad()
def evaluate_stream(
    model: nn.Module,
    source: BatchSource,
    *,
    num_classes: int = 10,
    batch_size: int = 1024,
    recipe: Recipe | None = None,
    transform: Transform | None = None,
) -> EvalResult:
    """:func:`evaluate` over one unshuffled pass of ``source``.

    Raises:
        ValueError: The source yielded no rows, or another number than ``source.num_rows``;
            the transform is missing or unexpected.
        fedseal.client.data.DatasetError: A shard fails mid-stream (raised by the source).
    """
    hooks = _Hooks.of(recipe, transform)
    batches = source.batches(batch_size=batch_size, seed=0, epoch=0, shuffle=False)
    result = _evaluate_batches(model, batches, num_classes, hooks)
    if result is None:
        raise ValueError("bad evaluation data: the stream has no rows")
    if result.num_examples != source.num_rows:
        raise ValueError(
            f"bad evaluation data: streamed {result.num_examples} rows, the source has {source.num_rows}"
        )
    return result


def check_recipe(name: str, *, num_features: int, num_classes: int) -> Recipe:
    """Resolve ``name`` and run each part of its recipe once on a few rows of zeros: model,
    preprocessing (fitted on those rows), one training step with the recipe's optimizer, loss
    and step, and one evaluation with its metrics. A site can call it at start-up so that a
    missing or broken recipe is named before the first round (``fl-client run`` does not yet).

    Raises:
        RecipeError: The recipe cannot be resolved, or a part of it fails (its message names
            the recipe and the failure in one line).
    """
    from fedseal.client.models import build_model, resolve_recipe

    recipe = resolve_recipe(name)
    model = build_model(
        name, seed=0, num_features=num_features, num_classes=num_classes, recipe=recipe
    )
    x = np.zeros((4, num_features), np.float32)
    y = (np.arange(4) % max(1, num_classes)).astype(np.int64)
    try:
        transform = fit_preprocessing(recipe, x)
        train(
            model,
            x,
            y,
            TrainRequest(epochs=1, batch_size=2),
            seed=0,
            recipe=recipe,
            transform=transform,
        )
        evaluate(model, x, y, num_classes=num_classes, recipe=recipe, transform=transform)
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise RecipeError(
            name, f"fails on {num_features} features, {num_classes} classes: {reason}"
        ) from exc
    return recipe
