"""``fl-server run``'s audit service: created log, TLS with the server certificate, enrolled
sites only, stopped on exit (without the Flower processes)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import pytest

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import Genesis, RosterChange
from fedseal.audit.errors import AuditServiceError
from fedseal.audit.service_client import GrpcAuditSource
from fedseal.crypto.keys import generate_identity_key
from fedseal.server.audit_serving import AUDIT_FILE, audit_service
from fedseal.server.cli import init as init_cmd
from fedseal.server.cli import write_server_toml
from fedseal.server.config import load_server_config
from fedseal.server.roster import Enrolment


def _now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    init_cmd(tmp_path / "coord", san=["localhost", "127.0.0.1"], passphrase_env=None)
    write_server_toml(tmp_path / "coord" / "server.toml", audit_port=0, audit_host="127.0.0.1")
    return tmp_path / "coord" / "server.toml"


def test_the_audit_service_serves_the_run_log_over_tls_to_enrolled_sites_only(coordinator: Path) -> None:
    cfg = load_server_config(coordinator)
    site_key = generate_identity_key()
    roster = Enrolment.load_or_create(cfg.coordinator.roster).enroll(
        "site-a", site_key.public_key(), ["ab" * 32], now_ms=_now_ms()
    )
    ca = (coordinator.parent / "tls" / "ca.pem").read_bytes()
    with audit_service(cfg, roster) as port:
        assert port is not None and port > 0
        assert (cfg.coordinator.state_dir / AUDIT_FILE).exists()
        channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca))
        source = GrpcAuditSource(channel, site="site-a", key=site_key, clock=_now_ms)
        entries = [decode_entry(data) for _, data in source.entries(0, 2)]
        assert isinstance(entries[0], Genesis)
        assert isinstance(entries[1], RosterChange) and entries[1].site == "site-a"
        stranger = GrpcAuditSource(channel, site="site-b", key=generate_identity_key(), clock=_now_ms)
        with pytest.raises(AuditServiceError) as info:
            stranger.entries(0, 1)
        assert info.value.code == "PERMISSION_DENIED"
        # Plaintext clients are not served: the port speaks TLS only.
        plain = GrpcAuditSource(grpc.insecure_channel(f"localhost:{port}"), site="site-a", key=site_key,
                                clock=_now_ms, timeout_s=3)
        with pytest.raises(AuditServiceError):
            plain.entries(0, 1)
        channel.close()
    with pytest.raises(ConnectionRefusedError):  # stopped on exit: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_plain_run_keeps_no_log_and_serves_nothing(coordinator: Path) -> None:
    text = coordinator.read_text().replace("[run]\n", "[run]\nsecure = false\n")
    coordinator.write_text(text)
    cfg = load_server_config(coordinator)
    with audit_service(cfg, Enrolment.load_or_create(cfg.coordinator.roster)) as port:
        assert port is None
    assert not (cfg.coordinator.state_dir / AUDIT_FILE).exists()
