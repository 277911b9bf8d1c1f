"""The neighbour-graph seed cannot be re-drawn by the coordinator after it has seen the adverts.

Strict advert bundles (every cohort member's advert, or every site refuses), the graph seed
bound into the consistency signatures, new setup attempts for stage-1 dropouts, and the
site-side caps on attempts and cohort size (issue 4, DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.crypto.agreement import AgreementKey
from fedseal.crypto.signing import sign
from fedseal.protocol import (
    BadSignatureError,
    ClientSession,
    ClientStage,
    CohortTooSmallError,
    ConfigError,
    CoordinatorMisbehaviourError,
    DecodeError,
    DuplicateMessageError,
    IncompleteBundleError,
    Packet,
    ProtocolError,
    Rejection,
    SetupAttemptError,
    SetupGuard,
    SetupRestart,
    SitePolicy,
    StaleMessageError,
    ThresholdError,
)
from fedseal.protocol.envelope import Envelope, seal
from fedseal.protocol.messages import (
    AdvertBundle,
    ConsistencySignature,
    Header,
    KeyAdvert,
    RoundSetup,
    SurvivorSet,
    UnmaskRequest,
    survivor_statement,
)
from fedseal.protocol.server import ServerStage
from fedseal.protocol.types import COORDINATOR, SURVIVOR_STATEMENT_TYPE, SiteId, site_sort_key
from fedseal.sim.inmemory import Behaviour, DeterministicRandom
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
from tests.protocol.test_fuzz import MUTATIONS, mutate

NOW = 1_700_000_000.0


class SilentPerAttempt(Behaviour):
    """Sites that do not answer the round setup of a given attempt."""

    def __init__(self, silent: dict[int, set[str]]) -> None:
        self.silent = silent

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is ServerStage.ADVERTISE and site in self.silent.get(fed.server.attempt, set()):
            return ()
        return (packet,)


def _exact(outcome, fed, updates) -> None:  # type: ignore[no-untyped-def]
    result = outcome.result
    assert result is not None, outcome.failure
    plain = expected_sum(fed, updates, result.survivors, 1)
    assert result.aggregate.dtype == plain.dtype
    assert np.array_equal(result.aggregate, plain)


# -- strict bundles ----------------------------------------------------------------------


def test_a_coordinator_that_omits_one_advert_from_the_bundle_is_refused_by_every_site() -> None:
    class OmitOne(Behaviour):
        def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is not ServerStage.SHARE:
                return packet
            _, bundle = open_any(packet.payload)
            assert isinstance(bundle, AdvertBundle)
            kept = tuple(a for a in bundle.adverts if open_any(a)[1].header.sender != "site-002")
            return Packet(resign(replace(bundle, adverts=kept), fed.coordinator_key))

    fed, _ = make_fed(6, behaviour=OmitOne())
    outcome = fed.run_round(1)
    assert set(outcome.client_errors) == set(fed.sites)
    for error in outcome.client_errors.values():
        assert type(error) is IncompleteBundleError
        assert error.site == "site-002"
        assert "1 of the 6 cohort members" in error.message
    # Nobody shared keys: the round fails cleanly, nothing revealed, nothing summed.
    assert isinstance(outcome.failure, ThresholdError)
    assert outcome.result is None
    assert all(s.neighbours == () and s.revealed == () for s in outcome.sessions.values())


def test_a_bundle_with_every_advert_re_signed_by_the_coordinator_is_accepted() -> None:
    # The control for the test above: re-signing alone changes nothing.
    class Resign(Behaviour):
        def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is ServerStage.SHARE:
                _, bundle = open_any(packet.payload)
                return Packet(resign(bundle, fed.coordinator_key))
            return packet

    fed, updates = make_fed(6, behaviour=Resign())
    outcome = fed.run_round(1)
    assert outcome.client_errors == {}
    _exact(outcome, fed, updates)


def _equivocating_advert(fed, colluder: SiteId, advert_packet: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """A second advert from ``colluder`` (same share key, another mask key), signed by it."""
    _, advert = open_any(advert_packet)
    assert isinstance(advert, KeyAdvert)
    other = AgreementKey.generate(DeterministicRandom(b"equivocation")).public_bytes()
    return seal(replace(advert, mask_public=other), fed.site_keys[colluder])


class SplitBundles(Behaviour):
    """A coordinator colluding with ``colluder`` shows group B a different advert of it.

    It then plays the malicious coordinator at the consistency stage: it hands every group-B
    site an unmask request holding every signature it collected, plus the colluder's
    signature over group B's statement.
    """

    def __init__(self, colluder: str, group_b: set[str]) -> None:
        self.colluder = SiteId(colluder)
        self.group_b = {SiteId(s) for s in group_b}
        self.forged: bytes = b""
        self.signatures: dict[SiteId, bytes] = {}
        self.survivors: tuple[SiteId, ...] = ()
        self.b_errors: dict[SiteId, Exception] = {}

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is ServerStage.ADVERTISE and site == self.colluder:
            self.forged = _equivocating_advert(fed, self.colluder, packet.payload)
        if stage is ServerStage.CONSISTENCY:
            _, msg = open_any(packet.payload)
            assert isinstance(msg, ConsistencySignature)
            self.signatures[site] = msg.signature
        return (packet,)

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is ServerStage.CONSISTENCY:
            _, announced = open_any(packet.payload)
            assert isinstance(announced, SurvivorSet)
            self.survivors = announced.survivors
        if stage is not ServerStage.SHARE or site not in self.group_b:
            return packet
        _, bundle = open_any(packet.payload)
        assert isinstance(bundle, AdvertBundle)
        adverts = tuple(
            self.forged if open_any(a)[1].header.sender == self.colluder else a
            for a in bundle.adverts
        )
        return Packet(resign(replace(bundle, adverts=adverts), fed.coordinator_key))

    def before_advance(self, fed, stage):  # type: ignore[no-untyped-def]
        if stage is not ServerStage.CONSISTENCY:
            return
        setup = fed.server.setup
        b_bundle = fed.sessions[min(self.group_b)].bundle
        assert b_bundle
        statement = survivor_statement(
            setup.header.run_id, setup.header.round, setup.digest, b_bundle, self.survivors
        )
        signatures = dict(self.signatures)
        signatures[self.colluder] = sign(
            fed.site_keys[self.colluder], SURVIVOR_STATEMENT_TYPE, statement
        )
        ordered = tuple(sorted(signatures.items(), key=lambda it: site_sort_key(it[0])))
        for site in sorted(self.group_b):
            header = Header(
                setup.header.run_id,
                setup.header.round,
                COORDINATOR,
                site,
                setup.header.model_digest,
                setup.digest,
            )
            others = tuple(s for s in self.survivors if s != site)
            request = UnmaskRequest(header, self.survivors, ordered, others, ())
            try:
                fed.sessions[site].handle(seal(request, fed.coordinator_key))
            except CoordinatorMisbehaviourError as exc:
                self.b_errors[site] = exc


def test_different_bundles_to_different_sites_are_detected_before_any_share_is_revealed() -> None:
    # Six sites, quorum 4. site-005 colludes and signs two adverts (other keys, the same
    # committed graph nonce); the coordinator shows sites 3 and 4 the second one. Their graph
    # is the same (the seed comes from the nonces) but their advert bundle differs, so their
    # survivor-set signatures verify for nobody else, and even with the colluder signing their
    # statement too they hold 3 valid signatures, not 4: they reveal nothing.
    spy = SplitBundles("site-005", {"site-003", "site-004"})
    fed, _ = make_fed(6, behaviour=spy)
    outcome = fed.run_round(1)
    seeds = {s: outcome.sessions[s].graph.seed for s in fed.sites}  # type: ignore[union-attr]
    assert len(set(seeds.values())) == 1
    bundles = {s: outcome.sessions[s].bundle for s in fed.sites}
    assert bundles["site-003"] == bundles["site-004"] != bundles["site-000"] == bundles["site-005"]
    # The group shown the other bundle refuses to unmask.
    assert set(spy.b_errors) == {"site-003", "site-004"}
    for error in spy.b_errors.values():
        assert "valid signatures" in error.message
    # The coordinator's own check rejects their signatures; the round fails before any
    # unmask request, and no site revealed a share.
    rejected = {
        r.site
        for r in outcome.server.rejections
        if r.stage is ServerStage.CONSISTENCY and isinstance(r.error, BadSignatureError)
    }
    assert rejected == {"site-003", "site-004"}
    assert isinstance(outcome.failure, ThresholdError)
    assert all(s.revealed == () for s in outcome.sessions.values())


# -- new setup attempts ---------------------------------------------------------------------


def test_a_stage_one_dropout_leads_to_a_second_attempt_and_the_round_commits_exactly() -> None:
    fed, updates = make_fed(6, dropouts={ServerStage.ADVERTISE: ["site-002"]})
    outcome = fed.run_round(1)
    assert outcome.client_errors == {}
    result = outcome.result
    assert result is not None, outcome.failure
    assert result.setup_attempts == 2
    [restart] = result.restarts
    assert restart == SetupRestart(
        attempt=1,
        cohort=tuple(SiteId(s) for s in site_names(6) if s != "site-002"),
        dropped=(SiteId("site-002"),),
        setup_digest=outcome.server.setup_digest,
    )
    assert restart in outcome.server.log
    assert ("site-002", ServerStage.ADVERTISE) in {(d.site, d.stage) for d in result.dropouts}
    assert set(result.survivors) == set(site_names(6)) - {"site-002"}
    # The new attempt is re-resolved for five sites and bound into every later message.
    setup = outcome.server.setup
    assert setup.attempt == 1 and len(setup.cohort) == 5 and setup.params.degree == 4
    for s in result.survivors:
        assert outcome.sessions[s].attempt == 1
        assert outcome.sessions[s].stage is ClientStage.DONE
    _exact(outcome, fed, updates)


def test_stage_one_dropouts_in_a_sparse_graph_restart_and_still_sum_exactly() -> None:
    # Sites assuming at most a tenth colludes accept degree 8 of 12 (sparse).
    config = make_config(8, degree=8, max_colluding_fraction=0.1)
    silent = ["site-003", "site-007"]
    fed, updates = make_fed(
        12, config=config, dropouts={ServerStage.ADVERTISE: silent},
        site_policy=SitePolicy(max_colluding_fraction=0.1),
    )
    outcome = fed.run_round(1)
    result = outcome.result
    assert result is not None, outcome.failure
    assert result.setup_attempts == 2
    assert outcome.server.graph is not None and outcome.server.graph.degree < 9
    assert set(result.survivors) == set(site_names(12)) - set(silent)
    _exact(outcome, fed, updates)


def test_a_dropout_in_each_of_two_attempts_leads_to_a_third_that_commits() -> None:
    behaviour = SilentPerAttempt({0: {"site-001"}, 1: {"site-004"}})
    fed, updates = make_fed(7, behaviour=behaviour)
    outcome = fed.run_round(1)
    result = outcome.result
    assert result is not None, outcome.failure
    assert result.setup_attempts == 3
    assert [r.dropped for r in result.restarts] == [("site-001",), ("site-004",)]
    assert set(result.survivors) == set(site_names(7)) - {"site-001", "site-004"}
    _exact(outcome, fed, updates)


def test_the_coordinator_fails_the_round_once_its_setup_attempts_are_spent() -> None:
    # 12 sites: after three silent ones, 9 adverts still reach the first cohort's quorum of 9.
    behaviour = SilentPerAttempt({0: {"site-001"}, 1: {"site-004"}, 2: {"site-006"}})
    fed, _ = make_fed(12, behaviour=behaviour)
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, ThresholdError)
    assert "3 setup attempts are spent" in outcome.failure.message
    assert outcome.result is None
    assert len(outcome.server.restarts) == 2


def test_attempts_beyond_the_site_cap_are_refused_by_the_sites() -> None:
    # The coordinator would try five attempts; the sites answer three (0, 1, 2).
    behaviour = SilentPerAttempt({0: {"site-001"}, 1: {"site-004"}, 2: {"site-006"}})
    config = make_config(16, max_setup_attempts=5)
    fed, _ = make_fed(12, config=config, behaviour=behaviour)
    outcome = fed.run_round(1)
    fourth = set(site_names(12)) - {"site-001", "site-004", "site-006"}
    assert set(outcome.client_errors) == fourth
    for error in outcome.client_errors.values():
        assert type(error) is SetupAttemptError
        assert "limit of 3 attempts" in error.message
    assert isinstance(outcome.failure, ThresholdError)
    assert outcome.server.attempt == 3
    for s in fourth:
        assert outcome.sessions[SiteId(s)].stage is ClientStage.FAILED


def test_a_fresh_session_refuses_a_setup_attempt_beyond_its_cap_and_records_nothing() -> None:
    fed, _ = make_fed(5)
    server = fed_server(fed)
    setup = replace(_first_setup(server, "site-000"), attempt=3)
    session = fed.make_session(SiteId("site-000"), 1, NOW)
    with pytest.raises(SetupAttemptError):
        session.handle(resign(setup, fed.coordinator_key))
    assert fed.guards[SiteId("site-000")].answered(fed.run_id_for(1)) is None


def _guard(fed, site: str, policy: SitePolicy | None = None) -> SetupGuard:  # type: ignore[no-untyped-def]
    """A copy of ``site``'s guard (``fed.guards``: the graph nonces it committed to)."""
    return SetupGuard.from_bytes(fed.guards[SiteId(site)].to_bytes(), policy)


def _session(fed, site: str, guard: SetupGuard | None, seed: bytes = b"") -> ClientSession:  # type: ignore[no-untyped-def]
    sid = SiteId(site)
    if guard is None:
        guard = _guard(fed, site)
    return ClientSession(
        sid,
        fed.site_keys[sid],
        fed.coordinator_key.public_key(),
        update_fn=lambda info: fed.updates(sid, info),
        rng=np.random.default_rng(0),
        randbytes=DeterministicRandom(b"session/" + seed + sid.encode()),
        now=lambda: NOW,
        trusted_peers=fed.trusted_peers[sid],
        guard=guard,
    )


def fed_server(fed):  # type: ignore[no-untyped-def]
    from fedseal.protocol import SecAggServer

    return SecAggServer(
        fed.config,
        fed.roster,
        fed.sites,
        identity_key=fed.coordinator_key,
        run_id=fed.run_id_for(1),
        round=1,
        model_digest=fed.model_digest_for(1),
        now=NOW,
        commitments=fed.commitments or precommit(fed),  # committed in an earlier round
    )


def _first_setup(server, site: str) -> RoundSetup:  # type: ignore[no-untyped-def]
    _, setup = open_any(server.start()[SiteId(site)].payload)
    assert isinstance(setup, RoundSetup)
    return setup


class CaptureSetups(Behaviour):
    """Keep every setup packet the coordinator sends, by attempt and site."""

    def __init__(self) -> None:
        self.setups: dict[tuple[int, SiteId], bytes] = {}

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is ServerStage.ADVERTISE:
            self.setups[(fed.server.attempt, site)] = packet.payload
        return packet


def test_a_replayed_or_older_attempt_setup_is_refused() -> None:
    capture = CaptureSetups()
    fed, _ = make_fed(6, behaviour=capture, dropouts={ServerStage.ADVERTISE: ["site-002"]})
    site = SiteId("site-000")
    replies: dict[str, object] = {}

    class Replay(Behaviour):
        def coordinator_sends(self, fed_, stage, s, packet):  # type: ignore[no-untyped-def]
            return capture.coordinator_sends(fed_, stage, s, packet)

        def before_advance(self, fed_, stage):  # type: ignore[no-untyped-def]
            if stage is not ServerStage.ADVERTISE or fed_.server.attempt != 1:
                return
            session = fed_.sessions[site]
            old = capture.setups[(0, site)]
            # The very same attempt-0 envelope: seen before.
            with pytest.raises(DuplicateMessageError):
                session.handle(old)
            # Attempt 0 re-signed with another expiry (a new digest): not newer than 1.
            _, setup0 = open_any(old)
            assert isinstance(setup0, RoundSetup)
            again = resign(replace(setup0, expires_at=setup0.expires_at + 1), fed_.coordinator_key)
            with pytest.raises(StaleMessageError, match="not newer"):
                session.handle(again)
            # A fresh session for the site (e.g. a restarted process) shares its guard.
            fresh = fed_.make_session(site, 1, NOW)
            with pytest.raises(StaleMessageError, match="not newer"):
                fresh.handle(old)
            replies["stage"] = session.stage
            replies["attempt"] = session.attempt

    fed.behaviour = Replay()
    outcome = fed.run_round(1)
    # The refusals left the session in attempt 1, and the round still committed.
    assert replies == {"stage": ClientStage.AWAIT_ADVERTS, "attempt": 1}
    assert outcome.result is not None, outcome.failure
    assert outcome.result.setup_attempts == 2
    # After sharing keys in round 1, the site answers no further setup for round 1.
    _, setup1 = open_any(capture.setups[(1, site)])
    assert isinstance(setup1, RoundSetup)
    later = resign(replace(setup1, attempt=2), fed.coordinator_key)
    with pytest.raises(StaleMessageError, match="already shared keys"):
        fed.make_session(site, 1, NOW).handle(later)


def test_a_late_reply_to_an_earlier_attempt_is_rejected_without_dropping_the_site() -> None:
    fed, _ = make_fed(5)
    server = fed_server(fed)
    sessions = {s: fed.make_session(s, 1, NOW) for s in fed.sites}
    outbound = server.start()
    first = {s: sessions[s].handle(p.payload) for s, p in outbound.items()}
    for s in fed.sites[1:]:
        reply = first[s]
        assert reply is not None
        server.receive(s, reply.payload)
    restart = server.advance()
    assert server.stage is ServerStage.ADVERTISE and server.attempt == 1
    assert set(restart) == set(fed.sites[1:])
    # The same advert again: a duplicate; another attempt-0 advert (e.g. from a restarted
    # process of the site): superseded. Neither makes the site a dropout of attempt 1.
    late = first[SiteId("site-001")]
    assert late is not None
    receipt = server.receive("site-001", late.payload)
    assert isinstance(receipt, Rejection) and isinstance(receipt.error, DuplicateMessageError)
    # (An honest site never answers attempt 0 twice: its graph nonce was revealed for it. A
    # misbehaving one can sign another attempt-0 advert.)
    _, advert = open_any(late.payload)
    fresh_key = AgreementKey.generate().public_bytes()
    other = resign(replace(advert, share_public=fresh_key), fed.site_keys[SiteId("site-001")])
    receipt = server.receive("site-001", other)
    assert isinstance(receipt, Rejection) and isinstance(receipt.error, StaleMessageError)
    assert "earlier setup attempt" in receipt.error.message
    assert SiteId("site-001") in server.awaiting
    # The dropped site's late advert is refused too; it is not part of attempt 1.
    stray = first[SiteId("site-000")]
    assert stray is not None
    assert isinstance(server.receive("site-000", stray.payload), Rejection)
    for s, packet in restart.items():
        reply = sessions[s].handle(packet.payload)
        assert reply is not None
        assert not isinstance(server.receive(s, reply.payload), Rejection)
    bundles = server.advance()
    assert server.stage is ServerStage.SHARE and set(bundles) == set(restart)


# -- cohort size -------------------------------------------------------------------------------


def test_a_cohort_below_the_site_minimum_is_refused() -> None:
    fed, _ = make_fed(4)
    outcome = fed.run_round(1, cohort=site_names(2))
    assert set(outcome.client_errors) == {"site-000", "site-001"}
    for error in outcome.client_errors.values():
        assert type(error) is CohortTooSmallError
        assert "cohort of 2 sites is below this site's minimum of 3" in error.message
    assert isinstance(outcome.failure, ThresholdError)


def test_a_coordinator_cannot_shrink_the_cohort_below_the_site_minimum_by_restarting() -> None:
    # Three sites, one silent: the second attempt would hold two; sites refuse it. (Sites and
    # coordinator assume no colluder here, so the first attempt's quorum of 2 lets the
    # coordinator try; with the default third, it fails the round itself.)
    fed, _ = make_fed(
        3,
        config=make_config(16, max_colluding_fraction=0.0, min_survivors=2),
        site_policy=SitePolicy(max_colluding_fraction=0.0),
        dropouts={ServerStage.ADVERTISE: ["site-000"]},
    )
    outcome = fed.run_round(1)
    assert {type(e) for e in outcome.client_errors.values()} == {CohortTooSmallError}
    assert set(outcome.client_errors) == {"site-001", "site-002"}
    assert outcome.result is None and isinstance(outcome.failure, ThresholdError)


def test_a_site_with_a_larger_minimum_refuses_a_cohort_the_coordinator_accepts() -> None:
    fed, _ = make_fed(5, site_policy=SitePolicy(min_cohort=6))
    outcome = fed.run_round(1)
    assert {type(e) for e in outcome.client_errors.values()} == {CohortTooSmallError}
    assert outcome.result is None


# -- configuration, guard persistence, decoders -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_setup_attempts": 0},
        {"max_setup_attempts": 17},
        {"max_setup_attempts": 2.5},
        {"min_cohort": 1},
        {"min_cohort": "3"},
    ],
)
def test_an_out_of_range_site_policy_is_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SitePolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("attempts", [0, 17])
def test_an_out_of_range_coordinator_attempt_count_is_a_config_error(attempts: int) -> None:
    with pytest.raises(ConfigError, match="max_setup_attempts"):
        make_config(4, max_setup_attempts=attempts).resolve(5)


def test_a_persisted_guard_keeps_refusing_what_it_refused_before() -> None:
    guard = SetupGuard(SitePolicy(max_setup_attempts=4))
    run = b"r" * 16
    guard.admit(run, 7, 1)
    guard.admit(b"s" * 16, 2, 0)
    guard.mark_shared(b"s" * 16, 2, 0)
    restored = SetupGuard.from_bytes(guard.to_bytes(), SitePolicy(max_setup_attempts=4))
    assert restored.to_bytes() == guard.to_bytes()
    assert restored.answered(run) == (7, 1, False)
    with pytest.raises(StaleMessageError):
        restored.check(run, 7, 1)
    with pytest.raises(StaleMessageError):
        restored.check(run, 6, 3)
    with pytest.raises(StaleMessageError, match="already shared keys"):
        restored.check(b"s" * 16, 2, 1)
    restored.check(run, 7, 2)
    restored.check(run, 8, 0)
    with pytest.raises(SetupAttemptError):
        restored.check(run, 8, 4)


@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_restore_a_guard_or_raise_a_decode_error(data: bytes) -> None:
    try:
        SetupGuard.from_bytes(data)
    except DecodeError:
        pass


@given(data=st.binary(max_size=60), cut=st.integers(0, 80))
def test_mutated_guard_bytes_restore_or_raise_a_decode_error(data: bytes, cut: int) -> None:
    guard = SetupGuard()
    guard.admit(b"q" * 16, 3, 1)
    blob = guard.to_bytes()
    mutated = blob[: cut % (len(blob) + 1)] + data
    try:
        SetupGuard.from_bytes(mutated)
    except DecodeError:
        pass


@given(attempt=st.integers(0, 2**16 - 1), cap=st.integers(1, 16))
def test_a_session_answers_a_setup_exactly_when_its_attempt_is_below_the_cap(
    attempt: int, cap: int
) -> None:
    fed, _ = _FED
    setup = replace(_SETUP, attempt=attempt)
    session = _session(fed, "site-000", _guard(fed, "site-000", SitePolicy(max_setup_attempts=cap)))
    payload = resign(setup, fed.coordinator_key)
    if attempt < cap:
        reply = session.handle(payload)
        assert reply is not None
        _, advert = open_any(reply.payload)
        assert advert.header.setup_digest == setup.digest
        assert session.attempt == attempt
    else:
        with pytest.raises(SetupAttemptError):
            session.handle(payload)


_FED = make_fed(4)
_SETUP = _first_setup(fed_server(_FED[0]), "site-000")


@given(attempt=st.integers(0, 2**16 - 1))
def test_the_attempt_number_round_trips_and_changes_the_setup_digest(attempt: int) -> None:
    setup = replace(_SETUP, attempt=attempt)
    env = Envelope.from_bytes(resign(setup, _FED[0].coordinator_key), LIMITS_DEFAULT)
    _, decoded = open_any(env.to_bytes())
    assert decoded == setup
    assert (setup.digest == _SETUP.digest) == (attempt == _SETUP.attempt)


@given(tail=st.binary(min_size=0, max_size=3))
def test_a_setup_body_with_a_damaged_attempt_field_is_a_decode_error_or_another_setup(
    tail: bytes,
) -> None:
    payload = _SETUP.to_payload()[:-2] + tail
    from fedseal.protocol.messages import decode_payload

    try:
        decoded = decode_payload(RoundSetup.KIND, payload, LIMITS_DEFAULT)
    except DecodeError:
        assert len(tail) != 2
    else:
        assert len(tail) == 2
        assert isinstance(decoded, RoundSetup)
        assert decoded.attempt == int.from_bytes(tail, "big")


def test_the_header_of_a_restarted_setup_is_unchanged_apart_from_the_body() -> None:
    # A new attempt differs from the first in the body only (attempt, cohort, parameters).
    a = _SETUP
    b = dataclasses.replace(a, attempt=1)
    assert a.header == b.header and a.body_bytes() != b.body_bytes()


def _attempt(setup: RoundSetup, attempt: int, cohort_without: str | None = None) -> RoundSetup:
    cohort = tuple(m for m in setup.cohort if m.site != cohort_without)
    params = _FED_OF_5[0].config.resolve(len(cohort))
    return replace(setup, attempt=attempt, cohort=cohort, params=params)  # type: ignore[return-value]


def test_a_session_restored_between_attempts_answers_the_next_and_refuses_an_older_one() -> None:
    fed, _ = _FED_OF_5
    site = "site-000"
    first = _session(fed, site, None)
    assert first.handle(resign(_SETUP_OF_5, fed.coordinator_key)) is not None
    blob = first.export_state(b"k" * 32)
    sid = SiteId(site)
    restored = ClientSession.restore(
        blob,
        b"k" * 32,
        sid,
        fed.site_keys[sid],
        fed.coordinator_key.public_key(),
        update_fn=lambda info: fed.updates(sid, info),
        rng=np.random.default_rng(0),
        randbytes=DeterministicRandom(b"restored"),
        now=lambda: NOW,
        trusted_peers=fed.trusted_peers[sid],
        guard=_guard(fed, site),
    )
    assert restored.stage is ClientStage.AWAIT_ADVERTS and restored.attempt == 0
    older = resign(replace(_SETUP_OF_5, expires_at=_SETUP_OF_5.expires_at - 1), fed.coordinator_key)
    with pytest.raises(StaleMessageError, match="not newer"):
        restored.handle(older)
    second = _attempt(_SETUP_OF_5, 1, cohort_without="site-004")
    reply = restored.handle(resign(second, fed.coordinator_key))
    assert reply is not None
    _, advert = open_any(reply.payload)
    assert advert.header.setup_digest == second.digest
    assert restored.attempt == 1 and restored.stage is ClientStage.AWAIT_ADVERTS


def test_a_new_attempt_for_another_round_or_model_is_refused() -> None:
    fed, _ = _FED_OF_5
    session = _session(fed, "site-000", None)
    assert session.handle(resign(_SETUP_OF_5, fed.coordinator_key)) is not None
    h = _SETUP_OF_5.header
    other_round = replace(_attempt(_SETUP_OF_5, 1), header=dataclasses.replace(h, round=2))
    with pytest.raises(StaleMessageError, match="same run and round"):
        session.handle(resign(other_round, fed.coordinator_key))
    assert session.stage is ClientStage.AWAIT_ADVERTS
    other_model = replace(
        _attempt(_SETUP_OF_5, 1), header=dataclasses.replace(h, model_digest=b"\x07" * 32)
    )
    with pytest.raises(CoordinatorMisbehaviourError, match="another model"):
        session.handle(resign(other_model, fed.coordinator_key))
    assert session.stage is ClientStage.FAILED


@settings(max_examples=40)
@given(ops=MUTATIONS)
def test_a_mutated_re_signed_new_attempt_raises_only_protocol_errors(ops) -> None:  # type: ignore[no-untyped-def]
    fed, _ = _FED_OF_5
    session = _session(fed, "site-000", None)
    assert session.handle(resign(_SETUP_OF_5, fed.coordinator_key)) is not None
    good = Envelope.from_bytes(
        resign(_attempt(_SETUP_OF_5, 1), fed.coordinator_key), LIMITS_DEFAULT
    )
    payload = mutate(good.payload, ops)
    signature = sign(fed.coordinator_key, good.kind.type_name, payload)
    data = dataclasses.replace(good, payload=payload, signature=signature).to_bytes()
    try:
        reply = session.handle(data)
    except (StaleMessageError, DuplicateMessageError):
        assert session.stage is ClientStage.AWAIT_ADVERTS and session.attempt == 0
    except ProtocolError:
        assert session.stage is ClientStage.FAILED
    else:
        assert reply is not None and session.attempt is not None and session.attempt >= 1


_FED_OF_5 = make_fed(5)
_SETUP_OF_5 = _first_setup(fed_server(_FED_OF_5[0]), "site-000")
