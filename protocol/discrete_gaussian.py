"""Randomness for the DP mechanism and the discrete Gaussian sampler (Canonne, Kamath & Steinke
2020, "The Discrete Gaussian for Differential Privacy", Algorithms 1-3), vectorized in numpy.

Randomness comes from a :class:`NoiseSource` (uniform uint64 words): by default the mask PRG
keyed from ``os.urandom`` (:func:`system_noise`), never numpy's generators; tests inject
:class:`PrgNoise` with a fixed seed. Uniform integers, the discrete Laplace proposals and their
signs are exact integers; floating point appears only in the Bernoulli(exp(-x)) trials, each with
a success probability of at least exp(-1), so an output's probability is within a factor
``exp(+-k 2^-50)`` of the exact pmf (``k`` trials on its path). See :mod:`fedseal.protocol.dp`.
"""

from __future__ import annotations

import math
import os
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from fedseal.crypto.prg import SEED_SIZE, Stream

__all__ = [
    "MAX_STDDEV",
    "NOISE_DOMAIN",
    "NoiseSource",
    "PrgNoise",
    "sample_discrete_gaussian",
    "system_noise",
    "uniform",
]

NOISE_DOMAIN: Final = b"fedseal/v1/dp-noise"
MAX_STDDEV: Final = 2.0**40
_COUNT_CAP: Final = 2.0**62
"""Largest stddev sampled: ``|U + t V| < 2^47``, so int64 sums of samples never overflow."""
_U53: Final = 2.0**-53
_EXP_M1: Final = math.exp(-1.0)
_BATCH: Final = 1 << 20  # proposals per sampler batch: bounded memory, vectorized

Int64Vector = npt.NDArray[np.int64]
FloatVector = npt.NDArray[np.float64]


class NoiseSource(Protocol):
    """Uniform random 64-bit words: the only randomness rounding and noise draw."""

    def words(self, count: int) -> npt.NDArray[np.uint64]:
        """Return ``count`` independent, uniformly random ``uint64`` words."""
        ...


class PrgNoise:
    """A :class:`NoiseSource` reading the AES-256-CTR stream of ``(seed, NOISE_DOMAIN)``.

    With a fixed seed it makes tests deterministic; :func:`system_noise` keys it with
    ``os.urandom`` (the OS CSPRNG), which is the default everywhere.
    """

    __slots__ = ("_stream",)

    def __init__(self, seed: bytes, domain: bytes = NOISE_DOMAIN) -> None:
        """Raises ``ValueError`` if ``seed`` is not 32 bytes or ``domain`` is empty."""
        self._stream = Stream(seed, domain)

    def words(self, count: int) -> npt.NDArray[np.uint64]:
        """The stream's next ``count`` words."""
        out = np.empty(count, dtype=np.uint64)
        self._stream.read_into(out)
        return out


def system_noise() -> PrgNoise:
    """A fresh :class:`PrgNoise` keyed by 32 bytes of the OS CSPRNG."""
    return PrgNoise(os.urandom(SEED_SIZE))


def uniform(source: NoiseSource, count: int) -> FloatVector:
    """``count`` uniforms on the grid ``k 2^-53``, ``0 <= k < 2^53`` (exactly uniform)."""
    return (source.words(count) >> np.uint64(11)).astype(np.float64) * _U53


def bernoulli_exp(x: FloatVector, source: NoiseSource) -> npt.NDArray[np.bool_]:
    """Independent ``Bernoulli(exp(-x_i))``, ``x_i >= 0``, as CKS's decomposition: one
    ``Bernoulli(exp(-frac x))`` and ``floor(x)`` ``Bernoulli(exp(-1))``, all must succeed.
    ``x >= 2^62`` fails outright (its probability is below ``e^-(2^62)``; the count would not fit
    an int64: found by review, a sigma of 1e-12 gave variance 1.8)."""
    whole = np.floor(x)
    alive = (uniform(source, x.shape[0]) < np.exp(whole - x)) & (whole < _COUNT_CAP)
    count = np.minimum(whole, _COUNT_CAP).astype(np.int64)
    pending = np.flatnonzero(alive & (count >= 1))
    step = 1
    while pending.size:
        ok = uniform(source, pending.size) < _EXP_M1
        alive[pending[~ok]] = False
        step += 1
        pending = pending[ok]
        pending = pending[count[pending] >= step]
    return alive


def discrete_laplace(t: int, proposals: int, source: NoiseSource) -> Int64Vector:
    """CKS Alg. 2 (scale ``t``, integer), vectorized: returns the accepted proposals (iid)."""
    words = source.words(proposals)
    span = 1 << 64
    limit = span - span % t  # exact uniform on {0..t-1}: reject the last partial block
    if limit < span:
        words = words[words < np.uint64(limit)]
    u = (words % np.uint64(t)).astype(np.int64)
    coins = source.words(u.shape[0])
    keep = (coins >> np.uint64(11)).astype(np.float64) * _U53 < np.exp(-(u / t))
    u = u[keep]
    negative = (coins[keep] & np.uint64(1)).astype(bool)  # bit 0: independent of bits 11..63
    v = np.zeros(u.shape[0], dtype=np.int64)
    active = np.arange(u.shape[0])
    while active.size:  # V ~ Geometric(1 - e^-1): count Bernoulli(e^-1) successes
        active = active[uniform(source, active.size) < _EXP_M1]
        v[active] += 1
    magnitude: Int64Vector = u + t * v
    signed = magnitude.copy()
    np.negative(magnitude, out=signed, where=negative)
    result: Int64Vector = signed[~(negative & (magnitude == 0))]  # -0 would count 0 twice
    return result


def sample_discrete_gaussian(
    sigma: float, count: int, source: NoiseSource | None = None
) -> Int64Vector:
    """``count`` iid samples of ``N_Z(0, sigma^2)`` (CKS 2020, Alg. 3), vectorized.

    Proposals ``Y ~ DLap(t)``, ``t = floor(sigma) + 1``, accepted with probability
    ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``; floats only as the module docstring says.

    Raises:
        ValueError: If ``sigma`` is negative, not finite or above 2^40, or ``count < 0``.
    """
    if not math.isfinite(sigma) or not 0.0 <= sigma <= MAX_STDDEV:
        raise ValueError(f"sigma must be in [0, 2^40], got {sigma!r}")
    if count < 0:
        raise ValueError("count must be non-negative")
    out = np.zeros(count, dtype=np.int64)
    if sigma == 0.0 or count == 0:
        return out
    src = system_noise() if source is None else source
    t = math.floor(sigma) + 1
    center = sigma * sigma / t
    two_var = 2.0 * sigma * sigma
    filled = 0
    while filled < count:
        need = count - filled
        y = discrete_laplace(t, min(_BATCH, int(need * 2.5) + 64), src)
        excess = np.abs(y) - center
        accepted = y[bernoulli_exp(excess * excess / two_var, src)]
        take = min(need, accepted.shape[0])
        out[filled : filled + take] = accepted[:take]
        filled += take
    return out
