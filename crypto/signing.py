"""Domain-separated ECDSA P-256/SHA-256 signatures.

Example::

    from fedseal.crypto import keys, signing

    sk = keys.generate_identity_key()
    sig = signing.sign(sk, "fedseal.MaskedInput", payload)
    signing.verify(sk.public_key(), "fedseal.MaskedInput", payload, sig)  # or SignatureError

Every signature covers the canonical bytes::

    b"fedseal/v1/sig\\x00" || u16be(len(type_utf8)) || type_utf8 || u64be(len(payload)) || payload

so a signature for one message type can never be replayed as another. Signatures are DER
encoded; the raw ECDSA verification over arbitrary bytes is private (:func:`verify_der`), used
only by the Wycheproof known-answer tests. ECDSA signatures are malleable ((r, s) and (r, n - s)
both verify), so replay and duplicate detection must key on :func:`signed_content_digest`, never
on signature bytes.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import SignatureError

__all__ = ["MAX_SIGNATURE_SIZE", "sign", "signed_content_digest", "verify"]

_TAG = b"fedseal/v1/sig\x00"
MAX_SIGNATURE_SIZE = 72
"""Largest DER ECDSA P-256 signature: SEQUENCE of two INTEGERs of at most 33 bytes."""

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _signed_bytes(message_type: str, payload: bytes) -> bytes:
    type_utf8 = message_type.encode("utf-8")
    if not type_utf8 or len(type_utf8) > 0xFFFF:
        raise ValueError("message_type must be 1..65535 UTF-8 bytes")
    return b"".join(
        (
            _TAG,
            struct.pack(">H", len(type_utf8)),
            type_utf8,
            struct.pack(">Q", len(payload)),
            payload,
        )
    )


def signed_content_digest(message_type: str, payload: bytes) -> bytes:
    """Return SHA-256 of the domain-separated bytes that :func:`sign` signs.

    Use it to detect replays and duplicates (never the signature bytes: ECDSA is malleable).

    Raises:
        ValueError: If ``message_type`` is empty or longer than 65535 UTF-8 bytes.
    """
    return hashlib.sha256(_signed_bytes(message_type, payload)).digest()


def sign(private_key: ec.EllipticCurvePrivateKey, message_type: str, payload: bytes) -> bytes:
    """Sign ``payload`` as a message of type ``message_type``; returns a DER signature.

    Raises:
        TypeError: If ``private_key`` is not a P-256 private key.
        ValueError: If ``message_type`` is empty or longer than 65535 UTF-8 bytes.
    """
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
        private_key.curve, ec.SECP256R1
    ):
        raise TypeError("expected an ECDSA P-256 private key")
    return private_key.sign(_signed_bytes(message_type, payload), _ECDSA_SHA256)


def verify_der(public_key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> None:
    """Verify a DER ECDSA P-256/SHA-256 signature over raw ``message`` bytes (no domain tag).

    Raises:
        SignatureError: If the signature is malformed, non-canonical or does not verify.
    """
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise TypeError("expected an ECDSA P-256 public key")
    if not 8 <= len(signature) <= MAX_SIGNATURE_SIZE:
        raise SignatureError("signature has an impossible length")
    try:
        public_key.verify(bytes(signature), message, _ECDSA_SHA256)
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify") from exc
    except ValueError as exc:  # defensive: malformed encodings surface as InvalidSignature
        raise SignatureError("malformed signature") from exc


def verify(
    public_key: ec.EllipticCurvePublicKey, message_type: str, payload: bytes, signature: bytes
) -> None:
    """Verify a signature made by :func:`sign`; returns ``None`` or raises.

    Raises:
        SignatureError: If the signature is malformed or does not verify for this public key,
            message type and payload.
        TypeError: If ``public_key`` is not a P-256 public key.
        ValueError: If ``message_type`` is empty or longer than 65535 UTF-8 bytes.
    """
    signed = _signed_bytes(message_type, payload)
    try:
        verify_der(public_key, signed, signature)
    except SignatureError as exc:
        raise SignatureError(str(exc), message_type=message_type) from exc

