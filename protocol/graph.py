"""SecAgg+ neighbour graph, derived from a public seed the coordinator cannot choose.

Rules:
    1. The seed is ``SHA-256("fedseal/v1/graph-seed" || for each cohort member in sorted
       order: u16 len || site id || signed-content digest of its key advert)``. Each advert
       contains fresh ephemeral public keys drawn by the site and binds the setup digest
       (cohort, parameters, attempt number), so the coordinator learns the seed only after
       every advert is fixed, and every site recomputes it from the forwarded, signed
       adverts.
    2. Sites accept only an advert bundle holding the adverts of *every* member of the
       signed setup cohort (:class:`~fedseal.protocol.errors.IncompleteBundleError`), so a
       coordinator that has seen the adverts cannot re-draw the graph by leaving some out.
       A bundle differing between sites (only possible with a cohort member that signs two
       adverts) gives them different seeds; the seed is part of the survivor statement each
       site signs, so no group of them reaches the consistency quorum and none reveals a
       share.
    3. Sites are placed on a ring in the order of ``SHA-256(seed || site id)``; each site's
       neighbours are the ``k/2`` nearest on either side (a Harary graph ``H_{k,m}``, as in
       Bell et al., SecAgg+, CCS 2020). ``k >= m - 1`` gives the complete graph (cohorts up
       to ``complete_graph_max``, 32 by default: there the seed changes nothing).
    4. Neighbour lists are sorted by site id; the share a site hands its ``i``-th neighbour
       has Shamir index ``i + 1``.

Bias bound. A cohort member that does not advertise forces a new setup attempt (a fresh,
signed ``RoundSetup`` with ``attempt + 1`` to the members that did advertise, who draw fresh
keys: a new, independent seed). A coordinator can therefore make sites draw up to
``SitePolicy.max_setup_attempts`` (default 3) independent graphs per round and continue with
the one it likes (by withholding a member's advert to force the next attempt), but no more:
sites answer only attempts ``0..max_setup_attempts-1``, each newer than the last they
answered, none after they shared keys in the round (:mod:`fedseal.protocol.guard`), and
never a cohort below ``SitePolicy.min_cohort``. Each attempt is visible: a signed setup that
names its attempt number, and a :class:`~fedseal.protocol.server.SetupRestart` in the
coordinator's log naming the sites left out. So for any set ``B`` of "bad" graphs (e.g. a
target surrounded by colluders) of probability ``p`` under one draw, the coordinator alone
lands in ``B`` with probability at most ``1 - (1 - p)**max_setup_attempts <=
max_setup_attempts * p``.

Residual (not closed here): a cohort member colluding with the coordinator can choose its
own advert *after* seeing the honest ones (last-revealer bias) and so grind the seed by
trying many ephemeral keys; closing that needs a commit-then-reveal of per-site graph
nonces (one more round trip) or an external randomness beacon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import ThresholdError
from .memo import remembered
from .types import SiteId, site_sort_key

__all__ = ["NeighbourGraph", "build_graph", "graph_seed"]

_SEED_TAG = b"fedseal/v1/graph-seed"
_RING_TAG = b"fedseal/v1/graph-ring"


def graph_seed(advert_digests: Mapping[SiteId, bytes]) -> bytes:
    """The public graph seed from each advertising site's signed-content digest."""
    h = hashlib.sha256(_SEED_TAG)
    for site in sorted(advert_digests, key=site_sort_key):
        raw = site.encode("utf-8")
        h.update(len(raw).to_bytes(2, "big"))
        h.update(raw)
        h.update(advert_digests[site])
    return h.digest()


@dataclass(frozen=True, slots=True)
class NeighbourGraph:
    """An undirected neighbour graph over the sites that advertised keys.

    Attributes:
        seed: The public seed it was derived from.
        degree: Degree of every node.
        neighbours: Site -> its neighbours, sorted by site id (read-only).
        ring: The sites in ring order (a sparse graph's neighbours are the ``degree / 2``
            nearest on either side); for the complete graph, sorted by site id.
    """

    seed: bytes
    degree: int
    neighbours: Mapping[SiteId, tuple[SiteId, ...]]
    ring: tuple[SiteId, ...] = ()

    def of(self, site: SiteId) -> tuple[SiteId, ...]:
        """Neighbours of ``site`` (sorted); empty if ``site`` is not in the graph."""
        return self.neighbours.get(site, ())

    def share_index(self, owner: SiteId, holder: SiteId) -> int:
        """Shamir index (1-based) of ``owner``'s share held by ``holder``, or 0 if none."""
        try:
            return self.neighbours.get(owner, ()).index(holder) + 1
        except ValueError:
            return 0

    def adjacent(self, a: SiteId, b: SiteId) -> bool:
        """Whether ``a`` and ``b`` are neighbours."""
        return b in self.neighbours.get(a, ())


def build_graph(
    sites: Iterable[SiteId], seed: bytes, degree: int, threshold: int
) -> NeighbourGraph:
    """Build the Harary graph of the given degree over ``sites`` from ``seed``.

    Args:
        sites: The sites that advertised keys.
        seed: From :func:`graph_seed`.
        degree: The configured degree ``k`` (capped at ``len(sites) - 1``).
        threshold: The Shamir threshold; every neighbourhood must reach it.

    Raises:
        ThresholdError: If too few sites remain for neighbourhoods of ``threshold``.
    """
    members = tuple(sorted(set(sites), key=site_sort_key))
    key = (members, bytes(seed), degree, threshold)
    return remembered("graphs", key, lambda: _build_graph(members, seed, degree, threshold))


def _build_graph(
    members: tuple[SiteId, ...], seed: bytes, degree: int, threshold: int
) -> NeighbourGraph:
    m = len(members)
    k = min(degree, m - 1)
    if k < threshold:
        raise ThresholdError(
            f"{m} sites advertised keys: neighbourhoods of {k} are below the threshold {threshold}"
        )
    if k >= m - 1:
        full = {s: tuple(x for x in members if x != s) for s in members}
        return NeighbourGraph(
            seed=seed, degree=m - 1, neighbours=MappingProxyType(full), ring=members
        )
    if k % 2:
        raise ValueError("a sparse graph needs an even degree")
    ring = sorted(
        members, key=lambda s: hashlib.sha256(_RING_TAG + seed + s.encode("utf-8")).digest()
    )
    half = k // 2
    adjacency: dict[SiteId, tuple[SiteId, ...]] = {}
    for pos, site in enumerate(ring):
        around = {ring[(pos + d) % m] for d in range(1, half + 1)} | {
            ring[(pos - d) % m] for d in range(1, half + 1)
        }
        adjacency[site] = tuple(sorted(around, key=site_sort_key))
    return NeighbourGraph(
        seed=seed, degree=k, neighbours=MappingProxyType(adjacency), ring=tuple(ring)
    )
