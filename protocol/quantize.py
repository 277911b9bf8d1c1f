"""Clip, stochastically round, weight and encode an update into Z_{2^b}.

Encoding of one site's update ``x`` (float vector) with weight ``w`` (example count)::

    c = clip, L = levels, step = c / L
    y = clip(x, -c, c) * L / c                     in [-L, L]
    q = floor(y + u),  u ~ U[0, 1) per element      stochastic rounding: E[q] = y
                                                    (u on a 2^-32 grid: see Quantizer)
    e = (w * q) mod 2^b                             two's complement, uint32 or uint64

Sums of ``e`` over sites are taken with wrapping numpy adds. Because
:func:`fedseal.protocol.config.validate_parameters` guarantees
``n * L * max_weight < 2^(b-1)``, the signed reading of the sum is the exact integer
``sum_i w_i q_i``: no wrap-around can happen.

Error bound (documented, tested): for every coordinate,
``|sum_i w_i q_i * step - sum_i w_i clip(x_i)| < sum_i w_i * step``, so the dequantized
weighted mean differs from the float weighted mean of the *clipped* updates by less than
``step = clip / levels``. Values outside ``[-clip, clip]`` are counted, never silently
clipped: the count is reported in the round result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedseal.crypto.prg import SEED_SIZE, Stream

from .config import QuantizationConfig

__all__ = [
    "CHUNK",
    "ROUNDING_DOMAIN",
    "QuantizedUpdate",
    "Quantizer",
    "dequantize",
    "quantize",
    "signed_sum",
    "vector_dtype",
]

UIntVector = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]


def vector_dtype(modulus_bits: int) -> np.dtype[np.uint32] | np.dtype[np.uint64]:
    """The numpy dtype for arithmetic modulo ``2**modulus_bits`` (32 or 64), little-endian."""
    if modulus_bits == 32:
        return np.dtype("<u4")
    if modulus_bits == 64:
        return np.dtype("<u8")
    raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits}")


@dataclass(frozen=True, slots=True)
class QuantizedUpdate:
    """One site's encoded update.

    Attributes:
        vector: ``w * q mod 2^b`` as uint32 or uint64.
        weight: The weight ``w`` (example count) multiplied in.
        clipped: How many elements were outside ``[-clip, clip]``.
    """

    vector: UIntVector
    weight: int
    clipped: int


# Elements per step of the encoder (and of the fused masked encoding): the float64 / int64
# working buffers (512 KiB each) stay in cache, so the elementwise passes and the mask adds cost
# cache, not memory, bandwidth; per-call overhead favours larger steps (measured: 16 Ki
# elements ~2x slower per element than 64 Ki; 32 Ki..128 Ki within noise on this machine).
CHUNK = 65536
_FRACTION_BITS = 32
_ONE = float(1 << _FRACTION_BITS)
# Round-to-integer by addition: for |z| < 2^51, z + 1.5 * 2^52 is representable only at
# integers; read as int64 its bits are bits(_MAGIC) + rint(z), and bits(_MAGIC) = _MAGIC_HIGH * 2^32.
_MAGIC = 1.5 * 2.0**52
_MAGIC_LIMIT = 2.0**51
_MAGIC_HIGH = 0x43380000
_HIGH_WORD = 1 if sys.byteorder == "little" else 0
ROUNDING_DOMAIN = b"fedseal/v1/stochastic-rounding"


class Quantizer:
    """Streaming encoder: clip, stochastically round and weight one update chunk by chunk.

    ``encode_into`` maps consecutive slices of the update to the same slices of the output;
    the result does not depend on how the vector is cut into chunks (the rounding noise is one
    stream: 32 bytes drawn from ``rng`` once, expanded with the AES-256-CTR PRG of
    :mod:`fedseal.crypto.prg` under :data:`ROUNDING_DOMAIN`, one 32-bit word per element), so
    ``quantize`` and a caller that fuses further per-chunk work (masking, hashing) agree
    bit for bit for the same generator state.

    Rounding, per element: ``y = clip(x * L / c, -L, L)`` in float64, then, in fixed point with
    32 fractional bits, ``z = rint(y * 2^32)`` (int64) and ``q = (z + u) >> 32`` with ``u`` a
    uniform 32-bit word: ``q = floor(z / 2^32) + 1`` with probability ``frac(z / 2^32)`` exactly,
    else ``floor(z / 2^32)``, so
    ``E[q] = z / 2^32``, which is ``y`` whenever ``y`` lies on the ``2^-32`` grid (every float32
    update scaled by a power of two, ``|y| >= 2^-9``) and within ``2^-33`` of it otherwise.
    Values on the integer grid never move.

    Example::

        enc = Quantizer(weight, config, rng)
        for start in range(0, len(x), CHUNK):
            enc.encode_into(x[start : start + CHUNK], out[start : start + CHUNK])
        enc.clipped  # elements outside [-clip, clip] so far
    """

    __slots__ = (
        "_bits",
        "_clipped",
        "_fixed",
        "_hi",
        "_noise",
        "_scale",
        "_weight",
        "_words",
        "_work",
    )

    def __init__(self, weight: int, config: QuantizationConfig, rng: np.random.Generator) -> None:
        """Prepare an encoder for one update.

        Raises:
            ValueError: If ``weight < 1`` (local input from the training code, not a peer's).
        """
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        self._weight = weight
        self._bits = config.modulus_bits
        self._scale = config.levels / config.clip * _ONE
        self._hi = float(config.levels) * _ONE  # exact: levels < 2^31
        # The generator is read once, for a 256-bit noise key; the noise words are then an
        # AES-256-CTR keystream (fedseal.crypto.prg), ~2.5x cheaper than PCG64's raw output.
        self._noise = Stream(rng.bytes(SEED_SIZE), ROUNDING_DOMAIN)
        self._work = np.empty(CHUNK, dtype=np.float64)
        # int64 buffer only for levels >= 2^19, where rounding by addition does not apply.
        self._fixed = np.empty(0 if self._hi < _MAGIC_LIMIT else CHUNK, dtype=np.int64)
        self._words = np.empty(CHUNK, dtype=np.uint32)
        self._clipped = 0

    @property
    def clipped(self) -> int:
        """How many elements encoded so far were outside ``[-clip, clip]``."""
        return self._clipped

    def encode_into(self, x: npt.NDArray[Any], out: UIntVector) -> None:
        """Encode the next slice ``x`` of the update into ``out`` (same length).

        Raises:
            ValueError: If ``x`` contains NaN or infinite values, or the shapes differ.
        """
        count = x.shape[0]
        if x.ndim != 1 or out.shape != (count,):
            raise ValueError("x and out must be 1-D slices of the same length")
        hi = self._hi
        with np.errstate(over="ignore"):  # a huge finite x overflows to inf: clipped below
            self._encode(x, out, count, hi)

    def _encode(self, x: npt.NDArray[Any], out: UIntVector, count: int, hi: float) -> None:
        scale, magic = self._scale, hi < _MAGIC_LIMIT
        offset = _MAGIC_HIGH if magic else 0
        for start in range(0, count, CHUNK):
            end = min(start + CHUNK, count)
            n = end - start
            xs = x[start:end]
            # Rounding is monotonic, so the extremes of z = fl(x * scale) are those of x,
            # scaled: the range check reads the (narrower) input instead of z. NaN fails it.
            lo_val = float(np.minimum.reduce(xs)) * scale
            hi_val = float(np.maximum.reduce(xs)) * scale
            z = self._work[:n]
            np.multiply(xs, scale, out=z, dtype=np.float64)  # not in x's (narrower) dtype
            if not (lo_val >= -hi and hi_val <= hi):
                if not np.isfinite(xs).all():
                    raise ValueError("update contains NaN or infinite values")
                self._clipped += int(np.count_nonzero(z > hi)) + int(np.count_nonzero(z < -hi))
                np.clip(z, -hi, hi, out=z)
            if magic:
                # |z| < 2^51: z + 1.5 * 2^52 lies in [2^52, 2^53), where float64 spacing is 1,
                # so the addition rounds z to the nearest integer (ties to even, as np.rint)
                # and the bits read as int64 are bits(_MAGIC) + rint(z).
                np.add(z, _MAGIC, out=z)
                fixed = z.view(np.int64)
            else:
                np.rint(z, out=z)
                fixed = self._fixed[:n]
                np.copyto(fixed, z, casting="unsafe")  # |z| <= 2^63 - 2^32: exact
            words = self._words[:n]
            self._noise.read_into(words)
            np.add(fixed, words, out=fixed)
            # The high 32-bit word of each int64 is floor(value / 2^32): q plus the magic
            # constant's high word (its low word is zero).
            high = fixed.view(np.int32)[_HIGH_WORD::2]
            # |w * q| <= L * max_weight < 2^(b-1) (validate_parameters); for b = 32 an int32
            # product keeps the same low 32 bits in any case (two's complement).
            target = out[start:end]
            if self._bits == 32:
                signed: npt.NDArray[Any] = target.view(np.int32)
            else:
                signed = target.view(np.int64)
            np.subtract(high, offset, out=signed)
            np.multiply(signed, self._weight, out=signed)


def quantize(
    update: npt.ArrayLike,
    weight: int,
    config: QuantizationConfig,
    rng: np.random.Generator,
) -> QuantizedUpdate:
    """Clip, stochastically round, weight and encode ``update``.

    Args:
        update: Float vector (any float dtype), 1-D.
        weight: Example count, ``>= 1`` (checked against ``max_weight`` by the caller).
        config: Clip / levels / modulus.
        rng: Source of the rounding noise (a passed-in generator keeps tests deterministic).

    Returns:
        The encoded vector, the weight and the clipped-element count.

    Raises:
        ValueError: If the update is not 1-D or contains NaN/inf, or weight < 1
            (local input from the training code, not from a peer).
    """
    x = np.asarray(update)
    if x.ndim != 1:
        raise ValueError(f"update must be 1-D, got shape {x.shape}")
    encoder = Quantizer(weight, config, rng)
    vector: UIntVector = np.empty(x.shape[0], dtype=vector_dtype(config.modulus_bits))
    encoder.encode_into(x, vector)
    return QuantizedUpdate(vector=vector, weight=weight, clipped=encoder.clipped)


def signed_sum(total: UIntVector) -> npt.NDArray[np.int64]:
    """Read a wrapped sum as the signed integers it encodes (two's complement)."""
    if total.dtype == np.uint32:
        return total.view(np.int32).astype(np.int64)
    if total.dtype == np.uint64:
        return total.view(np.int64).copy()
    raise ValueError(f"expected uint32 or uint64, got {total.dtype}")


def dequantize(total: UIntVector, config: QuantizationConfig) -> npt.NDArray[np.float64]:
    """Turn a wrapped sum of encoded updates into the float weighted sum ``sum_i w_i x_i``."""
    if total.dtype == np.uint32:
        signed: npt.NDArray[Any] = total.view(np.int32)
    elif total.dtype == np.uint64:
        signed = total.view(np.int64)
    else:
        raise ValueError(f"expected uint32 or uint64, got {total.dtype}")
    out = signed.astype(np.float64)  # the signed reading of the sum, one pass
    out *= config.step
    return out
