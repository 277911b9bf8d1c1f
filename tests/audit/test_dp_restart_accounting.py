"""A DP round that accepted masked inputs counts as released, completed or not: whether the
coordinator could remove the masks cannot be told from the log (it may leave unmask responses
out, or hold colluders' shares it never logs). So the failed result a coordinator restarted
mid-round writes carries the round's DP accounting (the writer fills it in), ``fl-audit verify``
counts it, and a run cannot end while a round holds accepted inputs and no result (found by an
attack: ending the run dropped an unmasked round from the accounting). A round that accepted no
masked input spends nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.audit.auditor import verify_log
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import INPUT_MESSAGE_TYPE, DpRound, RoundStatus
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import key_id
from fedseal.crypto.signing import sign
from fedseal.protocol.messages import Header, UnmaskResponse
from fedseal.protocol.types import MessageKind, SiteId
from tests.audit.logbuilder import (
    BuiltLog,
    build_run_log,
    digest,
    log_setup,
    masked_input_payload,
    round_setup,
    sample_dp_params,
)

DELTA = 1e-6
UNMASK_MESSAGE_TYPE = MessageKind.UNMASK_RESPONSE.type_name


def _open_round_two(
    tmp_path: Path, unmask_responses: int, *, inputs: bool = True, responses_accepted: bool = True
) -> BuiltLog:
    """A DP run whose round 1 committed, and whose round 2 got its setup, every masked input
    (accepted, or none with ``inputs=False``) and ``unmask_responses`` unmask responses (accepted
    or rejected) logged before the coordinator died."""
    dp = sample_dp_params()
    built = build_run_log(
        tmp_path / "audit.sqlite", rounds=1, dp=dp, dp_budget=(50.0, DELTA), end_run=False,
        revoke_last_after_round=None,
    )  # fmt: skip
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=10**13)
    model = built.models[-1]
    setup = round_setup(built.run_id, 2, model, built.sites, dp)
    log_setup(log, setup, built.coordinator)
    assert setup.params.threshold == 2
    names = sorted(built.sites)
    for s in names if inputs else []:
        bulk = digest("bulk", s, 2)
        payload = masked_input_payload(built.run_id, 2, s, model, built.roots[s], 100, bulk, setup.digest)
        log.append_envelope(
            INPUT_MESSAGE_TYPE, payload, sign(built.sites[s], INPUT_MESSAGE_TYPE, payload),
            bytes(key_id(built.sites[s].public_key())), accepted=True, reason=None, site=s, round=2,
            stage="masked_input", dataset_root=built.roots[s], bulk_digest=bulk, num_examples=100,
            model_digest=model,
        )  # fmt: skip
    for s in names[:unmask_responses]:
        header = Header(built.run_id, 2, SiteId(s), SiteId(""), model, setup.digest)
        payload = UnmaskResponse(header, ()).to_payload()
        log.append_envelope(
            UNMASK_MESSAGE_TYPE, payload, sign(built.sites[s], UNMASK_MESSAGE_TYPE, payload),
            bytes(key_id(built.sites[s].public_key())), accepted=responses_accepted,
            reason=None if responses_accepted else "late", site=s, round=2, stage="unmask",
            model_digest=model,
        )  # fmt: skip
    log.sign_tree_head(10**13 + 1)
    log.close()  # the coordinator dies here
    return built


def _restart_and_abandon(built: BuiltLog) -> list[DpRound]:
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=10**13 + 2)  # replays round 2
    log.append_round_result(
        2, aggregate_digest=None, new_model_digest=built.models[-1], status=RoundStatus.FAILED,
        reason="abandoned: the coordinator stopped during this round; nothing of it was applied",
    )  # fmt: skip  (what server/resume.py reconcile_restart writes: no DP parameters passed)
    log.sign_tree_head(10**13 + 3)
    log.close()
    with MerkleLogStore.open(built.path, read_only=True) as store:
        entries = [decode_entry(e.data) for e in store.iter_entries()]
    return [e for e in entries if isinstance(e, DpRound)]


@pytest.mark.parametrize(
    ("responses", "accepted", "inputs", "accounted"),
    [
        (4, True, True, [1, 2]),
        (1, True, True, [1, 2]),  # fewer than the threshold: colluders' shares need no log
        (0, True, True, [1, 2]),
        (4, False, True, [1, 2]),  # responses logged as rejected (or left out)
        (0, True, False, [1]),  # no masked input accepted: nothing to release
    ],
)
def test_a_dp_round_abandoned_by_a_restart_is_accounted_iff_it_accepted_masked_inputs(
    tmp_path: Path, responses: int, accepted: bool, inputs: bool, accounted: list[int]
) -> None:
    built = _open_round_two(tmp_path, responses, inputs=inputs, responses_accepted=accepted)
    dps = _restart_and_abandon(built)
    assert [e.round for e in dps] == accounted
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert result.dp_runs[0][1] == len(accounted)
    assert result.dp_runs[0][2] == dps[-1].epsilon_so_far


def test_a_run_cannot_end_while_a_round_holds_accepted_inputs_and_no_result(tmp_path: Path) -> None:
    from fedseal.audit.entries import RunStatus
    from fedseal.audit.errors import AuditStateError

    built = _open_round_two(tmp_path, 4)
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=10**13 + 2)
    with pytest.raises(AuditStateError, match="round 2 holds accepted masked inputs and no result"):
        log.append_run_end(RunStatus.COMPLETED, ended_at_ms=10**13 + 3)
    log.close()


def test_verify_counts_the_open_round_of_a_log_that_stops_after_its_masked_inputs(tmp_path: Path) -> None:
    built = _open_round_two(tmp_path, 4)  # the log stops here: no result, no run end
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    with MerkleLogStore.open(built.path, read_only=True) as store:
        accounted = [e for e in map(decode_entry, (x.data for x in store.iter_entries())) if isinstance(e, DpRound)]
    assert [e.round for e in accounted] == [1]
    _, rounds, eps, _ = result.dp_runs[0]
    assert rounds == 2 and eps > accounted[-1].epsilon_so_far  # round 2 counted, as released
    assert any("round 2 accepted masked inputs and has no result yet" in w for w in result.warnings)
    # Once the restarted coordinator writes its result, the logged accounting says the same.
    assert _restart_and_abandon(built)[-1].epsilon_so_far == pytest.approx(eps, rel=1e-12)
