"""``flower-supernode`` with a configurable idle-poll interval and a fix for restarts.

Flower 1.42's SuperNode main loop (``flwr.supernode.start_client_internal``) pulls the Fleet
API, and when no message was waiting it sleeps a hard-coded 3 s before pulling again. A site
answers a message only on the pull *after* its ClientApp produced the reply, so every protocol
message costs up to 3 s of idle latency: with the five stages of a secure round plus training
and evaluation that was ~20 s of a ~31 s round in the demo. Flower has no option for it, so this
launcher runs the unchanged ``flower-supernode`` CLI with that one module's ``time`` replaced by
:class:`_PollClock`, which caps ``sleep`` at ``FEDSEAL_SUPERNODE_POLL_S`` seconds (default
:data:`DEFAULT_POLL_S`). Only that module sees the cap. Its other sleeps (0.5 s) wait for the
site's own executor to hand over its reply, a check of the SuperNode's in-memory state that
costs no network request; they are capped at :data:`LOCAL_WAIT_S` (50 ms).

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

A third change removes about a second per hop from every message. The SuperLink hands out a
message as soon as it is *registered*, before the sender has pushed its objects (the model's
arrays), and the SuperNode creates the task for a message before it has pulled those objects.
So the first ``PullObject`` of each hop usually finds the object "not yet available", and
Flower's ``pull_objects`` then waits its default initial back-off of 1 s (doubling, up to 10 s)
before asking again, even when the object arrives a few milliseconds later. :func:`install`
makes the SuperNode's object pulls start at :data:`DEFAULT_PULL_BACKOFF_S` (50 ms) instead,
capped at :attr:`PullBackoff.cap_s` (0.25 s); the executor (:mod:`fedseal.client.executor`) and the
coordinator's ServerApp (:func:`fedseal.server.flower_app.exchange_iter`) do the same for
their pulls (the executor, on loopback, caps its retries at 0.1 s). ``FEDSEAL_OBJECT_PULL_BACKOFF_S``
sets the initial back-off (``1``: Flower's first retry after 1 s).

A fourth patch fixes a Flower 1.42 loop that could strand a reply for good. The loop pushes
replies only right after a pull that brought a message (``_push_messages`` then sends the
replies present at that moment). When the coordinator restarts, a site may still hold the old
run's reply: the first message of the resumed run then makes the loop send that stale reply
(refused: run not running) and return, while the executor's answer to the new message lands a
few milliseconds later; no further message comes (the coordinator waits for that answer), so it
was never sent and the round hung (seen in CI: the coordinator's resume test). With
:func:`_push_stranded_replies` an idle pull that finds a reply waiting in the SuperNode's state
makes the loop push it.

A fifth patch closes the other way a site could wedge for good (seen in CI: the multi-host run,
a site whose link was cut mid-round never answered the resumed run). The loop, after a pull that
brought a message, waits in ``_push_messages`` until *some* reply exists, with no time limit.
When the ClientApp task fails before it has the message (the executor could not pull the
message's objects from its SuperNode in time: the SuperNode was itself still pulling them over
a cut link), the executor reports the task FAILED but has no message to reply to, and Flower's
``InMemoryNodeState.finish_task`` stores an error reply only for a failed *AgentApp* task (and
for expired task tokens). :func:`_error_reply_on_failed_client_task` makes a failed ClientApp
task leave the same error reply (``CLIENT_APP_RAISED_EXCEPTION`` with the task's details), so
the loop sends it and the coordinator sees this site as a dropout of that stage, and the site
answers the next message.

Run as ``python -m fedseal.client.supernode <flower-supernode arguments>``.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fedseal.client.supernode")

ENV_POLL = "FEDSEAL_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.25
#: Cap on the SuperNode's local waits (for its executor's reply), which cost no network request.
LOCAL_WAIT_S = 0.05
ENV_PULL_BACKOFF = "FEDSEAL_OBJECT_PULL_BACKOFF_S"
DEFAULT_PULL_BACKOFF_S = 0.05
_PATCHED_MODULE = "flwr.supernode.start_client_internal"
_PATCHED_CALL = "time.sleep(3)"
# The main loop's shape the stranded-reply patch relies on (whitespace removed): it tests the
# pull's result for None, and only otherwise pushes.
_LOOP_PUSH_AFTER_PULL = "ifrun_idisNone:#Ifnomessagewasreceived,waitforawhiletime.sleep(3)continue_push_messages("


class _PollClock(types.ModuleType):
    """A stand-in for the ``time`` module with shorter sleeps.

    The idle sleep between Fleet pulls (3 s, a network request each time) is capped at
    ``poll_s``; the module's other sleeps (0.5 s) wait for the site's own executor (its reply,
    its reply's objects) in the SuperNode's in-memory state, which costs no network request,
    and are capped at ``local_wait_s``.
    """

    def __init__(self, poll_s: float, local_wait_s: float = LOCAL_WAIT_S) -> None:
        super().__init__("time")
        self.poll_s = poll_s
        self.local_wait_s = local_wait_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll_s if seconds >= 1.0 else self.local_wait_s))


class RunEndedError(RuntimeError):
    """The run a message belongs to stopped while the SuperNode was pulling the message."""


@dataclass(frozen=True, slots=True)
class PullBackoff:
    """How long an object pull waits before asking again for an object not yet available.

    The wait starts at ``initial_s`` and doubles (with Flower's +-20 % jitter) up to ``cap_s``.
    """

    initial_s: float
    cap_s: float

    def kwargs(self) -> dict[str, float]:
        """Keyword arguments for Flower's ``pull_objects``/``pull_and_inflate_object_from_tree``."""
        return {"initial_backoff": self.initial_s, "backoff_cap": self.cap_s}


def env_seconds(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    """A number of seconds from the environment variable ``name`` (``default`` when unset).

    Raises:
        ValueError: The value is not a number, or not within ``[lo, hi]`` (the message names
            the variable and the range).
    """
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g} seconds, got {value}")
    return value


def pull_backoff(env: Mapping[str, str] = os.environ) -> PullBackoff:
    """The object-pull back-off configured by ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (0.01 to 1 s).

    The cap is five times the initial wait, at least 0.25 s: the default 0.05 s gives
    0.05/0.25 s; ``1`` gives Flower's first retry after 1 s (capped at 5 s; Flower: 10 s).

    Raises:
        ValueError: The variable is not a number of seconds between 0.01 and 1.
    """
    value = env_seconds(env, ENV_PULL_BACKOFF, DEFAULT_PULL_BACKOFF_S, 0.01, 1.0)
    return PullBackoff(initial_s=value, cap_s=max(0.25, 5 * value))


def loopback_backoff(backoff: PullBackoff) -> PullBackoff:
    """``backoff`` with its cap lowered to 0.1 s (or the initial wait, if longer).

    For the executor's pulls from its own SuperNode: loopback, no TLS, in-memory state, so
    retrying often is cheap, and the cap is the longest the site may idle after the message's
    objects reached its SuperNode.
    """
    return PullBackoff(initial_s=backoff.initial_s, cap_s=max(backoff.initial_s, min(backoff.cap_s, 0.1)))


def _pull_objects_of_a_running_run(
    pull_objects: Callable[..., Any], backoff: PullBackoff | None = None
) -> Callable[..., Any]:
    from flwr.supercore.run import RunNotRunningException

    defaults = backoff.kwargs() if backoff is not None else {}

    def pull(*args: Any, **kwargs: Any) -> Any:
        try:
            return pull_objects(*args, **{**defaults, **kwargs})
        except RunNotRunningException:
            raise RunEndedError("the run is no longer running (the coordinator restarted or ended it)") from None

    pull.__wrapped__ = pull_objects  # type: ignore[attr-defined]
    return pull


def has_unsent_reply(state: Any) -> bool:
    """Whether the SuperNode's in-memory state holds a reply not yet handed to the push loop.

    Reads ``InMemoryNodeState.msg_store`` under its lock without marking anything retrieved
    (``get_messages_legacy`` would consume the replies).
    """
    with state.lock_msg_store:
        return any(
            not entry.is_retrieved and entry.message.metadata.reply_to_message_id != ""
            for entry in state.msg_store.values()
        )


def _node_state_is_readable() -> bool:
    """Whether Flower's in-memory node state still has the fields :func:`has_unsent_reply` reads."""
    import inspect

    from flwr.supernode.nodestate import in_memory_nodestate

    source = inspect.getsource(in_memory_nodestate)
    return all(
        name in source
        for name in (
            "self.lock_msg_store", "self.msg_store", "entry.is_retrieved",
            "def finish_task(self, task_id: int, sub_status: str, details: str)",
            "def _store_error_replies(self, run_ids: set[int], error: Error)",
        )
    )


def _push_stranded_replies(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap Flower's ``_pull_and_store_message`` so an idle pull still leads to a push when a
    reply is waiting (the loop pushes only when this returns something other than None)."""

    def pull_and_store_message(**kwargs: Any) -> Any:
        run_id = pull_and_store(**kwargs)
        if run_id is None and has_unsent_reply(kwargs["state"]):
            log.info("a reply is waiting without a new message: pushing it")
            return 0  # any run id: the loop only tests for None before pushing
        return run_id

    pull_and_store_message.__wrapped__ = pull_and_store  # type: ignore[attr-defined]
    return pull_and_store_message


def _error_reply_on_failed_client_task(finish_task: Callable[..., bool]) -> Callable[..., bool]:
    """Wrap ``InMemoryNodeState.finish_task``: a ClientApp task that ends FAILED leaves an error
    reply to its run's retrieved, unanswered messages (as Flower does for an AgentApp)."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.constant import TaskType

    def finish(self: Any, task_id: int, sub_status: str, details: str) -> bool:
        finished = finish_task(self, task_id, sub_status, details)
        if finished and sub_status == SubStatus.FAILED:
            tasks = self.get_tasks(task_ids=[task_id])
            if tasks and tasks[0].type == TaskType.CLIENT_APP:
                log.warning("ClientApp task %d failed without a reply (%s): replying with an error", task_id, details)
                reason = f"the site's ClientApp task failed: {details}"[:500]
                self._store_error_replies({tasks[0].run_id}, Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason))
        return finished

    finish.__wrapped__ = finish_task  # type: ignore[attr-defined]
    return finish


def poll_interval(env: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """The configured idle-poll interval in seconds (0.05 to 3)."""
    return env_seconds(env, ENV_POLL, DEFAULT_POLL_S, 0.05, 3.0)


def install(poll_s: float, backoff: PullBackoff | None = None, local_wait_s: float | None = None) -> None:
    """Cap the SuperNode loop's idle sleep at ``poll_s`` seconds; pull objects with ``backoff``.

    ``backoff`` None keeps Flower's object-pull back-off (1 s, doubling to 10 s).
    ``local_wait_s`` caps the waits for the executor's reply (None: ``poll_s`` as well).

    Raises:
        RuntimeError: The installed Flower is not the one these patches were written for.
    """
    import importlib

    module = importlib.import_module(_PATCHED_MODULE)
    source = inspect.getsource(module)
    if (
        _PATCHED_CALL not in source
        or getattr(module, "time", None) is not time
        or "obj_contents = pull_objects(" not in source
        or not callable(getattr(module, "pull_objects", None))
        or _LOOP_PUSH_AFTER_PULL not in "".join(source.split())
        or not _node_state_is_readable()
    ):
        raise RuntimeError(
            f"{_PATCHED_MODULE} no longer sleeps with `{_PATCHED_CALL}` on the `time` module or "
            "pulls message objects with `pull_objects`: this Flower version is not the one "
            "fedseal's SuperNode launcher was written for (flwr==1.42.*)"
        )
    module.time = _PollClock(poll_s, poll_s if local_wait_s is None else local_wait_s)  # type: ignore[attr-defined]
    module.pull_objects = _pull_objects_of_a_running_run(module.pull_objects, backoff)  # type: ignore[attr-defined]
    pull_and_store = getattr(module, "_pull_and_store_message")  # noqa: B009 (private: mypy --strict)
    module._pull_and_store_message = _push_stranded_replies(  # type: ignore[attr-defined]
        getattr(pull_and_store, "__wrapped__", pull_and_store)
    )
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    finish_task = InMemoryNodeState.finish_task
    InMemoryNodeState.finish_task = _error_reply_on_failed_client_task(  # type: ignore[method-assign]
        getattr(finish_task, "__wrapped__", finish_task)
    )


def main() -> None:
    try:
        install(poll_interval(), pull_backoff(), LOCAL_WAIT_S)
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
