"""From ``fl-server provision`` to a finished run, the way a new consortium gets there (issue 18.6),
with real ``fl-server`` / ``fl-client`` processes over TLS on loopback: the coordinator writes the
kits, each site runs its kit's ``start.sh --request`` (its own key, its dataset root from MNIST-5k's
split, the enrolment request), the roster authority adds the sites' keys, the coordinator applies
each site's enrolment command as printed, the sites start with ``start.sh``, one secure round runs,
and ``fl-server status`` shows the sites online during the run (the SuperLink's Control API) and
their floors and the finished run after it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedseal.server.cli import write_server_toml
from fedseal.sim.demo import free_port

from .conftest import BIN, Procs, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 120) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _status(server_toml: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        _run([str(BIN / "fl-server"), "status", "--config", str(server_toml), "--json"])
    )
    return doc


@pytest.mark.timeout(240)
def test_provisioned_kits_take_three_sites_from_enrolment_to_a_finished_secure_round(
    tmp_path: Path, procs: Procs
) -> None:
    fl_server, fl_client = str(BIN / "fl-server"), str(BIN / "fl-client")
    coord = tmp_path / "coordinator"
    _run([fl_server, "init", str(coord), "--san", "localhost", "--san", "127.0.0.1"])
    server_toml = coord / "server.toml"
    fleet_port = free_port()
    write_server_toml(
        server_toml, fleet_port=fleet_port, internal_port=free_port(), metrics_port=0,
        fleet_host="127.0.0.1", audit_host="127.0.0.1", audit_port=free_port(),
        run_overrides={"rounds": 1, "min_sites": 3, "sites_wait_timeout_s": 60.0, "stage_timeout_s": 60.0},
    )  # fmt: skip
    authority = tmp_path / "authority"
    authority.mkdir()
    _run([fl_client, "roster", "authority-init", "--out", str(authority / "authority.key")])
    roster = authority / "roster.json"
    _run([fl_client, "roster", "create", "--authority-key", str(authority / "authority.key"),
          "--consortium", "pilot", "--out", str(roster)])  # fmt: skip

    # The coordinator provisions one kit per site.
    kits = tmp_path / "kits"
    _run([fl_server, "provision", "--config", str(server_toml), *(a for s in SITES for a in ("--site", s)),
          "--address", "localhost", "--roster", str(roster),
          "--roster-authority", str(authority / "authority.key.pub"), "--out", str(kits)])  # fmt: skip
    before = _status(server_toml)
    assert before["run"] is None and before["sites"] == []
    assert before["coordinator"] == {"running": False, "detail": "coordinator not running"}

    # Each site: its dataset (MNIST-5k split as the demo does) in the kit's data/, its own
    # Runtime API port (three sites share this host), then `start.sh --request`.
    split = json.loads(_run([fl_client, "data", "split", "mnist-5k", str(tmp_path / "split"), "--sites", "3",
                             "--seed", "1", "--json"]))["sites"]  # fmt: skip
    requests: dict[str, str] = {}
    for site, part in zip(SITES, split, strict=True):
        kit = kits / site
        shutil.move(part["dir"], kit / "data")
        toml = kit / "client.toml"
        toml.write_text(re.sub(r"(?m)^port = \d+", f"port = {free_port()}", toml.read_text()))
        out = _run(["sh", str(kit / "start.sh"), "--request"])
        assert f"dataset root  {part['root']}" in out
        requests[site] = (kit / "enrolment-request.txt").read_text()
        assert "PRIVATE" not in requests[site]

    # The roster authority adds every site's key; the new roster goes to every kit.
    for site in SITES:
        _run([fl_client, "roster", "add", "--roster", str(roster), "--authority-key", str(authority / "authority.key"),
              "--site", site, "--key", str(kits / site / "site.key.pub")])  # fmt: skip
    for site in SITES:
        shutil.copyfile(roster, kits / site / "consortium-roster.json")

    # The coordinator saves each request's public key as SITE.pub and runs the command it names.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for site, text in requests.items():
        pem = text[text.index("-----BEGIN PUBLIC KEY-----") :]
        (inbox / f"{site}.pub").write_text(pem)
        command = next(
            line.strip()
            for line in text.splitlines()
            if line.strip().startswith("fl-server enroll")
        )
        argv = shlex.split(command)
        assert argv[argv.index("--config") + 1] == str(server_toml)
        _run([fl_server, *argv[1:]], cwd=inbox)
    enrolled = _status(server_toml)
    assert [(s["site"], s["enrolment"], s["online"]) for s in enrolled["sites"]] == [
        (s, "active", None) for s in SITES
    ]
    assert enrolled["run"] is None

    # The sites start with their kit's start.sh; the coordinator runs one secure round.
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for site in SITES:
        with (kits / site / "site.log").open("ab") as log:
            procs.add(subprocess.Popen(["sh", str(kits / site / "start.sh")], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True))  # fmt: skip
    server_log = tmp_path / "fl-server.log"
    coordinator = procs.start([fl_server, "run", "--config", str(server_toml)], server_log)

    def logs() -> str:
        return "\n".join(
            [f"--- fl-server.log ---\n{tail(server_log)}"]
            + [f"--- {s}/site.log ---\n{tail(kits / s / 'site.log', 1500)}" for s in SITES]
        )

    # While the run goes on, status asks the SuperLink: every site online, just seen.
    seen_online: list[dict[str, Any]] = []

    def all_online() -> bool:
        assert coordinator.poll() is None or seen_online, logs()
        doc = _status(server_toml)
        if doc["coordinator"]["running"] and all(s["online"] for s in doc["sites"]):
            seen_online.append(doc)
            return True
        return False

    wait_for(
        all_online,
        90,
        "fl-server status to show all three sites online",
        interval=1.0,
        diagnose=logs,
    )
    during = seen_online[-1]
    assert all(s["node_id"] is not None and s["last_seen"] for s in during["sites"]), during
    assert re.match(r"running: \d+ node\(s\)", during["coordinator"]["detail"])

    try:
        code = coordinator.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the coordinator did not finish the round\n" + logs())
    assert code == 0, logs()

    after = _status(server_toml)
    assert after["coordinator"]["running"] is False
    assert after["run"]["phase"] == "finished" and after["run"]["round"] == 1, after["run"]
    assert after["run"]["rounds_committed"] == 1
    assert after["floors_asked_at"] is not None
    for s, part in zip(after["sites"], split, strict=True):
        assert s["floor"] == {"min_cohort": 3, "allow_plain": False, "dp_required": False}, s
        assert s["dataset_roots"] == [part["root"]]
    text = _run([fl_server, "status", "--config", str(server_toml)])
    assert "run: finished, round 1/1; 1 of 1 recorded round(s) committed" in text
    assert "coordinator not running" in text and "hospital-c" in text and "cohort >= 3" in text
