"""Behaviour tests for fedseal.crypto.agreement."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import AgreementError, AgreementKey, KeyFormatError, derive_shared_key, kdf_info
from fedseal.crypto.agreement import POINT_SIZE

A, B, C = AgreementKey.generate(), AgreementKey.generate(), AgreementKey.generate()
INFO = kdf_info("test", b"run-1", (3).to_bytes(8, "big"), b"site-a", b"site-b")


def test_both_parties_derive_the_same_key() -> None:
    k_ab = derive_shared_key(A, B.public_bytes(), info=INFO)
    assert k_ab == derive_shared_key(B, A.public_bytes(), info=INFO)
    assert len(k_ab) == 32
    assert derive_shared_key(A, C.public_bytes(), info=INFO) != k_ab


def test_a_different_context_gives_an_unrelated_key() -> None:
    other = kdf_info("test", b"run-1", (4).to_bytes(8, "big"), b"site-a", b"site-b")
    assert derive_shared_key(A, B.public_bytes(), info=INFO) != derive_shared_key(
        A, B.public_bytes(), info=other
    )


def test_an_empty_context_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        derive_shared_key(A, B.public_bytes(), info=b"")
    with pytest.raises(ValueError):
        kdf_info("")


@given(
    st.lists(st.binary(max_size=6), max_size=4),
    st.lists(st.binary(max_size=6), max_size=4),
)
def test_kdf_info_is_injective_over_its_parts(xs: list[bytes], ys: list[bytes]) -> None:
    if xs != ys:
        assert kdf_info("p", *xs) != kdf_info("p", *ys)


def test_private_bytes_round_trip_and_keep_the_public_key() -> None:
    again = AgreementKey.from_private_bytes(A.private_bytes())
    assert again.public_bytes() == A.public_bytes()
    assert len(A.private_bytes()) == 32 and len(A.public_bytes()) == POINT_SIZE


def test_generation_draws_from_the_given_randomness_and_rejects_bad_scalars() -> None:
    draws = iter([b"\x00" * 32, b"\xff" * 32, (7).to_bytes(32, "big")])
    key = AgreementKey.generate(randbytes=lambda n: next(draws))
    assert key.private_bytes() == (7).to_bytes(32, "big")


@pytest.mark.parametrize("scalar", [b"\x00" * 32, b"\xff" * 32, b"\x01" * 31])
def test_invalid_private_scalars_are_refused(scalar: bytes) -> None:
    with pytest.raises(KeyFormatError):
        AgreementKey.from_private_bytes(scalar)


def _off_curve(point: bytes) -> bytes:
    y = int.from_bytes(point[33:], "big")
    return point[:33] + ((y + 1) % (1 << 256)).to_bytes(32, "big")


@pytest.mark.parametrize(
    "peer",
    [
        b"",
        b"\x04" + b"\x00" * 64,  # the point at infinity is not encodable: (0, 0) is off-curve
        _off_curve(B.public_bytes()),
        B.public_bytes()[:-1],
        B.public_bytes() + b"\x00",
        b"\x02" + B.public_bytes()[1:33],  # compressed form is not accepted
        b"\x05" + B.public_bytes()[1:],
    ],
    ids=["empty", "zero", "off-curve", "short", "long", "compressed", "bad-prefix"],
)
def test_an_invalid_peer_point_raises_agreement_error(peer: bytes) -> None:
    with pytest.raises(AgreementError):
        derive_shared_key(A, peer, info=INFO)


def test_every_single_byte_mutation_of_a_peer_point_changes_or_breaks_the_key() -> None:
    good = derive_shared_key(A, B.public_bytes(), info=INFO)
    point = B.public_bytes()
    for i, mask in itertools.product(range(len(point)), (0x01, 0x80)):
        bad = point[:i] + bytes([point[i] ^ mask]) + point[i + 1 :]
        try:
            assert derive_shared_key(A, bad, info=INFO) != good
        except AgreementError:
            pass


def test_the_ecdh_secret_with_a_peer_is_computed_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SecAgg site derives both directional share keys from one agreement per neighbour."""
    from fedseal.crypto import agreement

    decoded: list[bytes] = []
    real = agreement.peer_point
    monkeypatch.setattr(agreement, "peer_point", lambda p: (decoded.append(p), real(p))[1])
    a, b, c = AgreementKey.generate(), AgreementKey.generate(), AgreementKey.generate()
    to_b = derive_shared_key(a, b.public_bytes(), info=kdf_info("share", b"a", b"b"))
    from_b = derive_shared_key(a, b.public_bytes(), info=kdf_info("share", b"b", b"a"))
    assert to_b != from_b  # directional keys from one secret
    assert from_b == derive_shared_key(b, a.public_bytes(), info=kdf_info("share", b"b", b"a"))
    derive_shared_key(a, c.public_bytes(), info=kdf_info("share", b"a", b"c"))
    assert decoded == [b.public_bytes(), a.public_bytes(), c.public_bytes()]


def test_an_invalid_peer_point_is_refused_every_time() -> None:
    a = AgreementKey.generate()
    bad = b"\x04" + b"\x01" * 64
    for _ in range(2):
        with pytest.raises(AgreementError):
            derive_shared_key(a, bad, info=b"x")
