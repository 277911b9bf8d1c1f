"""deploy/pki/fedseal-pki: CA, server certificate with SANs, enrolment, rotation, revocation.

Runs the real script with the real openssl; TLS handshakes use Python's ssl module on loopback.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.deploy.deploytools import DEPLOY, require_tool, run, tls_handshake_server

PKI = DEPLOY / "pki" / "fedseal-pki"
ROOT_HEX = "ab" * 32


@pytest.fixture(scope="module")
def openssl() -> str:
    return require_tool("openssl")


def pki(*args: str | Path, check: bool = True, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = run(["bash", str(PKI), *map(str, args)], timeout=60, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedseal-pki {args} exited {proc.returncode}: {proc.stderr}")
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory, openssl: str) -> Path:
    base = tmp_path_factory.mktemp("pki")
    pki("ca-init", "--ca", base / "ca", "--name", "test CA")
    pki("server-cert", "--ca", base / "ca", "--out", base / "srv", "--san", "ip:127.0.0.1", "--san", "dns:coordinator")
    return base


@pytest.fixture
def tls_server(pki_dir: Path) -> Iterator[int]:
    """A loopback TLS server presenting the fedseal-pki server certificate; yields its port."""
    with tls_handshake_server(pki_dir / "srv" / "server-chain.pem", pki_dir / "srv" / "server.key") as port:
        yield port


def handshake(port: int, ca: Path, name: str) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=name):
        pass


def test_ca_key_is_private_and_the_ca_may_sign_only_end_entity_certificates(pki_dir: Path) -> None:
    mode = stat.S_IMODE((pki_dir / "ca" / "ca.key").stat().st_mode)
    assert mode == 0o600
    ca = x509.load_pem_x509_certificate((pki_dir / "ca" / "ca.pem").read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_ca_init_refuses_to_overwrite_an_existing_ca(pki_dir: Path) -> None:
    before = (pki_dir / "ca" / "ca.key").read_bytes()
    code, _, err = pki("ca-init", "--ca", pki_dir / "ca", check=False)
    assert code == 1 and "refusing to overwrite" in err
    assert (pki_dir / "ca" / "ca.key").read_bytes() == before


def test_server_certificate_carries_the_requested_sans_and_server_auth_only(pki_dir: Path) -> None:
    cert = x509.load_pem_x509_certificate((pki_dir / "srv" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert stat.S_IMODE((pki_dir / "srv" / "server.key").stat().st_mode) == 0o600


def test_a_client_pinning_the_ca_completes_tls_only_for_a_name_in_the_san(pki_dir: Path, tls_server: int) -> None:
    ca = pki_dir / "ca" / "ca.pem"
    handshake(tls_server, ca, "127.0.0.1")
    handshake(tls_server, ca, "coordinator")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls_server, ca, "10.231.0.99")


def test_a_client_pinning_another_ca_refuses_the_server(pki_dir: Path, tls_server: int, tmp_path: Path) -> None:
    pki("ca-init", "--ca", tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls_server, tmp_path / "other" / "ca.pem", "127.0.0.1")


def test_check_verifies_chain_san_and_expiry(pki_dir: Path) -> None:
    pki("check", "--ca", pki_dir / "ca", "--cert", pki_dir / "srv" / "server.pem", "--san", "127.0.0.1")
    code, _, err = pki("check", "--ca", pki_dir / "ca", "--cert", pki_dir / "srv" / "server.pem", "--san", "10.0.0.1", check=False)
    assert code == 1 and "no IP SAN" in err
    code, _, err = pki(
        "check", "--ca", pki_dir / "ca", "--cert", pki_dir / "srv" / "server.pem", "--min-days", "400", check=False
    )
    assert code == 1 and "rotate it" in err


def test_site_enrolment_verifies_possession_and_key_id_then_issues_a_client_certificate(
    pki_dir: Path, tmp_path: Path
) -> None:
    keys = pytest.importorskip("fedseal.crypto.keys")
    key = tmp_path / "site" / "site.key"
    _, out, _ = pki("site-request", "--key", key, "--new-key", "--site", "site-a", "--out", tmp_path / "site-a.csr")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    _, kid, _ = pki("key-id", key)
    kid = kid.strip()
    assert f"key id: {kid}" in out
    # The script's key id is fedseal's key id (SHA-256 of the DER SubjectPublicKeyInfo).
    priv = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert bytes(keys.key_id(priv.public_key())).hex() == kid

    _, out, _ = pki(
        "enrol", "--ca", pki_dir / "ca", "--csr", tmp_path / "site-a.csr", "--site", "site-a",
        "--dataset-root", ROOT_HEX, "--key-id", kid, "--no-roster",
    )
    assert f"fl-server enroll --site site-a --key {pki_dir / 'ca' / 'sites' / 'site-a.pub'} --dataset-root {ROOT_HEX}" in out
    pub = serialization.load_pem_public_key((pki_dir / "ca" / "sites" / "site-a.pub").read_bytes())
    assert bytes(keys.key_id(pub)).hex() == kid
    cert = x509.load_pem_x509_certificate((pki_dir / "ca" / "sites" / "site-a.pem").read_bytes())
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    pki("check", "--ca", pki_dir / "ca", "--cert", pki_dir / "ca" / "sites" / "site-a.pem")


def test_enrolment_is_refused_for_a_wrong_key_id_a_wrong_site_name_or_a_forged_csr(
    pki_dir: Path, tmp_path: Path
) -> None:
    key = tmp_path / "k.key"
    csr = tmp_path / "site-b.csr"
    pki("site-request", "--key", key, "--new-key", "--site", "site-b", "--out", csr)
    base = ["enrol", "--ca", pki_dir / "ca", "--dataset-root", ROOT_HEX, "--no-roster"]
    code, _, err = pki(*base, "--csr", csr, "--site", "site-b", "--key-id", "00" * 32, check=False)
    assert code == 1 and "key id mismatch" in err
    code, _, err = pki(*base, "--csr", csr, "--site", "site-c", check=False)
    assert code == 1 and "not 'site-c'" in err
    code, _, err = pki(*base, "--csr", csr, "--site", "site-b", "--dataset-root", "zz", check=False)
    assert code == 1 and "64 hex" in err
    # Flip one byte of the CSR's signature: proof of possession fails.
    der = bytearray(x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    import base64

    forged = tmp_path / "forged.csr"
    body = base64.encodebytes(bytes(der)).decode()
    forged.write_text(f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n")
    code, _, err = pki(*base, "--csr", forged, "--site", "site-b", check=False)
    assert code == 1 and "does not verify" in err
    assert not (pki_dir / "ca" / "sites" / "site-b.pem").exists()


def test_site_request_never_overwrites_an_existing_key(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    pki("site-request", "--key", key, "--new-key", "--site", "s1", "--out", tmp_path / "a.csr")
    before = key.read_bytes()
    code, _, err = pki("site-request", "--key", key, "--new-key", "--site", "s1", "--out", tmp_path / "b.csr", check=False)
    assert code == 1 and "refusing to overwrite" in err
    assert key.read_bytes() == before


def test_revoking_a_site_puts_its_certificate_on_the_crl_and_calls_fl_server_revoke(
    pki_dir: Path, tmp_path: Path
) -> None:
    key, csr = tmp_path / "r.key", tmp_path / "site-r.csr"
    pki("site-request", "--key", key, "--new-key", "--site", "site-r", "--out", csr)
    pki("enrol", "--ca", pki_dir / "ca", "--csr", csr, "--site", "site-r", "--dataset-root", ROOT_HEX, "--no-roster")
    cert = x509.load_pem_x509_certificate((pki_dir / "ca" / "sites" / "site-r.pem").read_bytes())
    # A stand-in fl-server on PATH records how the script calls it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    fake = bindir / "fl-server"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    _, out, _ = pki("revoke", "--ca", pki_dir / "ca", "--site", "site-r", "--reason", "keyCompromise", env=env)
    assert "1 certificate(s) revoked" in out
    assert log.read_text().split() == ["revoke", "--site", "site-r"]
    crl = x509.load_pem_x509_crl((pki_dir / "ca" / "crl.pem").read_bytes())
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert revoked is not None
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    code, _, err = pki("check", "--ca", pki_dir / "ca", "--cert", pki_dir / "ca" / "sites" / "site-r.pem", check=False)
    assert code == 1 and "chain or CRL" in err


def test_server_certificate_rotation_issues_a_new_certificate_and_revokes_the_old_one(
    pki_dir: Path, tmp_path: Path
) -> None:
    pki("server-cert", "--ca", pki_dir / "ca", "--out", tmp_path / "old", "--san", "dns:fl.example.org")
    code, _, err = pki("server-cert", "--ca", pki_dir / "ca", "--out", tmp_path / "old", "--san", "dns:fl.example.org", check=False)
    assert code == 1 and "new directory" in err
    pki("server-cert", "--ca", pki_dir / "ca", "--out", tmp_path / "new", "--san", "dns:fl.example.org")
    pki("revoke-cert", "--ca", pki_dir / "ca", "--cert", tmp_path / "old" / "server.pem")
    pki("check", "--ca", pki_dir / "ca", "--cert", tmp_path / "new" / "server.pem", "--san", "fl.example.org")
    code, _, _ = pki("check", "--ca", pki_dir / "ca", "--cert", tmp_path / "old" / "server.pem", check=False)
    assert code == 1


def test_usage_errors_exit_2() -> None:
    assert pki("server-cert", "--ca", "/nonexistent", check=False)[0] == 2
    assert pki("bogus", check=False)[0] == 2
    assert pki("server-cert", "--ca", "x", "--out", "y", "--san", "ftp:x", check=False)[0] == 2


def test_certificates_are_already_valid_for_a_peer_whose_clock_runs_half_an_hour_behind(pki_dir: Path) -> None:
    from datetime import UTC, datetime, timedelta

    behind = datetime.now(UTC) - timedelta(minutes=30)
    for path in (pki_dir / "ca" / "ca.pem", pki_dir / "srv" / "server.pem"):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        assert cert.not_valid_before_utc <= behind, path.name
        assert cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=365), path.name
