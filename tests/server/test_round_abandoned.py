"""A secure round whose unmasked aggregate is out of range is abandoned by the real ServerApp:
nothing applied, recorded as failed (with the reason and the survivor set) in the audit log and
``rounds.jsonl``, counted in the metrics, and one console line says so (tracebacks only in
``serverapp.log``); the next round goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import EntryKind, RoundRecord, RoundStatus
from fedseal.audit.store import MerkleLogStore
from fedseal.server.checkpoint import CheckpointStore
from tests.server._fedgrid import STEP, Federated, shift_masked_input

SITES = ["site-a", "site-b", "site-c", "site-d"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the task running in this process (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _round_results(path: Path) -> list[RoundRecord]:
    with MerkleLogStore.open(path) as store:
        out = []
        for i in store.find(int(EntryKind.ROUND_RESULT)):
            entry = decode_entry(store.entries(i, i + 1)[0].data)
            assert isinstance(entry, RoundRecord)
            out.append(entry)
        return out


@pytest.mark.timeout(120)
def test_an_out_of_range_aggregate_abandons_the_round_and_the_next_one_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, SITES, secure=True, rounds=2, min_sites=3,
        **{"site-b": {"tamper": shift_masked_input(1 << 31, element=3)}},
    )  # fmt: skip
    fx.run(monkeypatch)
    state = fx.cfg.coordinator.state_dir

    first, second = fx.rounds()
    assert first["round"] == 1
    assert first["outcome"].startswith(
        "abandoned (aggregate out of range"
    )
    assert first["outcome"].endswith("nothing applied, model unchanged)")
    assert first["failure_kind"] == "aggregate-out-of-range"
    assert first["survivors"] == SITES
    assert "checkpoint" not in first and first["accepted"] == 0
    assert second["outcome"] == "committed" and second["accepted"] == len(SITES)

    # The audit log: round 1 failed with the typed reason and the survivors, model unchanged.
    r1, r2 = _round_results(state / "audit.sqlite")
    assert r1.status == RoundStatus.FAILED and r1.aggregate_digest is None
    assert r1.reason.startswith(
        "aggregate out of range: 1 of 12 elements"
    )
    assert r1.survivors == tuple(SITES) and len(r1.accepted_input_digests) == len(SITES)
    assert r1.new_model_digest == r1.base_model_digest
    assert r2.status == RoundStatus.COMPLETED and r2.base_model_digest == r1.base_model_digest

    # Nothing of round 1 was applied: the only model after the initial one is round 2's.
    checkpoints = CheckpointStore(state / "checkpoints")
    assert not checkpoints.model_path(1).exists()
    latest = checkpoints.latest()
    assert latest is not None and latest[0].round == 2
    np.testing.assert_allclose(latest[1]["w"], np.full(12, STEP), atol=1e-3)

    # Metrics.
    assert fx.metric("fedseal_rounds_abandoned_total", {"reason": "aggregate-out-of-range"}) == 1
    assert fx.metric("fedseal_rounds_failed_total") == 1
    assert fx.metric("fedseal_rounds_committed_total") == 1

    # The operator's console: one line about round 1, saying it was abandoned and why.
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if "round 1/2" in line]
    assert len(lines) == 1
    assert "abandoned (aggregate out of range" in lines[0]
    assert "Traceback" not in out.out + out.err
    log_text = (state / "serverapp.log").read_text()
    assert (
        "round 1 abandoned (aggregate-out-of-range; survivors site-a, site-b, site-c, site-d)"
        in log_text
    )
    assert "Traceback" in log_text


@pytest.mark.timeout(120)
def test_an_honest_secure_run_commits_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=2, min_sites=3)
    fx.run(monkeypatch)
    assert [r["outcome"] for r in fx.rounds()] == ["committed", "committed"]
    assert [r.status for r in _round_results(fx.cfg.coordinator.state_dir / "audit.sqlite")] == [
        RoundStatus.COMPLETED,
        RoundStatus.COMPLETED,
    ]
    assert fx.metric("fedseal_rounds_abandoned_total", {"reason": "aggregate-out-of-range"}) is None
    # Each committed round's federated evaluation is in the signed log, after its result.
    from fedseal.audit.auditor import verify_log
    from fedseal.audit.entries import Evaluation
    from fedseal.crypto.keys import load_private_key
    from tests.server._fedgrid import EXAMPLES

    path = fx.cfg.coordinator.state_dir / "audit.sqlite"
    with MerkleLogStore.open(path, read_only=True) as store:
        evals = [
            (i, decode_entry(store.entries(i, i + 1)[0].data))
            for i in store.find(int(EntryKind.EVALUATION))
        ]
        results = store.find(int(EntryKind.ROUND_RESULT))
    assert [e.round for _, e in evals if isinstance(e, Evaluation)] == [1, 2]
    assert all(i > r for (i, _), r in zip(evals, results, strict=True))
    for _, e in evals:
        assert isinstance(e, Evaluation)
        assert e.metric_values == {"accuracy": 0.75, "loss": 0.5, "macro-f1": 0.7}
        assert e.num_examples == EXAMPLES * len(SITES) and e.sites == tuple(SITES)
    key = load_private_key(fx.cfg.coordinator.key).public_key()
    assert verify_log(path, coordinator_key=key).evaluations == 2
