"""``fl-server simulate``: the real ServerApp and ClientApp on Flower's simulation engine."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from typer.testing import CliRunner

from fedseal.server.config import load_server_config
from fedseal.sim.commands import app as cli_app
from fedseal.sim.engine import default_backend_config
from fedseal.sim.errors import SimulationError
from fedseal.sim.simulate import prepare_simulation, run_fedseal_simulation, verify_audit_log
from fedseal.sim.sites import SimulatedSites, content_bytes


def test_content_bytes_counts_array_buffers_bytes_strings_and_numbers() -> None:
    vec = np.zeros(1000, np.float32)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(vec)}),
            "secagg": ConfigRecord({"payload": b"x" * 300, "site": "abc"}),
            "metrics": MetricRecord({"num-examples": 5, "loss": 0.5}),
        }
    )
    counted = content_bytes(content)
    array_bytes = len(ArrayRecord({"w": Array(vec)})["w"].data)
    assert array_bytes >= vec.nbytes
    assert counted == array_bytes + 300 + 3 + 8 + 8


def test_the_site_app_pickles_to_one_cached_instance_per_process() -> None:
    sites = SimulatedSites(("/nonexistent/site-0", "/nonexistent/site-1"), ("x:y",), None)
    first = pickle.loads(pickle.dumps(sites))
    second = pickle.loads(pickle.dumps(sites))
    assert first is second
    assert first.site_dirs == sites.site_dirs and first.extra_models == ("x:y",)


def test_an_unknown_partition_is_refused_with_a_simulation_error() -> None:
    sites = SimulatedSites(("/nonexistent/site-0",))
    with pytest.raises(SimulationError, match="partition 5"):
        sites.site_app(5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sites": 1}, "--sites"), ({"sites": 3, "scheme": "zipf"}, "--scheme"), ({"sites": 3, "alpha": 0.0}, "--alpha")],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(SimulationError, match=match):
        prepare_simulation(tmp_path / "w", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "w").exists()


def test_the_cli_exits_2_on_a_bad_scheme(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app, ["simulate", "--sites", "3", "--scheme", "zipf", "--workdir", str(tmp_path / "w")]
    )
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(sys.platform != "linux", reason="Ray backend, Linux only here")
def test_a_small_secure_simulation_commits_every_round_learns_and_leaves_a_verifiable_audit_log(
    tmp_path: Path,
) -> None:
    # Every round with a setup exchange of its own (the option's default, the setup riding on
    # the evaluation, runs in the tests below).
    fed = prepare_simulation(
        tmp_path / "sim", sites=4, scheme="dirichlet", alpha=1.0, seed=3,
        run_overrides={"rounds": 2, "secure": True, "stage_timeout_s": 120.0, "setup_with_evaluation": False},
    )
    traffic = tmp_path / "traffic.jsonl"
    outcome = run_fedseal_simulation(fed, traffic_log=traffic)

    assert [r["outcome"] for r in outcome.rounds] == ["committed", "committed"]
    assert not any("setup_with_evaluation" in r or "next_setup_adverts" in r for r in outcome.rounds)
    assert all(r["accepted"] == 4 and r["dropouts"] == 0 for r in outcome.rounds)
    # MNIST-5k, MLP, 2 rounds of 1 local epoch: far above chance (0.1), and improving.
    accuracies = [float(r["accuracy"]) for r in outcome.rounds]
    assert accuracies[-1] > 0.6
    assert accuracies[-1] >= accuracies[0] - 0.02
    assert outcome.status["phase"] == "finished"
    assert outcome.model is not None and Path(outcome.model).exists()

    assert outcome.audit_log is not None
    verified = verify_audit_log(fed, Path(outcome.audit_log))
    assert verified.runs and verified.runs[0][1] == "completed" and verified.runs[0][2] == 2
    assert verified.accepted_envelopes > 0 and verified.rejected_envelopes == 0

    # Every site answered every stage (and, in the run's first round, a commit exchange for
    # the graph nonces); the masked inputs carry the model-sized vector.
    lines = [json.loads(line) for line in traffic.read_text().splitlines()]
    assert {line["site"] for line in lines} == {0, 1, 2, 3}
    assert all(line["start"] > 1.7e9 and line["seconds"] > 0 for line in lines)  # Unix start times
    assert len([line for line in lines if line["type"] == "train.secagg"]) == 4 * (6 + 5)
    nodes = json.loads((fed.server_toml.parent / "state" / "nodes.json").read_text())
    assert sorted(nodes.values()) == ["site-0", "site-1", "site-2", "site-3"]


def test_a_virtual_site_whose_dataset_changed_since_approval_is_refused(tmp_path: Path) -> None:
    fed = prepare_simulation(tmp_path / "sim", sites=2, scheme="iid", seed=2)
    shard = next((fed.workdir / "data").glob("*/**/*.parquet"))
    with shard.open("ab") as f:
        f.write(b"tampered")
    sites = SimulatedSites(tuple(str(p) for p in fed.sites))
    tampered = 0 if shard.is_relative_to(_dataset_dir(fed.sites[0])) else 1
    with pytest.raises(SimulationError, match="dataset"):
        sites.site_app(tampered)
    assert sites.site_app(1 - tampered) is sites.site_app(1 - tampered)  # built once, then cached


@pytest.mark.parametrize("setting", ["", "0"])
def test_a_process_of_virtual_sites_shares_its_signature_checks_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    from fedseal.client import flower_app
    from fedseal.protocol.seams import NO_SHARING
    from fedseal.sim.shared_work import SharedWork

    runtimes: list[flower_app.SiteRuntime] = []
    real = flower_app.make_client_app

    def spy(runtime: flower_app.SiteRuntime) -> object:
        runtimes.append(runtime)
        return real(runtime)

    monkeypatch.setattr(flower_app, "make_client_app", spy)
    if setting:
        monkeypatch.setenv("FEDSEAL_SIM_SHARE_VERIFIED", setting)
    else:
        monkeypatch.delenv("FEDSEAL_SIM_SHARE_VERIFIED", raising=False)
    fed = prepare_simulation(tmp_path / "sim", sites=2, scheme="iid", seed=2)
    sites = SimulatedSites(tuple(str(p) for p in fed.sites))
    sites.site_app(0)
    sites.site_app(1)
    first, second = (r.shared_work for r in runtimes)
    assert isinstance(first, SharedWork) is (setting != "0")  # signature checks and decoding
    assert (first is NO_SHARING) is (setting == "0")
    assert second is first  # one per process: the sites share it
    assert (sites.shared_work is first) is (setting != "0")


def _dataset_dir(site_dir: Path) -> Path:
    for line in (site_dir / "client.toml").read_text().splitlines():
        if line.startswith("dataset_dir"):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    raise AssertionError("client.toml without dataset_dir")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(sys.platform != "linux", reason="Ray backend, Linux only here")
def test_secure_rounds_over_two_actors_keep_every_site_in_one_process_and_commit(tmp_path: Path) -> None:
    fed = prepare_simulation(
        tmp_path / "sim", sites=4, scheme="iid", seed=4,
        run_overrides={"rounds": 2, "secure": True, "stage_timeout_s": 120.0},
    )
    traffic = tmp_path / "traffic.jsonl"
    outcome = run_fedseal_simulation(fed, traffic_log=traffic, actors=2)

    # A secure session lives in the process that answered the setup: had a later stage of a
    # site reached the other actor, that site would have failed and the round lost it.
    assert [r["outcome"] for r in outcome.rounds] == ["committed", "committed"]
    assert all(r["accepted"] == 4 and r["dropouts"] == 0 for r in outcome.rounds)
    lines = [json.loads(line) for line in traffic.read_text().splitlines()]
    pids: dict[int, set[int]] = {}
    for line in lines:
        pids.setdefault(int(line["site"]), set()).add(int(line["pid"]))
    assert sorted(pids) == [0, 1, 2, 3]
    assert all(len(p) == 1 for p in pids.values()), pids
    assert pids[0] == pids[2] and pids[1] == pids[3] and pids[0] != pids[1]  # partition % 2
    secure = [line for line in lines if line["type"] == "train.secagg"]
    # Every site answered the 5 stages of round 1 and its commit exchange (graph nonces: the
    # run's first round); round 2's setup went out with round 1's evaluation
    # (run.setup_with_evaluation, the default) and needed no commit exchange: 4 exchanges.
    assert len(secure) == 4 * (6 + 4)
    assert "setup_with_evaluation" not in outcome.rounds[0]
    assert outcome.rounds[0]["next_setup_adverts"] == 4
    assert outcome.rounds[1]["setup_with_evaluation"] is True


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(sys.platform != "linux", reason="Ray backend, Linux only here")
def test_a_site_that_misses_the_setup_riding_on_the_evaluation_is_left_out_by_a_new_setup_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """site-1's first evaluation fails, so round 2's setup (carried by it) never reaches it: the
    coordinator starts round 2 with the other sites' adverts, sees site-1's missing, sends the
    others a second setup attempt without it, and the round commits with them."""
    helpers = Path(__file__).parent / "simfaults"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(helpers), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(helpers))
    fed = prepare_simulation(
        tmp_path / "sim", sites=4, scheme="iid", seed=6,
        run_overrides={"rounds": 2, "secure": True, "stage_timeout_s": 60.0},
    )
    traffic = tmp_path / "traffic.jsonl"
    outcome = run_fedseal_simulation(
        fed, traffic_log=traffic, site_factory="sim_faults:site_down_for_first_evaluation"
    )
    assert [r["outcome"] for r in outcome.rounds] == ["committed", "committed"], outcome.rounds
    first, second = outcome.rounds
    assert first["accepted"] == 4 and first["next_setup_adverts"] == 3
    assert second["setup_with_evaluation"] is True
    assert second["accepted"] == 3 and "site-1" not in second["sites"]
    assert "accuracy" in first  # the other sites' evaluation counted
    lines = [json.loads(line) for line in traffic.read_text().splitlines()]
    by_site = {s: [x["type"] for x in lines if x["site"] == s] for s in range(4)}
    # Round 1: the commit exchange (graph nonces, the run's first round) and 5 stages. Round 2
    # for the others: no bundle for the carried setup (an advert was missing) but a second
    # setup attempt, then its bundle, the shares, survivors and signatures: 5 messages, as
    # many as a round with its own setup exchange.
    others = [by_site[s].count("train.secagg") for s in range(4) if s != 1]
    assert others == [6 + 5] * 3, by_site
    assert by_site[1].count("train.secagg") == 6  # round 1 only
    verified = verify_audit_log(fed, Path(str(outcome.audit_log)))
    assert verified.rejected_envelopes == 0


def test_the_backend_config_sizes_ray_to_the_actors_asked_for() -> None:
    one = default_backend_config()
    assert one["client_resources"]["num_cpus"] == one["init_args"]["num_cpus"]  # one actor, all CPUs
    three = default_backend_config(3)
    assert three["client_resources"]["num_cpus"] == 1 and three["init_args"]["num_cpus"] == 3
    for bad in (0, 65):
        with pytest.raises(SimulationError, match="actors"):
            default_backend_config(bad)


def test_the_pinned_backend_keeps_two_calls_per_actor_in_flight() -> None:
    """One engine thread per actor left an actor idle whenever both threads held messages of
    sites pinned to the other; two per actor keep every actor's queue fed."""
    from fedseal.sim.engine import pinned_ray_backend

    backend = object.__new__(pinned_ray_backend())
    backend.actors = ("a0", "a1")
    assert backend.num_workers == 4
    backend.actors = tuple(f"a{i}" for i in range(40))
    assert backend.num_workers == 40  # never fewer threads than actors


def test_the_shared_checks_setting_accepts_0_or_1_and_names_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseal.settings import Environment

    def shares_verified(env: dict[str, str]) -> bool:
        return Environment.read(env).sim_share_verified

    assert shares_verified({}) is True
    assert shares_verified({"FEDSEAL_SIM_SHARE_VERIFIED": "1"}) is True
    assert shares_verified({"FEDSEAL_SIM_SHARE_VERIFIED": "0"}) is False
    # The simulation's site builder reads it and names a bad value as a SimulationError.
    monkeypatch.setenv("FEDSEAL_SIM_SHARE_VERIFIED", "false")
    with pytest.raises(SimulationError, match="FEDSEAL_SIM_SHARE_VERIFIED must be 0 or 1, got 'false'"):
        SimulatedSites(("/nonexistent/site-0",))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(sys.platform != "linux", reason="Ray backend, Linux only here")
def test_a_dp_simulation_with_a_server_optimiser_spends_its_budget_and_its_log_verifies(tmp_path: Path) -> None:
    from fedseal.sim.simulate import run_simulate_command

    said: list[str] = []
    code = run_simulate_command(
        sites=3, rounds=2, scheme="iid", alpha=0.5, seed=2, model="mlp", secure=True,
        workdir=tmp_path / "sim", echo=said.append, strategy="FedAdam", strategy_options={"eta": 0.01},
        dp={"epsilon": 6.0, "delta": 1e-5, "clip": 1.0},
    )  # fmt: skip
    text = "\n".join(said)
    assert code == 0, text
    assert "strategy FedAdam, distributed DP epsilon 6.0 at delta 1e-05" in text
    assert "2/2 rounds committed" in text and "verifies" in text
    eps = [float(e) for e in text.split("epsilon after each round ")[1].split(" (")[0].split(", ")]
    assert len(eps) == 2 and eps[0] < eps[1] <= 6.0 and eps[1] > 5.5  # derived noise spends it
    server_toml = (tmp_path / "sim" / "coordinator" / "server.toml").read_text()
    assert 'strategy = "FedAdam"' in server_toml and "[dp]" in server_toml
    assert load_server_config(tmp_path / "sim" / "coordinator" / "server.toml").run.strategy_options == {"eta": 0.01}
    # Every site required DP and charged its own ledger for both rounds.
    for site in sorted((tmp_path / "sim" / "sites").iterdir()):
        assert 'dp = "required"' in (site / "client.toml").read_text()
