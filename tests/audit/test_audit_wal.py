"""A copy of the live log is not the log: the WAL is checkpointed into the main file when the
writer closes, and ``fl-audit verify`` warns (exit 3 unless ``--allow-wal``) when it finds a
non-empty ``-wal`` file beside the log it was given."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import EXIT_INCOMPLETE, EXIT_OK, app
from fedseal.audit.entries import RosterAction
from fedseal.audit.errors import AuditLogError, AuditVerificationError
from fedseal.audit.store import MerkleLogStore, wal_file
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, public_key_to_der, save_public_key
from tests.audit.logbuilder import CLOCK0, build_run_log, digest

runner = CliRunner()


def _entries_of_copy(path: Path, tmp_path: Path) -> int | None:
    """How many entries a plain file copy of ``path`` (without its -wal) holds, or None if the
    copy is not even a readable log."""
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(path, copy)
    try:
        with MerkleLogStore.open(copy, read_only=True) as store:
            return int(store.size)
    except (AuditLogError, OSError):
        return None


def _log_with_a_reader(tmp_path: Path) -> tuple[Path, MerkleLogStore, object]:
    """A log created and closed, then held open by a reader (as the audit service does), so
    that SQLite's own checkpoint-on-last-close never happens for the writer that follows."""
    key = generate_identity_key()
    path = tmp_path / "audit.sqlite"
    AuditLog.open(path, signer=key, now_ms=CLOCK0, log_id=digest("log", 0)[:16]).close()
    reader = MerkleLogStore.open(path, read_only=True)
    assert reader.size == 1
    return path, reader, key


def test_closing_the_writer_checkpoints_the_wal_so_a_plain_copy_is_the_whole_log(
    tmp_path: Path,
) -> None:
    path, reader, key = _log_with_a_reader(tmp_path)
    try:
        built = build_run_log(path, coordinator=key)  # the writer is closed at the end
        total = reader.size
        assert total == 40  # the builder's entries (it reuses the genesis above)
        assert wal_file(path).stat().st_size == 0  # checkpointed and truncated
        assert _entries_of_copy(path, tmp_path) == total
        result = verify_log(
            tmp_path / "copy.sqlite", coordinator_key=built.coordinator.public_key()
        )
        assert result.entries == total and result.runs[0][1] == "completed"
    finally:
        reader.close()


def test_without_the_checkpoint_a_plain_copy_silently_loses_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the checkpoint prevents: the committed entries sit in the -wal file.
    monkeypatch.setattr(MerkleLogStore, "checkpoint", lambda self: False)
    path, reader, key = _log_with_a_reader(tmp_path)
    try:
        build_run_log(path, coordinator=key)
        assert wal_file(path).stat().st_size > 0
        copied = _entries_of_copy(path, tmp_path)
        assert copied is None or copied < reader.size
    finally:
        reader.close()


def test_verify_warns_about_a_wal_file_beside_the_log_and_exits_three_unless_allowed(
    tmp_path: Path,
) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    args = ["verify", str(built.path), "--coordinator-key", str(pub)]
    assert runner.invoke(app, args).exit_code == EXIT_OK
    assert not wal_file(built.path).exists() or wal_file(built.path).stat().st_size == 0
    # The coordinator has the log open again and has appended: the entry is in the WAL.
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        late = generate_identity_key()
        log.append_roster_change(
            RosterAction.ENROL, "site-z", public_key_der=public_key_to_der(late.public_key()),
            approved_roots=[digest("root", "z")], now_ms=CLOCK0 + 10**6,
        )  # fmt: skip
        log.sign_tree_head(CLOCK0 + 10**6)  # an unsigned tail after the run's end fails (exit 1)
        assert wal_file(built.path).stat().st_size > 0
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_INCOMPLETE, result.output
        assert "OK: 41 entries" in result.stdout  # it read the WAL: the live log is whole
        assert f"{wal_file(built.path)} exists beside the log" in result.stderr
        assert "fedseal-backup" in result.stderr and ".backup" in result.stderr
        allowed = runner.invoke(app, [*args, "--allow-wal"])
        assert allowed.exit_code == EXIT_OK and "exists beside the log" in allowed.stderr
    finally:
        log.close()
    # A clean stop checkpointed it: no warning any more, and the file alone is the log.
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_OK and "beside the log" not in result.stderr
    assert _entries_of_copy(built.path, tmp_path) == 41


def test_a_schema_version_of_another_type_is_not_the_schema_version(tmp_path: Path) -> None:
    import sqlite3

    built = build_run_log(tmp_path / "audit.sqlite", rounds=1)
    for value in (1.0, "1", b"\x01"):
        conn = sqlite3.connect(built.path)
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (value,))
        conn.commit()
        conn.close()
        with pytest.raises(AuditLogError, match="schema"):
            MerkleLogStore.open(built.path, read_only=True)
    with pytest.raises((AuditLogError, AuditVerificationError)):
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
