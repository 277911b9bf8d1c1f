"""A site's dataset is streamed into training: bounded memory, a disjoint split, exact counts."""

from __future__ import annotations

import hashlib
import json
import math
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedseal.client import site_data
from fedseal.client.data import CorruptShardError, PrepareOptions, prepare_dataset
from fedseal.client.data.manifest import MANIFEST_NAME
from fedseal.client.models import build_model, state_dict_to_numpy
from fedseal.client.site_data import RowSplitter, SiteData, SiteDataError, SiteSplit, load_site_data
from fedseal.client.training import (
    StreamedFeatures,
    StreamedLabels,
    TrainRequest,
    evaluate,
    train,
    warm_up,
)
from tests.client._data_support import make_dataset

SIZES = [700, 450, 900, 260, 640, 50]  # six shards, 3,000 rows with ids 0..2999
TOTAL = sum(SIZES)

Batch = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows x = [id, 2 id, 3 id], label = id % 5 (tests/client/_data_support.py), 64-row groups."""
    d = tmp_path_factory.mktemp("stream") / "d"
    make_dataset(d, SIZES, row_group_rows=64)
    return d


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled MNIST-5k as several small shards of 256-row groups (784 uint8 features)."""
    d = tmp_path_factory.mktemp("mnist") / "m"
    prepare_dataset(
        "mnist-5k",
        d,
        options=PrepareOptions(target_shard_bytes=256 << 10, row_group_rows=256),
        salt=bytes(32),
    )
    return d


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as a site runs: oversubscribed OpenMP threads crawl on a busy CI host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(batches: Iterator[Batch] | list[Batch]) -> list[int]:
    return [int(v) for x, _y in batches for v in x[:, 0]]


def _part_ids(split: SiteSplit, **kwargs: int | bool) -> list[int]:
    args: dict[str, int | bool] = {
        "batch_size": 97,
        "seed": 0,
        "epoch": 0,
        "shuffle": True,
    } | kwargs
    return _ids(split.batches(**args))  # type: ignore[arg-type, unused-ignore]


class _CountingSource:
    """A BatchSource wrapper that records how many rows each batch handed to training."""

    def __init__(self, inner: SiteSplit) -> None:
        self.inner = inner
        self.consumed = 0
        self.on_batch: list[int] = []

    @property
    def num_rows(self) -> int:
        return int(self.inner.num_rows)

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterator[Batch]:
        for x, y in self.inner.batches(
            batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle
        ):
            self.on_batch.append(len(y))
            yield x, y
            self.consumed += len(y)


def test_the_train_and_validation_parts_are_disjoint_and_together_hold_every_row_once(
    ids_dir: Path,
) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7)
    train_ids, val_ids = _part_ids(data.train), _part_ids(data.validation, shuffle=False)
    assert (
        len(train_ids)
        == len(set(train_ids))
        == data.train.num_rows
        == len(data.y_train)
        == len(data.x_train)
    )
    assert (
        len(val_ids)
        == len(set(val_ids))
        == data.validation.num_rows
        == len(data.y_val)
        == len(data.x_val)
    )
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(TOTAL))
    # A binomial draw around 20 %: well inside 5 standard deviations.
    assert abs(len(val_ids) - 0.2 * TOTAL) < 5 * math.sqrt(TOTAL * 0.2 * 0.8)
    assert (data.num_features, data.num_classes) == (3, 5)


def test_rows_keep_their_labels_and_features_through_the_split(ids_dir: Path) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.3, seed=1)
    for part in (data.train, data.validation):
        for x, y in part.batches(batch_size=128, seed=3, epoch=1, shuffle=True):
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1] == 3
            assert torch.equal(x[:, 1], 2 * x[:, 0]) and torch.equal(y, x[:, 0].long() % 5)


def test_the_split_depends_only_on_the_seed_not_on_batching_shuffling_or_workers(
    ids_dir: Path,
) -> None:
    a = load_site_data(ids_dir, validation_fraction=0.2, seed=7)
    b = load_site_data(
        ids_dir,
        validation_fraction=0.2,
        seed=7,
        read_batch_rows=33,
        shuffle_buffer=50,
        num_workers=2,
    )
    val = sorted(_part_ids(a.validation))
    assert sorted(_part_ids(b.validation, batch_size=5, seed=9, epoch=4)) == val
    assert sorted(_part_ids(a.validation, shuffle=False)) == val
    other = load_site_data(ids_dir, validation_fraction=0.2, seed=8)
    assert sorted(_part_ids(other.validation)) != val


def test_rows_appended_in_new_shards_never_move_earlier_rows_between_parts(tmp_path: Path) -> None:
    make_dataset(tmp_path / "old", [300, 200])
    make_dataset(tmp_path / "new", [300, 200, 400])  # the same first 500 rows, then 400 more
    old = load_site_data(tmp_path / "old", validation_fraction=0.25, seed=3)
    new = load_site_data(tmp_path / "new", validation_fraction=0.25, seed=3)
    old_val = set(_part_ids(old.validation))
    new_val = set(_part_ids(new.validation))
    assert {i for i in new_val if i < 500} == old_val
    assert new.train.num_rows + new.validation.num_rows == 900


@settings(max_examples=60, deadline=None)
@given(
    rows=hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 20))),
    cut=st.integers(0, 40),
    seed=st.integers(0, 2**32),
)
def test_a_rows_part_depends_only_on_its_content_never_on_its_batch(
    rows: np.ndarray, cut: int, seed: int
) -> None:
    labels = (rows[:, 0] % 7).astype(np.int64)
    splitter = RowSplitter(seed, 0.4)
    whole = splitter.is_validation(rows, labels)
    cut = min(cut, len(rows))
    parts = np.concatenate(
        [
            splitter.is_validation(rows[:cut], labels[:cut]),
            splitter.is_validation(rows[cut:], labels[cut:]),
        ]
    )
    assert np.array_equal(whole, parts)
    doubled = splitter.is_validation(
        np.concatenate([rows, rows[::-1]]), np.concatenate([labels, labels[::-1]])
    )
    assert np.array_equal(
        doubled, np.concatenate([whole, whole[::-1]])
    )  # identical rows: same part


def _reference_is_validation(row: bytes, label: int, seed: int, fraction: float) -> bool:
    """The split of site_data's docstring, re-implemented from its text with Python integers."""
    mask64 = 2**64 - 1
    padded = row + bytes(-len(row) % 8)
    words = [int.from_bytes(padded[i : i + 8], "little") for i in range(0, len(padded), 8)]
    tag = b"fedseal-row-split-v1" + seed.to_bytes(8, "big") + len(words).to_bytes(4, "big")
    stream = hashlib.shake_256(tag).digest(8 * (len(words) + 2))
    keys = [int.from_bytes(stream[i : i + 8], "little") | 1 for i in range(0, len(stream), 8)]
    h = (
        sum(w * k for w, k in zip(words, keys, strict=False))
        + (label & mask64) * keys[-2]
        + keys[-1]
    ) & mask64
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask64
    h ^= h >> 31
    return h < min(math.floor(fraction * 2.0**64), mask64)


@pytest.mark.parametrize("width", [1, 3, 8, 13, 784])
def test_the_split_matches_an_independent_implementation_of_its_specification(width: int) -> None:
    rng = np.random.default_rng(width)
    rows = rng.integers(0, 256, (300, width), dtype=np.uint8)
    labels = rng.integers(0, 10, 300)
    got = RowSplitter(2**40 + 7, 0.3).is_validation(rows, labels)
    want = [
        _reference_is_validation(r.tobytes(), int(v), 2**40 + 7, 0.3)
        for r, v in zip(rows, labels, strict=True)
    ]
    assert got.tolist() == want and 30 < sum(want) < 150
    wide = rows.astype(np.int32)  # the stored dtype's bytes are hashed: int32 rows are other rows
    assert RowSplitter(2**40 + 7, 0.3).is_validation(wide, labels).tolist() == [
        _reference_is_validation(r.tobytes(), int(v), 2**40 + 7, 0.3)
        for r, v in zip(wide, labels, strict=True)
    ]


def test_the_split_fraction_is_followed_and_changing_a_label_can_change_a_rows_part() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (20_000, 13), dtype=np.uint8)
    labels = rng.integers(0, 10, 20_000)
    splitter = RowSplitter(5, 0.1)
    mask = splitter.is_validation(rows, labels)
    assert abs(mask.mean() - 0.1) < 0.01
    assert not np.array_equal(mask, splitter.is_validation(rows, labels + 1))
    assert RowSplitter(5, 0.0).is_validation(rows, labels).sum() == 0
    assert RowSplitter(5, 1.0).is_validation(rows, labels).all()


def test_the_same_seed_and_epoch_give_the_same_batches_and_another_seed_or_epoch_does_not(
    ids_dir: Path,
) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=200)
    first = list(data.train.batches(batch_size=50, seed=4, epoch=0, shuffle=True))
    again = list(data.train.batches(batch_size=50, seed=4, epoch=0, shuffle=True))
    assert len(first) == len(again) == math.ceil(data.train.num_rows / 50)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    assert _ids(first) != _ids(data.train.batches(batch_size=50, seed=5, epoch=0, shuffle=True))
    assert _ids(first) != _ids(data.train.batches(batch_size=50, seed=4, epoch=1, shuffle=True))
    assert _ids(first) != sorted(_ids(first))


def test_training_reports_exactly_the_rows_it_trained_on(ids_dir: Path) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=300)
    source = _CountingSource(data.train)
    model = torch.nn.Linear(3, 5)
    req = TrainRequest(epochs=3, batch_size=64, learning_rate=1e-4)
    result = train(model, StreamedFeatures(source), StreamedLabels(source), req, seed=2)  # type: ignore[arg-type, unused-ignore]
    assert source.consumed == 3 * result.num_examples
    assert result.num_examples == data.train.num_rows
    assert result.steps == len(source.on_batch) == 3 * math.ceil(data.train.num_rows / 64)
    plain = train(torch.nn.Linear(3, 5), data.x_train, data.y_train, req, seed=2)
    assert plain.num_examples == data.train.num_rows and plain.steps == result.steps


def test_streamed_training_is_deterministic_for_a_seed(mnist_dir: Path) -> None:
    data = load_site_data(mnist_dir, validation_fraction=0.2, seed=7, shuffle_buffer=512)
    req = TrainRequest(epochs=1, batch_size=64, learning_rate=0.05)
    weights = []
    for seed in (1, 1, 2):
        model = build_model("mlp", seed=0)
        train(model, data.x_train, data.y_train, req, seed=seed)
        weights.append(state_dict_to_numpy(model))
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not np.array_equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_streamed_evaluation_equals_evaluation_on_the_same_rows_in_memory(mnist_dir: Path) -> None:
    data = load_site_data(mnist_dir, validation_fraction=0.2, seed=7)
    model = build_model("mlp", seed=3)
    batches = list(data.validation.batches(batch_size=1000, seed=0, epoch=0, shuffle=False))
    x = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    streamed = evaluate(model, data.x_val, data.y_val, num_classes=data.num_classes, batch_size=100)
    in_memory = evaluate(model, x, y, num_classes=data.num_classes)
    assert streamed.num_examples == len(data.y_val) == len(y)
    assert streamed.accuracy == in_memory.accuracy and streamed.macro_f1 == pytest.approx(
        in_memory.macro_f1
    )
    assert streamed.loss == pytest.approx(in_memory.loss, rel=1e-5)
    assert (data.num_features, data.num_classes) == (784, 10)


def test_a_training_pass_never_holds_more_rows_than_the_buffer_allows(
    ids_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instrumented: rows decoded into the stream minus rows handed to training, at every batch.

    The documented bound: the shuffle buffer, the read-ahead's queued record batches, the one
    the reader has just decoded and the one being pushed into the buffer, a batch's worth
    waiting, and the batch in training."""
    buffer, read_rows, batch, ahead = 128, 40, 32, 2
    decoded = 0
    original = site_data.SplitShards._convert

    def counting(self: site_data.SplitShards, batch_: object, name: str) -> object:
        nonlocal decoded
        x, y = original(self, batch_, name)  # type: ignore[arg-type, unused-ignore]
        decoded += len(y)
        return x, y

    monkeypatch.setattr(site_data.SplitShards, "_convert", counting)
    data = load_site_data(
        ids_dir, validation_fraction=0.2, seed=7, shuffle_buffer=buffer, read_batch_rows=read_rows,
        prefetch_batches=ahead,
    )  # fmt: skip
    source = _CountingSource(data.train)
    held: list[int] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            held.append(decoded - source.consumed)  # rows in the loader, this batch included
            return self.linear(x)  # type: ignore[no-any-return]

    train(
        Probe(),
        StreamedFeatures(source),
        StreamedLabels(source),
        TrainRequest(batch_size=batch),
        seed=0,
    )  # type: ignore[arg-type, unused-ignore]
    bound = buffer + (2 + ahead) * read_rows + batch
    assert source.consumed == data.train.num_rows > 5 * bound
    assert max(held) <= bound
    assert max(held) >= buffer  # the shuffle buffer really fills (the bound is not vacuous)


def test_memory_of_a_training_pass_is_bounded_by_the_buffer_not_the_dataset(
    mnist_dir: Path,
) -> None:
    """tracemalloc (numpy's allocations) over one training epoch and one evaluation pass.

    (Loading is left out: the manifest reader's ``read(MAX_MANIFEST_BYTES + 1)`` allocates its
    256 MiB bound up front, which tracemalloc counts though the pages are never touched.)
    """
    model = build_model("mlp", seed=0)
    data = load_site_data(
        mnist_dir, validation_fraction=0.2, seed=7, shuffle_buffer=256, read_batch_rows=256
    )
    warm_up(784, 10)  # torch's one-time lazy set-up allocates ~70 MB of Python objects: not data
    tracemalloc.start()
    try:
        result = train(model, data.x_train, data.y_train, TrainRequest(batch_size=64), seed=0)
        _, train_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        evaluate(model, data.x_train, data.y_train, batch_size=256)
        _, eval_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    all_rows_as_float32 = result.num_examples * 784 * 4  # what holding the training part would take
    assert result.num_examples == data.train.num_rows > 3500
    assert all_rows_as_float32 > 11_000_000
    assert train_peak < all_rows_as_float32 / 4, (train_peak, all_rows_as_float32)
    assert eval_peak < all_rows_as_float32 / 4, (eval_peak, all_rows_as_float32)


def test_a_corrupt_shard_mid_stream_raises_the_loaders_error_naming_the_file(
    ids_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    make_dataset(d, [300, 300, 300], row_group_rows=300)
    data = load_site_data(d, validation_fraction=0.2, seed=7, shuffle_buffer=1)
    shard = d / "shard-00001.parquet"
    raw = bytearray(shard.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little")
    raw[4 : len(raw) - 8 - footer] = bytes(
        len(raw) - 12 - footer
    )  # zero the pages; the footer parses
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError) as info:
        train(
            torch.nn.Linear(3, 5), data.x_train, data.y_train, TrainRequest(batch_size=16), seed=0
        )
    assert info.value.path == "shard-00001.parquet"
    with pytest.raises(CorruptShardError):
        evaluate(torch.nn.Linear(3, 5), data.x_val, data.y_val, num_classes=5)


def test_a_dataset_that_loses_rows_after_loading_is_refused_not_miscounted(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", [300, 200])
    data = load_site_data(tmp_path / "d", validation_fraction=0.2, seed=7)
    make_dataset(tmp_path / "small", [300])
    shrunk = SiteData(
        train=SiteSplit(
            tmp_path / "d",
            "train",
            data.train.num_rows,
            64,
            0,
            load_site_data(tmp_path / "small", validation_fraction=0.2, seed=7).train._shards,
        ),
        validation=data.validation,
        root_hex=data.root_hex,
        num_features=3,
        num_classes=5,
    )
    with pytest.raises(SiteDataError, match="expected"):
        train(torch.nn.Linear(3, 5), shrunk.x_train, shrunk.y_train, TrainRequest(), seed=0)


def test_labels_outside_the_manifests_classes_are_refused_at_load(tmp_path: Path) -> None:
    d = tmp_path / "d"
    make_dataset(d, [100])
    doc = json.loads((d / MANIFEST_NAME).read_text())
    doc["schema"]["num_classes"] = 3  # labels are id % 5
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SiteDataError, match="labels outside"):
        load_site_data(d, validation_fraction=0.2, seed=7)


def test_a_dataset_problem_at_load_is_a_site_data_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="manifest"):
        load_site_data(tmp_path, validation_fraction=0.2, seed=7)
    d = tmp_path / "d"
    make_dataset(d, [100, 100])
    (d / "shard-00001.parquet").write_bytes(b"PAR1" + bytes(100))
    with pytest.raises(SiteDataError, match=r"shard-00001\.parquet"):
        load_site_data(d, validation_fraction=0.2, seed=7)


def test_features_and_labels_of_different_streams_or_an_array_mix_are_refused(
    ids_dir: Path,
) -> None:
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7)
    model = torch.nn.Linear(3, 5)
    with pytest.raises(ValueError, match="same stream"):
        train(model, data.x_train, data.y_val, TrainRequest(), seed=0)
    with pytest.raises(ValueError, match="same stream"):
        evaluate(model, np.zeros((4, 3), np.float32), data.y_val)


def test_the_sites_client_app_trains_and_evaluates_on_streamed_data_with_exact_counts(
    mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """client/flower_app.py is unchanged: its train/evaluate handlers stream SiteData as is."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedseal.client.flower_app import SiteRuntime, make_client_app

    for name in ("_run_id", "_node_id", "_task_id"):  # what a SuperNode sets for its ClientApp
        monkeypatch.setattr(TaskIdentity, name, 1)
    data = load_site_data(mnist_dir, validation_fraction=0.2, seed=7)
    from fedseal.client.policy import SitePrivacy

    # Plain training: only at a site that opted in.
    app = make_client_app(
        SiteRuntime(name="site-a", data=data, privacy=SitePrivacy(allow_plain=True))
    )
    weights = ArrayRecord(
        {k: Array(v) for k, v in state_dict_to_numpy(build_model("mlp", seed=0)).items()}
    )
    config = ConfigRecord(
        {
            "model": "mlp",
            "seed": 0,
            "epochs": 2,
            "batch-size": 64,
            "learning-rate": 0.05,
            "clip-norm": 5.0,
            "round": 1,
            "run-id": "ab" * 16,
        }
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    replies = {
        kind: app(
            Message(
                RecordDict({"config": config, "arrays": weights}), dst_node_id=1, message_type=kind
            ),
            context,
        )
        for kind in ("train", "evaluate")
    }
    assert not any(reply.has_error() for reply in replies.values())
    assert replies["train"].content["metrics"]["num-examples"] == data.train.num_rows
    assert replies["train"].content["site"]["dataset-root"] == data.root_hex
    assert replies["evaluate"].content["metrics"]["num-examples"] == data.validation.num_rows
    assert data.train.num_rows + data.validation.num_rows == 5000


def test_a_streamed_part_becomes_aligned_arrays_when_numpy_asks_for_them(ids_dir: Path) -> None:
    """For baselines that pool sites' parts in memory (np.concatenate([p.x_val for p in parts]))."""
    data = load_site_data(ids_dir, validation_fraction=0.2, seed=7)
    x = np.concatenate([data.x_val, data.x_train])
    y = np.concatenate([data.y_val, data.y_train])
    assert x.shape == (TOTAL, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(y, x[:, 0].astype(np.int64) % 5)  # features and labels stay aligned
    assert sorted(x[:, 0].astype(int).tolist()) == list(range(TOTAL))
    assert np.asarray(data.y_val, dtype=np.int32).dtype == np.int32


def test_an_evaluation_carrying_a_setup_the_site_refuses_still_returns_its_metrics_and_the_reason(
    mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.setup_with_evaluation: the next round's setup rides on the evaluation message; a
    setup the site cannot accept must not cost the coordinator the site's evaluation."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedseal.client.flower_app import SiteRuntime, make_client_app
    from fedseal.crypto import generate_identity_key
    from fedseal.protocol.records import SETUP_ERROR_RECORD, SETUP_RECORD

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    data = load_site_data(mnist_dir, validation_fraction=0.2, seed=7)
    weights = ArrayRecord(
        {k: Array(v) for k, v in state_dict_to_numpy(build_model("mlp", seed=0)).items()}
    )
    config = ConfigRecord(
        {
            "model": "mlp",
            "seed": 0,
            "epochs": 1,
            "batch-size": 64,
            "learning-rate": 0.05,
            "clip-norm": 5.0,
            "round": 2,
            "run-id": "ab" * 16,
        }
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    from fedseal.client.policy import SitePrivacy

    # No audit service here: the sites evaluate unverified models only because they say so.
    unverified = SitePrivacy(evaluate_unverified=True)
    keyed = SiteRuntime(
        name="site-a",
        data=data,
        identity_key=generate_identity_key(),
        coordinator_key=generate_identity_key().public_key(),
        privacy=unverified,
    )
    cases = [
        (
            keyed,
            {"secagg": ConfigRecord({"payload": b"FSE1 junk"}), "train-config": config},
            "DecodeError",
        ),
        (keyed, {"secagg": ConfigRecord({"payload": b"x"})}, "without its training config"),
        (
            SiteRuntime(name="site-a", data=data, privacy=unverified),
            {"secagg": ConfigRecord({"payload": b"x"}), "train-config": config},
            "no identity key",
        ),
    ]
    for runtime, extra, why in cases:
        app = make_client_app(runtime)
        content = RecordDict({"config": config, "arrays": weights, **extra})
        reply = app(Message(content, dst_node_id=1, message_type="evaluate"), context)
        assert not reply.has_error()
        assert reply.content["metrics"]["num-examples"] == data.validation.num_rows
        assert SETUP_RECORD not in reply.content
        assert why in str(reply.content[SETUP_ERROR_RECORD]["reason"])
        assert (
            runtime._session is None or runtime._session.stage.value != "await-adverts"
        )  # no advert went out
