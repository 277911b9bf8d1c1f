"""The public dataset attestation format, DESIGN.md §6 (``fedseal-dataset-v1/rfc6962-sha256``).

An auditor can recompute a root with independent tooling from these rules alone:

1. **Files**: every regular file under the dataset directory whose name ends in ``.parquet``,
   recursively; symlinks are refused; sorted by relative POSIX path compared as UTF-8 bytes.
   An empty file is an error.
2. **Salt**: 32 random bytes stored (hex) in the manifest. **Chunk size** ``C`` from the manifest.
3. **Leaves**: for each file ``p`` in order and ``i = 0, 1, ...`` over its ``C``-byte chunks (the
   last may be shorter): ``salt ‖ u32be(len(p_utf8)) ‖ p_utf8 ‖ u64be(i) ‖ chunk_i``.
4. **Root**: the RFC 6962 Merkle tree hash over those leaves (SHA-256).

This module holds the constants and the file discovery (step 1); hashing is in
:mod:`fedseal.client.data.attestation`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import LayoutError

__all__ = [
    "ALGORITHM_ID",
    "CACHE_DIR_NAME",
    "DEFAULT_CHUNK_SIZE",
    "MANIFEST_NAME",
    "MAX_CHUNK_SIZE",
    "SALT_SIZE",
    "ShardFile",
    "discover_shards",
    "leaf_count",
    "leaf_prefix",
]

ALGORITHM_ID = "fedseal-dataset-v1/rfc6962-sha256"
MANIFEST_NAME = "fedseal-manifest.json"
CACHE_DIR_NAME = ".fedseal-cache"
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 1 << 30
SALT_SIZE = 32
SHARD_SUFFIX = ".parquet"


@dataclass(frozen=True, slots=True)
class ShardFile:
    """One shard found by :func:`discover_shards`.

    Attributes:
        path: Relative POSIX path inside the dataset directory (the name that is hashed).
        abspath: Absolute path on this machine.
        size: Size in bytes (from ``lstat``).
        dev: Device number.
        inode: Inode number.
        mtime_ns: Modification time in nanoseconds.
        ctime_ns: Status-change time in nanoseconds.
    """

    path: str
    abspath: str
    size: int
    dev: int
    inode: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, path: str, abspath: str, st: os.stat_result) -> ShardFile:
        return cls(path, abspath, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def same_stat(self, st: os.stat_result) -> bool:
        """Whether ``st`` describes the same, unmodified file (inode, size, mtime and ctime)."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
            self.dev,
            self.inode,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
        )


def leaf_prefix(salt: bytes, path: str) -> bytes:
    """Return ``salt ‖ u32be(len(p_utf8)) ‖ p_utf8``, the part of a leaf before ``u64be(i)``."""
    encoded = path.encode("utf-8")
    return salt + len(encoded).to_bytes(4, "big") + encoded


def leaf_count(size: int, chunk_size: int) -> int:
    """Number of ``chunk_size``-byte chunks (the last may be shorter) of a non-empty file."""
    return -(-size // chunk_size)


def discover_shards(directory: str | os.PathLike[str]) -> list[ShardFile]:
    """List the dataset's shards in attestation order (DESIGN.md §6, step 1).

    Directories are walked without following symlinks; the cache directory is skipped.

    Args:
        directory: The dataset directory.

    Returns:
        The shards sorted by relative POSIX path as UTF-8 bytes.

    Raises:
        LayoutError: The directory is missing, a ``.parquet`` entry or a directory is a symlink,
            a ``.parquet`` entry is not a regular file or is empty, a name is not valid UTF-8,
            or no shard was found.
    """
    root = Path(directory)
    if not root.is_dir():
        raise LayoutError(str(directory), "not a directory")
    found: list[ShardFile] = []
    pending: list[tuple[str, str]] = [(os.fspath(root), "")]
    while pending:
        absdir, reldir = pending.pop()
        try:
            with os.scandir(absdir) as entries:
                listing = list(entries)
        except OSError as exc:
            raise LayoutError(reldir or str(directory), f"cannot list directory: {exc.strerror}") from exc
        for entry in listing:
            rel = f"{reldir}{entry.name}"
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise LayoutError(ascii(rel), "file name is not valid UTF-8") from None
            if reldir == "" and entry.name == CACHE_DIR_NAME:
                continue
            st = entry.stat(follow_symlinks=False)
            is_shard = entry.name.endswith(SHARD_SUFFIX)
            if stat.S_ISLNK(st.st_mode):
                if is_shard or entry.is_dir(follow_symlinks=True):
                    raise LayoutError(rel, "is a symlink; symlinks are refused (DESIGN.md §6)")
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append((entry.path, rel + "/"))
                continue
            if not is_shard:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise LayoutError(rel, "is not a regular file")
            if st.st_size == 0:
                raise LayoutError(rel, "is an empty file")
            found.append(ShardFile.from_stat(rel, os.path.abspath(entry.path), st))
    if not found:
        raise LayoutError(str(directory), "holds no .parquet shards")
    found.sort(key=lambda shard: shard.path.encode("utf-8"))
    return found
