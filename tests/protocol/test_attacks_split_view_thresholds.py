"""Attack: thresholds that would let a malicious coordinator split the sites' views of the survivors.

A malicious coordinator drives four honest sessions by hand. With a complete graph of four
and threshold 2 (valid: ``2 * 2 > degree 3``), two disjoint pairs could each produce ``t``
valid signatures over *different* survivor sets, so site A is "alive" for one pair and its
partners are "dropped" for the other: before the fix the coordinator recovered A's seed and
every partner's mask key, hence A's individual quantized update, exactly. Sites now demand
signatures from a majority of the cohort (``consistency_quorum``).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedseal.crypto.agreement import AgreementKey
from fedseal.crypto.prg import add_mask_into
from fedseal.crypto.shamir import Share, combine
from fedseal.protocol import CoordinatorMisbehaviourError
from fedseal.protocol.config import RoundParameters, SitePolicy, consistency_quorum
from fedseal.protocol.errors import CohortTooSmallError, WeakRoundError
from fedseal.protocol.masking import PAIR_DOMAIN, SELF_DOMAIN, pair_sign_negative, pairwise_seed
from fedseal.protocol.messages import (
    AdvertBundle,
    CohortMember,
    ConsistencySignature,
    EncryptedShares,
    Header,
    RoundSetup,
    ShareDelivery,
    ShareKind,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
)
from fedseal.protocol.types import COORDINATOR, SiteId, site_sort_key
from tests.protocol._support import expected_sum, make_config, make_fed, open_any, precommit, resign

NOW = 1_700_000_000.0


def _params(n: int, degree: int, threshold: int, min_survivors: int) -> RoundParameters:
    cfg = make_config(16)
    return RoundParameters(
        vector_length=cfg.vector_length,
        quantization=cfg.quantization,
        max_weight=cfg.max_weight,
        degree=degree,
        threshold=threshold,
        min_survivors=min_survivors,
    )


def _split_view_attack(
    n: int,
    threshold: int,
    min_survivors: int,
    views: dict[str, tuple[str, ...]],
    target: str,
    policy: SitePolicy | None = None,
) -> np.ndarray | None:
    """Run the split-view attack against honest sessions; return the recovered update or None.

    Raises:
        CoordinatorMisbehaviourError: If a site refuses the round setup.
    """
    fed, updates = make_fed(n, site_policy=policy)
    sites = [SiteId(s) for s in fed.sites]
    key = fed.coordinator_key
    run_id, model = fed.run_id_for(1), fed.model_digest_for(1)
    sessions = {s: fed.make_session(s, 1, NOW) for s in sites}
    params = _params(n, n - 1, threshold, min_survivors)
    commitments = precommit(fed)  # graph nonces the sites committed to in an earlier round
    cohort = tuple(CohortMember(s, fed.roster[s].public_key_der, commitments[s]) for s in sites)

    def header(to: SiteId, setup_digest: bytes) -> Header:
        return Header(run_id, 1, COORDINATOR, to, model, setup_digest)

    setups = {s: RoundSetup(header(s, bytes(32)), cohort, params, int(NOW) + 3600) for s in sites}
    digest = setups[sites[0]].digest
    adverts: dict[SiteId, bytes] = {}
    for s in sites:
        reply = sessions[s].handle(resign(setups[s], key))  # refuses an unsafe setup here
        assert reply is not None
        adverts[s] = reply.payload
    bundle = tuple(adverts[s] for s in sites)
    mask_public = {s: open_any(adverts[s])[1].mask_public for s in sites}  # type: ignore[union-attr]
    cts: dict[SiteId, dict[SiteId, bytes]] = {s: {} for s in sites}
    for s in sites:
        reply = sessions[s].handle(resign(AdvertBundle(header(s, digest), bundle), key))
        assert reply is not None
        shares_msg = open_any(reply.payload)[1]
        assert isinstance(shares_msg, EncryptedShares)
        for to, ct in shares_msg.items:
            cts[to][s] = ct
    masked: dict[SiteId, np.ndarray] = {}
    for s in sites:
        items = tuple(sorted(cts[s].items(), key=lambda it: site_sort_key(it[0])))
        reply = sessions[s].handle(resign(ShareDelivery(header(s, digest), items), key))
        assert reply is not None and reply.bulk is not None
        masked[s] = reply.bulk.copy()
    sigs: dict[SiteId, bytes] = {}
    for s in sites:
        view = tuple(SiteId(v) for v in views[s])
        reply = sessions[s].handle(resign(SurvivorSet(header(s, digest), view), key))
        assert reply is not None
        sig_msg = open_any(reply.payload)[1]
        assert isinstance(sig_msg, ConsistencySignature)
        sigs[s] = sig_msg.signature
    revealed: dict[tuple[SiteId, ShareKind], list[Share]] = {}
    for s in sites:
        view = tuple(SiteId(v) for v in views[s])
        signers = tuple((o, sigs[o]) for o in sites if views[o] == views[s])
        peers = [p for p in sites if p != s]
        request = UnmaskRequest(
            header(s, digest),
            survivors=view,
            signatures=signers,
            alive=tuple(p for p in peers if p in view),
            dropped=tuple(p for p in peers if p not in view),
        )
        reply = sessions[s].handle(resign(request, key))
        assert reply is not None
        response = open_any(reply.payload)[1]
        assert isinstance(response, UnmaskResponse)
        for owner, kind, raw in response.shares:
            revealed.setdefault((owner, kind), []).append(Share.from_bytes(raw))
    a = SiteId(target)
    seed_shares = revealed.get((a, ShareKind.SELF_MASK_SEED), [])
    if len(seed_shares) < threshold:
        return None
    vector = masked[a]
    add_mask_into(vector, combine(seed_shares, threshold, 32), domain=SELF_DOMAIN, negate=True)
    for p in sites:
        if p == a:
            continue
        key_shares = revealed.get((p, ShareKind.MASK_KEY), [])
        if len(key_shares) < threshold:
            return None
        p_key = AgreementKey.from_private_bytes(combine(key_shares, threshold, 32))
        seed = pairwise_seed(p_key, mask_public[a], run_id, 1, p, a)
        add_mask_into(vector, seed, domain=PAIR_DOMAIN, negate=not pair_sign_negative(a, p))
    assert np.array_equal(vector, expected_sum(fed, updates, [a], 1)), "attack arithmetic"
    return vector


# Sites 0 and 3 see {0, 3}; sites 1 and 2 see {0, 1, 2}. Site 0 is alive for 1, 2 and 3;
# sites 1 and 2 are dropped for 0 and 3; site 3 is dropped for 1 and 2.
_VIEWS_OF_FOUR = {
    "site-000": ("site-000", "site-003"),
    "site-003": ("site-000", "site-003"),
    "site-001": ("site-000", "site-001", "site-002"),
    "site-002": ("site-000", "site-001", "site-002"),
}


def test_a_complete_graph_with_threshold_half_the_cohort_cannot_split_views() -> None:
    # Threshold 2 of 4 passes validation (2t > degree 3) and is what the e2e federation
    # uses; the consistency quorum (3 of 4) stops two pairs from approving different sets.
    recovered: np.ndarray | None = None
    with pytest.raises(CoordinatorMisbehaviourError, match=r"min_survivors|valid signatures"):
        recovered = _split_view_attack(4, 2, 3, _VIEWS_OF_FOUR, "site-000")
    assert recovered is None


def test_sites_refuse_a_setup_whose_min_survivors_is_below_their_quorum() -> None:
    # The same attack with min_survivors = 2 is refused at the setup, before any key is sent.
    with pytest.raises(WeakRoundError, match="below the consistency quorum 3"):
        _split_view_attack(4, 2, 2, _VIEWS_OF_FOUR, "site-000")


def test_the_split_view_attack_fails_with_the_default_threshold_too() -> None:
    with pytest.raises(CoordinatorMisbehaviourError, match=r"min_survivors|valid signatures"):
        _split_view_attack(4, 3, 3, _VIEWS_OF_FOUR, "site-000")


def test_a_two_site_round_cannot_show_one_site_a_survivor_set_of_itself() -> None:
    # n = 2, t = 1, min_survivors = 1 (the coordinator's choice): site 0 alone signs {0} and
    # would reveal site 1's mask key, site 1 signs {0, 1} and would reveal site 0's seed.
    # Sites that accept two-site cohorts (min_cohort=2) are still protected by the quorum.
    views = {"site-000": ("site-000",), "site-001": ("site-000", "site-001")}
    with pytest.raises(CoordinatorMisbehaviourError, match=r"quorum|valid signatures"):
        _split_view_attack(
            2, 1, 1, views, "site-000",
            SitePolicy(min_cohort=2, min_known_peers=1, max_colluding_fraction=0.0),
        )


def test_sites_with_the_default_policy_refuse_a_two_site_cohort_outright() -> None:
    views = {"site-000": ("site-000",), "site-001": ("site-000", "site-001")}
    with pytest.raises(CohortTooSmallError, match="below this site's minimum of 3"):
        _split_view_attack(2, 1, 1, views, "site-000")


@pytest.mark.parametrize(
    ("threshold", "cohort", "quorum"),
    [(1, 2, 2), (2, 4, 3), (3, 4, 3), (3, 5, 4), (4, 6, 5), (9, 48, 33), (10, 100, 67)],
)
def test_the_consistency_quorum_outnumbers_colluders_signing_two_sets(
    threshold: int, cohort: int, quorum: int
) -> None:
    # q = max(t, (n + c) // 2 + 1) with c = floor(n / 3) colluders (the default gamma).
    q = consistency_quorum(threshold, cohort)
    assert q == quorum
    c = cohort // 3
    assert 2 * (q - c) > cohort - c  # two sets would need more honest signers than exist
