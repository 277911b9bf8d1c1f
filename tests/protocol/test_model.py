"""The model vector both sides of a secure round agree on: the flat layout and the one model
digest (what setups bind, the audit log records and checkpoints are matched by)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedseal.protocol.model import (
    ModelVector,
    arrays_digest,
    flatten,
    model_digest,
    model_order,
    unflatten,
)


def test_flattening_orders_arrays_by_name_and_round_trips() -> None:
    arrays = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    flat = flatten(arrays)
    np.testing.assert_array_equal(flat, [1, 1, 1, 1, 0, 1, 2])
    back = unflatten(flat, arrays)
    assert set(back) == {"a", "b"}
    np.testing.assert_array_equal(back["a"], arrays["a"])
    np.testing.assert_array_equal(back["b"], arrays["b"])
    assert model_order(arrays) == ["a", "b"]


def test_the_model_digest_changes_with_any_value() -> None:
    flat = np.zeros(10, np.float32)
    other = flat.copy()
    other[3] = 1e-7
    assert model_digest(flat) != model_digest(other)
    assert len(model_digest(flat)) == 32


def test_the_model_digest_is_sha256_of_the_little_endian_float32_bytes() -> None:
    """The bytes the audit log has always held (sites and fl-audit check them)."""
    flat = np.linspace(-1, 1, 17, dtype=np.float32)
    assert model_digest(flat) == hashlib.sha256(flat.astype("<f4").tobytes()).digest()
    assert model_digest(flat.astype(">f4")) == model_digest(flat)  # byte order is fixed
    assert model_digest(flat.astype(np.float64)) == model_digest(flat)  # as float32


def test_a_model_vector_is_flattened_and_hashed_once_and_agrees_with_the_functions() -> None:
    arrays = {"w": np.full((2, 3), 0.5, np.float64), "b": np.arange(2, dtype=np.float32)}
    model = ModelVector.of(arrays)
    assert all(a.dtype == np.float32 for a in model.arrays.values())
    np.testing.assert_array_equal(model.flat, flatten(arrays))
    assert model.digest == model_digest(flatten(arrays)) and model.size == 8


def test_unflatten_refuses_a_vector_of_another_length() -> None:
    with pytest.raises(ValueError, match="model vector"):
        unflatten(np.zeros(5, np.float32), {"w": np.zeros((2, 3), np.float32)})


def test_the_arrays_digest_sees_what_the_model_digest_cannot() -> None:
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    renamed = {"v": a["w"]}
    reshaped = {"w": a["w"].reshape(3, 2)}
    assert model_digest(flatten(a)) == model_digest(flatten(renamed)) == model_digest(flatten(reshaped))
    assert len({arrays_digest(a), arrays_digest(renamed), arrays_digest(reshaped)}) == 3
