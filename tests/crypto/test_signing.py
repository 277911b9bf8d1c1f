"""Behaviour tests for fedseal.crypto.signing."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import (
    SignatureError,
    generate_identity_key,
    sign,
    signed_content_digest,
    verify,
)

SK = generate_identity_key()
PK = SK.public_key()


@given(st.text(min_size=1, max_size=40), st.binary(max_size=300))
def test_a_signature_verifies_for_its_own_type_and_payload(
    message_type: str, payload: bytes
) -> None:
    verify(PK, message_type, payload, sign(SK, message_type, payload))


def test_a_signature_does_not_verify_for_another_type_payload_or_key() -> None:
    sig = sign(SK, "fedseal.A", b"payload")
    with pytest.raises(SignatureError) as exc:
        verify(PK, "fedseal.B", b"payload", sig)
    assert exc.value.message_type == "fedseal.B"
    with pytest.raises(SignatureError):
        verify(PK, "fedseal.A", b"payload!", sig)
    with pytest.raises(SignatureError):
        verify(generate_identity_key().public_key(), "fedseal.A", b"payload", sig)


def test_the_signed_bytes_are_domain_separated_and_length_prefixed() -> None:
    payload = b"xyz"
    expected = (
        b"fedseal/v1/sig\x00" + struct.pack(">H", 4) + b"type" + struct.pack(">Q", 3) + payload
    )
    assert signed_content_digest("type", payload) == hashlib.sha256(expected).digest()
    # The signature is an ordinary ECDSA/SHA-256 signature over exactly those bytes.
    PK.verify(sign(SK, "type", payload), expected, ec.ECDSA(hashes.SHA256()))
    # Moving bytes between type and payload changes the signed content.
    assert signed_content_digest("ab", b"c") != signed_content_digest("a", b"bc")


def test_signed_content_digest_ignores_signature_malleability() -> None:
    sig = sign(SK, "t", b"p")
    r, s = decode_dss_signature(sig)
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    twin = encode_dss_signature(r, n - s)
    verify(PK, "t", b"p", twin)  # (r, n - s) verifies too: never key on signature bytes
    assert twin != sig
    assert signed_content_digest("t", b"p") == signed_content_digest("t", b"p")


def test_an_empty_message_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        sign(SK, "", b"p")
    with pytest.raises(ValueError):
        signed_content_digest("", b"p")


def test_signing_with_a_key_on_another_curve_is_refused() -> None:
    with pytest.raises(TypeError):
        sign(ec.generate_private_key(ec.SECP384R1()), "t", b"p")  # type: ignore[arg-type]


def test_every_single_byte_mutation_of_a_signature_is_refused() -> None:
    sig = sign(SK, "fedseal.Envelope", b"payload bytes")
    for i in range(len(sig)):
        for mask in (0x01, 0x80, 0xFF):
            bad = sig[:i] + bytes([sig[i] ^ mask]) + sig[i + 1 :]
            with pytest.raises(SignatureError):
                verify(PK, "fedseal.Envelope", b"payload bytes", bad)
    for bad in (b"", sig[:-1], sig + b"\x00", b"\x00" * 200):
        with pytest.raises(SignatureError):
            verify(PK, "fedseal.Envelope", b"payload bytes", bad)
