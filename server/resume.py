"""Resuming a run after a coordinator restart (``fl-server run --resume``): which sites are
really back, and bringing the checkpoints and the audit log into agreement.

Usage (the round loop's setup, :mod:`fedseal.server.flower_app`)::

    alive = responsive(run.grid, nodes, cfg.run.sites_wait_timeout_s)
    state, arrays, first_round = reconcile_restart(run, audit, state, arrays, previous, rounds_log)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedseal.protocol import records
from fedseal.server.audit_hook import AuditHaltError, FailClosedAudit, declared_settings
from fedseal.server.checkpoint import RunState
from fedseal.server.exchange import exchange
from fedseal.server.rundir import Run, append_round, read_rounds, summary

__all__ = ["PING_ROUND_S", "reconcile_restart", "responsive"]

log = logging.getLogger("fedseal.server")

#: Seconds a ``query.ping`` waits before the sites that did not answer are pinged again.
PING_ROUND_S = 15.0


def responsive(grid: Grid, nodes: list[int], timeout: float, round_s: float = PING_ROUND_S) -> list[int]:
    """The nodes that answer a ``query.ping`` within ``timeout`` (all of them, if they do sooner).

    After a coordinator restart Flower still lists the previous session's nodes as online, and a
    SuperNode may need many seconds to reconnect (its back-off grows while the SuperLink is
    down); a round must not start before its cohort can actually be reached. A site's first
    ping can also fail while its SuperNode is still clearing the previous run's task (it then
    answers with an error, or not at all): sites that did not answer properly are pinged again
    every ``round_s`` seconds (at once after an error reply) until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    alive: set[int] = set()
    attempt = 0
    while True:
        todo = [n for n in nodes if n not in alive]
        left = deadline - time.monotonic()
        if not todo or left <= 0:
            break
        attempt += 1
        msgs = [
            Message(
                RecordDict({records.CONFIG_RECORD: ConfigRecord({records.PING: 1})}), dst_node_id=n,
                message_type=records.message_type("query", records.PING),
            )
            for n in todo
        ]
        replies = exchange(grid, msgs, min(left, round_s))
        errors = 0
        for r in replies:
            if r.has_error():
                errors += 1
            else:
                alive.add(int(r.metadata.src_node_id))
        if len(alive) < len(nodes):
            log.info(
                "ping %d: %d of %d sites answered (%d with an error); pinging the others again",
                attempt, len(alive), len(nodes), errors,
            )
            if errors and len(replies) == len(todo):  # everyone replied, some with errors
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    log.info("ping: %d of %d sites answered", len(alive), len(nodes))
    return sorted(alive)


def reconcile_restart(
    run: Run,
    audit: FailClosedAudit | None,
    state: RunState,
    arrays: dict[str, Any],
    previous: dict[str, Any],
    rounds_log: Path,
) -> tuple[RunState, dict[str, Any], int]:
    """Bring checkpoints and the audit log into agreement after a restart; return the first round.

    The audit log is the record of what was committed. A checkpoint the log does not hold (the
    coordinator died between writing it and logging the round) was never published and is
    discarded. The round that was in progress when the coordinator stopped, and any discarded
    one, is *abandoned*: recorded as failed in the log and in ``rounds.jsonl``, nothing of it
    applied, and the run continues with the next round number (sites never see a round
    number twice). A checkpoint's model digest (verified when it was loaded) is the one the
    log records.

    Raises:
        AuditHaltError: The audit log disagrees with the checkpoints in a way that cannot be
            reconciled (it records a later round than any checkpoint, or another open run).
    """
    last_started = 0
    if previous.get("run_id") == state.run_id and previous.get("phase") == "training":
        last_started = int(previous.get("round", 0))
    # Rounds that ended (committed, failed or abandoned): a failed round has no checkpoint.
    finished = max([state.round] + [int(r.get("round", 0)) for r in read_rounds(rounds_log)])
    if audit is not None:
        audit_log = audit.log

        def halt(reason: str) -> AuditHaltError:
            run.status(phase="failed", reason=reason)
            return AuditHaltError(reason)

        if audit_log.current_run_id is None and state.round == 0:
            dp = run.cfg.dp
            audit.run_start(
                state.run_id, run.cfg.path.read_bytes(), bytes.fromhex(state.model_digest),
                run.cfg.run.rounds, (dp.epsilon, dp.delta) if dp.enabled else None,
                declared_settings(run.cfg),
            )
        elif audit_log.current_run_id != bytes.fromhex(state.run_id):
            raise halt(
                f"the audit log's open run is {(audit_log.current_run_id or b'').hex() or 'none'}, "
                f"the checkpoints are of run {state.run_id}: cannot resume"
            )
        if audit_log.last_round < state.round:
            gone = run.checkpoints.discard_after(audit_log.last_round)
            log.warning("checkpoints of rounds %s were never logged as committed: discarded", gone)
            latest = run.checkpoints.latest()
            if latest is None:
                raise halt("no checkpoint is left that the audit log records: cannot resume")
            state, arrays = latest
        if audit_log.current_model_digest not in (None, bytes.fromhex(state.model_digest)):
            raise halt(
                f"the audit log's current model (after round {audit_log.last_round}) is not the "
                f"newest checkpoint's (round {state.round}): cannot resume"
            )
        finished = audit_log.last_round  # the log is the record of which rounds ended
    last_abandoned = max(last_started, finished)
    for rnd in range(finished + 1, last_abandoned + 1):
        reason = "abandoned: the coordinator stopped during this round; nothing of it was applied"
        log.warning("round %d %s", rnd, reason)
        if audit is not None:
            audit.round_result(rnd, None, bytes.fromhex(state.model_digest), failed=reason)
        rec = {"round": rnd, "outcome": "abandoned (coordinator restarted mid-round; model unchanged)",
               "sampled": 0, "accepted": 0, "rejected": 0, "seconds": 0.0}
        append_round(rounds_log, rec)
        print(f"fedseal: {summary(rnd, run.cfg.run.rounds, rec)}", flush=True)
    return state, arrays, max(state.round, last_abandoned) + 1
