"""A site's dataset for local training: its attested Parquet shards, streamed in batches.

Usage::

    from fedseal.client.site_data import load_site_data
    from fedseal.client.training import train, evaluate
    data = load_site_data(Path("site-a/data"), validation_fraction=0.2, seed=7)
    data.train.num_rows, data.validation.num_rows   # exact row counts of the two parts
    train(model, data.x_train, data.y_train, req, seed=round_)     # streams data.train
    evaluate(model, data.x_val, data.y_val, num_classes=data.num_classes)
    for x, y in data.train.batches(batch_size=64, seed=1, epoch=0, shuffle=True):
        ...                                         # x float32 [B, num_features], y int64 [B]
    data.root_hex                                   # dataset root the site committed to

The dataset directory holds Parquet shards and ``fedseal-manifest.json`` (DESIGN.md §6, written by
``fl-client data prepare``/``split``). Rows are never all held in memory: each pass streams the
manifest's shards through :class:`fedseal.client.data.ShardDataset` (row groups in a seeded order,
``iter_batches``, a bounded read-ahead thread, a bounded shuffle buffer, DataLoader workers), so
memory does not depend on the dataset's size: about ``shuffle_buffer + (4 + prefetch_batches) ×
read_batch_rows + batch_size`` rows as stored (the read-ahead also capped at ``prefetch_bytes``)
per worker, plus pyarrow's reading of one row group (:mod:`fedseal.client.data.loader`,
**Memory**; :meth:`SiteSplit.memory_bound` gives the number in bytes).

**Shuffle and its seed.** A training pass (``shuffle=True``) reads all row groups of all shards
in a uniformly random order and passes the rows through a ``shuffle_buffer``-row buffer
(:mod:`fedseal.client.data.loader`, **Shuffle quality**: a row group permutation plus a local
shuffle, *not* a uniform permutation of the rows). The order is a function of ``(seed, epoch)``
only. A site's ``seed`` is chosen by the site: ``SiteRuntime.training_seed`` (client/flower_app.py)
takes HMAC-SHA256 of the *signed* run id and round under the site's 32-byte training secret
(``state_dir/training-secret``, never sent), so the coordinator can neither choose nor predict
the order, and the same site secret, run and round give the same order again. The epoch number
then keys the per-epoch permutation.

**Augmentation.** :meth:`SiteSplit.with_augment` (or :meth:`SiteData.with_augment`) attaches a
recipe's :class:`~fedseal.client.recipe.Augment` to the training part: it is applied to each
batch of a shuffled pass as the batch is made, in the loader, with a ``torch.Generator`` keyed by
the same ``(seed, epoch)``, so it needs no extra memory and is as secret as the order.

**Images.** A dataset whose feature column is encoded images (PNG bytes, see
:mod:`fedseal.client.data.images`) is decoded per record batch while streaming, with
``image_decoder`` (default: Pillow if installed, else fedseal's own PNG decoder); the split
hashes the decoded pixels.

**Train/validation split.** A row belongs to the validation part iff a keyed 64-bit hash of its
content (raw feature values and label, as stored) is below ``validation_fraction · 2⁶⁴``. The hash
is a multilinear hash over the row's little-endian 64-bit words (zero-padded) with odd
multipliers taken from ``SHAKE-256("fedseal-row-split-v1" ‖ u64be(seed) ‖ u32be(words))``,
finished with the splitmix64 mixer; it is computed vectorised per record batch. So the split is
deterministic for a seed, disjoint and complete by construction (each row is in exactly one part,
whatever the shard order, batch size, worker count or shuffle), identical rows always land in the
same part (a duplicated example cannot leak from training into validation), and rows appended to
a dataset later never move an earlier row between parts. The validation part is about
``validation_fraction`` of the rows (a binomial draw, not an exact fraction).

**Exact counts.** :func:`load_site_data` makes one streaming pass over the shards to count both
parts (and check the labels); every later pass counts the rows it yields and raises
:class:`SiteDataError` if they differ, so ``data.train.num_rows`` is exactly the number of rows a
training epoch uses: the example count secure aggregation weights the update by.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch

from fedseal.client.data.errors import DatasetError
from fedseal.client.data.images import ImageDecoder
from fedseal.client.data.loader import (
    DEFAULT_PREFETCH_BATCHES,
    DEFAULT_PREFETCH_BYTES,
    ShardDataset,
    make_loader,
)
from fedseal.client.data.prefetch import nbytes, read_ahead
from fedseal.client.data.shards import iter_handle_batches, open_shard
from fedseal.client.errors import SiteError
from fedseal.client.recipe import Augment
from fedseal.client.training import StreamedFeatures, StreamedLabels

__all__ = [
    "DEFAULT_READ_BATCH_ROWS",
    "DEFAULT_SHUFFLE_BUFFER",
    "RowSplitter",
    "SiteData",
    "SiteDataError",
    "SiteSplit",
    "load_site_data",
]

DEFAULT_SHUFFLE_BUFFER = 8192
"""Rows in the training shuffle buffer (a whole MNIST-5k site fits: an exact shuffle)."""
DEFAULT_READ_BATCH_ROWS = 2048
"""Rows per Parquet record batch decoded at a time."""

Part = Literal["train", "validation"]
Batch = tuple[torch.Tensor, torch.Tensor]

_U64 = np.uint64
_MIX1 = _U64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser constants (Steele, Lea, Flood 2014)
_MIX2 = _U64(0x94D049BB133111EB)
_SPLIT_TAG = b"fedseal-row-split-v1"


class SiteDataError(SiteError):
    """The dataset cannot be used for training (schema, labels, split, or it changed while in use).

    Attributes:
        directory: The dataset directory.
        reason: What is wrong (names the shard where one is concerned).
    """

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"{directory}: {reason}")
        self.directory = directory
        self.reason = reason


def _mix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = z ^ (z >> _U64(30))
    z = z * _MIX1
    z = z ^ (z >> _U64(27))
    z = z * _MIX2
    return z ^ (z >> _U64(31))


@dataclass(frozen=True, slots=True)
class RowSplitter:
    """Assigns each row to train or validation by a keyed hash of its content (module docstring).

    Args:
        seed: Key of the hash (a site's split seed).
        validation_fraction: Expected share of validation rows, in ``[0, 1]``.
    """

    seed: int
    validation_fraction: float
    _multipliers: dict[int, npt.NDArray[np.uint64]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction <= 1.0 or not 0 <= self.seed < 2**64:
            raise ValueError("validation_fraction must be in [0, 1] and seed in [0, 2**64)")

    def _keys(self, words: int) -> npt.NDArray[np.uint64]:
        keys = self._multipliers.get(words)
        if keys is None:
            # words + 2 odd 64-bit keys (one per feature word, one for the label, one offset):
            # SHAKE-256 of a domain tag, the seed and the row width, so the split never depends
            # on a library's random-number stream.
            tag = _SPLIT_TAG + self.seed.to_bytes(8, "big") + words.to_bytes(4, "big")
            raw = np.frombuffer(hashlib.shake_256(tag).digest(8 * (words + 2)), dtype="<u8").astype(
                np.uint64
            )
            keys = self._multipliers[words] = raw | _U64(1)
        return keys

    def is_validation(
        self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """Validation mask of a batch of raw rows ``x`` (N, F) with labels ``y`` (N,).

        Raises:
            ValueError: ``x`` and ``y`` disagree in length.
        """
        if len(x) != len(y):
            raise ValueError(f"{len(x)} feature rows, {len(y)} labels")
        n = len(y)
        if n == 0 or self.validation_fraction >= 1.0:
            return np.full(n, n > 0, dtype=bool)
        raw = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8).reshape(n, -1)
        width = raw.shape[1]
        if width % 8:
            raw = np.pad(raw, ((0, 0), (0, 8 - width % 8)))
        words = raw.view("<u8")  # (N, W) little-endian 64-bit words of each row's bytes
        keys = self._keys(words.shape[1])
        h = (words * keys[:-2]).sum(axis=1, dtype=np.uint64)
        h = h + np.asarray(y, np.int64).view(np.uint64) * keys[-2] + keys[-1]
        threshold = min(math.floor(self.validation_fraction * 2.0**64), 2**64 - 1)
        mask: npt.NDArray[np.bool_] = _mix64(h) < _U64(threshold)
        return mask


class SplitShards(ShardDataset):  # type: ignore[misc, unused-ignore]
    """A :class:`ShardDataset` that keeps only one part's rows of every decoded record batch.

    Filtering happens in the loader's per-record-batch decode step (``ShardDataset._convert``),
    before rows enter the shuffle buffer, so the buffer and the batches hold only this part's rows
    and the loader's unit order, worker sharding and shuffling apply unchanged.
    """

    def __init__(
        self, directory: Path, *, splitter: RowSplitter, part: Part, **kwargs: object
    ) -> None:
        super().__init__(directory, **kwargs)  # type: ignore[arg-type, unused-ignore]
        self.splitter = splitter
        self.part: Part = part
        self.num_classes = 0

    def _convert(
        self, batch: pa.RecordBatch, name: str
    ) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]:
        x, y = super()._convert(batch, name)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise SiteDataError(self.directory, f"{name}: labels outside [0, {self.num_classes})")
        val = self.splitter.is_validation(x, y)
        keep = val if self.part == "validation" else ~val
        return x[keep], y[keep]

    def _all_rows(self) -> Iterator[tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]]:
        """Every shard's rows in file order, decoded but not split (for :meth:`count_parts`)."""
        columns = [*self.schema.feature_columns, self.schema.label_column]
        for entry in self.manifest.files:
            handle = open_shard(str(self.directory / entry.path), entry.path)
            try:
                stream = iter_handle_batches(
                    handle,
                    entry.path,
                    batch_size=self.read_batch_rows,
                    columns=columns,
                    expected_rows=entry.rows,
                )
                for batch in stream:
                    yield ShardDataset._convert(self, batch, entry.path)
            finally:
                handle.close()

    def count_parts(self) -> tuple[int, int, int, int]:
        """One streaming pass over every shard: ``(train rows, validation rows, min label, max label)``.

        Raises:
            DatasetError: A shard cannot be read (names it).
        """
        n_val = n_all = 0
        lo, hi = 2**63, -1  # label range seen so far (empty: lo > hi)
        rows = read_ahead(
            self._all_rows(),
            max_items=self.prefetch_batches,
            max_bytes=self.prefetch_bytes,
            size=nbytes,
        )
        for x, y in rows:
            if len(y):
                lo, hi = min(lo, int(y.min())), max(hi, int(y.max()))
            n_val += int(self.splitter.is_validation(x, y).sum())
            n_all += len(y)
        return n_all - n_val, n_val, lo, hi


@dataclass(frozen=True, slots=True)
class SiteSplit:
    """One part (train or validation) of a site's dataset, streamed: a :class:`~fedseal.client.training.BatchSource`.

    Attributes:
        directory: The dataset directory.
        part: ``"train"`` or ``"validation"``.
        num_rows: Exact rows per pass.
        shuffle_buffer: Rows of the shuffle buffer of a shuffled pass (the memory bound).
        num_workers: DataLoader worker processes (0: decode in the training process).
        augment: Applied to every batch of a shuffled (training) pass; ``None``: none.
    """

    directory: Path
    part: Part
    num_rows: int
    shuffle_buffer: int
    num_workers: int
    _shards: SplitShards = field(repr=False, compare=False)
    augment: Augment | None = field(default=None, compare=False)

    def with_augment(self, augment: Augment | None) -> SiteSplit:
        """This split with ``augment`` applied to its shuffled passes (module docstring)."""
        return dataclasses.replace(self, augment=augment)

    def memory_bound(self, *, batch_size: int) -> int:
        """Bytes a shuffled pass may hold at once, whatever the dataset's row count
        (:meth:`fedseal.client.data.ShardDataset.memory_bound`: what it counts)."""
        ds = self._pass(batch_size=batch_size, seed=0, epoch=0, shuffle=True)
        return ds.memory_bound(num_workers=self.num_workers)

    def _pass(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> SplitShards:
        if batch_size < 1 or seed < 0 or epoch < 0:
            raise ValueError("batch_size must be positive, seed and epoch >= 0")
        ds = copy.copy(self._shards)  # per-pass settings; the verified manifest/units are shared
        ds.batch_size = batch_size
        ds.seed = seed
        ds.shuffle_buffer = self.shuffle_buffer if shuffle else 0
        ds.augment = self.augment if shuffle else None
        ds.set_epoch(epoch)
        return ds

    def batches(self, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterator[Batch]:
        """One pass over this part: ``(float32 [B, num_features], int64 [B])`` batches.

        Deterministic for ``(seed, epoch, shuffle, batch_size, num_workers)``. With ``shuffle``,
        row groups come in a seeded order through a ``shuffle_buffer``-row buffer, and
        ``augment`` (if any) is applied to each batch; without it, in file order, as stored.

        Raises:
            ValueError: ``batch_size`` < 1 or ``seed``/``epoch`` < 0.
            DatasetError: A shard fails to decode mid-stream (e.g. ``CorruptShardError``, names
                the file). With ``num_workers > 0`` torch re-raises a worker's error as a
                ``RuntimeError`` carrying the same message.
            SiteDataError: The pass yielded another number of rows than ``num_rows``, or a
                label out of range (the data changed since it was loaded).
        """
        ds = self._pass(batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
        rows = 0
        for x, y in make_loader(ds, num_workers=self.num_workers):
            rows += len(y)
            yield x, y
        if rows != self.num_rows:
            raise SiteDataError(
                self.directory,
                f"streamed {rows} {self.part} rows, expected {self.num_rows}: the data changed",
            )

    def rank_batches(
        self, *, rank: int, world: int, batch_size: int, seed: int, epoch: int, shuffle: bool
    ) -> Iterator[Batch]:
        """Rank ``rank`` of ``world``'s share of the pass :meth:`batches` makes: the row groups
        ``order[rank::world]`` of the pass's row-group order (disjoint across ranks, together the
        whole pass), read through the same filter, shuffle buffer, workers and ``augment``. The
        shuffle buffer and augmentation are keyed by ``(seed, epoch, rank, world)`` besides.

        Raises:
            ValueError: ``rank`` not in ``[0, world)``, ``batch_size`` < 1 or ``seed``/``epoch`` < 0.
            DatasetError: A shard fails to decode mid-stream (see :meth:`batches`).
        """
        ds = self._pass(batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
        ds.set_rank(rank, world)
        yield from make_loader(ds, num_workers=self.num_workers)

    @property
    def features(self) -> StreamedFeatures:
        """This part's features, where :func:`~fedseal.client.training.train` takes ``x``."""
        return StreamedFeatures(self)

    @property
    def labels(self) -> StreamedLabels:
        """This part's labels, where :func:`~fedseal.client.training.train` takes ``y``."""
        return StreamedLabels(self)


@dataclass(frozen=True, slots=True)
class SiteData:
    """A site's dataset: streamed train and validation parts, and what the model needs to know.

    ``x_train``/``y_train`` and ``x_val``/``y_val`` are the parts' features and labels as
    stand-ins for arrays: ``len()`` gives the exact row count, and :func:`~fedseal.client.training.train`
    and :func:`~fedseal.client.training.evaluate` stream them.
    """

    train: SiteSplit
    validation: SiteSplit
    root_hex: str
    num_features: int
    num_classes: int

    def with_augment(self, augment: Augment | None) -> SiteData:
        """This dataset with ``augment`` applied to the training part's shuffled passes only
        (never to validation, nor to the unshuffled pass that fits a preprocessing)."""
        return dataclasses.replace(self, train=self.train.with_augment(augment))

    @property
    def x_train(self) -> StreamedFeatures:
        return self.train.features

    @property
    def y_train(self) -> StreamedLabels:
        return self.train.labels

    @property
    def x_val(self) -> StreamedFeatures:
        return self.validation.features

    @property
    def y_val(self) -> StreamedLabels:
        return self.validation.labels


def load_site_data(
    directory: Path,
    *,
    validation_fraction: float,
    seed: int,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    read_batch_rows: int = DEFAULT_READ_BATCH_ROWS,
    num_workers: int = 0,
    verify: bool = True,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    image_decoder: ImageDecoder | None = None,
) -> SiteData:
    """Check a dataset directory and set up its streamed train/validation split.

    Reads the manifest, checks the shards against it (with ``verify`` the full attestation, from
    the cache when unchanged) and makes one streaming pass to count both parts exactly and check
    the labels. No more than one record batch of rows is in memory at a time.

    Args:
        directory: The dataset directory (shards and ``fedseal-manifest.json``).
        validation_fraction: Expected share of rows in the validation part, in ``(0, 1)``.
        seed: Seed of the split (see the module docstring).
        shuffle_buffer: Rows in the training shuffle buffer: with ``read_batch_rows`` and the
            batch size, what bounds memory.
        read_batch_rows: Rows decoded from Parquet at a time.
        num_workers: DataLoader worker processes per pass (0: in this process).
        verify: Check the full attestation rather than only footers' schemas and row counts.
        prefetch_batches: Decoded record batches read ahead by a background thread (0: none).
        prefetch_bytes: Bound on the bytes of the batches read ahead (one always fits).
        image_decoder: Decoder of an image column's bytes (default: Pillow if installed, else
            :func:`fedseal.client.data.images.decode_png`); must be picklable with workers.

    Raises:
        SiteDataError: The dataset is missing, invalid, corrupt or unreadable (the reason names
            the shard), labels are out of range, or a part would be empty.
        ValueError: A parameter is out of range.
    """
    if not 0.0 < validation_fraction < 1.0 or not 0 <= seed < 2**64:
        raise ValueError("validation_fraction must be in (0, 1) and seed in [0, 2**64)")
    if shuffle_buffer < 1 or read_batch_rows < 1 or num_workers < 0:
        raise ValueError("shuffle_buffer and read_batch_rows must be positive, num_workers >= 0")
    if prefetch_batches < 0 or prefetch_bytes < 0:
        raise ValueError("prefetch_batches and prefetch_bytes must be >= 0")
    splitter = RowSplitter(seed, validation_fraction)
    try:
        shards = SplitShards(
            directory,
            splitter=splitter,
            part="train",
            shuffle_buffer=shuffle_buffer,
            read_batch_rows=read_batch_rows,
            flatten=True,
            verify=verify,
            prefetch_batches=prefetch_batches,
            prefetch_bytes=prefetch_bytes,
            image_decoder=image_decoder,
        )
        n_train, n_val, lo, hi = shards.count_parts()
    except DatasetError as exc:
        raise SiteDataError(directory, str(exc)) from exc
    schema = shards.schema
    num_classes = schema.num_classes or hi + 1
    if n_train + n_val < 2:
        raise SiteDataError(directory, "fewer than 2 rows")
    if lo < 0 or hi >= num_classes:
        raise SiteDataError(directory, f"labels outside [0, {num_classes})")
    if n_train == 0 or n_val == 0:
        raise SiteDataError(
            directory,
            f"the split of {n_train + n_val} rows leaves an empty part ({n_train} train / {n_val} validation)",
        )
    shards.num_classes = num_classes
    val_shards = copy.copy(shards)
    val_shards.part = "validation"

    def split(part: Part, rows: int, ds: SplitShards) -> SiteSplit:
        return SiteSplit(directory, part, rows, shuffle_buffer, num_workers, ds)

    return SiteData(
        train=split("train", n_train, shards),
        validation=split("validation", n_val, val_shards),
        root_hex=shards.manifest.root.hex(),
        num_features=schema.num_features,
        num_classes=num_classes,
    )
