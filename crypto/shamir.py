"""Shamir t-of-n secret sharing of byte strings over GF(p), p = 2**31 - 1, vectorised with numpy.

Example::

    from fedseal.crypto import shamir

    shares = shamir.split(mask_seed, threshold=3, num_shares=5)   # 32-byte secret
    blobs = [s.to_bytes() for s in shares]                        # send one to each peer
    back = [shamir.Share.from_bytes(b) for b in blobs[1:4]]
    assert shamir.combine(back, threshold=3, secret_length=32) == mask_seed

Field and encoding. The field is GF(p) for the Mersenne prime p = 2**31 - 1, so every product of
two elements fits in 62 bits and numpy's uint64 arithmetic is exact. A secret is split into
big-endian 16-bit limbs (the last byte padded with a zero byte when the length is odd); each limb
is the constant term of its own random polynomial of degree ``threshold - 1``, whose other
coefficients are uniform in ``[0, p)`` (31-bit draws from ``randbytes``, rejecting the single
value ``2**31 - 1``). Share ``i`` (``1 <= i <= num_shares``) holds the evaluations at ``x = i``
of all limb polynomials, computed by Horner's rule for all shares and limbs at once.

Reconstruction (:func:`combine`) interpolates at 0 from the first ``threshold`` shares with
Lagrange weights; any further shares are checked to lie on the same polynomials. Any
``threshold - 1`` shares are consistent with every possible secret (perfect secrecy), so they
reveal nothing about it; :func:`combine` refuses them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import ShareError

__all__ = ["MAX_SHARES", "PRIME", "Share", "combine", "split", "split_many"]

PRIME = (1 << 31) - 1
"""The field modulus p = 2**31 - 1."""
MAX_SHARES = 0xFFFF
"""Largest number of shares (and largest share index)."""
_MAX_LIMBS = 1 << 20
_HEADER = struct.Struct(">II")  # index, number of field elements
_P = np.uint64(PRIME)

U32Array = npt.NDArray[np.uint32]
U64Array = npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True, eq=False)
class Share:
    """One participant's share: its index and one field element per 16-bit limb of the secret.

    ``values`` is stored as a read-only copy. Two shares are equal when index and values are.

    Raises:
        ShareError: On construction, if the index is not in ``[1, MAX_SHARES]`` or a value is not
            a field element (``>= p``), or ``values`` is not 1-D.
    """

    index: int
    values: U32Array

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or not 1 <= self.index <= MAX_SHARES:
            raise ShareError("share index out of range", reason="out-of-range")
        given = np.asarray(self.values)
        if given.ndim != 1 or given.shape[0] > _MAX_LIMBS or given.dtype.kind not in "ui":
            raise ShareError("share values must be a 1-D integer vector", reason="encoding")
        if given.size and (int(given.min()) < 0 or int(given.max()) >= PRIME):
            raise ShareError(
                "share value is not a field element", reason="out-of-range", index=self.index
            )
        values = given.astype(np.uint32, copy=True)
        values.flags.writeable = False
        object.__setattr__(self, "values", values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Share):
            return NotImplemented
        return self.index == other.index and np.array_equal(self.values, other.values)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # never print share material
        return f"Share(index={self.index}, len={self.values.shape[0]})"

    def to_bytes(self) -> bytes:
        """Encode as ``u32be(index) || u32be(len(values)) || values as u32be``."""
        return _HEADER.pack(self.index, self.values.shape[0]) + self.values.astype(">u4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Decode the output of :meth:`to_bytes` strictly.

        Raises:
            ShareError: If the length does not match the header, the index is out of range, or
                a value is not a field element.
        """
        if len(data) < _HEADER.size:
            raise ShareError("share encoding too short", reason="encoding")
        index, count = _HEADER.unpack_from(data)
        if count > _MAX_LIMBS or len(data) != _HEADER.size + 4 * count:
            raise ShareError("share encoding has the wrong length", reason="encoding")
        values = np.frombuffer(data, dtype=">u4", count=count, offset=_HEADER.size)
        return cls(index, values.astype(np.uint32))


def _limbs(secret: bytes) -> U64Array:
    padded = bytes(secret) + b"\x00" * (len(secret) & 1)
    return np.frombuffer(padded, dtype=">u2").astype(np.uint64)


def _random_field_elements(count: int, randbytes: Callable[[int], bytes]) -> U64Array:
    """``count`` uniform elements of [0, p): 31-bit draws, rejecting the one value 2**31 - 1."""
    out = np.empty(count, dtype=np.uint64)
    todo = np.arange(count)
    while todo.size:
        raw = randbytes(4 * todo.size)
        if len(raw) != 4 * todo.size:
            raise ValueError("randbytes returned the wrong number of bytes")
        draws = np.frombuffer(raw, dtype="<u4").astype(np.uint64) & np.uint64(0x7FFFFFFF)
        out[todo] = draws
        todo = todo[draws == _P]
    return out


def _check_params(threshold: int, num_shares: int) -> None:
    if not 1 <= threshold <= num_shares <= MAX_SHARES:
        raise ValueError(f"need 1 <= threshold <= num_shares <= {MAX_SHARES}")


def _split_limbs(
    limbs: U64Array, threshold: int, num_shares: int, randbytes: Callable[[int], bytes]
) -> U64Array:
    """Evaluate random polynomials with constant terms ``limbs`` at x = 1..n -> (n, limbs)."""
    width = limbs.shape[0]
    coeffs = _random_field_elements((threshold - 1) * width, randbytes).reshape(
        threshold - 1, width
    )
    xs = np.arange(1, num_shares + 1, dtype=np.uint64)[:, None]
    # Horner: ((c_{t-1} x + c_{t-2}) x + ... ) x + c_0; every product < 2**31 * 2**16.
    acc = np.zeros((num_shares, width), dtype=np.uint64)
    for row in coeffs[::-1]:
        acc += row
        acc *= xs
        acc %= _P
    acc += limbs
    acc %= _P
    return acc


def split(
    secret: bytes,
    threshold: int,
    num_shares: int,
    *,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> list[Share]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which reconstruct it.

    Args:
        secret: The secret bytes (e.g. a 32-byte seed or private scalar).
        threshold: Number of shares needed to reconstruct (``t``).
        num_shares: Number of shares to make (``n``); share indices are ``1..n``.
        randbytes: Source of random bytes (a CSPRNG; injectable for deterministic tests).

    Returns:
        The shares, ``result[i].index == i + 1``.

    Raises:
        ValueError: Unless ``1 <= threshold <= num_shares <= MAX_SHARES``.
    """
    return split_many([secret], threshold, num_shares, randbytes=randbytes)[0]


def split_many(
    secrets: Sequence[bytes],
    threshold: int,
    num_shares: int,
    *,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> list[list[Share]]:
    """Split many secrets at once (one vectorised pass); ``result[i]`` are the shares of ``secrets[i]``.

    Raises:
        ValueError: Unless ``1 <= threshold <= num_shares <= MAX_SHARES``.
    """
    _check_params(threshold, num_shares)
    if not secrets:
        return []
    parts = [_limbs(s) for s in secrets]
    bounds = np.cumsum([0] + [p.shape[0] for p in parts])
    evals = _split_limbs(np.concatenate(parts), threshold, num_shares, randbytes).astype(np.uint32)
    evals.flags.writeable = False  # the shares below are read-only views of it
    return [
        [_valid_share(i + 1, evals[i, lo:hi]) for i in range(num_shares)]
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]


def _valid_share(index: int, values: U32Array) -> Share:
    """Build a Share from values known to be valid (fresh, read-only field elements)."""
    share = object.__new__(Share)
    object.__setattr__(share, "index", index)
    object.__setattr__(share, "values", values)
    return share


def _inv_mod(a: U64Array) -> U64Array:
    """Elementwise inverse mod p of non-zero elements (Fermat: a**(p-2)), vectorised."""
    result = np.ones_like(a)
    base = a % _P
    e = PRIME - 2
    while e:
        if e & 1:
            result = result * base % _P
        base = base * base % _P
        e >>= 1
    return result


def _prod_mod(a: U64Array) -> U64Array:
    """Product mod p along the last axis."""
    acc = np.ones(a.shape[:-1], dtype=np.uint64)
    for j in range(a.shape[-1]):
        acc = acc * a[..., j] % _P
    return acc


def lagrange_weights(xs: U64Array, zs: U64Array) -> U64Array:
    """Weights W (len(zs), len(xs)) with f(z_k) = sum_i W[k, i] f(x_i) for deg f < len(xs).

    Requires distinct ``xs`` and ``zs`` disjoint from ``xs`` (all in [0, p)).
    W[k, i] = prod_j (z_k - x_j) / ((z_k - x_i) * prod_{j != i} (x_i - x_j)).
    """
    t = xs.shape[0]
    diff = (xs[:, None] + _P - xs[None, :]) % _P  # x_i - x_j
    diff[np.arange(t), np.arange(t)] = 1
    denom = _prod_mod(diff)  # prod_{j != i} (x_i - x_j)
    zx = (zs[:, None] + _P - xs[None, :]) % _P  # z_k - x_j, never 0
    full = _prod_mod(zx)  # prod_j (z_k - x_j)
    inv = _inv_mod(zx * denom[None, :] % _P)
    result: U64Array = full[:, None] * inv % _P
    return result


def apply_weights(weights: U64Array, ys: U64Array) -> U64Array:
    """(weights @ ys) mod p without overflow: ys split into 16-bit halves (t < 2**17)."""
    lo = ys & np.uint64(0xFFFF)
    hi = ys >> np.uint64(16)
    a_lo = (weights @ lo) % _P
    a_hi = (weights @ hi) % _P
    result: U64Array = (a_hi * np.uint64(1 << 16) + a_lo) % _P
    return result


def combine(shares: Sequence[Share], threshold: int, secret_length: int) -> bytes:
    """Reconstruct a secret of ``secret_length`` bytes from at least ``threshold`` shares.

    Steps: (1) reject too few shares, duplicate indices and shares of the wrong length;
    (2) interpolate at 0 from the first ``threshold`` shares; (3) check that every further share
    lies on the same polynomials; (4) check every limb is 16 bits and the padding byte is zero.

    Raises:
        ShareError: On fewer than ``threshold`` shares (``reason="too-few-shares"``), duplicate
            indices (``"duplicate-index"``), shares of the wrong length (``"encoding"``),
            out-of-range reconstructed limbs (``"out-of-range"``) or extra shares that disagree
            (``"inconsistent"``).
        ValueError: If ``threshold < 1`` or ``secret_length < 0``.
    """
    if threshold < 1 or secret_length < 0:
        raise ValueError("threshold must be >= 1 and secret_length >= 0")
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares given, {threshold} needed", reason="too-few-shares")
    indices = [s.index for s in shares]
    if len(set(indices)) != len(indices):
        raise ShareError("duplicate share indices", reason="duplicate-index")
    width = (secret_length + 1) // 2
    for s in shares:
        if s.values.shape[0] != width:
            raise ShareError(
                "share length does not match the secret length", reason="encoding", index=s.index
            )
    xs = np.array(indices, dtype=np.uint64)
    ys = np.stack([s.values for s in shares]).astype(np.uint64)
    base_x, base_y = xs[:threshold], ys[:threshold]

    secret_limbs = apply_weights(lagrange_weights(base_x, np.zeros(1, np.uint64)), base_y)[0]
    if len(shares) > threshold:
        predicted = apply_weights(lagrange_weights(base_x, xs[threshold:]), base_y)
        bad = np.flatnonzero((predicted != ys[threshold:]).any(axis=1))
        if bad.size:
            raise ShareError(
                "shares are inconsistent",
                reason="inconsistent",
                index=int(xs[threshold + int(bad[0])]),
            )
    if width and int(secret_limbs.max()) > 0xFFFF:
        raise ShareError("reconstructed value out of range", reason="out-of-range")
    raw: bytes = secret_limbs.astype(">u2").tobytes()
    if secret_length & 1 and raw[-1] != 0:
        raise ShareError("reconstructed padding is not zero", reason="out-of-range")
    return raw[:secret_length]
