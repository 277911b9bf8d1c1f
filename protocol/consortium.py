"""The consortium roster: the sites of a consortium and their identity keys, signed offline.

A site must know who its peers are independently of the coordinator: a coordinator that hands
out the cohort's keys could otherwise put one real site and keys of its own into a cohort (a
Sybil cohort). The consortium roster is signed by a *roster authority* key that the coordinator
does not hold (an offline key kept by the consortium's governance); each site pins the
authority's public key and accepts as peers only the roster's active sites.

Example::

    from fedseal.crypto import keys
    from fedseal.protocol.consortium import (ConsortiumRoster, SignedConsortiumRoster,
                                             trusted_keys, with_revoked, with_site)

    authority = keys.generate_identity_key()              # kept offline
    roster = ConsortiumRoster("eu-hospitals", version=1, issued_at_ms=now_ms())
    roster = with_site(roster, "hospital-a", der_a, issued_at_ms=now_ms())   # version 2
    signed = SignedConsortiumRoster.sign(roster, authority)
    text = signed.to_json()                               # roster.json, handed to every site

    # on a site, with the authority's public key pinned in client.toml:
    roster = SignedConsortiumRoster.from_json(text).verify(pinned_authority_key)
    peers = trusted_keys(roster)                          # {"hospital-a": key id, ...}
    # raises ConsortiumRosterError (RosterFormatError, RosterSignatureError, ...) otherwise

Signed bytes (:mod:`fedseal.protocol.encoding`), signed with :func:`fedseal.crypto.signing.sign`
under the message type :data:`ROSTER_TYPE`::

    b"fedseal/v1/consortium-roster\\x00" | text consortium | u64 version | u64 issued_at_ms |
    u32 count | count x (text site | blob public_key_der | u8 active)

Sites are strictly sorted by the UTF-8 bytes of their ids; keys are canonical DER
SubjectPublicKeyInfo (P-256), so every roster has exactly one encoding. ``version`` starts at
1 and grows by one with every edit (:func:`with_site`, :func:`with_revoked`): a site remembers
the highest version it accepted and refuses an older one (rollback protection, kept by the
site; see ``fedseal.client.trust``).

The JSON file (:meth:`SignedConsortiumRoster.to_json`)::

    {"format": "fedseal-consortium-roster-v1",
     "roster": base64 of the signed bytes, "signature": base64 DER ECDSA,
     "authority_key_id": 64 lowercase hex (SHA-256 of the authority's DER public key),
     "readable": {"consortium": ..., "version": ..., "issued_at_ms": ..., "issued_at": ISO-8601,
                  "sites": [{"site": ..., "key_id": hex, "status": "active" | "revoked",
                             "public_key": base64 DER}, ...]}}

``readable`` is a copy for people; it is never trusted, and a file whose copy differs from
the signed bytes is refused. Decoding is strict and bounded (size, duplicate JSON keys,
unknown keys, non-canonical base64 or hex, trailing bytes); every failure raises a
:class:`ConsortiumRosterError` subclass naming what is wrong.

This module does no I/O: reading and writing roster files is the client's business.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.errors import KeyFormatError, SignatureError
from fedseal.crypto.keys import key_id, public_key_from_der
from fedseal.crypto.signing import MAX_SIGNATURE_SIZE, sign, verify

from .encoding import Reader, Writer
from .errors import BadSignatureError, ConfigError, DecodeError, ProtocolError
from .types import DIGEST_BYTES, site_sort_key

__all__ = [
    "MAX_CONSORTIUM_NAME_BYTES",
    "MAX_ROSTER_JSON_BYTES",
    "MAX_ROSTER_SITES",
    "MAX_ROSTER_VERSION",
    "ROSTER_FORMAT",
    "ROSTER_TAG",
    "ROSTER_TYPE",
    "ConsortiumRoster",
    "ConsortiumRosterError",
    "ConsortiumSite",
    "RosterContentError",
    "RosterFormatError",
    "RosterSignatureError",
    "SignedConsortiumRoster",
    "decode_roster",
    "encode_roster",
    "format_time_ms",
    "trusted_keys",
    "validate_site_id",
    "with_revoked",
    "with_site",
]

ROSTER_FORMAT = "fedseal-consortium-roster-v1"
"""Value of the JSON file's ``format`` member."""
ROSTER_TYPE = "fedseal/v1/consortium-roster"
"""Message type under which the roster authority signs the roster bytes."""
ROSTER_TAG = b"fedseal/v1/consortium-roster\x00"
"""Domain tag that starts the signed roster bytes."""

MAX_ROSTER_SITES = 10_000
"""Most sites (active and revoked) in one roster."""
MAX_CONSORTIUM_NAME_BYTES = 128
MAX_ROSTER_VERSION = (1 << 64) - 1
MAX_ISSUED_AT_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: the latest issue time a roster may carry."""
MAX_ROSTER_JSON_BYTES = 8 << 20
"""Default bound on a roster JSON file."""

_MAX_SITE_ID_BYTES = 64
_MAX_KEY_DER_BYTES = 256
# The same rule as the coordinator's enrolment (fedseal.server.roster.validate_site_name):
# lower-case ASCII only, so two different ids can never look alike.
_SITE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_STATUS = {True: "active", False: "revoked"}


# --- errors --------------------------------------------------------------------------------


class ConsortiumRosterError(ProtocolError):
    """Base of the consortium roster's errors (a :class:`~fedseal.protocol.errors.ProtocolError`)."""


class RosterFormatError(ConsortiumRosterError, DecodeError):
    """The roster bytes or JSON file are malformed, non-canonical or over a size bound, or the
    file's readable copy differs from the signed bytes."""


class RosterSignatureError(ConsortiumRosterError, BadSignatureError):
    """The roster is not signed by the pinned roster authority (other key, or bad signature)."""


class RosterContentError(ConsortiumRosterError, ConfigError):
    """A roster being built or edited is invalid: bad site id or consortium name, duplicate
    site or key, version out of range, editing a site that is not there."""


# --- the document --------------------------------------------------------------------------


def validate_site_id(site: object) -> str:
    """Return ``site`` if it is a valid consortium site id (1-63 of ``[a-z0-9_-]``, starting
    alphanumeric; the coordinator's enrolment rule).

    Raises:
        RosterContentError: Otherwise.
    """
    if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
        raise RosterContentError(
            f"site id {site!r} is invalid: 1-63 characters of a-z, 0-9, '-', '_', "
            "starting with a letter or digit"
        )
    return site


def _validate_consortium(name: object) -> str:
    try:
        size = len(name.encode("utf-8")) if isinstance(name, str) else 0
    except UnicodeEncodeError:  # lone surrogates
        size = 0
    if (
        not isinstance(name, str)
        or not 1 <= size <= MAX_CONSORTIUM_NAME_BYTES
        or not name.isprintable()
        or name != name.strip()
    ):
        raise RosterContentError(
            f"consortium name {name!r} is invalid: 1-{MAX_CONSORTIUM_NAME_BYTES} UTF-8 bytes "
            "of printable characters, no leading or trailing space"
        )
    return name


def format_time_ms(ms: int) -> str:
    """``ms`` since the Unix epoch as ISO-8601 UTC with milliseconds (``...T12:00:00.000Z``)."""
    seconds, millis = divmod(ms, 1000)
    moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class ConsortiumSite:
    """One site of the consortium.

    Attributes:
        site: The site's id (as enrolled with the coordinator).
        public_key_der: Its identity key, canonical DER SubjectPublicKeyInfo (P-256).
        active: False once revoked (a revoked site stays in the roster, so its key is never
            re-used by another site).
    """

    site: str
    public_key_der: bytes
    active: bool = True

    def __post_init__(self) -> None:
        validate_site_id(self.site)
        if not isinstance(self.public_key_der, bytes | bytearray | memoryview):
            raise RosterContentError("public key must be DER bytes", site=self.site)
        object.__setattr__(self, "public_key_der", bytes(self.public_key_der))
        if not isinstance(self.active, bool):
            raise RosterContentError("active must be a bool", site=self.site)
        try:
            public_key_from_der(self.public_key_der)
        except KeyFormatError as exc:
            raise RosterContentError(f"public key: {exc}", site=self.site) from exc

    @property
    def key_id(self) -> bytes:
        """SHA-256 of the DER public key (:func:`fedseal.crypto.keys.key_id`)."""
        return hashlib.sha256(self.public_key_der).digest()

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The decoded identity key."""
        return public_key_from_der(self.public_key_der)

    @property
    def status(self) -> str:
        """``"active"`` or ``"revoked"``."""
        return _STATUS[self.active]


@dataclass(frozen=True, slots=True)
class ConsortiumRoster:
    """The consortium's sites at one version.

    ``sites`` may be given in any order; it is stored sorted by site id (UTF-8 bytes).

    Attributes:
        consortium: The consortium's name (1-128 UTF-8 bytes, printable).
        version: 1 or more; every edit adds one.
        issued_at_ms: When the authority issued this version (ms since the Unix epoch).
        sites: Every site, active or revoked, sorted by id; no site twice, no key twice.

    Raises:
        RosterContentError: If any of the above does not hold.
    """

    consortium: str
    version: int
    issued_at_ms: int
    sites: tuple[ConsortiumSite, ...] = ()

    def __post_init__(self) -> None:
        _validate_consortium(self.consortium)
        if (
            not isinstance(self.version, int)
            or isinstance(self.version, bool)
            or not 1 <= self.version <= MAX_ROSTER_VERSION
        ):
            raise RosterContentError(
                f"version must be an integer in 1..2^64-1, got {self.version!r}"
            )
        if (
            not isinstance(self.issued_at_ms, int)
            or isinstance(self.issued_at_ms, bool)
            or not 0 <= self.issued_at_ms <= MAX_ISSUED_AT_MS
        ):
            raise RosterContentError(
                f"issued_at_ms must be an integer in 0..{MAX_ISSUED_AT_MS}, got {self.issued_at_ms!r}"
            )
        sites = tuple(self.sites)
        if any(not isinstance(s, ConsortiumSite) for s in sites):
            raise RosterContentError("sites must be ConsortiumSite values")
        if len(sites) > MAX_ROSTER_SITES:
            raise RosterContentError(f"{len(sites)} sites exceed the bound {MAX_ROSTER_SITES}")
        ordered = tuple(sorted(sites, key=lambda s: site_sort_key(s.site)))
        for a, b in itertools.pairwise(ordered):
            if a.site == b.site:
                raise RosterContentError("site listed twice", site=a.site)
        owner: dict[bytes, str] = {}
        for s in ordered:
            other = owner.setdefault(s.public_key_der, s.site)
            if other != s.site:
                raise RosterContentError(
                    f"site {s.site!r} has the same public key as site {other!r}", site=s.site
                )
        object.__setattr__(self, "sites", ordered)

    def site(self, name: str) -> ConsortiumSite | None:
        """The entry of site ``name`` (active or revoked), or ``None``."""
        for s in self.sites:
            if s.site == name:
                return s
        return None

    def encode(self) -> bytes:
        """The canonical bytes the authority signs (:func:`encode_roster`)."""
        return encode_roster(self)

    def digest(self) -> bytes:
        """SHA-256 of the canonical bytes (what a site remembers for rollback protection)."""
        return hashlib.sha256(encode_roster(self)).digest()


def encode_roster(roster: ConsortiumRoster) -> bytes:
    """Return the canonical signed bytes of ``roster`` (layout in the module docstring)."""
    w = Writer().raw(ROSTER_TAG)
    w.text(roster.consortium).u64(roster.version).u64(roster.issued_at_ms)
    w.count(len(roster.sites))
    for s in roster.sites:
        w.text(s.site).blob(s.public_key_der).u8(1 if s.active else 0)
    return w.to_bytes()


def decode_roster(data: bytes) -> ConsortiumRoster:
    """Decode canonical roster bytes (no signature check: see :class:`SignedConsortiumRoster`).

    Raises:
        RosterFormatError: If the bytes are truncated, carry trailing data, exceed a bound, are
            not canonical (unsorted sites, non-canonical key DER, an ``active`` byte other than
            0/1), or describe an invalid roster (duplicate site or key, bad site id).
    """
    what = "consortium roster"
    try:
        r = Reader(data, what=what)
        if r.fixed(len(ROSTER_TAG)) != ROSTER_TAG:
            raise RosterFormatError(f"{what}: wrong domain tag (not a consortium roster)")
        consortium = r.text(MAX_CONSORTIUM_NAME_BYTES)
        version = r.u64()
        issued_at_ms = r.u64()
        n = r.count(MAX_ROSTER_SITES)
        sites: list[ConsortiumSite] = []
        previous: bytes | None = None
        for _ in range(n):
            name = r.text(_MAX_SITE_ID_BYTES)
            der = r.blob(_MAX_KEY_DER_BYTES)
            flag = r.u8()
            if flag not in (0, 1):
                raise RosterFormatError(f"{what}: active flag {flag} is not 0 or 1", site=name)
            here = site_sort_key(name)
            if previous is not None and here <= previous:
                raise RosterFormatError(
                    f"{what}: sites not strictly sorted (duplicate or out of order)", site=name
                )
            previous = here
            sites.append(ConsortiumSite(name, der, bool(flag)))
        r.finish()
        roster = ConsortiumRoster(consortium, version, issued_at_ms, tuple(sites))
    except RosterFormatError:
        raise
    except (DecodeError, RosterContentError) as exc:
        raise RosterFormatError(
            exc.message if isinstance(exc, DecodeError) else f"{what}: {exc.message}",
            site=exc.site,
        ) from exc
    if encode_roster(roster) != bytes(data):  # defensive: decoding accepts one encoding only
        raise RosterFormatError(f"{what}: not in canonical form")
    return roster


def trusted_keys(roster: ConsortiumRoster) -> dict[str, bytes]:
    """The active sites of ``roster`` and their key ids (site -> 32-byte key id)."""
    return {s.site: s.key_id for s in roster.sites if s.active}


def _next_version(roster: ConsortiumRoster) -> int:
    if roster.version >= MAX_ROSTER_VERSION:
        raise RosterContentError("roster version cannot grow any further")
    return roster.version + 1


def with_site(
    roster: ConsortiumRoster, site: str, public_key_der: bytes, issued_at_ms: int
) -> ConsortiumRoster:
    """Return the next version of ``roster`` with ``site`` added as active.

    A revoked site may be added again with a *new* key (key rotation after a compromise); its
    old key leaves the roster. An active site must be revoked first.

    Raises:
        RosterContentError: If the site is already active, the key is the site's revoked key
            or another site's key, or the site id, key or time is invalid.
    """
    entry = ConsortiumSite(site, public_key_der, True)
    current = roster.site(site)
    if current is not None:
        if current.active:
            raise RosterContentError("site is already in the roster (revoke it first)", site=site)
        if current.public_key_der == entry.public_key_der:
            raise RosterContentError(
                "this key was revoked; a re-added site needs a new key", site=site
            )
    rest = tuple(s for s in roster.sites if s.site != site)
    return ConsortiumRoster(roster.consortium, _next_version(roster), issued_at_ms, (*rest, entry))


def with_revoked(roster: ConsortiumRoster, site: str, issued_at_ms: int) -> ConsortiumRoster:
    """Return the next version of ``roster`` with ``site`` revoked (kept, marked inactive).

    Raises:
        RosterContentError: If the site is not in the roster or is already revoked.
    """
    current = roster.site(site)
    if current is None:
        raise RosterContentError("site is not in the roster", site=site)
    if not current.active:
        raise RosterContentError("site is already revoked", site=site)
    sites = tuple(
        ConsortiumSite(s.site, s.public_key_der, False) if s.site == site else s
        for s in roster.sites
    )
    return ConsortiumRoster(roster.consortium, _next_version(roster), issued_at_ms, sites)


# --- signed document and its JSON file -----------------------------------------------------


def _readable(roster: ConsortiumRoster) -> dict[str, Any]:
    return {
        "consortium": roster.consortium,
        "version": roster.version,
        "issued_at_ms": roster.issued_at_ms,
        "issued_at": format_time_ms(roster.issued_at_ms),
        "sites": [
            {
                "site": s.site,
                "key_id": s.key_id.hex(),
                "status": s.status,
                "public_key": base64.b64encode(s.public_key_der).decode("ascii"),
            }
            for s in roster.sites
        ],
    }


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise RosterFormatError(f"roster file: member {key!r} appears twice")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise RosterFormatError(f"roster file: {name} is not allowed")


def _b64(value: object, member: str, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise RosterFormatError(f"roster file: {member} must be a base64 string")
    if len(value) > 4 * (max_bytes // 3 + 1) or not _B64_RE.fullmatch(value):
        raise RosterFormatError(f"roster file: {member} is not base64 of at most {max_bytes} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RosterFormatError(f"roster file: {member} is not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != value:
        raise RosterFormatError(f"roster file: {member} is not canonical base64")
    return raw


@dataclass(frozen=True, slots=True)
class SignedConsortiumRoster:
    """A roster with the roster authority's signature.

    ``roster`` is *unverified* until :meth:`verify` returns it: read the sites only from the
    roster that :meth:`verify` returns.

    Attributes:
        roster: The roster as decoded (or as signed).
        signature: DER ECDSA P-256 signature over :func:`encode_roster` under :data:`ROSTER_TYPE`.
        authority_key_id: Key id (32 bytes) of the authority key that signed it.
    """

    roster: ConsortiumRoster
    signature: bytes
    authority_key_id: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.roster, ConsortiumRoster):
            raise TypeError("roster must be a ConsortiumRoster")
        if (
            not isinstance(self.signature, bytes)
            or not 8 <= len(self.signature) <= MAX_SIGNATURE_SIZE
        ):
            raise RosterFormatError(f"signature must be 8..{MAX_SIGNATURE_SIZE} bytes")
        if (
            not isinstance(self.authority_key_id, bytes)
            or len(self.authority_key_id) != DIGEST_BYTES
        ):
            raise RosterFormatError(f"authority key id must be {DIGEST_BYTES} bytes")

    @classmethod
    def sign(
        cls, roster: ConsortiumRoster, authority_private_key: ec.EllipticCurvePrivateKey
    ) -> SignedConsortiumRoster:
        """Sign ``roster`` with the roster authority's private key.

        Raises:
            TypeError: If the key is not a P-256 private key.
        """
        signature = sign(authority_private_key, ROSTER_TYPE, encode_roster(roster))
        return cls(roster, signature, bytes(key_id(authority_private_key.public_key())))

    @property
    def payload(self) -> bytes:
        """The signed bytes (:func:`encode_roster` of ``roster``)."""
        return encode_roster(self.roster)

    def verify(self, authority_public_key: ec.EllipticCurvePublicKey) -> ConsortiumRoster:
        """Check the signature under the pinned authority key; return the roster.

        Raises:
            RosterSignatureError: If the roster names another authority key, or the signature
                does not verify under ``authority_public_key``.
            TypeError: If the key is not a P-256 public key.
        """
        pinned = bytes(key_id(authority_public_key))
        if not hmac.compare_digest(pinned, self.authority_key_id):
            raise RosterSignatureError(
                f"roster is signed by authority key {self.authority_key_id.hex()[:16]}…, "
                f"not by the pinned authority key {pinned.hex()[:16]}…"
            )
        try:
            verify(authority_public_key, ROSTER_TYPE, self.payload, self.signature)
        except SignatureError as exc:
            raise RosterSignatureError(
                "roster signature does not verify under the pinned authority key"
            ) from exc
        return self.roster

    def to_json(self) -> str:
        """The roster file's text (format in the module docstring), ending with a newline."""
        doc = {
            "format": ROSTER_FORMAT,
            "roster": base64.b64encode(self.payload).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "authority_key_id": self.authority_key_id.hex(),
            "readable": _readable(self.roster),
        }
        # Non-ASCII text is written as UTF-8, not as \u escapes (whose hex digits may be written in
        # either case): the file has one spelling per value.
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(
        cls, text: str | bytes, max_bytes: int = MAX_ROSTER_JSON_BYTES
    ) -> SignedConsortiumRoster:
        """Parse a roster file strictly (no signature check yet: call :meth:`verify`).

        Raises:
            RosterFormatError: If the text exceeds ``max_bytes``, is not UTF-8 JSON, repeats a
                member, lacks or adds a member, has the wrong ``format``, non-canonical base64
                or hex, roster bytes that do not decode, or a ``readable`` copy that differs
                from the signed bytes.
        """
        size = len(text)
        if isinstance(text, str) and size <= max_bytes:
            size = len(text.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise RosterFormatError(f"roster file: {size} bytes exceed the bound {max_bytes}")
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RosterFormatError("roster file: not valid UTF-8") from exc
        try:
            doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except RosterFormatError:
            raise
        except (ValueError, RecursionError) as exc:
            raise RosterFormatError(f"roster file: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise RosterFormatError("roster file: not a JSON object")
        expected = {"format", "roster", "signature", "authority_key_id", "readable"}
        missing = sorted(expected - set(doc))
        if missing:
            raise RosterFormatError(f"roster file: member {missing[0]!r} is missing")
        extra = sorted(set(doc) - expected)
        if extra:
            raise RosterFormatError(f"roster file: unknown member {extra[0]!r}")
        if doc["format"] != ROSTER_FORMAT:
            raise RosterFormatError(
                f"roster file: format {doc['format']!r} is not {ROSTER_FORMAT!r}"
            )
        payload = _b64(doc["roster"], "roster", max_bytes)
        signature = _b64(doc["signature"], "signature", MAX_SIGNATURE_SIZE)
        kid = doc["authority_key_id"]
        if not isinstance(kid, str) or not _HEX64_RE.fullmatch(kid):
            raise RosterFormatError("roster file: authority_key_id must be 64 lowercase hex digits")
        roster = decode_roster(payload)
        if _canonical_json(doc["readable"]) != _canonical_json(_readable(roster)):
            raise RosterFormatError(
                "roster file: the readable copy differs from the signed roster (edited by hand?)"
            )
        return cls(roster, signature, bytes.fromhex(kid))
