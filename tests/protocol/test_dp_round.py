"""Distributed DP inside a secure round (docs/dp.md §2, §4, §7), through the in-memory
federation of real ClientSessions and a SecAggServer: the setup carries the DP parameters and
the rotation seed, sites add their own noise and refuse rounds below their policy, the
coordinator decodes an unweighted noisy sum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.protocol import dp
from fedseal.protocol.client import LocalUpdate, RoundInfo
from fedseal.protocol.config import (
    DpPolicyError,
    DpRequiredError,
    QuantizationConfig,
    RoundConfig,
    SitePolicy,
)
from fedseal.protocol.discrete_gaussian import PrgNoise
from fedseal.protocol.errors import ConfigError, DecodeError
from fedseal.protocol.messages import Header, RoundSetup, decode_payload
from fedseal.protocol.server import ServerStage
from fedseal.protocol.types import MessageKind, Packet, SiteId
from fedseal.sim.inmemory import Behaviour, Federation, SimulationOutcome, dataset_root_for

from ._support import LIMITS_DEFAULT, make_fed, open_any, resign, site_names

CLIP = 1.0
GAMMA = 1e-3
SITES = 6


def _noise_seed(site: str) -> bytes:
    return hashlib.sha256(b"fedseal/test/dp-noise\x00" + site.encode()).digest()


def site_noise(site: SiteId) -> PrgNoise:
    """A deterministic noise source per site (the same stream on every call)."""
    return PrgNoise(_noise_seed(site))


def dp_config(
    length: int = 20,
    *,
    sites: int = SITES,
    noise_multiplier: float = 1.0,
    bits: int = 32,
    gamma: float = GAMMA,
) -> RoundConfig:
    """A DP round config whose noise counts the honest survivors of the resolved round."""
    base = RoundConfig(
        vector_length=length,
        quantization=QuantizationConfig.from_clip(CLIP, 1, bits),
        max_weight=64,
    )
    min_survivors = base.resolve(sites).min_survivors
    params = dp.DpParams.from_noise_multiplier(
        noise_multiplier,
        length=length,
        clip=CLIP,
        gamma=gamma,
        sites=sites,
        min_survivors=min_survivors,
        colluding_fraction=base.max_colluding_fraction,
        modulus_bits=bits,
    )
    return dataclasses.replace(base, dp=params)


class Recorder:
    """Per-site float updates (some beyond the clip) and the RoundInfo each site saw."""

    def __init__(self, sites: Sequence[str], length: int, seed: int, scale: float = 0.3) -> None:
        rng = np.random.default_rng(seed)
        self.vectors = {SiteId(s): rng.standard_normal(length) * scale for s in sites}
        self.infos: dict[SiteId, RoundInfo] = {}

    def __call__(self, site: SiteId, info: RoundInfo) -> LocalUpdate:
        self.infos[site] = info
        return LocalUpdate(self.vectors[site], 7 + len(self.infos), dataset_root_for(site))


def dp_fed(
    config: RoundConfig,
    *,
    sites: int = SITES,
    seed: int = 1,
    zero_updates: bool = False,
    dropouts: Mapping[ServerStage, Collection[str]] | None = None,
    site_policy: SitePolicy | None = None,
    behaviour: Behaviour | None = None,
) -> tuple[Federation, Recorder]:
    names = site_names(sites)
    recorder = Recorder(names, config.vector_length, seed, scale=0.0 if zero_updates else 0.3)
    fed = Federation(
        config,
        names,
        seed=b"dp-test-%d" % seed,
        updates=recorder,
        rounding_rng=lambda site: np.random.default_rng(0),
        dropouts=dropouts,
        site_policy=site_policy,
        behaviour=behaviour,
        dp_noise=site_noise,
    )
    return fed, recorder


def expected_dp_sum(
    fed: Federation, recorder: Recorder, survivors: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The plain modular sum of the survivors' DP encodings (same noise streams), and its
    decode: what the secure round must produce bit for bit."""
    params = fed.config.dp
    assert params is not None
    seed = dp.rotation_seed_for(fed.run_id_for(1), 1)
    total = np.zeros(params.dimension, dtype=np.uint32 if params.modulus_bits == 32 else np.uint64)
    for s in survivors:
        site = SiteId(s)
        encoded = dp.encode(recorder.vectors[site], params, seed, site_noise(site))
        np.add(total, encoded, out=total)
    return total, dp.decode(total, params, seed, fed.config.vector_length)


def committed(outcome: SimulationOutcome) -> None:
    assert outcome.failure is None, outcome.failure
    assert outcome.client_errors == {}, outcome.client_errors
    assert outcome.result is not None


# ------------------------------------------------------------------------- a DP round


def test_a_dp_round_commits_and_equals_the_decode_of_the_plain_integer_sum() -> None:
    config = dp_config()
    fed, recorder = dp_fed(config)
    outcome = fed.run_round(1)
    committed(outcome)
    result = outcome.result
    assert result is not None
    params = config.dp
    assert params is not None
    survivors = result.survivors
    assert len(survivors) == SITES
    total, decoded = expected_dp_sum(fed, recorder, survivors)
    assert result.aggregate.dtype == total.dtype and result.aggregate.shape == (params.dimension,)
    assert np.array_equal(result.aggregate, total)
    assert np.array_equal(result.weighted_sum, decoded)
    # Unweighted: every survivor weighs 1, whatever example count its trainer reported.
    assert result.dp == params
    assert result.weights == dict.fromkeys(survivors, 1)
    assert result.total_weight == len(survivors)
    assert np.array_equal(result.weighted_mean, decoded / len(survivors))
    assert result.clipped == dict.fromkeys(survivors, 0)  # the clip indicator is not released


def test_the_noisy_mean_is_near_the_mean_of_the_clipped_updates() -> None:
    config = dp_config(length=64, noise_multiplier=0.05)
    fed, recorder = dp_fed(config)
    outcome = fed.run_round(1)
    committed(outcome)
    assert outcome.result is not None
    clipped = [dp.clip_l2(v, CLIP)[0] for v in recorder.vectors.values()]
    truth = np.mean(clipped, axis=0)
    error = outcome.result.weighted_mean - truth
    # Central stddev 0.05 clip over 3 honest shares, 6 shares summed, divided by 6.
    params = config.dp
    assert params is not None
    expected_sd = math.sqrt(SITES) * params.local_stddev * GAMMA / SITES
    assert float(np.sqrt(np.mean(error**2))) < 2 * expected_sd + 1e-3


def test_sites_see_the_dp_parameters_in_round_info_and_on_the_session() -> None:
    config = dp_config()
    fed, recorder = dp_fed(config)
    outcome = fed.run_round(1)
    committed(outcome)
    assert set(recorder.infos) == set(fed.sites)
    assert all(info.dp == config.dp for info in recorder.infos.values())
    assert all(session.dp == config.dp for session in outcome.sessions.values())
    setup = outcome.server.setup
    assert setup.params.dp == config.dp
    assert setup.params.rotation_seed == dp.rotation_seed_for(fed.run_id_for(1), 1)
    assert setup.params.masked_length == config.dp.dimension if config.dp else False


@pytest.mark.parametrize(
    "stage", [ServerStage.MASKED_INPUT, ServerStage.CONSISTENCY, ServerStage.UNMASK]
)
def test_dropouts_at_and_after_the_masked_input_still_decode(stage: ServerStage) -> None:
    config = dp_config()
    gone = site_names(SITES)[2]
    fed, recorder = dp_fed(config, dropouts={stage: [gone]})
    outcome = fed.run_round(1)
    assert outcome.failure is None, outcome.failure
    result = outcome.result
    assert result is not None
    # Silent at the masked input: not in the sum. Silent later: its input stays in it.
    assert (gone in result.survivors) is (stage is not ServerStage.MASKED_INPUT)
    total, decoded = expected_dp_sum(fed, recorder, result.survivors)
    assert np.array_equal(result.aggregate, total)
    assert np.array_equal(result.weighted_sum, decoded)
    assert result.total_weight == len(result.survivors)


def test_a_new_setup_attempt_keeps_dp_for_the_remaining_sites() -> None:
    config = dp_config()
    gone = site_names(SITES)[0]
    fed, recorder = dp_fed(config, dropouts={ServerStage.ADVERTISE: [gone]})
    outcome = fed.run_round(1)
    assert outcome.failure is None, outcome.failure
    assert outcome.server.restarts and outcome.result is not None
    assert outcome.server.setup.params.dp == config.dp
    total, decoded = expected_dp_sum(fed, recorder, outcome.result.survivors)
    assert np.array_equal(outcome.result.aggregate, total)
    assert np.array_equal(outcome.result.weighted_sum, decoded)


def test_the_result_noise_has_the_promised_variance() -> None:
    """Zero updates: the result is the decoded sum of the survivors' noise shares alone, an
    orthogonal image of ``SITES`` independent N_Z(0, sigma^2) per coordinate, times gamma."""
    config = dp_config(length=4000, noise_multiplier=2.0)
    fed, _ = dp_fed(config, zero_updates=True)
    outcome = fed.run_round(1)
    committed(outcome)
    params = config.dp
    assert outcome.result is not None and params is not None
    noise = outcome.result.weighted_sum
    variance = SITES * (params.local_stddev * GAMMA) ** 2
    # The promise: the honest shares alone reach the central (z clip)^2.
    assert params.honest_survivors * (params.local_stddev * GAMMA) ** 2 == pytest.approx(
        (2.0 * CLIP) ** 2
    )
    # 4000 samples: the sample variance's relative sd is sqrt(2/4000) = 2.2 %.
    assert float(np.var(noise)) == pytest.approx(variance, rel=0.12)
    assert abs(float(np.mean(noise))) < 5 * math.sqrt(variance / noise.shape[0])


# ------------------------------------------------------------------ wire format of the setup

NON_DP_SETUP_DIGEST = "1aef2ee5106b9bbfcae4adfedec18bf868408b930df81e8f1a07d1bcf3c9a383"
"""``server.setup.digest`` of ``make_fed(5, length=16, seed=3)``, round 1, computed before DP
existed in the setup: non-DP setups keep their bytes."""


def test_a_non_dp_setup_keeps_its_bytes() -> None:
    fed, _ = make_fed(5, length=16, seed=3)
    outcome = fed.run_round(1)
    assert outcome.failure is None
    setup = outcome.server.setup
    assert setup.params.dp is None and setup.params.rotation_seed == b""
    assert setup.digest.hex() == NON_DP_SETUP_DIGEST


def _setup(params_dp: dp.DpParams | None, seed: bytes = b"") -> RoundSetup:
    fed, _ = make_fed(5, length=16, seed=3)
    outcome = fed.run_round(1)
    setup = outcome.server.setup
    params = dataclasses.replace(setup.params, dp=params_dp, rotation_seed=seed)
    return dataclasses.replace(setup, params=params)


def test_a_dp_setup_appends_one_tagged_section_to_the_non_dp_body() -> None:
    params_dp = dp.DpParams(
        dimension=16,
        clip=1.0,
        gamma=1e-3,
        local_stddev=300.0,
        beta=0.1,
        modulus_bits=32,
        min_survivors=4,
        colluding_sites=1,
    )
    plain = _setup(None)
    with_dp = _setup(params_dp, bytes(range(32)))
    assert with_dp.body_bytes().startswith(plain.body_bytes())
    section = with_dp.body_bytes()[len(plain.body_bytes()) :]
    assert section[0] == 1 and section.endswith(bytes(range(32)))
    decoded = decode_payload(MessageKind.ROUND_SETUP, with_dp.to_payload(), LIMITS_DEFAULT)
    assert decoded == with_dp
    assert decode_payload(MessageKind.ROUND_SETUP, plain.to_payload(), LIMITS_DEFAULT) == plain


def test_a_rotation_seed_without_dp_has_no_encoding() -> None:
    with pytest.raises(ValueError, match="rotation seed"):
        _setup(None, bytes(32)).body_bytes()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda section: b"\x02" + section[1:],  # unknown section tag
        lambda section: section[:-1],  # truncated seed
        lambda section: section + b"\x00",  # trailing byte
        lambda section: section[:3] + bytes([section[3] ^ 1]) + section[4:],  # DpParams tag
    ],
)
def test_a_malformed_dp_section_is_a_decode_error(mutate: object) -> None:
    params_dp = dp.DpParams(16, 1.0, 1e-3, 300.0, 0.1, 32, 4, 1)
    plain = _setup(None).to_payload()
    payload = _setup(params_dp, bytes(32)).to_payload()
    section = payload[len(plain) :]
    bad = plain + mutate(section)  # type: ignore[operator]
    with pytest.raises(DecodeError):
        decode_payload(MessageKind.ROUND_SETUP, bad, LIMITS_DEFAULT)


@settings(max_examples=40, deadline=None)
@given(
    log_d=st.integers(0, 20),
    clip=st.floats(1e-3, 1e3),
    scaled=st.floats(1.0, 1e5),
    stddev=st.floats(0.0, 1e8),
    beta=st.floats(0.0, 0.99),
    bits=st.sampled_from([32, 64]),
    survivors=st.integers(1, 1000),
    colluding=st.integers(0, 999),
    seed=st.binary(min_size=32, max_size=32),
)
def test_dp_setups_round_trip(
    log_d: int,
    clip: float,
    scaled: float,
    stddev: float,
    beta: float,
    bits: int,
    survivors: int,
    colluding: int,
    seed: bytes,
) -> None:
    params_dp = dp.DpParams(
        1 << log_d, clip, clip / scaled, stddev, beta, bits, survivors, colluding % survivors
    )
    header = Header(bytes(16), 1, SiteId(""), SiteId("a"), bytes(32), bytes(32))
    base = RoundSetup(header=header, cohort=(), params=_BASE_PARAMS, expires_at=9, attempt=2)
    setup = dataclasses.replace(
        base, params=dataclasses.replace(_BASE_PARAMS, dp=params_dp, rotation_seed=seed)
    )
    assert decode_payload(MessageKind.ROUND_SETUP, setup.to_payload(), LIMITS_DEFAULT) == setup


_BASE_PARAMS = RoundConfig(
    vector_length=16, quantization=QuantizationConfig(1, 1), max_weight=1
).resolve(5)


# ---------------------------------------------------------------------------- refusals


def test_a_site_requiring_dp_refuses_a_round_without_it() -> None:
    fed, _ = make_fed(5, site_policy=SitePolicy(dp_required=True))
    outcome = fed.run_round(1)
    assert outcome.result is None
    assert set(outcome.client_errors) == set(fed.sites)
    for error in outcome.client_errors.values():
        assert isinstance(error, DpRequiredError) and error.parameter == "dp"


def test_a_site_requiring_dp_takes_part_in_a_dp_round() -> None:
    fed, _ = dp_fed(dp_config(), site_policy=SitePolicy(dp_required=True, min_noise_multiplier=1))
    committed(fed.run_round(1))


def test_a_site_refuses_noise_below_its_floor() -> None:
    fed, _ = dp_fed(dp_config(noise_multiplier=0.5), site_policy=SitePolicy(min_noise_multiplier=1))
    outcome = fed.run_round(1)
    assert outcome.result is None and set(outcome.client_errors) == set(fed.sites)
    for error in outcome.client_errors.values():
        assert isinstance(error, DpPolicyError) and error.parameter == "local_stddev"
        assert "below this site's floor" in str(error)


def test_a_coarse_grid_cannot_pass_the_floor_with_noise_small_next_to_its_rounding() -> None:
    # clip/gamma = 3 grid units, but rounding a 32-dimensional vector inflates the sensitivity
    # to Delta ~ 4.7: noise at 5x the clip (the old floor's reading) is only ~3.2x Delta.
    config = dp_config(gamma=CLIP / 3, noise_multiplier=5.0)
    assert config.dp is not None and config.dp.norm_bound > 1.5 * config.dp.scaled_clip
    fed, _ = dp_fed(config, site_policy=SitePolicy(min_noise_multiplier=5.0))
    outcome = fed.run_round(1)
    assert outcome.result is None and set(outcome.client_errors) == set(fed.sites)
    for error in outcome.client_errors.values():
        assert isinstance(error, DpPolicyError) and error.parameter == "local_stddev"
        assert "rounded sensitivity" in str(error)
    # At a fine grid the same multiplier passes (Delta is the clip to within 1e-6).
    committed(dp_fed(dp_config(noise_multiplier=5.0), site_policy=SitePolicy(min_noise_multiplier=5.0))[0].run_round(1))


def test_a_site_requiring_dp_refuses_a_dp_setup_without_noise_whatever_its_floor() -> None:
    fed, _ = dp_fed(dp_config(noise_multiplier=0.0), site_policy=SitePolicy(dp_required=True))
    outcome = fed.run_round(1)
    assert outcome.result is None and set(outcome.client_errors) == set(fed.sites)
    for error in outcome.client_errors.values():
        assert isinstance(error, DpRequiredError) and error.parameter == "local_stddev"


class SwapDp(Behaviour):
    """A coordinator that signs setups with other DP parameters than its config's."""

    def __init__(self, **changes: object) -> None:
        self.changes = changes

    def coordinator_sends(
        self, fed: Federation, stage: ServerStage, site: SiteId, packet: Packet
    ) -> Packet | None:
        _, message = open_any(packet.payload)
        if not isinstance(message, RoundSetup) or message.params.dp is None:
            return packet
        params_dp = dataclasses.replace(message.params.dp, **self.changes)  # type: ignore[arg-type]
        params = dataclasses.replace(message.params, dp=params_dp)
        return Packet(resign(dataclasses.replace(message, params=params), fed.coordinator_key))


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        ({"local_stddev": 2.0**35}, "modulus_bits"),  # the noisy sum needs > 32 bits
        ({"colluding_sites": 0}, "min_survivors"),  # assumes every survivor honest
    ],
)
def test_a_site_refuses_a_signed_dp_setup_its_own_checks_reject(
    changes: dict[str, object], parameter: str
) -> None:
    fed, _ = dp_fed(dp_config(), behaviour=SwapDp(**changes))
    outcome = fed.run_round(1)
    assert outcome.result is None and set(outcome.client_errors) == set(fed.sites)
    for error in outcome.client_errors.values():
        assert isinstance(error, DpPolicyError) and error.parameter == parameter


def test_a_site_refuses_another_rotation_seed() -> None:
    class SwapSeed(Behaviour):
        def coordinator_sends(
            self, fed: Federation, stage: ServerStage, site: SiteId, packet: Packet
        ) -> Packet | None:
            _, message = open_any(packet.payload)
            if not isinstance(message, RoundSetup):
                return packet
            params = dataclasses.replace(message.params, rotation_seed=bytes(32))
            return Packet(resign(dataclasses.replace(message, params=params), fed.coordinator_key))

    fed, _ = dp_fed(dp_config(), behaviour=SwapSeed())
    outcome = fed.run_round(1)
    assert outcome.result is None
    assert all("rotation seed" in str(e) for e in outcome.client_errors.values())


def test_the_coordinator_refuses_a_dp_config_whose_modulus_is_too_small() -> None:
    config = dp_config(gamma=1e-7, noise_multiplier=50.0)  # sigma ~ 3e8 grid units
    assert config.dp is not None and dp.bits_needed(config.dp, SITES) > 32
    with pytest.raises(ConfigError, match="modulus_bits"):
        config.resolve(SITES)


def test_the_coordinator_refuses_a_dp_dimension_that_is_not_the_padded_length() -> None:
    config = dp_config(length=20)
    assert config.dp is not None
    wrong = dataclasses.replace(config, dp=dataclasses.replace(config.dp, dimension=64))
    with pytest.raises(ConfigError, match=r"dp\.dimension"):
        wrong.resolve(SITES)


def test_the_coordinator_raises_an_automatic_min_survivors_to_the_dp_one() -> None:
    config = dp_config()
    assert config.dp is not None
    raised = dataclasses.replace(config, dp=dataclasses.replace(config.dp, min_survivors=6))
    assert raised.resolve(SITES).min_survivors == 6


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, True, "1"])
def test_site_policy_rejects_a_bad_noise_floor(value: object) -> None:
    with pytest.raises(ConfigError, match="min_noise_multiplier"):
        SitePolicy(min_noise_multiplier=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("dimension", "block"), [(2048, 2048), (2048, 1 << 6), (4096, 4096)])
def test_a_site_refuses_a_rotation_shape_other_than_its_own(dimension: int, block: int) -> None:
    # 2,000 values rotate in 2 blocks of 1,024 (rotation_shape); a coordinator that signs one
    # block (or tiny ones, or more padding) changes the wrap bound the site checked: refused.
    assert dp.rotation_shape(2000) == (2048, 1024)
    fed, _ = dp_fed(dp_config(length=2000), behaviour=SwapDp(dimension=dimension, block=block))
    outcome = fed.run_round(1)
    assert outcome.result is None and set(outcome.client_errors) == set(fed.sites)
    assert all("rotation shape" in str(e) for e in outcome.client_errors.values())


# -- the DP range check: what honest encodings reach --------------------------------------------


def test_a_dp_site_that_wraps_the_field_makes_the_round_abandoned() -> None:
    from fedseal.protocol.errors import AggregateOutOfRangeError

    from .test_attacks_range import ShiftMaskedInput

    config = dp_config()
    fed, _ = dp_fed(config, behaviour=ShiftMaskedInput("site-001", {3: 1 << 31}))
    outcome = fed.run_round(1)
    assert "site-001" in outcome.server.survivors  # every signature verified ...
    assert outcome.result is None  # ... and the unmasked sum is refused
    assert isinstance(outcome.failure, AggregateOutOfRangeError)
    assert outcome.failure.count == 1 and "DP aggregate out of range" in outcome.failure.message
    assert config.dp is not None
    assert outcome.failure.bound == math.floor(dp.coordinate_reach(config.dp, SITES))


def test_a_dp_site_that_adds_a_spread_out_vector_within_every_elements_reach_is_caught_by_the_norm() -> (
    None
):
    # An input not clipped (or not rounded) as the setup says: +reach/4 on every element keeps
    # each element of the sum within its reach, but adds reach/4 * sqrt(d) to the norm.
    from fedseal.protocol.errors import AggregateOutOfRangeError

    from .test_attacks_range import ShiftMaskedInput

    config = dp_config(length=2000)
    assert config.dp is not None
    reach = math.floor(dp.coordinate_reach(config.dp, SITES))
    offsets = dict.fromkeys(range(config.dp.dimension), reach // 4)
    fed, _ = dp_fed(config, behaviour=ShiftMaskedInput("site-002", offsets))
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, AggregateOutOfRangeError)
    assert outcome.failure.count == 0  # no element past its reach: the norm caught it
    assert "L2 norm" in outcome.failure.message


def test_an_honest_dp_sum_stays_within_both_bounds_with_room_to_spare() -> None:
    config = dp_config(length=2000)
    params = config.dp
    assert params is not None
    fed, _ = dp_fed(config)
    outcome = fed.run_round(1)
    assert outcome.result is not None, outcome.failure
    signed = dp.centered(outcome.result.aggregate, params.modulus_bits).astype(np.float64)
    norm, bound = float(np.linalg.norm(signed)), dp.sum_norm_bound(params, SITES)
    # The noise's norm is about sqrt(n sigma^2 d); the bound adds n Delta and a 2^-40 tail.
    expected = math.sqrt(SITES * params.local_stddev**2 * params.dimension)
    assert 0.9 * expected < norm < bound < 1.3 * expected + SITES * params.norm_bound
    assert float(np.max(np.abs(signed))) < dp.coordinate_reach(params, SITES)
