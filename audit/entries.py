"""Audit-log entries: their kinds, their fields and rules, and each kind's canonical body.

Every entry is canonical bytes (:mod:`fedseal.protocol.encoding`): ``u8 version = 1 | u8 kind |
body`` (:mod:`fedseal.audit.codec` adds the version and kind and picks the class); the Merkle
leaf is those bytes (leaf hash ``SHA-256(0x00 || bytes)``, RFC 9162 §2.1.1). Entries hold
digests, organisation-level site ids and signatures only: no raw data, no unmasked individual
update, no personal data. Envelope entries keep the signer's payload and signature verbatim
*and* the facts the coordinator decoded from them (site, round, dataset root, bulk digest,
example count, model digest) as explicit fields; the verifier checks both the signature and,
for message types of :class:`~fedseal.protocol.types.MessageKind`, that the explicit fields
agree with the decoded payload. Consortium roster entries (:class:`ConsortiumRosterRecord`) keep
the roster authority's signed roster bytes and signature verbatim with the authority's public
key, so an auditor can re-verify offline which consortium roster (version, sites, keys) the
sites ran under.

Evaluation metrics: a round's result is logged (and its tree head signed) before the new model
leaves the coordinator for evaluation, so the round's aggregated evaluation metrics (accuracy,
loss, macro-F1, example count, the sites counted) are a separate entry kind,
:class:`Evaluation`, written once the evaluation is aggregated: after the round's result and
checkpoint, before the next round's result or the run end (whose signed tree head covers it).
``RoundRecord.metrics`` stays for metrics known when the round commits (the coordinator logs
none today).

Absent sites: a round result may end with a trailing section (tag 1) naming every site the
coordinator expected in the round that is not in its sum, each with one line saying why
(``refused: …``, ``error: …``, ``rejected at <stage>: …``, ``dropped at <stage>…``): at most
:data:`MAX_ABSENT_SITES` sites, sorted by their UTF-8 bytes, each reason one printable line of
1 to :data:`MAX_ABSENT_REASON` bytes. A result without absent sites encodes exactly as before.
The reasons are the coordinator's claim (a site's own refusal is not signed into the log); the
verifier checks that each absent site is enrolled and not also among the round's inputs.

Distributed DP (docs/dp.md): a run whose :class:`RunStart` carries ``dp_budget`` (its target
ε and δ, a trailing section, so runs without DP keep their bytes) logs one :class:`DpRound`
per completed round, in the same commit as the round's result: the round's canonical
``DpParams``, its zCDP ρ and the run's ε so far, which the verifier recomputes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from fedseal.crypto.errors import CryptoError
from fedseal.crypto.keys import public_key_from_der
from fedseal.crypto.signing import MAX_SIGNATURE_SIZE, signed_content_digest
from fedseal.protocol.consortium import (
    MAX_CONSORTIUM_NAME_BYTES,
    ConsortiumRoster,
    RosterFormatError,
    SignedConsortiumRoster,
    decode_roster,
)
from fedseal.protocol.dp import DpParams
from fedseal.protocol.encoding import Reader, Writer
from fedseal.protocol.errors import DecodeError, ProtocolError
from fedseal.protocol.types import DIGEST_BYTES, RUN_ID_BYTES, MessageKind

__all__ = [
    "ENTRY_VERSION",
    "INPUT_MESSAGE_TYPE",
    "LOG_ID_BYTES",
    "MAX_ABSENT_REASON",
    "MAX_ABSENT_SITES",
    "MAX_ENTRY_TEXT",
    "MAX_ENVELOPE_PAYLOAD",
    "MAX_ENVELOPE_SIGNATURE",
    "MAX_SETTINGS_TEXT",
    "AuditEntry",
    "Checkpoint",
    "ConsortiumRosterRecord",
    "DpRound",
    "EntryKind",
    "EnvelopeRecord",
    "Evaluation",
    "Genesis",
    "RosterAction",
    "RosterChange",
    "RoundRecord",
    "RoundStatus",
    "RunEnd",
    "RunStart",
    "RunStatus",
    "absent_items",
    "canonical_settings",
    "metric_items",
    "metric_to_micros",
]

ENTRY_VERSION = 1
LOG_ID_BYTES = 16
INPUT_MESSAGE_TYPE = MessageKind.MASKED_INPUT.type_name
"""Envelopes of this type are a round's aggregated inputs."""

MAX_ENTRY_TEXT = 1024
"""Bound on every text field of an entry (bytes)."""
MAX_SETTINGS_TEXT = 8192
"""Longest run-settings section (canonical JSON) a run start carries."""
MAX_ABSENT_SITES = 4096
"""Most absent sites one round result names: four times a secure round's largest cohort
(``Limits.max_cohort`` = 1,000); at the longest site ids and reasons the section stays under
6.3 MB, well inside the store's 16 MiB per entry."""
MAX_ABSENT_REASON = 512
"""Longest reason (UTF-8 bytes) a round result gives for one absent site: one printable line
(the coordinator's reasons are one line of at most 300 characters; :class:`RunAudit
<fedseal.server.audit_hook.RunAudit>` cuts a longer one to fit)."""


def canonical_settings(settings: Mapping[str, object]) -> str:
    """The run settings as the run start records them: JSON, keys sorted, no spaces."""
    return json.dumps(
        settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _check_settings(text: str) -> None:
    if len(text.encode()) > MAX_SETTINGS_TEXT:
        raise ValueError(f"settings longer than {MAX_SETTINGS_TEXT} bytes")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"settings are not JSON: {exc}") from exc
    try:
        canonical = canonical_settings(doc)
    except ValueError as exc:  # NaN or infinities
        raise ValueError(f"settings are not plain JSON: {exc}") from exc
    if not isinstance(doc, dict) or canonical != text:
        raise ValueError("settings must be a canonical JSON object (keys sorted, no spaces)")


MAX_ENVELOPE_PAYLOAD = 1 << 20
"""Bound on an envelope entry's payload (bytes)."""
MAX_ENVELOPE_SIGNATURE = 80
"""Bound on an envelope entry's (and a tree head's) DER signature (bytes)."""
_MAX_KEY = 256
_MAX_LIST = 100_000
_MAX_METRIC_NAME = 64
_MAX_CONSORTIUM_ROSTER = 4 << 20
"""Bound on a consortium roster's signed bytes in an entry (10,000 sites with the longest ids
and keys :func:`~fedseal.protocol.consortium.decode_roster` accepts take about 3.3 MB)."""
_MAX_DP_PARAMS = 256
"""Bound on a DP round entry's canonical ``DpParams`` bytes (they are 70 today)."""
_F64 = struct.Struct(">d")
_E = TypeVar("_E", bound=enum.IntEnum)


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
    DP_ROUND = 9

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
    WITHDRAW_ROOT = 4
    """A dataset root withdrawn (erasure, consent withdrawn): never accepted again."""


class RoundStatus(enum.IntEnum):
    """Outcome of a round."""

    COMPLETED = 1
    FAILED = 2


class RunStatus(enum.IntEnum):
    """Outcome of a run."""

    COMPLETED = 1
    ABORTED = 2


def _opt_digest(w: Writer, value: bytes | None) -> None:
    if value is None:
        w.u8(0)
    else:
        w.u8(1).fixed(value, DIGEST_BYTES)


def _read_opt_digest(r: Reader) -> bytes | None:
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


def _check_f64(name: str, value: object, *, below_one: bool = False) -> None:
    """A binary64 field: a float, finite and > 0 (so never NaN, an infinity or -0.0: one
    encoding per value), below 1 if ``below_one``."""
    if type(value) is not float or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    if below_one and not value < 1:
        raise ValueError(f"{name} must be < 1, got {value!r}")


def _f64(w: Writer, value: float) -> None:
    """IEEE-754 binary64, big-endian bit pattern (as :meth:`DpParams.to_bytes`)."""
    w.raw(_F64.pack(value))


def _read_f64(r: Reader) -> float:
    value: float = _F64.unpack(r.fixed(8))[0]
    return value


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
    def _decode(cls, r: Reader) -> Genesis:
        return cls(r.fixed(LOG_ID_BYTES), r.blob(_MAX_KEY), r.u64(), r.text(MAX_ENTRY_TEXT))


@dataclass(frozen=True, slots=True)
class RunStart:
    """A training run begins. ``roster_digest`` is the log roster's digest at that point.
    ``settings``: the run settings the coordinator declares (canonical JSON: strategy, rounds,
    minimum sites, model, local training, DP, data contract; ``""`` for none); its claim, like
    the metrics, beside the signed SHA-256 of the whole ``server.toml``."""

    KIND: ClassVar[EntryKind] = EntryKind.RUN_START
    run_id: bytes
    config_digest: bytes
    roster_digest: bytes
    initial_model_digest: bytes
    code_version: str
    started_at_ms: int
    planned_rounds: int = 0
    dp_budget: tuple[float, float] | None = None
    settings: str = ""

    def __post_init__(self) -> None:
        if len(self.run_id) != RUN_ID_BYTES:
            raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes")
        if self.settings:
            _check_settings(self.settings)
        for name in ("config_digest", "roster_digest", "initial_model_digest"):
            _check_digest(name, getattr(self, name))
        if self.dp_budget is not None:
            if not isinstance(self.dp_budget, tuple) or len(self.dp_budget) != 2:
                raise ValueError("dp_budget must be a pair (epsilon, delta)")
            _check_f64("dp_budget epsilon", self.dp_budget[0])
            _check_f64("dp_budget delta", self.dp_budget[1], below_one=True)

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).fixed(self.config_digest, DIGEST_BYTES)
        w.fixed(self.roster_digest, DIGEST_BYTES).fixed(self.initial_model_digest, DIGEST_BYTES)
        w.text(self.code_version).u64(self.started_at_ms).u32(self.planned_rounds)
        if self.dp_budget is not None:  # trailing sections: runs without them keep their bytes
            w.u8(1)
            _f64(w, self.dp_budget[0])
            _f64(w, self.dp_budget[1])
        if self.settings:
            w.u8(2).text(self.settings)

    @classmethod
    def _decode(cls, r: Reader) -> RunStart:
        fields = (
            r.fixed(RUN_ID_BYTES),
            r.fixed(DIGEST_BYTES),
            r.fixed(DIGEST_BYTES),
            r.fixed(DIGEST_BYTES),
            r.text(MAX_ENTRY_TEXT),
            r.u64(),
            r.u32(),
        )
        budget, settings, last = None, "", 0
        while r.remaining:  # tagged sections, each at most once, in increasing order
            tag = r.u8()
            if tag <= last or tag > 2:
                raise DecodeError(f"audit entry: bad run-start section tag {tag}")
            last = tag
            if tag == 1:
                budget = (_read_f64(r), _read_f64(r))
            else:
                settings = r.text(MAX_SETTINGS_TEXT)
                if not settings:
                    raise DecodeError("audit entry: empty run-start settings section")
        try:
            return cls(*fields, dp_budget=budget, settings=settings)
        except ValueError as exc:
            raise DecodeError(f"audit entry: run start: {exc}") from exc

    @property
    def dp(self) -> bool:
        """Whether the run's rounds are distributed-DP rounds (it has a DP budget)."""
        return self.dp_budget is not None


@dataclass(frozen=True, slots=True)
class RosterChange:
    """Enrol a site (key + approved dataset roots), replace its roots, revoke it, or withdraw
    dataset roots.

    ``approved_roots`` holds the site's approved roots after an enrolment or a roots change;
    for :attr:`RosterAction.WITHDRAW_ROOT` it holds the roots withdrawn (:attr:`withdrawn_roots`):
    from this entry on, no accepted input of any site may carry them and no roster change may
    approve them again. ``reason`` says why (required for a withdrawal; a revocation's reason
    is optional); ``at_ms`` is when the change was made.
    """

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
        if self.action == RosterAction.WITHDRAW_ROOT:
            if not self.approved_roots:
                raise ValueError("a root withdrawal names at least one dataset root")
            if not self.reason.strip():
                raise ValueError("a root withdrawal records its reason")

    @property
    def withdrawn_roots(self) -> tuple[bytes, ...]:
        """The roots a :attr:`RosterAction.WITHDRAW_ROOT` entry withdraws (else ``()``)."""
        return self.approved_roots if self.action == RosterAction.WITHDRAW_ROOT else ()

    def _encode(self, w: Writer) -> None:
        w.u8(int(self.action)).text(self.site).blob(self.public_key_der)
        w.count(len(self.approved_roots))
        for root in self.approved_roots:
            w.fixed(root, DIGEST_BYTES)
        w.text(self.reason).u64(self.at_ms)

    @classmethod
    def _decode(cls, r: Reader) -> RosterChange:
        action = _enum(RosterAction, r.u8(), "roster action")
        site = r.text(MAX_ENTRY_TEXT)
        der = r.blob(_MAX_KEY)
        roots = tuple(r.fixed(DIGEST_BYTES) for _ in range(r.count(_MAX_LIST)))
        return cls(action, site, der, roots, r.text(MAX_ENTRY_TEXT), r.u64())


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
    def _decode(cls, r: Reader) -> EnvelopeRecord:
        run_id, rnd = r.fixed(RUN_ID_BYTES), r.u32()
        stage, site, mtype = r.text(MAX_ENTRY_TEXT), r.text(MAX_ENTRY_TEXT), r.text(MAX_ENTRY_TEXT)
        signer = r.fixed(DIGEST_BYTES)
        accepted = _bool(r.u8())
        reason = r.text(MAX_ENTRY_TEXT)
        payload, signature = r.blob(MAX_ENVELOPE_PAYLOAD), r.blob(MAX_ENVELOPE_SIGNATURE)
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


def _decode_metrics(r: Reader) -> tuple[tuple[str, int], ...]:
    metrics = []
    for _ in range(r.count(_MAX_LIST)):
        name, raw = r.text(_MAX_METRIC_NAME), r.u64()
        metrics.append((name, raw - (1 << 64) if raw >> 63 else raw))
    return tuple(metrics)


def metric_items(metrics: Mapping[str, float] | None) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((k, metric_to_micros(v)) for k, v in (metrics or {}).items()))


def absent_items(absent: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """A round's absent sites (site -> why) as :attr:`RoundRecord.absent` holds them: sorted by
    the site's UTF-8 bytes. Values are checked by :class:`RoundRecord`.

    Raises:
        ValueError: A site or reason is not a string (or not encodable as UTF-8).
    """
    items = list((absent or {}).items())
    for site, reason in items:
        if type(site) is not str or type(reason) is not str:
            raise ValueError(
                f"absent sites and reasons must be strings, got {type(site).__name__} -> "
                f"{type(reason).__name__}"
            )
    try:
        return tuple(sorted(items, key=lambda item: item[0].encode("utf-8")))
    except UnicodeEncodeError as exc:
        raise ValueError("an absent site id is not valid UTF-8 text") from exc


def _check_absent(absent: object) -> None:
    """:attr:`RoundRecord.absent`'s rules (each failure one line naming the site)."""
    if type(absent) is not tuple:
        raise ValueError(
            f"absent must be a tuple of (site, reason) pairs, got {type(absent).__name__}"
        )
    if len(absent) > MAX_ABSENT_SITES:
        raise ValueError(f"{len(absent)} absent sites, at most {MAX_ABSENT_SITES}")
    keys: list[bytes] = []
    for item in absent:
        if type(item) is not tuple or len(item) != 2 or not all(type(x) is str for x in item):
            raise ValueError(
                f"absent entries must be (site, reason) string pairs, got {item!r:.80}"
            )
        site, reason = item
        try:
            raw_site, raw_reason = site.encode("utf-8"), reason.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"absent site {site!r:.80} or its reason is not valid UTF-8 text"
            ) from exc
        if not 0 < len(raw_site) <= MAX_ENTRY_TEXT:
            raise ValueError(
                f"absent site ids must be 1 to {MAX_ENTRY_TEXT} bytes, got {site!r:.80}"
            )
        if not 0 < len(raw_reason) <= MAX_ABSENT_REASON:
            raise ValueError(
                f"the reason absent site {site!r:.80} is given must be 1 to {MAX_ABSENT_REASON} "
                f"bytes, got {len(raw_reason)}"
            )
        if not reason.isprintable():
            raise ValueError(
                f"the reason absent site {site!r:.80} is given must be one printable line"
            )
        keys.append(raw_site)
    _check_sorted_unique(keys, "absent sites")  # site_sort_key


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """A round's outcome: survivors, the exact accepted inputs, aggregate and new model.

    ``absent``: each site the coordinator expected in the round (sampled, or named in its
    setup) that is not among the survivors, with one line saying why, sorted by site
    (:func:`absent_items`); a trailing section (tag 1), so a result without it keeps its bytes.
    """

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
    absent: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_digest("base_model_digest", self.base_model_digest)
        _check_digest("new_model_digest", self.new_model_digest)
        _check_digest("aggregate_digest", self.aggregate_digest, optional=True)
        _check_digests("accepted input digest", self.accepted_input_digests)
        _check_sorted_unique(self.accepted_input_digests, "accepted_input_digests")
        _check_sorted_unique([s.encode() for s in self.survivors], "survivors")  # site_sort_key
        _check_metrics(self.metrics)
        _check_absent(self.absent)

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
        if self.absent:  # a trailing section: results without absent sites keep their bytes
            w.u8(1).count(len(self.absent))
            for site, why in self.absent:
                w.text(site).text(why)

    @classmethod
    def _decode(cls, r: Reader) -> RoundRecord:
        run_id, rnd = r.fixed(RUN_ID_BYTES), r.u32()
        status = _enum(RoundStatus, r.u8(), "round status")
        base = r.fixed(DIGEST_BYTES)
        survivors = r.texts(r.count(_MAX_LIST), MAX_ENTRY_TEXT)
        digests = r.fixed_many(r.count(_MAX_LIST), DIGEST_BYTES)
        agg = _read_opt_digest(r)
        new, reason = r.fixed(DIGEST_BYTES), r.text(MAX_ENTRY_TEXT)
        metrics = _decode_metrics(r)
        absent: tuple[tuple[str, str], ...] = ()
        if r.remaining:  # the one trailing section, tag 1, never empty
            tag = r.u8()
            if tag != 1:
                raise DecodeError(f"audit entry: bad round-result section tag {tag}")
            count = r.count(MAX_ABSENT_SITES)
            if not count:
                raise DecodeError("audit entry: empty round-result absent-sites section")
            absent = tuple(
                (r.text(MAX_ENTRY_TEXT), r.text(MAX_ABSENT_REASON)) for _ in range(count)
            )
        try:
            return cls(
                run_id, rnd, status, base, survivors, digests, agg, new, reason, metrics, absent
            )
        except ValueError as exc:
            raise DecodeError(f"audit entry: round result: {exc}") from exc


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
    def _decode(cls, r: Reader) -> Checkpoint:
        return cls(
            r.fixed(RUN_ID_BYTES), r.u32(), r.fixed(DIGEST_BYTES), r.fixed(DIGEST_BYTES),
            r.text(MAX_ENTRY_TEXT),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The federated evaluation of a round's new global model: aggregated metrics, signed.

    The coordinator logs a round's result (and signs a tree head) *before* the new model leaves
    it for evaluation (the commit order), so the evaluation cannot ride in the
    :class:`RoundRecord`: it is this separate entry, written once the evaluation replies are
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
    def _decode(cls, r: Reader) -> Evaluation:
        run_id, rnd = r.fixed(RUN_ID_BYTES), r.u32()
        model, examples = r.fixed(DIGEST_BYTES), r.u64()
        sites = r.texts(r.count(_MAX_LIST), MAX_ENTRY_TEXT)
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
    def _decode(cls, r: Reader) -> RunEnd:
        return cls(
            r.fixed(RUN_ID_BYTES), _enum(RunStatus, r.u8(), "run status"), r.u32(),
            r.fixed(DIGEST_BYTES), r.u64(), r.text(MAX_ENTRY_TEXT),
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
    def _decode(cls, r: Reader) -> ConsortiumRosterRecord:
        consortium, version = r.text(MAX_CONSORTIUM_NAME_BYTES), r.u64()
        digest, payload = r.fixed(DIGEST_BYTES), r.blob(_MAX_CONSORTIUM_ROSTER)
        signature, der = r.blob(MAX_SIGNATURE_SIZE), r.blob(_MAX_KEY)
        return cls(consortium, version, digest, payload, signature, der, r.u64())


@dataclass(frozen=True, slots=True)
class DpRound:
    """A committed DP round's privacy accounting (docs/dp.md §5), after its round result.

    ``dp_params`` are the round's canonical :class:`~fedseal.protocol.dp.DpParams` bytes (the
    parameters its signed setup carried); ``rho`` is the round's zCDP ρ
    (:func:`fedseal.privacy.round_rho` of :func:`fedseal.privacy.dp_round_noise` of them) and
    ``epsilon_so_far`` the run's ε at ``delta`` over every DP round logged so far, this one
    included (:func:`fedseal.privacy.epsilon`). The three floats are IEEE-754 binary64
    big-endian bit patterns; NaN, infinities, -0.0 and values <= 0 are refused. The
    coordinator's claim: the verifier recomputes ρ and ε from ``dp_params`` and fails on a
    difference beyond 1e-9 relative.
    """

    KIND: ClassVar[EntryKind] = EntryKind.DP_ROUND
    run_id: bytes
    round: int
    dp_params: bytes
    rho: float
    epsilon_so_far: float
    delta: float

    def __post_init__(self) -> None:
        if len(self.run_id) != RUN_ID_BYTES:
            raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes")
        if type(self.dp_params) is not bytes or len(self.dp_params) > _MAX_DP_PARAMS:
            raise ValueError(f"dp_params must be at most {_MAX_DP_PARAMS} bytes")
        try:
            DpParams.from_bytes(self.dp_params)
        except ProtocolError as exc:
            raise ValueError(f"dp_params do not decode: {exc}") from exc
        _check_f64("rho", self.rho)
        _check_f64("epsilon_so_far", self.epsilon_so_far)
        _check_f64("delta", self.delta, below_one=True)

    @property
    def params(self) -> DpParams:
        """The decoded round parameters."""
        return DpParams.from_bytes(self.dp_params)

    def _encode(self, w: Writer) -> None:
        w.fixed(self.run_id, RUN_ID_BYTES).u32(self.round).blob(self.dp_params)
        _f64(w, self.rho)
        _f64(w, self.epsilon_so_far)
        _f64(w, self.delta)

    @classmethod
    def _decode(cls, r: Reader) -> DpRound:
        run_id, rnd, params = r.fixed(RUN_ID_BYTES), r.u32(), r.blob(_MAX_DP_PARAMS)
        return cls(run_id, rnd, params, _read_f64(r), _read_f64(r), _read_f64(r))


AuditEntry = (
    Genesis
    | RunStart
    | RosterChange
    | EnvelopeRecord
    | RoundRecord
    | Checkpoint
    | RunEnd
    | ConsortiumRosterRecord
    | Evaluation
    | DpRound
)
"""Any audit-log entry."""


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError as exc:
        raise DecodeError(f"audit entry: unknown {what} {value}") from exc


def _bool(value: int) -> bool:
    if value not in (0, 1):
        raise DecodeError("audit entry: bad boolean")
    return value == 1
