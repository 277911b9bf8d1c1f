"""The coordinator's one error root: every error ``fedseal.server`` raises on purpose derives from
:class:`CoordinatorError`, so ``fl-server`` (and an embedding program) can tell "the coordinator
refused or failed, with a reason for the operator" from a bug with one ``except``.

Each subclass keeps the standard base it had before (``RuntimeError`` where callers relied on
it), so catching it the old way still works.
"""

from __future__ import annotations

__all__ = ["CoordinatorError", "DeployError", "RunStopped"]


class CoordinatorError(Exception):
    """A coordinator-side failure with a message meant for the operator (one line)."""


class DeployError(CoordinatorError):
    """Starting or driving the Flower deployment failed (message says which step)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class RunStopped(CoordinatorError):
    """An operator asked the run to stop (``fl-server stop``); the message is their reason."""
