"""Signed tree heads, and the bytes a site signs to call the audit service.

A signed tree head (STH) is ``log_id (16) | u64 tree_size | root (32) | u64 timestamp_ms``,
signed with :func:`fedseal.crypto.signing.sign` under message type :data:`TREE_HEAD_TYPE`;
its canonical encoding is those bytes then the ``u32``-prefixed DER signature.

A request to the audit service (:mod:`fedseal.audit.service`) is signed by the calling site
under :data:`AUDIT_REQUEST_TYPE` over :func:`audit_request_payload`, which binds the method, the
site, the time, a nonce and the request's parameters (:func:`audit_request_params`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.entries import LOG_ID_BYTES, MAX_ENVELOPE_SIGNATURE
from fedseal.crypto.errors import SignatureError
from fedseal.crypto.signing import sign, verify
from fedseal.protocol.encoding import Reader, Writer
from fedseal.protocol.errors import BadSignatureError
from fedseal.protocol.types import DIGEST_BYTES

__all__ = [
    "AUDIT_METHODS",
    "AUDIT_REQUEST_TYPE",
    "TREE_HEAD_TYPE",
    "SignedTreeHead",
    "audit_request_params",
    "audit_request_payload",
]

TREE_HEAD_TYPE = "fedseal/v1/audit-tree-head"
"""Message type under which the coordinator signs tree heads."""
AUDIT_REQUEST_TYPE = "fedseal/v1/audit-request"
"""Message type under which a site signs a request to the audit service."""


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A tree head signed by the coordinator (see the module docstring for the bytes)."""

    log_id: bytes
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    signature: bytes

    def payload(self) -> bytes:
        """The signed bytes."""
        w = Writer().fixed(self.log_id, LOG_ID_BYTES).u64(self.tree_size)
        return w.fixed(self.root_hash, DIGEST_BYTES).u64(self.timestamp_ms).to_bytes()

    def to_bytes(self) -> bytes:
        """Canonical encoding: payload then the ``u32``-prefixed DER signature."""
        return Writer().raw(self.payload()).blob(self.signature).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedTreeHead:
        """Decode (not verify) a tree head.

        Raises:
            DecodeError: Malformed bytes.
        """
        r = Reader(data, what="signed tree head")
        head = cls(
            r.fixed(LOG_ID_BYTES),
            r.u64(),
            r.fixed(DIGEST_BYTES),
            r.u64(),
            r.blob(MAX_ENVELOPE_SIGNATURE),
        )
        r.finish()
        return head

    @classmethod
    def create(
        cls,
        key: ec.EllipticCurvePrivateKey,
        *,
        log_id: bytes,
        tree_size: int,
        root_hash: bytes,
        timestamp_ms: int,
    ) -> SignedTreeHead:
        """Sign a tree head with the coordinator's key."""
        unsigned = cls(log_id, tree_size, root_hash, timestamp_ms, b"")
        return cls(
            log_id,
            tree_size,
            root_hash,
            timestamp_ms,
            sign(key, TREE_HEAD_TYPE, unsigned.payload()),
        )

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Check the coordinator's signature.

        Raises:
            BadSignatureError: If it does not verify.
        """
        try:
            verify(public_key, TREE_HEAD_TYPE, self.payload(), self.signature)
        except SignatureError as exc:
            raise BadSignatureError("tree head signature does not verify") from exc


def audit_request_payload(
    method: str, site: str, timestamp_ms: int, nonce: bytes, params: bytes
) -> bytes:
    """Canonical bytes a site signs (type :data:`AUDIT_REQUEST_TYPE`) to call the audit service.

    ``params`` is :func:`audit_request_params` of the request; ``nonce`` is 16 fresh random
    bytes.
    """
    w = Writer().text(method).text(site).u64(timestamp_ms).fixed(nonce, 16).blob(params)
    return w.to_bytes()


AUDIT_METHODS = (
    "GetTreeHead",
    "GetInclusionProof",
    "GetConsistencyProof",
    "GetEntries",
    "FindMyInput",
    "FindModel",
)
"""The audit service's methods (``fedseal.audit.v1.AuditLog``)."""


def audit_request_params(
    method: str, a: int = 0, b: int = 0, run_id: bytes = b"", model_digest: bytes = b""
) -> bytes:
    """Canonical parameter bytes of an audit-service request (signed with the request).

    ``GetTreeHead``: none; ``GetInclusionProof``: ``u64 leaf_index | u64 tree_size``;
    ``GetConsistencyProof``: ``u64 old_size | u64 new_size``; ``GetEntries``:
    ``u64 start | u64 end``; ``FindMyInput``: ``u32 round | run_id`` (``a`` is the round);
    ``FindModel``: ``blob run_id | blob model_digest`` (length-prefixed: the service checks
    the lengths after authenticating the request).

    Raises:
        ValueError: For an unknown method or out-of-range values.
    """
    if method == "GetTreeHead":
        return b""
    if method in ("GetInclusionProof", "GetConsistencyProof", "GetEntries"):
        return Writer().u64(a).u64(b).to_bytes()
    if method == "FindMyInput":
        return Writer().u32(a).raw(run_id).to_bytes()
    if method == "FindModel":
        return Writer().blob(run_id).blob(model_digest).to_bytes()
    raise ValueError(f"unknown audit method {method!r}")
