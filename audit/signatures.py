"""The checks each accepted envelope of a log gets beyond the run rules: its site signature
verifies, and its signed payload agrees with the fields the entry records.

The verifier queues one :class:`SignatureJob` per accepted envelope and checks them in batches
(:data:`SignatureBatchCheck`; a caller may pass a parallel checker, e.g. ``fl-audit verify
--jobs``); the failure reported is always the one at the lowest entry index. Parsed public keys
are cached per process (keyed by their exact DER bytes), and a masked input's payload is
compared with the recorded fields byte by byte (:func:`input_agrees`) before the general
decoder is asked: nothing is skipped, every signature is verified.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import INPUT_MESSAGE_TYPE, EnvelopeRecord
from fedseal.audit.errors import RuleViolation
from fedseal.crypto.errors import CryptoError
from fedseal.crypto.keys import public_key_from_der
from fedseal.crypto.signing import verify
from fedseal.protocol.config import Limits
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.messages import MaskedInput, decode_payload
from fedseal.protocol.types import MessageKind

__all__ = [
    "JobFailure",
    "SignatureBatchCheck",
    "SignatureBatchSubmit",
    "SignatureJob",
    "cached_public_key",
    "check_signatures_serial",
    "cross_check",
    "input_agrees",
]

_LIMITS = Limits()
_U16 = struct.Struct(">H").unpack_from


@dataclass(frozen=True, slots=True)
class SignatureJob:
    """One accepted envelope whose site signature (then payload) the verifier must check.

    ``data`` is the entry's bytes when known: a job then pickles as those bytes (cheap to send
    to a worker process, which decodes them) instead of the decoded record.
    """

    index: int
    public_key_der: bytes
    record: EnvelopeRecord
    data: bytes = b""

    def __reduce__(self) -> tuple[object, ...]:
        if self.data:
            return (_job_from_bytes, (self.index, self.public_key_der, self.data))
        return (SignatureJob, (self.index, self.public_key_der, self.record))


def _job_from_bytes(index: int, public_key_der: bytes, data: bytes) -> SignatureJob:
    record = decode_entry(data)
    if not isinstance(record, EnvelopeRecord):
        raise TypeError("a signature job must carry an envelope entry")
    return SignatureJob(index, public_key_der, record, data)


@dataclass(frozen=True, slots=True)
class JobFailure:
    """The first failing job of a batch: its position, the failed check and why."""

    position: int
    check: str
    detail: str


SignatureBatchCheck = Callable[[Sequence[SignatureJob]], "JobFailure | None"]
"""Checks a batch of jobs in order; returns the first failure, or None. Pure per job, so an
implementation may split a batch across processes (see ``fl-audit verify --jobs``)."""
SignatureBatchSubmit = Callable[[Sequence[SignatureJob]], Callable[[], "JobFailure | None"]]
"""Starts checking a batch; returns a function that waits for and returns its first failure."""


_KEY_CACHE: dict[bytes, ec.EllipticCurvePublicKey] = {}
_KEY_CACHE_MAX = 4096


def cached_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of ``der``, parsed once per process (a log has few signers).

    Keyed by the exact DER bytes, so a different key is a different entry; only keys that
    parsed are cached (an invalid DER raises every time).

    Raises:
        fedseal.crypto.errors.CryptoError: If ``der`` is not a valid P-256 public key.
    """
    key = _KEY_CACHE.get(der)
    if key is None:
        key = public_key_from_der(der)
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        _KEY_CACHE[bytes(der)] = key
    return key


def check_signatures_serial(jobs: Sequence[SignatureJob]) -> JobFailure | None:
    """The default :data:`SignatureBatchCheck`, per job: (1) the site signature verifies over
    the payload bytes as recorded; (2) only then, for protocol message types, the payload
    decodes and agrees with the entry's explicit fields (run, round, sender, model, dataset
    root, bulk digest, example count)."""
    keys = _KEY_CACHE
    for pos, job in enumerate(jobs):
        rec = job.record
        key = keys.get(job.public_key_der)
        try:
            if key is None:
                key = cached_public_key(job.public_key_der)
            verify(key, rec.message_type, rec.payload, rec.signature)
        except CryptoError:
            return JobFailure(
                pos,
                "signature",
                f"site signature over the {rec.message_type} payload does not verify",
            )
        try:
            cross_check(rec)
        except RuleViolation as exc:
            return JobFailure(pos, exc.check, exc.detail)
    return None


# A payload header opens with run id (16), u32 round, u16 sender length; after its two texts a
# MaskedInput has model, setup, root, count, length, bits, clipped, bulk.
_HEADER_START = struct.Struct(">16sIH")
_INPUT_BODY = struct.Struct(">32s32s32sQQBQ32s")
_MAX_SITE_ID = _LIMITS.max_site_id_bytes


def input_agrees(e: EnvelopeRecord) -> bool:
    """Fast path of :func:`cross_check` for a masked input (the bulk of every log).

    True only if ``e.payload`` is a :class:`MaskedInput` payload that
    :func:`~fedseal.protocol.messages.decode_payload` accepts (same bounds, UTF-8 and no
    trailing bytes) *and* whose run id, round, sender, model digest, dataset root, bulk digest
    and example count equal the entry's fields. False means "not shown here": the caller then
    runs the general decoder, which passes or names the failure exactly as before.
    """
    p = e.payload
    try:
        run_id, rnd, ln = _HEADER_START.unpack_from(p, 0)
        q = 22 + ln
        if run_id != e.run_id or rnd != e.round or ln > _MAX_SITE_ID:
            return False
        if p[22:q] != e.site.encode():
            return False
        (ln,) = _U16(p, q)
        if ln > _MAX_SITE_ID:
            return False
        if ln:
            p[q + 2 : q + 2 + ln].decode()
        q += 2 + ln
        model, _, root, count, _, _, _, bulk = _INPUT_BODY.unpack_from(p, q)
    except (struct.error, UnicodeError):
        return False
    agrees: bool = (
        q + _INPUT_BODY.size == len(p)
        and (e.model_digest is None or model == e.model_digest)
        and root == e.dataset_root
        and bulk == e.bulk_digest
        and count == e.num_examples
    )
    return agrees


def cross_check(e: EnvelopeRecord) -> None:
    """For protocol message types, the explicit fields must match the decoded payload."""
    if e.message_type == INPUT_MESSAGE_TYPE and input_agrees(e):
        return
    try:
        kind = _KINDS_BY_TYPE[e.message_type]
    except KeyError:
        return
    try:
        message = decode_payload(kind, e.payload, _LIMITS)
    except ProtocolError as exc:
        raise RuleViolation(
            "payload-decode", f"accepted {e.message_type} payload does not decode"
        ) from exc
    header = message.header
    if header.run_id != e.run_id or header.round != e.round or header.sender != e.site:
        raise RuleViolation(
            "payload-mismatch", "run id, round or sender differ from the signed payload"
        )
    if e.model_digest is not None and header.model_digest != e.model_digest:
        raise RuleViolation("payload-mismatch", "model digest differs from the signed payload")
    if isinstance(message, MaskedInput) and (
        message.dataset_root != e.dataset_root
        or message.bulk_digest != e.bulk_digest
        or message.example_count != e.num_examples
    ):
        raise RuleViolation(
            "payload-mismatch",
            "dataset root, bulk digest or example count differ from the signed payload",
        )


_KINDS_BY_TYPE = {k.type_name: k for k in MessageKind}
