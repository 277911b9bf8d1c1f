"""``fl-client run``: attest the dataset, start a SuperNode, answer tasks with the pinned app.

Steps (each failure stops the site with a message naming the step):

0. establish the site's trust anchor (``[trust]`` roster, ``[peers]``): a site that knows no
   peer but itself is refused at once (step ``trust``);
   then the start-up checks (step ``start-up``, one line naming the file or port, before the
   dataset, the coordinator or the SuperNode is touched): no other ``fl-client run`` uses the
   state directory, ``coordinator.ca_cert`` is a readable PEM certificate file,
   ``coordinator.public_key`` loads, and ``runtime.port`` is free on 127.0.0.1;
1. load the site key (``site.key``, 0600; passphrase from the env variable named in the config);
2. re-attest the dataset (:func:`fedseal.client.data.verify_dataset`: the shards must be
   exactly what the manifest describes) and compare its root with the approved root in force
   (:func:`fedseal.client.config.approved_root_in_force`: ``data.approved_root``, or the root
   re-enrolled in its place); a changed dataset is refused unless ``--re-enrol`` is given: then
   the new root is used, kept in ``<state_dir>/approved-root.json`` so later starts need no
   edit of client.toml, and the coordinator must approve it (``fl-server enroll``); with
   ``[data] contract``, the manifest must name that contract's digest (:func:`check_contract`);
3. pre-flight the coordinator's Fleet address: a TLS handshake against the pinned CA (or, with
   ``insecure``, a plain HTTP request), so "wrong CA" and "no TLS" fail here, clearly; while the
   coordinator cannot be reached the site says so and retries with back-off (1 s doubling to
   30 s) until it answers or SIGTERM/SIGINT stops the site;
4. end this site's previous session if the coordinator still holds it (a site stopped without
   signing off, e.g. ``kill -9``: Flower's SuperLink keeps its node online for up to 60 s and
   refuses to activate it again meanwhile; :func:`fedseal.client.flower_patches.end_session`
   signs Flower's ``DeactivateNode`` for the node id the site recorded), then start
   ``flower-supernode --isolation process`` (via :mod:`fedseal.client.supernode`, which
   shortens its 3 s idle poll) with the site key as its authentication key
   (Flower wants an unencrypted OpenSSH-format file: written 0600 into the state directory and
   deleted as soon as the SuperNode has read it), Runtime API on 127.0.0.1. If the coordinator
   still refuses to activate a site that has a previous session on record, the site says
   "previous session still registered, retrying in N s" and retries for that 60 s window; a
   key the coordinator does not know (not enrolled, or revoked) is refused with that reason;
5. run :class:`fedseal.client.executor.PinnedExecutor` until SIGTERM/SIGINT or the SuperNode exits.

The site's console: this process's stderr carries its log (``fl-client run`` configures
logging there; the SuperNode's own output goes to ``state_dir/supernode.log``), so the task
executor's and the ClientApp's lines reach the operator: each refused round or evaluation, and
each masked input a round left out, is one line naming the round, what and why
(:mod:`fedseal.client.flower_app`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.client.config import ClientConfig
from fedseal.client.errors import SiteError
from fedseal.settings import Environment, SettingsError

if TYPE_CHECKING:
    from fedseal.audit.receipts import SiteReceipts
    from fedseal.client.flower_patches import SessionEnd
    from fedseal.client.trust import SiteTrust

__all__ = ["SiteRunError", "check_start_up", "run_site", "wait_for_coordinator"]

log = logging.getLogger("fedseal.client")

AUTH_FAILED_MARKERS = (
    "Failed to activate SuperNode",
    "401",
    "Invalid SuperNode authentication",
    "not registered",
    "PERMISSION_DENIED",
)
#: What Flower's SuperNode logs when the SuperLink refuses ``ActivateNode`` (exit code 305): the
#: key is not registered, or its node is still ONLINE (a previous session not yet expired).
ACTIVATION_REFUSED = "Failed to activate SuperNode"
_NODE_ID_LINE = re.compile(rb"SuperNode ID: (\d+)")
#: Flower's line when its retries give up (``flwr.supercore.retry``).
_GAVE_UP = re.compile(r"Giving up reconnection after ([\d.]+) seconds and (\d+) tries")
#: Waits between retries while the coordinator cannot be reached: 1 s, doubling, at most 30 s.
WAIT_BACKOFF_S = (1.0, 30.0)
#: Waits between activation retries while a previous session may still be registered.
ACTIVATION_RETRY_S = (5.0, 15.0)
#: Seconds added to Flower's session window (2 x 30 s) before a refusal is taken as final.
ACTIVATION_MARGIN_S = 15.0
#: Waits before starting again a SuperNode whose Fleet loop ended (it gave up reconnecting):
#: 5 s, doubling, at most 120 s; back to 5 s once a restarted one has reconnected.
RESTART_BACKOFF_S = (5.0, 120.0)
#: How long a busy port may take to be released by a process that is ending.
PORT_GRACE_S = 3.0


def _check_recipes(
    cfg: ClientConfig,
    num_features: int,
    num_classes: int,
    on_info: Callable[[str], None] | None = None,
) -> tuple[str, ...]:
    """Run each allowed recipe once on a few rows of zeros, so a missing or broken one is named
    before the first round (``[limits] allowed_models``), and return those that fit.

    A recipe whose model does not take this dataset's shape (its factory raised ``ValueError``:
    :class:`~fedseal.client.models.ModelShapeError`, e.g. the built-in ``cnn`` on 30 features)
    is skipped with one warning line naming it and why (``on_info``, default the log): the
    defaults list both built-in models, and no dataset fits both. The site is refused only when
    no allowed recipe fits; a recipe that fails otherwise (not installed, fails to import, a
    factory or a part that breaks on a shape it takes) is refused as before.

    Raises:
        SiteRunError: Step ``recipe``: a recipe is broken (its one-line error), or none fits
            (one line naming each and why).
    """
    from fedseal.client.models import ModelShapeError
    from fedseal.client.recipe import RecipeError
    from fedseal.client.training import check_recipe

    where = f"[limits] allowed_models in {cfg.path.name}"
    shape = f"{num_features} features, {num_classes} classes"
    fits: list[str] = []
    misfits: list[ModelShapeError] = []
    for name in cfg.allowed_models:
        try:
            check_recipe(name, num_features=num_features, num_classes=num_classes)
        except ModelShapeError as exc:
            misfits.append(exc)
        except RecipeError as exc:
            raise SiteRunError("recipe", f"{exc} ({where})") from exc
        else:
            fits.append(name)
    if misfits and not fits:
        why = "; ".join(str(misfit) for misfit in misfits)
        raise SiteRunError(
            "recipe", f"no recipe in {where} fits this dataset ({shape}): {why}"
        ) from misfits[0]
    for misfit in misfits:
        (on_info or log.warning)(
            f"site {cfg.name}: warning: skipping recipe {misfit.name!r} of {where}: it does not "
            f"fit this dataset ({misfit.reason}); a round that asks for it fails here"
        )
    return tuple(fits)


class SiteRunError(SiteError):
    """The site cannot join (the message names the step and the reason)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def _pdeathsig() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _load_key(cfg: ClientConfig) -> ec.EllipticCurvePrivateKey:
    from fedseal.crypto.errors import KeyFormatError
    from fedseal.crypto.keys import load_private_key

    passphrase = None
    if cfg.passphrase_env:
        value = os.environ.get(cfg.passphrase_env)
        if not value:
            raise SiteRunError("site key", f"environment variable {cfg.passphrase_env} is unset")
        passphrase = value.encode()
    try:
        return load_private_key(cfg.key, passphrase)
    except (KeyFormatError, OSError) as exc:
        raise SiteRunError("site key", str(exc)) from exc


def attest_dataset(cfg: ClientConfig, *, re_enrol: bool, now_ms: int | None = None) -> str:
    """Re-attest and return the root to use.

    What the site trusts: only its own attestation of the data in ``data.dataset_dir``
    decides its root; the root in force (client.toml's, or the one re-enrolled in its place)
    only decides whether that root may be used without the operator's confirmation. With
    ``re_enrol`` a changed root is confirmed and kept in the state directory
    (:func:`fedseal.client.config.record_re_enrolment`, at ``now_ms``, default now); nothing
    the coordinator claims is ever written there (it still approves or refuses the root in
    every round).

    Raises:
        SiteRunError: The dataset is invalid, or changed since approval (without re_enrol),
            or the re-enrolment cannot be kept.
    """
    from fedseal.client.config import (
        APPROVED_ROOT_FILE,
        ClientConfigError,
        approved_root_in_force,
        record_re_enrolment,
    )
    from fedseal.client.data import DatasetError, verify_dataset

    try:
        # The attestation cache lives in the site's state directory: the dataset itself may be
        # mounted read-only (the container images mount /data so).
        att = verify_dataset(cfg.dataset_dir, cache_dir=cfg.state_dir / "attest-cache")
    except DatasetError as exc:
        raise SiteRunError("dataset", f"{cfg.dataset_dir} fails attestation: {exc}") from exc
    root = att.root.hex()
    try:
        in_force = approved_root_in_force(cfg)
    except ClientConfigError as exc:
        raise SiteRunError("dataset", str(exc)) from exc
    if root == in_force.root:
        return root
    if not re_enrol:
        where = "" if in_force.source == "client.toml" else f" (re-enrolled, {in_force.source})"
        raise SiteRunError(
            "dataset",
            f"dataset changed since approval: root {root} != approved {in_force.root}{where}; "
            f"ask the coordinator to run `fl-server enroll --site {cfg.name} --key SITE.pub "
            f"--dataset-root {root}`, then start once with --re-enrol",
        )
    try:
        path = record_re_enrolment(
            cfg, root, now_ms=int(time.time() * 1000) if now_ms is None else now_ms
        )
    except (ClientConfigError, OSError) as exc:
        kept = cfg.state_dir / APPROVED_ROOT_FILE
        raise SiteRunError("dataset", f"cannot keep the re-enrolled root in {kept}: {exc}") from exc
    log.warning(
        "dataset root changed to %s (re-enrolled in place of %s; kept in %s, client.toml "
        "needs no edit)",
        root,
        in_force.root,
        path,
    )
    return root


def check_contract(cfg: ClientConfig) -> bytes:
    """The digest of the data contract the dataset was prepared under (``b""``: none), after
    checking it is the one ``[data] contract`` names, if set.

    Raises:
        SiteRunError: Step ``contract``: the contract file is unreadable or malformed, or the
            dataset was prepared under another contract (or none): one line naming both.
    """
    from fedseal.client.data import DatasetError, load_manifest
    from fedseal.protocol.contract import ContractError, load_contract

    try:
        have = load_manifest(cfg.dataset_dir).contract
    except DatasetError as exc:
        raise SiteRunError("dataset", str(exc)) from exc
    if cfg.contract is None:
        return have
    try:
        want = load_contract(cfg.contract).digest()
    except ContractError as exc:
        raise SiteRunError("contract", f"data.contract: {exc}") from exc
    if have != want:
        prepared = f"under contract {have.hex()}" if have else "without a contract"
        raise SiteRunError(
            "contract",
            f"dataset {cfg.dataset_dir} was prepared {prepared}, but data.contract = "
            f"{cfg.contract} has digest {want.hex()}: prepare it again with "
            f"`fl-client data prepare SRC OUT --contract {cfg.contract}`",
        )
    return have


def wait_for_coordinator(
    cfg: ClientConfig,
    stop: threading.Event,
    on_info: Callable[[str], None],
    timeout: float = 10.0,
    backoff: tuple[float, float] = WAIT_BACKOFF_S,
) -> bool:
    """Check that the coordinator's Fleet address speaks the expected protocol, waiting for it.

    While it cannot be reached (refused, no route, unresolved name, timeout) the site prints
    that it is waiting and why, and retries after ``backoff[0]`` seconds, doubling up to
    ``backoff[1]``, until it answers or ``stop`` is set. Protocol errors fail at once.

    Returns:
        True once the coordinator answered; False if ``stop`` was set first.

    Raises:
        SiteRunError: TLS handshake failure (wrong CA, no TLS), or TLS where plain HTTP was
            configured.
    """
    delay, cap = backoff
    waited = False
    while not stop.is_set():
        try:
            _probe(cfg, timeout)
        except SiteRunError as exc:
            if exc.step != "connect":
                raise
            on_info(
                f"site {cfg.name}: waiting for the coordinator at {cfg.superlink} ({exc.reason}); "
                f"retrying in {delay:.0f} s (SIGTERM or Ctrl-C stops)"
            )
            waited = True
            if stop.wait(delay):
                break
            delay = min(delay * 2, cap)
            continue
        if waited:
            on_info(f"site {cfg.name}: the coordinator at {cfg.superlink} answers")
        return True
    return False


def _probe(cfg: ClientConfig, timeout: float) -> None:
    host, _, port_s = cfg.superlink.rpartition(":")
    host = host.strip("[]")
    port = int(port_s)
    if cfg.insecure:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_ca_context(cfg))
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        conn.close()
    except ssl.SSLError as exc:
        raise SiteRunError(
            "tls",
            f"TLS handshake with {cfg.superlink} failed ({exc.reason}); check coordinator.ca_cert",
        ) from exc
    except (http.client.HTTPException, ConnectionResetError) as exc:
        reason = (
            "the coordinator requires TLS; set coordinator.ca_cert and insecure = false"
            if cfg.insecure
            else _not_the_fleet_api(cfg, exc)
        )
        raise SiteRunError("tls", reason) from exc
    except OSError as exc:
        raise SiteRunError("connect", _os_reason(exc)) from exc
    if resp.status == 400 and cfg.insecure:
        raise SiteRunError(
            "tls", "the coordinator requires TLS; set coordinator.ca_cert and insecure = false"
        )


def _not_the_fleet_api(cfg: ClientConfig, exc: Exception) -> str:
    """Why a TLS peer that took the handshake but not an HTTP/1.1 request is not the Fleet API:
    most likely another of the coordinator's ports under the same certificate (its audit
    service speaks gRPC and drops the request)."""
    if cfg.audit_address is not None and cfg.audit_address == cfg.superlink:
        guess = "coordinator.audit_address names the same address: one of them is wrong"
    else:
        guess = "is it the audit port? The fleet port is network.fleet_port in the coordinator's server.toml"
    return (
        f"coordinator.superlink {cfg.superlink} answered but does not speak the fleet API "
        f"({type(exc).__name__}) — {guess}"
    )


def _os_reason(exc: OSError) -> str:
    """``exc`` in a few words: "connection refused", "timed out", "Name or service not known"."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:] if text.startswith("Connection") else text


def _ca_context(cfg: ClientConfig) -> ssl.SSLContext:
    """A TLS client context pinned to ``coordinator.ca_cert``.

    Raises:
        SiteRunError: The file cannot be read or holds no PEM certificate (names the file).
    """
    ca = cfg.ca_cert
    if ca is None:
        raise SiteRunError(
            "start-up", "coordinator.ca_cert is not set (required unless insecure = true)"
        )
    try:
        pem = ca.read_bytes()
    except OSError as exc:
        raise SiteRunError(
            "start-up", f"coordinator.ca_cert {ca} cannot be read: {exc.strerror or exc}"
        ) from None
    try:
        ctx = ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise SiteRunError(
            "start-up",
            f"coordinator.ca_cert {ca} holds no PEM CA certificate ({type(exc).__name__})",
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _port_busy(host: str, port: int, grace_s: float) -> OSError | None:
    """The error binding ``host:port`` gives (as a server would bind it: ``SO_REUSEADDR``), or
    None when it is free. A port in use is tried again for ``grace_s`` seconds (a process that is
    ending may still hold it)."""
    deadline = time.monotonic() + grace_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                return None
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    return exc
        time.sleep(0.2)


def check_start_up(cfg: ClientConfig) -> None:
    """The site's start-up checks, before anything starts: the CA file (unless insecure), the
    pinned coordinator key, and the SuperNode's Runtime API port.

    Raises:
        SiteRunError: Step ``start-up``; the message names the file or port and why.
    """
    if not cfg.insecure:
        _ca_context(cfg)
    _load_coordinator_key(cfg)
    busy = _port_busy("127.0.0.1", cfg.runtime_port, PORT_GRACE_S)
    if busy is not None:
        reason = (
            "is already in use"
            if busy.errno == errno.EADDRINUSE
            else f"cannot be bound ({busy.strerror})"
        )
        raise SiteRunError(
            "start-up",
            f"runtime.port {cfg.runtime_port} on 127.0.0.1 (the SuperNode's Runtime API) {reason}: "
            f"stop what holds it or set [runtime] port in {cfg.path.name}",
        )


def _load_coordinator_key(cfg: ClientConfig) -> ec.EllipticCurvePublicKey:
    from fedseal.crypto.errors import KeyFormatError
    from fedseal.crypto.keys import load_public_key

    try:
        return load_public_key(cfg.coordinator_key)
    except (KeyFormatError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SiteRunError(
            "start-up", f"coordinator.public_key {cfg.coordinator_key} cannot be loaded: {detail}"
        ) from None


@contextlib.contextmanager
def _state_lock(cfg: ClientConfig) -> Iterator[None]:
    """Hold ``state_dir/fl-client.lock`` (an exclusive ``flock``) while the site runs: two
    ``fl-client run`` on one state directory would share its node record, ledger and receipts.

    Raises:
        SiteRunError: Another process holds it (the message names the file and its pid).
    """
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        handle: IO[str] = (cfg.state_dir / "fl-client.lock").open("a+")
    except OSError as exc:
        raise SiteRunError(
            "start-up", f"state directory {cfg.state_dir} is not writable: {exc.strerror or exc}"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise SiteRunError(
                "start-up",
                f"another fl-client run (pid {holder}) is using the state directory {cfg.state_dir} "
                f"({handle.name} is locked): stop it first",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def _write_auth_key(cfg: ClientConfig, key: object) -> Path:
    d = cfg.state_dir / "supernode"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    path = d / "auth-key"
    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def _tail_bytes(path: Path, n: int) -> bytes:
    """The last ``n`` bytes of ``path`` (empty if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            return f.read()
    except OSError:
        return b""


def _tail(path: Path, n: int = 4000) -> str:
    return _tail_bytes(path, n).decode("utf-8", "replace")


def run_site(cfg: ClientConfig, *, re_enrol: bool, on_info: Callable[[str], None]) -> int:
    """Join the federation until stopped. Returns 0 on a clean stop.

    Every ``FEDSEAL_*`` variable is read and checked first, once (the SuperNode launcher, a
    process of its own, reads the same environment); ``FEDSEAL_*`` names it does not know (other
    than the site's ``passphrase_env``) are named in one ``on_info`` line.

    Raises:
        SiteRunError: A start-up step failed, or the SuperNode was refused/exited.
    """
    try:  # a bad value is named here, not in supernode.log
        environment = Environment.read()
    except SettingsError as exc:
        raise SiteRunError("supernode", str(exc)) from None
    unknown = [name for name in environment.unknown if name != cfg.passphrase_env]
    if unknown:
        on_info(f"warning: unknown FEDSEAL_* variables ignored (a typo?): {', '.join(unknown)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # First: a site that knows no peer (other than itself) would take its peers' keys from the
    # coordinator; refuse before attesting data or waiting for the coordinator.
    trust = site_trust(cfg)
    if not any(site != cfg.name for site in trust.peers):
        raise SiteRunError(
            "trust",
            "this site knows no peer: set [trust] roster + roster_authority (a consortium roster "
            "signed by an authority the coordinator does not hold) or a [peers] table; without "
            "them it would take its peers' keys from the coordinator",
        )
    with _state_lock(cfg):
        check_start_up(cfg)
        return _join(cfg, environment, trust, re_enrol=re_enrol, on_info=on_info)


def _join(
    cfg: ClientConfig,
    environment: Environment,
    trust: SiteTrust,
    *,
    re_enrol: bool,
    on_info: Callable[[str], None],
) -> int:
    """:func:`run_site` once the start-up checks passed: steps 1-5 of the module doc."""
    from fedseal.client.distributed import DevicesError
    from fedseal.client.executor import PinnedExecutor
    from fedseal.client.flower_app import SiteRuntime, make_client_app
    from fedseal.client.privacy_ledger import PrivacyLedger
    from fedseal.client.site_data import SiteDataError, load_site_data
    from fedseal.client.supernode import loopback_backoff
    from fedseal.client.train_checkpoint import Preemption

    key = _load_key(cfg)
    coordinator_key = _load_coordinator_key(cfg)
    root = attest_dataset(cfg, re_enrol=re_enrol)
    try:
        data = load_site_data(cfg.dataset_dir, validation_fraction=cfg.validation_fraction, seed=7)
    except SiteDataError as exc:
        raise SiteRunError("dataset", str(exc)) from exc
    if data.root_hex != root:
        raise SiteRunError("dataset", "manifest root differs from the attested root")
    contract = check_contract(cfg)
    on_info(
        f"site {cfg.name}: dataset root {root[:16]}… ({len(data.y_train)} train / {len(data.y_val)} validation rows)"
    )

    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not wait_for_coordinator(cfg, stop, on_info):
        on_info(f"site {cfg.name}: stopped while waiting for the coordinator")
        return 0
    import torch

    from fedseal.client.training import warm_up

    # One intra-op thread: a site shares its host; oversubscribed OpenMP threads are far slower.
    torch.set_num_threads(environment.torch_threads)
    try:
        ranks = cfg.devices.resolve()  # a GPU named but missing is said now, not in round 1
    except DevicesError as exc:
        raise SiteRunError("training", str(exc)) from exc
    if len(ranks) > 1:
        on_info(f"site {cfg.name}: local training on {len(ranks)} ranks ({', '.join(map(str, ranks))})")
    warm_up(data.num_features, data.num_classes)
    _check_recipes(cfg, data.num_features, data.num_classes, on_info)
    receipts = _site_receipts(cfg, key, coordinator_key)
    if receipts is not None:
        on_info(
            f"site {cfg.name}: checking audit receipts at {cfg.audit_address} after every round"
        )
    commitments = None
    if receipts is not None:
        from fedseal.client.commitments import ModelCommitments

        commitments = ModelCommitments(receipts.checker, receipts.source)
    for line in effective_policy(cfg, trust.sources, commitments is not None):
        on_info(f"site {cfg.name}: policy: {line}")
        log.info("policy: %s", line)
    if commitments is None:
        log.warning(
            "model commitments are NOT checked (no [coordinator] audit_address): this site "
            "cannot tell whether the model it trains is one the coordinator's log committed, "
            "and evaluates %s",
            "any model (evaluate_unverified)" if cfg.privacy.evaluate_unverified else "none",
        )
    runtime = SiteRuntime(
        name=cfg.name,
        data=data,
        limits=cfg.limits,
        allowed_models=cfg.allowed_models,
        identity_key=key,
        coordinator_key=coordinator_key,
        receipts=receipts,
        privacy=cfg.privacy,
        trusted_peers=dict(trust.peers),
        training_secret=training_secret(cfg.state_dir),
        commitments=commitments,
        guard_path=cfg.state_dir / "setup-guard.bin",
        # The DP rounds it takes part in are paid for here (what `fl-client privacy show` reads).
        ledger=PrivacyLedger(cfg.state_dir),
        contract=contract,
        devices=cfg.devices,
        # A round in progress and its training checkpoints: a restarted site continues them.
        round_dir=cfg.state_dir / "round",
        preemption=Preemption(stop),
        checkpoint_every_steps=cfg.checkpoint_every_steps,
    )
    app = make_client_app(runtime)

    node = SuperNodeProcess(cfg, key, stop)
    activation = _Activation(cfg, node, stop, on_info)
    try:
        activation.end_previous_session()
        node.start()
        on_info(
            f"site {cfg.name}: SuperNode connecting to {cfg.superlink} (TLS={'off' if cfg.insecure else 'on'})"
        )
        executor = PinnedExecutor(
            f"127.0.0.1:{cfg.runtime_port}", app, backoff=loopback_backoff(environment.pull_backoff)
        )
        worker = threading.Thread(target=executor.run_forever, args=(stop,), daemon=True)
        worker.start()
        _supervise(cfg, node, activation, stop, on_info)
        stop.set()
        worker.join(timeout=5)
    finally:
        node.terminate()
        closing = _receipts_line(cfg, receipts)
        if closing is not None:
            on_info(closing)
    proc = node.proc
    if proc is None or node.fleet_loop_ended() is not None:
        return 0  # a SuperNode that gave up is started again (_supervise) unless the site stops
    if proc.returncode not in (0, -signal.SIGTERM, None) and not _stopped_by_us(proc):
        tail = _tail(node.log_path)
        if any(m in tail for m in AUTH_FAILED_MARKERS):
            raise SiteRunError("authentication", activation.refusal())
        raise SiteRunError(
            "supernode", f"flower-supernode exited with code {proc.returncode}; see {node.log_path}"
        )
    return 0


def _receipts_line(cfg: ClientConfig, receipts: SiteReceipts | None) -> str | None:
    """The site's closing line on its audit receipts: only when it verified some (a site that
    took part in nothing has nothing to report)."""
    if receipts is None or receipts.verified <= 0:
        return None
    return f"site {cfg.name}: {receipts.verified} audit receipts verified"


def _supervise(
    cfg: ClientConfig,
    node: SuperNodeProcess,
    activation: _Activation,
    stop: threading.Event,
    on_info: Callable[[str], None],
    backoff: tuple[float, float] = RESTART_BACKOFF_S,
) -> None:
    """Follow the started SuperNode until ``stop`` is set or it exits for good (step 5).

    A SuperNode that exits is started again when it died of a signal while starting (at most
    :data:`SUPERNODE_START_RETRIES` times), when its activation was refused while this site's
    previous session may still be registered (:meth:`_Activation.retry`), or when its Fleet
    loop ended (it gave up reconnecting): then after a console line naming why and the wait
    (``backoff[0]`` s doubling to ``backoff[1]``, back to the first once it reconnected), the
    coordinator's address is checked again (:func:`wait_for_coordinator`: it waits while the
    coordinator is unreachable, and ends the site with one line if the address answers but is
    not the Fleet API), and the session the dead SuperNode left is ended first.

    Raises:
        SiteRunError: The coordinator's address no longer speaks the Fleet API, or a restarted
            SuperNode did not come up.
    """
    restarts = 0
    delay = backoff[0]
    while not stop.is_set():
        node.supervise()
        if node.connected:
            delay = backoff[0]
        if not node.exited.is_set():
            stop.wait(1.0)
            continue
        if node.crashed_while_starting() and restarts < SUPERNODE_START_RETRIES:
            restarts += 1
            log.warning(
                "the SuperNode died while starting (exit %s, see %s); starting it again (%d/%d)",
                node.returncode,
                node.log_path,
                restarts,
                SUPERNODE_START_RETRIES,
            )
            node.start()
            continue
        if node.activation_refused() and activation.retry():
            node.start()
            continue
        why = node.fleet_loop_ended()
        if why is None:
            return
        on_info(
            f"site {cfg.name}: the SuperNode stopped reaching the coordinator at {cfg.superlink} "
            f"({why}; see {node.log_path}); starting it again in {delay:.0f} s"
        )
        if stop.wait(delay):
            return
        delay = min(delay * 2, backoff[1])
        if not wait_for_coordinator(cfg, stop, on_info):
            return
        activation.restart()
        node.start()
        on_info(f"site {cfg.name}: SuperNode started again, connecting to {cfg.superlink}")


class _Activation:
    """A restarted site's way back in: end the session the coordinator still holds for it, and
    retry a refused activation while that session may still be registered.

    Flower 1.42's SuperLink answers ``ActivateNode`` with the same "Failed to activate
    SuperNode" for a key it does not know and for a node still ``ONLINE`` (a previous session,
    kept for 2 x 30 s after its last heartbeat). Before the SuperNode starts, the site signs a
    ``DeactivateNode`` for the node id it recorded (:func:`fedseal.client.flower_patches.end_session`),
    whose answer separates the two: HTTP 401 means the key does not own that node (not
    enrolled, revoked, or re-enrolled under a new node), so a refused activation is final;
    otherwise a refusal is retried, with one line each time, until the window has passed.
    """

    def __init__(
        self,
        cfg: ClientConfig,
        node: SuperNodeProcess,
        stop: threading.Event,
        on_info: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.stop = stop
        self.on_info = on_info
        self.previous: int | None = None
        self.outcome: SessionEnd | None = None
        self._first_refusal: float | None = None
        self._delay = ACTIVATION_RETRY_S[0]

    def end_previous_session(self) -> SessionEnd | None:
        """Send ``DeactivateNode`` for the recorded node id, if any (TLS with SuperNode
        authentication only: an ``insecure`` SuperNode registers a fresh key every start);
        returns (and keeps) the outcome, None when nothing was sent."""
        from fedseal.client.flower_patches import SessionEnd, end_session

        self.previous = self.node.previous_node_id()
        if self.previous is None or self.cfg.insecure:
            return None
        key = cast("ec.EllipticCurvePrivateKey", self.node.key)
        self.outcome, detail = end_session(self.cfg.superlink, self.cfg.ca_cert, key, self.previous)
        log.info("previous session (node %s): %s", self.previous, detail)
        if self.outcome is SessionEnd.ENDED:
            self.on_info(
                f"site {self.cfg.name}: ended this site's previous session (node {self.previous}), which the "
                "coordinator still held (the site had stopped without signing off)"
            )
        return self.outcome

    def restart(self) -> SessionEnd | None:
        """Before a SuperNode is started again: forget earlier refusals, and end the session
        the previous SuperNode left (:meth:`end_previous_session`)."""
        self._first_refusal = None
        self._delay = ACTIVATION_RETRY_S[0]
        return self.end_previous_session()

    def retry(self) -> bool:
        """After a refused activation: wait and return True to start the SuperNode again, or
        False when the refusal is final (no session on record, the key owns no node, the window
        has passed, or the site is stopping)."""
        from fedseal.client.flower_patches import SessionEnd, session_window_s

        if self.previous is None or self.cfg.insecure or self.outcome is SessionEnd.NOT_REGISTERED:
            return False
        now = time.monotonic()
        if self._first_refusal is None:
            self._first_refusal = now
        left = self._first_refusal + session_window_s() + ACTIVATION_MARGIN_S - now
        if left <= 0:
            return False
        delay = min(self._delay, left)
        self._delay = min(self._delay * 2, ACTIVATION_RETRY_S[1])
        self.on_info(
            f"site {self.cfg.name}: previous session still registered at the coordinator (node "
            f"{self.previous}; it expires at most {session_window_s():.0f} s after the site stopped), "
            f"retrying in {delay:.0f} s"
        )
        if self.stop.wait(delay):
            return False
        return self.end_previous_session() is not SessionEnd.NOT_REGISTERED

    def refusal(self) -> str:
        """Why the coordinator refused this site, for the final error."""
        from fedseal.client.flower_patches import SessionEnd

        todo = (
            f"send enrolment-request.txt (sh start.sh --request) to the coordinator; see "
            f"{self.node.log_path}"
        )
        if self._first_refusal is not None and self.outcome is not SessionEnd.NOT_REGISTERED:
            return (
                f"the coordinator refused this site's key for {time.monotonic() - self._first_refusal:.0f} s, "
                f"past the time its previous session (node {self.previous}) would have expired: "
                f"not enrolled, or revoked; {todo}"
            )
        return f"the coordinator refused this site's key (not enrolled, or revoked); {todo}"


def site_trust(cfg: ClientConfig) -> SiteTrust:
    """The site's trust anchor from ``[trust]`` and ``[peers]`` (roster verified, no rollback).

    Raises:
        SiteRunError: The roster does not verify, was rolled back, or conflicts with ``[peers]``.
    """
    from fedseal.client.trust import TrustError, load_site_trust

    try:
        return load_site_trust(
            roster_path=cfg.roster,
            authority_key_path=cfg.roster_authority,
            static_peers=cfg.peers,
            state_dir=cfg.state_dir,
        )
    except TrustError as exc:
        raise SiteRunError("trust", str(exc)) from exc


def effective_policy(cfg: ClientConfig, trusted: Mapping[str, str], commitments: bool) -> list[str]:
    """The lines ``fl-client run`` prints at start and ``fl-client policy show`` prints."""
    from fedseal.client.policy import describe_policy

    how = (
        f"checked against the signed log at {cfg.audit_address} (train and evaluate only committed models)"
        if commitments
        else (
            "NOT checked (no [coordinator] audit_address): the site cannot tell a committed model "
            "from another; it trains on the setup's model and "
            + (
                "evaluates any model (evaluate_unverified = true)"
                if cfg.privacy.evaluate_unverified
                else "evaluates none"
            )
        )
    )
    others = {s: src for s, src in trusted.items() if s != cfg.name}
    return list(describe_policy(cfg.privacy, cfg.limits, others, commitments=how))


def training_secret(state_dir: Path) -> bytes:
    """The site's 32-byte training secret (``state_dir/training-secret``, 0600, made once).

    Raises:
        SiteRunError: The file exists but is not 32 bytes.
    """
    path = state_dir / "training-secret"
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
            f.flush()
            os.fsync(f.fileno())
    secret = path.read_bytes()
    if len(secret) != 32:
        raise SiteRunError("state", f"{path} holds {len(secret)} bytes, expected 32")
    return secret


def _site_receipts(
    cfg: ClientConfig, key: ec.EllipticCurvePrivateKey, coordinator_key: ec.EllipticCurvePublicKey
) -> SiteReceipts | None:
    """The receipt checker over the coordinator's audit service, if ``audit_address`` is set.

    Raises:
        SiteRunError: The site is blocked by an earlier failed check, or the CA is unreadable.
    """
    if cfg.audit_address is None:
        return None
    import grpc

    from fedseal.audit.receipts import (
        ContributionBlockedError,
        ReceiptChecker,
        SiteReceipts,
    )
    from fedseal.audit.service_client import GrpcAuditSource
    from fedseal.protocol import MessageKind

    checker = ReceiptChecker(
        cfg.state_dir / "receipts",
        site=cfg.name,
        coordinator_key=coordinator_key,
    )
    try:
        checker.ensure_may_contribute()
    except ContributionBlockedError as exc:
        raise SiteRunError("receipts", f"{exc}; see {cfg.state_dir / 'receipts'}") from exc
    if cfg.insecure or cfg.ca_cert is None:
        channel = grpc.insecure_channel(cfg.audit_address)
    else:
        try:
            ca_pem = cfg.ca_cert.read_bytes()
        except OSError as exc:
            raise SiteRunError("receipts", f"cannot read coordinator.ca_cert: {exc}") from exc
        channel = grpc.secure_channel(cfg.audit_address, grpc.ssl_channel_credentials(ca_pem))
    source = GrpcAuditSource(
        channel,
        site=cfg.name,
        key=key,
        clock=lambda: int(time.time() * 1000),
        timeout_s=10.0,  # a check runs inside a stage; an unreachable service must not stall it
    )
    return SiteReceipts(checker, source, MessageKind.MASKED_INPUT.type_name)


class SuperNodeProcess:
    """``flower-supernode`` as a child process (stopping the site when it exits).

    Its node id (the SuperNode logs ``SuperNode ID: N`` once activated) is recorded in
    ``state_dir/supernode/node-id``, so that a restarted site can end that session if the
    coordinator still holds it (see :class:`_Activation`).

    Known Flower 1.42 limit: a SuperNode can wedge when its SuperLink dies between pulling a
    message and pushing the reply (it waits forever for a reply to a task never created), so a
    SuperNode that ran is not restarted here; the site's process is (by its operator or service
    manager), and rejoins at once. The exception: a SuperNode whose Fleet loop ended (it gave up
    reconnecting; :meth:`fleet_loop_ended`) has stopped pulling anything, and is started again
    (:func:`_supervise`).
    """

    def __init__(self, cfg: ClientConfig, key: object, stop: threading.Event) -> None:
        self.cfg = cfg
        self.key = key
        self.stop = stop
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = cfg.state_dir / "supernode.log"
        self._offset = 0
        self._connected = False
        self._ever_connected = False
        self._start_offset = 0
        self.exited = threading.Event()

    @property
    def node_id_path(self) -> Path:
        """Where the SuperNode's node id is recorded (``state_dir/supernode/node-id``)."""
        return self.log_path.parent / "supernode" / "node-id"

    def previous_node_id(self) -> int | None:
        """The node id of this site's last session: the last ``SuperNode ID`` in the end of
        ``supernode.log`` (a site killed before it recorded the id), else the record."""
        ids = _NODE_ID_LINE.findall(_tail_bytes(self.log_path, 256 * 1024))
        if ids:
            return int(ids[-1])
        with contextlib.suppress(OSError, ValueError):
            return int(self.node_id_path.read_text().strip())
        return None

    def _record_node_id(self, node_id: int) -> None:
        path = self.node_id_path
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{node_id}\n")
            os.replace(tmp, path)

    def activation_refused(self) -> bool:
        """Whether the SuperNode that just exited was refused activation by the coordinator: it
        exited with an error status after logging Flower's exit code 305 and "Failed to
        activate SuperNode" (this start's part of the log)."""
        rc = self.returncode
        if rc is None or rc <= 0:
            return False
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._start_offset)
                text = f.read()
        except OSError:
            return False
        return SUPERNODE_CONNECTION_ERROR.encode() in text and ACTIVATION_REFUSED.encode() in text

    def fleet_loop_ended(self) -> str | None:
        """Why the SuperNode that just exited stopped, if its Fleet loop ended with an exception
        (it gave up reconnecting: the launcher's exit status
        :data:`~fedseal.client.supernode.EXIT_FLEET_LOOP_ENDED`); None for any other exit."""
        from fedseal.client.supernode import EXIT_FLEET_LOOP_ENDED, FLEET_LOOP_ENDED

        if self.returncode != EXIT_FLEET_LOOP_ENDED:
            return None
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._start_offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        found = _GAVE_UP.findall(text)
        gave_up = (
            f"gave up reconnecting after {found[-1][0]} s and {found[-1][1]} tries" if found else ""
        )
        ended = [
            line[len(FLEET_LOOP_ENDED) :]
            for line in text.splitlines()
            if line.startswith(FLEET_LOOP_ENDED)
        ]
        return (
            ": ".join(part for part in (gave_up, ended[-1] if ended else "") if part)
            or "its Fleet loop ended"
        )

    @property
    def connected(self) -> bool:
        """Whether this start of the SuperNode has reached the coordinator (as its log says)."""
        return self._connected

    def start(self) -> None:
        cfg = self.cfg
        # flower-supernode, launched with its idle poll shortened (fedseal.client.supernode).
        argv = [
            sys.executable,
            "-m",
            "fedseal.client.supernode",
            "--superlink",
            cfg.superlink,
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(cfg.runtime_port),
        ]
        auth_path = None
        if cfg.insecure:
            argv.append("--insecure")
        else:
            auth_path = _write_auth_key(cfg, self.key)
            argv += [
                "--root-certificates",
                str(cfg.ca_cert),
                "--auth-supernode-private-key",
                str(auth_path),
            ]
        env = dict(
            os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(cfg.state_dir / "flwr-home")
        )
        with self.log_path.open("ab") as log_file:
            self._offset = self._start_offset = log_file.tell()
            self.proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_pdeathsig,
            )
        self._connected = False
        self.exited.clear()
        proc = self.proc

        def _watch() -> None:
            proc.wait()
            self.exited.set()

        threading.Thread(target=_watch, daemon=True).start()
        try:
            # The Runtime API comes up after the SuperNode has parsed its arguments (key included).
            deadline = time.monotonic() + 60
            while not self.stop.is_set() and not self.exited.is_set():
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", cfg.runtime_port), 0.5),
                ):
                    break
                if time.monotonic() > deadline:
                    raise SiteRunError("supernode", f"runtime API not up; see {self.log_path}")
                time.sleep(0.2)
        finally:
            if auth_path is not None:
                auth_path.unlink(missing_ok=True)

    def supervise(self) -> None:
        """Follow the SuperNode's log (connection state, for the operator's log)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except OSError:
            return
        text = chunk.decode("utf-8", "replace")
        activated = text.rfind("SuperNode ID:")
        if activated >= 0:
            self._connected = True
            self._ever_connected = True
            ids = _NODE_ID_LINE.findall(chunk)
            if ids:
                self._record_node_id(int(ids[-1]))
        failed = text.rfind("Connection attempt failed")
        if self._connected and failed > activated:
            # Every site sees this when a coordinator ends after its run (fl-server run), and a
            # crash or a cut link looks the same from here: not alarming, and said once.
            log.info(
                "the coordinator at %s went away (its run ended, or it stopped); the SuperNode "
                "keeps reconnecting",
                self.cfg.superlink,
            )
            self._connected = False
        if (
            not self._connected
            and self._ever_connected
            and text.rfind("Connection successful") > failed
        ):
            log.info("the coordinator at %s answers again", self.cfg.superlink)
            self._connected = True

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def crashed_while_starting(self) -> bool:
        """Killed by a signal it did not get from us (e.g. SIGABRT from a gRPC start-up
        fault) before it ever reached the coordinator: worth one more start. An exit code of
        its own (a refused key, a bad argument) is not retried."""
        self.supervise()
        rc = self.returncode
        return (
            rc is not None
            and rc < 0
            and rc not in (-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT)
            and not self._ever_connected
        )

    def terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


#: How often a SuperNode that dies of a signal before it ever connected is started again.
SUPERNODE_START_RETRIES = 2
#: What a SuperNode that could not initialise its connection (a refused activation among
#: others) logs before it exits with status 1: Flower's ``flwr_exit`` line for
#: ``ExitCode.SUPERNODE_CONNECTION_ERROR``.
SUPERNODE_CONNECTION_ERROR = "Exit Code: 305"


def _stopped_by_us(proc: subprocess.Popen[bytes]) -> bool:
    return proc.returncode in (-signal.SIGTERM, -signal.SIGKILL, 0)
