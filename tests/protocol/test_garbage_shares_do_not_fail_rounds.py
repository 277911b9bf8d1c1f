"""One garbage-share site must not be able to fail every round.

Before the fix the coordinator searched share subsets of size ``t`` in lexicographic order,
capped at ``MAX_RECONSTRUCTION_ATTEMPTS``. A liar holding Shamir index 1 (the first
neighbour in sorted order, e.g. ``site-000`` for every other site) is in the first
``C(r - 1, t - 1)`` subsets, far over the cap for a complete graph of 20 (``C(18, 12)``),
so a single malicious site turned every round into a ``ReconstructionError``.
"""

from __future__ import annotations

import numpy as np

from fedseal.crypto.shamir import PRIME, Share
from fedseal.protocol import Packet
from fedseal.protocol.messages import UnmaskResponse
from fedseal.protocol.server import MAX_RECONSTRUCTION_ATTEMPTS, ServerStage
from fedseal.protocol.types import SiteId
from fedseal.sim.inmemory import Behaviour
from tests.protocol._support import expected_sum, make_config, make_fed, open_any, replace, resign


class _Liar(Behaviour):
    def __init__(self, liars: set[str]) -> None:
        self.liars = liars

    def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is not ServerStage.UNMASK or site not in self.liars:
            return (packet,)
        _, response = open_any(packet.payload)
        assert isinstance(response, UnmaskResponse)
        bad = []
        for owner, kind, raw in response.shares:
            share = Share.from_bytes(raw)
            values = (share.values.astype(np.uint64) * 5 + 3) % PRIME
            bad.append((owner, kind, Share(share.index, values.astype(np.uint32)).to_bytes()))
        return (Packet(resign(replace(response, shares=tuple(bad)), fed.site_keys[SiteId(site)])),)


def test_one_site_with_the_first_share_index_sending_garbage_is_excluded_not_fatal() -> None:
    fed, updates = make_fed(20, length=4, config=make_config(4), behaviour=_Liar({"site-000"}))
    outcome = fed.run_round(1)
    assert outcome.failure is None, outcome.failure
    result = outcome.result
    assert result is not None
    assert set(result.survivors) == set(fed.sites)
    assert np.array_equal(result.aggregate, expected_sum(fed, updates, result.survivors, 1))
    liar = [r for r in outcome.server.rejections if r.site == "site-000"]
    assert liar and all("does not match its commitment" in r.error.message for r in liar)
    assert not [r for r in outcome.server.rejections if r.site != "site-000"]


def test_two_garbage_sites_at_the_front_of_every_neighbourhood_are_excluded_too() -> None:
    fed, updates = make_fed(
        20, length=4, config=make_config(4), behaviour=_Liar({"site-000", "site-001"})
    )
    outcome = fed.run_round(1)
    assert outcome.failure is None, outcome.failure
    assert outcome.result is not None
    assert np.array_equal(
        outcome.result.aggregate, expected_sum(fed, updates, outcome.result.survivors, 1)
    )
    assert MAX_RECONSTRUCTION_ATTEMPTS >= 1 + 19 + 19 * 18 // 2
