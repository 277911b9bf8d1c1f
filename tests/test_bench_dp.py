"""The DP benchmark's pieces that decide what its tables claim: the central baseline's noise
calibration, the arms it runs, and the table arithmetic (no simulation is run here)."""

from __future__ import annotations

import math

import pytest

from bench.bench_dp import (
    Arm,
    RunResult,
    arm_order,
    central_noise_multiplier,
    cost_table,
    flower_epsilon,
    mean_spread,
    noise_inflation,
    predicted_noise_norm,
    quality_table,
)
from fedseal.privacy import epsilon


@pytest.mark.parametrize(("eps", "rounds"), [(1.0, 10), (8.0, 10), (3.0, 25)])
def test_the_central_noise_multiplier_spends_exactly_the_target_epsilon(
    eps: float, rounds: int
) -> None:
    z = central_noise_multiplier(eps, 1e-5, rounds)
    assert epsilon([1 / (2 * z * z)] * rounds, 1e-5) == pytest.approx(eps, rel=1e-6)
    # A little less noise would overspend: z is the least that meets the target.
    assert epsilon([1 / (2 * (0.999 * z) ** 2)] * rounds, 1e-5) > eps


def test_flowers_own_accountant_agrees_with_the_calibration() -> None:
    z = central_noise_multiplier(8.0, 1e-5, 10)
    assert flower_epsilon(z, 10, 10, 1e-5) == pytest.approx(8.0, rel=1e-3)


def test_more_rounds_or_a_smaller_epsilon_need_more_noise() -> None:
    assert central_noise_multiplier(8.0, 1e-5, 20) > central_noise_multiplier(8.0, 1e-5, 10)
    assert central_noise_multiplier(1.0, 1e-5, 10) > central_noise_multiplier(8.0, 1e-5, 10)


def test_the_calibration_refuses_a_meaningless_target() -> None:
    with pytest.raises(ValueError, match="epsilon > 0"):
        central_noise_multiplier(0.0, 1e-5, 10)


def test_ten_sites_with_four_honest_shares_add_1_58_times_the_accounted_noise() -> None:
    assert noise_inflation(10, 4) == pytest.approx(math.sqrt(2.5))
    assert noise_inflation(10, 10) == 1.0
    with pytest.raises(ValueError, match="honest shares"):
        noise_inflation(10, 0)


def test_the_predicted_noise_norm_of_the_mean_is_z_clip_over_n_per_coordinate() -> None:
    assert predicted_noise_norm(2.0, 1.0, 10, 10_000) == pytest.approx(0.2 * 100)


def test_each_epsilon_runs_fedseal_then_central_and_the_matched_arm_only_at_the_largest() -> None:
    arms = arm_order([1.0, 8.0], matched=True)
    assert arms[:2] == [Arm("secure"), Arm("central")]
    assert arms[2:5] == [Arm("fedseal", 8.0), Arm("central", 8.0), Arm("matched", 8.0)]
    assert arms[5:] == [Arm("fedseal", 1.0), Arm("central", 1.0)]
    assert Arm("matched", 8.0) not in arm_order([1.0, 8.0], matched=False)


def _run(kind: str, eps: float | None, acc: float, **kw: float) -> RunResult:
    return RunResult(Arm(kind, eps), 1, acc, [acc], [0.5], 10.0, **kw)  # type: ignore[arg-type]


def test_mean_spread_reports_percent_points_with_the_sample_deviation() -> None:
    assert mean_spread([0.1, 0.3]) == f"20.0 ± {100 * math.sqrt(0.02):.1f}"
    assert mean_spread([0.5]) == "50.0"
    assert mean_spread([]) == "-"


def test_the_quality_table_puts_fedseal_against_central_at_the_same_epsilon() -> None:
    results = [
        _run("secure", None, 0.85),
        _run("central", None, 0.80),
        _run("fedseal", 8.0, 0.20, noise_multiplier=3.2, accounted_z=2.0),
        _run("fedseal", 8.0, 0.30, noise_multiplier=3.2, accounted_z=2.0),
        _run("central", 8.0, 0.35, noise_multiplier=2.0, accounted_z=2.0),
        _run("matched", 8.0, 0.26, noise_multiplier=3.2),
    ]
    table = quality_table(results, [8.0])
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
    }
    assert rows["no DP (secure / FedAvg)"][1:4] == ["85.0", "80.0", "+5.0"]
    assert rows["8"][1:] == ["25.0 ± 7.1", "35.0", "-10.0", "2.00 / 2.00", "3.20 / 2.00"]
    assert rows["8, central at fedseal's noise"][2:4] == ["26.0", "-1.0"]


def test_the_cost_table_divides_the_dp_medians_by_the_secure_ones() -> None:
    cost = {"round_eval_s": 1.0, "masked_input_s": 0.5, "site_cpu_s": 2.0}
    base = _run("secure", None, 0.8, round_s=0.5, upload_bytes=400.0, **cost)
    dp = [
        _run("fedseal", e, 0.2, round_s=s, upload_bytes=404.0, **cost)
        for e, s in ((8.0, 1.0), (3.0, 1.5), (1.0, 0.4))
    ]
    (ratio,) = [
        line for line in cost_table([base, *dp]).splitlines() if line.startswith("| DP / no DP")
    ]
    cells = [c.strip() for c in ratio.strip("|").split("|")]
    assert cells[2] == "2.00x"  # median DP round 1.0 s over 0.5 s
    assert cells[3:6] == ["1.00x", "1.00x", "1.00x"]
    assert cells[6] == "1.010x"
    assert cost_table([base]) == "(needs a secure and a DP run)"
