"""A long-running coordinator serves several runs without restarting: real ``fl-server serve``
and ``fl-client run`` processes over TLS on loopback (issue 18.6).

One coordinator and three sites stay up while run 1 completes, run 2 is followed with
``fl-server logs 2 --follow`` and stopped after its first round with ``fl-server stop``, and run 3,
queued behind it, is cancelled; the metrics endpoint answers between runs with counters over all
of them; ``fl-server runs`` says how each ended; SIGTERM ends the coordinator; the audit log of
the two runs verifies.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from fedseal.sim.demo import Federation, free_port, prepare_federation, start_site

from .conftest import BIN, Procs, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fl-server"), *args], capture_output=True, text=True, timeout=60, check=False)


def _runs(config: Path) -> dict[int, dict[str, object]]:
    out = _cli("runs", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    return {int(r["id"]): r for r in json.loads(out.stdout)["runs"]}


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
        text = res.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return None if m is None else float(m.group(1))


def _logs(fed: Federation) -> str:
    parts = [f"--- fl-server.log ---\n{tail(fed.workdir / 'fl-server.log', 5000)}"]
    parts += [f"--- {s.name} ---\n{tail(s / 'fl-client.log', 1500)}" for s in fed.sites]
    return "\n".join(parts)


def _run_config(fed: Federation, name: str, rounds: int) -> Path:
    """A run's own configuration: the serving server.toml with another [run] rounds."""
    text = re.sub(r"^rounds = \d+$", f"rounds = {rounds}", fed.server_toml.read_text(), count=1, flags=re.MULTILINE)
    path = fed.server_toml.with_name(name)
    path.write_text(text)
    return path


@pytest.mark.timeout(420)
def test_one_coordinator_serves_three_runs_and_its_operator_follows_stops_and_lists_them(
    tmp_path: Path, procs: Procs
) -> None:
    fed = prepare_federation(
        tmp_path / "fed", num_sites=3,
        run_overrides={"rounds": 1, "min_sites": 3, "stage_timeout_s": 30.0, "sites_wait_timeout_s": 120.0},
    )  # fmt: skip
    metrics_port = free_port()
    toml = fed.server_toml.read_text().replace("metrics_port = 0", f"metrics_port = {metrics_port}")
    fed.server_toml.write_text(toml)
    config = str(fed.server_toml)
    server = procs.start([str(BIN / "fl-server"), "serve", "--config", config], fed.workdir / "fl-server.log")
    for site in fed.sites:
        procs.add(start_site(site))

    submitted = _cli("submit", "--config", config)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("run 1 queued; follow it: fl-server logs 1 --follow"), submitted.stdout
    wait_for(lambda: _runs(fed.server_toml)[1]["status"] not in ("queued", "running"), 240, "run 1 to end",
             interval=1.0, diagnose=lambda: _logs(fed))
    assert _runs(fed.server_toml)[1]["status"] == "completed", _logs(fed)

    # Between runs: the coordinator is up, and so is its metrics endpoint.
    assert server.poll() is None, _logs(fed)
    status = _cli("status", "--config", config)
    assert f"runs: served by pid {server.pid}; last ended: run 1 completed" in status.stdout, status
    assert _metric(metrics_port, "fedseal_rounds_committed_total") == 1.0
    assert _metric(metrics_port, 'fedseal_runs_ended_total{status="completed"}') == 1.0
    assert _metric(metrics_port, "fedseal_run_active") == 0.0

    # Run 2 (3 rounds), followed; run 3 queued behind it.
    assert _cli("submit", "--config", str(_run_config(fed, "run2.toml", 3))).returncode == 0
    follow = subprocess.Popen(
        [str(BIN / "fl-server"), "logs", "2", "--follow", "--config", config],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    queued = _cli("submit", "--config", config)
    assert queued.stdout.startswith("run 3 queued after run(s) 2;"), queued.stdout
    wait_for(lambda: int(str(_runs(fed.server_toml)[2]["rounds_committed"])) >= 1, 240,
             "run 2's first round", interval=1.0, diagnose=lambda: _logs(fed))
    stopped = _cli("stop", "2", "--reason", "site-1 asked for a pause", "--config", config)
    assert stopped.returncode == 0 and "stops after its round in progress" in stopped.stdout, stopped
    cancelled = _cli("stop", "3", "--config", config)
    assert cancelled.returncode == 0 and "will not start" in cancelled.stdout, cancelled
    out, _ = follow.communicate(timeout=240)
    assert follow.returncode == 1, out  # followed to an end other than completed
    assert re.search(r"^round 1: committed  sites 3/3", out, re.MULTILINE), out
    assert "run 2 stopped (site-1 asked for a pause); final model " in out, out
    wait_for(lambda: _runs(fed.server_toml)[3]["status"] == "cancelled", 30, "run 3 to be cancelled",
             diagnose=lambda: _logs(fed))

    runs = _runs(fed.server_toml)
    assert [runs[i]["status"] for i in (1, 2, 3)] == ["completed", "stopped", "cancelled"]
    assert 1 <= int(str(runs[2]["rounds_committed"])) < 3 and runs[2]["rounds_planned"] == 3
    assert _metric(metrics_port, 'fedseal_runs_ended_total{status="stopped"}') == 1.0
    assert (_metric(metrics_port, "fedseal_rounds_committed_total") or 0) >= 2.0
    listed = _cli("runs", "--config", config)
    assert "site-1 asked for a pause" in listed.stdout, listed.stdout

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, _logs(fed)
    assert "coordinator stopped" in tail(fed.workdir / "fl-server.log", 2000)
    assert "run 2 stopped (site-1 asked for a pause)" in tail(fed.workdir / "fl-server.log", 20000)

    pub = fed.server_toml.parent / "coordinator.pub"
    audit = fed.server_toml.parent / "state" / "audit.sqlite"
    verified = subprocess.run(
        [str(BIN / "fl-audit"), "verify", str(audit), "--coordinator-key", str(pub)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    logged = re.findall(r"^  run [0-9a-f]{32}: completed, (\d+) rounds completed, 0 failed$", verified.stdout, re.MULTILINE)
    assert logged == ["1", str(runs[2]["rounds_committed"])], verified.stdout  # the stopped run's end is logged
