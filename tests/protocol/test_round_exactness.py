"""Exactness of complete rounds: the unmasked sum is the plain sum of the survivors' inputs."""

from __future__ import annotations

import numpy as np
import pytest

from fedseal.protocol import ServerStage, ThresholdError
from fedseal.protocol.types import SiteId
from fedseal.sim.inmemory import Behaviour, SimulationOutcome
from tests.protocol._support import expected_sum, make_config, make_fed, site_names, weight_of

STAGES = [
    ServerStage.ADVERTISE,
    ServerStage.SHARE,
    ServerStage.MASKED_INPUT,
    ServerStage.CONSISTENCY,
    ServerStage.UNMASK,
]


def _random_dropouts(rng: np.random.Generator, n: int, budget: int) -> dict[ServerStage, list[str]]:
    """Up to ``budget`` dropouts spread over random stages (every neighbourhood keeps >= t)."""
    sites = site_names(n)
    count = int(rng.integers(0, budget + 1))
    chosen = rng.choice(n, size=count, replace=False)
    plan: dict[ServerStage, list[str]] = {}
    for idx in chosen:
        stage = STAGES[int(rng.integers(0, len(STAGES)))]
        plan.setdefault(stage, []).append(sites[int(idx)])
    return plan


def _check_round(
    n: int,
    length: int,
    seed: int,
    dropouts: dict[ServerStage, list[str]],
    behaviour: Behaviour | None = None,
    **cfg: object,
) -> SimulationOutcome:
    config = make_config(length, **cfg)  # type: ignore[arg-type]
    fed, updates = make_fed(n, config=config, seed=seed, dropouts=dropouts, behaviour=behaviour)
    outcome = fed.run_round(1)
    assert outcome.failure is None, outcome.failure
    assert outcome.client_errors == {}
    result = outcome.result
    assert result is not None
    dropped_before_input = {
        s
        for st in (ServerStage.ADVERTISE, ServerStage.SHARE, ServerStage.MASKED_INPUT)
        for s in fed.dropouts.get(st, [])
    }
    # A site silent at ADVERTISE costs one more setup attempt, nothing else.
    assert result.setup_attempts == (2 if fed.dropouts.get(ServerStage.ADVERTISE) else 1)
    assert set(result.survivors) == set(site_names(n)) - dropped_before_input
    # Bit for bit: the unmasked aggregate equals the plain sum of quantized survivors' vectors.
    plain = expected_sum(fed, updates, result.survivors, seed)
    assert result.aggregate.dtype == plain.dtype
    assert np.array_equal(result.aggregate, plain)
    # Dequantized weighted mean within the documented bound (step = clip / levels) of the
    # float weighted mean of the clipped updates.
    q = config.quantization
    weights = np.array([weight_of(s) for s in result.survivors], dtype=np.float64)
    clipped = np.stack([np.clip(updates.vectors[s], -q.clip, q.clip) for s in result.survivors])
    float_mean = (weights[:, None] * clipped).sum(axis=0) / weights.sum()
    assert result.total_weight == int(weights.sum())
    assert np.max(np.abs(result.weighted_mean - float_mean)) < q.step
    # Clipped counts are reported, per survivor.
    for s in result.survivors:
        assert result.clipped[s] == int(np.count_nonzero(np.abs(updates.vectors[s]) > q.clip))
    return outcome


@pytest.mark.parametrize("seed", range(12))
def test_random_rounds_with_dropouts_at_every_stage_sum_exactly(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(3, 31))
    complete_graph_max = int(rng.choice([4, 8, 32]))
    p = make_config(1, complete_graph_max=complete_graph_max).resolve(n)
    # Within what every neighbourhood, the quorum and the sites' window floor (2 dropouts per
    # k/2 ring positions by default) allow.
    budget = min(p.degree - p.threshold, n - p.min_survivors, 2)
    dropouts = _random_dropouts(rng, n, budget=budget)
    _check_round(n, int(rng.integers(1, 40)), seed, dropouts, complete_graph_max=complete_graph_max)


class _SpreadDropouts(Behaviour):
    """Once the ring is known, script 7 dropouts 14 ring positions apart (at most 2 in any
    window of k/2 = 28: what the sites' floor allows for 100 sites, degree 56)."""

    def __init__(self) -> None:
        self.done = False

    def coordinator_sends(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
        if stage is ServerStage.SHARE and not self.done:
            self.done = True
            graph = fed.server.graph
            chosen: list[SiteId] = list(graph.ring[0::14][:7])
            plan = {
                ServerStage.SHARE: chosen[0:2],
                ServerStage.MASKED_INPUT: chosen[2:4],
                ServerStage.CONSISTENCY: chosen[4:5],
                ServerStage.UNMASK: chosen[5:7],
            }
            fed.dropouts = {st: frozenset(v) for st, v in plan.items()}
        return packet


def test_a_round_of_one_hundred_sites_with_seven_dropouts_spread_over_stages_is_exact() -> None:
    # Degree 56, threshold 34 (the floor for a third colluding); drop 7 sites spread over
    # stages and over the ring, chosen once the ring is known (it depends on the adverts).
    outcome = _check_round(100, 8, 7, {}, _SpreadDropouts())
    assert outcome.result is not None and len(outcome.result.survivors) == 96


def test_sixty_four_bit_arithmetic_gives_exact_sums_too() -> None:
    _check_round(12, 10, 3, {ServerStage.MASKED_INPUT: ["site-004"]}, bits=64, levels=1 << 30)


def test_a_neighbourhood_below_threshold_fails_the_round_cleanly_without_a_result() -> None:
    # Complete graph of 5: degree 4, threshold 3; two dropouts leave neighbourhoods of 2.
    fed, _ = make_fed(5, dropouts={ServerStage.MASKED_INPUT: ["site-000", "site-001"]})
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, ThresholdError)
    assert outcome.result is None
    assert outcome.server.stage is ServerStage.FAILED
    with pytest.raises(ThresholdError):
        _ = outcome.server.result


def test_dropouts_before_unmasking_reveal_no_shares_to_a_failed_round() -> None:
    fed, _ = make_fed(5, dropouts={ServerStage.CONSISTENCY: ["site-000", "site-001"]})
    outcome = fed.run_round(1)
    assert isinstance(outcome.failure, ThresholdError)
    assert all(session.revealed == () for session in outcome.sessions.values())


def test_the_same_seed_gives_the_same_aggregate() -> None:
    a, _ = make_fed(6, seed=5)
    b, _ = make_fed(6, seed=5)
    ra, rb = a.run_round(1).result, b.run_round(1).result
    assert ra is not None and rb is not None
    assert ra.aggregate_digest == rb.aggregate_digest


def test_masked_inputs_do_not_reveal_the_quantized_update() -> None:
    class Capture:
        def __init__(self) -> None:
            self.seen: dict[str, np.ndarray] = {}

    from fedseal.sim.inmemory import Behaviour

    cap = Capture()

    class Spy(Behaviour):
        def site_replies(self, fed, stage, site, packet):  # type: ignore[no-untyped-def]
            if packet.bulk is not None:
                cap.seen[site] = packet.bulk.copy()
            return (packet,)

    fed, updates = make_fed(4, length=64, behaviour=Spy())
    outcome = fed.run_round(1)
    assert outcome.result is not None
    for site, masked in cap.seen.items():
        plain = expected_sum(fed, updates, [site], 1)
        # A masked vector looks uniform: it agrees with the plain encoding almost nowhere.
        assert np.count_nonzero(masked == plain) < 4
