"""The roster: enrolled sites, their identity keys, approved dataset roots and status.

The roster is *data* handed to the coordinator's state machine (the server adapter owns
where it is stored and audit-logs every change). The protocol checks, for every message a
site sends: the signer's key id is the one enrolled for that site, the site is active, and
(for masked inputs) the dataset Merkle root is approved for that site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.keys import key_id, public_key_from_der, public_key_to_der

from .encoding import Writer
from .errors import ConfigError, RevokedSignerError, UnknownSignerError
from .types import DIGEST_BYTES, SiteId, site_sort_key

__all__ = ["Roster", "RosterEntry"]


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """One enrolled site.

    Attributes:
        site: The site's id.
        public_key: Its ECDSA P-256 identity key.
        approved_roots: Dataset Merkle roots (32 bytes each) approved for it.
        active: False once revoked.
        key_id: SHA-256 of the key's DER SubjectPublicKeyInfo (derived).
        public_key_der: DER SubjectPublicKeyInfo of the key (derived).
    """

    site: SiteId
    public_key: ec.EllipticCurvePublicKey
    approved_roots: frozenset[bytes] = frozenset()
    active: bool = True
    key_id: bytes = field(init=False, repr=False)
    public_key_der: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.site:
            raise ConfigError("a roster entry needs a non-empty site id")
        for root in self.approved_roots:
            if len(root) != DIGEST_BYTES:
                raise ConfigError(
                    f"approved root of {len(root)} bytes, expected 32", site=self.site
                )
        object.__setattr__(self, "key_id", bytes(key_id(self.public_key)))
        object.__setattr__(self, "public_key_der", public_key_to_der(self.public_key))

    @classmethod
    def from_der(
        cls,
        site: str,
        public_key_der: bytes,
        approved_roots: Iterable[bytes] = (),
        *,
        active: bool = True,
    ) -> RosterEntry:
        """Build an entry from a DER public key.

        Raises:
            fedseal.crypto.errors.KeyFormatError: If the key is not a valid P-256 key.
        """
        return cls(
            site=SiteId(site),
            public_key=public_key_from_der(public_key_der),
            approved_roots=frozenset(approved_roots),
            active=active,
        )


class Roster(Mapping[SiteId, RosterEntry]):
    """An immutable mapping from site id to :class:`RosterEntry`."""

    __slots__ = ("_by_key", "_entries")

    def __init__(self, entries: Iterable[RosterEntry]) -> None:
        self._entries: dict[SiteId, RosterEntry] = {}
        self._by_key: dict[bytes, RosterEntry] = {}
        for entry in entries:
            if entry.site in self._entries:
                raise ConfigError("site enrolled twice", site=entry.site)
            if entry.key_id in self._by_key:
                raise ConfigError("one key enrolled for two sites", site=entry.site)
            self._entries[entry.site] = entry
            self._by_key[entry.key_id] = entry

    def __getitem__(self, site: SiteId) -> RosterEntry:
        return self._entries[site]

    def __iter__(self) -> Iterator[SiteId]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def require_signer(self, site: str, signer_key_id: bytes) -> RosterEntry:
        """The active entry of ``site`` whose key id is ``signer_key_id``.

        Raises:
            UnknownSignerError: If the site is not enrolled or the key is not its key.
            RevokedSignerError: If the site is revoked.
        """
        entry = self._entries.get(SiteId(site))
        if entry is None:
            raise UnknownSignerError("site is not enrolled", site=site)
        if entry.key_id != signer_key_id:
            owner = self._by_key.get(signer_key_id)
            detail = "another site's key" if owner is not None else "a key not enrolled"
            raise UnknownSignerError(f"message signed with {detail}", site=site)
        if not entry.active:
            raise RevokedSignerError("site's key is revoked", site=site)
        return entry

    def digest(self) -> bytes:
        """SHA-256 of the roster's canonical encoding (for the audit log)."""
        w = Writer()
        w.count(len(self._entries))
        for site in sorted(self._entries, key=site_sort_key):
            e = self._entries[site]
            w.text(site).fixed(e.key_id, DIGEST_BYTES).u8(1 if e.active else 0)
            roots = sorted(e.approved_roots)
            w.count(len(roots))
            for root in roots:
                w.fixed(root, DIGEST_BYTES)
        return hashlib.sha256(b"fedseal/v1/roster\x00" + w.to_bytes()).digest()
