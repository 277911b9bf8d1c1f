"""The opt-in memo of successful verifications (simulations: many virtual sites, one process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.crypto import SignatureError, generate_identity_key, sign, signing, verify

SK = generate_identity_key()
PK = SK.public_key()
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Turns the memo on and records every real ECDSA check :func:`verify` makes."""
    seen: list[bytes] = []
    real = signing._verify_der

    def counted(public_key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> None:
        seen.append(signature)
        real(public_key, message, signature)

    monkeypatch.setattr(signing, "_verify_der", counted)
    signing.share_verified(capacity=4)
    yield seen  # tests/conftest.py turns it off again


def test_it_is_off_unless_turned_on() -> None:
    import subprocess
    import sys

    code = "from fedseal.crypto import signing; print(signing._memo is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_when_off_every_check_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = signing._verify_der
    monkeypatch.setattr(signing, "_verify_der", lambda k, m, s: (calls.append(s), real(k, m, s)))
    sig = sign(SK, "t", b"p")
    verify(PK, "t", b"p", sig)
    verify(PK, "t", b"p", sig)
    assert len(calls) == 2


def test_a_successful_check_is_not_repeated(checks: list[bytes]) -> None:
    sig = sign(SK, "fedseal.KeyAdvert", b"advert")
    for _ in range(5):
        verify(PK, "fedseal.KeyAdvert", b"advert", sig)
    assert checks == [sig]


def test_a_failure_is_never_remembered_and_every_variation_is_checked(checks: list[bytes]) -> None:
    sig = sign(SK, "t", b"p")
    verify(PK, "t", b"p", sig)
    other = generate_identity_key().public_key()
    for _ in range(2):
        with pytest.raises(SignatureError):
            verify(PK, "t", b"q", sig)  # another payload
        with pytest.raises(SignatureError):
            verify(PK, "u", b"p", sig)  # another type
        with pytest.raises(SignatureError):
            verify(other, "t", b"p", sig)  # a substituted key
    r, s = decode_dss_signature(sig)
    twin = encode_dss_signature(r, N - s)
    verify(PK, "t", b"p", twin)  # the malleated twin is checked on its own (and verifies)
    assert checks == [sig] + [sig] * 6 + [twin]


def test_the_memo_is_bounded_and_drops_the_least_recently_used(checks: list[bytes]) -> None:
    sigs = [sign(SK, "t", bytes([i])) for i in range(6)]
    for i, s in enumerate(sigs):
        verify(PK, "t", bytes([i]), s)
    assert signing._memo is not None and len(signing._memo) == 4
    checks.clear()
    verify(PK, "t", bytes([5]), sigs[5])  # recent: remembered
    verify(PK, "t", bytes([0]), sigs[0])  # dropped: checked again
    assert checks == [sigs[0]]


def test_a_wrong_key_type_is_refused_with_the_memo_on(checks: list[bytes]) -> None:
    with pytest.raises(TypeError):
        verify(b"not a key", "t", b"p", sign(SK, "t", b"p"))  # type: ignore[arg-type]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        signing.share_verified(0)
    assert signing._memo is None


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=64),
    flips=st.lists(st.tuples(st.integers(0, 71), st.integers(1, 255)), max_size=3),
    use_payload=st.binary(max_size=64),
)
def test_verify_gives_the_same_answer_with_the_memo_on_or_off(
    payload: bytes, flips: list[tuple[int, int]], use_payload: bytes
) -> None:
    sig = bytearray(sign(SK, "t", payload))
    for pos, x in flips:
        if pos < len(sig):
            sig[pos] ^= x
    candidates = [(payload, bytes(sig)), (use_payload, bytes(sig)), (payload, sign(SK, "t", payload))]
    answers = []
    for memo in (None, 16):
        signing.share_verified(memo)
        try:
            got = []
            for _ in range(2):  # the second pass hits the memo where it is on
                for p, s in candidates:
                    try:
                        verify(PK, "t", p, s)
                        got.append(True)
                    except SignatureError:
                        got.append(False)
            answers.append(got)
        finally:
            signing.share_verified(None)
    assert answers[0] == answers[1]


def test_turning_it_on_again_keeps_what_it_remembers(checks: list[bytes]) -> None:
    sig = sign(SK, "t", b"p")
    verify(PK, "t", b"p", sig)
    signing.share_verified(capacity=4)  # a second virtual site built in the same process
    verify(PK, "t", b"p", sig)
    assert checks == [sig]


def test_the_memo_knows_a_key_by_its_point_not_by_its_object(checks: list[bytes]) -> None:
    """The memo caches each key object's encoded point; another object holding the same key
    hits the remembered check (a substituted key is refused: see the test above)."""
    from fedseal.crypto import public_key_from_der, public_key_to_der

    sig = sign(SK, "t", b"p")
    verify(PK, "t", b"p", sig)
    fresh = public_key_from_der(bytes(public_key_to_der(PK)))  # another object, the same key
    verify(fresh, "t", b"p", sig)
    assert checks == [sig]
