"""exchange_iter: replies come as they arrive, at most `batch` per pull, until all came or time ran out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from fedseal.server.exchange import exchange, exchange_iter


class FakeGrid:
    """Each pushed message is answered after `delay[i]` pulls; records the size of every pull."""

    def __init__(self, delays: list[int | None]) -> None:
        self.delays = delays
        self.pulls: list[int] = []
        self.calls = 0

    def push_messages(self, messages: list[Any]) -> list[str]:
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids: list[str]) -> list[Any]:
        self.calls += 1
        ready = [
            i for i in ids
            if self.delays[int(i[1:])] is not None and self.calls > self.delays[int(i[1:])]  # type: ignore[operator]
        ]
        self.pulls.append(len(ready))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_all_replies_arrive_and_no_pull_holds_more_than_the_batch() -> None:
    grid = FakeGrid([0] * 40)
    got = [m.metadata.reply_to_message_id for m in exchange_iter(grid, [object()] * 40, timeout=5, poll=0, batch=16)]  # type: ignore[arg-type]
    assert sorted(got) == sorted(f"m{i}" for i in range(40))
    assert max(grid.pulls) <= 16


def test_a_site_that_never_answers_ends_the_exchange_at_the_timeout() -> None:
    grid = FakeGrid([0, 2, None])
    got = exchange(grid, [object()] * 3, timeout=0.2, poll=0.01)  # type: ignore[arg-type]
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1"]


def test_replies_are_yielded_before_the_slow_ones_arrive() -> None:
    grid = FakeGrid([0, 50])
    it = exchange_iter(grid, [object()] * 2, timeout=5, poll=0, batch=16)  # type: ignore[arg-type]
    first = next(it)
    assert first.metadata.reply_to_message_id == "m0" and grid.calls == 1
    assert next(it).metadata.reply_to_message_id == "m1"


def test_empty_pulls_back_off_from_milliseconds_to_the_poll_and_start_again_after_a_reply(monkeypatch: Any) -> None:
    import fedseal.server.exchange as fa

    sleeps: list[float] = []
    monkeypatch.setattr(fa.time, "sleep", sleeps.append)
    # m0 answers at the 8th pull, m1 at the 11th: 7 empty pulls, a reply, then 2 empty pulls.
    grid = FakeGrid([7, 10])
    got = exchange(grid, [object()] * 2, timeout=60, poll=0.2)  # type: ignore[arg-type]
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1"]
    first = fa.MIN_POLL_S
    assert sleeps[:7] == [first, 2 * first, 4 * first, 8 * first, 16 * first, 32 * first, 0.2]
    assert sleeps[7:] == [first, 2 * first]  # the reply reset the back-off


def test_a_grid_with_a_reply_signal_waits_on_its_event_not_the_clock(monkeypatch: Any) -> None:
    """The simulation engine's grid carries a ReplySignal: the exchange's idle waits are waits
    on its event (ended by a stored reply), never plain sleeps."""
    import threading

    import fedseal.server.exchange as fa

    monkeypatch.setattr(fa.time, "sleep", lambda s: (_ for _ in ()).throw(AssertionError("slept")))

    class Arrivals(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.waits: list[float] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.waits.append(float(timeout or 0))
            return True  # "a reply was stored": the loop looks again at once

    signal = fa.ReplySignal()
    signal.event = Arrivals()
    grid = FakeGrid([3])  # answered on the 4th pull
    setattr(grid, fa.REPLY_SIGNAL_ATTR, signal)
    got = exchange(grid, [object()], timeout=60, poll=0.0)  # type: ignore[arg-type]  # poll 0: every look asks for all
    assert [m.metadata.reply_to_message_id for m in got] == ["m0"]
    assert grid.calls == 4 and len(signal.event.waits) == 3


def test_with_a_reply_signal_only_the_replied_messages_are_asked_for() -> None:
    """Asking for every pending message after each reply made a stage O(N^2) on the link state."""
    import fedseal.server.exchange as fa

    asked: list[list[str]] = []

    class SignalGrid(FakeGrid):
        def __init__(self) -> None:
            super().__init__([0] * 40)
            self.signal = fa.ReplySignal()
            setattr(self, fa.REPLY_SIGNAL_ATTR, self.signal)

        def push_messages(self, messages: list[Any]) -> list[str]:
            ids = super().push_messages(messages)
            for i in ("m3", "m17", "m38"):  # three sites answered so far
                self.signal.replied(i)
            return ids

        def pull_messages(self, ids: list[str]) -> list[Any]:
            asked.append(list(ids))
            return super().pull_messages(ids)

    grid = SignalGrid()
    it = exchange_iter(grid, [object()] * 40, timeout=60, poll=30.0, batch=16)  # type: ignore[arg-type]
    first = [next(it).metadata.reply_to_message_id for _ in range(3)]
    assert sorted(first) == ["m17", "m3", "m38"]
    assert asked == [["m3", "m17", "m38"]]  # one pull, of exactly the replied messages


def test_a_reply_the_signal_missed_is_still_found_by_the_periodic_full_look() -> None:
    import fedseal.server.exchange as fa

    grid = FakeGrid([0, 0])
    setattr(grid, fa.REPLY_SIGNAL_ATTR, fa.ReplySignal())  # never told of any reply
    got = exchange(grid, [object()] * 2, timeout=60, poll=0.01)  # type: ignore[arg-type]
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1"]
