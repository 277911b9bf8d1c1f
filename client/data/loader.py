"""Streaming torch loader over a prepared dataset's shards (imports torch; import it lazily).

Example::

    ds = ShardDataset("site-0", batch_size=64, shuffle_buffer=4096, seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for x, y in make_loader(ds, num_workers=2):   # x: float32 [B, 1, 28, 28], y: int64 [B]
            ...

Work units are Parquet row groups. Each epoch, the units are permuted with ``(seed, epoch)`` and
dealt to DataLoader workers round-robin, so across workers every row is read exactly once per
epoch. Each worker streams its units with ``iter_batches`` through a bounded shuffle buffer
(``shuffle_buffer`` rows: a full buffer swaps each incoming row for a random buffered one, as in
``tf.data``'s shuffle) and emits ``(features, labels)`` batches; the result is deterministic for a
given seed, epoch and number of workers.

Before anything is read, the manifest is checked against the shards: with ``verify=True`` (the
default) the whole attestation (:func:`~.attestation.verify_dataset`, cached), otherwise each footer's
schema and row count. Every row group's row count is checked again as it is read, and pyarrow
failures become :class:`~.errors.CorruptShardError` naming the shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
from .manifest import DatasetSchema, Manifest, load_manifest
from .shards import PYARROW_ERRORS, iter_handle_batches, open_shard, read_footer
from .spec import discover_shards

__all__ = ["ShardDataset", "make_loader"]

Batch = tuple[torch.Tensor, torch.Tensor]


class ShuffleBuffer:
    """A bounded shuffle buffer over row arrays (vectorised: one fancy-index per incoming chunk)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self._capacity = capacity
        self._rng = rng
        self._x: npt.NDArray[np.generic] | None = None
        self._y = np.empty(capacity, dtype=np.int64)
        self._n = 0

    def push(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64]) -> Iterator[tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]]:
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
    ) -> None:
        super().__init__()
        if batch_size < 1 or shuffle_buffer < 0 or read_batch_rows < 1:
            raise ValueError("batch_size and read_batch_rows must be positive, shuffle_buffer >= 0")
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(directory)
        self.attestation: Attestation | None = None
        if verify:
            self.attestation = verify_dataset(directory, cache_dir=cache_dir)
        else:
            self._check_footers()
        self.schema: DatasetSchema = self.manifest.schema
        self._check_feature_types()
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.flatten = flatten
        self.read_batch_rows = read_batch_rows
        self._units = self._row_groups()

    @property
    def num_rows(self) -> int:
        """Rows per epoch (all workers together)."""
        return self.manifest.rows

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows."""
        self.epoch = epoch

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
                    entry.path, f"{rows} rows, the manifest says {entry.rows}", expected=entry.rows, actual=rows
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
        if len(types) == 1 and pa.types.is_fixed_size_list(types[0]):
            value_type = types[0].value_type
            width = int(types[0].list_size)
            numeric = pa.types.is_integer(value_type) or pa.types.is_floating(value_type)
        else:
            width = len(types)
            numeric = all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types)
        if not numeric:
            raise SchemaMismatchError(first, "feature columns must be numeric scalars or one numeric fixed-size list")
        if width != self.schema.num_features:
            raise SchemaMismatchError(first, f"{width} feature values per row, the manifest's shape {self.schema.feature_shape} needs {self.schema.num_features}")

    def _row_groups(self) -> list[tuple[str, int, int]]:
        units: list[tuple[str, int, int]] = []
        for entry in self.manifest.files:
            path = str(self.directory / entry.path)
            try:
                meta = pq.read_metadata(path)
            except PYARROW_ERRORS as exc:
                raise CorruptShardError(entry.path, f"unreadable Parquet footer ({exc})") from exc
            units.extend((entry.path, i, int(meta.row_group(i).num_rows)) for i in range(meta.num_row_groups))
        return units

    # -- iteration ------------------------------------------------------------------------------

    def _convert(self, batch: pa.RecordBatch, name: str) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]:
        labels = batch.column(self.schema.label_column)
        if labels.null_count:
            raise CorruptShardError(name, "label column holds nulls")
        y = labels.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        columns = [batch.column(c) for c in self.schema.feature_columns]
        if any(c.null_count for c in columns):
            raise CorruptShardError(name, "feature columns hold nulls")
        if len(columns) == 1 and pa.types.is_fixed_size_list(columns[0].type):
            flat = columns[0].flatten().to_numpy(zero_copy_only=False)
            x = flat.reshape(batch.num_rows, -1)
        else:
            x = np.column_stack([c.to_numpy(zero_copy_only=False) for c in columns])
        return x, y

    def _to_tensors(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64]) -> Batch:
        features = np.multiply(x, np.float32(self.schema.feature_scale), dtype=np.float32)
        shape = (len(x), self.schema.num_features) if self.flatten else (len(x), *self.schema.feature_shape)
        labels = y if y.flags.writeable and y.flags.c_contiguous else y.copy()  # Arrow buffers are read-only
        return torch.from_numpy(features.reshape(shape)), torch.from_numpy(labels)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shuffle = self.shuffle_buffer > 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._units)) if shuffle else np.arange(len(self._units))
        mine = [self._units[i] for i in order[worker::workers]]
        rng = np.random.default_rng([self.seed, self.epoch, worker, workers])
        buffer = ShuffleBuffer(self.shuffle_buffer, rng) if shuffle else None
        pending_x: list[npt.NDArray[np.generic]] = []
        pending_y: list[npt.NDArray[np.int64]] = []
        pending = 0

        def emit(x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], final: bool) -> Iterator[Batch]:
            nonlocal pending_x, pending_y, pending
            if len(x):
                pending_x.append(x)
                pending_y.append(y)
                pending += len(x)
            if pending < self.batch_size and not final:
                return
            all_x = np.concatenate(pending_x) if len(pending_x) > 1 else pending_x[0] if pending_x else None
            all_y = np.concatenate(pending_y) if len(pending_y) > 1 else pending_y[0] if pending_y else None
            pending_x, pending_y, pending = [], [], 0
            if all_x is None or all_y is None:
                return
            full = len(all_x) - len(all_x) % self.batch_size
            for start in range(0, full, self.batch_size):
                yield self._to_tensors(all_x[start : start + self.batch_size], all_y[start : start + self.batch_size])
            if full < len(all_x):
                if final:
                    if not self.drop_last:
                        yield self._to_tensors(all_x[full:], all_y[full:])
                else:
                    pending_x, pending_y, pending = [all_x[full:]], [all_y[full:]], len(all_x) - full

        columns = [*self.schema.feature_columns, self.schema.label_column]
        handles: dict[str, pq.ParquetFile] = {}  # each shard opened once per worker and epoch
        try:
            for path, group, rows in mine:
                handle = handles.get(path)
                if handle is None:
                    handle = handles[path] = open_shard(str(self.directory / path), path)
                stream = iter_handle_batches(
                    handle, path, batch_size=self.read_batch_rows, columns=columns, row_groups=[group], expected_rows=rows
                )
                for batch in stream:
                    x, y = self._convert(batch, path)
                    if buffer is None:
                        yield from emit(x, y, False)
                    else:
                        for out_x, out_y in buffer.push(x, y):
                            yield from emit(out_x, out_y, False)
        finally:
            for handle in handles.values():
                handle.close()
        if buffer is not None:
            for out_x, out_y in buffer.drain():
                yield from emit(out_x, out_y, False)
        yield from emit(np.empty((0,)), np.empty(0, dtype=np.int64), True)


def make_loader(dataset: ShardDataset, *, num_workers: int = 0, pin_memory: bool | None = None) -> DataLoader[Batch]:
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
