"""``fl-audit report`` on the log of a real simulated DP run (the ServerApp and ClientApps on
Flower's simulation engine, MNIST-5k): its evaluation metrics reach the log, and the report
plots ε spent and accuracy per round, beside the plain-words DP statement."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseal.audit.cli import EXIT_OK, app
from fedseal.audit.report import DP_DOES_NOT, DP_PROTECTS, collect_view, dp_guarantee, dp_series
from fedseal.audit.store import MerkleLogStore

runner = CliRunner()
ROUNDS = 3
DELTA = 1e-5


@dataclass(frozen=True)
class SimulatedRun:
    log: Path
    pub: Path
    rounds: tuple[Mapping[str, Any], ...]
    html: str


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> SimulatedRun:
    from fedseal.sim.simulate import prepare_simulation, run_fedseal_simulation

    work = tmp_path_factory.mktemp("dpsim")
    fed = prepare_simulation(
        work / "sim", sites=3, seed=3, run_overrides={"rounds": ROUNDS, "secure": True},
        dp={"epsilon": 4.0, "delta": DELTA, "clip": 1.0},
    )  # fmt: skip
    outcome = run_fedseal_simulation(fed)
    assert outcome.audit_log is not None
    log, pub = Path(outcome.audit_log), fed.server_toml.parent / "coordinator.pub"
    out = work / "report.html"
    result = runner.invoke(
        app, ["report", str(log), "--out", str(out), "--coordinator-key", str(pub)]
    )
    assert result.exit_code == EXIT_OK, result.output
    return SimulatedRun(log, pub, outcome.rounds, out.read_text())


@pytest.mark.timeout(300)
def test_a_simulated_dp_runs_evaluation_metrics_reach_its_log(dp_run: SimulatedRun) -> None:
    assert [r["outcome"] for r in dp_run.rounds] == ["committed"] * ROUNDS
    with MerkleLogStore.open(dp_run.log, read_only=True) as store:
        view = collect_view(store)
    run = next(iter(view.dp))
    eps, acc = dp_series(view, run)
    assert [x for x, _ in acc] == list(range(1, ROUNDS + 1))
    assert [y for _, y in acc] == pytest.approx([r["accuracy"] for r in dp_run.rounds], abs=1e-6)
    assert [y for _, y in eps] == [r["dp_epsilon"] for r in dp_run.rounds]
    assert "no metrics recorded" not in dp_run.html


@pytest.mark.timeout(300)
def test_the_report_plots_epsilon_and_accuracy_per_round_with_the_dp_statement(
    dp_run: SimulatedRun,
) -> None:
    html = dp_run.html
    for r in dp_run.rounds:
        assert f"ε so far, round {r['round']}: {r['dp_epsilon']:.4g}</title>" in html
        assert f"accuracy, round {r['round']}: {r['accuracy']:.4g}</title>" in html
    budget = re.findall(r"budget ε, round \d+: ([0-9.e+-]+)</title>", html)
    assert budget and {float(b) for b in budget} == {4.0}
    last = dp_run.rounds[-1]
    assert dp_guarantee(last["dp_epsilon"], DELTA, ROUNDS) in html
    assert DP_PROTECTS in html.replace("&#x27;", "'") and DP_DOES_NOT in html
