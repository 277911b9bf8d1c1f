"""Streaming torch loader over a prepared dataset's shards (imports torch; import it lazily).

Example::

    ds = ShardDataset("site-0", batch_size=64, shuffle_buffer=4096, seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for x, y in make_loader(ds, num_workers=2):   # x: float32 [B, 1, 28, 28], y: int64 [B]
            ...

Work units are Parquet row groups. Each worker streams its units with ``iter_batches`` through
a bounded shuffle buffer and emits ``(features, labels)`` batches; the result is deterministic for
a given seed, epoch and number of workers.

**Shuffle quality** (what a shuffled pass is, and is not). Two stages, both keyed by
``(seed, epoch)`` (numpy's ``default_rng([seed, epoch])``, and ``[seed, epoch, worker,
workers]`` per worker): 1. the row groups of *all* shards are put in a uniformly random order
(so shard order and the row groups' order within and across shards change every epoch) and
dealt to the DataLoader workers round-robin, so across workers every row is read exactly once
per epoch; 2. each worker's rows pass through a buffer of ``shuffle_buffer`` rows: once full,
each incoming row replaces a uniformly chosen buffered row, which is emitted (``tf.data``'s
shuffle; the buffer is emitted in a random order at the end). It is **not** a uniform
permutation of the rows: a row leaves the buffer at most about ``shuffle_buffer`` rows (in
expectation ``shuffle_buffer`` rows, geometrically distributed) after the rows of its own
row group, so rows of one row group stay close together in time unless ``shuffle_buffer`` is
several row groups long; and rows that were adjacent inside a row group stay somewhat
correlated. Rows written by ``fl-client data prepare`` were already permuted within its write
buffer (:class:`~.shards.ShardWriter`), which removes the source file's own order up to that
buffer's size. A site's training passes get their seed from the site's secret
(:mod:`fedseal.client.site_data`), never from the coordinator.

**Memory** (per worker process, whatever the dataset's size): the shuffle buffer
(``shuffle_buffer`` rows as stored, e.g. uint8 pixels), the read-ahead (:mod:`.prefetch`: at
most ``prefetch_batches`` decoded record batches of ``read_batch_rows`` rows and at most
``prefetch_bytes``, or one batch), the record batches being decoded, split and pushed, pyarrow's
reading of one row group (pre-buffering is off: about 3 × the row group's uncompressed size,
measured), the rows waiting to fill a batch (under ``batch_size``) and the batch itself as
float32. With ``num_workers > 0`` the training process
also holds the DataLoader's ``2 × num_workers`` ready batches. :meth:`ShardDataset.memory_bound`
computes this bound for a dataset.

An image column (one ``binary`` feature column of PNG bytes, :mod:`.images`) is decoded per
record batch in the read-ahead thread with ``image_decoder``; an ``augment`` hook
(:class:`fedseal.client.recipe.Augment`) is applied to each batch of a pass that sets it, as the
batch is made, with a ``torch.Generator`` keyed by ``(seed, epoch, worker)``: nothing is
materialised beyond the batch.

Before anything is read, the manifest is checked against the shards: with ``verify=True`` (the
default) the whole attestation (:func:`~.attestation.verify_dataset`, cached), otherwise each footer's
schema and row count. Every row group's row count is checked again as it is read, and pyarrow
failures become :class:`~.errors.CorruptShardError` naming the shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .attestation import Attestation, verify_dataset
from .errors import (
    ContentMismatchError,
    CorruptShardError,
    RowCountMismatchError,
    SchemaMismatchError,
)
from .images import ImageDecoder, default_decoder, to_chw
from .manifest import DatasetSchema, Manifest, load_manifest
from .prefetch import nbytes, read_ahead
from .shards import PYARROW_ERRORS, iter_handle_batches, open_shard, read_footer
from .spec import discover_shards

if TYPE_CHECKING:
    from fedseal.client.recipe import Augment

__all__ = [
    "DEFAULT_PREFETCH_BATCHES",
    "DEFAULT_PREFETCH_BYTES",
    "ShardDataset",
    "make_loader",
]

Batch = tuple[torch.Tensor, torch.Tensor]
Rows = tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]

DEFAULT_PREFETCH_BATCHES = 4
"""Decoded record batches the read-ahead thread may hold ready (:mod:`.prefetch`)."""
DEFAULT_PREFETCH_BYTES = 64 << 20
"""Bytes of decoded rows the read-ahead thread may hold ready (one batch always fits)."""
_AUGMENT_STREAM = 0xA7
"""Appended to ``[seed, epoch, worker, workers]`` for the augment generator's key."""


class ShuffleBuffer:
    """A bounded shuffle buffer over row arrays (vectorised: one fancy-index per incoming chunk)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self._capacity = capacity
        self._rng = rng
        self._x: npt.NDArray[np.generic] | None = None
        self._y = np.empty(capacity, dtype=np.int64)
        self._n = 0

    def push(
        self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64]
    ) -> Iterator[tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]]:
        if self._x is None:
            self._x = np.empty((self._capacity, *x.shape[1:]), dtype=x.dtype)
        start = 0
        room = self._capacity - self._n
        if room:
            take = min(room, len(x))
            self._x[self._n : self._n + take] = x[:take]
            self._y[self._n : self._n + take] = y[:take]
            self._n += take
            start = take
        while start < len(x):
            part = min(self._capacity, len(x) - start)
            slots = self._rng.choice(self._capacity, size=part, replace=False)
            out_x = self._x[slots]
            out_y = self._y[slots]
            self._x[slots] = x[start : start + part]
            self._y[slots] = y[start : start + part]
            start += part
            yield out_x, out_y

    def drain(self) -> Iterator[tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]]:
        if self._x is not None and self._n:
            order = self._rng.permutation(self._n)
            yield self._x[order], self._y[order]
        self._n = 0


class ShardDataset(IterableDataset[Batch]):
    """A torch ``IterableDataset`` of ``(features float32 [B, *shape], labels int64 [B])`` batches.

    Use with ``DataLoader(ds, batch_size=None, ...)`` (see :func:`make_loader`).

    Args:
        directory: A prepared dataset directory.
        batch_size: Rows per batch.
        shuffle_buffer: Shuffle buffer size in rows (0: no shuffling, units in file order).
        seed: Seed of the unit order and the shuffle buffer.
        epoch: Epoch number (also settable with :meth:`set_epoch`).
        drop_last: Drop each worker's last incomplete batch.
        flatten: Yield features as ``[B, num_features]`` instead of ``[B, *feature_shape]``.
        verify: Check the full attestation against the manifest first (cached) rather than only
            the footers' schemas and row counts.
        read_batch_rows: Rows per pyarrow record batch.
        cache_dir: Attestation cache directory (default ``DIR/.fedseal-cache``).
        prefetch_batches: Decoded record batches read ahead by a thread (0: no thread).
        prefetch_bytes: Bound on the bytes of those batches (one batch always fits).
        image_decoder: Decodes an image column's bytes (default :func:`.images.default_decoder`).
        augment: Applied to every batch (see the module docstring; ``None``: none).

    Raises:
        DatasetError: A subclass naming the shard and the reason, if the shards do not match the
            manifest (schema, rows, files, and with ``verify`` the content).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        batch_size: int = 64,
        shuffle_buffer: int = 8192,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        flatten: bool = False,
        verify: bool = True,
        read_batch_rows: int = 8192,
        cache_dir: str | os.PathLike[str] | None = None,
        prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        image_decoder: ImageDecoder | None = None,
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or shuffle_buffer < 0 or read_batch_rows < 1:
            raise ValueError("batch_size and read_batch_rows must be positive, shuffle_buffer >= 0")
        if prefetch_batches < 0 or prefetch_bytes < 0:
            raise ValueError("prefetch_batches and prefetch_bytes must be >= 0")
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(directory)
        self.attestation: Attestation | None = None
        if verify:
            self.attestation = verify_dataset(directory, cache_dir=cache_dir)
        else:
            self._check_footers()
        self.schema: DatasetSchema = self.manifest.schema
        self.image = False  # the one feature column holds encoded images
        self._check_feature_types()
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.flatten = flatten
        self.read_batch_rows = read_batch_rows
        self.prefetch_batches = prefetch_batches
        self.prefetch_bytes = prefetch_bytes
        self.image_decoder: ImageDecoder = image_decoder or default_decoder()
        self.augment: Augment | None = augment
        self.rank, self.world = 0, 1  # this process's share of the units (DDP ranks)
        self._units = self._row_groups()

    @property
    def num_rows(self) -> int:
        """Rows per epoch (all workers together)."""
        return self.manifest.rows

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows."""
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        """Read only rank ``rank`` of ``world``'s share: the units ``order[rank::world]`` of the
        epoch's unit order (disjoint across ranks, together every unit once).

        Raises:
            ValueError: ``rank`` not in ``[0, world)``.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.rank, self.world = rank, world

    def memory_bound(self, *, num_workers: int = 0) -> int:
        """Bytes a pass may hold at once (module docstring, **Memory**), from the manifest's
        schema, the footers and this dataset's settings. Per worker: the shuffle buffer, a
        pending batch and the record batches being decoded, split and pushed (with their
        temporaries, 4 × ``read_batch_rows``) as stored; the read-ahead; the float32 batch and
        its copy in training; and pyarrow's reading of one row group (3 × the largest row
        group's uncompressed size: the compressed chunk, its pages and the decoded arrays).
        Plus the DataLoader's ready batches with workers. None of it grows with the rows.
        """
        stored = self._stored_row_bytes()
        as_float = 4 * self.schema.num_features + 8
        ahead = min(
            self.prefetch_batches * self.read_batch_rows * stored,
            max(self.prefetch_bytes, self.read_batch_rows * stored),
        )
        per_worker = (
            (self.shuffle_buffer + self.batch_size + 4 * self.read_batch_rows) * stored
            + ahead
            + 2 * self.batch_size * as_float
            + 3 * self.max_row_group_bytes
        )
        return max(1, num_workers) * per_worker + 2 * num_workers * self.batch_size * as_float

    def _stored_row_bytes(self) -> int:
        """Bytes of one decoded row as the loader holds it before float32 (features + label)."""
        if self.image:
            return self.schema.num_features + 8
        width = 0
        for spec in self.schema.columns:
            if spec.name in self.schema.feature_columns:
                width = max(width, _value_bytes(spec.type))
        return self.schema.num_features * max(width, 1) + 8

    # -- checks ---------------------------------------------------------------------------------

    def _check_footers(self) -> None:
        found = [s.path for s in discover_shards(self.directory)]
        listed = [f.path for f in self.manifest.files]
        for path in found:
            if path not in listed:
                raise ContentMismatchError(path, "not listed in the manifest")
        for entry in self.manifest.files:
            if entry.path not in found:
                raise ContentMismatchError(entry.path, "listed in the manifest but missing")
            rows, columns = read_footer(str(self.directory / entry.path), entry.path)
            if columns != self.manifest.schema.columns:
                raise SchemaMismatchError(entry.path, "schema differs from the manifest")
            if rows != entry.rows:
                raise RowCountMismatchError(
                    entry.path,
                    f"{rows} rows, the manifest says {entry.rows}",
                    expected=entry.rows,
                    actual=rows,
                )

    def _check_feature_types(self) -> None:
        first = self.manifest.files[0].path
        try:
            schema = pq.read_schema(self.directory / first)
        except PYARROW_ERRORS as exc:
            raise CorruptShardError(first, f"unreadable schema ({exc})") from exc
        label_type = schema.field(self.schema.label_column).type
        if not pa.types.is_integer(label_type):
            raise SchemaMismatchError(first, f"label column is {label_type}, not an integer type")
        types = [schema.field(c).type for c in self.schema.feature_columns]
        if len(types) == 1 and (pa.types.is_binary(types[0]) or pa.types.is_large_binary(types[0])):
            if len(self.schema.feature_shape) != 3:
                raise SchemaMismatchError(
                    first,
                    f"an image column needs a (C, H, W) feature shape, the manifest has {self.schema.feature_shape}",
                )
            self.image = True
            return
        if len(types) == 1 and pa.types.is_fixed_size_list(types[0]):
            value_type = types[0].value_type
            width = int(types[0].list_size)
            numeric = pa.types.is_integer(value_type) or pa.types.is_floating(value_type)
        else:
            width = len(types)
            numeric = all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types)
        if not numeric:
            raise SchemaMismatchError(
                first,
                "feature columns must be numeric scalars, one numeric fixed-size list or one binary image column",
            )
        if width != self.schema.num_features:
            raise SchemaMismatchError(
                first,
                f"{width} feature values per row, the manifest's shape {self.schema.feature_shape} needs {self.schema.num_features}",
            )

    def _row_groups(self) -> list[tuple[str, int, int]]:
        units: list[tuple[str, int, int]] = []
        self.max_row_group_bytes = 0  # uncompressed, from the footers (for memory_bound)
        for entry in self.manifest.files:
            path = str(self.directory / entry.path)
            try:
                meta = pq.read_metadata(path)
            except PYARROW_ERRORS as exc:
                raise CorruptShardError(entry.path, f"unreadable Parquet footer ({exc})") from exc
            units.extend(
                (entry.path, i, int(meta.row_group(i).num_rows)) for i in range(meta.num_row_groups)
            )
            for i in range(meta.num_row_groups):
                self.max_row_group_bytes = max(
                    self.max_row_group_bytes, int(meta.row_group(i).total_byte_size)
                )
        return units

    # -- iteration ------------------------------------------------------------------------------

    def _convert(
        self, batch: pa.RecordBatch, name: str
    ) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]:
        labels = batch.column(self.schema.label_column)
        if labels.null_count:
            raise CorruptShardError(name, "label column holds nulls")
        y = labels.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        columns = [batch.column(c) for c in self.schema.feature_columns]
        if any(c.null_count for c in columns):
            raise CorruptShardError(name, "feature columns hold nulls")
        if self.image:
            x = self._decode_images(columns[0], name)
        elif len(columns) == 1 and pa.types.is_fixed_size_list(columns[0].type):
            flat = columns[0].flatten().to_numpy(zero_copy_only=False)
            x = flat.reshape(batch.num_rows, -1)
        else:
            x = np.column_stack([c.to_numpy(zero_copy_only=False) for c in columns])
        return x, y

    def _decode_images(self, column: pa.Array, name: str) -> npt.NDArray[np.uint8]:
        """Each row's encoded image decoded into ``(N, C·H·W)`` uint8 in the manifest's layout."""
        shape = self.schema.feature_shape
        out = np.empty((len(column), self.schema.num_features), dtype=np.uint8)
        for i, value in enumerate(column.to_pylist()):
            try:
                pixels = to_chw(self.image_decoder(value))
            except Exception as exc:  # a site's decoder hook: any failure names the shard and row
                raise CorruptShardError(
                    name, f"image of batch row {i} does not decode ({type(exc).__name__}: {exc})"
                ) from exc
            if pixels.shape != shape:
                raise CorruptShardError(
                    name,
                    f"image of batch row {i} is {pixels.shape} (C, H, W), the manifest says {shape}",
                )
            out[i] = pixels.reshape(-1)
        return out

    def _to_tensors(
        self,
        x: npt.NDArray[np.generic],
        y: npt.NDArray[np.int64],
        gen: torch.Generator | None = None,
    ) -> Batch:
        features = np.multiply(x, np.float32(self.schema.feature_scale), dtype=np.float32)
        labels = (
            y if y.flags.writeable and y.flags.c_contiguous else y.copy()
        )  # Arrow buffers are read-only
        xt = torch.from_numpy(features.reshape(len(x), *self.schema.feature_shape))
        yt = torch.from_numpy(labels)
        if self.augment is not None and gen is not None:
            xt, yt = _augmented(self.augment, xt, yt, gen)
        return (xt.reshape(len(xt), -1) if self.flatten else xt), yt

    def _decoded(self, mine: list[tuple[str, int, int]]) -> Iterator[Rows]:
        """Each record batch of the units ``mine``, in order, decoded (``_convert``)."""
        columns = [*self.schema.feature_columns, self.schema.label_column]
        handles: dict[str, pq.ParquetFile] = {}  # each shard opened once per worker and epoch
        try:
            for path, group, rows in mine:
                handle = handles.get(path)
                if handle is None:
                    handle = handles[path] = open_shard(str(self.directory / path), path)
                stream = iter_handle_batches(
                    handle,
                    path,
                    batch_size=self.read_batch_rows,
                    columns=columns,
                    row_groups=[group],
                    expected_rows=rows,
                )
                for batch in stream:
                    yield self._convert(batch, path)
        finally:
            for handle in handles.values():
                handle.close()

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shuffle = self.shuffle_buffer > 0
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(len(self._units))
            if shuffle
            else np.arange(len(self._units))
        )
        ours = order[self.rank :: self.world]
        if not shuffle:
            ours = np.sort(ours)
        mine = [self._units[i] for i in ours[worker::workers]]
        key = [self.seed, self.epoch, worker, workers] + (
            [] if self.world == 1 else [self.rank, self.world]
        )
        rng = np.random.default_rng(key)
        buffer = ShuffleBuffer(self.shuffle_buffer, rng) if shuffle else None
        gen: torch.Generator | None = None
        if self.augment is not None:
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([*key, _AUGMENT_STREAM]).integers(2**63))
            )
        pending_x: list[npt.NDArray[np.generic]] = []
        pending_y: list[npt.NDArray[np.int64]] = []
        pending = 0

        def emit(
            x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], final: bool
        ) -> Iterator[Batch]:
            nonlocal pending_x, pending_y, pending
            if len(x):
                pending_x.append(x)
                pending_y.append(y)
                pending += len(x)
            if pending < self.batch_size and not final:
                return
            all_x, all_y = _joined(pending_x), _joined(pending_y)
            pending_x, pending_y, pending = [], [], 0
            if all_x is None or all_y is None:
                return
            full = len(all_x) - len(all_x) % self.batch_size
            for start in range(0, full, self.batch_size):
                yield self._to_tensors(
                    all_x[start : start + self.batch_size],
                    all_y[start : start + self.batch_size],
                    gen,
                )
            if full < len(all_x):
                if final:
                    if not self.drop_last:
                        yield self._to_tensors(all_x[full:], all_y[full:], gen)
                else:
                    pending_x, pending_y, pending = (
                        [all_x[full:]],
                        [all_y[full:]],
                        len(all_x) - full,
                    )

        decoded = read_ahead(
            self._decoded(mine),
            max_items=self.prefetch_batches,
            max_bytes=self.prefetch_bytes,
            size=nbytes,
        )
        try:
            for x, y in decoded:
                if buffer is None:
                    yield from emit(x, y, False)
                else:
                    for out_x, out_y in buffer.push(x, y):
                        yield from emit(out_x, out_y, False)
        finally:
            decoded.close()
        if buffer is not None:
            for out_x, out_y in buffer.drain():
                yield from emit(out_x, out_y, False)
        yield from emit(np.empty((0,)), np.empty(0, dtype=np.int64), True)


def _joined(parts: list[npt.NDArray[Any]]) -> npt.NDArray[Any] | None:
    """The pending pieces as one array (the piece itself when there is one; ``None``: none)."""
    if len(parts) > 1:
        return np.concatenate(parts)
    return parts[0] if parts else None


def _augmented(augment: Augment, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
    """``augment`` applied to one batch, its result checked (same shapes and dtypes)."""
    out_x, out_y = augment(x, y, gen)
    if (
        not isinstance(out_x, torch.Tensor)
        or out_x.shape != x.shape
        or out_x.dtype != torch.float32
    ):
        got = (
            f"{out_x.dtype} {tuple(out_x.shape)}"
            if isinstance(out_x, torch.Tensor)
            else type(out_x).__name__
        )
        raise ValueError(f"augment returned features {got}, expected float32 {tuple(x.shape)}")
    if not isinstance(out_y, torch.Tensor) or out_y.shape != y.shape or out_y.dtype != torch.int64:
        raise ValueError(f"augment must return int64 labels of shape {tuple(y.shape)}")
    return out_x, out_y


_VALUE_BYTES = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "halffloat": 2, "int32": 4, "uint32": 4,
                "float": 4, "int64": 8, "uint64": 8, "double": 8}  # fmt: skip


def _value_bytes(type_text: str) -> int:
    """Bytes per value of a manifest column type (``int32``, ``fixed_size_list<element: uint8>[784]``)."""
    if "<" in type_text:  # a list: its value type follows the field name
        type_text = type_text.split("<", 1)[1].split(">", 1)[0].split(":")[-1].strip()
    return _VALUE_BYTES.get(type_text, 8)


def make_loader(
    dataset: ShardDataset, *, num_workers: int = 0, pin_memory: bool | None = None
) -> DataLoader[Batch]:
    """A ``DataLoader`` over ``dataset`` (already batched), pinning memory when CUDA is present.

    Args:
        dataset: The dataset.
        num_workers: Worker processes; the row groups are dealt among them.
        pin_memory: Pin batches in page-locked memory (default: ``torch.cuda.is_available()``).

    Returns:
        The loader.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin)
