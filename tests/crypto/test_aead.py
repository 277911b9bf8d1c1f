"""Behaviour and property tests for fedseal.crypto.aead."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from fedseal.crypto import DecryptionError, open_sealed, seal
from fedseal.crypto.aead import NONCE_SIZE, OVERHEAD

KEY = bytes(range(32))


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=500), st.binary(max_size=64))
def test_seal_then_open_returns_the_plaintext(key: bytes, plaintext: bytes, ad: bytes) -> None:
    sealed = seal(key, plaintext, ad)
    assert len(sealed) == len(plaintext) + OVERHEAD
    assert open_sealed(key, sealed, ad) == plaintext


def test_the_sealed_form_is_nonce_then_rfc8439_ciphertext() -> None:
    nonce = bytes(12)
    sealed = seal(KEY, b"hello", b"ad", nonce=nonce)
    assert sealed == nonce + ChaCha20Poly1305(KEY).encrypt(nonce, b"hello", b"ad")


def test_random_nonces_differ_between_seals() -> None:
    assert seal(KEY, b"x", b"")[:NONCE_SIZE] != seal(KEY, b"x", b"")[:NONCE_SIZE]


def test_a_wrong_key_or_associated_data_raises_decryption_error() -> None:
    sealed = seal(KEY, b"share bytes", b"from=a|to=b")
    with pytest.raises(DecryptionError):
        open_sealed(bytes(32), sealed, b"from=a|to=b")
    with pytest.raises(DecryptionError):
        open_sealed(KEY, sealed, b"from=a|to=c")
    for short in (b"", sealed[: OVERHEAD - 1]):
        with pytest.raises(DecryptionError):
            open_sealed(KEY, short, b"from=a|to=b")


def test_every_single_byte_mutation_of_a_sealed_message_is_refused() -> None:
    ad = b"from=a|to=b"
    sealed = seal(KEY, b"a share of a mask seed", ad)
    for i in range(len(sealed)):
        for mask in (0x01, 0x80, 0xFF):
            bad = sealed[:i] + bytes([sealed[i] ^ mask]) + sealed[i + 1 :]
            with pytest.raises(DecryptionError):
                open_sealed(KEY, bad, ad)
    for i in range(len(ad)):
        with pytest.raises(DecryptionError):
            open_sealed(KEY, sealed, ad[:i] + bytes([ad[i] ^ 1]) + ad[i + 1 :])


def test_bad_key_or_nonce_sizes_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        seal(b"short", b"x", b"")
    with pytest.raises(ValueError):
        seal(KEY, b"x", b"", nonce=b"\x00" * 11)
