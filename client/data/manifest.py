"""The dataset manifest ``fedseal-manifest.json`` (DESIGN.md §6).

The manifest stays on the site (it holds the salt). It records the algorithm id, salt, chunk size,
per file (path, size, rows, first leaf index, leaf count, and the RFC 6962 root of the file's own
leaves, so a broken extension can name the file), totals, the dataset root, and the table schema
the loader checks before training (columns and types, label column, feature columns and shape),
and the digest of the data contract its rows were checked against, if any.

Example::

    m = load_manifest("site-0")
    print(m.root.hex(), m.rows, [f.path for f in m.files], m.schema.feature_shape)
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseal.crypto.keys import write_atomic

from .errors import ManifestError
from .spec import ALGORITHM_ID, MANIFEST_NAME, MAX_CHUNK_SIZE, SALT_SIZE, SHARD_SUFFIX, leaf_count

__all__ = [
    "ColumnSpec",
    "DatasetSchema",
    "Manifest",
    "ManifestFile",
    "columns_from_text",
    "load_manifest",
    "manifest_path",
    "read_manifest_file",
    "schema_text",
    "write_manifest",
]

MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One column of the shards' Arrow schema.

    Attributes:
        name: Column name.
        type: Arrow type as printed by pyarrow, e.g. ``"int64"``,
            ``"fixed_size_list<item: uint8>[784]"``.
        nullable: Whether the field is nullable.
    """

    name: str
    type: str
    nullable: bool = True


@dataclass(frozen=True, slots=True)
class DatasetSchema:
    """What the shards hold and how the loader turns a row into ``(features, label)``.

    Attributes:
        columns: The full Arrow schema of every shard, in order.
        label_column: The integer class-label column.
        feature_columns: The feature columns: one fixed-size-list column, or numeric scalars.
        feature_shape: Shape of one example's features, e.g. ``(1, 28, 28)`` or ``(13,)``.
        feature_scale: Factor applied after casting features to float32 (``1/255`` for pixels).
        num_classes: Number of classes, where known.
    """

    columns: tuple[ColumnSpec, ...]
    label_column: str
    feature_columns: tuple[str, ...]
    feature_shape: tuple[int, ...]
    feature_scale: float = 1.0
    num_classes: int | None = None

    @property
    def num_features(self) -> int:
        """Number of scalar features per example (the product of ``feature_shape``)."""
        count = 1
        for dim in self.feature_shape:
            count *= dim
        return count

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [{"name": c.name, "type": c.type, "nullable": c.nullable} for c in self.columns],
            "label_column": self.label_column,
            "feature_columns": list(self.feature_columns),
            "feature_shape": list(self.feature_shape),
            "feature_scale": self.feature_scale,
            "num_classes": self.num_classes,
        }


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One shard as recorded in the manifest.

    Attributes:
        path: Relative POSIX path inside the dataset directory.
        size: Size in bytes.
        rows: Number of rows.
        first_leaf: Index of the file's first leaf in the dataset tree.
        leaf_count: Number of leaves (chunks) of the file.
        root: RFC 6962 root over the file's own leaf hashes.
    """

    path: str
    size: int
    rows: int
    first_leaf: int
    leaf_count: int
    root: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "rows": self.rows,
            "first_leaf": self.first_leaf,
            "leaf_count": self.leaf_count,
            "root": self.root.hex(),
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    """A dataset manifest (DESIGN.md §6).

    Attributes:
        algorithm: Always ``fedseal-dataset-v1/rfc6962-sha256``.
        salt: 32 random bytes, site-secret.
        chunk_size: Leaf chunk size in bytes.
        root: The dataset root.
        leaves: Total number of leaves.
        bytes: Total size of all shards.
        rows: Total number of rows.
        files: The shards in attestation order.
        schema: The shards' schema and feature/label description.
        source: Free-text provenance (what the dataset was prepared from).
        contract: The digest of the data contract every row was checked against
            (``prepare --contract``; :mod:`fedseal.protocol.contract`), or ``b""``: none.
    """

    algorithm: str
    salt: bytes = field(repr=False)
    chunk_size: int
    root: bytes
    leaves: int
    bytes: int
    rows: int
    files: tuple[ManifestFile, ...]
    schema: DatasetSchema
    source: str = ""
    contract: builtins.bytes = b""

    def to_json_bytes(self) -> builtins.bytes:
        """The manifest as UTF-8 JSON (sorted keys, two-space indent, trailing newline)."""
        doc = {
            "format": MANIFEST_FORMAT,
            "algorithm": self.algorithm,
            "salt": self.salt.hex(),
            "chunk_size": self.chunk_size,
            "root": self.root.hex(),
            "leaves": self.leaves,
            "bytes": self.bytes,
            "rows": self.rows,
            "files": [f.to_json() for f in self.files],
            "schema": self.schema.to_json(),
            "source": self.source,
        }
        if self.contract:  # only then: manifests prepared without a contract keep their bytes
            doc["contract"] = self.contract.hex()
        return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    def file(self, path: str) -> ManifestFile | None:
        """The entry for ``path``, or ``None``."""
        for entry in self.files:
            if entry.path == path:
                return entry
        return None


def schema_text(columns: tuple[ColumnSpec, ...]) -> str:
    """Canonical JSON text of column specs (stored in the attestation cache)."""
    return json.dumps([[c.name, c.type, c.nullable] for c in columns], separators=(",", ":"))


def columns_from_text(text: str) -> tuple[ColumnSpec, ...]:
    """Inverse of :func:`schema_text`."""
    return tuple(ColumnSpec(str(n), str(t), bool(b)) for n, t, b in json.loads(text))


def manifest_path(directory: str | os.PathLike[str]) -> Path:
    """Path of the manifest inside a dataset directory."""
    return Path(directory) / MANIFEST_NAME


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest of a dataset directory.

    Args:
        directory: The dataset directory.

    Returns:
        The manifest.

    Raises:
        ManifestError: The manifest is missing, unreadable, not valid JSON, or inconsistent.
    """
    return read_manifest_file(manifest_path(directory))


def read_manifest_file(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file (e.g. a saved copy of an approved manifest).

    Args:
        path: The manifest file.

    Returns:
        The manifest.

    Raises:
        ManifestError: The file is missing, a symlink, too large, not valid JSON, or inconsistent.
    """
    name = os.fspath(path)
    try:
        if os.path.islink(name):
            raise ManifestError(name, "manifest is a symlink; symlinks are refused")
        with open(name, "rb") as handle:
            # Read what is there, up to one byte over the limit (``read(n)`` would reserve n).
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(min(size, MAX_MANIFEST_BYTES) + 1)
    except FileNotFoundError:
        raise ManifestError(name, "manifest missing (prepare the dataset with `fl-client data prepare`)") from None
    except OSError as exc:
        raise ManifestError(name, f"cannot read manifest: {exc.strerror}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(name, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(name, f"manifest is not valid UTF-8 JSON: {exc}") from exc
    return _parse(name, doc)


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write the manifest atomically (temporary file, fsync, rename).

    Args:
        directory: The dataset directory.
        manifest: The manifest to write.

    Returns:
        The manifest's path.
    """
    target = manifest_path(directory)
    write_atomic(target, manifest.to_json_bytes(), 0o600)
    return target


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def _get(name: str, doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in doc:
        raise ManifestError(name, f"manifest field {where}{key!r} missing")
    value = doc[key]
    # bool is an int subclass: never accept it where a number is expected.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestError(name, f"manifest field {where}{key!r} has the wrong type")
    return value


def _nonneg(name: str, doc: Mapping[str, Any], key: str, where: str = "") -> int:
    value: int = _get(name, doc, key, int, where)
    if value < 0 or value >= 1 << 63:
        raise ManifestError(name, f"manifest field {where}{key!r} out of range")
    return value


def _hex(name: str, doc: Mapping[str, Any], key: str, size: int, where: str = "") -> bytes:
    text: str = _get(name, doc, key, str, where)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ManifestError(name, f"manifest field {where}{key!r} is not hex") from None
    if len(value) != size:
        raise ManifestError(name, f"manifest field {where}{key!r} must be {size} bytes")
    return value


def _parse_schema(name: str, doc: Any) -> DatasetSchema:
    if not isinstance(doc, dict):
        raise ManifestError(name, "manifest field 'schema' has the wrong type")
    raw_columns = _get(name, doc, "columns", list, "schema.")
    columns = []
    for item in raw_columns:
        if not isinstance(item, dict):
            raise ManifestError(name, "manifest field 'schema.columns' has the wrong type")
        columns.append(
            ColumnSpec(
                _get(name, item, "name", str, "schema.columns."),
                _get(name, item, "type", str, "schema.columns."),
                _get(name, item, "nullable", bool, "schema.columns."),
            )
        )
    names = [c.name for c in columns]
    label = _get(name, doc, "label_column", str, "schema.")
    features = tuple(_get(name, doc, "feature_columns", list, "schema."))
    shape = tuple(_get(name, doc, "feature_shape", list, "schema."))
    scale = _get(name, doc, "feature_scale", (int, float), "schema.")
    num_classes = doc.get("num_classes")
    if label not in names:
        raise ManifestError(name, f"schema label column {label!r} is not a column")
    if not features or any(not isinstance(f, str) or f not in names or f == label for f in features):
        raise ManifestError(name, "schema feature columns must be non-empty, existing, non-label columns")
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise ManifestError(name, "schema feature_shape must be positive integers")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0):
        raise ManifestError(name, "schema num_classes must be a positive integer or null")
    return DatasetSchema(tuple(columns), label, features, shape, float(scale), num_classes)


def _parse(name: str, doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(name, "manifest is not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ManifestError(name, f"unsupported manifest format {doc.get('format')!r}")
    algorithm = _get(name, doc, "algorithm", str)
    if algorithm != ALGORITHM_ID:
        raise ManifestError(name, f"unsupported attestation algorithm {algorithm!r}")
    salt = _hex(name, doc, "salt", SALT_SIZE)
    chunk_size = _nonneg(name, doc, "chunk_size")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(name, "manifest field 'chunk_size' out of range")
    root = _hex(name, doc, "root", 32)
    raw_files = _get(name, doc, "files", list)
    files: list[ManifestFile] = []
    next_leaf = 0
    total_bytes = total_rows = 0
    for item in raw_files:
        if not isinstance(item, dict):
            raise ManifestError(name, "manifest field 'files' has the wrong type")
        entry = ManifestFile(
            _get(name, item, "path", str, "files."),
            _nonneg(name, item, "size", "files."),
            _nonneg(name, item, "rows", "files."),
            _nonneg(name, item, "first_leaf", "files."),
            _nonneg(name, item, "leaf_count", "files."),
            _hex(name, item, "root", 32, "files."),
        )
        parts = entry.path.split("/")
        if (
            not entry.path.endswith(SHARD_SUFFIX)
            or entry.path.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise ManifestError(name, f"file path {entry.path!r} is not a relative .parquet path")
        if files and files[-1].path.encode("utf-8") >= entry.path.encode("utf-8"):
            raise ManifestError(name, f"file {entry.path!r} is out of order or duplicated")
        if entry.size == 0 or entry.leaf_count != leaf_count(entry.size, chunk_size):
            raise ManifestError(name, f"file {entry.path!r}: size and leaf count disagree")
        if entry.first_leaf != next_leaf:
            raise ManifestError(name, f"file {entry.path!r}: first_leaf is not contiguous")
        next_leaf += entry.leaf_count
        total_bytes += entry.size
        total_rows += entry.rows
        files.append(entry)
    if not files:
        raise ManifestError(name, "manifest lists no files")
    leaves = _nonneg(name, doc, "leaves")
    size = _nonneg(name, doc, "bytes")
    rows = _nonneg(name, doc, "rows")
    if (leaves, size, rows) != (next_leaf, total_bytes, total_rows):
        raise ManifestError(name, "manifest totals (leaves, bytes, rows) disagree with its files")
    schema = _parse_schema(name, doc.get("schema"))
    source = doc.get("source", "")
    if not isinstance(source, str):
        raise ManifestError(name, "manifest field 'source' has the wrong type")
    contract = _hex(name, doc, "contract", 32) if "contract" in doc else b""
    return Manifest(algorithm, salt, chunk_size, root, leaves, size, rows, tuple(files), schema, source, contract)
