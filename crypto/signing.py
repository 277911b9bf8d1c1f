"""Domain-separated ECDSA P-256/SHA-256 signatures.

Example::

    from fedseal.crypto import keys, signing

    sk = keys.generate_identity_key()
    sig = signing.sign(sk, "fedseal.MaskedInput", payload)
    signing.verify(sk.public_key(), "fedseal.MaskedInput", payload, sig)  # or SignatureError

Every signature covers the canonical bytes::

    b"fedseal/v1/sig\\x00" || u16be(len(type_utf8)) || type_utf8 || u64be(len(payload)) || payload

so a signature for one message type can never be replayed as another. Signatures are DER
encoded; the raw ECDSA verification over arbitrary bytes is private (:func:`_verify_der`), used
only by the Wycheproof known-answer tests. ECDSA signatures are malleable ((r, s) and (r, n - s)
both verify), so replay and duplicate detection must key on :func:`signed_content_digest`, never
on signature bytes.

:func:`share_verified` (off unless a caller turns it on) makes :func:`verify` remember the
verifications that *succeeded* in this process, for simulations, where many virtual sites in
one process each check the same signed messages (every site checks all N key adverts).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import SignatureError

__all__ = ["MAX_SIGNATURE_SIZE", "share_verified", "sign", "signed_content_digest", "verify"]

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


def _verify_der(public_key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> None:
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
    memo = _memo
    key = b""
    if memo is not None:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError("expected an ECDSA P-256 public key")
        key = memo.key(public_key, signed, signature)
        if memo.holds(key):
            return
    try:
        _verify_der(public_key, signed, signature)
    except SignatureError as exc:
        raise SignatureError(str(exc), message_type=message_type) from exc
    if memo is not None:
        memo.add(key)


class _VerifiedMemo:
    """SHA-256 of (public key point, signed bytes, signature) of successful verifications,
    least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        # Encoded points of recently used key objects, by id(); the key is held so that its id
        # is not reused while the entry lives.
        self._points: OrderedDict[int, tuple[ec.EllipticCurvePublicKey, bytes]] = OrderedDict()

    def _point(self, public_key: ec.EllipticCurvePublicKey) -> bytes:
        with self._lock:
            entry = self._points.get(id(public_key))
            if entry is not None and entry[0] is public_key:
                self._points.move_to_end(id(public_key))
                return entry[1]
        point = public_key.public_bytes(_X962, _UNCOMPRESSED)
        with self._lock:
            self._points[id(public_key)] = (public_key, point)
            while len(self._points) > _POINTS_CACHED:
                self._points.popitem(last=False)
        return point

    def key(self, public_key: ec.EllipticCurvePublicKey, signed: bytes, signature: bytes) -> bytes:
        point = self._point(public_key)
        h = hashlib.sha256()
        for part in (point, signed, bytes(signature)):
            h.update(struct.pack(">Q", len(part)))
            h.update(part)
        return h.digest()

    def holds(self, key: bytes) -> bool:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            return False

    def add(self, key: bytes) -> None:
        with self._lock:
            self._entries[key] = None
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


_memo: _VerifiedMemo | None = None
_POINTS_CACHED = 4096
_X962 = serialization.Encoding.X962
_UNCOMPRESSED = serialization.PublicFormat.UncompressedPoint


def share_verified(capacity: int | None = 65536) -> None:
    """Let :func:`verify` skip a check that already succeeded in this process (``None``: stop).

    For simulations only: there many virtual sites run in one process and each verifies the
    same signed messages (every site checks all N key adverts and a majority of the survivor
    signatures, so N sites do N^2 checks of N signatures). With this on, a verification that
    succeeded once, for exactly the same public key, message type, payload and signature
    bytes, is not repeated; a failure is never remembered, so a forged, substituted or
    malleated input is checked (and refused) every time, and the result of :func:`verify` is
    the same with it on or off. A deployed site is its own process and never turns it on.
    ``capacity`` bounds the memory (32 bytes per remembered verification, oldest dropped);
    calling it again with the same capacity keeps what is remembered.

    Raises:
        ValueError: ``capacity`` is not positive.
    """
    global _memo
    if capacity is None:
        _memo = None
        return
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    if _memo is None or _memo.capacity != capacity:
        _memo = _VerifiedMemo(capacity)
