"""Serve the run's audit log to the sites while ``fl-server run`` runs: create the log (genesis
and roster) before the ServerApp starts, serve it read-only over gRPC + TLS
(:mod:`fedseal.audit.service`), and checkpoint its WAL when the coordinator stops.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fedseal.server.config import ServerConfig
from fedseal.server.errors import DeployError
from fedseal.server.roster import Enrolment

if TYPE_CHECKING:
    from fedseal.audit.store import MerkleLogStore
    from fedseal.protocol.roster import Roster as LogRoster

__all__ = ["AUDIT_FILE", "audit_service"]

AUDIT_FILE = "audit.sqlite"


class _LogRoster:
    """The roster recorded in the log, re-derived only when the log has grown."""

    def __init__(self, store: MerkleLogStore) -> None:
        import threading

        self._store = store
        self._size = -1
        self._roster: LogRoster | None = None
        self._lock = threading.Lock()

    def __call__(self) -> LogRoster:
        from fedseal.audit.writer import roster_from_log

        with self._lock:
            size = int(self._store.size)
            if self._roster is None or size != self._size:
                self._roster = roster_from_log(self._store)
                self._size = size
            return self._roster


@contextlib.contextmanager
def audit_service(
    cfg: ServerConfig, roster: Enrolment, passphrase: str | None = None
) -> Iterator[int | None]:
    """Create the run's audit log if needed and serve it to the sites; yields the bound port.

    Yields ``None`` (and serves nothing) when ``run.secure`` is false: plain runs keep no log.
    The service uses the coordinator's TLS certificate (plaintext only with ``tls.insecure``).
    ``passphrase`` (``FEDSEAL_COORDINATOR_PASSPHRASE``) decrypts the coordinator key.

    Raises:
        DeployError: The coordinator key, the log, the certificate or the port is unusable.
    """
    if not cfg.run.secure:
        yield None
        return
    from fedseal.audit.service import TlsServerConfig, serve_audit_log
    from fedseal.audit.store import MerkleLogStore
    from fedseal.crypto.errors import KeyFormatError
    from fedseal.crypto.keys import load_private_key
    from fedseal.server.audit_hook import RunAudit

    path = cfg.coordinator.state_dir / AUDIT_FILE
    try:
        key = load_private_key(cfg.coordinator.key, passphrase.encode() if passphrase else None)
    except (KeyFormatError, OSError) as exc:
        raise DeployError("audit service", f"cannot load the coordinator key: {exc}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        RunAudit.open(path, key, roster).close()  # genesis + roster, before the ServerApp runs
        store = MerkleLogStore.open(path, read_only=True)
    except Exception as exc:  # any refusal of the log is fatal here, with its reason
        raise DeployError("audit service", f"audit log {path} unusable: {exc}") from exc
    server = None
    try:
        tls = None
        if not cfg.tls.insecure:
            if cfg.tls.server_cert is None or cfg.tls.server_key is None:
                raise DeployError("audit service", "tls.server_cert and tls.server_key are required")
            try:
                tls = TlsServerConfig(cfg.tls.server_cert.read_bytes(), cfg.tls.server_key.read_bytes())
            except OSError as exc:
                raise DeployError("audit service", f"cannot read the TLS files: {exc}") from exc
        address = f"{cfg.network.audit_host}:{cfg.network.audit_port}"
        try:
            server, port = serve_audit_log(
                store, roster=_LogRoster(store), address=address, tls=tls,
                clock=lambda: int(time.time() * 1000), insecure=cfg.tls.insecure,
            )
        except RuntimeError as exc:  # grpcio raises when the port cannot be bound
            raise DeployError("audit service", f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise DeployError("audit service", f"cannot listen on {address}")
        yield port
    finally:
        if server is not None:
            server.stop(grace=2).wait(5)
        store.close()
        # Clean stop: checkpoint the WAL into audit.sqlite (the last connection to close also
        # removes the -wal file), so the file alone is the whole log, e.g. for a backup copy.
        with contextlib.suppress(Exception):
            MerkleLogStore.open(path, create=False).close()
