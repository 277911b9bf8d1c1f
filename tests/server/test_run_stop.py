"""``fl-server stop RUN`` as the ServerApp sees it: the stop request in the state directory ends
the run before its next round, its committed rounds kept, the audit log's run end saying why.
Through the real ServerApp on the in-process grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedseal.audit.auditor import verify_log
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import RunEnd
from fedseal.audit.store import MerkleLogStore
from fedseal.crypto.keys import load_private_key
from fedseal.server import flower_app, rundir
from tests.server._fedgrid import Federated

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _stop_after_round(monkeypatch: pytest.MonkeyPatch, state: Path, after: int, reason: str) -> None:
    real = flower_app._Federation.round

    def round_then_stop(self: Any, rnd: int) -> None:
        real(self, rnd)
        if rnd == after:  # what fl-server's driver writes when the operator runs `fl-server stop`
            (state / rundir.STOP_REQUEST_FILE).write_text(reason)

    monkeypatch.setattr(flower_app._Federation, "round", round_then_stop)


@pytest.mark.timeout(120)
def test_a_stopped_secure_run_keeps_its_committed_round_and_logs_why_it_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=3, min_sites=3)
    state = fx.cfg.coordinator.state_dir
    _stop_after_round(monkeypatch, state, 1, "site-b's data is being corrected")
    fx.run(monkeypatch)
    assert [r["round"] for r in fx.rounds()] == [1]  # rounds 2 and 3 never started
    status = json.loads((state / rundir.STATUS_FILE).read_text())
    reason = "stopped by the operator: site-b's data is being corrected"
    assert status["phase"] == "finished" and status["round"] == 1 and status["stopped"] == reason
    assert status["model"].endswith("checkpoints/round-000001.safetensors")  # the committed round's
    assert f"fedseal: {reason}; stopping the run" in capsys.readouterr().out
    verified = verify_log(
        state / "audit.sqlite",
        coordinator_key=load_private_key(fx.cfg.coordinator.key, None).public_key(),
    )
    [(_, how, *_rest)] = verified.runs
    assert how == "completed"
    store = MerkleLogStore.open(state / "audit.sqlite", read_only=True)
    entries = [decode_entry(e.data) for e in store.entries(0, store.size)]
    [end] = [e for e in entries if isinstance(e, RunEnd)]
    assert end.reason == reason and end.final_round == 1


@pytest.mark.timeout(120)
def test_a_run_stopped_before_its_first_round_fails_saying_the_operator_stopped_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=False, rounds=2, min_sites=3)
    state = fx.cfg.coordinator.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / rundir.STOP_REQUEST_FILE).write_text("wrong strategy")
    fx.run(monkeypatch)
    assert fx.rounds() == []
    status = json.loads((state / rundir.STATUS_FILE).read_text())
    assert status["phase"] == "failed"
    assert status["reason"] == "no round committed; the last: stopped by the operator: wrong strategy"


class _NoSitesYet:
    def get_node_ids(self) -> list[int]:
        return []


@pytest.mark.timeout(60)
def test_a_run_waiting_for_its_sites_stops_at_once_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fx = Federated(tmp_path, SITES, secure=False, rounds=2, min_sites=3)
    cfg = fx.cfg
    state = cfg.coordinator.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / rundir.STOP_REQUEST_FILE).write_text("the sites are not ready")
    # sites_wait_timeout_s is 5 s here; the stop is seen on the first look, not at the deadline
    with pytest.raises(flower_app.CoordinatorError, match="before the first round: the sites are not ready"):
        flower_app.run_federation(_NoSitesYet(), cfg, resume=False)  # type: ignore[arg-type]
    status = json.loads((state / rundir.STATUS_FILE).read_text())
    assert status == status | {"phase": "failed", "reason": "stopped by the operator before the first round: the sites are not ready"}
