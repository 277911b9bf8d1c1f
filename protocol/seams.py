"""The seam through which a site's protocol work may be shared: signature checks and pure
decodes, injected, never global.

A site's :class:`~fedseal.protocol.client.ClientSession`, :func:`fedseal.protocol.graph.build_graph`,
:func:`fedseal.protocol.messages.decode_payload` and
:func:`fedseal.protocol.envelope.open_envelope` take a :class:`SharedWork`; the default,
:data:`NO_SHARING`, checks every signature and decodes every payload itself and holds no state.
A deployed site is its own process and always runs with it. Only a simulation, where many
virtual sites of one process check the same signatures and decode the same broadcast bytes,
passes an implementation that remembers results (``fedseal.sim.shared_work``). Any
implementation must keep these rules, on which the site's checks rely:

* :meth:`SharedWork.verify` answers exactly as :func:`fedseal.crypto.signing.verify` does for the
  same arguments (returns, or raises the same exception type): only a success may be
  remembered, so a forged, substituted or malleated input is checked, and refused, every time;
* :meth:`SharedWork.remembered` returns what ``compute()`` returns, or raises what it raises;
  ``compute`` is a pure function of ``key`` (it must return frozen values), only its successes
  may be kept, and a ``None`` key is computed every time;
* nothing a site checks against its own session (headers, cohort, senders) goes through it:
  those checks run on the shared decoded value, at every site.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Final, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto import signing

__all__ = ["MAX_KEY_BYTES", "NO_SHARING", "NoSharing", "SharedWork", "Verifier"]

MAX_KEY_BYTES: Final = 1 << 20
"""Inputs larger than this (1 MiB) are never used as keys: callers pass a ``None`` key for them."""

T = TypeVar("T")


class Verifier(Protocol):
    """:func:`fedseal.crypto.signing.verify`'s signature: returns ``None`` or raises
    :class:`~fedseal.crypto.errors.SignatureError` (``TypeError``/``ValueError`` for bad
    arguments)."""

    def __call__(
        self,
        public_key: ec.EllipticCurvePublicKey,
        message_type: str,
        payload: bytes,
        signature: bytes,
    ) -> None: ...


class SharedWork(Protocol):
    """Signature checks and pure computations a site may share (see the module docstring)."""

    def verify(
        self,
        public_key: ec.EllipticCurvePublicKey,
        message_type: str,
        payload: bytes,
        signature: bytes,
    ) -> None:
        """As :func:`fedseal.crypto.signing.verify`."""
        ...

    def remembered(self, which: str, key: Hashable | None, compute: Callable[[], T]) -> T:
        """``compute()``, or the result it gave before for ``key`` in the table ``which``
        (``"decoded"``, ``"graphs"`` or ``"adverts"``)."""
        ...


class NoSharing:
    """The production seam: every check and every decode is made, nothing is kept."""

    __slots__ = ()

    def verify(
        self,
        public_key: ec.EllipticCurvePublicKey,
        message_type: str,
        payload: bytes,
        signature: bytes,
    ) -> None:
        """:func:`fedseal.crypto.signing.verify`, every time."""
        signing.verify(public_key, message_type, payload, signature)

    def remembered(self, which: str, key: Hashable | None, compute: Callable[[], T]) -> T:
        """``compute()``, every time."""
        return compute()


NO_SHARING: Final[SharedWork] = NoSharing()
"""The default of every production path (stateless)."""
