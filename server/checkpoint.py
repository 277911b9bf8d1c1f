"""Checkpoints of the global model and run state: safetensors + a small JSON file, no pickle.

Usage::

    from fedseal.server.checkpoint import CheckpointStore, RunState
    store = CheckpointStore(state_dir / "checkpoints")
    model = ModelVector.of(arrays)                                # fedseal.protocol.model
    saved = store.commit(RunState(run_id="..", round=3, model_digest=model.digest.hex()), arrays)
    saved.model_path, saved.file_sha256                           # after a committed round
    latest = store.latest()                                       # (RunState, arrays) or None

Layout: ``round-000003.safetensors`` (the model as name -> ndarray) and ``round-000003.json``
(the run state: the model digest the audit log records for this model, so a checkpoint can be
matched to the log, the digest of the arrays' names, dtypes, shapes and values, and the SHA-256
of the safetensors file). The JSON is written last, via a temporary file and an atomic rename,
so a checkpoint exists only once both files are complete; ``latest()`` verifies all three
digests before trusting it. ``LATEST`` names the newest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file

from fedseal.crypto.keys import write_atomic
from fedseal.protocol.model import arrays_digest, flatten, model_digest
from fedseal.server.errors import CoordinatorError

__all__ = ["CheckpointError", "CheckpointStore", "RunState", "SavedCheckpoint"]

_NAME_RE = re.compile(r"^round-(\d{6})\.json$")
MAX_STATE_BYTES = 1 << 20


class CheckpointError(CoordinatorError):
    """A checkpoint is missing, incomplete or does not match its recorded digest."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RunState:
    """What a resumed run needs besides the model.

    ``model_digest``: :func:`fedseal.protocol.model.model_digest` of the model (hex), as the
    audit log records it; ``file_sha256`` and ``arrays_digest``
    (:func:`fedseal.protocol.model.arrays_digest`, hex) are filled in by the store.
    """

    run_id: str
    round: int  # last committed round (0 = initial model)
    model_digest: str
    file_sha256: str = ""
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)
    arrays_digest: str = ""


@dataclass(frozen=True, slots=True)
class SavedCheckpoint:
    """A committed checkpoint: its model file and that file's SHA-256."""

    model_path: Path
    file_sha256: bytes


class CheckpointStore:
    """A directory of committed checkpoints."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def model_path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:06d}.safetensors"

    def state_path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:06d}.json"

    def commit(self, state: RunState, arrays: Mapping[str, npt.NDArray[Any]]) -> SavedCheckpoint:
        """Write model then state (atomically). ``state.model_digest`` must be the model digest
        of ``arrays`` (the caller has it: the model is not hashed again here; :meth:`load`
        verifies it)."""
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
        layout = arrays_digest(arrays, bytes.fromhex(state.model_digest))
        state = replace(state, file_sha256=file_sha, arrays_digest=layout.hex())
        doc = asdict(state) | {"history": list(state.history)}
        write_atomic(self.state_path(state.round), json.dumps(doc, sort_keys=True).encode(), 0o600)
        write_atomic(self.directory / "LATEST", f"{state.round}\n".encode(), 0o600)
        return SavedCheckpoint(model_path, bytes.fromhex(file_sha))

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
        doc = asdict(state) | {
            "file_sha256": old.get("file_sha256", ""),
            "arrays_digest": old.get("arrays_digest", ""),
            "history": list(state.history),
        }
        write_atomic(spath, json.dumps(doc, sort_keys=True).encode(), 0o600)

    def discard_after(self, round_: int) -> list[int]:
        """Remove checkpoints newer than ``round_`` (never published); return their rounds."""
        gone: list[int] = []
        if not self.directory.is_dir():
            return gone
        for p in sorted(self.directory.iterdir()):
            m = _NAME_RE.match(p.name)
            if m and int(m.group(1)) > round_:
                gone.append(int(m.group(1)))
                p.unlink()  # the state first: a model file without its state is never loaded
                self.model_path(int(m.group(1))).unlink(missing_ok=True)
        write_atomic(self.directory / "LATEST", f"{round_}\n".encode(), 0o600)
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
            if isinstance(doc, dict) and "model_digest" in doc and "arrays_digest" not in doc:
                raise CheckpointError(
                    spath,
                    "written by an earlier fedseal (its model digest is defined differently): "
                    "resume it with that version, or start a new run",
                )
            state = RunState(
                run_id=str(doc["run_id"]),
                round=int(doc["round"]),
                model_digest=str(doc["model_digest"]),
                file_sha256=str(doc["file_sha256"]),
                history=tuple(dict(h) for h in doc["history"]),
                arrays_digest=str(doc["arrays_digest"]),
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
        digest = model_digest(flatten(arrays))
        if digest.hex() != state.model_digest:
            raise CheckpointError(mpath, "model content does not match the recorded model digest")
        if arrays_digest(arrays, digest).hex() != state.arrays_digest:
            raise CheckpointError(mpath, "model arrays do not match the recorded arrays digest")
        return state, arrays
