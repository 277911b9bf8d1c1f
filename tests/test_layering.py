"""Imports flow one way (CONVENTIONS.md, habit 1), checked by walking the source with ``ast``."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# settings, crypto -> protocol -> privacy -> audit -> adapters (server, client) -> sim; bench sits
# beside sim.
# settings (every FEDSEAL_* environment variable) is the lowest floor with crypto: stdlib only.
LAYERS = {
    "settings": "settings", "crypto": "crypto", "protocol": "protocol", "privacy": "privacy",
    "audit": "audit", "server": "server", "client": "client", "sim": "sim",
}

STDLIB = set(sys.stdlib_module_names)
# Third-party top-level modules each layer may import (stdlib is always allowed unless banned).
ALLOWED_THIRD_PARTY = {
    "settings": set(),
    "crypto": {"cryptography", "numpy"},
    "protocol": {"cryptography", "numpy"},
    # the privacy accountant (Google's dp-accounting and the scipy it computes with)
    "privacy": {"numpy", "scipy", "dp_accounting"},
    # the SQLite store, the gRPC audit service (grpc + protobuf) and fl-audit's console (typer, rich)
    "audit": {"cryptography", "numpy", "grpc", "google", "typer", "rich"},
}
# fedseal layers each layer may import.
ALLOWED_FEDSEAL = {
    "settings": {"settings"},
    "crypto": {"settings", "crypto"},
    "protocol": {"settings", "crypto", "protocol"},
    "privacy": {"settings", "crypto", "protocol", "privacy"},
    "audit": {"settings", "crypto", "protocol", "privacy", "audit"},
    "server": {"settings", "crypto", "protocol", "privacy", "audit", "server"},
    "client": {"settings", "crypto", "protocol", "privacy", "audit", "client"},
    "sim": {"settings", "crypto", "protocol", "privacy", "audit", "server", "client", "sim"},
}
BANNED_STDLIB = {
    "settings": {"random", "socket", "asyncio", "threading", "subprocess"},
    "crypto": {"random"},
    "protocol": {"random", "socket", "asyncio", "threading"},
}
# Modules only the client (and the simulation above it) may import.
CLIENT_ONLY = {"torch", "pyarrow", "torchvision"}
# Functions that import a module named by a string.
DYNAMIC_IMPORTERS = {"import_module", "__import__", "find_spec", "run_module"}
# String references to another layer's code that are not imports: the Flower app bundle the
# coordinator describes names the site's ClientApp, which only a site's Flower loads.
NOT_IMPORTS = {("server/deploy.py", "fedseal.client.flower_app:app")}


def _python_files(folder: str) -> Iterator[Path]:
    yield from sorted((ROOT / folder).rglob("*.py"))


def _string_constants(tree: ast.AST) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (a dynamic import often names its module so)."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found[target.id] = node.value.value
    return found


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports: import statements, ``import_module``/``__import__`` calls
    with a literal (or a module constant) and ``"package.module:attr"`` references to fedseal."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    constants = _string_constants(tree)
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in DYNAMIC_IMPORTERS:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value
                elif isinstance(arg, ast.Name) and arg.id in constants:
                    yield node.lineno, constants[arg.id]
                elif isinstance(arg, ast.JoinedStr) and arg.values:
                    head = arg.values[0]
                    if isinstance(head, ast.Constant) and str(head.value).startswith("fedseal."):
                        yield node.lineno, str(head.value).rstrip(".")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.startswith("fedseal.") and ":" in text and " " not in text:
                if (rel, text) not in NOT_IMPORTS:
                    yield node.lineno, text.split(":", 1)[0]


def _violations(layer: str) -> list[str]:
    found = []
    for path in _python_files(LAYERS[layer]):
        rel = path.relative_to(ROOT)
        for lineno, module in _imports(path):
            top = module.split(".")[0]
            if top == "fedseal":
                target = module.split(".")[1] if "." in module else ""
                if target not in ALLOWED_FEDSEAL[layer]:
                    found.append(f"{rel}:{lineno} imports {module}")
            elif top in STDLIB:
                if top in BANNED_STDLIB.get(layer, set()):
                    found.append(f"{rel}:{lineno} imports banned stdlib module {module}")
            elif layer in ALLOWED_THIRD_PARTY:
                if top not in ALLOWED_THIRD_PARTY[layer]:
                    found.append(f"{rel}:{lineno} imports third-party {module}")
            elif layer == "server" and top in CLIENT_ONLY:
                found.append(f"{rel}:{lineno} imports client-only {module}")
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    assert _violations(layer) == []


@pytest.mark.parametrize("layer", ["crypto", "protocol"])
def test_pure_layers_never_use_numpy_random(layer: str) -> None:
    bad = []
    for path in _python_files(layer):
        text = path.read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            if "np.random" in line or "numpy.random" in line:
                # A Generator may be *accepted* as a parameter type, never created or drawn from globally.
                if "np.random.Generator" in line and "np.random.Generator(" not in line:
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert bad == []


def test_the_checker_itself_catches_a_forbidden_edge(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import torch\nfrom fedseal.server import cli\n", encoding="utf-8")
    assert [m for _, m in _imports(bad)] == ["torch", "fedseal.server"]


def test_the_checker_sees_dynamic_imports(tmp_path: Path) -> None:
    hidden = tmp_path / "x.py"
    hidden.write_text(
        "import importlib\n"
        "SITE = 'fedseal.client.node'\n"
        "a = importlib.import_module('fedseal.client.config')\n"
        "b = importlib.import_module(SITE)\n"
        "c = __import__('fedseal.sim.demo')\n"
        "d = importlib.import_module(f'fedseal.client.{SITE}')\n"
        "APP = 'fedseal.client.flower_app:app'\n",
        encoding="utf-8",
    )
    assert sorted(m for _, m in _imports(hidden)) == sorted([
        "importlib", "fedseal.client.config", "fedseal.client.node", "fedseal.sim.demo",
        "fedseal.client", "fedseal.client.flower_app",
    ])


def test_layers_import_only_downward() -> None:
    # server and client share a floor and import neither each other nor anything above them;
    # settings and crypto share the lowest floor, and only crypto may import settings there
    floor = {
        "settings": 0, "crypto": 0, "protocol": 1, "privacy": 2, "audit": 3,
        "server": 4, "client": 4, "sim": 5,
    }
    for layer, allowed in ALLOWED_FEDSEAL.items():
        assert all(
            floor[other] < floor[layer] or (other, layer) == ("settings", "crypto")
            for other in allowed - {layer}
        ), layer
    assert ALLOWED_FEDSEAL["settings"] == {"settings"}  # stdlib and itself only
    assert ALLOWED_THIRD_PARTY["settings"] == set()
    assert all("settings" in allowed for allowed in ALLOWED_FEDSEAL.values())  # everyone may import it


def test_fl_audit_imports_neither_flwr_nor_torch() -> None:
    code = (
        "import sys, fedseal.audit.cli\n"
        "bad = [m for m in ('flwr', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_importing_the_client_package_does_not_import_torch() -> None:
    code = "import sys, fedseal.client, fedseal.crypto, fedseal.protocol\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_a_site_or_coordinator_without_dp_never_loads_the_accountants_libraries() -> None:
    # dp-accounting and scipy take seconds to import: a site's start (and so the first round)
    # must not pay for them unless a round uses DP.
    code = (
        "import sys, fedseal.client.node, fedseal.client.privacy_ledger, fedseal.server.flower_app,"
        " fedseal.server.deploy, fedseal.privacy\n"
        "print(','.join(m for m in ('dp_accounting', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""
