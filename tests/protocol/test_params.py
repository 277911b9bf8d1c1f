"""Security-floor parameters (fedseal.protocol.params): exact tails, monotonicity, checks."""

from __future__ import annotations

import itertools
import math
import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.protocol.errors import ConfigError
from fedseal.protocol.params import (
    SecurityFloor,
    check_parameters,
    check_survivor_windows,
    colluders,
    hypergeometric_tail,
    least_degree,
    least_threshold,
    max_dropped_per_window,
    safe_quorum,
    site_floor,
)

GAMMA = 1 / 3
GAMMAS = (0.0, 0.05, 0.1, 0.2, 1 / 3, 0.4, 0.45)


def _budget(sigma: int) -> Fraction:
    return Fraction(1, 2 ** (sigma + 1))


def _brute_tail(population: int, successes: int, draws: int, at_least: int) -> Fraction:
    hits = total = 0
    for chosen in itertools.combinations(range(population), draws):
        total += 1
        hits += sum(1 for x in chosen if x < successes) >= at_least
    return Fraction(hits, total)


def _ring_distance(a: int, b: int, n: int) -> int:
    d = abs(a - b) % n
    return min(d, n - d)


def _even_sparse_degrees(n: int) -> list[int]:
    return [k for k in range(2, n - 1) if k % 2 == 0]


@st.composite
def _hypergeometric(draw: st.DrawFn) -> tuple[int, int, int, int]:
    population = draw(st.integers(0, 10))
    successes = draw(st.integers(0, population))
    draws = draw(st.integers(0, population))
    at_least = draw(st.integers(-1, draws + 1))
    return population, successes, draws, at_least


# --- exact tails ---------------------------------------------------------------------------


@given(_hypergeometric())
def test_hypergeometric_tail_equals_brute_force_enumeration(
    args: tuple[int, int, int, int],
) -> None:
    assert hypergeometric_tail(*args) == _brute_tail(*args)


def test_hypergeometric_tail_is_exact_far_in_the_tail() -> None:
    # P[all 40 drawn are marked] from 999 items, 333 marked: a ratio of binomials, exactly.
    assert hypergeometric_tail(999, 333, 40, 40) == Fraction(math.comb(333, 40), math.comb(999, 40))
    assert hypergeometric_tail(999, 333, 40, 41) == 0


def test_hypergeometric_tail_refuses_impossible_parameters() -> None:
    with pytest.raises(ValueError):
        hypergeometric_tail(5, 6, 2, 1)
    with pytest.raises(ValueError):
        hypergeometric_tail(5, 2, 6, 1)


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_neighbour_collusion_is_hypergeometric_and_union_bound_covers_the_ring(n: int) -> None:
    """Enumerate every colluder placement on the ring (the ring is uniform w.r.t. them)."""
    for c in range(n):
        for k in [*_even_sparse_degrees(n), n - 1]:
            w = k // 2
            for t in range(k // 2 + 1, k + 1):
                some_site = marginal_hits = honest_zero = 0
                placements = list(itertools.combinations(range(n), c))
                for bad in placements:
                    bad_set = set(bad)

                    def colluding(i: int, bad_set: set[int] = bad_set, k: int = k) -> int:
                        if k >= n - 1:
                            return len(bad_set - {i})
                        return sum(1 for j in bad_set if 0 < _ring_distance(i, j, n) <= w)

                    some_site += any(colluding(i) >= t for i in range(n) if i not in bad_set)
                    if 0 not in bad_set:
                        honest_zero += 1
                        marginal_hits += colluding(0) >= t
                tail = hypergeometric_tail(n - 1, c, k, t)
                if honest_zero:
                    assert Fraction(marginal_hits, honest_zero) == tail
                assert Fraction(some_site, len(placements)) <= n * tail


# --- threshold (C1) ------------------------------------------------------------------------


@given(st.integers(2, 300), st.sampled_from(GAMMAS), st.sampled_from([0, 10, 40]), st.data())
def test_least_threshold_is_the_least_value_meeting_the_union_bound(
    n: int, gamma: float, sigma: int, data: st.DataObject
) -> None:
    k = data.draw(st.sampled_from([*_even_sparse_degrees(n), n - 1]))
    c = colluders(n, gamma)
    t = least_threshold(n, k, gamma, sigma)
    ok = [
        u
        for u in range(k // 2 + 1, k + 1)
        if n * hypergeometric_tail(n - 1, c, k, u) <= _budget(sigma)
    ]
    assert t == (min(ok) if ok else None)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 31, 32, 100, 1000])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_complete_graph_threshold_is_one_more_than_the_colluders(n: int, gamma: float) -> None:
    c = colluders(n, gamma)
    expected = max(c + 1, (n - 1) // 2 + 1)
    assert least_threshold(n, n - 1, gamma) == (expected if expected <= n - 1 else None)
    # Any degree at or above n - 1 is the complete graph.
    assert least_threshold(n, n + 5, gamma) == least_threshold(n, n - 1, gamma)
    assert max_dropped_per_window(n, n - 1, gamma) == n


@given(st.integers(4, 400), st.integers(0, 60), st.data())
def test_larger_gamma_never_lowers_the_least_threshold(
    n: int, sigma: int, data: st.DataObject
) -> None:
    k = data.draw(st.sampled_from([*_even_sparse_degrees(n), n - 1]))
    rank = [least_threshold(n, k, g, sigma) for g in GAMMAS]
    as_number = [math.inf if t is None else t for t in rank]
    assert as_number == sorted(as_number)


@given(st.integers(4, 400), st.sampled_from(GAMMAS), st.integers(0, 60))
def test_a_safe_threshold_exists_for_every_degree_above_the_least(
    n: int, gamma: float, sigma: int
) -> None:
    exists = [least_threshold(n, k, gamma, sigma) is not None for k in _even_sparse_degrees(n)]
    assert exists == sorted(exists)  # False..., True...


# --- connectivity window rule (C2) ---------------------------------------------------------


@given(st.integers(4, 200), st.sampled_from(GAMMAS), st.integers(0, 60))
def test_larger_degree_never_lowers_the_dropouts_per_window(
    n: int, gamma: float, sigma: int
) -> None:
    ds = [max_dropped_per_window(n, k, gamma, sigma) for k in _even_sparse_degrees(n)]
    assert ds == sorted(ds)
    assert all(-1 <= d < k // 2 for d, k in zip(ds, _even_sparse_degrees(n), strict=True))


@given(st.integers(4, 200), st.sampled_from(GAMMAS), st.integers(0, 5))
def test_larger_degree_never_raises_the_disconnection_probability(
    n: int, gamma: float, d: int
) -> None:
    c = colluders(n, gamma)
    probs = [hypergeometric_tail(n, c, k // 2, k // 2 - d) for k in _even_sparse_degrees(n)]
    assert probs == sorted(probs, reverse=True)


@given(st.integers(4, 300), st.sampled_from(GAMMAS), st.sampled_from([0, 20, 40]), st.data())
def test_max_dropped_is_the_largest_value_meeting_the_union_bound(
    n: int, gamma: float, sigma: int, data: st.DataObject
) -> None:
    ks = _even_sparse_degrees(n)
    if not ks:
        return
    k = data.draw(st.sampled_from(ks))
    w, c = k // 2, colluders(n, gamma)
    ok = [d for d in range(w + 1) if n * hypergeometric_tail(n, c, w, w - d) <= _budget(sigma)]
    assert max_dropped_per_window(n, k, gamma, sigma) == (max(ok) if ok else -1)


@st.composite
def _ring_and_survivors(draw: st.DrawFn) -> tuple[int, int, frozenset[int]]:
    n = draw(st.integers(4, 40))
    k = draw(st.sampled_from(_even_sparse_degrees(n)))
    alive = draw(st.frozensets(st.integers(0, n - 1)))
    return n, k, alive


def _components(n: int, k: int, nodes: frozenset[int]) -> int:
    w, seen, count = k // 2, set[int](), 0
    for start in nodes:
        if start in seen:
            continue
        count += 1
        stack = [start]
        seen.add(start)
        while stack:
            i = stack.pop()
            for j in nodes:
                if j not in seen and _ring_distance(i, j, n) <= w:
                    seen.add(j)
                    stack.append(j)
    return count


@given(_ring_and_survivors())
def test_honest_survivors_in_every_window_are_connected(
    case: tuple[int, int, frozenset[int]],
) -> None:
    """The reasoning behind C2: no window of w positions without one -> one component."""
    n, k, honest_alive = case
    w = k // 2
    every_window = all(any((s + j) % n in honest_alive for j in range(w)) for s in range(n))
    if every_window and honest_alive:
        assert _components(n, k, honest_alive) == 1


# --- least degree --------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.2, 1 / 3, 0.45])
@pytest.mark.parametrize("min_d", [0, 1, 3])
def test_least_degree_equals_a_linear_search(gamma: float, min_d: int) -> None:
    for n in range(2, 90):
        linear = next(
            (
                k
                for k in _even_sparse_degrees(n)
                if least_threshold(n, k, gamma) is not None
                and max_dropped_per_window(n, k, gamma) >= min_d
            ),
            n - 1,
        )
        try:
            found = least_degree(n, gamma, min_window_dropouts=min_d)
        except ConfigError:
            assert least_threshold(n, n - 1, gamma) is None
            continue
        assert found == linear, n


def test_least_degree_refuses_a_cohort_where_even_the_complete_graph_is_unsafe() -> None:
    with pytest.raises(ConfigError, match=r"n=3"):
        least_degree(3, 0.67)


def test_least_degree_falls_back_to_the_complete_graph_for_small_cohorts() -> None:
    assert least_degree(9, GAMMA) == 8
    assert least_degree(10, GAMMA) == 8
    assert least_degree(10, GAMMA, min_window_dropouts=1) == 9


@pytest.mark.parametrize(
    ("n", "k", "t", "d", "q"),
    [
        (10, 8, 5, 0, 7),
        (32, 22, 12, 0, 22),
        (100, 46, 33, 0, 67),
        (200, 54, 42, 0, 134),
        (500, 60, 49, 0, 334),
        (1000, 64, 53, 0, 667),
    ],
)
def test_documented_table_rows(n: int, k: int, t: int, d: int, q: int) -> None:
    """The table in docs/params.md (gamma = 1/3, sigma = 40)."""
    assert least_degree(n, GAMMA, 40) == k
    floor = site_floor(n, k, GAMMA, 40)
    assert (floor.t_min, floor.max_dropped_per_window, floor.quorum) == (t, d, q)
    assert floor.log2_collusion_bound <= -41
    assert floor.log2_disconnection_bound <= -41


def test_every_function_is_fast_for_a_thousand_sites() -> None:
    start = time.perf_counter()
    for k in [*range(2, 999, 14), 999]:
        site_floor(1000, k, 0.3, 37)
    for d in range(10):
        least_degree(1000, 0.3, 37, min_window_dropouts=d)
    least_degree(10_000, 0.3, 37, min_window_dropouts=4)
    assert time.perf_counter() - start < 5.0  # about 0.05 s unloaded


# --- quorum (C3) ---------------------------------------------------------------------------


@given(st.integers(2, 200), st.sampled_from(GAMMAS), st.integers(0, 200))
def test_quorum_leaves_no_room_for_two_disjoint_honest_signer_groups(
    n: int, gamma: float, threshold: int
) -> None:
    c = colluders(n, gamma)
    q = safe_quorum(n, gamma, threshold)
    assert q >= threshold
    for h1 in range(n - c + 1):
        h2 = n - c - h1  # the most honest signers a second, disjoint group can have
        assert not (h1 + c >= q and h2 + c >= q)


@given(st.integers(2, 200), st.sampled_from(GAMMAS))
def test_quorum_is_the_least_that_rules_out_a_split(n: int, gamma: float) -> None:
    c = colluders(n, gamma)
    q = safe_quorum(n, gamma)
    h = q - 1 - c  # each of two groups signs q - 1 with the colluders' help
    assert h < 0 or 2 * h <= n - c


def test_colluders_reads_one_third_exactly() -> None:
    assert colluders(3, 1 / 3) == 1
    assert colluders(300, 1 / 3) == 100
    assert colluders(299, 1 / 3) == 99
    assert colluders(20, 0.05) == 1
    assert colluders(10, 0.0) == 0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            colluders(10, bad)


# --- check_parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "t", "min_survivors"),
    [(3, 2, 2, 3), (4, 3, 2, 3), (10, 8, 5, 7), (10, 9, 6, 8), (1000, 64, 53, 667)],
)
def test_check_parameters_accepts_what_a_sensible_coordinator_sends(
    n: int, k: int, t: int, min_survivors: int
) -> None:
    floor = check_parameters(n, k, t, min_survivors, gamma=GAMMA, sigma=40)
    assert isinstance(floor, SecurityFloor)
    assert floor.t_min is not None and floor.t_min <= t


@pytest.mark.parametrize(
    ("n", "k", "t", "min_survivors", "reason"),
    [
        (1000, 20, 15, 700, r"degree k=20 too small for n=1000.*need k >= 64"),
        (100, 40, 30, 80, r"degree k=40 too small for n=100.*w=20.*need k >= 46"),
        (1000, 64, 52, 700, r"threshold t=52 below t_min=53 for n=1000, k=64"),
        (4, 3, 1, 3, r"threshold t=1 below t_min=2 for n=4, k=3"),
        (1000, 64, 65, 700, r"threshold t=65 above the degree k=64"),
        (1000, 64, 53, 666, r"min_survivors=666 below the consistency quorum 667.*n=1000"),
        (4, 3, 2, 2, r"min_survivors=2 below the consistency quorum 3"),
        (1000, 63, 53, 700, r"degree k=63 must be even"),
        (1, 1, 1, 1, r"n=1"),
        (10, 0, 1, 7, r"degree k=0"),
    ],
)
def test_check_parameters_refuses_with_a_specific_reason(
    n: int, k: int, t: int, min_survivors: int, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        check_parameters(n, k, t, min_survivors, gamma=GAMMA, sigma=40)
    assert "\n" not in str(caught.value)


def test_a_stricter_site_refuses_what_a_lax_one_accepts() -> None:
    check_parameters(100, 46, 33, 67, gamma=GAMMA, sigma=40)
    with pytest.raises(ConfigError, match="too small"):
        check_parameters(100, 46, 33, 67, gamma=GAMMA, sigma=80)
    with pytest.raises(ConfigError):
        check_parameters(100, 46, 33, 67, gamma=0.4, sigma=40)


def test_site_floor_reports_bounds_within_budget() -> None:
    floor = site_floor(1000, 90, GAMMA, 40)
    assert floor.colluders == 333 and not floor.complete
    assert floor.t_min == least_threshold(1000, 90, GAMMA, 40)
    assert floor.max_dropped_per_window == max_dropped_per_window(1000, 90, GAMMA, 40) == 4
    assert floor.log2_collusion_bound <= -41 and floor.log2_disconnection_bound <= -41
    complete = site_floor(10, 9, GAMMA, 40)
    assert complete.complete and complete.log2_collusion_bound == -math.inf
    assert complete.log2_disconnection_bound == -math.inf


# --- check_survivor_windows ----------------------------------------------------------------


RING = [f"site-{i:03d}" for i in range(100)]


def test_check_survivor_windows_catches_a_clustered_block_of_dropouts() -> None:
    dropped = set(RING[40:45])  # 5 in a row
    survivors = [s for s in RING if s not in dropped]
    with pytest.raises(ConfigError, match=r"drops 5 of the w=23.*positions 22\.\.44"):
        check_survivor_windows(RING, survivors, 46, 4)


def test_check_survivor_windows_accepts_spread_dropouts() -> None:
    dropped = set(RING[::10])  # 10 dropouts, at most 3 in any window of 23
    survivors = {s for s in RING if s not in dropped}
    check_survivor_windows(RING, survivors, 46, 3)
    with pytest.raises(ConfigError, match="drops 3"):
        check_survivor_windows(RING, survivors, 46, 2)


def test_check_survivor_windows_wraps_around_the_ring() -> None:
    dropped = {RING[98], RING[99], RING[0]}
    survivors = {s for s in RING if s not in dropped}
    with pytest.raises(ConfigError, match=r"positions 78\.\.0 \(from site .site-078.\)"):
        check_survivor_windows(RING, survivors, 46, 2)


def test_check_survivor_windows_is_a_no_op_for_the_complete_graph() -> None:
    check_survivor_windows(RING[:10], [], 9, 0)
    check_survivor_windows(RING[:10], [], 50, -1)


@given(_ring_and_survivors(), st.integers(-1, 6))
def test_check_survivor_windows_agrees_with_counting_every_window(
    case: tuple[int, int, frozenset[int]], max_dropped: int
) -> None:
    n, k, alive = case
    w = k // 2
    ring = [f"s{i}" for i in range(n)]
    survivors = [ring[i] for i in alive]
    worst = max(sum((s + j) % n not in alive for j in range(w)) for s in range(n))
    if worst > max_dropped:
        with pytest.raises(ConfigError):
            check_survivor_windows(ring, survivors, k, max_dropped)
    else:
        check_survivor_windows(ring, survivors, k, max_dropped)
