"""The distributed discrete Gaussian mechanism (protocol/dp.py): sampler, rotation, rounding,
encode -> modular sum -> decode, parameters, modular range.

Statistical tests run at a fixed seed and at one fresh random seed; their assertion messages
carry the p-values and the seed (rerun a failure with that seed). Thresholds are p > 1e-4.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from fedseal.protocol import discrete_gaussian as dg
from fedseal.protocol import dp
from fedseal.protocol.errors import ConfigError, DecodeError

SEEDS = {"fixed": bytes(range(32)), "random": os.urandom(32)}
P_MIN = 1e-4
ROTATION_SEED = bytes(range(100, 132))


def _seeded(seed: bytes, label: bytes = b"test") -> dg.PrgNoise:
    return dg.PrgNoise(seed, b"fedseal/test/" + label)


def _exact_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and pmf of N_Z(0, sigma^2), truncated at 14 sigma (mass beyond < 1e-40)."""
    k_max = math.ceil(14 * sigma) + 8
    support = np.arange(-k_max, k_max + 1)
    log_w = -(support.astype(np.float64) ** 2) / (2 * sigma * sigma)
    w = np.exp(log_w - log_w.max())
    return support, w / w.sum()


def _equal_mass_bins(pmf: np.ndarray, bins: int) -> np.ndarray:
    """Indices where bins start, each bin holding about 1/bins of the mass (tails merged)."""
    cdf = np.cumsum(pmf)
    starts = np.unique(np.searchsorted(cdf, np.arange(1, bins) / bins, side="right"))
    return np.concatenate([[0], starts[(starts > 0) & (starts < len(pmf))]])


# --------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("seed_name", sorted(SEEDS))
@pytest.mark.parametrize("sigma", [0.6, 3.0, 37.5, 1e4])
def test_discrete_gaussian_matches_the_exact_pmf(sigma: float, seed_name: str) -> None:
    seed = SEEDS[seed_name]
    n = 200_000
    samples = dg.sample_discrete_gaussian(sigma, n, _seeded(seed))
    assert samples.dtype == np.int64 and samples.shape == (n,)
    support, pmf = _exact_pmf(sigma)
    starts = _equal_mass_bins(pmf, 60)
    expected = np.add.reduceat(pmf, starts) * n
    index = np.clip(samples - support[0], 0, len(support) - 1)
    observed = np.add.reduceat(np.bincount(index, minlength=len(support)), starts)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_chi2 = float(stats.chi2.sf(chi2, len(starts) - 1))
    var = float((pmf * support.astype(np.float64) ** 2).sum())
    mu4 = float((pmf * support.astype(np.float64) ** 4).sum())
    z_mean = float(samples.mean()) / math.sqrt(var / n)
    sample_var = float(np.mean(samples.astype(np.float64) ** 2))
    z_var = (sample_var - var) / math.sqrt((mu4 - var * var) / n)
    p_mean, p_var = (float(2 * stats.norm.sf(abs(z))) for z in (z_mean, z_var))
    message = (
        f"sigma={sigma} seed={seed.hex()} ({seed_name}): p_chi2={p_chi2:.3g} "
        f"(chi2={chi2:.1f}, bins={len(starts)}), p_mean={p_mean:.3g}, p_var={p_var:.3g}"
    )
    assert min(p_chi2, p_mean, p_var) > P_MIN, message


def test_large_sigma_variance_is_sigma_squared() -> None:
    # For sigma >= 1 the discrete Gaussian's variance is sigma^2 to within 1e-30 (CKS Prop. 19).
    support, pmf = _exact_pmf(1e4)
    assert math.isclose(float((pmf * support.astype(np.float64) ** 2).sum()), 1e8, rel_tol=1e-9)


def test_sampler_edge_cases() -> None:
    src = _seeded(bytes(32))
    assert not dg.sample_discrete_gaussian(0.0, 10, src).any()
    assert dg.sample_discrete_gaussian(5.0, 0, src).shape == (0,)
    for bad in (-1.0, math.nan, math.inf, 2.0**41):
        with pytest.raises(ValueError):
            dg.sample_discrete_gaussian(bad, 3, src)


@pytest.mark.parametrize("sigma", [1e-12, 1e-9, 1e-5, 0.05])
def test_a_tiny_sigma_gives_zeros_as_its_pmf_says(sigma: float) -> None:
    # P(X != 0) <= 2 exp(-1 / (2 sigma^2)): below 1e-86 for sigma <= 0.05. A rejection count
    # y^2 / (2 sigma^2) past 2^63 used to overflow int64 and accept (sigma 1e-12: variance 1.8).
    assert not dg.sample_discrete_gaussian(sigma, 20_000, _seeded(bytes(32))).any()


def test_same_seed_same_samples_and_the_default_source_is_fresh() -> None:
    a = dg.sample_discrete_gaussian(10.0, 1000, _seeded(bytes(32)))
    assert np.array_equal(a, dg.sample_discrete_gaussian(10.0, 1000, _seeded(bytes(32))))
    assert not np.array_equal(dg.sample_discrete_gaussian(10.0, 1000), a)
    assert not np.array_equal(dg.system_noise().words(8), dg.system_noise().words(8))


# -------------------------------------------------------------------------------- rotation


def _hadamard(d: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


@given(
    st.integers(1, 3000),
    st.binary(min_size=32, max_size=32),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1e-3, 1.0, 1e6]),
)
def test_rotation_is_orthogonal_and_inverts(
    length: int, seed: bytes, data: int, scale: float
) -> None:
    words = dg.PrgNoise(bytes(28) + data.to_bytes(4, "big")).words(length)
    x = (words.astype(np.float64) / 2.0**64 - 0.5) * scale
    d, block = dp.rotation_shape(length)
    y = dp.rotate(x, seed, d, block)
    assert y.shape == (d,)
    norm = float(np.linalg.norm(x))
    assert math.isclose(float(np.linalg.norm(y)), norm, rel_tol=1e-12, abs_tol=1e-300)
    back = dp.unrotate(y, seed, length, block)
    assert np.allclose(back, x, rtol=0, atol=1e-12 * max(norm, 1e-300))


@pytest.mark.parametrize(("d", "block"), [(1, 1), (2, 2), (8, 8), (64, 64), (64, 16), (24, 8), (12, 1)])
def test_rotation_is_the_randomized_block_hadamard_matrix(d: int, block: int) -> None:
    matrix = np.stack([dp.rotate(np.eye(d)[i], ROTATION_SEED, d, block) for i in range(d)], axis=1)
    # Block-diagonal: block k's rows start with an all-ones row of H_B, which reads D there.
    signs = np.concatenate([matrix[k, k : k + block] for k in range(0, d, block)]) * math.sqrt(block)
    assert set(np.round(signs).tolist()) <= {-1.0, 1.0}
    expected = np.kron(np.eye(d // block), _hadamard(block)) @ np.diag(signs) / math.sqrt(block)
    assert np.allclose(matrix, expected, atol=1e-14)
    assert np.allclose(matrix.T @ matrix, np.eye(d), atol=1e-13)
    if block >= 16:  # the signs depend on the seed
        assert not np.allclose(dp.rotate(np.eye(d)[0], bytes(32), d, block), matrix[:, 0])
    # The signs are the same whatever the block: one D for the whole padded vector.
    whole = np.stack([dp.rotate(np.eye(d)[i], ROTATION_SEED, d, 1) for i in range(d)], axis=1)
    assert np.array_equal(np.diag(whole), signs)


def test_the_rotation_shape_of_known_lengths() -> None:
    shapes = {n: dp.rotation_shape(n) for n in (1, 5, 1000, 1025, 109_386, 1 << 20, (1 << 20) + 1)}
    assert shapes == {
        1: (1, 1),
        5: (8, 8),
        1000: (1024, 1024),  # below MIN_BLOCK: one block, KLS's padding
        1025: (2048, 1024),
        109_386: (110_592, 4096),  # fedseal's MNIST MLP: 27 blocks, 1.1% padding (not 1.20x)
        1 << 20: (1 << 20, 1 << 20),
        (1 << 20) + 1: (65 << 14, 1 << 14),
    }


@given(st.integers(1, 1 << 30))
def test_the_rotation_shape_pads_little_with_the_largest_block_that_does(length: int) -> None:
    d, block = dp.rotation_shape(length)
    assert block & (block - 1) == 0 and d % block == 0 and length <= d < length + block
    padding_ok = d - length <= length / dp.PADDING_FRACTION
    assert padding_ok or block == min(dp.MIN_BLOCK, 1 << (length - 1).bit_length())
    if 2 * block <= 1 << (length - 1).bit_length():  # the next larger block pads too much
        assert -(-length // (2 * block)) * 2 * block - length > length / dp.PADDING_FRACTION


def test_clip_scales_only_long_updates() -> None:
    x, clipped = dp.clip_l2([3.0, 4.0], 10.0)
    assert not clipped and x.tolist() == [3.0, 4.0]
    x, clipped = dp.clip_l2([3.0, 4.0], 1.0)
    assert clipped and math.isclose(float(np.linalg.norm(x)), 1.0, rel_tol=1e-15)
    x, clipped = dp.clip_l2([1e300, 1e300], 2.0)  # the norm itself would overflow
    assert clipped and math.isclose(float(np.linalg.norm(x)), 2.0, rel_tol=1e-15)
    for bad in ([1.0, math.nan], [math.inf], [[1.0]]):
        with pytest.raises(ValueError):
            dp.clip_l2(bad, 1.0)


# -------------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("seed_name", sorted(SEEDS))
def test_randomized_rounding_is_unbiased(seed_name: str) -> None:
    seed, reps, d = SEEDS[seed_name], 4000, 64
    z = np.linspace(-5.3, 4.9, d) + 0.013  # fractions spread over (0, 1)
    frac = z - np.floor(z)
    src = _seeded(seed)
    total = np.zeros(d)
    for _ in range(reps):
        r, tries = dp.conditional_round(z, 1 << 40, src)  # bound never binds: plain rounding
        assert tries == 1 and np.all((r == np.floor(z)) | (r == np.floor(z) + 1))
        total += r
    zscores = (total / reps - z) / np.sqrt(frac * (1 - frac) / reps)
    p = float(stats.chi2.sf(float((zscores**2).sum()), d))
    assert p > P_MIN, f"seed={seed.hex()} ({seed_name}): p={p:.3g}"


@pytest.mark.parametrize("seed_name", sorted(SEEDS))
@pytest.mark.parametrize("beta", [0.5, math.exp(-0.5), 0.99])
def test_conditional_rounding_keeps_the_norm_bound_and_the_bias_bound(
    beta: float, seed_name: str
) -> None:
    # Norm exactly the clip, every fraction 1/2: the worst case for the rounded norm.
    seed, reps, d = SEEDS[seed_name], 1500, 256
    z = np.where(np.arange(d) % 2, 1.5, -1.5)
    params = dp.DpParams(
        d,
        clip=float(np.linalg.norm(z)),
        gamma=1.0,
        local_stddev=0.0,
        beta=beta,
        modulus_bits=32,
        min_survivors=1,
    )
    c, dd = params.scaled_clip, float(d)
    tff_bound = min(
        (c + math.sqrt(dd)) ** 2,
        c * c + dd / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dd) / 2),
    )
    assert params.norm_bound_sq == math.floor(tff_bound)
    src = _seeded(seed)
    first_try_failures = 0
    total = np.zeros(d)
    for _ in range(reps):
        r, tries = dp.conditional_round(z, params.norm_bound_sq, src)
        assert int(np.dot(r, r)) <= params.norm_bound_sq
        first_try_failures += tries > 1
        total += r
    p_fail = first_try_failures / reps
    # KLS: one rounding exceeds the bound with probability <= beta (binomial test).
    p_beta = float(stats.binom.sf(first_try_failures - 1, reps, beta))
    assert p_beta > P_MIN, f"seed={seed.hex()}: failure rate {p_fail} > beta {beta}"
    # Bias of the conditioned rounding: |E[r_j | ok] - z_j| <= p / (1 - p) per coordinate.
    se = math.sqrt(0.25 / reps)
    bias = np.abs(total / reps - z)
    limit = p_fail / (1 - p_fail) + 5 * se
    assert float(bias.max()) <= limit, f"seed={seed.hex()}: bias {bias.max():.4f} > {limit:.4f}"


def test_rounding_gives_up_after_max_tries_with_a_clear_error() -> None:
    z = np.full(256, 1.5)  # E||r||^2 = 640, a bound of 600 fails almost always
    with pytest.raises(dp.RoundingError, match="3 times in a row"):
        dp.conditional_round(z, 600, _seeded(bytes(32)), max_tries=3)
    with pytest.raises(ValueError):
        dp.conditional_round(np.array([2.0**53]), 1 << 60, _seeded(bytes(32)))


# ------------------------------------------------------------------- encode / sum / decode


def _params(bits: int, d: int = 512, sigma: float = 40.0, block: int = 0) -> dp.DpParams:
    return dp.DpParams(
        d,
        block=block,
        clip=1.0,
        gamma=1e-3,
        local_stddev=sigma,
        beta=math.exp(-0.5),
        modulus_bits=bits,
        min_survivors=4,
    )


def _updates(sites: int, length: int) -> list[np.ndarray]:
    out = []
    for i in range(sites):
        w = _seeded(bytes(32), b"update-%d" % i).words(length)
        out.append((w.astype(np.float64) / 2.0**64 - 0.5) * (0.02 + 0.05 * i))
    return out


@pytest.mark.parametrize(("bits", "block"), [(32, 0), (64, 0), (32, 128)])
def test_decoded_modular_sum_is_the_clipped_sum_plus_rounding_and_noise(bits: int, block: int) -> None:
    sites, length = 5, 300
    params = _params(bits, d=384, block=block) if block else _params(bits)
    assert dp.wrap_probability(params, sites) < 1e-9
    xs = _updates(sites, length)
    total = np.zeros(params.dimension, dtype=np.uint32 if bits == 32 else np.uint64)
    integer_sum = np.zeros(params.dimension, dtype=np.int64)
    rounding_error = np.zeros(params.dimension)
    noise_sum = np.zeros(params.dimension, dtype=np.int64)
    clipped_sum = np.zeros(length)
    for i, x in enumerate(xs):
        seed = bytes([i]) * 32
        share = dp.encode(x, params, ROTATION_SEED, _seeded(seed))
        assert share.dtype == total.dtype and share.shape == (params.dimension,)
        total += share  # the secure sum: wrapping adds
        values = dp.encode_integers(x, params, ROTATION_SEED, _seeded(seed)).values
        assert np.array_equal(dp.wrap(values, bits), share)
        integer_sum += values
        # The same pipeline step by step, drawing from the same source in the same order.
        clipped, _ = dp.clip_l2(x, params.clip)
        z = dp.rotate(clipped, ROTATION_SEED, params.dimension, params.block) / params.gamma
        src = _seeded(seed)
        r, _ = dp.conditional_round(z, params.norm_bound_sq, src)
        noise = dg.sample_discrete_gaussian(params.local_stddev, params.dimension, src)
        assert np.array_equal(values, r + noise)
        rounding_error += r - z
        noise_sum += noise
        clipped_sum += clipped
    decoded = dp.decode(total, params, ROTATION_SEED, length)
    # What the coordinator's range check allows (protocol/server.py check_dp_aggregate).
    assert float(np.linalg.norm(integer_sum.astype(np.float64))) <= dp.sum_norm_bound(params, sites)
    assert int(np.max(np.abs(integer_sum))) <= dp.coordinate_reach(params, sites)
    # The secure sum changes nothing: bit for bit the decoding of the plain integer sum.
    assert np.array_equal(decoded, dp.decode_integers(integer_sum, params, ROTATION_SEED, length))
    # decoded = sum of clipped updates + gamma U^T (rounding errors + noise).
    gamma = params.gamma
    rounding_part = dp.unrotate(gamma * rounding_error, ROTATION_SEED, length, params.block)
    noise_part = dp.unrotate(gamma * noise_sum.astype(np.float64), ROTATION_SEED, length, params.block)
    assert np.allclose(decoded, clipped_sum + rounding_part + noise_part, rtol=0, atol=1e-12)
    assert np.linalg.norm(rounding_error) <= sites * math.sqrt(params.dimension)
    # The noise is the sum of the sites' shares: variance about n sigma^2 per coordinate.
    ratio = float(np.var(noise_sum)) / (sites * params.local_stddev**2)
    assert 0.8 < ratio < 1.25


def test_wrap_and_centered_read_two_complement_residues() -> None:
    values = np.array([-3, 0, 5, -(2**31), 2**31 - 1], dtype=np.int64)
    w32 = dp.wrap(values, 32)
    assert w32.dtype == np.uint32 and w32.tolist() == [2**32 - 3, 0, 5, 2**31, 2**31 - 1]
    assert dp.centered(w32, 32).tolist() == values.tolist()
    assert dp.centered(w32.astype(np.uint64) + np.uint64(2**32), 32).tolist() == values.tolist()
    w64 = dp.wrap(values, 64)
    assert w64.dtype == np.uint64 and dp.centered(w64, 64).tolist() == values.tolist()
    with pytest.raises(ValueError):
        dp.centered(values, 32)
    with pytest.raises(ValueError):
        dp.centered(w32, 64)


def test_encode_rejects_what_it_cannot_encode() -> None:
    params = _params(32, d=8)
    for bad in (np.zeros(9), np.array([math.nan]), np.zeros((2, 2))):
        with pytest.raises(ValueError):
            dp.encode(bad, params, ROTATION_SEED, _seeded(bytes(32)))
    with pytest.raises(ValueError):
        dp.encode(np.zeros(8), params, b"short", _seeded(bytes(32)))
    with pytest.raises(ValueError):
        dp.decode(np.zeros(4, dtype=np.uint32), params, ROTATION_SEED, 4)


def test_no_call_of_numpys_global_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("numpy's random module was used")

    for name in dir(np.random):
        if not name.startswith("_") and callable(getattr(np.random, name)):
            monkeypatch.setattr(np.random, name, forbidden)
    params = _params(64)
    x = np.linspace(-1, 1, 300)
    share = dp.encode(x, params, ROTATION_SEED)  # default source: the OS CSPRNG
    dp.decode(share, params, ROTATION_SEED, 300)
    dg.sample_discrete_gaussian(1e4, 10_000)


# ------------------------------------------------------------------------------ parameters


def _valid_params() -> st.SearchStrategy[dp.DpParams]:
    def build(
        log_b: int,
        blocks: int,
        clip: float,
        ratio: float,
        sigma: float,
        beta: float,
        bits: int,
        survivors: int,
        colluding: int,
    ) -> dp.DpParams:
        blocks = max(1, min(blocks, (1 << 30) >> log_b))
        return dp.DpParams(
            blocks << log_b, clip, clip / ratio, sigma, beta, bits, survivors, colluding % survivors, 1 << log_b
        )

    return st.builds(
        build,
        st.integers(0, 30),
        st.one_of(st.just(1), st.integers(2, 1 << 20)),
        st.floats(1e-6, 1e6),
        st.floats(1e-3, 1e4),
        st.floats(0, 2.0**40),
        st.sampled_from([0.0, math.exp(-0.5), 0.999]),
        st.sampled_from([32, 64]),
        st.integers(1, 2**20),
        st.integers(0, 2**20),
    )


@given(_valid_params())
def test_params_bytes_round_trip(params: dp.DpParams) -> None:
    data = params.to_bytes()
    assert dp.DpParams.from_bytes(data) == params
    assert dp.DpParams.from_bytes(data).to_bytes() == data


def _with(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_params_decoding_is_strict() -> None:
    data = _params(32).to_bytes()
    tag = len(dp.DP_PARAMS_TAG)
    floats = tag + 3 + 8  # clip, gamma, local_stddev, beta
    bad: list[bytes] = [data[:cut] for cut in range(len(data))] + [data + b"\0"]
    bad += [
        b"X" + data[1:],  # tag
        _with(data, tag, b"\x02"),  # mechanism
        _with(data, tag + 1, b"\x30"),  # 48 bits
        _with(data, tag + 2, b"\x1f"),  # d = 2^31
        _with(data, tag + 3, struct.pack(">I", 0)),  # min_survivors 0
        _with(data, tag + 7, struct.pack(">I", 4)),  # colluding = min_survivors
        _with(data, floats, struct.pack(">d", math.nan)),
        _with(data, floats + 8, struct.pack(">d", math.inf)),
        _with(data, floats + 16, struct.pack(">d", -0.0)),  # -0.0 would be a 2nd zero
        _with(data, floats + 24, struct.pack(">d", 1.0)),  # beta = 1
    ]
    blocked = _params(32, d=3 * 512, block=512).to_bytes()
    assert blocked[tag] == dp.MECHANISM_DDG_BLOCK_HADAMARD
    bad += [blocked[:cut] for cut in range(len(blocked))] + [blocked + b"\0"]
    bad += [
        _with(data, tag, b"\x03"),  # mechanism
        _with(blocked, tag + 3, struct.pack(">I", 1)),  # one block must be mechanism 1
        _with(blocked, tag + 3, struct.pack(">I", 0)),  # no block
        _with(blocked, tag + 2, b"\x1e"),  # 2^30 x 3 blocks
    ]
    for blob in bad:
        with pytest.raises(DecodeError):
            dp.DpParams.from_bytes(blob)
    # One block keeps the original (mechanism 1) bytes: a log written before blocks reads the same.
    assert data[tag] == dp.MECHANISM_DDG_HADAMARD and len(blocked) == len(data) + 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda k: k.update(dimension=48), "power of two"),
        (lambda k: k.update(block=48), "power of two"),
        (lambda k: k.update(block=128), "dividing"),
        (lambda k: k.update(dimension=96, block=64), "dividing"),
        (lambda k: k.update(clip=0.0), "clip"),
        (lambda k: k.update(gamma=math.inf), "gamma"),
        (lambda k: k.update(local_stddev=-1.0), "local_stddev"),
        (lambda k: k.update(beta=1.0), "beta"),
        (lambda k: k.update(modulus_bits=16), "modulus_bits"),
        (lambda k: k.update(colluding_sites=4), "colluding_sites"),
        (lambda k: k.update(clip=1e9, gamma=1e-9), "too large"),
        (lambda k: k.update(clip=True), "number"),
    ],
)
def test_params_validation_names_the_limit(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    kwargs: dict[str, Any] = dict(
        dimension=64,
        clip=1.0,
        gamma=0.01,
        local_stddev=3.0,
        beta=0.5,
        modulus_bits=32,
        min_survivors=4,
    )
    change(kwargs)
    with pytest.raises(ConfigError, match=message):
        dp.DpParams(**kwargs)


@given(st.floats(0, 10), st.integers(2, 500), st.data(), st.sampled_from([0.0, 0.1, 1 / 3, 0.5]))
def test_noise_multiplier_counts_only_honest_survivors(
    z: float, sites: int, data: st.DataObject, fraction: float
) -> None:
    survivors = data.draw(st.integers(1, sites))
    colluding = math.floor(fraction * sites + 1e-9)
    kwargs: dict[str, Any] = dict(
        length=1000,
        clip=0.5,
        gamma=1e-3,
        sites=sites,
        min_survivors=survivors,
        colluding_fraction=fraction,
    )
    if survivors <= colluding:
        with pytest.raises(ConfigError, match="no honest survivor"):
            dp.DpParams.from_noise_multiplier(z, **kwargs)
        return
    params = dp.DpParams.from_noise_multiplier(z, **kwargs)
    assert params.dimension == 1024 and params.colluding_sites == colluding
    assert params.honest_survivors == survivors - colluding
    # The honest survivors' shares alone reach the central variance (z clip / gamma)^2.
    central = (z * 0.5 / 1e-3) ** 2
    assert math.isclose(params.honest_survivors * params.local_stddev**2, central, rel_tol=1e-12)


def test_sensitivity_bounds() -> None:
    params = dp.DpParams(1024, 1.0, 0.01, 5.0, 0.0, 64, 3)
    assert params.norm_bound_sq == math.floor((100 + 32) ** 2)
    assert params.l1_bound == min(math.floor(32 * params.norm_bound), params.norm_bound_sq)


# --------------------------------------------------------------------------- modular range


def test_bits_needed_is_the_least_sufficient_modulus() -> None:
    for sigma, sites in ((40.0, 5), (1e4, 100), (1e6, 1000), (0.0, 7)):
        params = _params(64, d=1 << 16, sigma=sigma)
        for target in (1e-3, 1e-9, 2.0**-40):
            bits = dp.bits_needed(params, sites, target)
            assert dp.wrap_probability(params, sites, bits) <= target
            assert dp.wrap_probability(params, sites, bits - 1) > target or sigma == 0.0
    assert dp.wrap_probability(_params(32, sigma=2.0**36), 5) == 1.0
    assert dp.wrap_probability(_params(64, sigma=40.0), 5) < 1e-300


def test_a_modulus_too_small_for_the_noise_wraps_and_garbles_the_sum() -> None:
    params = _params(32, d=64, sigma=2.0**33)
    assert dp.wrap_probability(params, 3) == 1.0
    shares, ints = [], np.zeros(64, dtype=np.int64)
    for i in range(3):
        shares.append(dp.encode(np.zeros(64), params, ROTATION_SEED, _seeded(bytes([i]) * 32)))
        ints += dp.encode_integers(
            np.zeros(64), params, ROTATION_SEED, _seeded(bytes([i]) * 32)
        ).values
    total = shares[0] + shares[1] + shares[2]
    assert not np.array_equal(dp.centered(total, 32), ints)


def test_without_noise_the_sum_norm_bound_is_n_times_the_sensitivity() -> None:
    quiet = _params(32, sigma=0.0)
    assert dp.sum_norm_bound(quiet, 7) == 7 * quiet.norm_bound
    noisy = _params(32, sigma=40.0)
    assert dp.sum_norm_bound(noisy, 7, 1e-3) < dp.sum_norm_bound(noisy, 7, 2.0**-40)
    assert dp.sum_norm_bound(noisy, 7) > 7 * noisy.norm_bound + 40.0 * math.sqrt(7 * noisy.dimension)
    with pytest.raises(ValueError, match="sites"):
        dp.sum_norm_bound(noisy, 0)
