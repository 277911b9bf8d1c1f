"""``flower-superlink`` with its per-request state clean-up throttled.

Usage (what :mod:`fedseal.server.deploy` runs)::

    python -m fedseal.server.superlink --control-socket state/control/superlink.sock \
        --host 127.0.0.1 --port 9091 --database state/superlink.db ...

Why. With ``--database`` (which ``fl-server run --resume`` needs: runs and registered sites
survive a restart) Flower 1.42's SuperLink keeps its state in SQLite, and
``SqlCoreState._cleanup_expired_task_tokens`` runs two ``UPDATE ... RETURNING`` statements and
a commit at the start of *every* ``get_run_status`` and ``get_runs`` call. ``get_run_status``
runs on every Fleet and Runtime object push and pull (``check_abort``), so a single message
costs a dozen clean-ups; profiled in the demo (3 sites, 2 cores) the clean-up was the largest
single item of the SuperLink's CPU time (about a tenth), and the SuperLink is the busiest
process of a deployment. Its only job is to expire task claims whose heartbeat stopped, with
heartbeat deadlines of tens of seconds; running it at most once per
``FEDSEAL_SUPERLINK_CLEANUP_S`` seconds (default :data:`fedseal.settings.DEFAULT_CLEANUP_S`,
read with every ``FEDSEAL_*`` variable by :meth:`fedseal.settings.Environment.read`) delays such an
expiry by at most that long and changes nothing else: an expired task still records the
deadline it missed (``finished_at = active_until``), not the time of the clean-up.

The control plane (``--control-socket PATH``, what ``fl-server run`` passes). Flower 1.42 serves
its Control API (``/v1/control/*``: start, stop and list runs, register nodes), the Runtime API
(``/v1/runtime/*``, ServerAppIo) and the Fleet API (``/v1/fleet/*``) as one FastAPI app on one
TCP ``--host``/``--port``, and its open-source build has no authentication for the Control API
(account login needs Flower's enterprise OIDC plugin) and none for the Runtime API's
``acquire-task`` in ``subprocess`` isolation (the SuperExec secret is honoured only in
``process`` isolation). On a loopback port any local user could therefore list runs and read
their config, or start a run that the coordinator's SuperExec installs and runs as the
coordinator, with its key. With ``--control-socket`` the launcher serves Flower's app on two
listeners, in one process and one event loop:

* the TCP ``--host``/``--port`` (TLS as configured) serves only ``/health``, ``/v1/fleet/*`` (what
  the fleet gateway forwards) and ``/v1/runtime/*``; every other path, the Control API included,
  gets ``404`` before Flower sees it;
* the Unix socket ``PATH`` serves only ``/health`` and ``/v1/control/*``, plain HTTP (nothing
  leaves the host). Its directory is created ``0700`` (an existing one must belong to this user
  and is set to ``0700``), the socket is bound under ``umask 0177`` and set ``0600``, and every
  connection's peer is checked with ``SO_PEERCRED``: a process of another user is disconnected
  even if someone loosened the modes. The socket file is removed on exit.
* the Runtime API's ``acquire-task`` (how the SuperExec claims the ServerApp task of a new run,
  and with it the run's FAB and config) requires Flower's SuperExec HMAC secret, also in
  ``subprocess`` isolation: the launcher writes a fresh random secret (``superexec.secret``,
  ``0600``, beside the socket, removed on exit) and hands it to the SuperExec it starts. Every
  other Runtime call needs the task token that ``acquire-task`` returns.

The coordinator talks to the Control API over the socket with :func:`control_client` (Flower's
``ControlHttpClient`` on an ``httpx`` Unix-socket transport) and submits runs with
:func:`start_run` (the ``StartRun`` request ``flwr run APP_DIR`` sends); the ``flwr`` CLI cannot
reach a Unix socket. Without ``--control-socket`` the launcher serves Flower's app unchanged.

Everything else is the unchanged ``flower-superlink`` CLI (TLS, ``--enable-supernode-auth``,
the database). What is changed inside Flower is changed by :mod:`fedseal.server.flower_patches`
(one version gate, ``flwr==1.42.*``): an upgrade fails loudly rather than run unpatched.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseal.server import flower_patches
from fedseal.server.errors import CoordinatorError
from fedseal.settings import Environment

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

__all__ = [
    "CONTROL_SOCKET_PATHS",
    "TCP_PATHS",
    "ControlSocketError",
    "control_client",
    "control_socket_path",
    "install_control_socket",
    "start_run",
]

# ---------------------------------------------------------------------------------------------
# The control plane: Control API on a Unix socket only, Runtime acquire-task behind a secret.

#: Paths the SuperLink's TCP port still serves with ``--control-socket`` (prefixes end in ``/``).
TCP_PATHS = ("/health", "/v1/fleet/", "/v1/runtime/")
#: Paths the control socket serves.
CONTROL_SOCKET_PATHS = ("/health", "/v1/control/")
CONTROL_DIR = "control"
CONTROL_SOCKET = "superlink.sock"
SUPEREXEC_SECRET_FILE = "superexec.secret"  # noqa: S105 (a file name)
#: ``sizeof(sockaddr_un.sun_path) - 1`` on Linux: the longest path a socket can be bound to.
MAX_SOCKET_PATH_BYTES = 107
_CONTROL_ARG = "--control-socket"
_TCP_REFUSAL = "Not Found: the Control API is served on the coordinator's control socket"


class ControlSocketError(CoordinatorError):
    """The control socket's path or directory cannot be used safely (message says why)."""


def control_socket_path(state_dir: Path) -> Path:
    """Where ``fl-server`` puts the SuperLink's control socket: ``STATE/control/superlink.sock``.

    Raises:
        ControlSocketError: The absolute path is too long for a Unix socket.
    """
    path = Path(state_dir).absolute() / CONTROL_DIR / CONTROL_SOCKET
    _check_socket_path(path)
    return path


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
        raise ControlSocketError(
            f"the control socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes "
            "(a Unix socket limit): use a shorter coordinator.state_dir"
        )


def _private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700), or make an existing one of ours 0700; refuse anything else."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlSocketError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ControlSocketError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    os.chmod(path, 0o700)


def bind_control_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from birth, in a private directory.

    A stale socket left by a killed SuperLink is replaced; any other file at ``path`` is refused.
    """
    _check_socket_path(path)
    _private_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlSocketError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"cannot bind the control socket {path}: {exc}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _write_secret(path: Path) -> bytes:
    """A fresh random secret written to ``path`` (0600, created anew)."""
    secret = secrets.token_hex(32).encode()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid of the process at the other end of a Unix socket (``None``: unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return int(uid)


def same_user_only(base: type[asyncio.Protocol], uid: int) -> type[asyncio.Protocol]:
    """``base`` (a uvicorn HTTP protocol) that drops connections from any process not run by ``uid``.

    Where ``SO_PEERCRED`` is unavailable (not Linux) every peer is refused, so a misconfigured
    platform fails closed.
    """
    from flwr.supercore import log

    class SameUserOnly(base):  # type: ignore[valid-type,misc]
        _refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = _peer_uid(transport)
            if peer != uid:
                self._refused = True
                log(logging.WARNING, "Control socket: refused a connection from uid %s (only uid %s may "
                    "connect)", peer, uid)
                transport.abort()  # type: ignore[attr-defined]
                return
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def eof_received(self) -> bool | None:
            return None if self._refused else super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._refused:
                super().connection_lost(exc)

    SameUserOnly.__name__ = f"SameUserOnly{base.__name__}"
    return SameUserOnly


class OnlyPaths:
    """An ASGI wrapper passing only requests whose path is in ``paths`` (``/x/`` = a prefix).

    Other HTTP requests get ``404`` without reaching the app; lifespan events pass through.
    """

    def __init__(self, app: Any, paths: Sequence[str], refusal: str) -> None:
        self.app = app
        self.paths = tuple(paths)
        self.body = json.dumps({"detail": refusal}).encode()

    def allows(self, path: str) -> bool:
        return any(path.startswith(p) if p.endswith("/") else path == p for p in self.paths)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or self.allows(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: close without accepting
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


def _uvicorn_server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc, unused-ignore]
        """A uvicorn server leaving signals to :func:`_serve_both` (two servers, one loop)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _serve_both(tcp_config: Any, socket_config: Any, control_sock: socket.socket) -> tuple[list[int], bool]:
    """Run the TCP server, then (once its lifespan started) the control-socket server, until a
    signal or either one ends. Returns the signals caught and whether both servers started
    (for :func:`_exit_like_uvicorn`)."""
    server_cls = _uvicorn_server_class()
    tcp, ctl = server_cls(tcp_config), server_cls(socket_config)
    caught: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        caught.append(sig)
        for server in (tcp, ctl):
            if server.should_exit and sig == signal.SIGINT:
                server.force_exit = True
            server.should_exit = True

    async def serve() -> None:
        tcp_task = asyncio.create_task(tcp.serve())
        while not tcp.started and not tcp_task.done():
            await asyncio.sleep(0.05)
        tasks = {tcp_task}
        if not tcp_task.done() and not tcp.should_exit:
            tasks.add(asyncio.create_task(ctl.serve(sockets=[control_sock])))
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        tcp.should_exit = ctl.should_exit = True
        await asyncio.gather(*tasks)

    from uvicorn._compat import asyncio_run

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        asyncio_run(serve(), loop_factory=tcp_config.get_loop_factory())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return caught, bool(tcp.started and ctl.started)


def _exit_like_uvicorn(caught: list[int], started: bool) -> None:
    """End as ``uvicorn.run`` does: re-raise a caught SIGINT/SIGTERM; exit 3 if a server never
    started (the TCP port could not be bound, Flower's start-up failed, or the socket's server)."""
    for sig in reversed(caught):
        signal.raise_signal(sig)
    if not started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE


def install_control_socket(socket_path: Path) -> Callable[[], None]:
    """Make ``flower-superlink`` serve its Control API only on ``socket_path`` (see the module doc).

    Replaces Flower's ``_run_superlink_http_api`` (which runs one uvicorn server on the TCP
    port) and, in ``subprocess`` isolation, wraps ``_get_superexec_command`` so the SuperExec
    it starts signs ``acquire-task`` with a fresh secret. Returns the clean-up (removes the
    socket and the secret files), which the replacement also runs when it returns.

    Raises:
        ControlSocketError: The socket path is too long, or its directory is not private to us.
        fedseal.server.flower_patches.FlowerVersionError: The installed Flower lacks what is
            replaced (not ``flwr==1.42.*``).
    """
    flower_patches.require_superlink_internals()
    socket_path = Path(socket_path).absolute()
    secret_path = socket_path.parent / SUPEREXEC_SECRET_FILE
    sock = bind_control_socket(socket_path)
    bound = os.stat(socket_path)
    wrote_secret: list[bool] = []

    def cleanup() -> None:
        with contextlib.suppress(OSError):
            st = os.lstat(socket_path)
            if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):  # ours, not a successor's
                os.unlink(socket_path)
        if wrote_secret:
            with contextlib.suppress(OSError):
                os.unlink(secret_path)
        sock.close()

    atexit.register(cleanup)  # also when Flower's own argument checks exit

    def run_http_api(lifespan_config: Any) -> None:
        import uvicorn
        from flwr.supercore import log
        from flwr.supercore.http_logging import get_uvicorn_log_config
        from flwr.supercore.logger import console_handler

        try:
            if lifespan_config.isolation == "subprocess":
                wrote_secret.append(True)
                secret = _write_secret(secret_path)
                lifespan_config = dataclasses.replace(lifespan_config, superexec_auth_secret=secret)
                flower_patches.add_superexec_arguments(
                    ["--superexec-auth-secret-file", str(secret_path)]
                )
            app = flower_patches.superlink_app(lifespan_config)
            host, port = lifespan_config.host, lifespan_config.port
            log(logging.INFO, "Starting the SuperLink Runtime and Fleet HTTP APIs on %s:%s.", host, port)
            log(logging.INFO, "Starting the SuperLink Control HTTP API on the Unix socket %s "
                "(this user only).", socket_path)
            tcp_config = uvicorn.Config(
                app=OnlyPaths(app, TCP_PATHS, _TCP_REFUSAL),
                host=host,
                port=port,
                reload=False,
                access_log=True,
                log_config=get_uvicorn_log_config(console_handler.level),
                ssl_keyfile=lifespan_config.ssl_keyfile,
                ssl_certfile=lifespan_config.ssl_certfile,
                workers=1,
            )
            socket_config = uvicorn.Config(
                app=OnlyPaths(app, CONTROL_SOCKET_PATHS, "Not Found"),
                lifespan="off",
                access_log=True,
                log_config=None,
                proxy_headers=False,
                workers=1,
            )
            socket_config.load()
            socket_config.http_protocol_class = same_user_only(
                socket_config.http_protocol_class, os.geteuid()
            )
            caught, started = _serve_both(tcp_config, socket_config, sock)
        finally:
            cleanup()
        _exit_like_uvicorn(caught, started)

    flower_patches.serve_superlink_http_api_with(run_http_api)
    return cleanup


def control_client(socket_path: Path, timeout: float = 30.0) -> ControlHttpClient:
    """Flower's Control API client (the ``flwr`` CLI's interceptors) over the control socket.

    Raises:
        fedseal.server.flower_patches.FlowerVersionError: Flower's client is not built the way
            this expects (not ``flwr==1.42.*``).
    """
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient(
        "http://fedseal-control",
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        timeout=timeout,
    )
    return flower_patches.control_client_on_socket(client, socket_path, timeout)


def start_run(client: ControlHttpClient, app_dir: Path, run_config: str) -> int:
    """Submit ``app_dir`` as a run, as ``flwr run APP_DIR --run-config RUN_CONFIG`` does; its id.

    ``run_config`` is the ``--run-config`` string (``key=value`` pairs, TOML values).

    Raises:
        RuntimeError: The SuperLink answered without a run id.
        httpx.HTTPError: The request failed (transport or HTTP status).
    """
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import parse_config_args
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab_from_disk(Path(app_dir))
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    request = StartRunRequest(
        fab=fab_to_proto(fab),
        override_config=user_config_to_proto(parse_config_args([run_config])),
        federation="",
    )
    response = client.StartRun(request)
    if not response.HasField("run_id"):
        raise RuntimeError("the SuperLink started no run")
    return int(response.run_id)


def split_control_arg(argv: list[str]) -> tuple[Path | None, list[str]]:
    """``--control-socket PATH`` (or ``=PATH``) taken out of ``argv``; the rest for Flower."""
    rest: list[str] = []
    path: str | None = None
    args = iter(argv)
    for arg in args:
        if arg == _CONTROL_ARG:
            path = next(args, "")
            if not path:
                raise ControlSocketError(f"{_CONTROL_ARG} needs a path")
        elif arg.startswith(_CONTROL_ARG + "="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return (Path(path) if path is not None else None), rest


def main() -> None:
    """Run ``flower-superlink`` with the clean-up throttled (arguments as for Flower's CLI, plus
    ``--control-socket PATH``: the Control API on that Unix socket only, see the module doc).

    The process's ``FEDSEAL_*`` variables are read here, once; a bad one exits with code 2."""
    try:
        environment = Environment.read()
        flower_patches.throttle_task_token_cleanup(environment.superlink_cleanup_s)
        control_socket, rest = split_control_arg(sys.argv[1:])
        if control_socket is not None and not {"-h", "--help", "-V", "--version"} & set(rest):
            install_control_socket(control_socket)
    except (ValueError, RuntimeError, ControlSocketError, OSError) as err:
        print(f"fedseal superlink: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.superlink.cli import flower_superlink

    sys.argv[:] = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
