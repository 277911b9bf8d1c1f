"""Stochastic quantization: exact unbiased rounding, grid points, clipping, chunking, fusion."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import prg
from fedseal.crypto.prg import Mask
from fedseal.protocol import QuantizationConfig
from fedseal.protocol.masking import encode_masked
from fedseal.protocol.quantize import (
    CHUNK,
    ROUNDING_DOMAIN,
    Quantizer,
    dequantize,
    quantize,
    signed_sum,
)

configs = st.builds(
    QuantizationConfig.from_clip,
    st.sampled_from([1.0, 0.5, 1.5, 0.3, 4.0]),
    st.sampled_from([1, 7, 1000, 1 << 12, 1 << 20]),
    st.sampled_from([32, 64]),
)


def _reference(x: np.ndarray, weight: int, config: QuantizationConfig, seed: int) -> list[int]:
    """The documented rounding rule evaluated in Python integers, element by element."""
    noise = prg.expand(np.random.default_rng(seed).bytes(32), len(x), domain=ROUNDING_DOMAIN)
    levels = config.levels
    out = []
    for value, word in zip(x.tolist(), noise.tolist(), strict=True):
        y = min(max(value * (levels / config.clip), -levels), levels)
        fixed = round(y * 2.0**32)  # rint: ties to even, as np.rint
        out.append(((fixed + word) >> 32) * weight)
    return out


@given(
    values=st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=40),
    weight=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
    config=configs,
)
def test_each_element_rounds_up_exactly_when_its_noise_word_is_below_its_fraction(
    values: list[float], weight: int, seed: int, config: QuantizationConfig
) -> None:
    # (rint(y 2^32) + u) >> 32 with u uniform on [0, 2^32) rounds up with probability
    # frac(rint(y 2^32) / 2^32) exactly: the rounding is unbiased on the 2^-32 grid.
    x = np.array(values, dtype=np.float32)
    enc = quantize(x, weight, config, np.random.default_rng(seed))
    assert signed_sum(enc.vector).tolist() == _reference(x, weight, config, seed)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_narrow_inputs_are_scaled_in_float64_not_in_their_own_dtype(
    dtype: type[np.floating],
) -> None:
    # A scaling done in float32 (or float16) would move rint(y 2^32) by up to 2^28 units and
    # flip dozens of the 5000 roundings against the float64 rule; float16 would overflow.
    q = QuantizationConfig.from_clip(0.3, 1 << 20)
    x = (np.random.default_rng(0).standard_normal(5000) * 0.05).astype(dtype)
    enc = quantize(x, 1, q, np.random.default_rng(1))
    assert signed_sum(enc.vector).tolist() == _reference(x, 1, q, 1)
    assert enc.clipped == 0


@pytest.mark.parametrize("value", [0.123, -0.123, 0.5 + 2.0**-20, -3.7e-5, 0.99999])
def test_the_mean_of_many_roundings_is_the_value_within_statistical_bounds(value: float) -> None:
    q = QuantizationConfig.from_clip(1.0, 1 << 12)
    n = 400_000
    enc = quantize(np.full(n, value), 1, q, np.random.default_rng(7))
    levels = signed_sum(enc.vector)
    y = value * q.levels
    assert set(np.unique(levels).tolist()) <= {int(np.floor(y)), int(np.floor(y)) + 1}
    # The mean of n Bernoulli(p) draws is within 6 standard deviations (<= 0.5 / sqrt(n)).
    assert abs(float(levels.mean()) - y) < 6 * 0.5 / np.sqrt(n)


@given(
    levels_k=st.lists(st.integers(-(1 << 12), 1 << 12), min_size=1, max_size=200),
    weight=st.integers(1, 1000),
    seed=st.integers(0, 2**32 - 1),
    case=st.sampled_from(
        [
            (1.0, np.float32),
            (2.0, np.float32),
            (1.0, np.float64),
            (0.3, np.float64),
            (1.5, np.float64),
            (2.0, np.float64),
        ]
    ),
)
def test_values_on_the_grid_never_move(
    levels_k: list[int], weight: int, seed: int, case: tuple[float, type[np.floating]]
) -> None:
    # Grid points k * clip / L, as exactly as the dtype holds them: float32 with a power-of-two
    # scale L / clip (exact), float64 with any scale (within a few ulps, which rint(y 2^32)
    # absorbs). At |k| = L the float value may lie an ulp outside the clip bound and be counted.
    clip, dtype = case
    q = QuantizationConfig.from_clip(clip, 1 << 12)
    x = (np.array(levels_k, dtype=np.float64) * (q.clip / q.levels)).astype(dtype)
    enc = quantize(x, weight, q, np.random.default_rng(seed))
    assert signed_sum(enc.vector).tolist() == [k * weight for k in levels_k]
    assert enc.clipped <= sum(1 for k in levels_k if abs(k) == q.levels)


def test_out_of_range_values_are_clipped_to_the_extreme_levels_and_counted() -> None:
    q = QuantizationConfig.from_clip(1.0, 100)
    x = np.array([0.0, 1.0, 1.0000001, -1.0, -7.0, 1e308, -1e308, 0.5], dtype=np.float64)
    enc = quantize(x, 3, q, np.random.default_rng(0))
    assert enc.clipped == 4
    assert signed_sum(enc.vector).tolist() == [0, 300, 300, -300, -300, 300, -300, 150]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_element_anywhere_is_refused(bad: float) -> None:
    x = np.zeros(3 * CHUNK + 5, dtype=np.float32)
    x[2 * CHUNK + 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(x, 1, QuantizationConfig.from_clip(1.0, 16), np.random.default_rng(0))


def test_a_weight_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        quantize(np.zeros(4), 0, QuantizationConfig.from_clip(1.0, 16), np.random.default_rng(0))


@given(
    cuts=st.lists(st.integers(0, 3 * CHUNK + 17), max_size=6),
    seed=st.integers(0, 2**32 - 1),
    bits=st.sampled_from([32, 64]),
)
def test_the_encoding_does_not_depend_on_how_the_vector_is_cut_into_slices(
    cuts: list[int], seed: int, bits: int
) -> None:
    n = 3 * CHUNK + 17
    q = QuantizationConfig.from_clip(1.0, 1 << 12, bits)
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    whole = quantize(x, 5, q, np.random.default_rng(seed))
    encoder = Quantizer(5, q, np.random.default_rng(seed))
    out = np.empty(n, dtype=whole.vector.dtype)
    bounds = [0, *sorted(cuts), n]
    for start, end in itertools.pairwise(bounds):
        encoder.encode_into(x[start:end], out[start:end])
    assert np.array_equal(out, whole.vector)
    assert encoder.clipped == whole.clipped


def test_the_same_generator_seed_gives_the_same_encoding_and_another_seed_does_not() -> None:
    q = QuantizationConfig.from_clip(1.0, 1 << 12)
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 0.1
    a = quantize(x, 1, q, np.random.default_rng(3)).vector
    assert np.array_equal(a, quantize(x, 1, q, np.random.default_rng(3)).vector)
    assert not np.array_equal(a, quantize(x, 1, q, np.random.default_rng(4)).vector)


def test_float32_and_float64_inputs_with_the_same_values_encode_identically() -> None:
    q = QuantizationConfig.from_clip(0.7, 1000)
    x = np.random.default_rng(2).standard_normal(50_000).astype(np.float32)
    a = quantize(x, 9, q, np.random.default_rng(5))
    b = quantize(x.astype(np.float64), 9, q, np.random.default_rng(5))
    assert np.array_equal(a.vector, b.vector) and a.clipped == b.clipped > 0


def test_the_dequantized_weighted_sum_is_within_one_step_per_unit_weight() -> None:
    q = QuantizationConfig.from_clip(1.0, 1 << 12)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(20_000) * 0.3 for _ in range(5)]
    weights = [3, 10, 1, 7, 100]
    total = np.zeros(20_000, dtype=np.uint32)
    for x, w in zip(xs, weights, strict=True):
        total += quantize(x, w, q, rng).vector
    exact = sum(w * np.clip(x, -q.clip, q.clip) for x, w in zip(xs, weights, strict=True))
    assert np.all(np.abs(dequantize(total, q) - exact) < sum(weights) * q.step)


@given(
    n=st.sampled_from([0, 1, 5, CHUNK - 1, CHUNK + 3, 2 * CHUNK + 1]),
    k=st.integers(0, 4),
    seed=st.integers(0, 2**32 - 1),
    bits=st.sampled_from([32, 64]),
)
def test_the_fused_masked_encoding_equals_quantize_then_masks_then_sha256(
    n: int, k: int, seed: int, bits: int
) -> None:
    q = QuantizationConfig.from_clip(1.0, 1 << 12, bits)
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    masks = [Mask(bytes([i + 1]) * 32, b"d%d" % i, negate=i % 2 == 1) for i in range(k)]
    fused = encode_masked(x, 4, q, np.random.default_rng(seed), masks)
    expected = quantize(x, 4, q, np.random.default_rng(seed))
    vector = expected.vector.copy()
    for m in masks:
        prg.add_mask_into(vector, m.seed, domain=m.domain, negate=m.negate)
    assert np.array_equal(fused.vector, vector)
    assert fused.clipped == expected.clipped
    assert fused.digest == hashlib.sha256(vector.tobytes()).digest()
