"""The fedseal.crypto exception tree.

Every failure caused by untrusted input (a peer's key, signature, ciphertext, share or proof)
raises a subclass of :class:`CryptoError`; programming mistakes (a threshold larger than the
number of shares, an empty HKDF ``info``) raise ``ValueError``/``TypeError`` instead.
Messages and fields never contain key, seed or share material::

    CryptoError
    ├── KeyFormatError        bad or unsafe key file / encoding
    ├── SignatureError        signature does not verify or is malformed
    ├── AgreementError        invalid peer public key, ECDH failure
    ├── DecryptionError       AEAD open failed (wrong key, tampered ciphertext or associated data)
    ├── ShareError            Shamir: duplicate/missing/out-of-range/inconsistent shares
    └── MerkleProofError      proof does not verify
        ├── ProofLengthError  proof has the wrong number of hashes
        ├── RootMismatchError recomputed root differs from the expected root
        └── HashSizeError     a leaf hash or proof hash is not 32 bytes
"""

from __future__ import annotations

__all__ = [
    "AgreementError",
    "CryptoError",
    "DecryptionError",
    "HashSizeError",
    "KeyFormatError",
    "MerkleProofError",
    "ProofLengthError",
    "RootMismatchError",
    "ShareError",
    "SignatureError",
]


class CryptoError(Exception):
    """Base class of every error raised by fedseal.crypto for untrusted input."""


class KeyFormatError(CryptoError):
    """A key file or key encoding is malformed, of the wrong type, or stored unsafely.

    Attributes:
        path: The offending file, if the key came from a file.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message if path is None else f"{message} ({path})")
        self.path = path


class SignatureError(CryptoError):
    """A signature is malformed or does not verify.

    Attributes:
        message_type: The message type that was being verified, if known.
    """

    def __init__(self, message: str, *, message_type: str | None = None) -> None:
        super().__init__(message if message_type is None else f"{message} [{message_type}]")
        self.message_type = message_type


class AgreementError(CryptoError):
    """A peer's key-agreement public key is invalid, or ECDH failed."""


class DecryptionError(CryptoError):
    """AEAD opening failed: wrong key, or tampered ciphertext, tag, nonce or associated data."""


class ShareError(CryptoError):
    """A set of Shamir shares cannot be (safely) combined, or a share encoding is invalid.

    Attributes:
        reason: A short machine-readable reason, e.g. ``"duplicate-index"``,
            ``"too-few-shares"``, ``"out-of-range"``, ``"inconsistent"``, ``"encoding"``.
        index: The share index concerned, where a single share is at fault.
    """

    def __init__(self, message: str, *, reason: str, index: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index


class MerkleProofError(CryptoError):
    """A Merkle inclusion or consistency proof does not verify (RFC 9162 §2.1.3, §2.1.4)."""


class ProofLengthError(MerkleProofError):
    """The proof holds the wrong number of hashes for the claimed index and tree sizes.

    Attributes:
        got: Number of hashes in the proof.
        want: Number of hashes the proof must have.
    """

    def __init__(self, got: int, want: int) -> None:
        super().__init__(f"wrong proof length {got}, want {want}")
        self.got = got
        self.want = want


class RootMismatchError(MerkleProofError):
    """The root recomputed from the proof differs from the expected root.

    Attributes:
        which: Which root mismatched (``"root"``, ``"old_root"``, ``"new_root"``).
    """

    def __init__(self, which: str = "root") -> None:
        super().__init__(f"recomputed {which} does not match the expected {which}")
        self.which = which


class HashSizeError(MerkleProofError):
    """A leaf hash or proof hash has the wrong size.

    Attributes:
        what: Which input had the wrong size.
        got: Its size in bytes.
        want: The required size in bytes.
    """

    def __init__(self, what: str, got: int, want: int = 32) -> None:
        super().__init__(f"{what} has {got} bytes, want {want}")
        self.what = what
        self.got = got
        self.want = want
