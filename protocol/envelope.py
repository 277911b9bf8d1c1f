"""Signed envelopes (DESIGN.md §4): frame, sign, and open-then-verify-then-decode.

Wire format (canonical)::

    b"FSE1" | kind u8 | payload (u32 length + bytes) | signature (u32 length + DER) | signer key id (32)

Opening a received envelope is a fixed sequence of steps; each failure is a typed error:

    1. the whole message is within ``Limits.max_message_bytes``     else DecodeError
    2. the frame decodes, the kind is known                          else DecodeError
    3. the kind is one the current stage expects                     else StaleMessageError
    4. the signer's key is resolved by the caller (roster / cohort)  else UnknownSignerError
    5. the signature verifies over the *received* payload bytes      else BadSignatureError
    6. only then is the payload decoded                              else DecodeError

Replay and duplicate detection keys on :attr:`Envelope.content_digest`
(``fedseal.crypto.signing.signed_content_digest``), never on signature bytes: an ECDSA
signature ``(r, s)`` can be rewritten as ``(r, n - s)`` and still verify.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.errors import SignatureError
from fedseal.crypto.keys import key_id
from fedseal.crypto.signing import sign, signed_content_digest

from .config import Limits
from .encoding import Reader, Writer
from .errors import BadSignatureError, DecodeError, StaleMessageError
from .messages import Message, decode_payload
from .seams import NO_SHARING, SharedWork
from .types import DIGEST_BYTES, MessageKind

__all__ = ["MAGIC", "Envelope", "OpenedMessage", "open_envelope", "seal"]

MAGIC = b"FSE1"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A signed message as framed on the wire (not yet verified)."""

    kind: MessageKind
    payload: bytes
    signature: bytes
    signer: bytes

    def to_bytes(self) -> bytes:
        """Canonical wire bytes."""
        w = Writer().raw(MAGIC).u8(int(self.kind)).blob(self.payload).blob(self.signature)
        return w.fixed(self.signer, DIGEST_BYTES).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits) -> Envelope:
        """Decode the frame only (steps 1-2); nothing in it is trusted yet.

        Raises:
            DecodeError: Over the size bound, bad magic, unknown kind, truncated or trailing bytes.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"envelope: expected bytes, got {type(data).__name__}")
        if len(data) > limits.max_message_bytes:
            raise DecodeError(f"envelope of {len(data)} bytes exceeds {limits.max_message_bytes}")
        r = Reader(data, what="envelope")
        if r.fixed(len(MAGIC)) != MAGIC:
            raise DecodeError("envelope: bad magic")
        tag = r.u8()
        try:
            kind = MessageKind(tag)
        except ValueError as exc:
            raise DecodeError(f"envelope: unknown message kind {tag}") from exc
        payload = r.blob(limits.max_message_bytes)
        signature = r.blob(limits.max_signature_bytes)
        signer = r.fixed(DIGEST_BYTES)
        r.finish()
        return cls(kind=kind, payload=payload, signature=signature, signer=signer)

    @property
    def content_digest(self) -> bytes:
        """SHA-256 of the signed content (type + payload): the replay/duplicate key."""
        digest: bytes = signed_content_digest(self.kind.type_name, self.payload)
        return digest


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    """An envelope whose signature verified, and its decoded payload.

    Attributes:
        envelope: The frame as received.
        message: The decoded payload.
        content_digest: Replay/duplicate key (see module docstring).
    """

    envelope: Envelope
    message: Message
    content_digest: bytes


def seal(message: Message, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign ``message``'s canonical payload and frame it as envelope bytes."""
    payload = message.to_payload()
    signature = sign(private_key, message.KIND.type_name, payload)
    signer = bytes(key_id(private_key.public_key()))
    return Envelope(
        kind=message.KIND, payload=payload, signature=signature, signer=signer
    ).to_bytes()


def open_envelope(
    data: bytes,
    limits: Limits,
    *,
    expected: Collection[MessageKind],
    resolve_signer: Callable[[Envelope], ec.EllipticCurvePublicKey],
    shared: SharedWork = NO_SHARING,
) -> OpenedMessage:
    """Steps 1-6 of the module docstring.

    Args:
        data: The received bytes.
        limits: Size bounds.
        expected: The kinds the current stage accepts.
        resolve_signer: Returns the public key that must have signed this envelope
            (raising :class:`~fedseal.protocol.errors.UnknownSignerError` /
            :class:`~fedseal.protocol.errors.RevokedSignerError` if there is none).
        shared: Checks steps 5 and 6 (simulations may share them between virtual sites,
            :mod:`fedseal.protocol.seams`; by default each is made here).

    Raises:
        DecodeError: Malformed bytes (frame or payload).
        StaleMessageError: A kind the current stage does not accept.
        UnknownSignerError, RevokedSignerError: From ``resolve_signer``.
        BadSignatureError: The signature does not verify.
    """
    envelope = Envelope.from_bytes(data, limits)
    if envelope.kind not in expected:
        names = ", ".join(sorted(k.type_name for k in expected))
        raise StaleMessageError(
            f"message kind {envelope.kind.type_name} where {names} was expected"
        )
    public_key = resolve_signer(envelope)
    try:
        shared.verify(public_key, envelope.kind.type_name, envelope.payload, envelope.signature)
    except SignatureError as exc:
        raise BadSignatureError(f"signature on {envelope.kind.type_name} does not verify") from exc
    message = decode_payload(envelope.kind, envelope.payload, limits, shared)
    return OpenedMessage(envelope=envelope, message=message, content_digest=envelope.content_digest)
