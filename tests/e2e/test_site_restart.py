"""A site killed with ``kill -9`` and restarted at once rejoins: real fl-server and fl-client
processes over TLS on loopback.

Flower's SuperLink keeps the killed site's node ONLINE for up to 60 s (2 x its 30 s heartbeat
interval) and refused the restarted site's activation meanwhile, which the site reported as "the
coordinator refused this site's key (not enrolled, or revoked)". The restarted site now ends
that stale session itself (a signed ``DeactivateNode`` for the node id it recorded), rejoins
under the same node id well inside the window, and is counted in the run's round.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedseal.sim.demo import Federation, prepare_federation, start_site

from .conftest import BIN, Procs, read_rounds, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def _logs(fed: Federation) -> str:
    parts = [f"--- fl-server.log ---\n{tail(fed.workdir / 'fl-server.log')}"]
    for s in fed.sites:
        parts.append(f"--- {s.name}/fl-client.log ---\n{tail(s / 'fl-client.log', 2000)}")
        parts.append(f"--- {s.name}/supernode.log ---\n{tail(s / 'state' / 'supernode.log', 1500)}")
    return "\n".join(parts)


def _node_ids(site: Path) -> list[int]:
    text = (
        (site / "state" / "supernode.log").read_text(errors="replace")
        if (site / "state" / "supernode.log").exists()
        else ""
    )
    return [int(n) for n in NODE_ID.findall(text)]


@pytest.mark.timeout(300)
def test_a_site_killed_and_restarted_inside_the_session_window_rejoins_and_is_counted(
    tmp_path: Path, procs: Procs
) -> None:
    fed = prepare_federation(
        tmp_path / "fed",
        num_sites=3,
        run_overrides={
            "rounds": 1,
            "min_sites": 3,
            "threshold": 2,
            "stage_timeout_s": 20.0,
            "sites_wait_timeout_s": 180.0,
        },
    )
    state = fed.server_toml.parent / "state"
    coordinator = procs.start(
        [str(BIN / "fl-server"), "run", "--config", str(fed.server_toml)],
        fed.workdir / "fl-server.log",
    )

    def gateway_up() -> bool:
        assert coordinator.poll() is None, tail(fed.workdir / "fl-server.log")
        try:
            with socket.create_connection(("127.0.0.1", fed.fleet_port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(gateway_up, 120, "the fleet gateway")
    site0 = fed.sites[0]
    first = procs.add(start_site(site0))
    wait_for(
        lambda: len(_node_ids(site0)) == 1,
        120,
        "site-0's SuperNode to connect",
        diagnose=lambda: _logs(fed),
    )
    [node_id] = _node_ids(site0)

    procs.kill(first, signal.SIGKILL)  # no sign-off: the coordinator still holds the session
    killed = time.monotonic()
    restarted = procs.add(start_site(site0))
    wait_for(
        lambda: len(_node_ids(site0)) == 2,
        55,
        "the restarted site to rejoin",
        diagnose=lambda: _logs(fed),
    )
    rejoined_after = time.monotonic() - killed
    assert rejoined_after < 60, (
        f"rejoined {rejoined_after:.0f} s after the kill: not inside the window"
    )
    assert _node_ids(site0) == [node_id, node_id]  # the same node: the coordinator counts it again
    log = (site0 / "fl-client.log").read_text(errors="replace")
    assert f"ended this site's previous session (node {node_id})" in log, _logs(fed)
    assert "refused this site's key" not in log and "revoked" not in log

    # The run's one round (it waits for 3 sites) counts the restarted site.
    for s in fed.sites[1:]:
        procs.add(start_site(s))
    try:
        coordinator.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the coordinator did not finish its round\n" + _logs(fed))
    assert coordinator.returncode == 0, _logs(fed)
    [round1] = read_rounds(state)
    assert round1["outcome"] == "committed" and round1["accepted"] == 3, round1
    assert "site-0" in list(round1["sites"])  # type: ignore[call-overload]
    assert restarted.poll() is None, tail(site0 / "fl-client.log")  # still serving
