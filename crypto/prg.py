"""Mask PRG: expand a 32-byte seed into uint32/uint64 vectors from an AES-256-CTR keystream.

Example::

    import numpy as np
    from fedseal.crypto import prg

    acc = np.zeros(1_000_000, dtype=np.uint32)
    prg.add_mask_into(acc, seed, domain=b"pairwise|run-7|round-3")              # acc += mask
    prg.add_mask_into(acc, seed, domain=b"pairwise|run-7|round-3", negate=True)  # acc -= mask
    assert not acc.any()

    # Many masks at once, chunk by chunk (each chunk of acc stays in cache for all of them):
    prg.add_masks_into(acc, [prg.Mask(seed_a, b"self"), prg.Mask(seed_b, b"pair", negate=True)])

For each ``(seed, domain)`` the AES-256 key is
``SHA-256(b"fedseal/v1/prg\\x00" || u32be(len(domain)) || domain || seed)`` and the 128-bit
initial counter block is zero (NIST SP 800-38A CTR, the whole block incremented big-endian);
the keystream bytes are read as little-endian words. AES-256-CTR rather than ChaCha20
(DESIGN.md §5 allows either): with AES-NI/VAES it runs about 2x faster here, and masks are
the protocol's largest cost. Distinct
``(seed, domain)`` pairs therefore give independent streams (distinct keys), and a key is used
for exactly one stream. The keystream is written straight into the output array with
``update_into`` in fixed-size chunks: no per-element Python work and no full-size temporaries.

Adding many masks into one vector (a site adds 1 + k of them, the coordinator removes one per
survivor plus the dropped sites' pairwise ones) is done chunk-major by :class:`MaskSum`: all
keystreams advance together, and each chunk of the target is read and written once while it is
in cache, instead of one full pass over the vector per mask.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = [
    "SEED_SIZE",
    "Mask",
    "MaskSum",
    "Stream",
    "add_mask_into",
    "add_masks_into",
    "derive_stream_key",
    "expand",
]

SEED_SIZE = 32
_TAG = b"fedseal/v1/prg\x00"
_COUNTER0 = bytes(16)
CHUNK_BYTES = 128 * 1024
_ZEROS = bytes(CHUNK_BYTES)
# A 128-bit counter never wraps in practice; cap streams at 2**36 bytes (64 GiB) per call anyway.
_MAX_STREAM_BYTES = 1 << 36
_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64))

UIntArray = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]


def derive_stream_key(seed: bytes, domain: bytes) -> bytes:
    """Return the 32-byte AES-256 key for the stream ``(seed, domain)``.

    Raises:
        ValueError: If ``seed`` is not 32 bytes or ``domain`` is empty.
    """
    if len(seed) != SEED_SIZE:
        raise ValueError(f"PRG seed must be {SEED_SIZE} bytes")
    if not domain:
        raise ValueError("PRG domain must be non-empty")
    h = hashlib.sha256(_TAG)
    h.update(struct.pack(">I", len(domain)))
    h.update(domain)
    h.update(seed)
    return h.digest()


def _keystream(seed: bytes, domain: bytes) -> CipherContext:
    key = derive_stream_key(seed, domain)
    return Cipher(algorithms.AES(key), modes.CTR(_COUNTER0)).encryptor()


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    dt: np.dtype[Any] = np.dtype(dtype)
    if dt not in _DTYPES:
        raise TypeError("PRG output dtype must be uint32 or uint64")
    return dt


def _check_vector(arr: npt.NDArray[Any], name: str) -> None:
    if arr.ndim != 1 or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be a writeable, C-contiguous 1-D array")


def _check_length(nbytes: int) -> None:
    if nbytes > _MAX_STREAM_BYTES:
        raise ValueError("PRG output exceeds the 64 GiB per-stream limit")


@overload
def expand(
    seed: bytes,
    count: int,
    *,
    domain: bytes,
    dtype: type[np.uint32] = ...,
    out: npt.NDArray[np.uint32] | None = None,
) -> npt.NDArray[np.uint32]: ...


@overload
def expand(
    seed: bytes,
    count: int,
    *,
    domain: bytes,
    dtype: type[np.uint64],
    out: npt.NDArray[np.uint64] | None = None,
) -> npt.NDArray[np.uint64]: ...


@overload
def expand(
    seed: bytes,
    count: int,
    *,
    domain: bytes,
    dtype: np.dtype[Any],
    out: UIntArray | None = None,
) -> UIntArray: ...


def expand(
    seed: bytes,
    count: int,
    *,
    domain: bytes,
    dtype: type[np.uint32] | type[np.uint64] | np.dtype[Any] = np.uint32,
    out: UIntArray | None = None,
) -> UIntArray:
    """Expand ``(seed, domain)`` into ``count`` uniformly random unsigned integers.

    Args:
        seed: 32-byte seed.
        count: Number of values.
        domain: Non-empty domain-separation label (purpose, run, round, ...).
        dtype: ``np.uint32`` or ``np.uint64``.
        out: Optional preallocated, C-contiguous 1-D array of ``count`` values of ``dtype``;
            it is filled and returned.

    Returns:
        The ``count`` values (``out`` if given).

    Raises:
        ValueError: If the seed is not 32 bytes, the domain is empty, ``count`` is negative or
            too large, or ``out`` has the wrong shape or layout.
        TypeError: If ``dtype`` (or ``out.dtype``) is not uint32/uint64.
    """
    dt = _check_dtype(dtype)
    if count < 0:
        raise ValueError("count must be non-negative")
    if out is None:
        out = np.empty(count, dtype=dt)
    else:
        _check_vector(out, "out")
        if out.dtype != dt or out.shape[0] != count:
            raise ValueError("out must have shape (count,) and the requested dtype")
    nbytes = count * dt.itemsize
    _check_length(nbytes)
    enc = _keystream(seed, domain)
    view = out.data.cast("B")
    zeros = memoryview(_ZEROS)
    for start in range(0, nbytes, CHUNK_BYTES):
        end = min(start + CHUNK_BYTES, nbytes)
        enc.update_into(zeros[: end - start], view[start:end])
    if sys.byteorder == "big":
        out.byteswap(inplace=True)
    return out


def add_mask_into(acc: UIntArray, seed: bytes, *, domain: bytes, negate: bool = False) -> None:
    """Add (or subtract) the mask ``expand(seed, len(acc), domain=domain)`` into ``acc``.

    Arithmetic wraps modulo 2**32 or 2**64 (the dtype of ``acc``). Works chunk by chunk with a
    small scratch buffer, so no temporary as large as ``acc`` is made.

    Raises:
        ValueError: If the seed is not 32 bytes, the domain is empty, or ``acc`` is not a
            writeable, C-contiguous 1-D array.
        TypeError: If ``acc`` is not uint32/uint64.
    """
    _check_dtype(acc.dtype)
    _check_vector(acc, "acc")
    MaskSum(acc.dtype, [Mask(seed, domain, negate)]).apply_into(acc)


class Stream:
    """One ``(seed, domain)`` stream read incrementally: consecutive ``read_into`` calls fill
    consecutive pieces of ``expand(seed, total, domain=domain)``.

    Example::

        stream = Stream(seed, b"noise")
        stream.read_into(first)   # == expand(seed, len(first) + len(second), ...)[: len(first)]
        stream.read_into(second)
    """

    __slots__ = ("_enc",)

    def __init__(self, seed: bytes, domain: bytes) -> None:
        """Derive the stream's key.

        Raises:
            ValueError: If ``seed`` is not 32 bytes or ``domain`` is empty.
        """
        self._enc = _keystream(seed, domain)

    def read_into(self, out: UIntArray) -> None:
        """Overwrite ``out`` with the stream's next ``len(out)`` values.

        Raises:
            ValueError: If ``out`` is not a writeable, C-contiguous 1-D array.
            TypeError: If ``out`` is not uint32/uint64.
        """
        dt = _check_dtype(out.dtype)
        _check_vector(out, "out")
        nbytes = out.shape[0] * dt.itemsize
        _check_length(nbytes)
        view = out.data.cast("B")
        zeros = memoryview(_ZEROS)
        for start in range(0, nbytes, CHUNK_BYTES):
            end = min(start + CHUNK_BYTES, nbytes)
            self._enc.update_into(zeros[: end - start], view[start:end])
        if sys.byteorder == "big":
            out.byteswap(inplace=True)


@dataclass(frozen=True, slots=True)
class Mask:
    """One mask stream to add (or, with ``negate``, subtract): ``expand(seed, n, domain=domain)``.

    Attributes:
        seed: 32-byte seed.
        domain: Non-empty domain-separation label.
        negate: Subtract the stream instead of adding it.
    """

    seed: bytes
    domain: bytes
    negate: bool = False


class MaskSum:
    """Several mask streams applied together, chunk by chunk, to consecutive slices of a vector.

    ``apply_into`` adds the *next* ``len(chunk)`` values of every stream (signed) into
    ``chunk``; calling it on consecutive slices ``acc[0:a], acc[a:b], ...`` is exactly
    ``add_mask_into`` of every mask over ``acc``. The caller can interleave other per-chunk work
    (encoding before, hashing after) so the chunk is touched while it is in cache.

    Example::

        masks = MaskSum(np.uint32, [Mask(seed_a, b"self"), Mask(seed_b, b"pair", negate=True)])
        for start in range(0, len(acc), 32768):
            masks.apply_into(acc[start : start + 32768])
    """

    __slots__ = ("_dtype", "_scratch", "_streams")

    def __init__(
        self, dtype: type[np.uint32] | type[np.uint64] | np.dtype[Any], masks: Iterable[Mask]
    ) -> None:
        """Derive one keystream per mask.

        Raises:
            ValueError: If a seed is not 32 bytes or a domain is empty.
            TypeError: If ``dtype`` is not uint32/uint64.
        """
        self._dtype = _check_dtype(dtype)
        self._streams = [(_keystream(m.seed, m.domain), m.negate) for m in masks]
        self._scratch = np.empty(CHUNK_BYTES // self._dtype.itemsize, dtype=self._dtype)

    def apply_into(self, chunk: UIntArray) -> None:
        """Add the next ``len(chunk)`` values of every stream (subtract negated ones), wrapping.

        Raises:
            ValueError: If ``chunk`` is not a writeable, C-contiguous 1-D array.
            TypeError: If ``chunk`` does not have this sum's dtype.
        """
        if chunk.dtype != self._dtype:
            raise TypeError("chunk dtype differs from the MaskSum's dtype")
        _check_vector(chunk, "chunk")
        count = chunk.shape[0]
        _check_length(count * self._dtype.itemsize)
        step = self._scratch.shape[0]
        scratch_view = self._scratch.data.cast("B")
        zeros = memoryview(_ZEROS)
        for start in range(0, count, step):
            end = min(start + step, count)
            n = end - start
            nbytes = n * self._dtype.itemsize
            target = chunk[start:end]
            part = self._scratch[:n]
            for enc, negate in self._streams:
                enc.update_into(zeros[:nbytes], scratch_view[:nbytes])
                if sys.byteorder == "big":
                    part.byteswap(inplace=True)
                if negate:
                    np.subtract(target, part, out=target)
                else:
                    np.add(target, part, out=target)


def add_masks_into(acc: UIntArray, masks: Iterable[Mask]) -> None:
    """Add every mask in ``masks`` into ``acc`` (subtract the negated ones), wrapping.

    Same result as one :func:`add_mask_into` per mask, in one chunk-major pass over ``acc``.

    Raises:
        ValueError: If a seed is not 32 bytes, a domain is empty, or ``acc`` is not a
            writeable, C-contiguous 1-D array.
        TypeError: If ``acc`` is not uint32/uint64.
    """
    _check_vector(acc, "acc")
    MaskSum(acc.dtype, masks).apply_into(acc)
