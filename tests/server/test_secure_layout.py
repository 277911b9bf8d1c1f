"""The flat model layout and digest both sides of a secure round agree on."""

from __future__ import annotations

import numpy as np

from fedseal.server.flower_app import flat_digest, flat_model, unflat_model


def test_flattening_orders_arrays_by_name_and_round_trips() -> None:
    arrays = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    flat = flat_model(arrays)
    np.testing.assert_array_equal(flat, [1, 1, 1, 1, 0, 1, 2])
    back = unflat_model(flat, arrays)
    assert set(back) == {"a", "b"}
    np.testing.assert_array_equal(back["a"], arrays["a"])
    np.testing.assert_array_equal(back["b"], arrays["b"])


def test_the_model_digest_changes_with_any_value() -> None:
    flat = np.zeros(10, np.float32)
    other = flat.copy()
    other[3] = 1e-7
    assert flat_digest(flat) != flat_digest(other)
    assert len(flat_digest(flat)) == 32
