"""The SuperLink launcher: Flower's per-request state clean-up runs at most once per interval."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from fedseal.server import superlink


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cleanup_interval_defaults_to_one_second_and_validates() -> None:
    assert superlink.cleanup_interval({}) == superlink.DEFAULT_CLEANUP_S == 1.0
    assert superlink.cleanup_interval({superlink.ENV_CLEANUP: "0"}) == 0.0
    with pytest.raises(ValueError, match="number of seconds"):
        superlink.cleanup_interval({superlink.ENV_CLEANUP: "often"})
    with pytest.raises(ValueError, match=r"between 0 and 10"):
        superlink.cleanup_interval({superlink.ENV_CLEANUP: "-1"})


def test_a_throttled_cleanup_runs_once_per_interval_and_per_state_object() -> None:
    runs: list[str] = []
    clock = Clock()

    class State:
        def __init__(self, name: str) -> None:
            self.name = name

    cleanup = superlink.throttled(lambda self: runs.append(self.name), 1.0, clock)
    a, b = State("a"), State("b")
    cleanup(a)
    cleanup(a)  # same instant: skipped
    cleanup(b)  # another state object has its own schedule
    clock.now += 0.99
    cleanup(a)
    clock.now += 0.02
    cleanup(a)
    assert runs == ["a", "b", "a"]


def test_a_cleanup_that_raises_propagates_and_counts_as_run() -> None:
    clock = Clock()
    calls = []

    def failing(self: object) -> None:
        calls.append(1)
        raise RuntimeError("database locked")

    cleanup = superlink.throttled(failing, 1.0, clock)
    state = object.__new__(type("S", (), {}))
    with pytest.raises(RuntimeError, match="database locked"):
        cleanup(state)
    cleanup(state)  # within the interval: not retried at once
    assert calls == [1]


def test_install_throttles_flowers_sql_state_and_zero_leaves_it_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supercore.corestate.sql_corestate")
    original = module.SqlCoreState._cleanup_expired_task_tokens
    monkeypatch.setattr(module.SqlCoreState, "_cleanup_expired_task_tokens", original)
    superlink.install(0.0)
    assert module.SqlCoreState._cleanup_expired_task_tokens is original
    superlink.install(1.0)
    superlink.install(2.0)  # re-installing wraps Flower's method, not the wrapper
    patched = module.SqlCoreState._cleanup_expired_task_tokens
    assert patched is not original and patched.__wrapped__ is original
    # SqlLinkState (the SuperLink's state) inherits the throttled method.
    linkstate = importlib.import_module("flwr.server.superlink.linkstate.sql_linkstate")
    assert linkstate.SqlLinkState._cleanup_expired_task_tokens is patched


def test_install_refuses_a_flower_without_the_method(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supercore.corestate.sql_corestate")
    monkeypatch.delattr(module.SqlCoreState, "_cleanup_expired_task_tokens")
    with pytest.raises(RuntimeError, match=r"flwr==1\.42"):
        superlink.install(1.0)


def test_the_throttled_cleanup_still_runs_on_a_real_sqlite_state(tmp_path: object) -> None:
    """Flower's own SqlLinkState with the patch: the clean-up runs, then again after the interval."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    module = importlib.import_module("flwr.supercore.corestate.sql_corestate")
    original = module.SqlCoreState._cleanup_expired_task_tokens
    clock = Clock()
    calls: list[int] = []

    def counting(self: object) -> None:
        calls.append(1)
        original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module.SqlCoreState, "_cleanup_expired_task_tokens", superlink.throttled(counting, 1.0, clock))
        state = SqlLinkState(f"{tmp_path}/link.db", NoOpFederationManager(), ObjectStoreFactory().store())
        state.initialize()
        state.get_run_status({1})
        state.get_run_status({1})
        clock.now += 1.5
        state.get_run_status({1})
    assert len(calls) == 2


def test_launcher_runs_flower_superlink_cli_and_rejects_a_bad_interval() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedseal.server.superlink", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--database" in out.stdout, out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fedseal.server.superlink", "--help"],
        capture_output=True, text=True, timeout=120, env={superlink.ENV_CLEANUP: "x", "PATH": ""},
    )
    assert bad.returncode == 2 and "number of seconds" in bad.stderr
