"""Crash consistency: SIGKILL while appending loses no acknowledged entry; the log verifies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedseal.audit.store import MerkleLogStore
from fedseal.audit.verifier import AuditVerifier
from fedseal.audit.writer import AuditLog

CHILD = textwrap.dedent(
    """
    import sys, hashlib
    from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
    from fedseal.crypto.signing import sign
    from fedseal.audit.entries import RosterAction
    from fedseal.audit.writer import AuditLog

    path = sys.argv[1]
    coordinator, site = generate_identity_key(), generate_identity_key()
    t = 1_780_000_000_000
    log = AuditLog.open(path, signer=coordinator, now_ms=t, log_id=b"L" * 16)
    log.append_roster_change(
        RosterAction.ENROL, "site-a", public_key_der=public_key_to_der(site.public_key()),
        approved_roots=[b"r" * 32], now_ms=t,
    )
    log.append_run_start(
        b"R" * 16, config_digest=b"c" * 32, initial_model_digest=b"m" * 32,
        code_version="test", started_at_ms=t,
    )
    kid = bytes(key_id(site.public_key()))
    i = 0
    while True:
        i += 1
        payload = b"stand-in payload %d" % i
        index = log.append_envelope(
            "fedseal/test/stand-in", payload, sign(site, "fedseal/test/stand-in", payload), kid,
            accepted=True, reason=None, site="site-a", round=1, stage="advertise",
        )
        sys.stdout.write(f"{index}\\n")
        sys.stdout.flush()
        if i % 7 == 0:
            log.sign_tree_head(t + i)
    """
)


def test_a_coordinator_killed_while_appending_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged: list[int] = []
    try:
        while len(acknowledged) < 60:
            line = child.stdout.readline()
            assert line, "child exited early"
            acknowledged.append(int(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # Lines the child printed before the kill are acknowledged too.
    acknowledged += [int(x) for x in child.stdout.read().split()]
    with MerkleLogStore.open(path, read_only=True) as store:
        size = store.size
        assert max(acknowledged) < size
        entries = list(store.iter_entries())
        heads = store.tree_heads()
    assert [e.index for e in entries] == list(range(size))
    result = AuditVerifier().run(entries, heads)
    assert result.entries == size
    assert any("has not ended" in w for w in result.warnings)


def test_a_restarted_coordinator_continues_the_open_run(tmp_path: Path) -> None:
    from fedseal.audit.entries import RosterAction, RoundStatus, RunStatus
    from fedseal.audit.errors import AuditStateError
    from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
    from fedseal.crypto.signing import sign

    path = tmp_path / "audit.sqlite"
    coordinator, site = generate_identity_key(), generate_identity_key()
    log = AuditLog.open(path, signer=coordinator, now_ms=1, log_id=b"L" * 16)
    log.append_roster_change(
        RosterAction.ENROL, "site-a", public_key_der=public_key_to_der(site.public_key()),
        approved_roots=[b"r" * 32], now_ms=2,
    )  # fmt: skip
    log.append_run_start(
        b"R" * 16, config_digest=b"c" * 32, initial_model_digest=b"m" * 32, code_version="t",
        started_at_ms=3,
    )  # fmt: skip
    payload = b"p1"
    kid = bytes(key_id(site.public_key()))
    log.append_envelope(
        "fedseal/test/x", payload, sign(site, "fedseal/test/x", payload), kid, accepted=True,
        reason=None, site="site-a", round=1, stage="s",
    )  # fmt: skip
    log.close()
    again = AuditLog.open(path, signer=coordinator, now_ms=4)
    assert again.current_run_id == b"R" * 16
    # The same signed content again is refused: the open round's state was rebuilt.
    with pytest.raises(AuditStateError):
        again.append_envelope(
            "fedseal/test/x", payload, sign(site, "fedseal/test/x", payload), kid, accepted=True,
            reason=None, site="site-a", round=1, stage="s",
        )  # fmt: skip
    with pytest.raises(AuditStateError):
        again.append_round_result(2, aggregate_digest=b"a" * 32, new_model_digest=b"n" * 32)
    again.append_round_result(
        1, aggregate_digest=None, new_model_digest=b"m" * 32, status=RoundStatus.FAILED
    )
    again.sign_tree_head(5)
    again.append_run_end(RunStatus.COMPLETED, ended_at_ms=6)
    again.sign_tree_head(7)
    with MerkleLogStore.open(path, read_only=True) as store:
        assert AuditVerifier().run(store.iter_entries(), store.tree_heads()).warnings == ()
    other = generate_identity_key()
    with pytest.raises(AuditStateError):
        AuditLog.open(path, signer=other, now_ms=8)


def test_a_round_result_left_without_a_tree_head_by_a_crash_is_covered_on_restart(
    tmp_path: Path,
) -> None:
    from fedseal.audit.entries import RoundStatus, RunStatus
    from fedseal.audit.errors import AuditStateError
    from fedseal.crypto.keys import generate_identity_key

    path = tmp_path / "audit.sqlite"
    coordinator = generate_identity_key()
    log = AuditLog.open(path, signer=coordinator, now_ms=1, log_id=b"L" * 16)
    log.append_run_start(
        b"R" * 16, config_digest=b"c" * 32, initial_model_digest=b"m" * 32, code_version="t",
        started_at_ms=2,
    )  # fmt: skip
    log.append_round_result(
        1, aggregate_digest=None, new_model_digest=b"m" * 32, status=RoundStatus.FAILED
    )
    with pytest.raises(AuditStateError):  # the coordinator must sign a tree head first
        log.append_round_result(
            2, aggregate_digest=None, new_model_digest=b"m" * 32, status=RoundStatus.FAILED
        )
    log.close()  # "crash": no tree head after round 1
    again = AuditLog.open(path, signer=coordinator, now_ms=3)
    head = again.latest_tree_head()
    assert head is not None and head.tree_size == again.size
    again.append_run_end(RunStatus.ABORTED, ended_at_ms=4, reason="operator stop")
    again.sign_tree_head(5)
    again.close()
    with MerkleLogStore.open(path, read_only=True) as store:
        result = AuditVerifier().run(store.iter_entries(), store.tree_heads())
    assert result.runs[0][1] == "aborted" and result.warnings == ()
