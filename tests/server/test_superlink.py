"""The SuperLink launcher: its clean-up interval setting and the ``flower-superlink`` CLI it runs
(the patches it applies: tests/server/test_flower_patches.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedseal import settings
from fedseal.settings import Environment


def cleanup_interval(env: dict[str, str]) -> float:
    return Environment.read(env).superlink_cleanup_s


def test_cleanup_interval_defaults_to_one_second_and_validates() -> None:
    assert cleanup_interval({}) == settings.DEFAULT_CLEANUP_S == 1.0
    assert cleanup_interval({settings.SUPERLINK_CLEANUP: "0"}) == 0.0
    with pytest.raises(ValueError, match="number of seconds"):
        cleanup_interval({settings.SUPERLINK_CLEANUP: "often"})
    with pytest.raises(ValueError, match=r"between 0 and 10"):
        cleanup_interval({settings.SUPERLINK_CLEANUP: "-1"})


def test_launcher_runs_flower_superlink_cli_and_rejects_a_bad_interval() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedseal.server.superlink", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--database" in out.stdout, out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fedseal.server.superlink", "--help"],
        capture_output=True, text=True, timeout=120, env={settings.SUPERLINK_CLEANUP: "x", "PATH": ""},
    )
    assert bad.returncode == 2 and "number of seconds" in bad.stderr
