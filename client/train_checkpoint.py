"""Local training checkpoints: a preempted site resumes its round's training where it stopped.

A site on an interruptible (spot) machine can be stopped mid-training: SIGTERM (a reclaim
notice) or SIGKILL. While it trains, the loop (:func:`fedseal.client.training.train_stream`)
writes a checkpoint every ``every_steps`` optimizer steps and when the site is asked to stop
(:class:`Preemption`: SIGTERM sets it, the loop saves and raises :class:`Preempted` at its next
step); a restarted site that is given the same round's message again resumes from it: the
same model weights, optimizer state, RNG state, epoch and batch, so the result is the one
uninterrupted training gives (the data order is a function of the seed and the epoch).

Files (one directory per training, ``state_dir/training/<identity>``)::

    model.safetensors       the weights being trained
    optimizer.safetensors   the optimizer's tensors (``state.<param index>.<name>``) and the
                            torch RNG state (``rng.torch``)
    progress.json           epoch, batch within the epoch, optimizer steps, loss sum, rows of
                            the first epoch, the optimizer's other state and param groups

A checkpoint is written into a new directory beside the old one, fsynced, and renamed over it
(a crash leaves the old checkpoint or the new one, never a mix). ``identity`` is a digest of
everything the training depends on (run, round, global model, request, seed, model name):
a checkpoint is never resumed by another training. It holds the site's model trained on its
own data, so the directory is the site's, mode 0700, removed when the round's reply is sent.

Only safetensors and JSON are read back (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedseal.client.errors import SiteError

__all__ = ["Preempted", "Preemption", "Progress", "TrainingCheckpoint", "training_identity"]

_FORMAT = "fedseal-training-checkpoint/1"


class Preempted(SiteError):
    """Training stopped because the site is being stopped; its checkpoint is saved. Not an
    answer to the coordinator: the site sends nothing for this message (a restarted site
    resumes when the coordinator sends it again)."""


class Preemption:
    """The site's stop request as training sees it (set by ``fl-client run`` on SIGTERM)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event if event is not None else threading.Event()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a training stood when its checkpoint was written.

    Attributes:
        epoch: The epoch in progress (0-based).
        batch: Batches of that epoch already trained.
        steps: Optimizer steps over all epochs.
        loss_sum: Sum of the per-step losses so far.
        rows: Rows of the first epoch trained so far (the update's example count).
    """

    epoch: int
    batch: int
    steps: int
    loss_sum: float
    rows: int


def training_identity(*parts: bytes | str | int | float) -> str:
    """A digest naming one training (hex, 32 characters) of everything it depends on."""
    h = hashlib.sha256(b"fedseal/v1/training-identity")
    for part in parts:
        raw = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(raw).to_bytes(4, "big") + raw)
    return h.hexdigest()[:32]


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's ``state_dict`` as tensors (for safetensors) and the JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest.setdefault(str(index), {})[name] = value
    return tensors, {"state": rest, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


class TrainingCheckpoint:
    """One training's checkpoint directory (see the module docstring).

    Args:
        directory: ``state_dir/training/<identity>``.
        every_steps: Write a checkpoint every this many optimizer steps (0: only when
            preempted).
        preemption: The site's stop request (``None``: never preempted).
    """

    def __init__(self, directory: Path, every_steps: int = 50, preemption: Preemption | None = None) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        self.directory = directory
        self.every_steps = every_steps
        self.preemption = preemption
        self.saved = 0  # checkpoints written by this object

    def due(self, steps: int) -> bool:
        """Whether a checkpoint is due after ``steps`` optimizer steps."""
        return self.every_steps > 0 and steps % self.every_steps == 0

    @property
    def stop_requested(self) -> bool:
        return self.preemption is not None and self.preemption.requested

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        """Write the checkpoint (atomically: the old one stays until the new one is complete).

        Raises:
            OSError: It cannot be written (the training goes on without it).
        """
        parent = self.directory.parent
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = parent / f".{self.directory.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        tensors, rest = _split_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        doc = {"format": _FORMAT, "progress": asdict(progress), "optimizer": rest}
        (tmp / "progress.json").write_text(json.dumps(doc))
        for name in ("model.safetensors", "optimizer.safetensors", "progress.json"):
            with (tmp / name).open("rb") as fh:
                os.fsync(fh.fileno())
        old = parent / f".{self.directory.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.directory.exists():
            self.directory.rename(old)
        tmp.rename(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.saved += 1

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress | None:
        """Restore the model, optimizer and torch RNG from the checkpoint; its progress, or
        ``None`` when there is none (a half-written one, from a crash mid-save, is ignored).

        Raises:
            SiteError: A checkpoint is there but does not fit this model or optimizer.
        """
        if not (self.directory / "progress.json").exists():
            old = self.directory.parent / f".{self.directory.name}.old"  # a crash mid-rename
            if not (old / "progress.json").exists():
                return None
            old.rename(self.directory)
        try:
            doc = json.loads((self.directory / "progress.json").read_text())
            if doc.get("format") != _FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            weights = load_file(str(self.directory / "model.safetensors"))
            tensors = load_file(str(self.directory / "optimizer.safetensors"))
            model.load_state_dict(weights)
            optimizer.load_state_dict(_join_optimizer(tensors, doc["optimizer"]))
            torch.set_rng_state(tensors["rng.torch"])
            return Progress(**doc["progress"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise SiteError(f"training checkpoint {self.directory} cannot be resumed: {exc}") from exc

    def clear(self) -> None:
        """Remove the checkpoint (the training it belongs to is over)."""
        for path in (
            self.directory,
            self.directory.parent / f".{self.directory.name}.tmp",
            self.directory.parent / f".{self.directory.name}.old",
        ):
            shutil.rmtree(path, ignore_errors=True)
