"""Each change the coordinator makes inside Flower (fedseal.server.flower_patches) against the
installed Flower: the version gate, and per patch that what it replaces exists with the
signature and behaviour the patch assumes, so a Flower upgrade fails here first."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest

from fedseal.server import flower_patches


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the version gate ---------------------------------------------------------------------------


def test_the_installed_flower_is_a_supported_version() -> None:
    import flwr

    version = flower_patches.require_flower_version()
    assert version == flwr.__version__
    assert ".".join(version.split(".")[:2]) in flower_patches.FLOWER_VERSIONS


def test_another_flower_version_is_refused_with_the_supported_ones_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    flower_patches.require_flower_version.cache_clear()
    try:
        with pytest.raises(flower_patches.FlowerVersionError, match=r"flwr 1\.99\.0 .*flwr 1\.42\.\*"):
            flower_patches.require_flower_version()
        with pytest.raises(flower_patches.FlowerVersionError):
            flower_patches.fast_reply_pulls(0.05, 0.25)  # every patch asks the gate first
    finally:
        flower_patches.require_flower_version.cache_clear()


# -- fast_reply_pulls: http_grid.pull_objects ------------------------------------------------------


def test_flowers_grid_pulls_objects_through_the_module_level_pull_objects_with_backoff_keywords() -> None:
    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
    params = inspect.signature(http_grid.pull_objects).parameters
    assert params["initial_backoff"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["backoff_cap"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["initial_backoff"].default == 1  # the 1 s the patch shortens
    # HttpGrid.pull_messages looks the name up in its module at call time (so rebinding works).
    source = inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert "pull_objects(" in source and "initial_backoff" not in source


def test_fast_reply_pulls_sets_the_backoff_unless_a_caller_gives_one(monkeypatch: pytest.MonkeyPatch) -> None:
    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
    seen: list[dict[str, Any]] = []

    def flower_pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        seen.append(kwargs)
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", flower_pull_objects)
    flower_patches.fast_reply_pulls(0.05, 0.25)
    http_grid.pull_objects(["o"], pull_object_fn=None)
    assert seen[-1] == {"pull_object_fn": None, "initial_backoff": 0.05, "backoff_cap": 0.25}
    flower_patches.fast_reply_pulls(1.0, 5.0)  # rebinds Flower's function, not the wrapper
    assert http_grid.pull_objects.__wrapped__ is flower_pull_objects
    http_grid.pull_objects(["o"], pull_object_fn=None, backoff_cap=3.0)
    assert seen[-1]["initial_backoff"] == 1.0 and seen[-1]["backoff_cap"] == 3.0


def test_fast_reply_pulls_refuses_a_flower_without_pull_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.delattr(http_grid, "pull_objects")
    with pytest.raises(flower_patches.FlowerVersionError, match=r"pull_objects.*flwr==1\.42"):
        flower_patches.fast_reply_pulls(0.05, 0.25)


# -- throttle_task_token_cleanup: SqlCoreState._cleanup_expired_task_tokens ----------------------


def test_flowers_task_token_cleanup_takes_only_self_and_runs_on_every_run_status_call() -> None:
    module = importlib.import_module("flwr.supercore.corestate.sql_corestate")
    method = getattr(module.SqlCoreState._cleanup_expired_task_tokens, "__wrapped__",
                     module.SqlCoreState._cleanup_expired_task_tokens)
    assert list(inspect.signature(method).parameters) == ["self"]
    linkstate = importlib.import_module("flwr.server.superlink.linkstate.sql_linkstate")
    assert "_cleanup_expired_task_tokens()" in inspect.getsource(linkstate.SqlLinkState.get_run_status)


def test_a_throttled_cleanup_runs_once_per_interval_and_per_state_object() -> None:
    runs: list[str] = []
    clock = Clock()

    class State:
        def __init__(self, name: str) -> None:
            self.name = name

    cleanup = flower_patches.throttled(lambda self: runs.append(self.name), 1.0, clock)
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

    cleanup = flower_patches.throttled(failing, 1.0, clock)
    state = object.__new__(type("S", (), {}))
    with pytest.raises(RuntimeError, match="database locked"):
        cleanup(state)
    cleanup(state)  # within the interval: not retried at once
    assert calls == [1]


def test_the_cleanup_throttle_wraps_flowers_sql_state_method_and_zero_leaves_it_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supercore.corestate.sql_corestate")
    original = module.SqlCoreState._cleanup_expired_task_tokens
    monkeypatch.setattr(module.SqlCoreState, "_cleanup_expired_task_tokens", original)
    flower_patches.throttle_task_token_cleanup(0.0)
    assert module.SqlCoreState._cleanup_expired_task_tokens is original
    flower_patches.throttle_task_token_cleanup(1.0)
    flower_patches.throttle_task_token_cleanup(2.0)  # re-installing wraps Flower's method, not the wrapper
    patched = module.SqlCoreState._cleanup_expired_task_tokens
    assert patched is not original and patched.__wrapped__ is original
    # SqlLinkState (the SuperLink's state) inherits the throttled method.
    linkstate = importlib.import_module("flwr.server.superlink.linkstate.sql_linkstate")
    assert linkstate.SqlLinkState._cleanup_expired_task_tokens is patched


def test_the_cleanup_throttle_refuses_a_flower_without_the_method(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supercore.corestate.sql_corestate")
    monkeypatch.delattr(module.SqlCoreState, "_cleanup_expired_task_tokens")
    with pytest.raises(RuntimeError, match=r"flwr==1\.42"):
        flower_patches.throttle_task_token_cleanup(1.0)


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
        mp.setattr(module.SqlCoreState, "_cleanup_expired_task_tokens", flower_patches.throttled(counting, 1.0, clock))
        state = SqlLinkState(f"{tmp_path}/link.db", NoOpFederationManager(), ObjectStoreFactory().store())
        state.initialize()
        state.get_run_status({1})
        state.get_run_status({1})
        clock.now += 1.5
        state.get_run_status({1})
    assert len(calls) == 2


# -- the control socket: _run_superlink_http_api, _get_superexec_command, create_app --------------


def test_flowers_superlink_http_api_pieces_have_the_signatures_the_launcher_assumes() -> None:
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    main_mod = importlib.import_module("flwr.superlink.main")
    flower_patches.require_superlink_internals()
    assert list(inspect.signature(cli._run_superlink_http_api).parameters) == ["lifespan_config"]
    assert list(inspect.signature(main_mod.create_app).parameters)[:2] == ["config", "superlink_lifespan_class"]
    source = inspect.getsource(cli)
    # Flower's CLI calls both through its module globals (so the replacements are what runs).
    assert "_run_superlink_http_api(lifespan_config=config)" in source
    assert "command = _get_superexec_command(" in source
    fields = {f.name for f in dataclasses.fields(importlib.import_module(
        "flwr.superlink.config_loader").SuperLinkLifespanConfig)}
    assert {"isolation", "host", "port", "ssl_keyfile", "ssl_certfile", "superexec_auth_secret"} <= fields


def test_the_http_api_and_superexec_command_are_replaced_and_extended(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    monkeypatch.setattr(cli, "_run_superlink_http_api", cli._run_superlink_http_api)
    monkeypatch.setattr(cli, "_get_superexec_command", lambda *a, **k: ["flower-superexec", "--x"])
    calls: list[Any] = []
    flower_patches.serve_superlink_http_api_with(calls.append)
    cli._run_superlink_http_api("config")
    assert calls == ["config"]
    flower_patches.add_superexec_arguments(["--superexec-auth-secret-file", "s"])
    flower_patches.add_superexec_arguments(["--superexec-auth-secret-file", "s"])  # idempotent
    assert cli._get_superexec_command() == ["flower-superexec", "--x", "--superexec-auth-secret-file", "s"]


def test_the_superlink_patches_refuse_a_flower_without_what_they_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    monkeypatch.delattr(cli, "_get_superexec_command")
    with pytest.raises(RuntimeError, match=r"_get_superexec_command.*flwr==1\.42"):
        flower_patches.serve_superlink_http_api_with(lambda config: None)


# -- control_client_on_socket: ControlHttpClient._client ------------------------------------------


def test_flowers_control_client_keeps_an_httpx_client_that_is_replaced_by_a_unix_socket_one(tmp_path: Path) -> None:
    import httpx
    from flwr.supercore.control import ControlHttpClient

    client = ControlHttpClient("http://fedseal-control", interceptors=[], timeout=5.0)
    assert isinstance(client._client, httpx.Client)
    flower_patches.control_client_on_socket(client, tmp_path / "s.sock", 5.0)
    replaced = client._client
    assert isinstance(replaced, httpx.Client) and replaced.follow_redirects
    assert replaced.timeout == httpx.Timeout(5.0)


def test_a_control_client_without_an_httpx_client_is_refused() -> None:
    class NotFlowers:
        _client = None

    with pytest.raises(flower_patches.FlowerVersionError, match="httpx client"):
        flower_patches.control_client_on_socket(NotFlowers(), Path("/x"), 1.0)  # type: ignore[arg-type]
