"""Mask and share-encryption derivations (DESIGN.md §5 steps 2, 3 and 5).

* Self mask of site ``i``: ``PRG(b_i, domain=SELF_DOMAIN)`` with a fresh 32-byte seed
  ``b_i``; the site commits to ``b_i`` in its signed key advert with
  :func:`seed_commitment` so the coordinator can detect a wrong reconstruction.
* Pairwise mask of neighbours ``i, j``: ``PRG(s_ij, domain=PAIR_DOMAIN)`` where
  ``s_ij = HKDF(ECDH(mask key i, mask key j), info=(purpose, run, round, lo, hi))`` and
  ``lo < hi`` are the two site ids in canonical order. The lower site adds it, the higher
  subtracts it, so the pair cancels in the sum.
* Share encryption: ChaCha20-Poly1305 under
  ``HKDF(ECDH(share key sender, share key recipient), info=(purpose, run, round, sender,
  recipient))`` with associated data binding run, round, setup digest, sender, recipient.
* A site's masked input (:func:`encode_masked`): quantize, add the self mask and every pairwise
  mask, and hash, fused chunk by chunk (``fedseal.protocol.quantize.CHUNK`` elements) so each
  piece of the 4-bytes-per-parameter vector is produced, masked and hashed while in cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedseal.crypto.aead import open_sealed, seal
from fedseal.crypto.agreement import AgreementKey, derive_shared_key, kdf_info
from fedseal.crypto.prg import Mask, MaskSum

from .config import Limits, QuantizationConfig
from .encoding import Reader, Writer
from .quantize import CHUNK, Quantizer, UIntVector, vector_dtype
from .types import RUN_ID_BYTES, SiteId, site_sort_key

__all__ = [
    "PAIR_DOMAIN",
    "SEED_BYTES",
    "SELF_DOMAIN",
    "MaskedEncoding",
    "decode_share_pair",
    "decrypt_share_pair",
    "encode_masked",
    "encode_share_pair",
    "encrypt_share_pair",
    "pair_sign_negative",
    "pairwise_seed",
    "seed_commitment",
]

SEED_BYTES = 32
SELF_DOMAIN = b"fedseal/v1/mask/self"
PAIR_DOMAIN = b"fedseal/v1/mask/pair"
NONCE_BYTES = 12


def _round_bytes(round: int) -> bytes:
    return round.to_bytes(4, "big")


def seed_commitment(run_id: bytes, round: int, site: SiteId, seed: bytes) -> bytes:
    """SHA-256 commitment to a site's self-mask seed, bound to run, round and site."""
    w = Writer().raw(b"fedseal/v1/seed-commitment\x00").fixed(run_id, RUN_ID_BYTES)
    w.u32(round).text(site).blob(seed)
    return hashlib.sha256(w.to_bytes()).digest()


def pair_sign_negative(own: SiteId, peer: SiteId) -> bool:
    """Whether ``own`` *subtracts* the pairwise mask it shares with ``peer``."""
    return site_sort_key(own) > site_sort_key(peer)


def pairwise_seed(
    own_mask_key: AgreementKey,
    peer_mask_public: bytes,
    run_id: bytes,
    round: int,
    a: SiteId,
    b: SiteId,
) -> bytes:
    """The 32-byte pairwise mask seed ``s_ab`` (symmetric in ``a`` and ``b``).

    Raises:
        fedseal.crypto.errors.AgreementError: If the peer point is invalid.
    """
    lo, hi = sorted((a, b), key=site_sort_key)
    info = kdf_info(
        "fedseal/v1/pairwise-mask", run_id, _round_bytes(round), lo.encode(), hi.encode()
    )
    seed: bytes = derive_shared_key(own_mask_key, peer_mask_public, info=info)
    return seed


def _share_key(
    own_share_key: AgreementKey,
    peer_share_public: bytes,
    run_id: bytes,
    round: int,
    sender: SiteId,
    recipient: SiteId,
) -> bytes:
    info = kdf_info(
        "fedseal/v1/share-encryption",
        run_id,
        _round_bytes(round),
        sender.encode(),
        recipient.encode(),
    )
    key: bytes = derive_shared_key(own_share_key, peer_share_public, info=info)
    return key


def _share_ad(
    run_id: bytes, round: int, setup_digest: bytes, sender: SiteId, recipient: SiteId
) -> bytes:
    w = Writer().raw(b"fedseal/v1/share-ad\x00").fixed(run_id, RUN_ID_BYTES).u32(round)
    return w.blob(setup_digest).text(sender).text(recipient).to_bytes()


def encode_share_pair(seed_share: bytes, key_share: bytes) -> bytes:
    """Canonical plaintext of an encrypted share pair."""
    return Writer().blob(seed_share).blob(key_share).to_bytes()


def decode_share_pair(data: bytes, limits: Limits) -> tuple[bytes, bytes]:
    """Inverse of :func:`encode_share_pair`.

    Raises:
        DecodeError: Malformed or over ``limits.max_share_bytes``.
    """
    r = Reader(data, what="share pair")
    seed_share = r.blob(limits.max_share_bytes)
    key_share = r.blob(limits.max_share_bytes)
    r.finish()
    return seed_share, key_share


def encrypt_share_pair(
    plaintext: bytes,
    *,
    own_share_key: AgreementKey,
    peer_share_public: bytes,
    run_id: bytes,
    round: int,
    setup_digest: bytes,
    sender: SiteId,
    recipient: SiteId,
    randbytes: Callable[[int], bytes],
) -> bytes:
    """Encrypt a share pair from ``sender`` to ``recipient``.

    Raises:
        fedseal.crypto.errors.AgreementError: If the recipient's advertised key is invalid.
    """
    key = _share_key(own_share_key, peer_share_public, run_id, round, sender, recipient)
    ad = _share_ad(run_id, round, setup_digest, sender, recipient)
    sealed: bytes = seal(key, plaintext, ad, nonce=randbytes(NONCE_BYTES))
    return sealed


def decrypt_share_pair(
    ciphertext: bytes,
    *,
    own_share_key: AgreementKey,
    peer_share_public: bytes,
    run_id: bytes,
    round: int,
    setup_digest: bytes,
    sender: SiteId,
    recipient: SiteId,
) -> bytes:
    """Decrypt a share pair addressed to ``recipient``.

    Raises:
        fedseal.crypto.errors.AgreementError: If the sender's advertised key is invalid.
        fedseal.crypto.errors.DecryptionError: If the ciphertext or its binding was altered.
    """
    key = _share_key(own_share_key, peer_share_public, run_id, round, sender, recipient)
    ad = _share_ad(run_id, round, setup_digest, sender, recipient)
    plaintext: bytes = open_sealed(key, ciphertext, ad)
    return plaintext


@dataclass(frozen=True, slots=True)
class MaskedEncoding:
    """A site's masked input vector, ready to send.

    Attributes:
        vector: ``quantize(update) + self mask +- pairwise masks`` modulo ``2^b``.
        clipped: Elements of the update outside ``[-clip, clip]``.
        digest: SHA-256 of ``vector``'s little-endian bytes (the signed bulk digest).
    """

    vector: UIntVector = field(repr=False)
    clipped: int
    digest: bytes


def encode_masked(
    update: npt.NDArray[np.floating[Any]],
    weight: int,
    config: QuantizationConfig,
    rng: np.random.Generator,
    masks: Sequence[Mask],
) -> MaskedEncoding:
    """Quantize ``update``, add ``masks`` and hash the result, in one chunked pass.

    Bit for bit ``v = quantize(update, weight, config, rng).vector``, then
    ``add_mask_into(v, m.seed, domain=m.domain, negate=m.negate)`` for each mask, then
    ``SHA-256(v)``, with the same generator consumption as :func:`quantize`.

    Args:
        update: 1-D float vector.
        weight: Example count, ``>= 1``.
        config: Clip / levels / modulus.
        rng: Source of the rounding noise.
        masks: The self mask and the pairwise masks (with their signs).

    Returns:
        The masked vector, the clipped-element count and the vector's SHA-256.

    Raises:
        ValueError: If the update is not 1-D or contains NaN/inf, weight < 1, or a mask seed
            is not 32 bytes (local input, not a peer's).
    """
    if update.ndim != 1:
        raise ValueError(f"update must be 1-D, got shape {update.shape}")
    dtype = vector_dtype(config.modulus_bits)
    encoder = Quantizer(weight, config, rng)
    streams = MaskSum(dtype, masks)
    vector: UIntVector = np.empty(update.shape[0], dtype=dtype)
    digest = hashlib.sha256()
    for start in range(0, update.shape[0], CHUNK):
        end = start + CHUNK
        part = vector[start:end]
        encoder.encode_into(update[start:end], part)
        streams.apply_into(part)
        digest.update(part.data)
    return MaskedEncoding(vector=vector, clipped=encoder.clipped, digest=digest.digest())
