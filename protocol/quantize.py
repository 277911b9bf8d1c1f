"""Clip, stochastically round, weight and encode an update into Z_{2^b}.

Encoding of one site's update ``x`` (float vector) with weight ``w`` (example count)::

    c = clip, L = levels, step = c / L
    y = clip(x, -c, c) * L / c                     in [-L, L]
    q = floor(y + u),  u ~ U[0, 1) per element      stochastic rounding: E[q] = y
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

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .config import QuantizationConfig

__all__ = ["QuantizedUpdate", "dequantize", "quantize", "signed_sum", "vector_dtype"]

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
    if weight < 1:
        raise ValueError(f"weight must be >= 1, got {weight}")
    levels = config.levels
    # One float64 working buffer: y = x * L / c, clipped to [-L, L] (same as clipping x to
    # [-c, c] first, up to the last bit of the scaling).
    y = np.multiply(x, levels / config.clip, dtype=np.float64)
    if not np.isfinite(np.add.reduce(y)) and not np.isfinite(y).all():
        raise ValueError("update contains NaN or infinite values")
    clipped = int(np.count_nonzero(y > levels)) + int(np.count_nonzero(y < -levels))
    np.clip(y, -levels, levels, out=y)
    noise = rng.random(y.shape[0])
    y += noise
    np.floor(y, out=y)
    # floor(y + u) with y in [-L, L] and u in [0, 1) lies in [-L, L]; guard the edge y = L.
    np.minimum(y, levels, out=y)
    vector: UIntVector
    if config.modulus_bits == 32:
        # |w * q| <= L * max_weight < 2^31 (validate_parameters): exact in float64 and int32.
        y *= weight
        vector = y.astype(np.int32).view(np.uint32)
    else:
        q = y.astype(np.int64)
        q *= weight
        vector = q.view(np.uint64)
    return QuantizedUpdate(vector=vector, weight=weight, clipped=clipped)


def signed_sum(total: UIntVector) -> npt.NDArray[np.int64]:
    """Read a wrapped sum as the signed integers it encodes (two's complement)."""
    if total.dtype == np.uint32:
        return total.view(np.int32).astype(np.int64)
    if total.dtype == np.uint64:
        return total.view(np.int64).copy()
    raise ValueError(f"expected uint32 or uint64, got {total.dtype}")


def dequantize(total: UIntVector, config: QuantizationConfig) -> npt.NDArray[np.float64]:
    """Turn a wrapped sum of encoded updates into the float weighted sum ``sum_i w_i x_i``."""
    return signed_sum(total).astype(np.float64) * config.step
