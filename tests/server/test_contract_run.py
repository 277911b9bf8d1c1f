"""A run with a data contract (``server.toml [run] contract``) refuses to start when a site's
dataset was prepared under another contract or none, in one line naming the site and both
digests (issue 18.4: a site missing a feature column used to fail at run time, at the site
with the correct data). Through the real ServerApp on the in-process grid; the sites report
their dataset's contract in ``query.policy`` as the ClientApp does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedseal.protocol.contract import parse_contract
from fedseal.server import flower_app, rundir
from fedseal.server.config import ServerConfigError, load_server_config
from fedseal.server.site_floors import SiteFloor, contract_refusal, read_floors
from tests.server._fedgrid import Federated

FLOOR = (3, False, False)
CONTRACT: dict[str, Any] = {
    "format": "fedseal-data-contract/1",
    "features": [{"name": f"f{i}", "dtype": "float"} for i in range(30)],
    "label": {"name": "y", "values": [0, 1]},
}
DIGEST = parse_contract(CONTRACT).digest().hex()
OTHER = parse_contract({**CONTRACT, "features": CONTRACT["features"][:29]}).digest().hex()
SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _options(contracts: dict[str, str | None]) -> dict[str, dict[str, Any]]:
    return {s: {"floor": FLOOR, "contract": c} for s, c in contracts.items()}


@pytest.mark.timeout(60)
def test_a_site_prepared_under_another_contract_or_none_makes_the_run_refuse_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = Federated(
        tmp_path, SITES, secure=True, rounds=1, min_sites=3, run_contract=CONTRACT,
        **_options({"site-a": DIGEST, "site-b": OTHER, "site-c": ""}),
    )  # fmt: skip
    with pytest.raises(flower_app.CoordinatorError) as err:
        fx.run(monkeypatch)
    message = str(err.value)
    assert message == (
        "no round can run: 1 of 3 online sites would join (run.min_sites = 3 in server.toml): "
        f"data contract mismatch: run.contract = contract.json in server.toml has digest {DIGEST}, "
        f"but site-b's dataset was prepared under contract {OTHER}; site-c's dataset was prepared "
        "under no contract (re-run `fl-client data prepare SRC OUT --contract contract.json` at "
        "those sites and re-enrol the new root)"
    )
    status = json.loads((fx.cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text())
    assert status["phase"] == "failed"
    assert [kind for _, kind in fx.grid.sent if kind != "query.policy"] == []  # no round, no model
    assert f"fedseal: refusing to start the run: {message}" in capsys.readouterr().out
    _, floors = read_floors(fx.cfg.coordinator.state_dir)  # fl-server status shows each site's
    assert floors["site-b"].contract == OTHER and floors["site-c"].contract == ""


@pytest.mark.timeout(120)
def test_a_run_whose_sites_follow_its_contract_signs_the_digest_into_every_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # site-c does not report a contract (an older build): not held against the run.
    fx = Federated(
        tmp_path, SITES, secure=True, rounds=1, min_sites=3, run_contract=CONTRACT,
        **_options({"site-a": DIGEST, "site-b": DIGEST.upper(), "site-c": None}),
    )  # fmt: skip
    fx.run(monkeypatch)
    assert [r["outcome"] for r in fx.rounds()] == ["committed"]
    for site in fx.sites.values():
        assert site.session.setup.params.contract_digest.hex() == DIGEST


@pytest.mark.timeout(120)
def test_a_run_without_a_contract_starts_whatever_the_sites_datasets_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = Federated(
        tmp_path,
        SITES,
        secure=True,
        rounds=1,
        min_sites=3,
        **_options({"site-a": OTHER, "site-b": "", "site-c": None}),
    )
    fx.run(monkeypatch)
    assert [r["outcome"] for r in fx.rounds()] == ["committed"]
    for site in fx.sites.values():
        assert site.session.setup.params.contract_digest == b""


def test_the_contract_check_names_only_mismatching_sites_that_reported(tmp_path: Path) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=1, min_sites=2, run_contract=CONTRACT)
    cfg = load_server_config(fx.cfg.path)
    assert cfg.run.contract_digest.hex() == DIGEST
    floor = SiteFloor(3, False, False, DIGEST)
    assert contract_refusal(cfg, {"site-a": floor, "site-b": SiteFloor(3, False, False)}) is None
    message = contract_refusal(cfg, {"site-a": floor, "site-10": SiteFloor(3, False, False, OTHER)})
    assert (
        message is not None and f"site-10's dataset was prepared under contract {OTHER}" in message
    )
    assert "site-a" not in message


def test_a_malformed_run_contract_fails_at_load_naming_the_key_and_field(tmp_path: Path) -> None:
    fx = Federated(tmp_path, SITES, secure=True, rounds=1, min_sites=2, run_contract=CONTRACT)
    (fx.cfg.path.parent / "contract.json").write_text(json.dumps({**CONTRACT, "nulls": "maybe"}))
    with pytest.raises(ServerConfigError) as err:
        load_server_config(fx.cfg.path)
    assert err.value.key == "run.contract" and "nulls must be one of refuse, drop" in str(err.value)


@pytest.mark.timeout(120)
def test_one_site_on_another_contract_is_left_out_when_enough_others_follow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One site (misconfigured or malicious) used to block every contract run; its reported
    # digest is also not echoed unless it is one (escape codes reached the console).
    sites = [*SITES, "site-d"]
    fx = Federated(
        tmp_path, sites, secure=True, rounds=1, min_sites=3, run_contract=CONTRACT,
        **_options({"site-a": DIGEST, "site-b": DIGEST, "site-c": DIGEST, "site-d": OTHER}),
    )  # fmt: skip
    fx.run(monkeypatch)
    out = capsys.readouterr().out
    assert "fedseal: warning: data contract mismatch" in out and "site-d's dataset" in out
    assert [r["outcome"] for r in fx.rounds()] == ["committed"]


def test_a_reported_contract_that_is_not_a_digest_counts_as_not_said() -> None:
    from fedseal.server.site_floors import _contract_hex

    assert _contract_hex("AB" * 32) == "ab" * 32 and _contract_hex("") == ""
    for bad in ("\x1b[2J\nINFO fake", "ab" * 31, "zz" * 32, 7, None):
        assert _contract_hex(bad) is None
