"""The simulation engine's dispatcher is woken by a stored message instead of a fixed 0.1 s tick."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api

import fedseal.sim.engine as engine
import fedseal.sim.flower_patches as flower_patches
from fedseal.sim.flower_patches import WAKE_ATTR as _WAKE_ATTR
from fedseal.sim.flower_patches import wake_engine_on_store as _wake_engine_on_store


def msg(node: int, name: str) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node), name=name)


class FakeLinkState:
    """Messages per node, handed out once each (as the link state marks them delivered)."""

    def __init__(self, nodes: list[int]) -> None:
        self.inbox: dict[int, list[Any]] = {n: [] for n in nodes}
        self.asked: list[int] = []

    def store_message_ins(self, message: Any) -> str:
        self.inbox[message.metadata.dst_node_id].append(message)
        return str(message.name)

    def get_message_ins(self, node_id: int, limit: int) -> list[Any]:
        self.asked.append(node_id)
        out = self.inbox[node_id][:limit]
        del self.inbox[node_id][:limit]
        return out


def _dispatch(state: Any, nodes: list[int]) -> tuple[queue.Queue[Any], threading.Event, threading.Thread]:
    out: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, {n: n for n in nodes}, stop))
    thread.start()
    return out, stop, thread


def test_storing_a_message_sets_the_wake_event_and_the_dispatcher_hands_it_to_the_workers() -> None:
    state = FakeLinkState([1, 2])
    _wake_engine_on_store(state)
    _wake_engine_on_store(state)  # idempotent: one wrapper, one event
    wake = getattr(state, _WAKE_ATTR)
    assert not wake.is_set()
    assert state.store_message_ins(msg(2, "m-a")) == "m-a"  # the wrapper returns the store's result
    assert wake.is_set()
    out, stop, thread = _dispatch(state, [1, 2])
    try:
        assert out.get(timeout=10).name == "m-a"
        state.store_message_ins(msg(1, "m-b"))
        assert out.get(timeout=10).name == "m-b"
        assert out.empty()  # each message dispatched once
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()  # f_stop still ends the dispatcher


def test_a_link_state_without_the_event_keeps_flowers_tick_and_still_gets_its_messages() -> None:
    _wake_engine_on_store(FakeLinkState([7]))  # rebinds the dispatcher
    assert getattr(vce_api.add_messages_to_queue, "fedseal_wakes", False)
    plain = FakeLinkState([3])
    plain.store_message_ins(msg(3, "m-c"))
    out, stop, thread = _dispatch(plain, [3])
    try:
        assert out.get(timeout=10).name == "m-c"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def _real_link_state(nodes: int) -> tuple[Any, dict[int, int], Any]:
    """Flower's in-memory link state with a run and ``nodes`` registered nodes, and its grid."""
    link = engine.in_memory_link(nodes)
    return link.state, link.mapping, link.grid


def test_one_pass_gives_what_flowers_per_node_calls_give() -> None:
    """`_undelivered_one_per_node` = `get_message_ins(node_id=n, limit=1)` for every node,
    in one pass: the oldest undelivered message per node, each handed out once."""
    from flwr.app import Message, RecordDict

    state, mapping, grid = _real_link_state(4)
    a, b, c, _ = list(mapping)
    assert flower_patches.one_pass_readable(state)
    pushed = list(grid.push_messages([
        Message(RecordDict(), dst_node_id=n, message_type="train") for n in (a, b, a, c)
    ]))
    first = flower_patches.undelivered_one_per_node(state, mapping)
    assert [m.metadata.message_id for m in first] == [pushed[0], pushed[1], pushed[3]]
    assert all(m.metadata.delivered_at for m in first)
    assert state.get_message_ins(node_id=b, limit=1) == []  # delivered: Flower agrees
    second = flower_patches.undelivered_one_per_node(state, mapping)
    assert [m.metadata.message_id for m in second] == [pushed[2]]  # a's next, oldest first
    assert flower_patches.undelivered_one_per_node(state, mapping) == []
    assert flower_patches.undelivered_one_per_node(state, {}) == []  # unmapped nodes get nothing


def test_the_real_dispatcher_hands_every_stored_message_to_the_workers_once() -> None:
    from flwr.app import Message, RecordDict

    state, mapping, grid = _real_link_state(3)  # the wake-up is installed
    nodes = list(mapping)
    out, stop, thread = _dispatch(state, nodes)
    try:
        pushed = list(grid.push_messages([
            Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes + nodes[:1]
        ]))
        got = sorted(out.get(timeout=10).metadata.message_id for _ in range(4))
        assert got == sorted(pushed)
        assert out.empty()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
