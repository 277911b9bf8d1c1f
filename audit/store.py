"""An append-only RFC 6962 / RFC 9162 Merkle log stored in SQLite (the audit-log store).

Example::

    from fedseal.audit.store import MerkleLogStore

    with MerkleLogStore.open("audit.sqlite") as store:
        index = store.append(kind=1, data=b"canonical entry bytes")   # durable on return
        head = store.root(store.size)
        proof = store.inclusion_proof(index, store.size)

The store knows nothing about what an entry *means*: it keeps opaque entry bytes (the
canonical encoding is defined in :mod:`fedseal.audit.codec`), a small integer ``kind`` and
optional ``site``/``round`` tags used only to *find* entries, plus opaque signed tree heads.

Unsigned copies: the ``kind``/``site``/``round`` tags, the stored leaf hashes, the ``nodes``
cache and the ``tree_size``/``root_hash``/``timestamp_ms`` columns of ``tree_heads`` repeat what
the entry bytes and the signed tree heads say, so that look-ups and proofs need no scan. Nothing
here trusts them, and neither may a reader: the verifier
(:meth:`fedseal.audit.verifier.AuditVerifier.verify_store`) reads them raw
(:meth:`MerkleLogStore.iter_index_rows`, :meth:`MerkleLogStore.iter_node_rows`,
:meth:`MerkleLogStore.tree_head_rows`) and checks every one against the entries and the signed
tree heads, so a log that verifies serves proofs and look-ups that are as good as the signed data.

Storage layout (schema version 1):

* ``entries(idx INTEGER PRIMARY KEY, kind, site, round, data, leaf_hash)``: leaf ``idx`` of the
  tree; ``leaf_hash = SHA-256(0x00 || data)`` (RFC 9162 §2.1.1).
* ``nodes(id INTEGER PRIMARY KEY, hash)``: the root of every *complete* aligned subtree of
  height ``h >= 1``, ``[k * 2**h, (k + 1) * 2**h)``, keyed ``id = (h << 48) | k``. Each one is
  written once, when its last leaf is appended (amortised one node per append), so any
  RFC 9162 subtree root is at most ``log2(n) + 1`` point look-ups and inclusion and
  consistency proofs need ``O(log(n)**2)`` look-ups at any size, never a scan.
* ``tree_heads(seq INTEGER PRIMARY KEY, tree_size, root_hash, timestamp_ms, blob)``: signed tree
  heads (``blob`` is their canonical signed encoding; the columns are an index).

Durability: the database runs in WAL mode with ``synchronous=FULL``; every ``append`` is one
``BEGIN IMMEDIATE … COMMIT`` transaction, so when it returns the entry is on disk (the WAL is
fsynced at commit). A process killed at any point loses at most the append in flight. One
writer at a time (SQLite's lock enforces it); readers may run in other threads or processes.

WAL: committed entries live in ``<log>-wal`` until SQLite checkpoints them into the main file,
so while a writer has the log open (or after a writer was killed) the main file alone is *not*
the log: ``cp audit.sqlite`` can silently drop entries. :meth:`MerkleLogStore.close` of a
writable store checkpoints the WAL into the main file and truncates it
(``PRAGMA wal_checkpoint(TRUNCATE)``), as does :meth:`MerkleLogStore.checkpoint`; take copies
of a live log with SQLite's online backup API (``fedseal-backup``, or ``sqlite3 LOG ".backup
COPY"``), never with ``cp``. :func:`wal_file` names the file to look for.

Errors (:mod:`fedseal.audit.errors`)::

    CryptoError
    └── AuditLogError          the store cannot serve the request
        ├── LogFormatError     not a fedseal audit log, unknown schema version, corrupt rows
        └── LogRangeError      index or tree size outside the log
"""

from __future__ import annotations

import hmac
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedseal.audit.errors import LogFormatError, LogRangeError
from fedseal.crypto.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    consistency_proof_from_subtrees,
    inclusion_proof_from_subtrees,
    leaf_hash,
    root_from_perfect_subtrees,
)

__all__ = [
    "SCHEMA_VERSION",
    "MerkleLogStore",
    "StoredEntry",
    "StoredTreeHead",
    "node_id",
    "wal_file",
]

SCHEMA_VERSION = 1
_APPLICATION_ID = 0x46534C47  # "FSLG" = 1179864135: marks the SQLite file as a fedseal log
_LEVEL_SHIFT = 48
_MAX_ENTRY_BYTES = 16 * 1024 * 1024

_CREATE_SCRIPT = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    site TEXT,
    round INTEGER,
    data BLOB NOT NULL,
    leaf_hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_kind ON entries (kind, round, site);
CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tree_heads (
    seq INTEGER PRIMARY KEY,
    tree_size INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    blob BLOB NOT NULL
);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', 1);
PRAGMA application_id=1179864135;
COMMIT;
"""
# The script's literals must match these.


_SCHEMA: list[tuple[object, ...]] = []


def _expected_schema() -> list[tuple[object, ...]]:
    """``sqlite_master`` rows of a freshly created log, sorted (computed once)."""
    if not _SCHEMA:
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            conn.executescript(_CREATE_SCRIPT)
            rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
        finally:
            conn.close()
        _SCHEMA.extend(sorted((tuple(r) for r in rows), key=repr))
    return _SCHEMA


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One stored entry, as read back (``leaf_hash`` is the stored, untrusted copy)."""

    index: int
    kind: int
    data: bytes
    leaf_hash: bytes


@dataclass(frozen=True, slots=True)
class StoredTreeHead:
    """A stored signed tree head; ``blob`` is its canonical signed encoding."""

    seq: int
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    blob: bytes


def node_id(height: int, k: int) -> int:
    """Key of the stored root of the complete subtree ``[k * 2**height, (k + 1) * 2**height)``."""
    return (height << _LEVEL_SHIFT) | k


def wal_file(path: str | Path) -> Path:
    """The write-ahead log SQLite keeps beside the log at ``path`` (``<path>-wal``)."""
    return Path(f"{path}-wal")


class MerkleLogStore:
    """The SQLite-backed Merkle log. Open with :meth:`open`; thread-safe (one lock)."""

    __slots__ = ("_conn", "_lock", "_path", "_range", "_read_only", "_size")

    def __init__(self, conn: sqlite3.Connection, path: Path, *, read_only: bool = False) -> None:
        self._conn = conn
        self._path = path
        self._read_only = read_only
        self._lock = threading.RLock()
        self._size = 0
        # Roots of the complete subtrees that make up the current tree: [0, size).
        self._range = CompactRange()
        self._reload()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | Path, *, create: bool = True, read_only: bool = False
    ) -> MerkleLogStore:
        """Open (and, if ``create``, create) the log at ``path``.

        Args:
            path: The SQLite file.
            create: Create an empty log if the file does not exist.
            read_only: Open without write access (appends then fail).

        Raises:
            LogFormatError: If the file is not a fedseal log or has another schema version.
            FileNotFoundError: If the file does not exist and ``create`` is false.
        """
        p = Path(path)
        if not p.exists() and (read_only or not create):
            raise FileNotFoundError(str(p))
        try:
            if read_only:
                conn = sqlite3.connect(
                    f"{p.resolve().as_uri()}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False)
            # A TEXT value that is not UTF-8 (only a tampered row holds one) reads back with
            # its bytes escaped rather than failing the whole query: the verifier names it.
            conn.text_factory = _text
            conn.execute("PRAGMA busy_timeout=10000")
            if not read_only:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as exc:
            raise LogFormatError(f"not a readable SQLite database: {exc}") from exc
        if not tables and not read_only:
            conn.executescript(_CREATE_SCRIPT)
        elif app_id != _APPLICATION_ID:
            conn.close()
            raise LogFormatError("the file is not a fedseal audit log")
        try:
            rows = conn.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LogFormatError(f"meta table unreadable: {exc}") from exc
        # Exactly one meta row, the integer schema version (a REAL 1.0 or TEXT '1' is not it).
        version = rows[0][1] if len(rows) == 1 and rows[0][0] == "schema_version" else None
        if type(version) is not int or version != SCHEMA_VERSION:
            conn.close()
            raise LogFormatError(
                f"unsupported audit-log schema (meta table: {rows[:3]!r}; "
                f"expected [('schema_version', {SCHEMA_VERSION})])"
            )
        return cls(conn, p, read_only=read_only)

    def checkpoint(self) -> bool:
        """Copy every committed page from the WAL into the main file and truncate the WAL
        (``PRAGMA wal_checkpoint(TRUNCATE)``), so that the main file alone holds the whole log.

        Returns:
            Whether it completed (``False``: a reader kept it from finishing within the busy
            timeout, or the store is read-only; the log is intact either way).
        """
        if self._read_only:
            return False
        with self._lock:
            try:
                row = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error:
                return False
        return row is not None and int(row[0]) == 0

    def close(self) -> None:
        """Close the database connection; a writable store first checkpoints the WAL into the
        main file (:meth:`checkpoint`), so a clean stop leaves a self-contained file."""
        with self._lock:
            if not self._read_only:
                self.checkpoint()
            self._conn.close()

    def __enter__(self) -> MerkleLogStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    # -- tree state ------------------------------------------------------------------------

    def _db_size(self) -> int:
        try:
            row = self._conn.execute("SELECT max(idx) FROM entries").fetchone()
        except sqlite3.DatabaseError as exc:
            raise LogFormatError(f"database is corrupt: {exc}") from exc
        return 0 if row[0] is None else int(row[0]) + 1

    def _reload(self) -> None:
        """Re-read the size and the frontier (after another writer, or at open)."""
        size = self._db_size()
        self._range = CompactRange.from_perfect_subtrees(size, self._perfect_root)
        self._size = size

    @property
    def size(self) -> int:
        """Number of entries (tree size), re-read from the database."""
        with self._lock:
            size = self._db_size()
            if size != self._size:
                self._reload()
            return self._size

    def _perfect_root(self, start: int, width: int) -> bytes:
        """Root of the complete aligned subtree ``[start, start + width)`` (stored)."""
        if width == 1:
            row = self._conn.execute(
                "SELECT leaf_hash FROM entries WHERE idx=?", (start,)
            ).fetchone()
        else:
            height = width.bit_length() - 1
            row = self._conn.execute(
                "SELECT hash FROM nodes WHERE id=?", (node_id(height, start >> height),)
            ).fetchone()
        if row is None or not isinstance(row[0], bytes) or len(row[0]) != HASH_SIZE:
            raise LogFormatError(
                f"stored hash of subtree [{start}, {start + width}) is missing or malformed",
                index=start,
            )
        return row[0]

    def _subtree_root(self, start: int, end: int) -> bytes:
        return root_from_perfect_subtrees(start, end, self._perfect_root)

    # -- appending -------------------------------------------------------------------------

    def append(
        self, kind: int, data: bytes, *, site: str | None = None, round: int | None = None
    ) -> int:
        """Append one entry and commit it durably before returning.

        Args:
            kind: The entry's kind code (a small non-negative integer, for look-ups).
            data: The entry's canonical bytes (the leaf data).
            site: Optional site tag, for look-ups only.
            round: Optional round tag, for look-ups only.

        Returns:
            The new entry's index.

        Raises:
            ValueError: If ``data`` is empty or larger than 16 MiB.
            PermissionError: If the store was opened read-only.
        """
        return self.append_many([(kind, data, site, round)])

    def append_many(self, items: Iterable[tuple[int, bytes, str | None, int | None]]) -> int:
        """Append entries ``(kind, data, site, round)`` in one durable transaction.

        Returns:
            The index of the first appended entry (the size before the call).

        Raises:
            ValueError: If an entry's data is empty or larger than 16 MiB.
            PermissionError: If the store was opened read-only.
        """
        if self._read_only:
            raise PermissionError("the audit log was opened read-only")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._db_size() != self._size:
                    self._reload()
                first = self._size
                size = self._size
                tree = self._range.copy()
                rows: list[tuple[int, int, str | None, int | None, bytes, bytes]] = []
                nodes: list[tuple[int, bytes]] = []

                def keep(height: int, k: int, root: bytes) -> None:
                    nodes.append((node_id(height, k), root))

                for kind, data, site, rnd in items:
                    if not data or len(data) > _MAX_ENTRY_BYTES:
                        raise ValueError("entry data must be 1 byte to 16 MiB")
                    h = leaf_hash(data)
                    rows.append((size, kind, site, rnd, bytes(data), h))
                    tree.append(h, keep)  # every subtree it completes goes to `nodes`
                    size += 1
                conn.executemany(
                    "INSERT INTO entries(idx, kind, site, round, data, leaf_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.executemany("INSERT INTO nodes(id, hash) VALUES (?, ?)", nodes)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._size = size
            self._range = tree
            return first

    # -- reading ---------------------------------------------------------------------------

    def root(self, tree_size: int | None = None) -> bytes:
        """The Merkle tree hash of the first ``tree_size`` entries (default: all).

        Raises:
            LogRangeError: If ``tree_size`` is negative or beyond the log.
        """
        with self._lock:
            size = self.size
            if tree_size is None:
                tree_size = size
            if not 0 <= tree_size <= size:
                raise LogRangeError("tree size outside the log", value=tree_size, size=size)
            if tree_size == 0:
                return EMPTY_ROOT
            if tree_size == size:
                return self._range.root()
            return self._subtree_root(0, tree_size)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """RFC 9162 §2.1.3 inclusion proof of entry ``index`` in the tree of ``tree_size``.

        Raises:
            LogRangeError: If ``tree_size`` is beyond the log or ``index >= tree_size``.
        """
        with self._lock:
            size = self.size
            if not 0 < tree_size <= size:
                raise LogRangeError("tree size outside the log", value=tree_size, size=size)
            if not 0 <= index < tree_size:
                raise LogRangeError("index outside the tree", value=index, size=tree_size)
            return inclusion_proof_from_subtrees(self._subtree_root, index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 §2.1.4 consistency proof between two tree sizes.

        Raises:
            LogRangeError: If not ``1 <= old_size <= new_size <= size``.
        """
        with self._lock:
            size = self.size
            if not 0 < new_size <= size:
                raise LogRangeError("new tree size outside the log", value=new_size, size=size)
            if not 0 < old_size <= new_size:
                raise LogRangeError(
                    "old tree size not in [1, new size]", value=old_size, size=new_size
                )
            return consistency_proof_from_subtrees(self._subtree_root, old_size, new_size)

    def leaf_hash(self, index: int) -> bytes:
        """The stored leaf hash of entry ``index``.

        Raises:
            LogRangeError: If the index is outside the log.
        """
        with self._lock:
            size = self.size
            if not 0 <= index < size:
                raise LogRangeError("index outside the log", value=index, size=size)
            return self._perfect_root(index, 1)

    def entries(self, start: int, end: int) -> list[StoredEntry]:
        """Entries ``[start, end)``.

        Raises:
            LogRangeError: If the range is not inside the log.
            LogFormatError: If an entry in the range is missing.
        """
        with self._lock:
            size = self.size
            if not 0 <= start <= end <= size:
                raise LogRangeError("range outside the log", value=end, size=size)
            return list(self._iter(start, end))

    def iter_entries(
        self, start: int = 0, end: int | None = None, *, batch: int = 8192
    ) -> Iterator[StoredEntry]:
        """Yield entries in index order, reading ``batch`` rows at a time.

        Unlike :meth:`entries` this does not check that indices are contiguous: a verifier
        sees a gap (a deleted row) as a jump in ``index``.
        """
        pos = start
        while True:
            with self._lock:
                limit = batch if end is None else min(batch, end - pos)
                if limit <= 0:
                    return
                try:
                    rows = self._conn.execute(
                        "SELECT idx, kind, data, leaf_hash FROM entries WHERE idx >= ? "
                        "ORDER BY idx LIMIT ?",
                        (pos, limit),
                    ).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise LogFormatError(f"database is corrupt: {exc}", index=pos) from exc
            if not rows:
                return
            for idx, kind, data, lh in rows:
                if end is not None and idx >= end:
                    return
                yield StoredEntry(int(idx), _as_int(kind), _as_bytes(data), _as_bytes(lh))
            pos = int(rows[-1][0]) + 1

    def iter_leaf_rows(
        self, start: int = 0, end: int | None = None, *, batch: int = 16384, raw: bool = False
    ) -> Iterator[tuple[int, bytes, bytes]]:
        """Yield ``(index, data, stored leaf hash)`` tuples in index order (a verifier's scan).

        The same rows as :meth:`iter_entries` without building a :class:`StoredEntry` per
        row: each query reads ``batch`` rows after the last index seen (keyset pagination
        over the primary key, so no row is skipped or repeated at a batch boundary, and the
        lock is released between batches). Gaps (deleted rows) show as a jump in ``index``;
        a BLOB column holding another type is converted as :meth:`iter_entries` does, unless
        ``raw``: then the values come as SQLite hands them back (a verifier checks their types).

        Raises:
            LogFormatError: If the database cannot be read.
            ValueError: If ``batch`` is not positive.
        """
        if batch <= 0:
            raise ValueError("batch must be positive")
        sql = "SELECT idx, data, leaf_hash FROM entries WHERE idx >= ? ORDER BY idx LIMIT ?"
        if end is not None:
            sql = (
                "SELECT idx, data, leaf_hash FROM entries WHERE idx >= ? AND idx < ? "
                "ORDER BY idx LIMIT ?"
            )
        pos = start
        while True:
            with self._lock:
                try:
                    cursor = self._conn.execute(
                        sql, (pos, batch) if end is None else (pos, end, batch)
                    )
                    rows: list[tuple[int, bytes, bytes]] = cursor.fetchall()
                except sqlite3.DatabaseError as exc:
                    raise LogFormatError(f"database is corrupt: {exc}", index=pos) from exc
            if raw:
                yield from rows
            else:
                for row in rows:
                    if type(row[1]) is not bytes or type(row[2]) is not bytes:
                        row = (row[0], _as_bytes(row[1]), _as_bytes(row[2]))
                    yield row
            if len(rows) < batch:
                return
            pos = rows[-1][0] + 1

    def iter_index_rows(
        self, start: int = 0, *, batch: int = 16384
    ) -> Iterator[tuple[int, object, object, object]]:
        """Yield the raw index columns ``(idx, kind, site, round)`` of every entry from
        ``start``, in index order, as SQLite stores them (unconverted: a verifier compares
        them, types included, with what the entry bytes say). Reads no entry bytes.

        Raises:
            LogFormatError: If the database cannot be read.
        """
        pos = start
        while True:
            with self._lock:
                try:
                    rows: list[tuple[int, object, object, object]] = self._conn.execute(
                        "SELECT idx, kind, site, round FROM entries WHERE idx >= ? "
                        "ORDER BY idx LIMIT ?",
                        (pos, batch),
                    ).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise LogFormatError(f"database is corrupt: {exc}", index=pos) from exc
            yield from rows
            if len(rows) < batch:
                return
            pos = rows[-1][0] + 1

    def iter_node_rows(self, height: int, *, batch: int = 4096) -> Iterator[tuple[int, object]]:
        """Yield the raw ``(id, hash)`` rows of the ``nodes`` cache at ``height`` (``>= 1``) in
        ``id`` order, i.e. subtree by subtree from the left (see :func:`node_id`).

        Raises:
            LogFormatError: If the database cannot be read.
        """
        pos, end = node_id(height, 0), node_id(height + 1, 0)
        while True:
            with self._lock:
                try:
                    rows: list[tuple[int, object]] = self._conn.execute(
                        "SELECT id, hash FROM nodes WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                        (pos, end, batch),
                    ).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise LogFormatError(f"database is corrupt: {exc}") from exc
            yield from rows
            if len(rows) < batch:
                return
            pos = rows[-1][0] + 1

    def node_ids_outside(self, max_height: int, *, limit: int = 3) -> list[int]:
        """Ids of ``nodes`` rows that no height ``1..max_height`` can hold (at most ``limit``).

        Raises:
            LogFormatError: If the database cannot be read.
        """
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT id FROM nodes WHERE id < ? OR id >= ? ORDER BY id LIMIT ?",
                    (node_id(1, 0), node_id(max_height + 1, 0), limit),
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                raise LogFormatError(f"database is corrupt: {exc}") from exc
        return [int(r[0]) for r in rows]

    def _iter(self, start: int, end: int) -> Iterator[StoredEntry]:
        expected = start
        for entry in self.iter_entries(start, end):
            if entry.index != expected:
                raise LogFormatError("entry missing", index=expected)
            expected += 1
            yield entry
        if expected != end:
            raise LogFormatError("entry missing", index=expected)

    def find(self, kind: int, *, round: int | None = None, site: str | None = None) -> list[int]:
        """Indices of entries with the given kind (and ``round``/``site`` tags), in order."""
        sql = "SELECT idx FROM entries WHERE idx >= 0 AND kind=?"
        args: list[object] = [kind]
        if round is not None:
            sql += " AND round=?"
            args.append(round)
        if site is not None:
            sql += " AND site=?"
            args.append(site)
        with self._lock:
            return [int(r[0]) for r in self._conn.execute(sql + " ORDER BY idx", args)]

    # -- tree heads ------------------------------------------------------------------------

    def add_tree_head(
        self, tree_size: int, root_hash: bytes, timestamp_ms: int, blob: bytes
    ) -> int:
        """Store a signed tree head (durably) and return its sequence number.

        Raises:
            LogRangeError: If ``tree_size`` is beyond the log.
            ValueError: If ``root_hash`` is not the log's root at ``tree_size``, or the head
                is older (smaller, or earlier) than the latest stored one.
        """
        return self.add_tree_heads([(tree_size, root_hash, timestamp_ms, blob)])

    def add_tree_heads(self, heads: Sequence[tuple[int, bytes, int, bytes]]) -> int:
        """Store signed tree heads ``(tree_size, root_hash, timestamp_ms, blob)`` in one durable
        transaction (bulk import); returns the last sequence number.

        Raises:
            LogRangeError: If a tree size is beyond the log.
            ValueError: If a root is not the log's root at its size, or the heads go backwards
                (in size or time) from the latest stored one or from each other.
            PermissionError: If the store was opened read-only.
        """
        if self._read_only:
            raise PermissionError("the audit log was opened read-only")
        with self._lock:
            latest = self.latest_tree_head()
            prev = (latest.tree_size, latest.timestamp_ms) if latest is not None else (0, 0)
            for tree_size, root_hash, timestamp_ms, _ in heads:
                if not hmac.compare_digest(self.root(tree_size), root_hash):
                    raise ValueError("tree head root does not match the log")
                if tree_size < prev[0] or timestamp_ms < prev[1]:
                    raise ValueError("tree head is older than the latest stored one")
                prev = (tree_size, timestamp_ms)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO tree_heads(tree_size, root_hash, timestamp_ms, blob) "
                    "VALUES (?, ?, ?, ?)",
                    [(n, bytes(r), t, bytes(b)) for n, r, t, b in heads],
                )
                row = self._conn.execute("SELECT max(seq) FROM tree_heads").fetchone()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return int(row[0] or 0)

    def tree_heads(self) -> list[StoredTreeHead]:
        """All stored tree heads, in sequence order."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, tree_size, root_hash, timestamp_ms, blob FROM tree_heads "
                    "ORDER BY seq"
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                raise LogFormatError(f"database is corrupt: {exc}") from exc
        return [
            StoredTreeHead(int(s), _as_int(n), _as_bytes(r), _as_int(t), _as_bytes(b))
            for s, n, r, t, b in rows
        ]

    def integrity_problem(self) -> str | None:
        """What is wrong with the database file itself, or ``None``: SQLite's
        ``PRAGMA integrity_check`` must say ``ok`` (an index that disagrees with its table,
        e.g. one redeclared through ``writable_schema``, makes look-ups see other rows than a
        scan), the schema (``sqlite_master``) of the store's tables must be exactly the one it
        creates (no other index or trigger on them), and the entries must start at ``idx`` 0 (a row at a
        negative index is invisible to a verifier's scan but not to :meth:`find`).

        Raises:
            LogFormatError: If the database cannot be read.
        """
        with self._lock:
            try:
                check = [str(r[0]) for r in self._conn.execute("PRAGMA integrity_check(20)")]
                rows = self._conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
                own = {str(r[2]) for r in _expected_schema()}
                schema = sorted((tuple(r) for r in rows if str(r[2]) in own), key=repr)
                low = self._conn.execute("SELECT min(idx) FROM entries").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise LogFormatError(f"database is corrupt: {exc}") from exc
        if check != ["ok"]:
            return "PRAGMA integrity_check: " + "; ".join(check[:5])
        if schema != _expected_schema():
            have = {(r[0], r[1]): r for r in schema}
            want = {(r[0], r[1]): r for r in _expected_schema()}
            odd = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
            return "the schema (sqlite_master) differs from a fedseal log's: " + ", ".join(
                f"{kind} {name}" for kind, name in odd[:5]
            )
        if low is not None and low != 0:
            return f"entries row idx={low}: entries are numbered from 0"
        return None

    def tree_head_rows(self) -> list[tuple[int, object, object, object, object]]:
        """The raw ``(seq, tree_size, root_hash, timestamp_ms, blob)`` rows of ``tree_heads`` in
        ``seq`` order, unconverted (a verifier checks the columns against the signed blob).

        Raises:
            LogFormatError: If the database cannot be read.
        """
        with self._lock:
            try:
                rows: list[tuple[int, object, object, object, object]] = self._conn.execute(
                    "SELECT seq, tree_size, root_hash, timestamp_ms, blob FROM tree_heads "
                    "ORDER BY seq"
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                raise LogFormatError(f"database is corrupt: {exc}") from exc
        return rows

    def latest_tree_head(self) -> StoredTreeHead | None:
        """The most recently stored tree head, if any."""
        with self._lock:
            row = self._conn.execute(
                "SELECT seq, tree_size, root_hash, timestamp_ms, blob FROM tree_heads "
                "ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        s, n, r, t, b = row
        return StoredTreeHead(int(s), _as_int(n), _as_bytes(r), _as_int(t), _as_bytes(b))


def _as_bytes(value: object) -> bytes:
    """SQLite hands back BLOBs as bytes; anything else means a tampered or corrupt row."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, int):
        return str(value).encode()
    return b""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _as_int(value: object) -> int:
    """SQLite hands back INTEGERs as int; anything else (a tampered row) becomes -1."""
    if type(value) is int:
        return value
    if isinstance(value, float | str | bytes):
        try:
            return int(value)
        except (ValueError, OverflowError):
            return -1
    return -1
