"""The canonical bytes of an audit-log entry: encode, decode (strictly), and the store's tags.

An entry is ``u8 version = 1 | u8 kind | body`` (:mod:`fedseal.audit.entries` defines each
kind's body). :func:`decode_entry` insists on the canonical encoding. Envelope entries, nearly
all of a log, first go through a one-pass decoder with a cached ``struct`` layout
(:func:`decode_envelope_fast`), which accepts exactly what the general decoder accepts and
hands anything unusual to it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields

from fedseal.audit.entries import (
    ENTRY_VERSION,
    MAX_ENTRY_TEXT,
    MAX_ENVELOPE_PAYLOAD,
    MAX_ENVELOPE_SIGNATURE,
    AuditEntry,
    Checkpoint,
    ConsortiumRosterRecord,
    DpRound,
    EntryKind,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    RosterChange,
    RoundRecord,
    RunEnd,
    RunStart,
)
from fedseal.protocol.encoding import Reader, Writer
from fedseal.protocol.errors import DecodeError
from fedseal.protocol.types import DIGEST_BYTES

__all__ = [
    "ENVELOPE_PREFIX",
    "decode_entry",
    "decode_envelope_fast",
    "encode_checked",
    "encode_entry",
    "entry_tags",
]

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

_CLASSES: dict[EntryKind, type[AuditEntry]] = {
    c.KIND: c
    for c in (
        Genesis,
        RunStart,
        RosterChange,
        EnvelopeRecord,
        RoundRecord,
        Checkpoint,
        RunEnd,
        ConsortiumRosterRecord,
        Evaluation,
        DpRound,
    )
}
_CLASSES_BY_TAG: dict[int, type[AuditEntry]] = {int(k): c for k, c in _CLASSES.items()}


_ENV_LAYOUTS: dict[tuple[int, int, int, int], struct.Struct] = {}
"""``struct`` layouts of envelope entries from the run id to the reason (after version and
kind), keyed by the lengths of their four texts (a log has few combinations)."""
ENVELOPE_PREFIX = bytes([ENTRY_VERSION, EntryKind.ENVELOPE])  # version and kind bytes
_ENV_TAIL_ALL = struct.Struct(">B32sB32sBQB32s")  # root, bulk, example count, model: all set
_ENV_FIELD_SETTERS: tuple[Callable[[object, object], None], ...] = tuple(
    getattr(EnvelopeRecord, f.name).__set__
    for f in fields(EnvelopeRecord)  # field order = constructor order
)


def _envelope_from_checked_fields(
    run_id: bytes, rnd: int, stage: str, site: str, mtype: str, signer: bytes, accepted: bool,
    reason: str, payload: bytes, signature: bytes, root: bytes | None, bulk: bytes | None,
    examples: int | None, model: bytes | None,
) -> EnvelopeRecord:  # fmt: skip
    """Build an :class:`EnvelopeRecord` from fields that already satisfy its invariants.

    Only for :func:`decode_envelope_fast`, which establishes every ``__post_init__`` rule
    itself: it fills the slots directly (unrolled) instead of running the frozen-dataclass
    ``__init__`` (which was about half the cost of decoding an entry).
    """
    record: EnvelopeRecord = object.__new__(EnvelopeRecord)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13 = _ENV_FIELD_SETTERS
    s0(record, run_id)
    s1(record, rnd)
    s2(record, stage)
    s3(record, site)
    s4(record, mtype)
    s5(record, signer)
    s6(record, accepted)
    s7(record, reason)
    s8(record, payload)
    s9(record, signature)
    s10(record, root)
    s11(record, bulk)
    s12(record, examples)
    s13(record, model)
    return record


def decode_envelope_fast(b: bytes) -> EnvelopeRecord | None:
    """Decode an envelope entry (``b`` starts with the version and kind bytes) in one pass.

    The verifier decodes one of these per accepted input, so this reads the six length
    prefixes, then the fields up to the reason with one ``struct`` layout cached per text
    lengths, and the four optional fields with one fixed layout when all are present (else
    one by one), instead of one cursor call per field. It accepts exactly what
    :meth:`EnvelopeRecord._decode` accepts and returns ``None`` for anything else (truncated,
    over a bound, bad flag or UTF-8, trailing bytes, a field breaking an
    :class:`EnvelopeRecord` rule): the caller then runs the general decoder, which raises the
    precise :class:`DecodeError`. ``tests/audit/test_audit_fastpaths.py`` checks that both
    decoders agree on valid, generated and mutated entries.
    """
    try:
        (l1,) = _U16(b, 22)  # after version, kind, run id (16), round (4)
        p = 24 + l1
        (l2,) = _U16(b, p)
        p += 2 + l2
        (l3,) = _U16(b, p)
        p += 35 + l3  # u16 length, message type, signer key id (32), accepted flag (1)
        (l4,) = _U16(b, p)
        p += 2 + l4
        (l5,) = _U32(b, p)
        p += 4 + l5
        (l6,) = _U32(b, p)
        p += 4 + l6
        if (
            l1 > MAX_ENTRY_TEXT
            or l2 > MAX_ENTRY_TEXT
            or l3 > MAX_ENTRY_TEXT
            or l4 > MAX_ENTRY_TEXT
            or not l3
            or l5 > MAX_ENVELOPE_PAYLOAD
            or l6 > MAX_ENVELOPE_SIGNATURE
        ):
            return None
        key = (l1, l2, l3, l4)
        layout = _ENV_LAYOUTS.get(key)
        if layout is None:
            if len(_ENV_LAYOUTS) >= 4096:
                _ENV_LAYOUTS.clear()
            layout = _ENV_LAYOUTS[key] = struct.Struct(f">16sIH{l1}sH{l2}sH{l3}s32sBH{l4}s")
        (
            run_id, rnd, _, stage, _, site, _, mtype, signer, accepted, _, reason
        ) = layout.unpack_from(b, 2)  # fmt: skip
        q = p - l6  # the signature's first byte
        payload = b[q - 4 - l5 : q - 4]
        signature = b[q:p]
        root: bytes | None
        bulk: bytes | None
        examples: int | None
        model: bytes | None
        if len(b) - p == _ENV_TAIL_ALL.size:  # the usual case: all four optional fields set
            f1, root, f2, bulk, f3, examples, f4, model = _ENV_TAIL_ALL.unpack_from(b, p)
            if f1 != 1 or f2 != 1 or f3 != 1 or f4 != 1:
                return None
        else:
            root, p = _opt_digest_at(b, p)
            bulk, p = _opt_digest_at(b, p)
            flag = b[p]
            if flag > 1:
                return None
            examples = _U64(b, p + 1)[0] if flag else None
            p += 9 if flag else 1
            model, p = _opt_digest_at(b, p)
            # Offsets only grow, so ending exactly at the end means no field was cut short.
            if p != len(b):
                return None
        if accepted > 1 or (accepted == 1) == (l4 != 0):
            return None  # an accepted envelope has no reason, a rejected one has one
        return _envelope_from_checked_fields(
            run_id, rnd, stage.decode(), site.decode(), mtype.decode(), signer, accepted == 1,
            reason.decode() if l4 else "", payload, signature, root, bulk, examples, model,
        )  # fmt: skip
    except (struct.error, IndexError, UnicodeDecodeError, _BadFlagError):
        return None


class _BadFlagError(Exception):
    """An optional-field flag other than 0 or 1 (the fast decoder then hands over)."""


def _opt_digest_at(b: bytes, p: int) -> tuple[bytes | None, int]:
    """An optional digest at offset ``p``: ``(value or None, next offset)``.

    Raises:
        _BadFlagError: The flag is neither 0 nor 1.
        IndexError: ``p`` is past the end.
    """
    flag = b[p]
    if flag == 0:
        return None, p + 1
    if flag != 1:
        raise _BadFlagError
    return b[p + 1 : p + 1 + DIGEST_BYTES], p + 1 + DIGEST_BYTES


def entry_tags(entry: AuditEntry) -> tuple[int, str | None, int | None]:
    """The store's index columns ``(kind, site, round)`` for an entry, as :class:`AuditLog`
    writes them and :meth:`AuditVerifier.verify_store` requires them.

    ``site`` is set for roster changes and envelopes, ``round`` for envelopes, round results,
    checkpoints, evaluations and DP rounds; every other tag is ``NULL``.
    """
    kind = int(entry.KIND)
    if isinstance(entry, EnvelopeRecord):
        return kind, entry.site, entry.round
    if isinstance(entry, RosterChange):
        return kind, entry.site, None
    if isinstance(entry, RoundRecord | Checkpoint | Evaluation | DpRound):
        return kind, None, entry.round
    return kind, None, None


def encode_entry(entry: AuditEntry) -> bytes:
    """Canonical bytes of an entry: ``u8 version | u8 kind | body``."""
    w = Writer().u8(ENTRY_VERSION).u8(int(entry.KIND))
    entry._encode(w)
    return w.to_bytes()


def encode_checked(entry: AuditEntry) -> bytes:
    """Encode, and make sure the verifier will decode it back (every field within its bound).

    Raises:
        ValueError: If a field exceeds a decoding bound (e.g. a payload over 1 MiB).
    """
    data = encode_entry(entry)
    try:
        same = decode_entry(data) == entry
    except DecodeError as exc:
        raise ValueError(f"{entry.KIND.label} entry exceeds a bound: {exc.message}") from exc
    if not same:
        raise ValueError(f"{entry.KIND.label} entry is not canonical")
    return data


def decode_entry(data: bytes) -> AuditEntry:
    """Decode an entry, insisting on the canonical encoding.

    Raises:
        DecodeError: Unknown version or kind, truncated, trailing bytes, over a bound, or a
            field that is not canonical (unsorted list, inconsistent flags).
    """
    if type(data) is bytes and data[:2] == ENVELOPE_PREFIX:
        fast = decode_envelope_fast(data)
        if fast is not None:
            return fast
    if not isinstance(data, bytes):
        raise DecodeError(f"audit entry: expected bytes, got {type(data).__name__}")
    r = Reader(data, what="audit entry")
    version = r.u8()
    if version != ENTRY_VERSION:
        raise DecodeError(f"audit entry: unknown version {version}")
    tag = r.u8()
    cls = _CLASSES_BY_TAG.get(tag)
    if cls is None:
        raise DecodeError(f"audit entry: unknown entry kind {tag}")
    try:
        entry = cls._decode(r)
    except ValueError as exc:
        raise DecodeError(f"audit entry: {exc}") from exc
    r.finish()
    return entry
