"""Builds the logs the report tests render: a consortium of ``sites`` sites over ``rounds``
rounds with what a data-protection officer must find in the report, written through the
coordinator's own writer (``AuditLog``) with really signed envelopes, one group commit per
round stage (so 100 sites x 50 rounds builds in seconds, without running a federation).

What happens in the run (``n = sites``, ``R = rounds``):

* every site is enrolled with one approved dataset root; round ``r``'s signed setup names the
  cohort (the sites enrolled then);
* ``ROOT_SWITCHER`` (site 1) gets a new approved dataset root (reason logged) after round
  ``R // 2`` and uses it from the next round on;
* site 0 sends a masked input with an unapproved dataset root in round 2 (rejected);
* an outsider whose id is HTML sends a masked input every round (rejected, "signer not
  enrolled", the reason carrying markup too);
* site ``k`` sends nothing in round ``r`` when ``(7 k + 3 r) % 41 == 0`` (absent; never
  with fewer than 3 sites); each round result names its absent sites with the coordinator's
  reason (``absent_reason``: a refusal, carrying markup, an error or a dropout by ``k % 3``;
  a rejected input's site as ``rejected at masked-input: …``);
* the last site is revoked after round ``ceil(0.6 R)`` with a reason in markup;
* site 0's dataset root is withdrawn after round ``R - 1`` (erasure; where the tree has root
  withdrawals, issue 18.8): its last-round input carries it and is rejected;
* round ``R // 2 + 1`` fails after its inputs were accepted (reason logged), when ``R >= 5``;
* every committed round has a checkpoint and an evaluation; the run ends completed.

With ``dp``, the run carries a DP budget and every committed round its accounting entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.entries import INPUT_MESSAGE_TYPE, RosterAction, RoundStatus, RunStatus
from fedseal.audit.writer import AuditLog, ReceivedEnvelope
from fedseal.crypto.keys import generate_identity_key, key_id, public_key_to_der
from fedseal.crypto.signing import sign
from fedseal.protocol.dp import DpParams
from tests.audit.logbuilder import (
    STAND_IN_TYPE,
    Clock,
    digest,
    log_setup,
    masked_input_payload,
    round_setup,
)

OUTSIDER = '<img src=x onerror="alert(1)">'
OUTSIDER_REASON = "signer not enrolled <script>alert('reason')</script>"
ABSENT_REFUSAL = "refused: privacy budget: <b>epsilon</b> 7.9 of 8 spent & more"
REVOKE_REASON = "consent withdrawn <b>by the hospital</b> & its DPO"
ROOTS_REASON = "new dataset version (2025 export)"
FAILED_REASON = "only 1 masked input survived; the round needs 2"
WITHDRAW_REASON = "erasure request 2025-031 (GDPR art. 17)"
WITHDRAWN_REJECTION = "dataset root withdrawn"
WITHDRAW_ROOT = getattr(RosterAction, "WITHDRAW_ROOT", None)
ROOT_SWITCHER = 1


@dataclass
class ConsortiumLog:
    path: Path
    coordinator: ec.EllipticCurvePrivateKey
    sites: list[str]
    rounds: int
    roots: dict[str, list[bytes]]  # site -> its approved roots, in order of approval
    revoked: str
    revoked_after: int
    failed_round: int | None
    withdrawn_after: int | None = None
    absent: set[tuple[str, int]] = field(default_factory=set)
    # (site, round) -> the reason its round result logs for it (absent or rejected sites)
    absent_reasons: dict[tuple[str, int], str] = field(default_factory=dict)
    rejected: dict[tuple[str, int], str] = field(default_factory=dict)  # (site, round) -> reason
    in_sum: dict[int, list[str]] = field(default_factory=dict)  # committed round -> survivors


def absent_reason(k: int) -> str:
    """Why site ``k`` sent nothing, as the coordinator's round record says it."""
    return (
        ABSENT_REFUSAL,
        "error: the site's data loader failed (KeyError 'label')",
        "dropped at masked-input: no reply within 60 s",
    )[k % 3]


def build_consortium_log(
    path: Path,
    *,
    sites: int = 3,
    rounds: int = 5,
    dp: DpParams | None = None,
    absent_reasons: bool = True,
) -> ConsortiumLog:
    clock = Clock()
    coordinator = generate_identity_key()
    names = [f"hospital-{i:03d}" for i in range(1, sites + 1)]
    keys = {s: generate_identity_key() for s in names}
    roots = {s: [digest("root", s)] for s in names}
    revoked_after = math.ceil(0.6 * rounds)
    failed_round = rounds // 2 + 1 if rounds >= 5 else None
    switcher = names[ROOT_SWITCHER]
    built = ConsortiumLog(
        path, coordinator, names, rounds, roots, names[-1], revoked_after, failed_round
    )
    log = AuditLog.open(path, signer=coordinator, now_ms=clock(), log_id=digest("log")[:16])
    for s in names:
        log.append_roster_change(
            RosterAction.ENROL, s, public_key_der=public_key_to_der(keys[s].public_key()),
            approved_roots=roots[s], now_ms=clock(),
        )  # fmt: skip
    log.sign_tree_head(clock())
    run_id = digest("run")[:16]
    model = digest("model", 0)
    log.append_run_start(
        run_id, config_digest=digest("server.toml"), initial_model_digest=model,
        code_version="fedseal-0.1.0", started_at_ms=clock(), planned_rounds=rounds,
        dp_budget=None if dp is None else (64.0, 1e-5),
    )  # fmt: skip
    outsider = generate_identity_key()
    active = list(names)
    for rnd in range(1, rounds + 1):
        setup = round_setup(run_id, rnd, model, {s: keys[s] for s in active}, dp)
        log_setup(log, setup, coordinator)
        sending = [s for s in active if (7 * names.index(s) + 3 * rnd) % 41 != 0 or len(active) < 3]
        built.absent |= {(s, rnd) for s in active if s not in sending}
        adverts = []
        for s in sending:
            payload = run_id + rnd.to_bytes(4, "big") + s.encode() + b"/advert"
            adverts.append(
                ReceivedEnvelope(
                    STAND_IN_TYPE, payload, sign(keys[s], STAND_IN_TYPE, payload),
                    bytes(key_id(keys[s].public_key())), True, None, s, rnd, "advertise",
                )
            )  # fmt: skip
        log.append_envelopes(adverts)
        junk = masked_input_payload(
            run_id, rnd, OUTSIDER, model, digest("x"), 5, digest("bulk", "x", rnd), setup.digest
        )
        inputs = [
            ReceivedEnvelope(
                INPUT_MESSAGE_TYPE, junk, sign(outsider, INPUT_MESSAGE_TYPE, junk),
                bytes(key_id(outsider.public_key())), False, OUTSIDER_REASON, OUTSIDER, rnd,
                "masked-input",
            )
        ]  # fmt: skip
        accepted = []
        for i, s in enumerate(sending):
            root, ok, reason = roots[s][-1], True, None
            if rnd == 2 and i == 0:
                root, ok, reason = digest("unapproved"), False, "dataset root not approved"
            elif built.withdrawn_after is not None and s == names[0]:
                ok, reason = False, WITHDRAWN_REJECTION
            bulk = digest("bulk", s, rnd)
            payload = masked_input_payload(run_id, rnd, s, model, root, 100, bulk, setup.digest)
            inputs.append(
                ReceivedEnvelope(
                    INPUT_MESSAGE_TYPE, payload, sign(keys[s], INPUT_MESSAGE_TYPE, payload),
                    bytes(key_id(keys[s].public_key())), ok, reason, s, rnd, "masked-input",
                    root, bulk, 100, model,
                )
            )  # fmt: skip
            if ok:
                accepted.append(s)
            else:
                built.rejected[(s, rnd)] = str(reason)
        log.append_envelopes(inputs)
        why = {(s, rnd): absent_reason(names.index(s)) for s in active if s not in sending}
        why |= {
            (s, rnd): f"rejected at masked-input: {r}"
            for (s, r0), r in built.rejected.items()
            if r0 == rnd
        }
        absent = {s: w for (s, _), w in why.items()} if absent_reasons else None
        if absent_reasons:
            built.absent_reasons |= why
        if rnd == failed_round:
            log.append_round_result(
                rnd, aggregate_digest=None, new_model_digest=model, status=RoundStatus.FAILED,
                reason=FAILED_REASON, absent=absent,
            )  # fmt: skip
            log.sign_tree_head(clock())
        else:
            new_model = digest("model", rnd)
            log.append_round_result(
                rnd, aggregate_digest=digest("aggregate", rnd), new_model_digest=new_model,
                dp_params=None if dp is None else dp.to_bytes(), absent=absent,
            )  # fmt: skip
            log.sign_tree_head(clock())
            log.append_checkpoint(
                rnd, model_digest=new_model, file_digest=digest("file", rnd),
                name=f"round-{rnd:06d}.safetensors",
            )  # fmt: skip
            log.append_evaluation(
                rnd,
                metrics={
                    "accuracy": 0.5 + 0.4 * rnd / rounds,
                    "loss": 2.0 / rnd,
                    "macro-f1": 0.4 + 0.4 * rnd / rounds,
                },
                num_examples=250 * len(accepted), sites=sorted(accepted), now_ms=clock(),
            )  # fmt: skip
            built.in_sum[rnd] = sorted(accepted)
            model = new_model
        if rnd == rounds // 2:
            roots[switcher].append(digest("root-v2", switcher))
            log.append_roster_change(
                RosterAction.SET_ROOTS, switcher, approved_roots=roots[switcher][1:],
                reason=ROOTS_REASON, now_ms=clock(),
            )  # fmt: skip
        if rnd == rounds - 1 and WITHDRAW_ROOT is not None:
            log.append_roster_change(
                WITHDRAW_ROOT, names[0], approved_roots=roots[names[0]], reason=WITHDRAW_REASON,
                now_ms=clock(),
            )  # fmt: skip
            built.withdrawn_after = rnd
        if rnd == revoked_after:
            log.append_roster_change(
                RosterAction.REVOKE, names[-1], reason=REVOKE_REASON, now_ms=clock()
            )
            active.remove(names[-1])
    log.append_run_end(RunStatus.COMPLETED, ended_at_ms=clock())
    log.sign_tree_head(clock())
    log.close()
    return built
