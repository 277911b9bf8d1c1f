"""On-disk attestation cache: per-shard leaf hashes, so an unchanged dataset re-attests quickly.

An entry is keyed on the shard's relative path, device, inode, size, ``mtime_ns`` and
``ctime_ns``, a digest of the salt, and the chunk size (DESIGN.md §6). Any write to a file
changes its ``mtime``/``ctime``; ``ctime`` cannot be set back by ``touch``/``utime``, so
restoring the ``mtime`` after a write does not revive an entry.

The one race left is a write within the file system's timestamp granularity of the moment the
file was hashed: the timestamps would then not change. As in git's "racy index" rule, an entry is
stored only if the file's ``mtime`` and ``ctime`` are at least :data:`RACY_WINDOW_NS` older than the
moment hashing started, so any later write necessarily moves a timestamp. (File systems whose
clock runs ahead of this machine's by more than the window, e.g. some network mounts, defeat this;
use ``--full`` there.)

The cache is a local convenience in the site's own trust domain: whoever can write it can
already write the shards. It lives in ``DATASET/.fedseal-cache/attest-v1.sqlite`` unless another
directory is configured; if it cannot be opened or written, attestation proceeds without it and a
warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .spec import CACHE_DIR_NAME, ShardFile

__all__ = ["RACY_WINDOW_NS", "AttestCache", "CachedShard"]

log = logging.getLogger(__name__)

RACY_WINDOW_NS = 2_000_000_000
CACHE_FILE_NAME = "attest-v1.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    path TEXT PRIMARY KEY,
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    salt_id BLOB NOT NULL, chunk_size INTEGER NOT NULL,
    rows INTEGER NOT NULL, schema TEXT NOT NULL, leaves BLOB NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class CachedShard:
    """What the cache remembers about one unchanged shard.

    Attributes:
        rows: Row count from the Parquet footer.
        schema: The shard's schema, as the JSON text written by the attester.
        leaf_hashes: The concatenated 32-byte leaf hashes of the shard.
    """

    rows: int
    schema: str
    leaf_hashes: bytes = field(repr=False)


def salt_id(salt: bytes) -> bytes:
    """A digest that identifies the salt in cache keys without storing the salt itself."""
    return hashlib.sha256(b"fedseal/v1/cache-salt-id\x00" + salt).digest()


class AttestCache:
    """A SQLite file of per-shard leaf hashes (see the module docstring for the rules)."""

    def __init__(self, dataset_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> None:
        base = Path(cache_dir) if cache_dir is not None else Path(dataset_dir) / CACHE_DIR_NAME
        self.path = base / CACHE_FILE_NAME

    def load(self, salt: bytes, chunk_size: int, shards: Iterable[ShardFile]) -> dict[str, CachedShard]:
        """Return the cached entries that still match the shards' current stat keys.

        A cache that cannot be read is ignored with a logged warning.
        """
        if not self.path.is_file():
            return {}
        sid = salt_id(salt)
        wanted = {s.path: s for s in shards}
        found: dict[str, CachedShard] = {}
        try:
            with closing(sqlite3.connect(self.path)) as conn:
                rows = conn.execute(
                    "SELECT path, dev, ino, size, mtime_ns, ctime_ns, salt_id, chunk_size, rows, schema, leaves FROM shards"
                ).fetchall()
        except sqlite3.Error as exc:
            log.warning("attestation cache %s unreadable, ignoring it: %s", self.path, exc)
            return {}
        for path, dev, ino, size, mtime_ns, ctime_ns, row_sid, row_chunk, n_rows, schema, leaves in rows:
            shard = wanted.get(path)
            if shard is None:
                continue
            key = (shard.dev, shard.inode, shard.size, shard.mtime_ns, shard.ctime_ns, sid, chunk_size)
            if (dev, ino, size, mtime_ns, ctime_ns, bytes(row_sid), row_chunk) != key:
                continue
            found[path] = CachedShard(n_rows, schema, bytes(leaves))
        return found

    def store(
        self,
        salt: bytes,
        chunk_size: int,
        entries: Iterable[tuple[ShardFile, CachedShard]],
        *,
        started_ns: int,
    ) -> int:
        """Store entries for shards not modified within :data:`RACY_WINDOW_NS` of ``started_ns``.

        Args:
            salt: The dataset salt.
            chunk_size: The chunk size.
            entries: Shards (with the stat taken before hashing) and what was computed for them.
            started_ns: ``time.time_ns()`` taken before the shards were first stat'ed.

        Returns:
            The number of entries stored (0 if the cache could not be written; a warning is logged).
        """
        sid = salt_id(salt)
        limit = started_ns - RACY_WINDOW_NS
        rows = [
            (s.path, s.dev, s.inode, s.size, s.mtime_ns, s.ctime_ns, sid, chunk_size, c.rows, c.schema, c.leaf_hashes)
            for s, c in entries
            if s.mtime_ns < limit and s.ctime_ns < limit
        ]
        if not rows:
            return 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path)) as conn, conn:
                conn.execute(_SCHEMA)
                conn.executemany("INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        except (OSError, sqlite3.Error) as exc:
            log.warning("attestation cache %s not writable, continuing without it: %s", self.path, exc)
            return 0
        return len(rows)
