"""Attack: in a sparse graph, t signatures on a survivor set do not force one view.

With the defaults for 48 sites (degree 12, threshold 9) the cohort holds several disjoint
groups of ``t`` sites. A malicious coordinator (no colluding site needed) partitions the
honest sites into groups that each sign their own survivor set: every group sees the
target X alive, and the group of each of X's partners sees only that partner alive among
them. X's neighbours reveal X's self-mask seed, and each partner's other neighbours reveal
that partner's mask key, so the coordinator strips every mask off X's input. The fix: a
site reveals only after valid signatures over the same set from more than half of the
round's cohort, so two views can never both collect them.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedseal.crypto.agreement import AgreementKey
from fedseal.crypto.prg import add_mask_into
from fedseal.crypto.shamir import Share, combine
from fedseal.protocol import CoordinatorMisbehaviourError, Packet, SitePolicy, ThresholdError
from fedseal.protocol.errors import IncompleteBundleError
from fedseal.protocol.graph import build_graph, graph_seed
from fedseal.protocol.masking import PAIR_DOMAIN, SELF_DOMAIN, pair_sign_negative, pairwise_seed
from fedseal.protocol.messages import (
    AdvertBundle,
    ConsistencySignature,
    EncryptedShares,
    Header,
    KeyAdvert,
    RoundSetup,
    ShareDelivery,
    ShareKind,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
)
from fedseal.protocol.server import SecAggServer, ServerStage
from fedseal.protocol.types import COORDINATOR, SiteId, site_sort_key
from fedseal.sim.inmemory import Behaviour
from tests.protocol._support import (
    expected_sum,
    make_config,
    make_fed,
    open_any,
    precommit,
    replace,
    resign,
)

NOW = 1_700_000_000.0
N = 48


def _plan(graph, sites, x, t):  # type: ignore[no-untyped-def]
    """Groups of sites (each with its own survivor view) that split X's neighbourhood."""
    partners = list(graph.of(x))[:t]
    for size in range(1, t + 1):
        groups = [partners[i : i + size] for i in range(0, len(partners), size)]
        members = [list(g) for g in groups]
        for r in sites:
            if r == x or r in partners:
                continue
            # Join the smallest group none of whose partners is adjacent to r.
            options = [i for i, g in enumerate(groups) if not any(graph.adjacent(r, p) for p in g)]
            if options:
                members[min(options, key=lambda i: len(members[i]))].append(r)
        if any(len(m) < t for m in members):
            continue
        group_of = {s: i for i, m in enumerate(members) for s in m}
        ok = True
        for i, g in enumerate(groups):
            for p in g:
                seers = [s for s in graph.of(p) if s in group_of and group_of[s] != i]
                ok &= len(seers) >= t
        if ok:
            return partners, groups, members
    return None


def _attack() -> np.ndarray | None:
    """Drive honest sessions as a malicious coordinator; return X's recovered update."""
    # Sites that assume few colluders (gamma = 0.05) accept this sparse graph; their quorum
    # (n + c) // 2 + 1 still stops the split view.
    gamma = 0.05
    fed, updates = make_fed(
        N,
        config=make_config(16, degree=12, threshold=9, max_colluding_fraction=gamma),
        site_policy=SitePolicy(max_colluding_fraction=gamma),
    )
    sites = [SiteId(s) for s in fed.sites]
    server = SecAggServer(
        fed.config,
        fed.roster,
        sites,
        identity_key=fed.coordinator_key,
        run_id=fed.run_id_for(1),
        round=1,
        model_digest=fed.model_digest_for(1),
        now=NOW,
        commitments=precommit(fed),  # graph nonces the sites committed to in an earlier round
    )
    params, t = server.params, server.params.threshold
    key = fed.coordinator_key
    run_id, model = fed.run_id_for(1), fed.model_digest_for(1)
    sessions = {s: fed.make_session(s, 1, NOW) for s in sites}
    setup0 = server.setup
    digest = setup0.digest

    def header(to: SiteId, setup_digest: bytes) -> Header:
        return Header(run_id, 1, COORDINATOR, to, model, setup_digest)

    adverts = {}
    for s in sites:
        setup = RoundSetup(header(s, bytes(32)), setup0.cohort, params, setup0.expires_at)
        reply = sessions[s].handle(resign(setup, key))
        assert reply is not None
        adverts[s] = reply.payload
    decoded = {s: open_any(adverts[s]) for s in sites}
    graph = build_graph(
        sites,
        graph_seed({s: msg.graph_nonce for s, (_, msg) in decoded.items()}),  # type: ignore[union-attr]
        params.degree,
        t,
    )
    plans = ((s, _plan(graph, sites, s, t)) for s in sites)
    x, plan = next((s, p) for s, p in plans if p is not None)
    partners, groups, members = plan
    bundle = tuple(adverts[s] for s in sites)
    cts: dict[SiteId, dict[SiteId, bytes]] = {s: {} for s in sites}
    for s in sites:
        reply = sessions[s].handle(resign(AdvertBundle(header(s, digest), bundle), key))
        assert reply is not None
        msg = open_any(reply.payload)[1]
        assert isinstance(msg, EncryptedShares)
        for to, ct in msg.items:
            cts[to][s] = ct
    masked = {}
    for s in sites:
        delivered = {o: c for o, c in cts[s].items() if s != x or o in partners}
        items = tuple(sorted(delivered.items(), key=lambda it: site_sort_key(it[0])))
        reply = sessions[s].handle(resign(ShareDelivery(header(s, digest), items), key))
        assert reply is not None and reply.bulk is not None
        masked[s] = reply.bulk.copy()
    all_partners = set(partners)
    views = {
        i: tuple(s for s in sites if s not in all_partners or s in g) for i, g in enumerate(groups)
    }
    sigs = {}
    for i, group in enumerate(members):
        for s in group:
            reply = sessions[s].handle(resign(SurvivorSet(header(s, digest), views[i]), key))
            assert reply is not None
            msg = open_any(reply.payload)[1]
            assert isinstance(msg, ConsistencySignature)
            sigs[s] = msg.signature
    revealed: dict[tuple[SiteId, ShareKind], list[Share]] = {}
    for i, group in enumerate(members):
        signers = tuple(sorted(((s, sigs[s]) for s in group), key=lambda it: site_sort_key(it[0])))
        for s in group:
            held = [o for o in graph.of(s) if o != x or s in partners]
            request = UnmaskRequest(
                header(s, digest),
                survivors=views[i],
                signatures=signers,
                alive=tuple(o for o in held if o in views[i]),
                dropped=tuple(o for o in held if o not in views[i]),
            )
            reply = sessions[s].handle(resign(request, key))
            assert reply is not None
            msg = open_any(reply.payload)[1]
            assert isinstance(msg, UnmaskResponse)
            for owner, kind, raw in msg.shares:
                revealed.setdefault((owner, kind), []).append(Share.from_bytes(raw))
    vector = masked[x]
    seed_shares = revealed.get((x, ShareKind.SELF_MASK_SEED), [])
    add_mask_into(vector, combine(seed_shares[:t], t, 32), domain=SELF_DOMAIN, negate=True)
    x_advert = decoded[x][1]
    assert isinstance(x_advert, KeyAdvert)
    for p in partners:
        p_key = AgreementKey.from_private_bytes(
            combine(revealed[(p, ShareKind.MASK_KEY)][:t], t, 32)
        )
        seed = pairwise_seed(p_key, x_advert.mask_public, run_id, 1, p, x)
        add_mask_into(vector, seed, domain=PAIR_DOMAIN, negate=not pair_sign_negative(x, p))
    assert np.array_equal(vector, expected_sum(fed, updates, [x], 1)), "attack arithmetic"
    return vector


def test_disjoint_groups_of_t_signers_cannot_split_views_in_a_sparse_graph() -> None:
    recovered = None
    with pytest.raises(CoordinatorMisbehaviourError, match=r"valid signatures|survivor set refused"):
        recovered = _attack()
    assert recovered is None


def test_a_site_refuses_an_advert_bundle_smaller_than_the_consistency_quorum() -> None:
    # Sparse defaults for 40 sites: degree 12, threshold 9, quorum 21. The coordinator shows
    # site-000 only its own advert and 9 others (e.g. its colluders): before the fix the
    # site built a complete graph over those 10 and sent them every share of its secrets,
    # although such a round can never reach the consistency quorum. Sites now accept only a
    # bundle with every cohort member's advert.
    class SmallBundle(Behaviour):
        def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if stage is not ServerStage.SHARE or site != "site-000":
                return packet
            _, bundle = open_any(packet.payload)
            assert isinstance(bundle, AdvertBundle)
            return Packet(resign(replace(bundle, adverts=bundle.adverts[:10]), fed.coordinator_key))

    fed, _ = make_fed(40, length=4, config=make_config(4), behaviour=SmallBundle())
    outcome = fed.run_round(1)
    error = outcome.client_errors[SiteId("site-000")]
    assert isinstance(error, IncompleteBundleError) and "30 of the 40" in error.message
    assert outcome.sessions[SiteId("site-000")].neighbours == ()
    # Everyone else completes the round without site-000.
    assert outcome.result is not None and "site-000" not in outcome.result.survivors


def test_the_coordinator_fails_a_round_whose_adverts_cannot_reach_the_quorum() -> None:
    silent = [f"site-{i:03d}" for i in range(20)]
    fed, _ = make_fed(40, length=4, config=make_config(4), dropouts={ServerStage.ADVERTISE: silent})
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, ThresholdError)
    assert "min_survivors" in outcome.failure.message  # min_survivors is the sites' quorum
    assert outcome.result is None
    assert not any(s.revealed for s in outcome.sessions.values())
