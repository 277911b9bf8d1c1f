"""A site that goes away mid-exchange and comes back (restarted: a preempted training) gets its
message again: Flower delivers a message once, so the exchange pushes it anew."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from fedseal.server import exchange as ex
from fedseal.server.exchange import MAX_REPUSHES, exchange


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        monkeypatch.setattr(ex.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(ex.time, "sleep", self.sleep)

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.01)


class RestartingGrid:
    """Node 2 is offline between t=2 s and t=5 s (restarted): it never answers what it pulled
    before going away, and answers what is pushed to it once it is back. Node 1 answers at once."""

    def __init__(self, clock: Clock, *, back_at: float = 5.0) -> None:
        self.clock = clock
        self.back_at = back_at
        self.pushed: list[tuple[str, int, float]] = []  # (id, node, time)

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed.append((mid, int(m.metadata.dst_node_id), self.clock.now))
            ids.append(mid)
        return ids

    def get_node_ids(self) -> list[int]:
        return [1] if 2.0 <= self.clock.now < self.back_at else [1, 2]

    def pull_messages(self, ids: list[str]) -> list[Any]:
        out = []
        for mid, node, at in self.pushed:
            if mid not in ids:
                continue
            if node == 1 or at >= self.back_at:  # node 2 answers only what it got after its restart
                out.append(SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node), has_error=lambda: False
                ))  # fmt: skip
        return out


def _messages() -> list[Any]:
    from flwr.app import ConfigRecord, Message, RecordDict

    return [
        Message(RecordDict({"c": ConfigRecord({"stage": "masked-input"})}), dst_node_id=node, message_type="train.x")
        for node in (1, 2)
    ]


def test_a_node_that_restarts_mid_exchange_gets_its_message_again_and_its_reply_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(monkeypatch)
    grid = RestartingGrid(clock)
    replies = exchange(grid, _messages(), timeout=30.0, poll=0.2)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    again = [(mid, node) for mid, node, at in grid.pushed if at > 0]
    assert again == [("m2", 2)]  # once, to node 2, after it came back
    assert clock.now < 10  # not the 30 s timeout


def test_a_node_that_never_comes_back_is_not_pushed_to_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    grid = RestartingGrid(clock, back_at=1e9)
    replies = exchange(grid, _messages(), timeout=20.0, poll=0.2)  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert len(grid.pushed) == 2


def test_a_node_that_keeps_flapping_is_pushed_to_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)

    class Flapping(RestartingGrid):
        def get_node_ids(self) -> list[int]:
            return [1] if int(self.clock.now) % 2 == 0 else [1, 2]  # away every other second

        def pull_messages(self, ids: list[str]) -> list[Any]:
            return [r for r in super().pull_messages(ids) if r.metadata.src_node_id == 1]

    grid = Flapping(clock, back_at=1e9)
    exchange(grid, _messages(), timeout=30.0, poll=0.2)  # type: ignore[arg-type]
    assert len(grid.pushed) == 2 + MAX_REPUSHES


class SuperLinkAnswering(RestartingGrid):
    """As Flower's SuperLink does: while node 2 is away, its pending message is answered by the
    SuperLink itself with "node unavailable" (from node 0)."""

    def pull_messages(self, ids: list[str]) -> list[Any]:
        from flwr.common.constant import ErrorCode

        out = super().pull_messages(ids)
        answered = {r.metadata.reply_to_message_id for r in out}
        for mid, node, _at in self.pushed:
            if mid in ids and mid not in answered and node not in self.get_node_ids():
                out.append(SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=0),
                    has_error=lambda: True,
                    error=SimpleNamespace(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                ))  # fmt: skip
        return out


def test_the_superlinks_node_unavailable_answer_is_held_while_the_node_may_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(monkeypatch)
    grid = SuperLinkAnswering(clock)
    replies = exchange(grid, _messages(), timeout=30.0, poll=0.2)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]  # node 2's own answer, not node 0's
    assert [node for _mid, node, at in grid.pushed if at > 0] == [2]


def test_a_node_unavailable_answer_is_handed_on_once_the_grace_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    grid = SuperLinkAnswering(clock, back_at=1e9)
    replies = exchange(grid, _messages(), timeout=ex.REJOIN_GRACE_S + 30, poll=0.2)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [0, 1]
    assert clock.now < ex.REJOIN_GRACE_S + 10  # at the grace, not the timeout
