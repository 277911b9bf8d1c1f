"""After a restart the coordinator pings its cohort; a site whose first ping failed is pinged again."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from fedseal.server import resume


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the task running in this process (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class PingGrid:
    """Answers each node's n-th ping as scripted: "ok", "error" (an error reply) or "silent"."""

    def __init__(self, script: dict[int, list[str]]) -> None:
        self.script = script
        self.pings: dict[int, int] = {n: 0 for n in script}
        self.replies: dict[str, Any] = {}

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            outcome = self.script[node][min(self.pings[node], len(self.script[node]) - 1)]
            self.pings[node] += 1
            mid = f"p{node}-{self.pings[node]}"
            ids.append(mid)
            if outcome != "silent":
                self.replies[mid] = SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node),
                    has_error=lambda outcome=outcome: outcome == "error",
                )
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def responsive(script: dict[int, list[str]], timeout: float = 5.0) -> tuple[list[int], dict[int, int]]:
    grid = PingGrid(script)
    alive = resume.responsive(grid, list(script), timeout, round_s=0.05)  # type: ignore[arg-type]
    return alive, grid.pings


def test_every_site_answering_at_once_needs_one_ping_each() -> None:
    assert responsive({1: ["ok"], 2: ["ok"], 3: ["ok"]}) == ([1, 2, 3], {1: 1, 2: 1, 3: 1})


def test_a_site_whose_first_ping_failed_is_pinged_again_and_counts() -> None:
    """Seen in CI's multi-host run: the first ping reached a SuperNode still clearing the old
    run's task; one failed ping must not make the resumed run fail for want of sites."""
    alive, pings = responsive({1: ["error", "ok"], 2: ["silent", "ok"], 3: ["ok"]})
    assert alive == [1, 2, 3]
    assert pings == {1: 2, 2: 2, 3: 1}  # only the ones that did not answer are pinged again


def test_a_site_that_never_answers_is_left_out_at_the_deadline() -> None:
    alive, pings = responsive({1: ["ok"], 2: ["silent"], 3: ["error"]}, timeout=0.5)
    assert alive == [1]
    assert pings[1] == 1 and pings[2] >= 2 and pings[3] >= 2
