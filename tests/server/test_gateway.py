"""The fleet gateway forwards only Fleet API calls; the Control/Runtime APIs stay unreachable."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from fedseal.server.gateway import FleetGateway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[tuple[str, bytes, str]]]]:
    """A stand-in SuperLink (plain HTTP on loopback) that records what reaches it."""
    seen: list[tuple[str, bytes, str]] = []

    async def anything(request: Request) -> Response:
        seen.append((request.url.path, await request.body(), request.headers.get("x-sig", "")))
        return Response(b"upstream-ok", media_type="application/protobuf")

    app = Starlette(routes=[Route("/{p:path}", anything, methods=["GET", "POST"])])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port, seen
    server.should_exit = True
    thread.join(5)


def _client(port: int, max_body: int = 1024) -> TestClient:
    return TestClient(FleetGateway(f"http://127.0.0.1:{port}", None, max_body_bytes=max_body).app)


def test_fleet_calls_are_forwarded_with_body_and_auth_headers(upstream: tuple[int, list[tuple[str, bytes, str]]]) -> None:
    port, seen = upstream
    client = _client(port)
    resp = client.post("/v1/fleet/pull-messages", content=b"\x01\x02", headers={"x-sig": "abc"})
    assert resp.status_code == 200 and resp.content == b"upstream-ok"
    assert seen == [("/v1/fleet/pull-messages", b"\x01\x02", "abc")]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/control/list-runs",
        "/v1/runtime/acquire-task",
        "/v1/fleet/not-a-fleet-method",
        "/docs",
    ],
)
def test_control_and_runtime_calls_never_reach_the_superlink(
    upstream: tuple[int, list[tuple[str, bytes, str]]], path: str
) -> None:
    port, seen = upstream
    client = _client(port)
    resp = client.post(path, content=b"x")
    assert resp.status_code == 404
    assert seen == []


def test_an_oversized_request_is_refused_before_forwarding(upstream: tuple[int, list[tuple[str, bytes, str]]]) -> None:
    port, seen = upstream
    client = _client(port, max_body=16)
    resp = client.post("/v1/fleet/push-object", content=b"x" * 17)
    assert resp.status_code == 413
    assert seen == []
