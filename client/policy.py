"""The site's privacy policy: every limit it enforces on a coordinator, in one place.

Read from ``client.toml`` (``[privacy]`` and the protocol bounds of ``[limits]``) by
:func:`fedseal.client.config.load_client_config`, printed by ``fl-client run`` at start and by
``fl-client policy show``, and handed to the protocol as a
:class:`fedseal.protocol.SitePolicy` and :class:`fedseal.protocol.Limits`. The defaults are the
safe ones: plain training refused, cohorts of at least 3 with at least 2 other sites the site
knows independently of the coordinator, and a floor on the neighbour graph, Shamir threshold
and consistency quorum that holds against a coordinator colluding with a third of a cohort,
failing with probability at most 2^-40 (:mod:`fedseal.protocol.params`).

Example::

    privacy = SitePrivacy(allow_plain=False, max_colluding_fraction=0.25)
    session = ClientSession(..., policy=privacy.protocol_policy(), limits=privacy.limits())
    for line in describe_policy(privacy, limits, trust): print(line)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedseal.client.errors import SiteError
from fedseal.client.training import SiteLimits
from fedseal.protocol import Limits, SitePolicy
from fedseal.protocol.config import DEFAULT_COLLUDING_FRACTION, DEFAULT_SECURITY_BITS
from fedseal.protocol.errors import ConfigError

if TYPE_CHECKING:  # the accountant imports dp-accounting and scipy: only when a budget is used
    from fedseal.privacy import Budget

__all__ = ["SitePrivacy", "SiteRefusal", "describe_policy"]


class SiteRefusal(SiteError):
    """The site's policy refuses what the coordinator asked; the error reply says why
    (``"refused: <reason>"``) and the coordinator records it as a refusal."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")


@dataclass(frozen=True, slots=True)
class SitePrivacy:
    """What the site accepts (see the module docstring; field docs in ``client.toml``).

    Raises:
        ValueError: ``"privacy.KEY: reason"`` (or ``limits.KEY``) for an out-of-range value.
    """

    PRIVACY_KEYS: ClassVar[tuple[str, ...]] = (
        "allow_plain",
        "min_cohort",
        "min_known_peers",
        "max_colluding_fraction",
        "security_bits",
        "max_setup_attempts",
        "evaluate_unverified",
        "dp",
        "epsilon_budget",
        "delta",
        "min_noise_multiplier",
    )
    #: Keys whose value may be absent (``None``) and the type they have when present.
    OPTIONAL_KEYS: ClassVar[dict[str, type]] = {"epsilon_budget": float}
    DP_MODES: ClassVar[tuple[str, ...]] = ("required", "off")
    LIMIT_KEYS: ClassVar[tuple[str, ...]] = ("max_cohort", "max_vector_length", "max_update_clip")

    allow_plain: bool = False
    min_cohort: int = 3
    min_known_peers: int = 2
    max_colluding_fraction: float = DEFAULT_COLLUDING_FRACTION
    security_bits: int = DEFAULT_SECURITY_BITS
    max_setup_attempts: int = 3
    #: Evaluate models the site cannot tie to the coordinator's signed log (no audit address):
    #: a crafted model would probe the site's validation data. Off by default.
    evaluate_unverified: bool = False
    max_cohort: int = Limits().max_cohort
    max_vector_length: int = Limits().max_vector_length
    max_update_clip: float = 1000.0
    #: Differential privacy (docs/dp.md): ``"required"`` refuses rounds without DP; ``"off"``
    #: accepts them (the released sums are then exact). DP rounds are checked and charged to
    #: the ledger (:mod:`fedseal.client.privacy_ledger`) either way.
    dp: str = "off"
    #: ε this site spends over all its DP rounds, all runs together (required with dp on).
    epsilon_budget: float | None = None
    #: δ of the budget and of every ε the site reports; well below 1/(sites that could join).
    delta: float = 1e-6
    #: Least central noise multiplier over the honest survivors it accepts: sqrt(n_h)·σ/Δ₂, the
    #: noise over the rounded sensitivity (Δ₂ ≥ c/γ; docs/dp.md §4).
    min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        self._check_dp()
        if not 2 <= self.min_cohort <= 1 << 16:
            raise ValueError("privacy.min_cohort: must be in [2, 65536] (2 reveals the other site's input)")
        if not 1 <= self.min_known_peers <= 1 << 16:
            raise ValueError("privacy.min_known_peers: must be in [1, 65536]")
        if self.min_known_peers + 1 > self.min_cohort:
            # A cohort always holds the site itself and its known peers.
            object.__setattr__(self, "min_cohort", self.min_known_peers + 1)
        if not 1 <= self.max_setup_attempts <= 16:
            raise ValueError("privacy.max_setup_attempts: must be in [1, 16]")
        if not 2 <= self.max_cohort <= 1 << 16:
            raise ValueError("limits.max_cohort: must be in [2, 65536]")
        if not 1 <= self.max_vector_length <= 1 << 31:
            raise ValueError("limits.max_vector_length: must be in [1, 2^31]")
        if not 0 < self.max_update_clip <= 1e9:
            raise ValueError("limits.max_update_clip: must be in (0, 1e9]")
        try:
            self.protocol_policy()
        except ConfigError as exc:
            key, _, reason = exc.message.partition(" must ")
            raise ValueError(f"privacy.{key.rsplit('.', 1)[-1]}: must {reason}") from exc

    def _check_dp(self) -> None:
        if self.dp not in self.DP_MODES:
            raise ValueError(f'privacy.dp: must be "required" or "off", got {self.dp!r}')
        budget = self.epsilon_budget
        if budget is None:
            if self.dp == "required":
                raise ValueError('privacy.epsilon_budget: required when dp = "required"')
        elif isinstance(budget, bool) or not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"privacy.epsilon_budget: must be a finite number > 0, got {budget!r}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1e-3):
            raise ValueError(f"privacy.delta: must be in (0, 1e-3), got {self.delta!r}")
        z = self.min_noise_multiplier
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"privacy.min_noise_multiplier: must be a finite number >= 0, got {z!r}")

    @property
    def dp_required(self) -> bool:
        """Whether the site refuses rounds without differential privacy."""
        return self.dp == "required"

    def budget(self) -> Budget | None:
        """The site's (ε, δ) budget over all runs, ``None`` when no ``epsilon_budget`` is set."""
        if self.epsilon_budget is None:
            return None
        from fedseal.privacy import Budget

        return Budget(epsilon=self.epsilon_budget, delta=self.delta)

    def protocol_policy(self) -> SitePolicy:
        """The protocol-level policy every :class:`~fedseal.protocol.ClientSession` gets."""
        return SitePolicy(
            max_setup_attempts=self.max_setup_attempts,
            min_cohort=self.min_cohort,
            min_known_peers=self.min_known_peers,
            max_colluding_fraction=self.max_colluding_fraction,
            security_bits=self.security_bits,
            dp_required=self.dp_required,
            min_noise_multiplier=self.min_noise_multiplier,
        )

    def limits(self) -> Limits:
        """Size bounds for every protocol message the site decodes."""
        return Limits(max_cohort=self.max_cohort, max_vector_length=self.max_vector_length)


def describe_policy(
    privacy: SitePrivacy,
    limits: SiteLimits,
    trusted: Mapping[str, str],
    *,
    commitments: str,
) -> Iterator[str]:
    """The effective policy as lines for a person (``fl-client run`` start, ``policy show``).

    Args:
        privacy: The ``[privacy]`` policy.
        limits: The training limits of ``[limits]``.
        trusted: Known peer -> where the site knows it from (``roster``/``peers``/``both``).
        commitments: How models are checked against the audit log (one phrase).
    """
    from fedseal.protocol.params import colluders, least_degree

    gamma = privacy.max_colluding_fraction
    yield (
        "plain training: "
        + ("ALLOWED (this site sends its trained weights in the clear when asked)"
           if privacy.allow_plain else "refused (allow_plain = false)")
    )
    yield (
        f"secure rounds: cohort >= {privacy.min_cohort} sites with >= {privacy.min_known_peers} "
        f"other known sites (in the cohort and in the survivor set), <= {privacy.max_cohort} sites, "
        f"<= {privacy.max_setup_attempts} key-exchange attempts per round"
    )
    examples = ", ".join(
        f"n={n}: k>={least_degree(n, gamma, privacy.security_bits)}" for n in (10, 100, 1000)
    )
    yield (
        f"floor: up to {gamma:.4g} of a cohort colluding with the coordinator "
        f"(n=100: {colluders(100, gamma)} sites), failure <= 2^-{privacy.security_bits}; "
        f"least degree {examples}; quorum (n + floor(gamma n))//2 + 1"
    )
    yield (
        f"training limits: epochs <= {limits.max_epochs}, batch <= {limits.max_batch_size}, "
        f"lr <= {limits.max_learning_rate:g}, gradient clip <= {limits.max_clip_norm:g}, "
        f"update clip <= {privacy.max_update_clip:g}, vector <= {privacy.max_vector_length} values"
    )
    yield _describe_dp(privacy)
    yield f"model commitments: {commitments}"
    if trusted:
        names = ", ".join(f"{s} ({src})" for s, src in sorted(trusted.items()))
        yield f"known peers ({len(trusted)}): {names}"
    else:
        yield "known peers: NONE (no [trust] roster or [peers]): this site joins no secure round"


def _describe_dp(privacy: SitePrivacy) -> str:
    """One line on differential privacy (``[privacy] dp`` and its budget)."""
    if privacy.dp_required:
        head = 'differential privacy: REQUIRED (dp = "required": rounds without DP are refused)'
    else:
        head = (
            'differential privacy: off (dp = "off": rounds without DP are accepted and release '
            "exact sums; DP rounds are still checked and charged)"
        )
    if privacy.epsilon_budget is None:
        budget = "no epsilon budget set"
    else:
        budget = (
            f"budget epsilon {privacy.epsilon_budget:g} at delta {privacy.delta:g} over all runs "
            "(rounds past it refused; fl-client privacy show prints what is spent)"
        )
    return (
        f"{head}; {budget}; central noise multiplier over honest survivors >= "
        f"{privacy.min_noise_multiplier:g}"
    )
