"""A withdrawn dataset root (erasure, consent withdrawn) in the audit log: a signed roster
change with its reason and time; the writer refuses, and ``fl-audit verify`` fails, any later
accepted input carrying it or any roster change approving it again; ``fl-audit show`` lists
withdrawals and revocation reasons."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import app
from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    AuditEntry,
    Checkpoint,
    RosterAction,
    RosterChange,
)
from fedseal.audit.errors import AuditStateError, AuditVerificationError
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
from fedseal.crypto.signing import sign
from tests.audit.logbuilder import CLOCK0, build_run_log, digest, masked_input_payload

REASON = "consent withdrawn (request 2025-031)"


def _withdrawal(site: str, root: bytes, reason: str = REASON) -> RosterChange:
    return RosterChange(RosterAction.WITHDRAW_ROOT, site, b"", (root,), reason, CLOCK0 + 99)


def test_a_withdrawal_entry_keeps_its_root_reason_and_time_through_encoding() -> None:
    entry = _withdrawal("site-a", b"\x07" * 32)
    back = decode_entry(encode_entry(entry))
    assert back == entry
    assert isinstance(back, RosterChange) and back.withdrawn_roots == (b"\x07" * 32,)


@pytest.mark.parametrize(
    ("roots", "reason", "why"),
    [((), REASON, "at least one dataset root"), ((b"\x07" * 32,), " ", "reason")],
)
def test_a_withdrawal_without_a_root_or_a_reason_is_not_an_entry(
    roots: tuple[bytes, ...], reason: str, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        RosterChange(RosterAction.WITHDRAW_ROOT, "site-a", b"", roots, reason, 1)


def _open_log(tmp_path: Path) -> tuple[AuditLog, ec.EllipticCurvePrivateKey, bytes, bytes]:
    coordinator = generate_identity_key()
    site = generate_identity_key()
    root, other = digest("root", "a"), digest("root", "b")
    log = AuditLog.open(
        tmp_path / "audit.sqlite", signer=coordinator, now_ms=CLOCK0, log_id=b"\x01" * 16
    )
    log.append_roster_change(
        RosterAction.ENROL, "site-a", public_key_der=public_key_to_der(site.public_key()),
        approved_roots=[root, other], now_ms=CLOCK0 + 1,
    )  # fmt: skip
    return log, site, root, other


def test_the_writer_refuses_an_accepted_input_that_carries_a_withdrawn_root(tmp_path: Path) -> None:
    log, site, root, other = _open_log(tmp_path)
    log.append_roster_change(
        RosterAction.WITHDRAW_ROOT,
        "site-a",
        approved_roots=[root],
        reason=REASON,
        now_ms=CLOCK0 + 2,
    )
    run_id, model = b"\x02" * 16, digest("model", 0)
    log.append_run_start(
        run_id, config_digest=digest("cfg"), initial_model_digest=model, code_version="t",
        started_at_ms=CLOCK0 + 3, planned_rounds=1,
    )  # fmt: skip

    def input_with(r: bytes) -> int:
        bulk = digest("bulk", r)
        payload = masked_input_payload(run_id, 1, "site-a", model, r, 10, bulk)
        return log.append_envelope(
            INPUT_MESSAGE_TYPE, payload, sign(site, INPUT_MESSAGE_TYPE, payload),
            bytes(key_id(site.public_key())), accepted=True, reason=None, site="site-a",
            round=1, stage="masked_input", dataset_root=r, bulk_digest=bulk, num_examples=10,
            model_digest=model,
        )  # fmt: skip

    with pytest.raises(
        AuditStateError, match=r"round 1: accepted input from 'site-a' carries dataset root"
    ):
        input_with(root)
    assert input_with(other) > 0  # the site's other root is still approved
    log.close()


@pytest.mark.parametrize("action", [RosterAction.SET_ROOTS, RosterAction.ENROL])
def test_the_writer_refuses_to_approve_a_withdrawn_root_again(
    tmp_path: Path, action: RosterAction
) -> None:
    log, _, root, other = _open_log(tmp_path)
    log.append_roster_change(
        RosterAction.WITHDRAW_ROOT,
        "site-a",
        approved_roots=[root],
        reason=REASON,
        now_ms=CLOCK0 + 2,
    )
    site, der = "site-a", b""
    if action is RosterAction.ENROL:  # another site enrolled with the withdrawn root
        site, der = "site-b", public_key_to_der(generate_identity_key().public_key())
    with pytest.raises(AuditStateError, match="a withdrawn root is never approved again"):
        log.append_roster_change(
            action, site, public_key_der=der, approved_roots=[root, other], now_ms=CLOCK0 + 3
        )
    log.close()


def test_the_writer_refuses_a_second_withdrawal_or_one_of_a_root_never_approved(
    tmp_path: Path,
) -> None:
    log, _, root, _ = _open_log(tmp_path)
    with pytest.raises(AuditStateError, match="not approved for it"):
        log.append_roster_change(
            RosterAction.WITHDRAW_ROOT, "site-a", approved_roots=[digest("elsewhere")],
            reason=REASON, now_ms=CLOCK0 + 2,
        )  # fmt: skip
    log.append_roster_change(
        RosterAction.WITHDRAW_ROOT,
        "site-a",
        approved_roots=[root],
        reason=REASON,
        now_ms=CLOCK0 + 2,
    )
    with pytest.raises(AuditStateError, match="withdrawn a second time"):
        log.append_roster_change(
            RosterAction.WITHDRAW_ROOT, "site-a", approved_roots=[root], reason="again",
            now_ms=CLOCK0 + 3,
        )  # fmt: skip
    log.close()


def _withdraw_after(
    round_: int, site: str, root: bytes
) -> Callable[[AuditEntry], list[AuditEntry]]:
    """A rewrite inserting the withdrawal of ``site``'s ``root`` after round ``round_``'s
    checkpoint: the coordinator logged it, then went on accepting the root."""

    def transform(entry: AuditEntry) -> list[AuditEntry]:
        if isinstance(entry, Checkpoint) and entry.round == round_:
            return [entry, _withdrawal(site, root)]
        return [entry]

    return transform


def test_verify_fails_a_coordinator_that_accepts_a_withdrawn_root_naming_round_and_site(
    tmp_path: Path,
) -> None:
    from tests.audit.logbuilder import rewrite_log

    built = build_run_log(tmp_path / "audit.sqlite", rounds=3, revoke_last_after_round=None)
    # The honest log verifies; withdrawn after round 3 (the last), it still does.
    late = rewrite_log(
        built, tmp_path / "late.sqlite", _withdraw_after(3, "site-b", built.roots["site-b"])
    )
    verify_log(late, coordinator_key=built.coordinator.public_key())
    # Withdrawn after round 1, yet site-b's input with that root accepted in round 2.
    forged = rewrite_log(
        built, tmp_path / "forged.sqlite", _withdraw_after(1, "site-b", built.roots["site-b"])
    )
    with pytest.raises(AuditVerificationError) as err:
        verify_log(forged, coordinator_key=built.coordinator.public_key())
    assert err.value.check == "root-withdrawn"
    assert "round 2" in str(err.value) and "'site-b'" in str(err.value)
    assert REASON in str(err.value)


def test_fl_audit_show_lists_withdrawals_and_revocation_reasons(tmp_path: Path) -> None:
    log, _, root, _ = _open_log(tmp_path)
    log.append_roster_change(
        RosterAction.REVOKE, "site-a", reason="left the consortium", now_ms=CLOCK0 + 2
    )
    # Erasure after the site left: the root is withdrawn all the same, the site stays revoked.
    log.append_roster_change(
        RosterAction.WITHDRAW_ROOT,
        "site-a",
        approved_roots=[root],
        reason=REASON,
        now_ms=CLOCK0 + 3,
    )
    log.sign_tree_head(CLOCK0 + 4)
    log.close()
    out = CliRunner().invoke(app, ["show", str(tmp_path / "audit.sqlite")], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    withdraw = next(line for line in lines if "withdraw-root" in line)
    assert root.hex()[:16] in withdraw and REASON in withdraw and "2026-" in withdraw
    revoke = next(line for line in lines if "│ revoke " in line)
    assert "left the consortium" in revoke
    assert any(line.startswith("│ site-a │ revoked") for line in lines)  # the roster table
