"""The one loader for external test vectors under tests/vectors (provenance in its README.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent / "vectors"


def vector_path(*parts: str) -> Path:
    path = VECTORS.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"test vector missing: {path}")
    return path


def load_json(*parts: str) -> Any:
    return json.loads(vector_path(*parts).read_text(encoding="utf-8"))


def b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""
