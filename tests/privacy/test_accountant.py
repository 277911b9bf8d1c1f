"""The distributed discrete Gaussian's accountant: per-round ρ, composition, (ε, δ), inverse.

Cross-checks use computations that share no code with ``fedseal.privacy`` or dp-accounting:
Canonne, Kamath & Steinke 2020's zCDP → (ε, δ) conversion optimised over a continuous order,
Bun & Steinke 2016's closed form (an upper bound), the exact (ε, δ) curve of the continuous
Gaussian mechanism of the same ρ (Balle & Wang 2018, a lower bound every sound conversion
respects), and the DDG authors' per-order RDP bound transcribed from their accounting code.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, special

from fedseal.privacy import (
    ORDERS,
    Budget,
    Neighbouring,
    RoundNoise,
    RoundShape,
    epsilon,
    noise_for_target,
    privacy_event,
    round_rho,
    tau,
)

# ---------------------------------------------------------------- independent computations


def _cks_epsilon_at(alpha: float, rdp: float, delta: float) -> float:
    """CKS 2020 Prop. 12: (α, r)-RDP gives (r + ln(1 - 1/α) - (ln δ + ln α)/(α - 1), δ)-DP."""
    return rdp + math.log1p(-1.0 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1.0)


def _cks_epsilon_continuous(rho: float, delta: float) -> float:
    """ε of ρ-zCDP by CKS 2020 Cor. 13, minimised over a *continuous* order α > 1 (scipy)."""
    if delta**2 + math.expm1(-rho) > 0:  # the KL bound already gives ε = 0
        return 0.0

    def f(x: float) -> float:
        alpha = 1.0 + math.exp(x)
        return _cks_epsilon_at(alpha, rho * alpha, delta)

    # coarse scan for the basin, then bounded Brent around it
    xs = [math.log(1e-3) + i * (math.log(1e7) - math.log(1e-3)) / 400 for i in range(401)]
    best = min(range(len(xs)), key=lambda i: f(xs[i]))
    lo, hi = xs[max(best - 1, 0)], xs[min(best + 1, len(xs) - 1)]
    res = optimize.minimize_scalar(f, bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-10})
    return max(0.0, min(float(res.fun), f(xs[best])))


def _bun_steinke_epsilon(rho: float, delta: float) -> float:
    """Bun & Steinke 2016 Prop. 1.3: ρ-zCDP ⇒ (ρ + 2 sqrt(ρ ln(1/δ)), δ)-DP (looser)."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def _gaussian_exact_epsilon(rho: float, delta: float) -> float:
    """The exact ε(δ) of the continuous Gaussian mechanism with Δ²/(2σ²) = ρ (Balle & Wang
    2018, the analytic Gaussian mechanism): δ(ε) = Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ), μ = Δ/σ = sqrt(2ρ)."""
    mu = math.sqrt(2.0 * rho)

    def delta_of(eps: float) -> float:
        return float(special.ndtr(mu / 2 - eps / mu)
                     - math.exp(eps + special.log_ndtr(-mu / 2 - eps / mu)))

    if delta_of(0.0) <= delta:
        return 0.0
    hi = 1.0
    while delta_of(hi) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: delta_of(e) - delta, 0.0, hi, xtol=1e-12))


def _authors_rdp(alpha: float, noise: RoundNoise) -> float:
    """Per-order RDP of one round, transcribed from KLS21's own accounting code
    (google-research/federated distributed_dp/accounting_utils.py, ``ddgauss_epsilon`` and
    ``compute_rdp_dgaussian`` with q = 1: Prop. 14 / Eq. 17), in integer units."""
    shape = noise.shape
    n, d, s = shape.honest_sites, shape.dimension, noise.local_stddev
    t = 10.0 * sum(math.exp(-2 * (math.pi * s) ** 2 * (k / (k + 1))) for k in range(1, n))
    l2_scale = shape.l2_sensitivity / (math.sqrt(n) * s)
    l1_scale = shape.l1_sensitivity / (math.sqrt(n) * s)
    term_1 = (alpha / 2.0) * l2_scale**2 + t * d
    term_2 = (alpha / 2.0) * (l2_scale**2 + 2 * l1_scale * t + t**2 * d)
    term_3 = (alpha / 2.0) * (l2_scale + math.sqrt(d) * t) ** 2
    return min(term_1, term_2, term_3)


def _authors_epsilon(noise: RoundNoise, rounds: int, delta: float) -> float:
    return max(0.0, min(_cks_epsilon_at(a, rounds * _authors_rdp(a, noise), delta)
                        for a in ORDERS if a > 1.01))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


# ---------------------------------------------------------------- strategies

log_rho = st.floats(min_value=math.log(1e-5), max_value=math.log(1e3))
log_delta = st.floats(min_value=math.log(1e-12), max_value=math.log(1e-3))
rounds = st.integers(min_value=1, max_value=2000)


@st.composite
def shapes(draw: st.DrawFn) -> RoundShape:
    return RoundShape(
        clip=draw(st.floats(min_value=0.01, max_value=10.0)),
        granularity=10.0 ** draw(st.floats(min_value=-5.0, max_value=-1.0)),
        dimension=2 ** draw(st.integers(min_value=0, max_value=22)),
        honest_sites=draw(st.integers(min_value=1, max_value=500)),
        beta=draw(st.sampled_from([0.0, math.exp(-0.5), 0.9])),
    )


# ---------------------------------------------------------------- the conversion


@given(log_rho, log_delta, rounds)
def test_epsilon_is_within_one_percent_of_the_continuous_cks_conversion(
    log_total: float, log_d: float, t: int
) -> None:
    rho, delta = math.exp(log_total), math.exp(log_d)
    ours = epsilon([rho / t] * t, delta)
    reference = _cks_epsilon_continuous(rho, delta)
    assert reference * (1 - 1e-9) <= ours  # a grid never beats the continuous optimum
    assert _rel(ours, reference) <= 0.01, (rho, delta, ours, reference)


@given(log_rho, log_delta)
def test_epsilon_lies_between_the_exact_gaussian_and_bun_steinke(
    log_total: float, log_d: float
) -> None:
    rho, delta = math.exp(log_total), math.exp(log_d)
    ours = epsilon([rho], delta)
    # The Gaussian mechanism with this rho is rho-zCDP, so no sound conversion is below its
    # exact curve; Bun-Steinke's closed form is a valid but looser conversion.
    assert _gaussian_exact_epsilon(rho, delta) * (1 - 1e-9) <= ours
    assert ours <= _bun_steinke_epsilon(rho, delta)


def test_reproduces_the_gaussian_value_dp_accounting_asserts() -> None:
    # dp-accounting rdp_privacy_accountant_test.py, test_compute_epsilon_delta_gaussian:
    # "noise multiplier is chosen to obtain exactly (1, 1e-6)-DP": sigma = 4.530877117
    # (the full-batch Gaussian is rho-zCDP with rho = 1 / (2 sigma^2)); they assert eps = 1
    # to 7 places on a 99,000-order grid. Ours: the same within the grid's 1e-5.
    rho = 1.0 / (2.0 * 4.530877117**2)
    assert epsilon([rho], 1e-6) == pytest.approx(1.0, rel=1e-5)


def test_composition_adds_rho() -> None:
    # rho-zCDP composes additively: T rounds of rho are one round of T * rho.
    assert epsilon([0.01] * 100, 1e-5) == pytest.approx(epsilon([1.0], 1e-5), rel=1e-12)
    assert epsilon([0.01, 0.02, 0.03], 1e-5) == pytest.approx(epsilon([0.06], 1e-5), rel=1e-12)


def test_no_rounds_spend_nothing_and_an_unbounded_round_spends_everything() -> None:
    assert epsilon([], 1e-6) == 0.0
    assert epsilon([0.1, math.inf], 1e-6) == math.inf


def test_privacy_event_is_a_composed_zcdp_event() -> None:
    import dp_accounting

    event = privacy_event([0.5, 0.5])
    assert event == dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(0.5), 2)
    mixed = privacy_event([0.5, 0.25])
    assert mixed == dp_accounting.ComposedDpEvent(
        [dp_accounting.ZCDpEvent(0.5), dp_accounting.ZCDpEvent(0.25)]
    )


# ---------------------------------------------------------------- one round's rho


def test_conditional_rounding_bound_matches_hand_computed_values() -> None:
    # c/gamma = 100, d = 1024: unconditional 100 + 32; beta = exp(-0.5):
    # sqrt(100^2 + 1024/4 + sqrt(2 * 0.5) * (100 + 16)) = sqrt(10372).
    unconditional = RoundShape(clip=1.0, granularity=0.01, dimension=1024, honest_sites=1, beta=0)
    conditional = RoundShape(clip=1.0, granularity=0.01, dimension=1024, honest_sites=1)
    assert unconditional.rounded_l2_bound == pytest.approx(132.0, rel=1e-12)
    assert conditional.rounded_l2_bound == pytest.approx(math.sqrt(10372.0), rel=1e-12)
    # integer vectors: ||x||_1 <= ||x||_2 * min(sqrt(d), ||x||_2)
    assert unconditional.l1_sensitivity == pytest.approx(132.0 * 32.0, rel=1e-12)


def test_one_site_is_the_discrete_gaussian_of_cks_theorem_4() -> None:
    # n = 1: tau = 0 and the discrete Gaussian N_Z(0, s^2) with sensitivity D is
    # (D^2 / (2 s^2))-zCDP (Canonne, Kamath & Steinke 2020, §2).
    shape = RoundShape(clip=0.5, granularity=0.01, dimension=64, honest_sites=1, beta=0)
    noise = RoundNoise(shape, 0.3)  # small sigma: tau would be large for n > 1
    assert tau(0.3, 1) == 0.0
    assert round_rho(noise) == pytest.approx(shape.l2_sensitivity**2 / (2 * 0.3**2), rel=1e-12)


def test_large_noise_gives_the_continuous_gaussian_rho() -> None:
    shape = RoundShape(clip=1.0, granularity=1e-3, dimension=2**20, honest_sites=100)
    noise = RoundNoise(shape, 3.0)  # tau ~ 10 * 99 * exp(-pi^2 * 9) ~ 1e-35: negligible
    assert tau(3.0, 100) < 1e-30
    expected = shape.l2_sensitivity**2 / (2 * 100 * 3.0**2)
    assert round_rho(noise) == pytest.approx(expected, rel=1e-12)


def test_tau_matches_the_theorem_sum() -> None:
    s, n = 0.7, 5
    by_hand = 10 * sum(math.exp(-2 * math.pi**2 * s**2 * k / (k + 1)) for k in range(1, n))
    assert tau(s, n) == pytest.approx(by_hand, rel=1e-12)


def test_replacing_a_site_costs_four_times_the_rho_of_zeroing_it() -> None:
    base = RoundShape(clip=1.0, granularity=1e-2, dimension=256, honest_sites=10)
    replace = RoundShape(clip=1.0, granularity=1e-2, dimension=256, honest_sites=10,
                         neighbouring=Neighbouring.REPLACE_ONE)
    assert round_rho(RoundNoise(replace, 50.0)) == pytest.approx(
        4 * round_rho(RoundNoise(base, 50.0)), rel=1e-12
    )


@given(shapes(), st.floats(min_value=0.3, max_value=1e4), st.integers(1, 500),
       log_delta)
def test_round_rho_is_never_below_the_authors_per_order_bound(
    shape: RoundShape, sigma: float, t: int, log_d: float
) -> None:
    # Our pure-rho relaxation of KLS21's bound is sound (never claims less) ...
    noise, delta = RoundNoise(shape, sigma), math.exp(log_d)
    ours = epsilon([round_rho(noise)] * t, delta)
    reference = _authors_epsilon(noise, t, delta)
    assert ours >= reference * (1 - 1e-9)
    # ... and costs nothing once tau has underflowed (sigma >= 2 granularity units).
    if sigma >= 2.0:
        assert _rel(ours, reference) <= 0.01


# ---------------------------------------------------------------- monotonicity


@given(shapes(), st.floats(min_value=0.3, max_value=1e4), st.integers(1, 1000))
def test_more_rounds_spend_more(shape: RoundShape, sigma: float, t: int) -> None:
    rho = round_rho(RoundNoise(shape, sigma))
    assert epsilon([rho] * t, 1e-6) <= epsilon([rho] * (t + 1), 1e-6)
    assert epsilon([rho] * t, 1e-6) < epsilon([rho] * (2 * t + 1), 1e-6) or rho == 0


@given(shapes(), st.floats(min_value=0.3, max_value=1e4), st.floats(1.01, 10.0))
def test_more_noise_spends_less(shape: RoundShape, sigma: float, factor: float) -> None:
    assert round_rho(RoundNoise(shape, sigma * factor)) < round_rho(RoundNoise(shape, sigma))


@given(st.floats(min_value=10.0, max_value=1e5), st.integers(1, 50), st.integers(2, 20))
def test_more_sites_at_equal_total_noise_spend_about_the_same(
    central: float, n: int, factor: int
) -> None:
    # Split the same central variance over n and over factor * n sites (each share at least
    # 2 granularity units so tau is negligible): the guarantee is the central one.
    def spent(sites: int) -> float:
        shape = RoundShape(clip=1.0, granularity=1e-2, dimension=1024, honest_sites=sites)
        sigma = max(central / math.sqrt(sites), 2.0)
        return epsilon([round_rho(RoundNoise(shape, sigma))] * 100, 1e-6)

    if central / math.sqrt(factor * n) >= 2.0:
        assert _rel(spent(factor * n), spent(n)) <= 0.01


def test_tiny_shares_over_many_sites_pay_for_tau() -> None:
    # The sum of many narrow discrete Gaussians is not a discrete Gaussian (KLS21 §3):
    # at equal central variance, sigma = 0.5 per site over 400 sites costs more than
    # sigma = 10 over one site.
    shape_many = RoundShape(clip=1.0, granularity=1e-2, dimension=1024, honest_sites=400)
    shape_one = RoundShape(clip=1.0, granularity=1e-2, dimension=1024, honest_sites=1)
    assert round_rho(RoundNoise(shape_many, 0.5)) > 1.5 * round_rho(RoundNoise(shape_one, 10.0))


# ---------------------------------------------------------------- the inverse


@given(
    st.floats(min_value=0.3, max_value=20.0),
    st.floats(min_value=math.log(1e-10), max_value=math.log(1e-4)),
    st.integers(1, 3000),
    shapes(),
)
def test_noise_for_target_meets_the_budget_tightly(
    eps: float, log_d: float, t: int, shape: RoundShape
) -> None:
    budget = Budget(eps, math.exp(log_d))
    noise = noise_for_target(budget, t, shape)
    spent = epsilon([round_rho(noise)] * t, budget.delta)
    assert spent <= eps
    assert spent >= eps * (1 - 1e-4)
    assert noise.shape == shape


def test_noise_for_target_grows_with_the_rounds() -> None:
    shape = RoundShape(clip=1.0, granularity=1e-3, dimension=2**16, honest_sites=50)
    budget = Budget(2.0, 1e-6)
    few = noise_for_target(budget, 100, shape).local_stddev
    many = noise_for_target(budget, 400, shape).local_stddev
    # zCDP: at large noise rho ~ T / sigma^2, so 4x the rounds is about 2x the noise
    assert 1.9 < many / few < 2.1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0}, {"clip": math.inf}, {"granularity": -1e-3}, {"dimension": 0},
        {"honest_sites": 0}, {"beta": 1.0}, {"beta": -0.1},
    ],
)
def test_round_shape_rejects_out_of_range_values(kwargs: dict[str, float]) -> None:
    base: dict[str, object] = {"clip": 1.0, "granularity": 1e-3, "dimension": 8,
                               "honest_sites": 3}
    base.update(kwargs)
    with pytest.raises(ValueError):
        RoundShape(**base)  # type: ignore[arg-type]


def test_round_shape_rejects_wrong_types() -> None:
    with pytest.raises(TypeError):
        RoundShape(clip=1.0, granularity=1e-3, dimension=8.0, honest_sites=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RoundShape(clip=1.0, granularity=1e-3, dimension=8, honest_sites=True)


def test_budget_and_noise_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        Budget(1.0, 1.0)
    with pytest.raises(ValueError):
        Budget(0.0, 1e-6)
    shape = RoundShape(clip=1.0, granularity=1e-3, dimension=8, honest_sites=3)
    with pytest.raises(ValueError):
        RoundNoise(shape, 0.0)
    with pytest.raises(ValueError):
        epsilon([-0.1], 1e-6)
    with pytest.raises(ValueError):
        epsilon([0.1], 0.0)
