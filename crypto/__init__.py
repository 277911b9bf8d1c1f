"""fedseal.crypto: pure cryptographic primitives over bytes and numpy arrays.

Example::

    import numpy as np
    from fedseal.crypto import (
        AgreementKey, derive_shared_key, kdf_info, generate_identity_key, sign, verify,
        seal, open_sealed, shamir, prg, merkle,
    )

    sk = generate_identity_key()
    sig = sign(sk, "fedseal.Example", b"payload")
    verify(sk.public_key(), "fedseal.Example", b"payload", sig)        # None, or SignatureError

    a, b = AgreementKey.generate(), AgreementKey.generate()
    key = derive_shared_key(a, b.public_bytes(), info=kdf_info("example", b"run", b"a", b"b"))
    box = seal(key, b"secret", b"a->b")
    assert open_sealed(key, box, b"a->b") == b"secret"                 # or DecryptionError

    shares = shamir.split(key, threshold=2, num_shares=3)
    assert shamir.combine(shares[1:], threshold=2, secret_length=32) == key

    acc = np.zeros(8, dtype=np.uint32)
    prg.add_mask_into(acc, key, domain=b"example-mask")                # acc += PRG(key)

    head = merkle.root([b"e0", b"e1", b"e2"])
    merkle.verify_inclusion(merkle.leaf_hash(b"e1"), 1, 3,
                            merkle.inclusion_proof([b"e0", b"e1", b"e2"], 1), head)

Modules: :mod:`.keys` (ECDSA P-256 identities and key files), :mod:`.signing` (domain-separated
signatures), :mod:`.agreement` (P-256 ECDH + HKDF-SHA256), :mod:`.aead` (ChaCha20-Poly1305),
:mod:`.shamir` (t-of-n sharing over GF(2**31 - 1)), :mod:`.prg` (AES-256-CTR mask PRG),
:mod:`.merkle` (RFC 6962/9162 trees and proofs), :mod:`.errors` (the exception tree, rooted at
:class:`CryptoError`). Only stdlib, ``cryptography`` and ``numpy`` are imported.
"""

from . import aead, agreement, keys, merkle, prg, shamir, signing
from .aead import open_sealed, seal
from .agreement import AgreementKey, derive_shared_key, hkdf_sha256, kdf_info
from .errors import (
    AgreementError,
    CryptoError,
    DecryptionError,
    HashSizeError,
    KeyFormatError,
    MerkleProofError,
    ProofLengthError,
    RootMismatchError,
    ShareError,
    SignatureError,
)
from .keys import (
    KeyId,
    generate_identity_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_der,
    public_key_to_der,
    save_private_key,
    save_public_key,
)
from .shamir import Share
from .signing import sign, signed_content_digest, verify

__all__ = [
    "AgreementError",
    "AgreementKey",
    "CryptoError",
    "DecryptionError",
    "HashSizeError",
    "KeyFormatError",
    "KeyId",
    "MerkleProofError",
    "ProofLengthError",
    "RootMismatchError",
    "Share",
    "ShareError",
    "SignatureError",
    "aead",
    "agreement",
    "derive_shared_key",
    "generate_identity_key",
    "hkdf_sha256",
    "kdf_info",
    "key_id",
    "keys",
    "load_private_key",
    "load_public_key",
    "merkle",
    "open_sealed",
    "prg",
    "public_key_from_der",
    "public_key_to_der",
    "save_private_key",
    "save_public_key",
    "seal",
    "shamir",
    "sign",
    "signed_content_digest",
    "signing",
    "verify",
]
