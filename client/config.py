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
                    validation_fraction = 0.2,
                    contract = "contract.json"   # optional: the data contract the dataset must
                                                 # have been prepared under (else no start)
    [privacy]       what the site accepts from a coordinator (safe defaults; the site's own):
                    allow_plain = false          # plain (unmasked) training: refused unless true
                    min_cohort = 3               # smallest secure-round cohort this site joins
                    min_known_peers = 2          # other trusted sites needed in cohort and survivors
                    max_colluding_fraction = 0.3333  # gamma: floor for degree/threshold/quorum
                    security_bits = 40           # that floor fails with probability <= 2^-40
                    max_setup_attempts = 3       # key-exchange restarts per round it answers
                    evaluate_unverified = false  # evaluate models not provably committed
                                                 # (only matters without an audit_address)
                    dp = "off"                   # "required": refuse rounds without DP
                    epsilon_budget = 4.0         # ε over all DP rounds of all runs (no default;
                                                 # required with dp = "required")
                    delta = 1e-6                 # δ of that budget, in (0, 1e-3)
                    min_noise_multiplier = 0.0   # least central z over the honest survivors
    [trust]         roster = "consortium-roster.json"      # signed by the consortium's authority
                    roster_authority = "roster-authority.pub"  # pinned authority public key
    [peers]         "site-b" = "<64 hex key id>"  # peers known without a roster (optional)
    [limits]        max_epochs = 5, max_batch_size = 512, max_learning_rate = 1.0,
                    max_clip_norm = 100.0, allowed_models = ["mlp", "cnn"],
                    max_cohort = 1000, max_vector_length = 268435456,
                    max_update_clip = 1000.0     # largest quantization clip a round may set
    [runtime]       port = 9094   # the SuperNode's Runtime API, bound to 127.0.0.1
    [training]      devices = "auto"   # "auto": every local GPU (one rank each), else one CPU
                                       # process; "cpu", "cpu:N" (N gloo ranks), "cuda" (every
                                       # GPU), "cuda:I", or a list ["cuda:0", "cuda:1"] (NCCL)
                    rank_timeout_s = 600   # a rank waits this long for the others, then the
                                           # training fails (see fedseal.client.distributed)
                    checkpoint_every_steps = 50   # a local training checkpoint every N steps
                                           # (and on SIGTERM): a preempted site resumes its
                                           # round's training (fedseal.client.train_checkpoint)

A site with neither ``[trust]`` nor ``[peers]`` knows no peer and so joins no secure round;
``fl-client run`` refuses to start that way.

The approved dataset root in force (:func:`approved_root_in_force`) is ``data.approved_root``
unless the operator re-enrolled the site (``fl-client run --re-enrol`` with a changed dataset):
the root the site attested then is kept in ``<state_dir>/approved-root.json``
(:func:`record_re_enrolment`) together with the ``data.approved_root`` it replaced, so later
starts need no edit of client.toml. The file holds only what this site's own attestation
produced and its operator confirmed; nothing the coordinator says is written there. Editing
``data.approved_root`` afterwards takes precedence again (the file then no longer applies).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedseal.client.distributed import Devices, DevicesError
from fedseal.client.errors import SiteError
from fedseal.client.policy import SitePrivacy
from fedseal.client.training import SiteLimits
from fedseal.crypto.keys import write_atomic
from fedseal.settings import unknown_name

__all__ = [
    "APPROVED_ROOT_FILE",
    "ApprovedRoot",
    "ClientConfig",
    "ClientConfigError",
    "approved_root_in_force",
    "load_client_config",
    "record_re_enrolment",
]

MAX_CONFIG_BYTES = 1 << 20
APPROVED_ROOT_FILE = "approved-root.json"
"""In the site's state directory: the dataset root its operator re-enrolled (``--re-enrol``)."""
T = TypeVar("T")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ADDR = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class ClientConfigError(SiteError):
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
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    roster: Path | None = None
    roster_authority: Path | None = None
    peers: Mapping[str, str] = field(default_factory=dict)
    contract: Path | None = None
    devices: Devices = field(default_factory=Devices)
    checkpoint_every_steps: int = 50


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
        raise ClientConfigError(f"{prefix}.{extra[0]}" if prefix else extra[0], unknown_name(extra[0], allowed))


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

    _known(doc, "", {"site", "coordinator", "data", "limits", "runtime", "privacy", "trust", "peers", "training"})
    s = _sec(doc, "site")
    _known(s, "site", {"name", "key", "passphrase_env", "state_dir"})
    c = _sec(doc, "coordinator")
    _known(c, "coordinator", {"superlink", "ca_cert", "insecure", "public_key", "audit_address"})
    d = _sec(doc, "data")
    _known(d, "data", {"dataset_dir", "approved_root", "validation_fraction", "contract"})
    lim = _sec(doc, "limits")
    for moved in ("min_cohort", "max_setup_attempts"):
        if moved in lim:
            raise ClientConfigError(f"limits.{moved}", f"moved to [privacy] {moved}")
    _known(
        lim, "limits",
        {"max_epochs", "max_batch_size", "max_learning_rate", "max_clip_norm", "allowed_models",
         "max_cohort", "max_vector_length", "max_update_clip"},
    )
    rt = _sec(doc, "runtime")
    _known(rt, "runtime", {"port"})
    training = _sec(doc, "training")
    devices = _devices(training)
    every = _get(training, "training", "checkpoint_every_steps", int, 50)
    if not 0 <= every <= 1_000_000:
        raise ClientConfigError("training.checkpoint_every_steps", "must be in [0, 1000000] (0: only on SIGTERM)")

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
        max_clip_norm=_get(lim, "limits", "max_clip_norm", float, dl.max_clip_norm),
    )
    if not 0 < limits.max_clip_norm <= 1e6:
        raise ClientConfigError("limits.max_clip_norm", "must be in (0, 1e6]")
    if not 1 <= limits.max_epochs <= 1000:
        raise ClientConfigError("limits.max_epochs", "must be in [1, 1000]")
    if not 1 <= limits.max_batch_size <= 1 << 16:
        raise ClientConfigError("limits.max_batch_size", "must be in [1, 65536]")
    if not 0 < limits.max_learning_rate <= 100:
        raise ClientConfigError("limits.max_learning_rate", "must be in (0, 100]")
    models = lim.get("allowed_models", ["mlp", "cnn"])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ClientConfigError("limits.allowed_models", "must be a list of strings")
    privacy = _privacy(_sec(doc, "privacy"), lim)
    roster, authority, peers = _trust(_sec(doc, "trust"), _sec(doc, "peers"), p)
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
        privacy=privacy,
        roster=roster,
        roster_authority=authority,
        peers=peers,
        contract=p(_get(d, "data", "contract", str, None)) if "contract" in d else None,
        devices=devices,
        checkpoint_every_steps=every,
    )


def _devices(sec: Mapping[str, Any]) -> Devices:
    """``[training]``: the devices local training runs on, and the ranks' timeout."""
    _known(sec, "training", {"devices", "rank_timeout_s", "checkpoint_every_steps"})
    timeout = _get(sec, "training", "rank_timeout_s", float, 600.0)
    if not 1.0 <= timeout <= 86400.0:
        raise ClientConfigError("training.rank_timeout_s", "must be in [1, 86400] seconds")
    try:
        return Devices.parse(sec.get("devices", "auto"), timeout_s=timeout)
    except DevicesError as exc:
        raise ClientConfigError("training.devices", str(exc).removeprefix("training.devices: ")) from exc


def _privacy(sec: Mapping[str, Any], lim: Mapping[str, Any]) -> SitePrivacy:
    """``[privacy]`` and the protocol bounds of ``[limits]``, each range-checked."""
    d = SitePrivacy()
    _known(sec, "privacy", set(SitePrivacy.PRIVACY_KEYS))
    values: dict[str, Any] = {}
    for key in SitePrivacy.PRIVACY_KEYS:
        default = getattr(d, key)
        if key in SitePrivacy.OPTIONAL_KEYS:
            if key in sec:
                values[key] = _get(sec, "privacy", key, SitePrivacy.OPTIONAL_KEYS[key], None)
            continue
        kind: type = bool if isinstance(default, bool) else type(default)
        values[key] = _get(sec, "privacy", key, kind, default)
    for key in SitePrivacy.LIMIT_KEYS:
        default = getattr(d, key)
        values[key] = _get(lim, "limits", key, type(default), default)
    try:
        return SitePrivacy(**values)
    except ValueError as exc:
        key, _, reason = str(exc).partition(": ")
        raise ClientConfigError(key, reason) from exc


def _trust(
    trust: Mapping[str, Any], peers: Mapping[str, Any], p: Any
) -> tuple[Path | None, Path | None, dict[str, str]]:
    """``[trust]`` (roster + its pinned authority key, together) and ``[peers]``."""
    _known(trust, "trust", {"roster", "roster_authority"})
    roster = trust.get("roster")
    authority = trust.get("roster_authority")
    for key, value in (("roster", roster), ("roster_authority", authority)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ClientConfigError(f"trust.{key}", "must be a file path")
    if (roster is None) != (authority is None):
        missing = "roster_authority" if authority is None else "roster"
        raise ClientConfigError(
            f"trust.{missing}", "required with the other: a roster is trusted only under a pinned authority key"
        )
    table: dict[str, str] = {}
    for site, kid in peers.items():
        if not isinstance(kid, str) or not _HEX64.fullmatch(kid.lower()):
            raise ClientConfigError(f"peers.{site}", "must be the site's key id (64 hex characters)")
        table[site] = kid.lower()
    return (
        p(roster) if roster is not None else None,
        p(authority) if authority is not None else None,
        table,
    )


@dataclass(frozen=True, slots=True)
class ApprovedRoot:
    """The approved dataset root in force at a site and where it comes from.

    Attributes:
        root: 64 hex characters.
        source: ``"client.toml"`` or the re-enrolment file's path.
        since_ms: When it was re-enrolled (``0`` for client.toml's).
    """

    root: str
    source: str
    since_ms: int = 0


def approved_root_in_force(cfg: ClientConfig) -> ApprovedRoot:
    """``data.approved_root``, or the root re-enrolled in place of it (module docstring).

    Raises:
        ClientConfigError: The re-enrolment file exists but cannot be read or is malformed.
    """
    path = cfg.state_dir / APPROVED_ROOT_FILE
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        return ApprovedRoot(cfg.approved_root, "client.toml")
    except OSError as exc:
        raise ClientConfigError("", f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
        root, replaces, since = str(doc["root"]), str(doc["replaces"]), int(doc["re_enrolled_at_ms"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ClientConfigError(
            "", f"{path} is malformed ({type(exc).__name__}); remove it to use data.approved_root"
        ) from exc
    if not (_HEX64.fullmatch(root) and _HEX64.fullmatch(replaces)):
        raise ClientConfigError("", f"{path}: root and replaces must be 64 hex characters")
    if replaces != cfg.approved_root:  # client.toml edited since: it decides again
        return ApprovedRoot(cfg.approved_root, "client.toml")
    return ApprovedRoot(root, str(path), since)


def record_re_enrolment(cfg: ClientConfig, root: str, *, now_ms: int) -> Path:
    """Keep ``root`` (this site's own attestation of its dataset, confirmed by its operator with
    ``--re-enrol``) as the approved root in force, in place of ``data.approved_root``. Written
    atomically, mode 0600. Returns the file's path.

    Raises:
        ClientConfigError: ``root`` is not 64 hex characters.
        OSError: The state directory cannot be written.
    """
    root = root.lower()
    if not _HEX64.fullmatch(root):
        raise ClientConfigError("", "a re-enrolled dataset root must be 64 hex characters")
    previous = approved_root_in_force(cfg)
    doc = {
        "format": 1,
        "root": root,
        "replaces": cfg.approved_root,
        "previous": previous.root,
        "re_enrolled_at_ms": now_ms,
    }
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.state_dir / APPROVED_ROOT_FILE
    write_atomic(path, json.dumps(doc, indent=1).encode(), 0o600)
    return path
