"""End to end on loopback with TLS: real fl-server and fl-client processes.

One coordinator serves several checks, to keep the suite to a couple of minutes on 2 cores:
refusals (changed dataset, no TLS, unknown key), the Control API being unreachable from the
site-facing port, a full short run, and a site SIGKILLed mid-run counted as a dropout. A second
federation checks that a coordinator SIGKILLed mid-round and restarted with ``--resume`` goes on
without losing a committed round (the interrupted round is recorded as abandoned).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedseal.sim.demo import Federation, free_port, prepare_federation, site_receipts, start_site

from .conftest import BIN, Procs, read_rounds, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _fl_client(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fl-client"), *args], capture_output=True, text=True, timeout=timeout)


def _variant(fed: Federation, name: str, edit: dict[str, str]) -> Path:
    """A copy of site-0's directory with some client.toml lines replaced."""
    src = fed.sites[0]
    dst = fed.workdir / "variants" / name
    dst.mkdir(parents=True, exist_ok=True)
    text = (src / "client.toml").read_text()
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new)
    (dst / "client.toml").write_text(text)
    for f in ("site.key", "site.key.pub"):
        if (src / f).exists() and not (dst / f).exists():
            shutil.copy2(src / f, dst / f)
    return dst


def _logs(fed: Federation) -> str:
    """The tails of the coordinator's and every site's log, for a failure message."""
    parts = [f"--- fl-server.log ---\n{tail(fed.workdir / 'fl-server.log')}"]
    parts += [f"--- {s.name}/fl-client.log ---\n{tail(s / 'fl-client.log', 1500)}" for s in fed.sites]
    return "\n".join(parts)


def _finishes(coordinator: subprocess.Popen[bytes], fed: Federation, timeout: float) -> None:
    """Wait for the coordinator's run to end, and require success (logs on failure)."""
    try:
        coordinator.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the coordinator did not finish the run in {timeout:.0f} s\n" + _logs(fed))
    assert coordinator.returncode == 0, _logs(fed)


def _start_coordinator(procs: Procs, fed: Federation, *extra: str) -> subprocess.Popen[bytes]:
    proc = procs.start(
        [str(BIN / "fl-server"), "run", "--config", str(fed.server_toml), *extra],
        fed.workdir / "fl-server.log",
    )

    def gateway_up() -> bool:
        assert proc.poll() is None, tail(fed.workdir / "fl-server.log")
        try:
            with socket.create_connection(("127.0.0.1", fed.fleet_port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(gateway_up, 120, "the fleet gateway")
    return proc


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return prepare_federation(
        tmp_path_factory.mktemp("fed"),
        num_sites=4,
        # 4 sites, complete graph of degree 3, Shamir threshold 2: one dropout is survivable.
        run_overrides={
            "rounds": 2, "min_sites": 3, "threshold": 2, "stage_timeout_s": 20.0, "sites_wait_timeout_s": 300.0,
        },
    )


def test_a_site_whose_dataset_changed_is_refused_at_start(federation: Federation) -> None:
    data = federation.workdir / "variants" / "changed-data"
    src = Path(
        next(line.split('"')[1] for line in (federation.sites[0] / "client.toml").read_text().splitlines()
             if line.startswith("dataset_dir"))
    )
    shutil.copytree(src, data)
    shard = next(data.glob("*.parquet"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the data
    shard.write_bytes(bytes(raw))
    site = _variant(federation, "changed", {f'dataset_dir = "{src}"': f'dataset_dir = "{data}"'})
    out = _fl_client(["run", "--config", str(site / "client.toml")])
    assert out.returncode == 1, out.stderr
    assert "dataset" in out.stderr and "refused" in out.stderr


@pytest.mark.timeout(600)
def test_refusals_and_the_unreachable_control_api_while_a_run_completes_with_a_dropout(
    federation: Federation, procs: Procs
) -> None:
    fed = federation
    coordinator = _start_coordinator(procs, fed)
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))

    # A partner reaches only the fleet gateway: the Control API is not there...
    req = urllib.request.Request(f"https://localhost:{fed.fleet_port}/v1/control/list-runs", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, context=ctx, timeout=10)
    assert info.value.code == 404
    # ...and the SuperLink's own port listens on loopback only.
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    port_hex = f"{fed.internal_port:04X}"
    binds = {line.split()[1] for line in listening if line.split()[1].endswith(":" + port_hex) and line.split()[3] == "0A"}
    assert binds == {"0100007F:" + port_hex}

    # A site without TLS is told the coordinator requires TLS.
    port_line = next(line for line in (fed.sites[0] / "client.toml").read_text().splitlines() if line.startswith("port = "))
    plain = _variant(
        fed, "plain", {"[coordinator]\n": "[coordinator]\ninsecure = true\n", port_line: f"port = {free_port()}"}
    )
    out = _fl_client(["run", "--config", str(plain / "client.toml")])
    assert out.returncode == 1 and "requires TLS" in out.stderr, out.stderr

    # A site whose key was never enrolled is refused by the SuperLink.
    stranger = _variant(fed, "stranger", {'name = "site-0"': 'name = "stranger"', port_line: f"port = {free_port()}"})
    (stranger / "site.key").unlink()
    assert _fl_client(["keys", "init", "--out", str(stranger / "site.key"), "--force"]).returncode == 0
    out = _fl_client(["run", "--config", str(stranger / "client.toml")], timeout=180)
    assert out.returncode == 1 and "refused this site's key" in out.stderr, out.stderr

    # The enrolled sites train (the ServerApp waits for them); site-3 is SIGKILLed once
    # round 1 is committed.
    sites = [procs.add(start_site(s)) for s in fed.sites]
    state = fed.server_toml.parent / "state"
    wait_for(lambda: len(read_rounds(state)) >= 1, 360, "round 1", diagnose=lambda: _logs(fed))
    procs.kill(sites[3], signal.SIGKILL)
    _finishes(coordinator, fed, 240)
    rounds = read_rounds(state)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["outcome"] == "committed" for r in rounds), rounds
    assert rounds[0]["accepted"] == 4
    assert rounds[1]["accepted"] == 3  # the killed site is a dropout, the round still completes
    assert rounds[1]["dropouts"] >= 1
    assert all("unmask_s" in r and len(str(r["aggregate_digest"])) == 64 for r in rounds)  # secure rounds
    assert 0.5 < float(rounds[1]["accuracy"]) <= 1.0
    assert (state / "checkpoints" / "round-000002.safetensors").exists()
    # The audit log, checked by the independent offline verifier against the pinned key.
    out = subprocess.run(
        [str(BIN / "fl-audit"), "verify", str(state / "audit.sqlite"), "--coordinator-key",
         str(fed.server_toml.parent / "coordinator.pub")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rounds completed" in out.stdout
    # Every site proved, over the TLS audit service, that its accepted masked input of each
    # committed round is in the log under a signed tree head consistent with the earlier ones.
    for site_dir in fed.sites:
        assert not (site_dir / "state" / "receipts" / "BLOCKED").exists(), tail(site_dir / "fl-client.log")
        proven = {int(str(r["round"])) for r in site_receipts(site_dir)}
        wanted = {int(str(r["round"])) for r in rounds if site_dir.name in list(r["sites"])}  # type: ignore[call-overload]
        assert wanted and wanted <= proven, (site_dir.name, wanted, proven, tail(site_dir / "fl-client.log"))


# Its waits (round 1, then the resumed run) add up to more than the suite's 300 s default; a
# hang must end in _finishes' log dump, not in pytest-timeout's silent kill.
@pytest.mark.timeout(720)
def test_a_coordinator_killed_mid_round_resumes_without_losing_a_committed_round(
    tmp_path_factory: pytest.TempPathFactory, procs: Procs
) -> None:
    fed = prepare_federation(
        tmp_path_factory.mktemp("resume"),
        num_sites=3,
        run_overrides={
            "rounds": 3, "min_sites": 3, "threshold": 2, "stage_timeout_s": 20.0, "sites_wait_timeout_s": 300.0,
        },
    )
    state = fed.server_toml.parent / "state"
    coordinator = _start_coordinator(procs, fed)
    sites = [procs.add(start_site(s)) for s in fed.sites]
    wait_for(lambda: len(read_rounds(state)) >= 1, 300, "round 1", diagnose=lambda: _logs(fed))
    committed_model = (state / "checkpoints" / "round-000001.safetensors").read_bytes()

    def round_2_under_way() -> bool:  # before its commit: a fixed sleep raced a fast round 2
        try:
            doc = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return doc.get("round") == 2 and doc.get("stage") in ("advertise", "share", "masked-input", "consistency", "unmask")

    wait_for(round_2_under_way, 120, "round 2's key sharing", interval=0.05, diagnose=lambda: _logs(fed))
    procs.kill(coordinator, signal.SIGKILL)  # the whole coordinator: fl-server, SuperLink, ServerApp
    assert all(s.poll() is None for s in sites), "a site stopped when the coordinator died"

    resumed = _start_coordinator(procs, fed, "--resume")
    _finishes(resumed, fed, 300)
    rounds = read_rounds(state)
    assert [r["round"] for r in rounds] == [1, 2, 3], rounds
    assert [str(r["outcome"]).split()[0] for r in rounds] == ["committed", "abandoned", "committed"]
    assert (state / "checkpoints" / "round-000001.safetensors").read_bytes() == committed_model
    assert not (state / "checkpoints" / "round-000002.safetensors").exists()
    assert (state / "checkpoints" / "round-000003.safetensors").exists()
    assert rounds[2]["accepted"] == 3 and 0.5 < float(rounds[2]["accuracy"]) <= 1.0
    out = subprocess.run(
        [str(BIN / "fl-audit"), "verify", str(state / "audit.sqlite"), "--coordinator-key",
         str(fed.server_toml.parent / "coordinator.pub")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for site_dir in fed.sites:
        assert not (site_dir / "state" / "receipts" / "BLOCKED").exists(), tail(site_dir / "fl-client.log")
        proven = {int(str(r["round"])) for r in site_receipts(site_dir)}
        assert {1, 3} <= proven, (site_dir.name, proven, tail(site_dir / "fl-client.log"))
