"""The simulation's shared signature checks (fedseal.sim.shared_work): many virtual sites in one
process remember successful verifications only."""

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
from fedseal.protocol import seams
from fedseal.sim.shared_work import SharedWork

SK = generate_identity_key()
PK = SK.public_key()
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Records every real ECDSA check a verification makes."""
    seen: list[bytes] = []
    real = signing.verify_der

    def counted(public_key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> None:
        seen.append(signature)
        real(public_key, message, signature)

    monkeypatch.setattr(signing, "verify_der", counted)
    yield seen


@pytest.fixture
def work() -> SharedWork:
    """Shared work remembering at most 4 verifications."""
    return SharedWork(verified_capacity=4)


def test_production_verification_keeps_no_memo() -> None:
    import subprocess
    import sys

    code = (
        "from fedseal.crypto import signing; from fedseal.protocol import seams; "
        "print(hasattr(signing, '_memo'), hasattr(signing, 'share_verified'), "
        "seams.NO_SHARING.__slots__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False ()"


@pytest.mark.parametrize("verifier", [verify, seams.NO_SHARING.verify])
def test_without_shared_work_every_check_is_made(
    monkeypatch: pytest.MonkeyPatch, verifier: seams.Verifier
) -> None:
    calls: list[bytes] = []
    real = signing.verify_der
    monkeypatch.setattr(signing, "verify_der", lambda k, m, s: (calls.append(s), real(k, m, s)))
    sig = sign(SK, "t", b"p")
    verifier(PK, "t", b"p", sig)
    verifier(PK, "t", b"p", sig)
    assert len(calls) == 2


def test_a_successful_check_is_not_repeated(checks: list[bytes], work: SharedWork) -> None:
    sig = sign(SK, "fedseal.KeyAdvert", b"advert")
    for _ in range(5):
        work.verify(PK, "fedseal.KeyAdvert", b"advert", sig)
    assert checks == [sig]


def test_a_failure_is_never_remembered_and_every_variation_is_checked(
    checks: list[bytes], work: SharedWork
) -> None:
    sig = sign(SK, "t", b"p")
    work.verify(PK, "t", b"p", sig)
    other = generate_identity_key().public_key()
    for _ in range(2):
        with pytest.raises(SignatureError):
            work.verify(PK, "t", b"q", sig)  # another payload
        with pytest.raises(SignatureError):
            work.verify(PK, "u", b"p", sig)  # another type
        with pytest.raises(SignatureError):
            work.verify(other, "t", b"p", sig)  # a substituted key
    r, s = decode_dss_signature(sig)
    twin = encode_dss_signature(r, N - s)
    work.verify(PK, "t", b"p", twin)  # the malleated twin is checked on its own (and verifies)
    assert checks == [sig] + [sig] * 6 + [twin]


def test_the_memo_is_bounded_and_drops_the_least_recently_used(
    checks: list[bytes], work: SharedWork
) -> None:
    sigs = [sign(SK, "t", bytes([i])) for i in range(6)]
    for i, s in enumerate(sigs):
        work.verify(PK, "t", bytes([i]), s)
    assert len(work.verified) == 4
    checks.clear()
    work.verify(PK, "t", bytes([5]), sigs[5])  # recent: remembered
    work.verify(PK, "t", bytes([0]), sigs[0])  # dropped: checked again
    assert checks == [sigs[0]]


def test_a_wrong_key_type_is_refused_with_shared_work(checks: list[bytes], work: SharedWork) -> None:
    with pytest.raises(TypeError):
        work.verify(b"not a key", "t", b"p", sign(SK, "t", b"p"))  # type: ignore[arg-type]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SharedWork(verified_capacity=0)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=64),
    flips=st.lists(st.tuples(st.integers(0, 71), st.integers(1, 255)), max_size=3),
    use_payload=st.binary(max_size=64),
)
def test_verify_gives_the_same_answer_with_shared_work_or_without(
    payload: bytes, flips: list[tuple[int, int]], use_payload: bytes
) -> None:
    sig = bytearray(sign(SK, "t", payload))
    for pos, x in flips:
        if pos < len(sig):
            sig[pos] ^= x
    candidates = [(payload, bytes(sig)), (use_payload, bytes(sig)), (payload, sign(SK, "t", payload))]
    answers = []
    for verifier in (seams.NO_SHARING.verify, SharedWork(verified_capacity=16).verify):
        got = []
        for _ in range(2):  # the second pass hits the memo where there is one
            for p, s in candidates:
                try:
                    verifier(PK, "t", p, s)
                    got.append(True)
                except SignatureError:
                    got.append(False)
        answers.append(got)
    assert answers[0] == answers[1]


def test_sites_sharing_one_instance_share_what_it_remembers(
    checks: list[bytes], work: SharedWork
) -> None:
    sig = sign(SK, "t", b"p")
    work.verify(PK, "t", b"p", sig)
    work.verify(PK, "t", b"p", sig)  # a second virtual site built in the same process
    assert checks == [sig]


def test_the_memo_knows_a_key_by_its_point_not_by_its_object(
    checks: list[bytes], work: SharedWork
) -> None:
    """The memo caches each key object's encoded point; another object holding the same key
    hits the remembered check (a substituted key is refused: see the test above)."""
    from fedseal.crypto import public_key_from_der, public_key_to_der

    sig = sign(SK, "t", b"p")
    work.verify(PK, "t", b"p", sig)
    fresh = public_key_from_der(bytes(public_key_to_der(PK)))  # another object, the same key
    work.verify(fresh, "t", b"p", sig)
    assert checks == [sig]
