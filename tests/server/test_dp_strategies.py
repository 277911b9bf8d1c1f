"""Distributed DP works under every strategy the coordinator accepts: the strategy is handed the
DP round's (unweighted, noisy) mean as it is handed a secure round's weighted mean, so with noise
far below the sites' step every strategy reaches the model it reaches without DP.

Through the real ServerApp (``run_federation``) on the in-process grid of ``_fedgrid``: the
sites' secure side is the protocol's own client session; every site sends the same step, so the
weighted (non-DP) and unweighted (DP) means agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedseal.server import rundir
from fedseal.server.config import load_server_config
from fedseal.server.strategies import SUPPORTED_STRATEGIES
from tests.server._fedgrid import STEP, Federated

# Flower's defaults, except the server learning rates, set so one step moves the model
# measurably (FedAdam & co. move by about eta per coordinate in their first round).
OPTIONS = {
    "FedAvgM": {"server_momentum": 0.9},
    "FedProx": {"proximal_mu": 0.1},
    "FedAdam": {"eta": 0.01},
    "FedAdagrad": {"eta": 0.01},
    "FedYogi": {"eta": 0.01},
}


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the task running in this process (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _final_model(tmp: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, dp: bool) -> dict[str, np.ndarray]:
    fx = Federated(tmp, ["site-a", "site-b", "site-c"], secure=True, rounds=1, min_sites=3)
    text = fx.cfg.path.read_text().replace('strategy = "FedAvg"', f'strategy = "{strategy}"')
    options = OPTIONS.get(strategy, {})
    text += "".join(["\n[run.strategy_options]\n", *(f"{k} = {v!r}\n" for k, v in options.items())])
    if dp:  # a huge budget and a clip just above the step's norm (0.035): noise ~1.5e-4 per
        # coordinate of the mean (3 sites, 2 honest shares counted), 1.5 % of the step
        text += "\n[dp]\nenabled = true\nepsilon = 10000.0\ndelta = 1e-6\nclip = 0.05\n"
    fx.cfg.path.write_text(text)
    fx.cfg = load_server_config(fx.cfg.path)
    assert fx.cfg.run.strategy == strategy and dict(fx.cfg.run.strategy_options) == options
    fx.run(monkeypatch)
    rounds = fx.rounds()
    assert [r["outcome"] for r in rounds] == ["committed"], rounds
    assert ("dp_epsilon" in rounds[0]) is dp
    status = json.loads((fx.cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text())
    return load_file(status["model"])


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("strategy", SUPPORTED_STRATEGIES)
def test_every_strategy_steps_the_same_on_the_dp_mean_as_on_the_secure_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    plain = _final_model(tmp_path / "secure", monkeypatch, strategy, dp=False)
    noisy = _final_model(tmp_path / "dp", monkeypatch, strategy, dp=True)
    assert plain.keys() == noisy.keys()
    moved = False
    for name, value in plain.items():
        # The step is STEP per coordinate; the DP noise ~1.5 % of it (atol: ~7 standard deviations).
        assert np.allclose(noisy[name], value, rtol=0, atol=0.1 * STEP), (name, noisy[name] - value)
        moved |= bool(np.any(np.abs(value) > 0.1 * STEP))
    assert moved  # the strategy did step (the comparison is not between two unchanged models)
