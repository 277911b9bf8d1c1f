"""The fedseal.client.data exception tree.

Every problem with a site's data (a corrupt shard, a schema or row count that differs from the
manifest, a symlink, an empty file, a missing manifest, a dataset that does not extend an approved
one) raises a subclass of :class:`DatasetError` naming the file concerned and the reason. Callers
that only want "the dataset is not usable" catch :class:`DatasetError`; the CLI turns it into one
line on stderr and exit code 1. Programming mistakes (a negative chunk size, ``sites=0``) raise
``ValueError``/``TypeError``::

    DatasetError                  path, reason
    ├── ManifestError             manifest missing, unreadable or inconsistent
    ├── LayoutError               symlink, empty file, non-regular file, non-UTF-8 name, no shards
    ├── CorruptShardError         pyarrow cannot read a shard (footer or pages)
    ├── SchemaMismatchError       a shard's schema differs from the manifest or another shard
    ├── RowCountMismatchError     a shard's row count differs from the manifest / its footer
    ├── ContentMismatchError      a shard's bytes differ from the manifest (size, root, missing)
    ├── DatasetChangedError       a shard changed while it was being read
    ├── ExtensionError            the dataset does not extend an earlier manifest
    ├── SourceError               a `prepare`/`split` source is unsupported or unusable
    │   └── ContractViolationError    a source row breaks the data contract (line, column)
    └── OutputExistsError         refusing to write over an existing directory or file
"""

from __future__ import annotations

from fedseal.client.errors import SiteError

__all__ = [
    "ContentMismatchError",
    "ContractViolationError",
    "CorruptShardError",
    "DatasetChangedError",
    "DatasetError",
    "ExtensionError",
    "LayoutError",
    "ManifestError",
    "OutputExistsError",
    "RowCountMismatchError",
    "SchemaMismatchError",
    "SourceError",
]


class DatasetError(SiteError):
    """Base class of every data, manifest and attestation error of a partner site.

    Attributes:
        path: The file or directory concerned (as given or relative to the dataset), or
            ``None`` when the problem is not tied to one file.
        reason: A human-readable reason, without the path.
    """

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ManifestError(DatasetError):
    """The manifest ``fedseal-manifest.json`` is missing, unreadable, or inconsistent."""


class LayoutError(DatasetError):
    """The dataset directory breaks the file rules of DESIGN.md §6 (symlink, empty file, ...)."""


class CorruptShardError(DatasetError):
    """pyarrow cannot read a Parquet shard (corrupt footer, pages, or levels)."""


class SchemaMismatchError(DatasetError):
    """A shard's schema differs from the manifest's schema or from the other shards'."""


class RowCountMismatchError(DatasetError):
    """A shard holds a different number of rows than the manifest or its own footer says.

    Attributes:
        expected: The row count that was expected.
        actual: The row count found.
    """

    def __init__(self, path: str | None, reason: str, *, expected: int, actual: int) -> None:
        super().__init__(path, reason)
        self.expected = expected
        self.actual = actual


class ContentMismatchError(DatasetError):
    """A shard's bytes differ from the manifest (size, per-file root), or a shard is missing."""


class DatasetChangedError(DatasetError):
    """A shard was modified while it was being hashed or read; run the command again."""


class ExtensionError(DatasetError):
    """The current dataset does not extend an earlier (approved) manifest."""


class SourceError(DatasetError):
    """A source given to ``prepare``/``split`` is missing, unsupported, or lacks a column."""


class ContractViolationError(SourceError):
    """A source breaks the data contract it is prepared under (``prepare --contract``).

    Attributes:
        line: The 1-based line of the file (1: the header).
        column: The contract column concerned.
        value: The cell's text as read, or ``None`` (a missing column).
    """

    def __init__(self, path: str, line: int, column: str, value: str | None, reason: str) -> None:
        shown = "" if value is None else f", value {value[:80]!r}"
        super().__init__(path, f"line {line}, column {column!r}: {reason}{shown}")
        self.line = line
        self.column = column
        self.value = value


class OutputExistsError(DatasetError):
    """An output path already exists and is not empty; nothing was written over it."""
