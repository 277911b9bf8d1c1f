"""The coordinator's gRPC audit service for partner sites (TLS, enrolled sites only).

Example (coordinator)::

    server = serve_audit_log(
        audit_log.store, roster=audit_log.roster, address="0.0.0.0:9093",
        tls=TlsServerConfig(cert_chain_pem=cert, private_key_pem=key), clock=now_ms,
    )
    ...
    server.stop(grace=5)

Example (site; the client lives in ``fedseal.audit.receipts`` because the client layer may
not import the server's generated code)::

    channel = grpc.secure_channel("coordinator:9093", grpc.ssl_channel_credentials(ca_pem))
    source = GrpcAuditSource(channel, site="site-a", key=site_key, clock=now_ms)
    head_bytes = source.latest_tree_head()

Protocol: ``fedseal.audit.proto/audit.proto`` (generated code committed, see its package
docstring). Methods: latest signed tree head, inclusion proof (with the leaf's entry bytes),
consistency proof, entries by range, the index of the caller's own accepted masked input, and
the index of the entry that committed a model of a run (:func:`find_model`: a site checks that
the model it is asked to train or evaluate is one the log committed, then proves that entry's
inclusion like its receipts).

Authentication — *signed requests*: every request carries ``RequestAuth`` (site id, timestamp,
16-byte nonce, ECDSA signature by the site's enrolled identity key over
:func:`fedseal.audit.treehead.audit_request_payload` with the method name and the request's
parameters in canonical bytes). The service answers only if, in this order:

1. the site is enrolled and active in the log's roster (else ``PERMISSION_DENIED``);
2. the signature verifies under its enrolled key (else ``UNAUTHENTICATED``);
3. the timestamp is within ``max_clock_skew_ms`` of the server's clock (else ``UNAUTHENTICATED``);
4. the (site, nonce) pair was not seen within the skew window (else ``UNAUTHENTICATED``).

We chose signed requests over mutual TLS because the sites' enrolled ECDSA keys *are* their
identities in the roster: no second PKI of site certificates to issue and revoke, and a
revocation in the roster takes effect on the next request. TLS still protects the channel and
authenticates the coordinator (clients pin its CA).

Bounds: requests over ``max_request_bytes`` are refused by gRPC (``RESOURCE_EXHAUSTED``);
entry ranges are capped at ``max_entries`` per call and ``max_response_bytes`` in total; out of
range indices/sizes give ``OUT_OF_RANGE``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import EntryKind, RoundRecord, RoundStatus, RunStart
from fedseal.audit.errors import AuditLogError, LogRangeError
from fedseal.audit.proto import audit_pb2, audit_pb2_grpc
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.treehead import AUDIT_REQUEST_TYPE, audit_request_params, audit_request_payload
from fedseal.audit.writer import find_input
from fedseal.crypto.errors import SignatureError
from fedseal.crypto.keys import public_key_from_der
from fedseal.crypto.signing import verify
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.roster import Roster
from fedseal.protocol.types import DIGEST_BYTES, RUN_ID_BYTES, SiteId

__all__ = [
    "AuditServiceConfig",
    "AuditServicer",
    "TlsServerConfig",
    "find_model",
    "request_params",
    "serve_audit_log",
]

_NONCE_BYTES = 16


@dataclass(frozen=True, slots=True)
class AuditServiceConfig:
    """Bounds of the audit service.

    Attributes:
        max_request_bytes: Largest accepted request message.
        max_entries: Most entries returned by one ``GetEntries`` call.
        max_response_bytes: Most entry bytes returned by one call.
        max_clock_skew_ms: Largest accepted difference between a request's timestamp and now.
        max_nonces: Most remembered (site, nonce) pairs (replay cache).
        max_workers: Server threads.
    """

    max_request_bytes: int = 16 * 1024
    max_entries: int = 256
    max_response_bytes: int = 4 * 1024 * 1024
    max_clock_skew_ms: int = 120_000
    max_nonces: int = 100_000
    max_workers: int = 4

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) <= 0:
                raise ValueError(f"audit service config: {name} must be positive")


@dataclass(frozen=True, slots=True)
class TlsServerConfig:
    """PEM server certificate chain and private key (the clients pin the issuing CA)."""

    cert_chain_pem: bytes
    private_key_pem: bytes


def request_params(method: str, request: Any) -> bytes:
    """The canonical parameter bytes of a received request (see ``audit_request_params``).

    Raises:
        ValueError: For an unknown method.
    """
    params: bytes
    if method == "GetInclusionProof":
        params = audit_request_params(method, request.leaf_index, request.tree_size)
    elif method == "GetConsistencyProof":
        params = audit_request_params(method, request.old_size, request.new_size)
    elif method == "GetEntries":
        params = audit_request_params(method, request.start, request.end)
    elif method == "FindMyInput":
        params = audit_request_params(method, request.round, run_id=bytes(request.run_id))
    elif method == "FindModel":
        params = audit_request_params(
            method, run_id=bytes(request.run_id), model_digest=bytes(request.model_digest)
        )
    else:
        params = audit_request_params(method)
    return params


def find_model(store: MerkleLogStore, run_id: bytes, model_digest: bytes) -> int | None:
    """Index of the entry that committed ``model_digest`` in run ``run_id``, or ``None``.

    A model is committed by the run's :class:`~fedseal.audit.entries.RunStart` (its
    ``initial_model_digest``) or by a *completed* :class:`~fedseal.audit.entries.RoundRecord`
    of that run (its ``new_model_digest``); a failed or abandoned round commits nothing (its
    digest is the unchanged model, committed by an earlier entry, which is the one returned).
    The run start is checked first, then the run's round results newest first (a site usually
    asks about the latest model), so the answer is the run start or the latest completed round
    that produced the model.

    Cost: the store's kind index lists the run starts and round results; the run starts are
    decoded until the run is found (one per run), then at most the run's own round results
    (those between its start and the next run's), one entry each. Candidates are decoded and
    checked (the store's tags are only hints).
    """
    starts = store.find(int(EntryKind.RUN_START))
    for position in range(len(starts) - 1, -1, -1):
        start = starts[position]
        entry = decode_entry(store.entries(start, start + 1)[0].data)
        if isinstance(entry, RunStart) and entry.run_id == run_id:
            break
    else:
        return None
    if entry.initial_model_digest == model_digest:
        return start
    end = starts[position + 1] if position + 1 < len(starts) else store.size
    results = [i for i in store.find(int(EntryKind.ROUND_RESULT)) if start < i < end]
    for index in reversed(results):
        result = decode_entry(store.entries(index, index + 1)[0].data)
        if (
            isinstance(result, RoundRecord)
            and result.run_id == run_id
            and result.status == RoundStatus.COMPLETED
            and result.new_model_digest == model_digest
        ):
            return index
    return None


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AuditServicer(audit_pb2_grpc.AuditLogServicer):  # type: ignore[misc,unused-ignore]
    """Serves one log; see the module docstring for the authentication steps."""

    def __init__(
        self,
        store: MerkleLogStore,
        *,
        roster: Callable[[], Roster],
        clock: Callable[[], int],
        config: AuditServiceConfig | None = None,
    ) -> None:
        self._store = store
        self._roster = roster
        self._clock = clock
        self._config = config or AuditServiceConfig()
        self._nonces: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()
        self._keys: dict[bytes, ec.EllipticCurvePublicKey] = {}

    # -- authentication --------------------------------------------------------------------

    def _authenticate(self, method: str, request: Any) -> str:
        auth = request.auth
        site = auth.site_id
        entry = self._roster().get(SiteId(site)) if site else None
        if entry is None or not entry.active:
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED, "caller is not an enrolled, active site"
            )
        if len(auth.nonce) != _NONCE_BYTES:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "nonce must be 16 bytes")
        payload = audit_request_payload(
            method, site, auth.timestamp_ms, bytes(auth.nonce), request_params(method, request)
        )
        key = self._keys.get(entry.public_key_der)
        if key is None:
            key = self._keys[entry.public_key_der] = public_key_from_der(entry.public_key_der)
        try:
            verify(key, AUDIT_REQUEST_TYPE, payload, bytes(auth.signature))
        except SignatureError as exc:
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED, "request signature does not verify"
            ) from exc
        now = self._clock()
        skew = self._config.max_clock_skew_ms
        if abs(now - auth.timestamp_ms) > skew:
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED, "request timestamp outside the clock skew"
            )
        nonce_key = site.encode() + b"\x00" + bytes(auth.nonce)
        with self._lock:
            while self._nonces and next(iter(self._nonces.values())) < now - skew:
                self._nonces.popitem(last=False)
            if nonce_key in self._nonces:
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "replayed request")
            if len(self._nonces) >= self._config.max_nonces:
                raise _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests")
            self._nonces[nonce_key] = max(auth.timestamp_ms, now)
        return str(site)

    def _call(
        self, method: str, request: Any, context: grpc.ServicerContext, body: Callable[[str], Any]
    ) -> Any:
        try:
            site = self._authenticate(method, request)
            return body(site)
        except _Denied as exc:
            context.abort(exc.code, exc.message)
        except LogRangeError as exc:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except AuditLogError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"log unavailable: {type(exc).__name__}")
        except ProtocolError as exc:  # an entry the search decodes is corrupt
            context.abort(grpc.StatusCode.INTERNAL, f"log entry unreadable: {type(exc).__name__}")
        raise RuntimeError("unreachable: context.abort raises")  # pragma: no cover

    # -- methods ---------------------------------------------------------------------------

    def GetTreeHead(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_: str) -> Any:
            head = self._store.latest_tree_head()
            if head is None:
                raise _Denied(grpc.StatusCode.NOT_FOUND, "no signed tree head yet")
            return audit_pb2.TreeHeadResponse(signed_tree_head=head.blob)

        return self._call("GetTreeHead", request, context, body)

    def GetInclusionProof(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_: str) -> Any:
            proof = self._store.inclusion_proof(request.leaf_index, request.tree_size)
            entry = self._store.entries(request.leaf_index, request.leaf_index + 1)[0]
            return audit_pb2.InclusionProofResponse(
                leaf_index=request.leaf_index,
                tree_size=request.tree_size,
                entry=entry.data,
                audit_path=proof,
            )

        return self._call("GetInclusionProof", request, context, body)

    def GetConsistencyProof(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_: str) -> Any:
            proof = self._store.consistency_proof(request.old_size, request.new_size)
            return audit_pb2.ConsistencyProofResponse(
                old_size=request.old_size, new_size=request.new_size, proof=proof
            )

        return self._call("GetConsistencyProof", request, context, body)

    def GetEntries(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_: str) -> Any:
            start, end = request.start, request.end
            if end < start or end - start > self._config.max_entries:
                raise _Denied(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"range must hold 0 to {self._config.max_entries} entries",
                )
            out = []
            total = 0
            for entry in self._store.entries(start, end):
                total += len(entry.data)
                if total > self._config.max_response_bytes:
                    break
                out.append(audit_pb2.Entry(index=entry.index, data=entry.data))
            return audit_pb2.EntriesResponse(entries=out)

        return self._call("GetEntries", request, context, body)

    def FindMyInput(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(site: str) -> Any:
            run_id = bytes(request.run_id) or None
            index = find_input(self._store, site, request.round, run_id)
            if index is None:
                return audit_pb2.FindInputResponse(found=False)
            return audit_pb2.FindInputResponse(found=True, leaf_index=index)

        return self._call("FindMyInput", request, context, body)

    def FindModel(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_: str) -> Any:
            run_id, digest = bytes(request.run_id), bytes(request.model_digest)
            if len(run_id) != RUN_ID_BYTES or len(digest) != DIGEST_BYTES:
                raise _Denied(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"run_id must be {RUN_ID_BYTES} bytes and model_digest {DIGEST_BYTES}",
                )
            index = find_model(self._store, run_id, digest)
            if index is None:
                return audit_pb2.FindModelResponse(found=False)
            return audit_pb2.FindModelResponse(found=True, leaf_index=index)

        return self._call("FindModel", request, context, body)


def serve_audit_log(
    store: MerkleLogStore,
    *,
    roster: Callable[[], Roster],
    address: str,
    tls: TlsServerConfig | None,
    clock: Callable[[], int],
    config: AuditServiceConfig | None = None,
    insecure: bool = False,
) -> tuple[grpc.Server, int]:
    """Start the audit service; returns the server and the bound port.

    Args:
        store: The log (the coordinator's ``AuditLog.store``; the service only reads).
        roster: Returns the current roster (e.g. ``audit_log.roster``).
        address: ``host:port`` (port 0 picks a free one).
        tls: Server certificate and key; required unless ``insecure``.
        clock: Current time in ms since the epoch.
        config: Bounds.
        insecure: Serve plaintext (local demos only).

    Raises:
        ValueError: If neither TLS nor ``insecure`` is given.
    """
    cfg = config or AuditServiceConfig()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
        options=[
            ("grpc.max_receive_message_length", cfg.max_request_bytes),
            ("grpc.max_send_message_length", cfg.max_response_bytes + 64 * 1024),
        ],
    )
    audit_pb2_grpc.add_AuditLogServicer_to_server(  # type: ignore[no-untyped-call,unused-ignore]
        AuditServicer(store, roster=roster, clock=clock, config=cfg), server
    )
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls.private_key_pem, tls.cert_chain_pem)])
        port = server.add_secure_port(address, creds)
    elif insecure:
        port = server.add_insecure_port(address)
    else:
        raise ValueError("the audit service needs TLS (or insecure=True for a local demo)")
    server.start()
    return server, port
