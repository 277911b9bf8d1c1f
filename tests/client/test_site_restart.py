"""A restarted site gets back in, and ``fl-client run`` checks its files and port first.

Flower 1.42's SuperLink keeps a SuperNode that stopped without signing off (``kill -9``)
ONLINE for 2 x 30 s and meanwhile refuses to activate it again, with the answer an
unregistered key gets. The site records its node id, ends that stale session with a signed
``DeactivateNode`` before its SuperNode starts, retries a refused activation while a previous
session may still be registered (one line each time), and calls a refusal a revocation only
when the coordinator says the key owns no node. The real-process check (kill -9, restart inside
the window, counted in the round, its training resumed) is ``tests/e2e/test_preemption.py``.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedseal.client import flower_patches, node
from fedseal.client.config import ClientConfig, load_client_config
from fedseal.client.flower_patches import SessionEnd
from fedseal.client.node import SiteRunError, SuperNodeProcess
from fedseal.crypto.keys import generate_identity_key, key_id, save_private_key, save_public_key
from fedseal.server.pki import create_ca

SITE_KEY = generate_identity_key()
PEER_ID = bytes(key_id(generate_identity_key().public_key())).hex()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site(
    tmp_path: Path, coordinator: str = "", extra: str = "", runtime_port: int = 0
) -> ClientConfig:
    """A site directory whose files all exist: key, CA, coordinator key, a known peer."""
    from datetime import UTC, datetime

    save_private_key(SITE_KEY, tmp_path / "site.key")
    save_public_key(generate_identity_key().public_key(), tmp_path / "coordinator.pub")
    (tmp_path / "ca.pem").write_bytes(create_ca("test CA", now=datetime.now(UTC)).certificate_pem())
    path = tmp_path / "client.toml"
    path.write_text(
        f'[site]\nname = "site-a"\n[coordinator]\nsuperlink = "127.0.0.1:{_free_port()}"\n{coordinator}'
        f'[data]\ndataset_dir = "data"\napproved_root = "{"ab" * 32}"\n'
        f'[peers]\n"site-b" = "{PEER_ID}"\n[runtime]\nport = {runtime_port or _free_port()}\n{extra}'
    )
    return load_client_config(path)


class _NothingStarts:
    """Fails the test if run_site gets past its start-up checks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached: list[str] = []
        monkeypatch.setattr(node, "attest_dataset", lambda *a, **k: self._reached("dataset"))
        monkeypatch.setattr(
            node, "wait_for_coordinator", lambda *a, **k: self._reached("coordinator")
        )
        monkeypatch.setattr(SuperNodeProcess, "start", lambda _self: self._reached("supernode"))

    def _reached(self, what: str) -> Any:
        self.reached.append(what)
        raise AssertionError(f"run_site reached the {what} step")


def _refusal(cfg: ClientConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    guard = _NothingStarts(monkeypatch)
    lines: list[str] = []
    with pytest.raises(SiteRunError) as info:
        node.run_site(cfg, re_enrol=False, on_info=lines.append)
    assert guard.reached == []
    assert info.value.step == "start-up"
    message = str(info.value)
    assert "\n" not in message
    return message, lines


# --------------------------------------------------------------------------- start-up checks


def test_a_missing_ca_file_is_named_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path, 'ca_cert = "tls/missing-ca.pem"\n')
    message, lines = _refusal(cfg, monkeypatch)
    assert f"coordinator.ca_cert {tmp_path / 'tls' / 'missing-ca.pem'} cannot be read" in message
    assert "No such file" in message and lines == []


@pytest.mark.parametrize("kind", ["directory", "not PEM"])
def test_an_unreadable_or_unusable_ca_path_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    cfg = _site(tmp_path, 'ca_cert = "bad-ca"\n')
    if kind == "directory":
        (tmp_path / "bad-ca").mkdir()
    else:
        (tmp_path / "bad-ca").write_text("this is not a certificate\n")
    message, _ = _refusal(cfg, monkeypatch)
    assert f"coordinator.ca_cert {tmp_path / 'bad-ca'}" in message
    assert (
        ("Is a directory" in message)
        if kind == "directory"
        else ("no PEM CA certificate" in message)
    )


def test_a_missing_coordinator_key_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path, 'public_key = "nowhere.pub"\n')
    message, _ = _refusal(cfg, monkeypatch)
    assert f"coordinator.public_key {tmp_path / 'nowhere.pub'} cannot be loaded" in message


def test_a_runtime_port_in_use_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "PORT_GRACE_S", 0.0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _site(tmp_path, runtime_port=port)
        message, _ = _refusal(cfg, monkeypatch)
    assert f"runtime.port {port} on 127.0.0.1" in message and "already in use" in message


def test_a_second_fl_client_run_on_the_same_state_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    lock = cfg.state_dir / "fl-client.lock"
    holder = subprocess.Popen(  # another process holding the lock, as a running site does
        [
            sys.executable,
            "-c",
            f"import fcntl, time\nf = open({str(lock)!r}, 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('4242')\nf.flush()\nprint('locked', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "locked"
        message, _ = _refusal(cfg, monkeypatch)
    finally:
        holder.kill()
        holder.wait()
    assert "another fl-client run (pid 4242)" in message and str(cfg.state_dir) in message


# --------------------------------------------------------------------------- waiting for the coordinator


class _CountingStop(threading.Event):
    """A stop event that records every wait and is set after ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0.0))
        if len(self.waits) >= self.limit:
            self.set()
        return self.is_set()


def test_a_site_waits_for_an_absent_coordinator_with_back_off_until_told_to_stop(
    tmp_path: Path,
) -> None:
    cfg = _site(tmp_path, "insecure = true\n")
    stop = _CountingStop(limit=6)
    lines: list[str] = []
    assert (
        node.wait_for_coordinator(cfg, stop, lines.append, timeout=1.0, backoff=(1.0, 4.0)) is False
    )
    assert stop.waits == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]  # doubling, capped, never giving up
    assert len(lines) == 6
    assert all(
        f"waiting for the coordinator at {cfg.superlink} (connection refused); retrying in" in line
        for line in lines
    ), lines


def test_a_site_goes_on_once_the_coordinator_answers(tmp_path: Path) -> None:
    cfg = _site(tmp_path, "insecure = true\n")
    port = int(cfg.superlink.rsplit(":", 1)[1])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    servers: list[http.server.HTTPServer] = []

    class StartOnSecondWait(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            server = http.server.HTTPServer(("127.0.0.1", port), Health)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
            return False

    lines: list[str] = []
    try:
        assert (
            node.wait_for_coordinator(cfg, StartOnSecondWait(), lines.append, timeout=5.0) is True
        )
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert len(lines) == 2 and "waiting for the coordinator" in lines[0]
    assert lines[1] == f"site site-a: the coordinator at {cfg.superlink} answers"


# --------------------------------------------------------------------------- the node record


def _process(tmp_path: Path, log: str = "") -> SuperNodeProcess:
    proc = SuperNodeProcess.__new__(SuperNodeProcess)
    proc.log_path = tmp_path / "supernode.log"
    proc.log_path.write_text(log)
    proc._offset = proc._start_offset = 0
    proc._connected = proc._ever_connected = False
    proc.exited = threading.Event()
    proc.proc = None
    return proc


def test_the_node_id_the_supernode_logs_is_recorded_and_found_again(tmp_path: Path) -> None:
    proc = _process(tmp_path, "INFO x:      SuperNode ID: 1256392619466701914\n")
    assert proc.previous_node_id() == 1256392619466701914  # from the log, even before a record
    proc.supervise()
    assert proc.node_id_path.read_text().strip() == "1256392619466701914"
    proc.log_path.write_text("")  # log rotated away: the record still knows
    assert proc.previous_node_id() == 1256392619466701914
    later = _process(tmp_path, "SuperNode ID: 5\nrestarted\nSuperNode ID: 7\n")
    assert later.previous_node_id() == 7  # the latest session


def test_only_an_exit_305_after_a_refused_activation_counts_as_a_refused_activation(
    tmp_path: Path,
) -> None:
    # Flower logs "Exit Code: 305" and exits with status 1 (flwr_exit: any error code exits 1).
    refused = "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode.\n"
    other = "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\nConnectError: TLS handshake failed\n"
    for code, log, expected in (
        (1, refused, True),
        (1, other, False),
        (0, refused, False),
        (-9, refused, False),
    ):
        proc = _process(tmp_path, log)
        exit_with = (
            f"import os; os.kill(os.getpid(), {-code})" if code < 0 else f"raise SystemExit({code})"
        )
        proc.proc = subprocess.Popen([sys.executable, "-c", exit_with])
        proc.proc.wait(timeout=60)
        assert proc.activation_refused() is expected, (code, log)


# --------------------------------------------------------------------------- ending the stale session


class _FakeNode:
    def __init__(self, tmp_path: Path, previous: int | None) -> None:
        self.key = SITE_KEY
        self.log_path = tmp_path / "supernode.log"
        self.previous = previous

    def previous_node_id(self) -> int | None:
        return self.previous


def _activation(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outcomes: list[SessionEnd],
    previous: int | None = 42,
) -> tuple[node._Activation, list[str], list[int]]:
    cfg = _site(tmp_path)
    calls: list[int] = []

    def end_session(
        superlink: str, ca: Path | None, key: object, node_id: int
    ) -> tuple[SessionEnd, str]:
        calls.append(node_id)
        return outcomes.pop(0), "detail"

    monkeypatch.setattr(flower_patches, "end_session", end_session)
    monkeypatch.setattr(node, "ACTIVATION_RETRY_S", (0.01, 0.02))
    lines: list[str] = []
    act = node._Activation(cfg, _FakeNode(tmp_path, previous), threading.Event(), lines.append)  # type: ignore[arg-type]
    return act, lines, calls


def test_a_session_the_coordinator_still_holds_is_ended_before_the_supernode_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    act, lines, calls = _activation(tmp_path, monkeypatch, [SessionEnd.ENDED])
    assert act.end_previous_session() is SessionEnd.ENDED
    assert calls == [42]
    assert lines == [
        "site site-a: ended this site's previous session (node 42), which the coordinator still held "
        "(the site had stopped without signing off)"
    ]


def test_a_site_with_no_session_on_record_sends_nothing_and_a_refusal_is_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    act, _, calls = _activation(tmp_path, monkeypatch, [], previous=None)
    assert act.end_previous_session() is None and calls == []
    assert act.retry() is False
    assert act.refusal().startswith(
        "the coordinator refused this site's key (not enrolled, or revoked); send "
        "enrolment-request.txt (sh start.sh --request) to the coordinator; see "
    )


def test_a_key_that_owns_no_node_is_refused_at_once_as_not_enrolled_or_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    act, lines, _ = _activation(tmp_path, monkeypatch, [SessionEnd.NOT_REGISTERED])
    act.end_previous_session()
    assert act.retry() is False and lines == []
    assert "refused this site's key (not enrolled, or revoked)" in act.refusal()
    assert "send enrolment-request.txt (sh start.sh --request) to the coordinator" in act.refusal()


def test_a_refused_activation_with_a_session_on_record_is_retried_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The end request got no answer (UNKNOWN), so the old session may still be registered.
    act, lines, calls = _activation(
        tmp_path, monkeypatch, [SessionEnd.UNKNOWN, SessionEnd.ENDED, SessionEnd.NOT_ONLINE]
    )
    act.end_previous_session()
    assert act.retry() is True
    assert act.retry() is True
    assert calls == [42, 42, 42]  # each retry tries to end the old session again
    assert len(lines) == 3  # two "retrying" lines, one "ended"
    assert "previous session still registered at the coordinator (node 42" in lines[0]
    assert "retrying in 0 s" in lines[0]
    assert "revoked" not in " ".join(lines)


def test_retries_end_when_the_session_window_has_passed_or_the_site_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    act, _, _ = _activation(tmp_path, monkeypatch, [SessionEnd.UNKNOWN])
    act.end_previous_session()
    monkeypatch.setattr(flower_patches, "session_window_s", lambda: 0.0)
    monkeypatch.setattr(node, "ACTIVATION_MARGIN_S", 0.0)
    assert act.retry() is False
    assert "past the time its previous session (node 42) would have expired" in act.refusal()
    stopping, _, _ = _activation(tmp_path, monkeypatch, [SessionEnd.UNKNOWN])
    monkeypatch.setattr(node, "ACTIVATION_MARGIN_S", 60.0)
    stopping.end_previous_session()
    stopping.stop.set()
    assert stopping.retry() is False


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (401, SessionEnd.NOT_REGISTERED),
        (412, SessionEnd.NOT_ONLINE),
        (503, SessionEnd.UNKNOWN),
        (None, SessionEnd.ENDED),
    ],
)
def test_the_superlinks_answer_to_deactivate_node_maps_to_an_outcome(
    monkeypatch: pytest.MonkeyPatch, status: int | None, outcome: SessionEnd
) -> None:
    from flwr.supernode.fleet_http_client import FleetHttpClient

    sent: list[int] = []

    def deactivate(self: object, request: Any) -> object:
        sent.append(request.node_id)
        if status is None:
            return object()
        req = httpx.Request("POST", "https://coordinator/v1/fleet/deactivate-node")
        raise httpx.HTTPStatusError(
            "refused", request=req, response=httpx.Response(status, request=req)
        )

    monkeypatch.setattr(FleetHttpClient, "DeactivateNode", deactivate)
    got, detail = flower_patches.end_session("coordinator:9092", None, SITE_KEY, 42)
    assert (got, sent) == (outcome, [42]) and detail


def test_an_unreachable_coordinator_leaves_the_outcome_unknown() -> None:
    got, detail = flower_patches.end_session(
        f"127.0.0.1:{_free_port()}", None, SITE_KEY, 42, timeout_s=2.0
    )
    assert got is SessionEnd.UNKNOWN and "ConnectError" in detail


# --------------------------------------------------------------------------- what Flower does underneath


def test_flowers_superlink_refuses_to_activate_a_node_still_online_until_it_is_deactivated(
    tmp_path: Path,
) -> None:
    # The root cause, and the fix, on Flower's own SQLite link state (what `--database` uses).
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    state = LinkStateFactory(
        str(tmp_path / "superlink.db"), NoOpFederationManager(), ObjectStoreFactory()
    ).state()
    node_id = state.create_node("owner", "site-a", b"site-a public key", HEARTBEAT_DEFAULT_INTERVAL)
    assert state.activate_node(node_id, HEARTBEAT_DEFAULT_INTERVAL)
    # kill -9: no DeactivateNode; a restarted SuperNode is refused while the node is ONLINE...
    assert not state.activate_node(node_id, HEARTBEAT_DEFAULT_INTERVAL)
    # ...and let in at once once its stale session is ended.
    assert state.deactivate_node(node_id)
    assert state.activate_node(node_id, HEARTBEAT_DEFAULT_INTERVAL)
    assert not state.deactivate_node(node_id + 1)  # no such node: nothing to end


def test_flowers_answers_that_end_session_reads_are_still_401_and_412() -> None:
    import inspect

    from flwr.supercore.error import ApiErrorCode
    from flwr.supercore.error.catalog import API_ERROR_MAP
    from flwr.superlink.routers.fleet import node_auth

    assert API_ERROR_MAP[ApiErrorCode.FLEET_NODE_DEACTIVATION_FAILED].http_status_code == 412
    assert (
        API_ERROR_MAP[ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED].public_message
        == node.ACTIVATION_REFUSED + "."
    )
    source = inspect.getsource(node_auth.authenticate_node)
    # A request for a node id the signing key does not own is a 401.
    assert (
        "get_node_id_by_public_key(public_key) != node_id" in source
        and "HTTP_401_UNAUTHORIZED" in source
    )
    assert flower_patches.session_window_s() == 60.0


def test_a_supernode_refused_activation_logs_exit_code_305_and_exits_with_status_1() -> None:
    # In a process of its own: flwr_exit also arms a timer that os._exit()s its process.
    code = (
        "from flwr.supercore.exit import ExitCode, flwr_exit\n"
        "flwr_exit(ExitCode.SUPERNODE_CONNECTION_ERROR, '[code: 2004] Failed to activate SuperNode.')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert out.returncode == 1  # not 305: the status says nothing, the log line does
    assert node.SUPERNODE_CONNECTION_ERROR in out.stdout + out.stderr
    assert node.ACTIVATION_REFUSED in out.stdout + out.stderr
