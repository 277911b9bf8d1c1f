"""SecAgg+ neighbour graph, from a seed that no party (nor a few colluding) can choose.

Rules:
    1. **Graph nonces, committed before they are revealed.** Every site commits to a secret
       graph nonce ``N`` *before* the round setup that uses it: in its key advert of its
       previous secure round of the run (``KeyAdvert.next_commitment``), or, in a site's
       first round of a run (or after the coordinator lost the commitments), in a commit
       exchange the round starts with. The commitment is the end of a hash chain,
       ``C = step^16(N)`` with ``step(x) = SHA-256("fedseal/v1/graph-nonce" || run || site || x)``
       (:func:`nonce_commitment`). The signed round setup lists each member's commitment; a
       site refuses a setup that lists for *it* a commitment it did not make, or one it
       already opened in an earlier round.
    2. **Reveal per attempt.** In setup attempt ``a`` a site reveals ``step^(15 - a)(N)``
       (:func:`nonce_reveal`) in its key advert; every site checks every member's reveal
       against the listed commitment (:func:`opens`). Each attempt's value is a fresh preimage:
       unknown to anyone before that attempt's setup is fixed, so a colluding member whose
       commitment the coordinator lists anew in a later attempt still commits blind.
    3. **Seed.** ``SHA-256("fedseal/v1/graph-seed" || for each member in sorted order: u16 len
       || site id || revealed value)`` (:func:`graph_seed`). Every colluder's value was fixed
       (listed in the signed setup) before any honest value of that attempt was revealed, and
       each honest value is uniform to them: no member can grind its advert to steer the graph
       (the residual of earlier versions, where the seed hashed the adverts themselves).
    4. Sites accept only an advert bundle holding the adverts of *every* member of the signed
       setup cohort (:class:`~fedseal.protocol.errors.IncompleteBundleError`): a coordinator
       cannot re-draw the graph by leaving some out. The seed is part of the survivor
       statement each site signs, so sites shown different bundles never reach the quorum.
    5. Sites are placed on a ring in the order of ``SHA-256(seed || site id)``; each site's
       neighbours are the ``k/2`` nearest on either side (a Harary graph ``H_{k,m}``, as in
       Bell et al., SecAgg+, CCS 2020). ``k >= m - 1`` gives the complete graph.
    6. Neighbour lists are sorted by site id; the share a site hands its ``i``-th neighbour
       has Shamir index ``i + 1``.

Bias bound. A member that does not advertise (or reveals a value that does not open its
commitment) forces a new setup attempt over the others: a new seed. The coordinator (with its
colluders withholding) can therefore make sites draw up to ``SitePolicy.max_setup_attempts``
(default 3) graphs per round and keep the one it likes, but no more: sites answer only attempts
``0..max_setup_attempts-1``, each newer than the last, none after they shared keys in the round
(:mod:`fedseal.protocol.guard`). For any set ``B`` of bad graphs of probability ``p`` under one
draw, the coalition lands in ``B`` with probability at most ``max_setup_attempts * p``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import ThresholdError
from .seams import NO_SHARING, SharedWork
from .types import SiteId, site_sort_key

__all__ = [
    "NONCE_BYTES",
    "NeighbourGraph",
    "build_graph",
    "bundle_digest",
    "graph_seed",
    "nonce_commitment",
    "nonce_reveal",
    "opens",
]

_SEED_TAG = b"fedseal/v1/graph-seed"
_RING_TAG = b"fedseal/v1/graph-ring"
_NONCE_TAG = b"fedseal/v1/graph-nonce\x00"
_BUNDLE_TAG = b"fedseal/v1/advert-bundle"

NONCE_BYTES = 32
"""Length of a graph nonce, of each value of its hash chain and of its commitment."""

CHAIN_LENGTH = 16
"""Hash-chain length: one fresh value per setup attempt (``MAX_SETUP_ATTEMPTS_LIMIT``)."""


def _step(run_id: bytes, site: str, value: bytes, times: int) -> bytes:
    prefix = _NONCE_TAG + bytes(run_id) + len(site.encode()).to_bytes(2, "big") + site.encode()
    for _ in range(times):
        value = hashlib.sha256(prefix + value).digest()
    return value


def nonce_commitment(run_id: bytes, site: str, nonce: bytes) -> bytes:
    """The commitment to ``site``'s graph nonce in ``run_id``: the end of its hash chain."""
    return _step(run_id, site, nonce, CHAIN_LENGTH)


def nonce_reveal(run_id: bytes, site: str, nonce: bytes, attempt: int) -> bytes:
    """The value ``site`` reveals in setup ``attempt`` (0-based): ``step^(15 - attempt)(N)``."""
    if not 0 <= attempt < CHAIN_LENGTH:
        raise ValueError(f"attempt {attempt} outside 0..{CHAIN_LENGTH - 1}")
    return _step(run_id, site, nonce, CHAIN_LENGTH - 1 - attempt)


def opens(run_id: bytes, site: str, commitment: bytes, value: bytes, attempt: int) -> bool:
    """Whether ``value`` is ``site``'s reveal for ``attempt`` under ``commitment``."""
    if len(value) != NONCE_BYTES or not 0 <= attempt < CHAIN_LENGTH:
        return False
    return _step(run_id, site, value, attempt + 1) == commitment


def bundle_digest(advert_digests: Mapping[SiteId, bytes]) -> bytes:
    """Digest of an advert bundle (each member's signed-content digest): what the survivor
    statement binds, so sites shown different adverts of one member (a colluder signing two)
    sign different statements, although the graph seed (from the nonces) is the same."""
    return _per_site_hash(_BUNDLE_TAG, advert_digests)


def graph_seed(revealed: Mapping[SiteId, bytes]) -> bytes:
    """The public graph seed from each cohort member's revealed graph-nonce value."""
    return _per_site_hash(_SEED_TAG, revealed)


def _per_site_hash(tag: bytes, values: Mapping[SiteId, bytes]) -> bytes:
    """SHA-256 of ``tag`` then, per site in sorted order, ``u16 len || site id || value``."""
    h = hashlib.sha256(tag)
    for site in sorted(values, key=site_sort_key):
        raw = site.encode("utf-8")
        h.update(len(raw).to_bytes(2, "big"))
        h.update(raw)
        h.update(values[site])
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
    sites: Iterable[SiteId],
    seed: bytes,
    degree: int,
    threshold: int,
    shared: SharedWork = NO_SHARING,
) -> NeighbourGraph:
    """Build the Harary graph of the given degree over ``sites`` from ``seed``.

    Args:
        sites: The sites that advertised keys.
        seed: From :func:`graph_seed`.
        degree: The configured degree ``k`` (capped at ``len(sites) - 1``).
        threshold: The Shamir threshold; every neighbourhood must reach it.
        shared: Simulations only (:mod:`fedseal.protocol.seams`): may give the (read-only)
            graph built before for the same member set, seed, degree and threshold.

    Raises:
        ThresholdError: If too few sites remain for neighbourhoods of ``threshold``.
    """
    members = tuple(sorted(set(sites), key=site_sort_key))
    key = (members, bytes(seed), degree, threshold)
    return shared.remembered("graphs", key, lambda: _build_graph(members, seed, degree, threshold))


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
