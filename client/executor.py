"""A pinned task executor: runs the site's *installed* fedseal ClientApp, never a FAB's code.

Why this exists. In Flower 1.42 a SuperNode started with ``--isolation subprocess`` (the
default) launches ``flower-superexec``, which starts one ``flwr-clientapp`` process per task;
that process *installs the run's FAB* (``install_from_fab``) and imports the ClientApp named by
the FAB's ``pyproject.toml``, from the FAB's own files. The FAB is chosen by whoever starts the
run at the SuperLink, i.e. the coordinator, so a coordinator could ship code that partner sites
then execute. (Flower's ``--trusted-entities`` FAB signatures need a licence-verifying SuperLink.)

fedseal instead starts the SuperNode with ``--isolation process`` (no executor of its own) and
runs this loop in the ``fl-client run`` process. It polls the SuperNode's Runtime API
(``AcquireTask``, loopback only), pulls the task's message, ignores the FAB's content entirely
(its hash is logged), calls the in-process ClientApp built by
:func:`fedseal.client.flower_app.make_client_app`, and pushes the reply. A bonus: torch and the
model stay loaded between tasks instead of being re-imported for every message.

What the site's operator sees. ``fl-client run`` logs to its stderr (its console), and so does
this loop, in that process: each task a line, and a task the ClientApp refused or failed one
warning line. The site's ClientApp describes its own failures
(:meth:`fedseal.client.flower_app.SiteClientApp.describe_failure`: ``"round 3: refused plain
training: ..."``, the round, what and why); that line is logged as it is, the traceback only at
debug level. A failure it does not describe (a fault) is logged with its traceback.

Usage::

    executor = PinnedExecutor("127.0.0.1:9094", client_app)
    executor.run_forever(stop_event)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import httpx
from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedseal.client.errors import SiteError
from fedseal.client.flower_patches import set_message_id
from fedseal.client.policy import SiteRefusal
from fedseal.client.supernode import loopback_backoff
from fedseal.client.train_checkpoint import Preempted
from fedseal.settings import Environment, PullBackoff

#: How long a task may wait for its message's objects to reach the SuperNode. Flower's default
#: is two hours; a task whose objects never come (its run ended mid-transfer) must not block the
#: site for that long.
TASK_INPUT_TIMEOUT_S = 300.0


def pull_task_input(
    client: RuntimeHttpClient, max_time: float = TASK_INPUT_TIMEOUT_S, backoff: PullBackoff | None = None
) -> tuple[Any, Any, Any, Any]:
    """Flower's ``run_clientapp.pull_task_input`` with a bound on the object pull.

    The SuperNode hands out a task before it has pulled the message's objects from the
    coordinator, so the first object pulls usually find them not yet available; ``backoff``
    (default: the default ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` with the loopback cap of
    :func:`~fedseal.client.supernode.loopback_backoff`: 50 ms, then 0.1 s) is how long to wait
    before asking again, where Flower waits 1 s, then 2 s, ...

    Returns (message, context, run, fab).

    Raises:
        flwr.supercore.inflatable.inflatable_utils.ObjectPullError: The message's objects
            did not arrive within ``max_time`` seconds.
        RuntimeError: The SuperNode handed out a task without a message.
    """
    if backoff is None:
        backoff = loopback_backoff(Environment().pull_backoff)
    res = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=max_time,
        initial_backoff=backoff.initial_s,
        backoff_cap=backoff.cap_s,
    )
    set_message_id(message, tree.object_id)  # as Flower does: not in the deflated form
    return message, context, run, fab

__all__ = ["DescribesFailures", "PinnedExecutor"]

log = logging.getLogger("fedseal.client.executor")


_TRANSIENT_STATUS = frozenset({502, 503, 504})


def runtime_retry_invoker(max_time: float = 120.0) -> RetryInvoker:
    """Retries for calls to the SuperNode's Runtime API that never stop the site.

    Flower's ``make_simple_http_retry_invoker`` sends SIGINT to *its own process* when the
    Runtime API answers 401 (a revoked task token). That suits a ``flwr-clientapp`` process
    per task; here the executor lives in the ``fl-client run`` process, and a task whose token
    the SuperNode revoked (its run ended, e.g. the coordinator restarted) must fail alone,
    not stop the site. Transport errors and 502/503/504 are retried for up to ``max_time``
    seconds; any other HTTP status is raised at once.
    """

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in _TRANSIENT_STATUS

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=10),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=give_up,
    )


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a refused heartbeat (the task is gone) ends it quietly."""
    send = make_task_heartbeat_fn_http(client)
    gone = threading.Event()

    def beat() -> bool:
        if gone.is_set():
            return True
        try:
            return send()
        except httpx.HTTPStatusError as exc:
            log.warning("task heartbeat refused (HTTP %d): the task ended on the SuperNode", exc.response.status_code)
            gone.set()
            return True

    return beat


@runtime_checkable
class DescribesFailures(Protocol):
    """A ClientApp that says, in one line for the site's console, why it refused or failed a
    message (``None``: not one it describes)."""

    def describe_failure(self, message: Message, exc: Exception) -> str | None: ...


class PinnedExecutor:
    """Poll the SuperNode's Runtime API and answer each ClientApp task in-process.

    ``backoff``: how the task's object pulls retry (``fl-client run`` passes the loopback cap of
    its ``FEDSEAL_OBJECT_PULL_BACKOFF_S``; default: that of the default setting).
    """

    def __init__(
        self,
        runtime_api_address: str,
        client_app: ClientApp,
        poll_interval: float = 0.1,
        backoff: PullBackoff | None = None,
    ) -> None:
        self.address = runtime_api_address
        self.client_app = client_app
        self.poll_interval = poll_interval
        self.backoff = backoff if backoff is not None else loopback_backoff(Environment().pull_backoff)
        self.tasks_done = 0

    def _describe(self, message: Message | None, exc: Exception) -> str | None:
        """The ClientApp's own line for a failed task, if it describes it (never raises)."""
        if message is None or not isinstance(self.client_app, DescribesFailures):
            return None
        try:
            return self.client_app.describe_failure(message, exc)
        except Exception:  # a description must not hide the failure itself
            log.debug("describe_failure failed", exc_info=True)
            return None

    def _client(self, token: str | None) -> RuntimeHttpClient:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # loopback only: the SuperNode binds its Runtime API to 127.0.0.1
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=runtime_retry_invoker(),
        )

    def run_forever(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set."""
        poller = self._client(None)
        try:
            while not stop.is_set():
                try:
                    res = poller.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                    )
                except Exception as exc:  # the SuperNode may be restarting: retry, logged
                    log.warning("runtime API unavailable (%s); retrying", type(exc).__name__)
                    stop.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self._run_task(res.token)
                else:
                    stop.wait(self.poll_interval)
        finally:
            poller.close()

    def _run_task(self, token: str) -> None:
        client = self._client(token)
        heartbeat = HeartbeatSender(task_heartbeat(client))
        heartbeat.start()
        context = None
        status, details = SubStatus.FAILED, "fedseal ClientApp failed"
        reply: Message | None = None
        message: Message | None = None
        preempted = False
        try:
            message, context, run, fab = pull_task_input(client, backoff=self.backoff)
            log.info(
                "task for run %s: %s (FAB %s ignored: this site runs only its installed fedseal)",
                run.run_id, message.metadata.message_type, fab.hash_str[:12],
            )
            t0 = time.monotonic()
            reply = self.client_app(message=message, context=context)
            log.info("answered %s in %.2fs", message.metadata.message_type, time.monotonic() - t0)
            status, details = SubStatus.COMPLETED, ""
        except Preempted as exc:  # the site is stopping: its checkpoint is saved, nothing is sent
            log.info("%s", exc)
            reply, preempted = None, True  # no answer, no task end: the coordinator sends it again
        except Exception as exc:  # any failure is reported back to the coordinator, not swallowed
            kind = message.metadata.message_type if message is not None else None
            # A refusal is policy, not a fault: the reply's reason is the site's own line.
            details = str(exc) if isinstance(exc, SiteRefusal) else f"{type(exc).__name__}: {exc}"
            details = details[:500]
            line = self._describe(message, exc)
            if line is not None:  # the ClientApp's one line: round, what, why
                log.warning("%s", line)
                log.debug("traceback", exc_info=exc)
            elif isinstance(exc, SiteRefusal):  # one line, no traceback
                log.warning("%s: %s", kind, exc)
            elif isinstance(exc, SiteError):  # e.g. a broken recipe: one line that names it
                log.warning("%s: %s: %s", kind, type(exc).__name__, exc)
                log.debug("traceback", exc_info=exc)
            else:
                log.exception("ClientApp task failed")
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            # A task the SuperNode already ended (its run stopped) refuses these: that is
            # logged, and the executor goes on with the next task.
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:
                log.error("could not hand the reply to the SuperNode: %s: %s", type(exc).__name__, exc)
            try:
                if not preempted:  # a preempted task is left open (the site is going down)
                    push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as exc:
                log.error("could not report the task's end to the SuperNode: %s: %s", type(exc).__name__, exc)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks_done += 1
