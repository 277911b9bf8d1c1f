"""The simulation engine's dispatcher is woken by a stored message instead of a fixed 0.1 s tick."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.server.superlink.fleet.vce import vce_api

import fedseal.server.simulate as simulate
from fedseal.server.simulate import _WAKE_ATTR, _wake_engine_on_store


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
    wake = getattr(state, _WAKE_ATTR).event
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


def test_the_dispatcher_asks_only_the_nodes_that_got_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `get_message_ins` walks every stored message: asking all N nodes per stored
    message made a stage O(N^3). Two messages for one node are both dispatched."""
    monkeypatch.setattr(simulate, "FULL_SCAN_S", 1e12)  # no fallback full scan in this test
    nodes = list(range(50))
    state = FakeLinkState(nodes)
    _wake_engine_on_store(state)
    out, stop, thread = _dispatch(state, nodes)
    try:
        state.store_message_ins(msg(7, "m-1"))
        state.store_message_ins(msg(7, "m-2"))
        state.store_message_ins(msg(30, "m-3"))
        got = sorted(out.get(timeout=10).name for _ in range(3))
        assert got == ["m-1", "m-2", "m-3"]
    finally:
        stop.set()
        thread.join(timeout=10)
    assert set(state.asked) == {7, 30}


def test_the_dispatcher_still_scans_every_node_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulate, "FULL_SCAN_S", 0.0)
    state = FakeLinkState([1, 2, 3])
    _wake_engine_on_store(state)
    state.inbox[3].append(msg(3, "stored-around-the-wrapper"))
    out, stop, thread = _dispatch(state, [1, 2, 3])
    try:
        assert out.get(timeout=10).name == "stored-around-the-wrapper"
    finally:
        stop.set()
        thread.join(timeout=10)
