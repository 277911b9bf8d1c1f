"""Helpers shared by the data/attestation/loader tests: small Parquet datasets on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedseal.client.data import (
    ALGORITHM_ID,
    DatasetSchema,
    Manifest,
    attest_with,
)
from fedseal.client.data.manifest import write_manifest
from fedseal.client.data.shards import column_specs

SALT = bytes(range(32))
FEATURES = 3


def rows_table(start: int, count: int, *, extra_column: bool = False) -> pa.Table:
    """Rows with ids start..start+count-1: x = [id, 2 id, 3 id] (int32), label = id % 5."""
    ids = np.arange(start, start + count, dtype=np.int32)
    values = np.stack([ids, 2 * ids, 3 * ids], axis=1).reshape(-1)
    columns = {
        "x": pa.FixedSizeListArray.from_arrays(
            pa.array(values, type=pa.int32()), type=pa.list_(pa.field("element", pa.int32()), FEATURES)
        ),
        "label": pa.array(ids.astype(np.int64) % 5),
    }
    if extra_column:
        columns["note"] = pa.array(["n"] * count)
    return pa.table(columns)


def write_shard(path: Path, table: pa.Table, *, row_group_rows: int = 100, compression: str = "zstd") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows, compression=compression)


def dataset_schema(table: pa.Table) -> DatasetSchema:
    return DatasetSchema(column_specs(table.schema), "label", ("x",), (FEATURES,), 1.0, 5)


def write_manifest_for(directory: Path, *, salt: bytes = SALT, chunk_size: int = 1024) -> Manifest:
    """Attest the directory's shards with the production code and write a matching manifest."""
    att = attest_with(directory, salt, chunk_size, use_cache=False)
    first = next(p for p in sorted(directory.rglob("*.parquet")) if p.is_file())
    schema = pq.read_schema(first).remove_metadata()
    described = DatasetSchema(column_specs(schema), "label", ("x",), (FEATURES,), 1.0, 5)
    manifest = Manifest(
        ALGORITHM_ID,
        salt,
        chunk_size,
        att.root,
        att.leaves,
        att.bytes,
        att.rows,
        tuple(f.to_manifest_file() for f in att.files),
        described,
        "test",
    )
    write_manifest(directory, manifest)
    return manifest


def make_dataset(
    directory: Path,
    sizes: list[int],
    *,
    row_group_rows: int = 100,
    chunk_size: int = 1024,
    salt: bytes = SALT,
    names: list[str] | None = None,
) -> Manifest:
    """Shards with consecutive row ids, e.g. sizes [300, 200] -> ids 0..299 and 300..499."""
    start = 0
    for index, count in enumerate(sizes):
        name = names[index] if names else f"shard-{index:05d}.parquet"
        write_shard(directory / name, rows_table(start, count), row_group_rows=row_group_rows)
        start += count
    return write_manifest_for(directory, salt=salt, chunk_size=chunk_size)


def flip_byte_in_pages(path: Path, position_fraction: float) -> int:
    """Flip one byte inside the data pages (not the footer), keeping the footer readable.

    Returns the offset flipped.
    """
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    end = len(data) - 8 - footer_len
    offset = 4 + int(position_fraction * (end - 5))
    data[offset] ^= 0x01
    st = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return offset
