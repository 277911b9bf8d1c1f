"""The demo PKI: a CA that signs a server certificate carrying the requested SANs."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
from cryptography import x509

from fedseal.server.pki import create_ca, issue_server_certificate


def test_the_server_certificate_is_issued_by_the_ca_with_dns_and_ip_sans() -> None:
    now = datetime.now(UTC)
    ca = create_ca("test CA", now=now)
    cert_pem, key_pem = issue_server_certificate(ca, ["localhost", "127.0.0.1"], now=now)
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert b"PRIVATE KEY" in key_pem


def test_a_certificate_without_names_is_refused() -> None:
    ca = create_ca("test CA", now=datetime.now(UTC))
    with pytest.raises(ValueError):
        issue_server_certificate(ca, [], now=datetime.now(UTC))
