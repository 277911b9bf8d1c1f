"""The data contract through real processes: ``fl-client data prepare --contract`` refuses a bad
CSV naming file, line and column, and a coordinator with ``[run] contract`` refuses to start
when its sites' data was prepared without it (issue 18.4: a CSV missing a column used to pass
prepare, attest and enrol and fail at run time, at the site with the correct data)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedseal.sim.demo import prepare_federation, start_site

from .conftest import BIN, Procs, tail

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONTRACT = {
    "format": "fedseal-data-contract/1",
    "features": [{"name": "age", "dtype": "float"}, {"name": "bmi", "dtype": "float"}],
    "label": {"name": "outcome", "values": [0, 1]},
    "nulls": "refuse",
}


def _prepare(tmp_path: Path, csv_text: str) -> subprocess.CompletedProcess[str]:
    tmp_path.mkdir(parents=True)
    (tmp_path / "contract.json").write_text(json.dumps(CONTRACT))
    (tmp_path / "site.csv").write_text(csv_text)
    return subprocess.run(
        [str(BIN / "fl-client"), "data", "prepare", str(tmp_path / "site.csv"), str(tmp_path / "data"),
         "--contract", str(tmp_path / "contract.json")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.timeout(150)
def test_prepare_refuses_a_csv_that_breaks_the_contract_naming_file_line_and_column(tmp_path: Path) -> None:
    ok = _prepare(tmp_path / "ok", "age,bmi,outcome\n41,22.5,0\n63,30.1,1\n")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "ok" / "data" / "fedseal-manifest.json").read_text())
    assert len(manifest["contract"]) == 64
    missing = _prepare(tmp_path / "missing", "age,outcome\n41,0\n")
    assert missing.returncode == 1 and "bmi" in missing.stderr + missing.stdout
    null = _prepare(tmp_path / "null", "age,bmi,outcome\n41,22.5,0\n63,n/a,1\n")
    out = " ".join((null.stderr + null.stdout).split())
    assert null.returncode == 1 and "line 3" in out and "'bmi'" in out and "n/a" in out, out
    assert not (tmp_path / "null" / "data").exists()  # nothing written


@pytest.mark.timeout(240)
def test_a_coordinator_with_a_contract_refuses_sites_whose_data_was_prepared_without_it(
    tmp_path: Path, procs: Procs
) -> None:
    (tmp_path / "contract.json").write_text(json.dumps(CONTRACT))
    fed = prepare_federation(
        tmp_path / "fed", num_sites=3,
        run_overrides={"rounds": 1, "min_sites": 3, "stage_timeout_s": 30.0, "sites_wait_timeout_s": 120.0,
                       "contract": str(tmp_path / "contract.json")},
    )  # fmt: skip
    for site in fed.sites:
        procs.add(start_site(site))
    log = fed.workdir / "fl-server.log"
    coordinator = procs.start([str(BIN / "fl-server"), "run", "--config", str(fed.server_toml)], log)
    code = coordinator.wait(timeout=200)
    out = " ".join(tail(log, 6000).split())
    assert code != 0, out
    assert "data contract mismatch" in out and "site-0's dataset was prepared under no contract" in out, out
