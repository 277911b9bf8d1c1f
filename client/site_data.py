"""A site's dataset as numpy arrays for local training, read from its attested Parquet shards.

Usage::

    from fedseal.client.site_data import load_site_data
    data = load_site_data(Path("site-a/data"), validation_fraction=0.2, seed=7)
    data.x_train.shape   # (N_train, 784) float32
    data.root_hex        # dataset root the site committed to (from the manifest)

The dataset directory holds Parquet shards and ``fedseal-manifest.json`` (DESIGN.md §6, written
by ``fl-client data prepare``/``split``). Only the shards the manifest lists are read, and the
schema (label column, feature columns, feature shape and scale) comes from the manifest. The
split into a local training and a local validation part is a deterministic permutation seeded
per site; the validation part serves federated evaluation.

The whole dataset is held in memory: right for the demo's MNIST-5k, not for 100 GB shards
(the streaming loader of ``fedseal.client.data`` is the path for those).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from fedseal.client.data import Manifest, load_manifest

__all__ = ["SiteData", "SiteDataError", "load_site_data"]

MAX_ROWS_IN_MEMORY = 5_000_000


class SiteDataError(Exception):
    """The dataset cannot be loaded for training (schema, shape or size problem)."""

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"{directory}: {reason}")
        self.directory = directory
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SiteData:
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[np.int64]
    root_hex: str
    num_features: int
    num_classes: int


def _features(table: pa.Table, manifest: Manifest, directory: Path) -> npt.NDArray[np.float32]:
    schema = manifest.schema
    cols = schema.feature_columns
    n = table.num_rows
    if len(cols) == 1 and pa.types.is_fixed_size_list(table.schema.field(cols[0]).type):
        col = table.column(cols[0]).combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False)
        x = flat.reshape(n, -1)
    else:
        x = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in cols], axis=1)
    if x.shape[1] != schema.num_features:
        raise SiteDataError(directory, f"{x.shape[1]} features per row, manifest says {schema.num_features}")
    out: npt.NDArray[np.float32] = (x.astype(np.float32) * np.float32(schema.feature_scale)).astype(np.float32)
    return out


def load_site_data(directory: Path, *, validation_fraction: float, seed: int) -> SiteData:
    """Load the manifest's shards and split them into local train/validation parts.

    Raises:
        SiteDataError: Too many rows, missing columns, bad labels, or too few rows to split.
        fedseal.client.data.DatasetError: If the manifest is missing or invalid.
    """
    manifest = load_manifest(directory)
    if manifest.rows > MAX_ROWS_IN_MEMORY:
        raise SiteDataError(directory, f"{manifest.rows} rows exceed the in-memory limit")
    schema = manifest.schema
    wanted = [*schema.feature_columns, schema.label_column]
    try:
        tables = [pq.read_table(directory / f.path, columns=wanted) for f in manifest.files]
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise SiteDataError(directory, f"cannot read shards: {exc}") from exc
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows < 2:
        raise SiteDataError(directory, "fewer than 2 rows")
    x = _features(table, manifest, directory)
    y = table.column(schema.label_column).to_numpy(zero_copy_only=False).astype(np.int64)
    num_classes = schema.num_classes or int(y.max()) + 1
    if y.min() < 0 or y.max() >= num_classes:
        raise SiteDataError(directory, "labels outside [0, num_classes)")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = min(max(1, round(len(y) * validation_fraction)), len(y) - 1)
    val, tr = order[:n_val], order[n_val:]
    return SiteData(
        x_train=x[tr],
        y_train=y[tr],
        x_val=x[val],
        y_val=y[val],
        root_hex=manifest.root.hex(),
        num_features=x.shape[1],
        num_classes=num_classes,
    )
