"""The coordinator asks a few sites at a time for the run's initial model; when none returns
one, the run fails naming every site asked and why (it used to say only "no site returned an
initial model", the reason hidden in the sites' logs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseal.server import flower_app, rundir
from tests.server._fedgrid import Federated

SITES = ["site-a", "site-b", "site-c", "site-d"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.timeout(120)
def test_a_run_whose_sites_all_fail_the_initial_model_names_each_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, SITES, secure=False, rounds=1,
        **{s: {"error_at": (0, "query.initial_model", f"model 'mlp' is not installed at {s}")} for s in SITES},
    )  # fmt: skip
    with pytest.raises(flower_app.CoordinatorError) as err:
        fx.run(monkeypatch)
    message = str(err.value)
    assert message.startswith("no site returned an initial model (site-a: error reply: model 'mlp'")
    assert all(f"{s}: error reply: model 'mlp' is not installed at {s}" in message for s in SITES)
    status = json.loads((fx.cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text())
    assert status["phase"] == "failed" and "site-d: error reply" in status["reason"]
    # Asked three at a time: the fourth site only after the first three failed.
    asked = [node for node, kind in fx.grid.sent if kind == "query.initial_model"]
    assert len(asked) == 4


@pytest.mark.timeout(120)
def test_one_failing_site_does_not_stop_the_run_from_getting_its_initial_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(
        tmp_path, SITES, secure=False, rounds=1,
        **{"site-a": {"error_at": (0, "query.initial_model", "disk full")}},
    )  # fmt: skip
    fx.run(monkeypatch)
    assert [r["outcome"] for r in fx.rounds()] == ["committed"]
