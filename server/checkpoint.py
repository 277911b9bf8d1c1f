"""Checkpoints of the global model and run state: safetensors + a small JSON file, no pickle.

Usage::

    from fedseal.server.checkpoint import CheckpointStore, RunState
    store = CheckpointStore(state_dir / "checkpoints")
    store.commit(RunState(run_id="..", round=3, ...), arrays)    # after a committed round
    latest = store.latest()                                       # (RunState, arrays) or None

Layout: ``round-000003.safetensors`` (the model as name -> ndarray) and ``round-000003.json``
(the run state, including the SHA-256 of the safetensors file). The JSON is written last, via a
temporary file and an atomic rename, so a checkpoint exists only once both files are complete;
``latest()`` verifies the model digest before trusting it. ``LATEST`` names the newest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file

__all__ = ["CheckpointError", "CheckpointStore", "RunState", "model_digest"]

_NAME_RE = re.compile(r"^round-(\d{6})\.json$")
MAX_STATE_BYTES = 1 << 20


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or does not match its recorded digest."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def model_digest(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256(b"fedseal/model/v1\x00")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        head = json.dumps([name, a.dtype.str, list(a.shape)]).encode()
        h.update(len(head).to_bytes(4, "big") + head)
        h.update(a.tobytes())
    return h.digest()


@dataclass(frozen=True, slots=True)
class RunState:
    """What a resumed run needs besides the model."""

    run_id: str
    round: int  # last committed round (0 = initial model)
    model_digest: str
    file_sha256: str = ""
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointStore:
    """A directory of committed checkpoints."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def model_path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:06d}.safetensors"

    def state_path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:06d}.json"

    def commit(self, state: RunState, arrays: Mapping[str, npt.NDArray[Any]]) -> Path:
        """Write model then state (atomically); return the model path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        model_path = self.model_path(state.round)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".model-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
                file_sha = hashlib.file_digest(f, "sha256").hexdigest()
            os.replace(tmp, model_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        doc = asdict(state) | {"file_sha256": file_sha, "history": list(state.history)}
        _atomic_write(self.state_path(state.round), json.dumps(doc, sort_keys=True).encode())
        _atomic_write(self.directory / "LATEST", f"{state.round}\n".encode())
        return model_path

    def update_state(self, state: RunState) -> None:
        """Rewrite a committed checkpoint's state (e.g. its history), keeping its model digests.

        Raises:
            CheckpointError: If that round has no committed checkpoint.
        """
        spath = self.state_path(state.round)
        try:
            old = json.loads(spath.read_bytes())
        except (OSError, ValueError) as exc:
            raise CheckpointError(spath, f"no committed state to update ({exc})") from exc
        if old.get("model_digest") != state.model_digest:
            raise CheckpointError(spath, "the update names another model than the checkpoint")
        doc = asdict(state) | {"file_sha256": old.get("file_sha256", ""), "history": list(state.history)}
        _atomic_write(spath, json.dumps(doc, sort_keys=True).encode())

    def discard_after(self, round_: int) -> list[int]:
        """Remove checkpoints newer than ``round_`` (never published); return their rounds."""
        gone = []
        if not self.directory.is_dir():
            return gone
        for p in sorted(self.directory.iterdir()):
            m = _NAME_RE.match(p.name)
            if m and int(m.group(1)) > round_:
                gone.append(int(m.group(1)))
                p.unlink()  # the state first: a model file without its state is never loaded
                self.model_path(int(m.group(1))).unlink(missing_ok=True)
        _atomic_write(self.directory / "LATEST", f"{round_}\n".encode())
        return sorted(set(gone))

    def latest(self) -> tuple[RunState, dict[str, npt.NDArray[Any]]] | None:
        """The newest complete checkpoint, verified, or None if there is none.

        Raises:
            CheckpointError: If the newest state file is unreadable or its model does not
                match the recorded digests.
        """
        if not self.directory.is_dir():
            return None
        rounds = sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME_RE.match(p.name))
        )
        if not rounds:
            return None
        return self.load(rounds[-1])

    def load(self, round_: int) -> tuple[RunState, dict[str, npt.NDArray[Any]]]:
        """Load and verify one checkpoint.

        Raises:
            CheckpointError: If missing, malformed, or the digests do not match.
        """
        spath = self.state_path(round_)
        try:
            raw = spath.read_bytes()
            if len(raw) > MAX_STATE_BYTES:
                raise CheckpointError(spath, "state file too large")
            doc = json.loads(raw)
            state = RunState(
                run_id=str(doc["run_id"]),
                round=int(doc["round"]),
                model_digest=str(doc["model_digest"]),
                file_sha256=str(doc["file_sha256"]),
                history=tuple(dict(h) for h in doc["history"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(spath, f"unreadable state: {type(exc).__name__}") from exc
        mpath = self.model_path(round_)
        try:
            with mpath.open("rb") as f:
                file_sha = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise CheckpointError(mpath, f"unreadable model: {exc.strerror}") from exc
        if file_sha != state.file_sha256:
            raise CheckpointError(mpath, "model file does not match the digest in its state file")
        arrays = load_file(str(mpath))
        if model_digest(arrays).hex() != state.model_digest:
            raise CheckpointError(mpath, "model content does not match the recorded model digest")
        return state, arrays
