"""A site's error reply (a refusal of plain training, or any error) is reported by the real
ServerApp: one console line naming the enrolled site and its reason, the round's record in
``rounds.jsonl``, the metrics; the round goes on with the others if enough remain."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server._fedgrid import PLAIN_REFUSAL, Federated

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the task running in this process (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _console(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("fedseal: ")]


@pytest.mark.timeout(120)
def test_a_site_refusing_plain_training_is_named_and_the_round_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(tmp_path, SITES, secure=False, rounds=2, **{"site-b": {"refuse_plain": True}})
    fx.run(monkeypatch)
    for rec in fx.rounds():
        assert rec["outcome"] == "committed"
        assert rec["refused"] == {"site-b": PLAIN_REFUSAL}
        assert rec["sites"] == ["site-a", "site-c"] and rec["accepted"] == 2
    lines = _console(capsys.readouterr().out)
    for rnd in (1, 2):
        assert f"fedseal: round {rnd}: site-b {PLAIN_REFUSAL}" in lines
    assert not any("node" in line for line in lines if "refused" in line)  # named, not numbered
    assert fx.metric("fedseal_site_errors_total", {"site": "site-b", "kind": "refused"}) == 2
    assert fx.metric("fedseal_updates_rejected_total", {"reason": "site-refused"}) == 2
    assert fx.metric("fedseal_rounds_committed_total") == 2


@pytest.mark.timeout(120)
def test_too_few_sites_left_after_refusals_fails_the_round_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, SITES, secure=False, rounds=1,
        **{"site-b": {"refuse_plain": True}, "site-c": {"refuse_plain": True}},
    )  # fmt: skip
    fx.run(monkeypatch)
    [rec] = fx.rounds()
    assert rec["refused"] == {"site-b": PLAIN_REFUSAL, "site-c": PLAIN_REFUSAL}
    assert rec["outcome"] == (
        "failed (too few valid updates: 1 of 3 sites sent one, run.min_sites = 2; "
        "model unchanged)"  # the line names each absent site and why (test_round_summary)
    )
    assert rec["failure_kind"] == "too-few-valid-updates"
    lines = _console(capsys.readouterr().out)
    # One line per refusing site as it answers, and the round's line naming both.
    assert sum(line.startswith("fedseal: round 1: site-") and "refused: plain training is disabled" in line
               for line in lines) == 2
    assert any(
        line.startswith("fedseal: round 1/1: failed (too few valid updates") for line in lines
    )
    assert fx.metric("fedseal_rounds_abandoned_total", {"reason": "too-few-valid-updates"}) == 1
    assert fx.metric("fedseal_rounds_failed_total") == 1


@pytest.mark.timeout(120)
def test_an_error_reply_in_a_secure_round_is_reported_and_the_round_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "refused: this site\ndoes not \x1b[31mtrust\x1b[0m round 1"
    sites = ["site-a", "site-b", "site-c", "site-d"]
    fx = Federated(
        tmp_path, sites, secure=True, rounds=1, min_sites=3,
        **{"site-d": {"error_at": (1, "train.secagg", reason)}},
    )  # fmt: skip
    fx.run(monkeypatch)
    [rec] = fx.rounds()
    clean = "refused: this site does not [31mtrust [0m round 1"  # one printable line
    assert rec["refused"] == {"site-d": clean}
    assert rec["outcome"] == "committed" and rec["sites"] == ["site-a", "site-b", "site-c"]
    lines = _console(capsys.readouterr().out)
    assert f"fedseal: round 1: site-d {clean}" in lines
    assert fx.metric("fedseal_site_errors_total", {"site": "site-d", "kind": "refused"}) == 1


@pytest.mark.timeout(120)
def test_any_other_error_reply_is_recorded_apart_from_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    error = "ValueError: config 'epochs' out of range"
    fx = Federated(
        tmp_path, SITES, secure=False, rounds=1, **{"site-a": {"error_at": (1, "train", error)}}
    )
    fx.run(monkeypatch)
    [rec] = fx.rounds()
    assert rec["site_errors"] == {"site-a": error} and "refused" not in rec
    assert rec["outcome"] == "committed" and rec["sites"] == ["site-b", "site-c"]
    assert f"fedseal: round 1: site-a answered train with an error: {error}" in _console(
        capsys.readouterr().out
    )
    assert fx.metric("fedseal_site_errors_total", {"site": "site-a", "kind": "error"}) == 1
    assert fx.metric("fedseal_updates_rejected_total", {"reason": "site-error"}) == 1


@pytest.mark.timeout(120)
def test_a_site_withholding_its_evaluation_is_named_and_the_others_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "refused: evaluation: this site cannot tie the model to the coordinator's signed log"
    fx = Federated(
        tmp_path, SITES, secure=False, rounds=1, **{"site-b": {"withhold_evaluation": reason}}
    )
    fx.run(monkeypatch)
    (rec,) = fx.rounds()
    assert rec["outcome"] == "committed" and rec["refused"] == {"site-b": reason}
    assert "accuracy" in rec  # the other sites' evaluation
    assert f"fedseal: round 1: site-b {reason}" in _console(capsys.readouterr().out)
