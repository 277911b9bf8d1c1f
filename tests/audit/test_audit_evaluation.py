"""Evaluation metrics are in the signed log, one ``evaluation`` entry per round (after its
result: the round result is committed before the model leaves the coordinator), checked by the
verifier and shown by ``fl-audit show`` and ``report``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import EXIT_OK, app
from fedseal.audit.codec import decode_entry, encode_entry, entry_tags
from fedseal.audit.entries import EntryKind, Evaluation, RoundStatus
from fedseal.audit.errors import AuditStateError, AuditVerificationError
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import save_public_key
from tests.audit.logbuilder import CLOCK0, BuiltLog, build_run_log, digest

runner = CliRunner()


def _evaluations(path: Path) -> list[tuple[int, Evaluation]]:
    with MerkleLogStore.open(path, read_only=True) as store:
        out = []
        for index in store.find(int(EntryKind.EVALUATION)):
            entry = decode_entry(store.entries(index, index + 1)[0].data)
            assert isinstance(entry, Evaluation)
            out.append((index, entry))
        return out


def test_an_evaluation_entry_round_trips_and_is_tagged_with_its_round() -> None:
    e = Evaluation(
        digest("run")[:16], 3, digest("model"), 1500, ("site-a", "site-b"),
        (("accuracy", 912_345), ("loss", 301_000), ("macro-f1", 900_000)), CLOCK0,
    )  # fmt: skip
    data = encode_entry(e)
    assert data[:2] == bytes([1, int(EntryKind.EVALUATION)])
    assert decode_entry(data) == e
    assert e.metric_values == {"accuracy": 0.912345, "loss": 0.301, "macro-f1": 0.9}
    assert entry_tags(e) == (int(EntryKind.EVALUATION), None, 3)
    with pytest.raises(ValueError, match="sorted"):
        dataclasses.replace(e, metrics=(("loss", 1), ("accuracy", 2)))
    with pytest.raises(ValueError, match="sorted"):
        dataclasses.replace(e, sites=("site-b", "site-a"))


def test_a_run_with_evaluations_verifies_and_each_round_has_one(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", evaluations=True)
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert result.evaluations == 3 and result.runs[0][1] == "completed"
    evals = _evaluations(built.path)
    assert [e.round for _, e in evals] == [1, 2, 3]
    assert [e.model_digest for _, e in evals] == built.models[1:]
    assert evals[2][1].metric_values["accuracy"] == pytest.approx(0.9)
    assert evals[2][1].sites == ("site-a", "site-b", "site-c")  # site-d revoked after round 2


def _open_after_round(tmp_path: Path, rounds: int = 2) -> tuple[BuiltLog, AuditLog]:
    built = build_run_log(tmp_path / "audit.sqlite", rounds=rounds, end_run=False)
    return built, AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)


def test_the_log_refuses_an_evaluation_that_breaks_the_rules(tmp_path: Path) -> None:
    built, log = _open_after_round(tmp_path)
    try:
        ok: dict[str, Any] = {"metrics": {"accuracy": 0.8}, "num_examples": 100}
        with pytest.raises(AuditStateError, match="evaluation of round 1 after round 2"):
            log.append_evaluation(1, **ok)
        with pytest.raises(AuditStateError, match="not round 2's new model"):
            log.append_evaluation(2, model_digest=digest("other"), **ok)
        with pytest.raises(AuditStateError, match="not enrolled"):
            log.append_evaluation(2, sites=["site-q"], **ok)
        with pytest.raises(ValueError, match="finite"):
            log.append_evaluation(2, metrics={"loss": float("nan")}, num_examples=1)
        log.append_evaluation(2, sites=["site-a"], now_ms=CLOCK0 + 10**6, **ok)
        with pytest.raises(AuditStateError, match="second evaluation"):
            log.append_evaluation(2, **ok)
    finally:
        log.close()
    # Reopened (a restart), the log still knows round 2 was evaluated.
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 2 * 10**6)
    try:
        with pytest.raises(AuditStateError, match="second evaluation"):
            log.append_evaluation(2, metrics={"accuracy": 0.8}, num_examples=100)
        # A failed round's (unchanged) model is not evaluated.
        log.append_round_result(
            3, aggregate_digest=None, new_model_digest=built.models[-1],
            status=RoundStatus.FAILED, reason="too few sites",
        )  # fmt: skip
        log.sign_tree_head(CLOCK0 + 2 * 10**6)
        with pytest.raises(AuditStateError, match="which failed"):
            log.append_evaluation(3, metrics={"accuracy": 0.8}, num_examples=100)
    finally:
        log.close()
    verify_log(built.path, coordinator_key=built.coordinator.public_key())


def test_the_verifier_refuses_an_evaluation_written_past_the_guard_rails(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", rounds=2, end_run=False)
    forged = Evaluation(
        built.run_id, 2, digest("a model nobody trained"), 10, (), (("accuracy", 999_999),)
    )
    with MerkleLogStore.open(built.path) as store:
        index = store.append(int(EntryKind.EVALUATION), encode_entry(forged), round=2)
    with pytest.raises(AuditVerificationError) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert (err.value.index, err.value.check) == (index, "model-chain")
    assert err.value.entry_type == "evaluation"


def test_show_and_report_give_each_rounds_evaluation_metrics(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", evaluations=True)
    result = runner.invoke(app, ["show", str(built.path)], env={"COLUMNS": "220"})
    assert result.exit_code == EXIT_OK, result.output
    rows = [line for line in result.output.splitlines() if "completed" in line]
    assert len(rows) == 3
    for rnd, row in enumerate(rows, 1):
        cells = [c.strip() for c in row.split("│")]
        acc, loss, f1, examples = cells[6:10]
        assert acc == f"{0.6 + 0.1 * rnd:.4f}" and loss == f"{1.5 / rnd:.4f}"
        assert f1 == f"{0.5 + 0.1 * rnd:.4f}" and examples == "2000"
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    out = tmp_path / "report.html"
    args = ["report", str(built.path), "--out", str(out), "--coordinator-key", str(pub)]
    assert runner.invoke(app, args).exit_code == EXIT_OK
    page = out.read_text()
    assert "<td>0.9000</td><td>0.5000</td><td>0.8000</td><td>2000</td>" in page
    assert "macro-f1" in page and "all checks hold against the pinned coordinator key" in page
