"""The coordinator's transport over Flower's ``Grid``: push messages, pull their replies.

Usage::

    for reply in exchange_iter(grid, messages, timeout=stage_timeout_s):  # as they arrive
        ...
    replies = exchange(grid, messages, timeout)          # all of them (small replies)
    view = FixedNodes(grid, sampled_nodes)               # what a strategy samples from
    record = arrays_to_record(arrays)                    # model arrays <-> ArrayRecord

Replies are polled with a back-off from :data:`MIN_POLL_S` to ``poll`` (Flower's own
``send_and_receive`` sleeps 3 s between pulls), at most ``batch`` at a time; reply objects not
yet uploaded are re-pulled after ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (a Flower patch,
:func:`fedseal.server.flower_patches.fast_reply_pulls`, installed when the ServerApp starts:
:func:`fedseal.server.flower_app.run_federation`). A grid whose replies are stored in this
process (the simulation engine) can carry a :class:`ReplySignal`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

__all__ = [
    "MAX_REPUSHES",
    "MIN_POLL_S",
    "REJOIN_CHECK_S",
    "REJOIN_GRACE_S",
    "REPLY_SIGNAL_ATTR",
    "FixedNodes",
    "ReplySignal",
    "arrays_to_record",
    "exchange",
    "exchange_iter",
    "record_to_arrays",
]

log = logging.getLogger("fedseal.server")


#: First wait between empty pulls of an exchange; it doubles up to the exchange's ``poll``.
MIN_POLL_S = 0.005


class ReplySignal:
    """What a grid whose replies are stored in this process (the simulation engine) can tell
    an exchange: which of its messages have a reply waiting, and an event set on every stored
    reply. Carried by the grid as :data:`REPLY_SIGNAL_ATTR` (optional)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._replied: set[str] = set()

    def replied(self, message_id: str) -> None:
        """A reply to message ``message_id`` was stored."""
        with self._lock:
            self._replied.add(message_id)
        self.event.set()

    def take(self) -> set[str]:
        """The messages replied to since the last call."""
        with self._lock:
            replied, self._replied = self._replied, set()
        return replied


#: Attribute of a grid holding a :class:`ReplySignal` (optional).
REPLY_SIGNAL_ATTR = "fedseal_reply_signal"

#: How often an exchange asks which nodes are online (a node that went away and came back has
#: its message pushed again: a restarted site never sees a message it had pulled before).
REJOIN_CHECK_S = 1.0
#: Times one exchange pushes a message again to one node that came back.
MAX_REPUSHES = 2
#: How long the SuperLink's "node unavailable" answer is held back for a node to come back.
REJOIN_GRACE_S = 60.0


def _again(message: Message) -> Message:
    """A new message with ``message``'s content, destination and type (a new message id)."""
    meta = message.metadata
    return Message(
        message.content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
        group_id=meta.group_id,
    )  # fmt: skip


class _Rejoins:
    """Which pending messages' nodes went away and came back (Flower delivers a message once:
    a site restarted after pulling it, e.g. a preempted training, would wait for it forever).
    Each such message is pushed again, at most :data:`MAX_REPUSHES` times per node.

    While a node is away the SuperLink answers its message itself ("node unavailable", from
    node id 0): that answer is held back for :data:`REJOIN_GRACE_S` (the node may come back and
    answer), then handed on as before."""

    def __init__(self, grid: Grid, ids: list[str], messages: list[Message]) -> None:
        self.grid = grid
        self.origin = dict(zip(ids, messages, strict=True))
        self.away: set[int] = set()
        self.repushed: dict[int, int] = {}
        self.held: dict[str, tuple[Message, float]] = {}  # message id -> (the SuperLink's answer, until)
        self.last = time.monotonic()

    def _node(self, mid: str) -> int:
        return int(self.origin[mid].metadata.dst_node_id)

    def hold(self, reply: Message) -> bool:
        """Hold ``reply`` back if it is the SuperLink's "node unavailable" for one of ours."""
        mid = reply.metadata.reply_to_message_id
        if mid not in self.origin or not reply.has_error() or reply.error.code != ErrorCode.NODE_UNAVAILABLE:
            return False
        self.away.add(self._node(mid))
        self.held[mid] = (reply, time.monotonic() + REJOIN_GRACE_S)
        return True

    def check(self, pending: list[str]) -> tuple[list[str], list[Message]]:
        """``pending`` with the ids of messages pushed again replaced by their new ids, and the
        held answers whose grace ran out (those messages are no longer pending)."""
        if time.monotonic() - self.last < REJOIN_CHECK_S:
            return pending, []
        self.last = now = time.monotonic()
        online = set(self.grid.get_node_ids())
        out: list[str] = []
        released: list[Message] = []
        for mid in pending:
            node = self._node(mid)
            if node not in online:
                self.away.add(node)
            elif node in self.away and self.repushed.get(node, 0) < MAX_REPUSHES:
                self.away.discard(node)
                self.repushed[node] = self.repushed.get(node, 0) + 1
                [new_id] = self.grid.push_messages([_again(self.origin[mid])])
                self.origin[new_id] = self.origin.pop(mid)
                self.held.pop(mid, None)
                log.info("exchange: node %d went away and came back; its message pushed again", node)
                mid = new_id
            held = self.held.get(mid)
            if held is not None and now >= held[1]:
                del self.held[mid]
                released.append(held[0])
                continue
            out.append(mid)
        return out, released


def exchange_iter(
    grid: Grid, messages: Iterable[Message], timeout: float, poll: float = 0.2, batch: int = 16
) -> Iterator[Message]:
    """Push ``messages``, then yield replies as they arrive until all came or ``timeout`` passed.

    A node that goes away while its message is pending (not among ``grid.get_node_ids()``,
    asked every :data:`REJOIN_CHECK_S`) and comes back has the message pushed again (a new
    message id, the same content; at most :data:`MAX_REPUSHES` times): a site restarted after
    pulling it (a preempted training) gets it again, and its persisted round state decides what
    to answer (the same reply it may have sent, never a second one). The SuperLink's own "node
    unavailable" answer for such a node is held back for :data:`REJOIN_GRACE_S` (within the
    timeout), then yielded as before.

    Same contract as ``Grid.send_and_receive`` but polls with a back-off from
    :data:`MIN_POLL_S` up to ``poll`` seconds, starting again after every reply (Flower's own
    implementation sleeps 3 s between pulls, which adds up over a multi-stage round: a reply
    that comes within milliseconds, as on the simulation engine, is seen within milliseconds,
    and an idle wait costs at most one pull per ``poll``), and pulls
    at most ``batch`` replies at a time, so a caller that consumes each reply before asking for
    the next (the secure round adds each masked vector to one running sum) holds at most
    ``batch`` replies in memory, however many sites there are. Reply objects not yet uploaded
    are re-pulled after ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (50 ms) instead of Flower's 1 s (the
    patch :func:`~fedseal.server.flower_app.run_federation` installs).

    A grid carrying a :class:`ReplySignal` (the simulation engine) is asked only for the
    messages it says have replies, and its event ends the idle wait; every ``poll`` seconds all
    pending messages are asked for anyway. (Each pull costs the link state work per message
    asked for: asking for all N pending messages after each of N replies was O(N^2) per stage.)
    """
    signal: ReplySignal | None = getattr(grid, REPLY_SIGNAL_ATTR, None)
    messages = list(messages)
    started = time.monotonic()
    log.info("exchange: pushing %d messages", len(messages))
    pending = list(grid.push_messages(messages))
    total = len(pending)
    # A grid whose nodes are this process's (the simulation) never loses one mid-exchange.
    rejoins = (
        _Rejoins(grid, pending, messages)
        if signal is None and callable(getattr(grid, "get_node_ids", None))
        else None
    )
    del messages
    log.debug("exchange: pushed; polling")
    deadline = time.monotonic() + timeout
    wait = min(MIN_POLL_S, poll)
    hinted: set[str] = set()
    last_full = time.monotonic()
    while pending:
        if signal is None:
            candidates = [m for m in pending if rejoins is None or m not in rejoins.held]
        else:
            signal.event.clear()  # before taking: a reply stored after it ends the next wait
            hinted |= signal.take()
            if time.monotonic() - last_full >= poll:
                last_full = time.monotonic()
                candidates = pending
            else:
                candidates = [m for m in pending if m in hinted]
        got_any = False
        for start in range(0, len(candidates), batch):
            window = candidates[start:start + batch]
            got = list(grid.pull_messages(window))
            hinted.difference_update(window)
            if not got:
                continue
            got_any = True
            wait = min(MIN_POLL_S, poll)
            if rejoins is not None:  # "node unavailable": held, the node may come back
                got = [m for m in got if not rejoins.hold(m)]
            answered = {m.metadata.reply_to_message_id for m in got}
            pending = [m for m in pending if m not in answered]
            log.debug("exchange: %d replies, %d pending", len(got), len(pending))
            yield from got
            del got
        if not pending or time.monotonic() >= deadline:
            break
        if rejoins is not None:
            pending, released = rejoins.check(pending)
            yield from released
        if not got_any:
            idle = min(wait, max(0.0, deadline - time.monotonic()))
            if signal is not None:
                signal.event.wait(idle)
            else:
                time.sleep(idle)
            wait = min(2 * wait, poll)
    log.info(
        "exchange: %d of %d replied in %.2fs", total - len(pending), total, time.monotonic() - started
    )


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, poll: float = 0.2) -> list[Message]:
    """All replies of :func:`exchange_iter` as a list (small replies: evaluation, pings)."""
    return list(exchange_iter(grid, messages, timeout, poll))


class FixedNodes:
    """A view of the grid whose node list is the sample we chose (strategies sample from it)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def record_to_arrays(rec: ArrayRecord) -> dict[str, npt.NDArray[Any]]:
    """The arrays of a Flower ``ArrayRecord`` by name."""
    return {k: v.numpy() for k, v in rec.items()}


def arrays_to_record(arrays: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord:
    """Named arrays as a Flower ``ArrayRecord``."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
