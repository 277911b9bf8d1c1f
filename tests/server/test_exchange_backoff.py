"""The ServerApp re-pulls reply objects not yet uploaded after 50 ms, not Flower's fixed 1 s."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.superlink.grid import http_grid

from fedseal.server import flower_app, flower_patches
from fedseal.settings import OBJECT_PULL_BACKOFF as ENV_PULL_BACKOFF
from fedseal.settings import Environment


def reply_pull_backoff(env: dict[str, str]) -> tuple[float, float]:
    backoff = Environment.read(env).pull_backoff
    return backoff.initial_s, backoff.cap_s


def test_the_reply_backoff_defaults_to_50ms_and_rejects_bad_values() -> None:
    assert reply_pull_backoff({}) == (0.05, 0.25)
    assert reply_pull_backoff({ENV_PULL_BACKOFF: "1"}) == (1.0, 5.0)  # Flower's first retry
    with pytest.raises(ValueError, match="number of seconds"):
        reply_pull_backoff({ENV_PULL_BACKOFF: "later"})
    with pytest.raises(ValueError, match=r"between 0\.01 and 1"):
        reply_pull_backoff({ENV_PULL_BACKOFF: "3"})


def test_the_serverapps_start_makes_the_grids_object_pulls_use_the_short_backoff(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []

    def flower_pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        seen.append(kwargs)
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", flower_pull_objects)
    installed: list[tuple[float, float]] = []
    real_install = flower_patches.fast_reply_pulls

    def install(initial: float, cap: float) -> None:
        installed.append((initial, cap))
        real_install(initial, cap)

    class Stop(Exception):
        pass

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise Stop  # the patch is installed first; the run itself is not needed here

    monkeypatch.setattr(flower_patches, "fast_reply_pulls", install)
    monkeypatch.setattr(flower_app, "Run", no_run)

    class NoReplies:
        def push_messages(self, messages: list[Any]) -> list[str]:
            return []

    def start(env: dict[str, str], state_dir: Path) -> None:
        cfg = SimpleNamespace(coordinator=SimpleNamespace(state_dir=state_dir), run=SimpleNamespace(secure=True))
        with pytest.raises(Stop):
            flower_app.run_federation(NoReplies(), cfg, resume=False, environment=Environment.read(env))  # type: ignore[arg-type]

    start({}, tmp_path / "first")
    http_grid.pull_objects(["o"], pull_object_fn=None)
    assert seen[-1]["initial_backoff"] == 0.05 and seen[-1]["backoff_cap"] == 0.25

    # A second start with another setting rebinds the original, not a wrapper of a wrapper.
    start({ENV_PULL_BACKOFF: "1"}, tmp_path / "second")
    assert installed == [(0.05, 0.25), (1.0, 5.0)]
    assert http_grid.pull_objects.__wrapped__ is flower_pull_objects  # type: ignore[attr-defined]
    http_grid.pull_objects(["o"], pull_object_fn=None, backoff_cap=3.0)  # an explicit value wins
    assert seen[-1]["initial_backoff"] == 1.0 and seen[-1]["backoff_cap"] == 3.0


def test_a_bad_backoff_setting_fails_the_serverapp_before_anything_is_pushed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    monkeypatch.setenv(ENV_PULL_BACKOFF, "0")
    pushed: list[Any] = []

    class Grid:
        def push_messages(self, messages: list[Any]) -> list[str]:
            pushed.extend(messages)
            return []

    context = SimpleNamespace(run_config={"fedseal-config": "/nonexistent/server.toml"})
    with pytest.raises(ValueError, match=ENV_PULL_BACKOFF):
        flower_app.server_main(Grid(), context)  # type: ignore[arg-type]
    assert pushed == []
