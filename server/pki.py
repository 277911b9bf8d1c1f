"""A small demo PKI for the coordinator: a CA and a server TLS certificate.

Usage::

    from fedseal.server.pki import create_ca, issue_server_certificate
    ca = create_ca("fedseal demo CA", now=datetime.now(UTC))
    cert_pem, key_pem = issue_server_certificate(ca, ["localhost", "127.0.0.1"], now=...)

Production deployments bring their own CA (``deploy/`` has helper scripts); this module
exists so ``fl-server init`` and ``fl-server demo`` work on a fresh machine. Keys are
ECDSA P-256, certificates are X.509 v3 with subject alternative names (gRPC/HTTP clients
check SANs, never the common name), valid for a bounded period.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "create_ca",
    "issue_server_certificate",
    "private_key_pem",
]

DEFAULT_VALIDITY = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A CA private key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def certificate_pem(self) -> bytes:
        """Return the CA certificate as PEM (what clients pin)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return an unencrypted PKCS8 PEM encoding (TLS servers need the key in clear)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(
    common_name: str, *, now: datetime, validity: timedelta = DEFAULT_VALIDITY
) -> CertificateAuthority:
    """Create a self-signed P-256 CA allowed to sign end-entity certificates only.

    Args:
        common_name: Subject CN of the CA.
        now: Start of the validity period (timezone-aware).
        validity: Length of the validity period.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key=key, certificate=cert)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue_server_certificate(
    ca: CertificateAuthority,
    names: Sequence[str],
    *,
    now: datetime,
    validity: timedelta = DEFAULT_VALIDITY,
) -> tuple[bytes, bytes]:
    """Issue a TLS server certificate for ``names`` (DNS names or IP addresses).

    Args:
        ca: The issuing CA.
        names: Subject alternative names; the first one is also the subject CN.
        now: Start of the validity period (timezone-aware).
        validity: Length of the validity period.

    Returns:
        ``(certificate_pem, private_key_pem)``.

    Raises:
        ValueError: If ``names`` is empty.
    """
    if not names:
        raise ValueError("a server certificate needs at least one subject alternative name")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)
