"""What a new site's operator meets at start-up and after: recipes that do not fit the data,
a wrong port, a SuperNode that gave up reconnecting, and the lines the site prints about them.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedseal.client import node
from fedseal.client.config import ClientConfig
from fedseal.client.node import SiteRunError, SuperNodeProcess
from fedseal.client.supernode import EXIT_FLEET_LOOP_ENDED, FLEET_LOOP_ENDED
from fedseal.server.pki import create_ca, issue_server_certificate
from tests.client.test_site_restart import _site

RECIPES = "tests.client._recipes"
FACTORIES = "tests.client._start_up_recipes"


def _allowing(tmp_path: Path, *models: str) -> ClientConfig:
    listed = ", ".join(f'"{m}"' for m in models)
    return _site(tmp_path, extra=f"[limits]\nallowed_models = [{listed}]\n")


# -- 1. recipes that do not fit this site's data ------------------------------------------------
def test_the_default_models_on_a_tabular_dataset_skip_cnn_with_one_warning_line(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    fits = node._check_recipes(_allowing(tmp_path, "mlp", "cnn"), 30, 2, lines.append)
    assert fits == ("mlp",)
    assert len(lines) == 1
    assert "warning: skipping recipe 'cnn'" in lines[0]
    assert "SmallCNN needs square images, got 30 features" in lines[0]


def test_a_dataset_no_allowed_recipe_fits_is_refused_in_one_line_naming_each(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    cfg = _allowing(tmp_path, "cnn", f"{FACTORIES}:picky")
    with pytest.raises(SiteRunError) as err:
        node._check_recipes(cfg, 30, 2, lines.append)
    assert err.value.step == "recipe" and lines == []
    text = str(err.value)
    assert "\n" not in text
    assert (
        "no recipe in [limits] allowed_models in client.toml fits this dataset (30 features, 2 classes)"
        in text
    )
    assert "recipe 'cnn'" in text and "square images" in text
    assert f"recipe '{FACTORIES}:picky'" in text and "takes 784 features only" in text


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (f"{RECIPES}:broken_loss", "boom in the loss"),  # a part that breaks on a shape it takes
        (f"{FACTORIES}:broken_factory", "the model factory failed"),  # not a shape complaint
        ("not_installed_anywhere:recipe", "is not installed at this site"),
    ],
)
def test_a_broken_recipe_is_refused_even_when_another_fits(
    tmp_path: Path, model: str, why: str
) -> None:
    lines: list[str] = []
    with pytest.raises(SiteRunError, match="recipe") as err:
        node._check_recipes(_allowing(tmp_path, "mlp", "cnn", model), 30, 2, lines.append)
    assert why in str(err.value) and model in str(err.value)


def test_a_square_dataset_takes_both_built_in_models_without_a_line(tmp_path: Path) -> None:
    lines: list[str] = []
    assert node._check_recipes(_allowing(tmp_path, "mlp", "cnn"), 16, 3, lines.append) == (
        "mlp",
        "cnn",
    )
    assert lines == []


# -- 5. a wrong port ----------------------------------------------------------------------------
def _tls_server_that_drops_http(tmp_path: Path) -> tuple[int, threading.Event]:
    """A TLS server under a CA the site pins that takes the handshake and drops every request
    (what the coordinator's gRPC audit port does with the site's HTTP/1.1 probe)."""
    now = datetime.now(UTC)
    ca = create_ca("test CA", now=now)
    cert, key = issue_server_certificate(ca, ["127.0.0.1"], now=now)
    (tmp_path / "ca.pem").write_bytes(ca.certificate_pem())
    (tmp_path / "srv.pem").write_bytes(cert)
    (tmp_path / "srv.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    sock = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        with sock:
            sock.settimeout(0.2)
            while not done.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1024)  # the request, then close without a response
                except (OSError, ssl.SSLError):
                    conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(sock.getsockname()[1]), done


def test_a_site_pointed_at_a_port_that_is_not_the_fleet_api_is_told_which_setting_and_why(
    tmp_path: Path,
) -> None:
    cfg = _site(tmp_path)
    port, done = _tls_server_that_drops_http(tmp_path)
    cfg = replace(cfg, superlink=f"127.0.0.1:{port}")
    try:
        with pytest.raises(SiteRunError) as err:
            node.wait_for_coordinator(cfg, threading.Event(), print, timeout=5.0)
    finally:
        done.set()
    assert err.value.step == "tls"
    assert err.value.reason.startswith(
        f"coordinator.superlink 127.0.0.1:{port} answered but does not speak the fleet API"
    )
    assert "is it the audit port?" in err.value.reason


# -- 3. the closing receipts line ---------------------------------------------------------------
def test_the_receipts_line_is_printed_only_when_the_site_verified_some(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    assert node._receipts_line(cfg, None) is None
    assert node._receipts_line(cfg, SimpleNamespace(verified=0)) is None  # type: ignore[arg-type]
    assert (
        node._receipts_line(cfg, SimpleNamespace(verified=3))
        == "site site-a: 3 audit receipts verified"
    )  # type: ignore[arg-type]


# -- 4. a SuperNode that gave up reconnecting ---------------------------------------------------
_GIVES_UP = """
import logging, threading, time
from fedseal.client.supernode import run_fleet_loop
# Flower's Runtime API server: a non-daemon thread that outlives the Fleet loop.
threading.Thread(target=time.sleep, args=(600,)).start()
def fleet_loop():
    # What Flower's Fleet connection does when its retries give up: log the error, return.
    logging.getLogger("flwr").error("[SSL: WRONG_VERSION_NUMBER] wrong version number\\nmore")
def raising_loop():
    raise ConnectionError("no route")
run_fleet_loop(fleet_loop if "@HOW@" == "returns" else raising_loop)
"""


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("returns", "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        ("raises", "ConnectionError: no route"),
    ],
)
def test_a_supernode_whose_fleet_loop_ended_exits_with_its_own_status_and_one_line(
    how: str, reason: str
) -> None:
    # Before: the process outlived its loop, kept up by the Runtime API thread.
    script = _GIVES_UP.replace("@HOW@", how)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == EXIT_FLEET_LOOP_ENDED
    assert proc.stderr.splitlines()[-1] == f"{FLEET_LOOP_ENDED}{reason}"


def test_a_supernode_that_exits_by_itself_keeps_its_own_status() -> None:
    code = "from fedseal.client.supernode import run_fleet_loop\nrun_fleet_loop(lambda: exit(1))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 1


class _RefusesPulls(http.server.BaseHTTPRequestHandler):
    """A Fleet API that activates the node, then answers its pulls with 404 (not retried)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        from flwr.proto.fleet_pb2 import ActivateNodeResponse, RegisterNodeFleetResponse
        from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatResponse

        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body, status = b"", 404
        if self.path.endswith("/register-node"):
            body, status = RegisterNodeFleetResponse().SerializeToString(), 200
        elif self.path.endswith("/activate-node"):
            body, status = ActivateNodeResponse(node_id=5).SerializeToString(), 200
        elif self.path.endswith("/send-node-heartbeat"):
            body, status = SendNodeHeartbeatResponse(success=True).SerializeToString(), 200
        self.send_response(status)
        self.send_header("Content-Type", "application/protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_real_supernode_whose_pulls_are_refused_exits_instead_of_idling_forever(
    tmp_path: Path,
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusesPulls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        runtime_port = s.getsockname()[1]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp_path / "flwr"))
    argv = [sys.executable, "-m", "fedseal.client.supernode", "--superlink",
            f"127.0.0.1:{server.server_address[1]}", "--insecure", "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(runtime_port)]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=120, check=False
        )
    finally:
        server.shutdown()
    assert "SuperNode ID: 5" in proc.stderr + proc.stdout
    assert proc.returncode == EXIT_FLEET_LOOP_ENDED, proc.stderr[-2000:]
    assert f"{FLEET_LOOP_ENDED}Client error '404 Not Found'" in proc.stderr


class _FakeNode:
    """A SuperNode whose every start ends its Fleet loop (it gave up), as its log says."""

    def __init__(self, tmp_path: Path, stop: threading.Event, starts_before_stop: int) -> None:
        self.log_path = tmp_path / "supernode.log"
        self.log_path.write_text(
            "INFO : SuperNode ID: 7\nWARNING : Giving up reconnection after 36.77 seconds and 8 tries.\n"
            f"{FLEET_LOOP_ENDED}ConnectError: [SSL: WRONG_VERSION_NUMBER] wrong version number\n"
        )
        self.exited = threading.Event()
        self.exited.set()
        self.returncode = EXIT_FLEET_LOOP_ENDED
        self.connected = False
        self.starts = 0
        self.stop = stop
        self.starts_before_stop = starts_before_stop

    def supervise(self) -> None:
        pass

    def crashed_while_starting(self) -> bool:
        return False

    def activation_refused(self) -> bool:
        return False

    def fleet_loop_ended(self) -> str | None:
        return SuperNodeProcess.fleet_loop_ended(self)  # type: ignore[arg-type]

    @property
    def _start_offset(self) -> int:
        return 0

    def start(self) -> None:
        self.starts += 1
        if self.starts >= self.starts_before_stop:
            self.stop.set()


class _FakeActivation:
    def __init__(self) -> None:
        self.restarts = 0

    def retry(self) -> bool:
        return False

    def restart(self) -> None:
        self.restarts += 1


def test_a_supernode_that_gave_up_is_started_again_after_a_console_line_and_a_growing_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path)
    stop = threading.Event()
    fake = _FakeNode(tmp_path, stop, starts_before_stop=3)
    probes: list[str] = []
    monkeypatch.setattr(
        node, "wait_for_coordinator", lambda c, s, i: probes.append(c.superlink) or True
    )
    activation = _FakeActivation()
    lines: list[str] = []
    node._supervise(cfg, fake, activation, stop, lines.append, backoff=(0.01, 0.02))  # type: ignore[arg-type]
    assert fake.starts == 3 and activation.restarts == 3 and len(probes) == 3
    gave_up = [line for line in lines if "stopped reaching the coordinator" in line]
    assert len(gave_up) == 3
    assert (
        f"site site-a: the SuperNode stopped reaching the coordinator at {cfg.superlink} (gave up "
        "reconnecting after 36.77 s and 8 tries: ConnectError: [SSL: WRONG_VERSION_NUMBER] wrong "
        f"version number; see {fake.log_path}); starting it again in 0 s"
    ) == gave_up[0]
    assert sum("SuperNode started again" in line for line in lines) == 3


def test_a_coordinator_address_that_no_longer_speaks_the_fleet_api_ends_the_site_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path)
    stop = threading.Event()
    fake = _FakeNode(tmp_path, stop, starts_before_stop=99)

    def probe(*_: Any) -> bool:
        raise SiteRunError("tls", "TLS handshake with ... failed (WRONG_VERSION_NUMBER)")

    monkeypatch.setattr(node, "wait_for_coordinator", probe)
    with pytest.raises(SiteRunError, match="WRONG_VERSION_NUMBER"):
        node._supervise(cfg, fake, _FakeActivation(), stop, print, backoff=(0.01, 0.02))  # type: ignore[arg-type]
    assert fake.starts == 0


def test_a_site_stopped_while_waiting_to_restart_its_supernode_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path)
    stop = threading.Event()
    fake = _FakeNode(tmp_path, stop, starts_before_stop=99)
    monkeypatch.setattr(node, "wait_for_coordinator", lambda *_: False)  # stopped while waiting
    node._supervise(cfg, fake, _FakeActivation(), stop, print, backoff=(0.01, 0.02))  # type: ignore[arg-type]
    assert fake.starts == 0


def test_any_other_supernode_exit_is_not_taken_for_a_fleet_loop_that_gave_up(
    tmp_path: Path,
) -> None:
    fake = _FakeNode(tmp_path, threading.Event(), 1)
    fake.returncode = 1
    assert fake.fleet_loop_ended() is None


# -- 6. the coordinator going away after its run -----------------------------------------------
def test_a_coordinator_that_went_away_is_an_info_line_and_its_return_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _site(tmp_path)
    sn = SuperNodeProcess(cfg, key=None, stop=threading.Event())
    sn.log_path.parent.mkdir(parents=True, exist_ok=True)
    sn.log_path.write_text(
        "INFO : Connection attempt failed, retrying in 1.00 seconds\nINFO : SuperNode ID: 9\n"
    )
    caplog.set_level(logging.INFO, logger="fedseal.client")
    sn.supervise()  # a failed attempt before it first connected is not "went away"
    assert sn.connected and not [r for r in caplog.records if "went away" in r.getMessage()]
    with sn.log_path.open("a") as f:
        f.write("WARNING : Connection attempt failed, retrying in 2.00 seconds\n")
    sn.supervise()
    went = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(went) == 1 and went[0].levelno == logging.INFO and not sn.connected
    assert "its run ended, or it stopped" in went[0].getMessage()
    with sn.log_path.open("a") as f:
        f.write("WARNING : Connection attempt failed, retrying in 4.00 seconds\n")
        f.write("INFO : Connection successful after 7.00 seconds and 3 tries.\n")
    sn.supervise()
    assert sn.connected
    assert [r.levelno for r in caplog.records if "answers again" in r.getMessage()] == [
        logging.INFO
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
