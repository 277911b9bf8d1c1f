#!/usr/bin/env python3
"""Online backup of the coordinator's SQLite audit log (and any other fedseal SQLite file).

Usage::

    fedseal-backup /var/lib/fedseal/audit.sqlite /backup/fedseal            # one backup
    fedseal-backup /var/lib/fedseal/audit.sqlite /backup/fedseal --keep 14 \
        --verify --coordinator-key /etc/fedseal/keys/coordinator.pub

Uses SQLite's online backup API (``sqlite3.Connection.backup``), which copies a consistent
snapshot page by page while fl-server keeps appending (WAL mode): never ``cp`` a live WAL
database, the copy can miss committed pages that are still in the ``-wal`` file. The copy is
checked with ``PRAGMA integrity_check``, fsynced, renamed into place atomically as
``<stem>-<UTC timestamp>.sqlite`` and described by a ``.sha256`` file next to it. With
``--verify`` the copy must also pass ``fl-audit verify --coordinator-key KEY --allow-open``
(the Merkle tree and every signature, anchored on the coordinator's public key; a copy taken
during a run holds an open run).
``--keep N`` deletes all but the newest N backups of that database in the destination.

Stdlib only (runs in the coordinator image without fedseal on the import path).

Exit codes: 0 success, 1 backup or check failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PAGES_PER_STEP = 4096  # pages copied per step; the writer is never blocked for long


class BackupError(Exception):
    """The backup could not be made or did not check out; ``path`` names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BackupResult:
    """Where the backup went and what it holds."""

    path: Path
    sha256: str
    size: int
    pages: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(source: Path, dest_dir: Path, *, now: datetime) -> BackupResult:
    """Copy ``source`` into ``dest_dir`` with the online backup API and check the copy.

    Raises:
        BackupError: If the source is missing or unreadable, the copy fails, or the copy
            fails ``PRAGMA integrity_check``.
    """
    if not source.is_file():
        raise BackupError(source, "no such database file")
    dest_dir.mkdir(parents=True, exist_ok=True)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = dest_dir / f"{source.stem}-{stamp}.sqlite"
    partial = dest_dir / f".{final.name}.partial"
    if final.exists():
        raise BackupError(final, "a backup with this timestamp already exists")
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst, pages=PAGES_PER_STEP, sleep=0.01)
                (check,) = dst.execute("PRAGMA integrity_check").fetchone()
                (pages,) = dst.execute("PRAGMA page_count").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(source, f"SQLite backup failed: {exc}") from exc
    if check != "ok":
        partial.unlink(missing_ok=True)
        raise BackupError(source, f"copy fails integrity_check: {check}")
    with partial.open("rb+") as f:
        os.fsync(f.fileno())
    digest = _sha256(partial)
    os.replace(partial, final)
    (dest_dir / f"{final.name}.sha256").write_text(f"{digest}  {final.name}\n")
    _fsync_dir(dest_dir)
    return BackupResult(path=final, sha256=digest, size=final.stat().st_size, pages=int(pages))


def verify_with_fl_audit(copy: Path, fl_audit: str, coordinator_key: Path) -> None:
    """Run ``fl-audit verify`` on the copy, anchored on ``coordinator_key``.

    Raises:
        BackupError: If fl-audit is missing or reports a failure.
    """
    exe = shutil.which(fl_audit)
    if exe is None:
        raise BackupError(copy, f"{fl_audit} not found on PATH (needed for --verify)")
    argv = [exe, "verify", str(copy), "--coordinator-key", str(coordinator_key), "--allow-open"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise BackupError(copy, f"fl-audit verify exited {proc.returncode}: {' '.join(tail)}")


def prune(dest_dir: Path, stem: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups of ``stem``; return the deleted paths."""
    backups = sorted(dest_dir.glob(f"{stem}-*.sqlite"))
    doomed = backups[:-keep] if keep > 0 else []
    for path in doomed:
        path.unlink()
        Path(f"{path}.sha256").unlink(missing_ok=True)
    return doomed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedseal-backup", description=__doc__.split("\n")[0])
    parser.add_argument("database", type=Path, help="SQLite file, e.g. /var/lib/fedseal/audit.sqlite")
    parser.add_argument("dest", type=Path, help="directory that receives the backups")
    parser.add_argument("--keep", type=int, default=0, help="keep only the newest N backups (0: keep all)")
    parser.add_argument("--verify", action="store_true", help="also run `fl-audit verify` on the copy")
    parser.add_argument("--fl-audit", default="fl-audit", help="fl-audit executable")
    parser.add_argument(
        "--coordinator-key", type=Path, help="the coordinator's public key (needed with --verify)"
    )
    args = parser.parse_args(argv)
    if args.keep < 0:
        parser.error("--keep must be >= 0")
    if args.verify and args.coordinator_key is None:
        parser.error("--verify needs --coordinator-key (fl-audit verifies against a pinned key)")
    try:
        result = backup(args.database, args.dest, now=datetime.now(UTC))
        if args.verify:
            verify_with_fl_audit(result.path, args.fl_audit, args.coordinator_key)
    except BackupError as exc:
        print(f"fedseal-backup: error: {exc}", file=sys.stderr)
        return 1
    deleted = prune(args.dest, args.database.stem, args.keep)
    print(f"{result.path} {result.size} bytes {result.pages} pages sha256 {result.sha256}")
    for path in deleted:
        print(f"pruned {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
