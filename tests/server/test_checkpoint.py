"""Checkpoints: committed rounds survive, tampering and half-written files are detected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseal.protocol.model import ModelVector, arrays_digest, flatten, model_digest
from fedseal.server.checkpoint import CheckpointError, CheckpointStore, RunState


def _arrays(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), v, np.float32), "b": np.arange(4, dtype=np.float32)}


def _digest(arrays: dict[str, np.ndarray]) -> bytes:
    """The model digest the audit log records for ``arrays``."""
    return model_digest(flatten(arrays))


def test_the_latest_committed_round_is_loaded_back_exactly(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for rnd in (0, 1, 2):
        a = _arrays(rnd)
        store.commit(RunState("r", rnd, _digest(a).hex(), history=({"round": rnd},)), a)
    latest = store.latest()
    assert latest is not None
    state, arrays = latest
    assert state.round == 2 and state.run_id == "r"
    np.testing.assert_array_equal(arrays["w"], _arrays(2)["w"])
    assert state.history == ({"round": 2},)


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "absent").latest() is None


def test_a_model_file_changed_after_commit_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    a = _arrays(1)
    path = store.commit(RunState("r", 1, _digest(a).hex()), a).model_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        store.latest()


def test_a_model_without_its_state_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    a = _arrays(1)
    store.commit(RunState("r", 1, _digest(a).hex()), a)
    b = _arrays(2)
    store.commit(RunState("r", 2, _digest(b).hex()), b)
    store.state_path(2).unlink()  # killed between writing the model and the state
    latest = store.latest()
    assert latest is not None and latest[0].round == 1


def test_the_arrays_digest_depends_on_names_shapes_and_values() -> None:
    a = _arrays(1)
    assert arrays_digest(a) == arrays_digest(dict(reversed(list(a.items()))))
    assert arrays_digest(a) != arrays_digest({"w2": a["w"], "b": a["b"]})
    assert arrays_digest(a) != arrays_digest({"w": a["w"].reshape(2, 3), "b": a["b"]})
    assert arrays_digest(a) != arrays_digest(_arrays(1.5))


def test_a_checkpoint_records_the_model_digest_of_the_audit_log_and_the_files_sha256(tmp_path: Path) -> None:
    import hashlib
    import json

    store = CheckpointStore(tmp_path)
    a = _arrays(2)
    model = ModelVector.of(a)
    saved = store.commit(RunState("r", 1, model.digest.hex()), a)
    doc = json.loads(store.state_path(1).read_text())
    assert doc["model_digest"] == model.digest.hex() == _digest(a).hex()
    assert doc["arrays_digest"] == arrays_digest(a).hex()
    assert saved.file_sha256 == hashlib.sha256(saved.model_path.read_bytes()).digest()
    assert doc["file_sha256"] == saved.file_sha256.hex()


def test_a_checkpoint_whose_state_names_another_model_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    a = _arrays(1)
    store.commit(RunState("r", 1, _digest(_arrays(5)).hex()), a)
    with pytest.raises(CheckpointError, match="recorded model digest"):
        store.latest()


def test_no_pickle_is_written(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    a = _arrays(1)
    store.commit(RunState("r", 1, _digest(a).hex()), a)
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert suffixes <= {".safetensors", ".json", ""}


def test_a_state_update_keeps_the_model_digests_and_refuses_another_model(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    arrays = _arrays(3.0)
    state = RunState(run_id="ab" * 16, round=1, model_digest=_digest(arrays).hex())
    store.commit(state, arrays)
    store.update_state(
        RunState(run_id=state.run_id, round=1, model_digest=state.model_digest, history=({"accuracy": 0.9},))
    )
    loaded, _ = store.load(1)  # still verifies against the model file
    assert loaded.history == ({"accuracy": 0.9},)
    with pytest.raises(CheckpointError, match="another model"):
        store.update_state(RunState(run_id=state.run_id, round=1, model_digest="00" * 32))
    with pytest.raises(CheckpointError, match="no committed state"):
        store.update_state(RunState(run_id=state.run_id, round=7, model_digest=state.model_digest))


def test_checkpoints_after_a_round_are_discarded_and_the_older_ones_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for rnd in range(3):
        arrays = _arrays(float(rnd))
        store.commit(RunState(run_id="cd" * 16, round=rnd, model_digest=_digest(arrays).hex()), arrays)
    assert store.discard_after(1) == [2]
    assert not store.model_path(2).exists() and not store.state_path(2).exists()
    latest = store.latest()
    assert latest is not None and latest[0].round == 1
    assert store.discard_after(1) == []


def test_a_checkpoint_written_before_the_one_model_digest_is_refused_saying_so(tmp_path: Path) -> None:
    import json

    store = CheckpointStore(tmp_path)
    a = _arrays(1)
    store.commit(RunState("r", 1, _digest(a).hex()), a)
    path = store.state_path(1)
    doc = json.loads(path.read_text())
    del doc["arrays_digest"]  # what an earlier fedseal wrote
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="earlier fedseal"):
        store.latest()
