"""The simulation engine's dispatcher is woken by a stored message instead of a fixed 0.1 s tick."""

from __future__ import annotations

import queue
import threading
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api

from fedseal.server.simulate import _WAKE_ATTR, _wake_engine_on_store


class FakeLinkState:
    """Messages per node, handed out once each (as the link state marks them delivered)."""

    def __init__(self, nodes: list[int]) -> None:
        self.inbox: dict[int, list[Any]] = {n: [] for n in nodes}

    def store_message_ins(self, message: tuple[int, str]) -> str:
        self.inbox[message[0]].append(message)
        return message[1]

    def get_message_ins(self, node_id: int, limit: int) -> list[Any]:
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
    assert state.store_message_ins((2, "m-a")) == "m-a"  # the wrapper returns the store's result
    assert wake.is_set()
    out, stop, thread = _dispatch(state, [1, 2])
    try:
        assert out.get(timeout=10) == (2, "m-a")
        state.store_message_ins((1, "m-b"))
        assert out.get(timeout=10) == (1, "m-b")
        assert out.empty()  # each message dispatched once
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()  # f_stop still ends the dispatcher


def test_a_link_state_without_the_event_keeps_flowers_tick_and_still_gets_its_messages() -> None:
    _wake_engine_on_store(FakeLinkState([7]))  # rebinds the dispatcher
    assert getattr(vce_api.add_messages_to_queue, "fedseal_wakes", False)
    plain = FakeLinkState([3])
    plain.store_message_ins((3, "m-c"))
    out, stop, thread = _dispatch(plain, [3])
    try:
        assert out.get(timeout=10) == (3, "m-c")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
