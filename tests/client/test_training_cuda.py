"""The site's training path on a CUDA device: device choice, bf16 autocast, pinned streaming,
FedProx and evaluation on the GPU. Skipped where torch sees no GPU (CI); run on a GPU machine
with ``pytest tests/client/test_training_cuda.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedseal.client.models import build_model  # noqa: E402
from fedseal.client.training import TrainRequest, evaluate, pick_device, train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

FEATURES = 784


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes a small model learns in a few epochs: class c lights pixels 70c..70c+69."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n, dtype=np.int64)
    x = rng.random((n, FEATURES), dtype=np.float32) * 0.3
    for c in range(10):
        x[y == c, 70 * c : 70 * c + 70] += 0.7
    return x, y


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_cuda_is_the_device_chosen() -> None:
    assert pick_device().type == "cuda"


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_training_on_cuda_learns_under_bf16_autocast_and_hands_the_model_back_on_cpu(name: str) -> None:
    x, y = separable(2048, seed=1)
    model = build_model(name, seed=0)
    seen: list[torch.dtype] = []
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    hook = first_linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        result = train(model, x, y, TrainRequest(epochs=3, batch_size=64, learning_rate=0.05), seed=3)
    finally:
        hook.remove()
    assert result.steps == 3 * 32 and result.num_examples == 2048
    assert np.isfinite(result.mean_loss)
    assert seen and set(seen) == {torch.bfloat16}  # mixed precision on the GPU
    assert all(p.device.type == "cpu" for p in model.parameters())
    xv, yv = separable(1024, seed=2)
    assert evaluate(model, xv, yv).accuracy > 0.9


def test_two_cuda_runs_with_one_seed_train_alike() -> None:
    """Two CUDA runs with one seed train to the same weights (the order comes from a CPU
    generator; cuDNN may differ in the last bits, so compared with a tolerance)."""
    x, y = separable(512, seed=4)
    a, b = build_model("mlp", seed=0), build_model("mlp", seed=0)
    req = TrainRequest(epochs=1, batch_size=32)
    train(a, x, y, req, seed=9)
    train(b, x, y, req, seed=9)
    for pa_, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa_, pb, atol=1e-3, rtol=1e-3)


def test_fedprox_on_cuda_keeps_the_weights_nearer_the_global_model() -> None:
    x, y = separable(1024, seed=5)
    start = weights(build_model("mlp", seed=0))

    def distance(mu: float) -> float:
        model = build_model("mlp", seed=0)
        train(model, x, y, TrainRequest(epochs=2, batch_size=32, learning_rate=0.1, proximal_mu=mu), seed=1)
        return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True)))

    assert distance(10.0) < 0.5 * distance(0.0)


def test_evaluation_on_cuda_matches_the_cpu() -> None:
    x, y = separable(1500, seed=6)
    model = build_model("cnn", seed=0)
    train(model, x, y, TrainRequest(epochs=1, batch_size=64), seed=1)
    on_gpu = evaluate(model, x, y)
    with pytest.MonkeyPatch.context() as mp:  # the same evaluation, the GPU hidden from it

        mp.setattr("fedseal.client.training.pick_device", lambda: torch.device("cpu"))
        on_cpu = evaluate(model, x, y)
    assert on_gpu.num_examples == on_cpu.num_examples == 1500
    assert abs(on_gpu.accuracy - on_cpu.accuracy) <= 2 / 1500
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-3, abs=1e-4)


def test_streamed_training_on_cuda_reads_pinned_batches(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedseal.client.data.prepare import prepare_dataset
    from fedseal.client.site_data import load_site_data

    x, y = separable(3000, seed=7)
    source = tmp_path / "rows.parquet"
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
    pq.write_table(pa.table({"pixels": pixels, "label": pa.array(y)}), source)
    prepare_dataset(source, tmp_path / "dataset", salt=bytes(32))
    data = load_site_data(tmp_path / "dataset", validation_fraction=0.2, seed=1)

    xb, yb = next(iter(data.train.batches(batch_size=64, seed=1, epoch=0, shuffle=True)))
    assert xb.is_pinned() and yb.is_pinned()  # page-locked, so the copies can overlap compute

    model = build_model("cnn", seed=0)
    result = train(model, data.x_train, data.y_train, TrainRequest(epochs=2, batch_size=64), seed=1)
    assert result.num_examples == data.train.num_rows
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert evaluate(model, data.x_val, data.y_val).accuracy > 0.9
