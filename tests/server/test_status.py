"""``fl-server status``: the sites (enrolment, dataset roots, node, online and last seen, floor) and
the run, before any run, during one (a stand-in SuperLink) and after it; and the live source's
answer when no coordinator runs."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedseal.crypto.keys import generate_identity_key
from fedseal.server.config import ServerConfig, load_server_config
from fedseal.server.roster import Enrolment
from fedseal.server.rundir import NODES_FILE, ROUNDS_FILE, append_round, write_status
from fedseal.server.site_floors import SiteFloor, write_floors
from fedseal.server.status import (
    NOT_RUNNING,
    CoordinatorStatus,
    NodeSeen,
    SuperLinkUnavailable,
    collect_status,
    render,
    superlink_nodes,
)
from fedseal.sim.commands import app

runner = CliRunner()
ROOT_A, ROOT_A2, ROOT_B, ROOT_C = ("a1" * 32, "a2" * 32, "b1" * 32, "c1" * 32)


def _not_running(_state: Path) -> Mapping[int, NodeSeen]:
    raise SuperLinkUnavailable(NOT_RUNNING)


@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    assert runner.invoke(app, ["init", str(tmp_path / "coord")]).exit_code == 0
    cfg = load_server_config(tmp_path / "coord" / "server.toml")
    roster = Enrolment()
    for name, roots in (("site-a", [ROOT_A, ROOT_A2]), ("site-b", [ROOT_B]), ("site-c", [ROOT_C])):
        roster = roster.enroll(name, generate_identity_key().public_key(), roots, now_ms=1_000)
    roster = roster.withdraw_root("site-a", ROOT_A2, reason="erasure request 7", now_ms=2_000)
    roster = roster.revoke("site-c", reason="left the consortium", now_ms=3_000)
    roster.save(cfg.coordinator.roster)
    return cfg


def _text(st: CoordinatorStatus, now: float) -> str:
    header, table = render(st, now=now)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    for line in header:
        console.print(line, soft_wrap=True, markup=False)
    console.print(table)
    return console.export_text()


def test_before_any_run_status_lists_the_enrolled_sites_and_says_no_run_and_no_coordinator(
    cfg: ServerConfig,
) -> None:
    assert not cfg.coordinator.state_dir.exists()
    st = collect_status(cfg, live=_not_running)
    assert (
        st.running is False
        and st.detail == NOT_RUNNING
        and st.run is None
        and st.floors_asked_at is None
    )
    by = {s.site: s for s in st.sites}
    assert list(by) == ["site-a", "site-b", "site-c"]
    assert by["site-a"].enrolment == "active" and by["site-a"].dataset_roots == (ROOT_A,)
    assert by["site-a"].withdrawn_roots == 1
    assert (by["site-c"].enrolment, by["site-c"].revoke_reason) == (
        "revoked",
        "left the consortium",
    )
    assert all(s.online is None and s.node_id is None and s.floor is None for s in st.sites)
    text = _text(st, time.time())
    assert "no run started yet" in text and "coordinator not running" in text
    assert "revoked: left the consortium" in text and "(1 withdrawn)" in text


def test_during_a_run_each_site_shows_its_node_online_state_last_seen_floor_and_the_round(
    cfg: ServerConfig,
) -> None:
    state = cfg.coordinator.state_dir
    state.mkdir(parents=True)
    (state / NODES_FILE).write_text(json.dumps({"11": "site-a", "22": "site-b", "33": "site-c"}))
    write_floors(
        state, {"site-a": SiteFloor(3, False, False), "site-b": SiteFloor(4, True, True)}, now=500.0
    )
    write_status(
        state, secure=True, phase="training", round=2, run_id="ab" * 16, stage="share-keys"
    )
    append_round(state / ROUNDS_FILE, {"round": 1, "outcome": "committed"})
    live = {11: NodeSeen(11, "online", 990.0), 22: NodeSeen(22, "offline", 700.0)}
    st = collect_status(cfg, live=lambda _s: live)
    by = {s.site: s for s in st.sites}
    assert st.running is True and "2 node(s)" in st.detail
    assert (by["site-a"].node_id, by["site-a"].online, by["site-a"].last_seen) == (11, True, 990.0)
    assert (by["site-b"].online, by["site-b"].node_status, by["site-b"].last_seen) == (
        False,
        "offline",
        700.0,
    )
    assert (by["site-c"].node_id, by["site-c"].online, by["site-c"].node_status) == (
        33,
        False,
        None,
    )
    assert by["site-a"].floor == SiteFloor(3, False, False) and by["site-b"].floor == SiteFloor(
        4, True, True
    )
    assert by["site-c"].floor is None
    assert st.run is not None
    assert (st.run.phase, st.run.round, st.run.rounds, st.run.stage) == (
        "training",
        2,
        cfg.run.rounds,
        "share-keys",
    )
    assert (st.run.rounds_recorded, st.run.rounds_committed) == (1, 1)
    text = _text(st, 1000.0)
    assert f"run: training, round 2/{cfg.run.rounds} (share-keys)" in text
    assert "online, last seen 1970-01-01 00:16:30 UTC (10 s ago)" in text
    assert "no: offline, last seen 1970-01-01 00:11:40 UTC (5 min ago)" in text
    assert "cohort >= 4" in text and "not reported" in text
    doc = st.to_json()
    assert doc["sites"][0]["last_seen"] == "1970-01-01T00:16:30+00:00"
    assert doc["sites"][1]["floor"] == {"min_cohort": 4, "allow_plain": True, "dp_required": True}
    assert doc["floors_asked_at"] == "1970-01-01T00:08:20+00:00"


def test_after_a_finished_run_status_shows_the_end_and_the_floors_without_a_coordinator(
    cfg: ServerConfig,
) -> None:
    state = cfg.coordinator.state_dir
    state.mkdir(parents=True)
    write_floors(state, {"site-a": SiteFloor(3, False, False)}, now=500.0)
    write_status(
        state,
        secure=True,
        phase="finished",
        round=5,
        run_id="cd" * 16,
        model="m.npz",
        audit_log="a.sqlite",
    )
    for r in range(1, 6):
        append_round(
            state / ROUNDS_FILE, {"round": r, "outcome": "committed" if r != 3 else "failed"}
        )
    st = collect_status(cfg, live=_not_running)
    assert st.run is not None and (st.run.phase, st.run.round) == ("finished", 5)
    assert (st.run.rounds_recorded, st.run.rounds_committed, st.run.model) == (5, 4, "m.npz")
    assert st.sites[0].floor == SiteFloor(3, False, False) and st.sites[0].online is None
    assert "run: finished, round 5/5; 4 of 5 recorded round(s) committed" in _text(st, time.time())


def test_a_run_left_mid_round_without_a_coordinator_is_reported_interrupted(
    cfg: ServerConfig,
) -> None:
    state = cfg.coordinator.state_dir
    state.mkdir(parents=True)
    write_status(state, secure=True, phase="training", round=3)
    st = collect_status(cfg, live=_not_running)
    assert st.run is not None and st.run.phase == "interrupted" and st.run.round == 3
    assert "fl-server run --resume (or fl-server submit --resume) continues it" in _text(st, time.time())


def test_a_failed_run_shows_its_reason(cfg: ServerConfig) -> None:
    cfg.coordinator.state_dir.mkdir(parents=True)
    write_status(
        cfg.coordinator.state_dir,
        secure=True,
        phase="failed",
        reason="only 1 enrolled sites online",
    )
    st = collect_status(cfg, live=_not_running)
    assert st.run is not None and st.run.reason == "only 1 enrolled sites online"
    assert "run: failed" in _text(st, time.time())


def test_an_unreadable_state_file_is_reported_not_fatal(cfg: ServerConfig) -> None:
    state = cfg.coordinator.state_dir
    state.mkdir(parents=True)
    (state / "status.json").write_text("{not json")
    (state / NODES_FILE).write_text("[")
    st = collect_status(cfg, live=_not_running)
    assert (
        st.run is None
        and len(st.problems) == 2
        and "status.json: unreadable" in st.problems[0] + st.problems[1]
    )


def test_a_superlink_that_cannot_be_asked_leaves_online_unknown_but_the_coordinator_running(
    cfg: ServerConfig,
) -> None:
    def refused(_state: Path) -> Mapping[int, NodeSeen]:
        raise SuperLinkUnavailable("the SuperLink did not answer", running=True)

    cfg.coordinator.state_dir.mkdir(parents=True)
    write_status(cfg.coordinator.state_dir, secure=True, phase="training", round=1)
    st = collect_status(cfg, live=refused)
    assert (
        st.running is True and st.run is not None and st.run.phase == "training"
    )  # not "interrupted"
    assert all(s.online is None for s in st.sites)


def test_superlink_nodes_says_not_running_without_a_socket_and_with_a_stale_one(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    with pytest.raises(SuperLinkUnavailable, match=NOT_RUNNING) as no_socket:
        superlink_nodes(state)
    assert no_socket.value.running is False
    path = state / "control" / "superlink.sock"
    path.parent.mkdir(parents=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # what a SIGKILLed SuperLink leaves: the socket file, nobody listening
    with pytest.raises(SuperLinkUnavailable, match=NOT_RUNNING):
        superlink_nodes(state)


def test_status_command_prints_json_and_a_table_and_refuses_an_unknown_config(
    cfg: ServerConfig, tmp_path: Path
) -> None:
    res = runner.invoke(app, ["status", "--config", str(cfg.path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["coordinator"] == {"running": False, "detail": NOT_RUNNING} and doc["run"] is None
    assert [s["site"] for s in doc["sites"]] == ["site-a", "site-b", "site-c"]
    res = runner.invoke(app, ["status", "--config", str(cfg.path)])
    assert res.exit_code == 0 and "no run started yet" in res.stdout and "site-b" in res.stdout
    res = runner.invoke(app, ["status", "--config", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "missing.toml" in res.output
