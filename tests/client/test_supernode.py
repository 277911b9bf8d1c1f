"""The SuperNode launcher: its settings (idle poll, object-pull back-off) and its command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedseal import settings
from fedseal.client import supernode
from fedseal.settings import Environment, PullBackoff


def poll_interval(env: dict[str, str]) -> float:
    return Environment.read(env).supernode_poll_s


def pull_backoff(env: dict[str, str]) -> PullBackoff:
    return Environment.read(env).pull_backoff


def test_poll_interval_defaults_and_validates() -> None:
    assert poll_interval({}) == settings.DEFAULT_POLL_S
    assert poll_interval({settings.SUPERNODE_POLL: "0.5"}) == 0.5
    with pytest.raises(ValueError, match="number of seconds"):
        poll_interval({settings.SUPERNODE_POLL: "fast"})
    for bad in ("0", "0.01", "5"):
        with pytest.raises(ValueError, match=r"between 0\.05 and 3"):
            poll_interval({settings.SUPERNODE_POLL: bad})


def test_launcher_runs_flower_supernode_cli_and_rejects_a_bad_interval() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedseal.client.supernode", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--superlink" in out.stdout, out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fedseal.client.supernode", "--help"],
        capture_output=True, text=True, timeout=120, env={"FEDSEAL_SUPERNODE_POLL_S": "9", "PATH": ""},
    )
    assert bad.returncode == 2 and "between 0.05 and 3" in bad.stderr


def test_object_pull_backoff_defaults_to_50ms_and_validates() -> None:
    default = pull_backoff({})
    assert (default.initial_s, default.cap_s) == (settings.DEFAULT_PULL_BACKOFF_S, 0.25)
    flower = pull_backoff({settings.OBJECT_PULL_BACKOFF: "1"})
    assert flower.kwargs() == {"initial_backoff": 1.0, "backoff_cap": 5.0}  # Flower's first retry
    with pytest.raises(ValueError, match="number of seconds"):
        pull_backoff({settings.OBJECT_PULL_BACKOFF: "soon"})
    for bad in ("0", "0.001", "2"):
        with pytest.raises(ValueError, match=r"between 0\.01 and 1"):
            pull_backoff({settings.OBJECT_PULL_BACKOFF: bad})


def test_the_executors_loopback_pulls_retry_at_most_every_tenth_of_a_second() -> None:
    default = supernode.loopback_backoff(pull_backoff({}))
    assert (default.initial_s, default.cap_s) == (0.05, 0.1)
    slow = supernode.loopback_backoff(PullBackoff(initial_s=1.0, cap_s=5.0))
    assert (slow.initial_s, slow.cap_s) == (1.0, 1.0)  # never below the initial wait
