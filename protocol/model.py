"""The model vector: how named model arrays become the one float32 vector a secure round
masks and sums, and the model digest that names a model in round setups, the audit log and
checkpoints. One definition for the coordinator and the sites.

Usage::

    from fedseal.protocol.model import ModelVector, flatten, model_digest, unflatten

    model = ModelVector.of(arrays)      # flattened once, hashed once
    model.flat, model.digest            # float32 vector, SHA-256 (32 bytes)
    new = unflatten(model.flat + mean_delta, model.arrays)

* Order: arrays by name, sorted (:func:`model_order`); each array flattened in C order.
* :func:`model_digest`: SHA-256 of the flat vector's little-endian float32 bytes. It is what a
  signed round setup binds, what the audit log records for every model (run start, round
  result, checkpoint) and what sites check against the log: its bytes must never change.
* :func:`arrays_digest`: SHA-256 over the names, dtypes and shapes of the arrays and their
  model digest. The model digest cannot tell a renamed or reshaped array (the flat vector is
  the same); a checkpoint records both, so it can be matched to the log *and* its layout is
  checked, and the values are hashed once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ModelVector",
    "arrays_digest",
    "flatten",
    "model_digest",
    "model_order",
    "unflatten",
]

_ARRAYS_DIGEST_TAG = b"fedseal/model-arrays/v1\x00"


def model_order(names: Iterable[str]) -> list[str]:
    """The canonical order of a model's arrays in its flat vector: by name."""
    return sorted(names)


def flatten(arrays: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """The model as one float32 vector, arrays in :func:`model_order`."""
    names = model_order(arrays)
    if not names:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(arrays[k], np.float32).ravel() for k in names])


def unflatten(
    flat: npt.NDArray[Any], like: Mapping[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[np.float32]]:
    """``flat`` cut back into float32 arrays with the names and shapes of ``like``.

    Raises:
        ValueError: ``flat`` has another number of values than ``like``.
    """
    total = sum(int(like[k].size) for k in like)
    if flat.shape != (total,):
        raise ValueError(f"a model vector of {flat.shape} values for a model of {total}")
    out, pos = {}, 0
    for k in model_order(like):
        n = int(like[k].size)
        out[k] = flat[pos : pos + n].reshape(like[k].shape).astype(np.float32)
        pos += n
    return out


def model_digest(flat: npt.NDArray[Any]) -> bytes:
    """SHA-256 of ``flat`` as little-endian float32 bytes: the model's digest."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f4").data).digest()


def arrays_digest(arrays: Mapping[str, npt.NDArray[Any]], digest: bytes | None = None) -> bytes:
    """SHA-256 over the arrays' names, dtypes and shapes, in :func:`model_order`, and their
    model digest (``digest``, when the caller has it; else computed here).

    It tells apart what the model digest cannot (a renamed or reshaped array gives the same
    flat vector) without hashing the values a second time.
    """
    h = hashlib.sha256(_ARRAYS_DIGEST_TAG)
    for name in model_order(arrays):
        a = arrays[name]
        head = json.dumps([name, np.dtype(a.dtype).str, list(a.shape)]).encode()
        h.update(len(head).to_bytes(4, "big") + head)
    h.update(digest if digest is not None else model_digest(flatten(arrays)))
    return h.digest()


@dataclass(frozen=True, slots=True, eq=False)
class ModelVector:
    """A model's float32 arrays by name, its flat vector and its digest, computed once.

    Attributes:
        arrays: The arrays by name (float32).
        flat: :func:`flatten` of ``arrays``.
        digest: :func:`model_digest` of ``flat``.
    """

    arrays: Mapping[str, npt.NDArray[np.float32]]
    flat: npt.NDArray[np.float32]
    digest: bytes

    @classmethod
    def of(cls, arrays: Mapping[str, npt.NDArray[Any]]) -> ModelVector:
        """The model vector of ``arrays`` (converted to float32 where they are not)."""
        arrays32 = {k: np.asarray(a, np.float32) for k, a in arrays.items()}
        flat = flatten(arrays32)
        return cls(arrays=arrays32, flat=flat, digest=model_digest(flat))

    @property
    def size(self) -> int:
        """The number of values."""
        return int(self.flat.shape[0])
