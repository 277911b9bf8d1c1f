"""``fl-client data split``: one attested dataset directory per simulated site.

Example::

    result = split_dataset("mnist-5k", "demo-data", sites=3, scheme="dirichlet", alpha=0.5, seed=0)
    result.label_counts   # {site index: {label: count}}
    # demo-data/site-0, demo-data/site-1, demo-data/site-2: each shards + its own manifest and salt

Schemes: ``iid`` (a seeded permutation dealt round-robin, so site sizes differ by at most one)
and ``dirichlet`` (for each class, site proportions drawn from Dirichlet(alpha); small alpha gives
skewed label distributions; draws are repeated until every site holds at least one row).

Two streaming passes over the source: the label column first (to assign rows), then all columns,
routed to per-site :class:`~.shards.ShardWriter` buffers. Memory: one small integer per row for
the assignment plus the write buffers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from .errors import SourceError
from .manifest import DatasetSchema, Manifest, load_manifest
from .prepare import PrepareOptions, check_output, finalize, make_staging, open_source, publish
from .shards import ShardWriter
from .spec import SALT_SIZE

__all__ = ["SplitResult", "assign_sites", "site_dir_name", "split_dataset"]

Scheme = Literal["iid", "dirichlet"]
MAX_DIRICHLET_DRAWS = 1000


@dataclass(frozen=True, slots=True)
class SplitResult:
    """What :func:`split_dataset` wrote.

    Attributes:
        sites: The per-site directories, in site order.
        manifests: Their manifests.
        labels: The label values present in the source, sorted.
        label_counts: ``label_counts[k][j]``: rows of label ``labels[j]`` at site ``k``.
    """

    sites: tuple[Path, ...]
    manifests: tuple[Manifest, ...]
    labels: tuple[int, ...]
    label_counts: tuple[tuple[int, ...], ...]


def site_dir_name(index: int, sites: int) -> str:
    """``site-0`` ... zero-padded to the width of the largest index so names sort."""
    return f"site-{index:0{len(str(sites - 1))}d}"


def assign_sites(
    labels: npt.NDArray[np.int64], sites: int, scheme: Scheme, alpha: float, rng: np.random.Generator
) -> npt.NDArray[np.int32]:
    """Assign each row to a site (vectorised per class).

    Args:
        labels: The label of every row.
        sites: Number of sites ``K >= 1``.
        scheme: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (``> 0``; only for ``"dirichlet"``).
        rng: The generator.

    Returns:
        The site index of every row.

    Raises:
        SourceError: Fewer rows than sites, or no Dirichlet draw gives every site a row.
    """
    n = len(labels)
    if sites < 1:
        raise ValueError("sites must be at least 1")
    if n < sites:
        raise SourceError(None, f"{n} rows cannot be split across {sites} sites")
    assignment = np.empty(n, dtype=np.int32)
    if scheme == "iid":
        assignment[rng.permutation(n)] = np.arange(n, dtype=np.int32) % sites
        return assignment
    if scheme != "dirichlet":
        raise ValueError(f"unknown scheme {scheme!r}")
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        for rows in classes:
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            order = rng.permutation(rows)
            assignment[order] = np.searchsorted(cuts, np.arange(len(rows)), side="right").astype(np.int32)
        if np.bincount(assignment, minlength=sites).min() > 0:
            return assignment
    raise SourceError(None, f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave every one of {sites} sites a row; raise alpha")


def split_dataset(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    sites: int,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    options: PrepareOptions | None = None,
    salt_source: Callable[[int], bytes] = os.urandom,
    on_rows: Callable[[int], None] | None = None,
) -> SplitResult:
    """Split ``source`` into ``sites`` prepared datasets ``OUT/site-0`` ... (own salt each).

    Args:
        source: See :func:`~.prepare.open_source` (``"mnist-5k"`` for the bundled digits).
        out_dir: Output directory; must not exist or be empty.
        sites: Number of sites.
        scheme: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration.
        seed: Seed for the assignment and the per-site shuffles.
        label_column: The integer label column.
        feature_columns: Feature columns (default: all others).
        options: Shard settings (``options.seed`` is ignored in favour of ``seed``).
        salt_source: Draws each site's 32-byte salt.
        on_rows: Progress callback, called with the number of rows written.

    Returns:
        The sites, their manifests and the label counts.

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty (nothing is written).
        SourceError, CorruptShardError, SchemaMismatchError, RowCountMismatchError, LayoutError:
            The source is unusable; the error names the file (nothing is written).
    """
    opts = options or PrepareOptions()
    if sites < 1:
        raise ValueError("sites must be at least 1")
    out = Path(out_dir)
    check_output(out)
    src = open_source(source, label_column=label_column, feature_columns=feature_columns, seed=seed)
    label = src.dataset_schema.label_column
    parts = []
    for batch in src.batches([label]):
        column = batch.column(0)
        if column.null_count:
            raise SourceError(src.name, "label column holds nulls")
        parts.append(column.to_numpy().astype(np.int64))
    labels = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    assignment = assign_sites(labels, sites, scheme, alpha, rng)
    values = np.unique(labels)
    counts = tuple(
        tuple(int(c) for c in np.bincount(np.searchsorted(values, labels[assignment == k]), minlength=len(values)))
        for k in range(sites)
    )
    described = src.dataset_schema
    if described.num_classes is None and len(values) and values[0] >= 0:
        described = DatasetSchema(
            described.columns,
            described.label_column,
            described.feature_columns,
            described.feature_shape,
            described.feature_scale,
            int(values[-1]) + 1,
        )

    staging = make_staging(out)
    names = [site_dir_name(k, sites) for k in range(sites)]
    writers: list[ShardWriter] = []
    try:
        for k, name in enumerate(names):
            (staging / name).mkdir()
            writers.append(
                ShardWriter(
                    staging / name,
                    src.schema,
                    target_shard_bytes=opts.target_shard_bytes,
                    row_group_rows=opts.row_group_rows,
                    buffer_bytes=max(1, opts.buffer_bytes // sites),
                    shuffle=opts.shuffle,
                    rng=np.random.default_rng([seed, k]),
                    on_rows=on_rows,
                )
            )
        offset = 0
        for batch in src.batches():
            where = assignment[offset : offset + batch.num_rows]
            offset += batch.num_rows
            order = np.argsort(where, kind="stable")
            bounds = np.searchsorted(where[order], np.arange(sites + 1))
            grouped = batch.take(pa.array(order))
            for k in range(sites):
                if bounds[k + 1] > bounds[k]:
                    writers[k].write(grouped.slice(int(bounds[k]), int(bounds[k + 1] - bounds[k])))
        if offset != len(labels):
            raise SourceError(src.name, "source changed between the two passes")
        manifests = []
        for k, name in enumerate(names):
            writers[k].close()
            manifests.append(
                finalize(
                    staging / name,
                    described,
                    rows=sum(counts[k]),
                    chunk_size=opts.chunk_size,
                    salt=_salt(salt_source),
                    source=f"{src.name}; split {scheme}{f' alpha={alpha}' if scheme == 'dirichlet' else ''} seed={seed}: site {k} of {sites}",
                )
            )
        publish(staging, out)
    except BaseException:
        for writer in writers:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    paths = tuple(out / name for name in names)
    return SplitResult(paths, tuple(load_manifest(p) for p in paths), tuple(int(v) for v in values), counts)


def _salt(salt_source: Callable[[int], bytes]) -> bytes:
    salt = salt_source(SALT_SIZE)
    if len(salt) != SALT_SIZE:
        raise ValueError("salt_source must return 32 bytes")
    return salt
