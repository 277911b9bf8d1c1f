"""A coordinator restarted in the middle of a DP round does not know whether that round's noisy
sum had been unmasked; the log does: if it holds unmask responses from at least the setup's
threshold of sites, the failed result the restarted coordinator writes carries the round's DP
accounting (the writer fills it in), and ``fl-audit verify`` counts it. With fewer, the round
spends nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.audit.auditor import verify_log
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import INPUT_MESSAGE_TYPE, DpRound, RoundStatus
from fedseal.audit.rules import UNMASK_MESSAGE_TYPE
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import key_id
from fedseal.crypto.signing import sign
from fedseal.protocol.messages import Header, UnmaskResponse
from fedseal.protocol.types import SiteId
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


def _open_round_two(tmp_path: Path, unmask_responses: int) -> BuiltLog:
    """A DP run whose round 1 committed, and whose round 2 got its setup, every masked input
    and ``unmask_responses`` unmask responses logged before the coordinator died."""
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
    for s in names:
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
            bytes(key_id(built.sites[s].public_key())), accepted=True, reason=None, site=s, round=2,
            stage="unmask", model_digest=model,
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


@pytest.mark.parametrize(("responses", "accounted"), [(2, [1, 2]), (4, [1, 2]), (1, [1]), (0, [1])])
def test_a_round_abandoned_by_a_restart_is_accounted_iff_its_sum_could_be_unmasked(
    tmp_path: Path, responses: int, accounted: list[int]
) -> None:
    built = _open_round_two(tmp_path, responses)
    dps = _restart_and_abandon(built)
    assert [e.round for e in dps] == accounted
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert result.dp_runs[0][1] == len(accounted)
    assert result.dp_runs[0][2] == dps[-1].epsilon_so_far
