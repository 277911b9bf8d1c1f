"""Audit-log entries, signed tree heads, the coordinator's log API and the offline verifier.

Example (coordinator side)::

    log = AuditLog.open("audit.sqlite", signer=coordinator_key, now_ms=now(), log_id=os.urandom(16))
    log.append_roster_change(RosterAction.ENROL, "site-a", public_key_der=der, approved_roots=[root], now_ms=now())
    log.append_consortium_roster(signed_roster, authority_public_key, now_ms=now())  # verified first
    log.append_run_start(run_id, config_digest=c, initial_model_digest=m0, code_version="0.1.0", started_at_ms=now())
    log.append_envelope(MessageKind.MASKED_INPUT.type_name, payload, signature, key_id, accepted=True,
                        reason=None, site="site-a", round=1, stage="masked_input",
                        dataset_root=root, bulk_digest=d, num_examples=120, model_digest=m0)
    log.append_round_result(1, aggregate_digest=agg, new_model_digest=m1)   # survivors/inputs from the log
    head = log.sign_tree_head(now())                                        # after every round
    log.append_evaluation(1, metrics={"accuracy": 0.91, "loss": 0.3}, num_examples=600, sites=s)
    ...
    log.append_run_end(RunStatus.COMPLETED, ended_at_ms=now()); log.sign_tree_head(now())

Example (auditor side)::

    # what fl-audit verify does: the entries, the signed tree heads, and every unsigned copy
    # the store keeps (index columns, tree-head columns, the nodes cache):
    summary = AuditVerifier(coordinator_key=pinned).verify_store(store)
    # the entries and tree heads only (e.g. entries obtained from elsewhere):
    summary = AuditVerifier(coordinator_key=pinned).run(store.iter_entries(), store.tree_heads())

Trust anchor: without ``coordinator_key`` the verifier checks the tree heads against the key the
log's own genesis entry names, so a log forged wholesale under a fresh key verifies. An auditor
pins the coordinator's public key (``fl-audit verify --coordinator-key``); ``VerifiedLog``
records which key was used and whether it was pinned.

Every entry is canonical bytes (:mod:`fedseal.protocol.encoding`): ``u8 version = 1 | u8 kind |
body``; the Merkle leaf is those bytes (leaf hash ``SHA-256(0x00 || bytes)``, RFC 9162 §2.1.1).
Entries hold digests, organisation-level site ids and signatures only: no raw data, no
unmasked individual update, no personal data. Envelope entries keep the signer's payload and
signature verbatim *and* the facts the coordinator decoded from them (site, round, dataset
root, bulk digest, example count, model digest) as explicit fields; the verifier checks both
the signature and, for message types of :class:`~fedseal.protocol.types.MessageKind`, that the
explicit fields agree with the decoded payload. Consortium roster entries
(:class:`ConsortiumRosterRecord`) keep the roster authority's signed roster bytes and
signature verbatim with the authority's public key, so an auditor can re-verify offline which
consortium roster (version, sites, keys) the sites ran under.

A signed tree head (STH) is ``log_id (16) | u64 tree_size | root (32) | u64 timestamp_ms``,
signed with :func:`fedseal.crypto.signing.sign` under message type :data:`TREE_HEAD_TYPE`.

The verifier, in numbered steps, for each entry in index order:

1. the index follows the previous one (a gap is a deleted entry);
2. the stored leaf hash equals ``leaf_hash(entry bytes)``;
3. the bytes decode canonically;
4. the run semantics hold (:class:`AuditVerifier` lists them); accepted envelopes queue a
   signature check against the key enrolled *in the log* (and in a trusted roster if given);
5. every tree head whose size is reached has a valid coordinator signature and the root
   recomputed from the entries so far;
6. with :meth:`AuditVerifier.verify_store`, the store's unsigned copies (index columns, tree
   head columns, the ``nodes`` cache) equal what the entries and signed tree heads say.

Evaluation metrics: a round's result is logged (and its tree head signed) before the new model
leaves the coordinator for evaluation, so the round's aggregated evaluation metrics (accuracy,
loss, macro-F1, example count, the sites counted) are a separate entry kind,
:class:`Evaluation`, written once the evaluation is aggregated: after the round's result and
checkpoint, before the next round's result or the run end (whose signed tree head covers it).
``RoundResult.metrics`` stays for metrics known when the round commits (the coordinator logs
none today).

Signature checks run in batches (a caller may pass a parallel checker); the failure reported is
always the one at the lowest entry index.

Hot paths (each checks exactly what the general code checks, and hands anything unusual to
it): envelope entries decode in one pass with a cached ``struct`` layout, a masked input's
payload is compared with the recorded fields byte by byte instead of being decoded into
objects, parsed public keys are cached per process (keyed by their exact DER bytes), and the
store is scanned as plain ``(index, bytes, stored leaf hash)`` rows. Nothing is skipped:
every leaf hash and tree node is recomputed from the entry bytes, every signature and tree
head is verified.

This module does no I/O of its own: :meth:`AuditLog.open` opens the SQLite store of
:mod:`fedseal.audit.store`, and the verifier reads whatever entries it is given.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, NoReturn, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.store import MerkleLogStore, StoredEntry, StoredTreeHead, node_id
from fedseal.crypto.errors import CryptoError, SignatureError
from fedseal.crypto.keys import key_id, public_key_from_der, public_key_to_der
from fedseal.crypto.merkle import EMPTY_ROOT, leaf_hash, node_hash
from fedseal.crypto.signing import MAX_SIGNATURE_SIZE, sign, signed_content_digest, verify
from fedseal.protocol.config import Limits
from fedseal.protocol.consortium import (
    MAX_CONSORTIUM_NAME_BYTES,
    ROSTER_TYPE,
    ConsortiumRoster,
    RosterFormatError,
    SignedConsortiumRoster,
    decode_roster,
)
from fedseal.protocol.encoding import Reader, Writer
from fedseal.protocol.errors import BadSignatureError, DecodeError, ProtocolError
from fedseal.protocol.messages import MaskedInput, decode_payload
from fedseal.protocol.roster import Roster, RosterEntry
from fedseal.protocol.types import DIGEST_BYTES, RUN_ID_BYTES, MessageKind, SiteId, site_sort_key

__all__ = [
    "AUDIT_METHODS",
    "AUDIT_REQUEST_TYPE",
    "ENTRY_VERSION",
    "INPUT_MESSAGE_TYPE",
    "LOG_ID_BYTES",
    "TREE_HEAD_TYPE",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditStateError",
    "AuditVerificationError",
    "AuditVerifier",
    "Checkpoint",
    "ConsortiumRosterRecord",
    "EntryKind",
    "EnvelopeRecord",
    "Evaluation",
    "Genesis",
    "JobFailure",
    "ReceivedEnvelope",
    "RosterAction",
    "RosterChange",
    "RoundResult",
    "RoundStatus",
    "RunEnd",
    "RunStart",
    "RunStatus",
    "SignatureBatchCheck",
    "SignatureBatchSubmit",
    "SignatureJob",
    "SignedTreeHead",
    "VerifiedLog",
    "audit_request_params",
    "audit_request_payload",
    "check_signatures_serial",
    "decode_entry",
    "encode_entry",
    "entry_tags",
    "find_input",
    "metric_to_micros",
    "roster_from_log",
    "verify_audit_log",
]

ENTRY_VERSION = 1
LOG_ID_BYTES = 16
TREE_HEAD_TYPE = "fedseal/v1/audit-tree-head"
"""Message type under which the coordinator signs tree heads."""
AUDIT_REQUEST_TYPE = "fedseal/v1/audit-request"
"""Message type under which a site signs a request to the audit service."""
INPUT_MESSAGE_TYPE = MessageKind.MASKED_INPUT.type_name
"""Envelopes of this type are a round's aggregated inputs."""

_MAX_TEXT = 1024
_MAX_PAYLOAD = 1 << 20
_MAX_SIGNATURE = 80
_MAX_KEY = 256
_MAX_LIST = 100_000
_MAX_METRIC_NAME = 64
_MAX_CONSORTIUM_ROSTER = 4 << 20
"""Bound on a consortium roster's signed bytes in an entry (10,000 sites with the longest ids
and keys :func:`~fedseal.protocol.consortium.decode_roster` accepts take about 3.3 MB)."""
_LIMITS = Limits()
_E = TypeVar("_E", bound=enum.IntEnum)


# --- errors --------------------------------------------------------------------------------


class AuditError(ProtocolError):
    """Base of the audit errors (a :class:`~fedseal.protocol.errors.ProtocolError`)."""


class AuditStateError(AuditError):
    """The coordinator asked the log to record something inconsistent with what it holds.

    Raised by :class:`AuditLog` *before* writing, so the log never records a run that would
    fail verification (e.g. an accepted envelope from a revoked site, a skipped round).
    """


class AuditVerificationError(AuditError):
    """The log fails verification; names the first bad place.

    Attributes:
        index: The first bad entry's index (``None`` for a failure not tied to one entry).
        entry_type: That entry's kind name (``"genesis"``, ``"envelope"``, …) if known.
        check: Short machine-readable name of the failed check (``"leaf-hash"``,
            ``"signature"``, ``"tree-head-root"``, ``"round-order"``, …).
        detail: Human-readable explanation.
        tree_head_seq: The tree head concerned, for tree-head failures.
    """

    def __init__(
        self,
        check: str,
        detail: str,
        *,
        index: int | None = None,
        entry_type: str | None = None,
        tree_head_seq: int | None = None,
        site: str | None = None,
        round: int | None = None,
    ) -> None:
        where = []
        if index is not None:
            where.append(f"entry {index}" + (f" ({entry_type})" if entry_type else ""))
        if tree_head_seq is not None:
            where.append(f"tree head #{tree_head_seq}")
        prefix = ", ".join(where) or "log"
        super().__init__(f"{prefix}: {check}: {detail}", site=site, round=round)
        self.index = index
        self.entry_type = entry_type
        self.check = check
        self.detail = detail
        self.tree_head_seq = tree_head_seq


# --- entry types ---------------------------------------------------------------------------


class EntryKind(enum.IntEnum):
    """Kind byte of an entry."""

    GENESIS = 0
    RUN_START = 1
    ROSTER_CHANGE = 2
    ENVELOPE = 3
    ROUND_RESULT = 4
    CHECKPOINT = 5
    RUN_END = 6
    CONSORTIUM_ROSTER = 7
    EVALUATION = 8

    @property
    def label(self) -> str:
        """Lower-case name used in reports."""
        return _LABELS[self]


_LABELS: dict[EntryKind, str] = {k: k.name.lower().replace("_", "-") for k in EntryKind}


class RosterAction(enum.IntEnum):
    """What a roster change does."""

    ENROL = 1
    SET_ROOTS = 2
    REVOKE = 3


class RoundStatus(enum.IntEnum):
    """Outcome of a round."""

    COMPLETED = 1
    FAILED = 2


class RunStatus(enum.IntEnum):
    """Outcome of a run."""

    COMPLETED = 1
    ABORTED = 2


_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from


class _Cursor:
    """A lean bounds-checked reader for audit entries (the verifier decodes millions).

    Same rules as :class:`fedseal.protocol.encoding.Reader` (lengths checked against a bound
    and the input before slicing, no trailing bytes, only :class:`DecodeError`).
    """

    __slots__ = ("_b", "_n", "_p")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise DecodeError(f"audit entry: expected bytes, got {type(data).__name__}")
        self._b = data
        self._n = len(data)
        self._p = 0

    def _truncated(self, need: int) -> DecodeError:
        return DecodeError(f"audit entry: truncated (needed {need} bytes at offset {self._p})")

    def fixed(self, length: int) -> bytes:
        p = self._p
        end = p + length
        if end > self._n:
            raise self._truncated(length)
        self._p = end
        return self._b[p:end]

    def u8(self) -> int:
        p = self._p
        if p >= self._n:
            raise self._truncated(1)
        self._p = p + 1
        return self._b[p]

    def u16(self) -> int:
        if self._p + 2 > self._n:
            raise self._truncated(2)
        (value,) = _U16(self._b, self._p)
        self._p += 2
        return int(value)

    def u32(self) -> int:
        if self._p + 4 > self._n:
            raise self._truncated(4)
        (value,) = _U32(self._b, self._p)
        self._p += 4
        return int(value)

    def u64(self) -> int:
        if self._p + 8 > self._n:
            raise self._truncated(8)
        (value,) = _U64(self._b, self._p)
        self._p += 8
        return int(value)

    def digests(self, count: int) -> tuple[bytes, ...]:
        """``count`` consecutive 32-byte digests (one bounds check, one slice each)."""
        p = self._p
        end = p + count * DIGEST_BYTES
        if end > self._n:
            raise self._truncated(count * DIGEST_BYTES)
        self._p = end
        b = self._b
        return tuple([b[i : i + DIGEST_BYTES] for i in range(p, end, DIGEST_BYTES)])

    def blob(self, max_length: int) -> bytes:
        length = self.u32()
        if length > max_length:
            raise DecodeError(f"audit entry: field of {length} bytes exceeds bound {max_length}")
        return self.fixed(length)

    def text(self, max_length: int) -> str:
        length = self.u16()
        if length > max_length:
            raise DecodeError(f"audit entry: text of {length} bytes exceeds bound {max_length}")
        try:
            return self.fixed(length).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("audit entry: text is not valid UTF-8") from exc

    def texts(self, count: int, max_length: int) -> tuple[str, ...]:
        """``count`` consecutive texts (as :meth:`text`, in one loop)."""
        b, n, p = self._b, self._n, self._p
        out = []
        try:
            for _ in range(count):
                if p + 2 > n:
                    self._p = p
                    raise self._truncated(2)
                (length,) = _U16(b, p)
                if length > max_length:
                    raise DecodeError(
                        f"audit entry: text of {length} bytes exceeds bound {max_length}"
                    )
                p += 2
                end = p + length
                if end > n:
                    self._p = p
                    raise self._truncated(length)
                out.append(b[p:end].decode("utf-8"))
                p = end
        except UnicodeDecodeError as exc:
            raise DecodeError("audit entry: text is not valid UTF-8") from exc
        self._p = p
        return tuple(out)

    def count(self, max_count: int) -> int:
        value = self.u32()
        if value > max_count or value > self._n - self._p:
            raise DecodeError(f"audit entry: list of {value} items exceeds its bound or the input")
        return value

    def finish(self) -> None:
        if self._p != self._n:
            raise DecodeError(f"audit entry: {self._n - self._p} trailing bytes")


def _opt_digest(w: Writer, value: bytes | None) -> None:
    if value is None:
        w.u8(0)
    else:
        w.u8(1).fixed(value, DIGEST_BYTES)


def _read_opt_digest(r: _Cursor) -> bytes | None:
    flag = r.u8()
    if flag == 0:
        return None
    if flag != 1:
        raise DecodeError("audit entry: bad optional-field flag")
    return r.fixed(DIGEST_BYTES)


def _check_digest(name: str, value: bytes | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise ValueError(f"{name} must be {DIGEST_BYTES} bytes")


def _check_sorted_unique(values: Sequence[bytes], what: str) -> None:
    # Strictly increasing <=> no duplicates and already sorted (C-level, no Python loop).
    items = list(values)
    if len(set(items)) != len(items) or items != sorted(items):
        raise ValueError(f"{what} must be strictly sorted (canonical order, no duplicates)")


def _check_digests(name: str, values: Sequence[bytes]) -> None:
    # Fast C-level test first; on any doubt the per-item check raises the precise error.
    if not (set(map(type, values)) <= {bytes} and set(map(len, values)) <= {DIGEST_BYTES}):
        for v in values:
            _check_digest(name, v)


@dataclass(frozen=True, slots=True)
class Genesis:
    """Entry 0 of every log: the log id and the coordinator key that signs its tree heads."""

    KIND: ClassVar[EntryKind] = EntryKind.GENESIS
    log_id: bytes
    coordinator_key_der: bytes
    created_at_ms: int
    note: str = ""

    def __post_init__(self) -> None:
        if len(self.log_id) != LOG_ID_BYTES:
            raise ValueError(f"log_id must be {LOG_ID_BYTES} bytes")

    def _encode(self, w: Writer) -> None:
        w.fixed(self.log_id, LOG_ID_BYTES).blob(self.coordinator_key_der)
        w.u64(self.created_at_ms).text(self.note)

    @classmethod
    def _decode(cls, r: _Cursor) -> Genesis:
        return cls(r.fixed(LOG_ID_BYTES), r.blob(_MAX_KEY), r.u64(), r.text(_MAX_TEXT))


@dataclass(frozen=True, slots=True)
class RunStart:
    """A training run begins. ``roster_digest`` is the log roster's digest at that point."""

    KIND: ClassVar[EntryKind] = EntryKind.RUN_START
    run_id: bytes
    config_digest: bytes
    roster_digest: bytes
    initial_model_digest: bytes
    code_version: str
    started_at_ms: int
    planned_rounds: int = 0

    def __post_init__(self) -> None:
        if len(self.run_id) != RUN_ID_BYTES:
            raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes")
        for name in ("config_digest", "roster_digest", "initial_model_digest"):
            _check_digest(name, getattr(self, name))

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).fixed(self.config_digest, DIGEST_BYTES)
        w.fixed(self.roster_digest, DIGEST_BYTES).fixed(self.initial_model_digest, DIGEST_BYTES)
        w.text(self.code_version).u64(self.started_at_ms).u32(self.planned_rounds)

    @classmethod
    def _decode(cls, r: _Cursor) -> RunStart:
        return cls(
            r.fixed(RUN_ID_BYTES),
            r.fixed(DIGEST_BYTES),
            r.fixed(DIGEST_BYTES),
            r.fixed(DIGEST_BYTES),
            r.text(_MAX_TEXT),
            r.u64(),
            r.u32(),
        )


@dataclass(frozen=True, slots=True)
class RosterChange:
    """Enrol a site (key + approved dataset roots), replace its roots, or revoke it."""

    KIND: ClassVar[EntryKind] = EntryKind.ROSTER_CHANGE
    action: RosterAction
    site: str
    public_key_der: bytes = b""
    approved_roots: tuple[bytes, ...] = ()
    reason: str = ""
    at_ms: int = 0

    def __post_init__(self) -> None:
        if not self.site:
            raise ValueError("site must be non-empty")
        _check_digests("approved root", self.approved_roots)
        _check_sorted_unique(self.approved_roots, "approved_roots")
        if (self.action == RosterAction.ENROL) != bool(self.public_key_der):
            raise ValueError("an enrolment (and only an enrolment) carries a public key")

    def _encode(self, w: Writer) -> None:
        w.u8(int(self.action)).text(self.site).blob(self.public_key_der)
        w.count(len(self.approved_roots))
        for root in self.approved_roots:
            w.fixed(root, DIGEST_BYTES)
        w.text(self.reason).u64(self.at_ms)

    @classmethod
    def _decode(cls, r: _Cursor) -> RosterChange:
        action = _enum(RosterAction, r.u8(), "roster action")
        site = r.text(_MAX_TEXT)
        der = r.blob(_MAX_KEY)
        roots = tuple(r.fixed(DIGEST_BYTES) for _ in range(r.count(_MAX_LIST)))
        return cls(action, site, der, roots, r.text(_MAX_TEXT), r.u64())


@dataclass(frozen=True, slots=True)
class EnvelopeRecord:
    """A protocol envelope the coordinator received, accepted or rejected (with the reason).

    ``payload`` and ``signature`` are verbatim; the other fields are what the coordinator
    decoded (``None`` where a message type has no such field).
    """

    KIND: ClassVar[EntryKind] = EntryKind.ENVELOPE
    run_id: bytes
    round: int
    stage: str
    site: str
    message_type: str
    signer_key_id: bytes
    accepted: bool
    reason: str
    payload: bytes
    signature: bytes
    dataset_root: bytes | None = None
    bulk_digest: bytes | None = None
    num_examples: int | None = None
    model_digest: bytes | None = None

    def __post_init__(self) -> None:
        # Inlined digest checks: the verifier builds one record per envelope entry.
        if len(self.run_id) != RUN_ID_BYTES:
            raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes")
        if type(self.signer_key_id) is not bytes or len(self.signer_key_id) != DIGEST_BYTES:
            _check_digest("signer_key_id", self.signer_key_id)
        for name, value in (
            ("dataset_root", self.dataset_root),
            ("bulk_digest", self.bulk_digest),
            ("model_digest", self.model_digest),
        ):
            if value is not None and (type(value) is not bytes or len(value) != DIGEST_BYTES):
                _check_digest(name, value, optional=True)
        if not self.message_type:
            raise ValueError("message_type must be non-empty")
        if self.accepted == bool(self.reason):
            raise ValueError("a rejected envelope needs a reason; an accepted one has none")

    @property
    def content_digest(self) -> bytes:
        """``signed_content_digest(message_type, payload)``: the input's identity."""
        digest: bytes = signed_content_digest(self.message_type, self.payload)
        return digest

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).u32(self.round).text(self.stage).text(self.site)
        w.text(self.message_type).fixed(self.signer_key_id, DIGEST_BYTES)
        w.u8(1 if self.accepted else 0).text(self.reason)
        w.blob(self.payload).blob(self.signature)
        _opt_digest(w, self.dataset_root)
        _opt_digest(w, self.bulk_digest)
        if self.num_examples is None:
            w.u8(0)
        else:
            w.u8(1).u64(self.num_examples)
        _opt_digest(w, self.model_digest)

    @classmethod
    def _decode(cls, r: _Cursor) -> EnvelopeRecord:
        run_id, rnd = r.fixed(RUN_ID_BYTES), r.u32()
        stage, site, mtype = r.text(_MAX_TEXT), r.text(_MAX_TEXT), r.text(_MAX_TEXT)
        signer = r.fixed(DIGEST_BYTES)
        accepted = _bool(r.u8())
        reason = r.text(_MAX_TEXT)
        payload, signature = r.blob(_MAX_PAYLOAD), r.blob(_MAX_SIGNATURE)
        root, bulk = _read_opt_digest(r), _read_opt_digest(r)
        flag = r.u8()
        if flag not in (0, 1):
            raise DecodeError("audit entry: bad optional-field flag")
        examples = r.u64() if flag else None
        model = _read_opt_digest(r)
        return cls(
            run_id, rnd, stage, site, mtype, signer, accepted, reason, payload, signature,
            root, bulk, examples, model,
        )  # fmt: skip


_ENV_LAYOUTS: dict[tuple[int, int, int, int], struct.Struct] = {}
"""``struct`` layouts of envelope entries from the run id to the reason (after version and
kind), keyed by the lengths of their four texts (a log has few combinations)."""
_ENVELOPE_PREFIX = bytes([ENTRY_VERSION, EntryKind.ENVELOPE])  # version and kind bytes
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

    Only for :func:`_decode_envelope_fast`, which establishes every ``__post_init__`` rule
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


def _decode_envelope_fast(b: bytes) -> EnvelopeRecord | None:
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
            l1 > _MAX_TEXT
            or l2 > _MAX_TEXT
            or l3 > _MAX_TEXT
            or l4 > _MAX_TEXT
            or not l3
            or l5 > _MAX_PAYLOAD
            or l6 > _MAX_SIGNATURE
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


def metric_to_micros(value: float) -> int:
    """Fixed-point encoding of a metric (millionths), since entries hold no floats.

    Raises:
        ValueError: If the value is not finite or out of the signed 64-bit range.
    """
    if not math.isfinite(value):
        raise ValueError("metrics must be finite")
    micros = round(value * 1_000_000)
    if not -(1 << 63) <= micros < 1 << 63:
        raise ValueError("metric out of range")
    return micros


def _check_metrics(metrics: Sequence[tuple[str, int]]) -> None:
    _check_sorted_unique([n.encode() for n, _ in metrics], "metrics")
    for name, value in metrics:
        if not name or len(name.encode()) > _MAX_METRIC_NAME:
            raise ValueError("metric names must be 1 to 64 bytes")
        if not -(1 << 63) <= value < 1 << 63:
            raise ValueError("metric out of range")


def _encode_metrics(w: Writer, metrics: Sequence[tuple[str, int]]) -> None:
    w.count(len(metrics))
    for name, value in metrics:
        w.text(name).u64(value & 0xFFFF_FFFF_FFFF_FFFF)


def _decode_metrics(r: _Cursor) -> tuple[tuple[str, int], ...]:
    metrics = []
    for _ in range(r.count(_MAX_LIST)):
        name, raw = r.text(_MAX_METRIC_NAME), r.u64()
        metrics.append((name, raw - (1 << 64) if raw >> 63 else raw))
    return tuple(metrics)


def _metric_items(metrics: Mapping[str, float] | None) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((k, metric_to_micros(v)) for k, v in (metrics or {}).items()))


@dataclass(frozen=True, slots=True)
class RoundResult:
    """A round's outcome: survivors, the exact accepted inputs, aggregate and new model."""

    KIND: ClassVar[EntryKind] = EntryKind.ROUND_RESULT
    run_id: bytes
    round: int
    status: RoundStatus
    base_model_digest: bytes
    survivors: tuple[str, ...]
    accepted_input_digests: tuple[bytes, ...]
    aggregate_digest: bytes | None
    new_model_digest: bytes
    reason: str = ""
    metrics: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _check_digest("base_model_digest", self.base_model_digest)
        _check_digest("new_model_digest", self.new_model_digest)
        _check_digest("aggregate_digest", self.aggregate_digest, optional=True)
        _check_digests("accepted input digest", self.accepted_input_digests)
        _check_sorted_unique(self.accepted_input_digests, "accepted_input_digests")
        _check_sorted_unique([s.encode() for s in self.survivors], "survivors")  # site_sort_key
        _check_metrics(self.metrics)

    @property
    def metric_values(self) -> dict[str, float]:
        """Metrics as floats (from millionths)."""
        return {name: micros / 1_000_000 for name, micros in self.metrics}

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).u32(self.round).u8(int(self.status))
        w.fixed(self.base_model_digest, DIGEST_BYTES)
        w.count(len(self.survivors))
        for s in self.survivors:
            w.text(s)
        w.count(len(self.accepted_input_digests))
        for d in self.accepted_input_digests:
            w.fixed(d, DIGEST_BYTES)
        _opt_digest(w, self.aggregate_digest)
        w.fixed(self.new_model_digest, DIGEST_BYTES).text(self.reason)
        _encode_metrics(w, self.metrics)

    @classmethod
    def _decode(cls, r: _Cursor) -> RoundResult:
        run_id, rnd = r.fixed(RUN_ID_BYTES), r.u32()
        status = _enum(RoundStatus, r.u8(), "round status")
        base = r.fixed(DIGEST_BYTES)
        survivors = r.texts(r.count(_MAX_LIST), _MAX_TEXT)
        digests = r.digests(r.count(_MAX_LIST))
        agg = _read_opt_digest(r)
        new, reason = r.fixed(DIGEST_BYTES), r.text(_MAX_TEXT)
        metrics = _decode_metrics(r)
        return cls(run_id, rnd, status, base, survivors, digests, agg, new, reason, metrics)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint file written after ``round`` holding the model ``model_digest``."""

    KIND: ClassVar[EntryKind] = EntryKind.CHECKPOINT
    run_id: bytes
    round: int
    model_digest: bytes
    file_digest: bytes
    name: str

    def __post_init__(self) -> None:
        _check_digest("model_digest", self.model_digest)
        _check_digest("file_digest", self.file_digest)

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).u32(self.round)
        w.fixed(self.model_digest, DIGEST_BYTES).fixed(self.file_digest, DIGEST_BYTES)
        w.text(self.name)

    @classmethod
    def _decode(cls, r: _Cursor) -> Checkpoint:
        return cls(
            r.fixed(RUN_ID_BYTES), r.u32(), r.fixed(DIGEST_BYTES), r.fixed(DIGEST_BYTES),
            r.text(_MAX_TEXT),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The federated evaluation of a round's new global model: aggregated metrics, signed.

    The coordinator logs a round's result (and signs a tree head) *before* the new model leaves
    it for evaluation (the commit order), so the evaluation cannot ride in the
    :class:`RoundResult`: it is this separate entry, written once the evaluation replies are
    aggregated, after the round's result and checkpoint and before the next round's result (or
    the run end), whose tree head then covers it. A round whose evaluation got no usable reply
    has none.

    ``metrics`` are the aggregated metrics in millionths (:func:`metric_to_micros`), sorted by
    name: ``accuracy``, ``loss`` and ``macro-f1`` (example-weighted means over the sites);
    ``num_examples`` is the number of evaluation examples they cover and ``sites`` the sites
    whose replies were aggregated. ``model_digest`` names the model evaluated: the round's new
    model.
    """

    KIND: ClassVar[EntryKind] = EntryKind.EVALUATION
    run_id: bytes
    round: int
    model_digest: bytes
    num_examples: int
    sites: tuple[str, ...]
    metrics: tuple[tuple[str, int], ...]
    at_ms: int = 0

    def __post_init__(self) -> None:
        if len(self.run_id) != RUN_ID_BYTES:
            raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes")
        _check_digest("model_digest", self.model_digest)
        _check_sorted_unique([s.encode() for s in self.sites], "sites")
        if any(not s for s in self.sites):
            raise ValueError("site ids must be non-empty")
        _check_metrics(self.metrics)

    @property
    def metric_values(self) -> dict[str, float]:
        """Metrics as floats (from millionths)."""
        return {name: micros / 1_000_000 for name, micros in self.metrics}

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).u32(self.round)
        w.fixed(self.model_digest, DIGEST_BYTES).u64(self.num_examples)
        w.count(len(self.sites))
        for s in self.sites:
            w.text(s)
        _encode_metrics(w, self.metrics)
        w.u64(self.at_ms)

    @classmethod
    def _decode(cls, r: _Cursor) -> Evaluation:
        run_id, rnd = r.fixed(RUN_ID_BYTES), r.u32()
        model, examples = r.fixed(DIGEST_BYTES), r.u64()
        sites = r.texts(r.count(_MAX_LIST), _MAX_TEXT)
        metrics = _decode_metrics(r)
        return cls(run_id, rnd, model, examples, sites, metrics, r.u64())


@dataclass(frozen=True, slots=True)
class RunEnd:
    """The run ends (completed or aborted) with the final global model."""

    KIND: ClassVar[EntryKind] = EntryKind.RUN_END
    run_id: bytes
    status: RunStatus
    final_round: int
    final_model_digest: bytes
    ended_at_ms: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_digest("final_model_digest", self.final_model_digest)

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).u8(int(self.status)).u32(self.final_round)
        w.fixed(self.final_model_digest, DIGEST_BYTES).u64(self.ended_at_ms).text(self.reason)

    @classmethod
    def _decode(cls, r: _Cursor) -> RunEnd:
        return cls(
            r.fixed(RUN_ID_BYTES), _enum(RunStatus, r.u8(), "run status"), r.u32(),
            r.fixed(DIGEST_BYTES), r.u64(), r.text(_MAX_TEXT),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConsortiumRosterRecord:
    """The consortium roster the sites run under, exactly as its roster authority signed it.

    ``payload`` and ``signature`` are the authority's signed bytes and signature verbatim
    (:func:`fedseal.protocol.consortium.encode_roster`, message type
    :data:`~fedseal.protocol.consortium.ROSTER_TYPE`); ``authority_key_der`` is the authority's
    public key the coordinator verified it under. ``consortium``, ``version`` and
    ``roster_digest`` (SHA-256 of ``payload``) repeat what the payload says, for readers that do
    not decode it; a record whose payload does not decode or disagrees with them is refused.
    An auditor re-verifies it offline with :meth:`signed` and the authority's public key::

        roster = record.signed().verify(pinned_authority_key)

    Not run-scoped: the roster in force for a run is the latest one logged before its round.
    """

    KIND: ClassVar[EntryKind] = EntryKind.CONSORTIUM_ROSTER
    consortium: str
    version: int
    roster_digest: bytes
    payload: bytes
    signature: bytes
    authority_key_der: bytes
    at_ms: int = 0

    def __post_init__(self) -> None:
        _check_digest("roster_digest", self.roster_digest)
        for name in ("payload", "signature", "authority_key_der"):
            if type(getattr(self, name)) is not bytes:
                raise ValueError(f"{name} must be bytes")
        if not 8 <= len(self.signature) <= MAX_SIGNATURE_SIZE:
            raise ValueError(f"signature must be 8 to {MAX_SIGNATURE_SIZE} bytes")
        if not hmac.compare_digest(hashlib.sha256(self.payload).digest(), self.roster_digest):
            raise ValueError("roster_digest is not the SHA-256 of the signed roster bytes")
        try:
            roster = decode_roster(self.payload)
        except RosterFormatError as exc:
            raise ValueError(
                f"the signed consortium roster does not decode: {exc.message}"
            ) from exc
        if roster.consortium != self.consortium or roster.version != self.version:
            raise ValueError(
                "consortium or version differ from the signed roster "
                f"({roster.consortium!r} version {roster.version})"
            )
        try:
            public_key_from_der(self.authority_key_der)
        except CryptoError as exc:
            raise ValueError("authority_key_der is not a canonical P-256 public key") from exc

    @property
    def authority_key_id(self) -> bytes:
        """Key id (SHA-256 of the DER public key) of the roster authority."""
        return hashlib.sha256(self.authority_key_der).digest()

    @property
    def roster(self) -> ConsortiumRoster:
        """The decoded roster (*unverified*: use :meth:`signed` and ``verify`` to trust it)."""
        return decode_roster(self.payload)

    def signed(self) -> SignedConsortiumRoster:
        """The signed roster, as the authority issued it (``.to_json()`` gives its roster file)."""
        return SignedConsortiumRoster(self.roster, self.signature, self.authority_key_id)

    def _encode(self, w: Writer) -> None:
        w.text(self.consortium).u64(self.version).fixed(self.roster_digest, DIGEST_BYTES)
        w.blob(self.payload).blob(self.signature).blob(self.authority_key_der).u64(self.at_ms)

    @classmethod
    def _decode(cls, r: _Cursor) -> ConsortiumRosterRecord:
        consortium, version = r.text(MAX_CONSORTIUM_NAME_BYTES), r.u64()
        digest, payload = r.fixed(DIGEST_BYTES), r.blob(_MAX_CONSORTIUM_ROSTER)
        signature, der = r.blob(MAX_SIGNATURE_SIZE), r.blob(_MAX_KEY)
        return cls(consortium, version, digest, payload, signature, der, r.u64())


AuditEntry = (
    Genesis
    | RunStart
    | RosterChange
    | EnvelopeRecord
    | RoundResult
    | Checkpoint
    | RunEnd
    | ConsortiumRosterRecord
    | Evaluation
)
_CLASSES: dict[EntryKind, type[AuditEntry]] = {
    c.KIND: c
    for c in (
        Genesis,
        RunStart,
        RosterChange,
        EnvelopeRecord,
        RoundResult,
        Checkpoint,
        RunEnd,
        ConsortiumRosterRecord,
        Evaluation,
    )
}
_CLASSES_BY_TAG: dict[int, type[AuditEntry]] = {int(k): c for k, c in _CLASSES.items()}


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError as exc:
        raise DecodeError(f"audit entry: unknown {what} {value}") from exc


def _bool(value: int) -> bool:
    if value not in (0, 1):
        raise DecodeError("audit entry: bad boolean")
    return value == 1


def entry_tags(entry: AuditEntry) -> tuple[int, str | None, int | None]:
    """The store's index columns ``(kind, site, round)`` for an entry, as :class:`AuditLog`
    writes them and :meth:`AuditVerifier.verify_store` requires them.

    ``site`` is set for roster changes and envelopes, ``round`` for envelopes, round results,
    checkpoints and evaluations; every other tag is ``NULL``.
    """
    kind = int(entry.KIND)
    if isinstance(entry, EnvelopeRecord):
        return kind, entry.site, entry.round
    if isinstance(entry, RosterChange):
        return kind, entry.site, None
    if isinstance(entry, RoundResult | Checkpoint | Evaluation):
        return kind, None, entry.round
    return kind, None, None


def encode_entry(entry: AuditEntry) -> bytes:
    """Canonical bytes of an entry: ``u8 version | u8 kind | body``."""
    w = Writer().u8(ENTRY_VERSION).u8(int(entry.KIND))
    entry._encode(w)
    return w.to_bytes()


def _encode_checked(entry: AuditEntry) -> bytes:
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
    if type(data) is bytes and data[:2] == _ENVELOPE_PREFIX:
        fast = _decode_envelope_fast(data)
        if fast is not None:
            return fast
    r = _Cursor(data)
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


# --- signed tree heads and signed service requests -----------------------------------------


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A tree head signed by the coordinator (see the module docstring for the bytes)."""

    log_id: bytes
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    signature: bytes

    def payload(self) -> bytes:
        """The signed bytes."""
        w = Writer().fixed(self.log_id, LOG_ID_BYTES).u64(self.tree_size)
        return w.fixed(self.root_hash, DIGEST_BYTES).u64(self.timestamp_ms).to_bytes()

    def to_bytes(self) -> bytes:
        """Canonical encoding: payload then the ``u32``-prefixed DER signature."""
        return Writer().raw(self.payload()).blob(self.signature).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedTreeHead:
        """Decode (not verify) a tree head.

        Raises:
            DecodeError: Malformed bytes.
        """
        r = Reader(data, what="signed tree head")
        head = cls(
            r.fixed(LOG_ID_BYTES), r.u64(), r.fixed(DIGEST_BYTES), r.u64(), r.blob(_MAX_SIGNATURE)
        )
        r.finish()
        return head

    @classmethod
    def create(
        cls,
        key: ec.EllipticCurvePrivateKey,
        *,
        log_id: bytes,
        tree_size: int,
        root_hash: bytes,
        timestamp_ms: int,
    ) -> SignedTreeHead:
        """Sign a tree head with the coordinator's key."""
        unsigned = cls(log_id, tree_size, root_hash, timestamp_ms, b"")
        return cls(
            log_id,
            tree_size,
            root_hash,
            timestamp_ms,
            sign(key, TREE_HEAD_TYPE, unsigned.payload()),
        )

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Check the coordinator's signature.

        Raises:
            BadSignatureError: If it does not verify.
        """
        try:
            verify(public_key, TREE_HEAD_TYPE, self.payload(), self.signature)
        except SignatureError as exc:
            raise BadSignatureError("tree head signature does not verify") from exc


def audit_request_payload(
    method: str, site: str, timestamp_ms: int, nonce: bytes, params: bytes
) -> bytes:
    """Canonical bytes a site signs (type :data:`AUDIT_REQUEST_TYPE`) to call the audit service.

    ``params`` is :func:`audit_request_params` of the request; ``nonce`` is 16 fresh random
    bytes.
    """
    w = Writer().text(method).text(site).u64(timestamp_ms).fixed(nonce, 16).blob(params)
    return w.to_bytes()


AUDIT_METHODS = (
    "GetTreeHead",
    "GetInclusionProof",
    "GetConsistencyProof",
    "GetEntries",
    "FindMyInput",
    "FindModel",
)
"""The audit service's methods (``fedseal.audit.v1.AuditLog``)."""


def audit_request_params(
    method: str, a: int = 0, b: int = 0, run_id: bytes = b"", model_digest: bytes = b""
) -> bytes:
    """Canonical parameter bytes of an audit-service request (signed with the request).

    ``GetTreeHead``: none; ``GetInclusionProof``: ``u64 leaf_index | u64 tree_size``;
    ``GetConsistencyProof``: ``u64 old_size | u64 new_size``; ``GetEntries``:
    ``u64 start | u64 end``; ``FindMyInput``: ``u32 round | run_id`` (``a`` is the round);
    ``FindModel``: ``blob run_id | blob model_digest`` (length-prefixed: the service checks
    the lengths after authenticating the request).

    Raises:
        ValueError: For an unknown method or out-of-range values.
    """
    if method == "GetTreeHead":
        return b""
    if method in ("GetInclusionProof", "GetConsistencyProof", "GetEntries"):
        return Writer().u64(a).u64(b).to_bytes()
    if method == "FindMyInput":
        return Writer().u32(a).raw(run_id).to_bytes()
    if method == "FindModel":
        return Writer().blob(run_id).blob(model_digest).to_bytes()
    raise ValueError(f"unknown audit method {method!r}")


# --- shared semantics (the verifier's, and the coordinator's guard rails) -----------------


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
SignatureBatchSubmit = Callable[[Sequence[SignatureJob]], Callable[[], "JobFailure | None"]]
"""Starts checking a batch; returns a function that waits for and returns its first failure."""


def _ready(result: JobFailure | None) -> Callable[[], JobFailure | None]:
    return lambda: result


"""Checks a batch of jobs in order; returns the first failure, or None. Pure per job, so an
implementation may split a batch across processes (see ``fl-audit verify --jobs``)."""


_KEY_CACHE: dict[bytes, ec.EllipticCurvePublicKey] = {}
_KEY_CACHE_MAX = 4096


def _cached_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
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
                key = _cached_public_key(job.public_key_der)
            verify(key, rec.message_type, rec.payload, rec.signature)
        except CryptoError:
            return JobFailure(
                pos,
                "signature",
                f"site signature over the {rec.message_type} payload does not verify",
            )
        try:
            _cross_check(rec)
        except _Fail as exc:
            return JobFailure(pos, exc.check, exc.detail)
    return None


MAX_EVALUATION_EXAMPLES = 10**12
"""The most evaluation examples an :class:`Evaluation` may claim (a sanity bound)."""


@dataclass(slots=True)
class _Site:
    key_der: bytes
    key_id: bytes
    roots: frozenset[bytes]
    active: bool


@dataclass(slots=True)
class _Run:
    run_id: bytes
    start_index: int
    last_round: int = 0
    model: bytes = b""
    models: dict[int, bytes] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)
    seen: set[bytes] = field(default_factory=set)
    rounds_completed: int = 0
    rounds_failed: int = 0
    last_status: RoundStatus | None = None
    evaluated: int = 0  # the last round whose evaluation is logged


class _Fail(Exception):
    def __init__(self, check: str, detail: str) -> None:
        super().__init__(detail)
        self.check = check
        self.detail = detail


class _Semantics:
    """The run's rules, applied entry by entry (see :class:`AuditVerifier`)."""

    def __init__(
        self,
        trusted_roster: Roster | None = None,
        *,
        inline_checks: bool = True,
        consortium_authority: bytes | None = None,
    ) -> None:
        self.inline_checks = inline_checks  # cross-check payloads here (else in the jobs)
        self.genesis: Genesis | None = None
        self.authority = consortium_authority  # pinned roster authority key (DER), if any
        self.consortia: dict[str, ConsortiumRosterRecord] = {}  # latest roster per consortium
        self.last_consortium: ConsortiumRosterRecord | None = None
        self.sites: dict[str, _Site] = {}
        self.run: _Run | None = None
        self.run_ids: set[bytes] = set()
        self.trusted = trusted_roster
        self.runs: list[tuple[bytes, RunStatus | None, int, int, int]] = []
        self.accepted = 0
        self.rejected = 0

    def roster(self) -> Roster:
        return Roster(
            RosterEntry.from_der(s, v.key_der, v.roots, active=v.active)
            for s, v in self.sites.items()
        )

    def apply(
        self, index: int, entry: AuditEntry, *, replay: bool = False, data: bytes = b""
    ) -> SignatureJob | None:
        if index == 0 and not isinstance(entry, Genesis):
            raise _Fail("genesis", "entry 0 must be the log's genesis entry")
        if isinstance(entry, Genesis):
            if index != 0:
                raise _Fail("genesis", "a second genesis entry")
            try:
                public_key_from_der(entry.coordinator_key_der)
            except CryptoError as exc:
                raise _Fail("coordinator-key", "genesis holds an invalid coordinator key") from exc
            self.genesis = entry
            return None
        if isinstance(entry, RosterChange):
            self._roster_change(entry)
            return None
        if isinstance(entry, RunStart):
            self._run_start(index, entry)
            return None
        if isinstance(entry, ConsortiumRosterRecord):
            self._consortium_roster(entry, replay=replay)
            return None
        if isinstance(entry, EnvelopeRecord):
            return self.envelope(index, entry, data, replay=replay)
        run = self._open_run(entry.run_id)
        if isinstance(entry, RoundResult):
            self._round_result(run, entry, replay=replay)
        elif isinstance(entry, Checkpoint):
            want = run.models.get(entry.round)
            if want is None:
                raise _Fail(
                    "checkpoint", f"checkpoint of round {entry.round}, which has no model yet"
                )
            if entry.model_digest != want:
                raise _Fail(
                    "checkpoint", f"checkpoint model differs from round {entry.round}'s model"
                )
        elif isinstance(entry, Evaluation):
            self._evaluation(run, entry)
        else:
            if entry.final_round != run.last_round:
                raise _Fail(
                    "run-end",
                    f"run ends at round {entry.final_round}, last round was {run.last_round}",
                )
            if entry.final_model_digest != run.model:
                raise _Fail("model-chain", "final model digest differs from the last round's model")
            self.runs.append(
                (run.run_id, entry.status, run.rounds_completed, run.rounds_failed, run.start_index)
            )
            self.run = None
        return None

    def _open_run(self, run_id: bytes) -> _Run:
        run = self.run
        if run is None:
            raise _Fail("outside-run", "run-scoped entry while no run is open")
        if run_id != run.run_id:
            raise _Fail("run-id", "entry names another run than the open one")
        return run

    def envelope(
        self, index: int, entry: EnvelopeRecord, data: bytes = b"", *, replay: bool = False
    ) -> SignatureJob | None:
        """:meth:`apply` for an envelope entry (the verifier's hot path calls it directly)."""
        run = self.run
        if index == 0 or run is None or entry.run_id != run.run_id:
            if index == 0:
                raise _Fail("genesis", "entry 0 must be the log's genesis entry")
            run = self._open_run(entry.run_id)  # raises the precise failure
        return self._envelope(index, run, entry, replay=replay, data=data)

    def _roster_change(self, entry: RosterChange) -> None:
        current = self.sites.get(entry.site)
        if entry.action == RosterAction.ENROL:
            if current is not None and current.active:
                raise _Fail("roster", f"site {entry.site!r} enrolled twice")
            try:
                kid = bytes(key_id(public_key_from_der(entry.public_key_der)))
            except CryptoError as exc:
                raise _Fail("roster", f"site {entry.site!r} enrolled with an invalid key") from exc
            if any(s.key_id == kid for name, s in self.sites.items() if name != entry.site):
                raise _Fail("roster", f"site {entry.site!r} enrolled with another site's key")
            if self.trusted is not None:
                t = self.trusted.get(SiteId(entry.site))
                if t is None or t.key_id != kid:
                    raise _Fail(
                        "trusted-roster",
                        f"site {entry.site!r}'s key is not the one in the trusted roster",
                    )
            self.sites[entry.site] = _Site(
                entry.public_key_der, kid, frozenset(entry.approved_roots), True
            )
            return
        if current is None or not current.active:
            raise _Fail("roster", f"roster change for site {entry.site!r}, which is not enrolled")
        if entry.action == RosterAction.SET_ROOTS:
            current.roots = frozenset(entry.approved_roots)
        else:
            current.active = False

    def _consortium_roster(self, entry: ConsortiumRosterRecord, *, replay: bool) -> None:
        what = f"consortium roster {entry.consortium!r} version {entry.version}"
        if self.authority is not None and entry.authority_key_der != self.authority:
            raise _Fail(
                "consortium-authority",
                f"{what} is signed by authority key {entry.authority_key_id.hex()[:16]}…, "
                "not by the pinned roster authority",
            )
        if not replay:
            try:
                key = _cached_public_key(entry.authority_key_der)
                verify(key, ROSTER_TYPE, entry.payload, entry.signature)
            except CryptoError as exc:
                raise _Fail(
                    "consortium-signature",
                    f"{what}: the authority's signature does not verify under the authority key "
                    "recorded with it",
                ) from exc
        previous = self.consortia.get(entry.consortium)
        if previous is not None:
            if entry.version < previous.version:
                raise _Fail(
                    "consortium-version",
                    f"{what} follows version {previous.version}: roster versions never go down",
                )
            if entry.version == previous.version and entry.roster_digest != previous.roster_digest:
                raise _Fail(
                    "consortium-version",
                    f"{what} differs from the roster logged earlier with the same version",
                )
        self.consortia[entry.consortium] = entry
        self.last_consortium = entry

    def _run_start(self, index: int, entry: RunStart) -> None:
        if self.run is not None:
            raise _Fail("run-start", "a run starts while another is open")
        if entry.run_id in self.run_ids:
            raise _Fail("run-start", "run id reused")
        if entry.roster_digest != self.roster().digest():
            raise _Fail("roster-digest", "run start's roster digest differs from the log's roster")
        self.run_ids.add(entry.run_id)
        self.run = _Run(entry.run_id, index, model=entry.initial_model_digest)
        self.run.models[0] = entry.initial_model_digest

    def _envelope(
        self, index: int, run: _Run, e: EnvelopeRecord, *, replay: bool, data: bytes
    ) -> SignatureJob | None:
        if not e.accepted:
            self.rejected += 1
            return None
        self.accepted += 1
        if e.round != run.last_round + 1:
            raise _Fail(
                "round-order",
                f"accepted envelope for round {e.round} while round {run.last_round + 1} is open",
            )
        site = self.sites.get(e.site)
        if site is None:
            raise _Fail(
                "not-enrolled", f"accepted envelope from site {e.site!r}, which is not enrolled"
            )
        if not site.active:
            raise _Fail("revoked", f"accepted envelope from revoked site {e.site!r}")
        if e.signer_key_id != site.key_id:
            raise _Fail("signer", f"accepted envelope signed by a key that is not {e.site!r}'s")
        trusted = None
        if self.trusted is not None:
            trusted = self.trusted.get(SiteId(e.site))
            if trusted is None or not trusted.active or trusted.key_id != site.key_id:
                raise _Fail(
                    "trusted-roster",
                    f"site {e.site!r} is not active with this key in the trusted roster",
                )
        digest = e.content_digest
        if digest in run.seen:
            raise _Fail("duplicate", "the same signed content was accepted twice")
        run.seen.add(digest)
        if self.inline_checks and not replay:
            _cross_check(e)
        if e.model_digest is not None and e.model_digest != run.model:
            raise _Fail("model-chain", "envelope was made from another model than the round's")
        if e.message_type == INPUT_MESSAGE_TYPE:
            if (
                e.dataset_root is None
                or e.bulk_digest is None
                or e.num_examples is None
                or e.model_digest is None
            ):
                raise _Fail(
                    "input-fields",
                    "accepted input lacks dataset root, bulk digest, example count or model digest",
                )
            if e.dataset_root not in site.roots:
                raise _Fail("dataset-root", f"dataset root not approved for {e.site!r}")
            if trusted is not None and e.dataset_root not in trusted.approved_roots:
                raise _Fail(
                    "trusted-roster",
                    f"dataset root not approved for {e.site!r} in the trusted roster",
                )
            if e.site in run.inputs:
                raise _Fail(
                    "duplicate", f"second accepted input from {e.site!r} in round {e.round}"
                )
            run.inputs[e.site] = digest
        return SignatureJob(index, site.key_der, e, data)

    def _round_result(self, run: _Run, e: RoundResult, *, replay: bool) -> None:
        if e.round != run.last_round + 1:
            raise _Fail(
                "round-order", f"result of round {e.round} where round {run.last_round + 1} was due"
            )
        if e.base_model_digest != run.model:
            raise _Fail(
                "model-chain",
                f"round {e.round} starts from another model than round {run.last_round}'s",
            )
        if not replay:
            want_digests = tuple(sorted(run.inputs.values()))
            want_sites = tuple(sorted(run.inputs, key=site_sort_key))
            if e.accepted_input_digests != want_digests:
                raise _Fail(
                    "aggregate-inputs",
                    "the aggregate's inputs differ from the accepted input envelopes",
                )
            if e.survivors != want_sites:
                raise _Fail(
                    "survivors", "survivor set differs from the sites whose inputs were accepted"
                )
        if e.status == RoundStatus.COMPLETED:
            if e.aggregate_digest is None or not e.survivors:
                raise _Fail("round-result", "a completed round needs an aggregate and survivors")
            run.rounds_completed += 1
        else:
            if e.aggregate_digest is not None or e.new_model_digest != e.base_model_digest:
                raise _Fail(
                    "round-result",
                    "a failed round must leave the model unchanged, without aggregate",
                )
            run.rounds_failed += 1
        run.last_round = e.round
        run.last_status = e.status
        run.model = e.new_model_digest
        run.models[e.round] = e.new_model_digest
        run.inputs = {}

    def _evaluation(self, run: _Run, e: Evaluation) -> None:
        if e.round != run.last_round or e.round == 0:
            raise _Fail(
                "evaluation",
                f"evaluation of round {e.round} after round {run.last_round}'s result "
                "(only the last round's new model is evaluated, before the next round ends)",
            )
        if run.last_status != RoundStatus.COMPLETED:
            raise _Fail("evaluation", f"evaluation of round {e.round}, which failed")
        if run.evaluated == e.round:
            raise _Fail("evaluation", f"a second evaluation of round {e.round}")
        if e.model_digest != run.model:
            raise _Fail("model-chain", f"the evaluated model is not round {e.round}'s new model")
        for site in e.sites:
            if site not in self.sites:
                raise _Fail(
                    "not-enrolled", f"evaluation counts site {site!r}, which is not enrolled"
                )
            if not self.sites[site].active:
                raise _Fail("evaluation", f"evaluation counts site {site!r}, which is revoked")
        if not e.sites:
            raise _Fail("evaluation", f"evaluation of round {e.round} names no site")
        if e.num_examples > MAX_EVALUATION_EXAMPLES:
            raise _Fail(
                "evaluation",
                f"evaluation of round {e.round} claims {e.num_examples} examples (more than "
                f"{MAX_EVALUATION_EXAMPLES})",
            )
        values = dict(e.metrics)
        for name in ("accuracy", "macro-f1"):
            if name in values and not 0 <= values[name] <= 1_000_000:
                raise _Fail(
                    "evaluation",
                    f"evaluation of round {e.round}: {name} {values[name] / 1e6} is outside [0, 1]",
                )
        if "loss" in values and values["loss"] < 0:
            raise _Fail(
                "evaluation", f"evaluation of round {e.round}: loss {values['loss'] / 1e6} < 0"
            )
        run.evaluated = e.round


# A payload header opens with run id (16), u32 round, u16 sender length; after its two texts a
# MaskedInput has model, setup, root, count, length, bits, clipped, bulk.
_HEADER_START = struct.Struct(">16sIH")
_INPUT_BODY = struct.Struct(">32s32s32sQQBQ32s")
_MAX_SITE_ID = _LIMITS.max_site_id_bytes


def _input_agrees(e: EnvelopeRecord) -> bool:
    """Fast path of :func:`_cross_check` for a masked input (the bulk of every log).

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


def _cross_check(e: EnvelopeRecord) -> None:
    """For protocol message types, the explicit fields must match the decoded payload."""
    if e.message_type == INPUT_MESSAGE_TYPE and _input_agrees(e):
        return
    try:
        kind = _KINDS_BY_TYPE[e.message_type]
    except KeyError:
        return
    try:
        message = decode_payload(kind, e.payload, _LIMITS)
    except ProtocolError as exc:
        raise _Fail("payload-decode", f"accepted {e.message_type} payload does not decode") from exc
    header = message.header
    if header.run_id != e.run_id or header.round != e.round or header.sender != e.site:
        raise _Fail("payload-mismatch", "run id, round or sender differ from the signed payload")
    if e.model_digest is not None and header.model_digest != e.model_digest:
        raise _Fail("payload-mismatch", "model digest differs from the signed payload")
    if isinstance(message, MaskedInput) and (
        message.dataset_root != e.dataset_root
        or message.bulk_digest != e.bulk_digest
        or message.example_count != e.num_examples
    ):
        raise _Fail(
            "payload-mismatch",
            "dataset root, bulk digest or example count differ from the signed payload",
        )


_KINDS_BY_TYPE = {k.type_name: k for k in MessageKind}


# --- the verifier --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedLog:
    """Facts about a log that passed verification.

    Attributes:
        entries: Number of entries checked.
        tree_heads: Number of signed tree heads checked.
        signatures: Number of site signatures checked.
        runs: ``(run_id hex, status or "open", completed rounds, failed rounds)`` per run.
        accepted_envelopes: Accepted envelopes.
        rejected_envelopes: Rejected envelopes.
        root_hash: Root of the whole log.
        warnings: Facts that are not failures (an open run, entries after the last tree head).
        consortium_rosters: ``(consortium, latest version, roster digest hex, authority key id
            hex)`` per consortium whose signed roster the log records.
        coordinator_key_id: Key id (hex) of the coordinator key the tree heads verified under:
            the pinned key, or, without one, the key the log's own genesis entry names.
        coordinator_key_pinned: Whether that key was pinned by the caller (a trust anchor) or
            only taken from the log itself.
        evaluations: Number of evaluation entries (per-round evaluation metrics).
        signed_entries: Entries covered by the largest signed tree head (``[0, signed_entries)``);
            any after it (``entries - signed_entries``) are signed by nobody: anyone who can
            write the file can append them.
        open_run: Whether the last run has not ended (its run end is not in the log).
    """

    entries: int
    tree_heads: int
    signatures: int
    runs: tuple[tuple[str, str, int, int], ...]
    accepted_envelopes: int
    rejected_envelopes: int
    root_hash: bytes
    warnings: tuple[str, ...]
    consortium_rosters: tuple[tuple[str, int, str, str], ...] = ()
    coordinator_key_id: str = ""
    coordinator_key_pinned: bool = False
    evaluations: int = 0
    signed_entries: int = 0
    open_run: bool = False


class AuditVerifier:
    """Offline verification of a whole log.

    Run semantics checked (besides hashes and signatures):

    * entry 0 is the genesis; tree heads verify under its coordinator key (and equal a pinned
      key if one is given);
    * roster: enrol only unenrolled sites with valid, unshared keys (equal to the trusted
      roster's if given); roots replaced / revocations only for active sites;
    * consortium rosters: the signed roster decodes and agrees with the recorded consortium,
      version and digest, its signature verifies under the authority key recorded with it (the
      pinned authority key, if given), and a consortium's version never goes down (the same
      version is always the same roster);
    * runs: a run starts only when none is open, with a fresh run id and the log roster's
      digest; run-scoped entries name the open run;
    * accepted envelopes: for the open round only, from an active enrolled site, signed by its
      enrolled key (signature checked), never the same signed content twice, made from the
      round's model; inputs carry an approved dataset root and come once per site; protocol
      payloads decode and agree with the recorded fields;
    * round results: consecutive rounds (none missing or duplicated), starting from the
      previous model, listing exactly the accepted inputs and their senders; a failed round
      leaves the model unchanged; checkpoints and run ends name the right model;
    * evaluations: at most one per round, of the last round logged, a completed one, naming
      its new model, counting only enrolled sites;
    * a signed tree head covers every round result before the next round's result (or the run
      end) and the run end itself; tree heads never go backwards in size or time.

    Rejected envelopes are evidence of what the coordinator refused (often *because* the
    signature or enrolment was bad): their signatures are not required to verify, and they
    count towards no aggregate.
    """

    def __init__(
        self,
        *,
        coordinator_key: ec.EllipticCurvePublicKey | None = None,
        trusted_roster: Roster | None = None,
        consortium_authority: ec.EllipticCurvePublicKey | None = None,
        check_signatures: SignatureBatchCheck = check_signatures_serial,
        submit_signatures: SignatureBatchSubmit | None = None,
        batch_size: int = 1024,
        max_outstanding: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Args:
        coordinator_key: Pinned coordinator key (else the genesis key is used).
        trusted_roster: Sites' keys and approved roots the log must agree with.
        consortium_authority: Pinned roster authority key: every consortium roster entry
            must be signed by it.
        check_signatures: Checks a batch synchronously (used if ``submit_signatures`` is None).
        submit_signatures: Starts checking a batch and returns a function that waits for
            the result, so signature checks overlap with the in-order semantic checks.
        batch_size: Jobs per batch.
        max_outstanding: Batches in flight before the oldest is awaited.
        progress: Called with the number of entries checked so far.
        """
        self._pinned = coordinator_key
        self._trusted = trusted_roster
        self._authority = (
            None if consortium_authority is None else public_key_to_der(consortium_authority)
        )
        check = check_signatures
        self._submit: SignatureBatchSubmit = submit_signatures or (lambda jobs: _ready(check(jobs)))
        self._batch = batch_size
        self._max_outstanding = max_outstanding
        self._progress = progress

    def run(
        self, entries: Iterable[StoredEntry], tree_heads: Sequence[StoredTreeHead]
    ) -> VerifiedLog:
        """Verify; return facts, or raise naming the first bad place.

        Raises:
            AuditVerificationError: The first failure (lowest entry index).
        """
        return self.run_rows(((e.index, e.data, e.leaf_hash) for e in entries), tree_heads)

    def verify_store(self, store: MerkleLogStore) -> VerifiedLog:
        """Verify the log in ``store`` *and every unsigned copy the store keeps*, i.e. every
        value any reader of the store (look-ups, proofs, ``fl-audit show``) relies on:

        * ``entries``: the ``data`` and ``leaf_hash`` columns are BLOBs, the leaf hash is the
          hash of the data, and the index columns ``kind``, ``site`` and ``round`` are exactly
          :func:`entry_tags` of the decoded entry (types included);
        * ``tree_heads``: ``seq`` runs 1, 2, 3, … (none deleted or renumbered), ``blob`` decodes,
          and ``tree_size``, ``root_hash`` and ``timestamp_ms`` equal the signed values;
        * ``nodes``: every row is the root of a complete subtree of the tree recomputed from the
          entry bytes, under its key, and every such subtree has its row (none missing, edited
          or added).

        A failure names the table, the row and the column.

        Raises:
            AuditVerificationError: The first failure.
            fedseal.audit.store.LogFormatError: The database cannot be read.
        """
        problem = store.integrity_problem()
        if problem is not None:
            raise AuditVerificationError("integrity", problem)
        heads = _check_tree_head_rows(store.tree_head_rows())
        return self.run_rows(store.iter_leaf_rows(raw=True), heads, store=store)

    def run_rows(
        self,
        rows: Iterable[tuple[int, bytes, bytes]],
        tree_heads: Sequence[StoredTreeHead],
        *,
        store: MerkleLogStore | None = None,
    ) -> VerifiedLog:
        """:meth:`run` over plain ``(index, entry bytes, stored leaf hash)`` rows, e.g.
        :meth:`fedseal.audit.store.MerkleLogStore.iter_leaf_rows` (no per-entry objects).

        The stored leaf hash is only compared with the one recomputed from the bytes; the tree
        is always rebuilt from the recomputed hashes. With ``store`` (the store ``rows`` come
        from), its index columns and its ``nodes`` cache are checked too (see
        :meth:`verify_store`, which also checks the tree-head columns).

        Raises:
            AuditVerificationError: The first failure (lowest entry index).
        """
        sem = _Semantics(self._trusted, inline_checks=False, consortium_authority=self._authority)
        index_rows = None if store is None else iter(store.iter_index_rows())
        node_rows: list[Iterator[tuple[int, object]]] = []  # per height - 1, from the store
        evaluations = 0
        heads = _decode_heads(tree_heads)
        by_size: dict[int, list[tuple[int, SignedTreeHead]]] = {}
        for seq, head in heads:
            by_size.setdefault(head.tree_size, []).append((seq, head))
        pending: list[SignatureJob] = []
        signatures = 0
        frontier: list[bytes] = []  # subtree roots of the compact range [0, n), largest first
        n = 0
        coordinator: ec.EllipticCurvePublicKey | None = None
        need_head_after: int | None = None  # index of a round result / run end awaiting an STH
        last_kind = ""

        outstanding: list[tuple[list[SignatureJob], Callable[[], JobFailure | None]]] = []

        def resolve_oldest() -> None:
            nonlocal signatures
            jobs, result = outstanding.pop(0)
            bad = result()
            signatures += len(jobs) if bad is None else bad.position
            if bad is not None:
                outstanding.clear()
                job = jobs[bad.position]
                raise AuditVerificationError(
                    bad.check,
                    bad.detail,
                    index=job.index,
                    entry_type=EntryKind.ENVELOPE.label,
                    site=job.record.site,
                    round=job.record.round,
                )

        def flush(before: int | None, *, resolve: bool) -> None:
            nonlocal pending
            jobs = pending if before is None else [j for j in pending if j.index < before]
            pending = [] if before is None else [j for j in pending if j.index >= before]
            if jobs:
                outstanding.append((jobs, self._submit(jobs)))
            while outstanding and (resolve or len(outstanding) > self._max_outstanding):
                resolve_oldest()

        def fail(
            check: str,
            detail: str,
            index: int | None,
            entry_type: str | None,
            tree_head_seq: int | None = None,
        ) -> NoReturn:
            flush(index, resolve=True)
            raise AuditVerificationError(
                check, detail, index=index, entry_type=entry_type, tree_head_seq=tree_head_seq
            )

        def check_node(source: MerkleLogStore, height: int, k: int, value: bytes) -> None:
            """The stored node of subtree ``k`` at ``height`` (just recomputed) is ``value``."""
            while len(node_rows) < height:
                node_rows.append(iter(source.iter_node_rows(len(node_rows) + 1)))
            want = node_id(height, k)
            what = f"(height {height}, entries [{k << height}, {(k + 1) << height}))"
            row = next(node_rows[height - 1], None)
            if row is None or row[0] > want:
                fail("node-cache", f"nodes row id={want} {what} is missing", None, None)
            if row[0] < want:
                fail(
                    "node-cache",
                    f"nodes row id={row[0]} is not a subtree of the tree (next expected: id={want} "
                    f"{what})",
                    None,
                    None,
                )
            if type(row[1]) is not bytes or not compare(row[1], value):
                fail(
                    "node-cache",
                    f"nodes row id={want} {what}: column hash holds {_sql_repr(row[1])}, not the "
                    "root of those entries recomputed from their bytes",
                    None,
                    None,
                )

        compare = hmac.compare_digest
        batch = self._batch
        progress = self._progress
        envelope = sem.envelope
        for index, data, stored_lh in rows:
            if index != n:
                fail(
                    "missing-entry", f"entry {n} is missing (next stored index is {index})", n, None
                )
            if type(data) is not bytes or type(stored_lh) is not bytes:
                column, value = (
                    ("data", data) if type(data) is not bytes else ("leaf_hash", stored_lh)
                )
                fail(
                    "column-type",
                    f"entries row idx={index}: column {column} holds {_sql_repr(value)}, not a BLOB",
                    index,
                    None,
                )
            lh = leaf_hash(data)  # recomputed from the bytes; the stored copy is only compared
            if not compare(lh, stored_lh):
                fail(
                    "leaf-hash",
                    "stored leaf hash differs from the hash of the entry bytes",
                    index,
                    _peek_kind(data),
                )
            # Envelope entries (nearly all of a log) go straight to their one-pass decoder.
            entry: AuditEntry | None = (
                _decode_envelope_fast(data)
                if type(data) is bytes and data[:2] == _ENVELOPE_PREFIX
                else None
            )
            if entry is None:
                try:
                    entry = decode_entry(data)
                except DecodeError as exc:
                    fail("decode", exc.message, index, _peek_kind(data))
            if type(entry) is EnvelopeRecord:
                # The hot path: one accepted or rejected envelope.
                try:
                    job = envelope(index, entry, data)
                except _Fail as exc:
                    fail(exc.check, exc.detail, index, _LABELS[EntryKind.ENVELOPE])
                if job is not None:
                    pending.append(job)
                    if len(pending) >= batch:
                        flush(None, resolve=False)
            else:
                kind_label = _LABELS[entry.KIND]
                closing = isinstance(entry, (RoundResult, RunEnd))
                if closing and need_head_after is not None:
                    fail(
                        "missing-tree-head",
                        f"no signed tree head after {last_kind} entry {need_head_after}",
                        need_head_after,
                        last_kind,
                    )
                try:
                    sem.apply(index, entry, data=data)
                except _Fail as exc:
                    fail(exc.check, exc.detail, index, kind_label)
                if isinstance(entry, Genesis):
                    coordinator = public_key_from_der(entry.coordinator_key_der)
                    pinned_der = None if self._pinned is None else public_key_to_der(self._pinned)
                    if pinned_der is not None and pinned_der != entry.coordinator_key_der:
                        fail(
                            "coordinator-key",
                            "the log's genesis names coordinator key "
                            f"{hashlib.sha256(entry.coordinator_key_der).hexdigest()}, not the "
                            f"pinned coordinator key {hashlib.sha256(pinned_der).hexdigest()}",
                            index,
                            kind_label,
                        )
                if closing:
                    need_head_after, last_kind = index, kind_label
                elif type(entry) is Evaluation:
                    evaluations += 1
            if index_rows is not None:
                tags = next(index_rows, None)
                if tags is None or tags[0] != index:
                    fail("index-column", f"entries row idx={index}: index columns unreadable",
                         index, _LABELS[entry.KIND])  # fmt: skip
                _check_tags(index, tags[1:], entry, fail)
            # RFC 9162 §2.1.1 by a compact range: the frontier holds one subtree root per set
            # bit of n (largest first); appending leaf n merges one per trailing one bit.
            k = n
            height = 0
            while k & 1:
                lh = node_hash(frontier.pop(), lh)
                k >>= 1
                height += 1
                if store is not None:
                    check_node(store, height, k, lh)
            frontier.append(lh)
            n += 1
            if n in by_size:
                for seq, head in by_size[n]:
                    root = _fold(frontier)
                    self._check_head(seq, head, root, sem.genesis, coordinator, fail)
                    if need_head_after is not None and n > need_head_after:
                        need_head_after = None
            if progress is not None and n % 65536 == 0:
                progress(n)
        flush(None, resolve=True)
        if n == 0:
            raise AuditVerificationError("empty", "the log holds no entries")
        if store is not None:
            for h, stream in enumerate(node_rows, 1):
                extra = next(stream, None)
                if extra is not None:
                    raise AuditVerificationError(
                        "node-cache",
                        f"nodes row id={extra[0]} (height {h}) is not a complete subtree of the "
                        f"{n} entries",
                    )
            stray = store.node_ids_outside(max(len(node_rows), 1))
            if stray:
                raise AuditVerificationError(
                    "node-cache",
                    f"nodes row id={stray[0]} is not a complete subtree of the {n} entries",
                )
        for seq, head in heads:
            if head.tree_size > n:
                raise AuditVerificationError(
                    "truncated",
                    f"tree head claims {head.tree_size} entries but the log holds {n} (entries removed)",
                    tree_head_seq=seq,
                )
        warnings = []
        if need_head_after is not None:
            if last_kind == EntryKind.RUN_END.label:
                raise AuditVerificationError(
                    "missing-tree-head",
                    "no signed tree head covers the run end",
                    index=need_head_after,
                    entry_type=last_kind,
                )
            warnings.append(f"no signed tree head yet after {last_kind} entry {need_head_after}")
        covered = max((h.tree_size for _, h in heads), default=0)
        if covered < n:
            warnings.append(
                f"entries {covered}..{n - 1} are not covered by a signed tree head (unsigned: "
                "anyone who can write the file can append them)"
            )
        runs = [(r.hex(), s.name.lower() if s else "open", c, f) for r, s, c, f, _ in sem.runs]
        if sem.run is not None:
            warnings.append(f"run {sem.run.run_id.hex()} has not ended")
            runs.append(
                (sem.run.run_id.hex(), "open", sem.run.rounds_completed, sem.run.rounds_failed)
            )
        if self._progress is not None:
            self._progress(n)
        return VerifiedLog(
            entries=n,
            tree_heads=len(heads),
            signatures=signatures,
            runs=tuple(runs),
            accepted_envelopes=sem.accepted,
            rejected_envelopes=sem.rejected,
            root_hash=_fold(frontier),
            warnings=tuple(warnings),
            consortium_rosters=tuple(
                (c.consortium, c.version, c.roster_digest.hex(), c.authority_key_id.hex())
                for c in sem.consortia.values()
            ),
            coordinator_key_id=(
                "" if sem.genesis is None
                else hashlib.sha256(sem.genesis.coordinator_key_der).hexdigest()
            ),
            coordinator_key_pinned=self._pinned is not None,
            evaluations=evaluations,
            signed_entries=covered,
            open_run=sem.run is not None,
        )  # fmt: skip

    def _check_head(
        self,
        seq: int,
        head: SignedTreeHead,
        root: bytes,
        genesis: Genesis | None,
        coordinator: ec.EllipticCurvePublicKey | None,
        fail: Callable[..., NoReturn],
    ) -> None:
        if genesis is None or coordinator is None:
            fail("tree-head", "tree head before the genesis entry", None, None, tree_head_seq=seq)
        if head.log_id != genesis.log_id:
            fail("tree-head-log-id", "tree head names another log", None, None, tree_head_seq=seq)
        try:
            head.verify(coordinator)
        except BadSignatureError:
            fail(
                "tree-head-signature",
                "coordinator signature does not verify",
                None,
                None,
                tree_head_seq=seq,
            )
        if not hmac.compare_digest(head.root_hash, root):
            fail(
                "tree-head-root",
                f"signed root differs from the root of entries [0, {head.tree_size}): "
                "an entry was altered, inserted, removed or reordered",
                None, None, tree_head_seq=seq,
            )  # fmt: skip


def _peek_kind(data: bytes) -> str | None:
    if len(data) >= 2:
        try:
            return EntryKind(data[1]).label
        except ValueError:
            return None
    return None


def _fold(frontier: Sequence[bytes]) -> bytes:
    if not frontier:
        empty: bytes = EMPTY_ROOT
        return empty
    acc = frontier[-1]
    for h in reversed(frontier[:-1]):
        acc = node_hash(h, acc)
    return acc


def _sql_repr(value: object) -> str:
    """A stored value as a reader sees it: its SQLite type and a short rendering."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        shown = value[:16].hex() + ("…" if len(value) > 16 else "")
        return f"BLOB {shown or '(empty)'} ({len(value)} bytes)"
    if isinstance(value, str):
        return f"TEXT {value[:40]!r}"
    if isinstance(value, int):
        return f"INTEGER {value}"
    if isinstance(value, float):
        return f"REAL {value!r}"
    return f"{type(value).__name__} {value!r}"


_TAG_COLUMNS = ("kind", "site", "round")


def _check_tags(
    index: int, stored: Sequence[object], entry: AuditEntry, fail: Callable[..., NoReturn]
) -> None:
    """The index columns ``(kind, site, round)`` of row ``index`` are :func:`entry_tags`."""
    for column, have, want in zip(_TAG_COLUMNS, stored, entry_tags(entry), strict=True):
        if type(have) is not type(want) or have != want:
            fail(
                "index-column",
                f"entries row idx={index}: column {column} holds {_sql_repr(have)}, the entry "
                f"says {_sql_repr(want)}",
                index,
                _LABELS[entry.KIND],
            )


def _check_tree_head_rows(
    rows: Sequence[tuple[int, object, object, object, object]],
) -> list[StoredTreeHead]:
    """Check the raw ``tree_heads`` rows against their signed blobs; return them as heads.

    ``seq`` must run 1, 2, 3, … (a gap is a deleted tree head), ``blob`` must be a BLOB that
    decodes, and ``tree_size``, ``root_hash`` and ``timestamp_ms`` must be the signed values
    (types included). Signatures are checked later, with the entries.

    Raises:
        AuditVerificationError: Naming the row and the column.
    """
    heads = []
    seen: dict[bytes, int] = {}
    for expected, (seq, size, root, ts, blob) in enumerate(rows, 1):
        if seq != expected:
            raise AuditVerificationError(
                "tree-head-seq",
                f"tree_heads row seq={seq}: expected seq={expected} (tree heads are numbered "
                "from 1 without gaps: one was deleted or renumbered)",
                tree_head_seq=seq,
            )
        if type(blob) is not bytes:
            raise AuditVerificationError(
                "tree-head-column",
                f"tree_heads row seq={seq}: column blob holds {_sql_repr(blob)}, not a BLOB",
                tree_head_seq=seq,
            )
        try:
            head = SignedTreeHead.from_bytes(blob)
        except DecodeError as exc:
            raise AuditVerificationError(
                "tree-head-decode", f"tree_heads row seq={seq}: {exc.message}", tree_head_seq=seq
            ) from exc
        for column, have, want in (
            ("tree_size", size, head.tree_size),
            ("root_hash", root, head.root_hash),
            ("timestamp_ms", ts, head.timestamp_ms),
        ):
            if type(have) is not type(want) or have != want:
                raise AuditVerificationError(
                    "tree-head-column",
                    f"tree_heads row seq={seq}: column {column} holds {_sql_repr(have)}, the "
                    f"signed tree head says {_sql_repr(want)}",
                    tree_head_seq=seq,
                )
        if blob in seen:
            raise AuditVerificationError(
                "tree-head-duplicate",
                f"tree_heads row seq={seq} repeats the signed tree head of row seq={seen[blob]}",
                tree_head_seq=seq,
            )
        seen[blob] = seq
        heads.append(StoredTreeHead(seq, head.tree_size, head.root_hash, head.timestamp_ms, blob))
    return heads


def _decode_heads(tree_heads: Sequence[StoredTreeHead]) -> list[tuple[int, SignedTreeHead]]:
    heads: list[tuple[int, SignedTreeHead]] = []
    prev: SignedTreeHead | None = None
    for stored in sorted(tree_heads, key=lambda h: h.seq):
        try:
            head = SignedTreeHead.from_bytes(stored.blob)
        except DecodeError as exc:
            raise AuditVerificationError(
                "tree-head-decode", exc.message, tree_head_seq=stored.seq
            ) from exc
        if head.tree_size == 0:
            raise AuditVerificationError(
                "tree-head", "tree head of an empty log", tree_head_seq=stored.seq
            )
        if prev is not None and (
            head.tree_size < prev.tree_size or head.timestamp_ms < prev.timestamp_ms
        ):
            raise AuditVerificationError(
                "tree-head-order",
                "tree head is older (smaller or earlier) than the one before it",
                tree_head_seq=stored.seq,
            )
        heads.append((stored.seq, head))
        prev = head
    return heads


def verify_audit_log(
    entries: Iterable[StoredEntry],
    tree_heads: Sequence[StoredTreeHead],
    *,
    coordinator_key: ec.EllipticCurvePublicKey | None = None,
    trusted_roster: Roster | None = None,
    consortium_authority: ec.EllipticCurvePublicKey | None = None,
) -> None:
    """Verify a whole log (see :class:`AuditVerifier`).

    Raises:
        AuditVerificationError: Naming the first bad entry or tree head.
    """
    AuditVerifier(
        coordinator_key=coordinator_key,
        trusted_roster=trusted_roster,
        consortium_authority=consortium_authority,
    ).run(entries, tree_heads)


# --- the coordinator's API -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedEnvelope:
    """One envelope for :meth:`AuditLog.append_envelopes` (same fields as
    :meth:`AuditLog.append_envelope`)."""

    message_type: str
    payload: bytes
    signature: bytes
    signer_key_id: bytes
    accepted: bool
    reason: str | None
    site: str
    round: int
    stage: str
    dataset_root: bytes | None = None
    bulk_digest: bytes | None = None
    num_examples: int | None = None
    model_digest: bytes | None = None


class AuditLog:
    """The coordinator's append-only audit log (durable: every append is committed first).

    Every ``append_*`` checks the entry against the run's rules (the verifier's, minus
    signatures) *before* writing and raises :class:`AuditStateError` instead of recording an
    inconsistent history.

    The coordinator's sequence:

    1. ``open(path, signer=coordinator_key, now_ms=..., log_id=os.urandom(16))`` at start-up
       (an existing log resumes: roster and open run are rebuilt from indexed entries, and a
       round result left without a tree head by a crash is covered at once);
    2. ``append_roster_change`` for every enrolment (key DER + approved dataset roots), roots
       change and revocation — before the run that depends on it; ``append_consortium_roster``
       for the signed consortium roster the sites run under, at run start and whenever its
       version changes;
    3. ``append_run_start(run_id, config_digest=..., initial_model_digest=..., code_version=...)``;
    4. for each stage, every envelope received, accepted or rejected with its reason, *before*
       acting on it: ``append_envelope`` or, for a stage's replies at once, ``append_envelopes``
       (one fsync); accepted masked inputs carry dataset root, bulk digest, example count and
       the model digest they were trained from;
    5. ``append_round_result(round, aggregate_digest=..., new_model_digest=..., metrics=...)``
       (survivors and input digests default to the accepted inputs), then ``sign_tree_head``;
       ``append_checkpoint`` for each checkpoint written; ``append_evaluation`` once the new
       model's federated evaluation is aggregated;
    6. ``append_run_end(status, ended_at_ms=...)``, then ``sign_tree_head``.
    """

    def __init__(
        self, store: MerkleLogStore, signer: ec.EllipticCurvePrivateKey, genesis: Genesis
    ) -> None:
        self._store = store
        self._signer = signer
        self._genesis = genesis
        self._sem = _Semantics()
        self._replay()
        # The last round result / run end, if no signed tree head covers it yet.
        latest = store.latest_tree_head()
        covered = 0 if latest is None else latest.tree_size
        closing = (
            store.find(int(EntryKind.ROUND_RESULT))[-1:] + store.find(int(EntryKind.RUN_END))[-1:]
        )
        last = max(closing, default=-1)
        self._uncovered: int | None = last if last >= covered else None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        signer: ec.EllipticCurvePrivateKey,
        now_ms: int,
        log_id: bytes | None = None,
        note: str = "",
    ) -> AuditLog:
        """Open the log at ``path``, creating it (with its genesis entry) if it is new.

        Args:
            path: SQLite file.
            signer: The coordinator's identity key; must be the genesis key of an existing log.
            now_ms: Current time (ms since the epoch), recorded in a new log's genesis.
            log_id: 16 random bytes naming a new log (required when creating it).
            note: Free text for a new log's genesis (e.g. the deployment name).

        Raises:
            AuditStateError: If ``signer`` is not the key the existing log was created with,
                or the existing log's roster / open run is inconsistent.
            fedseal.protocol.errors.DecodeError: If an entry needed to resume does not decode.
            ValueError: If a new log is created without a 16-byte ``log_id``.
            fedseal.audit.store.LogFormatError: If the file is not a fedseal log.
        """
        store = MerkleLogStore.open(path)
        der = public_key_to_der(signer.public_key())
        if store.size == 0:
            if log_id is None or len(log_id) != LOG_ID_BYTES:
                store.close()
                raise ValueError("creating a log needs a 16-byte log_id")
            genesis = Genesis(log_id, der, now_ms, note)
            store.append(int(EntryKind.GENESIS), encode_entry(genesis))
        else:
            first = decode_entry(store.entries(0, 1)[0].data)
            if not isinstance(first, Genesis):
                store.close()
                raise AuditStateError("entry 0 is not a genesis entry")
            genesis = first
            if genesis.coordinator_key_der != der:
                store.close()
                raise AuditStateError("the log was created with another coordinator key")
        log = cls(store, signer, genesis)
        if log._uncovered is not None:
            # A coordinator killed between a round result and its tree head: sign it now.
            log.sign_tree_head(now_ms)
        return log

    def _replay(self) -> None:
        """Rebuild roster and open-run state from indexed entries (not a full scan)."""
        store, sem = self._store, self._sem
        sem.apply(0, self._genesis)
        wanted = sorted(
            store.find(int(EntryKind.ROSTER_CHANGE))
            + store.find(int(EntryKind.CONSORTIUM_ROSTER))
            + store.find(int(EntryKind.RUN_START))
            + store.find(int(EntryKind.RUN_END))
            + store.find(int(EntryKind.ROUND_RESULT))
            + store.find(int(EntryKind.EVALUATION))
        )
        starts = store.find(int(EntryKind.RUN_START))
        ends = store.find(int(EntryKind.RUN_END))
        open_start = starts[-1] if starts and (not ends or ends[-1] < starts[-1]) else None
        envelopes: list[int] = []
        if open_start is not None:
            results = [i for i in store.find(int(EntryKind.ROUND_RESULT)) if i > open_start]
            last_round = 0
            if results:
                last = decode_entry(store.entries(results[-1], results[-1] + 1)[0].data)
                last_round = last.round if isinstance(last, RoundResult) else 0
            envelopes = [
                i
                for i in store.find(int(EntryKind.ENVELOPE), round=last_round + 1)
                if i > open_start
            ]
        for index in sorted(wanted + envelopes):
            entry = decode_entry(store.entries(index, index + 1)[0].data)
            try:
                # Closed runs: only the roster and run-id bookkeeping matter.
                if open_start is None or index < open_start:
                    if isinstance(entry, RosterChange | ConsortiumRosterRecord):
                        sem.apply(index, entry, replay=True)
                    elif isinstance(entry, RunStart):
                        sem.run_ids.add(entry.run_id)
                    continue
                sem.apply(index, entry, replay=True)
            except _Fail as exc:
                raise AuditStateError(
                    f"the existing log is inconsistent at entry {index}: {exc.detail} "
                    "(run fl-audit verify)"
                ) from exc

    # -- properties ------------------------------------------------------------------------

    @property
    def store(self) -> MerkleLogStore:
        """The underlying store (for proofs and the audit service)."""
        return self._store

    @property
    def log_id(self) -> bytes:
        """This log's id."""
        return self._genesis.log_id

    @property
    def size(self) -> int:
        """Number of entries."""
        size: int = self._store.size
        return size

    @property
    def current_run_id(self) -> bytes | None:
        """The open run's id, if a run is open."""
        return None if self._sem.run is None else self._sem.run.run_id

    @property
    def current_model_digest(self) -> bytes | None:
        """The open run's current global model digest."""
        return None if self._sem.run is None else self._sem.run.model

    @property
    def last_round(self) -> int:
        """The open run's last finished round (0 before the first)."""
        return 0 if self._sem.run is None else self._sem.run.last_round

    def roster(self) -> Roster:
        """The roster as recorded in the log."""
        return self._sem.roster()

    @property
    def consortium_roster(self) -> ConsortiumRosterRecord | None:
        """The consortium roster logged last (of any consortium), or ``None``."""
        return self._sem.last_consortium

    def close(self) -> None:
        """Close the store."""
        self._store.close()

    # -- appends ---------------------------------------------------------------------------

    def _append(self, entry: AuditEntry) -> int:
        return self._append_many([entry])[0]

    def _append_many(self, items: Sequence[AuditEntry]) -> list[int]:
        """Check every entry against the rules, then write them all in one durable commit
        (index columns from :func:`entry_tags`, which the verifier checks them against).

        On any failure nothing is written and the in-memory state is rebuilt from the log.
        """
        first = self._store.size
        try:
            for k, entry in enumerate(items):
                try:
                    self._sem.apply(first + k, entry, replay=False)
                except _Fail as exc:
                    raise AuditStateError(
                        f"refusing to record {entry.KIND.label}"
                        + (f" (item {k} of the batch)" if len(items) > 1 else "")
                        + f": {exc.detail}"
                    ) from exc
            rows = [
                (kind, _encode_checked(e), site, rnd)
                for e in items
                for kind, site, rnd in (entry_tags(e),)
            ]
            start: int = self._store.append_many(rows)
        except BaseException:
            self._sem = _Semantics()
            self._replay()
            raise
        return list(range(start, start + len(items)))

    def append_roster_change(
        self,
        action: RosterAction,
        site: str,
        *,
        public_key_der: bytes = b"",
        approved_roots: Iterable[bytes] = (),
        reason: str = "",
        now_ms: int,
    ) -> int:
        """Record an enrolment (key + approved dataset roots), a roots change or a revocation.

        Returns:
            The entry's index (durable on return).

        Raises:
            AuditStateError: Enrolling an enrolled site, a key already used, or changing a
                site that is not enrolled.
            ValueError: Malformed fields.
        """
        roots = tuple(sorted(set(approved_roots)))
        return self._append(
            RosterChange(RosterAction(action), site, public_key_der, roots, reason, now_ms)
        )

    def append_consortium_roster(
        self,
        signed: SignedConsortiumRoster,
        authority_key: ec.EllipticCurvePublicKey,
        *,
        now_ms: int,
    ) -> int:
        """Record the signed consortium roster the sites run under (verify it first).

        The entry keeps the authority's signed bytes and signature verbatim and the authority's
        public key, so an auditor can re-verify it offline. Logging the same roster again (at
        the next run start) is allowed; an older version or another roster with a logged
        version is not.

        Returns:
            The entry's index (durable on return).

        Raises:
            AuditStateError: The signature does not verify under ``authority_key``, or the
                version is lower than the consortium's last logged one (or equal, with other
                contents).
            ValueError: Malformed fields (e.g. a roster over the entry's size bound).
        """
        payload = signed.payload
        entry = ConsortiumRosterRecord(
            signed.roster.consortium, signed.roster.version, hashlib.sha256(payload).digest(),
            payload, bytes(signed.signature), public_key_to_der(authority_key), now_ms,
        )  # fmt: skip
        return self._append(entry)

    def append_run_start(
        self,
        run_id: bytes,
        *,
        config_digest: bytes,
        initial_model_digest: bytes,
        code_version: str,
        started_at_ms: int,
        planned_rounds: int = 0,
    ) -> int:
        """Record a run start; the roster digest is the log roster's (enrol sites first).

        Raises:
            AuditStateError: A run is open, or ``run_id`` was used before.
        """
        entry = RunStart(
            run_id, config_digest, self._sem.roster().digest(), initial_model_digest,
            code_version, started_at_ms, planned_rounds,
        )  # fmt: skip
        return self._append(entry)

    def append_envelope(
        self,
        message_type: str,
        payload: bytes,
        signature: bytes,
        signer_key_id: bytes,
        *,
        accepted: bool,
        reason: str | None,
        site: str,
        round: int,
        stage: str,
        dataset_root: bytes | None = None,
        bulk_digest: bytes | None = None,
        num_examples: int | None = None,
        model_digest: bytes | None = None,
    ) -> int:
        """Record an envelope received from ``site``, accepted or rejected (with ``reason``).

        Record it *before* acting on it (adding an accepted input to the sum, answering).

        Raises:
            AuditStateError: An accepted envelope that the rules forbid (site not enrolled
                or revoked, wrong key, closed round, unapproved dataset root, second input,
                fields disagreeing with the signed payload).
            ValueError: Malformed fields (``reason`` must be given exactly when rejected).
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        entry = EnvelopeRecord(
            run.run_id, round, stage, site, message_type, bytes(signer_key_id), accepted,
            reason or "", bytes(payload), bytes(signature), dataset_root, bulk_digest,
            num_examples, model_digest,
        )  # fmt: skip
        return self._append(entry)

    def append_envelopes(self, envelopes: Sequence[ReceivedEnvelope]) -> list[int]:
        """Record a batch of received envelopes in one durable commit (group commit).

        The natural unit is one stage's replies (e.g. what ``Grid.send_and_receive`` returned):
        one fsync instead of one per envelope. All or nothing: if any envelope breaks the rules,
        none is written.

        Returns:
            The entries' indices, in order.

        Raises:
            AuditStateError: As for :meth:`append_envelope`, naming the offending item.
            ValueError: Malformed fields.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        items: list[AuditEntry] = []
        for e in envelopes:
            record = EnvelopeRecord(
                run.run_id, e.round, e.stage, e.site, e.message_type, bytes(e.signer_key_id),
                e.accepted, e.reason or "", bytes(e.payload), bytes(e.signature), e.dataset_root,
                e.bulk_digest, e.num_examples, e.model_digest,
            )  # fmt: skip
            items.append(record)
        return self._append_many(items)

    def append_round_result(
        self,
        round: int,
        *,
        aggregate_digest: bytes | None,
        new_model_digest: bytes,
        survivors: Iterable[str] | None = None,
        accepted_input_digests: Iterable[bytes] | None = None,
        status: RoundStatus = RoundStatus.COMPLETED,
        reason: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Record a round's outcome. ``survivors``/``accepted_input_digests`` default to what
        the log recorded for the round (if given, they must equal it).

        Raises:
            AuditStateError: Wrong round number, inputs or survivors differing from the
                accepted envelopes, a failed round that changes the model, or no tree head
                signed since the previous round result.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        surv = tuple(
            sorted(set(survivors if survivors is not None else run.inputs), key=site_sort_key)
        )
        digests = tuple(
            sorted(
                set(
                    accepted_input_digests
                    if accepted_input_digests is not None
                    else run.inputs.values()
                )
            )
        )
        metric_items = _metric_items(metrics)
        entry = RoundResult(
            run.run_id, round, RoundStatus(status), run.model, surv, digests, aggregate_digest,
            new_model_digest, reason, metric_items,
        )  # fmt: skip
        self._require_covered()
        index = self._append(entry)
        self._uncovered = index
        return index

    def _require_covered(self) -> None:
        if self._uncovered is not None:
            raise AuditStateError(
                f"entry {self._uncovered} (a round result or run end) has no signed tree head "
                "yet: call sign_tree_head() after every round result and after the run end"
            )

    def append_checkpoint(
        self, round: int, *, model_digest: bytes, file_digest: bytes, name: str
    ) -> int:
        """Record a checkpoint file written after ``round``.

        Raises:
            AuditStateError: No run open, or the model is not that round's.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        return self._append(Checkpoint(run.run_id, round, model_digest, file_digest, name))

    def append_evaluation(
        self,
        round: int,
        *,
        metrics: Mapping[str, float],
        num_examples: int,
        sites: Iterable[str] = (),
        model_digest: bytes | None = None,
        now_ms: int = 0,
    ) -> int:
        """Record the federated evaluation of ``round``'s new model (see :class:`Evaluation`):
        after its round result and checkpoint, before the next round's result.

        Args:
            round: The round whose new model was evaluated (the last round logged).
            metrics: Aggregated metrics (e.g. ``accuracy``, ``loss``, ``macro-f1``), finite.
            num_examples: Evaluation examples the metrics cover.
            sites: The sites whose evaluation replies were aggregated.
            model_digest: The model evaluated (default: the round's new model; if given, it
                must be that).
            now_ms: When the evaluation was aggregated.

        Raises:
            AuditStateError: No run open, not the last round, a failed round, a second
                evaluation of the round, another model, or a site that is not enrolled.
            ValueError: A metric that is not finite or out of range, or a bad metric name.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        entry = Evaluation(
            run.run_id, round, run.model if model_digest is None else model_digest, num_examples,
            tuple(sorted(set(sites), key=site_sort_key)), _metric_items(metrics), now_ms,
        )  # fmt: skip
        return self._append(entry)

    def append_run_end(self, status: RunStatus, *, ended_at_ms: int, reason: str = "") -> int:
        """Record the end of the open run (with its final model). Sign a tree head after it.

        Raises:
            AuditStateError: No run open, or no tree head was signed after the last round.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        entry = RunEnd(
            run.run_id, RunStatus(status), run.last_round, run.model, ended_at_ms, reason
        )
        self._require_covered()
        index = self._append(entry)
        self._uncovered = index
        return index

    # -- tree heads and proofs -------------------------------------------------------------

    def sign_tree_head(self, now_ms: int) -> SignedTreeHead:
        """Sign and store a tree head over the whole log.

        Raises:
            AuditStateError: If ``now_ms`` is earlier than the latest tree head's time.
        """
        size = self._store.size
        latest = self._store.latest_tree_head()
        if latest is not None and now_ms < latest.timestamp_ms:
            raise AuditStateError("clock went backwards since the last tree head")
        head = SignedTreeHead.create(
            self._signer, log_id=self.log_id, tree_size=size, root_hash=self._store.root(size),
            timestamp_ms=now_ms,
        )  # fmt: skip
        self._store.add_tree_head(size, head.root_hash, now_ms, head.to_bytes())
        self._uncovered = None
        return head

    def latest_tree_head(self) -> SignedTreeHead | None:
        """The latest signed tree head, if any."""
        stored = self._store.latest_tree_head()
        return None if stored is None else SignedTreeHead.from_bytes(stored.blob)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """Inclusion proof of entry ``index`` in the tree of ``tree_size`` entries."""
        proof: list[bytes] = self._store.inclusion_proof(index, tree_size)
        return proof

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Consistency proof between two tree sizes."""
        proof: list[bytes] = self._store.consistency_proof(old_size, new_size)
        return proof

    def entries(self, start: int, end: int) -> list[StoredEntry]:
        """Stored entries ``[start, end)``."""
        found: list[StoredEntry] = self._store.entries(start, end)
        return found

    def find_input(self, site: str, round: int, run_id: bytes | None = None) -> int | None:
        """Index of ``site``'s accepted input envelope in ``round`` (of ``run_id``, default the
        latest run), or ``None``."""
        return find_input(self._store, site, round, run_id)


def roster_from_log(store: MerkleLogStore) -> Roster:
    """The roster as the log's roster-change entries define it (genesis excluded).

    Raises:
        AuditVerificationError: If a roster change is malformed or inconsistent.
        DecodeError: If a roster-change entry does not decode.
    """
    sem = _Semantics()
    for index in store.find(int(EntryKind.ROSTER_CHANGE)):
        entry = decode_entry(store.entries(index, index + 1)[0].data)
        if not isinstance(entry, RosterChange):
            raise AuditVerificationError(
                "roster", "entry tagged as a roster change is not one", index=index
            )
        try:
            sem.apply(index, entry)
        except _Fail as exc:
            raise AuditVerificationError(exc.check, exc.detail, index=index) from exc
    return sem.roster()


def find_input(
    store: MerkleLogStore, site: str, round: int, run_id: bytes | None = None
) -> int | None:
    """Index of ``site``'s accepted input envelope in ``round`` (latest run unless ``run_id``).

    Decodes the candidate entries (the store's tags are only hints).
    """
    found: int | None = None
    for index in store.find(int(EntryKind.ENVELOPE), round=round, site=site):
        entry = decode_entry(store.entries(index, index + 1)[0].data)
        if (
            isinstance(entry, EnvelopeRecord)
            and entry.accepted
            and entry.message_type == INPUT_MESSAGE_TYPE
            and entry.site == site
            and entry.round == round
            and (run_id is None or entry.run_id == run_id)
        ):
            found = index
    return found
