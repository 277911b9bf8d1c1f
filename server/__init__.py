"""fedseal.server: the coordinator (fl-server) and the offline auditor (fl-audit).

Usage::

    $ fl-server init coord/                       # coordinator key, demo CA, TLS cert, server.toml
    $ fl-server enroll --config coord/server.toml --site site-a --key site-a.pub --dataset-root HEX
    $ fl-server run --config coord/server.toml    # SuperLink (loopback) + fleet gateway + run
    $ fl-server demo                              # everything on loopback, 3 sites, MNIST-5k

    from fedseal.server.config import load_server_config
    from fedseal.server.roster import Enrolment

Modules: ``config`` (server.toml), ``roster`` (enrolment, hash-chained changes), ``pki`` (demo
CA), ``strategies`` (Flower strategies allowed on a secure sum), ``checkpoint`` (safetensors +
JSON), ``metrics`` (Prometheus), ``gateway`` (fleet-only TLS proxy), ``deploy`` (SuperLink and
run orchestration), ``flower_app`` (the ServerApp and its round loop; imports flwr), with the
round's steps in ``exchange`` (transport), ``rundir`` (state-directory files), ``secure_round``,
``plain_round``, ``evaluation``, ``resume``, ``replies`` (reading site replies) and
``audit_hook`` (the audit log, fail closed); ``flower_patches`` (every Flower patch, one
version gate), ``superlink`` (the SuperLink launcher).

This package's ``__init__`` must stay light: ``fl-audit`` lives here and imports
neither flwr nor torch, so nothing here may import them at package import time.
"""

__all__: list[str] = []
