"""A site's data at scale: memory bounded whatever the row count, a shuffle keyed by the site's
secret, and a training-only augment hook applied as batches stream."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedseal.client.data import PrepareOptions, prepare_dataset
from fedseal.client.flower_app import SiteRuntime
from fedseal.client.recipe import Recipe
from fedseal.client.site_data import SiteData, load_site_data
from fedseal.client.training import TrainRequest, train
from tests.client._data_support import make_dataset

FEATURES = 64
Batch = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _float_dataset(root: Path, rows: int) -> Path:
    """``rows`` rows of 64 float32 features, prepared by ``fl-client data prepare``'s code."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
    source = root / f"src-{rows}.parquet"
    pq.write_table(
        pa.table({"x": column, "label": pa.array(np.arange(rows) % 10, pa.int64())}), source
    )
    out = root / f"d-{rows}"
    options = PrepareOptions(row_group_rows=1024, target_shard_bytes=4 << 20, buffer_bytes=4 << 20)
    prepare_dataset(source, out, options=options, salt=bytes(32))
    return out


def _peak_of_a_training_pass(data: SiteData, batch_size: int) -> int:
    """Peak bytes of numpy's allocations (tracemalloc, every thread) plus the most Arrow held at
    any batch, over one shuffled pass of the training part."""
    arrow_peak = 0
    rows = 0
    tracemalloc.start()
    try:
        base = pa.total_allocated_bytes()
        for _x, y in data.train.batches(batch_size=batch_size, seed=5, epoch=0, shuffle=True):
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
            rows += len(y)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == data.train.num_rows
    return numpy_peak + arrow_peak


def test_a_training_pass_stays_under_the_documented_memory_bound_whatever_the_row_count(
    tmp_path: Path,
) -> None:
    settings: dict[str, Any] = {
        "validation_fraction": 0.1,
        "seed": 7,
        "shuffle_buffer": 1024,
        "read_batch_rows": 512,
    }
    small = load_site_data(_float_dataset(tmp_path, 20_000), **settings)
    large = load_site_data(_float_dataset(tmp_path, 160_000), **settings)
    bound = large.train.memory_bound(batch_size=256)
    assert bound == pytest.approx(
        small.train.memory_bound(batch_size=256), rel=0.01
    )  # not the row count
    as_float32 = large.train.num_rows * FEATURES * 4
    assert as_float32 > 10 * bound  # the dataset is much larger than the bound
    peak_small = _peak_of_a_training_pass(small, 256)
    peak_large = _peak_of_a_training_pass(large, 256)
    # Generous margin (numpy's and Arrow's peaks are summed though they need not coincide;
    # small Python objects); 8x the rows must not mean more memory.
    assert peak_large <= 1.5 * bound, (peak_large, bound)
    assert peak_large <= 1.5 * peak_small + (1 << 20), (peak_small, peak_large)


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ids") / "d"
    make_dataset(d, [700, 450, 900, 260], row_group_rows=64)  # ids 0..2309, x = [id, 2 id, 3 id]
    return d


def _order(data: SiteData, seed: int, epoch: int = 0) -> list[int]:
    return [
        int(v)
        for x, _y in data.train.batches(batch_size=64, seed=seed, epoch=epoch, shuffle=True)
        for v in x[:, 0]
    ]


def test_the_training_order_comes_from_the_sites_secret_and_repeats_for_the_same_secret_run_and_round(
    ids_dir: Path,
) -> None:
    """Through the seed the deployed site uses (``SiteRuntime.training_seed``): HMAC of the signed
    run and round under the site's training secret."""
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=256)
    run = bytes(range(16))
    site = SiteRuntime(name="a", data=data, training_secret=b"\x01" * 32)
    same = SiteRuntime(name="a", data=data, training_secret=b"\x01" * 32)
    other = SiteRuntime(name="a", data=data, training_secret=b"\x02" * 32)
    order = _order(data, site.training_seed(run, 3))
    assert order == _order(data, same.training_seed(run, 3))  # reproducible at the site
    assert order != _order(data, other.training_seed(run, 3))  # another secret, another order
    assert order != _order(data, site.training_seed(run, 4))  # another round
    assert order != _order(data, site.training_seed(run, 3), epoch=1)  # another epoch
    assert sorted(order) == sorted(_order(data, other.training_seed(run, 3)))  # the same rows


def test_the_shuffle_moves_whole_row_groups_far_but_rows_only_within_the_buffer(
    ids_dir: Path,
) -> None:
    """The documented quality: row groups in a random order (not file order), then a local
    shuffle: neither the file order nor a near-sorted order survives."""
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=256)
    order = np.array(_order(data, seed=11))
    groups = order // 64  # make_dataset's 64-row groups (ids are consecutive across shards)
    first_seen = list(dict.fromkeys(groups.tolist()))
    assert first_seen != sorted(first_seen)  # row groups come in a permuted order
    assert abs(np.corrcoef(np.arange(len(order)), order)[0, 1]) < 0.5
    neighbours = np.abs(np.diff(order)) == 1
    assert neighbours.mean() < 0.1  # rows are mixed inside the buffer, not read out in runs


def flip_and_mark(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
    """Test augment: reverse the features of a random half of the rows (a 'horizontal flip')."""
    mask = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(mask[:, None], x.flip(-1), x), y


def _bad_augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
    return x[:, :2], y


def _flipped(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] == 3 * x[:, 2]) & (x[:, 2] > 0)  # rows x = [id, 2 id, 3 id] reversed (not id 0)


def test_augment_transforms_training_batches_only_reproducibly_for_a_seed(ids_dir: Path) -> None:
    plain = load_site_data(ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=128)
    data = plain.with_augment(flip_and_mark)
    shuffled = list(data.train.batches(batch_size=50, seed=4, epoch=0, shuffle=True))
    flipped = torch.cat([_flipped(x) for x, _ in shuffled])
    assert 0.4 < flipped.float().mean() < 0.6  # about half the rows, per the hook
    again = list(data.train.batches(batch_size=50, seed=4, epoch=0, shuffle=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shuffled, again, strict=True))
    other = torch.cat(
        [_flipped(x) for x, _ in data.train.batches(batch_size=50, seed=5, epoch=0, shuffle=True)]
    )
    assert len(other) == len(flipped) and not torch.equal(
        other, torch.cat([_flipped(x) for x, _ in shuffled])
    )
    # Not on the unshuffled pass that fits a preprocessing, not on validation, not on the original.
    for part, shuffle in ((data.train, False), (data.validation, True), (plain.train, True)):
        assert not any(
            _flipped(x).any()
            for x, _ in part.batches(batch_size=50, seed=4, epoch=0, shuffle=shuffle)
        )


def test_augment_runs_in_loader_workers_and_in_training(ids_dir: Path) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7, num_workers=2).with_augment(
        flip_and_mark
    )
    flipped = sum(
        int(_flipped(x).sum())
        for x, _ in data.train.batches(batch_size=64, seed=1, epoch=0, shuffle=True)
    )
    assert 0 < flipped < data.train.num_rows
    result = train(
        torch.nn.Linear(3, 5), data.x_train, data.y_train, TrainRequest(batch_size=64), seed=1
    )
    assert result.num_examples == data.train.num_rows


def test_an_augment_that_changes_the_batch_shape_is_refused_naming_what_it_returned(
    ids_dir: Path,
) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7).with_augment(_bad_augment)
    with pytest.raises(
        ValueError,
        match=r"augment returned features torch.float32 \(64, 2\), expected float32 \(64, 3\)",
    ):
        next(iter(data.train.batches(batch_size=64, seed=1, epoch=0, shuffle=True)))
    with pytest.raises(TypeError, match=r"Recipe\.augment must be callable"):
        Recipe(model=torch.nn.Linear, augment="flip")  # type: ignore[arg-type, unused-ignore]


def test_the_ranks_shares_of_a_pass_are_disjoint_and_together_the_whole_pass(ids_dir: Path) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=100)
    shares = [
        [int(v) for x, _ in data.train.rank_batches(rank=r, world=3, batch_size=40, seed=2, epoch=1, shuffle=True) for v in x[:, 0]]
        for r in range(3)
    ]  # fmt: skip
    assert all(shares)
    assert sum(len(s) for s in shares) == data.train.num_rows
    assert sorted(v for s in shares for v in s) == sorted(_order(data, seed=2, epoch=1))
    with pytest.raises(ValueError, match=r"rank 3 is not in \[0, 3\)"):
        next(
            iter(
                data.train.rank_batches(
                    rank=3, world=3, batch_size=40, seed=2, epoch=1, shuffle=True
                )
            )
        )


def test_a_recipes_augment_is_applied_by_the_training_loop_and_refused_for_arrays(ids_dir: Path) -> None:
    """What a deployed site trains through (``train`` on its streamed split): the recipe's
    ``augment`` reaches every training batch; in-memory arrays refuse it in one line."""
    seen: list[int] = []

    def counting(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
        seen.append(len(x))
        return flip_and_mark(x, y, gen)

    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7)
    recipe = Recipe(model=lambda f, c: torch.nn.Linear(f, c), augment=counting)
    result = train(torch.nn.Linear(3, 5), data.x_train, data.y_train, TrainRequest(batch_size=64), seed=1, recipe=recipe)
    assert sum(seen) == result.num_examples == data.train.num_rows
    x = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match="augment applies to a site's streamed data, not to arrays"):
        train(torch.nn.Linear(3, 5), x, np.zeros(8, np.int64), TrainRequest(batch_size=4), seed=1, recipe=recipe)
