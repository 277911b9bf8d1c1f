"""Work the virtual sites of one simulation process share: signature checks, decoded broadcast
messages, neighbour graphs and opened key adverts (the simulation's
:class:`fedseal.protocol.seams.SharedWork`).

In a simulation many virtual sites run in one process, and every one of them checks the same
signatures (all N key adverts, a majority of the N survivor signatures: N sites made N^2 checks
of N signatures), decodes the same broadcast messages (the round setup naming N sites, the
bundle of N key adverts, the survivor set, the unmask request) and builds the same neighbour
graph from the same public seed: N sites doing O(N) work each, one after another on a few
cores, where deployed sites work in parallel. A :class:`SharedWork` handed to each site's
session (``SiteRuntime.shared_work``; :class:`fedseal.sim.inmemory.Federation`'s ``shared``)
lets them do it once:

* :meth:`SharedWork.verify` remembers the verifications that *succeeded*, for exactly the same
  public key (its encoded point), message type, payload and signature bytes; a failure is never
  remembered, so a forged, substituted or malleated input is checked, and refused, every time,
  and the answer is the one :func:`fedseal.crypto.signing.verify` gives;
* :meth:`SharedWork.remembered` keeps the results of
  :func:`fedseal.protocol.messages.decode_payload` (``"decoded"``),
  :func:`fedseal.protocol.graph.build_graph` (``"graphs"``) and a session's opened key adverts
  (``"adverts"``: frame decoded, signature verified under the key with the advert's signer key
  id, payload decoded). These are pure functions of their key and return frozen values (tuples,
  frozen dataclasses, read-only mappings), so a remembered result is the one a fresh call
  would give; only successes are kept: malformed bytes are decoded, and refused, every time;
* nothing a check depends on is skipped: a site still verifies each signature (through the
  rules above), and still checks every header, cohort and sender against its own session, on
  the shared decoded value. A remembered advert says only that its signature verified under
  the key whose id it names (a key id is the SHA-256 of the key's one canonical DER, so one
  key); each site still maps that id to a member of its own cohort, or refuses it.

A deployed site is its own process and never uses it (its sessions run with
:data:`fedseal.protocol.seams.NO_SHARING`). Memory is bounded: at most ``capacity`` results
per table and ``verified_capacity`` remembered verifications (32 bytes each), least recently
used dropped first; inputs over :data:`fedseal.protocol.seams.MAX_KEY_BYTES` are never kept.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto import signing
from fedseal.protocol.seams import Verifier

__all__ = ["TABLES", "Memo", "SharedWork", "VerifiedChecks"]

T = TypeVar("T")

TABLES = ("decoded", "graphs", "adverts")
"""The tables :meth:`SharedWork.remembered` keeps."""

_POINTS_CACHED = 4096
_X962 = serialization.Encoding.X962
_UNCOMPRESSED = serialization.PublicFormat.UncompressedPoint


class Memo(Generic[T]):
    """A bounded least-recently-used map from hashable keys to results.

    Safe to share between threads without a lock: each ``OrderedDict`` operation below is
    atomic, and a lookup racing an eviction only computes the result again.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The remembered result for ``key``, else ``compute()`` (remembered if it returns)."""
        entries = self._entries
        try:
            value = entries[key]
            entries.move_to_end(key)
            return value
        except KeyError:
            pass
        value = compute()  # an exception propagates: nothing is remembered
        entries[key] = value
        while len(entries) > self.capacity:
            try:
                entries.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
        return value

    def __len__(self) -> int:
        return len(self._entries)


class VerifiedChecks:
    """SHA-256 of (public key point, message type, payload, signature) of the successful
    verifications, least recently used dropped first.

    Args:
        capacity: Most verifications remembered.
        check: The verification made on a miss (:func:`fedseal.crypto.signing.verify`).

    Raises:
        ValueError: ``capacity`` is not positive.
    """

    def __init__(self, capacity: int, check: Verifier = signing.verify) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._check = check
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        # Encoded points of recently used key objects, by id(); the key is held so that its id
        # is not reused while the entry lives.
        self._points: OrderedDict[int, tuple[ec.EllipticCurvePublicKey, bytes]] = OrderedDict()

    def verify(
        self,
        public_key: ec.EllipticCurvePublicKey,
        message_type: str,
        payload: bytes,
        signature: bytes,
    ) -> None:
        """As :func:`fedseal.crypto.signing.verify`; a success is remembered, a failure never.

        Raises:
            SignatureError: The signature is malformed or does not verify.
            TypeError: ``public_key`` is not an EC public key.
            ValueError: ``message_type`` is empty or too long.
        """
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError("expected an ECDSA P-256 public key")
        key = self._key(public_key, message_type, payload, signature)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        self._check(public_key, message_type, payload, signature)  # raises: nothing remembered
        with self._lock:
            self._entries[key] = None
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def _key(
        self, public_key: ec.EllipticCurvePublicKey, message_type: str, payload: bytes,
        signature: bytes,
    ) -> bytes:
        h = hashlib.sha256()
        for part in (self._point(public_key), message_type.encode("utf-8"), payload, signature):
            h.update(struct.pack(">Q", len(part)))
            h.update(part)
        return h.digest()

    def _point(self, public_key: ec.EllipticCurvePublicKey) -> bytes:
        with self._lock:
            entry = self._points.get(id(public_key))
            if entry is not None and entry[0] is public_key:
                self._points.move_to_end(id(public_key))
                return entry[1]
        point = public_key.public_bytes(_X962, _UNCOMPRESSED)
        with self._lock:
            self._points[id(public_key)] = (public_key, point)
            while len(self._points) > _POINTS_CACHED:
                self._points.popitem(last=False)
        return point

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SharedWork:
    """The work one simulation process's virtual sites share (see the module docstring).

    Args:
        capacity: Results kept per table (``"decoded"``, ``"graphs"``, ``"adverts"``).
        verified_capacity: Successful verifications kept.

    Raises:
        ValueError: A capacity is not positive.
    """

    def __init__(self, capacity: int = 1024, verified_capacity: int = 65536) -> None:
        self.verified = VerifiedChecks(verified_capacity)
        self.tables: dict[str, Memo[object]] = {name: Memo(capacity) for name in TABLES}

    def verify(
        self,
        public_key: ec.EllipticCurvePublicKey,
        message_type: str,
        payload: bytes,
        signature: bytes,
    ) -> None:
        """:meth:`VerifiedChecks.verify`."""
        self.verified.verify(public_key, message_type, payload, signature)

    def remembered(self, which: str, key: Hashable | None, compute: Callable[[], T]) -> T:
        """``compute()``, through the table named ``which``; a ``None`` key (an input over
        :data:`~fedseal.protocol.seams.MAX_KEY_BYTES`) is computed every time, never kept.

        The caller's ``compute`` must return what the key determines (see the module
        docstring); its exceptions propagate and nothing is remembered.

        Raises:
            ValueError: No table is named ``which``.
        """
        table = self.table(which)
        if key is None:
            return compute()
        return cast(T, table.get(key, compute))

    def table(self, which: str) -> Memo[object]:
        """The table named ``which``.

        Raises:
            ValueError: No table is named so.
        """
        try:
            return self.tables[which]
        except KeyError:
            raise ValueError(f"no memo named {which!r}") from None
