"""FedProx: the coordinator's proximal-mu reaches local training, which stays nearer the global model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from fedseal.client.flower_app import train_request
from fedseal.client.models import build_model
from fedseal.client.training import SiteLimits, TrainRequest, train
from fedseal.server.flower_app import train_config


def _distance_after_training(mu: float) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = build_model("mlp", seed=3, num_features=20, num_classes=2)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, x, y, TrainRequest(epochs=3, batch_size=32, learning_rate=0.1, proximal_mu=mu), seed=1)
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True)))


def test_a_proximal_term_keeps_the_local_model_nearer_the_global_one() -> None:
    plain, prox = _distance_after_training(0.0), _distance_after_training(5.0)
    assert prox < 0.5 * plain, (plain, prox)
    torch.testing.assert_close(torch.tensor(_distance_after_training(0.0)), torch.tensor(plain))  # deterministic


def test_the_site_caps_the_proximal_weight_and_refuses_a_negative_one() -> None:
    limits = SiteLimits(max_proximal_mu=2.0)
    assert limits.clamp(TrainRequest(proximal_mu=50.0)).proximal_mu == 2.0
    assert limits.clamp(TrainRequest(proximal_mu=-1.0)).proximal_mu == 0.0


def test_fedprox_runs_send_proximal_mu_and_others_do_not() -> None:
    def cfg(strategy: str, options: dict[str, float]) -> SimpleNamespace:
        run = SimpleNamespace(
            epochs=1, batch_size=32, learning_rate=0.05, clip_norm=5.0, model="mlp", seed=1,
            strategy=strategy, strategy_options=options, contract_digest=b"",
        )
        return SimpleNamespace(run=run)

    rec = train_config(cfg("FedProx", {"proximal_mu": 0.3}), 2, "ab" * 16)  # type: ignore[arg-type]
    assert rec["proximal-mu"] == 0.3
    assert train_request(rec).proximal_mu == 0.3
    plain = train_config(cfg("FedAvg", {}), 2, "ab" * 16)  # type: ignore[arg-type]
    assert "proximal-mu" not in plain and train_request(plain).proximal_mu == 0.0
