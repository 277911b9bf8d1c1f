"""The site's trust anchor: which peers (site -> identity key id) this site accepts.

A site takes its peers from sources the coordinator cannot forge: the consortium roster
(:mod:`fedseal.protocol.consortium`), verified under the roster authority's public key pinned
in ``client.toml``, and a static ``[peers]`` table (site -> key id) in the same file.

Usage::

    from fedseal.client.trust import TrustError, load_site_trust

    trust = load_site_trust(roster_path=Path("roster.json"),
                            authority_key_path=Path("authority.pub"),
                            static_peers={"site-b": "ab12...64 hex"},
                            state_dir=Path("state"))
    trust.peers          # {"site-a": key id (32 bytes), "site-b": ...}
    trust.trusts("site-a", kid)

Rollback protection: the highest roster version accepted under each authority key is kept
in ``state_dir/consortium-roster.seen`` (JSON, replaced atomically) with the roster's
consortium name and SHA-256; a lower version is refused, and so is the same version with
other content or another consortium name. The file is never reset silently: a corrupt
file is an error (delete it deliberately to start over).

Every refusal raises :class:`TrustError` naming the file or ``peers.<site>`` key and why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedseal.client.errors import SiteError
from fedseal.crypto.errors import KeyFormatError
from fedseal.crypto.keys import key_id, load_public_key, write_atomic
from fedseal.protocol.consortium import (
    MAX_ROSTER_JSON_BYTES,
    ConsortiumRoster,
    ConsortiumRosterError,
    RosterContentError,
    SignedConsortiumRoster,
    trusted_keys,
    validate_site_id,
)

__all__ = [
    "SEEN_FILE",
    "SEEN_FORMAT",
    "SiteTrust",
    "TrustError",
    "load_site_trust",
    "read_bounded",
    "read_roster_file",
]

SEEN_FILE = "consortium-roster.seen"
SEEN_FORMAT = "fedseal-consortium-roster-seen-v1"
_MAX_SEEN_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TrustError(SiteError):
    """The site's peer trust cannot be established.

    Attributes:
        key: The file (path) or setting (``peers.<site>``) at fault.
        reason: Why.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SiteTrust:
    """The peers a site accepts.

    Attributes:
        peers: Site -> identity key id (32 bytes): the verified roster's active sites and the
            static ``[peers]`` table together.
        roster_version: Version of the verified roster, ``None`` without a roster.
        consortium: The roster's consortium name, ``None`` without a roster.
        sources: Site -> ``"roster"``, ``"peers"`` or ``"both"``.
    """

    peers: Mapping[str, bytes] = field(default_factory=dict)
    roster_version: int | None = None
    consortium: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", MappingProxyType(dict(self.peers)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def trusts(self, site: str, key_id: bytes) -> bool:
        """Whether ``site`` is a peer and ``key_id`` is its key."""
        return self.peers.get(site) == bytes(key_id)


# --- files ---------------------------------------------------------------------------------


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` bytes of ``path``.

    Raises:
        TrustError: If the file cannot be read or is larger.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise TrustError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise TrustError(str(path), f"file is larger than {max_bytes} bytes")
    return data


def read_roster_file(path: Path, max_bytes: int = MAX_ROSTER_JSON_BYTES) -> SignedConsortiumRoster:
    """Read and strictly parse a roster file (the signature is not checked here).

    Raises:
        TrustError: Naming the file, if it cannot be read or is malformed.
    """
    data = read_bounded(path, max_bytes)
    try:
        return SignedConsortiumRoster.from_json(data, max_bytes)
    except ConsortiumRosterError as exc:
        raise TrustError(str(path), str(exc)) from exc


def _verified_roster(roster_path: Path, authority_key_path: Path) -> tuple[ConsortiumRoster, str]:
    """The roster verified under the pinned key, and that key's id (hex)."""
    try:
        authority = load_public_key(authority_key_path)
    except FileNotFoundError as exc:
        raise TrustError(str(authority_key_path), "roster authority public key not found") from exc
    except OSError as exc:
        raise TrustError(str(authority_key_path), f"cannot read: {exc.strerror or exc}") from exc
    except KeyFormatError as exc:
        raise TrustError(str(authority_key_path), f"not a usable authority key: {exc}") from exc
    signed = read_roster_file(roster_path)
    try:
        roster = signed.verify(authority)
    except ConsortiumRosterError as exc:
        raise TrustError(str(roster_path), str(exc)) from exc
    return roster, bytes(key_id(authority)).hex()


# --- rollback state ------------------------------------------------------------------------


def _read_seen(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    where = str(path)
    bad = "rollback state is malformed (delete it deliberately to start over)"
    try:
        doc = json.loads(read_bounded(path, _MAX_SEEN_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TrustError(where, bad) from exc
    if (
        not isinstance(doc, dict)
        or doc.get("format") != SEEN_FORMAT
        or set(doc)
        != {
            "format",
            "authorities",
        }
    ):
        raise TrustError(where, bad)
    authorities = doc["authorities"]
    if not isinstance(authorities, dict):
        raise TrustError(where, bad)
    for kid, record in authorities.items():
        if (
            not _HEX64.fullmatch(kid)
            or not isinstance(record, dict)
            or set(record) != {"consortium", "version", "digest"}
            or not isinstance(record["consortium"], str)
            or not isinstance(record["version"], int)
            or isinstance(record["version"], bool)
            or record["version"] < 1
            or not isinstance(record["digest"], str)
            or not _HEX64.fullmatch(record["digest"])
        ):
            raise TrustError(where, bad)
    return authorities


def _check_rollback(
    state_dir: Path, authority_kid: str, roster: ConsortiumRoster, roster_path: Path
) -> dict[str, dict[str, Any]] | None:
    """Refuse a rollback; return the state to write if ``roster`` is newer, else ``None``."""
    seen_path = state_dir / SEEN_FILE
    authorities = _read_seen(seen_path)
    digest = roster.digest().hex()
    record = authorities.get(authority_kid)
    if record is not None:
        if record["consortium"] != roster.consortium:
            raise TrustError(
                str(roster_path),
                f"roster is for consortium {roster.consortium!r}, but this site accepted "
                f"consortium {record['consortium']!r} from this authority before "
                f"(see {seen_path})",
            )
        if roster.version < record["version"]:
            raise TrustError(
                str(roster_path),
                f"roster version {roster.version} is older than version {record['version']} "
                "this site accepted before (rollback refused)",
            )
        if roster.version == record["version"]:
            if record["digest"] != digest:
                raise TrustError(
                    str(roster_path),
                    f"roster version {roster.version} differs from the version {roster.version} "
                    "this site accepted before (same version, other content)",
                )
            return None
    updated = dict(authorities)
    updated[authority_kid] = {
        "consortium": roster.consortium,
        "version": roster.version,
        "digest": digest,
    }
    return updated


def _write_seen(state_dir: Path, authorities: dict[str, dict[str, Any]]) -> None:
    path = state_dir / SEEN_FILE
    doc = {"format": SEEN_FORMAT, "authorities": authorities}
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    except OSError as exc:
        raise TrustError(
            str(path), f"cannot record the accepted roster: {exc.strerror or exc}"
        ) from exc


# --- the loader ----------------------------------------------------------------------------


def _static_peers(static_peers: Mapping[str, str]) -> dict[str, bytes]:
    peers: dict[str, bytes] = {}
    owner: dict[bytes, str] = {}
    for site, kid_hex in static_peers.items():
        key = f"peers.{site}"
        try:
            validate_site_id(site)
        except RosterContentError as exc:
            raise TrustError(key, exc.message) from exc
        if not isinstance(kid_hex, str) or not _HEX64.fullmatch(kid_hex.lower()):
            raise TrustError(key, "must be a key id of 64 hex digits (SHA-256 of the DER key)")
        kid = bytes.fromhex(kid_hex)
        other = owner.setdefault(kid, site)
        if other != site:
            raise TrustError(key, f"has the same key id as peers.{other}")
        peers[site] = kid
    return peers


def load_site_trust(
    *,
    roster_path: Path | None,
    authority_key_path: Path | None,
    static_peers: Mapping[str, str],
    state_dir: Path,
) -> SiteTrust:
    """Establish the site's peers from the signed consortium roster and the static table.

    Args:
        roster_path: The consortium roster file, or ``None``.
        authority_key_path: The pinned roster authority public key (PEM), or ``None``; given
            exactly when ``roster_path`` is.
        static_peers: Site -> 64-hex key id (``[peers]`` in ``client.toml``).
        state_dir: Where the highest accepted roster version is remembered.

    Returns:
        The peers; empty when there is neither a roster nor a static peer (the caller decides
        what that means).

    Raises:
        TrustError: Naming the file or key, if only one of the roster and the authority key is
            given, the authority key is missing or unusable, the roster is malformed, not
            signed by the authority or older than one accepted before (or the same version
            with other content), the rollback state is unreadable, or a static peer is
            malformed or contradicts the roster (another key, a revoked site, another site's
            key).
    """
    static = _static_peers(static_peers)
    if (roster_path is None) != (authority_key_path is None):
        if roster_path is not None:
            raise TrustError(
                str(roster_path), "a consortium roster needs the roster authority's public key"
            )
        raise TrustError(
            str(authority_key_path), "a roster authority key is set but no consortium roster"
        )
    if roster_path is None or authority_key_path is None:
        return SiteTrust(peers=static, sources=dict.fromkeys(static, "peers"))

    roster, authority_kid = _verified_roster(roster_path, authority_key_path)
    pending = _check_rollback(state_dir, authority_kid, roster, roster_path)

    from_roster = trusted_keys(roster)
    owner = {s.key_id: s.site for s in roster.sites}
    peers = dict(from_roster)
    sources = dict.fromkeys(from_roster, "roster")
    for site, kid in static.items():
        key = f"peers.{site}"
        entry = roster.site(site)
        if entry is not None and entry.key_id != kid:
            raise TrustError(
                key,
                f"key id {kid.hex()[:16]}… differs from the key of {site!r} in the consortium "
                f"roster version {roster.version} ({entry.key_id.hex()[:16]}…)",
            )
        if entry is not None and not entry.active:
            raise TrustError(
                key, f"{site!r} is revoked in the consortium roster version {roster.version}"
            )
        if entry is None and kid in owner:
            raise TrustError(key, f"key id belongs to {owner[kid]!r} in the consortium roster")
        peers[site] = kid
        sources[site] = "both" if site in from_roster else "peers"

    if pending is not None:
        _write_seen(state_dir, pending)
    return SiteTrust(
        peers=peers,
        roster_version=roster.version,
        consortium=roster.consortium,
        sources=sources,
    )
