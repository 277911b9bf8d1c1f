"""fl-server's offline commands: init, enroll, roster, revoke, and the start-up refusal."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.crypto.keys import generate_identity_key, save_public_key
from fedseal.sim.commands import app

runner = CliRunner()


def test_init_enroll_revoke_and_roster_work_together(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    assert runner.invoke(app, ["init", str(coord)]).exit_code == 0
    for name in ("coordinator.key", "tls/server.key", "tls/ca.key"):
        assert stat.S_IMODE((coord / name).stat().st_mode) == 0o600
    assert runner.invoke(app, ["init", str(coord)]).exit_code == 2  # never overwrites
    save_public_key(generate_identity_key().public_key(), tmp_path / "a.pub")
    cfg = str(coord / "server.toml")
    res = runner.invoke(
        app, ["enroll", "--config", cfg, "--site", "site-a", "--key", str(tmp_path / "a.pub"), "--dataset-root", "ab" * 32]
    )
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["revoke", "--config", cfg, "--site", "site-a"]).exit_code == 0
    doc = json.loads(runner.invoke(app, ["roster", "--config", cfg, "--json"]).stdout)
    assert [(s["name"], s["status"]) for s in doc["sites"]] == [("site-a", "revoked")]
    assert runner.invoke(app, ["revoke", "--config", cfg, "--site", "site-a"]).exit_code == 2


def test_enrolling_with_a_bad_root_fails_with_a_message(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    runner.invoke(app, ["init", str(coord)])
    save_public_key(generate_identity_key().public_key(), tmp_path / "a.pub")
    res = runner.invoke(
        app,
        ["enroll", "--config", str(coord / "server.toml"), "--site", "site-a", "--key", str(tmp_path / "a.pub"),
         "--dataset-root", "nothex"],
    )
    assert res.exit_code == 2
    assert "64 hex" in res.output


def test_run_refuses_a_robust_strategy_before_starting_anything(tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    runner.invoke(app, ["init", str(coord)])
    toml = coord / "server.toml"
    toml.write_text(toml.read_text().replace('strategy = "FedAvg"', 'strategy = "FedMedian"'))
    res = runner.invoke(app, ["run", "--config", str(toml)])
    assert res.exit_code == 2
    assert "median" in res.output and "individual" in res.output
    assert not (coord / "state" / "superlink.log").exists()


def test_secure_demo_and_simulation_refuse_fewer_than_three_sites() -> None:
    out = runner.invoke(app, ["simulate", "--sites", "2"])
    assert out.exit_code == 2 and "at least 3 sites" in out.output
    out = runner.invoke(app, ["demo", "--sites", "2"])
    assert out.exit_code == 2  # typer's range check: --sites is 3..10


@pytest.mark.parametrize(("option", "bad"), [("--actors", "0"), ("--actors", "65"), ("--batch", "0"), ("--batch", "257")])
def test_simulate_refuses_an_actor_count_or_batch_size_out_of_range(tmp_path: Path, option: str, bad: str) -> None:
    out = runner.invoke(app, ["simulate", "--sites", "3", option, bad, "--workdir", str(tmp_path / bad)])
    assert out.exit_code == 2, out.output
    assert option.lstrip("-") in out.output
    assert not (tmp_path / bad).exists()  # refused before preparing anything


def test_the_simulate_library_entry_point_refuses_a_batch_size_out_of_range(tmp_path: Path) -> None:
    from fedseal.sim.simulate import run_simulate_command

    said: list[str] = []
    code = run_simulate_command(  # the library entry point checks it too
        sites=3, rounds=1, scheme="iid", alpha=0.5, seed=1, model="mlp", secure=True,
        workdir=tmp_path / "lib", echo=said.append, batch=0,
    )
    assert code == 2 and "--batch" in said[0] and not (tmp_path / "lib").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--strategy-option", "mu"], "KEY=NUMBER"),
        (["--strategy-option", "proximal_mu=a lot"], "KEY=NUMBER"),
        (["--strategy-option", "=1"], "KEY=NUMBER"),
        (["--dp", "--plain"], "inside the secure sum"),
        (["--strategy", "Krum"], "individual"),
        (["--strategy", "FedNova"], "unknown strategy"),
    ],
)
def test_simulate_refuses_bad_strategy_options_and_dp_without_secure_rounds(
    tmp_path: Path, args: list[str], said: str
) -> None:
    out = runner.invoke(app, ["simulate", "--sites", "3", *args, "--workdir", str(tmp_path / "w")])
    assert out.exit_code == 2, out.output
    assert said in " ".join(out.output.split())
    assert not (tmp_path / "w").exists()  # refused before preparing anything
