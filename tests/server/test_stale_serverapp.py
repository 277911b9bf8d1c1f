"""A restarted coordinator ends the ServerApp process its SIGKILLed predecessor left running."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseal.server import metrics
from fedseal.server.deploy import end_stale_serverapp
from fedseal.server.rundir import SERVERAPP_PID_FILE

SLEEPER = "import time; time.sleep(120)"


def _spawn(*argv: str) -> subprocess.Popen[bytes]:
    """A sleeping process whose command line ends with ``argv`` (waits until it has exec'd:
    until then /proc shows the forking parent's command line)."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, *argv])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 30
    while SLEEPER.encode() not in cmdline.read_bytes():
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the test process did not start")
        time.sleep(0.01)
    return proc


def test_a_leftover_serverapp_is_ended(tmp_path: Path) -> None:
    proc = _spawn("flwr-serverapp", "--parent-pid", "1")  # the command line Flower gives it
    try:
        (tmp_path / SERVERAPP_PID_FILE).write_text(f"{proc.pid}\n")
        said: list[str] = []
        end_stale_serverapp(tmp_path, said.append)
        assert proc.wait(timeout=10) is not None
        assert said and str(proc.pid) in said[0]
    finally:
        proc.kill()


def test_a_reused_pid_of_another_program_is_left_alone(tmp_path: Path) -> None:
    proc = _spawn("something-else")
    try:
        (tmp_path / SERVERAPP_PID_FILE).write_text(f"{proc.pid}\n")
        said: list[str] = []
        end_stale_serverapp(tmp_path, said.append)
        assert proc.poll() is None and said == []
    finally:
        proc.kill()
        proc.wait()


def test_no_pid_file_or_a_gone_process_is_nothing_to_do(tmp_path: Path) -> None:
    end_stale_serverapp(tmp_path, lambda s: pytest.fail(s))
    (tmp_path / SERVERAPP_PID_FILE).write_text("999999999\n")
    end_stale_serverapp(tmp_path, lambda s: pytest.fail(s))
    (tmp_path / SERVERAPP_PID_FILE).write_text("garbage\n")
    end_stale_serverapp(tmp_path, lambda s: pytest.fail(s))


def test_a_metrics_port_in_use_is_retried_then_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "BIND_WAIT_S", 0.6)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"metrics endpoint 127.0.0.1:{port}") as exc:
            metrics.Metrics.start(port)
        assert exc.value.errno == errno.EADDRINUSE
    finally:
        holder.close()
    metrics.Metrics.start(port)  # free now: binds at once
