"""The SuperLink's control plane: the Control API only on a 0600 Unix socket, for this user only.

Issue 15 point 5: on Flower 1.42 the Control API shares the SuperLink's loopback TCP port with
the Fleet and Runtime APIs, unauthenticated, so any local user could list runs (and read their
config) or start one. With ``--control-socket`` (:mod:`fedseal.server.superlink`) the TCP port
answers ``404`` for ``/v1/control/*``, the Control API is on a Unix socket in a 0700 directory
whose peers are checked with ``SO_PEERCRED``, and the Runtime API's ``acquire-task`` needs the
SuperExec secret. The end-to-end test starts the real SuperLink as ``fl-server run`` does and
attacks it as user ``nobody``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fedseal.server import superlink
from fedseal.server.pki import create_ca, issue_server_certificate
from fedseal.sim.demo import free_port

# ---------------------------------------------------------------------------------------------
# Units: path filter, argument, socket directory, peer check.


def _asgi(app: Any, path: str, kind: str = "http") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": kind} if kind == "lifespan" else {"type": kind, "path": path}
    asyncio.run(app(scope, receive, send))
    return sent


def test_only_paths_passes_its_prefixes_and_answers_404_to_the_rest() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope.get("path", scope["type"]))

    tcp = superlink.OnlyPaths(app, superlink.TCP_PATHS, "the Control API is elsewhere")
    for path in ("/health", "/v1/fleet/pull-messages", "/v1/runtime/acquire-task"):
        assert _asgi(tcp, path) == []
    assert _asgi(tcp, "", kind="lifespan") == []
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/docs", "/openapi.json", "/healthz",
                 "/v1/controlx", "/v1/fleet"):
        start, body = _asgi(tcp, path)
        assert start["status"] == 404 and json.loads(body["body"]) == {"detail": "the Control API is elsewhere"}
    assert seen == ["/health", "/v1/fleet/pull-messages", "/v1/runtime/acquire-task", "lifespan"]

    ctl = superlink.OnlyPaths(app, superlink.CONTROL_SOCKET_PATHS, "Not Found")
    assert ctl.allows("/v1/control/start-run") and ctl.allows("/health")
    assert not ctl.allows("/v1/fleet/pull-messages") and not ctl.allows("/v1/runtime/acquire-task")
    assert _asgi(ctl, "/v1/runtime/acquire-task", kind="websocket") == [{"type": "websocket.close", "code": 1008}]


def test_the_control_socket_argument_is_taken_out_of_flowers_arguments() -> None:
    split = superlink.split_control_arg
    assert split(["--port", "1"]) == (None, ["--port", "1"])
    assert split(["--control-socket", "/s/c.sock", "--port", "1"]) == (Path("/s/c.sock"), ["--port", "1"])
    assert split(["--insecure", "--control-socket=/s/c.sock"]) == (Path("/s/c.sock"), ["--insecure"])
    with pytest.raises(superlink.ControlSocketError, match="needs a path"):
        split(["--control-socket"])


def test_the_socket_path_is_under_the_state_dir_and_must_fit_a_unix_socket(tmp_path: Path) -> None:
    assert superlink.control_socket_path(tmp_path) == tmp_path / "control" / "superlink.sock"
    with pytest.raises(superlink.ControlSocketError, match=r"shorter coordinator\.state_dir"):
        superlink.control_socket_path(tmp_path / ("x" * 100))


def test_the_socket_is_born_0600_in_a_0700_directory_and_replaces_only_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "control" / "superlink.sock"
    sock = superlink.bind_control_socket(path)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    finally:
        sock.close()
    # The file a killed SuperLink left behind is replaced; a loosened directory is tightened.
    os.chmod(path.parent, 0o755)
    superlink.bind_control_socket(path).close()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    # Anything but a socket at the path is refused, not deleted.
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(superlink.ControlSocketError, match="not a socket"):
        superlink.bind_control_socket(path)
    assert path.read_text() == "not a socket"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_socket_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    os.chown(other, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(superlink.ControlSocketError, match="belongs to uid"):
        superlink.bind_control_socket(other / "superlink.sock")


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.aborted = False

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def abort(self) -> None:
        self.aborted = True


class _Protocol:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def connection_made(self, transport: Any) -> None:
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.calls.append("data")

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")


def test_the_peer_check_lets_this_user_in_and_drops_any_other() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        mine = superlink.same_user_only(_Protocol, os.geteuid())()  # type: ignore[arg-type]
        transport = _Transport(a)
        mine.connection_made(transport)  # type: ignore[arg-type]
        mine.data_received(b"GET")
        mine.connection_lost(None)
        assert mine.calls == ["made", "data", "lost"] and not transport.aborted  # type: ignore[attr-defined]

        theirs = superlink.same_user_only(_Protocol, os.geteuid() + 1)()  # type: ignore[arg-type]
        transport = _Transport(a)
        theirs.connection_made(transport)  # type: ignore[arg-type]
        theirs.data_received(b"GET")
        theirs.eof_received()
        theirs.connection_lost(None)
        assert theirs.calls == [] and transport.aborted  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# End to end: the real SuperLink, attacked as user ``nobody``.

#: Run as the attacker (stdlib only, ``python -I -S``): the requests ``flwr ls`` / ``flwr run``
#: make, raw, against the TCP port and the control socket. Prints one JSON object of outcomes.
ATTACK = r'''
import http.client, json, socket, ssl, sys
port, sock_path, bodies = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(sock_path)

def call(conn, method, path, body_hex):
    try:
        headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
        conn.request(method, path, body=bytes.fromhex(body_hex) if body_hex is not None else None, headers=headers)
        res = conn.getresponse()
        return {"status": res.status, "body": res.read()[:200].decode("latin1")}
    except Exception as exc:
        return {"error": type(exc).__name__ + ": " + str(exc)}
    finally:
        conn.close()

def tcp():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection("127.0.0.1", int(port), context=ctx, timeout=10)

out = {"tcp_health": call(tcp(), "GET", "/health", None)}
for name, (path, body) in bodies.items():
    out["tcp_" + name] = call(tcp(), "POST", path, body)
    out["socket_" + name] = call(UnixConnection("localhost"), "POST", path, body)
print(json.dumps(out))
'''

APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "control-probe"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedseal"

[tool.flwr.app.components]
serverapp = "fedseal_no_such_module:app"
clientapp = "fedseal_no_such_module:app"

[tool.flwr.app.config]
who = ""
"""


def _as_nobody_argv() -> list[str] | None:
    """How to run the attack script as ``nobody`` here (``None``: this host cannot)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    drop = ["setpriv", "--reuid=nobody", "--regid=" + str(pwd.getpwnam("nobody").pw_gid), "--clear-groups"]
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([*drop, python, "-I", "-S", "-c", "import os; print(os.getuid())"],
                               capture_output=True, text=True, cwd="/", timeout=60, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == str(pwd.getpwnam("nobody").pw_uid):
            return [*drop, python, "-I", "-S", "-c", ATTACK]
    return None


def _attack(argv: list[str], port: int, sock_path: Path, bodies: dict[str, tuple[str, str]]) -> dict[str, Any]:
    out = subprocess.run([*argv, str(port), str(sock_path), json.dumps(bodies)],
                         capture_output=True, text=True, cwd="/", timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@contextlib.contextmanager
def _superlink(tmp_path: Path, state: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, Path]]:
    """The SuperLink as ``fl-server run`` starts it (TLS, SuperNode auth, a database) plus the
    control socket in ``state``; yields (process, port, socket path, CA certificate)."""
    now = datetime.now(UTC)
    ca = create_ca("control-plane test CA", now=now)
    cert, key = issue_server_certificate(ca, ["localhost", "127.0.0.1"], now=now)
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.pem").write_bytes(ca.certificate_pem())
    (tls / "server.pem").write_bytes(cert)
    (tls / "server.key").write_bytes(key)
    sock_path = superlink.control_socket_path(state)
    port = free_port()
    env = dict(os.environ)
    env.update(FLWR_HOME=str(state / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    argv = [
        sys.executable, "-m", "fedseal.server.superlink",
        "--control-socket", str(sock_path),
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile", str(tls / "ca.pem"), "--ssl-certfile", str(tls / "server.pem"),
        "--ssl-keyfile", str(tls / "server.key"), "--enable-supernode-auth",
    ]
    with (state / "superlink.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (state / "superlink.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the SuperLink did not come up"
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield proc, port, sock_path, tls / "ca.pem"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_another_local_user_can_neither_list_nor_start_runs_while_the_coordinator_can(tmp_path: Path) -> None:
    from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    attacker = _as_nobody_argv()
    if attacker is None:
        pytest.skip("needs root, setpriv and a user 'nobody' able to run Python (as in CI)")
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(APP_TOML)

    # The exact bodies `flwr ls` and `flwr run` send (a real FAB), and SuperExec's AcquireTask.
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab_from_disk(app_dir)
    start = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})))
    bodies = {
        "list_runs": ("/v1/control/list-runs", ListRunsRequest().SerializeToString().hex()),
        "start_run": ("/v1/control/start-run", start.SerializeToString().hex()),
        "acquire_task": ("/v1/runtime/acquire-task", AcquireTaskRequest().SerializeToString().hex()),
    }

    # The state directory is world-traversable (0755, not under pytest's private 0700 base), so
    # what keeps `nobody` out is the control directory fedseal creates, nothing incidental.
    state = Path(tempfile.mkdtemp(prefix="fedseal-ctl-"))
    os.chmod(state, 0o755)
    try:
        _attack_the_superlink(tmp_path, state, attacker, bodies, app_dir)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _attack_the_superlink(
    tmp_path: Path, state: Path, attacker: list[str], bodies: dict[str, tuple[str, str]], app_dir: Path
) -> None:
    from flwr.proto.control_pb2 import ListRunsRequest

    owner = [sys.executable, "-I", "-S", "-c", ATTACK]
    with _superlink(tmp_path, state) as (proc, port, sock_path, _ca):
        # The socket and the SuperExec secret: this user only.
        secret = sock_path.parent / superlink.SUPEREXEC_SECRET_FILE
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and len(secret.read_bytes()) >= 32

        # The coordinator's own client: lists, then starts a run (what fl-server run does).
        client = superlink.control_client(sock_path)
        try:
            assert dict(client.ListRuns(ListRunsRequest()).run_dict) == {}
            run_id = superlink.start_run(client, app_dir, 'who="coordinator"')
        finally:
            client.close()

        # As `nobody`: the TCP port is reachable (health answers) but has no Control API; the
        # socket cannot even be opened; AcquireTask without the SuperExec secret is refused.
        seen = _attack(attacker, port, sock_path, bodies)
        assert seen["tcp_health"]["status"] == 200, seen
        for name in ("list_runs", "start_run"):
            assert seen[f"tcp_{name}"]["status"] == 404 and "control socket" in seen[f"tcp_{name}"]["body"], seen
            assert seen[f"socket_{name}"]["error"].startswith("PermissionError"), seen
        assert seen["tcp_acquire_task"]["status"] == 401, seen

        # The same raw requests from the coordinator's user succeed on the socket (so the
        # attacker's requests were well-formed): a list, and a second run.
        mine = _attack(owner, port, sock_path, bodies)
        assert mine["socket_list_runs"]["status"] == 200 and mine["socket_start_run"]["status"] == 200, mine
        assert mine["tcp_list_runs"]["status"] == 404, mine

        # Defence in depth: with the modes loosened by mistake, `nobody` reaches the socket file
        # but the peer check drops the connection before any request is read.
        os.chmod(sock_path.parent, 0o755)
        os.chmod(sock_path, 0o666)
        loose = _attack(attacker, port, sock_path, bodies)
        for name in ("list_runs", "start_run"):
            assert "status" not in loose[f"socket_{name}"], loose
            assert not loose[f"socket_{name}"]["error"].startswith("PermissionError"), loose
        nobody_uid = pwd.getpwnam("nobody").pw_uid
        assert f"refused a connection from uid {nobody_uid}" in (state / "superlink.log").read_text()

        # Only the coordinator's two runs exist, and the SuperExec (holding the secret) claimed
        # the first: it leaves `pending` (the probe app then fails to import, as intended).
        client = superlink.control_client(sock_path)
        try:
            runs = dict(client.ListRuns(ListRunsRequest()).run_dict)
            assert len(runs) == 2 and run_id in runs, runs
            deadline = time.monotonic() + 90
            while (status := client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id].status).status == "pending":
                assert time.monotonic() < deadline, "the SuperExec never acquired the run: secret not accepted?"
                time.sleep(0.5)
            assert status.status in ("starting", "running", "finished"), status
        finally:
            client.close()

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    # A clean stop removes the socket and the secret.
    assert not sock_path.exists() and not secret.exists()
