"""The coordinator's [dp]: each round's DpParams (dimension, survivors, colluders, noise that
meets the budget, a granularity whose noisy sum fits the field), the DP round's accounting in
the audit log, and the run's stop when the next round would pass the budget."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from fedseal.audit.auditor import verify_log
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import DpRound, RunEnd, RunStart
from fedseal.audit.store import MerkleLogStore
from fedseal.crypto.keys import load_private_key
from fedseal.privacy import epsilon
from fedseal.protocol.config import RoundConfig
from fedseal.protocol.dp import bits_needed, rotation_shape
from fedseal.protocol.errors import ConfigError
from fedseal.server.config import DpSection, load_server_config
from fedseal.server.dp_round import BUDGET_REACHED, DpPlan, round_rho_of
from tests.server._fedgrid import Federated

DELTA = 1e-6


def _plan(rounds: int = 10, **changes: Any) -> DpPlan:
    section = DpSection(enabled=True, epsilon=4.0, delta=DELTA, clip=1.0)
    return DpPlan(dataclasses.replace(section, **changes), rounds=rounds)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(("length", "cohort", "survivors"), [(12, 3, 2), (1000, 10, 7), (5000, 50, 34), (109_386, 10, 7)])
def test_derived_noise_spends_the_budget_over_the_planned_rounds_and_the_sum_fits(
    length: int, cohort: int, survivors: int, bits: int
) -> None:
    plan = _plan(modulus_bits=bits)
    dp = plan.params(length=length, cohort=cohort, min_survivors=survivors)
    assert (dp.dimension, dp.block) == rotation_shape(length) and dp.modulus_bits == bits
    assert dp.min_survivors == survivors and dp.colluding_sites == math.floor(cohort / 3)
    rho = round_rho_of(dp)
    assert epsilon([rho] * 10, DELTA) <= 4.0 < epsilon([rho] * 11, DELTA)
    assert bits_needed(dp, cohort) <= bits
    # The finest grid that fits: twice as fine would not (or it is at the 2^26 cap).
    finer = dataclasses.replace(dp, gamma=dp.gamma / 2, local_stddev=dp.local_stddev * 2)
    assert dp.scaled_clip >= 2.0**26 - 1 or bits_needed(finer, cohort) > bits - 1
    assert plan.params(length=length, cohort=cohort, min_survivors=survivors) is dp  # cached


def test_a_given_noise_multiplier_and_granularity_are_used_as_they_are() -> None:
    plan = _plan(noise_multiplier=1.5, granularity=1e-4, modulus_bits=64)
    dp = plan.params(length=100, cohort=9, min_survivors=6)
    assert (dp.gamma, dp.colluding_sites, dp.honest_survivors) == (1e-4, 3, 3)
    assert dp.local_stddev == pytest.approx(1.5 * 1.0 / (1e-4 * math.sqrt(3)))


def test_no_honest_survivor_is_a_config_error_naming_dp() -> None:
    with pytest.raises(ConfigError, match="no honest survivor"):
        _plan().params(length=10, cohort=6, min_survivors=2)


def test_the_budget_check_says_whether_one_more_round_fits() -> None:
    plan = _plan(rounds=3)
    dp = plan.params(length=12, cohort=3, min_survivors=2)
    rho = round_rho_of(dp)
    assert plan.fits([], dp) and plan.fits([rho, rho], dp)
    assert not plan.fits([rho, rho, rho], dp)
    assert plan.epsilon_after([rho, rho]) == epsilon([rho, rho], DELTA)


def test_the_round_config_with_dp_resolves_for_the_cohort() -> None:
    plan = _plan(rounds=5)
    dp = plan.params(length=12, cohort=3, min_survivors=2)
    from fedseal.protocol import QuantizationConfig

    cfg = RoundConfig(
        vector_length=12, quantization=QuantizationConfig.from_clip(1.0, 4096, modulus_bits=32),
        max_weight=100, dp=dp,
    )  # fmt: skip
    params = cfg.resolve(3)
    assert params.dp == dp and params.min_survivors >= dp.min_survivors


# -- the real ServerApp on the in-process grid ------------------------------------------------


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the task running in this process (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _dp_federation(tmp_path: Path, dp: str, *, rounds: int, **sites: dict[str, Any]) -> Federated:
    fx = Federated(
        tmp_path, ["site-a", "site-b", "site-c"], secure=True, rounds=rounds, min_sites=3, **sites
    )
    with fx.cfg.path.open("a") as fh:
        fh.write("\n[dp]\nenabled = true\nclip = 1.0\n" + dp)
    fx.cfg = load_server_config(fx.cfg.path)
    return fx


def _entries(path: Path) -> list[Any]:
    with MerkleLogStore.open(path, read_only=True) as store:
        return [decode_entry(e.data) for e in store.iter_entries()]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("serverapp_identity")
def test_a_dp_run_logs_each_rounds_accounting_and_its_log_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = _dp_federation(tmp_path, "epsilon = 8.0\n", rounds=2)
    fx.run(monkeypatch)
    rounds = fx.rounds()
    assert [r["outcome"] for r in rounds] == ["committed", "committed"]
    path = fx.cfg.coordinator.state_dir / "audit.sqlite"
    entries = _entries(path)
    start = next(e for e in entries if isinstance(e, RunStart))
    assert start.dp_budget == (8.0, DELTA)
    dps = [e for e in entries if isinstance(e, DpRound)]
    assert [e.round for e in dps] == [1, 2]
    assert dps[-1].epsilon_so_far <= 8.0 and rounds[-1]["dp_epsilon"] == dps[-1].epsilon_so_far
    key = load_private_key(fx.cfg.coordinator.key, None).public_key()
    result = verify_log(path, coordinator_key=key)
    assert result.dp_runs[0][1:] == (2, dps[-1].epsilon_so_far, DELTA)
    # Derived noise: the two planned rounds spend (almost) the whole budget.
    assert dps[-1].epsilon_so_far > 7.0


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("serverapp_identity")
def test_the_run_stops_committed_when_the_next_round_would_pass_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A fixed noise multiplier of 1 costs rho ~ 0.5 per round: at delta 1e-6 two rounds
    # (epsilon ~ 7.9) fit into 9, a third (~ 10) does not.
    fx = _dp_federation(tmp_path, "epsilon = 9.0\nnoise_multiplier = 1.0\n", rounds=5)
    fx.run(monkeypatch)
    rounds = fx.rounds()
    assert [r["outcome"] for r in rounds] == ["committed", "committed"]
    path = fx.cfg.coordinator.state_dir / "audit.sqlite"
    entries = _entries(path)
    dps = [e for e in entries if isinstance(e, DpRound)]
    end = entries[-1]
    assert isinstance(end, RunEnd) and end.final_round == 2
    assert end.reason.startswith(BUDGET_REACHED)
    assert epsilon([e.rho for e in dps], DELTA) <= 9.0 < epsilon([*(e.rho for e in dps), dps[-1].rho], DELTA)
    assert f"fedseal: {BUDGET_REACHED}" in capsys.readouterr().out
    key = load_private_key(fx.cfg.coordinator.key, None).public_key()
    assert verify_log(path, coordinator_key=key).runs[0][1:3] == ("completed", 2)


def _audit_rounds(path: Path) -> tuple[list[Any], list[DpRound]]:
    from fedseal.audit.entries import RoundRecord

    entries = _entries(path)
    return [e for e in entries if isinstance(e, RoundRecord)], [
        e for e in entries if isinstance(e, DpRound)
    ]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("serverapp_identity")
def test_a_round_abandoned_after_its_noisy_sum_was_unmasked_still_spends_privacy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedseal.audit.entries import RoundStatus
    from fedseal.audit.errors import AuditVerificationError
    from fedseal.server.checkpoint import CheckpointStore
    from tests.audit.logbuilder import BuiltLog, rewrite_log

    # Round 1's sum is unmasked, then its checkpoint cannot be written (a full disk).
    real_commit = CheckpointStore.commit

    def failing_commit(self: CheckpointStore, state: Any, arrays: Any) -> Any:
        if state.round == 1:
            raise OSError(28, "No space left on device")
        return real_commit(self, state, arrays)

    monkeypatch.setattr(CheckpointStore, "commit", failing_commit)
    fx = _dp_federation(tmp_path, "epsilon = 8.0\n", rounds=2)
    fx.run(monkeypatch)
    first, second = fx.rounds()
    assert first["failure_kind"] == "checkpoint" and "No space left" in first["failure"]
    assert first["outcome"].startswith("failed (the checkpoint could not be written")
    assert second["outcome"] == "committed"
    path = fx.cfg.coordinator.state_dir / "audit.sqlite"
    results, dps = _audit_rounds(path)
    assert [r.status for r in results] == [RoundStatus.FAILED, RoundStatus.COMPLETED]
    assert results[0].new_model_digest == results[0].base_model_digest
    assert [e.round for e in dps] == [1, 2]
    # epsilon counts the abandoned round: after round 2 it is that of both rounds' rho.
    assert first["dp_epsilon"] == dps[0].epsilon_so_far
    assert second["dp_epsilon"] == dps[1].epsilon_so_far == epsilon([dps[0].rho, dps[1].rho], DELTA)
    assert dps[1].epsilon_so_far > dps[0].epsilon_so_far
    out = capsys.readouterr().out
    assert any("round 1/2: failed" in line and "DP epsilon" in line for line in out.splitlines())
    key = load_private_key(fx.cfg.coordinator.key, None).public_key()
    assert verify_log(path, coordinator_key=key).dp_runs[0][1:3] == (2, dps[1].epsilon_so_far)
    # The same log without round 1's accounting (re-signed by the coordinator) fails.
    omitted = rewrite_log(
        BuiltLog(path, load_private_key(fx.cfg.coordinator.key, None), {}, {}, b"", 2),
        tmp_path / "omitted.sqlite",
        lambda e: [] if isinstance(e, DpRound) and e.round == 1 else [e],
    )
    with pytest.raises(AuditVerificationError) as err:
        verify_log(omitted, coordinator_key=key)
    assert err.value.check == "dp-round"
    assert "round 1 of a DP run was abandoned after it accepted masked inputs" in str(err.value)


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("serverapp_identity")
def test_a_round_abandoned_before_any_masked_input_spends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedseal.audit.entries import RoundStatus
    from fedseal.protocol import records

    # site-c answers round 1's setup with an error: the round is abandoned before any masked
    # input, so nothing is released (site-c's own ledger is its business).
    stage = records.message_type("train", records.SECURE_STAGE)
    fx = _dp_federation(
        tmp_path, "epsilon = 8.0\n", rounds=2, **{"site-c": {"error_at": (1, stage, "disk error")}}
    )
    fx.run(monkeypatch)
    first, second = fx.rounds()
    assert "abandoned" in first["outcome"] and "dp_epsilon" not in first
    results, dps = _audit_rounds(fx.cfg.coordinator.state_dir / "audit.sqlite")
    assert [r.status for r in results] == [RoundStatus.FAILED, RoundStatus.COMPLETED]
    assert [e.round for e in dps] == [2]
    assert second["dp_epsilon"] == dps[0].epsilon_so_far == epsilon([dps[0].rho], DELTA)
    key = load_private_key(fx.cfg.coordinator.key, None).public_key()
    verify_log(fx.cfg.coordinator.state_dir / "audit.sqlite", coordinator_key=key)
