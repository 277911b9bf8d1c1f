"""Unit and property tests: encoding, configuration, quantization, graph, envelopes, roster."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto.errors import KeyFormatError
from fedseal.crypto.keys import (
    generate_identity_key,
    key_id,
    public_key_from_der,
    public_key_to_der,
)
from fedseal.protocol import (
    BadSignatureError,
    ConfigError,
    DecodeError,
    Limits,
    QuantizationConfig,
    RevokedSignerError,
    Roster,
    RosterEntry,
    RoundConfig,
    StaleMessageError,
    ThresholdError,
    UnknownSignerError,
)
from fedseal.protocol.encoding import Reader, Writer
from fedseal.protocol.envelope import Envelope, open_envelope, seal
from fedseal.protocol.graph import build_graph, graph_seed
from fedseal.protocol.messages import Header, SurvivorSet, decode_payload
from fedseal.protocol.params import check_parameters, least_degree, least_threshold, safe_quorum
from fedseal.protocol.quantize import dequantize, quantize, signed_sum
from fedseal.protocol.types import COORDINATOR, MessageKind, SiteId
from fedseal.sim.inmemory import deterministic_key

# -- encoding ---------------------------------------------------------------------------------


@given(
    a=st.integers(0, 255),
    b=st.integers(0, 2**16 - 1),
    c=st.integers(0, 2**32 - 1),
    d=st.integers(0, 2**64 - 1),
    blob=st.binary(max_size=64),
    text=st.text(max_size=20),
)
def test_writer_and_reader_round_trip_every_field_type(a, b, c, d, blob, text) -> None:  # type: ignore[no-untyped-def]
    data = Writer().u8(a).u16(b).u32(c).u64(d).blob(blob).text(text).fixed(b"xyz", 3).to_bytes()
    r = Reader(data, what="t")
    assert (r.u8(), r.u16(), r.u32(), r.u64(), r.blob(64), r.text(200), r.fixed(3)) == (
        a,
        b,
        c,
        d,
        blob,
        text,
        b"xyz",
    )
    r.finish()


def test_the_reader_refuses_trailing_bytes_oversized_fields_and_bad_utf8() -> None:
    with pytest.raises(DecodeError, match="trailing"):
        Reader(b"\x01\x02", what="t").finish()
    with pytest.raises(DecodeError, match="exceeds"):
        Reader(Writer().blob(b"abcdef").to_bytes(), what="t").blob(5)
    with pytest.raises(DecodeError, match="UTF-8"):
        Reader(b"\x00\x02\xff\xfe", what="t").text(10)
    with pytest.raises(DecodeError, match="truncated"):
        Reader(b"\x00\x00\x01", what="t").u32()


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 10, 32, 33, 100, 200, 1000])
def test_the_default_parameters_are_the_least_the_sites_default_floor_accepts(n: int) -> None:
    p = RoundConfig(
        vector_length=1, quantization=QuantizationConfig(1, 1), max_weight=1
    ).resolve(n)
    if n <= 32:
        assert p.degree == n - 1  # complete graph up to complete_graph_max
    else:
        assert p.degree == least_degree(n, 1 / 3, 40, min_window_dropouts=2)
    assert p.threshold == least_threshold(n, p.degree, 1 / 3, 40)
    assert p.min_survivors == safe_quorum(n, 1 / 3, p.threshold)
    check_parameters(n, p.degree, p.threshold, p.min_survivors, 1 / 3, 40)  # sites accept them


def test_a_threshold_at_or_below_half_a_neighbourhood_is_a_config_error() -> None:
    q = QuantizationConfig(1_000_000, 100)
    with pytest.raises(ConfigError, match="threshold"):
        RoundConfig(vector_length=4, quantization=q, max_weight=10, threshold=2).resolve(5)
    assert (
        RoundConfig(vector_length=4, quantization=q, max_weight=10, threshold=3)
        .resolve(5)
        .threshold
        == 3
    )


def test_quantization_that_could_wrap_around_is_a_config_error_naming_the_limits() -> None:
    q = QuantizationConfig.from_clip(1.0, 1 << 20)
    with pytest.raises(ConfigError) as info:
        RoundConfig(
            vector_length=4, quantization=q, max_weight=1000, complete_graph_max=32, auto_field=False
        ).resolve(100)
    message = info.value.message
    assert "100 sites" in message and "max_weight 1000" in message and "levels <= 21474" in message
    wide = QuantizationConfig.from_clip(1.0, 1 << 20, modulus_bits=64)
    RoundConfig(vector_length=4, quantization=wide, max_weight=1000).resolve(100)


def test_the_field_is_chosen_for_the_cohort_and_signed_into_the_parameters() -> None:
    """auto_field: 32 bits while n * levels * max_weight fits, then 64, then fewer levels."""
    q = QuantizationConfig.from_clip(1.0, 4096)
    config = RoundConfig(vector_length=4, quantization=q, max_weight=1024, complete_graph_max=1000)
    assert config.resolve(100).quantization == q  # 100 x 4096 x 1024 < 2^31
    wide = config.resolve(1000).quantization  # the refused case: 1000 x 4096 x 1024
    assert wide == QuantizationConfig.from_clip(1.0, 4096, modulus_bits=64)
    huge = RoundConfig(vector_length=4, quantization=q, max_weight=1 << 42, complete_graph_max=1000)
    coarse = huge.resolve(1000).quantization
    assert coarse.modulus_bits == 64 and coarse.levels == ((1 << 63) - 1) // (1000 << 42) < 4096
    assert 1000 * coarse.levels * (1 << 42) <= (1 << 63) - 1 < 1000 * (coarse.levels + 1) * (1 << 42)
    with pytest.raises(ConfigError, match="quantization levels in Z_2\\^64"):
        RoundConfig(vector_length=4, quantization=q, max_weight=1 << 46, complete_graph_max=1000).resolve(1000)


def test_bad_limits_and_quantization_fields_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_cohort"):
        Limits(max_cohort=0)
    with pytest.raises(ConfigError, match="modulus_bits"):
        QuantizationConfig(1, 1, modulus_bits=16)
    with pytest.raises(ConfigError, match="clip"):
        QuantizationConfig.from_clip(math.inf, 4)


# -- quantization --------------------------------------------------------------------------------


@given(
    values=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=50),
    weight=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
    bits=st.sampled_from([32, 64]),
)
def test_quantized_values_decode_within_one_step_of_the_clipped_value(
    values, weight, seed, bits
) -> None:  # type: ignore[no-untyped-def]
    q = QuantizationConfig.from_clip(1.5, 1000, bits)
    x = np.array(values)
    enc = quantize(x, weight, q, np.random.default_rng(seed))
    assert enc.vector.dtype == (np.uint32 if bits == 32 else np.uint64)
    assert enc.clipped == int(np.count_nonzero(np.abs(x) > q.clip))
    decoded = dequantize(enc.vector, q) / weight
    assert np.all(np.abs(decoded - np.clip(x, -q.clip, q.clip)) < q.step + 1e-12)


def test_stochastic_rounding_is_unbiased() -> None:
    q = QuantizationConfig.from_clip(1.0, 10)
    x = np.full(200_000, 0.123)
    enc = quantize(x, 1, q, np.random.default_rng(0))
    assert abs(float(dequantize(enc.vector, q).mean()) - 0.123) < 1e-3


def test_wrapped_sums_read_back_as_signed_integers() -> None:
    total = np.array([0xFFFFFFFF, 5, 0x80000000], dtype=np.uint32)
    assert signed_sum(total).tolist() == [-1, 5, -(2**31)]


def test_a_non_finite_update_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan]), 1, QuantizationConfig(1, 1), np.random.default_rng(0))


# -- neighbour graph ---------------------------------------------------------------------------------


@given(
    n=st.integers(3, 120), degree_half=st.integers(1, 8), seed=st.binary(min_size=32, max_size=32)
)
def test_the_graph_is_symmetric_regular_and_deterministic(n, degree_half, seed) -> None:  # type: ignore[no-untyped-def]
    sites = [SiteId(f"s{i}") for i in range(n)]
    k = min(2 * degree_half, n - 1)
    g = build_graph(sites, seed, k, k // 2 + 1)
    assert g == build_graph(list(reversed(sites)), seed, k, k // 2 + 1)
    for s in sites:
        assert len(g.of(s)) == g.degree and s not in g.of(s)
        assert all(g.adjacent(t, s) for t in g.of(s))
        assert [g.share_index(s, t) for t in g.of(s)] == list(range(1, g.degree + 1))


def test_different_seeds_give_different_sparse_graphs() -> None:
    sites = [SiteId(f"s{i}") for i in range(60)]
    a = build_graph(sites, b"a" * 32, 8, 6)
    b = build_graph(sites, b"b" * 32, 8, 6)
    assert a.neighbours != b.neighbours


def test_too_few_advertisers_for_the_threshold_is_a_threshold_error() -> None:
    with pytest.raises(ThresholdError):
        build_graph([SiteId("a"), SiteId("b"), SiteId("c")], bytes(32), 4, 3)


def test_the_graph_seed_ignores_insertion_order() -> None:
    d = {SiteId("b"): b"2" * 32, SiteId("a"): b"1" * 32}
    assert graph_seed(d) == graph_seed(dict(reversed(list(d.items()))))


# -- envelopes and roster --------------------------------------------------------------------------


def _survivor_message() -> SurvivorSet:
    header = Header(b"r" * 16, 3, COORDINATOR, SiteId("a"), b"m" * 32, b"s" * 32)
    return SurvivorSet(header=header, survivors=(SiteId("a"), SiteId("b")))


def test_an_envelope_opens_to_the_same_message_and_binds_its_kind() -> None:
    key = deterministic_key(b"k")
    data = seal(_survivor_message(), key)
    opened = open_envelope(
        data,
        Limits(),
        expected=(MessageKind.SURVIVOR_SET,),
        resolve_signer=lambda e: key.public_key(),
    )
    assert opened.message == _survivor_message()
    assert opened.envelope.signer == key_id(key.public_key())
    with pytest.raises(StaleMessageError):
        open_envelope(
            data,
            Limits(),
            expected=(MessageKind.UNMASK_REQUEST,),
            resolve_signer=lambda e: key.public_key(),
        )
    # Re-labelling the kind breaks the signature (the type name is in the signed bytes).
    relabelled = Envelope(
        MessageKind.ROUND_RESULT,
        opened.envelope.payload,
        opened.envelope.signature,
        opened.envelope.signer,
    )
    with pytest.raises((BadSignatureError, DecodeError)):
        open_envelope(
            relabelled.to_bytes(),
            Limits(),
            expected=(MessageKind.ROUND_RESULT,),
            resolve_signer=lambda e: key.public_key(),
        )


def test_every_single_byte_flip_of_an_envelope_is_rejected() -> None:
    key = deterministic_key(b"k")
    data = seal(_survivor_message(), key)
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        try:
            open_envelope(
                bytes(flipped),
                Limits(),
                expected=(MessageKind.SURVIVOR_SET,),
                resolve_signer=lambda e: (
                    key.public_key()
                    if e.signer == key_id(key.public_key())
                    else (_ for _ in ()).throw(UnknownSignerError("unknown"))
                ),
            )
        except (DecodeError, BadSignatureError, StaleMessageError, UnknownSignerError):
            continue
        raise AssertionError(f"flip at byte {i} accepted")


def test_site_lists_must_be_strictly_sorted() -> None:
    msg = _survivor_message()
    unsorted = SurvivorSet(header=msg.header, survivors=(SiteId("b"), SiteId("a")))
    with pytest.raises(DecodeError, match="sorted"):
        decode_payload(MessageKind.SURVIVOR_SET, unsorted.to_payload(), Limits())


def test_the_roster_resolves_only_the_enrolled_active_key_of_a_site() -> None:
    a, b, stranger = (deterministic_key(x) for x in (b"a", b"b", b"c"))
    roster = Roster(
        [
            RosterEntry(SiteId("a"), a.public_key()),
            RosterEntry(SiteId("b"), b.public_key(), active=False),
        ]
    )
    assert roster.require_signer("a", key_id(a.public_key())).site == "a"
    with pytest.raises(UnknownSignerError, match="another site"):
        roster.require_signer("a", key_id(b.public_key()))
    with pytest.raises(UnknownSignerError, match="not enrolled"):
        roster.require_signer("a", key_id(stranger.public_key()))
    with pytest.raises(RevokedSignerError):
        roster.require_signer("b", key_id(b.public_key()))
    with pytest.raises(ConfigError):
        Roster([RosterEntry(SiteId("a"), a.public_key()), RosterEntry(SiteId("z"), a.public_key())])
    same = Roster(
        [
            RosterEntry(SiteId("a"), a.public_key()),
            RosterEntry(SiteId("b"), b.public_key(), active=False),
        ]
    )
    assert roster.digest() == same.digest()
    assert roster.digest() != Roster([RosterEntry(SiteId("a"), a.public_key())]).digest()


# -- cohort key ids ----------------------------------------------------------------------------


def test_a_key_id_is_the_sha256_of_the_only_der_encoding_a_site_accepts() -> None:
    # ClientSession hashes the cohort's listed DER bytes instead of re-encoding each key: this
    # holds because public_key_from_der accepts the canonical encoding only.
    public = generate_identity_key().public_key()
    der = public_key_to_der(public)
    assert hashlib.sha256(der).digest() == key_id(public_key_from_der(der))
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    compressed = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + point
    with pytest.raises(KeyFormatError):
        public_key_from_der(compressed)
