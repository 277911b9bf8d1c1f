"""The coordinator's one line per round names every sampled site that is not in the sum, and
why: refused (its policy), error (its error reply), rejected (a reply that failed verification)
or dropped (no reply); ``rounds.jsonl`` keeps the same under ``absent``. Through the real
ServerApp on the in-process grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseal.protocol.types import Packet, SiteId
from fedseal.server.rundir import MAX_ABSENT_NAMED, summary
from fedseal.sim.inmemory import Federation
from tests.server._fedgrid import PLAIN_REFUSAL, Federated

SITES = [f"site-{c}" for c in "abcdefg"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _round_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("fedseal: round ") and "/" in line.split()[2]]


def _corrupt_bulk(fed: Federation):  # type: ignore[no-untyped-def]
    """A masked vector changed after signing (its bulk digest no longer matches): rejected."""

    def tamper(site: SiteId, rnd: int, packet: Packet) -> Packet:
        bulk = np.array(packet.bulk, copy=True)
        bulk[0] ^= 1
        return Packet(packet.payload, bulk)

    return tamper


@pytest.mark.timeout(120)
def test_a_secure_round_names_each_missing_site_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, SITES, secure=True, rounds=1, min_sites=3,
        **{
            "site-b": {"error_at": (1, "train.secagg", "refused: this round's cohort is too small for my policy")},
            "site-d": {"error_at": (1, "train.secagg", "CUDA out of memory")},
            "site-f": {"tamper": _corrupt_bulk},
        },
    )  # fmt: skip
    fx.run(monkeypatch)
    [rec] = fx.rounds()
    assert rec["outcome"] == "committed" and rec["accepted"] == 4
    absent = rec["absent"]
    assert list(absent) == ["site-b", "site-d", "site-f"]
    assert absent["site-b"] == "refused: this round's cohort is too small for my policy"
    assert absent["site-d"] == "error: CUDA out of memory"
    assert absent["site-f"].startswith("rejected at masked-input: ") and "digest" in absent["site-f"]
    [line] = _round_lines(capsys.readouterr().out)
    assert line.startswith("fedseal: round 1/1: committed, sites 4/7")
    assert "; not in the sum: site-b (refused: this round's cohort" in line
    assert "site-d (error: CUDA out of memory); site-f (rejected at masked-input: " in line


@pytest.mark.timeout(120)
def test_a_plain_round_that_fails_names_the_refusing_sites_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, SITES[:3], secure=False, rounds=1,
        **{"site-b": {"refuse_plain": True}, "site-c": {"refuse_plain": True}},
    )  # fmt: skip
    fx.run(monkeypatch)
    [rec] = fx.rounds()
    assert rec["absent"] == {"site-b": PLAIN_REFUSAL, "site-c": PLAIN_REFUSAL}
    [line] = _round_lines(capsys.readouterr().out)
    assert line.count("site-b") == 1 and line.count("site-c") == 1
    assert f"not in the sum: site-b ({PLAIN_REFUSAL}); site-c ({PLAIN_REFUSAL})" in line


def test_a_round_with_many_missing_sites_names_the_first_and_counts_the_rest() -> None:
    absent = {f"site-{i:03d}": "dropped at masked-input: no reply before the stage closed" for i in range(20)}
    rec = {"outcome": "committed", "accepted": 80, "sampled": 100, "seconds": 1.0, "absent": absent}
    line = summary(3, 5, rec)
    assert line.count("(dropped at masked-input") == MAX_ABSENT_NAMED
    assert line.endswith(f"; and {20 - MAX_ABSENT_NAMED} more (rounds.jsonl)")
    assert "\n" not in line


@pytest.mark.timeout(120)
def test_a_run_whose_rounds_all_failed_fails_and_says_why_with_no_final_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fedseal.audit.auditor import verify_log
    from fedseal.crypto.keys import load_private_key
    from fedseal.server import rundir

    fx = Federated(
        tmp_path, SITES[:4], secure=True, rounds=1, min_sites=3,
        **{s: {"error_at": (1, "train.secagg", "refused: not today")} for s in SITES[1:3]},
    )  # fmt: skip
    fx.run(monkeypatch)
    [rec] = fx.rounds()
    assert rec["outcome"].startswith("abandoned (too few sites left: ")
    # The two that refused are named; the two that did their part are not blamed.
    assert rec["absent"] == {"site-b": "refused: not today", "site-c": "refused: not today"}
    status = json.loads((fx.cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text())
    assert status["phase"] == "failed" and "model" not in status
    assert status["reason"].startswith("no round committed; the last: round 1: abandoned (too few sites left: ")
    out = capsys.readouterr().out
    assert f"fedseal: the run failed: {status['reason']}" in out
    assert "final model" not in out
    verified = verify_log(
        fx.cfg.coordinator.state_dir / "audit.sqlite",
        coordinator_key=load_private_key(fx.cfg.coordinator.key, None).public_key(),
    )
    assert verified.runs[0][1] == "aborted"
