"""Local training and evaluation at a site: a plain loop a reader can hold in their head.

Usage::

    from fedseal.client.training import SiteLimits, TrainRequest, train, evaluate
    limits = SiteLimits()                                   # what this site allows
    req = limits.clamp(TrainRequest(epochs=5, batch_size=64, learning_rate=0.05))
    result = train(model, data.x_train, data.y_train, req, seed=1)   # streamed from the shards
    result = train(model, x, y, req, seed=1)                # or arrays: x (N, 784) float32, y (N,) int64
    metrics = evaluate(model, data.x_val, data.y_val)       # loss, accuracy, macro-F1

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
is chosen automatically (CUDA if present, else CPU); on CUDA the forward pass runs under bf16
autocast. Gradients are clipped to ``clip_norm`` before every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

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
    "TrainingLoop",
    "evaluate",
    "evaluate_stream",
    "pick_device",
    "train",
    "train_stream",
    "warm_up",
]

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
    """Local evaluation metrics."""

    num_examples: int
    loss: float
    accuracy: float
    macro_f1: float


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
    parts = [batch[column].numpy() for batch in source.batches(batch_size=8192, seed=0, epoch=0, shuffle=False)]
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

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> npt.NDArray[Any]:
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

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> npt.NDArray[Any]:
        return _materialise(self.source, 1, dtype)


Features = npt.NDArray[np.float32] | StreamedFeatures
Labels = npt.NDArray[np.int64] | StreamedLabels

TrainingLoop = Callable[[nn.Module, Features, Labels, TrainRequest, int], TrainResult]
"""Signature of a custom training loop named as ``module:callable``."""


def _stream_source(x: Features, y: Labels, what: str) -> BatchSource | None:
    """The streamed source behind ``(x, y)``, or ``None`` for two arrays.

    Raises:
        ValueError: ``x`` and ``y`` are not both arrays or both views of the same source.
    """
    if isinstance(x, StreamedFeatures) or isinstance(y, StreamedLabels):
        if not (isinstance(x, StreamedFeatures) and isinstance(y, StreamedLabels) and x.source is y.source):
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
) -> torch.Tensor:
    """One SGD step (bf16 autocast on CUDA, gradient clipping, FedProx term if ``prox``);
    returns the batch's data loss (without the proximal term) as a 0-d float32 tensor on the
    device: reading it would wait for the GPU, so the loops keep them and read them once."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = nn.functional.cross_entropy(model(xb), yb)
    data_loss = loss.detach().float()
    if prox is not None:
        loss = loss + prox.term(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return data_loss


def optimizer_for(model: nn.Module, req: TrainRequest, device: torch.device) -> torch.optim.Optimizer:
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
        if self._pending:
            self._fold()
        return 0.0 if self._total is None else float(self._total) / self.steps


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


def train(model: nn.Module, x: Features, y: Labels, req: TrainRequest, seed: int) -> TrainResult:
    """Train ``model`` in place with SGD (momentum 0.9) for ``req.epochs`` epochs.

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        x: Features, shape (N, F) float32, or a site split's :class:`StreamedFeatures`.
        y: Labels, shape (N,) int64, or the same split's :class:`StreamedLabels`.
        req: Hyper-parameters, already clamped by the site's limits.
        seed: Seed for the shuffling order (the round number mixed with a site secret).

    Raises:
        ValueError: If ``x`` and ``y`` disagree in length or kind, or are empty.
        fedseal.client.data.DatasetError: Streamed data only: a shard fails mid-stream (names it).
        fedseal.client.site_data.SiteDataError: Streamed data only: the rows differ from the
            split's count (the data changed since it was loaded).
    """
    source = _stream_source(x, y, "training")
    if source is not None:
        return train_stream(model, source, req, seed=seed)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"bad training data: {len(x)} features rows, {len(y)} labels")
    device = pick_device()
    model.to(device).train()
    opt = optimizer_for(model, req, device)
    prox = _Proximal.of(model, req)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses = Losses()
    for _ in range(req.epochs):
        order = torch.randperm(len(xt), generator=gen).to(device)
        for start in range(0, len(xt), req.batch_size):
            idx = order[start : start + req.batch_size]
            losses.add(train_step(model, opt, xt[idx], yt[idx], req.clip_norm, device, prox))
    mean_loss = losses.mean()
    model.to("cpu")
    return TrainResult(num_examples=len(x), mean_loss=mean_loss, steps=losses.steps)


def train_stream(model: nn.Module, source: BatchSource, req: TrainRequest, *, seed: int) -> TrainResult:
    """Train ``model`` in place on batches streamed from ``source`` (same loop as :func:`train`).

    Epoch ``e`` reads ``source.batches(batch_size=req.batch_size, seed=seed, epoch=e,
    shuffle=True)``; each batch is moved to the device as it arrives (pinned memory and
    non-blocking copies on CUDA), so memory is what the source buffers plus one batch.

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        source: The training rows.
        req: Hyper-parameters, already clamped by the site's limits.
        seed: Seed for the shuffling order.

    Returns:
        The result; ``num_examples`` is the number of rows each epoch trained on.

    Raises:
        ValueError: The source is empty, or an epoch yielded another number of rows than
            ``source.num_rows``.
        fedseal.client.data.DatasetError: A shard fails mid-stream (raised by the source).
    """
    expected = source.num_rows
    if expected <= 0:
        raise ValueError("bad training data: the stream has no rows")
    device = pick_device()
    model.to(device).train()
    opt = optimizer_for(model, req, device)
    prox = _Proximal.of(model, req)
    losses = Losses()
    try:
        for epoch in range(req.epochs):
            rows = 0
            for xb, yb in source.batches(batch_size=req.batch_size, seed=seed, epoch=epoch, shuffle=True):
                xb = xb.to(device, non_blocking=True)
                yb = yb.to(device, non_blocking=True)
                losses.add(train_step(model, opt, xb, yb, req.clip_norm, device, prox))
                rows += len(yb)
            if rows != expected:
                raise ValueError(f"bad training data: epoch {epoch} streamed {rows} rows, the source has {expected}")
        mean_loss = losses.mean()
    finally:
        model.to("cpu")
    return TrainResult(num_examples=expected, mean_loss=mean_loss, steps=losses.steps)


class _Confusion:
    """Running loss sum and per-class counts (true positives, predicted, actual): O(classes) memory."""

    def __init__(self, num_classes: int) -> None:
        self.rows = 0
        self.correct = 0
        self.loss = 0.0
        self.tp = np.zeros(num_classes, np.int64)
        self.pp = np.zeros(num_classes, np.int64)
        self.ap = np.zeros(num_classes, np.int64)

    def add(self, logits: torch.Tensor, yb: torch.Tensor) -> None:
        self.loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        pred = logits.argmax(1).cpu().numpy()
        y = yb.cpu().numpy()
        hit = pred == y
        counts = [np.bincount(v, minlength=len(self.tp)) for v in (y[hit], pred, y)]
        width = max(len(c) for c in counts)
        if width > len(self.tp):  # a label or prediction beyond num_classes: grow, keep counting
            self.tp, self.pp, self.ap = (np.pad(a, (0, width - len(a))) for a in (self.tp, self.pp, self.ap))
        for acc, c in zip((self.tp, self.pp, self.ap), counts, strict=True):
            acc[: len(c)] += c
        self.rows += len(y)
        self.correct += int(hit.sum())

    def result(self) -> EvalResult:
        denom = (self.pp + self.ap).astype(np.float64)
        present = denom > 0
        f1 = np.divide(2 * self.tp.astype(np.float64), denom, out=np.zeros_like(denom), where=present)
        return EvalResult(
            num_examples=self.rows,
            loss=self.loss / self.rows,
            accuracy=self.correct / self.rows,
            macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        )


def _evaluate_batches(model: nn.Module, batches: Iterable[Batch], num_classes: int) -> EvalResult | None:
    device = pick_device()
    model.to(device).eval()
    acc = _Confusion(num_classes)
    try:
        for xb, yb in batches:
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            acc.add(model(xb).float(), yb)
    finally:
        model.to("cpu")
    return acc.result() if acc.rows else None


def _array_batches(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], batch_size: int) -> Iterator[Batch]:
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
) -> EvalResult:
    """Cross-entropy loss, accuracy and macro-F1 of ``model`` on ``(x, y)``.

    Macro-F1 averages the per-class F1 over the classes present in ``y`` or predicted. Metrics
    are accumulated batch by batch (per-class counts), so memory does not grow with the data.

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        x: Features (N, F) float32, or a site split's :class:`StreamedFeatures`.
        y: Labels (N,) int64, or the same split's :class:`StreamedLabels`.
        num_classes: Number of classes (width of the per-class counts).
        batch_size: Rows per forward pass.

    Raises:
        ValueError: If ``x`` and ``y`` disagree in length or kind, or are empty.
        fedseal.client.data.DatasetError: Streamed data only: a shard fails mid-stream.
    """
    source = _stream_source(x, y, "evaluation")
    if source is not None:
        return evaluate_stream(model, source, num_classes=num_classes, batch_size=batch_size)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"bad evaluation data: {len(x)} features rows, {len(y)} labels")
    result = _evaluate_batches(model, _array_batches(x, y, batch_size), num_classes)
    if result is None:  # unreachable: x is not empty
        raise ValueError("bad evaluation data: no rows")
    return result


@torch.no_grad()
def evaluate_stream(model: nn.Module, source: BatchSource, *, num_classes: int = 10, batch_size: int = 1024) -> EvalResult:
    """:func:`evaluate` over one unshuffled pass of ``source``.

    Raises:
        ValueError: The source yielded no rows, or another number than ``source.num_rows``.
        fedseal.client.data.DatasetError: A shard fails mid-stream (raised by the source).
    """
    batches = source.batches(batch_size=batch_size, seed=0, epoch=0, shuffle=False)
    result = _evaluate_batches(model, batches, num_classes)
    if result is None:
        raise ValueError("bad evaluation data: the stream has no rows")
    if result.num_examples != source.num_rows:
        raise ValueError(f"bad evaluation data: streamed {result.num_examples} rows, the source has {source.num_rows}")
    return result
