"""``[consortium]``: the real ServerApp verifies the signed consortium roster when a run starts
(and refuses to start if it does not verify), records it in the audit log as the roster
authority signed it, records a new version at the next round's start, and stops the run when
the version goes down."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import ConsortiumRosterRecord, RunStart
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.verifier import AuditVerifier, VerifiedLog
from fedseal.crypto.keys import generate_identity_key, public_key_to_der, save_public_key
from fedseal.protocol.consortium import (
    ConsortiumRoster,
    ConsortiumSite,
    SignedConsortiumRoster,
    with_revoked,
)
from fedseal.protocol.types import SiteId
from fedseal.server import audit_hook, rundir
from fedseal.server.audit_hook import ConsortiumRefusedError
from fedseal.server.config import ConsortiumSection
from tests.server._fedgrid import Federated

SITES = ["site-a", "site-b", "site-c", "site-d"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the task running in this process (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Authority:
    """The consortium's roster authority (a key the coordinator does not hold) and its file."""

    def __init__(self, tmp: Path, fx: Federated) -> None:
        self.key = generate_identity_key()
        self.dir = tmp / "consortium"
        self.dir.mkdir()
        self.public = self.dir / "authority.key.pub"
        save_public_key(self.key.public_key(), self.public)
        self.file = self.dir / "roster.json"
        sites = tuple(
            ConsortiumSite(s, public_key_to_der(fx.fed.site_keys[SiteId(s)].public_key()))
            for s in SITES
        )
        first = ConsortiumRoster("fedgrid", 1, 1_780_000_000_000, sites)
        self.versions = [first, with_revoked(first, "site-d", 1_780_000_100_000)]
        fx.cfg = dataclasses.replace(fx.cfg, consortium=ConsortiumSection(self.file, self.public))

    def write(self, version: int, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        signed = SignedConsortiumRoster.sign(self.versions[version - 1], key or self.key)
        self.file.write_text(signed.to_json())


def _rewrite_after_round_one(fx: Federated, action: Any) -> None:
    """Run ``action`` when round 1's evaluation reaches the first site (before round 2 starts)."""
    site = next(iter(fx.sites.values()))
    answer = site.answer
    done = []

    def answer_then_act(msg: Any) -> Any:
        if msg.metadata.message_type == "evaluate" and not done:
            done.append(True)
            action()
        return answer(msg)

    site.answer = answer_then_act  # type: ignore[method-assign]


def _log(fx: Federated) -> tuple[list[Any], VerifiedLog]:
    path = fx.cfg.coordinator.state_dir / "audit.sqlite"
    with MerkleLogStore.open(path, read_only=True) as store:
        entries = [decode_entry(e.data) for e in store.iter_entries()]
        verified = AuditVerifier().run_rows(store.iter_leaf_rows(), store.tree_heads())
    return entries, verified


def _status(fx: Federated) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (fx.cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text()
    )
    return doc


@pytest.mark.timeout(120)
def test_the_roster_is_logged_at_run_start_and_again_when_its_version_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=2, min_sites=3)
    authority = Authority(tmp_path, fx)
    authority.write(1)
    _rewrite_after_round_one(fx, lambda: authority.write(2))
    fx.run(monkeypatch)

    assert [r["outcome"] for r in fx.rounds()] == ["committed", "committed"]
    entries, verified = _log(fx)
    kinds = [type(e).__name__ for e in entries]
    rosters = [e for e in entries if isinstance(e, ConsortiumRosterRecord)]
    assert [r.version for r in rosters] == [1, 2]
    first = kinds.index("ConsortiumRosterRecord")
    assert kinds[first + 1] == "RunStart"  # in force before the run starts
    assert kinds.index("RoundRecord") < entries.index(rosters[1])  # after round 1, before round 2
    for record, roster in zip(rosters, authority.versions, strict=True):
        assert record.signed().verify(authority.key.public_key()) == roster
    assert verified.consortium_rosters[0][:2] == ("fedgrid", 2)
    assert verified.warnings == ()
    # Logs verify with the authority pinned.
    with MerkleLogStore.open(
        fx.cfg.coordinator.state_dir / "audit.sqlite", read_only=True
    ) as store:
        AuditVerifier(consortium_authority=authority.key.public_key()).run_rows(
            store.iter_leaf_rows(), store.tree_heads()
        )


@pytest.mark.timeout(120)
def test_a_lower_version_at_a_round_start_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=2, min_sites=3)
    authority = Authority(tmp_path, fx)
    authority.write(2)
    _rewrite_after_round_one(fx, lambda: authority.write(1))
    with pytest.raises(ConsortiumRefusedError, match="version 1 is older than version 2"):
        fx.run(monkeypatch)
    status = _status(fx)
    assert status["phase"] == "failed"
    assert status["reason"].startswith("stopping the run at round 2: consortium roster ")
    assert "\n" not in status["reason"]
    assert [r["outcome"] for r in fx.rounds()] == ["committed"]  # round 2 never started
    entries, verified = _log(fx)
    assert [e.version for e in entries if isinstance(e, ConsortiumRosterRecord)] == [2]
    assert any("has not ended" in w for w in verified.warnings)  # the log still verifies


@pytest.mark.timeout(120)
def test_a_roster_that_does_not_verify_refuses_to_start_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=1, min_sites=3)
    authority = Authority(tmp_path, fx)
    authority.write(1, key=generate_identity_key())  # not the pinned authority
    with pytest.raises(ConsortiumRefusedError, match="not by the pinned authority key"):
        fx.run(monkeypatch)
    status = _status(fx)
    assert status["phase"] == "failed"
    assert status["reason"].startswith("refusing to start the run: consortium roster ")
    assert fx.grid.sent == []  # nothing reached a site
    assert not (fx.cfg.coordinator.state_dir / "audit.sqlite").exists()


@pytest.mark.timeout(120)
def test_a_missing_roster_file_refuses_to_start_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=False, rounds=1, min_sites=3)
    Authority(tmp_path, fx)  # configured, never written
    with pytest.raises(ConsortiumRefusedError, match="consortium roster not found"):
        fx.run(monkeypatch)
    assert _status(fx)["reason"].startswith("refusing to start the run: consortium.roster ")
    assert fx.grid.sent == []


@pytest.mark.timeout(120)
def test_a_new_run_refuses_a_roster_older_than_the_one_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=1, min_sites=3)
    authority = Authority(tmp_path, fx)
    authority.write(2)
    fx.run(monkeypatch)
    authority.write(1)  # rolled back between runs
    with pytest.raises(audit_hook.AuditHaltError, match="roster versions never go down"):
        fx.run(monkeypatch)
    assert "the audit log refused the consortium roster" in _status(fx)["reason"]
    entries, _ = _log(fx)
    assert sum(isinstance(e, RunStart) for e in entries) == 1  # the second run never started


def test_run_audit_records_a_roster_again_only_when_asked_or_changed(tmp_path: Path) -> None:
    from fedseal.server.audit_hook import ConsortiumWatch, RunAudit
    from fedseal.server.roster import Enrolment

    fx = Federated(tmp_path, SITES, secure=True, rounds=1, min_sites=3)
    authority = Authority(tmp_path, fx)
    assert fx.cfg.consortium is not None
    watch = ConsortiumWatch(fx.cfg.consortium)
    authority.write(1)
    first = watch.check()
    assert first is not None and watch.check() is None  # unchanged: nothing to record
    audit = RunAudit.open(tmp_path / "audit.sqlite", generate_identity_key(), Enrolment())
    assert audit.consortium_roster(first) is True
    assert audit.consortium_roster(first) is False  # a resumed run: the log has it already
    assert audit.consortium_roster(first, again=True) is True  # a new run's start
    authority.write(2)
    second = watch.check()
    assert second is not None and second.roster.version == 2
    assert audit.consortium_roster(second) is True
    audit.close()
    # The same version with other contents is refused, as is an older version.
    changed = dataclasses.replace(authority.versions[1], issued_at_ms=1)
    authority.file.write_text(SignedConsortiumRoster.sign(changed, authority.key).to_json())
    with pytest.raises(
        ConsortiumRefusedError, match="version 2 is a different roster than version 2"
    ):
        watch.check()
    authority.write(1)
    with pytest.raises(ConsortiumRefusedError, match="older than version 2"):
        watch.check()
    authority.file.write_text("{}")
    with pytest.raises(ConsortiumRefusedError, match="is missing"):
        watch.check()
