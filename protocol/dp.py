"""The distributed discrete Gaussian mechanism, sans-IO: one site's float update <-> Z_{2^b}.

Kairouz, Liu & Steinke, ICML 2021 ("KLS"), Algorithms 1 (site) and 2 (server), as TFF's
``DistributedDpSumFactory`` (``distributed_dgauss``, ``rotation_type='hd'``). A site, for an
update of length ``n <= d``, with ``c' = clip / gamma``::

    x <- x * min(1, clip / ||x||_2)                         L2 clip
    z <- H_B D pad_d(x) / (sqrt(B) gamma)                   randomized Hadamard, scale
    r <- randomized_round(z) until sum r_j^2 <= Delta^2     conditional rounding (beta)
    y <- (r + N_Z(0, sigma^2)^d) mod 2^b                    discrete Gaussian share, wrap

``D``: random signs from the AES-256-CTR PRG keyed by the round's ``rotation_seed`` (shared by
all sites, so the rotation commutes with the sum); ``H_B``: the Walsh-Hadamard transform of each
block of ``B`` consecutive values (``B`` a power of two dividing ``d``; ``H_B H_B = B I``), so
``H_B D / sqrt(B)`` is orthogonal. The coordinator reads the modular sum as integers in
``[-2^(b-1), 2^(b-1))`` and returns ``unpad_n(D H_B (gamma s) / sqrt(B))``. Rounding and noise
draw from a :class:`NoiseSource` (default: the PRG keyed by ``os.urandom``), never numpy's.

Blocks (:func:`rotation_shape`): KLS and TFF pad to the next power of two, which costs up to 2x
upload (fedseal's MNIST MLP: 109,386 values -> 131,072, 1.20x). Privacy does not depend on the
rotation (the norm bound holds for any orthogonal map, and ``Delta`` is computed with the padded
``d``), only the modular-wrap bound does: a block spreads its part of the update over ``B``
coordinates instead of ``d``, so the wrap bound's signal term uses ``B`` (:func:`wrap_probability`).
The shape is the largest block (down to :data:`MIN_BLOCK`) whose padding is at most ``n / 64``:
109,386 -> 27 blocks of 4,096 = 110,592 (1.011x). With one block this is exactly KLS's rotation
(and the canonical bytes are the original ones).

Norm bound (KLS Thm. 1 / Sec. 4.1, TFF ``inflated_l2_norm_bound``): ``Delta^2 = min((c' +
sqrt d)^2, c'^2 + d/4 + sqrt(2 ln(1/beta)) (c' + sqrt(d)/2))``, the second only for ``beta >
0``. One rounding of a vector of norm ``<= c'`` exceeds it with probability ``<= beta``;
resampling makes ``||r|| <= Delta`` certain at a per-coordinate bias of at most ``p / (1 - p)
<= beta / (1 - beta)`` grid units (``p`` the failure rate: ``E[r | ok] - z = -E[(r - z)
1_fail] / P(ok)``, ``|r_j - z_j| < 1``). ``Delta`` is one site's L2 sensitivity (add/remove).

Noise calibration (:meth:`DpParams.from_noise_multiplier`): central stddev ``z clip`` (TFF's
convention: relative to the clip before rounding inflates it). With ``N`` sites, at least
``min_survivors`` surviving and ``floor(f N)`` colluding with the coordinator (who subtracts
their noise; all may survive), ``h = min_survivors - floor(f N)`` honest shares are always
summed, so each site adds ``sigma = z clip / (gamma sqrt(h))``: ``h sigma^2 >= (z clip /
gamma)^2`` whoever drops. (A sum of discrete Gaussians is not one; KLS Thm. 1's ``tau`` term
accounts for that.)

Floating point (TFF's ``discrete_gaussian_utils`` also uses floats): the sampler (Canonne,
Kamath & Steinke 2020, Alg. 1-3) draws uniform integers, the discrete Laplace's ``U + t V``
and its sign exactly; floats appear only in Bernoulli trials ``u < p``, ``u`` a 53-bit uniform,
``p`` one of ``exp(-U/t)``, ``exp(-1)``, ``exp(-frac(x))`` with ``x = (|Y| - sigma^2/t)^2 /
(2 sigma^2)``. Each ``p >= exp(-1)`` (CKS's ``floor(x)`` x ``Bernoulli(exp(-1))`` split), so
libm's ``exp`` and the 2^-53 grid move a trial's probability by a factor ``1 +- 2^-50`` at most,
and ``x``'s few-ulp error moves its trial by ``exp(+-x 2^-50)``: every output probability is
within a factor ``exp(+-k 2^-50)`` of the exact pmf (``k`` trials on the path, tens in the
bulk). Outputs are integers (no Mironov low-bit leak); the privacy loss moves by ~1e-13 per
coordinate. Rounding compares a 53-bit uniform with the exact fraction: unbiased to 2^-53.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedseal.crypto.prg import expand

from .discrete_gaussian import (
    MAX_STDDEV,
    NoiseSource,
    sample_discrete_gaussian,
    system_noise,
    uniform,
)
from .encoding import Reader, Writer
from .errors import ConfigError, DecodeError
from .params import colluders
from .quantize import vector_dtype

__all__ = [
    "DP_PARAMS_TAG",
    "MAX_DIMENSION",
    "MAX_ROUNDING_TRIES",
    "ROTATION_DOMAIN",
    "DpParams",
    "EncodedUpdate",
    "RoundingError",
    "bits_needed",
    "centered",
    "clip_l2",
    "conditional_round",
    "coordinate_reach",
    "decode",
    "decode_integers",
    "encode",
    "encode_integers",
    "rotate",
    "rotation_seed_for",
    "rotation_shape",
    "sum_norm_bound",
    "unrotate",
    "wrap",
    "wrap_probability",
]

DP_PARAMS_TAG: Final = b"fedseal/v1/dp-params\x00"
ROTATION_DOMAIN: Final = b"fedseal/v1/dp-rotation-signs"
ROTATION_SEED_TAG: Final = b"fedseal/v1/dp-rotation-seed\x00"
MECHANISM_DDG_HADAMARD: Final = 1
"""Mechanism code in the canonical bytes: distributed discrete Gaussian, randomized Hadamard
over the whole padded vector (one block): ``u8 log2(d)``."""
MECHANISM_DDG_BLOCK_HADAMARD: Final = 2
"""The same with ``d / B`` blocks of ``B`` values: ``u8 log2(B), u32 d / B``."""
MAX_DIMENSION: Final = 1 << 30
MIN_BLOCK: Final = 1 << 10
"""Smallest Hadamard block :func:`rotation_shape` chooses (a model shorter than this is one block)."""
PADDING_FRACTION: Final = 64
""":func:`rotation_shape` pads at most ``length / PADDING_FRACTION`` values (unless the block is
already :data:`MIN_BLOCK`)."""
MAX_SITES: Final = 1 << 20
MAX_NORM_BOUND_SQ: Final = 1 << 60
"""Squared norms are summed exactly in int64 (screened in float below 2^61 first)."""
MAX_ROUNDING_TRIES: Final = 1000
"""Resampling cap: each try fails with probability <= beta, so beta^1000 (< e^-500 for the
recommended exp(-0.5)) is the chance of a spurious :class:`RoundingError`."""

_U53: Final = 2.0**-53
_F64 = struct.Struct(">d")

Int64Vector = npt.NDArray[np.int64]
FloatVector = npt.NDArray[np.float64]
UIntVector = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]


class RoundingError(RuntimeError):
    """Conditional randomized rounding missed the norm bound ``max_tries`` times in a row."""


# ----------------------------------------------------------------------------- parameters


def rotation_seed_for(run_id: bytes, round: int) -> bytes:
    """The round's public rotation seed: ``SHA-256(tag || run_id || round u32)``.

    Derived, not drawn: privacy never depends on the rotation (docs/dp.md §2: the norm bound
    holds for every orthogonal map), only the wrap bound does, and it needs the rotation to
    be independent of the updates. Run id and round are fixed before any site of the round
    trains, sites recompute the seed and refuse another one, so the coordinator has no free
    choice to fit the rotation to updates it can predict (it could only grind run ids, for a
    utility loss it can cause anyway by discarding the result); auditors recompute it from
    the signed setup, and the sans-IO coordinator needs no randomness source. It does not
    change between setup attempts of a round: no site has trained yet.
    """
    if len(run_id) != 16 or not 0 <= round < 1 << 32:
        raise ValueError("run_id must be 16 bytes and round a u32")
    return hashlib.sha256(ROTATION_SEED_TAG + run_id + round.to_bytes(4, "big")).digest()


def rotation_shape(length: int) -> tuple[int, int]:
    """``(d, B)`` for a model of ``length`` values: the padded length ``d``, a multiple of the
    Hadamard block ``B`` (a power of two). ``B`` starts at the next power of two of ``length``
    (one block, KLS's padding) and halves while that pads more than ``length / 64`` values and
    ``B > MIN_BLOCK``; sites recompute it and refuse any other shape."""
    if not 1 <= length <= MAX_DIMENSION:
        raise ValueError(f"length must be in 1..2^30, got {length}")
    block = 1 << (length - 1).bit_length()
    while block > MIN_BLOCK and -(-length // block) * block - length > length / PADDING_FRACTION:
        block //= 2
    return -(-length // block) * block, block


def _check_float(name: str, value: object, *, low: float, high: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"dp.{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"dp.{name} must be finite, got {value!r}")
    if math.copysign(1.0, value) < 0 or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"dp.{name} = {value!r} outside {bracket}{low}, {high}]")
    return value


_FLOAT_FIELDS = (
    ("clip", math.inf, True),
    ("gamma", math.inf, True),
    ("local_stddev", MAX_STDDEV, False),
    ("beta", 1.0, False),
)


@dataclass(frozen=True, slots=True)
class DpParams:
    """Parameters of one round's distributed discrete Gaussian mechanism (all public).

    Attributes:
        dimension: Padded length ``d``, a multiple of ``block`` (:func:`rotation_shape`).
        clip: L2 clip ``c`` of a site's update, in model units.
        gamma: Granularity: one grid unit is ``gamma`` model units.
        local_stddev: Per-site discrete Gaussian stddev ``sigma``, in grid units (0 = no noise).
        beta: Conditional-rounding parameter in ``[0, 1)``; 0 = plain randomized rounding
            (paper and TFF recommend ``exp(-0.5)``).
        modulus_bits: The secure sum's modulus ``2^b``, 32 or 64.
        min_survivors: Least number of sites whose shares are always in the sum.
        colluding_sites: Most sites colluding with the coordinator (their noise is known).
        block: Hadamard block ``B``, a power of two dividing ``dimension`` (0: one block, ``B =
            d``, which must then be a power of two).
    """

    dimension: int
    clip: float
    gamma: float
    local_stddev: float
    beta: float
    modulus_bits: int
    min_survivors: int
    colluding_sites: int = 0
    block: int = 0

    def __post_init__(self) -> None:
        d, b = self.dimension, self.block
        if not isinstance(d, int) or not 1 <= d <= MAX_DIMENSION:
            raise ConfigError(f"dp.dimension must be in 1..2^30, got {d!r}")
        if b == 0:
            b = d
            object.__setattr__(self, "block", d)
        if not isinstance(b, int) or not 1 <= b <= d or b & (b - 1) or d % b:
            raise ConfigError(f"dp.block must be a power of two dividing dp.dimension={d}, got {b!r}")
        for name, high, low_open in _FLOAT_FIELDS:
            value = _check_float(name, getattr(self, name), low=0.0, high=high, low_open=low_open)
            object.__setattr__(self, name, value)  # ints are accepted and stored as floats
        if self.beta == 1.0:
            raise ConfigError("dp.beta must be < 1")
        if self.modulus_bits not in (32, 64):
            raise ConfigError(f"dp.modulus_bits must be 32 or 64, got {self.modulus_bits!r}")
        m, k = self.min_survivors, self.colluding_sites
        if not isinstance(m, int) or not 1 <= m <= MAX_SITES:
            raise ConfigError(f"dp.min_survivors must be in 1..2^20, got {m!r}")
        if not isinstance(k, int) or not 0 <= k < m:
            raise ConfigError(f"dp.colluding_sites must be in 0..min_survivors-1, got {k!r}")
        scaled = self.clip / self.gamma
        if not scaled >= 2.0**-20:
            raise ConfigError(f"dp.clip / dp.gamma = {scaled!r} below 2^-20 grid units")
        if self.norm_bound_sq >= MAX_NORM_BOUND_SQ:
            raise ConfigError("dp.clip / dp.gamma too large: the norm bound exceeds 2^30 units")

    @classmethod
    def from_noise_multiplier(
        cls,
        noise_multiplier: float,
        *,
        length: int,
        clip: float,
        gamma: float,
        sites: int,
        min_survivors: int,
        colluding_fraction: float = 0.0,
        beta: float = math.exp(-0.5),
        modulus_bits: int = 64,
    ) -> DpParams:
        """Derive the per-site share from a central noise multiplier ``z`` (module docstring).

        ``sigma = z * clip / (gamma * sqrt(h))``, ``h = min_survivors - floor(f * sites)``:
        the ``h`` honest survivors' shares alone reach the central variance ``(z clip)^2``.

        Raises:
            ConfigError: If no honest survivor is guaranteed or a parameter is out of range.
        """
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if not 1 <= min_survivors <= sites:
            raise ConfigError(f"min_survivors {min_survivors} outside 1..sites={sites}")
        try:
            colluding = colluders(sites, colluding_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if min_survivors <= colluding:
            raise ConfigError(
                f"no honest survivor guaranteed: min_survivors {min_survivors} <= "
                f"{colluding} colluders (floor({colluding_fraction} * {sites}))"
            )
        honest = min_survivors - colluding
        sigma = float(noise_multiplier) * clip / (gamma * math.sqrt(honest))
        dimension, block = rotation_shape(length)
        return cls(dimension, clip, gamma, sigma, beta, modulus_bits, min_survivors, colluding, block)

    @property
    def honest_survivors(self) -> int:
        """Shares the accountant may count: ``min_survivors - colluding_sites`` (>= 1)."""
        return self.min_survivors - self.colluding_sites

    @property
    def scaled_clip(self) -> float:
        """``c' = clip / gamma``: the clip in grid units."""
        return self.clip / self.gamma

    @property
    def norm_bound_sq(self) -> int:
        """``floor(Delta^2)``: every rounded vector has ``sum r_j^2 <= norm_bound_sq``."""
        c, d = self.scaled_clip, float(self.dimension)
        bound = (c + math.sqrt(d)) ** 2
        if self.beta > 0.0:
            slack = math.sqrt(2.0 * math.log(1.0 / self.beta)) * (c + math.sqrt(d) / 2.0)
            bound = min(bound, c * c + d / 4.0 + slack)
        return math.floor(bound)

    @property
    def norm_bound(self) -> float:
        """One site's L2 sensitivity in grid units: ``sqrt(norm_bound_sq)``."""
        return math.sqrt(self.norm_bound_sq)

    @property
    def l1_bound(self) -> int:
        """L1 bound of a rounded vector: ``min(sqrt(d) Delta, Delta^2)`` (integer entries)."""
        return min(math.floor(math.sqrt(self.dimension) * self.norm_bound), self.norm_bound_sq)

    @property
    def blocks(self) -> int:
        """Number of Hadamard blocks ``d / B``."""
        return self.dimension // self.block

    def to_bytes(self) -> bytes:
        """Canonical bytes: tag, u8 mechanism, u8 bits, the shape, u32 min_survivors,
        u32 colluding_sites, then clip, gamma, local_stddev, beta as big-endian IEEE-754
        binary64 bit patterns (u64). The shape: mechanism 1 (one block) ``u8 log2(d)``,
        mechanism 2 ``u8 log2(B), u32 d / B``; one block is always mechanism 1. Validation
        excludes NaN, infinities and -0.0, so each value has exactly one encoding."""
        one_block = self.blocks == 1
        w = Writer().raw(DP_PARAMS_TAG)
        w.u8(MECHANISM_DDG_HADAMARD if one_block else MECHANISM_DDG_BLOCK_HADAMARD).u8(self.modulus_bits)
        w.u8(self.block.bit_length() - 1)
        if not one_block:
            w.u32(self.blocks)
        w.u32(self.min_survivors).u32(self.colluding_sites)
        for value in (self.clip, self.gamma, self.local_stddev, self.beta):
            w.raw(_F64.pack(value))
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> DpParams:
        """Decode :meth:`to_bytes` output strictly.

        Raises:
            DecodeError: Wrong tag or mechanism, truncated or trailing bytes, or values out of
                range (the :class:`ConfigError` is chained).
        """
        what = "dp params"
        r = Reader(data, what=what)
        if r.fixed(len(DP_PARAMS_TAG)) != DP_PARAMS_TAG:
            raise DecodeError(f"{what}: wrong domain tag")
        mechanism = r.u8()
        if mechanism not in (MECHANISM_DDG_HADAMARD, MECHANISM_DDG_BLOCK_HADAMARD):
            raise DecodeError(f"{what}: unknown mechanism {mechanism}")
        bits, log_b = r.u8(), r.u8()
        blocks = r.u32() if mechanism == MECHANISM_DDG_BLOCK_HADAMARD else 1
        survivors, colluding = r.u32(), r.u32()
        clip, gamma, stddev, beta = (_F64.unpack(r.fixed(8))[0] for _ in range(4))
        r.finish()
        if log_b > 30:
            raise DecodeError(f"{what}: block 2^{log_b} exceeds 2^30")
        if mechanism == MECHANISM_DDG_BLOCK_HADAMARD and blocks < 2:
            raise DecodeError(f"{what}: mechanism 2 with {blocks} blocks (one block is mechanism 1)")
        try:
            block = 1 << log_b
            return cls(blocks * block, clip, gamma, stddev, beta, bits, survivors, colluding, block)
        except ConfigError as exc:
            raise DecodeError(f"{what}: {exc}") from exc


# ------------------------------------------------------------------ rotation and clipping


def _fwht(values: FloatVector, block: int) -> FloatVector:
    """Unnormalized fast Walsh-Hadamard transform (Sylvester order) of each block of ``block``
    consecutive values (a power of two dividing ``len(values)``), O(d log B), in place: every
    butterfly pairs values ``h < B`` apart inside a group of ``2h``, and groups never straddle a
    block boundary."""
    h = 1
    while h < block:
        pairs = values.reshape(-1, 2, h)
        low = pairs[:, 0, :].copy()
        pairs[:, 0, :] += pairs[:, 1, :]
        np.subtract(low, pairs[:, 1, :], out=pairs[:, 1, :])
        h *= 2
    return values


def _signs(rotation_seed: bytes, dimension: int) -> FloatVector:
    """The diagonal ``D``: ``dimension`` random +-1 from the PRG keyed by ``rotation_seed``."""
    words = expand(rotation_seed, (dimension + 63) // 64, domain=ROTATION_DOMAIN, dtype=np.uint64)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:dimension]
    return 1.0 - 2.0 * bits.astype(np.float64)


def _check_block(dimension: int, block: int) -> None:
    if dimension < 1 or block < 1 or block & (block - 1) or dimension % block:
        raise ValueError(f"the block {block} must be a power of two dividing the dimension {dimension}")


def rotate(x: npt.ArrayLike, rotation_seed: bytes, dimension: int, block: int | None = None) -> FloatVector:
    """``H_B D pad_d(x) / sqrt(B)`` (``B = block``, default ``d``): an orthogonal map, so
    ``||rotate(x)|| = ||x||``.

    Raises:
        ValueError: If ``x`` is not 1-D or longer than ``dimension``, the block is not a power
            of two dividing ``dimension``, or the seed is not 32 bytes.
    """
    block = dimension if block is None else block
    v = np.asarray(x, dtype=np.float64)
    _check_block(dimension, block)
    if v.ndim != 1 or v.shape[0] > dimension:
        raise ValueError(f"x must be 1-D and at most {dimension} long")
    out = np.zeros(dimension, dtype=np.float64)
    out[: v.shape[0]] = v
    out *= _signs(rotation_seed, dimension)
    _fwht(out, block)
    out *= 1.0 / math.sqrt(block)
    return out


def unrotate(y: npt.ArrayLike, rotation_seed: bytes, length: int, block: int | None = None) -> FloatVector:
    """Inverse of :func:`rotate`: ``unpad_length(D H_B y / sqrt(B))``, ``d = len(y)``."""
    out = np.array(y, dtype=np.float64)
    d = out.shape[0]
    block = d if block is None else block
    if out.ndim != 1:
        raise ValueError("y must be 1-D")
    _check_block(d, block)
    if not 0 <= length <= d:
        raise ValueError(f"length must be in 0..{d}, got {length}")
    _fwht(out, block)
    out *= _signs(rotation_seed, d) * (1.0 / math.sqrt(block))
    return out[:length].copy()


def clip_l2(x: npt.ArrayLike, clip: float) -> tuple[FloatVector, bool]:
    """Scale ``x`` (float64 copy) to L2 norm at most ``clip``; also say whether it was scaled.

    Raises:
        ValueError: If ``x`` is not 1-D or contains NaN or infinite values.
    """
    v = np.array(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"update must be 1-D, got shape {v.shape}")
    if v.size == 0:
        return v, False
    if not np.isfinite(v).all():
        raise ValueError("update contains NaN or infinite values")
    top = float(np.max(np.abs(v)))
    if top == 0.0:
        return v, False
    unit = v / top
    norm = top * math.sqrt(float(np.dot(unit, unit)))  # no overflow for huge finite values
    if norm <= clip:
        return v, False
    v *= clip / norm
    return v, True


# ------------------------------------------------------------------------------- rounding


def conditional_round(
    z: FloatVector, norm_bound_sq: int, source: NoiseSource, *, max_tries: int = MAX_ROUNDING_TRIES
) -> tuple[Int64Vector, int]:
    """Randomized rounding ``floor(z_j) + Bernoulli(frac(z_j))`` (unbiased to within 2^-53),
    repeated until ``sum r_j^2 <= norm_bound_sq`` (KLS Alg. 1); returns ``(r, tries)``.

    Raises:
        RoundingError: If ``max_tries`` tries in a row exceed the bound.
        ValueError: If some ``|z_j| >= 2^52`` (rounding needs the fraction exactly).
    """
    if z.size and not float(np.max(np.abs(z))) < 2.0**52:
        raise ValueError("values to round must have magnitude < 2^52")
    floor = np.floor(z)
    frac = z - floor  # exact for |z| < 2^52
    for tries in range(1, max_tries + 1):
        rounded = floor + (uniform(source, z.shape[0]) < frac)  # integers, exact in float64
        # The float norm (relative error < d 2^-53) screens out int64 overflow; the exact
        # integer norm decides.
        if float(np.dot(rounded, rounded)) < 2.0**61:
            r = rounded.astype(np.int64)
            if int(np.dot(r, r)) <= norm_bound_sq:
                return r, tries
    raise RoundingError(
        f"conditional randomized rounding exceeded the norm bound {max_tries} times in a row: "
        "the input norm is above the clip, or beta is very close to 1"
    )


# ----------------------------------------------------------------------- encode / decode


@dataclass(frozen=True, slots=True)
class EncodedUpdate:
    """One site's encoding before the modular wrap (local facts; never sent as such).

    Attributes:
        values: ``r + noise`` as int64, length ``params.dimension``.
        clipped: Whether the update's norm exceeded the clip.
        rounding_tries: Conditional-rounding tries used (1 almost always).
    """

    values: Int64Vector
    clipped: bool
    rounding_tries: int


def encode_integers(
    update: npt.ArrayLike,
    params: DpParams,
    rotation_seed: bytes,
    noise_source: NoiseSource | None = None,
) -> EncodedUpdate:
    """Clip, rotate, scale, conditionally round and add this site's discrete Gaussian share.

    The rounding draws come first from ``noise_source``, then the noise draws.

    Raises:
        ValueError: If the update is not 1-D, longer than ``params.dimension``, or has NaN
            or infinite values; or ``rotation_seed`` is not 32 bytes.
        RoundingError: See :func:`conditional_round`.
    """
    source = system_noise() if noise_source is None else noise_source
    clipped, was_clipped = clip_l2(update, params.clip)
    z = rotate(clipped, rotation_seed, params.dimension, params.block)
    z *= 1.0 / params.gamma
    rounded, tries = conditional_round(z, params.norm_bound_sq, source)
    rounded += sample_discrete_gaussian(params.local_stddev, params.dimension, source)
    return EncodedUpdate(values=rounded, clipped=was_clipped, rounding_tries=tries)


def wrap(values: Int64Vector, modulus_bits: int) -> UIntVector:
    """Two's-complement residues of int64 ``values`` modulo ``2^modulus_bits`` (uint32/64)."""
    if vector_dtype(modulus_bits) == np.uint32:
        return values.astype(np.uint32)
    return values.view(np.uint64).copy()


def encode(
    update: npt.ArrayLike,
    params: DpParams,
    rotation_seed: bytes,
    noise_source: NoiseSource | None = None,
) -> UIntVector:
    """One site's input to the secure sum: :func:`encode_integers` wrapped modulo ``2^b``.

    The dtype is the secure sum's (:func:`fedseal.protocol.quantize.vector_dtype`): uint32
    for 32 bits, uint64 for 64, so wrapping numpy adds compute the modular sum.
    """
    encoded = encode_integers(update, params, rotation_seed, noise_source)
    return wrap(encoded.values, params.modulus_bits)


def centered(total: npt.NDArray[Any], modulus_bits: int) -> Int64Vector:
    """A sum modulo ``2^b`` (uint32 or uint64) read as integers in ``[-2^(b-1), 2^(b-1))``."""
    needed = vector_dtype(modulus_bits)  # ValueError unless 32 or 64
    if total.dtype not in (np.uint32, np.uint64) or total.dtype.itemsize < needed.itemsize:
        raise ValueError(f"a sum modulo 2^{modulus_bits} cannot be {total.dtype}")
    if modulus_bits == 32:
        return total.astype(np.uint32).view(np.int32).astype(np.int64)
    return total.view(np.int64).copy()


def decode_integers(
    total: Int64Vector, params: DpParams, rotation_seed: bytes, length: int
) -> FloatVector:
    """The float sum from the (centered) integer sum: ``unrotate(gamma * total)[:length]``."""
    if total.shape != (params.dimension,):
        raise ValueError(f"sum must have shape ({params.dimension},), got {total.shape}")
    return unrotate(total.astype(np.float64) * params.gamma, rotation_seed, length, params.block)


def decode(
    total: npt.NDArray[Any], params: DpParams, rotation_seed: bytes, length: int
) -> FloatVector:
    """Coordinator side: the unmasked modular sum -> the noisy float sum of the clipped
    updates (``ValueError`` if the dtype, shape or ``length`` does not fit ``params``)."""
    return decode_integers(centered(total, params.modulus_bits), params, rotation_seed, length)


# ----------------------------------------------------------------------- modular range


def _proxy(params: DpParams, sites: int) -> float:
    """Sub-Gaussian variance proxy of one coordinate of the sum, rounding aside."""
    if not 1 <= sites <= MAX_SITES:
        raise ValueError(f"sites must be in 1..2^20, got {sites}")
    # Signal: a coordinate of H_B D (sum x_i) / (gamma sqrt B) is a Rademacher sum with
    # coefficients of total square at most (n c')^2 / B (all of the sum's norm in its block):
    # (n c')^2/B-sub-Gaussian (Hoeffding).
    # Noise: N_Z(0, sigma^2) is sigma^2-sub-Gaussian (CKS 2020); n independent shares add.
    # Rounding: |r - z| < 1 per site, taken deterministically (conditional rounding is biased).
    return (sites * params.scaled_clip) ** 2 / params.block + sites * params.local_stddev**2


def wrap_probability(params: DpParams, sites: int, modulus_bits: int | None = None) -> float:
    """Upper bound on P(some coordinate of the sum of ``sites`` encodings wraps mod 2^b),
    ``b = modulus_bits`` if given (any ``b >= 2``), else ``params.modulus_bits``.

    Union bound over the ``d`` coordinates of the sub-Gaussian tail (paper Sec. 4.2/4.4,
    TFF ``_heuristic_scale_factor``): ``2 d exp(-(2^(b-1) - n)^2 / (2 v))``, ``v =
    (n c')^2 / B + n sigma^2``, for honest sites whose updates do not depend on the rotation.
    A wrap garbles the sum (utility), never the privacy: the output is post-processing.
    """
    proxy = _proxy(params, sites)
    bits = params.modulus_bits if modulus_bits is None else modulus_bits
    if bits < 2:
        raise ValueError(f"modulus_bits must be >= 2, got {bits}")
    half = 2.0 ** (bits - 1)
    if half <= sites:
        return 1.0
    if params.local_stddev == 0.0 and half > sites * (params.scaled_clip + 1.0):
        return 0.0  # |sum_j| <= n (c' + 1) deterministically
    exponent = -((half - sites) ** 2) / (2.0 * proxy)
    return min(1.0, 2.0 * params.dimension * math.exp(exponent))


def coordinate_reach(params: DpParams, sites: int, failure_probability: float = 2.0**-40) -> float:
    """A bound every coordinate of the centred sum of ``sites`` honest encodings stays within,
    except with probability ``<= failure_probability``: ``n + sqrt(2 v ln(2d/p))`` (the union
    bound of :func:`wrap_probability`)."""
    if not 0.0 < failure_probability < 1.0:
        raise ValueError("failure_probability must be in (0, 1)")
    log_term = math.log(2.0 * params.dimension / failure_probability)
    return sites + math.sqrt(2.0 * _proxy(params, sites) * log_term)


def bits_needed(params: DpParams, sites: int, failure_probability: float = 2.0**-40) -> int:
    """Least ``b`` whose :func:`wrap_probability` bound is ``<= failure_probability``
    (may exceed 64: then no supported modulus suffices; choose a coarser ``gamma``)."""
    reach = coordinate_reach(params, sites, failure_probability)
    return max(2, math.ceil(math.log2(reach)) + 1)  # 2^(b-1) >= reach


def sum_norm_bound(params: DpParams, sites: int, failure_probability: float = 2.0**-40) -> float:
    """A bound on the L2 norm of the centred sum of ``sites`` honest encodings, exceeded with
    probability ``<= failure_probability``: ``n Delta + sqrt(n sigma^2 (d + 2 sqrt(d t) + 2t))``,
    ``t = ln(1/p)``.

    Each rounded vector has ``||r_i|| <= Delta`` exactly (conditional rounding); the sum of
    the ``n`` noise shares has independent coordinates, each ``n sigma^2``-sub-Gaussian (CKS
    2020 Cor. 9: ``N_Z(0, sigma^2)`` is ``sigma^2``-sub-Gaussian), so Hsu, Kakade & Zhang
    2012 (Thm. 1) bound its squared norm by ``n sigma^2 (d + 2 sqrt(d t) + 2t)`` except with
    probability ``e^-t``. Unlike :func:`coordinate_reach` it needs no assumption on the
    updates.
    """
    if not 0.0 < failure_probability < 1.0:
        raise ValueError("failure_probability must be in (0, 1)")
    if not 1 <= sites <= MAX_SITES:
        raise ValueError(f"sites must be in 1..2^20, got {sites}")
    t, d = math.log(1.0 / failure_probability), float(params.dimension)
    noise_sq = sites * params.local_stddev**2 * (d + 2.0 * math.sqrt(d * t) + 2.0 * t)
    return sites * params.norm_bound + math.sqrt(noise_sq)
