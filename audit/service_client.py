"""A site's gRPC client of the coordinator's audit service (:mod:`fedseal.audit.service`).

Every request is signed with the site's identity key (``fedseal/v1/audit-request`` over
:func:`fedseal.audit.treehead.audit_request_payload`); requests and responses are the generated
messages of ``fedseal/audit/proto/audit.proto``. The channel carries raw bytes, so a malformed
response is parsed here and reported as ``DATA_LOSS``. :class:`GrpcAuditSource` is the
:class:`fedseal.audit.receipts.AuditSource` a deployed site's receipt checker uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from fedseal.audit.errors import AuditServiceError
from fedseal.audit.proto import audit_pb2
from fedseal.audit.treehead import (
    AUDIT_REQUEST_TYPE,
    audit_request_params,
    audit_request_payload,
)
from fedseal.crypto.signing import sign

__all__ = ["GrpcAuditSource"]


_SERVICE = "/fedseal.audit.v1.AuditLog/"
_MAX_RESPONSE = 8 * 1024 * 1024
_Response = TypeVar("_Response", bound=Message)


def _parse(response_type: type[_Response], data: object) -> _Response:
    """Decode a response message.

    Raises:
        AuditServiceError: ``DATA_LOSS`` if the bytes are too large or not a valid message.
    """
    if not isinstance(data, bytes) or len(data) > _MAX_RESPONSE:
        raise AuditServiceError("response too large or not bytes", code="DATA_LOSS")
    try:
        message: _Response = response_type.FromString(data)
    except ProtobufDecodeError as exc:
        raise AuditServiceError(f"malformed response: {exc}", code="DATA_LOSS") from exc
    wrong = _mistyped_field(message)
    if wrong is not None:
        raise AuditServiceError(f"malformed response: {wrong}", code="DATA_LOSS")
    return message


def _mistyped_field(message: Message) -> str | None:
    """A known field sent with another wire type, in ``message`` or a message inside it.

    protobuf keeps such a field as an unknown one and leaves the real field at its default (0,
    empty, false), which a reader would take for an answer; the service never sends one, so it
    is malformed data, as a truncated message is. Unknown field *numbers* stay allowed.
    """
    known = message.DESCRIPTOR.fields_by_number
    for field in UnknownFieldSet(message):
        if field.field_number in known:
            return f"field {known[field.field_number].name} has the wrong wire type"
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        nested = value if descriptor.is_repeated else [value]
        for item in nested:
            found = _mistyped_field(item)
            if found is not None:
                return found
    return None


class GrpcAuditSource:
    """:class:`AuditSource` over the coordinator's gRPC audit service.

    Every request is signed with the site's identity key over a fresh 16-byte nonce and the
    current time (see ``fedseal.audit.service`` for what the service checks).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        site: str,
        key: ec.EllipticCurvePrivateKey,
        clock: Callable[[], int],
        randbytes: Callable[[int], bytes] = os.urandom,
        timeout_s: float = 30.0,
    ) -> None:
        self._channel = channel
        self._site = site
        self._key = key
        self._clock = clock
        self._randbytes = randbytes
        self._timeout = timeout_s

    def _call(
        self,
        method: str,
        request: Message,
        params: bytes,
        response_type: type[_Response],
    ) -> _Response:
        """Sign ``request`` (its ``auth`` field is filled here), send it, decode the answer."""
        nonce = self._randbytes(16)
        ts = self._clock()
        signature = sign(
            self._key,
            AUDIT_REQUEST_TYPE,
            audit_request_payload(method, self._site, ts, nonce, params),
        )
        auth = audit_pb2.RequestAuth(
            site_id=self._site, timestamp_ms=ts, nonce=nonce, signature=signature
        )
        request.auth.CopyFrom(auth)
        stub = self._channel.unary_unary(
            _SERVICE + method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            response = stub(request.SerializeToString(), timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise AuditServiceError(str(details), code=str(code)) from exc
        return _parse(response_type, response)

    def latest_tree_head(self) -> bytes:
        """The latest signed tree head's canonical bytes.

        Raises:
            AuditServiceError: The call failed.
        """
        method = "GetTreeHead"
        reply = self._call(
            method, audit_pb2.TreeHeadRequest(), audit_request_params(method),
            audit_pb2.TreeHeadResponse,
        )  # fmt: skip
        return bytes(reply.signed_tree_head)

    def inclusion_proof(self, index: int, tree_size: int) -> tuple[bytes, list[bytes]]:
        """``(entry bytes, audit path)`` of entry ``index`` in the tree of ``tree_size``.

        Raises:
            AuditServiceError: The call failed or answered for another leaf or size.
        """
        method = "GetInclusionProof"
        reply = self._call(
            method,
            audit_pb2.InclusionProofRequest(leaf_index=index, tree_size=tree_size),
            audit_request_params(method, index, tree_size),
            audit_pb2.InclusionProofResponse,
        )
        if reply.leaf_index != index or reply.tree_size != tree_size:
            raise AuditServiceError("response is for another leaf or size", code="DATA_LOSS")
        return bytes(reply.entry), [bytes(h) for h in reply.audit_path]

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof between two sizes.

        Raises:
            AuditServiceError: The call failed.
        """
        method = "GetConsistencyProof"
        reply = self._call(
            method,
            audit_pb2.ConsistencyProofRequest(old_size=old_size, new_size=new_size),
            audit_request_params(method, old_size, new_size),
            audit_pb2.ConsistencyProofResponse,
        )
        return [bytes(h) for h in reply.proof]

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Entries ``[start, end)`` as ``(index, bytes)`` (fewer if over the service's bounds).

        Raises:
            AuditServiceError: The call failed.
        """
        method = "GetEntries"
        reply = self._call(
            method,
            audit_pb2.EntriesRequest(start=start, end=end),
            audit_request_params(method, start, end),
            audit_pb2.EntriesResponse,
        )
        return [(e.index, bytes(e.data)) for e in reply.entries]

    def find_input(self, round: int, run_id: bytes) -> int | None:
        """Index of this site's accepted masked input in ``round`` of ``run_id``, if any.

        Raises:
            AuditServiceError: The call failed.
        """
        method = "FindMyInput"
        reply = self._call(
            method,
            audit_pb2.FindInputRequest(run_id=run_id, round=round),
            audit_request_params(method, round, run_id=run_id),
            audit_pb2.FindInputResponse,
        )
        return reply.leaf_index if reply.found else None

    def find_model(self, run_id: bytes, model_digest: bytes) -> int | None:
        """Index of the entry that committed ``model_digest`` in run ``run_id``: the run start
        (initial model) or a completed round result, or ``None`` if the log committed no such
        model in that run. Prove the entry with :meth:`inclusion_proof` and decode it before
        trusting it.

        Raises:
            AuditServiceError: The call failed (``INVALID_ARGUMENT``: ``run_id`` is not 16
                bytes or ``model_digest`` not 32).
        """
        method = "FindModel"
        reply = self._call(
            method,
            audit_pb2.FindModelRequest(run_id=run_id, model_digest=model_digest),
            audit_request_params(method, run_id=run_id, model_digest=model_digest),
            audit_pb2.FindModelResponse,
        )
        return reply.leaf_index if reply.found else None
