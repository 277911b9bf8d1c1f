"""Privacy accounting of the distributed discrete Gaussian: per-round zCDP, composition, (ε, δ).

One job: turn the parameters of one round of the distributed discrete Gaussian mechanism into
the zero-concentrated DP constant ρ of the published sum, compose rounds and convert to
(ε, δ)-DP with Google's maintained ``dp-accounting`` library; and the inverse, the per-site noise
that meets a target (ε, δ) over a number of rounds.

The mechanism (KLS21 = Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021, Alg. 1-2; docs/dp.md): each site clips
its update to L2 norm ``c``, rotates it (randomized Hadamard), scales by ``1/γ``, rounds to
integers with conditional randomized rounding (parameter β), adds its own N_Z(0, σ²) noise share
(σ in granularity units) and the secure sum releases the sum. All quantities below are in
integer (granularity) units.

Per round, with n = the guaranteed minimum of honest surviving sites whose noise is counted and
d = the padded dimension:

* L2 sensitivity after rounding (KLS21 §3's conditional randomized rounding;
  the authors' ``accounting_utils.rounded_l2_norm_bound``, which cites it as Thm. 1)::

      Δ₂ = min( c/γ + √d,  sqrt( (c/γ)² + d/4 + sqrt(2 ln(1/β)) (c/γ + √d/2) ) )   (β > 0)

  and L1 sensitivity Δ₁ = Δ₂ · min(√d, Δ₂) (integer vectors: ‖x‖₁ ≤ ‖x‖₂²). Under the
  replace-one relation both double (triangle inequality).
* τ = 10 · Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1)) (KLS21 §3, privacy of sums of discrete
  Gaussians): how far the sum of n discrete Gaussians is from one discrete Gaussian of
  variance nσ²; 0 for n = 1 (one discrete Gaussian: Canonne, Kamath & Steinke 2020, §2).
* Rényi DP of the sum (KLS21 Prop. 14 / Eq. 17, as the authors' accounting code
  ``google-research/federated/distributed_dp/accounting_utils.py`` states it), for α ≥ 1::

      D_α ≤ min( α Δ₂²/(2nσ²) + τd,
                 α/2 · (Δ₂²/(nσ²) + 2 Δ₁ τ/(√n σ) + τ² d),
                 α/2 · (Δ₂/(√n σ) + τ √d)² )

  Each term is at most α·ρᵢ for α ≥ 1 (the additive τd ≤ α τd), so the round is ρ-zCDP with
  ρ = min(Δ₂²/(2nσ²) + τd, (Δ₂²/(nσ²) + 2Δ₁τ/(√n σ) + τ²d)/2, (Δ₂/(√n σ) + τ√d)²/2); the third
  is the ε²/2 of KLS21's headline theorem. Pure ρ (no additive ξ) composes by adding, so a
  round is one number in the log. From σ ≈ 2 granularity units on, τ is negligible (σ = 2:
  τ ≈ 7e-17; σ = 3: 3e-38) and ρ = Δ₂²/(2nσ²), the continuous Gaussian's value: the
  relaxation then costs nothing.

Composition and conversion: each round is a ``dp_accounting.ZCDpEvent(ρ)`` (ρ-zCDP is RDP
α ↦ ρα); an ``RdpAccountant`` composes them and converts with Canonne, Kamath & Steinke 2020
Prop. 12 (the tightest RDP → (ε, δ) conversion it has), over the order grid :data:`ORDERS`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedseal.protocol.dp import DpParams

if TYPE_CHECKING:  # dp-accounting (and scipy under it) take seconds to import: loaded on use
    import dp_accounting

__all__ = [
    "ORDERS",
    "Budget",
    "Neighbouring",
    "RoundNoise",
    "RoundShape",
    "dp_round_noise",
    "epsilon",
    "noise_for_target",
    "preload",
    "privacy_event",
    "round_rho",
    "tau",
]

# Rényi orders α for the conversion: α − 1 geometric from 0.011 to 1e5 (1200 points, ratio
# ~1.014). dp-accounting's default grid stops at 1024 with gaps of 2x above 64: for a small
# total ρ (high privacy, optimum α ≈ 1 + sqrt(ln(1/δ)/ρ) in the hundreds) its ε is several
# percent above the optimum (50 % at total ρ = 1e-6, δ = 1e-6); on this grid the gap to the
# continuous optimum measured <= 3e-5 relative for total ρ in [1e-8, 1e4], δ in [1e-12, 1e-3]
# (tests/privacy/test_accountant.py checks <= 1 %). The conversion treats α ≤ 1.01
# with the KL bound only, hence the lower end.
ORDERS: tuple[float, ...] = tuple(float(a) for a in 1.0 + np.geomspace(0.011, 1e5, 1200))


class Neighbouring(enum.Enum):
    """Which pairs of inputs the guarantee distinguishes (one *site* each: site-level DP).

    ``ZERO_OUT``: one site's update present vs replaced by zeros (its noise share still
    counted); sensitivity Δ. The relation KLS21 and TFF analyse ("add/remove one client").
    ``REPLACE_ONE``: one site's update replaced by any other; sensitivity 2Δ (4x the ρ).
    """

    ZERO_OUT = "zero_out"
    REPLACE_ONE = "replace_one"


def _positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True, slots=True)
class Budget:
    """A target (ε, δ)-DP guarantee for the whole run: ε > 0, 0 < δ < 1."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        _positive_finite("epsilon", self.epsilon)
        _positive_finite("delta", self.delta)
        if not self.delta < 1:
            raise ValueError(f"delta must be < 1, got {self.delta!r}")


@dataclass(frozen=True, slots=True)
class RoundShape:
    """Everything about one round that the accountant needs except the noise.

    Attributes:
        clip: L2 clip ``c`` of one site's update, model units.
        granularity: ``γ``, the model-unit size of one integer step (the scale is 1/γ).
        dimension: ``d``, the padded length (the noised coordinates; a multiple of the Hadamard block).
        honest_sites: ``n``, the guaranteed minimum of honest surviving sites whose noise
            shares are in the sum (docs/dp.md: min_survivors minus the colluders the
            coordinator may hold). More survivors only add noise, so this is a lower bound.
        beta: conditional randomized rounding's β in [0, 1); 0 = unconditional rounding
            (Δ₂ = c/γ + √d). KLS21 recommend exp(-0.5).
        neighbouring: :class:`Neighbouring` (default ``ZERO_OUT``).
    """

    clip: float
    granularity: float
    dimension: int
    honest_sites: int
    beta: float = math.exp(-0.5)
    neighbouring: Neighbouring = Neighbouring.ZERO_OUT

    def __post_init__(self) -> None:
        _positive_finite("clip", self.clip)
        _positive_finite("granularity", self.granularity)
        _positive_int("dimension", self.dimension)
        _positive_int("honest_sites", self.honest_sites)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"beta must be a number, got {type(self.beta).__name__}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        if not isinstance(self.neighbouring, Neighbouring):
            raise TypeError("neighbouring must be a Neighbouring")

    @property
    def rounded_l2_bound(self) -> float:
        """The L2 norm bound of one site's rounded integer vector (KLS21 §3; TFF)."""
        scaled = self.clip / self.granularity
        d = float(self.dimension)
        unconditional = scaled + math.sqrt(d)
        if self.beta == 0:
            return unconditional
        squared = scaled**2 + 0.25 * d
        squared += math.sqrt(2.0 * math.log(1.0 / self.beta)) * (scaled + 0.5 * math.sqrt(d))
        return min(unconditional, math.sqrt(squared))

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂ of the integer sum under :attr:`neighbouring`, granularity units."""
        factor = 2.0 if self.neighbouring is Neighbouring.REPLACE_ONE else 1.0
        return factor * self.rounded_l2_bound

    @property
    def l1_sensitivity(self) -> float:
        """Δ₁ of the integer sum: ‖x‖₁ ≤ ‖x‖₂ · min(√d, ‖x‖₂) for integer x, per site."""
        bound = self.rounded_l2_bound
        factor = 2.0 if self.neighbouring is Neighbouring.REPLACE_ONE else 1.0
        return factor * bound * min(math.sqrt(self.dimension), bound)


@dataclass(frozen=True, slots=True)
class RoundNoise:
    """One round as the accountant sees it: its shape and each site's noise share.

    Attributes:
        shape: :class:`RoundShape`.
        local_stddev: σ, the parameter of each site's N_Z(0, σ²) share, granularity units.
    """

    shape: RoundShape
    local_stddev: float

    def __post_init__(self) -> None:
        if not isinstance(self.shape, RoundShape):
            raise TypeError("shape must be a RoundShape")
        _positive_finite("local_stddev", self.local_stddev)

    @property
    def central_stddev(self) -> float:
        """√n · σ: the standard deviation (about) of the counted noise in the sum."""
        return math.sqrt(self.shape.honest_sites) * self.local_stddev


def dp_round_noise(dp: DpParams, *, honest_sites: int | None = None) -> RoundNoise:
    """The accountant's view of a round run with the mechanism's parameters ``dp``.

    One mapping for every party that accounts a round (the site's ledger, the coordinator's
    budget, the audit verifier's recomputation from the logged ``DpParams``), so they all
    compute the same ρ from the same bytes: ``clip``, ``gamma`` (granularity), ``dimension``,
    ``beta`` and ``local_stddev`` carry over; ``n_h = dp.min_survivors - dp.colluding_sites``
    (:attr:`DpParams.honest_survivors`), lowered to ``honest_sites`` when the caller assumes
    fewer honest survivors (a site's own ``max_colluding_fraction``). Neighbouring relation:
    zero-out (KLS21's add/remove one client).

    Raises:
        ValueError: No noise (σ = 0: ρ would be infinite) or no honest survivor.
    """
    honest = dp.min_survivors - dp.colluding_sites
    if honest_sites is not None:
        honest = min(honest, honest_sites)
    if honest < 1:
        raise ValueError(f"a round with {honest} honest survivors has no privacy")
    if not dp.local_stddev > 0:
        raise ValueError("a round without noise (local_stddev 0) has no privacy")
    shape = RoundShape(
        clip=dp.clip,
        granularity=dp.gamma,
        dimension=dp.dimension,
        honest_sites=honest,
        beta=dp.beta,
    )
    return RoundNoise(shape, dp.local_stddev)


def tau(local_stddev: float, sites: int) -> float:
    """KLS21 §3's τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1)) (0 for one site)."""
    _positive_finite("local_stddev", local_stddev)
    _positive_int("sites", sites)
    if sites == 1:
        return 0.0
    k = np.arange(1, sites, dtype=np.float64)
    terms = np.exp(-2.0 * math.pi**2 * local_stddev**2 * k / (k + 1.0))
    return 10.0 * math.fsum(terms.tolist())


def round_rho(noise: RoundNoise) -> float:
    """The zCDP ρ of one round's published sum (module docstring: KLS21 Prop. 14)."""
    shape = noise.shape
    n, d = shape.honest_sites, float(shape.dimension)
    central = noise.central_stddev
    l2_scale = shape.l2_sensitivity / central
    l1_scale = shape.l1_sensitivity / central
    t = tau(noise.local_stddev, n)
    rho_additive = 0.5 * l2_scale**2 + t * d
    rho_l1 = 0.5 * (l2_scale**2 + 2.0 * l1_scale * t + t**2 * d)
    rho_shifted = 0.5 * (l2_scale + t * math.sqrt(d)) ** 2
    return min(rho_additive, rho_l1, rho_shifted)


def preload() -> None:
    """Import dp-accounting (and scipy) now: a party that will account DP rounds pays the
    seconds at start instead of inside its first DP round (where a site's first reply, and a
    benchmark's first round, would carry them)."""
    import dp_accounting  # noqa: F401


def privacy_event(rhos: Sequence[float]) -> dp_accounting.DpEvent:
    """The rounds as one ``dp_accounting`` event: each round a ``ZCDpEvent(ρ)``, composed."""
    import dp_accounting
    values = [float(r) for r in rhos]
    for r in values:
        if math.isnan(r) or r < 0:
            raise ValueError(f"every rho must be >= 0, got {r!r}")
    if not values:
        return dp_accounting.NoOpDpEvent()
    if all(r == values[0] for r in values):
        return dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(values[0]), len(values))
    return dp_accounting.ComposedDpEvent([dp_accounting.ZCDpEvent(r) for r in values])


def _new_accountant() -> dp_accounting.PrivacyAccountant:
    import dp_accounting
    return dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))


def _event_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    return float(_new_accountant().compose(event).get_epsilon(delta))


def epsilon(rhos: Sequence[float], delta: float) -> float:
    """ε at ``delta`` of the models published after rounds with the zCDP ``rhos``.

    Composition by ``dp_accounting``'s RDP accountant (ρ-zCDP events add), conversion by
    Canonne, Kamath & Steinke 2020 Prop. 12. No rounds: 0. A round with ρ = inf: inf.
    """
    _positive_finite("delta", delta)
    if not delta < 1:
        raise ValueError(f"delta must be < 1, got {delta!r}")
    return _event_epsilon(privacy_event(rhos), delta)


# Bracket search limits for noise_for_target: each step halves or doubles σ.
_BRACKET_STEPS = 80


def noise_for_target(budget: Budget, rounds: int, shape: RoundShape) -> RoundNoise:
    """The least per-site σ (granularity units, to a relative 1e-7) for which ``rounds`` rounds
    of ``shape`` stay within ``budget``: ``epsilon([round_rho(result)] * rounds, δ) <= ε``.

    The search is ``dp_accounting.calibrate_dp_mechanism`` (Brent's method; it guarantees the
    returned value meets the target) inside a bracket found from Bun & Steinke 2016's closed
    form ρ + 2 sqrt(ρ ln(1/δ)) = ε, which is looser than the accountant's conversion.
    """
    import dp_accounting
    if not isinstance(budget, Budget):
        raise TypeError("budget must be a Budget")
    if not isinstance(shape, RoundShape):
        raise TypeError("shape must be a RoundShape")
    _positive_int("rounds", rounds)

    def event_for(sigma: float) -> dp_accounting.DpEvent:
        return privacy_event([round_rho(RoundNoise(shape, float(sigma)))] * rounds)

    def gap(sigma: float) -> float:
        return _event_epsilon(event_for(sigma), budget.delta) - budget.epsilon

    log_inv_delta = math.log(1.0 / budget.delta)
    rho_total = (math.sqrt(log_inv_delta + budget.epsilon) - math.sqrt(log_inv_delta)) ** 2
    per_round = rho_total / rounds
    guess = shape.l2_sensitivity / math.sqrt(2.0 * shape.honest_sites * per_round)

    lower = guess / 2.0
    for _ in range(_BRACKET_STEPS):
        if gap(lower) > 0:
            break
        lower /= 2.0
    else:
        raise ValueError("no per-site noise is too small for this budget: check the inputs")
    upper = guess
    for _ in range(_BRACKET_STEPS):
        if gap(upper) <= 0:
            break
        upper *= 2.0
    else:
        raise ValueError(f"no per-site noise below {upper:g} meets {budget}")

    sigma = dp_accounting.calibrate_dp_mechanism(
        _new_accountant,
        event_for,
        budget.epsilon,
        budget.delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
        tol=lower * 1e-7,
    )
    return RoundNoise(shape, float(sigma))
