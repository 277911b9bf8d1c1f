"""The training loop's bookkeeping (on the CPU): the mean loss it reports, its bounded loss
memory, and the optimizer it builds for each device."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedseal.client import training  # noqa: E402
from fedseal.client.models import build_model  # noqa: E402
from fedseal.client.training import TrainRequest, train  # noqa: E402


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, size=n, dtype=np.int64)


@pytest.mark.parametrize("fold_every", [256, 3])
def test_the_mean_loss_is_the_mean_of_every_steps_loss(monkeypatch: pytest.MonkeyPatch, fold_every: int) -> None:
    seen: list[float] = []
    real = training.train_step

    def spy(*args: object, **kw: object) -> torch.Tensor:
        loss = real(*args, **kw)  # type: ignore[arg-type]
        seen.append(float(loss))
        return loss

    monkeypatch.setattr(training, "train_step", spy)
    monkeypatch.setattr(training.Losses, "FOLD_EVERY", fold_every)
    x, y = data(300)
    result = train(build_model("mlp", seed=0), x, y, TrainRequest(epochs=2, batch_size=32), seed=1)
    assert result.steps == len(seen) == 2 * 10
    assert result.mean_loss == pytest.approx(sum(seen) / len(seen), rel=1e-12)


def test_the_losses_kept_are_bounded() -> None:
    losses = training.Losses()
    for i in range(3 * training.Losses.FOLD_EVERY + 5):
        losses.add(torch.tensor(float(i % 7)))
        assert len(losses._pending) < training.Losses.FOLD_EVERY
    n = losses.steps
    assert n == 3 * training.Losses.FOLD_EVERY + 5
    assert losses.mean() == pytest.approx(sum(i % 7 for i in range(n)) / n)
    assert training.Losses().mean() == 0.0


@pytest.mark.parametrize(("device", "fused"), [("cuda", True), ("cpu", None)])
def test_sgd_is_fused_on_cuda_only(monkeypatch: pytest.MonkeyPatch, device: str, fused: bool | None) -> None:
    made: list[dict[str, object]] = []
    monkeypatch.setattr(torch.optim, "SGD", lambda params, **kw: made.append(kw) or "sgd")
    training.optimizer_for(build_model("mlp", seed=0), TrainRequest(learning_rate=0.2), torch.device(device))
    assert made == [{"lr": 0.2, "momentum": 0.9, "fused": fused}]
