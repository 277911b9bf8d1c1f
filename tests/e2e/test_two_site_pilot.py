"""A two-site pilot on the sites' defaults is refused at the start, by real ``fl-server run`` and
``fl-client run`` processes over TLS, in one line naming the setting on both sides (issue 18.3:
it used to run round after round that both sites refused, "sites 0/2")."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.sim.demo import prepare_federation, start_site

from .conftest import BIN, Procs, tail

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_two_sites_with_min_cohort_3_make_the_coordinator_refuse_the_run_at_once(tmp_path: Path, procs: Procs) -> None:
    fed = prepare_federation(
        tmp_path / "fed", num_sites=2,
        run_overrides={"rounds": 2, "min_sites": 2, "stage_timeout_s": 30.0, "sites_wait_timeout_s": 120.0},
    )  # fmt: skip
    for site in fed.sites:
        procs.add(start_site(site))
    log = fed.workdir / "fl-server.log"
    coordinator = procs.start([str(BIN / "fl-server"), "run", "--config", str(fed.server_toml)], log)
    code = coordinator.wait(timeout=200)
    out = tail(log, 4000)
    assert code != 0, out
    assert "no round can run: 0 of 2 online sites would join (run.min_sites = 2 in server.toml)" in out, out
    assert "site-0, site-1 join only secure rounds of at least 3 sites ([privacy] min_cohort in client.toml" in out
    rounds = fed.server_toml.parent / "state" / "rounds.jsonl"
    assert not rounds.exists() or not rounds.read_text().strip()  # no round was attempted


@pytest.mark.timeout(60)
def test_a_coordinator_asked_for_more_sites_than_are_enrolled_says_so_at_once(tmp_path: Path, procs: Procs) -> None:
    fed = prepare_federation(
        tmp_path / "fed", num_sites=2, run_overrides={"rounds": 1, "min_sites": 3, "sites_wait_timeout_s": 120.0}
    )  # fmt: skip
    log = fed.workdir / "fl-server.log"
    coordinator = procs.start([str(BIN / "fl-server"), "run", "--config", str(fed.server_toml)], log)
    code = coordinator.wait(timeout=50)  # not after sites_wait_timeout_s (120 s)
    out = tail(log, 4000)
    assert code != 0, out
    assert "run.min_sites = 3 in server.toml, but only 2 sites are enrolled and not revoked" in out, out
