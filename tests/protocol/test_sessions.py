"""The adapter seam: driving the two state machines by hand, and the site's local policy."""

from __future__ import annotations

import numpy as np
import pytest

from fedseal.crypto.keys import generate_identity_key, key_id
from fedseal.crypto.signing import verify
from fedseal.protocol import (
    Accepted,
    ClientSession,
    ClientStage,
    CoordinatorMisbehaviourError,
    DuplicateMessageError,
    LocalUpdate,
    SecAggServer,
    ServerStage,
    SiteId,
    StaleMessageError,
)
from fedseal.sim.inmemory import DeterministicRandom, dataset_root_for
from tests.protocol._support import make_config, make_fed, precommit, site_names


def _server_and_sessions(n: int = 4, **session_kw):  # type: ignore[no-untyped-def]
    fed, _ = make_fed(n)
    server = SecAggServer(
        fed.config,
        fed.roster,
        fed.sites,
        identity_key=fed.coordinator_key,
        run_id=fed.run_id_for(1),
        round=1,
        model_digest=fed.model_digest_for(1),
        now=1_700_000_000.0,
        commitments=precommit(fed),  # the sites committed to graph nonces in an earlier round
    )
    sessions = {
        s: ClientSession(
            s,
            fed.site_keys[s],
            fed.coordinator_key.public_key(),
            update_fn=lambda info, s=s: LocalUpdate(
                np.linspace(-0.5, 0.5, info.vector_length), 3, dataset_root_for(s)
            ),
            rng=np.random.default_rng(0),
            randbytes=DeterministicRandom(s.encode()),
            now=lambda: 1_700_000_000.0,
            trusted_peers=fed.trusted_peers[s],
            guard=fed.guards[s],
            **session_kw,
        )
        for s in fed.sites
    }
    return fed, server, sessions


def test_an_adapter_can_drive_a_round_stage_by_stage_with_bytes_and_vectors() -> None:
    fed, server, sessions = _server_and_sessions(4)
    outbound = server.start()
    while outbound:
        for site, packet in outbound.items():
            reply = sessions[site].handle(packet.payload, packet.bulk)
            assert reply is not None
            assert isinstance(server.receive(site, reply.payload, reply.bulk), Accepted)
        outbound = server.advance()
    result = server.result
    assert server.stage is ServerStage.DONE
    assert result.total_weight == 12
    assert np.allclose(
        result.weighted_mean, np.linspace(-0.5, 0.5, 16), atol=fed.config.quantization.step
    )
    for site, packet in server.result_notices().items():
        assert sessions[site].handle(packet.payload) is None
        assert sessions[site].result is not None
        assert sessions[site].result.aggregate_digest == result.aggregate_digest
    assert all(s.stage is ClientStage.DONE for s in sessions.values())


def test_accepted_receipts_carry_what_an_auditor_needs_to_reverify_the_signature() -> None:
    fed, server, sessions = _server_and_sessions(3)
    outbound = server.start()
    site, packet = next(iter(outbound.items()))
    reply = sessions[site].handle(packet.payload)
    assert reply is not None
    receipt = server.receive(site, reply.payload)
    assert isinstance(receipt, Accepted)
    assert receipt.signer == key_id(fed.site_keys[site].public_key())
    verify(
        fed.site_keys[site].public_key(), receipt.kind.type_name, receipt.payload, receipt.signature
    )


def test_a_site_the_adapter_reports_as_gone_is_a_dropout_with_that_reason() -> None:
    _, server, sessions = _server_and_sessions(5)
    outbound = server.start()
    for site, packet in outbound.items():
        if site != "site-004":
            reply = sessions[site].handle(packet.payload)
            assert reply is not None
            server.receive(site, reply.payload)
    server.drop("site-004", "transport error")
    assert [(d.site, d.reason) for d in server.dropouts] == [("site-004", "transport error")]
    assert set(server.advance()) == {"site-000", "site-001", "site-002", "site-003"}


def test_a_site_with_pinned_peer_keys_refuses_a_setup_listing_another_key() -> None:
    fed, server, _ = _server_and_sessions(3)
    pinned = {s: bytes(key_id(k.public_key())) for s, k in fed.site_keys.items()}
    pinned[SiteId("site-002")] = bytes(32)
    session = ClientSession(
        "site-000",
        fed.site_keys[SiteId("site-000")],
        fed.coordinator_key.public_key(),
        update_fn=lambda info: LocalUpdate(np.zeros(info.vector_length), 1, bytes(32)),
        rng=np.random.default_rng(0),
        now=lambda: 1_700_000_000.0,
        trusted_peers=pinned,
    )
    with pytest.raises(CoordinatorMisbehaviourError, match="trust anchor"):
        session.handle(server.start()[SiteId("site-000")].payload)
    assert session.stage is ClientStage.FAILED
    with pytest.raises(StaleMessageError):
        session.handle(b"anything")


def test_a_site_refuses_a_setup_that_lists_another_key_for_the_site_itself() -> None:
    fed, server, _ = _server_and_sessions(3)
    session = ClientSession(
        "site-000",
        generate_identity_key(),  # not the key the coordinator's roster enrolled for site-000
        fed.coordinator_key.public_key(),
        update_fn=lambda info: LocalUpdate(np.zeros(info.vector_length), 1, bytes(32)),
        rng=np.random.default_rng(0),
        now=lambda: 1_700_000_000.0,
        trusted_peers=fed.trusted_peers[SiteId("site-000")],
    )
    with pytest.raises(CoordinatorMisbehaviourError, match="different key for this site"):
        session.handle(server.start()[SiteId("site-000")].payload)
    assert session.stage is ClientStage.FAILED


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"expected_run": b"\x01" * 16}, "another run"), ({"min_round": 2}, "old round")],
)
def test_a_site_refuses_a_setup_for_another_run_or_an_old_round(kw, needle) -> None:  # type: ignore[no-untyped-def]
    _, server, sessions = _server_and_sessions(3, **kw)
    packet = server.start()[SiteId("site-001")]
    with pytest.raises(StaleMessageError, match=needle):
        sessions[SiteId("site-001")].handle(packet.payload)
    assert sessions[SiteId("site-001")].stage is ClientStage.AWAIT_SETUP


def test_a_site_refuses_a_message_for_another_stage_and_a_replayed_setup() -> None:
    _, server, sessions = _server_and_sessions(3)
    _, _, fresh = _server_and_sessions(3)
    outbound = server.start()
    replies = {s: sessions[s].handle(p.payload) for s, p in outbound.items()}
    for s, r in replies.items():
        assert r is not None
        server.receive(s, r.payload)
    bundle = server.advance()
    site = SiteId("site-000")
    with pytest.raises(StaleMessageError):  # a bundle before any setup: a later stage
        fresh[site].handle(bundle[site].payload)
    assert fresh[site].stage is ClientStage.AWAIT_SETUP
    with pytest.raises(DuplicateMessageError):  # the same setup again
        sessions[site].handle(outbound[site].payload)
    assert sessions[site].handle(bundle[site].payload) is not None
    with pytest.raises(StaleMessageError):  # a setup after key sharing: an earlier stage
        sessions[site].handle(outbound[site].payload)
    assert sessions[site].stage is ClientStage.AWAIT_SHARES


def test_the_training_callback_is_called_once_with_the_round_parameters() -> None:
    fed, updates = make_fed(4, length=9)
    outcome = fed.run_round(3)
    assert outcome.result is not None
    assert sorted(updates.calls) == site_names(4)


def test_a_config_too_small_for_the_cohort_is_refused_before_anything_is_sent() -> None:
    from fedseal.protocol import ConfigError

    fed, _ = make_fed(4, config=make_config(4, threshold=1))
    with pytest.raises(ConfigError, match="threshold"):
        fed.run_round(1)


def test_a_session_survives_export_and_restore_between_every_message() -> None:
    fed, server, sessions = _server_and_sessions(5)
    state_key = b"k" * 32
    blobs: dict[SiteId, bytes] = {s: sess.export_state(state_key) for s, sess in sessions.items()}

    def revive(site: SiteId) -> ClientSession:
        return ClientSession.restore(
            blobs[site],
            state_key,
            site,
            fed.site_keys[site],
            fed.coordinator_key.public_key(),
            update_fn=lambda info: LocalUpdate(
                np.linspace(-0.5, 0.5, info.vector_length), 3, dataset_root_for(site)
            ),
            rng=np.random.default_rng(0),
            randbytes=DeterministicRandom(site.encode() + b"/restored"),
            now=lambda: 1_700_000_000.0,
            trusted_peers=fed.trusted_peers[site],
            guard=fed.guards[site],  # the site's guard outlives its processes (graph nonces)
        )

    outbound = server.start()
    while outbound:
        for site, packet in outbound.items():
            session = revive(site)  # a fresh process for every message, as a stateless ClientApp
            reply = session.handle(packet.payload)
            blobs[site] = session.export_state(state_key)
            assert reply is not None
            assert isinstance(server.receive(site, reply.payload, reply.bulk), Accepted)
        outbound = server.advance()
    assert server.stage is ServerStage.DONE
    assert np.allclose(
        server.result.weighted_mean, np.linspace(-0.5, 0.5, 16), atol=fed.config.quantization.step
    )
    done = revive(SiteId("site-000"))
    assert done.stage is ClientStage.DONE
    assert len(done.revealed) == 4


def test_a_tampered_or_foreign_state_blob_is_refused() -> None:
    from fedseal.protocol import DecodeError

    fed, server, sessions = _server_and_sessions(3)
    session = sessions[SiteId("site-000")]
    session.handle(server.start()[SiteId("site-000")].payload)
    blob = bytearray(session.export_state(b"k" * 32))
    kwargs = {
        "update_fn": lambda info: LocalUpdate(np.zeros(info.vector_length), 1, bytes(32)),
        "rng": np.random.default_rng(0),
        "trusted_peers": fed.trusted_peers[SiteId("site-000")],
    }
    for bad_blob, key, site in (
        (bytes(blob), b"x" * 32, "site-000"),
        (bytes(blob), b"k" * 32, "site-001"),
        (bytes(blob[:-1]) + bytes([blob[-1] ^ 1]), b"k" * 32, "site-000"),
    ):
        with pytest.raises(DecodeError):
            ClientSession.restore(
                bad_blob,
                key,
                site,
                fed.site_keys[SiteId(site)],
                fed.coordinator_key.public_key(),
                **kwargs,
            )


def test_the_coordinator_keeps_no_masked_vector_after_adding_it_to_the_running_sum() -> None:
    import gc
    import weakref

    _, server, sessions = _server_and_sessions(4)
    outbound = server.start()
    refs: list[weakref.ref[np.ndarray]] = []
    while outbound:
        for site, packet in outbound.items():
            reply = sessions[site].handle(packet.payload)
            assert reply is not None
            if reply.bulk is not None:
                vector = reply.bulk.copy()  # the transport's own buffer
                refs.append(weakref.ref(vector))
                server.receive(site, reply.payload, vector)
                del vector
            else:
                server.receive(site, reply.payload)
            del reply
        outbound = server.advance()
    gc.collect()
    assert len(refs) == 4
    assert all(ref() is None for ref in refs)
    assert server.result.aggregate.nbytes == 16 * 4
