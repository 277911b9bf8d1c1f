"""ECDSA P-256 identity keys: generation, key ids, DER/PEM encodings and key files.

Example::

    from fedseal.crypto import keys

    sk = keys.generate_identity_key()
    keys.save_private_key(sk, "site.key", passphrase=b"correct horse")  # mode 0600
    sk2 = keys.load_private_key("site.key", passphrase=b"correct horse")
    kid = keys.key_id(sk2.public_key())  # SHA-256 of the DER SubjectPublicKeyInfo

Private key files are PEM PKCS#8 (encrypted with the best available scheme when a passphrase
is given), written atomically with mode 0600; a private key file that is readable or writable
by group or others is refused on load, as ssh does.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NewType

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import KeyFormatError

__all__ = [
    "KeyId",
    "generate_identity_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_from_der",
    "public_key_to_der",
    "save_private_key",
    "save_public_key",
]

KeyId = NewType("KeyId", bytes)
"""32-byte SHA-256 of a public key's DER SubjectPublicKeyInfo."""

_MAX_KEY_FILE = 64 * 1024
_UNSAFE_MODE_BITS = stat.S_IRWXG | stat.S_IRWXO


def _require_p256_private(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("expected an ECDSA P-256 private key")
    return key


def _require_p256_public(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("expected an ECDSA P-256 public key")
    return key


def generate_identity_key() -> ec.EllipticCurvePrivateKey:
    """Generate a new ECDSA P-256 identity key (from the operating system's CSPRNG)."""
    return ec.generate_private_key(ec.SECP256R1())


def public_key_to_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Return the DER SubjectPublicKeyInfo encoding of a P-256 public key.

    Raises:
        TypeError: If ``public_key`` is not a P-256 public key.
    """
    return _require_p256_public(public_key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: ec.EllipticCurvePublicKey) -> KeyId:
    """Return the key id: SHA-256 of the DER SubjectPublicKeyInfo (32 bytes)."""
    return KeyId(hashlib.sha256(public_key_to_der(public_key)).digest())


def _checked_public(key: object, source: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFormatError(f"{source} is not an ECDSA P-256 public key")
    return key


#: Keys decoded by :func:`public_key_from_der`, by their DER, least recently used dropped first:
#: a site decodes the same cohort identity keys every round.
DECODED_KEYS_CACHED = 4096
_decoded: OrderedDict[bytes, ec.EllipticCurvePublicKey] = OrderedDict()
_decoded_lock = threading.Lock()


def public_key_from_der(data: bytes) -> ec.EllipticCurvePublicKey:
    """Decode a DER SubjectPublicKeyInfo holding a P-256 public key.

    A key decoded before is returned from a bounded cache (the same DER always decodes to the
    same immutable key; encodings that were refused are never cached, so they are refused again).

    Raises:
        KeyFormatError: If the encoding is malformed, trailing bytes follow it, the point is not
            on the curve, or the key is not a P-256 key.
    """
    der = bytes(data)
    with _decoded_lock:
        cached = _decoded.get(der)
        if cached is not None:
            _decoded.move_to_end(der)
            return cached
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError("malformed DER public key") from exc
    checked = _checked_public(key, "DER key")
    if public_key_to_der(checked) != der:
        # Only the canonical encoding (uncompressed point, named curve) is accepted, so a key id
        # has exactly one preimage.
        raise KeyFormatError("public key is not in canonical DER form")
    with _decoded_lock:
        _decoded[der] = checked
        while len(_decoded) > DECODED_KEYS_CACHED:
            _decoded.popitem(last=False)
    return checked


def save_public_key(public_key: ec.EllipticCurvePublicKey, path: str | os.PathLike[str]) -> None:
    """Write a P-256 public key as PEM SubjectPublicKeyInfo (atomically, mode 0644).

    Raises:
        TypeError: If ``public_key`` is not a P-256 public key.
        OSError: If the file cannot be written.
    """
    pem = _require_p256_public(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomic(Path(path), pem, 0o644)


def load_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Read a PEM SubjectPublicKeyInfo P-256 public key.

    Raises:
        KeyFormatError: If the file is too large, malformed, or not a P-256 public key.
        OSError: If the file cannot be read.
    """
    p = Path(path)
    with open(p, "rb") as fh:
        data = fh.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFormatError("public key file is too large", path=str(p))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError("malformed PEM public key", path=str(p)) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFormatError("not an ECDSA P-256 public key", path=str(p))
    return key


def save_private_key(
    key: ec.EllipticCurvePrivateKey,
    path: str | os.PathLike[str],
    passphrase: bytes | None = None,
) -> None:
    """Write a P-256 private key as PEM PKCS#8, mode 0600, atomically.

    Args:
        key: The identity key.
        path: Destination; an existing file is replaced.
        passphrase: If given (non-empty), the PEM is encrypted with it.

    Raises:
        TypeError: If ``key`` is not a P-256 private key.
        ValueError: If ``passphrase`` is empty (use ``None`` for an unencrypted file).
        OSError: If the file cannot be written.
    """
    if passphrase is not None and not passphrase:
        raise ValueError("passphrase must be non-empty or None")
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    pem = _require_p256_private(key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_atomic(Path(path), pem, 0o600)


def load_private_key(
    path: str | os.PathLike[str], passphrase: bytes | None = None
) -> ec.EllipticCurvePrivateKey:
    """Read a PEM P-256 private key, refusing files that group or others can access.

    Raises:
        KeyFormatError: If the file's mode grants any access to group or others, it is too
            large, malformed, encrypted and no (or a wrong) passphrase is given, a passphrase is
            given for an unencrypted file, or the key is not a P-256 key.
        OSError: If the file cannot be read.
    """
    p = Path(path)
    with open(p, "rb") as fh:
        # fstat of the open file, not stat of the path: check the mode of the file actually read.
        mode = os.fstat(fh.fileno()).st_mode
        if os.name == "posix" and mode & _UNSAFE_MODE_BITS:
            raise KeyFormatError(
                f"private key file has mode {stat.S_IMODE(mode):04o}; "
                "it must not be accessible by group or others (chmod 600)",
                path=str(p),
            )
        data = fh.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFormatError("private key file is too large", path=str(p))
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        # cryptography raises TypeError for "password given but not encrypted" and vice versa.
        raise KeyFormatError(
            "private key encryption does not match the passphrase given", path=str(p)
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError("malformed private key or wrong passphrase", path=str(p)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFormatError("not an ECDSA P-256 private key", path=str(p))
    return key


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file of ``mode`` beside it,
    fsync, rename, fsync of the directory (a crash leaves the old file or the new one).

    Raises:
        OSError: If it cannot be written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
