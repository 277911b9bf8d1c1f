"""The Fleet gateway: the only coordinator endpoint partner sites can reach.

Flower 1.42's SuperLink serves its Runtime (ServerAppIo), Control and Fleet APIs as one HTTP
application on one ``--host``/``--port``. Exposing that port to sites would let any enrolled
(or even unenrolled) site call the Control API: start runs, register nodes, list runs. fedseal
therefore binds the SuperLink to ``127.0.0.1`` and puts this TLS reverse proxy on the public
port. It forwards only ``POST /v1/fleet/<method>`` for the Fleet methods a SuperNode uses
(and ``GET /health``); every other path gets ``404`` without reaching the SuperLink. SuperNode
authentication headers pass through unchanged and are checked by the SuperLink.

Usage::

    gw = FleetGateway(upstream="https://127.0.0.1:9091", ca_cert=..., max_body_bytes=64 << 20)
    server = gw.serve(host="0.0.0.0", port=9092, certfile=..., keyfile=...)   # background thread
    ...
    server.should_exit = True
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FLEET_METHODS", "FleetGateway"]

FLEET_METHODS = frozenset(
    {
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    }
)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length",
     "proxy-authorization", "proxy-authenticate", "trailer"}
)


class FleetGateway:
    """A fleet-only reverse proxy in front of a loopback SuperLink."""

    def __init__(self, upstream: str, ca_cert: Path | None, max_body_bytes: int) -> None:
        self.upstream = upstream.rstrip("/")
        verify: ssl.SSLContext | bool = False
        if ca_cert is not None:
            verify = ssl.create_default_context(cafile=str(ca_cert))
        self.max_body_bytes = max_body_bytes
        self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0))
        self.forwarded = 0
        self.refused = 0
        self.app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/fleet/{method}", self._fleet, methods=["POST"]),
                Route("/{path:path}", self._refuse, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            ]
        )

    async def _refuse(self, request: Request) -> Response:
        self.refused += 1
        return JSONResponse({"detail": "not exposed by the fedseal fleet gateway"}, status_code=404)

    async def _health(self, request: Request) -> Response:
        return await self._forward(request, "/health")

    async def _fleet(self, request: Request) -> Response:
        method = request.path_params["method"]
        if method not in FLEET_METHODS:
            return await self._refuse(request)
        return await self._forward(request, f"/v1/fleet/{method}")

    async def _forward(self, request: Request, path: str) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return JSONResponse({"detail": "request too large"}, status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return JSONResponse({"detail": "request too large"}, status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream = await self._client.request(
                request.method, self.upstream + path, content=bytes(body), headers=headers
            )
        except httpx.HTTPError as exc:
            return JSONResponse({"detail": f"SuperLink unavailable: {type(exc).__name__}"}, status_code=503)
        self.forwarded += 1
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers.pop("content-encoding", None)
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    def serve(
        self, *, host: str, port: int, certfile: Path | None, keyfile: Path | None
    ) -> uvicorn.Server:
        """Start serving in a daemon thread; returns once listening.

        Raises:
            RuntimeError: If the server does not start within 30 s (e.g. port in use; the
                message names the address).
        """
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="fleet-gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"cannot listen on {host}:{port} (network.fleet_host/fleet_port): the port is "
                    "in use, or tls.server_cert/tls.server_key cannot be loaded"
                )
            time.sleep(0.05)
        return server
