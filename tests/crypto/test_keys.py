"""Behaviour tests for fedseal.crypto.keys (key ids, encodings, key files)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedseal.crypto import (
    KeyFormatError,
    generate_identity_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_der,
    public_key_to_der,
    save_private_key,
    save_public_key,
)

SK = generate_identity_key()


def _same_key(a: ec.EllipticCurvePrivateKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return a.private_numbers() == b.private_numbers()


def test_key_id_is_the_sha256_of_the_der_subject_public_key_info() -> None:
    der = SK.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_id(SK.public_key()) == hashlib.sha256(der).digest()
    assert len(key_id(SK.public_key())) == 32
    assert key_id(generate_identity_key().public_key()) != key_id(SK.public_key())


def test_a_public_key_round_trips_through_der_and_pem(tmp_path: Path) -> None:
    pk = SK.public_key()
    assert public_key_from_der(public_key_to_der(pk)) == pk
    save_public_key(pk, tmp_path / "site.pub")
    assert load_public_key(tmp_path / "site.pub") == pk


def test_der_decoding_refuses_garbage_other_curves_and_non_canonical_points() -> None:
    der = public_key_to_der(SK.public_key())
    with pytest.raises(KeyFormatError):
        public_key_from_der(der[:-1])
    with pytest.raises(KeyFormatError):
        public_key_from_der(der + b"\x00")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(KeyFormatError):
        public_key_from_der(
            p384.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    canonical = SK.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    point = SK.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    # Same key with a compressed point inside the SubjectPublicKeyInfo: a second encoding of one key.
    prefix = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    assert canonical != prefix + point
    with pytest.raises(KeyFormatError):
        public_key_from_der(prefix + point)


def test_a_key_decoded_again_comes_from_the_cache_and_refusals_are_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedseal.crypto import keys

    monkeypatch.setattr(keys, "DECODED_KEYS_CACHED", 3)
    monkeypatch.setattr(keys, "_decoded", type(keys._decoded)())
    der = public_key_to_der(SK.public_key())
    first = public_key_from_der(der)
    assert public_key_from_der(bytearray(der)) is first  # same DER, same immutable key object
    assert public_key_to_der(first) == der
    prefix = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    compressed = prefix + SK.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    for _ in range(2):  # refused every time: a refusal is never remembered
        with pytest.raises(KeyFormatError):
            public_key_from_der(compressed)
    others = [public_key_to_der(generate_identity_key().public_key()) for _ in range(3)]
    decoded = [public_key_from_der(d) for d in others]
    assert len(keys._decoded) == 3 and der not in keys._decoded  # bounded, oldest dropped
    again = public_key_from_der(der)
    assert again is not first and public_key_to_der(again) == der
    assert [public_key_to_der(k) for k in decoded] == others


def test_a_private_key_file_is_written_with_mode_0600_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    save_private_key(SK, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    assert _same_key(load_private_key(path), SK)


def test_saving_over_a_world_readable_file_leaves_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    save_private_key(SK, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _same_key(load_private_key(path), SK)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o601])
def test_a_private_key_file_accessible_by_group_or_others_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "site.key"
    save_private_key(SK, path)
    os.chmod(path, mode)
    with pytest.raises(KeyFormatError) as exc:
        load_private_key(path)
    assert exc.value.path == str(path)
    assert "BEGIN" not in str(exc.value)


def test_a_passphrase_protected_key_round_trips_and_is_encrypted_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    save_private_key(SK, path, passphrase=b"correct horse")
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert _same_key(load_private_key(path, passphrase=b"correct horse"), SK)


def test_a_wrong_or_missing_passphrase_raises_key_format_error(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    save_private_key(SK, path, passphrase=b"correct horse")
    with pytest.raises(KeyFormatError):
        load_private_key(path, passphrase=b"battery staple")
    with pytest.raises(KeyFormatError):
        load_private_key(path)
    plain = tmp_path / "plain.key"
    save_private_key(SK, plain)
    with pytest.raises(KeyFormatError):
        load_private_key(plain, passphrase=b"unexpected")


def test_an_empty_passphrase_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_private_key(SK, tmp_path / "k", passphrase=b"")


def test_a_key_file_of_another_algorithm_or_garbage_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "ed.key"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    with pytest.raises(KeyFormatError):
        load_private_key(other)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(KeyFormatError):
        load_private_key(garbage)
    pub = tmp_path / "garbage.pub"
    pub.write_bytes(b"not a key")
    with pytest.raises(KeyFormatError):
        load_public_key(pub)
