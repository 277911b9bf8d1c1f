"""exchange_iter re-pulls reply objects not yet uploaded after 50 ms, not Flower's fixed 1 s."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.superlink.grid import http_grid

from fedseal.server import flower_app
from fedseal.server.flower_app import ENV_PULL_BACKOFF, exchange, reply_pull_backoff


def test_the_reply_backoff_defaults_to_50ms_and_rejects_bad_values() -> None:
    assert reply_pull_backoff({}) == (0.05, 0.25)
    assert reply_pull_backoff({ENV_PULL_BACKOFF: "1"}) == (1.0, 5.0)  # Flower's first retry
    with pytest.raises(ValueError, match="number of seconds"):
        reply_pull_backoff({ENV_PULL_BACKOFF: "later"})
    with pytest.raises(ValueError, match=r"between 0\.01 and 1"):
        reply_pull_backoff({ENV_PULL_BACKOFF: "3"})


def test_an_exchange_makes_the_grids_object_pulls_use_the_short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def flower_pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        seen.append(kwargs)
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", flower_pull_objects)
    monkeypatch.delenv(ENV_PULL_BACKOFF, raising=False)

    class NoReplies:
        def push_messages(self, messages: list[Any]) -> list[str]:
            return []

    assert exchange(NoReplies(), [], timeout=1) == []  # type: ignore[arg-type]
    http_grid.pull_objects(["o"], pull_object_fn=None)
    assert seen[-1]["initial_backoff"] == 0.05 and seen[-1]["backoff_cap"] == 0.25

    # A second exchange with another setting rebinds the original, not a wrapper of a wrapper.
    monkeypatch.setenv(ENV_PULL_BACKOFF, "1")
    exchange(NoReplies(), [], timeout=1)  # type: ignore[arg-type]
    assert http_grid.pull_objects.__wrapped__ is flower_pull_objects  # type: ignore[attr-defined]
    http_grid.pull_objects(["o"], pull_object_fn=None, backoff_cap=3.0)  # an explicit value wins
    assert seen[-1]["initial_backoff"] == 1.0 and seen[-1]["backoff_cap"] == 3.0


def test_a_bad_backoff_setting_fails_the_exchange_before_anything_is_pushed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    monkeypatch.setenv(ENV_PULL_BACKOFF, "0")
    pushed: list[Any] = []

    class Grid:
        def push_messages(self, messages: list[Any]) -> list[str]:
            pushed.extend(messages)
            return []

    with pytest.raises(ValueError, match=ENV_PULL_BACKOFF):
        flower_app.exchange(Grid(), [object()], timeout=1)  # type: ignore[arg-type]
    assert pushed == []
