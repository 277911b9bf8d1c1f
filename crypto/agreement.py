"""Ephemeral P-256 ECDH key agreement and HKDF-SHA256 (RFC 5869) with mandatory context.

Example::

    from fedseal.crypto.agreement import AgreementKey, derive_shared_key, kdf_info

    a, b = AgreementKey.generate(), AgreementKey.generate()
    info = kdf_info("pairwise-mask-seed", run_id, round_no.to_bytes(8, "big"), id_a, id_b)
    k_ab = derive_shared_key(a, b.public_bytes(), info=info)
    assert k_ab == derive_shared_key(b, a.public_bytes(), info=info)

Peer public keys travel as 65-byte uncompressed SEC 1 points; anything else, and any point not
on P-256, raises :class:`AgreementError`. HKDF always takes a non-empty ``info`` that names the
purpose, run, round and both parties (build it with :func:`kdf_info`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AgreementError, KeyFormatError

__all__ = [
    "POINT_SIZE",
    "SCALAR_SIZE",
    "AgreementKey",
    "derive_shared_key",
    "hkdf_sha256",
    "kdf_info",
]

POINT_SIZE = 65
"""Size of an uncompressed SEC 1 P-256 point (0x04 || x || y)."""
SCALAR_SIZE = 32
"""Size of a P-256 private scalar."""

# Order of the P-256 group (SEC 2 / FIPS 186-4 D.1.2.3).
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_KDF_TAG = b"fedseal/v1/kdf\x00"
_MAX_HKDF_LENGTH = 255 * 32


@dataclass(frozen=True, slots=True, eq=False)
class AgreementKey:
    """An ephemeral P-256 key-agreement key pair (never used for signatures).

    Compared by identity; compare :meth:`public_bytes` to compare keys.

    The raw ECDH secret with each peer point is computed once per key object and kept with
    it (a SecAgg site derives two directional keys from one agreement: the share pairs it
    encrypts to a neighbour and the ones it decrypts from that neighbour); the secrets live
    exactly as long as the private key they come from.
    """

    _private: ec.EllipticCurvePrivateKey = field(repr=False)
    _secrets: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(cls, randbytes: Callable[[int], bytes] = os.urandom) -> AgreementKey:
        """Generate a fresh key from ``randbytes`` (rejection sampling of the scalar)."""
        while True:
            raw = randbytes(SCALAR_SIZE)
            if len(raw) != SCALAR_SIZE:
                raise ValueError("randbytes returned the wrong number of bytes")
            value = int.from_bytes(raw, "big")
            if 0 < value < _P256_ORDER:
                return cls(ec.derive_private_key(value, ec.SECP256R1()))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> AgreementKey:
        """Rebuild a key from its 32-byte big-endian scalar (e.g. after Shamir reconstruction).

        Raises:
            KeyFormatError: If ``data`` is not 32 bytes or not a scalar in ``[1, n - 1]``.
        """
        if len(data) != SCALAR_SIZE:
            raise KeyFormatError(f"agreement private key must be {SCALAR_SIZE} bytes")
        value = int.from_bytes(data, "big")
        if not 0 < value < _P256_ORDER:
            raise KeyFormatError("agreement private key is not a valid P-256 scalar")
        return cls(ec.derive_private_key(value, ec.SECP256R1()))

    def public_bytes(self) -> bytes:
        """Return the public key as a 65-byte uncompressed SEC 1 point."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def private_bytes(self) -> bytes:
        """Return the 32-byte big-endian private scalar (to Shamir-share it)."""
        return self._private.private_numbers().private_value.to_bytes(SCALAR_SIZE, "big")

    def _exchange(self, peer_public: bytes) -> bytes:
        """Raw ECDH shared secret (x coordinate) with a 65-byte uncompressed peer point.

        Raises:
            AgreementError: If the peer point is malformed or not on P-256.
        """
        peer_public = bytes(peer_public)
        secret = self._secrets.get(peer_public)
        if secret is not None:
            return secret
        peer = peer_point(peer_public)
        try:
            secret = self._private.exchange(ec.ECDH(), peer)
        except ValueError as exc:
            raise AgreementError("ECDH failed") from exc
        self._secrets[peer_public] = secret
        return secret


def peer_point(peer_public: bytes) -> ec.EllipticCurvePublicKey:
    """A peer's 65-byte uncompressed P-256 point as a public key, checked to be on the curve.

    Raises:
        AgreementError: If it is not a 65-byte uncompressed point on P-256.
    """
    if len(peer_public) != POINT_SIZE or peer_public[0] != 0x04:
        raise AgreementError(f"peer public key must be a {POINT_SIZE}-byte uncompressed point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(peer_public))
    except ValueError as exc:
        raise AgreementError("peer public key is not a point on P-256") from exc


def hkdf_sha256_raw(ikm: bytes, info: bytes, length: int, salt: bytes | None) -> bytes:
    """HKDF-SHA256 (RFC 5869) without the non-empty ``info`` rule of :func:`hkdf_sha256`.

    For test vectors (Wycheproof has empty ``info`` cases); product code calls
    :func:`hkdf_sha256`.

    Raises:
        ValueError: If ``length`` is not in ``[1, 8160]``.
    """
    if not 0 < length <= _MAX_HKDF_LENGTH:
        raise ValueError(f"HKDF-SHA256 length must be in [1, {_MAX_HKDF_LENGTH}]")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hkdf_sha256(ikm: bytes, *, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869) with a mandatory, non-empty context ``info``.

    Raises:
        ValueError: If ``info`` is empty or ``length`` is not in ``[1, 8160]``.
    """
    if not info:
        raise ValueError("HKDF info must be non-empty: name purpose, run, round and parties")
    return hkdf_sha256_raw(ikm, info, length, salt)


def kdf_info(purpose: str, *parts: bytes) -> bytes:
    """Build an unambiguous HKDF ``info``: tag, then each field length-prefixed.

    ``b"fedseal/v1/kdf\\x00" || u16be(len(purpose)) || purpose || (u32be(len(p)) || p)...``

    Raises:
        ValueError: If ``purpose`` is empty or longer than 65535 UTF-8 bytes, or a part is
            4 GiB or longer.
    """
    purpose_utf8 = purpose.encode("utf-8")
    if not purpose_utf8 or len(purpose_utf8) > 0xFFFF:
        raise ValueError("purpose must be 1..65535 UTF-8 bytes")
    out = [_KDF_TAG, struct.pack(">H", len(purpose_utf8)), purpose_utf8]
    for part in parts:
        if len(part) > 0xFFFFFFFF:
            raise ValueError("kdf_info part too long")
        out.append(struct.pack(">I", len(part)))
        out.append(bytes(part))
    return b"".join(out)


def derive_shared_key(
    own: AgreementKey, peer_public: bytes, *, info: bytes, length: int = 32
) -> bytes:
    """ECDH with a peer's public point, then HKDF-SHA256 (no salt) with ``info``.

    Raises:
        AgreementError: If ``peer_public`` is not a valid uncompressed P-256 point.
        ValueError: If ``info`` is empty or ``length`` is out of range.
    """
    if not info:
        raise ValueError("HKDF info must be non-empty: name purpose, run, round and parties")
    return hkdf_sha256_raw(own._exchange(peer_public), info, length, None)
