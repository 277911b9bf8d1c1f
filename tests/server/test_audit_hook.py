"""Enrolment changes are mirrored into the audit log exactly once, across re-opens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedseal.audit.store import MerkleLogStore
from fedseal.crypto.keys import generate_identity_key
from fedseal.server.audit_hook import RunAudit
from fedseal.server.roster import Enrolment


def _size(path: Path) -> int:
    with MerkleLogStore.open(path) as store:
        return store.size


def test_roster_events_reach_the_log_once_even_when_reopened(tmp_path: Path) -> None:
    coordinator = generate_identity_key()
    roster = Enrolment().enroll("site-a", generate_identity_key().public_key(), ["aa" * 32], now_ms=1)
    roster = roster.enroll("site-b", generate_identity_key().public_key(), ["bb" * 32], now_ms=2)
    path = tmp_path / "audit.sqlite"
    RunAudit.open(path, coordinator, roster).close()
    after_first = _size(path)
    assert after_first == 3  # genesis + two enrolments
    RunAudit.open(path, coordinator, roster).close()
    assert _size(path) == after_first  # nothing mirrored twice
    roster = roster.enroll("site-a", roster.sites[0].public_key, ["cc" * 32], now_ms=3).revoke("site-b", now_ms=4)
    RunAudit.open(path, coordinator, roster).close()
    assert _size(path) == after_first + 2  # new root for site-a, revocation of site-b


def test_a_frame_that_is_not_an_envelope_is_recorded_rejected_and_the_log_still_verifies(tmp_path: Path) -> None:
    from fedseal.audit.codec import decode_entry
    from fedseal.audit.entries import EnvelopeRecord
    from fedseal.audit.verifier import verify_audit_log
    from fedseal.protocol import DecodeError, Rejection, ServerStage
    from fedseal.server.audit_hook import UNPARSEABLE_FRAME

    coordinator = generate_identity_key()
    roster = Enrolment().enroll("site-a", generate_identity_key().public_key(), ["aa" * 32], now_ms=1)
    path = tmp_path / "audit.sqlite"
    audit = RunAudit.open(path, coordinator, roster)
    audit.run_start("ab" * 16, b"config", bytes(32), rounds=1)
    garbage = b"\x00not an envelope" * 1000
    audit.envelopes(
        1,
        [Rejection("site-a", ServerStage.ADVERTISE, DecodeError("truncated envelope"), frame=garbage)],
    )
    audit.close()
    with MerkleLogStore.open(path) as store:
        entries = store.entries(0, store.size)
        records = [e for e in (decode_entry(x.data) for x in entries) if isinstance(e, EnvelopeRecord)]
        assert len(records) == 1
        rec = records[0]
        assert rec.message_type == UNPARSEABLE_FRAME and not rec.accepted and rec.site == "site-a"
        assert rec.payload == garbage[:4096] and str(len(garbage)) in rec.reason
        assert "truncated envelope" in rec.reason
        verify_audit_log(entries, store.tree_heads(), coordinator_key=coordinator.public_key())


def test_the_run_end_checkpoints_the_wal_so_audit_sqlite_alone_is_the_whole_log(tmp_path: Path) -> None:
    import shutil

    from fedseal.audit.auditor import verify_log
    from fedseal.audit.store import wal_file

    coordinator = generate_identity_key()
    roster = Enrolment().enroll("site-a", generate_identity_key().public_key(), ["aa" * 32], now_ms=1)
    path = tmp_path / "audit.sqlite"
    RunAudit.open(path, coordinator, roster).close()
    reader = MerkleLogStore.open(path, read_only=True)  # the audit service keeps one open
    try:
        audit = RunAudit.open(path, coordinator, roster)
        audit.run_start("ab" * 16, b"config", bytes(32), rounds=1)
        audit.round_result(1, None, bytes(32), failed="too few sites")
        assert wal_file(path).stat().st_size > 0
        audit.run_end()  # the log stays open (as the ServerApp's does until it returns)
        assert wal_file(path).stat().st_size == 0
        shutil.copyfile(path, tmp_path / "copy.sqlite")
        result = verify_log(tmp_path / "copy.sqlite", coordinator_key=coordinator.public_key())
        assert result.entries == reader.size and result.runs[0][1] == "completed"
        audit.close()
    finally:
        reader.close()


def test_an_evaluation_is_recorded_with_its_finite_metrics_only(tmp_path: Path) -> None:
    from fedseal.audit.codec import decode_entry
    from fedseal.audit.entries import EntryKind, Evaluation
    from fedseal.audit.writer import AuditLog
    from tests.audit.logbuilder import CLOCK0, build_run_log

    built = build_run_log(tmp_path / "audit.sqlite", rounds=2, end_run=False)
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    audit = RunAudit(log, built.path)
    nothing: dict[str, Any] = {"loss": float("nan"), "accuracy": float("inf"), "flag": True, "ys": [1.0]}
    assert not audit.evaluation(2, nothing, 100, ["site-a"])
    metrics = {"accuracy": 0.91, "loss": 0.3, "macro-f1": 0.9, "bad": float("nan"), "x" * 65: 1.0}
    assert audit.evaluation(2, metrics, 1200, ["site-b", "site-a"])
    (index,) = log.store.find(int(EntryKind.EVALUATION))
    entry = decode_entry(log.store.entries(index, index + 1)[0].data)
    assert isinstance(entry, Evaluation)
    assert entry.metric_values == {"accuracy": 0.91, "loss": 0.3, "macro-f1": 0.9}
    assert entry.num_examples == 1200 and entry.sites == ("site-a", "site-b") and entry.round == 2
    audit.close()
