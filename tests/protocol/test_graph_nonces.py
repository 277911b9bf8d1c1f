"""Graph nonces: commit-then-reveal, so no colluding site can grind its advert to steer the graph.

On 523e63f the graph seed hashed the key adverts themselves, and a site colluding with the
coordinator saw the honest adverts before sending its own: it tried ephemeral keys (415 tries,
0.3 s) until it and another colluder were a victim's only neighbours. Now the seed comes from
graph nonces every member committed to before the setup (in its previous round's advert, or a
commit exchange the run's first round starts with), revealed one hash-chain step per attempt.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.protocol import ClientStage, SetupGuard
from fedseal.protocol.errors import NonceError
from fedseal.protocol.graph import (
    CHAIN_LENGTH,
    graph_seed,
    nonce_commitment,
    nonce_reveal,
    opens,
)
from fedseal.protocol.messages import AdvertBundle, KeyAdvert
from fedseal.protocol.server import Rejection, ServerStage
from fedseal.protocol.types import SiteId
from fedseal.sim.inmemory import Behaviour
from tests.protocol._support import make_fed, open_any, replace, resign

RUN = b"r" * 16


@given(nonce=st.binary(min_size=32, max_size=32), attempt=st.integers(0, CHAIN_LENGTH - 1))
def test_each_attempts_reveal_opens_the_commitment_and_no_other_attempts(
    nonce: bytes, attempt: int
) -> None:
    c = nonce_commitment(RUN, "site-a", nonce)
    value = nonce_reveal(RUN, "site-a", nonce, attempt)
    assert opens(RUN, "site-a", c, value, attempt)
    assert not opens(RUN, "site-b", c, value, attempt)  # bound to the site
    assert not opens(b"s" * 16, "site-a", c, value, attempt)  # and to the run
    others = [a for a in range(CHAIN_LENGTH) if a != attempt]
    assert not any(opens(RUN, "site-a", c, value, a) for a in others)


def test_a_later_attempts_value_is_a_preimage_of_the_earlier_one() -> None:
    # What attempt 0 reveals does not give attempt 1's value (it is one hash step before it).
    n = os.urandom(32)
    v0, v1 = nonce_reveal(RUN, "s", n, 0), nonce_reveal(RUN, "s", n, 1)
    assert v0 != v1 and opens(RUN, "s", nonce_commitment(RUN, "s", n), v1, 1)
    c0 = nonce_commitment(RUN, "s", n)
    assert opens(RUN, "s", c0, v0, 0)


def test_the_runs_first_round_starts_with_a_commit_exchange_and_later_rounds_need_none() -> None:
    fed, _ = make_fed(5)
    first = fed.run_round(1)
    assert first.result is not None and first.result.setup_attempts == 1
    assert "commit (close)" in first.server_seconds
    second = fed.run_round(2)
    assert second.result is not None and second.result.setup_attempts == 1
    assert "commit (close)" not in second.server_seconds  # steady state: no extra exchange
    assert set(fed.commitments) == set(fed.sites)


class _Grinder(Behaviour):
    """A coordinator with a colluding member: once it has the honest adverts, the colluder
    signs many adverts of its own (fresh keys; any graph nonce it likes) to pick the graph."""

    def __init__(self, colluder: str, tries: int) -> None:
        self.colluder, self.tries = SiteId(colluder), tries
        self.seeds: set[bytes] = set()
        self.rejected: list[Rejection] = []

    def site_replies(self, fed, stage, site, reply):  # type: ignore[no-untyped-def]
        if stage is not ServerStage.ADVERTISE or site != self.colluder:
            return (reply,)
        _, advert = open_any(reply.payload)
        assert isinstance(advert, KeyAdvert)
        honest = {
            s: fed.sessions[s] for s in fed.sites if s != site and fed.sessions[s].attempt == 0
        }
        assert honest  # the honest adverts are already in (the colluder answers last)
        for i in range(self.tries):
            ground = replace(advert, graph_nonce=os.urandom(32), share_public=advert.share_public)
            receipt = fed.server.receive(site, resign(ground, fed.site_keys[site]))
            if isinstance(receipt, Rejection):
                self.rejected.append(receipt)
            if i == 0:
                break  # a rejected advert makes it a dropout of this attempt: one try suffices
        return ()


def test_a_colluder_cannot_pick_the_graph_with_a_nonce_it_did_not_commit_to() -> None:
    grinder = _Grinder("site-004", tries=1)
    fed, _ = make_fed(6, behaviour=grinder)
    fed.run_round(1)  # the commit exchange: every site's commitment is known
    outcome = fed.run_round(2)
    assert grinder.rejected and "does not open the commitment" in grinder.rejected[0].reason
    # The grinder's advert never entered the round: it is a dropout, a new attempt followed.
    assert outcome.result is not None and "site-004" not in outcome.result.survivors
    assert outcome.result.setup_attempts == 2


class _ForwardGround(Behaviour):
    """A malicious coordinator forwarding the colluder's ground advert to the honest sites."""

    def __init__(self, colluder: str) -> None:
        self.colluder = SiteId(colluder)

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is not ServerStage.SHARE:
            return packet
        _, bundle = open_any(packet.payload)
        assert isinstance(bundle, AdvertBundle)
        adverts = []
        for data in bundle.adverts:
            _, advert = open_any(data)
            if advert.header.sender == self.colluder:  # type: ignore[union-attr]
                data = resign(replace(advert, graph_nonce=os.urandom(32)), fed.site_keys[self.colluder])
            adverts.append(data)
        return type(packet)(resign(replace(bundle, adverts=tuple(adverts)), fed.coordinator_key))


def test_honest_sites_refuse_a_bundle_whose_nonce_does_not_open_the_listed_commitment() -> None:
    fed, _ = make_fed(5, behaviour=_ForwardGround("site-004"))
    fed.run_round(1)
    outcome = fed.run_round(2)
    honest = [s for s in fed.sites if s != "site-004"]
    for s in honest:
        error = outcome.client_errors[SiteId(s)]
        assert error.site == "site-004" and "does not open its listed commitment" in error.message
        assert outcome.sessions[SiteId(s)].stage is ClientStage.FAILED
        assert outcome.sessions[SiteId(s)].neighbours == ()  # no share was sent


def test_the_graph_seed_ignores_everything_in_an_advert_but_the_committed_nonce() -> None:
    nonces = {SiteId(f"site-{i}"): os.urandom(32) for i in range(5)}
    assert graph_seed(nonces) == graph_seed(dict(nonces))
    changed = dict(nonces, **{"site-0": os.urandom(32)})
    assert graph_seed(changed) != graph_seed(nonces)


def test_a_site_refuses_a_commitment_listed_for_it_that_it_did_not_make() -> None:
    fed, _ = make_fed(4)
    fed.run_round(1)
    fed.commitments["site-000"] = nonce_commitment(fed.run_id_for(2), "site-000", os.urandom(32))
    outcome = fed.run_round(2)
    error = outcome.client_errors[SiteId("site-000")]
    assert isinstance(error, NonceError) and "did not make" in error.message


def test_a_site_never_opens_one_commitment_in_two_rounds() -> None:
    fed, _ = make_fed(4)
    fed.run_round(1)
    listed = dict(fed.commitments)
    assert fed.run_round(2).result is not None
    fed.commitments.update(listed)  # the coordinator lists round 2's commitments again
    outcome = fed.run_round(3)
    assert all(isinstance(e, NonceError) for e in outcome.client_errors.values())
    assert all("opened in round 2" in e.message for e in outcome.client_errors.values())
    assert outcome.result is None


def test_the_guard_keeps_its_nonces_across_a_restart_of_the_site() -> None:
    guard = SetupGuard()
    c = guard.new_commitment(RUN, "site-a", os.urandom)
    restored = SetupGuard.from_bytes(guard.to_bytes())
    nonce = restored.nonce_for(RUN, 5, c, 0)
    assert nonce_commitment(RUN, "site-a", nonce) == c
    again = SetupGuard.from_bytes(restored.to_bytes())
    assert again.nonce_for(RUN, 5, c, 1) == nonce  # the same round, a newer attempt
    with pytest.raises(NonceError, match="already revealed for attempt 1"):
        SetupGuard.from_bytes(again.to_bytes()).nonce_for(RUN, 5, c, 1)
    with pytest.raises(NonceError, match="opened in round 5"):
        SetupGuard.from_bytes(again.to_bytes()).nonce_for(RUN, 6, c, 0)


def test_a_value_once_revealed_is_never_revealed_again_for_a_new_draw() -> None:
    # The attack of the review: a site made to answer attempt 0 of a round twice would reveal
    # a value the coordinator knows, and it could grind the colluders' values against it.
    guard = SetupGuard()
    c = guard.new_commitment(RUN, "site-a", os.urandom)
    guard.nonce_for(RUN, 3, c, 0)
    with pytest.raises(NonceError, match="already revealed"):
        guard.nonce_for(RUN, 3, c, 0)


def test_the_guard_never_forgets_a_run_it_answered() -> None:
    from fedseal.protocol import StaleMessageError
    from fedseal.protocol.guard import MAX_RUNS

    guard = SetupGuard()
    first = b"\x01" * 16
    guard.admit(first, 2, 0)
    guard.mark_shared(first, 2, 0)
    for i in range(MAX_RUNS - 1):  # a coordinator opening throw-away runs
        guard.admit(i.to_bytes(16, "big"), 1, 0)
    with pytest.raises(StaleMessageError, match="already shared keys"):
        guard.check(first, 2, 1)  # run 1's record is still there: no replay of round 2
    with pytest.raises(StaleMessageError, match="a later round was answered"):
        guard.check(first, 1, 0)  # no rollback either
    with pytest.raises(StaleMessageError, match="holds 4096 runs"):
        guard.check(b"\xff" * 16, 1, 0)  # full: no new run (an operator archives the guard)
    restored = SetupGuard.from_bytes(guard.to_bytes())
    with pytest.raises(StaleMessageError, match="already shared keys"):
        restored.check(first, 2, 1)


def test_a_guard_written_before_graph_nonces_is_read_as_holding_none() -> None:
    v1 = b"fedseal/v1/setup-guard\x00" + (0).to_bytes(4, "big")
    guard = SetupGuard.from_bytes(v1)
    with pytest.raises(NonceError):
        guard.nonce_for(RUN, 1, bytes(32), 0)


def test_round_zero_opens_no_nonce_so_no_later_round_reveals_known_values() -> None:
    # The re-review's attack: 0 marked a nonce as unopened, so a nonce opened in a "round 0"
    # could be opened again in round 1 and its values known in advance. Rounds start at 1.
    guard = SetupGuard()
    c = guard.new_commitment(RUN, "site-a", os.urandom)
    with pytest.raises(NonceError, match="rounds 1 and up"):
        guard.nonce_for(RUN, 0, c, 2)
    guard.nonce_for(RUN, 1, c, 0)  # still unopened, round 1 gets it


def test_a_site_refuses_a_setup_for_round_zero() -> None:
    from fedseal.protocol import CoordinatorMisbehaviourError

    fed, _ = make_fed(4)
    outcome = fed.run_round(0)
    assert outcome.result is None
    assert all(
        isinstance(e, CoordinatorMisbehaviourError) and "rounds start at 1" in e.message
        for e in outcome.client_errors.values()
    )
