"""Site-side models and training (client/): shapes, limits, learning, metrics.

Kept with the server tests because tests/client belongs to the data engineer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseal.client.models import (
    ModelResolutionError,
    build_model,
    load_numpy_state_dict,
    state_dict_to_numpy,
)
from fedseal.client.training import SiteLimits, TrainRequest, evaluate, train


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_builtin_models_map_784_features_to_10_logits(name: str) -> None:
    model = build_model(name, seed=0)
    assert model(torch.zeros(5, 784)).shape == (5, 10)


def test_the_same_seed_builds_the_same_initial_weights() -> None:
    a = state_dict_to_numpy(build_model("cnn", seed=3))
    b = state_dict_to_numpy(build_model("cnn", seed=3))
    c = state_dict_to_numpy(build_model("cnn", seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_a_custom_model_is_resolved_only_from_installed_modules() -> None:
    model = build_model("torch.nn:Identity", seed=0)
    assert isinstance(model, torch.nn.Identity)
    with pytest.raises(ModelResolutionError, match="not installed"):
        build_model("no_such_module_xyz:Net", seed=0)
    with pytest.raises(ModelResolutionError):
        build_model("resnet", seed=0)


def test_loading_weights_checks_names_and_shapes() -> None:
    model = build_model("mlp", seed=0)
    weights = state_dict_to_numpy(model)
    load_numpy_state_dict(model, weights)
    bad = dict(weights)
    first = next(iter(bad))
    bad[first] = bad[first][:1]
    with pytest.raises(ValueError, match="shape"):
        load_numpy_state_dict(model, bad)
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state_dict(model, {k: v for k, v in weights.items() if k != first})


def test_site_limits_clamp_what_the_coordinator_asks_for() -> None:
    limits = SiteLimits(max_epochs=2, max_batch_size=64, max_learning_rate=0.1)
    got = limits.clamp(TrainRequest(epochs=50, batch_size=10_000, learning_rate=5.0, clip_norm=1.0))
    assert (got.epochs, got.batch_size, got.learning_rate) == (2, 64, 0.1)
    assert limits.clamp(TrainRequest(epochs=0, batch_size=0)).epochs == 1


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    centers = rng.normal(0, 1, (10, 784)).astype(np.float32)
    x = centers[y] + 0.3 * rng.normal(0, 1, (n, 784)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def test_local_training_learns_a_separable_task() -> None:
    torch.set_num_threads(1)
    x, y = _blobs(600, 0)
    model = build_model("mlp", seed=0)
    before = evaluate(model, x, y)
    result = train(model, x, y, TrainRequest(epochs=2, batch_size=32, learning_rate=0.05), seed=1)
    after = evaluate(model, x, y)
    assert result.num_examples == 600 and result.steps == 2 * 19
    assert after.accuracy > 0.9 > before.accuracy
    assert after.loss < before.loss


def test_macro_f1_matches_a_hand_computed_value() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    # predictions 0,0,1,2 for labels 0,1,1,2: F1 per class = 2/3, 2/3, 1
    x = np.array([[0], [0], [1], [2]], np.float32)
    y = np.array([0, 1, 1, 2], np.int64)
    res = evaluate(Fixed(), x, y, num_classes=3)
    assert res.accuracy == pytest.approx(0.75)
    assert res.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
