"""``FindModel``: a site asks the audit service which entry committed the model it is asked to
train or evaluate (the run's start or a completed round result of that run), then proves it.

The log: run 1 of :func:`build_run_log` (three completed rounds, ended), then run 2 with a
round abandoned by the coordinator (``FAILED``, model unchanged) and, appended to the store
directly as a misbehaving coordinator could, a failed round result that names a new model.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import EntryKind, RoundRecord, RoundStatus, RunStart
from fedseal.audit.errors import AuditServiceError
from fedseal.audit.proto import audit_pb2
from fedseal.audit.service import find_model, serve_audit_log
from fedseal.audit.service_client import GrpcAuditSource
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.treehead import SignedTreeHead, audit_request_params
from fedseal.audit.writer import AuditLog, roster_from_log
from fedseal.crypto import merkle
from fedseal.crypto.keys import generate_identity_key
from tests.audit.logbuilder import CLOCK0, BuiltLog, build_run_log, digest
from tests.audit.test_audit_service import _tls

NOW = CLOCK0 + 60_000
RUN2 = digest("run", "two")[:16]
INITIAL2 = digest("model", "run two", 0)
ABANDONED = digest("model", "run two", "never committed")


class Fixture:
    def __init__(self, built: BuiltLog, ca: bytes, port: int, store: MerkleLogStore) -> None:
        self.built, self.ca, self.port, self.store = built, ca, port, store
        self.channels: list[grpc.Channel] = []

    def client(self, site: str = "site-b", **kw: object) -> GrpcAuditSource:
        channel = grpc.secure_channel(
            f"localhost:{self.port}", grpc.ssl_channel_credentials(self.ca)
        )
        self.channels.append(channel)
        key = kw.pop("key", None) or self.built.sites[site]
        return GrpcAuditSource(channel, site=site, key=key, clock=lambda: NOW, timeout_s=10)  # type: ignore[arg-type]

    def index_of(self, kind: EntryKind, run_id: bytes, **match: object) -> int:
        for i in self.store.find(int(kind)):
            entry = decode_entry(self.store.entries(i, i + 1)[0].data)
            if getattr(entry, "run_id", None) == run_id and all(
                getattr(entry, k) == v for k, v in match.items()
            ):
                return i
        raise AssertionError(f"no {kind.label} entry with {match}")


def _add_second_run(built: BuiltLog) -> None:
    clock = CLOCK0 + 10_000_000
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=clock)
    log.append_run_start(
        RUN2, config_digest=digest("config 2"), initial_model_digest=INITIAL2,
        code_version="0.1.0", started_at_ms=clock, planned_rounds=3,
    )  # fmt: skip
    log.append_round_result(
        1, aggregate_digest=None, new_model_digest=INITIAL2, status=RoundStatus.FAILED,
        reason="AggregateOutOfRangeError: aggregate out of range",
    )  # fmt: skip
    log.sign_tree_head(clock + 1000)
    log.close()
    forged = RoundRecord(
        RUN2, 2, RoundStatus.FAILED, INITIAL2, (), (), None, ABANDONED, "abandoned"
    )
    with MerkleLogStore.open(built.path) as store:
        store.append(int(EntryKind.ROUND_RESULT), encode_entry(forged), round=2)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    built = build_run_log(tmp_path_factory.mktemp("find-model") / "audit.sqlite")
    _add_second_run(built)
    ca, tls = _tls()
    store = MerkleLogStore.open(built.path)
    server, port = serve_audit_log(
        store, roster=lambda: roster_from_log(store), address="localhost:0", tls=tls,
        clock=lambda: NOW,
    )  # fmt: skip
    fixture = Fixture(built, ca, port, store)
    yield fixture
    for channel in fixture.channels:
        channel.close()
    server.stop(grace=None)
    store.close()


def test_the_initial_model_is_found_at_the_run_start_and_proven(fx: Fixture) -> None:
    client = fx.client()
    run_id, initial = fx.built.run_id, fx.built.models[0]
    index = client.find_model(run_id, initial)
    assert index == fx.index_of(EntryKind.RUN_START, run_id)
    head = SignedTreeHead.from_bytes(client.latest_tree_head())
    head.verify(fx.built.coordinator.public_key())
    entry, path = client.inclusion_proof(index, head.tree_size)
    merkle.verify_inclusion(merkle.leaf_hash(entry), index, head.tree_size, path, head.root_hash)
    start = decode_entry(entry)
    assert isinstance(start, RunStart) and start.initial_model_digest == initial


@pytest.mark.parametrize("rnd", [1, 2, 3])
def test_each_completed_rounds_model_is_found_at_its_round_result(fx: Fixture, rnd: int) -> None:
    run_id, model = fx.built.run_id, fx.built.models[rnd]
    index = fx.client().find_model(run_id, model)
    assert index == fx.index_of(EntryKind.ROUND_RESULT, run_id, round=rnd)
    result = decode_entry(fx.store.entries(index, index + 1)[0].data)
    assert isinstance(result, RoundRecord)
    assert result.status == RoundStatus.COMPLETED and result.new_model_digest == model


def test_an_unknown_digest_or_run_is_not_found(fx: Fixture) -> None:
    client = fx.client("site-c")
    assert client.find_model(fx.built.run_id, digest("a model nobody committed")) is None
    assert client.find_model(digest("no such run")[:16], fx.built.models[0]) is None


def test_a_model_of_another_run_is_not_found(fx: Fixture) -> None:
    client = fx.client()
    for model in fx.built.models:
        assert client.find_model(RUN2, model) is None
    assert client.find_model(fx.built.run_id, INITIAL2) is None
    assert client.find_model(RUN2, INITIAL2) == fx.index_of(EntryKind.RUN_START, RUN2)


def test_an_abandoned_round_commits_no_model(fx: Fixture) -> None:
    # The honest record of an abandoned round names the unchanged model: the answer is the
    # entry that committed that model (the run start), never the failed round's result.
    failed = fx.index_of(EntryKind.ROUND_RESULT, RUN2, round=1)
    assert fx.client().find_model(RUN2, INITIAL2) != failed
    # A failed round result naming a new model (no honest coordinator writes one) commits nothing.
    assert fx.client().find_model(RUN2, ABANDONED) is None
    assert find_model(fx.store, RUN2, ABANDONED) is None


def test_malformed_ids_are_refused_after_authentication(fx: Fixture) -> None:
    client = fx.client()
    for run_id, model in ((b"short", fx.built.models[0]), (fx.built.run_id, b"x" * 31)):
        with pytest.raises(AuditServiceError) as err:
            client.find_model(run_id, model)
        assert err.value.code == "INVALID_ARGUMENT"


def test_find_model_is_authenticated_like_every_method(fx: Fixture) -> None:
    with pytest.raises(AuditServiceError) as err:
        fx.client("mallory", key=generate_identity_key()).find_model(
            fx.built.run_id, fx.built.models[0]
        )
    assert err.value.code == "PERMISSION_DENIED"
    with pytest.raises(AuditServiceError) as err:
        fx.client("site-a", key=generate_identity_key()).find_model(
            fx.built.run_id, fx.built.models[0]
        )
    assert err.value.code == "UNAUTHENTICATED"
    with pytest.raises(AuditServiceError) as err:  # revoked after round 2 of run 1
        fx.client("site-d").find_model(fx.built.run_id, fx.built.models[0])
    assert err.value.code == "PERMISSION_DENIED"


def test_the_clients_find_model_encoding_matches_the_generated_code() -> None:
    run_id, model = b"r" * 16, b"m" * 32
    sent: list[bytes] = []
    answer = audit_pb2.FindModelResponse(found=True, leaf_index=77).SerializeToString()

    class Channel:
        def unary_unary(self, method: str, **_: object) -> object:
            def call(request: bytes, timeout: float) -> bytes:
                sent.append(request)
                return answer

            return call

    source = GrpcAuditSource(
        Channel(),  # type: ignore[arg-type]
        site="site-a",
        key=generate_identity_key(),
        clock=lambda: 1,
    )
    assert source.find_model(run_id, model) == 77
    msg = audit_pb2.FindModelRequest.FromString(sent[0])
    assert (msg.run_id, msg.model_digest) == (run_id, model)
    # The signed parameters are length-prefixed: no two (run id, digest) splits sign alike.
    assert audit_request_params("FindModel", run_id=run_id, model_digest=model) != (
        audit_request_params("FindModel", run_id=run_id + b"m", model_digest=model[1:])
    )


def test_the_search_reads_only_run_starts_and_that_runs_round_results(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[int] = []
    real = MerkleLogStore.entries

    def spy(self: MerkleLogStore, start: int, end: int):  # type: ignore[no-untyped-def]
        read.extend(range(start, end))
        return real(self, start, end)

    starts = set(fx.store.find(int(EntryKind.RUN_START)))
    run1_results = {
        fx.index_of(EntryKind.ROUND_RESULT, fx.built.run_id, round=r) for r in (1, 2, 3)
    }
    monkeypatch.setattr(MerkleLogStore, "entries", spy)
    assert find_model(fx.store, fx.built.run_id, digest("unknown")) is None
    assert sorted(read) == sorted(starts | run1_results)  # each read once


def test_the_site_side_protocol_declares_find_model() -> None:
    from fedseal.audit.receipts import AuditSource

    assert "find_model" in AuditSource.__dict__
