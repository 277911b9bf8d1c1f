"""The gRPC audit service (TLS, signed requests from enrolled sites, bounded requests) and the
site's receipt checker running against it."""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import INPUT_MESSAGE_TYPE, EnvelopeRecord
from fedseal.audit.errors import AuditServiceError
from fedseal.audit.proto import audit_pb2, audit_pb2_grpc
from fedseal.audit.receipts import (
    ContributionBlockedError,
    ReceiptChecker,
    ReceiptError,
)
from fedseal.audit.service import AuditServiceConfig, TlsServerConfig, serve_audit_log
from fedseal.audit.service_client import GrpcAuditSource
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.treehead import SignedTreeHead
from fedseal.audit.writer import roster_from_log
from fedseal.crypto import merkle
from fedseal.crypto.keys import generate_identity_key
from tests.audit.logbuilder import CLOCK0, BuiltLog, build_run_log

NOW = CLOCK0 + 60_000


def _tls() -> tuple[bytes, TlsServerConfig]:
    """A throwaway CA and a server certificate for localhost."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseal test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), TlsServerConfig(cert.public_bytes(pem), key_pem)


class Service:
    def __init__(self, built: BuiltLog, ca: bytes, port: int, store: MerkleLogStore) -> None:
        self.built, self.ca, self.port, self.store = built, ca, port, store
        self._channels: list[grpc.Channel] = []

    def client(
        self, site: str, key: ec.EllipticCurvePrivateKey | None = None, **kw: object
    ) -> GrpcAuditSource:
        channel = grpc.secure_channel(
            f"localhost:{self.port}", grpc.ssl_channel_credentials(self.ca)
        )
        self._channels.append(channel)
        key = key or self.built.sites[site]
        return GrpcAuditSource(channel, site=site, key=key, clock=lambda: NOW, timeout_s=10, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        for c in self._channels:
            c.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    built = build_run_log(tmp_path_factory.mktemp("svc") / "audit.sqlite")
    ca, tls = _tls()
    store = MerkleLogStore.open(built.path)
    server, port = serve_audit_log(
        store,
        roster=lambda: roster_from_log(store),
        address="localhost:0",
        tls=tls,
        clock=lambda: NOW,
        config=AuditServiceConfig(max_entries=16),
    )
    svc = Service(built, ca, port, store)
    yield svc
    svc.close()
    server.stop(grace=None)
    store.close()


def test_an_enrolled_site_gets_a_signed_head_and_proofs_that_verify(service: Service) -> None:
    client = service.client("site-b")
    head = SignedTreeHead.from_bytes(client.latest_tree_head())
    head.verify(service.built.coordinator.public_key())
    index = client.find_input(2, service.built.run_id)
    assert index == service.built.input_index[("site-b", 2)]
    entry, path = client.inclusion_proof(index, head.tree_size)
    merkle.verify_inclusion(merkle.leaf_hash(entry), index, head.tree_size, path, head.root_hash)
    record = decode_entry(entry)
    assert isinstance(record, EnvelopeRecord) and record.site == "site-b" and record.accepted
    old = 16
    merkle.verify_consistency(
        old,
        head.tree_size,
        service.store.root(old),
        head.root_hash,
        client.consistency_proof(old, head.tree_size),
    )
    assert [i for i, _ in client.entries(3, 10)] == list(range(3, 10))


def test_entry_ranges_over_the_bound_are_refused(service: Service) -> None:
    with pytest.raises(AuditServiceError) as err:
        service.client("site-a").entries(0, 17)
    assert err.value.code == "INVALID_ARGUMENT"


def test_out_of_range_proofs_are_refused(service: Service) -> None:
    with pytest.raises(AuditServiceError) as err:
        service.client("site-a").inclusion_proof(5, 10_000)
    assert err.value.code == "OUT_OF_RANGE"


def test_a_site_that_is_not_enrolled_is_refused(service: Service) -> None:
    with pytest.raises(AuditServiceError) as err:
        service.client("mallory", key=generate_identity_key()).latest_tree_head()
    assert err.value.code == "PERMISSION_DENIED"


def test_an_enrolled_name_with_another_key_is_refused(service: Service) -> None:
    with pytest.raises(AuditServiceError) as err:
        service.client("site-a", key=generate_identity_key()).latest_tree_head()
    assert err.value.code == "UNAUTHENTICATED"


def test_a_revoked_site_is_refused(service: Service) -> None:
    with pytest.raises(AuditServiceError) as err:
        service.client("site-d").latest_tree_head()
    assert err.value.code == "PERMISSION_DENIED"


def test_a_replayed_request_is_refused(service: Service) -> None:
    nonce = itertools.repeat(b"n" * 16)
    client = service.client("site-c", randbytes=lambda n: next(nonce))
    client.latest_tree_head()
    with pytest.raises(AuditServiceError) as err:
        client.latest_tree_head()
    assert err.value.code == "UNAUTHENTICATED"


def test_a_stale_request_is_refused(service: Service) -> None:
    client = service.client("site-a")
    client._clock = lambda: NOW - 10 * 60_000
    with pytest.raises(AuditServiceError) as err:
        client.latest_tree_head()
    assert err.value.code == "UNAUTHENTICATED"


def test_an_oversized_request_is_refused_before_it_is_handled(service: Service) -> None:
    channel = grpc.secure_channel(
        f"localhost:{service.port}", grpc.ssl_channel_credentials(service.ca)
    )
    stub = audit_pb2_grpc.AuditLogStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.FindMyInput(audit_pb2.FindInputRequest(run_id=b"x" * 20_000, round=1), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


def test_a_plaintext_client_cannot_talk_to_the_tls_service(service: Service) -> None:
    channel = grpc.insecure_channel(f"localhost:{service.port}")
    client = GrpcAuditSource(
        channel, site="site-a", key=service.built.sites["site-a"], clock=lambda: NOW, timeout_s=3
    )
    with pytest.raises(AuditServiceError) as err:
        client.latest_tree_head()
    assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    channel.close()


def test_a_site_checks_its_receipts_over_the_service(service: Service, tmp_path: Path) -> None:
    built = service.built
    checker = ReceiptChecker(
        tmp_path / "state", site="site-b", coordinator_key=built.coordinator.public_key()
    )
    client = service.client("site-b")
    for rnd in (1, 2, 3):
        payload = decode_entry(
            service.store.entries(
                built.input_index[("site-b", rnd)], built.input_index[("site-b", rnd)] + 1
            )[0].data
        )
        assert isinstance(payload, EnvelopeRecord)
        receipt = checker.check_round(
            client,
            run_id=built.run_id,
            round=rnd,
            message_type=INPUT_MESSAGE_TYPE,
            payload=payload.payload,
        )
        assert receipt.leaf_index == built.input_index[("site-b", rnd)]
    assert len(checker.seen_tree_heads()) == 3
    checker.ensure_may_contribute()


# --- the receipt checker against a misbehaving coordinator (in-process source) ---------------


class LocalSource:
    def __init__(
        self, store: MerkleLogStore, site: str, *, head_from: MerkleLogStore | None = None
    ) -> None:
        self.store, self.site, self.head_from = store, site, head_from or store

    def latest_tree_head(self) -> bytes:
        head = self.head_from.latest_tree_head()
        assert head is not None
        return head.blob

    def inclusion_proof(self, index: int, tree_size: int) -> tuple[bytes, list[bytes]]:
        return self.store.entries(index, index + 1)[0].data, self.store.inclusion_proof(
            index, tree_size
        )

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return self.store.consistency_proof(old_size, new_size)

    def find_input(self, round: int, run_id: bytes) -> int | None:
        from fedseal.audit.writer import find_input

        return find_input(self.store, self.site, round, run_id)


def _payload(store: MerkleLogStore, index: int) -> bytes:
    record = decode_entry(store.entries(index, index + 1)[0].data)
    assert isinstance(record, EnvelopeRecord)
    return record.payload


def test_a_forked_log_blocks_the_site(tmp_path: Path) -> None:
    a = build_run_log(tmp_path / "a.sqlite")
    # Same coordinator key, same log id, same sites: a second history that diverges.
    b = build_run_log(tmp_path / "b.sqlite", coordinator=a.coordinator, sites=a.sites)
    checker = ReceiptChecker(
        tmp_path / "state", site="site-b", coordinator_key=a.coordinator.public_key()
    )
    with MerkleLogStore.open(a.path) as sa, MerkleLogStore.open(b.path) as sb:
        i = a.input_index[("site-b", 1)]
        checker.check_round(
            LocalSource(sa, "site-b"),
            run_id=a.run_id,
            round=1,
            message_type=INPUT_MESSAGE_TYPE,
            payload=_payload(sa, i),
        )
        with pytest.raises(ReceiptError) as err:
            checker.check_round(
                LocalSource(sb, "site-b"),
                run_id=b.run_id,
                round=1,
                message_type=INPUT_MESSAGE_TYPE,
                payload=_payload(sb, i),
            )
        assert err.value.check == "fork"
    with pytest.raises(ContributionBlockedError):
        checker.ensure_may_contribute()


def test_an_entry_that_is_not_the_sites_payload_blocks_the_site(tmp_path: Path) -> None:
    a = build_run_log(tmp_path / "a.sqlite")
    checker = ReceiptChecker(
        tmp_path / "state", site="site-b", coordinator_key=a.coordinator.public_key()
    )
    with MerkleLogStore.open(a.path) as sa:
        with pytest.raises(ReceiptError) as err:
            checker.check_round(
                LocalSource(sa, "site-b"),
                run_id=a.run_id,
                round=1,
                message_type=INPUT_MESSAGE_TYPE,
                payload=b"what we really sent",
            )
    assert err.value.check == "entry-mismatch"
    with pytest.raises(ContributionBlockedError):
        checker.check_round(
            LocalSource(sa, "site-b"),
            run_id=a.run_id,
            round=1,
            message_type=INPUT_MESSAGE_TYPE,
            payload=b"x",
        )


def test_a_missing_input_or_a_head_signed_by_someone_else_blocks_the_site(tmp_path: Path) -> None:
    a = build_run_log(tmp_path / "a.sqlite")
    with MerkleLogStore.open(a.path) as sa:
        checker = ReceiptChecker(
            tmp_path / "s1", site="site-a", coordinator_key=a.coordinator.public_key()
        )
        with pytest.raises(ReceiptError) as err:  # site-a's round-2 input was rejected
            checker.check_round(
                LocalSource(sa, "site-a"),
                run_id=a.run_id,
                round=2,
                message_type=INPUT_MESSAGE_TYPE,
                payload=b"",
            )
        assert err.value.check == "missing-input"
        other = ReceiptChecker(
            tmp_path / "s2", site="site-b", coordinator_key=generate_identity_key().public_key()
        )
        with pytest.raises(ReceiptError) as err:
            other.check_round(
                LocalSource(sa, "site-b"),
                run_id=a.run_id,
                round=1,
                message_type=INPUT_MESSAGE_TYPE,
                payload=b"",
            )
        assert err.value.check == "tree-head-signature"


class _RecordingChannel:
    """A gRPC channel stand-in: records the method and request bytes, answers ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sent: list[tuple[str, bytes]] = []

    def unary_unary(self, method: str, **_: object) -> object:
        def call(request: bytes, timeout: float) -> bytes:
            self.sent.append((method, request))
            return self.reply

        return call


@pytest.mark.parametrize(
    ("call", "reply"),
    [
        # a known field with another wire type would read as its default (0, empty, false)
        (lambda s: s.inclusion_proof(0, 5), b"\x08\x00\x10\x05" + b"\x0a\x01x"),  # leaf_index as bytes
        (lambda s: s.find_input(1, b"r" * 16), b"\x0a\x01x"),  # found as bytes
        (lambda s: s.latest_tree_head(), b"\x08\x07"),  # signed_tree_head as a varint
        (lambda s: s.entries(0, 1), b"\x0a\x02\x0a\x00"),  # an entry's index as bytes
    ],
)
def test_a_reply_with_a_mistyped_field_is_malformed_data_not_a_default_value(
    call: Callable[[GrpcAuditSource], object], reply: bytes
) -> None:
    source = GrpcAuditSource(
        _RecordingChannel(reply),  # type: ignore[arg-type]
        site="site-a",
        key=generate_identity_key(),
        clock=lambda: 7,
    )
    with pytest.raises(AuditServiceError) as err:
        call(source)
    assert err.value.code == "DATA_LOSS" and "wrong wire type" in str(err.value)


def test_a_reply_with_a_field_number_the_site_does_not_know_is_still_read() -> None:
    reply = audit_pb2.FindInputResponse(found=True, leaf_index=9).SerializeToString()
    source = GrpcAuditSource(
        _RecordingChannel(reply + b"\xa0\x06\x01"),  # field 100, a later version's addition
        site="site-a",
        key=generate_identity_key(),
        clock=lambda: 7,
    )
    assert source.find_input(1, b"r" * 16) == 9


def test_the_clients_wire_encoding_matches_the_generated_protobuf_code() -> None:
    reply = audit_pb2.InclusionProofResponse(
        leaf_index=300, tree_size=2**40, entry=b"e", audit_path=[b"a" * 32, b"b" * 32]
    )
    channel = _RecordingChannel(reply.SerializeToString())
    source = GrpcAuditSource(
        channel,  # type: ignore[arg-type]
        site="site-a",
        key=generate_identity_key(),
        clock=lambda: 7,
        randbytes=lambda n: b"n" * n,
    )
    entry, path = source.inclusion_proof(300, 2**40)
    method, raw = channel.sent[-1]
    assert method == "/fedseal.audit.v1.AuditLog/GetInclusionProof"
    msg = audit_pb2.InclusionProofRequest.FromString(raw)
    assert (msg.auth.site_id, msg.auth.timestamp_ms, msg.leaf_index, msg.tree_size) == (
        "site-a",
        7,
        300,
        2**40,
    )
    assert msg.auth.nonce == b"n" * 16 and msg.SerializeToString() == raw  # canonical bytes
    assert entry == b"e" and path == [
        b"a" * 32,
        b"b" * 32,
    ]
    channel.reply = b"\x0a\x05ab"  # a length-delimited field cut short
    with pytest.raises(AuditServiceError) as err:
        source.latest_tree_head()
    assert err.value.code == "DATA_LOSS"
