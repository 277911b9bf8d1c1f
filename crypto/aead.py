"""ChaCha20-Poly1305 authenticated encryption (RFC 8439) with associated data.

Example::

    from fedseal.crypto import aead

    sealed = aead.seal(key, share_bytes, associated_data=b"run|round|from|to")
    share_bytes = aead.open_sealed(key, sealed, b"run|round|from|to")  # or DecryptionError

The sealed form is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``. Associated data should
bind sender and recipient (and run/round), so a ciphertext cannot be re-targeted.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import DecryptionError

__all__ = ["KEY_SIZE", "NONCE_SIZE", "OVERHEAD", "TAG_SIZE", "open_sealed", "seal"]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
"""Bytes a sealed message has beyond its plaintext."""


def _cipher(key: bytes) -> ChaCha20Poly1305:
    if len(key) != KEY_SIZE:
        raise ValueError(f"AEAD key must be {KEY_SIZE} bytes")
    return ChaCha20Poly1305(bytes(key))


def seal(
    key: bytes, plaintext: bytes, associated_data: bytes, *, nonce: bytes | None = None
) -> bytes:
    """Encrypt and authenticate ``plaintext``, authenticating ``associated_data`` too.

    Args:
        key: 32-byte key (e.g. from :func:`fedseal.crypto.agreement.derive_shared_key`).
        plaintext: Data to encrypt.
        associated_data: Data authenticated but not encrypted; must be given again to open.
        nonce: 12-byte nonce; a fresh random one (``os.urandom``) when ``None``. Never reuse a
            nonce with the same key.

    Returns:
        ``nonce || ciphertext || tag``.

    Raises:
        ValueError: If the key or nonce has the wrong size.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return bytes(nonce) + _cipher(key).encrypt(bytes(nonce), plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Decrypt and verify the output of :func:`seal`.

    Raises:
        DecryptionError: If ``sealed`` is too short, or the key, nonce, ciphertext, tag or
            associated data differ from those used to seal.
        ValueError: If the key has the wrong size.
    """
    cipher = _cipher(key)
    if len(sealed) < OVERHEAD:
        raise DecryptionError(f"sealed message shorter than {OVERHEAD} bytes")
    sealed = bytes(sealed)
    try:
        return cipher.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated_data)
    except InvalidTag as exc:
        raise DecryptionError("authentication failed: wrong key or tampered data") from exc
