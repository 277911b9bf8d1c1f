"""Security floor of a SecAgg+ round: least degree, threshold, quorum and dropout rule.

Model (``docs/params.md`` has the derivation and sources). A cohort of ``n`` sites sits on
a ring in an order drawn from an unbiased public seed; each site's neighbours are the
``w = k/2`` nearest on either side (Harary graph ``H_{k,n}``, Bell et al., CCS 2020);
``k >= n - 1`` is the complete graph. A malicious coordinator colludes with
``c = floor(gamma * n)`` sites chosen *before* the ring is drawn, and chooses which sites
it claims dropped *after* seeing it. With ``eps = 2**-(sigma + 1)`` per condition:

* (C1) threshold: ``n * P[X >= t] <= eps``, ``X ~ Hypergeometric(n - 1, c, k)`` (the
  colluders among one honest site's ``k`` neighbours), union bound over the ``n`` sites.
  For the complete graph ``X = c`` exactly: ``t >= c + 1``. Always ``k/2 < t <= k``.
* (C2) connectivity (sparse graph only): each honest site refuses a survivor set with
  more than ``D`` non-survivors in some window of ``w`` consecutive ring positions
  (:func:`check_survivor_windows`); honest survivors can then be split only if some
  window holds ``>= w - D`` colluders: ``n * P[Y >= w - D] <= eps``,
  ``Y ~ Hypergeometric(n, c, w)``, union bound over the ``n`` windows.
* (C3) consistency quorum (deterministic): a site reveals shares only after ``q`` valid
  signatures on one survivor set; two sets both reach ``q`` only if
  ``2 * (q - c) <= n - c``, so ``q = floor((n + c) / 2) + 1`` (and ``q >= t``).

Tails are exact: integer numerators over ``comb(population, draws)``, summed from the top
with an exact term-ratio recurrence (no floating point, no normal approximation). Every
function is memoized on integers and runs in milliseconds for ``n <= 1000``.

Example::

    k = least_degree(n, gamma=1/3, sigma=40, min_window_dropouts=2)
    floor = check_parameters(n, k, t, min_survivors, gamma=1/3, sigma=40)  # ConfigError if unsafe
    check_survivor_windows(ring, survivors, k, floor.max_dropped_per_window)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from .errors import ConfigError

__all__ = [
    "DEFAULT_COMPLETION_BITS",
    "DEFAULT_GAMMA",
    "DEFAULT_SIGMA",
    "DegreeChoice",
    "SecurityFloor",
    "check_parameters",
    "check_survivor_windows",
    "colluders",
    "hypergeometric_tail",
    "least_degree",
    "least_degree_for_dropouts",
    "least_threshold",
    "max_dropped_per_window",
    "safe_quorum",
    "site_floor",
]

DEFAULT_GAMMA = 1 / 3
"""Default largest fraction of the cohort colluding with the coordinator."""

DEFAULT_SIGMA = 40
"""Default statistical security parameter: failure probability at most ``2**-sigma``."""

_GAMMA_DENOMINATOR = 10**6


def _ratio(gamma: float | Fraction) -> Fraction:
    """``gamma`` as an exact fraction (``1/3`` as a float gives exactly ``1/3``)."""
    value = Fraction(gamma).limit_denominator(_GAMMA_DENOMINATOR)
    if not 0 <= value < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
    return value


def _check_n(n: int) -> None:
    if n < 2:
        raise ValueError(f"a cohort needs at least 2 sites, got n={n}")


def _check_sigma(sigma: int) -> None:
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")


def _is_complete(n: int, k: int) -> bool:
    return k >= n - 1


def _check_degree(n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"degree must be >= 1, got k={k}")
    if not _is_complete(n, k) and k % 2:
        raise ValueError(f"a sparse (Harary) graph needs an even degree, got k={k} for n={n}")


def colluders(n: int, gamma: float | Fraction) -> int:
    """Number of sites colluding with the coordinator: ``floor(gamma * n)``, computed exactly.

    Args:
        n: Cohort size.
        gamma: Largest colluding fraction in ``[0, 1)``; a float is read as the nearest
            fraction with denominator at most 10**6 (so ``1/3 * 3`` gives 1, not 0).

    Raises:
        ValueError: If ``gamma`` is outside ``[0, 1)`` or ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return math.floor(_ratio(gamma) * n)


def safe_quorum(n: int, gamma: float | Fraction, threshold: int = 0) -> int:
    """Least survivor-set signature quorum that rules out a split view (C3).

    Honest sites sign one survivor set each, colluders sign anything: two sets both reach
    ``q`` only if ``2 * (q - c) <= n - c``. ``q = floor((n + c) / 2) + 1`` makes that
    impossible; the quorum is also at least the Shamir threshold.

    Args:
        n: Cohort size.
        gamma: Largest colluding fraction.
        threshold: The round's Shamir threshold ``t`` (the quorum is at least ``t``).
    """
    c = colluders(n, gamma)
    return max(threshold, (n + c) // 2 + 1)


def _tail_terms_step(term: int, x: int, successes: int, failures: int, draws: int) -> int:
    """``C(K, x-1) C(N-K, d-x+1)`` from ``term = C(K, x) C(N-K, d-x)`` (exact division)."""
    return (term * x * (failures - draws + x)) // ((successes - x + 1) * (draws - x + 1))


@lru_cache(maxsize=4096)
def _tail_numerator(population: int, successes: int, draws: int, at_least: int) -> int:
    """``sum_{x >= at_least} C(K, x) C(N - K, d - x)`` (the tail times ``C(N, d)``)."""
    failures = population - successes
    hi = min(successes, draws)
    lo = max(0, draws - failures)
    start = max(at_least, lo)
    if start > hi:
        return 0
    x = hi
    term = math.comb(successes, hi) * math.comb(failures, draws - hi)
    total = 0
    while True:
        total += term
        if x == start:
            return total
        term = _tail_terms_step(term, x, successes, failures, draws)
        x -= 1


def _check_hypergeometric(population: int, successes: int, draws: int) -> None:
    if not (0 <= successes <= population and 0 <= draws <= population):
        raise ValueError(
            f"need 0 <= successes, draws <= population; got population={population}, "
            f"successes={successes}, draws={draws}"
        )


def hypergeometric_tail(population: int, successes: int, draws: int, at_least: int) -> Fraction:
    """Exact ``P[X >= at_least]`` for ``X ~ Hypergeometric(population, successes, draws)``.

    ``X`` counts the marked items among ``draws`` drawn without replacement from
    ``population`` items of which ``successes`` are marked.

    Raises:
        ValueError: If the parameters do not describe a hypergeometric distribution.
    """
    _check_hypergeometric(population, successes, draws)
    if at_least <= 0:
        return Fraction(1)
    numerator = _tail_numerator(population, successes, draws, at_least)
    return Fraction(numerator, math.comb(population, draws))


@lru_cache(maxsize=4096)
def _least_safe_count(population: int, successes: int, draws: int, union: int, sigma: int) -> int:
    """Least ``m`` with ``union * P[X >= m] <= 2**-(sigma + 1)``, X hypergeometric.

    Sums the tail from the top down with exact integers and stops at the first term that
    would break the bound. The result lies in ``(lo, min(successes, draws) + 1]``.
    """
    failures = population - successes
    hi = min(successes, draws)
    lo = max(0, draws - failures)
    total = math.comb(population, draws)
    scale = union << (sigma + 1)  # condition: scale * tail <= total
    term = math.comb(successes, hi) * math.comb(failures, draws - hi)
    tail = 0
    least = hi + 1
    x = hi
    while x >= lo:
        if scale * (tail + term) > total:
            break
        tail += term
        least = x
        if x == lo:
            break
        term = _tail_terms_step(term, x, successes, failures, draws)
        x -= 1
    return least


def _log2(value: Fraction) -> float:
    if value <= 0:
        return -math.inf
    return math.log2(value.numerator) - math.log2(value.denominator)


def least_threshold(
    n: int, k: int, gamma: float | Fraction, sigma: int = DEFAULT_SIGMA
) -> int | None:
    """Least Shamir threshold ``t`` meeting the collusion bound (C1), or ``None``.

    ``t`` is the least value with ``k/2 < t <= k`` and
    ``n * P[X >= t] <= 2**-(sigma + 1)``, ``X ~ Hypergeometric(n - 1, c, k)``. For the
    complete graph (``k >= n - 1``, taken as ``n - 1``) that is ``max(c + 1, k//2 + 1)``.

    Args:
        n: Cohort size (>= 2).
        k: Neighbour-graph degree (even, or ``>= n - 1`` for the complete graph).
        gamma: Largest colluding fraction.
        sigma: Statistical security parameter.

    Returns:
        The least safe ``t``, or ``None`` if no ``t <= k`` is safe (``k`` too small).

    Raises:
        ValueError: On out-of-range arguments or an odd sparse degree.
    """
    _check_n(n)
    _check_degree(n, k)
    _check_sigma(sigma)
    return _least_threshold(n, min(k, n - 1), colluders(n, gamma), sigma)


@lru_cache(maxsize=4096)
def _least_threshold(n: int, k: int, c: int, sigma: int) -> int | None:
    t = max(_least_safe_count(n - 1, c, k, n, sigma), k // 2 + 1)
    return t if t <= k else None


def max_dropped_per_window(
    n: int, k: int, gamma: float | Fraction, sigma: int = DEFAULT_SIGMA
) -> int:
    """Largest dropouts-per-window ``D`` meeting the connectivity bound (C2).

    The largest ``D >= 0`` with ``n * P[Y >= w - D] <= 2**-(sigma + 1)``,
    ``Y ~ Hypergeometric(n, c, w)``, ``w = k // 2``.

    Args:
        n: Cohort size (>= 2).
        k: Neighbour-graph degree (even, or ``>= n - 1`` for the complete graph).
        gamma: Largest colluding fraction.
        sigma: Statistical security parameter.

    Returns:
        ``D``; ``-1`` if not even ``D = 0`` meets the bound; ``n`` for the complete graph
        (honest survivors are always connected: no window rule is needed).

    Raises:
        ValueError: On out-of-range arguments or an odd sparse degree.
    """
    _check_n(n)
    _check_degree(n, k)
    _check_sigma(sigma)
    if _is_complete(n, k):
        return n
    return _max_dropped(n, k, colluders(n, gamma), sigma)


@lru_cache(maxsize=4096)
def _max_dropped(n: int, k: int, c: int, sigma: int) -> int:
    w = k // 2
    return w - _least_safe_count(n, c, w, n, sigma)


def _feasible(n: int, k: int, c: int, sigma: int, min_window_dropouts: int) -> bool:
    return (
        _least_threshold(n, k, c, sigma) is not None
        and _max_dropped(n, k, c, sigma) >= min_window_dropouts
    )


def least_degree(
    n: int,
    gamma: float | Fraction,
    sigma: int = DEFAULT_SIGMA,
    min_window_dropouts: int = 0,
) -> int:
    """Least neighbour-graph degree meeting C1 and C2 for this cohort.

    Both conditions are monotone in ``k`` (``P[X >= k]`` and, for a fixed ``D``,
    ``P[Y >= w - D]`` never grow with ``k``), so the search gallops over even degrees
    (2, 4, 8, ...) and then bisects: ``O(log n)`` exact tail evaluations.

    Args:
        n: Cohort size (>= 2).
        gamma: Largest colluding fraction.
        sigma: Statistical security parameter.
        min_window_dropouts: The least ``D`` (dropouts per window of ``k/2`` ring
            positions) the round must tolerate.

    Returns:
        The least even ``k < n - 1`` that works, else ``n - 1`` (the complete graph).

    Raises:
        ConfigError: If not even the complete graph meets C1 (``gamma`` too large for
            ``n``: ``c + 1 > n - 1``).
        ValueError: On out-of-range arguments.
    """
    _check_n(n)
    _check_sigma(sigma)
    if min_window_dropouts < 0:
        raise ValueError(f"min_window_dropouts must be >= 0, got {min_window_dropouts}")
    return _least_degree(n, colluders(n, gamma), sigma, min_window_dropouts)


@lru_cache(maxsize=1024)
def _least_degree(n: int, c: int, sigma: int, min_window_dropouts: int) -> int:
    top = n - 2 if n % 2 == 0 else n - 3  # largest even degree of a sparse graph (< n - 1)
    if top >= 2:
        # Gallop over half-degrees w = 1, 2, 4, ... then bisect on w in (bad, good].
        bad, good = 0, None
        w = 1
        while 2 * w <= top:
            if _feasible(n, 2 * w, c, sigma, min_window_dropouts):
                good = w
                break
            bad = w
            w *= 2
        if good is None and 2 * bad < top and _feasible(n, top, c, sigma, min_window_dropouts):
            good = top // 2
        if good is not None:
            while good - bad > 1:
                mid = (bad + good) // 2
                if _feasible(n, 2 * mid, c, sigma, min_window_dropouts):
                    good = mid
                else:
                    bad = mid
            return 2 * good
    if _least_threshold(n, n - 1, c, sigma) is None:
        raise ConfigError(
            f"no neighbour graph is safe for n={n} with c={c} colluders: even the complete "
            f"graph (k={n - 1}) needs t >= c+1={c + 1} > k"
        )
    return n - 1


DEFAULT_COMPLETION_BITS = 20
"""A round sized for a dropout rate fails to complete with probability at most ``2**-20``."""


@dataclass(frozen=True, slots=True)
class DegreeChoice:
    """The least degree for a cohort, a colluding fraction and a dropout rate (see
    :func:`least_degree_for_dropouts`), and why it suffices.

    Attributes:
        n: Cohort size.
        degree: ``k`` (even, or ``n - 1``: the complete graph).
        threshold: The least safe ``t`` for ``k`` (C1).
        min_survivors: The consistency quorum (C3), at most ``n - dropped``.
        dropped: ``d = floor(dropout * n)``, the dropouts the round must absorb.
        max_dropped_per_window: The sites' ``D`` for ``k`` (C2); ``n`` when complete.
        log2_incomplete: ``log2`` of the union bound on the round failing to complete with
            ``d`` random dropouts (some site left with fewer than ``t`` surviving neighbours,
            or some window with more than ``D`` dropouts); ``-inf`` when it cannot fail.
    """

    n: int
    degree: int
    threshold: int
    min_survivors: int
    dropped: int
    max_dropped_per_window: int
    log2_incomplete: float


def least_degree_for_dropouts(
    n: int,
    gamma: float | Fraction,
    sigma: int = DEFAULT_SIGMA,
    *,
    dropout: float | Fraction,
    completion_bits: int = DEFAULT_COMPLETION_BITS,
) -> DegreeChoice:
    """The least degree that is safe (C1-C3 at ``2**-sigma``, the sites' floor) *and* lets a
    round of ``n`` sites complete when ``d = floor(dropout * n)`` of them, chosen uniformly at
    random, drop out during it, except with probability ``2**-completion_bits``.

    SecAgg+ (Bell et al., CCS 2020, section 4) chooses ``k`` from ``n``, the dropout rate and
    the corrupt fraction; here every bound is computed exactly for the cohort (hypergeometric
    tails, union bounds, no asymptotics). Completion needs, with ``X ~ Hypergeometric(n - 1, d,
    k)`` the dropouts among one site's neighbours and ``W ~ Hypergeometric(n, d, k/2)`` those
    in one window of the ring:

    * (L1) every site keeps ``t`` surviving neighbours (its self-mask seed, or a dropped
      site's mask key, can be rebuilt): ``n * P[X >= k - t + 1] <= 2**-(completion_bits + 1)``;
    * (L2) no window holds more than the sites' ``D`` dropouts (they refuse such a survivor
      set, C2): ``n * P[W >= D + 1] <= 2**-(completion_bits + 1)``;
    * (L3) the consistency quorum is at most the survivors: ``floor((n + c)/2) + 1 <= n - d``.

    The scan goes up the even degrees from the least safe one (the conditions are not
    monotone in ``k`` in general, so no bisection) and ends at the complete graph, where only
    (L3) and ``t <= n - d`` remain.

    Raises:
        ConfigError: No degree works: the dropouts leave fewer than the quorum (``dropout``
            too large for ``gamma``: with ``c`` colluders a split view needs a majority
            quorum, so ``d < (n - c) / 2``), named with the numbers.
        ValueError: On out-of-range arguments.
    """
    _check_n(n)
    _check_sigma(sigma)
    if completion_bits < 0:
        raise ValueError(f"completion_bits must be >= 0, got {completion_bits}")
    rate = Fraction(dropout).limit_denominator(_GAMMA_DENOMINATOR)
    if not 0 <= rate < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return _least_degree_for_dropouts(n, _ratio(gamma), sigma, math.floor(rate * n), completion_bits)


@lru_cache(maxsize=256)
def _least_degree_for_dropouts(n: int, ratio: Fraction, sigma: int, d: int, bits: int) -> DegreeChoice:
    c = math.floor(ratio * n)
    quorum_floor = (n + c) // 2 + 1
    if quorum_floor > n - d:
        raise ConfigError(
            f"{d} dropouts of n={n} leave {n - d} sites, below the consistency quorum "
            f"{quorum_floor} = floor((n + c)/2) + 1 with c={c} colluders (gamma={ratio}): a round "
            f"can absorb fewer than {(n - c) // 2} dropouts, or assume a smaller gamma"
        )
    top = n - 2 if n % 2 == 0 else n - 3  # the largest even sparse degree
    start = _least_degree(n, c, sigma, 0)
    for k in range(start, top + 1, 2) if start <= top else ():
        choice = _completes(n, k, c, sigma, d, bits)
        if choice is not None:
            return choice
    t = _least_threshold(n, n - 1, c, sigma)
    if t is None or t > n - d:  # pragma: no cover - quorum_floor >= t covers it
        raise ConfigError(f"no degree lets {n - d} of n={n} sites complete a round safely")
    return DegreeChoice(n, n - 1, t, max(t, quorum_floor), d, n, -math.inf)


def _completes(n: int, k: int, c: int, sigma: int, d: int, bits: int) -> DegreeChoice | None:
    """The choice at degree ``k`` if it is safe and completes (L1-L3), else None."""
    t = _least_threshold(n, k, c, sigma)
    big_d = _max_dropped(n, k, c, sigma)
    if t is None or big_d < 0:
        return None
    w = k // 2
    if _least_safe_count(n - 1, d, k, n, bits) > k - t + 1:
        return None  # L1: too many dropped neighbours too often
    if _least_safe_count(n, d, w, n, bits) > big_d + 1:
        return None  # L2: a window over the sites' D too often
    bound = n * hypergeometric_tail(n - 1, d, k, k - t + 1) + n * hypergeometric_tail(n, d, w, big_d + 1)
    return DegreeChoice(n, k, t, max(t, (n + c) // 2 + 1), d, big_d, _log2(bound))


@dataclass(frozen=True, slots=True)
class SecurityFloor:
    """What an honest site requires of a round of ``n`` sites on a graph of degree ``k``.

    Attributes:
        n: Cohort size.
        degree: Effective degree ``min(k, n - 1)``.
        complete: Whether the graph is complete (``k >= n - 1``).
        gamma: Largest colluding fraction (as an exact fraction).
        sigma: Statistical security parameter.
        colluders: ``c = floor(gamma * n)``.
        t_min: Least safe Shamir threshold (C1); ``None`` if the degree is too small.
        quorum: Least survivor-set signature quorum, ``max(t_min, floor((n+c)/2) + 1)``.
        max_dropped_per_window: Largest ``D`` (C2); ``n`` for the complete graph, ``-1``
            if the degree is too small.
        log2_collusion_bound: ``log2(n * P[X >= t_min])`` (C1; at ``t = k`` if ``t_min``
            is ``None``); ``-inf`` when the probability is exactly 0.
        log2_disconnection_bound: ``log2(n * P[Y >= w - D])`` (C2; at ``D = 0`` if
            ``D = -1``); ``-inf`` for the complete graph or a zero probability.
    """

    n: int
    degree: int
    complete: bool
    gamma: Fraction
    sigma: int
    colluders: int
    t_min: int | None
    quorum: int
    max_dropped_per_window: int
    log2_collusion_bound: float
    log2_disconnection_bound: float

    def _where(self, *, with_degree: bool = True) -> str:
        degree = f"k={self.degree}, " if with_degree else ""
        return f"n={self.n}, {degree}gamma={self.gamma} (c={self.colluders}), sigma={self.sigma}"

    def check(self, threshold: int, min_survivors: int) -> None:
        """Refuse a threshold or survivor minimum below this floor.

        Args:
            threshold: The round's Shamir threshold ``t``.
            min_survivors: The round's fewest survivors (must reach the quorum).

        Raises:
            ConfigError: With a one-line reason naming ``n``, ``k``, ``t`` and the
                required value.
        """
        t = threshold
        if self.t_min is None:
            need = _least_degree(self.n, self.colluders, self.sigma, 0)
            raise ConfigError(
                f"degree k={self.degree} too small for {self._where(with_degree=False)}: no "
                f"threshold t in "
                f"(k/2, k] keeps n*P[>= t colluding neighbours] <= 2^-{self.sigma + 1}; "
                f"need k >= {need}"
            )
        if self.max_dropped_per_window < 0:
            need = _least_degree(self.n, self.colluders, self.sigma, 0)
            raise ConfigError(
                f"degree k={self.degree} too small for {self._where(with_degree=False)}: some "
                f"window of w={self.degree // 2} ring positions is all colluders with "
                f"n*P = 2^{self.log2_disconnection_bound:.1f} > 2^-{self.sigma + 1}; "
                f"need k >= {need}"
            )
        if t > self.degree:
            raise ConfigError(f"threshold t={t} above the degree k={self.degree} ({self._where()})")
        if t < self.t_min:
            raise ConfigError(f"threshold t={t} below t_min={self.t_min} for {self._where()}")
        quorum = max(self.quorum, t)
        if min_survivors < quorum:
            raise ConfigError(
                f"min_survivors={min_survivors} below the consistency quorum {quorum} "
                f"= max(t={t}, floor((n+c)/2)+1) for {self._where()}"
            )


def site_floor(
    n: int, k: int, gamma: float | Fraction = DEFAULT_GAMMA, sigma: int = DEFAULT_SIGMA
) -> SecurityFloor:
    """The :class:`SecurityFloor` for ``n`` sites on a graph of degree ``k``.

    Raises:
        ValueError: On out-of-range arguments or an odd sparse degree.
    """
    _check_n(n)
    _check_degree(n, k)
    _check_sigma(sigma)
    ratio = _ratio(gamma)
    return _site_floor(n, min(k, n - 1), ratio, sigma)


@lru_cache(maxsize=1024)
def _site_floor(n: int, k: int, ratio: Fraction, sigma: int) -> SecurityFloor:
    c = math.floor(ratio * n)
    complete = _is_complete(n, k)
    t_min = _least_threshold(n, k, c, sigma)
    collusion = n * hypergeometric_tail(n - 1, c, k, k if t_min is None else t_min)
    if complete:
        dropped, disconnection = n, Fraction(0)
    else:
        w = k // 2
        dropped = _max_dropped(n, k, c, sigma)
        disconnection = n * hypergeometric_tail(n, c, w, w - max(dropped, 0))
    return SecurityFloor(
        n=n,
        degree=k,
        complete=complete,
        gamma=ratio,
        sigma=sigma,
        colluders=c,
        t_min=t_min,
        quorum=max(t_min or 0, (n + c) // 2 + 1),
        max_dropped_per_window=dropped,
        log2_collusion_bound=_log2(collusion),
        log2_disconnection_bound=_log2(disconnection),
    )


def check_parameters(
    n: int,
    k: int,
    t: int,
    min_survivors: int,
    gamma: float | Fraction = DEFAULT_GAMMA,
    sigma: int = DEFAULT_SIGMA,
) -> SecurityFloor:
    """Check a coordinator's round parameters against this site's security floor.

    Args:
        n: Cohort size.
        k: Neighbour-graph degree (``>= n - 1``: complete graph).
        t: Shamir threshold.
        min_survivors: Fewest survivors the round accepts (the signature quorum).
        gamma: This site's largest colluding fraction.
        sigma: This site's statistical security parameter.

    Returns:
        The :class:`SecurityFloor` (its ``max_dropped_per_window`` is the ``D`` to pass
        to :func:`check_survivor_windows`).

    Raises:
        ConfigError: With a one-line reason when ``n`` or ``k`` is malformed, ``k`` is too
            small (no safe ``t``, or ``D < 0``), ``t`` is below ``t_min`` or above ``k``,
            or ``min_survivors`` is below the quorum.
        ValueError: If ``gamma`` or ``sigma`` (the site's own settings) are out of range.
    """
    if n < 2:
        raise ConfigError(f"cohort of n={n} sites: at least 2 needed")
    if k < 1:
        raise ConfigError(f"degree k={k} below 1 for n={n}")
    if not _is_complete(n, k) and k % 2:
        raise ConfigError(f"degree k={k} must be even for a sparse (Harary) graph, n={n}")
    floor = site_floor(n, k, gamma, sigma)
    floor.check(t, min_survivors)
    return floor


def check_survivor_windows(
    ring: Sequence[str], survivors: Collection[str], k: int, max_dropped: int
) -> None:
    """Refuse a survivor set with more than ``max_dropped`` non-survivors in some window.

    A window is ``w = k // 2`` consecutive ring positions (cyclically); ``n`` windows are
    checked with one sliding pass, ``O(n)``. No-op for the complete graph
    (``k >= len(ring) - 1``).

    Args:
        ring: The cohort in ring order (as derived from the public graph seed).
        survivors: The survivor set the coordinator announced.
        k: The neighbour-graph degree.
        max_dropped: ``D`` from :func:`max_dropped_per_window`.

    Raises:
        ConfigError: Naming the first offending window (start position, its first site,
            how many of its sites dropped).
        ValueError: If ``k < 2`` for a sparse ring.
    """
    m = len(ring)
    if _is_complete(m, k):
        return
    w = k // 2
    if w < 1:
        raise ValueError(f"degree k={k} has no window for a ring of {m}")
    alive = frozenset(survivors)
    dropped = [0 if site in alive else 1 for site in ring]
    count = sum(dropped[:w])
    for start in range(m):
        if count > max_dropped:
            raise ConfigError(
                f"survivor set drops {count} of the w={w} consecutive ring positions "
                f"{start}..{(start + w - 1) % m} (from site {ring[start]!r}): at most "
                f"D={max_dropped} allowed for k={k}, n={m}"
            )
        count += dropped[(start + w) % m] - dropped[start]
