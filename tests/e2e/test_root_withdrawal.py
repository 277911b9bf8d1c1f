"""End to end on loopback with TLS: a dataset root withdrawn with the real ``fl-server roots
withdraw`` is refused in the next run's round (the coordinator's round line names the site and
the withdrawal), a later ``fl-server enroll`` of that root is refused, the run still completes
with the other sites, the withdrawn site's own console (its ``fl-client run`` stdout/stderr)
says in one line that its round-1 masked input was rejected and why (from the log's entry for
it), and ``fl-audit verify`` / ``fl-audit show`` (real processes) accept the log and list the
withdrawal with its reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedseal.sim.demo import Federation, prepare_federation, start_site

from .conftest import BIN, Procs, read_rounds, tail

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REASON = "consent withdrawn (DPO ticket 31)"


def _logs(fed: Federation) -> str:
    parts = [f"--- fl-server.log ---\n{tail(fed.workdir / 'fl-server.log')}"]
    parts += [
        f"--- {s.name}/fl-client.log ---\n{tail(s / 'fl-client.log', 1500)}" for s in fed.sites
    ]
    return "\n".join(parts)


def _cli(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout)


def _approved_root(site: Path) -> str:
    line = next(
        x for x in (site / "client.toml").read_text().splitlines() if x.startswith("approved_root")
    )
    return line.split('"')[1]


@pytest.mark.timeout(600)
def test_a_withdrawn_root_is_refused_at_the_next_round_and_never_approved_again(
    tmp_path_factory: pytest.TempPathFactory, procs: Procs
) -> None:
    fed = prepare_federation(
        tmp_path_factory.mktemp("withdraw"),
        num_sites=4,
        run_overrides={
            "rounds": 1, "min_sites": 3, "threshold": 2, "stage_timeout_s": 20.0,
            "sites_wait_timeout_s": 300.0,
        },
    )  # fmt: skip
    cfg = str(fed.server_toml)
    victim = fed.sites[3]
    root = _approved_root(victim)

    out = _cli(
        "fl-server",
        "roots",
        "withdraw",
        "--config",
        cfg,
        "--site",
        victim.name,
        "--root",
        root,
        "--reason",
        REASON,
    )
    assert out.returncode == 0, out.stderr
    assert f"withdrew dataset root {root[:16]}… of {victim.name}" in out.stderr
    # Never approved again: enrolling the root once more is refused in one line.
    out = _cli(
        "fl-server", "enroll", "--config", cfg, "--site", victim.name, "--key", str(victim / "site.key.pub"),
        "--dataset-root", root,
    )  # fmt: skip
    assert out.returncode == 2 and "a withdrawn root is never approved again" in out.stderr, (
        out.stderr
    )

    coordinator = procs.start(
        [str(BIN / "fl-server"), "run", "--config", cfg], fed.workdir / "fl-server.log"
    )
    for site in fed.sites:
        procs.add(start_site(site))
    try:
        coordinator.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail("the coordinator did not finish the run\n" + _logs(fed))
    assert coordinator.returncode == 0, _logs(fed)

    state = fed.server_toml.parent / "state"
    [rec] = read_rounds(state)
    assert (
        rec["outcome"] == "committed" and victim.name not in rec["sites"] and rec["accepted"] == 3
    )
    why = rec["absent"][victim.name]
    assert f"dataset root {root[:16]}… of {victim.name} was withdrawn on" in why and REASON in why
    # The coordinator's round line (fl-server's console, or the ServerApp's log) names the site
    # and the withdrawal, on one line.
    console = tail(fed.workdir / "fl-server.log", 50000) + tail(state / "serverapp.log", 50000)
    line = next((x for x in console.splitlines() if "round 1/1" in x and "not in the sum" in x), "")
    assert f"{victim.name} (rejected at " in line and "withdrawn" in line, _logs(fed)
    # The withdrawn site's own console (fl-client run's stdout and stderr: start_site sends both
    # to fl-client.log) says why its input was left out, from the signed log's entry for it.
    site_console = (victim / "fl-client.log").read_text()
    said = [x for x in site_console.splitlines() if "round 1: this site's masked input" in x]
    assert len(said) == 1, _logs(fed)
    assert (
        "was not accepted: the coordinator rejected it: UnapprovedDatasetError: dataset root is "
        "not approved for this site (audit log entry "
    ) in said[0], said
    assert "Traceback" not in site_console, site_console[-3000:]

    log = str(state / "audit.sqlite")
    verify = _cli(
        "fl-audit",
        "verify",
        log,
        "--coordinator-key",
        str(fed.server_toml.parent / "coordinator.pub"),
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    show = subprocess.run(
        [str(BIN / "fl-audit"), "show", log], capture_output=True, text=True, timeout=120,
        env={"COLUMNS": "300", "PATH": str(BIN)},
    )  # fmt: skip
    assert show.returncode == 0, show.stderr
    withdrawal = next(x for x in show.stdout.splitlines() if "withdraw-root" in x)
    assert victim.name in withdrawal and root[:16] in withdrawal and REASON in withdrawal
