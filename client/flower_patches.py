"""Every patch the site applies to Flower's internals, in one place, behind one version gate.

The site runs Flower's own ``flower-supernode`` (:mod:`fedseal.client.supernode` launches it)
and its own task executor (:mod:`fedseal.client.executor`); both lean on Flower 1.42 internals
that have no public option. Each patch below names the Flower attribute it replaces or writes,
and ``tests/client/test_flower_patches.py`` checks, per patch, that the attribute still exists
with the signature and behaviour the patch assumes, so a Flower upgrade fails those tests (and
:func:`require_supported_flower` refuses to start) instead of silently restoring a bug.

The patches (all installed by :func:`install`, except :func:`set_message_id`):

1. **Idle poll** (``flwr.supernode.start_client_internal.time``): the SuperNode loop sleeps a
   hard-coded 3 s after a Fleet pull that brought no message; the module's ``time`` is replaced
   by :class:`PollClock`, which caps that sleep at the configured poll interval and the loop's
   0.5 s waits for its own executor's reply (in-memory, no network request) at a shorter one.
   Only that module sees the cap.
2. **Run ended mid-pull** (``start_client_internal.pull_objects``): if the run stopped while the
   SuperNode pulled a message's objects, Flower raises ``RunNotRunningException``, a
   ``BaseException`` that skips the ``except Exception`` clean-up of the half-received message
   and its task; the dangling task then wedged the site's executor. The wrapper turns it into
   :class:`RunEndedError` (an ``Exception``), and starts the object pulls at the configured
   back-off (50 ms) where Flower waits 1 s before asking again for an object not yet uploaded.
3. **Stranded replies** (``start_client_internal._pull_and_store_message``): the loop pushes
   replies only right after a pull that brought a message, so a reply that lands after the push
   of a stale one (a coordinator restart) was never sent; an idle pull that finds a reply
   waiting in the SuperNode's state (:func:`has_unsent_reply`) now makes the loop push it.
4. **Failed ClientApp task** (``InMemoryNodeState.finish_task``): a ClientApp task that fails
   before it has its message (its objects never arrived) left no reply, and the loop's
   ``_push_messages`` waited for one forever; it now leaves the error reply Flower leaves for a
   failed AgentApp task (``CLIENT_APP_RAISED_EXCEPTION``), so the coordinator sees a dropout.
5. **Message ids** (:func:`set_message_id`): a message rebuilt from its object tree carries no
   id in its deflated form; the executor writes it as Flower's own ``pull_task_input`` does.

Not a patch, but Flower internals the site calls directly, kept here for the same reason:

6. **Ending a stale session** (:func:`end_session`): a SuperNode that was killed (``kill -9``,
   power loss) never sends Flower's ``DeactivateNode``, and the SuperLink keeps its node
   ``ONLINE`` until ``HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL`` (2 x 30 s) after its last
   heartbeat; until then ``SqlLinkState.activate_node`` refuses the restarted SuperNode (only a
   ``REGISTERED`` or ``OFFLINE`` node is activated) and it exits with code 305, "Failed to
   activate SuperNode", the same answer an unregistered key gets. :func:`end_session` sends that
   ``DeactivateNode`` late, for the node id the site recorded, signed with the site key through
   Flower's own Fleet client (``FleetHttpClient`` + ``NodeAuthHttpInterceptor``); the
   SuperLink's answer also tells "previous session ended" from "this key is not registered".
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
import types
from collections.abc import Callable
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseal.client.errors import SiteError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedseal.settings import PullBackoff

__all__ = [
    "FLOWER_VERSIONS",
    "LOCAL_WAIT_S",
    "RunEndedError",
    "SessionEnd",
    "check_flower_version",
    "end_session",
    "has_unsent_reply",
    "install",
    "require_supported_flower",
    "session_window_s",
    "set_message_id",
]

log = logging.getLogger("fedseal.client.flower_patches")

FLOWER_VERSIONS = ("1.42",)
"""The ``flwr`` minor versions these patches were written for (and tested against)."""

#: Cap on the SuperNode's local waits (for its executor's reply), which cost no network request.
LOCAL_WAIT_S = 0.05
_PATCHED_MODULE = "flwr.supernode.start_client_internal"
PATCHED_CALL = "time.sleep(3)"
# The main loop's shape the stranded-reply patch relies on (whitespace removed): it tests the
# pull's result for None, and only otherwise pushes.
LOOP_PUSH_AFTER_PULL = (
    "ifrun_idisNone:#Ifnomessagewasreceived,waitforawhiletime.sleep(3)continue_push_messages("
)
_PINNED = " or ".join(f"flwr=={v}.*" for v in FLOWER_VERSIONS)


def check_flower_version(
    version: str, supported: tuple[str, ...] = FLOWER_VERSIONS, patcher: str = "the site"
) -> None:
    """Refuse a ``flwr`` ``version`` whose minor version is not in ``supported``.

    Raises:
        RuntimeError: The version is not a supported one (the message names both).
    """
    if ".".join(version.split(".")[:2]) not in supported:
        pinned = " or ".join(f"flwr=={v}.*" for v in supported)
        raise RuntimeError(
            f"flwr {version} is installed, but {patcher} patches Flower internals written for "
            f"{pinned}: install a supported Flower"
        )


@functools.cache
def require_supported_flower() -> str:
    """The installed ``flwr`` version, checked once (:func:`check_flower_version`).

    Raises:
        RuntimeError: Another Flower is installed.
    """
    installed = metadata.version("flwr")
    check_flower_version(installed)
    return installed


def set_message_id(message: Any, message_id: str) -> None:
    """Give a message rebuilt from its object tree its id (``Metadata._message_id``, which has
    no setter), as Flower's ``run_clientapp.pull_task_input`` does."""
    message.metadata.__dict__["_message_id"] = message_id


class PollClock(types.ModuleType):
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


class RunEndedError(SiteError, RuntimeError):
    """The run a message belongs to stopped while the SuperNode was pulling the message."""


def _pull_objects_of_a_running_run(
    pull_objects: Callable[..., Any], backoff: PullBackoff | None = None
) -> Callable[..., Any]:
    from flwr.supercore.run import RunNotRunningException

    defaults = backoff.kwargs() if backoff is not None else {}

    def pull(*args: Any, **kwargs: Any) -> Any:
        try:
            return pull_objects(*args, **{**defaults, **kwargs})
        except RunNotRunningException:
            raise RunEndedError(
                "the run is no longer running (the coordinator restarted or ended it)"
            ) from None

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


def node_state_is_readable() -> bool:
    """Whether Flower's in-memory node state still has the fields :func:`has_unsent_reply` reads."""
    from flwr.supernode.nodestate import in_memory_nodestate

    source = inspect.getsource(in_memory_nodestate)
    return all(
        name in source
        for name in (
            "self.lock_msg_store",
            "self.msg_store",
            "entry.is_retrieved",
            "def finish_task(self, task_id: int, sub_status: str, details: str)",
            "def _store_error_replies(self, run_ids: set[int], error: Error)",
        )
    )


def push_stranded_replies(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
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


def error_reply_on_failed_client_task(finish_task: Callable[..., bool]) -> Callable[..., bool]:
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
                log.warning(
                    "ClientApp task %d failed without a reply (%s): replying with an error",
                    task_id,
                    details,
                )
                reason = f"the site's ClientApp task failed: {details}"[:500]
                self._store_error_replies(
                    {tasks[0].run_id}, Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
                )
        return finished

    finish.__wrapped__ = finish_task  # type: ignore[attr-defined]
    return finish


def install(
    poll_s: float, backoff: PullBackoff | None = None, local_wait_s: float | None = None
) -> None:
    """Cap the SuperNode loop's idle sleep at ``poll_s`` seconds; pull objects with ``backoff``.

    ``backoff`` None keeps Flower's object-pull back-off (1 s, doubling to 10 s).
    ``local_wait_s`` caps the waits for the executor's reply (None: ``poll_s`` as well).

    Raises:
        RuntimeError: The installed Flower is not the one these patches were written for.
    """
    require_supported_flower()
    module = importlib.import_module(_PATCHED_MODULE)
    source = inspect.getsource(module)
    if (
        PATCHED_CALL not in source
        or getattr(module, "time", None) is not time
        or "obj_contents = pull_objects(" not in source
        or not callable(getattr(module, "pull_objects", None))
        or LOOP_PUSH_AFTER_PULL not in "".join(source.split())
        or not node_state_is_readable()
    ):
        raise RuntimeError(
            f"{_PATCHED_MODULE} no longer sleeps with `{PATCHED_CALL}` on the `time` module or "
            "pulls message objects with `pull_objects`: this Flower version is not the one "
            f"fedseal's SuperNode launcher was written for ({_PINNED})"
        )
    module.time = PollClock(poll_s, poll_s if local_wait_s is None else local_wait_s)  # type: ignore[attr-defined]
    module.pull_objects = _pull_objects_of_a_running_run(module.pull_objects, backoff)  # type: ignore[attr-defined]
    pull_and_store = getattr(module, "_pull_and_store_message")  # noqa: B009 (private: mypy --strict)
    module._pull_and_store_message = push_stranded_replies(  # type: ignore[attr-defined]
        getattr(pull_and_store, "__wrapped__", pull_and_store)
    )
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    finish_task = InMemoryNodeState.finish_task
    InMemoryNodeState.finish_task = error_reply_on_failed_client_task(  # type: ignore[method-assign]
        getattr(finish_task, "__wrapped__", finish_task)
    )


class SessionEnd(Enum):
    """What the SuperLink answered to :func:`end_session`."""

    ENDED = "ended"  # the node was still ONLINE (a killed SuperNode's session): now OFFLINE
    NOT_ONLINE = "not online"  # registered to this key, already OFFLINE: nothing to end
    NOT_REGISTERED = "not registered"  # the key does not own that node id (revoked, re-enrolled)
    UNKNOWN = "unknown"  # no answer (unreachable, timeout, a 5xx): nothing can be concluded


def session_window_s() -> float:
    """How long the SuperLink keeps a silent SuperNode ``ONLINE`` after its last heartbeat:
    ``HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL`` (the interval a SuperNode announces)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    return float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)


def end_session(
    superlink: str,
    ca_cert: Path | None,
    key: ec.EllipticCurvePrivateKey,
    node_id: int,
    timeout_s: float = 10.0,
) -> tuple[SessionEnd, str]:
    """Send Flower's ``DeactivateNode`` for ``node_id``, signed with ``key``, to ``superlink``
    over TLS pinned to ``ca_cert``; returns the outcome and a short detail for the log.

    The SuperLink authenticates the request (a signed timestamp, and ``node_id`` must be the
    node registered to this public key: else HTTP 401), then deactivates the node only if it is
    ``ONLINE`` (else 412, ``FLEET_NODE_DEACTIVATION_FAILED``).
    """
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    require_supported_flower()
    client = FleetHttpClient(
        f"https://{superlink}",
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperNode"),
            NodeAuthHttpInterceptor(key, key.public_key()),
        ],
        verify=str(ca_cert) if ca_cert is not None else True,
        timeout=timeout_s,
    )
    try:
        with client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if code == httpx.codes.UNAUTHORIZED:
            return (
                SessionEnd.NOT_REGISTERED,
                f"node {node_id} is not registered to this key (HTTP 401)",
            )
        if code == httpx.codes.PRECONDITION_FAILED:
            return SessionEnd.NOT_ONLINE, f"node {node_id} is not online (HTTP 412)"
        return SessionEnd.UNKNOWN, f"HTTP {code}"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return SessionEnd.UNKNOWN, f"{type(exc).__name__}: {exc}"
    return SessionEnd.ENDED, f"node {node_id} was still online: deactivated"
