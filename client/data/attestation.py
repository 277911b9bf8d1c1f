"""Dataset attestation (DESIGN.md §6): parallel leaf hashing, cache, verification, extension proofs.

Example::

    att = attest("site-0", workers=2)           # uses salt and chunk size from the manifest
    print(att.root.hex(), att.leaves, att.rows)
    verify_dataset("site-0")                    # raises a DatasetError naming the file, or returns
    proof = prove_extension(read_manifest_file("approved.json"), att)   # RFC 6962 consistency

Hashing runs on a thread pool over contiguous chunk ranges (``hashlib`` and file reads release
the GIL on large buffers), each worker with one reusable chunk buffer, so memory is
``workers × chunk_size`` and the root is identical for any worker count.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedseal.crypto import merkle
from fedseal.crypto.errors import MerkleProofError

from .cache import AttestCache, CachedShard
from .errors import (
    ContentMismatchError,
    DatasetChangedError,
    ExtensionError,
    LayoutError,
    RowCountMismatchError,
    SchemaMismatchError,
)
from .manifest import (
    ColumnSpec,
    Manifest,
    ManifestFile,
    columns_from_text,
    load_manifest,
    schema_text,
)
from .spec import (
    ALGORITHM_ID,
    MAX_CHUNK_SIZE,
    SALT_SIZE,
    ShardFile,
    discover_shards,
    leaf_count,
    leaf_prefix,
)

__all__ = [
    "Attestation",
    "ExtensionProof",
    "FileAttestation",
    "ProgressSink",
    "attest",
    "attest_with",
    "prove_extension",
    "verify_dataset",
]

HASH_SIZE = 32
# Largest contiguous run of chunks one task hashes; small enough to balance the workers.
MAX_TASK_CHUNKS = 64


class ProgressSink(Protocol):
    """Receives hashing progress (e.g. a rich progress bar). Called from worker threads."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


@dataclass(frozen=True, slots=True)
class FileAttestation:
    """One shard's part of an attestation.

    Attributes:
        path: Relative POSIX path.
        size: Size in bytes.
        rows: Row count from the Parquet footer.
        first_leaf: Index of its first leaf.
        leaf_count: Number of leaves.
        root: RFC 6962 root over the file's own leaf hashes.
        cached: Whether the leaf hashes came from the cache.
    """

    path: str
    size: int
    rows: int
    first_leaf: int
    leaf_count: int
    root: bytes
    cached: bool = False

    def to_manifest_file(self) -> ManifestFile:
        return ManifestFile(self.path, self.size, self.rows, self.first_leaf, self.leaf_count, self.root)


@dataclass(frozen=True, slots=True)
class Attestation:
    """The attestation of a dataset directory as it is now.

    Attributes:
        algorithm: ``fedseal-dataset-v1/rfc6962-sha256``.
        root: The RFC 6962 root (32 bytes).
        leaves: Number of leaves.
        bytes: Total bytes hashed.
        rows: Total rows (from the Parquet footers).
        files: Per-shard details, in attestation order.
        columns: The (common) schema of the shards.
        chunk_size: The chunk size used.
        leaf_hashes: Every leaf hash, in order (for consistency proofs).
    """

    algorithm: str
    root: bytes
    leaves: int
    bytes: int
    rows: int
    files: tuple[FileAttestation, ...]
    columns: tuple[ColumnSpec, ...]
    chunk_size: int
    leaf_hashes: tuple[builtins.bytes, ...] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """``{"algorithm", "root" (hex), "leaves", "bytes", "rows", "files": [...]}``."""
        return {
            "algorithm": self.algorithm,
            "root": self.root.hex(),
            "leaves": self.leaves,
            "bytes": self.bytes,
            "rows": self.rows,
            "chunk_size": self.chunk_size,
            "files": [
                {
                    "path": f.path,
                    "size": f.size,
                    "rows": f.rows,
                    "first_leaf": f.first_leaf,
                    "leaf_count": f.leaf_count,
                    "root": f.root.hex(),
                }
                for f in self.files
            ],
            "cached_files": sum(1 for f in self.files if f.cached),
        }


@dataclass(frozen=True, slots=True)
class ExtensionProof:
    """An RFC 6962 consistency proof that the current dataset extends an earlier manifest.

    Attributes:
        old_size: Leaves of the earlier dataset.
        new_size: Leaves of the current dataset.
        old_root: Root of the earlier dataset.
        new_root: Root of the current dataset.
        proof: The consistency proof (RFC 9162 §2.1.4).
        new_files: Paths of the shards added since.
    """

    old_size: int
    new_size: int
    old_root: bytes
    new_root: bytes
    proof: tuple[bytes, ...]
    new_files: tuple[str, ...]

    def verify(self) -> None:
        """Check the proof.

        Raises:
            ExtensionError: The proof does not verify.
        """
        try:
            merkle.verify_consistency(self.old_size, self.new_size, self.old_root, self.new_root, self.proof)
        except MerkleProofError as exc:
            raise ExtensionError(None, f"consistency proof does not verify: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "old_size": self.old_size,
            "new_size": self.new_size,
            "old_root": self.old_root.hex(),
            "new_root": self.new_root.hex(),
            "proof": [h.hex() for h in self.proof],
            "new_files": list(self.new_files),
        }


# ---------------------------------------------------------------------------------------------
# Hashing


def hash_range(
    shard: ShardFile,
    prefix: bytes,
    first: int,
    stop: int,
    chunk_size: int,
    out: list[bytes],
    out_offset: int,
    progress: ProgressSink | None,
) -> None:
    """Leaf hashes of chunks ``first..stop-1`` of one file into ``out[out_offset + i]``."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    try:
        fd = os.open(shard.abspath, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise LayoutError(shard.path, f"cannot open: {exc.strerror}") from exc
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, first * chunk_size, (stop - first) * chunk_size, os.POSIX_FADV_SEQUENTIAL)
        head = b"\x00" + prefix
        for i in range(first, stop):
            offset = i * chunk_size
            want = min(chunk_size, shard.size - offset)
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], offset + got)
                if n == 0:
                    raise DatasetChangedError(shard.path, "file shrank while being hashed")
                got += n
            digest = hashlib.sha256(head + i.to_bytes(8, "big"))
            digest.update(view[:want])
            out[out_offset + i] = digest.digest()
            if progress is not None:
                progress.advance(want)
    finally:
        os.close(fd)


def _tasks(shards: Sequence[ShardFile], chunk_size: int, workers: int) -> list[tuple[int, int, int]]:
    """(shard index, first chunk, stop chunk) ranges, sized to spread across the workers."""
    total = sum(leaf_count(s.size, chunk_size) for s in shards)
    step = max(1, min(MAX_TASK_CHUNKS, -(-total // (workers * 4))))
    tasks: list[tuple[int, int, int]] = []
    for index, shard in enumerate(shards):
        n = leaf_count(shard.size, chunk_size)
        tasks.extend((index, start, min(n, start + step)) for start in range(0, n, step))
    return tasks


def _cached_columns(text: str) -> tuple[ColumnSpec, ...] | None:
    """Columns from a cache entry, or ``None`` (a cache miss) if the entry is malformed."""
    try:
        return columns_from_text(text)
    except (ValueError, TypeError):
        return None


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def attest_with(
    directory: str | os.PathLike[str],
    salt: bytes,
    chunk_size: int,
    *,
    workers: int | None = None,
    use_cache: bool = True,
    full: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressSink | None = None,
) -> Attestation:
    """Attest a directory with an explicit salt and chunk size (no manifest needed).

    Every shard's footer is read (row count and schema) and all shards must share one schema.

    Args:
        directory: The dataset directory.
        salt: The 32-byte salt.
        chunk_size: The chunk size in bytes.
        workers: Hashing threads (default: the CPUs available to this process).
        use_cache: Read and update the on-disk cache.
        full: Ignore cached leaf hashes (still refreshes the cache).
        cache_dir: Where the cache lives (default ``DIR/.fedseal-cache``).
        progress: Receives the number of bytes to hash and hashing progress.

    Returns:
        The attestation.

    Raises:
        LayoutError: See :func:`~fedseal.client.data.spec.discover_shards`.
        CorruptShardError: A shard's footer cannot be read.
        SchemaMismatchError: Shards have different schemas.
        DatasetChangedError: A shard changed while being hashed.
    """
    if len(salt) != SALT_SIZE:
        raise ValueError("salt must be 32 bytes")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError("chunk size out of range")
    n_workers = _default_workers() if workers is None else workers
    if n_workers < 1:
        raise ValueError("workers must be at least 1")
    started_ns = time.time_ns()
    shards = discover_shards(directory)
    cache = AttestCache(directory, cache_dir) if use_cache else None
    cached = cache.load(salt, chunk_size, shards) if cache is not None and not full else {}

    firsts: list[int] = []
    total_leaves = 0
    for shard in shards:
        firsts.append(total_leaves)
        total_leaves += leaf_count(shard.size, chunk_size)
    hashes: list[bytes] = [b""] * total_leaves
    footers: dict[str, tuple[int, tuple[ColumnSpec, ...]]] = {}
    todo: list[ShardFile] = []
    for shard, first in zip(shards, firsts, strict=True):
        hit = cached.get(shard.path)
        columns = _cached_columns(hit.schema) if hit is not None else None
        if hit is not None and columns is not None and len(hit.leaf_hashes) == HASH_SIZE * leaf_count(shard.size, chunk_size):
            blob = hit.leaf_hashes
            hashes[first : first + len(blob) // HASH_SIZE] = [
                blob[j : j + HASH_SIZE] for j in range(0, len(blob), HASH_SIZE)
            ]
            footers[shard.path] = (hit.rows, columns)
        else:
            cached.pop(shard.path, None)
            todo.append(shard)
    if todo:
        from .shards import read_footer  # pyarrow: only when a shard is not cached

        for shard in todo:
            footers[shard.path] = read_footer(shard.abspath, shard.path)

    if progress is not None:
        progress.start(sum(s.size for s in todo))
    first_of = dict(zip((s.path for s in shards), firsts, strict=True))
    todo_first = [first_of[s.path] for s in todo]
    tasks = _tasks(todo, chunk_size, n_workers)

    def run(task: tuple[int, int, int]) -> None:
        index, start, stop = task
        shard = todo[index]
        hash_range(shard, leaf_prefix(salt, shard.path), start, stop, chunk_size, hashes, todo_first[index], progress)

    if n_workers == 1 or len(tasks) <= 1:
        for task in tasks:
            run(task)
    else:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="fedseal-attest") as pool:
            for done in pool.map(run, tasks):
                del done
    for shard in todo:
        try:
            st = os.lstat(shard.abspath)
        except OSError as exc:
            raise DatasetChangedError(shard.path, f"file vanished while being hashed: {exc.strerror}") from exc
        if not shard.same_stat(st):
            raise DatasetChangedError(shard.path, "file changed while being hashed; run again")

    reference = footers[shards[0].path][1]
    files: list[FileAttestation] = []
    for shard, first in zip(shards, firsts, strict=True):
        rows, columns = footers[shard.path]
        if columns != reference:
            raise SchemaMismatchError(
                shard.path, f"schema differs from {shards[0].path}: {_schema_diff(reference, columns)}"
            )
        count = leaf_count(shard.size, chunk_size)
        file_root = merkle.root_from_leaf_hashes(hashes[first : first + count])
        files.append(FileAttestation(shard.path, shard.size, rows, first, count, file_root, shard.path in cached))

    if cache is not None and todo:
        cache.store(
            salt,
            chunk_size,
            (
                (
                    s,
                    CachedShard(
                        footers[s.path][0],
                        schema_text(footers[s.path][1]),
                        b"".join(hashes[first : first + leaf_count(s.size, chunk_size)]),
                    ),
                )
                for s, first in zip(todo, todo_first, strict=True)
            ),
            started_ns=started_ns,
        )
    return Attestation(
        ALGORITHM_ID,
        merkle.root_from_leaf_hashes(hashes),
        total_leaves,
        sum(s.size for s in shards),
        sum(f.rows for f in files),
        tuple(files),
        reference,
        chunk_size,
        tuple(hashes),
    )


def _schema_diff(expected: tuple[ColumnSpec, ...], actual: tuple[ColumnSpec, ...]) -> str:
    want = {c.name: c for c in expected}
    got = {c.name: c for c in actual}
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing:
        return f"column {missing[0]!r} missing"
    if extra:
        return f"unexpected column {extra[0]!r}"
    for name, col in want.items():
        if got[name] != col:
            other = got[name]
            return f"column {name!r} is {other.type}{'' if other.nullable else ' not null'}, expected {col.type}{'' if col.nullable else ' not null'}"
    return "column order differs"


def attest(
    directory: str | os.PathLike[str],
    *,
    workers: int | None = None,
    use_cache: bool = True,
    full: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressSink | None = None,
) -> Attestation:
    """Attest a dataset directory as it is now, with the salt and chunk size of its manifest.

    Shards must share the manifest's schema; they need not match the manifest's file list (use
    :func:`verify_dataset` for that, or :func:`prove_extension` for an appended dataset).

    Args:
        directory: The dataset directory (holding ``fedseal-manifest.json``).
        workers: Hashing threads (default: the CPUs available to this process).
        use_cache: Read and update the on-disk cache.
        full: Re-hash every shard, ignoring cached leaf hashes.
        cache_dir: Where the cache lives (default ``DIR/.fedseal-cache``).
        progress: Receives hashing progress.

    Returns:
        The attestation.

    Raises:
        ManifestError: The manifest is missing or invalid.
        LayoutError: Symlink, empty file, non-regular file, no shards.
        CorruptShardError: A shard's footer cannot be read.
        SchemaMismatchError: A shard's schema differs from the manifest or another shard.
        DatasetChangedError: A shard changed while being hashed.
    """
    manifest = load_manifest(directory)
    result = attest_with(
        directory,
        manifest.salt,
        manifest.chunk_size,
        workers=workers,
        use_cache=use_cache,
        full=full,
        cache_dir=cache_dir,
        progress=progress,
    )
    if result.columns != manifest.schema.columns:
        culprit = result.files[0].path
        raise SchemaMismatchError(
            culprit, f"schema differs from the manifest: {_schema_diff(manifest.schema.columns, result.columns)}"
        )
    return result


def compare_with_manifest(manifest: Manifest, att: Attestation) -> None:
    """Check that an attestation matches a manifest exactly, naming the first file that differs.

    Raises:
        ContentMismatchError: A file is missing, extra, of another size or content.
        RowCountMismatchError: A file's row count differs from the manifest.
        ManifestError: Never here (the manifest is already parsed).
    """
    current = {f.path: f for f in att.files}
    listed = {f.path: f for f in manifest.files}
    for entry in manifest.files:
        if entry.path not in current:
            raise ContentMismatchError(entry.path, "listed in the manifest but missing")
    for f in att.files:
        found = listed.get(f.path)
        if found is None:
            raise ContentMismatchError(f.path, "not listed in the manifest (new shard? use `fl-client attest --update`)")
        entry = found
        if f.size != entry.size:
            raise ContentMismatchError(f.path, f"size {f.size} differs from the manifest's {entry.size}")
        if f.root != entry.root:
            raise ContentMismatchError(f.path, "content differs from the manifest (per-file root mismatch)")
        if f.rows != entry.rows:
            raise RowCountMismatchError(
                f.path, f"{f.rows} rows, the manifest says {entry.rows}", expected=entry.rows, actual=f.rows
            )
    if att.root != manifest.root:
        raise ContentMismatchError(None, "dataset root differs from the manifest's root")


def verify_dataset(
    directory: str | os.PathLike[str],
    *,
    workers: int | None = None,
    use_cache: bool = True,
    full: bool = False,
    deep: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressSink | None = None,
) -> Attestation:
    """Check that a dataset directory is exactly what its manifest describes.

    Steps: 1. parse the manifest; 2. discover the shards (DESIGN.md §6 rules); 3. hash them
    (cached) and read their footers; 4. compare schema, file list, sizes, per-file roots, row
    counts and the root with the manifest; 5. with ``deep``, decode every page of every shard and
    count its rows (finds corruption inside pages, which footers do not show).

    Args:
        directory: The dataset directory.
        workers: Hashing threads.
        use_cache: Use the on-disk cache.
        full: Re-hash everything.
        deep: Also decode all data.
        cache_dir: Where the cache lives.
        progress: Receives hashing progress.

    Returns:
        The attestation (equal to the manifest's).

    Raises:
        DatasetError: A subclass naming the file and the reason (see :mod:`.errors`).
    """
    manifest = load_manifest(directory)
    att = attest(directory, workers=workers, use_cache=use_cache, full=full, cache_dir=cache_dir, progress=progress)
    compare_with_manifest(manifest, att)
    if deep:
        from .shards import iter_file_batches

        base = os.fspath(directory)
        for entry in manifest.files:
            for batch in iter_file_batches(os.path.join(base, entry.path), entry.path, expected_rows=entry.rows):
                del batch
    return att


def prove_extension(old: Manifest, new: Attestation) -> ExtensionProof:
    """Prove that ``new`` extends the dataset of ``old`` (new shards appended, nothing else).

    Every shard of ``old`` must still be there, at the same position, with the same size and
    per-file root; then an RFC 6962 consistency proof from ``old.root`` to ``new.root`` is built
    and verified.

    Args:
        old: The earlier (approved) manifest.
        new: The current attestation (same salt and chunk size).

    Returns:
        The verified proof.

    Raises:
        ExtensionError: Naming the first shard that breaks the extension, or why.
    """
    if new.chunk_size != old.chunk_size:
        raise ExtensionError(None, "chunk size differs from the earlier manifest: a new dataset, not an extension")
    for position, entry in enumerate(old.files):
        if position >= len(new.files):
            raise ExtensionError(entry.path, "shard of the earlier dataset is missing")
        now = new.files[position]
        if now.path != entry.path:
            if any(f.path == entry.path for f in new.files):
                raise ExtensionError(now.path, f"new shard sorts before the earlier shard {entry.path!r}; appended shards must sort last")
            raise ExtensionError(entry.path, "shard of the earlier dataset is missing or renamed")
        if now.size != entry.size:
            raise ExtensionError(entry.path, f"size changed from {entry.size} to {now.size}")
        if now.root != entry.root:
            raise ExtensionError(entry.path, "content changed since the earlier manifest (or another salt)")
    proof = ExtensionProof(
        old.leaves,
        new.leaves,
        old.root,
        new.root,
        tuple(merkle.consistency_proof_from_leaf_hashes(new.leaf_hashes, old.leaves)),
        tuple(f.path for f in new.files[len(old.files) :]),
    )
    proof.verify()
    return proof
