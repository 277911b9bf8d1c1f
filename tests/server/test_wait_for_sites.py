"""A run's start waits for every enrolled site, but not for one that is off for good: once
``run.min_sites`` are online the others get a grace, and the run starts without them, naming
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.crypto.keys import generate_identity_key
from fedseal.server import rundir
from fedseal.server.cli import init as init_cmd
from fedseal.server.cli import write_server_toml
from fedseal.server.config import load_server_config
from fedseal.server.roster import Enrolment


class FakeClock:
    """``time`` as rundir uses it: sleeping advances the clock, nothing really waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(rundir, "time", fake)
    return fake


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _run(tmp_path: Path, online: list[int]) -> rundir.Run:
    init_cmd(tmp_path / "coord", san=["localhost"], passphrase_env=None)
    path = tmp_path / "coord" / "server.toml"
    write_server_toml(path, metrics_port=0, audit_port=0)
    cfg = load_server_config(path)
    roster = Enrolment.load_or_create(cfg.coordinator.roster)
    for name in ("site-a", "site-b", "site-c", "site-d"):
        roster = roster.enroll(name, generate_identity_key().public_key(), ["ab" * 32], now_ms=1)
    roster.save(cfg.coordinator.roster)
    cfg.coordinator.state_dir.mkdir(parents=True)
    (cfg.coordinator.state_dir / rundir.NODES_FILE).write_text('{"1": "site-a", "2": "site-b", "3": "site-c", "4": "site-d"}')
    return rundir.Run(Grid(online), cfg)  # type: ignore[arg-type]


def test_with_min_sites_online_the_start_waits_only_a_grace_for_the_rest(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, [1, 2, 3])
    t0 = clock.now
    assert run.wait_for_sites(3, timeout=120.0, want_all=True) == [1, 2, 3]
    assert rundir.WANT_ALL_GRACE_S <= clock.now - t0 < rundir.WANT_ALL_GRACE_S + 1  # not 120 s


def test_with_every_enrolled_site_online_the_start_does_not_wait(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, [1, 2, 3, 4])
    t0 = clock.now
    assert run.wait_for_sites(3, timeout=120.0, want_all=True) == [1, 2, 3, 4]
    assert clock.now == t0


def test_below_min_sites_the_start_waits_to_the_deadline(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, [1, 2])
    t0 = clock.now
    assert run.wait_for_sites(3, timeout=120.0, want_all=True) == [1, 2]
    assert clock.now - t0 >= 120.0


def test_a_site_joining_late_inside_the_grace_is_waited_for(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, [1, 2, 3])
    grid = run.grid
    real_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        if clock.now - 1000.0 >= rundir.WANT_ALL_GRACE_S / 2:
            grid.nodes = [1, 2, 3, 4]  # type: ignore[attr-defined]

    clock.sleep = sleep  # type: ignore[method-assign]
    assert run.wait_for_sites(3, timeout=120.0, want_all=True) == [1, 2, 3, 4]
