"""Behaviour and property tests for fedseal.crypto.shamir."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import Share, ShareError, shamir
from fedseal.crypto.shamir import PRIME, apply_weights, lagrange_weights

params = st.integers(min_value=1, max_value=12).flatmap(
    lambda t: st.tuples(st.just(t), st.integers(min_value=t, max_value=t + 10))
)
secrets = st.binary(min_size=0, max_size=40)


@given(secrets, params, st.randoms(use_true_random=False))
def test_any_threshold_shares_reconstruct_the_secret(
    secret: bytes, tn: tuple[int, int], rnd: random.Random
) -> None:
    t, n = tn
    shares = shamir.split(secret, t, n)
    assert [s.index for s in shares] == list(range(1, n + 1))
    subset = rnd.sample(shares, rnd.randint(t, n))
    assert shamir.combine(subset, t, len(secret)) == secret


@given(secrets, params, st.randoms(use_true_random=False))
def test_fewer_than_threshold_shares_are_refused(
    secret: bytes, tn: tuple[int, int], rnd: random.Random
) -> None:
    t, n = tn
    subset = rnd.sample(shamir.split(secret, t, n), t - 1)
    with pytest.raises(ShareError) as exc:
        shamir.combine(subset, t, len(secret))
    assert exc.value.reason == "too-few-shares"


@given(
    st.binary(min_size=2, max_size=32).filter(lambda b: len(b) % 2 == 0),
    st.binary(min_size=32, max_size=32),
    params.filter(lambda tn: tn[0] >= 2),
    st.randoms(use_true_random=False),
)
def test_threshold_minus_one_shares_are_consistent_with_every_candidate_secret(
    secret: bytes, candidate_seed: bytes, tn: tuple[int, int], rnd: random.Random
) -> None:
    # Perfect secrecy: for any candidate secret there is a share completing the t-1 observed
    # shares to a valid set that reconstructs the candidate.
    t, n = tn
    candidate = candidate_seed[: len(secret)]
    observed = rnd.sample(shamir.split(secret, t, n), t - 1)
    xs = np.array([0] + [s.index for s in observed], dtype=np.uint64)
    limbs = np.frombuffer(candidate, dtype=">u2").astype(np.uint64)
    ys = np.stack([limbs] + [s.values.astype(np.uint64) for s in observed])
    free_x = next(x for x in range(1, n + 2) if x not in {s.index for s in observed})
    completing = apply_weights(lagrange_weights(xs, np.array([free_x], np.uint64)), ys)[0]
    forged = Share(free_x, completing.astype(np.uint32))
    assert shamir.combine([*observed, forged], t, len(secret)) == candidate


def test_split_many_shares_each_secret_independently() -> None:
    secrets = [os.urandom(32) for _ in range(20)] + [b"", b"odd"]
    result = shamir.split_many(secrets, 4, 7)
    assert len(result) == len(secrets)
    for secret, shares in zip(secrets, result, strict=True):
        assert len(shares) == 7
        assert shamir.combine(shares[2:6], 4, len(secret)) == secret


def test_duplicate_indices_are_refused() -> None:
    shares = shamir.split(b"x" * 32, 3, 5)
    with pytest.raises(ShareError) as exc:
        shamir.combine([shares[0], shares[1], shares[1]], 3, 32)
    assert exc.value.reason == "duplicate-index"


def test_an_extra_share_that_disagrees_is_detected() -> None:
    shares = shamir.split(os.urandom(32), 3, 6)
    values = shares[4].values.copy()
    values[0] = (values[0] + 1) % PRIME
    bad = Share(5, values)
    with pytest.raises(ShareError) as exc:
        shamir.combine([*shares[:4], bad], 3, 32)
    assert exc.value.reason == "inconsistent"
    assert exc.value.index == 5


def test_a_tampered_share_among_exactly_threshold_shares_gives_out_of_range_or_another_secret() -> (
    None
):
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    values = shares[0].values.copy()
    values[:] = (values.astype(np.uint64) + 12345) % PRIME
    try:
        assert shamir.combine([Share(1, values), *shares[1:3]], 3, 32) != secret
    except ShareError as exc:
        assert exc.reason == "out-of-range"


def test_shares_of_the_wrong_length_or_out_of_field_values_are_refused() -> None:
    shares = shamir.split(os.urandom(32), 2, 3)
    with pytest.raises(ShareError) as exc:
        shamir.combine(shares, 2, 30)
    assert exc.value.reason == "encoding"
    with pytest.raises(ShareError) as exc:
        Share(1, np.array([PRIME], dtype=np.uint32))
    assert exc.value.reason == "out-of-range"
    for index in (0, -1, shamir.MAX_SHARES + 1):
        with pytest.raises(ShareError):
            Share(index, np.zeros(2, np.uint32))


def test_an_odd_length_secret_with_nonzero_padding_is_refused() -> None:
    # Shares of the 2-byte secret b"ab" claimed as a 1-byte secret: the pad byte is b"b".
    shares = shamir.split(b"ab", 2, 3)
    with pytest.raises(ShareError) as exc:
        shamir.combine(shares, 2, 1)
    assert exc.value.reason == "out-of-range"


@given(secrets, params)
def test_share_encoding_round_trips(secret: bytes, tn: tuple[int, int]) -> None:
    for share in shamir.split(secret, *tn):
        assert Share.from_bytes(share.to_bytes()) == share


def test_malformed_share_encodings_are_refused() -> None:
    good = shamir.split(b"k" * 32, 2, 3)[0].to_bytes()
    too_big = good[:-4] + (PRIME).to_bytes(4, "big")
    for bad in (b"", good[:7], good[:-1], good + b"\x00", too_big, b"\x00" * 4 + good[4:]):
        with pytest.raises(ShareError):
            Share.from_bytes(bad)


def test_shares_are_read_only_and_never_print_their_values() -> None:
    share = shamir.split(b"s" * 32, 2, 2)[0]
    with pytest.raises(ValueError):
        share.values[0] = 1
    assert repr(share) == "Share(index=1, len=16)"


def test_coefficients_never_take_the_rejected_value() -> None:
    # A randomness source that first returns 0xFFFFFFFF words (masked to 2**31 - 1 = p) must be
    # redrawn; with t = 2 and one limb, share y = c0 + c1 * x exposes c1 = y(1) - c0.
    calls: list[int] = []

    def randbytes(n: int) -> bytes:
        calls.append(n)
        return (
            b"\xff\xff\xff\xff" * (n // 4)
            if len(calls) == 1
            else (5).to_bytes(4, "little") * (n // 4)
        )

    shares = shamir.split(b"\x00\x07", 2, 3, randbytes=randbytes)
    assert len(calls) == 2
    assert [int(s.values[0]) for s in shares] == [7 + 5, 7 + 10, 7 + 15]


def test_threshold_and_share_count_are_checked() -> None:
    for t, n in ((0, 3), (4, 3), (2, shamir.MAX_SHARES + 1)):
        with pytest.raises(ValueError):
            shamir.split(b"s", t, n)
