"""Every patch the simulation applies to Flower's engine internals, in one place, behind one
version gate.

:mod:`fedseal.sim.engine` drives Flower 1.42's simulation engine (in-memory link state, Ray
backend) as ``flwr.simulation.run_simulation`` does, with these changes to the engine's
internals; ``tests/sim/test_flower_patches.py`` checks, per patch, that the replaced attribute
still exists with the signature and behaviour the patch assumes, so a Flower upgrade fails
there (and :func:`require_supported_flower` refuses to run) instead of running half-patched:

1. **Batched worker** (``vce_api.worker``, while :func:`batched_engine` is active): the
   messages waiting for one site actor go to it together (:func:`batched_worker`).
2. **Dispatcher woken on store** (``vce_api.add_messages_to_queue``, and a wrapper around the
   link state's ``store_message_ins``): the engine dispatches a message as soon as the
   ServerApp stores it, in one pass over the stored messages (:func:`wake_engine_on_store`).
3. **Exchange woken on reply** (a wrapper around the link state's ``store_message_res``): the
   ServerApp's exchange learns which of its messages got a reply (:func:`wake_exchange_on_reply`).
4. **Message ids** (:func:`set_message_id`): a reply made by the engine's worker gets its id
   written as Flower's worker writes it (``Metadata._message_id`` has no setter).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

from flwr.app import Context, Message

from fedseal.client.flower_patches import check_flower_version

__all__ = [
    "FLOWER_VERSIONS",
    "WAKE_ATTR",
    "batched_engine",
    "batched_worker",
    "require_supported_flower",
    "set_message_id",
    "undelivered_one_per_node",
    "wake_engine_on_store",
    "wake_exchange_on_reply",
]

log = logging.getLogger("fedseal.sim.flower_patches")

FLOWER_VERSIONS = ("1.42",)
"""The ``flwr`` minor versions these patches were written for (and tested against)."""


@functools.cache
def require_supported_flower() -> str:
    """The installed ``flwr`` version, checked once against :data:`FLOWER_VERSIONS`.

    Raises:
        RuntimeError: Another Flower is installed (the message names both).
    """
    installed = metadata.version("flwr")
    check_flower_version(installed, FLOWER_VERSIONS, "fedseal's simulation")
    return installed


def set_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` its id (``Metadata._message_id``, which has no setter), as Flower's
    engine worker does for the replies it puts in its queue."""
    message.metadata.__dict__["_message_id"] = message_id


def batched_worker(
    messageins_queue: queue.Queue[Message],
    messageres_queue: queue.Queue[Message],
    node_info_store: Mapping[int, Any],
    backend: Any,
    f_stop: threading.Event,
    metrics: Any,
    *,
    batch: int,
) -> None:
    """Flower 1.42's engine worker (``vce_api.worker``), handing the site actors the waiting
    messages together: up to ``batch`` per actor in one Ray call (``process_batch``).

    A Ray call costs the engine a few milliseconds beyond the ClientApp's own work (measured
    here: an exchange of 10 messages of 2 ms each took 34 ms one call per message, 18 ms in one
    call per actor), paid per message and per exchange. Each message is still run by its own
    site, in its pinned actor, in arrival order; a message that raises gets an error reply
    (the coordinator sees that site drop out) exactly as with Flower's worker.
    """
    from uuid import uuid4

    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    per_call = batch * max(1, len(getattr(backend, "actors", ())))
    while not f_stop.is_set():
        try:
            taken = [messageins_queue.get(timeout=1.0)]
        except queue.Empty:
            continue
        while len(taken) < per_call:
            try:
                taken.append(messageins_queue.get_nowait())
            except queue.Empty:
                break
        items: list[tuple[Message, Context]] = []
        for message in taken:
            try:
                store = node_info_store[message.metadata.dst_node_id]
                items.append((message, store.retrieve_context(run_id=message.metadata.run_id)))
            except Exception as ex:  # no context for this node: an error reply, as Flower's worker
                log.error("no context for node %s: %s", message.metadata.dst_node_id, ex)
                reply = Message(Error(code=ErrorCode.UNKNOWN, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message)
                set_message_id(reply, str(uuid4()))
                messageres_queue.put(reply)
        if not items:
            continue
        started = time.perf_counter()
        try:
            results = backend.process_batch(items, per_call=batch)
        except Exception as ex:  # the backend itself failed: every message gets an error reply
            log.error("the site actors failed a batch of %d messages: %s", len(items), ex)
            results = [(None, context, ErrorCode.UNKNOWN, f"{type(ex)}:<'{ex}'>") for _, context in items]
        share = (time.perf_counter() - started) / len(items)
        for (message, _), (out, context, code, reason) in zip(items, results, strict=True):
            metrics.add_clientapp_runtime(share)
            if out is None:
                log.error("site of node %s failed: %s", message.metadata.dst_node_id, reason)
                out = Message(Error(code=code, reason=reason), reply_to=message)
            else:
                node_info_store[message.metadata.dst_node_id].update_context(
                    message.metadata.run_id, context=context
                )
            set_message_id(out, str(uuid4()))
            messageres_queue.put(out)


@contextlib.contextmanager
def batched_engine(batch: int) -> Iterator[None]:
    """Make ``vce_api.run_api`` start :func:`batched_worker` threads (the name it submits)
    while the context is active."""
    require_supported_flower()
    from flwr.server.superlink.fleet.vce import vce_api

    flower_worker = vce_api.worker
    vce_api.worker = functools.partial(batched_worker, batch=batch)
    try:
        yield
    finally:
        vce_api.worker = flower_worker


WAKE_ATTR = "_fedseal_messages_stored"


def wake_exchange_on_reply(state: Any, grid: Any) -> None:
    """Tell the ServerApp's exchange which of its messages got a reply, as each is stored.

    :func:`fedseal.server.exchange.exchange_iter` polls with a back-off from 5 ms to 0.2 s,
    and each poll asked the link state for every pending message (work per message asked for:
    O(N^2) per stage). Here ``state.store_message_res`` records the message replied to in a
    :class:`~fedseal.server.exchange.ReplySignal` carried by the grid; the exchange's idle
    wait ends on its event and it asks only for the replied messages (all of them still every
    poll interval).
    """
    require_supported_flower()
    from fedseal.server.exchange import REPLY_SIGNAL_ATTR, ReplySignal

    signal = ReplySignal()
    store = state.store_message_res

    def store_message_res(message: Any) -> Any:
        result = store(message)
        signal.replied(str(message.metadata.reply_to_message_id))
        return result

    state.store_message_res = store_message_res
    setattr(grid, REPLY_SIGNAL_ATTR, signal)


def one_pass_readable(state: Any) -> bool:
    """Whether ``state`` is Flower's in-memory link state with the fields
    :func:`undelivered_one_per_node` reads (else the dispatcher asks node by node)."""
    return all(hasattr(state, name) for name in ("lock", "message_ins_store", "_check_stored_messages"))


def undelivered_one_per_node(state: Any, nodes: Mapping[int, int]) -> list[Message]:
    """The oldest undelivered message of every node in ``nodes``, marked delivered.

    What Flower's ``state.get_message_ins(node_id=n, limit=1)`` returns for each node ``n``,
    in one pass over the stored messages instead of one pass per node (each
    ``get_message_ins`` call walks and re-checks every stored message).
    """
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store.keys())
        state._check_stored_messages(set(ids))  # drops expired ones, as get_message_ins does
        taken: set[int] = set()
        out: list[Message] = []
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None:
                continue
            node = msg.metadata.dst_node_id
            if msg.metadata.delivered_at == "" and node in nodes and node not in taken:
                taken.add(node)
                out.append(msg)
        delivered_at = now().isoformat()
        for msg in out:
            msg.metadata.delivered_at = delivered_at
    return out


def wake_engine_on_store(state: Any) -> None:
    """Make the engine dispatch a message as soon as the ServerApp stores it, in one pass.

    Flower 1.42's engine moves messages from the link state to its workers in
    ``vce_api.add_messages_to_queue``, which asks every node for a message and then sleeps a
    fixed 0.1 s: each protocol stage waited up to that long before any site saw its message (a
    secure round has five stages, plain FedAvg one). Here ``state.store_message_ins`` sets an
    event and the dispatcher (rebound in ``vce_api``, the name ``run_api`` calls) waits on it
    instead, still at most 0.1 s so that ``f_stop`` is seen as before. And each look is one
    pass over the stored messages (:func:`undelivered_one_per_node`): Flower's
    ``get_message_ins`` walks every stored message per call, so asking N nodes cost O(N^2)
    checks per look; woken per stored message, that was O(N^3) per stage, and at N = 100 the
    dispatcher was the busiest thread of the ServerApp's process (py-spy). States without the
    event (another caller's run in this process) keep Flower's fixed tick; states without the
    fields the one pass reads are asked node by node. Applied to every arm of a run alike.
    """
    require_supported_flower()
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(state, WAKE_ATTR, None) is None:
        wake = threading.Event()
        store = state.store_message_ins

        def store_message_ins(message: Any) -> Any:
            result = store(message)
            wake.set()
            return result

        state.store_message_ins = store_message_ins
        setattr(state, WAKE_ATTR, wake)
    if getattr(vce_api.add_messages_to_queue, "fedseal_wakes", False):
        return

    def add_messages_to_queue(
        state: Any, queue: Any, nodes_mapping: Mapping[int, int], f_stop: threading.Event
    ) -> None:
        wake: threading.Event | None = getattr(state, WAKE_ATTR, None)
        one_pass = one_pass_readable(state)
        while not f_stop.is_set():
            if wake is not None:
                wake.clear()  # before the look: a message stored during it wakes the next one
            if one_pass:
                msgs = undelivered_one_per_node(state, nodes_mapping)
            else:
                msgs = [m for n in nodes_mapping for m in state.get_message_ins(node_id=n, limit=1)]
            for msg in msgs:
                queue.put(msg)
            if msgs and wake is not None:
                continue  # a node may hold another message: look again at once
            (wake if wake is not None else f_stop).wait(0.1)

    add_messages_to_queue.fedseal_wakes = True  # type: ignore[attr-defined]
    add_messages_to_queue.__wrapped__ = vce_api.add_messages_to_queue  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
