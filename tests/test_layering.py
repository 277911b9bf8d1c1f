"""Imports flow one way (CONVENTIONS.md, habit 1), checked by walking the source with ``ast``."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"crypto": "crypto", "protocol": "protocol", "server": "server", "client": "client"}

STDLIB = set(sys.stdlib_module_names)
# Third-party top-level modules each layer may import (stdlib is always allowed unless banned).
ALLOWED_THIRD_PARTY = {
    "crypto": {"cryptography", "numpy"},
    "protocol": {"cryptography", "numpy"},
}
# fedseal layers each layer may import.
ALLOWED_FEDSEAL = {
    "crypto": {"crypto"},
    "protocol": {"crypto", "protocol"},
    "server": {"crypto", "protocol", "server"},
    "client": {"crypto", "protocol", "client"},
}
BANNED_STDLIB = {"crypto": {"random"}, "protocol": {"random", "socket", "asyncio", "threading"}}
# Modules only the client may import.
CLIENT_ONLY = {"torch", "pyarrow", "torchvision"}


def _python_files(folder: str) -> Iterator[Path]:
    yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


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


def test_fl_audit_imports_neither_flwr_nor_torch() -> None:
    code = (
        "import sys, fedseal.server.audit_cli\n"
        "bad = [m for m in ('flwr', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_importing_the_client_package_does_not_import_torch() -> None:
    code = "import sys, fedseal.client, fedseal.crypto, fedseal.protocol\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
