"""Local training and evaluation at a site: a plain loop a reader can hold in their head.

Usage::

    from fedseal.client.training import SiteLimits, TrainRequest, train, evaluate
    limits = SiteLimits()                                   # what this site allows
    req = limits.clamp(TrainRequest(epochs=5, batch_size=64, learning_rate=0.05))
    result = train(model, x, y, req, seed=1)                # x: (N, 784) float32, y: (N,) int64
    metrics = evaluate(model, x_val, y_val)                 # loss, accuracy, macro-F1

The coordinator proposes epochs, batch size and learning rate; the site clamps them to its own
limits (``SiteLimits``), so a coordinator cannot make a site burn unbounded compute. The device
is chosen automatically (CUDA if present, else CPU); on CUDA the forward pass runs under bf16
autocast. Gradients are clipped to ``clip_norm`` before every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = [
    "EvalResult",
    "SiteLimits",
    "TrainRequest",
    "TrainResult",
    "TrainingLoop",
    "evaluate",
    "pick_device",
    "train",
    "warm_up",
]


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """Training hyper-parameters for one round (sent by the coordinator)."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    clip_norm: float = 5.0


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Upper bounds a site puts on what a coordinator may ask for."""

    max_epochs: int = 5
    max_batch_size: int = 512
    max_learning_rate: float = 1.0
    max_clip_norm: float = 100.0

    def clamp(self, req: TrainRequest) -> TrainRequest:
        """Return ``req`` with every field clamped into ``[1 or tiny, limit]``."""
        return TrainRequest(
            epochs=min(max(1, int(req.epochs)), self.max_epochs),
            batch_size=min(max(1, int(req.batch_size)), self.max_batch_size),
            learning_rate=min(max(1e-8, float(req.learning_rate)), self.max_learning_rate),
            clip_norm=min(max(1e-6, float(req.clip_norm)), self.max_clip_norm),
        )


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training produced (the weights stay in the model)."""

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


TrainingLoop = Callable[
    [nn.Module, npt.NDArray[np.float32], npt.NDArray[np.int64], TrainRequest, int], TrainResult
]
"""Signature of a custom training loop named as ``module:callable``."""


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


def train(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    req: TrainRequest,
    seed: int,
) -> TrainResult:
    """Train ``model`` in place with SGD (momentum 0.9) for ``req.epochs`` epochs.

    Args:
        model: The model; moved to the chosen device and back to CPU afterwards.
        x: Features, shape (N, F), float32.
        y: Labels, shape (N,), int64.
        req: Hyper-parameters, already clamped by the site's limits.
        seed: Seed for the shuffling order (the round number mixed with a site secret).

    Raises:
        ValueError: If ``x`` and ``y`` disagree in length or are empty.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"bad training data: {len(x)} features rows, {len(y)} labels")
    device = pick_device()
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=req.learning_rate, momentum=0.9)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    use_amp = device.type == "cuda"
    total, steps = 0.0, 0
    for _ in range(req.epochs):
        order = torch.randperm(len(xt), generator=gen).to(device)
        for start in range(0, len(xt), req.batch_size):
            idx = order[start : start + req.batch_size]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(model.parameters(), req.clip_norm)
            opt.step()
            total += float(loss.detach())
            steps += 1
    model.to("cpu")
    return TrainResult(num_examples=len(x), mean_loss=total / max(steps, 1), steps=steps)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    num_classes: int = 10,
    batch_size: int = 1024,
) -> EvalResult:
    """Cross-entropy loss, accuracy and macro-F1 of ``model`` on ``(x, y)``.

    Macro-F1 averages the per-class F1 over the classes present in ``y`` or predicted.

    Raises:
        ValueError: If ``x`` and ``y`` disagree in length or are empty.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"bad evaluation data: {len(x)} features rows, {len(y)} labels")
    device = pick_device()
    model.to(device).eval()
    losses, preds = [], []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)
        yb = torch.from_numpy(np.ascontiguousarray(y[start : start + batch_size])).to(device)
        logits = model(xb).float()
        losses.append(nn.functional.cross_entropy(logits, yb, reduction="sum").item())
        preds.append(logits.argmax(1).cpu().numpy())
    model.to("cpu")
    pred = np.concatenate(preds)
    # Confusion counts per class, vectorised: tp, predicted-positive, actual-positive.
    tp = np.bincount(y[pred == y], minlength=num_classes).astype(np.float64)
    pp = np.bincount(pred, minlength=num_classes).astype(np.float64)
    ap = np.bincount(y, minlength=num_classes).astype(np.float64)
    denom = pp + ap
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return EvalResult(
        num_examples=len(x),
        loss=sum(losses) / len(x),
        accuracy=float((pred == y).mean()),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
    )
