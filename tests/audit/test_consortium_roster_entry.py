"""The consortium-roster audit entry: the signed roster the sites run under, as the roster
authority signed it; round trip, decoding bounds, the verifier's rules (the roster decodes, its
signature verifies, versions never go down) and logs without it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedseal.audit.cli import EXIT_FAILED, EXIT_OK, app
from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import (
    ConsortiumRosterRecord,
    EntryKind,
    Genesis,
    RosterAction,
    RoundStatus,
    RunStatus,
)
from fedseal.audit.errors import AuditStateError, AuditVerificationError
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.verifier import AuditVerifier, VerifiedLog
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, public_key_to_der, save_public_key
from fedseal.protocol.consortium import (
    ConsortiumRoster,
    ConsortiumSite,
    SignedConsortiumRoster,
    with_revoked,
)
from fedseal.protocol.errors import DecodeError
from tests.audit.logbuilder import Clock, build_run_log, digest

runner = CliRunner()
SITES = ("site-a", "site-b", "site-c")


@dataclasses.dataclass
class Consortium:
    authority: ec.EllipticCurvePrivateKey
    site_keys: dict[str, ec.EllipticCurvePrivateKey]
    versions: list[SignedConsortiumRoster]  # versions[i] has version i + 1

    @property
    def public(self) -> ec.EllipticCurvePublicKey:
        return self.authority.public_key()


@pytest.fixture(scope="module")
def consortium() -> Consortium:
    authority = generate_identity_key()
    keys = {s: generate_identity_key() for s in SITES}
    roster = ConsortiumRoster(
        "eu-hospitals",
        1,
        1_780_000_000_000,
        tuple(ConsortiumSite(s, public_key_to_der(k.public_key())) for s, k in keys.items()),
    )
    v2 = with_revoked(roster, "site-c", issued_at_ms=1_780_000_100_000)
    versions = [SignedConsortiumRoster.sign(r, authority) for r in (roster, v2)]
    return Consortium(authority, keys, versions)


def _record(
    signed: SignedConsortiumRoster, authority: ec.EllipticCurvePublicKey
) -> ConsortiumRosterRecord:
    payload = signed.payload
    return ConsortiumRosterRecord(
        signed.roster.consortium, signed.roster.version, hashlib.sha256(payload).digest(),
        payload, signed.signature, public_key_to_der(authority), 1_780_000_000_123,
    )  # fmt: skip


def _verify(path: Path, **kw: object) -> VerifiedLog:
    with MerkleLogStore.open(path, read_only=True) as store:
        return AuditVerifier(**kw).run_rows(store.iter_leaf_rows(), store.tree_heads())  # type: ignore[arg-type]


def _run_log(
    path: Path, c: Consortium, rosters: list[tuple[int, int]]
) -> ec.EllipticCurvePrivateKey:
    """A log: enrolments, a run of two rounds that fail (no inputs), the run end; and
    ``(after round, version)`` consortium rosters (after round 0: before the run start)."""
    clock = Clock()
    coordinator = generate_identity_key()
    log = AuditLog.open(path, signer=coordinator, now_ms=clock(), log_id=digest("log")[:16])
    for s, k in c.site_keys.items():
        log.append_roster_change(
            RosterAction.ENROL, s, public_key_der=public_key_to_der(k.public_key()),
            approved_roots=[digest("root", s)], now_ms=clock(),
        )  # fmt: skip

    def place(rnd: int) -> None:
        for after, version in rosters:
            if after == rnd:
                log.append_consortium_roster(c.versions[version - 1], c.public, now_ms=clock())

    place(0)
    model = digest("model0")
    log.append_run_start(
        digest("run")[:16], config_digest=digest("config"), initial_model_digest=model,
        code_version="test", started_at_ms=clock(), planned_rounds=2,
    )  # fmt: skip
    log.sign_tree_head(clock())
    for rnd in (1, 2):
        log.append_round_result(
            rnd, aggregate_digest=None, new_model_digest=model, status=RoundStatus.FAILED,
            reason="too few sites",
        )  # fmt: skip
        log.sign_tree_head(clock())
        place(rnd)
    log.append_run_end(RunStatus.COMPLETED, ended_at_ms=clock())
    log.sign_tree_head(clock())
    log.close()
    return coordinator


def _unchecked(record: ConsortiumRosterRecord, **change: object) -> ConsortiumRosterRecord:
    """``record`` with ``change``, without the constructor's checks (bytes a forger could write)."""
    forged: ConsortiumRosterRecord = object.__new__(ConsortiumRosterRecord)
    for f in dataclasses.fields(record):
        object.__setattr__(forged, f.name, change.get(f.name, getattr(record, f.name)))
    return forged


# --- the entry ---------------------------------------------------------------------------


def test_the_entry_round_trips_and_keeps_the_roster_exactly_as_signed(
    consortium: Consortium,
) -> None:
    signed = consortium.versions[1]
    record = _record(signed, consortium.public)
    data = encode_entry(record)
    assert data[:2] == bytes([1, int(EntryKind.CONSORTIUM_ROSTER)])
    assert EntryKind.CONSORTIUM_ROSTER.label == "consortium-roster"
    back = decode_entry(data)
    assert back == record and encode_entry(back) == data
    assert isinstance(back, ConsortiumRosterRecord)
    # An auditor re-verifies it offline with the authority's public key alone ...
    assert back.signed().verify(consortium.public) == signed.roster
    # ... and gets the very roster file the authority issued.
    assert back.signed().to_json() == signed.to_json()
    assert back.authority_key_id == signed.authority_key_id
    assert (back.consortium, back.version) == ("eu-hospitals", 2)
    assert back.roster_digest == signed.roster.digest()


def test_truncated_or_extended_entry_bytes_raise_only_decode_errors(consortium: Consortium) -> None:
    data = encode_entry(_record(consortium.versions[0], consortium.public))
    for cut in (2, 3, 20, 50, len(data) // 2, len(data) - 9, len(data) - 1):
        with pytest.raises(DecodeError):
            decode_entry(data[:cut])
    with pytest.raises(DecodeError, match="trailing"):
        decode_entry(data + b"\x00")


def test_a_payload_length_over_the_bound_is_refused_before_reading(consortium: Consortium) -> None:
    record = _record(consortium.versions[0], consortium.public)
    data = encode_entry(record)
    at = 2 + 2 + len(record.consortium.encode()) + 8 + 32  # the payload's u32 length
    assert struct.unpack_from(">I", data, at)[0] == len(record.payload)
    forged = data[:at] + struct.pack(">I", (4 << 20) + 1) + data[at + 4 :]
    with pytest.raises(DecodeError, match="exceeds bound"):
        decode_entry(forged)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"consortium": "other"}, "differ from the signed roster"),
        ({"version": 7}, "differ from the signed roster"),
        ({"roster_digest": bytes(32)}, "SHA-256"),
        ({"signature": b"\x30" * 73}, "signature must be"),
        ({"authority_key_der": b"\x30\x00"}, "authority_key_der"),
    ],
)
def test_fields_that_disagree_with_the_signed_roster_do_not_decode(
    consortium: Consortium, change: dict[str, object], match: str
) -> None:
    record = _record(consortium.versions[0], consortium.public)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(record, **change)  # type: ignore[arg-type]
    # The same fields written as bytes (bypassing the constructor) are a decode error.
    with pytest.raises(DecodeError, match="audit entry"):
        decode_entry(encode_entry(_unchecked(record, **change)))


def test_a_payload_that_is_not_a_roster_does_not_decode(consortium: Consortium) -> None:
    record = _record(consortium.versions[0], consortium.public)
    flipped = record.payload[:-1] + b"\x02"  # the last site's active flag: neither 0 nor 1
    for payload in (b"not a roster", flipped, record.payload + b"\x00"):
        forged = _unchecked(record, payload=payload, roster_digest=hashlib.sha256(payload).digest())
        with pytest.raises(DecodeError, match="does not decode"):
            decode_entry(encode_entry(forged))


# --- the log and the verifier ------------------------------------------------------------


def test_a_log_with_consortium_rosters_before_and_during_a_run_verifies(
    consortium: Consortium, tmp_path: Path
) -> None:
    path = tmp_path / "audit.sqlite"
    coordinator = _run_log(path, consortium, [(0, 1), (1, 1), (2, 2)])
    result = _verify(path, coordinator_key=coordinator.public_key())
    assert result.warnings == ()
    assert result.consortium_rosters == (
        ("eu-hospitals", 2, consortium.versions[1].roster.digest().hex(),
         consortium.versions[1].authority_key_id.hex()),
    )  # fmt: skip
    # Pinning the roster authority: the same log passes; another authority key fails.
    _verify(path, consortium_authority=consortium.public)
    with pytest.raises(AuditVerificationError) as err:
        _verify(path, consortium_authority=generate_identity_key().public_key())
    assert err.value.check == "consortium-authority" and err.value.index == 4
    assert err.value.entry_type == "consortium-roster"


def test_the_log_refuses_a_lower_version_or_another_roster_with_a_logged_version(
    consortium: Consortium, tmp_path: Path
) -> None:
    path = tmp_path / "audit.sqlite"
    coordinator = _run_log(path, consortium, [(0, 2)])
    # Re-opened: the state is rebuilt from the log.
    log = AuditLog.open(path, signer=coordinator, now_ms=1_790_000_000_000)
    assert log.consortium_roster is not None and log.consortium_roster.version == 2
    size = log.size
    with pytest.raises(AuditStateError, match="versions never go down"):
        log.append_consortium_roster(consortium.versions[0], consortium.public, now_ms=1)
    other = SignedConsortiumRoster.sign(
        dataclasses.replace(consortium.versions[1].roster, issued_at_ms=5), consortium.authority
    )
    with pytest.raises(AuditStateError, match="same version"):
        log.append_consortium_roster(other, consortium.public, now_ms=1)
    # A roster the authority key does not verify is refused too.
    with pytest.raises(AuditStateError, match="does not verify"):
        log.append_consortium_roster(
            consortium.versions[1], generate_identity_key().public_key(), now_ms=1
        )
    assert log.size == size
    # The same roster again (a new run's start) is fine.
    log.append_consortium_roster(consortium.versions[1], consortium.public, now_ms=2)
    log.sign_tree_head(1_790_000_000_001)
    log.close()
    _verify(path)


def _forged_log(path: Path, entries: list[ConsortiumRosterRecord]) -> None:
    """Entries written straight to the store, past the coordinator's guard rails."""
    coordinator = generate_identity_key()
    with MerkleLogStore.open(path) as store:
        genesis = Genesis(digest("forged")[:16], public_key_to_der(coordinator.public_key()), 1)
        store.append(int(EntryKind.GENESIS), encode_entry(genesis))
        for e in entries:
            store.append(int(EntryKind.CONSORTIUM_ROSTER), encode_entry(e))


def test_the_verifier_refuses_a_version_going_down(consortium: Consortium, tmp_path: Path) -> None:
    path = tmp_path / "forged.sqlite"
    v1, v2 = (_record(s, consortium.public) for s in consortium.versions)
    _forged_log(path, [v1, v2, v2, v1])
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == 4 and err.value.check == "consortium-version"
    assert "version 1 follows version 2" in err.value.detail


def test_the_verifier_refuses_two_rosters_with_one_version(
    consortium: Consortium, tmp_path: Path
) -> None:
    path = tmp_path / "forged.sqlite"
    other = SignedConsortiumRoster.sign(
        dataclasses.replace(consortium.versions[0].roster, issued_at_ms=9), consortium.authority
    )
    _forged_log(
        path,
        [_record(consortium.versions[0], consortium.public), _record(other, consortium.public)],
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == 2 and err.value.check == "consortium-version"


def test_the_verifier_refuses_a_signature_that_does_not_verify(
    consortium: Consortium, tmp_path: Path
) -> None:
    path = tmp_path / "forged.sqlite"
    stranger = generate_identity_key().public_key()
    _forged_log(path, [_record(consortium.versions[0], stranger)])
    with pytest.raises(AuditVerificationError) as err:
        _verify(path)
    assert err.value.index == 1 and err.value.check == "consortium-signature"


def test_logs_without_consortium_rosters_still_verify(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", rounds=2)
    result = _verify(built.path, coordinator_key=built.coordinator.public_key())
    assert result.consortium_rosters == () and result.warnings == ()
    # A pinned roster authority changes nothing for a log that holds no consortium roster.
    _verify(built.path, consortium_authority=generate_identity_key().public_key())


# --- fl-audit ----------------------------------------------------------------------------


def test_fl_audit_verify_show_and_report_list_the_consortium_roster(
    consortium: Consortium, tmp_path: Path
) -> None:
    path = tmp_path / "audit.sqlite"
    coordinator = _run_log(path, consortium, [(0, 1), (2, 2)])
    pub = tmp_path / "coordinator.pub"
    save_public_key(coordinator.public_key(), pub)
    anchor = ["--coordinator-key", str(pub)]
    authority = tmp_path / "authority.key.pub"
    save_public_key(consortium.public, authority)
    result = runner.invoke(
        app,
        ["verify", str(path), "--jobs", "1", "--consortium-authority", str(authority), *anchor],
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "consortium roster 'eu-hospitals': version 2" in result.output
    result = runner.invoke(app, ["verify", str(path), "--jobs", "1", "--json", *anchor])
    out = json.loads(result.output)
    assert out["consortium_rosters"][0]["version"] == 2
    stranger = tmp_path / "stranger.pub"
    save_public_key(generate_identity_key().public_key(), stranger)
    result = runner.invoke(
        app,
        ["verify", str(path), "--jobs", "1", "--consortium-authority", str(stranger), *anchor],
    )
    assert result.exit_code == EXIT_FAILED and "consortium-authority" in result.output
    result = runner.invoke(app, ["show", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == EXIT_OK, result.output
    assert "Consortium rosters" in result.output and "eu-hospitals" in result.output
    rows = [line for line in result.output.splitlines() if "eu-hospitals" in line]
    assert len(rows) == 2
    assert [line.split("│")[4].strip() for line in rows] == ["1", "2"]  # version
    assert [line.split("│")[5].strip() for line in rows] == ["3", "2"]  # active sites
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(path), "--out", str(report), *anchor])
    assert result.exit_code == EXIT_OK, result.output
    html = report.read_text()
    assert "Consortium rosters" in html and "eu-hospitals" in html and "all checks hold" in html
