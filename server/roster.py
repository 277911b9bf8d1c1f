"""The coordinator's enrolment book (``roster.json``): enrolled sites, their keys and approved
dataset roots, with a hash-chained history of every change.

:class:`Enrolment` is the coordinator's file; :class:`fedseal.protocol.roster.Roster` is what one
round sees (site -> key, approved roots), built from it.

Usage::

    from fedseal.server.roster import Enrolment
    roster = Enrolment.load_or_create(path)
    roster = roster.enroll("hospital-a", public_key, ["ab" * 32], now_ms=...)
    roster.save(path)                       # atomic replace, mode 0600
    roster.active()                         # enrolled, not revoked
    roster = roster.withdraw_root("hospital-a", "ab" * 32, reason="consent withdrawn", now_ms=...)
    roster = roster.revoke("hospital-a", reason="left the consortium", now_ms=...)

Every change appends a hash-chained event to ``events`` (action, site, key id, dataset roots,
time, reason, SHA-256 of the previous event), so the history of the roster can be replayed into
the audit log; nothing is ever deleted (revoking keeps the site, marked ``revoked``).

Withdrawing a dataset root (GDPR erasure, consent withdrawn) removes it from the site's approved
roots and records the withdrawal (when, why) as a ``withdraw-root`` event: a withdrawn root is
never approved again, for any site (:meth:`Enrolment.enroll` refuses it, and a roster file that
lists it as approved does not load). A revoked site's roots can still be withdrawn.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.keys import key_id, public_key_from_der, public_key_to_der, write_atomic
from fedseal.server.errors import CoordinatorError

__all__ = [
    "MAX_ROSTER_BYTES",
    "Enrolment",
    "EnrolmentError",
    "EnrolmentEvent",
    "SiteEntry",
    "Withdrawal",
    "roots_through",
    "validate_site_name",
]

MAX_ROSTER_BYTES = 64 << 20
MAX_ROOTS_PER_SITE = 64
MAX_REASON_CHARS = 200
"""The longest reason a withdrawal or revocation records (one line)."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_GENESIS = b"\x00" * 32
_EVENT_ACTIONS = frozenset({"enroll", "approve-root", "revoke", "withdraw-root"})


class EnrolmentError(CoordinatorError):
    """A roster operation or file is invalid.

    Attributes:
        site: The site concerned, or ``""``.
        reason: What is wrong.
    """

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site {site!r}: {reason}" if site else reason)
        self.site = site
        self.reason = reason


def validate_site_name(name: str) -> str:
    """Return ``name`` if it is 1-63 chars of ``[a-z0-9_-]`` starting alphanumeric.

    Raises:
        EnrolmentError: Otherwise.
    """
    if not _NAME_RE.fullmatch(name):
        raise EnrolmentError(name, "site names are 1-63 characters of a-z, 0-9, '-', '_'")
    return name


def _validate_root(site: str, root: str) -> str:
    root = root.lower()
    if not _HEX64_RE.fullmatch(root):
        raise EnrolmentError(site, "a dataset root is 64 hex characters (SHA-256)")
    return root


def _validate_reason(site: str, reason: str, *, required: bool) -> str:
    reason = reason.strip()
    if required and not reason:
        raise EnrolmentError(site, "a reason is required (it is recorded in the audit log)")
    if len(reason) > MAX_REASON_CHARS or any(c in reason for c in "\r\n\x00"):
        raise EnrolmentError(
            site, f"the reason must be one line of at most {MAX_REASON_CHARS} characters"
        )
    return reason


def roots_through(events: Sequence[EnrolmentEvent], site: str) -> tuple[str, ...]:
    """A site's approved roots after ``events`` (enrolments and approvals add roots, a
    withdrawal removes them)."""
    roots: list[str] = []
    for e in events:
        if e.site != site:
            continue
        if e.action in ("enroll", "approve-root"):
            roots.extend(r for r in e.dataset_roots if r not in roots)
        elif e.action == "withdraw-root":
            roots = [r for r in roots if r not in e.dataset_roots]
    return tuple(roots)


def _when(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class SiteEntry:
    """One enrolled site."""

    name: str
    public_key_der: bytes
    dataset_roots: tuple[str, ...]
    status: str  # "active" | "revoked"
    enrolled_at_ms: int

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        key: ec.EllipticCurvePublicKey = public_key_from_der(self.public_key_der)
        return key

    @property
    def key_id_hex(self) -> str:
        return bytes(key_id(self.public_key)).hex()

    def openssh_public_key(self) -> bytes:
        """The key in OpenSSH form (what Flower's SuperNode registration expects)."""
        return self.public_key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )


@dataclass(frozen=True, slots=True)
class EnrolmentEvent:
    """One hash-chained roster change."""

    seq: int
    action: str  # "enroll" | "approve-root" | "revoke" | "withdraw-root"
    site: str
    key_id: str
    dataset_roots: tuple[str, ...]  # withdraw-root: the roots withdrawn
    time_ms: int
    prev: str  # hex SHA-256 of the previous event's canonical JSON
    reason: str = ""  # revoke / withdraw-root: why (one line)

    def canonical(self) -> bytes:
        doc: dict[str, Any] = {
            "action": self.action,
            "dataset_roots": list(self.dataset_roots),
            "key_id": self.key_id,
            "prev": self.prev,
            "seq": self.seq,
            "site": self.site,
            "time_ms": self.time_ms,
        }
        if self.reason:  # absent when empty: events written before reasons keep their digests
            doc["reason"] = self.reason
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """A withdrawn dataset root: whose it was, when and why (its ``withdraw-root`` event)."""

    root: str
    site: str
    time_ms: int
    reason: str
    seq: int

    def describe(self) -> str:
        """One line: ``dataset root ab12… of site-a was withdrawn on <date> (<reason>)``."""
        return (
            f"dataset root {self.root[:16]}… of {self.site} was withdrawn on {_when(self.time_ms)}"
            f" ({self.reason})"
        )


@dataclass(frozen=True, slots=True)
class Enrolment:
    """An immutable roster value; every change returns a new one."""

    sites: tuple[SiteEntry, ...] = ()
    events: tuple[EnrolmentEvent, ...] = ()

    # -- queries ----------------------------------------------------------------------------
    def get(self, name: str) -> SiteEntry | None:
        return next((s for s in self.sites if s.name == name), None)

    def active(self) -> tuple[SiteEntry, ...]:
        return tuple(s for s in self.sites if s.status == "active")

    def by_key_id(self, kid_hex: str) -> SiteEntry | None:
        return next((s for s in self.sites if s.key_id_hex == kid_hex), None)

    def digest(self) -> bytes:
        """SHA-256 over the latest event (the head of the chain), or 32 zero bytes."""
        return self.events[-1].digest() if self.events else _GENESIS

    def withdrawn(self) -> Mapping[str, Withdrawal]:
        """Every withdrawn dataset root (hex), with its withdrawal, from the event history."""
        return {
            root: Withdrawal(root, e.site, e.time_ms, e.reason, e.seq)
            for e in self.events
            if e.action == "withdraw-root"
            for root in e.dataset_roots
        }

    def revocation(self, name: str) -> EnrolmentEvent | None:
        """The site's revoke event (its time and reason), or ``None``."""
        return next((e for e in self.events if e.action == "revoke" and e.site == name), None)

    def extends(self, earlier: Enrolment) -> bool:
        """Whether this roster's history continues ``earlier``'s (same events, maybe more):
        a roster file read again mid-run must not have rewritten what was in force."""
        n = len(earlier.events)
        return len(self.events) >= n and (n == 0 or self.events[n - 1].digest() == earlier.digest())

    def update_during_run(self, newer: Enrolment) -> Enrolment:
        """The roster a running run moves to when the roster file changed under it (it is read
        again before every round).

        ``newer``'s changes apply in order up to its first new revocation: a revocation, and
        the changes after it, apply from the next run (a run's cohort and the sites that
        evaluate its models are fixed when it starts). Every root ``newer`` withdraws is
        withdrawn at once, even past that point: refusing a root early is always safe. The
        result's events are the ones applied in order: what the audit log records now.

        Raises:
            EnrolmentError: ``newer``'s history does not continue this one's.
        """
        if not newer.extends(self):
            raise EnrolmentError(
                "",
                "the roster file's history no longer continues the one in force (an event was "
                "changed or removed): refusing to go on with it",
            )
        cut = next(
            (e.seq for e in newer.events[len(self.events) :] if e.action == "revoke"),
            len(newer.events),
        )
        applied = newer.events[:cut]
        withdrawn = newer.withdrawn()
        enrolled = {e.site for e in applied if e.action == "enroll"}
        revoked = {e.site for e in applied if e.action == "revoke"}
        sites = tuple(
            replace(
                s,
                dataset_roots=tuple(
                    r for r in roots_through(applied, s.name) if r not in withdrawn
                ),
                status="revoked" if s.name in revoked else "active",
            )
            for s in newer.sites
            if s.name in enrolled
        )
        return Enrolment(sites, applied)

    # -- changes ----------------------------------------------------------------------------
    def _event(
        self,
        action: str,
        site: str,
        kid: str,
        roots: tuple[str, ...],
        now_ms: int,
        reason: str = "",
    ) -> EnrolmentEvent:
        return EnrolmentEvent(
            seq=len(self.events),
            action=action,
            site=site,
            key_id=kid,
            dataset_roots=roots,
            time_ms=now_ms,
            prev=self.digest().hex(),
            reason=reason,
        )

    def enroll(
        self,
        name: str,
        public_key: ec.EllipticCurvePublicKey,
        dataset_roots: Sequence[str],
        *,
        now_ms: int,
    ) -> Enrolment:
        """Enroll a new site, or approve more dataset roots for an existing active one.

        Raises:
            EnrolmentError: Bad name or root, a root that was withdrawn (never approved again),
                the key belongs to another site, the site is revoked, or the site is enrolled
                with a different key.
        """
        validate_site_name(name)
        roots = tuple(dict.fromkeys(_validate_root(name, r) for r in dataset_roots))
        if not roots:
            raise EnrolmentError(name, "at least one approved dataset root is required")
        withdrawn = self.withdrawn()
        for r in roots:
            if r in withdrawn:
                raise EnrolmentError(
                    name,
                    f"{withdrawn[r].describe()}; a withdrawn root is never approved again "
                    "(the site attests its new dataset and sends its new root)",
                )
        der = public_key_to_der(public_key)
        kid = bytes(key_id(public_key)).hex()
        other = self.by_key_id(kid)
        if other is not None and other.name != name:
            raise EnrolmentError(name, f"this key is already enrolled for site {other.name!r}")
        existing = self.get(name)
        if existing is None:
            entry = SiteEntry(name, der, roots, "active", now_ms)
            return Enrolment(
                (*self.sites, entry),
                (*self.events, self._event("enroll", name, kid, roots, now_ms)),
            )
        if existing.status != "active":
            raise EnrolmentError(name, "the site is revoked; enroll it under a new name")
        if existing.public_key_der != der:
            raise EnrolmentError(name, "the site is enrolled with a different key; revoke it first")
        merged = tuple(dict.fromkeys(existing.dataset_roots + roots))
        if len(merged) > MAX_ROOTS_PER_SITE:
            raise EnrolmentError(name, f"more than {MAX_ROOTS_PER_SITE} approved dataset roots")
        new_roots = tuple(r for r in roots if r not in existing.dataset_roots)
        if not new_roots:
            return self
        updated = replace(existing, dataset_roots=merged)
        return Enrolment(
            tuple(updated if s.name == name else s for s in self.sites),
            (*self.events, self._event("approve-root", name, kid, new_roots, now_ms)),
        )

    def revoke(self, name: str, *, now_ms: int, reason: str = "") -> Enrolment:
        """Mark a site revoked (kept on file so the history stays explainable); ``reason``
        (one line) is recorded in the event and, from there, in the audit log.

        Raises:
            EnrolmentError: If the site is unknown or already revoked, or the reason is not
                one line of at most :data:`MAX_REASON_CHARS` characters.
        """
        reason = _validate_reason(name, reason, required=False)
        existing = self.get(name)
        if existing is None:
            raise EnrolmentError(name, "no such site")
        if existing.status == "revoked":
            raise EnrolmentError(name, "already revoked")
        updated = replace(existing, status="revoked")
        event = self._event("revoke", name, existing.key_id_hex, (), now_ms, reason)
        return Enrolment(
            tuple(updated if s.name == name else s for s in self.sites), (*self.events, event)
        )

    def withdraw_root(self, name: str, root: str, *, reason: str, now_ms: int) -> Enrolment:
        """Withdraw one of a site's approved dataset roots (erasure, consent withdrawn): it
        leaves the site's approved roots and is never approved again, for any site.

        Raises:
            EnrolmentError: Unknown site, a root that is not 64 hex, already withdrawn, or not
                approved for this site; a reason that is empty or not one short line.
        """
        reason = _validate_reason(name, reason, required=True)
        root = _validate_root(name, root)
        existing = self.get(name)
        if existing is None:
            raise EnrolmentError(name, "no such site")
        earlier = self.withdrawn().get(root)
        if earlier is not None:
            raise EnrolmentError(name, f"already withdrawn: {earlier.describe()}")
        if root not in existing.dataset_roots:
            approved = ", ".join(r[:16] + "…" for r in existing.dataset_roots) or "none"
            raise EnrolmentError(
                name,
                f"dataset root {root[:16]}… is not approved for this site (approved: {approved})",
            )
        event = self._event("withdraw-root", name, existing.key_id_hex, (root,), now_ms, reason)
        # Never approved again, for any site: another site holding the same root (a copy of
        # the same dataset) loses it too (found by review: the roster file then failed to load).
        sites = tuple(
            replace(s, dataset_roots=tuple(r for r in s.dataset_roots if r != root))
            if root in s.dataset_roots else s
            for s in self.sites
        )  # fmt: skip
        return Enrolment(sites, (*self.events, event))

    # -- files ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "sites": [
                {
                    "name": s.name,
                    "public_key_der": s.public_key_der.hex(),
                    "key_id": s.key_id_hex,
                    "dataset_roots": list(s.dataset_roots),
                    "status": s.status,
                    "enrolled_at_ms": s.enrolled_at_ms,
                }
                for s in self.sites
            ],
            "events": [json.loads(e.canonical()) for e in self.events],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Enrolment:
        """Parse and re-validate a roster document (hash chain included).

        Raises:
            EnrolmentError: If anything is malformed or the event chain is broken.
        """
        try:
            if doc.get("format") != 1:
                raise EnrolmentError("", "unknown roster format")
            sites = []
            for s in doc["sites"]:
                name = validate_site_name(str(s["name"]))
                der = bytes.fromhex(s["public_key_der"])
                public_key_from_der(der)
                roots = tuple(_validate_root(name, str(r)) for r in s["dataset_roots"])
                if s["status"] not in ("active", "revoked"):
                    raise EnrolmentError(name, f"bad status {s['status']!r}")
                sites.append(SiteEntry(name, der, roots, s["status"], int(s["enrolled_at_ms"])))
            events = []
            prev = _GENESIS
            for i, e in enumerate(doc["events"]):
                ev = EnrolmentEvent(
                    seq=int(e["seq"]),
                    action=str(e["action"]),
                    site=str(e["site"]),
                    key_id=str(e["key_id"]),
                    dataset_roots=tuple(str(r) for r in e["dataset_roots"]),
                    time_ms=int(e["time_ms"]),
                    prev=str(e["prev"]),
                    reason=str(e.get("reason", "")),
                )
                if ev.seq != i or ev.prev != prev.hex():
                    raise EnrolmentError(ev.site, f"roster event {i} breaks the hash chain")
                if ev.action not in _EVENT_ACTIONS:
                    raise EnrolmentError(
                        ev.site, f"roster event {i} has unknown action {ev.action!r}"
                    )
                prev = ev.digest()
                events.append(ev)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, EnrolmentError):
                raise
            raise EnrolmentError("", f"malformed roster file: {type(exc).__name__}") from exc
        if len({s.name for s in sites}) != len(sites):
            raise EnrolmentError("", "duplicate site names in roster file")
        roster = cls(tuple(sites), tuple(events))
        withdrawn = roster.withdrawn()
        for site in sites:
            for r in site.dataset_roots:
                if r in withdrawn:
                    raise EnrolmentError(
                        site.name,
                        f"the roster file lists a withdrawn root as approved: {withdrawn[r].describe()}",
                    )
        return roster

    @classmethod
    def load(cls, path: Path) -> Enrolment:
        """Read a roster file.

        Raises:
            EnrolmentError: If it cannot be read or is invalid.
        """
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_ROSTER_BYTES + 1)
        except OSError as exc:
            raise EnrolmentError("", f"cannot read roster {path}: {exc.strerror}") from exc
        if len(raw) > MAX_ROSTER_BYTES:
            raise EnrolmentError("", f"roster {path} exceeds {MAX_ROSTER_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise EnrolmentError("", f"roster {path} is not JSON") from exc
        return cls.from_json(doc)

    @classmethod
    def load_or_create(cls, path: Path) -> Enrolment:
        return cls.load(path) if path.exists() else cls()

    def save(self, path: Path) -> None:
        """Write atomically (temp file + fsync + rename), mode 0600."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_json(), indent=1, sort_keys=True).encode(), 0o600)
