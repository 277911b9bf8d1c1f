"""Round configuration: every size bound and every parameter of a secure round.

* :class:`Limits` bounds every untrusted input (python-tuf's ``UpdaterConfig`` idea):
  decoders check lengths against it *before* allocating.
* :class:`QuantizationConfig`: clip bound (an integer number of millionths, so signed
  payloads carry no floats), number of quantization levels per unit of clip, and the
  modulus ``2**modulus_bits`` (32 or 64).
* :class:`RoundConfig`: vector length, quantization, maximum weight (example count),
  neighbour-graph degree and Shamir threshold (``None`` = automatic), minimum survivors.

:class:`SitePolicy` is the site-side counterpart: how many setup attempts per round a site
answers (each is a fresh neighbour-graph draw a coordinator could choose among), the smallest
cohort it joins, how many independently known peers it needs, and the colluding fraction and
security bits its floor for degree, threshold and quorum is computed for
(:mod:`fedseal.protocol.params`).

:meth:`RoundConfig.resolve` validates the configuration for a concrete cohort size and
returns the :class:`RoundParameters` that go, signed, into the round setup message. The
same checks run on a site when it receives the setup (a coordinator cannot propose a
threshold at or below half a neighbourhood, or a quantization that could wrap around).

Distributed DP (docs/dp.md): ``RoundConfig.dp`` (a :class:`~fedseal.protocol.dp.DpParams`)
makes every round a distributed-discrete-Gaussian round; the setup then carries the DP
parameters and the round's rotation seed, the secure sum runs over ``dp.dimension`` elements
and the quantizer is not used (only its ``modulus_bits``). :func:`check_dp_round` is what the
coordinator and, with its own :class:`SitePolicy`, every site check before taking part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .contract import CONTRACT_DIGEST_BYTES
from .errors import ConfigError, WeakRoundError

if TYPE_CHECKING:  # dp imports quantize, which imports this module
    from .dp import DpParams

__all__ = [
    "DpPolicyError",
    "DpRequiredError",
    "Limits",
    "QuantizationConfig",
    "RoundConfig",
    "RoundParameters",
    "SitePolicy",
    "check_colluding_fraction",
    "check_dp_round",
    "check_security_bits",
    "consistency_quorum",
    "validate_parameters",
]

MODULUS_BITS = (32, 64)

MAX_SETUP_ATTEMPTS_LIMIT = 16
"""Upper bound on ``max_setup_attempts`` (each attempt is one more graph draw)."""


def _check_attempts(value: object, where: str) -> None:
    if not isinstance(value, int) or not 1 <= value <= MAX_SETUP_ATTEMPTS_LIMIT:
        raise ConfigError(
            f"{where}.max_setup_attempts must be an integer in 1..{MAX_SETUP_ATTEMPTS_LIMIT}, "
            f"got {value!r}"
        )


DEFAULT_COLLUDING_FRACTION = 1 / 3
"""Default ``max_colluding_fraction`` (gamma): the coordinator may collude with a third of a cohort."""

DEFAULT_SECURITY_BITS = 40
#: Fewest quantization levels an automatically chosen field keeps (RoundConfig.auto_field).
MIN_AUTO_LEVELS = 256
"""Default security parameter: a graph/threshold choice fails with probability <= 2^-40."""


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """What a site accepts from a coordinator's rounds (checked before it answers).

    Every field is the site's own (``client.toml`` ``[privacy]``), never the coordinator's.

    Attributes:
        max_setup_attempts: Setup attempts per round the site answers: it answers only
            attempt numbers ``0..max_setup_attempts-1``, each higher than the last it
            answered for that round, so a coordinator can draw at most this many neighbour
            graphs per round (see :mod:`fedseal.protocol.graph`). 1..16, default 3.
        min_cohort: Smallest cohort (including this site) the site joins. At least 2,
            default 3: with two sites the sum reveals the other site's input.
        min_known_peers: Fewest *other* sites, each tied to the site's own trust anchor,
            that must be in the cohort and in the survivor set the site signs. Default 2.
        max_colluding_fraction: gamma, the largest fraction of a cohort that may collude
            with the coordinator (default 1/3). From it and ``security_bits`` the site
            derives its floor for the neighbour-graph degree, the Shamir threshold, the
            consistency quorum and the dropouts it tolerates per ring window
            (:mod:`fedseal.protocol.params`).
        security_bits: sigma: the floor's failure probability is at most ``2**-sigma``
            (default 40).
        dp_required: Refuse every setup without distributed DP (:class:`DpRequiredError`).
        min_noise_multiplier: Floor on a DP round's central noise multiplier
            ``z = sqrt(h) * local_stddev * gamma / clip`` over the ``h = min_survivors -
            floor(max_colluding_fraction * n)`` honest survivors this site counts on
            (docs/dp.md §4). Default 0: any DP round is accepted, ``dp_required`` or not.
    """

    max_setup_attempts: int = 3
    min_cohort: int = 3
    min_known_peers: int = 2
    max_colluding_fraction: float = DEFAULT_COLLUDING_FRACTION
    security_bits: int = DEFAULT_SECURITY_BITS
    dp_required: bool = False
    min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        _check_attempts(self.max_setup_attempts, "site_policy")
        if not isinstance(self.min_cohort, int) or not 2 <= self.min_cohort <= 1 << 16:
            raise ConfigError(
                f"site_policy.min_cohort must be an integer in 2..65536, got {self.min_cohort!r}"
            )
        if not isinstance(self.min_known_peers, int) or not 1 <= self.min_known_peers <= 1 << 16:
            raise ConfigError(
                "site_policy.min_known_peers must be an integer in 1..65536, "
                f"got {self.min_known_peers!r}"
            )
        check_colluding_fraction(self.max_colluding_fraction, "site_policy")
        check_security_bits(self.security_bits, "site_policy")
        if not isinstance(self.dp_required, bool):
            raise ConfigError(f"site_policy.dp_required must be a bool, got {self.dp_required!r}")
        z = self.min_noise_multiplier
        if (
            isinstance(z, bool)
            or not isinstance(z, int | float)
            or not math.isfinite(z)
            or z < 0
        ):
            raise ConfigError(
                f"site_policy.min_noise_multiplier must be a finite number >= 0, got {z!r}"
            )


class DpPolicyError(WeakRoundError):
    """A DP round a site refuses: below its noise floor, assuming more honest survivors than
    its own colluding fraction leaves, or with a modulus too small for the noisy sum.

    Attributes:
        parameter: The offending round parameter (``"dp"``, ``"local_stddev"``,
            ``"min_survivors"``, ``"modulus_bits"``, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        parameter: str,
        site: str | None = None,
        round: int | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(
            f"{message} (parameter {parameter})", site=site, round=round, stage=stage
        )
        self.parameter = parameter


class DpRequiredError(DpPolicyError):
    """The site requires distributed DP (``SitePolicy.dp_required``) and the setup has none (or
    one that adds no noise)."""


def check_colluding_fraction(value: object, where: str) -> None:
    """Raise unless ``value`` is a number in [0, 1/2)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < 0.5
    ):
        raise ConfigError(f"{where}.max_colluding_fraction must be in [0, 0.5), got {value!r}")


def check_security_bits(value: object, where: str) -> None:
    """Raise unless ``value`` is an integer in 8..128."""
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 128:
        raise ConfigError(f"{where}.security_bits must be an integer in 8..128, got {value!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Size bounds for untrusted input. Decoders check these before allocating.

    Attributes:
        max_cohort: Most sites in one round.
        max_vector_length: Most elements in a model-update vector.
        max_site_id_bytes: Longest site id (UTF-8 bytes).
        max_message_bytes: Largest envelope on the wire (bulk vectors travel beside it).
        max_ciphertext_bytes: Largest encrypted share pair.
        max_share_bytes: Largest encoded Shamir share.
        max_signature_bytes: Largest DER signature (P-256 needs at most 72).
        max_public_key_bytes: Largest DER public key (P-256 SubjectPublicKeyInfo is 91).
    """

    max_cohort: int = 1000
    max_vector_length: int = 1 << 28
    max_site_id_bytes: int = 64
    max_message_bytes: int = 16 << 20
    max_ciphertext_bytes: int = 1024
    max_share_bytes: int = 512
    max_signature_bytes: int = 80
    max_public_key_bytes: int = 256

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    """Clip-and-quantize parameters.

    A value ``x`` is clipped to ``[-clip, clip]`` and mapped to the integer
    ``stochastic_round(x * levels / clip)`` in ``[-levels, levels]``, multiplied by the
    site's weight and stored in two's complement modulo ``2**modulus_bits``.

    Attributes:
        clip_micros: Clip bound in millionths (``clip = clip_micros / 1e6``).
        levels: Quantization levels per clip bound (the step is ``clip / levels``).
        modulus_bits: 32 (uint32 arithmetic) or 64 (uint64 arithmetic).
    """

    clip_micros: int
    levels: int
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.clip_micros, int) or not 0 < self.clip_micros < 1 << 63:
            raise ConfigError(
                f"quantization.clip_micros must be in 1..2^63-1, got {self.clip_micros!r}"
            )
        if not isinstance(self.levels, int) or not 0 < self.levels < 1 << 31:
            raise ConfigError(f"quantization.levels must be in 1..2^31-1, got {self.levels!r}")
        if self.modulus_bits not in MODULUS_BITS:
            raise ConfigError(
                f"quantization.modulus_bits must be 32 or 64, got {self.modulus_bits!r}"
            )

    @classmethod
    def from_clip(cls, clip: float, levels: int, modulus_bits: int = 32) -> QuantizationConfig:
        """Build from a float clip bound (rounded to millionths).

        Raises:
            ConfigError: If the clip bound rounds to zero or is not finite.
        """
        if not math.isfinite(clip) or clip <= 0:
            raise ConfigError(f"quantization.clip must be a positive finite number, got {clip!r}")
        return cls(clip_micros=round(clip * 1_000_000), levels=levels, modulus_bits=modulus_bits)

    @property
    def clip(self) -> float:
        """The clip bound as a float."""
        return self.clip_micros / 1_000_000

    @property
    def step(self) -> float:
        """The quantization step ``clip / levels`` (the per-element error bound)."""
        return self.clip / self.levels


def consistency_quorum(
    threshold: int,
    cohort_size: int,
    max_colluding_fraction: float = DEFAULT_COLLUDING_FRACTION,
) -> int:
    """Valid survivor-set signatures a site needs before it reveals shares.

    ``max(threshold, (n + c) // 2 + 1)`` with ``c = floor(gamma * n)`` colluders: honest
    sites sign one survivor set each and colluders sign anything, so two different sets
    could both reach ``q`` signatures only if ``2q - 2c <= n - c``. ``t`` alone (any
    ``t > k/2``), or a bare majority, is not enough: a coordinator showing two groups
    different sets gets one site's self-mask seed from one group and its partners' mask keys
    from the other (see :func:`fedseal.protocol.params.safe_quorum`).
    """
    from .params import safe_quorum

    return safe_quorum(cohort_size, max_colluding_fraction, threshold)


@dataclass(frozen=True, slots=True)
class RoundParameters:
    """The validated parameters of one round (signed into the setup message).

    Attributes:
        vector_length: Elements in the update vector.
        quantization: Clip / levels / modulus.
        max_weight: Largest example count a site may claim.
        degree: Neighbour-graph degree ``k`` (``n - 1`` means complete graph).
        threshold: Shamir threshold ``t`` per neighbourhood, ``k/2 < t <= k``.
        min_survivors: Fewest masked inputs the sum may contain.
        dp: The round's distributed-DP mechanism, or ``None`` (a quantized, weighted round).
        rotation_seed: With ``dp``: the 32-byte seed of the public randomized Hadamard
            rotation (:func:`fedseal.protocol.dp.rotation_seed_for`); ``b""`` without.
        contract_digest: The run's data contract (:mod:`fedseal.protocol.contract`): its
            32-byte digest, which every site's dataset must have been prepared under; ``b""``
            for a run without a contract.
    """

    vector_length: int
    quantization: QuantizationConfig
    max_weight: int
    degree: int
    threshold: int
    min_survivors: int
    dp: DpParams | None = None
    rotation_seed: bytes = b""
    contract_digest: bytes = b""

    @property
    def masked_length(self) -> int:
        """Elements of the masked vector and of the sum: ``dp.dimension`` with DP (the
        padded, rotated vector), else ``vector_length``."""
        return self.dp.dimension if self.dp is not None else self.vector_length


def validate_parameters(params: RoundParameters, cohort_size: int, limits: Limits) -> None:
    """Check that ``params`` are safe and consistent for ``cohort_size`` sites.

    Raises:
        ConfigError: Naming the offending parameter and its limits.
    """
    n = cohort_size
    if not 2 <= n <= limits.max_cohort:
        raise ConfigError(f"cohort size {n} outside 2..limits.max_cohort={limits.max_cohort}")
    if not 1 <= params.vector_length <= limits.max_vector_length:
        raise ConfigError(
            f"vector_length {params.vector_length} outside 1..limits.max_vector_length="
            f"{limits.max_vector_length}"
        )
    k, t = params.degree, params.threshold
    if not 1 <= k <= n - 1:
        raise ConfigError(f"degree {k} outside 1..{n - 1} for a cohort of {n}")
    if k < n - 1 and k % 2:
        raise ConfigError(f"degree {k} must be even for a sparse (Harary) graph")
    if not (2 * t > k and t <= k):
        raise ConfigError(f"threshold {t} must satisfy degree/2 < threshold <= degree (degree {k})")
    if not t <= params.min_survivors <= n:
        raise ConfigError(f"min_survivors {params.min_survivors} outside threshold {t}..cohort {n}")
    if not 1 <= params.max_weight < 1 << 62:
        raise ConfigError(f"max_weight {params.max_weight} outside 1..2^62-1")
    if len(params.contract_digest) not in (0, CONTRACT_DIGEST_BYTES):
        raise ConfigError(
            f"contract_digest must be empty or {CONTRACT_DIGEST_BYTES} bytes, "
            f"got {len(params.contract_digest)}"
        )
    if params.dp is not None:
        _validate_dp_shape(params, params.dp, limits)
        return  # the quantizer is not used: check_dp_round bounds the noisy sum instead
    if params.rotation_seed:
        raise ConfigError("rotation_seed without dp")
    q = params.quantization
    bound = (1 << (q.modulus_bits - 1)) - 1
    worst = n * q.levels * params.max_weight
    if worst > bound:
        max_levels = bound // (n * params.max_weight)
        raise ConfigError(
            f"{n} sites x {q.levels} levels x max_weight {params.max_weight} = {worst} does not fit "
            f"the signed range of Z_2^{q.modulus_bits} (at most {bound}); use levels <= {max_levels}, "
            f"a smaller max_weight, fewer sites, or modulus_bits=64"
        )


def _validate_dp_shape(params: RoundParameters, dp: DpParams, limits: Limits) -> None:
    """The DP parameters fit the round's vector, modulus and survivor count."""
    from .dp import rotation_shape

    shape = rotation_shape(params.vector_length)
    if (dp.dimension, dp.block) != shape:
        raise ConfigError(
            f"dp.dimension {dp.dimension} in blocks of {dp.block} is not the rotation shape "
            f"{shape[0]} in blocks of {shape[1]} of vector_length {params.vector_length}"
        )
    if dp.dimension > limits.max_vector_length:
        raise ConfigError(
            f"dp.dimension {dp.dimension} exceeds limits.max_vector_length="
            f"{limits.max_vector_length}"
        )
    if dp.modulus_bits != params.quantization.modulus_bits:
        raise ConfigError(
            f"dp.modulus_bits {dp.modulus_bits} differs from the secure sum's "
            f"quantization.modulus_bits {params.quantization.modulus_bits}"
        )
    if dp.min_survivors > params.min_survivors:
        raise ConfigError(
            f"dp.min_survivors {dp.min_survivors} exceeds the round's min_survivors "
            f"{params.min_survivors}: the sum may hold fewer noise shares than accounted"
        )


NOISE_FLOOR_SLACK = 1e-3
""":func:`check_dp_round`'s relative slack on the noise floor."""


def check_dp_round(
    params: RoundParameters,
    cohort_size: int,
    colluding_fraction: float,
    *,
    min_noise_multiplier: float = 0.0,
    dp_required: bool = False,
) -> None:
    """The DP checks of a round, for a party assuming ``colluding_fraction`` (docs/dp.md §4).

    * ``dp_required`` and no DP: :class:`DpRequiredError` (parameter ``dp``).
    * Honest shares: the ``h = min_survivors - floor(colluding_fraction * n)`` this party
      counts on must be at least the ``dp.honest_survivors`` the noise (and the ledger's
      accounting) assumes (parameter ``min_survivors``).
    * Noise floor: ``sqrt(h) * local_stddev / Delta >= min_noise_multiplier`` (parameter
      ``local_stddev``), ``Delta`` the rounded sensitivity in grid units
      (``dp.norm_bound``, at least ``clip / gamma``): the noise relative to what one site can
      move the sum, so a coarse grid cannot pass the floor with noise that is small next to
      its rounding (found by review: ``clip / gamma = 3`` passed a floor of 5 at 32 times the
      floor's rho). Met within :data:`NOISE_FLOOR_SLACK` (a coordinator calibrating to
      ``clip / gamma`` at a fine grid is ~1e-6 below). With ``dp_required``, no noise at all
      is refused whatever the floor.
    * Modulus: :func:`fedseal.protocol.dp.bits_needed` for all ``n`` cohort members' shares
      (the sum wraps with probability <= 2^-40) must not exceed ``modulus_bits``.

    Call after :func:`validate_parameters`. Raises :class:`DpPolicyError` (a
    :class:`WeakRoundError`) naming the parameter; nothing without DP unless required.
    """
    from .dp import bits_needed
    from .params import colluders

    dp = params.dp
    if dp is None:
        if dp_required:
            raise DpRequiredError(
                "this site takes part only in rounds with distributed DP, the setup has none",
                parameter="dp",
            )
        return
    honest = params.min_survivors - colluders(cohort_size, colluding_fraction)
    if honest < dp.honest_survivors:
        raise DpPolicyError(
            f"the DP noise assumes {dp.honest_survivors} honest survivors, but with "
            f"min_survivors {params.min_survivors} and up to "
            f"floor({colluding_fraction:.6g} * {cohort_size}) colluders only {max(honest, 0)} "
            "are guaranteed",
            parameter="min_survivors",
        )
    if dp_required and dp.local_stddev == 0.0:
        raise DpRequiredError(
            "this site takes part only in rounds with distributed DP, the setup adds no noise",
            parameter="local_stddev",
        )
    multiplier = math.sqrt(honest) * dp.local_stddev / dp.norm_bound
    if multiplier < min_noise_multiplier * (1.0 - NOISE_FLOOR_SLACK):
        raise DpPolicyError(
            f"central noise multiplier {multiplier:.6g} over {honest} honest survivors (noise "
            f"over the rounded sensitivity, {dp.norm_bound:.6g} grid units for clip/gamma "
            f"{dp.scaled_clip:.6g}) is below this site's floor {min_noise_multiplier:.6g}",
            parameter="local_stddev",
        )
    needed = bits_needed(dp, cohort_size)
    if needed > dp.modulus_bits:
        raise DpPolicyError(
            f"the noisy sum of {cohort_size} sites needs {needed} bits, the modulus has "
            f"{dp.modulus_bits}: use a coarser gamma, less noise or modulus_bits=64",
            parameter="modulus_bits",
        )


@dataclass(frozen=True, slots=True)
class RoundConfig:
    """Coordinator-side configuration of secure rounds.

    Attributes:
        vector_length: Elements in the update vector.
        quantization: Clip / levels / modulus.
        max_weight: Largest example count a site may claim (bounds the sum).
        degree: Neighbour-graph degree, or ``None``: the complete graph up to
            ``complete_graph_max`` sites, above it the least degree the sites' floor accepts
            (:func:`fedseal.protocol.params.least_degree` with ``window_dropouts``).
        threshold: Shamir threshold per neighbourhood, or ``None`` for the least the floor
            accepts (:func:`fedseal.protocol.params.least_threshold`).
        min_survivors: Fewest masked inputs in a sum, or ``None`` for the consistency quorum.
        complete_graph_max: Cohorts up to this size use the complete graph.
        round_timeout_s: Seconds a round setup stays valid (its ``expires_at``).
        limits: Size bounds for untrusted input.
        max_setup_attempts: Setup attempts per round the coordinator makes: when cohort
            members do not advertise keys it re-sends the setup to those that did (a new
            attempt with fresh keys) until this many attempts are spent. 1..16, default 3;
            sites answer at most their own :attr:`SitePolicy.max_setup_attempts`.
        max_colluding_fraction: gamma the automatic degree, threshold and ``min_survivors``
            are chosen for (sites refuse rounds below *their own* floor,
            :mod:`fedseal.protocol.params`; keep this at least the sites' value).
        security_bits: sigma of that floor (the same remark).
        window_dropouts: Dropouts per window of ``k/2`` consecutive ring positions a sparse
            round must tolerate (sites refuse survivor sets with more than their floor
            allows); a larger value asks for a larger automatic degree. Used when
            ``dropout_tolerance`` is 0.
        dropout_tolerance: The fraction of the cohort that may drop out during a round
            (0 <= delta < 1): the automatic degree is then the least one that is safe and
            completes with that many random dropouts except with probability
            ``2**-completion_bits`` (:func:`fedseal.protocol.params.least_degree_for_dropouts`,
            Bell et al.'s choice of ``k`` from ``n``, delta and gamma, computed exactly).
        completion_bits: See ``dropout_tolerance``.
        auto_field: Choose the secure sum's field for the cohort: the quantization's modulus
            if ``n * levels * max_weight`` fits it, else 64 bits, else the most levels
            (precision) that fit 64 bits, down to :data:`MIN_AUTO_LEVELS` (the resolved
            parameters, signed into the setup, carry the choice). ``False``: the quantization
            as given, refused if it does not fit.
        contract_digest: The run's data contract digest (32 bytes, or ``b""`` for none),
            signed into every setup (:attr:`RoundParameters.contract_digest`).
        dp: Distributed DP for every round (docs/dp.md), e.g. from
            :meth:`DpParams.from_noise_multiplier`, or ``None``. Its ``dimension`` must be the
            padded ``vector_length``, its ``modulus_bits`` the quantization's; an automatic
            ``min_survivors`` is raised to ``dp.min_survivors``. The sum is unweighted and the
            quantizer (clip, levels, ``max_weight``) is not used.
    """

    vector_length: int
    quantization: QuantizationConfig
    max_weight: int
    degree: int | None = None
    threshold: int | None = None
    min_survivors: int | None = None
    complete_graph_max: int = 32
    round_timeout_s: int = 3600
    limits: Limits = field(default_factory=Limits)
    max_setup_attempts: int = 3
    max_colluding_fraction: float = DEFAULT_COLLUDING_FRACTION
    security_bits: int = DEFAULT_SECURITY_BITS
    window_dropouts: int = 2
    dp: DpParams | None = None
    contract_digest: bytes = b""
    dropout_tolerance: float = 0.0
    completion_bits: int = 20
    auto_field: bool = True

    def field_for(self, cohort_size: int) -> QuantizationConfig:
        """The quantization a round of ``cohort_size`` sites uses (``auto_field``: the field
        and, if even 64 bits are too few, the levels chosen to fit; see the class docstring).

        Raises:
            ConfigError: Not even :data:`MIN_AUTO_LEVELS` levels fit 64 bits.
        """
        q = self.quantization
        if not self.auto_field or self.dp is not None:
            return q
        load = cohort_size * self.max_weight
        for bits in sorted({q.modulus_bits, 64}):
            bound = (1 << (bits - 1)) - 1
            if load * q.levels <= bound:
                return q if bits == q.modulus_bits else replace(q, modulus_bits=bits)
        levels = ((1 << 63) - 1) // load
        if levels < MIN_AUTO_LEVELS:
            raise ConfigError(
                f"{cohort_size} sites x max_weight {self.max_weight} leave {levels} quantization "
                f"levels in Z_2^64 (at least {MIN_AUTO_LEVELS}): use a smaller max_weight"
            )
        return replace(q, levels=levels, modulus_bits=64)

    def resolve(self, cohort_size: int) -> RoundParameters:
        """Validate for ``cohort_size`` sites and fill in automatic values.

        Raises:
            ConfigError: If any parameter is out of bounds (the message names it).
        """
        from .params import least_degree, least_degree_for_dropouts, least_threshold

        if cohort_size < 2:
            raise ConfigError(f"cohort size {cohort_size} is below 2")
        check_colluding_fraction(self.max_colluding_fraction, "config")
        check_security_bits(self.security_bits, "config")
        n, gamma, bits = cohort_size, self.max_colluding_fraction, self.security_bits
        if not 0 <= self.dropout_tolerance < 1:
            raise ConfigError(f"config.dropout_tolerance must be in [0, 1), got {self.dropout_tolerance!r}")
        if self.degree is not None:
            k = self.degree
        elif n <= self.complete_graph_max:
            k = n - 1
        elif self.dropout_tolerance > 0:
            k = least_degree_for_dropouts(
                n, gamma, bits, dropout=self.dropout_tolerance, completion_bits=self.completion_bits
            ).degree
        else:
            k = least_degree(n, gamma, bits, min_window_dropouts=self.window_dropouts)
        k = min(k, n - 1)
        if self.threshold is not None:
            t = self.threshold
        else:
            # The least threshold the sites' floor accepts (colluders alone must stay below
            # it); k if none is safe (validation then names the problem).
            least = least_threshold(n, k, gamma, bits) if k == n - 1 or k % 2 == 0 else None
            t = least if least is not None else k
        min_survivors = (
            self.min_survivors
            if self.min_survivors is not None
            else min(n, max(2, consistency_quorum(t, n, gamma)))
        )
        if self.dp is not None and self.min_survivors is None:
            min_survivors = max(min_survivors, self.dp.min_survivors)
        params = RoundParameters(
            vector_length=self.vector_length,
            quantization=self.field_for(n),
            max_weight=self.max_weight,
            degree=k,
            threshold=t,
            min_survivors=min_survivors,
            dp=self.dp,
            contract_digest=self.contract_digest,
        )
        validate_parameters(params, cohort_size, self.limits)
        try:
            check_dp_round(params, cohort_size, gamma)
        except DpPolicyError as exc:
            raise ConfigError(f"config.dp: {exc.message}") from exc
        if self.round_timeout_s <= 0:
            raise ConfigError(f"round_timeout_s must be positive, got {self.round_timeout_s}")
        _check_attempts(self.max_setup_attempts, "config")
        return params
