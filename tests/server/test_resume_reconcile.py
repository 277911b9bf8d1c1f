"""--resume reconciles checkpoints with the audit log (the record of what was committed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedseal.crypto.keys import generate_identity_key
from fedseal.protocol.model import flatten, model_digest
from fedseal.server.audit_hook import AuditHaltError, FailClosedAudit, RunAudit
from fedseal.server.checkpoint import CheckpointStore, RunState
from fedseal.server.resume import reconcile_restart
from fedseal.server.roster import Enrolment

RUN_ID = "ab" * 16


def _arrays(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), v, np.float32)}


def _digest(arrays: dict[str, np.ndarray]) -> bytes:
    """The model digest the audit log (and the checkpoint) records for ``arrays``."""
    return model_digest(flatten(arrays))


class _Fixture:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = generate_identity_key()
        roster = Enrolment().enroll("site-a", generate_identity_key().public_key(), ["aa" * 32], now_ms=1)
        self.audit = RunAudit.open(tmp / "audit.sqlite", self.key, roster)
        self.checkpoints = CheckpointStore(tmp / "checkpoints")
        self.statuses: list[dict[str, Any]] = []
        cfg_path = tmp / "server.toml"
        cfg_path.write_text("# test\n")
        self.run = SimpleNamespace(
            cfg=SimpleNamespace(path=cfg_path, run=SimpleNamespace(rounds=6)),
            checkpoints=self.checkpoints,
            status=lambda **f: self.statuses.append(f),
        )
        self.gate = FailClosedAudit(self.audit, halt=lambda reason: self.statuses.append({"phase": "failed", "reason": reason}))
        self.rounds_log = tmp / "rounds.jsonl"

    def commit(self, rnd: int, arrays: dict[str, np.ndarray], *, log: bool = True) -> None:
        self.checkpoints.commit(RunState(RUN_ID, rnd, _digest(arrays).hex()), arrays)
        if log:
            self.audit.round_result(rnd, hashlib.sha256(b"agg%d" % rnd).digest(), _digest(arrays))

    def fail(self, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        self.audit.round_result(rnd, None, _digest(arrays), failed="too few sites")

    def reconcile(self, previous: dict[str, Any]) -> tuple[RunState, dict[str, np.ndarray], int]:
        latest = self.checkpoints.latest()
        assert latest is not None
        state, arrays = latest
        return reconcile_restart(self.run, self.gate, state, arrays, previous, self.rounds_log)  # type: ignore[arg-type]


def _started(fx: _Fixture) -> None:
    fx.checkpoints.commit(RunState(RUN_ID, 0, _digest(_arrays(0)).hex()), _arrays(0))
    fx.audit.run_start(RUN_ID, b"# test\n", _digest(_arrays(0)), rounds=6)


def test_failed_rounds_after_the_last_checkpoint_are_not_replayed_and_the_interrupted_one_is_abandoned(
    tmp_path: Path,
) -> None:
    fx = _Fixture(tmp_path)
    _started(fx)
    for rnd in (1, 2, 3):  # e.g. too few sites: the model stays at round 0's
        fx.fail(rnd, _arrays(0))
    state, arrays, first = fx.reconcile({"run_id": RUN_ID, "phase": "training", "round": 4})
    assert (state.round, first) == (0, 5)
    np.testing.assert_array_equal(arrays["w"], _arrays(0)["w"])
    assert fx.audit.log.last_round == 4  # round 4 recorded as failed (abandoned)
    recs = [json.loads(x) for x in fx.rounds_log.read_text().splitlines()]
    assert [r["round"] for r in recs] == [4] and recs[0]["outcome"].startswith("abandoned")


def test_a_checkpoint_the_log_never_recorded_is_discarded_and_its_round_abandoned(tmp_path: Path) -> None:
    fx = _Fixture(tmp_path)
    _started(fx)
    fx.commit(1, _arrays(1), log=False)  # killed between the checkpoint and the log entry
    state, arrays, first = fx.reconcile({"run_id": RUN_ID, "phase": "training", "round": 1})
    assert (state.round, first) == (0, 2)
    assert not fx.checkpoints.model_path(1).exists()
    np.testing.assert_array_equal(arrays["w"], _arrays(0)["w"])
    assert fx.audit.log.last_round == 1


def test_a_log_whose_model_is_not_the_checkpoints_stops_the_resume(tmp_path: Path) -> None:
    fx = _Fixture(tmp_path)
    _started(fx)
    fx.checkpoints.commit(RunState(RUN_ID, 0, _digest(_arrays(7)).hex()), _arrays(7))  # replaced on disk
    with pytest.raises(AuditHaltError, match="not the newest checkpoint"):
        fx.reconcile({})
    assert fx.statuses[-1]["phase"] == "failed"


def test_a_checkpoint_of_another_run_stops_the_resume(tmp_path: Path) -> None:
    fx = _Fixture(tmp_path)
    _started(fx)
    fx.checkpoints.commit(RunState("cd" * 16, 0, _digest(_arrays(0)).hex()), _arrays(0))
    with pytest.raises(AuditHaltError, match="open run"):
        fx.reconcile({})


def test_nothing_in_flight_resumes_at_the_next_round_and_abandons_nothing(tmp_path: Path) -> None:
    fx = _Fixture(tmp_path)
    _started(fx)
    fx.fail(1, _arrays(0))
    state, _, first = fx.reconcile({"run_id": RUN_ID, "phase": "waiting-for-sites", "round": 0})
    assert (state.round, first) == (0, 2)
    assert not fx.rounds_log.exists()
