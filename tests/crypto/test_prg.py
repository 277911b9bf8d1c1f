"""Behaviour and property tests for fedseal.crypto.prg."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import prg

SEED = bytes(range(32))
CHUNK_VALUES = prg.CHUNK_BYTES // 4  # the implementation's chunk, in uint32 values

sizes = st.one_of(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=CHUNK_VALUES - 3, max_value=CHUNK_VALUES + 3),
    st.integers(min_value=0, max_value=3 * CHUNK_VALUES),
)
seeds = st.binary(min_size=32, max_size=32)
domains = st.binary(min_size=1, max_size=16)


def test_the_stream_is_aes256_ctr_under_the_documented_key_derivation() -> None:
    domain = b"pairwise|run|round"
    key = hashlib.sha256(
        b"fedseal/v1/prg\x00" + struct.pack(">I", len(domain)) + domain + SEED
    ).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4000))
    assert prg.expand(SEED, 1000, domain=domain).tobytes() == np.frombuffer(stream, "<u4").tobytes()
    assert np.array_equal(
        prg.expand(SEED, 500, domain=domain, dtype=np.uint64), np.frombuffer(stream, "<u8")
    )


@given(seeds, domains, sizes)
def test_expand_is_deterministic(seed: bytes, domain: bytes, n: int) -> None:
    assert np.array_equal(prg.expand(seed, n, domain=domain), prg.expand(seed, n, domain=domain))


@given(seeds, seeds, domains, domains)
def test_a_different_seed_or_domain_gives_a_different_stream(
    s1: bytes, s2: bytes, d1: bytes, d2: bytes
) -> None:
    if (s1, d1) != (s2, d2):
        assert not np.array_equal(prg.expand(s1, 8, domain=d1), prg.expand(s2, 8, domain=d2))


def test_length_prefixing_keeps_domain_and_seed_apart() -> None:
    # Moving a byte between the domain and the seed must not give the same stream.
    assert prg.derive_stream_key(SEED, b"ab") != prg.derive_stream_key(SEED, b"a")
    assert prg.derive_stream_key(b"b" + SEED[:31], b"a") != prg.derive_stream_key(SEED, b"ab")


@given(seeds, domains, sizes)
def test_a_prefix_of_a_longer_stream_is_the_shorter_stream(
    seed: bytes, domain: bytes, n: int
) -> None:
    long = prg.expand(seed, n + 17, domain=domain)
    assert np.array_equal(prg.expand(seed, n, domain=domain), long[:n])


@given(seeds, domains, sizes, st.sampled_from([np.uint32, np.uint64]))
def test_chunked_add_mask_into_equals_adding_the_expanded_stream(
    seed: bytes, domain: bytes, n: int, dtype: type[np.unsignedinteger]
) -> None:
    base = np.arange(n, dtype=dtype) * dtype(2654435761)
    acc = base.copy()
    prg.add_mask_into(acc, seed, domain=domain)
    expected = base + prg.expand(seed, n, domain=domain, dtype=dtype)  # wraps modulo 2**bits
    assert np.array_equal(acc, expected)
    prg.add_mask_into(acc, seed, domain=domain, negate=True)
    assert np.array_equal(acc, base)


def test_masks_of_several_parties_cancel_in_the_sum() -> None:
    n = 100_003
    x = [np.full(n, i, dtype=np.uint32) for i in range(3)]
    # Pairwise masks: i adds, j subtracts, for i < j.
    for i in range(3):
        for j in range(i + 1, 3):
            seed = bytes([i, j]) * 16
            prg.add_mask_into(x[i], seed, domain=b"pair")
            prg.add_mask_into(x[j], seed, domain=b"pair", negate=True)
    assert not np.array_equal(x[0], np.zeros(n, np.uint32))
    total = x[0] + x[1] + x[2]
    assert np.array_equal(total, np.full(n, 3, dtype=np.uint32))


def test_expand_fills_a_preallocated_buffer_in_place() -> None:
    out = np.zeros(1000, dtype=np.uint64)
    result = prg.expand(SEED, 1000, domain=b"d", dtype=np.uint64, out=out)
    assert result is out
    assert np.array_equal(out, prg.expand(SEED, 1000, domain=b"d", dtype=np.uint64))


def test_the_output_looks_uniform() -> None:
    values = prg.expand(SEED, 1 << 16, domain=b"stats")
    bits = np.unpackbits(values.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01
    assert len(np.unique(values)) > (1 << 16) - 5


@pytest.mark.parametrize(
    "call",
    [
        lambda: prg.expand(b"short", 4, domain=b"d"),
        lambda: prg.expand(SEED, 4, domain=b""),
        lambda: prg.expand(SEED, -1, domain=b"d"),
        lambda: prg.expand(SEED, 4, domain=b"d", out=np.zeros(5, np.uint32)),
        lambda: prg.expand(SEED, 4, domain=b"d", out=np.zeros(4, np.uint64)),
        lambda: prg.add_mask_into(np.zeros(8, np.uint32)[::2], SEED, domain=b"d"),
    ],
)
def test_bad_arguments_are_programming_errors(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_other_dtypes_are_refused() -> None:
    with pytest.raises(TypeError):
        prg.expand(SEED, 4, domain=b"d", dtype=np.int32)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        prg.add_mask_into(np.zeros(4, np.float32), SEED, domain=b"d")  # type: ignore[arg-type]


@given(seeds, domains, st.lists(st.integers(0, CHUNK_VALUES + 5), max_size=5))
def test_a_stream_read_in_pieces_is_the_expanded_stream(
    seed: bytes, domain: bytes, pieces: list[int]
) -> None:
    stream = prg.Stream(seed, domain)
    parts = []
    for n in pieces:
        out = np.empty(n, dtype=np.uint32)
        stream.read_into(out)
        parts.append(out)
    got = np.concatenate([np.empty(0, np.uint32), *parts])
    assert np.array_equal(got, prg.expand(seed, sum(pieces), domain=domain))


@given(
    st.lists(st.tuples(seeds, domains, st.booleans()), max_size=5),
    sizes,
    st.sampled_from([np.uint32, np.uint64]),
)
def test_adding_many_masks_at_once_equals_adding_them_one_by_one(
    specs: list[tuple[bytes, bytes, bool]], n: int, dtype: type[np.unsignedinteger]
) -> None:
    base = np.arange(n, dtype=dtype) * dtype(2654435761)
    one_by_one = base.copy()
    for seed, domain, negate in specs:
        prg.add_mask_into(one_by_one, seed, domain=domain, negate=negate)
    at_once = base.copy()
    prg.add_masks_into(at_once, [prg.Mask(s, d, negate=g) for s, d, g in specs])
    assert np.array_equal(at_once, one_by_one)


def test_a_mask_sum_applied_to_consecutive_slices_continues_every_stream() -> None:
    n = 3 * CHUNK_VALUES + 11
    masks = [prg.Mask(SEED, b"a"), prg.Mask(bytes(32), b"b", negate=True)]
    whole = np.zeros(n, dtype=np.uint32)
    prg.add_masks_into(whole, masks)
    sliced = np.zeros(n, dtype=np.uint32)
    summer = prg.MaskSum(np.uint32, masks)
    for start, end in [(0, 7), (7, CHUNK_VALUES + 2), (CHUNK_VALUES + 2, n)]:
        summer.apply_into(sliced[start:end])
    assert np.array_equal(sliced, whole)
    expected = prg.expand(SEED, n, domain=b"a") - prg.expand(bytes(32), n, domain=b"b")
    assert np.array_equal(whole, expected)


def test_a_mask_sum_refuses_a_chunk_of_another_dtype_or_layout() -> None:
    summer = prg.MaskSum(np.uint32, [prg.Mask(SEED, b"a")])
    with pytest.raises(TypeError):
        summer.apply_into(np.zeros(4, np.uint64))
    with pytest.raises(ValueError):
        summer.apply_into(np.zeros(8, np.uint32)[::2])
    with pytest.raises(ValueError):
        prg.MaskSum(np.uint32, [prg.Mask(b"short", b"a")])
