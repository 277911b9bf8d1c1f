"""fedseal.server: the coordinator (fl-server) and the offline auditor (fl-audit).

Usage::

    $ fl-server init coord/                       # coordinator key, demo CA, TLS cert, server.toml
    $ fl-server enroll --config coord/server.toml --site site-a --key site-a.pub --dataset-root HEX
    $ fl-server run --config coord/server.toml    # SuperLink (loopback) + fleet gateway + run
    $ fl-server demo                              # everything on loopback, 3 sites, MNIST-5k

    from fedseal.server.config import load_server_config
    from fedseal.server.roster import Roster

Modules: ``config`` (server.toml), ``roster`` (enrolment, hash-chained changes), ``pki`` (demo
CA), ``strategies`` (Flower strategies allowed on a secure sum), ``checkpoint`` (safetensors +
JSON), ``metrics`` (Prometheus), ``gateway`` (fleet-only TLS proxy), ``deploy`` (SuperLink and
run orchestration), ``flower_app`` (the ServerApp; imports flwr), ``demo``.

This package's ``__init__`` must stay light: ``fl-audit`` lives here and imports
neither flwr nor torch, so nothing here may import them at package import time.
"""

__all__: list[str] = []
