"""Work shared between the virtual sites of one simulation process (off unless turned on).

In a simulation many virtual sites run in one process, and every one of them decodes the same
broadcast messages (the round setup naming N sites, the bundle of N key adverts, the survivor
set, the unmask request) and builds the same neighbour graph from the same public seed: N sites
doing O(N) work each, one after another on a few cores, where deployed sites work in parallel.
:func:`share_decoded` makes :func:`fedseal.protocol.messages.decode_payload` and
:func:`fedseal.protocol.graph.build_graph` remember their results for exactly the same input,
the way :func:`fedseal.crypto.signing.share_verified` remembers signature checks, and lets a
site remember each key advert of the bundle it opened (frame decoded, signature verified under
the key with the advert's signer key id, payload decoded: the ``"adverts"`` memo, used by
:class:`fedseal.protocol.client.ClientSession`):

* both are pure functions of their arguments and return frozen values (tuples, frozen
  dataclasses, read-only mappings), so a remembered result is the one a fresh call would give;
* only successes are kept: malformed bytes are decoded, and refused, every time;
* nothing a check depends on is skipped: a site still verifies each signature (through the
  signature memo's rules), and still checks every header, cohort and sender against its own
  session, on the shared decoded value. A remembered advert says only that its signature
  verified under the key whose id it names (a key id is the SHA-256 of the key's one canonical
  DER, so one key); each site still maps that id to a member of its own cohort, or refuses it.

A deployed site is its own process and never turns it on. Memory is bounded: at most
``capacity`` entries per memo, least recently used dropped first, and inputs over
:data:`MAX_KEY_BYTES` are never kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, cast

__all__ = ["MAX_KEY_BYTES", "Memo", "remembered", "share_decoded", "shared"]

MAX_KEY_BYTES = 1 << 20
"""Payloads larger than this (1 MiB) are decoded every time, never remembered."""

T = TypeVar("T")


class Memo(Generic[T]):
    """A bounded least-recently-used map from hashable keys to results.

    Safe to share between threads without a lock (the protocol package does no threading):
    each ``OrderedDict`` operation below is atomic, and a lookup racing an eviction only
    computes the result again.
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


_decoded: Memo[object] | None = None
_graphs: Memo[object] | None = None
_adverts: Memo[object] | None = None


def share_decoded(capacity: int | None = 1024) -> None:
    """Turn the shared decoding on (``capacity`` entries per memo) or off (``None``).

    Calling it again with the same capacity keeps what is remembered.

    Raises:
        ValueError: ``capacity`` is not positive.
    """
    global _decoded, _graphs, _adverts
    if capacity is None:
        _decoded = _graphs = _adverts = None
        return
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    if _decoded is None or _decoded.capacity != capacity:
        _decoded, _graphs, _adverts = Memo(capacity), Memo(capacity), Memo(capacity)


def shared(which: str) -> Memo[object] | None:
    """The memo named ``"decoded"``, ``"graphs"`` or ``"adverts"``, or ``None`` while sharing
    is off."""
    if which == "decoded":
        return _decoded
    if which == "graphs":
        return _graphs
    if which == "adverts":
        return _adverts
    raise ValueError(f"no memo named {which!r}")


def remembered(which: str, key: Hashable | None, compute: Callable[[], T]) -> T:
    """``compute()``, through the memo named ``which`` while sharing is on; a ``None`` key (an
    input over :data:`MAX_KEY_BYTES`) is computed every time, never remembered.

    The caller's ``compute`` must return what the key determines (see the module docstring);
    its exceptions propagate and nothing is remembered.
    """
    memo = shared(which)
    if memo is None or key is None:
        return compute()
    return cast(T, memo.get(key, compute))
