"""``client.toml``: a partner site's configuration, validated at start-up.

Usage::

    from fedseal.client.config import load_client_config
    cfg = load_client_config("client.toml")   # raises ClientConfigError naming the bad key

Layout (relative paths are resolved against the file's directory)::

    [site]          name (required), key = "site.key", passphrase_env = "", state_dir = "state"
    [coordinator]   superlink = "localhost:9092" (required), ca_cert = "ca.pem", insecure = false,
                    public_key = "coordinator.pub",  # pinned: verifies the coordinator's signatures
                    audit_address = "coord:9095"     # optional: the coordinator's audit service;
                                                     # when set, receipts are checked every round
    [data]          dataset_dir (required), approved_root (64 hex, required),
                    validation_fraction = 0.2
    [limits]        max_epochs = 5, max_batch_size = 512, max_learning_rate = 1.0,
                    allowed_models = ["mlp", "cnn"],
                    min_cohort = 3          # smallest secure-round cohort this site joins
                    max_setup_attempts = 3  # key-exchange restarts per round it answers
    [runtime]       port = 9094   # the SuperNode's Runtime API, bound to 127.0.0.1
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedseal.client.training import SiteLimits

__all__ = ["ClientConfig", "ClientConfigError", "load_client_config"]

MAX_CONFIG_BYTES = 1 << 20
T = TypeVar("T")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ADDR = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class ClientConfigError(Exception):
    """A bad ``client.toml``; ``key`` names the offending key (``""`` for the whole file)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientConfig:
    path: Path
    name: str
    key: Path
    passphrase_env: str
    state_dir: Path
    superlink: str
    ca_cert: Path | None
    insecure: bool
    coordinator_key: Path
    dataset_dir: Path
    approved_root: str
    validation_fraction: float
    limits: SiteLimits
    allowed_models: tuple[str, ...]
    runtime_port: int
    audit_address: str | None = None
    min_cohort: int = 3
    max_setup_attempts: int = 3


def _get(sec: Mapping[str, Any], prefix: str, key: str, kind: type[T], default: T | None) -> T:
    if key not in sec:
        if default is None:
            raise ClientConfigError(f"{prefix}.{key}", "required")
        return default
    value = sec[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ClientConfigError(f"{prefix}.{key}", f"must be {kind.__name__}")
    return value


def _sec(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ClientConfigError(name, "must be a table")
    return value


def _known(sec: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    extra = sorted(set(sec) - allowed)
    if extra:
        raise ClientConfigError(f"{prefix}.{extra[0]}" if prefix else extra[0], "unknown key")


def load_client_config(path: str | Path) -> ClientConfig:
    """Read and validate ``client.toml``.

    Raises:
        ClientConfigError: Naming the first offending key.
    """
    path = Path(path).expanduser().resolve()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ClientConfigError("", f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ClientConfigError("", f"{path} is too large")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClientConfigError("", f"{path} is not valid TOML: {exc}") from exc
    base = path.parent

    def p(value: str) -> Path:
        q = Path(value).expanduser()
        return q if q.is_absolute() else base / q

    _known(doc, "", {"site", "coordinator", "data", "limits", "runtime"})
    s = _sec(doc, "site")
    _known(s, "site", {"name", "key", "passphrase_env", "state_dir"})
    c = _sec(doc, "coordinator")
    _known(c, "coordinator", {"superlink", "ca_cert", "insecure", "public_key", "audit_address"})
    d = _sec(doc, "data")
    _known(d, "data", {"dataset_dir", "approved_root", "validation_fraction"})
    lim = _sec(doc, "limits")
    _known(
        lim, "limits",
        {"max_epochs", "max_batch_size", "max_learning_rate", "allowed_models", "min_cohort", "max_setup_attempts"},
    )
    rt = _sec(doc, "runtime")
    _known(rt, "runtime", {"port"})

    superlink = _get(c, "coordinator", "superlink", str, None)
    if not _ADDR.fullmatch(superlink):
        raise ClientConfigError("coordinator.superlink", "must be host:port")
    insecure = _get(c, "coordinator", "insecure", bool, False)
    audit_address: str | None = None
    if "audit_address" in c:
        audit_address = _get(c, "coordinator", "audit_address", str, None)
        match = _ADDR.fullmatch(audit_address)
        if match is None or not 1 <= int(match.group(2)) <= 65535:
            raise ClientConfigError("coordinator.audit_address", "must be host:port (port 1-65535)")
    ca = None if insecure and "ca_cert" not in c else p(_get(c, "coordinator", "ca_cert", str, "ca.pem"))
    root = _get(d, "data", "approved_root", str, None).lower()
    if not _HEX64.fullmatch(root):
        raise ClientConfigError("data.approved_root", "must be 64 hex characters")
    vf = _get(d, "data", "validation_fraction", float, 0.2)
    if not 0.01 <= vf <= 0.9:
        raise ClientConfigError("data.validation_fraction", "must be in [0.01, 0.9]")
    dl = SiteLimits()
    limits = SiteLimits(
        max_epochs=_get(lim, "limits", "max_epochs", int, dl.max_epochs),
        max_batch_size=_get(lim, "limits", "max_batch_size", int, dl.max_batch_size),
        max_learning_rate=_get(lim, "limits", "max_learning_rate", float, dl.max_learning_rate),
    )
    if not 1 <= limits.max_epochs <= 1000:
        raise ClientConfigError("limits.max_epochs", "must be in [1, 1000]")
    if not 1 <= limits.max_batch_size <= 1 << 16:
        raise ClientConfigError("limits.max_batch_size", "must be in [1, 65536]")
    if not 0 < limits.max_learning_rate <= 100:
        raise ClientConfigError("limits.max_learning_rate", "must be in (0, 100]")
    models = lim.get("allowed_models", ["mlp", "cnn"])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ClientConfigError("limits.allowed_models", "must be a list of strings")
    min_cohort = _get(lim, "limits", "min_cohort", int, 3)
    if not 2 <= min_cohort <= 1 << 16:
        raise ClientConfigError("limits.min_cohort", "must be in [2, 65536] (2 reveals the other site's input)")
    attempts = _get(lim, "limits", "max_setup_attempts", int, 3)
    if not 1 <= attempts <= 16:
        raise ClientConfigError("limits.max_setup_attempts", "must be in [1, 16]")
    port = _get(rt, "runtime", "port", int, 9094)
    if not 1 <= port <= 65535:
        raise ClientConfigError("runtime.port", "must be in [1, 65535]")
    name = _get(s, "site", "name", str, None)
    return ClientConfig(
        path=path,
        name=name,
        key=p(_get(s, "site", "key", str, "site.key")),
        passphrase_env=_get(s, "site", "passphrase_env", str, ""),
        state_dir=p(_get(s, "site", "state_dir", str, "state")),
        superlink=superlink,
        ca_cert=ca,
        insecure=insecure,
        coordinator_key=p(_get(c, "coordinator", "public_key", str, "coordinator.pub")),
        dataset_dir=p(_get(d, "data", "dataset_dir", str, None)),
        approved_root=root,
        validation_fraction=vf,
        limits=limits,
        allowed_models=tuple(models),
        runtime_port=port,
        audit_address=audit_address,
        min_cohort=min_cohort,
        max_setup_attempts=attempts,
    )
