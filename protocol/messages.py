"""Message schemas of a secure round, with canonical payload encoding.

Every payload starts with the same :class:`Header`::

    run_id (16) | round u32 | sender text | recipient text | model_digest (32) | setup_digest (32)

``sender``/``recipient`` are site ids, or ``""`` for the coordinator. ``model_digest`` is
the SHA-256 of the global model the round trains from (DESIGN.md §4: a coordinator cannot
hand different models to different sites unnoticed). ``setup_digest`` binds every message
after the setup to the exact signed round parameters and cohort (all zeros in the setup
itself). The stage is bound by the message kind, whose name is part of the signed bytes.

Lists of site ids are strictly sorted by UTF-8 bytes (one encoding per set, no duplicates).
Decoders check every count and length against :class:`~fedseal.protocol.config.Limits`
before allocating and raise only :class:`~fedseal.protocol.errors.DecodeError`.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .config import Limits, QuantizationConfig, RoundParameters
from .dp import DpParams
from .encoding import Reader, Writer
from .errors import ConfigError, DecodeError
from .seams import MAX_KEY_BYTES, NO_SHARING, SharedWork
from .types import DIGEST_BYTES, RUN_ID_BYTES, MessageKind, SiteId, site_sort_key

__all__ = [
    "AGREEMENT_PUBLIC_BYTES",
    "AdvertBundle",
    "CohortMember",
    "ConsistencySignature",
    "EncryptedShares",
    "Header",
    "KeyAdvert",
    "MaskedInput",
    "Message",
    "RoundResultNotice",
    "RoundSetup",
    "ShareDelivery",
    "ShareKind",
    "SurvivorSet",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_payload",
    "setup_digest",
    "survivor_statement",
]

AGREEMENT_PUBLIC_BYTES = 65
"""Uncompressed P-256 point (``AgreementKey.public_bytes()``)."""

MAX_INNER_ENVELOPE_BYTES = 4096
"""Bound on one forwarded key-advert envelope inside an :class:`AdvertBundle`."""


def _write_sites(w: Writer, sites: Sequence[str]) -> None:
    w.count(len(sites))
    for s in sites:
        w.text(s)


def _read_site(r: Reader, limits: Limits) -> SiteId:
    site = r.text(limits.max_site_id_bytes)
    if not site:
        raise DecodeError("empty site id")
    return SiteId(site)


def _check_sorted(sites: Sequence[str], what: str) -> None:
    keys = [site_sort_key(s) for s in sites]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise DecodeError(f"{what}: site ids not strictly sorted (duplicate or out of order)")


def _read_sites(r: Reader, limits: Limits, what: str) -> tuple[SiteId, ...]:
    n = r.count(limits.max_cohort)
    sites = tuple(_read_site(r, limits) for _ in range(n))
    _check_sorted(sites, what)
    return sites


def _sorted_sites(sites: Sequence[str]) -> tuple[SiteId, ...]:
    return tuple(SiteId(s) for s in sorted(set(sites), key=site_sort_key))


@dataclass(frozen=True, slots=True)
class Header:
    """Fields every payload binds (see the module docstring)."""

    run_id: bytes
    round: int
    sender: SiteId
    recipient: SiteId
    model_digest: bytes
    setup_digest: bytes

    def encode(self, w: Writer) -> None:
        """Write the header."""
        w.fixed(self.run_id, RUN_ID_BYTES).u32(self.round)
        w.text(self.sender).text(self.recipient)
        w.fixed(self.model_digest, DIGEST_BYTES).fixed(self.setup_digest, DIGEST_BYTES)

    @classmethod
    def decode(cls, r: Reader, limits: Limits) -> Header:
        """Read a header."""
        return cls(
            run_id=r.fixed(RUN_ID_BYTES),
            round=r.u32(),
            sender=SiteId(r.text(limits.max_site_id_bytes)),
            recipient=SiteId(r.text(limits.max_site_id_bytes)),
            model_digest=r.fixed(DIGEST_BYTES),
            setup_digest=r.fixed(DIGEST_BYTES),
        )


class _Message:
    """Shared encode/decode plumbing; subclasses define KIND and the body."""

    KIND: ClassVar[MessageKind]
    header: Header

    def _encode_body(self, w: Writer) -> None:
        raise NotImplementedError

    def to_payload(self) -> bytes:
        """The canonical payload bytes (what gets signed)."""
        w = Writer()
        self.header.encode(w)
        self._encode_body(w)
        return w.to_bytes()


@dataclass(frozen=True, slots=True)
class CohortMember:
    """A sampled site, its enrolled identity key (DER SubjectPublicKeyInfo) and the commitment
    to its graph nonce the coordinator holds for it (``b""``: none yet, the round starts with a
    commit exchange; :mod:`fedseal.protocol.graph`)."""

    site: SiteId
    public_key_der: bytes
    nonce_commitment: bytes = b""


def _encode_params(w: Writer, p: RoundParameters, expires_at: int) -> None:
    q = p.quantization
    w.u64(p.vector_length).u8(q.modulus_bits).u64(q.clip_micros).u32(q.levels)
    w.u64(p.max_weight).u16(p.degree).u16(p.threshold).u16(p.min_survivors).u64(expires_at)


DP_SECTION = 1
"""Tag of the setup body's optional trailing section: DP parameters and rotation seed."""
CONTRACT_SECTION = 2
"""Tag of the setup body's optional trailing section: the run's data-contract digest."""
MAX_DP_PARAMS_BYTES = 256
ROTATION_SEED_BYTES = 32
CONTRACT_DIGEST_BYTES = 32


def _encode_dp(w: Writer, p: RoundParameters) -> None:
    """The trailing sections, each written only when the round has it (setups without keep
    their bytes), in increasing tag order: ``u8 DP_SECTION | blob DpParams.to_bytes() |
    rotation seed (32)``, then ``u8 CONTRACT_SECTION | contract digest (32)``."""
    if p.dp is None:
        if p.rotation_seed:
            raise ValueError("a rotation seed without DP parameters has no encoding")
    else:
        w.u8(DP_SECTION).blob(p.dp.to_bytes()).fixed(p.rotation_seed, ROTATION_SEED_BYTES)
    if p.contract_digest:
        w.u8(CONTRACT_SECTION).fixed(p.contract_digest, CONTRACT_DIGEST_BYTES)


def _decode_dp(r: Reader) -> tuple[DpParams | None, bytes, bytes]:
    """Read the trailing sections while bytes remain (the body's last field came before):
    each tag at most once, in increasing order."""
    dp: DpParams | None = None
    rotation_seed = contract = b""
    last = 0
    while r.remaining:
        tag = r.u8()
        if tag <= last or tag not in (DP_SECTION, CONTRACT_SECTION):
            raise DecodeError(f"round setup: unknown or out-of-order trailing section {tag}")
        last = tag
        if tag == DP_SECTION:
            dp = DpParams.from_bytes(r.blob(MAX_DP_PARAMS_BYTES))
            rotation_seed = r.fixed(ROTATION_SEED_BYTES)
        else:
            contract = r.fixed(CONTRACT_DIGEST_BYTES)
    return dp, rotation_seed, contract


def _read_commitment(r: Reader) -> bytes:
    value = r.blob(DIGEST_BYTES)
    if len(value) not in (0, DIGEST_BYTES):
        raise DecodeError("a graph-nonce commitment must be empty or 32 bytes")
    return value


@dataclass(frozen=True, slots=True)
class RoundSetup(_Message):
    """Coordinator -> each sampled site: the signed round configuration (stage 0)."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_SETUP
    header: Header
    cohort: tuple[CohortMember, ...]
    params: RoundParameters
    expires_at: int
    attempt: int = 0

    def body_bytes(self) -> bytes:
        """The recipient-independent part (cohort, parameters, attempt number u16).

        The attempt number counts setups of one round (0 first): when cohort members do
        not advertise keys, the coordinator sends a new setup to those that did. It is part
        of the setup digest, so every later message binds its attempt. A DP round appends
        one tagged section (:func:`_encode_dp`), a run with a data contract another; without
        either the body ends at the attempt.
        """
        w = Writer()
        w.count(len(self.cohort))
        for m in self.cohort:
            w.text(m.site).blob(m.public_key_der).blob(m.nonce_commitment)
        _encode_params(w, self.params, self.expires_at)
        w.u16(self.attempt)
        _encode_dp(w, self.params)
        return w.to_bytes()

    def _encode_body(self, w: Writer) -> None:
        w.raw(self.body_bytes())

    @property
    def digest(self) -> bytes:
        """The setup digest every later message binds."""
        return setup_digest(
            self.header.run_id, self.header.round, self.header.model_digest, self.body_bytes()
        )

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> RoundSetup:
        n = r.count(limits.max_cohort)
        cohort = tuple(
            CohortMember(
                _read_site(r, limits), r.blob(limits.max_public_key_bytes), _read_commitment(r)
            )
            for _ in range(n)
        )
        _check_sorted([m.site for m in cohort], "round setup cohort")
        vector_length = r.u64()
        modulus_bits = r.u8()
        clip_micros = r.u64()
        levels = r.u32()
        max_weight = r.u64()
        degree, threshold, min_survivors = r.u16(), r.u16(), r.u16()
        expires_at = r.u64()
        attempt = r.u16()
        dp, rotation_seed, contract_digest = _decode_dp(r)
        try:
            quant = QuantizationConfig(
                clip_micros=clip_micros, levels=levels, modulus_bits=modulus_bits
            )
        except ConfigError as exc:
            raise DecodeError(f"round setup: {exc.message}") from exc
        params = RoundParameters(
            vector_length=vector_length,
            quantization=quant,
            max_weight=max_weight,
            degree=degree,
            threshold=threshold,
            min_survivors=min_survivors,
            dp=dp,
            rotation_seed=rotation_seed,
            contract_digest=contract_digest,
        )
        return cls(
            header=header, cohort=cohort, params=params, expires_at=expires_at, attempt=attempt
        )


def setup_digest(run_id: bytes, round: int, model_digest: bytes, body: bytes) -> bytes:
    """SHA-256 binding run, round, model digest and the setup body."""
    h = hashlib.sha256(b"fedseal/v1/setup-digest\x00")
    h.update(run_id)
    h.update(round.to_bytes(4, "big"))
    h.update(model_digest)
    h.update(body)
    return h.digest()


@dataclass(frozen=True, slots=True)
class KeyAdvert(_Message):
    """Site -> coordinator: two fresh ECDH public keys and a commitment to the self-mask seed.

    The mask-agreement public key doubles as the commitment to the mask private key (the
    coordinator checks a reconstructed key against it); ``seed_commitment`` commits to the
    self-mask seed (:func:`fedseal.protocol.masking.seed_commitment`).
    """

    KIND: ClassVar[MessageKind] = MessageKind.KEY_ADVERT
    header: Header
    share_public: bytes
    mask_public: bytes
    seed_commitment: bytes
    #: This attempt's value of the site's graph-nonce hash chain (``b""`` in a commit exchange).
    graph_nonce: bytes = b""
    #: Commitment to the graph nonce of the site's next round of the run.
    next_commitment: bytes = bytes(DIGEST_BYTES)

    def _encode_body(self, w: Writer) -> None:
        w.fixed(self.share_public, AGREEMENT_PUBLIC_BYTES).fixed(
            self.mask_public, AGREEMENT_PUBLIC_BYTES
        )
        w.fixed(self.seed_commitment, DIGEST_BYTES)
        w.blob(self.graph_nonce).fixed(self.next_commitment, DIGEST_BYTES)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> KeyAdvert:
        return cls(
            header=header,
            share_public=r.fixed(AGREEMENT_PUBLIC_BYTES),
            mask_public=r.fixed(AGREEMENT_PUBLIC_BYTES),
            seed_commitment=r.fixed(DIGEST_BYTES),
            graph_nonce=_read_commitment(r),
            next_commitment=r.fixed(DIGEST_BYTES),
        )


@dataclass(frozen=True, slots=True)
class AdvertBundle(_Message):
    """Coordinator -> site: every accepted key advert, as the signed envelopes received."""

    KIND: ClassVar[MessageKind] = MessageKind.ADVERT_BUNDLE
    header: Header
    adverts: tuple[bytes, ...]

    def _encode_body(self, w: Writer) -> None:
        w.count(len(self.adverts))
        for a in self.adverts:
            w.blob(a)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> AdvertBundle:
        n = r.count(limits.max_cohort)
        return cls(header=header, adverts=tuple(r.blob(MAX_INNER_ENVELOPE_BYTES) for _ in range(n)))


def _write_site_blobs(w: Writer, items: tuple[tuple[SiteId, bytes], ...]) -> None:
    w.count(len(items))
    for site, ct in items:
        w.text(site).blob(ct)


def _read_site_blobs(r: Reader, limits: Limits, what: str) -> tuple[tuple[SiteId, bytes], ...]:
    """Decode ciphertexts keyed by site id, in strictly increasing site order."""
    n = r.count(limits.max_cohort)
    items = tuple((_read_site(r, limits), r.blob(limits.max_ciphertext_bytes)) for _ in range(n))
    _check_sorted([s for s, _ in items], what)
    return items


@dataclass(frozen=True, slots=True)
class EncryptedShares(_Message):
    """Site -> coordinator: one AEAD ciphertext (share pair) per neighbour, keyed by recipient."""

    KIND: ClassVar[MessageKind] = MessageKind.ENCRYPTED_SHARES
    header: Header
    items: tuple[tuple[SiteId, bytes], ...]

    def _encode_body(self, w: Writer) -> None:
        _write_site_blobs(w, self.items)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> EncryptedShares:
        return cls(header=header, items=_read_site_blobs(r, limits, "encrypted shares"))


@dataclass(frozen=True, slots=True)
class ShareDelivery(_Message):
    """Coordinator -> site: ciphertexts addressed to it, keyed by sender; asks for masked input."""

    KIND: ClassVar[MessageKind] = MessageKind.SHARE_DELIVERY
    header: Header
    items: tuple[tuple[SiteId, bytes], ...]

    def _encode_body(self, w: Writer) -> None:
        _write_site_blobs(w, self.items)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> ShareDelivery:
        return cls(header=header, items=_read_site_blobs(r, limits, "share delivery"))


@dataclass(frozen=True, slots=True)
class MaskedInput(_Message):
    """Site -> coordinator: describes the masked bulk vector that travels beside the envelope.

    ``clipped`` is how many elements the site clipped (reported in the round result);
    ``bulk_digest`` is the SHA-256 of the vector's little-endian bytes.
    """

    KIND: ClassVar[MessageKind] = MessageKind.MASKED_INPUT
    header: Header
    dataset_root: bytes
    example_count: int
    vector_length: int
    modulus_bits: int
    clipped: int
    bulk_digest: bytes

    def _encode_body(self, w: Writer) -> None:
        w.fixed(self.dataset_root, DIGEST_BYTES).u64(self.example_count)
        w.u64(self.vector_length).u8(self.modulus_bits).u64(self.clipped)
        w.fixed(self.bulk_digest, DIGEST_BYTES)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> MaskedInput:
        return cls(
            header=header,
            dataset_root=r.fixed(DIGEST_BYTES),
            example_count=r.u64(),
            vector_length=r.u64(),
            modulus_bits=r.u8(),
            clipped=r.u64(),
            bulk_digest=r.fixed(DIGEST_BYTES),
        )


@dataclass(frozen=True, slots=True)
class SurvivorSet(_Message):
    """Coordinator -> site: the sites whose masked inputs entered the sum (stage 4)."""

    KIND: ClassVar[MessageKind] = MessageKind.SURVIVOR_SET
    header: Header
    survivors: tuple[SiteId, ...]

    def _encode_body(self, w: Writer) -> None:
        _write_sites(w, self.survivors)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> SurvivorSet:
        return cls(header=header, survivors=_read_sites(r, limits, "survivor set"))


def survivor_statement(
    run_id: bytes,
    round: int,
    setup_digest_: bytes,
    bundle_digest_: bytes,
    survivors: Sequence[str],
) -> bytes:
    """The bytes each site signs in the consistency check (same for every signer).

    Binds the setup digest (cohort, parameters, attempt) and the digest of the advert bundle
    the signer computed its graph from (:func:`fedseal.protocol.graph.bundle_digest`: it holds
    every graph nonce, hence the seed), so sites shown different bundles (e.g. a colluding
    site's two different adverts) sign different statements and none of them reaches the
    quorum it needs before revealing shares.
    """
    w = Writer()
    w.fixed(run_id, RUN_ID_BYTES).u32(round).fixed(setup_digest_, DIGEST_BYTES)
    w.fixed(bundle_digest_, DIGEST_BYTES)
    _write_sites(w, _sorted_sites(survivors))
    return w.to_bytes()


@dataclass(frozen=True, slots=True)
class ConsistencySignature(_Message):
    """Site -> coordinator: the site's signature over :func:`survivor_statement`."""

    KIND: ClassVar[MessageKind] = MessageKind.CONSISTENCY_SIGNATURE
    header: Header
    signature: bytes

    def _encode_body(self, w: Writer) -> None:
        w.blob(self.signature)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> ConsistencySignature:
        return cls(header=header, signature=r.blob(limits.max_signature_bytes))


@dataclass(frozen=True, slots=True)
class UnmaskRequest(_Message):
    """Coordinator -> site: the signed survivor set and which shares to reveal.

    ``alive`` names neighbours whose self-mask seed shares are requested, ``dropped`` those
    whose mask-key shares are requested.
    """

    KIND: ClassVar[MessageKind] = MessageKind.UNMASK_REQUEST
    header: Header
    survivors: tuple[SiteId, ...]
    signatures: tuple[tuple[SiteId, bytes], ...]
    alive: tuple[SiteId, ...]
    dropped: tuple[SiteId, ...]

    def _encode_body(self, w: Writer) -> None:
        _write_sites(w, self.survivors)
        w.count(len(self.signatures))
        for site, sig in self.signatures:
            w.text(site).blob(sig)
        _write_sites(w, self.alive)
        _write_sites(w, self.dropped)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> UnmaskRequest:
        survivors = _read_sites(r, limits, "unmask request survivors")
        n = r.count(limits.max_cohort)
        signatures = tuple(
            (_read_site(r, limits), r.blob(limits.max_signature_bytes)) for _ in range(n)
        )
        _check_sorted([s for s, _ in signatures], "unmask request signatures")
        alive = _read_sites(r, limits, "unmask request alive")
        dropped = _read_sites(r, limits, "unmask request dropped")
        return cls(
            header=header, survivors=survivors, signatures=signatures, alive=alive, dropped=dropped
        )


class ShareKind(enum.IntEnum):
    """Which secret a revealed share belongs to."""

    SELF_MASK_SEED = 1
    MASK_KEY = 2


@dataclass(frozen=True, slots=True)
class UnmaskResponse(_Message):
    """Site -> coordinator: revealed shares as ``(owner, ShareKind, encoded Shamir share)``."""

    KIND: ClassVar[MessageKind] = MessageKind.UNMASK_RESPONSE
    header: Header
    shares: tuple[tuple[SiteId, ShareKind, bytes], ...]

    def _encode_body(self, w: Writer) -> None:
        w.count(len(self.shares))
        for owner, kind, share in self.shares:
            w.text(owner).u8(kind).blob(share)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> UnmaskResponse:
        n = r.count(limits.max_cohort)
        shares = []
        for _ in range(n):
            owner = _read_site(r, limits)
            kind = r.u8()
            if kind not in (ShareKind.SELF_MASK_SEED, ShareKind.MASK_KEY):
                raise DecodeError(f"unmask response: unknown share kind {kind}")
            shares.append((owner, ShareKind(kind), r.blob(limits.max_share_bytes)))
        _check_sorted([s for s, _, _ in shares], "unmask response")
        return cls(header=header, shares=tuple(shares))


@dataclass(frozen=True, slots=True)
class RoundResultNotice(_Message):
    """Coordinator -> site: the round's survivors, total weight and aggregate digest."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_RESULT
    header: Header
    survivors: tuple[SiteId, ...]
    total_weight: int
    aggregate_digest: bytes

    def _encode_body(self, w: Writer) -> None:
        _write_sites(w, self.survivors)
        w.u64(self.total_weight).fixed(self.aggregate_digest, DIGEST_BYTES)

    @classmethod
    def _decode_body(cls, header: Header, r: Reader, limits: Limits) -> RoundResultNotice:
        survivors = _read_sites(r, limits, "round result survivors")
        return cls(
            header=header,
            survivors=survivors,
            total_weight=r.u64(),
            aggregate_digest=r.fixed(DIGEST_BYTES),
        )


Message = (
    RoundSetup
    | KeyAdvert
    | AdvertBundle
    | EncryptedShares
    | ShareDelivery
    | MaskedInput
    | SurvivorSet
    | ConsistencySignature
    | UnmaskRequest
    | UnmaskResponse
    | RoundResultNotice
)

_CLASSES: dict[MessageKind, type[Message]] = {
    c.KIND: c
    for c in (
        RoundSetup,
        KeyAdvert,
        AdvertBundle,
        EncryptedShares,
        ShareDelivery,
        MaskedInput,
        SurvivorSet,
        ConsistencySignature,
        UnmaskRequest,
        UnmaskResponse,
        RoundResultNotice,
    )
}


def decode_payload(
    kind: MessageKind, payload: bytes, limits: Limits, shared: SharedWork = NO_SHARING
) -> Message:
    """Decode a payload of the given kind.

    ``shared`` (simulations only, :mod:`fedseal.protocol.seams`) may give the same (frozen)
    message it decoded before for the same kind, bytes and limits; by default every payload
    is decoded.

    Raises:
        DecodeError: Malformed, truncated, trailing bytes, or over a size bound.
    """
    key = (kind, bytes(payload), limits) if len(payload) <= MAX_KEY_BYTES else None
    return shared.remembered("decoded", key, lambda: _decode_payload(kind, payload, limits))


def _decode_payload(kind: MessageKind, payload: bytes, limits: Limits) -> Message:
    r = Reader(payload, what=kind.type_name)
    header = Header.decode(r, limits)
    message = _CLASSES[kind]._decode_body(header, r, limits)
    r.finish()
    return message
