"""Prometheus metrics of the coordinator (prometheus-client), on ``network.metrics_port``.

Usage::

    from fedseal.server.metrics import Metrics
    m = Metrics.start(port=9464)           # port 0: metrics kept in-process, not served
    m.rounds.inc(); m.rejected.labels(reason="unknown-root").inc()

Names: ``fedseal_rounds_committed_total``, ``fedseal_rounds_failed_total``,
``fedseal_rounds_abandoned_total{reason}`` (the same rounds by kind, e.g.
``aggregate-out-of-range``, ``threshold``, ``too-few-valid-updates``),
``fedseal_stage_seconds{stage}``, ``fedseal_updates_accepted_total``,
``fedseal_updates_rejected_total{reason}``, ``fedseal_site_errors_total{site, kind}`` (error
replies; ``kind`` is ``refused`` for a site's refusal, else ``error``),
``fedseal_round_survivors``, ``fedseal_bytes_received_total``, ``fedseal_bytes_sent_total``,
``fedseal_global_accuracy``.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Seconds to keep trying a metrics port that is still in use.
BIND_WAIT_S = 20.0

__all__ = ["Metrics"]


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    rounds: Counter
    rounds_failed: Counter
    rounds_abandoned: Counter
    stage_seconds: Histogram
    accepted: Counter
    rejected: Counter
    site_errors: Counter
    survivors: Gauge
    bytes_received: Counter
    bytes_sent: Counter
    accuracy: Gauge

    @classmethod
    def create(cls) -> Metrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            rounds=Counter("fedseal_rounds_committed", "Rounds committed", registry=reg),
            rounds_failed=Counter("fedseal_rounds_failed", "Rounds abandoned", registry=reg),
            rounds_abandoned=Counter(
                "fedseal_rounds_abandoned",
                "Rounds that applied nothing, by reason",
                ["reason"],
                registry=reg,
            ),
            stage_seconds=Histogram(
                "fedseal_stage_seconds", "Duration of a round stage", ["stage"], registry=reg
            ),
            accepted=Counter("fedseal_updates_accepted", "Updates aggregated", registry=reg),
            rejected=Counter(
                "fedseal_updates_rejected", "Updates rejected", ["reason"], registry=reg
            ),
            site_errors=Counter(
                "fedseal_site_errors",
                "Error replies from sites (kind: refused or error)",
                ["site", "kind"],
                registry=reg,
            ),
            survivors=Gauge("fedseal_round_survivors", "Sites in the last round", registry=reg),
            bytes_received=Counter(
                "fedseal_bytes_received", "Payload bytes received", registry=reg
            ),
            bytes_sent=Counter("fedseal_bytes_sent", "Payload bytes sent", registry=reg),
            accuracy=Gauge("fedseal_global_accuracy", "Federated eval accuracy", registry=reg),
        )

    @classmethod
    def start(cls, port: int, host: str = "127.0.0.1") -> Metrics:
        """Create the metrics and serve them on ``host:port`` (not served if port is 0)."""
        m = cls.create()
        if port:
            # A restarted coordinator's predecessor may still be releasing the port (its
            # ServerApp process ends a little after its SuperLink): retry for a while.
            deadline = time.monotonic() + BIND_WAIT_S
            while True:
                try:
                    start_http_server(port, addr=host, registry=m.registry)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                        raise OSError(exc.errno, f"metrics endpoint {host}:{port}: {exc.strerror}") from exc
                    time.sleep(0.5)
        return m
