"""A run no site would join is refused at its start, in one line naming the setting on both
sides and why it exists (issue 18.3: a two-site pilot on the defaults used to run round after
round that both sites refused, "sites 0/2"). Through the real ServerApp on the in-process grid;
the sites report their floor as the ClientApp's ``query.policy`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseal.server import flower_app, rundir
from fedseal.server.config import load_server_config
from fedseal.server.site_floors import SiteFloor, read_floors, refusal
from tests.server._fedgrid import Federated

DEFAULT_FLOOR = (3, False, False)  # a site's defaults: min_cohort 3, no plain, DP off


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _refused(fx: Federated, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(flower_app.CoordinatorError) as err:
        fx.run(monkeypatch)
    status = json.loads((fx.cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text())
    assert status["phase"] == "failed"
    assert not (fx.cfg.coordinator.state_dir / rundir.ROUNDS_FILE).exists()  # no round ran
    assert [kind for _, kind in fx.grid.sent if not kind.startswith("query.policy")] == []
    line = f"fedseal: refusing to start the run: {err.value}"
    assert line in capsys.readouterr().out
    return str(err.value)


@pytest.mark.timeout(60)
def test_a_two_site_pilot_on_the_defaults_is_refused_naming_min_cohort_and_min_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, ["site-a", "site-b"], secure=True, rounds=2, min_sites=2,
        **{s: {"floor": DEFAULT_FLOOR} for s in ("site-a", "site-b")},
    )  # fmt: skip
    message = _refused(fx, monkeypatch, capsys)
    assert message.startswith("no round can run: 0 of 2 online sites would join (run.min_sites = 2 in server.toml): ")
    assert "site-a, site-b join only secure rounds of at least 3 sites ([privacy] min_cohort in client.toml" in message
    assert "with two sites each learns the other's update from the sum" in message


@pytest.mark.timeout(60)
def test_a_plain_run_with_sites_that_refuse_plain_training_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = ["site-a", "site-b", "site-c"]
    fx = Federated(tmp_path, sites, secure=False, rounds=1, min_sites=2, **{s: {"floor": DEFAULT_FLOOR} for s in sites})
    message = _refused(fx, monkeypatch, capsys)
    assert "site-a, site-b, site-c refuse plain training ([privacy] allow_plain = false" in message
    assert message.endswith("and run.secure = false")


@pytest.mark.timeout(60)
def test_sites_requiring_dp_refuse_a_run_without_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = ["site-a", "site-b", "site-c"]
    fx = Federated(tmp_path, sites, secure=True, rounds=1, min_sites=3, **{s: {"floor": (3, False, True)} for s in sites})
    message = _refused(fx, monkeypatch, capsys)
    assert 'site-a, site-b, site-c require distributed DP ([privacy] dp = "required"' in message


@pytest.mark.timeout(60)
def test_enough_willing_sites_start_the_run_and_silent_sites_decide_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = ["site-a", "site-b", "site-c", "site-d"]
    # site-d wants a cohort of 5 (4 online); site-c reports nothing (an older build): 3 willing.
    options = {"site-a": {"floor": DEFAULT_FLOOR}, "site-b": {"floor": DEFAULT_FLOOR}, "site-d": {"floor": (5, False, False)}}
    fx = Federated(tmp_path, sites, secure=True, rounds=1, min_sites=3, **options)
    fx.run(monkeypatch)
    assert [r["outcome"] for r in fx.rounds()] == ["committed"]
    asked_at, floors = read_floors(fx.cfg.coordinator.state_dir)  # what fl-server status shows
    assert asked_at is not None and sorted(floors) == ["site-a", "site-b", "site-d"]
    assert floors["site-d"] == SiteFloor(5, False, False)


def test_the_refusal_counts_only_the_sites_a_setting_excludes(tmp_path: Path) -> None:
    fx = Federated(tmp_path, ["site-a", "site-b", "site-c"], secure=True, rounds=1, min_sites=2)
    cfg = load_server_config(fx.cfg.path)
    ok, big = SiteFloor(3, False, False), SiteFloor(4, False, False)
    assert refusal(cfg, {"site-a": ok, "site-b": ok, "site-c": big}, online=3) is None
    message = refusal(cfg, {"site-a": big, "site-b": big, "site-c": ok}, online=3)
    assert message is not None and message.startswith("no round can run: 1 of 3 online sites")
    assert "site-a, site-b join only secure rounds of at least 4 sites" in message
