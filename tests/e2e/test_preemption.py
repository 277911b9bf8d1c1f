"""A site killed mid-training (SIGKILL: a spot machine reclaimed without notice) and started
again at once rejoins, resumes its round's training from its local checkpoint, and the
coordinator's round completes with it: real fl-server and fl-client processes over TLS on
loopback (issues 20.3 and 18.1).

Three sites train the 5 epochs their limits allow and wait at the masked-input stage; the
fourth allows 40 epochs and writes a checkpoint every 20 steps. It is killed once a checkpoint
exists and started again inside the window in which Flower's SuperLink still holds its killed
session (it used to be refused as "not enrolled, or revoked"): it ends that session itself and
rejoins under the same node id, gets its message again when its node comes back (the
coordinator pushes it anew), resumes from the checkpoint, and its masked input is in the sum.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedseal.sim.demo import Federation, prepare_federation, start_site

from .conftest import BIN, Procs, read_rounds, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _logs(fed: Federation) -> str:
    parts = [f"--- fl-server.log ---\n{tail(fed.workdir / 'fl-server.log', 4000)}"]
    parts += [f"--- {s.name}/fl-client.log ---\n{tail(s / 'fl-client.log', 2500)}" for s in fed.sites]
    return "\n".join(parts)


NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def _node_ids(site: Path) -> list[int]:
    path = site / "state" / "supernode.log"
    return [int(n) for n in NODE_ID.findall(path.read_text(errors="replace"))] if path.exists() else []


def _checkpoints(site: Path) -> list[Path]:
    return list((site / "state" / "training").glob("*/progress.json"))


@pytest.mark.timeout(420)
def test_a_site_killed_mid_training_resumes_from_its_checkpoint_and_its_input_is_in_the_round(
    tmp_path: Path, procs: Procs
) -> None:
    fed = prepare_federation(
        tmp_path / "fed", num_sites=4,
        run_overrides={
            "rounds": 1, "min_sites": 4, "epochs": 40, "batch_size": 32, "stage_timeout_s": 180.0,
            "sites_wait_timeout_s": 120.0, "setup_with_evaluation": False,
        },
    )  # fmt: skip
    slow = fed.sites[3]
    toml = (slow / "client.toml").read_text()
    toml += "\n[limits]\nmax_epochs = 40\n\n[training]\ncheckpoint_every_steps = 20\n"
    (slow / "client.toml").write_text(toml)
    coordinator = procs.start(
        [str(BIN / "fl-server"), "run", "--config", str(fed.server_toml)], fed.workdir / "fl-server.log"
    )
    sites = [procs.add(start_site(s)) for s in fed.sites]
    wait_for(lambda: bool(_checkpoints(slow)), 240, "the slow site's first training checkpoint",
             interval=0.2, diagnose=lambda: _logs(fed))  # fmt: skip
    [node_id] = _node_ids(slow)
    procs.kill(sites[3], signal.SIGKILL)  # its SuperNode dies with it (PR_SET_PDEATHSIG)
    killed = time.monotonic()
    assert _checkpoints(slow), "the checkpoint survives the kill"
    procs.add(start_site(slow))
    wait_for(lambda: len(_node_ids(slow)) == 2, 55, "the restarted site to rejoin", diagnose=lambda: _logs(fed))
    assert time.monotonic() - killed < 60  # inside the window Flower holds a killed session
    assert _node_ids(slow) == [node_id, node_id]  # the same node: the coordinator counts it again
    try:
        code = coordinator.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the round did not end\n" + _logs(fed))
    assert code == 0, _logs(fed)
    [round1] = read_rounds(fed.server_toml.parent / "state")
    assert round1["outcome"] == "committed" and round1["accepted"] == 4, round1
    log = (slow / "fl-client.log").read_text(errors="replace")
    assert f"ended this site's previous session (node {node_id})" in log, _logs(fed)
    assert "refused this site's key" not in log and "revoked" not in log
    assert "continuing the round this site was in when it stopped" in log, _logs(fed)
    assert "resuming training from its checkpoint" in log, _logs(fed)
    server_log = (fed.workdir / "fl-server.log").read_text(errors="replace")
    state_dir = fed.server_toml.parent / "state"
    serverapp = (state_dir / "serverapp.log").read_text(errors="replace")
    assert "went away and came back; its message pushed again" in serverapp, server_log
    assert not (slow / "state" / "round").exists()  # the round ended: nothing kept
