"""A secure round's state kept on disk while it runs, so a restarted site can continue it.

A site stopped mid-round (a spot reclaim: SIGTERM, or SIGKILL) and started again gets the
message it was answering once more (the coordinator pushes it again when the site's node comes
back: :func:`fedseal.server.exchange.exchange_iter`). To answer it, the restarted site needs the
round it was in: this store keeps, in ``state_dir/round`` (0700):

    round.json          run, round, model name and seed, the training request, the global
                        model's digest
    global.safetensors  the global model the round trains from (as the setup delivered it)
    session.bin         the protocol session (:meth:`fedseal.protocol.ClientSession.export_state`,
                        ChaCha20-Poly1305 under a key derived from the site's training secret:
                        it holds the round's ephemeral keys and mask seed), saved after every
                        message it answered and *before* the answer leaves
    reply.bin           the last answer sent (for which message), sealed the same way

Rules, so that a restart never gives the coordinator two different answers to one message (two
masked inputs under the same masks would reveal the difference of two trainings):

* the session and the answer are saved before the answer is handed to Flower; a message the
  restored session has already answered (its digest is in the session) gets the saved answer,
  byte for byte, or nothing;
* a message the saved session has not answered yet (the site stopped while answering it, e.g.
  in training) is answered by the restored session as if for the first time: its training
  resumes from its checkpoint (:mod:`fedseal.client.train_checkpoint`), and nothing of the
  interrupted attempt ever left the site;
* a new round's setup replaces the store; a round that ended is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedseal.client.training import TrainRequest
from fedseal.crypto.aead import open_sealed
from fedseal.crypto.aead import seal as aead_seal
from fedseal.crypto.errors import DecryptionError
from fedseal.crypto.keys import write_atomic

__all__ = ["RoundStore", "StoredRound", "round_state_key"]

_KEY_TAG = b"fedseal/v1/round-state-key"
_REPLY_AAD = b"fedseal/v1/round-reply"
_FORMAT = "fedseal-round-state/1"


def round_state_key(training_secret: bytes) -> bytes:
    """The 32-byte key sealing the stored session and answer (from the site's secret)."""
    return hmac.new(training_secret, _KEY_TAG, "sha256").digest()


@dataclass(frozen=True, slots=True)
class StoredRound:
    """What :meth:`RoundStore.load` gives back."""

    run_id: bytes
    round: int
    model_name: str
    model_seed: int
    request: TrainRequest
    global_digest: bytes
    arrays: dict[str, npt.NDArray[Any]]
    session: bytes


class RoundStore:
    """One site's stored secure round (see the module docstring)."""

    def __init__(self, directory: Path, key: bytes, nonce: Any = None) -> None:
        import os

        self.directory = directory
        self.key = key
        self._nonce = nonce if nonce is not None else (lambda: os.urandom(12))

    def _path(self, name: str) -> Path:
        return self.directory / name

    def begin(
        self, run_id: bytes, round_: int, *, model_name: str, model_seed: int, request: TrainRequest,
        global_digest: bytes, arrays: Mapping[str, npt.NDArray[Any]],
    ) -> None:  # fmt: skip
        """A new round: its model and config replace whatever was stored."""
        from safetensors.numpy import save_file

        self.clear()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(self._path("global.safetensors")))
        meta = {
            "format": _FORMAT, "run_id": run_id.hex(), "round": round_, "model_name": model_name,
            "model_seed": model_seed, "request": dataclasses.asdict(request),
            "global_digest": global_digest.hex(),
        }  # fmt: skip
        write_atomic(self._path("round.json"), json.dumps(meta).encode(), 0o600)

    def save_session(self, blob: bytes) -> None:
        """The session after a message (already sealed by ``export_state``)."""
        if self._path("round.json").exists():
            write_atomic(self._path("session.bin"), blob, 0o600)

    def save_reply(self, message: bytes, payload: bytes, bulk: npt.NDArray[Any] | None) -> None:
        """The answer to ``message`` (its signed payload bytes), before it is sent."""
        if not self._path("round.json").exists():
            return
        digest = hashlib.sha256(message).digest()
        header = json.dumps(
            {"bulk": None if bulk is None else [str(bulk.dtype), list(bulk.shape)], "payload": len(payload)}
        ).encode()
        body = len(header).to_bytes(4, "big") + header + payload
        if bulk is not None:
            body += np.ascontiguousarray(bulk).tobytes()
        sealed = aead_seal(self.key, body, _REPLY_AAD + digest, nonce=self._nonce())
        write_atomic(self._path("reply.bin"), digest + sealed, 0o600)

    def reply_for(self, message: bytes) -> tuple[bytes, npt.NDArray[Any] | None] | None:
        """The saved answer to ``message``, if it is the last one answered."""
        try:
            raw = self._path("reply.bin").read_bytes()
        except OSError:
            return None
        digest = hashlib.sha256(message).digest()
        if raw[:32] != digest:
            return None
        try:
            body = open_sealed(self.key, raw[32:], _REPLY_AAD + digest)
        except DecryptionError:
            return None
        size = int.from_bytes(body[:4], "big")
        header = json.loads(body[4 : 4 + size])
        rest = body[4 + size :]
        payload, tail = rest[: header["payload"]], rest[header["payload"] :]
        bulk = None
        if header["bulk"] is not None:
            dtype, shape = header["bulk"]
            bulk = np.frombuffer(tail, dtype=np.dtype(dtype)).reshape(shape).copy()
        return payload, bulk

    def load(self) -> StoredRound | None:
        """The stored round (``None``: none, or not complete enough to continue)."""
        from safetensors.numpy import load_file

        try:
            meta = json.loads(self._path("round.json").read_text())
            session = self._path("session.bin").read_bytes()
            arrays = load_file(str(self._path("global.safetensors")))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            return None
        try:
            return StoredRound(
                run_id=bytes.fromhex(meta["run_id"]), round=int(meta["round"]), model_name=str(meta["model_name"]),
                model_seed=int(meta["model_seed"]), request=TrainRequest(**meta["request"]),
                global_digest=bytes.fromhex(meta["global_digest"]), arrays=dict(arrays), session=session,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None  # not a round this site can continue (the next setup replaces it)

    def clear(self) -> None:
        """Forget the stored round."""
        shutil.rmtree(self.directory, ignore_errors=True)
