"""Prometheus metrics of the coordinator (prometheus-client), on ``network.metrics_port``.

Usage::

    from fedseal.server.metrics import Metrics
    m = Metrics.start(port=9464)           # port 0: metrics kept in-process, not served
    m.rounds.inc(); m.rejected.labels(reason="unknown-root").inc()

Where they are served: ``fl-server run`` / ``fl-server serve`` (the long-lived process) serves
them on ``network.metrics_port`` (:func:`serve_collected`), from the files each run's ServerApp
writes into ``state_dir/metrics`` (prometheus-client's multiprocess mode: the ServerApp is
started with ``PROMETHEUS_MULTIPROC_DIR``, :data:`MULTIPROC_ENV`), so the endpoint stays up
between runs and its counters add up over the runs it served; gauges show the most recent
value. Without that variable (the simulation, one process) :meth:`Metrics.start` serves them
itself. The serving process adds its own: ``fedseal_runs_ended_total{status}``,
``fedseal_runs_queued`` and ``fedseal_run_active``.

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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

#: Seconds to keep trying a metrics port that is still in use.
BIND_WAIT_S = 20.0

#: The variable prometheus-client reads at import: metrics values go to files in that directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

__all__ = ["MULTIPROC_ENV", "DriverMetrics", "Metrics", "serve_collected"]


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
            survivors=Gauge(
                "fedseal_round_survivors", "Sites in the last round", registry=reg,
                multiprocess_mode="mostrecent",
            ),
            bytes_received=Counter(
                "fedseal_bytes_received", "Payload bytes received", registry=reg
            ),
            bytes_sent=Counter("fedseal_bytes_sent", "Payload bytes sent", registry=reg),
            accuracy=Gauge(
                "fedseal_global_accuracy", "Federated eval accuracy", registry=reg,
                multiprocess_mode="mostrecent",
            ),
        )

    @classmethod
    def start(cls, port: int, host: str = "127.0.0.1") -> Metrics:
        """Create the metrics and serve them on ``host:port`` (not served if port is 0, nor
        when this process writes them for a serving process: :data:`MULTIPROC_ENV` set)."""
        m = cls.create()
        if port and not os.environ.get(MULTIPROC_ENV):
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


@dataclass(frozen=True, slots=True)
class DriverMetrics:
    """The serving process's own metrics, beside the runs' collected ones."""

    runs_ended: Counter
    runs_queued: Gauge
    run_active: Gauge
    server: Any  # the HTTP server (None when not served)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def serve_collected(directory: Path, port: int, host: str = "127.0.0.1") -> DriverMetrics:
    """Serve on ``host:port`` the metrics the runs' ServerApps write into ``directory`` (emptied
    first: values of an earlier coordinator's processes are not this one's), plus this process's
    own. Port 0: kept, not served.

    Raises:
        OSError: The port cannot be bound (names host and port).
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(directory))  # type: ignore[no-untyped-call]
    server = None
    if port:
        try:
            server, _ = start_http_server(port, addr=host, registry=reg)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics endpoint {host}:{port}: {exc.strerror}") from exc
    return DriverMetrics(
        runs_ended=Counter("fedseal_runs_ended", "Runs ended, by status", ["status"], registry=reg),
        runs_queued=Gauge("fedseal_runs_queued", "Runs waiting for their turn", registry=reg),
        run_active=Gauge("fedseal_run_active", "1 while a run is in progress", registry=reg),
        server=server,
    )
