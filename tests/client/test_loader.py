"""The streaming loader: every row exactly once per epoch across workers, deterministic, checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.client.data import SchemaMismatchError, ShardDataset, make_loader
from fedseal.client.data.manifest import MANIFEST_NAME
from tests.client._data_support import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("loader") / "d"
    make_dataset(d, [250, 130, 300, 17], row_group_rows=64)  # 12 row groups of uneven sizes
    return d


def _ids(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(v) for x, _y in batches for v in x[:, 0]]


def _epoch(d: Path, *, workers: int = 0, **kwargs: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = ShardDataset(d, **kwargs)  # type: ignore[arg-type]
    return list(make_loader(ds, num_workers=workers, pin_memory=False))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle_buffer", [0, 50, 10_000])
def test_every_row_is_seen_exactly_once_per_epoch_across_workers(dataset: Path, workers: int, shuffle_buffer: int) -> None:
    batches = _epoch(dataset, workers=workers, batch_size=32, shuffle_buffer=shuffle_buffer, seed=1)
    assert sorted(_ids(batches)) == list(range(697))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x[:, 1], 2 * x[:, 0]) and torch.equal(x[:, 2], 3 * x[:, 0])  # rows intact
        assert torch.equal(y, x[:, 0].long() % 5)  # labels travel with their rows
        assert 1 <= len(x) <= 32


def test_the_order_is_deterministic_for_a_seed_and_epoch_and_changes_with_either(dataset: Path) -> None:
    first = _ids(_epoch(dataset, batch_size=20, shuffle_buffer=100, seed=5, epoch=0))
    assert first == _ids(_epoch(dataset, batch_size=20, shuffle_buffer=100, seed=5, epoch=0))
    assert first != _ids(_epoch(dataset, batch_size=20, shuffle_buffer=100, seed=5, epoch=1))
    assert first != _ids(_epoch(dataset, batch_size=20, shuffle_buffer=100, seed=6, epoch=0))
    assert first != sorted(first)


def test_with_two_workers_the_order_is_still_deterministic(dataset: Path) -> None:
    a = _ids(_epoch(dataset, workers=2, batch_size=16, shuffle_buffer=64, seed=2))
    b = _ids(_epoch(dataset, workers=2, batch_size=16, shuffle_buffer=64, seed=2))
    assert a == b


def test_set_epoch_reshuffles_between_epochs(dataset: Path) -> None:
    ds = ShardDataset(dataset, batch_size=50, shuffle_buffer=200, seed=0)
    loader = make_loader(ds, pin_memory=False)
    epoch0 = [int(v) for x, _ in loader for v in x[:, 0]]
    ds.set_epoch(1)
    epoch1 = [int(v) for x, _ in loader for v in x[:, 0]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(697)) and epoch0 != epoch1


def test_without_shuffling_rows_come_in_file_order(dataset: Path) -> None:
    assert _ids(_epoch(dataset, batch_size=100, shuffle_buffer=0)) == list(range(697))


def test_drop_last_drops_only_the_incomplete_final_batch(dataset: Path) -> None:
    batches = _epoch(dataset, batch_size=100, shuffle_buffer=0, drop_last=True)
    assert [len(x) for x, _ in batches] == [100] * 6


def test_features_have_the_manifest_shape_or_are_flattened(tmp_path: Path) -> None:
    from fedseal.client.data import prepare_dataset

    prepare_dataset("mnist-5k", tmp_path / "m")
    x, y = next(iter(make_loader(ShardDataset(tmp_path / "m", batch_size=8), pin_memory=False)))
    assert x.shape == (8, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.shape == (8,) and int(y.max()) < 10
    x, _ = next(iter(ShardDataset(tmp_path / "m", batch_size=8, flatten=True)))
    assert x.shape == (8, 784)


def test_a_manifest_whose_feature_shape_does_not_fit_the_shards_is_refused_before_training(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [50])
    doc = json.loads((d / MANIFEST_NAME).read_text())
    doc["schema"]["feature_shape"] = [4]
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SchemaMismatchError) as info:
        ShardDataset(d)
    assert "shape" in info.value.reason


def test_the_shuffle_buffer_mixes_label_sorted_data_within_its_window(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [1000], row_group_rows=1000)  # one unit, ids in order
    ids = np.array(_ids(_epoch(d, batch_size=1000, shuffle_buffer=1000, seed=3)))
    assert sorted(ids.tolist()) == list(range(1000))
    assert abs(np.corrcoef(ids, np.arange(1000))[0, 1]) < 0.2  # a full-size buffer: near-uniform


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=8),
    capacity=st.integers(min_value=1, max_value=257),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_the_shuffle_buffer_emits_every_row_exactly_once(chunks: list[int], capacity: int, seed: int) -> None:
    from fedseal.client.data.loader import ShuffleBuffer

    buffer = ShuffleBuffer(capacity, np.random.default_rng(seed))
    out: list[int] = []
    start = 0
    for n in chunks:
        ids = np.arange(start, start + n, dtype=np.int64)
        start += n
        for x, y in buffer.push(np.stack([ids, ids], axis=1), ids):
            assert np.array_equal(x[:, 0], y)
            out.extend(y.tolist())
    for x, y in buffer.drain():
        assert np.array_equal(x[:, 1], y)
        out.extend(y.tolist())
    assert sorted(out) == list(range(start))
