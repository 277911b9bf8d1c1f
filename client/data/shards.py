"""Reading and writing Parquet shards with pyarrow, with every pyarrow failure named by file.

Writing: :class:`ShardWriter` writes zstd-compressed shards ``shard-00000.parquet``, ... (zero
padded so that appended shards sort last), rolling to a new shard once the target size is
reached, in row groups sized for streaming. Rows pass through a bounded buffer (``buffer_bytes``)
that is permuted with a seeded generator before writing when ``shuffle`` is on: an exact shuffle
when the whole input fits in the buffer, a block shuffle otherwise.

Memory does not grow with the input: about ``2 × buffer_bytes`` (the buffer and its permuted
copy), plus one output row group (~32 MiB of Arrow data; Parquet stores small integers as INT32,
so up to 4× that for uint8 columns before compression), plus what reading one source row group
takes (:func:`iter_file_batches`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptShardError, RowCountMismatchError
from .manifest import ColumnSpec

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_SHARD_BYTES",
    "ShardWriter",
    "column_specs",
    "iter_file_batches",
    "iter_handle_batches",
    "open_shard",
    "read_footer",
    "shard_name",
]

DEFAULT_SHARD_BYTES = 1 << 30
DEFAULT_BUFFER_BYTES = 256 << 20
ROW_GROUP_TARGET_BYTES = 32 << 20
MIN_ROW_GROUP_ROWS = 1024
MAX_ROW_GROUP_ROWS = 1 << 20
MAX_SHARDS = 100_000
ZSTD_LEVEL = 3
READ_BATCH_BYTES = 8 << 20

# pyarrow raises OSError (IO/corruption) or ArrowException subclasses (ArrowInvalid, ...).
PYARROW_ERRORS: tuple[type[BaseException], ...] = (OSError, pa.ArrowException)


def shard_name(index: int) -> str:
    """``shard-00000.parquet`` for index 0; at most :data:`MAX_SHARDS` shards so names sort."""
    if not 0 <= index < MAX_SHARDS:
        raise ValueError(f"shard index {index} out of range")
    return f"shard-{index:05d}.parquet"


def column_specs(schema: pa.Schema) -> tuple[ColumnSpec, ...]:
    """The schema as recorded in the manifest (names, printed types, nullability; no metadata)."""
    return tuple(ColumnSpec(f.name, str(f.type), bool(f.nullable)) for f in schema)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


def read_footer(abspath: str, name: str) -> tuple[int, tuple[ColumnSpec, ...]]:
    """Row count and schema from a shard's Parquet footer.

    Args:
        abspath: The file to read.
        name: The name to report in errors (relative path).

    Returns:
        ``(rows, column specs)``.

    Raises:
        CorruptShardError: The footer cannot be parsed or its schema not converted to Arrow.
    """
    try:
        meta = pq.read_metadata(abspath)
        schema = meta.schema.to_arrow_schema()
        rows = int(meta.num_rows)
    except PYARROW_ERRORS as exc:
        raise CorruptShardError(name, f"unreadable Parquet footer ({_reason(exc)})") from exc
    return rows, column_specs(schema)


def iter_file_batches(
    abspath: str,
    name: str,
    *,
    batch_size: int | None = None,
    columns: list[str] | None = None,
    row_groups: list[int] | None = None,
    expected_rows: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of one shard, turning pyarrow failures into typed errors.

    After the last batch, the number of rows read is checked against the footer (or
    ``expected_rows``), so a file that pyarrow reads "successfully" but short is still caught.
    Memory: pre-buffering is off (pyarrow would otherwise buffer many row groups ahead), and by
    default batches hold about :data:`READ_BATCH_BYTES` of uncompressed data, so a read needs
    about one row group's compressed column chunks plus a few batches, whatever the file size.

    Raises:
        CorruptShardError: pyarrow fails to open or decode the file.
        RowCountMismatchError: The rows read differ from the footer / ``expected_rows``.
    """
    handle = open_shard(abspath, name)
    with handle:
        yield from iter_handle_batches(
            handle, name, batch_size=batch_size, columns=columns, row_groups=row_groups, expected_rows=expected_rows
        )


def open_shard(abspath: str, name: str) -> pq.ParquetFile:
    """Open a shard for reading (footer parsed, no pre-buffering).

    Raises:
        CorruptShardError: pyarrow cannot open the file or parse its footer.
    """
    try:
        return pq.ParquetFile(abspath, pre_buffer=False)
    except PYARROW_ERRORS as exc:
        raise CorruptShardError(name, f"unreadable Parquet file ({_reason(exc)})") from exc


def iter_handle_batches(
    handle: pq.ParquetFile,
    name: str,
    *,
    batch_size: int | None = None,
    columns: list[str] | None = None,
    row_groups: list[int] | None = None,
    expected_rows: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """:func:`iter_file_batches` over an already open shard (the caller closes it)."""
    meta = handle.metadata
    if batch_size is None:
        batch_size = _auto_batch_rows(meta)
    if expected_rows is None:
        groups = range(meta.num_row_groups) if row_groups is None else row_groups
        expected_rows = sum(meta.row_group(i).num_rows for i in groups)
    got = 0
    batches = handle.iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except PYARROW_ERRORS as exc:
            raise CorruptShardError(name, f"corrupt Parquet data ({_reason(exc)})") from exc
        got += batch.num_rows
        yield batch
    if got != expected_rows:
        raise RowCountMismatchError(
            name, f"read {got} rows, expected {expected_rows}", expected=expected_rows, actual=got
        )


def _auto_batch_rows(meta: pq.FileMetaData) -> int:
    """Rows per read batch so that a batch holds about READ_BATCH_BYTES uncompressed."""
    rows = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    row_bytes = max(1, size // max(1, rows))
    return int(np.clip(READ_BATCH_BYTES // row_bytes, 64, 65536))


@dataclass(frozen=True, slots=True)
class WrittenShard:
    """A shard written by :class:`ShardWriter`: its relative path and row count."""

    path: str
    rows: int


class ShardWriter:
    """Writes record batches into zstd Parquet shards with a bounded, optionally shuffled buffer.

    Args:
        out_dir: Directory to write ``shard-NNNNN.parquet`` files into (must exist).
        schema: The Arrow schema of every batch.
        target_shard_bytes: Start a new shard once a shard reaches this size on disk.
        row_group_rows: Rows per row group; by default about 32 MiB of uncompressed data
            (clamped to 1,024..1,048,576 rows).
        buffer_bytes: Upper bound on buffered (uncompressed) data before it is written.
        shuffle: Permute each buffer before writing.
        rng: The generator used for the permutation.
        first_index: Index of the first shard to write (for appending to a dataset).
        on_rows: Called with the number of rows each time rows are written (progress).
    """

    def __init__(
        self,
        out_dir: Path,
        schema: pa.Schema,
        *,
        target_shard_bytes: int = DEFAULT_SHARD_BYTES,
        row_group_rows: int | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        shuffle: bool = True,
        rng: np.random.Generator | None = None,
        first_index: int = 0,
        on_rows: Callable[[int], None] | None = None,
    ) -> None:
        if target_shard_bytes <= 0 or buffer_bytes <= 0:
            raise ValueError("target_shard_bytes and buffer_bytes must be positive")
        if row_group_rows is not None and row_group_rows <= 0:
            raise ValueError("row_group_rows must be positive")
        if shuffle and rng is None:
            raise ValueError("shuffle needs a generator")
        self._dir = out_dir
        self._schema = schema
        self._target = target_shard_bytes
        self._row_group_rows = row_group_rows
        self._buffer_bytes = buffer_bytes
        self._shuffle = shuffle
        self._rng = rng
        self._next_index = first_index
        self._on_rows = on_rows
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self._sink: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._current: str | None = None
        self._current_rows = 0
        self.written: list[WrittenShard] = []

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffer a batch; writes out the buffer once it exceeds ``buffer_bytes``."""
        if batch.num_rows == 0:
            return
        if not batch.schema.equals(self._schema):
            raise ValueError("batch schema differs from the writer's schema")
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        if self._pending_bytes >= self._buffer_bytes:
            self._flush()

    def close(self) -> list[WrittenShard]:
        """Write what is buffered and close the last shard; returns every shard written."""
        self._flush()
        self._close_shard()
        return self.written

    def abort(self) -> None:
        """Close open files without flushing (after an error); the caller removes the output."""
        self._pending.clear()
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                if self._sink is not None:
                    self._sink.close()
                    self._sink = None

    def _rows_per_group(self, table: pa.Table) -> int:
        if self._row_group_rows is not None:
            return self._row_group_rows
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        return int(np.clip(ROW_GROUP_TARGET_BYTES // row_bytes, MIN_ROW_GROUP_ROWS, MAX_ROW_GROUP_ROWS))

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        self._pending = []
        self._pending_bytes = 0
        if self._shuffle:
            if self._rng is None:
                raise ValueError("shuffle needs a generator")
            table = table.take(pa.array(self._rng.permutation(table.num_rows)))
        step = self._rows_per_group(table)
        for start in range(0, table.num_rows, step):
            if self._writer is None:
                self._open_shard()
            part = table.slice(start, step)
            if self._writer is None:
                raise RuntimeError("shard writer not open")
            self._writer.write_table(part, row_group_size=step)
            self._current_rows += part.num_rows
            if self._on_rows is not None:
                self._on_rows(part.num_rows)
            if self._sink.tell() >= self._target:
                self._close_shard()

    def _open_shard(self) -> None:
        name = shard_name(self._next_index)
        self._next_index += 1
        path = self._dir / name
        self._sink = open(path, "xb")
        self._writer = pq.ParquetWriter(
            self._sink, self._schema, compression="zstd", compression_level=ZSTD_LEVEL
        )
        self._current = name
        self._current_rows = 0

    def _close_shard(self) -> None:
        if self._writer is None or self._current is None:
            return
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        self.written.append(WrittenShard(self._current, self._current_rows))
        self._writer = None
        self._sink = None
        self._current = None
