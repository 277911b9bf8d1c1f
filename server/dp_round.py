"""The coordinator's distributed-DP plan: each round's :class:`DpParams` and the budget stop.

One job: turn ``server.toml [dp]`` into the mechanism's parameters for a round of a given
cohort (docs/dp.md §5), and say whether one more round still fits the run's (ε, δ)::

    plan = DpPlan(cfg.dp, rounds=cfg.run.rounds)
    dp = plan.params(length=model.size, cohort=len(nodes), min_survivors=resolved.min_survivors)
    plan.fits(rhos_so_far, dp)          # False: the run stops, "privacy budget reached"

Per round (KLS21 = Kairouz, Liu & Steinke, ICML 2021; TFF ``DistributedDpSumFactory``):

* ``d`` = the padded model length; ``n_h = min_survivors - floor(f * cohort)`` honest noise
  shares, ``f`` the coordinator's assumed colluding fraction (``RoundConfig``'s default, the
  one its automatic threshold and quorum are chosen for; sites check their own, docs/dp.md §4).
* σ (``local_stddev``): from ``[dp] noise_multiplier`` z, ``σ = z c / (γ √n_h)``
  (:meth:`DpParams.from_noise_multiplier`); without it the least σ for which ``run.rounds``
  rounds of this shape stay within (ε, δ) (:func:`fedseal.privacy.noise_for_target`).
* γ (``granularity``): given, or the finest grid whose noisy sum of the whole cohort fits
  ``modulus_bits`` with wrap probability <= 2^-40 (:func:`fedseal.protocol.dp.bits_needed`,
  the sub-Gaussian bound KLS21 §4.2 / TFF's ``_heuristic_scale_factor`` use): with
  ``c' = c/γ`` the sum's per-coordinate variance proxy is ``c'² (n²/B + n z²/n_h)``, so
  ``c' = 0.9 (2^(b-1) - n) / sqrt(2 ln(2d/p) (n²/B + n z²/n_h))``, capped at 2^26 (finer
  grids gain nothing: the rounding inflation is already ~1e-8), then checked with
  ``bits_needed`` and coarsened by 2 until it fits.

The rounds of one plan are deterministic in (length, cohort, min_survivors), so they are
cached: a run with a steady cohort computes them once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedseal.protocol.config import DEFAULT_COLLUDING_FRACTION
from fedseal.protocol.dp import DpParams, bits_needed, rotation_shape
from fedseal.protocol.errors import ConfigError
from fedseal.protocol.params import colluders
from fedseal.server.config import DpSection

if TYPE_CHECKING:  # the accountant loads dp-accounting and scipy: imported only for DP runs
    from fedseal.privacy import Budget

__all__ = ["BUDGET_REACHED", "DpPlan", "round_rho_of"]

BUDGET_REACHED = "privacy budget reached"
"""The run end's reason (and the console's) when the next round would exceed [dp] epsilon."""

WRAP_PROBABILITY = 2.0**-40
MAX_SCALED_CLIP = 2.0**26
_REFERENCE_SCALE = 2.0**16  # c/γ at which z is read off the derived σ (inflation ~1e-6)
_COARSEN_STEPS = 16


def round_rho_of(dp: DpParams) -> float:
    """The round's zCDP ρ as the audit log records and the verifier recomputes it."""
    from fedseal.privacy import dp_round_noise, round_rho

    return round_rho(dp_round_noise(dp))


@dataclass
class DpPlan:
    """``[dp]`` for a run of ``rounds`` rounds (module docstring)."""

    section: DpSection
    rounds: int
    colluding_fraction: float = DEFAULT_COLLUDING_FRACTION
    _cache: dict[tuple[int, int, int], DpParams] = field(default_factory=dict, repr=False)

    @property
    def budget(self) -> Budget:
        from fedseal.privacy import Budget

        return Budget(self.section.epsilon, self.section.delta)

    def params(self, *, length: int, cohort: int, min_survivors: int) -> DpParams:
        """The DP parameters of a round of ``cohort`` sites over a model of ``length`` values.

        Raises:
            ConfigError: No honest survivor is guaranteed, or no granularity fits the field.
        """
        key = (length, cohort, min_survivors)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(length, cohort, min_survivors)
        return cached

    def fits(self, rhos: Sequence[float], dp: DpParams) -> bool:
        """Whether one more round with ``dp`` after rounds of zCDP ``rhos`` stays within ε."""
        from fedseal.privacy import epsilon

        return epsilon([*rhos, round_rho_of(dp)], self.section.delta) <= self.section.epsilon

    def epsilon_after(self, rhos: Sequence[float]) -> float:
        """The run's ε at δ after rounds of zCDP ``rhos``."""
        from fedseal.privacy import epsilon

        return epsilon(list(rhos), self.section.delta)

    # -- building ------------------------------------------------------------------------------

    def _build(self, length: int, cohort: int, min_survivors: int) -> DpParams:
        from fedseal.privacy import RoundShape, noise_for_target

        s = self.section
        dimension, block = rotation_shape(length)
        try:
            colluding = colluders(cohort, self.colluding_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        honest = min_survivors - colluding
        if honest < 1:
            raise ConfigError(
                f"dp: no honest survivor guaranteed: min_survivors {min_survivors} <= {colluding} "
                f"colluders (floor({self.colluding_fraction:.6g} * {cohort}))"
            )

        def make(gamma: float) -> DpParams:
            if s.noise_multiplier is not None:
                return DpParams.from_noise_multiplier(
                    s.noise_multiplier, length=length, clip=s.clip, gamma=gamma, sites=cohort,
                    min_survivors=min_survivors, colluding_fraction=self.colluding_fraction,
                    beta=s.beta, modulus_bits=s.modulus_bits,
                )  # fmt: skip
            shape = RoundShape(s.clip, gamma, dimension, honest, s.beta)
            sigma = noise_for_target(self.budget, self.rounds, shape).local_stddev
            return DpParams(
                dimension, s.clip, gamma, sigma, s.beta, s.modulus_bits, min_survivors, colluding, block
            )

        if s.granularity is not None:
            return make(s.granularity)  # RoundConfig.resolve says so if it does not fit
        z = s.noise_multiplier
        if z is None:  # the central multiplier the derived noise amounts to
            reference = make(s.clip / _REFERENCE_SCALE)
            z = math.sqrt(honest) * reference.local_stddev * reference.gamma / s.clip
        dp = make(s.clip / self._scaled_clip(z, dimension, block, cohort, honest))
        for _ in range(_COARSEN_STEPS):
            if bits_needed(dp, cohort, WRAP_PROBABILITY) <= s.modulus_bits:
                return dp
            dp = make(dp.gamma * 2.0)
        raise ConfigError(
            f"dp: no granularity fits the noisy sum of {cohort} sites into {s.modulus_bits} "
            "bits: use dp.modulus_bits = 64 or less noise"
        )

    def _scaled_clip(self, z: float, dimension: int, block: int, cohort: int, honest: int) -> float:
        n, half = float(cohort), 2.0 ** (self.section.modulus_bits - 1)
        per_unit = n * n / block + n * z * z / honest  # variance proxy per c'^2
        log_term = math.log(2.0 * dimension / WRAP_PROBABILITY)
        scaled = 0.9 * (half - n) / math.sqrt(2.0 * log_term * per_unit)
        return max(1.0, min(MAX_SCALED_CLIP, scaled))
