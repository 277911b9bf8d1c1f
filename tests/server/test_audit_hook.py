"""Roster changes are mirrored into the audit log exactly once, across re-opens."""

from __future__ import annotations

from pathlib import Path

from fedseal.crypto.auditlog import MerkleLogStore
from fedseal.crypto.keys import generate_identity_key
from fedseal.server.audit_hook import RunAudit
from fedseal.server.roster import Roster


def _size(path: Path) -> int:
    with MerkleLogStore.open(path) as store:
        return store.size


def test_roster_events_reach_the_log_once_even_when_reopened(tmp_path: Path) -> None:
    coordinator = generate_identity_key()
    roster = Roster().enroll("site-a", generate_identity_key().public_key(), ["aa" * 32], now_ms=1)
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
    from fedseal.protocol import DecodeError, Rejection, ServerStage
    from fedseal.protocol.audit import EnvelopeRecord, decode_entry, verify_audit_log
    from fedseal.server.audit_hook import UNPARSEABLE_FRAME

    coordinator = generate_identity_key()
    roster = Roster().enroll("site-a", generate_identity_key().public_key(), ["aa" * 32], now_ms=1)
    path = tmp_path / "audit.sqlite"
    audit = RunAudit.open(path, coordinator, roster)
    audit.run_start("ab" * 16, b"config", bytes(32), rounds=1)
    garbage = b"\x00not an envelope" * 1000
    audit.envelopes(
        1,
        [Rejection("site-a", ServerStage.ADVERTISE, DecodeError("truncated envelope"))],
        {("site-a", "advertise"): garbage},
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
