"""``flower-supernode`` with a configurable idle-poll interval and a fix for restarts.

Flower 1.42's SuperNode main loop (``flwr.supernode.start_client_internal``) pulls the Fleet
API, and when no message was waiting it sleeps a hard-coded 3 s before pulling again. A site
answers a message only on the pull *after* its ClientApp produced the reply, so every protocol
message costs up to 3 s of idle latency: with the five stages of a secure round plus training
and evaluation that was ~20 s of a ~31 s round in the demo. Flower has no option for it, so this
launcher runs the unchanged ``flower-supernode`` CLI with that one module's ``time`` replaced by
:class:`_PollClock`, which caps ``sleep`` at ``FEDSEAL_SUPERNODE_POLL_S`` seconds (default
:data:`DEFAULT_POLL_S`). Only that module sees the cap; its other sleeps are shorter already.

The patch targets a pinned Flower (``flwr==1.42.*``); :func:`install` raises a clear error if
the module no longer calls ``time.sleep`` the way it is patched, and a test checks the source,
so an upgrade that moves the loop fails loudly instead of silently restoring the 3 s latency.

A second patch fixes a Flower 1.42 bug that wedged sites when the coordinator restarted: the
SuperNode creates a task for a message *before* pulling the message's objects, and if the run
ended meanwhile (the SuperLink restarted, so the old run is no longer RUNNING), the pull raises
``RunNotRunningException``, a ``BaseException``, which skips the ``except Exception`` clean-up
that deletes the half-received message and fails its task. The dangling task was then handed to
the site's executor, which waited forever for objects that would never come, so the site never
answered the resumed run. :func:`_pull_objects_of_a_running_run` turns that exception into
:class:`RunEndedError` (an ``Exception``), so Flower's own clean-up runs.

Cost: an idle site issues one small authenticated HTTPS pull per interval (at 0.25 s, 4 per
second per site) instead of one per 3 s.

Run as ``python -m fedseal.client.supernode <flower-supernode arguments>``.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import types
from collections.abc import Callable
from typing import Any

ENV_POLL = "FEDSEAL_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.25
_PATCHED_MODULE = "flwr.supernode.start_client_internal"
_PATCHED_CALL = "time.sleep(3)"


class _PollClock(types.ModuleType):
    """A stand-in for the ``time`` module whose ``sleep`` is capped at ``poll_s`` seconds."""

    def __init__(self, poll_s: float) -> None:
        super().__init__("time")
        self.poll_s = poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll_s))


class RunEndedError(RuntimeError):
    """The run a message belongs to stopped while the SuperNode was pulling the message."""


def _pull_objects_of_a_running_run(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    from flwr.supercore.run import RunNotRunningException

    def pull(*args: Any, **kwargs: Any) -> Any:
        try:
            return pull_objects(*args, **kwargs)
        except RunNotRunningException:
            raise RunEndedError("the run is no longer running (the coordinator restarted or ended it)") from None

    pull.__wrapped__ = pull_objects  # type: ignore[attr-defined]
    return pull


def poll_interval(env: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """The configured idle-poll interval in seconds (0.05 to 3)."""
    raw = env.get(ENV_POLL)
    if raw is None:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_POLL} must be a number of seconds, got {raw!r}") from None
    if not 0.05 <= value <= 3.0:
        raise ValueError(f"{ENV_POLL} must be between 0.05 and 3 seconds, got {value}")
    return value


def install(poll_s: float) -> None:
    """Cap the SuperNode loop's idle sleep at ``poll_s`` seconds."""
    import importlib

    module = importlib.import_module(_PATCHED_MODULE)
    source = inspect.getsource(module)
    if (
        _PATCHED_CALL not in source
        or getattr(module, "time", None) is not time
        or "obj_contents = pull_objects(" not in source
        or not callable(getattr(module, "pull_objects", None))
    ):
        raise RuntimeError(
            f"{_PATCHED_MODULE} no longer sleeps with `{_PATCHED_CALL}` on the `time` module or "
            "pulls message objects with `pull_objects`: this Flower version is not the one "
            "fedseal's SuperNode launcher was written for (flwr==1.42.*)"
        )
    module.time = _PollClock(poll_s)  # type: ignore[attr-defined]
    module.pull_objects = _pull_objects_of_a_running_run(module.pull_objects)  # type: ignore[attr-defined]


def main() -> None:
    try:
        install(poll_interval())
    except (ValueError, RuntimeError) as err:
        print(f"fedseal supernode: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    # The site's supernode.log is a file: timestamps help an operator, colour codes do not.
    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
