"""Every FEDSEAL_* variable read and checked at once: defaults, ranges, error wording, the
passphrase kept out of reprs, and unknown names listed."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal import settings
from fedseal.server.errors import DeployError
from fedseal.settings import Environment, PullBackoff, SettingsError

SECONDS = [
    (settings.OBJECT_PULL_BACKOFF, "object_pull_backoff_s", 0.01, 1.0),
    (settings.SUPERLINK_CLEANUP, "superlink_cleanup_s", 0.0, 10.0),
    (settings.SUPERNODE_POLL, "supernode_poll_s", 0.05, 3.0),
]


def test_an_empty_environment_gives_todays_defaults() -> None:
    env = Environment.read({})
    assert env == Environment()
    assert env.object_pull_backoff_s == 0.05
    assert env.pull_backoff == PullBackoff(initial_s=0.05, cap_s=0.25)
    assert env.superlink_cleanup_s == 1.0
    assert env.supernode_poll_s == 0.25
    assert env.torch_threads == 1
    assert env.sim_share_verified is True
    assert env.sim_profile_dir is None
    assert env.coordinator_passphrase is None
    assert env.unknown == ()


def test_values_are_parsed() -> None:
    env = Environment.read({
        settings.OBJECT_PULL_BACKOFF: "1", settings.SUPERLINK_CLEANUP: "0",
        settings.SUPERNODE_POLL: "3", settings.TORCH_THREADS: "4",
        settings.SIM_SHARE_VERIFIED: "0", settings.SIM_PROFILE: "/tmp/prof",
        settings.COORDINATOR_PASSPHRASE: "hunter2",
    })
    assert env.pull_backoff.kwargs() == {"initial_backoff": 1.0, "backoff_cap": 5.0}
    assert (env.superlink_cleanup_s, env.supernode_poll_s, env.torch_threads) == (0.0, 3.0, 4)
    assert env.sim_share_verified is False
    assert env.sim_profile_dir == "/tmp/prof"
    assert env.coordinator_passphrase == "hunter2"


def test_empty_optional_values_mean_unset() -> None:
    env = Environment.read({settings.SIM_PROFILE: "", settings.COORDINATOR_PASSPHRASE: ""})
    assert env.sim_profile_dir is None and env.coordinator_passphrase is None


@pytest.mark.parametrize(("name", "attr", "lo", "hi"), SECONDS)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_a_number_of_seconds_is_accepted_exactly_within_its_range(
    name: str, attr: str, lo: float, hi: float, value: float
) -> None:
    env = {name: repr(value)}
    if lo <= value <= hi:
        assert getattr(Environment.read(env), attr) == value
    else:
        with pytest.raises(SettingsError, match=rf"^{name} must be between {lo:g} and {hi:g} seconds, got ") as err:
            Environment.read(env)
        assert err.value.variable == name
        assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(("name", "attr", "lo", "hi"), SECONDS)
@given(text=st.text(max_size=12))
def test_anything_else_is_refused_naming_the_variable(name: str, attr: str, lo: float, hi: float, text: str) -> None:
    try:
        value = float(text)
    except ValueError:
        with pytest.raises(SettingsError, match=rf"^{name} must be a number of seconds, got ") as err:
            Environment.read({name: text})
        assert err.value.variable == name
        return
    if lo <= value <= hi:
        assert getattr(Environment.read({name: text}), attr) == value
    else:
        with pytest.raises(SettingsError, match=f"between {lo:g} and {hi:g} seconds"):
            Environment.read({name: text})


@given(value=st.floats(min_value=0.01, max_value=1.0))
def test_the_pull_backoff_cap_is_five_times_the_first_wait_at_least_a_quarter_second(value: float) -> None:
    backoff = Environment.read({settings.OBJECT_PULL_BACKOFF: repr(value)}).pull_backoff
    assert backoff.initial_s == value
    assert backoff.cap_s == max(0.25, 5 * value)
    assert backoff.cap_s >= backoff.initial_s


@given(value=st.integers(min_value=-10, max_value=5000))
def test_torch_threads_is_a_whole_number_from_1_to_1024(value: int) -> None:
    env = {settings.TORCH_THREADS: str(value)}
    if 1 <= value <= 1024:
        assert Environment.read(env).torch_threads == value
    else:
        with pytest.raises(SettingsError, match=rf"^FEDSEAL_TORCH_THREADS must be between 1 and 1024, got {value}$"):
            Environment.read(env)


@pytest.mark.parametrize("raw", ["", "two", "1.5", "nan"])
def test_torch_threads_refuses_what_is_not_a_whole_number(raw: str) -> None:
    with pytest.raises(SettingsError, match="FEDSEAL_TORCH_THREADS must be a whole number, got"):
        Environment.read({settings.TORCH_THREADS: raw})


@given(text=st.text(max_size=4))
def test_share_verified_is_0_or_1_and_todays_wording_names_anything_else(text: str) -> None:
    env = {settings.SIM_SHARE_VERIFIED: text}
    if text in ("0", "1"):
        assert Environment.read(env).sim_share_verified is (text == "1")
    else:
        with pytest.raises(SettingsError) as err:
            Environment.read(env)
        assert str(err.value) == f"FEDSEAL_SIM_SHARE_VERIFIED must be 0 or 1, got {text!r}"


def test_todays_messages_word_for_word() -> None:
    with pytest.raises(ValueError) as err:
        Environment.read({settings.OBJECT_PULL_BACKOFF: "later"})
    assert str(err.value) == "FEDSEAL_OBJECT_PULL_BACKOFF_S must be a number of seconds, got 'later'"
    with pytest.raises(ValueError) as err:
        Environment.read({settings.SUPERNODE_POLL: "9"})
    assert str(err.value) == "FEDSEAL_SUPERNODE_POLL_S must be between 0.05 and 3 seconds, got 9.0"
    with pytest.raises(ValueError) as err:
        Environment.read({settings.SUPERLINK_CLEANUP: "-1"})
    assert str(err.value) == "FEDSEAL_SUPERLINK_CLEANUP_S must be between 0 and 10 seconds, got -1.0"


@given(passphrase=st.text(max_size=40))
def test_the_passphrase_never_appears_in_the_repr(passphrase: str) -> None:
    env = Environment.read({settings.COORDINATOR_PASSPHRASE: passphrase, "FEDSEAL_X": "1"})
    assert env.coordinator_passphrase == (passphrase or None)
    # The repr is the same whatever the passphrase: it cannot show it.
    without = dataclasses.replace(env, coordinator_passphrase=None)
    assert repr(env) == str(env) == f"{env}" == repr(without)
    assert "coordinator_passphrase" not in repr(env)


def test_a_passphrase_is_not_printed() -> None:
    env = Environment.read({settings.COORDINATOR_PASSPHRASE: "s3cr3t-passphrase"})
    assert "s3cr3t-passphrase" not in repr(env)
    assert "s3cr3t-passphrase" not in str(env)


def test_unknown_fedseal_variables_are_listed_sorted_and_others_ignored() -> None:
    env = Environment.read({
        "FEDSEAL_SUPERNODE_POL_S": "1",        # a typo
        "FEDSEAL_TORCH_THREAD": "2",           # another
        settings.SUPERNODE_POLL: "0.5",        # known
        "FEDSEAL_CA": "/etc/ca.pem",           # the container health check's
        "FEDSEAL_HEALTH_ROLE": "site",
        "PATH": "/usr/bin",                    # not ours
        "fedseal_lowercase": "1",
    })
    assert env.unknown == ("FEDSEAL_SUPERNODE_POL_S", "FEDSEAL_TORCH_THREAD")
    assert env.supernode_poll_s == 0.5
    assert "FEDSEAL_SUPERNODE_POL_S" in repr(env)


def test_every_known_name_is_parsed_and_none_is_also_another_tools() -> None:
    assert not settings.KNOWN & settings.OTHER_TOOLS
    assert all(name.startswith(settings.PREFIX) for name in settings.KNOWN | settings.OTHER_TOOLS)
    assert Environment.read(dict.fromkeys(settings.OTHER_TOOLS, "x")).unknown == ()


def test_the_environment_is_frozen_hashable_and_pickles() -> None:
    env = Environment.read({settings.TORCH_THREADS: "2", "FEDSEAL_TYPO": ""})
    with pytest.raises(AttributeError):
        env.torch_threads = 3  # type: ignore[misc]
    assert hash(env) == hash(pickle.loads(pickle.dumps(env)))
    assert pickle.loads(pickle.dumps(env)) == env


def test_the_default_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.TORCH_THREADS, "3")
    monkeypatch.setenv("FEDSEAL_NOT_A_SETTING", "1")
    env = Environment.read()
    assert env.torch_threads == 3
    assert "FEDSEAL_NOT_A_SETTING" in env.unknown


class _Stop(Exception):
    pass


def test_fl_server_run_names_unknown_variables_in_one_console_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fedseal.server import deploy

    monkeypatch.setenv("FEDSEAL_SUPERLINK_CLEANUP", "0")  # the _S forgotten
    monkeypatch.setenv("FEDSEAL_CA", "/etc/fedseal/keys/ca.pem")  # the health check's: not unknown

    def stop(name: str) -> None:
        raise _Stop

    monkeypatch.setattr(deploy, "check_strategy", stop)  # what run_coordinator does next
    lines: list[str] = []
    with pytest.raises(_Stop):
        deploy.run_coordinator(
            SimpleNamespace(run=SimpleNamespace(strategy="FedAvg")),  # type: ignore[arg-type]
            resume=False, on_round=lambda rec: None, on_info=lines.append,
        )
    assert [line for line in lines if line.startswith("warning:")] == [
        "warning: unknown FEDSEAL_* variables ignored (a typo?): FEDSEAL_SUPERLINK_CLEANUP"
    ]


def test_fl_server_run_refuses_a_bad_setting_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseal.server import deploy

    monkeypatch.setenv(settings.SUPERLINK_CLEANUP, "often")
    with pytest.raises(DeployError, match="superlink: FEDSEAL_SUPERLINK_CLEANUP_S must be a number of seconds"):
        deploy.run_coordinator(None, resume=False, on_round=lambda rec: None, on_info=print)  # type: ignore[arg-type]


def test_fl_client_run_names_unknown_variables_in_one_console_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fedseal.client import node

    monkeypatch.setenv("FEDSEAL_TORCH_THREAD", "2")  # the S forgotten
    monkeypatch.setenv("FEDSEAL_SITE_PASS", "secret")  # the site's own passphrase_env: not unknown

    def stop(cfg: object) -> None:
        raise _Stop

    monkeypatch.setattr(node, "site_trust", stop)  # what run_site does next
    lines: list[str] = []
    with pytest.raises(_Stop):
        node.run_site(SimpleNamespace(passphrase_env="FEDSEAL_SITE_PASS"), re_enrol=False, on_info=lines.append)  # type: ignore[arg-type]
    assert lines == ["warning: unknown FEDSEAL_* variables ignored (a typo?): FEDSEAL_TORCH_THREAD"]
