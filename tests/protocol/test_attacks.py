"""Every attack of issue 4, each with its expected typed error and the round's outcome."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from fedseal.crypto.shamir import PRIME, Share
from fedseal.crypto.signing import sign
from fedseal.protocol import (
    BadSignatureError,
    BulkMismatchError,
    ClientStage,
    ConfigError,
    CoordinatorMisbehaviourError,
    DecodeError,
    DuplicateMessageError,
    Limits,
    LocalUpdate,
    Packet,
    ReconstructionError,
    Rejection,
    RevokedSignerError,
    Roster,
    RosterEntry,
    SitePolicy,
    StaleMessageError,
    ThresholdError,
    UnapprovedDatasetError,
    UnknownSignerError,
)
from fedseal.protocol.envelope import Envelope
from fedseal.protocol.errors import IncompleteBundleError
from fedseal.protocol.graph import graph_seed
from fedseal.protocol.messages import (
    AdvertBundle,
    KeyAdvert,
    ShareDelivery,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
)
from fedseal.protocol.server import SecAggServer, ServerStage
from fedseal.protocol.types import SiteId
from fedseal.sim.inmemory import Behaviour, Federation, dataset_root_for, deterministic_key
from tests.protocol._support import (
    LIMITS_DEFAULT,
    expected_sum,
    make_config,
    make_fed,
    open_any,
    precommit,
    replace,
    resign,
    site_names,
)

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ATTACKER = deterministic_key(b"attacker")
SPARSE_GAMMA = 0.1


def rejections_of(outcome, site: str) -> list[Rejection]:  # type: ignore[no-untyped-def]
    return [r for r in outcome.server.rejections if r.site == site]


def assert_exact_without(outcome, fed, updates, excluded: set[str], seed: int = 1) -> None:  # type: ignore[no-untyped-def]
    result = outcome.result
    assert result is not None, outcome.failure
    assert set(result.survivors) == set(fed.sites) - excluded
    assert np.array_equal(result.aggregate, expected_sum(fed, updates, result.survivors, seed))


class ReplaceReply(Behaviour):
    """Replace one site's reply at one stage by ``make(fed, packet)``'s packets."""

    def __init__(self, stage: ServerStage, site: str, make) -> None:  # type: ignore[no-untyped-def]
        self.stage, self.site, self.make = stage, site, make

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is self.stage and site == self.site:
            return self.make(fed, packet)
        return (packet,)


class RewriteCoordinator(Behaviour):
    """Rewrite (and re-sign with the coordinator key) messages of one stage."""

    def __init__(self, stage: ServerStage, rewrite, sites: set[str] | None = None) -> None:  # type: ignore[no-untyped-def]
        self.stage, self.rewrite, self.sites = stage, rewrite, sites

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is not self.stage or (self.sites is not None and site not in self.sites):
            return packet
        _, message = open_any(packet.payload)
        return Packet(resign(self.rewrite(fed, site, message), fed.coordinator_key))


def _site_error_types(outcome) -> set[type]:  # type: ignore[no-untyped-def]
    return {type(e) for e in outcome.client_errors.values()}


# -- signatures, enrolment, revocation -----------------------------------------------------


def test_a_forged_signature_is_rejected_and_the_site_is_a_dropout() -> None:
    def forge(fed, packet):  # type: ignore[no-untyped-def]
        env = Envelope.from_bytes(packet.payload, LIMITS_DEFAULT)
        bad = sign(ATTACKER, env.kind.type_name, env.payload)
        return (Packet(dataclasses.replace(env, signature=bad).to_bytes(), packet.bulk),)

    fed, updates = make_fed(5, behaviour=ReplaceReply(ServerStage.MASKED_INPUT, "site-001", forge))
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-001")
    assert isinstance(rej.error, BadSignatureError)
    assert rej.stage is ServerStage.MASKED_INPUT
    assert_exact_without(outcome, fed, updates, {"site-001"})


def test_a_valid_signature_from_a_key_that_is_not_enrolled_is_rejected() -> None:
    def resign_with_attacker(fed, packet):  # type: ignore[no-untyped-def]
        _, message = open_any(packet.payload)
        return (Packet(resign(message, ATTACKER), packet.bulk),)

    fed, updates = make_fed(
        5, behaviour=ReplaceReply(ServerStage.MASKED_INPUT, "site-002", resign_with_attacker)
    )
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-002")
    assert isinstance(rej.error, UnknownSignerError)
    assert_exact_without(outcome, fed, updates, {"site-002"})


def test_a_site_signing_with_another_sites_key_is_rejected() -> None:
    def as_other(fed, packet):  # type: ignore[no-untyped-def]
        _, message = open_any(packet.payload)
        return (Packet(resign(message, fed.site_keys[SiteId("site-000")]), packet.bulk),)

    fed, updates = make_fed(
        5, behaviour=ReplaceReply(ServerStage.MASKED_INPUT, "site-003", as_other)
    )
    outcome = fed.run_round(1)
    assert isinstance(rejections_of(outcome, "site-003")[0].error, UnknownSignerError)
    assert_exact_without(outcome, fed, updates, {"site-003"})


def _roster_with_revoked(fed: Federation, revoked: str) -> Roster:
    return Roster(
        RosterEntry(
            site=s,
            public_key=k.public_key(),
            approved_roots=frozenset({dataset_root_for(s)}),
            active=(s != revoked),
        )
        for s, k in fed.site_keys.items()
    )


def test_a_revoked_site_cannot_be_sampled_and_its_messages_are_rejected() -> None:
    fed, _ = make_fed(6)
    fed.roster = _roster_with_revoked(fed, "site-005")
    with pytest.raises(ConfigError):
        fed.run_round(1)

    class InjectFromRevoked(Behaviour):
        receipt = None

        def before_advance(self, fed, stage):  # type: ignore[no-untyped-def]
            if stage is ServerStage.ADVERTISE:
                forged = KeyAdvert(
                    header=dataclasses.replace(
                        fed.server.setup.header,
                        sender=SiteId("site-005"),
                        setup_digest=fed.server.setup_digest,
                    ),
                    share_public=b"\x04" + bytes(64),
                    mask_public=b"\x04" + bytes(64),
                    seed_commitment=bytes(32),
                )
                self.receipt = fed.server.receive(
                    "site-005", resign(forged, fed.site_keys[SiteId("site-005")])
                )

    spy = InjectFromRevoked()
    fed.behaviour = spy
    outcome = fed.run_round(1, cohort=site_names(5))
    assert isinstance(spy.receipt, Rejection)
    assert isinstance(spy.receipt.error, RevokedSignerError)
    assert outcome.result is not None and "site-005" not in outcome.result.survivors


# -- replays and duplicates ------------------------------------------------------------------


class Recorder(Behaviour):
    def __init__(self) -> None:
        self.replies: dict[tuple[ServerStage, str], Packet] = {}

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        self.replies[(stage, site)] = packet
        return (packet,)


def test_a_masked_input_replayed_from_an_earlier_round_is_stale() -> None:
    rec = Recorder()
    fed, _updates = make_fed(5, behaviour=rec)
    assert fed.run_round(1).result is not None
    old = rec.replies[(ServerStage.MASKED_INPUT, "site-001")]
    fed.behaviour = ReplaceReply(ServerStage.MASKED_INPUT, "site-001", lambda fed, p: (old,))
    outcome = fed.run_round(2)
    [rej] = rejections_of(outcome, "site-001")
    assert isinstance(rej.error, StaleMessageError)
    assert outcome.result is not None and "site-001" not in outcome.result.survivors


def test_a_message_replayed_from_another_run_is_stale() -> None:
    rec = Recorder()
    fed, _ = make_fed(5, behaviour=rec)
    assert fed.run_round(1).result is not None
    old = rec.replies[(ServerStage.ADVERTISE, "site-004")]

    class OtherRun(Federation):
        def run_id_for(self, round: int) -> bytes:
            return b"\x42" * 16

    other, _ = make_fed(5)
    other.__class__ = OtherRun
    other.behaviour = ReplaceReply(ServerStage.ADVERTISE, "site-004", lambda fed, p: (old,))
    outcome = other.run_round(1)
    [rej] = rejections_of(outcome, "site-004")
    assert isinstance(rej.error, StaleMessageError)
    assert "another run" in rej.error.message


def test_a_message_replayed_at_another_stage_is_stale() -> None:
    rec = Recorder()

    class ReplayAdvert(Recorder):
        def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            self.replies[(stage, site)] = packet
            if stage is ServerStage.MASKED_INPUT and site == "site-002":
                return (self.replies[(ServerStage.ADVERTISE, "site-002")],)
            return (packet,)

    rec = ReplayAdvert()
    fed, updates = make_fed(5, behaviour=rec)
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-002")
    assert isinstance(rej.error, StaleMessageError)
    assert_exact_without(outcome, fed, updates, {"site-002"})


def test_a_malleated_signature_r_n_minus_s_is_caught_as_a_duplicate() -> None:
    def malleate(fed, packet):  # type: ignore[no-untyped-def]
        env = Envelope.from_bytes(packet.payload, LIMITS_DEFAULT)
        r, s = decode_dss_signature(env.signature)
        twin = dataclasses.replace(env, signature=encode_dss_signature(r, P256_ORDER - s))
        assert twin.signature != env.signature
        return (packet, Packet(twin.to_bytes(), packet.bulk))

    fed, updates = make_fed(
        5, behaviour=ReplaceReply(ServerStage.MASKED_INPUT, "site-000", malleate)
    )
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-000")
    assert isinstance(rej.error, DuplicateMessageError)
    assert_exact_without(outcome, fed, updates, set())  # counted exactly once


def test_duplicate_submissions_are_rejected_and_the_first_one_counts_once() -> None:
    def twice_with_a_different_second(fed, packet):  # type: ignore[no-untyped-def]
        _, message = open_any(packet.payload)
        other = packet.bulk.copy()
        other[0] += 1
        import hashlib

        second = replace(message, bulk_digest=hashlib.sha256(other.data).digest())
        return (packet, packet, Packet(resign(second, fed.site_keys[SiteId("site-001")]), other))

    fed, updates = make_fed(
        5,
        behaviour=ReplaceReply(ServerStage.MASKED_INPUT, "site-001", twice_with_a_different_second),
    )
    outcome = fed.run_round(1)
    rejs = rejections_of(outcome, "site-001")
    assert [type(r.error) for r in rejs] == [DuplicateMessageError, DuplicateMessageError]
    assert_exact_without(outcome, fed, updates, set())


# -- content of the masked input --------------------------------------------------------------


def test_a_dataset_root_that_is_not_approved_is_rejected() -> None:
    fed, updates = make_fed(5)
    honest = fed.updates

    def other_root(site, info):  # type: ignore[no-untyped-def]
        u = honest(site, info)
        return LocalUpdate(u.vector, u.example_count, bytes(32)) if site == "site-003" else u

    fed.updates = other_root
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-003")
    assert isinstance(rej.error, UnapprovedDatasetError)
    assert_exact_without(outcome, fed, updates, {"site-003"})


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda v: v[:-1], id="wrong-length"),
        pytest.param(lambda v: v.astype(np.uint64), id="wrong-dtype"),
        pytest.param(lambda v: v.astype(">u4"), id="wrong-byte-order"),
        pytest.param(lambda v: np.concatenate([v[:1] + np.uint32(1), v[1:]]), id="wrong-digest"),
        pytest.param(lambda v: None, id="missing-bulk"),
        pytest.param(lambda v: v.reshape(2, -1), id="wrong-shape"),
    ],
)
def test_a_bulk_vector_that_differs_from_its_signed_description_is_rejected(tamper) -> None:  # type: ignore[no-untyped-def]
    def change(fed, packet):  # type: ignore[no-untyped-def]
        return (Packet(packet.payload, tamper(packet.bulk)),)

    fed, updates = make_fed(5, behaviour=ReplaceReply(ServerStage.MASKED_INPUT, "site-004", change))
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-004")
    assert isinstance(rej.error, BulkMismatchError)
    assert_exact_without(outcome, fed, updates, {"site-004"})


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b: b[:-7], id="truncated"),
        pytest.param(lambda b: b + b"\x00", id="trailing-byte"),
        pytest.param(lambda b: b + bytes(70_000), id="oversized"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_oversized_and_truncated_messages_are_decode_errors(tamper) -> None:  # type: ignore[no-untyped-def]
    config = make_config(16, limits=Limits(max_message_bytes=65_536))

    def change(fed, packet):  # type: ignore[no-untyped-def]
        return (Packet(tamper(packet.payload), packet.bulk),)

    fed, updates = make_fed(
        5, config=config, behaviour=ReplaceReply(ServerStage.SHARE, "site-002", change)
    )
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-002")
    assert isinstance(rej.error, DecodeError)
    assert_exact_without(outcome, fed, updates, {"site-002"})


# -- a malicious coordinator -----------------------------------------------------------------


def _swap_mask_key_keep_signature(fed, site, bundle: AdvertBundle) -> AdvertBundle:  # type: ignore[no-untyped-def]
    adverts = list(bundle.adverts)
    env = Envelope.from_bytes(adverts[2], LIMITS_DEFAULT)
    _, advert = open_any(adverts[2])
    evil = replace(
        advert,
        mask_public=ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(
            __import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
            ).Encoding.X962,
            __import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["PublicFormat"]
            ).PublicFormat.UncompressedPoint,
        ),
    )
    adverts[2] = dataclasses.replace(env, payload=evil.to_payload()).to_bytes()
    return replace(bundle, adverts=tuple(adverts))


def _swap_advert_signed_by_coordinator(fed, site, bundle: AdvertBundle) -> AdvertBundle:  # type: ignore[no-untyped-def]
    adverts = list(bundle.adverts)
    _, advert = open_any(adverts[2])
    adverts[2] = resign(replace(advert, seed_commitment=bytes(32)), fed.coordinator_key)
    return replace(bundle, adverts=tuple(adverts))


@pytest.mark.parametrize(
    "rewrite", [_swap_mask_key_keep_signature, _swap_advert_signed_by_coordinator]
)
def test_a_coordinator_substituting_an_advertised_key_is_caught_by_every_site(rewrite) -> None:  # type: ignore[no-untyped-def]
    fed, _ = make_fed(5, behaviour=RewriteCoordinator(ServerStage.SHARE, rewrite))
    outcome = fed.run_round(1)
    assert _site_error_types(outcome) == {CoordinatorMisbehaviourError}
    assert set(outcome.client_errors) == set(fed.sites)
    assert isinstance(outcome.failure, ThresholdError)
    assert outcome.result is None
    assert all(s.stage is ClientStage.FAILED for s in outcome.sessions.values())


def test_a_coordinator_dropping_a_sites_own_advert_is_caught_by_that_site() -> None:
    def drop_own(fed, site, bundle):  # type: ignore[no-untyped-def]
        kept = tuple(a for a in bundle.adverts if open_any(a)[1].header.sender != site)
        return replace(bundle, adverts=kept)

    fed, _ = make_fed(5, behaviour=RewriteCoordinator(ServerStage.SHARE, drop_own, {"site-000"}))
    outcome = fed.run_round(1)
    assert type(outcome.client_errors[SiteId("site-000")]) is IncompleteBundleError


def _move_first_alive_to_dropped(fed, site, request: UnmaskRequest) -> UnmaskRequest:  # type: ignore[no-untyped-def]
    victim = request.alive[0]
    return replace(
        request, alive=request.alive[1:], dropped=tuple(sorted((*request.dropped, victim)))
    )


def _name_alive_also_dropped(fed, site, request: UnmaskRequest) -> UnmaskRequest:  # type: ignore[no-untyped-def]
    return replace(request, dropped=tuple(sorted({*request.dropped, request.alive[0]})))


@pytest.mark.parametrize(
    ("rewrite", "needle"),
    [
        (_move_first_alive_to_dropped, "mask-key share of a survivor"),
        (_name_alive_also_dropped, "both alive and dropped"),
    ],
)
def test_a_coordinator_asking_for_both_shares_of_one_site_gets_nothing(rewrite, needle) -> None:  # type: ignore[no-untyped-def]
    fed, updates = make_fed(
        6, behaviour=RewriteCoordinator(ServerStage.UNMASK, rewrite, {"site-000"})
    )
    outcome = fed.run_round(1)
    err = outcome.client_errors[SiteId("site-000")]
    assert isinstance(err, CoordinatorMisbehaviourError) and needle in err.message
    assert outcome.sessions[SiteId("site-000")].revealed == ()
    # The other five still unmask (threshold 4 of 5): the round completes, exactly.
    assert_exact_without(outcome, fed, updates, set())


def test_a_second_unmask_request_after_revealing_is_refused() -> None:
    fed, _ = make_fed(5)
    outcome = fed.run_round(1)
    assert outcome.result is not None
    session = outcome.sessions[SiteId("site-000")]
    first = session.revealed
    request = UnmaskRequest(
        header=dataclasses.replace(
            fed.server.setup.header,
            recipient=SiteId("site-000"),
            setup_digest=fed.server.setup_digest,
        ),
        survivors=outcome.result.survivors,
        signatures=(),
        alive=(),
        dropped=(SiteId("site-001"),),
    )
    with pytest.raises(StaleMessageError):
        session.handle(resign(request, fed.coordinator_key))
    assert session.revealed == first
    assert all(kind.name == "SELF_MASK_SEED" for _, kind in first)


def test_a_coordinator_showing_different_survivor_sets_cannot_get_shares() -> None:
    # Complete graph of 5, threshold 3. Sites 0 and 1 are shown the set without site-004;
    # a malicious coordinator then asks them to treat site-004 as dropped (mask-key shares),
    # while the other three reveal site-004's self-mask share.
    group_b = {"site-000", "site-001"}
    captured: dict[str, bytes] = {}
    errors: dict[str, Exception] = {}

    class SplitView(Behaviour):
        def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is ServerStage.CONSISTENCY and site in group_b:
                _, msg = open_any(packet.payload)
                smaller = tuple(s for s in msg.survivors if s != "site-004")
                return Packet(resign(replace(msg, survivors=smaller), fed.coordinator_key))
            return packet

        def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is ServerStage.CONSISTENCY and site in group_b:
                captured[site] = open_any(packet.payload)[1].signature
            return (packet,)

        def before_advance(self, fed, stage):  # type: ignore[no-untyped-def]
            if stage is not ServerStage.CONSISTENCY:
                return
            smaller = tuple(SiteId(s) for s in fed.sites if s != "site-004")
            for site in sorted(group_b):
                request = UnmaskRequest(
                    header=dataclasses.replace(
                        fed.server.setup.header,
                        recipient=SiteId(site),
                        setup_digest=fed.server.setup_digest,
                    ),
                    survivors=smaller,
                    signatures=tuple((SiteId(s), captured[s]) for s in sorted(group_b)),
                    alive=tuple(s for s in smaller if s != site),
                    dropped=(SiteId("site-004"),),
                )
                try:
                    fed.sessions[SiteId(site)].handle(resign(request, fed.coordinator_key))
                except Exception as exc:
                    errors[site] = exc

    fed, _ = make_fed(5, behaviour=SplitView())
    outcome = fed.run_round(1)
    assert set(errors) == group_b
    assert all(
        isinstance(e, CoordinatorMisbehaviourError) and "valid signatures" in e.message
        for e in errors.values()
    )
    assert all(outcome.sessions[SiteId(s)].revealed == () for s in group_b)
    # The honest coordinator logic rejected their signatures over the other set.
    for s in group_b:
        assert isinstance(rejections_of(outcome, s)[0].error, BadSignatureError)
    # Three honest signers are too few holders for threshold 3 of every neighbourhood of 4
    # (each site lost two holders): the round fails cleanly, nothing is unmasked.
    assert isinstance(outcome.failure, ThresholdError)
    assert outcome.result is None
    assert all(session.revealed == () for session in outcome.sessions.values())


def test_an_unmask_request_with_a_survivor_set_other_than_the_signed_one_is_refused() -> None:
    def shrink(fed, site, request):  # type: ignore[no-untyped-def]
        return replace(request, survivors=request.survivors[1:])

    fed, _updates = make_fed(
        6, behaviour=RewriteCoordinator(ServerStage.UNMASK, shrink, {"site-003"})
    )
    outcome = fed.run_round(1)
    err = outcome.client_errors[SiteId("site-003")]
    assert isinstance(err, CoordinatorMisbehaviourError) and "different survivor set" in err.message
    assert outcome.sessions[SiteId("site-003")].revealed == ()


def _sparse_config():  # type: ignore[no-untyped-def]
    # 12 sites, degree 8, threshold 5: a sparse graph that sites assuming at most a tenth of
    # a cohort colludes accept (with the default third, 12 sites need the complete graph).
    return make_config(8, degree=8, max_colluding_fraction=SPARSE_GAMMA)


def test_a_coordinator_asking_for_shares_of_a_non_neighbour_gets_nothing() -> None:
    def add_stranger(fed, site, request):  # type: ignore[no-untyped-def]
        graph = fed.server.graph
        stranger = next(s for s in fed.sites if s != site and not graph.adjacent(site, s))
        return replace(request, alive=tuple(sorted({*request.alive, stranger})))

    fed, updates = make_fed(
        12,
        config=_sparse_config(),
        site_policy=SitePolicy(max_colluding_fraction=SPARSE_GAMMA),
        behaviour=RewriteCoordinator(ServerStage.UNMASK, add_stranger, {"site-005"}),
    )
    outcome = fed.run_round(1)
    err = outcome.client_errors[SiteId("site-005")]
    assert isinstance(err, CoordinatorMisbehaviourError) and "non-neighbour" in err.message
    assert outcome.sessions[SiteId("site-005")].revealed == ()
    assert_exact_without(outcome, fed, updates, set())


def test_a_coordinator_cannot_impose_its_own_neighbour_graph() -> None:
    # It routes a ciphertext from a non-neighbour (as if the graph had that edge).
    def add_foreign_edge(fed, site, delivery: ShareDelivery) -> ShareDelivery:  # type: ignore[no-untyped-def]
        graph = fed.server.graph
        stranger = next(s for s in fed.sites if s != site and not graph.adjacent(site, s))
        some_ct = delivery.items[0][1]
        return replace(delivery, items=tuple(sorted((*delivery.items, (stranger, some_ct)))))

    fed, _ = make_fed(
        12,
        config=_sparse_config(),
        site_policy=SitePolicy(max_colluding_fraction=SPARSE_GAMMA),
        behaviour=RewriteCoordinator(ServerStage.MASKED_INPUT, add_foreign_edge, {"site-007"}),
    )
    outcome = fed.run_round(1)
    err = outcome.client_errors[SiteId("site-007")]
    assert isinstance(err, CoordinatorMisbehaviourError) and "non-neighbour" in err.message


def test_the_graph_does_not_depend_on_the_order_the_coordinator_forwards_adverts_in() -> None:
    def reverse(fed, site, bundle):  # type: ignore[no-untyped-def]
        return replace(bundle, adverts=tuple(reversed(bundle.adverts)))

    fed, updates = make_fed(
        12,
        config=_sparse_config(),
        site_policy=SitePolicy(max_colluding_fraction=SPARSE_GAMMA),
        behaviour=RewriteCoordinator(ServerStage.SHARE, reverse),
    )
    outcome = fed.run_round(1)
    assert outcome.client_errors == {}
    for site, session in outcome.sessions.items():
        assert session.neighbours == fed.server.graph.of(site)
    assert_exact_without(outcome, fed, updates, set())


def test_the_graph_seed_changes_with_any_signed_advert() -> None:
    digests = {SiteId(f"s{i}"): bytes([i]) * 32 for i in range(5)}
    base = graph_seed(digests)
    for s in digests:
        changed = dict(digests)
        changed[s] = b"\xff" * 32
        assert graph_seed(changed) != base


def test_a_coordinator_handing_a_site_another_model_digest_is_detected() -> None:
    def other_model(fed, site, setup):  # type: ignore[no-untyped-def]
        return replace(setup, header=dataclasses.replace(setup.header, model_digest=b"\x13" * 32))

    fed, updates = make_fed(
        5, behaviour=RewriteCoordinator(ServerStage.ADVERTISE, other_model, {"site-001"})
    )
    outcome = fed.run_round(1)
    # The site answered the run's commit exchange for the real model: it refuses the setup
    # naming another (before, it advertised and the coordinator rejected the advert).
    error = outcome.client_errors[SiteId("site-001")]
    assert isinstance(error, CoordinatorMisbehaviourError) and "commit exchange" in error.message
    assert_exact_without(outcome, fed, updates, {"site-001"})
    # Without a commit exchange (the site committed in an earlier round), the coordinator's
    # own check rejects the advert binding another model.
    fed, updates = make_fed(
        5, behaviour=RewriteCoordinator(ServerStage.ADVERTISE, other_model, {"site-001"})
    )
    precommit(fed)
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-001")
    assert "model digest" in rej.error.message
    assert_exact_without(outcome, fed, updates, {"site-001"})


def test_a_coordinator_proposing_an_unsafe_threshold_is_refused() -> None:
    def weaken(fed, site, setup):  # type: ignore[no-untyped-def]
        return replace(
            setup, params=dataclasses.replace(setup.params, threshold=1, min_survivors=1)
        )

    fed, _ = make_fed(5, behaviour=RewriteCoordinator(ServerStage.ADVERTISE, weaken))
    outcome = fed.run_round(1)
    assert _site_error_types(outcome) == {CoordinatorMisbehaviourError}
    assert isinstance(outcome.failure, ThresholdError)


def test_a_survivor_set_from_an_unpinned_coordinator_key_is_refused() -> None:
    class Impostor(Behaviour):
        def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is ServerStage.CONSISTENCY and site == "site-002":
                _, msg = open_any(packet.payload)
                assert isinstance(msg, SurvivorSet)
                return Packet(resign(msg, ATTACKER))
            return packet

    fed, updates = make_fed(5, behaviour=Impostor())
    outcome = fed.run_round(1)
    assert isinstance(outcome.client_errors[SiteId("site-002")], UnknownSignerError)
    assert_exact_without(outcome, fed, updates, set())


def test_an_expired_round_setup_is_stale() -> None:
    fed, _ = make_fed(3)
    server = SecAggServer(
        fed.config,
        fed.roster,
        fed.sites,
        identity_key=fed.coordinator_key,
        run_id=fed.run_id_for(1),
        round=1,
        model_digest=fed.model_digest_for(1),
        now=1_700_000_000.0,
    )
    packets = server.start()
    late = fed.make_session(
        SiteId("site-000"), 1, now=1_700_000_000.0 + fed.config.round_timeout_s + 1
    )
    with pytest.raises(StaleMessageError):
        late.handle(packets[SiteId("site-000")].payload)
    assert late.stage is ClientStage.AWAIT_SETUP
    on_time = fed.make_session(SiteId("site-000"), 1, now=1_700_000_000.0 + 5)
    assert on_time.handle(packets[SiteId("site-000")].payload) is not None


# -- a malicious site during unmasking ---------------------------------------------------------


def _garbage_shares(fed, site: str, packet: Packet) -> tuple[Packet]:  # type: ignore[no-untyped-def]
    _, response = open_any(packet.payload)
    assert isinstance(response, UnmaskResponse)
    bad = []
    for owner, kind, raw in response.shares:
        share = Share.from_bytes(raw)
        values = (share.values.astype(np.uint64) * 7 + 11) % PRIME
        bad.append((owner, kind, Share(share.index, values.astype(np.uint32)).to_bytes()))
    return (Packet(resign(replace(response, shares=tuple(bad)), fed.site_keys[SiteId(site)])),)


def test_garbage_shares_from_a_site_are_detected_and_excluded() -> None:
    # Complete graph of 10: degree 9, threshold 7; a dropout and a liar leave 7 honest shares.
    liar = "site-002"
    fed, updates = make_fed(
        10,
        behaviour=ReplaceReply(
            ServerStage.UNMASK, liar, lambda fed, p: _garbage_shares(fed, liar, p)
        ),
        dropouts={
            ServerStage.MASKED_INPUT: ["site-009"]
        },  # also exercise a mask-key reconstruction
    )
    outcome = fed.run_round(1)
    assert outcome.failure is None
    liar_rejections = rejections_of(outcome, liar)
    assert liar_rejections and all(
        "does not match its commitment" in r.error.message for r in liar_rejections
    )
    assert_exact_without(outcome, fed, updates, {"site-009"})


def test_too_many_garbage_shares_fail_the_round_instead_of_a_wrong_aggregate() -> None:
    class TwoLiars(Behaviour):
        def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is ServerStage.UNMASK and site in {"site-000", "site-001"}:
                return _garbage_shares(fed, site, packet)
            return (packet,)

    fed, _ = make_fed(5, behaviour=TwoLiars())
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, ReconstructionError)
    assert outcome.result is None
    with pytest.raises(ReconstructionError):
        _ = fed.server.result


def test_a_response_revealing_other_shares_than_requested_is_rejected() -> None:
    def drop_one(fed, packet):  # type: ignore[no-untyped-def]
        _, response = open_any(packet.payload)
        return (
            Packet(
                resign(
                    replace(response, shares=response.shares[1:]), fed.site_keys[SiteId("site-001")]
                )
            ),
        )

    fed, updates = make_fed(6, behaviour=ReplaceReply(ServerStage.UNMASK, "site-001", drop_one))
    outcome = fed.run_round(1)
    assert "differ from the ones requested" in rejections_of(outcome, "site-001")[0].error.message
    assert_exact_without(outcome, fed, updates, set())


def test_a_coordinator_message_replayed_from_an_earlier_round_is_stale_at_the_site() -> None:
    class Replayer(Behaviour):
        def __init__(self) -> None:
            self.old: dict[ServerStage, bytes] = {}
            self.round = 1

        def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if site != "site-000":
                return packet
            if self.round == 1:
                self.old[stage] = packet.payload
                return packet
            return Packet(self.old[stage]) if stage is ServerStage.UNMASK else packet

    spy = Replayer()
    fed, _ = make_fed(6, behaviour=spy)
    assert fed.run_round(1).result is not None
    spy.round = 2
    outcome = fed.run_round(2)
    err = outcome.client_errors[SiteId("site-000")]
    assert isinstance(err, StaleMessageError) and "round 1" in err.message
    assert outcome.sessions[SiteId("site-000")].revealed == ()
    assert outcome.result is not None


def test_a_site_advertising_an_invalid_point_is_rejected_before_its_advert_is_forwarded() -> None:
    def bad_point(fed, packet):  # type: ignore[no-untyped-def]
        _, advert = open_any(packet.payload)
        broken = replace(advert, mask_public=b"\x04" + b"\x01" * 64)
        return (Packet(resign(broken, fed.site_keys[SiteId("site-003")])),)

    fed, updates = make_fed(5, behaviour=ReplaceReply(ServerStage.ADVERTISE, "site-003", bad_point))
    outcome = fed.run_round(1)
    [rej] = rejections_of(outcome, "site-003")
    assert "not a P-256 point" in rej.error.message
    assert outcome.client_errors == {}
    assert_exact_without(outcome, fed, updates, {"site-003"})
