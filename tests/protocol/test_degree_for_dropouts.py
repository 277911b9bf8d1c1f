"""The degree sized for a dropout rate (issue 21.2): the least ``k`` that is safe for the sites'
floor and lets a round of ``n`` sites complete with ``floor(delta * n)`` random dropouts except
with probability ``2**-completion_bits`` (Bell et al.'s choice of ``k`` from ``n``, ``delta`` and
``gamma``, with exact tails). Checked against an independent recomputation of the bounds, by
sampling dropout sets on the real neighbour graph, and by complete rounds."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.protocol import ConfigError, ServerStage, SitePolicy
from fedseal.protocol.graph import build_graph
from fedseal.protocol.params import (
    check_parameters,
    check_survivor_windows,
    hypergeometric_tail,
    least_degree,
    least_degree_for_dropouts,
    max_dropped_per_window,
)
from fedseal.protocol.types import SiteId
from tests.protocol._support import expected_sum, make_config, make_fed, site_names

SIGMA = 40
BITS = 20


def _completes(n: int, k: int, gamma: Fraction, d: int) -> bool:
    """L1 and L2 recomputed from their definitions (no code shared with params.py but the
    hypergeometric tail, which test_params.py checks against a direct sum)."""
    floor_t = None
    for t in range(k // 2 + 1, k + 1):  # least t with n * P[colluding neighbours >= t] small
        if n * hypergeometric_tail(n - 1, math.floor(gamma * n), k, t) <= Fraction(1, 2 ** (SIGMA + 1)):
            floor_t = t
            break
    if floor_t is None:
        return False
    big_d = max_dropped_per_window(n, k, gamma, SIGMA)
    eps = Fraction(1, 2 ** (BITS + 1))
    l1 = n * hypergeometric_tail(n - 1, d, k, k - floor_t + 1) <= eps
    l2 = n * hypergeometric_tail(n, d, k // 2, big_d + 1) <= eps
    return big_d >= 0 and l1 and l2


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=40, max_value=1500),
    dropout=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3]),
    gamma=st.sampled_from([Fraction(1, 10), Fraction(1, 5), Fraction(1, 3)]),
)
def test_the_chosen_degree_is_safe_completes_and_is_the_least_that_does(n: int, dropout: float, gamma: Fraction) -> None:
    d = math.floor(Fraction(dropout).limit_denominator(10**6) * n)
    try:
        choice = least_degree_for_dropouts(n, gamma, SIGMA, dropout=dropout, completion_bits=BITS)
    except ConfigError as exc:  # only when the dropouts leave fewer sites than the quorum
        c = math.floor(gamma * n)
        assert (n + c) // 2 + 1 > n - d, exc
        return
    k = choice.degree
    assert choice.dropped == d
    # The sites' own floor accepts it (C1-C3), as they will check.
    check_parameters(n, k, choice.threshold, choice.min_survivors, gamma, SIGMA)
    assert choice.min_survivors <= n - d
    if k < n - 1:
        assert k % 2 == 0 and _completes(n, k, gamma, d)
        assert choice.log2_incomplete <= -BITS
    # Least: no smaller even degree that is safe at all also completes.
    for smaller in range(least_degree(n, gamma, SIGMA), k, 2):
        assert not _completes(n, smaller, gamma, d), smaller


def test_dropouts_beyond_the_quorum_are_refused_naming_the_numbers() -> None:
    with pytest.raises(ConfigError, match=r"400 dropouts of n=1000 leave 600 sites, below the consistency quorum 667"):
        least_degree_for_dropouts(1000, Fraction(1, 3), SIGMA, dropout=0.4)


def test_more_dropouts_or_more_colluders_need_a_larger_degree() -> None:
    ks = [least_degree_for_dropouts(1000, Fraction(1, 3), dropout=d).degree for d in (0.0, 0.1, 0.2, 0.3)]
    assert ks == sorted(ks) and ks[0] < ks[-1]
    by_gamma = [least_degree_for_dropouts(1000, g, dropout=0.2).degree for g in (0.05, 0.1, 0.2, 1 / 3)]
    assert by_gamma == sorted(by_gamma)


@pytest.mark.parametrize(("n", "dropout", "gamma"), [(300, 0.2, Fraction(1, 5)), (400, 0.3, Fraction(1, 10))])
def test_random_dropout_sets_on_the_real_graph_leave_every_neighbourhood_and_window_enough(
    n: int, dropout: float, gamma: Fraction
) -> None:
    choice = least_degree_for_dropouts(n, gamma, SIGMA, dropout=dropout, completion_bits=BITS)
    assert choice.degree < n - 1  # a sparse graph: the bounds are what keeps it complete
    sites = [SiteId(s) for s in site_names(n)]
    rng = np.random.default_rng(7)
    for trial in range(100):
        graph = build_graph(sites, rng.bytes(32), choice.degree, choice.threshold)
        dropped = {sites[i] for i in rng.choice(n, size=choice.dropped, replace=False)}
        survivors = [s for s in sites if s not in dropped]
        for s in sites:  # a survivor's seed and a dropped site's key are both rebuilt from t shares
            assert sum(1 for m in graph.of(s) if m not in dropped) >= choice.threshold, (trial, s)
        check_survivor_windows(graph.ring, survivors, choice.degree, choice.max_dropped_per_window)


@pytest.mark.timeout(300)
def test_a_round_sized_for_20_percent_dropouts_completes_exactly_with_20_percent_random_dropouts() -> None:
    n, dropout = 120, 0.2
    config = make_config(64, complete_graph_max=8, dropout_tolerance=dropout, max_colluding_fraction=0.1)
    params = config.resolve(n)
    choice = least_degree_for_dropouts(n, 0.1, SIGMA, dropout=dropout)
    assert (params.degree, params.threshold) == (choice.degree, choice.threshold) and params.degree < n - 1
    rng = np.random.default_rng(3)
    names = site_names(n)
    gone = [names[i] for i in rng.choice(n, size=choice.dropped, replace=False)]
    half = len(gone) // 2
    plan = {ServerStage.MASKED_INPUT: gone[:half], ServerStage.UNMASK: gone[half:]}
    fed, updates = make_fed(
        n, config=config, seed=11, dropouts=plan, site_policy=SitePolicy(max_colluding_fraction=0.1)
    )
    outcome = fed.run_round(1)
    assert outcome.failure is None, outcome.failure
    result = outcome.result
    assert result is not None and set(result.survivors) == set(names) - set(gone[:half])
    assert np.array_equal(result.aggregate, expected_sum(fed, updates, result.survivors, 11))
