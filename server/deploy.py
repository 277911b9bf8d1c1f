"""``fl-server run``: start Flower's SuperLink, the Fleet gateway, register sites, start the run.

What runs where (Flower 1.42 deployment runtime)::

    fl-server run (this process)
     ├─ flower-superlink  --host 127.0.0.1 --port {internal_port}   TLS, --enable-supernode-auth
     │    (via :mod:`fedseal.server.superlink`, which throttles its per-request state clean-up)
     │    Control API only on the Unix socket state_dir/control/superlink.sock (0600, this user)
     │    └─ flower-superexec -> flwr-serverapp -> fedseal.server.flower_app:app (installed code)
     ├─ FleetGateway on {fleet_host}:{fleet_port}, TLS: forwards /v1/fleet/* only
     └─ audit service (gRPC, TLS with the server certificate) on {audit_host}:{audit_port}:
        serves ``state_dir/audit.sqlite`` read-only to enrolled sites (secure runs only)

The audit log is written by the ServerApp (:mod:`fedseal.server.audit_hook`), another process;
``fl-server run`` creates it (genesis and roster entries) before submitting the run, then serves
it read-only: each request re-reads the SQLite file, so sites see every signed tree head as soon
as the ServerApp commits it. The roster the service authenticates sites against is the one the
log records (:func:`fedseal.audit.writer.roster_from_log`), so a revocation logged by the
coordinator takes effect on the next request.

Flower 1.42 serves Runtime (ServerAppIo), Control and Fleet on one HTTP port, so that port stays
on loopback and sites reach only the gateway (see :mod:`fedseal.server.gateway`). Sites are
registered with the SuperLink's Control API (the request ``flwr supernode register`` sends,
made from this process) from the roster's active entries; their SuperNodes authenticate with
the site key (the SuperLink checks a signed timestamp per request and rejects unregistered
keys). The run is submitted with the ``StartRun`` request ``flwr run`` sends, over the
control socket (:func:`fedseal.server.superlink.start_run`), from a generated app directory
holding only a ``pyproject.toml`` whose components name the installed
``fedseal.server.flower_app:app`` (and ``fedseal.client.flower_app``; partner sites ignore the
FAB, see :mod:`fedseal.client.executor`).

Child processes get ``PR_SET_PDEATHSIG`` (Linux), so a SIGKILLed coordinator takes its SuperLink
down with it; the SuperLink's own children watch their parent's pid.

Start-up checks (:func:`check_start_up`), before anything starts: the TLS files (``tls.ca_cert``
a readable PEM CA certificate; ``tls.server_cert`` and ``tls.server_key`` readable and forming
one certificate chain), the coordinator key file, and every port the coordinator will listen on
(``network.internal_port`` on 127.0.0.1, ``fleet_port``, ``audit_port`` for secure runs,
``metrics_port`` unless 0) free on its host. A failure is one line naming the file or port
(step ``start-up``).

Notes on Flower 1.42's deployment runtime (read from the installed package):

* ``flower-superlink`` is one uvicorn/FastAPI app serving ``/v1/runtime/*`` (ServerAppIo),
  ``/v1/control/*`` and ``/v1/fleet/*`` on ``--host``/``--port`` (default 127.0.0.1:9091 here);
  ``--fleet-api-address``/``--control-api-address`` are deprecated (the old gRPC servers start
  only with the internal env ``FLWR_INTERNAL_GRPC_*_API=1``, and SuperNodes speak HTTP anyway).
  So there is no separate Control port to firewall: hence the gateway.
* TLS: ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` (one certificate for all APIs).
  ``--enable-supernode-auth`` requires TLS; nodes are registered with the Control API
  (``flwr supernode register PUB.openssh``, ECDSA P-256 public key in OpenSSH form) and then
  authenticate every Fleet request with a signature over a timestamp only (not the body: fedseal
  signs its own envelopes). An unregistered key makes the SuperNode exit with code 305.
* ``--database FILE`` persists runs and registered nodes (used for ``--resume``);
  ``--disable-runtime-dependency-installation`` stops ``uv sync`` of the FAB's dependencies.
* Runs are submitted with ``flwr run APP_DIR FEDERATION`` against ``$FLWR_HOME/config.toml``
  (``[superlink.NAME] address/root-certificates``). The SuperLink's ``flower-superexec`` then
  starts ``flwr-serverapp``, which installs the FAB into ``$FLWR_HOME/apps`` and imports the
  ``serverapp`` component (here the installed ``fedseal.server.flower_app:app``).
* ``flower-supernode`` (``--superlink``, ``--root-certificates``,
  ``--auth-supernode-private-key`` = unencrypted OpenSSH key, ``--isolation subprocess|process``,
  ``--host/--port`` of its own Runtime API): with ``process`` isolation, something else must
  ``AcquireTask`` from that Runtime API; fedseal's :mod:`fedseal.client.executor` does, running
  the installed ClientApp and never the FAB.
* Latency: the SuperNode sleeps 3 s between empty pulls and ``Grid.send_and_receive`` sleeps 3 s
  between pulls (fedseal's SuperNode launcher polls every 0.25 s, and
  :func:`fedseal.server.exchange.exchange` backs off from 5 ms to 0.2 s); each message is several HTTP object
  requests (about eight per message, two at a time). Messages are listed before their objects
  are uploaded, and Flower's object pulls then wait 1 s before retrying, at every hop
  (ServerApp -> SuperNode -> executor -> SuperNode -> ServerApp): fedseal retries after 50 ms
  (``FEDSEAL_OBJECT_PULL_BACKOFF_S``). The SuperLink's SQLite state cleans up expired task
  tokens on every object request; :mod:`fedseal.server.superlink` does it at most once a
  second. With both, one stage costs about 2.5-3.5 s on the busy 2-core demo host (was 4-6.5 s).
* Restarts: with ``--database`` the SuperLink keeps runs and registered nodes, and SuperNodes
  reconnect on their own (exponential back-off). But a SuperNode that had pulled a message when
  the SuperLink died can wedge (it waits forever for a reply to a task it never created). A
  SuperNode killed without signing off stays ONLINE for up to 2 x 30 s, and the SuperLink
  refuses to activate it again meanwhile ("Failed to activate SuperNode", exit code 305): a
  restarted site ends that stale session itself first (:mod:`fedseal.client.node`, a signed
  ``DeactivateNode`` through the gateway) and rejoins under the same node id, so the round
  loop sees it again. ``--resume`` pings the cohort first
  (``query.ping``, again every 15 s to the sites that have not answered or answered with an
  error, until ``run.sites_wait_timeout_s``) and a wedged site is a dropout.
* Strategies (``flwr.serverapp.strategy``) aggregate ``Message`` replies; FedOpt variants need
  ``configure_train`` called first (they remember ``current_arrays``), and ``sample_nodes``
  blocks until ``min_available_nodes`` are online (fedseal passes them a fixed node view).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseal.server.audit_serving import audit_service
from fedseal.server.config import ServerConfig
from fedseal.server.control_api import ControlApi, register_sites
from fedseal.server.errors import DeployError
from fedseal.server.gateway import FleetGateway
from fedseal.server.metrics import MULTIPROC_ENV, DriverMetrics, serve_collected
from fedseal.server.roster import Enrolment
from fedseal.server.rundir import (
    MAX_REASON_CHARS,
    ROUNDS_FILE,
    SERVERAPP_PID_FILE,
    STATUS_FILE,
    read_rounds,
)
from fedseal.server.runs import RunRecord, Runs, RunsError
from fedseal.server.site_floors import enrolment_refusal
from fedseal.server.strategies import check_strategy
from fedseal.settings import Environment, SettingsError

__all__ = [
    "Coordinator",
    "RunOutcome",
    "check_run",
    "check_start_up",
    "coordinator_up",
    "drive_run",
    "flower_bin",
    "pdeathsig_preexec",
    "run_coordinator",
    "run_end_line",
    "serve_coordinator",
    "serving_mismatch",
]

FEDERATION = "fedseal"
#: In the state directory: the metrics files the runs' ServerApps write (served by this process).
METRICS_DIR = "metrics"


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeployError("flower", f"{name} is not installed")
    return found


def pdeathsig_preexec() -> None:
    """In the child: die with SIGKILL when the parent dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_file = log_path.open("ab")
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=pdeathsig_preexec,
        )
        log_file.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _app_dir(cfg: ServerConfig) -> Path:
    """A code-free Flower app: only a pyproject.toml naming installed components."""
    d = cfg.coordinator.state_dir / "flower-app"
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(
        "\n".join(
            [
                "[build-system]",
                'requires = ["hatchling"]',
                'build-backend = "hatchling.build"',
                "",
                "[project]",
                'name = "fedseal-run"',
                'version = "1.0.0"',
                "dependencies = []",
                "",
                "[tool.flwr.app]",
                'publisher = "fedseal"',
                "",
                "[tool.flwr.app.components]",
                'serverapp = "fedseal.server.flower_app:app"',
                'clientapp = "fedseal.client.flower_app:app"',
                "",
                "[tool.flwr.app.config]",
                'fedseal-config = ""',
                "fedseal-resume = false",
                "",
            ]
        )
    )
    return d


def _flwr_home(cfg: ServerConfig) -> Path:
    home = cfg.coordinator.state_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{FEDERATION}"',
        "",
        f"[superlink.{FEDERATION}]",
        f'address = "127.0.0.1:{cfg.network.internal_port}"',
    ]
    if cfg.tls.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{cfg.tls.ca_cert}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _wait_http(
    url: str, ca: Path | None, timeout: float, proc: subprocess.Popen[bytes], log: tuple[Path, int]
) -> None:
    """Wait until ``url`` answers; ``log``: the SuperLink's log and where this start's output
    begins in it (its last error is named if it exits)."""
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + timeout
    log_path, offset = log
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = last_error_line(log_path, offset=offset)
            found = f"; its last error in {log_path}: {last}" if last else f"; see {log_path}"
            raise DeployError(
                "superlink", f"flower-superlink exited with code {proc.returncode}{found}"
            )
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2):  # noqa: S310
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError("superlink", f"not ready at {url} after {timeout}s")


class RunOutcome:
    """How a run ended. ``reason``: why it failed (``None`` when it completed)."""

    def __init__(
        self,
        status: str,
        rounds: list[dict[str, object]],
        model: str | None,
        audit_log: str | None = None,
        reason: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.status = status
        self.rounds = rounds
        self.model = model
        self.audit_log = audit_log
        self.reason = reason
        self.run_id = run_id
        self.record: RunRecord | None = None  # the registry's record once it ended


#: How much of the end of superlink.log is searched for the ServerApp's last error.
LOG_TAIL_BYTES = 64 * 1024


def failure_reason(state: Path, status_doc: dict[str, Any]) -> str:
    """Why a run failed: the ServerApp's own ``reason`` in ``status.json``, else (it died
    without writing one: killed, out of memory, failed to import) the last error line that
    Flower's SuperLink logged for it in ``superlink.log`` (the ServerApp's output goes there)."""
    reason = status_doc.get("reason")
    if status_doc.get("phase") == "failed" and isinstance(reason, str) and reason:
        return reason
    log_path = state / "superlink.log"
    try:
        last = last_error_line(log_path, strict=True)
    except OSError as exc:
        return (
            f"the ServerApp ended without recording a reason, and {log_path} is unreadable: {exc}"
        )
    found = f"; its last error in {log_path}: {last}" if last else f"; see {log_path}"
    return f"the ServerApp ended without recording a reason{found}"


def last_error_line(log_path: Path, *, offset: int = 0, strict: bool = False) -> str:
    """The last error in the end of ``log_path`` after byte ``offset`` (a traceback's last line,
    "SomeError: ...", or the SuperLink launcher's "fedseal superlink: ..." refusal, else the last
    line with ``ERROR``), colour codes removed, at most MAX_REASON_CHARS; ``""`` when none.

    Raises:
        OSError: ``strict`` and the log cannot be read (else ``""``).
    """
    try:
        with log_path.open("rb") as f:
            f.seek(max(offset, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        if strict:
            raise
        return ""
    last = last_error = ""
    for line in tail.splitlines():
        text = _ANSI.sub("", line).strip()
        if _EXCEPTION_LINE.match(text) or text.startswith("fedseal superlink: "):
            last = text  # a traceback's last line ("SomeError: message"), or the launcher's refusal
        elif "ERROR" in text:
            last_error = text
    return (last or last_error)[:MAX_REASON_CHARS]


_EXCEPTION_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception)(: |$)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _deployment(
    cfg: ServerConfig, roster: Enrolment, extra_env: dict[str, str]
) -> Iterator[tuple[dict[str, str], _Children, dict[int, str], ControlApi]]:
    """SuperLink up, sites registered, then the gateway opens (a site never races enrolment).
    ``extra_env``: variables for the SuperLink and what it starts (the ServerApps)."""
    children = _Children()
    gateway_server = None
    control: ControlApi | None = None
    try:
        home = _flwr_home(cfg)
        env = _env(home) | extra_env
        state = cfg.coordinator.state_dir
        from fedseal.server.superlink import ControlSocketError, control_socket_path

        try:
            control_socket = control_socket_path(state)
        except (ValueError, ControlSocketError) as exc:
            raise DeployError("superlink", str(exc)) from None
        # flower-superlink, with its per-request SQL clean-up throttled (fedseal.server.superlink).
        argv = [
            sys.executable, "-m", "fedseal.server.superlink",
            "--control-socket", str(control_socket),
            "--host", "127.0.0.1",
            "--port", str(cfg.network.internal_port),
            "--database", str(state / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if cfg.tls.insecure:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile", str(cfg.tls.ca_cert),
                "--ssl-certfile", str(cfg.tls.server_cert),
                "--ssl-keyfile", str(cfg.tls.server_key),
                "--enable-supernode-auth",
            ]
        log_path = state / "superlink.log"
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        proc = children.start(argv, log_path, env)
        scheme = "http" if cfg.tls.insecure else "https"
        _wait_http(
            f"{scheme}://127.0.0.1:{cfg.network.internal_port}/health", cfg.tls.ca_cert, 60, proc,
            (log_path, log_offset),
        )
        control = ControlApi(control_socket)
        nodes = register_sites(cfg, roster, control)
        gw = FleetGateway(
            f"{scheme}://127.0.0.1:{cfg.network.internal_port}",
            cfg.tls.ca_cert,
            cfg.limits.max_message_bytes,
        )
        try:
            gateway_server = gw.serve(
                host=cfg.network.fleet_host,
                port=cfg.network.fleet_port,
                certfile=cfg.tls.server_cert,
                keyfile=cfg.tls.server_key,
            )
        except RuntimeError as exc:  # e.g. the port was taken after the start-up checks
            raise DeployError("fleet gateway", str(exc)) from None
        yield env, children, nodes, control
    finally:
        if gateway_server is not None:
            gateway_server.should_exit = True
        if control is not None:
            control.close()
        children.stop()


#: How long a busy port may take to be released by a process that is ending (a predecessor).
PORT_GRACE_S = 3.0


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DeployError(
            "start-up", f"{key} {path} cannot be read: {exc.strerror or exc}"
        ) from None


def _check_tls(cfg: ServerConfig) -> None:
    tls = cfg.tls
    if tls.ca_cert is None or tls.server_cert is None or tls.server_key is None:
        raise DeployError(
            "start-up",
            "tls.ca_cert, tls.server_cert and tls.server_key are required "
            "unless tls.insecure = true",
        )
    ca = _read(tls.ca_cert, "tls.ca_cert")
    try:
        ssl.create_default_context(cadata=ca.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise DeployError(
            "start-up",
            f"tls.ca_cert {tls.ca_cert} holds no PEM CA certificate ({type(exc).__name__})",
        ) from None
    _read(tls.server_cert, "tls.server_cert")
    _read(tls.server_key, "tls.server_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    except ssl.SSLError as exc:
        raise DeployError(
            "start-up",
            f"tls.server_cert {tls.server_cert} and tls.server_key {tls.server_key} do not load "
            f"as a certificate and its key ({exc.reason or exc})",
        ) from None


def _port_busy(host: str, port: int, grace_s: float) -> OSError | None:
    """The error binding ``host:port`` gives (as a server binds: ``SO_REUSEADDR``), or None when
    it is free; a port in use is tried again for ``grace_s`` seconds (a predecessor ending)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host}: {exc.strerror}")
    family, _, _, _, address = infos[0]
    deadline = time.monotonic() + grace_s
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
                return None
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    return exc
        time.sleep(0.2)


def listening_ports(cfg: ServerConfig) -> list[tuple[str, str, int, str]]:
    """(config key, host, port, what) for every port ``fl-server run`` listens on (port 0:
    none, or an ephemeral one, is left out)."""
    net = cfg.network
    ports = [
        ("network.internal_port", "127.0.0.1", net.internal_port, "the SuperLink"),
        ("network.fleet_port", net.fleet_host, net.fleet_port, "the fleet gateway (sites)"),
    ]
    if cfg.run.secure:
        ports.append(("network.audit_port", net.audit_host, net.audit_port, "the audit service"))
    metrics = ("network.metrics_port", net.metrics_host, net.metrics_port, "the metrics endpoint")
    ports.append(metrics)
    return [p for p in ports if p[2] != 0]


def check_start_up(cfg: ServerConfig) -> None:
    """The coordinator's start-up checks, before anything starts: the TLS files (unless
    ``tls.insecure``), the coordinator key file, and every port it will listen on.

    Raises:
        DeployError: Step ``start-up``; the message names the file or port and why.
    """
    if not cfg.tls.insecure:
        _check_tls(cfg)
    _read(cfg.coordinator.key, "coordinator.key")
    for key, host, port, what in listening_ports(cfg):
        busy = _port_busy(host, port, PORT_GRACE_S)
        if busy is None:
            continue
        in_use = busy.errno == errno.EADDRINUSE
        why = "is already in use" if in_use else f"cannot be bound ({busy.strerror})"
        raise DeployError(
            "start-up",
            f"port {port} on {host} ({key}, {what}) {why}: stop what holds it or change {key} in "
            f"{cfg.path.name}",
        )


def end_stale_serverapp(state_dir: Path, on_info: Callable[[str], None], grace_s: float = 5.0) -> None:
    """End the ServerApp process a SIGKILLed predecessor left running.

    Flower's ``flwr-serverapp`` notices that its parent is gone and interrupts itself, but its
    shutdown can wait on retries toward the dead SuperLink, still holding the metrics port:
    the restarted run's ServerApp then failed to start (seen in CI's multi-host run). The
    process is identified by the pid the ServerApp writes (``serverapp.pid``) *and* its command
    line naming ``flwr-serverapp``, so a reused pid is never signalled.
    """
    path = state_dir / SERVERAPP_PID_FILE
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return  # no pid recorded, or that process is gone
    if "flwr-serverapp" not in cmdline:
        return
    on_info(f"ending the previous run's ServerApp (pid {pid}), still running")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _running(pid):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        else:
            return
    raise DeployError("restart", f"the previous run's ServerApp (pid {pid}) does not end")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (ended, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Coordinator:
    """A coordinator that is up: SuperLink, gateway, audit service (secure), metrics endpoint.

    ``cfg``: the configuration it serves (state directory, TLS, network, limits are its own;
    each run brings its ``[run]``, ``[dp]`` and ``[consortium]``)."""

    cfg: ServerConfig
    children: _Children
    control: ControlApi
    metrics: DriverMetrics
    audit_port: int | None


def check_run(cfg: ServerConfig) -> None:
    """What a run's configuration must pass before it is started: a known, accepted strategy
    and a roster that can give it ``run.min_sites`` sites.

    Raises:
        DeployError: Step ``roster``: too few sites enrolled (names the numbers).
        fedseal.server.strategies.StrategyError: The strategy is refused or unknown.
    """
    check_strategy(cfg.run.strategy)
    roster = Enrolment.load_or_create(cfg.coordinator.roster)
    problem = enrolment_refusal(cfg, len(roster.active()))
    if problem is not None:
        raise DeployError("roster", problem)


def serving_mismatch(serving: ServerConfig, cfg: ServerConfig) -> str | None:
    """Why the coordinator serving ``serving`` cannot run ``cfg`` (a run brings its own
    ``[run]``, ``[dp]`` and ``[consortium]``; the rest is the coordinator's), or None."""
    for section in ("coordinator", "tls", "network", "limits"):
        if getattr(serving, section) != getattr(cfg, section):
            return (
                f"{cfg.path.name}'s [{section}] differs from the serving coordinator's "
                f"({serving.path}): a run brings only [run], [dp] and [consortium]"
            )
    if cfg.run.secure and not serving.run.secure:
        return (
            f"{cfg.path.name} asks for a secure run, but the coordinator serves no audit log "
            f"(run.secure = false in {serving.path}): serve with run.secure = true"
        )
    return None


@contextlib.contextmanager
def coordinator_up(
    cfg: ServerConfig,
    environment: Environment,
    *,
    on_info: Callable[[str], None],
    on_ready: Callable[[], None] | None = None,
) -> Iterator[Coordinator]:
    """Start everything a run needs and keep it up while inside: start-up checks, SuperLink,
    site registration, gateway, audit service, the metrics endpoint (:func:`serve_collected`,
    from ``state_dir/metrics``). ``on_ready``: called once it is all up (the demo starts its
    sites there).

    Raises:
        DeployError: A step failed (names the step).
    """
    roster = Enrolment.load_or_create(cfg.coordinator.roster)
    state = cfg.coordinator.state_dir
    state.mkdir(parents=True, exist_ok=True)
    end_stale_serverapp(state, on_info)
    check_start_up(cfg)
    metrics_dir = state / METRICS_DIR
    try:
        metrics = serve_collected(metrics_dir, cfg.network.metrics_port, cfg.network.metrics_host)
    except OSError as exc:
        raise DeployError("start-up", f"{exc.strerror or exc}") from None
    extra_env = {MULTIPROC_ENV: str(metrics_dir)} if cfg.network.metrics_port else {}
    try:
        with (
            _deployment(cfg, roster, extra_env) as (_env_vars, children, nodes, control),
            audit_service(cfg, roster, environment.coordinator_passphrase) as audit_port,
        ):
            on_info(f"SuperLink up on 127.0.0.1:{cfg.network.internal_port} (loopback only, no Control API; "
                    f"Control API on {control.socket_path}, this user only); "
                    f"fleet gateway on {cfg.network.fleet_host}:{cfg.network.fleet_port}; "
                    f"{len(nodes)} sites registered")
            if audit_port is not None:
                on_info(f"audit service on {cfg.network.audit_host}:{audit_port} "
                        f"(TLS={'off' if cfg.tls.insecure else 'on'})")
            if cfg.network.metrics_port:
                on_info(f"metrics on http://{cfg.network.metrics_host}:{cfg.network.metrics_port}/metrics")
            if on_ready is not None:
                on_ready()
            yield Coordinator(cfg, children, control, metrics, audit_port)
    finally:
        metrics.close()
        # A ServerApp still running (the coordinator was stopped mid-run) ends with it.
        with contextlib.suppress(DeployError):
            end_stale_serverapp(state, on_info)


def drive_run(
    up: Coordinator,
    cfg: ServerConfig,
    runs: Runs,
    rec: RunRecord,
    *,
    on_round: Callable[[dict[str, object]], None],
    on_info: Callable[[str], None],
    on_status: Callable[[dict[str, Any]], None] | None = None,
    shutting_down: Callable[[], str | None] = lambda: None,
) -> RunOutcome:
    """Run ``rec`` (its configuration ``cfg``) on the coordinator ``up`` to its end; its record
    follows (running, then completed / failed / stopped). An operator's stop request
    (``fl-server stop``) and ``shutting_down()`` (a reason once this process is asked to end)
    are passed on to the ServerApp, which stops after the round in progress.

    Raises:
        DeployError: The SuperLink died, or its Control API failed (the record says failed).
    """
    state = cfg.coordinator.state_dir
    if not rec.resume:  # before it reads as running: its rounds are not the last run's
        for name in (ROUNDS_FILE, STATUS_FILE):
            (state / name).unlink(missing_ok=True)
    rec = runs.start(rec)
    try:
        outcome = _drive(up, cfg, runs, rec, on_round=on_round, on_info=on_info, on_status=on_status,
                         shutting_down=shutting_down)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            ended = runs.finish(rec, "interrupted", reason=f"fl-server ended mid-run ({type(exc).__name__})")
        else:
            why = str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"
            ended = runs.finish(rec, "failed", reason=why[:MAX_REASON_CHARS])
        up.metrics.runs_ended.labels(status=ended.status).inc()
        raise
    status = "completed" if outcome.status == "finished:completed" else "failed"
    committed = sum(1 for r in outcome.rounds if r.get("outcome") == "committed")
    ended = runs.finish(
        rec, status, reason=outcome.reason or "", model=outcome.model, audit_log=outcome.audit_log,
        run_id=outcome.run_id or "", extra={"rounds_committed": committed, "state_dir": str(state)},
    )
    up.metrics.runs_ended.labels(status=ended.status).inc()
    outcome.record = ended
    return outcome


def _drive(
    up: Coordinator,
    cfg: ServerConfig,
    runs: Runs,
    rec: RunRecord,
    *,
    on_round: Callable[[dict[str, object]], None],
    on_info: Callable[[str], None],
    on_status: Callable[[dict[str, Any]], None] | None,
    shutting_down: Callable[[], str | None],
) -> RunOutcome:
    state = cfg.coordinator.state_dir
    # Sites enrolled (or revoked) since the coordinator came up count from this run on.
    register_sites(cfg, Enrolment.load_or_create(cfg.coordinator.roster), up.control)
    app_dir = _app_dir(cfg)
    # A TOML basic string (backslashes escaped); Runs.submit refuses quotes and control characters.
    run_cfg = f'fedseal-config={json.dumps(rec.config)} fedseal-resume={"true" if rec.resume else "false"}'
    flower_run = up.control.start_run(app_dir, run_cfg)
    runs.update(rec, flower_run_id=flower_run)
    on_info(f"run {rec.id} started (Flower run {flower_run}); fl-server logs {rec.id} follows it, "
            f"fl-server stop {rec.id} stops it")
    seen = len(read_rounds(state / ROUNDS_FILE))
    status = "running"
    last_poll = 0.0
    asked_stop = False
    while True:
        rounds = read_rounds(state / ROUNDS_FILE)
        for r in rounds[seen:]:
            on_round(r)
        seen = len(rounds)
        if any(p.poll() is not None for p in up.children.procs):
            raise DeployError("superlink", "flower-superlink exited during the run")
        if not asked_stop:
            closing = shutting_down()
            if closing is not None and runs.stop_requested(rec.id) is None:
                runs.request_stop(rec.id, closing)
            reason = runs.relay_stop(rec)
            if reason is not None:
                asked_stop = True
                on_info(f"run {rec.id}: stop asked ({reason}); it stops after the round in progress")
        st_path = state / STATUS_FILE
        if st_path.exists():
            # The ServerApp replaces the file atomically; a read racing a replace is retried.
            with contextlib.suppress(ValueError, OSError):
                current = json.loads(st_path.read_text())
                if on_status is not None and isinstance(current, dict):
                    on_status(current)
                phase = current.get("phase")
                if phase in ("finished", "failed"):
                    status = "finished:completed" if phase == "finished" else "finished:failed"
                    break
        # Flower's view of the run, less often: catches a ServerApp that died without
        # writing its status.
        if time.monotonic() - last_poll > 5:
            last_poll = time.monotonic()
            flower_status = up.control.run_status(flower_run)
            if flower_status.startswith("finished"):
                status = flower_status
                break
        time.sleep(0.5)
    rounds = read_rounds(state / ROUNDS_FILE)
    for r in rounds[seen:]:
        on_round(r)
    st_path = state / STATUS_FILE
    st = json.loads(st_path.read_text()) if st_path.exists() else {}
    reason = None if status == "finished:completed" else failure_reason(state, st)
    return RunOutcome(status, rounds, st.get("model"), st.get("audit_log"), reason, run_id=st.get("run_id"))


def read_environment(on_info: Callable[[str], None]) -> Environment:
    """Every ``FEDSEAL_*`` variable, read and checked once (the SuperLink launcher and the
    ServerApp, processes of their own, read the same environment); names it does not know are
    named in one ``on_info`` line.

    Raises:
        DeployError: A variable's value is refused (names it).
    """
    try:
        environment = Environment.read()
    except SettingsError as exc:
        raise DeployError("superlink", str(exc)) from None
    if environment.unknown:
        on_info(f"warning: unknown FEDSEAL_* variables ignored (a typo?): {', '.join(environment.unknown)}")
    return environment


def run_coordinator(
    cfg: ServerConfig,
    *,
    resume: bool,
    on_round: Callable[[dict[str, object]], None],
    on_info: Callable[[str], None],
    on_ready: Callable[[], None] | None = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
) -> RunOutcome:
    """Start everything, run the configured rounds, stop everything. Blocks.

    The run is registered (:class:`fedseal.server.runs.Runs`: ``fl-server runs``, ``logs``,
    ``stop`` see it). ``on_status`` gets the ServerApp's status (phase, round, stage) about
    twice a second (the live view). ``on_ready`` is called once the SuperLink and gateway are
    up and the sites registered, before the run starts (the demo starts its sites there).

    Raises:
        DeployError: A step of the deployment failed (names the step), or another coordinator
            drives runs on this state directory.
        fedseal.server.strategies.StrategyError: The strategy is refused or unknown.
    """
    environment = read_environment(on_info)
    check_run(cfg)
    runs = Runs(cfg.coordinator.state_dir)
    try:
        with runs.driving(cfg.path):
            rec = runs.submit(cfg.path, rounds_planned=cfg.run.rounds, resume=resume)
            with coordinator_up(cfg, environment, on_info=on_info, on_ready=on_ready) as up:
                return drive_run(up, cfg, runs, rec, on_round=on_round, on_info=on_info, on_status=on_status)
    except RunsError as exc:
        raise DeployError("runs", f"{exc}: queue this run with fl-server submit instead") from None


#: How long ``serve`` waits between looks at its queue.
QUEUE_POLL_S = 0.5


def serve_coordinator(
    cfg: ServerConfig,
    *,
    on_round: Callable[[dict[str, object]], None],
    on_info: Callable[[str], None],
    shutting_down: Callable[[], str | None],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve runs until ``shutting_down()`` gives a reason: the coordinator stays up (SuperLink,
    gateway, audit service, metrics endpoint) and runs the queued runs one at a time, oldest
    first. A run whose configuration cannot run here (:func:`serving_mismatch`,
    :func:`check_run`) fails with why, and the next one runs. Asked to end during a run, the
    run is stopped after its round in progress first.

    Raises:
        DeployError: A step of the deployment failed, the SuperLink died, or another
            coordinator drives runs on this state directory.
    """
    from fedseal.server.config import ServerConfigError, load_server_config
    from fedseal.server.strategies import StrategyError

    environment = read_environment(on_info)
    runs = Runs(cfg.coordinator.state_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(runs.driving(cfg.path))
        except RunsError as exc:
            raise DeployError("runs", str(exc)) from None
        up = stack.enter_context(coordinator_up(cfg, environment, on_info=on_info, on_ready=on_ready))
        on_info(f"serving runs from {runs.root}: queue one with fl-server submit --config {cfg.path}")
        while shutting_down() is None:
            rec = runs.next_queued()
            queued = sum(1 for r in runs.all() if r.status == "queued")
            up.metrics.runs_queued.set(queued - (rec is not None))
            if rec is None:
                time.sleep(QUEUE_POLL_S)
                continue
            try:
                run_cfg = load_server_config(rec.config)
                problem = serving_mismatch(cfg, run_cfg)
                if problem is None:
                    check_run(run_cfg)
            except (ServerConfigError, StrategyError, DeployError, OSError) as exc:
                problem = str(exc)
            if problem is not None:
                runs.finish(runs.start(rec), "failed", started=False, reason=problem[:MAX_REASON_CHARS])
                up.metrics.runs_ended.labels(status="failed").inc()
                on_info(f"run {rec.id} failed: {problem}")
                continue
            up.metrics.run_active.set(1)
            try:
                outcome = drive_run(
                    up, run_cfg, runs, rec, on_round=on_round, on_info=on_info,
                    shutting_down=shutting_down,
                )  # fmt: skip
            finally:
                up.metrics.run_active.set(0)
            on_info(run_end_line(outcome))


def run_end_line(outcome: RunOutcome) -> str:
    """A run's end as one line: its id, how it ended, and its model or why it failed."""
    rec = outcome.record
    head = f"run {rec.id}" if rec is not None else "run"
    status = rec.status if rec is not None else outcome.status
    if status == "completed":
        return f"{head} completed; final model {outcome.model}; audit log {outcome.audit_log}"
    if status == "stopped" and rec is not None:
        kept = f"; final model {outcome.model}" if outcome.model else ""
        return f"{head} stopped ({rec.stop_reason}){kept}"
    return f"{head} {status}: {outcome.reason or 'no reason recorded'}"
