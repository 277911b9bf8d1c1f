"""A SuperNode that dies of a signal before it ever connected is started again; nothing else is."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedseal.client.node import SuperNodeProcess


def _node(tmp_path: Path, code: str, log: str = "") -> SuperNodeProcess:
    node = SuperNodeProcess.__new__(SuperNodeProcess)
    node.log_path = tmp_path / "supernode.log"
    node.log_path.write_text(log)
    node._offset = 0
    node._connected = False
    node._ever_connected = False
    node.exited = threading.Event()
    node.proc = subprocess.Popen([sys.executable, "-c", code])
    node.proc.wait(timeout=60)
    return node


def test_a_start_up_abort_is_worth_another_start(tmp_path: Path) -> None:
    node = _node(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGABRT)")
    assert node.returncode is not None and node.returncode < 0
    assert node.crashed_while_starting()


def test_a_supernode_that_had_connected_or_exited_by_itself_is_not_restarted(tmp_path: Path) -> None:
    connected = _node(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGABRT)", "INFO: SuperNode ID: 42\n")
    assert not connected.crashed_while_starting()
    refused = _node(tmp_path, "raise SystemExit(305)")  # e.g. a key the coordinator refuses
    assert not refused.crashed_while_starting()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL", "SIGINT"])
def test_a_supernode_stopped_by_a_signal_we_send_is_not_restarted(tmp_path: Path, sig: str) -> None:
    node = _node(tmp_path, f"import os, signal; os.kill(os.getpid(), signal.{sig})")
    assert not node.crashed_while_starting()


def test_a_bad_poll_interval_is_refused_before_the_supernode_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseal.client.node import SiteRunError, run_site

    monkeypatch.setenv("FEDSEAL_SUPERNODE_POLL_S", "soon")
    started: list[SuperNodeProcess] = []
    monkeypatch.setattr(SuperNodeProcess, "start", lambda self: started.append(self))
    # fl-client run reads every FEDSEAL_* variable first, before the config is even looked at.
    with pytest.raises(SiteRunError, match="FEDSEAL_SUPERNODE_POLL_S"):
        run_site(None, re_enrol=False, on_info=print)  # type: ignore[arg-type]
    assert started == []
