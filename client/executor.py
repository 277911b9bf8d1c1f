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

Usage::

    executor = PinnedExecutor("127.0.0.1:9094", client_app)
    executor.run_forever(stop_event)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

__all__ = ["PinnedExecutor"]

log = logging.getLogger("fedseal.client.executor")


class PinnedExecutor:
    """Poll the SuperNode's Runtime API and answer each ClientApp task in-process."""

    def __init__(self, runtime_api_address: str, client_app: ClientApp, poll_interval: float = 0.1) -> None:
        self.address = runtime_api_address
        self.client_app = client_app
        self.poll_interval = poll_interval
        self.tasks_done = 0

    def _client(self, token: str | None) -> RuntimeHttpClient:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # loopback only: the SuperNode binds its Runtime API to 127.0.0.1
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
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
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = None
        status, details = SubStatus.FAILED, "fedseal ClientApp failed"
        reply: Message | None = None
        message: Message | None = None
        try:
            message, context, run, fab = pull_task_input(client)
            log.info(
                "task for run %s: %s (FAB %s ignored: this site runs only its installed fedseal)",
                run.run_id, message.metadata.message_type, fab.hash_str[:12],
            )
            t0 = time.monotonic()
            reply = self.client_app(message=message, context=context)
            log.info("answered %s in %.2fs", message.metadata.message_type, time.monotonic() - t0)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # any failure is reported back to the coordinator, not swallowed
            log.exception("ClientApp task failed")
            details = f"{type(exc).__name__}: {exc}"[:500]
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                push_task_output(client=client, context=context, sub_status=status, details=details)
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                self.tasks_done += 1
