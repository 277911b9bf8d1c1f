#!/usr/bin/env python3
"""Container health check for the fedseal images (stdlib only, no fedseal import).

Usage::

    python healthcheck.py coordinator   # Fleet API accepts TCP, metrics endpoint answers 200
    python healthcheck.py site          # TLS handshake with the coordinator succeeds (pinned CA)

Environment (defaults in brackets):

- ``FEDSEAL_FLEET_ADDR`` [``127.0.0.1:9092``]: coordinator, the Fleet API listener to probe.
- ``FEDSEAL_METRICS_URL`` [``http://127.0.0.1:9464/metrics``]: coordinator, Prometheus endpoint.
- ``FEDSEAL_SUPERLINK`` (required for ``site``): ``host:port`` of the coordinator's Fleet API.
- ``FEDSEAL_CA`` [``/etc/fedseal/keys/ca.pem``]: site, the pinned CA certificate.
- ``FEDSEAL_TLS_SERVER_NAME`` [host part of ``FEDSEAL_SUPERLINK``]: site, name checked against
  the certificate's subject alternative names.
- ``FEDSEAL_HEALTH_TIMEOUT`` [``5``]: seconds per probe.

Exit codes: 0 healthy, 1 unhealthy (one line on stderr says why), 2 usage error.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


class HealthError(Exception):
    """A probe failed; ``probe`` names it, ``reason`` says why."""

    def __init__(self, probe: str, reason: str) -> None:
        super().__init__(f"{probe}: {reason}")
        self.probe = probe
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A ``host:port`` pair."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Endpoint:
        """Parse ``host:port`` or ``[v6]:port``.

        Raises:
            HealthError: If ``text`` is not ``host:port`` with a port in 1..65535.
        """
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise HealthError(what, f"expected host:port, got {text!r}")
        return cls(host.strip("[]"), int(port))


def check_tcp(endpoint: Endpoint, timeout: float) -> None:
    """Open and close a TCP connection.

    Raises:
        HealthError: If the connection is refused or times out.
    """
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            pass
    except OSError as exc:
        raise HealthError("fleet", f"{endpoint.host}:{endpoint.port} not accepting: {exc}") from exc


def check_metrics(url: str, timeout: float) -> None:
    """GET the Prometheus endpoint and require status 200 with fedseal metrics in it.

    Raises:
        HealthError: If the request fails, the status is not 200, or no ``fedseal_`` metric
            is exported.
    """
    if not url.startswith(("http://", "https://")):
        raise HealthError("metrics", f"not an http(s) URL: {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
            body = resp.read(4 << 20)
            status = resp.status
    except (urllib.error.URLError, OSError) as exc:
        raise HealthError("metrics", f"{url} unreachable: {exc}") from exc
    if status != 200:
        raise HealthError("metrics", f"{url} answered {status}")
    if b"fedseal_" not in body:
        raise HealthError("metrics", f"{url} exports no fedseal_ metric")


def check_tls(endpoint: Endpoint, ca_file: str, server_name: str, timeout: float) -> None:
    """Complete a TLS handshake, verifying the chain against ``ca_file`` and the name.

    Raises:
        HealthError: If the CA cannot be read, the connection fails, or verification fails.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise HealthError("tls", f"cannot load CA {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name),
        ):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise HealthError("tls", f"certificate of {server_name} not trusted: {exc.verify_message}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise HealthError("tls", f"handshake with {endpoint.host}:{endpoint.port} failed: {exc}") from exc


def run(role: str, env: dict[str, str]) -> None:
    """Run the probes for ``role``.

    Raises:
        HealthError: On the first failing probe.
        ValueError: If ``role`` is unknown.
    """
    timeout = float(env.get("FEDSEAL_HEALTH_TIMEOUT", "5"))
    if role == "coordinator":
        check_tcp(Endpoint.parse(env.get("FEDSEAL_FLEET_ADDR", "127.0.0.1:9092"), "fleet"), timeout)
        check_metrics(env.get("FEDSEAL_METRICS_URL", "http://127.0.0.1:9464/metrics"), timeout)
    elif role == "site":
        target = env.get("FEDSEAL_SUPERLINK", "")
        if not target:
            raise HealthError("tls", "FEDSEAL_SUPERLINK is not set")
        endpoint = Endpoint.parse(target, "tls")
        name = env.get("FEDSEAL_TLS_SERVER_NAME", endpoint.host)
        check_tls(endpoint, env.get("FEDSEAL_CA", "/etc/fedseal/keys/ca.pem"), name, timeout)
    else:
        raise ValueError(f"unknown role {role!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("coordinator", "site"):
        print("usage: healthcheck.py coordinator|site", file=sys.stderr)
        return EXIT_USAGE
    try:
        run(argv[0], dict(os.environ))
    except HealthError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_HEALTHY


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
