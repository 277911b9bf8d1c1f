"""The site ClientApp's array and model conversions: same bytes and values as the plain
Flower / numpy paths they replace (fewer copies, no other behaviour)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from flwr.app import Array
from torch import nn

from fedseal.client.flower_app import array_to_numpy, model_delta, model_flat, numpy_to_array
from fedseal.client.models import build_model, load_numpy_state_dict, state_dict_to_numpy
from fedseal.protocol.model import flatten, model_digest


def _old_flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return flatten(weights)


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.arange(7, dtype=np.uint32),
    np.array(5, dtype=np.int64),
    np.zeros((0, 3), np.float32),
    np.arange(6, dtype=">i4"),
]


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}-{a.shape}")
def test_numpy_to_array_writes_the_same_npy_bytes_as_flowers_array(arr: np.ndarray) -> None:
    ours, flowers = numpy_to_array(arr), Array(np.ascontiguousarray(arr))
    assert ours.data == flowers.data
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}-{a.shape}")
def test_array_to_numpy_reads_back_exactly_what_flowers_numpy_reads(arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)  # keeps Fortran order, unlike Array(ndarray)
    array = Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype="numpy.ndarray", data=buf.getvalue())
    ours, flowers = array_to_numpy(array), array.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    np.testing.assert_array_equal(ours, flowers)


def test_a_truncated_npy_buffer_is_refused_with_a_value_error() -> None:
    data = Array(np.arange(10, dtype=np.float32)).data
    with pytest.raises(ValueError, match="declares"):
        array_to_numpy(Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=data[:-4]))


def test_a_pickled_object_array_is_never_unpickled() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    array = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(ValueError):
        array_to_numpy(array)


def test_loading_read_only_views_sets_the_model_weights_and_keeps_them_writable() -> None:
    model = build_model("mlp", seed=1)
    source = build_model("mlp", seed=2)
    views = {k: array_to_numpy(numpy_to_array(v)) for k, v in state_dict_to_numpy(source).items()}
    assert not any(v.flags.writeable for v in views.values())
    load_numpy_state_dict(model, views)
    for k, v in state_dict_to_numpy(model).items():
        np.testing.assert_array_equal(v, views[k])
    with torch.no_grad():  # the model owns its storage, not the message's buffer
        next(model.parameters()).add_(1.0)
    assert not np.array_equal(state_dict_to_numpy(model)[next(iter(views))], next(iter(views.values())))


def test_a_wrong_shape_is_refused_before_any_weight_changes() -> None:
    model = build_model("mlp", seed=1)
    before = state_dict_to_numpy(model)
    bad = {k: np.zeros(v.shape, np.float32) for k, v in before.items()}
    last = sorted(bad)[-1]
    bad[last] = np.zeros(bad[last].size + 1, np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_numpy_state_dict(model, bad)
    for k, v in state_dict_to_numpy(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_model_flat_and_digest_equal_the_old_flatten_and_hash() -> None:
    model = build_model("mlp", seed=3)
    old = _old_flat(state_dict_to_numpy(model))
    new = model_flat(model)
    assert new.dtype == np.float32
    np.testing.assert_array_equal(new, old)
    assert model_digest(new) == hashlib.sha256(old.astype("<f4").tobytes()).digest()


def test_model_delta_equals_the_old_float64_difference_bit_for_bit() -> None:
    model = build_model("mlp", seed=4)
    base = model_flat(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 1e-3)
    old = _old_flat(state_dict_to_numpy(model)).astype(np.float64) - base
    new = model_delta(model, base)
    assert new.dtype == np.float64
    assert new.tobytes() == old.tobytes()


def test_a_model_of_another_size_than_the_global_vector_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="more values"):
        model_delta(model, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="fewer values"):
        model_delta(model, np.zeros(9, np.float32))
