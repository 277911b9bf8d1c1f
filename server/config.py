"""``server.toml``: the coordinator's configuration, validated at start-up.

Usage::

    from fedseal.server.config import load_server_config
    cfg = load_server_config("server.toml")     # raises ServerConfigError naming the bad key
    cfg.run.rounds, cfg.network.fleet_port

Relative paths are resolved against the directory holding the TOML file. Every size bound is
explicit. Layout (all keys optional except where noted)::

    [coordinator]   key = "coordinator.key", state_dir = "state", roster = "roster.json"
    [tls]           ca_cert, server_cert, server_key (required unless insecure = true)
    [network]       fleet_host = "0.0.0.0", fleet_port = 9092,   # the only port sites reach
                    internal_port = 9091,                          # SuperLink HTTP API, 127.0.0.1
                    metrics_host = "127.0.0.1", metrics_port = 9464,  # 0 disables
                    audit_host = "0.0.0.0", audit_port = 9095      # gRPC audit service for
                                                                   # the sites (TLS); 0 = ephemeral
    [run]           rounds, strategy, model, seed, min_sites, epochs, batch_size,
                    learning_rate, clip_norm, stage_timeout_s, sites_wait_timeout_s,
                    secure = true (SecAgg+ rounds; false = plain, updates in the clear),
                    update_clip, quant_levels, max_weight (quantization of the updates),
                    threshold = 0 (Shamir threshold per neighbourhood; 0 = protocol default),
                    dropout_tolerance = 0.0 (the fraction of a cohort that may drop out of
                    a secure round: above 32 sites the degree is the least that is safe and
                    completes with that many dropouts; 0 = the fixed window rule)
                    setup_with_evaluation = true (the next round's setup rides on this
                    round's evaluation messages: one exchange less per secure round)
                    contract = "contract.json" (optional: the data contract every site's
                    dataset was prepared under; fedseal.protocol.contract)
    [run.strategy_options]   keyword arguments for the Flower strategy (floats)
    [limits]        max_message_bytes, max_sites, max_rounds, max_vector_length, max_envelope_bytes
    [consortium]    roster = "consortium/roster.json",      # the signed consortium roster the
                    authority = "consortium/authority.key.pub"  # sites run under, and the roster
                                                                # authority's PUBLIC key (PEM)
    [dp]            enabled = false, epsilon, delta = 1e-6,     # distributed DP (docs/dp.md):
                    clip, noise_multiplier, granularity,        # the run's (epsilon, delta), the
                    modulus_bits = 32, beta = exp(-0.5)         # L2 clip of a site's update, ...

``[dp]`` (secure runs only) makes every round a distributed-discrete-Gaussian round
(:mod:`fedseal.protocol.dp`): ``epsilon`` and ``clip`` are required when ``enabled``;
``noise_multiplier`` (the central z over the honest survivors) defaults to the least noise
that keeps ``run.rounds`` rounds within (epsilon, delta) (:func:`fedseal.privacy.noise_for_target`),
``granularity`` (gamma) to the finest grid whose noisy sum still fits ``modulus_bits`` bits
(:func:`fedseal.protocol.dp.bits_needed`); both are worked out per round for its cohort
(:mod:`fedseal.server.dp_round`). The run stops, committed, when its next round would take
epsilon past the budget.

``[consortium]`` is optional; ``roster`` and ``authority`` are given both or neither. With it,
the coordinator verifies the roster under the authority key when a run starts (and refuses to
start the run if it does not verify), records it in the audit log, and checks the file again
at the start of every round: a new version is recorded, a lower one stops the run.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedseal.protocol.config import Limits
from fedseal.server.errors import CoordinatorError
from fedseal.settings import unknown_name

__all__ = [
    "ConsortiumSection",
    "CoordinatorSection",
    "DpSection",
    "LimitsSection",
    "NetworkSection",
    "RunSection",
    "ServerConfig",
    "ServerConfigError",
    "TlsSection",
    "load_server_config",
    "parse_server_config",
]

MAX_CONFIG_BYTES = 1 << 20

T = TypeVar("T")


class ServerConfigError(CoordinatorError):
    """A configuration file is missing, malformed, or has a bad value.

    Attributes:
        key: Dotted name of the offending key (e.g. ``run.rounds``), or ``""`` for the file.
        reason: What is wrong with it.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CoordinatorSection:
    key: Path
    state_dir: Path
    roster: Path


@dataclass(frozen=True, slots=True)
class TlsSection:
    insecure: bool
    ca_cert: Path | None
    server_cert: Path | None
    server_key: Path | None


@dataclass(frozen=True, slots=True)
class NetworkSection:
    fleet_host: str = "0.0.0.0"  # noqa: S104 - the Fleet gateway is meant to be reachable
    fleet_port: int = 9092
    internal_port: int = 9091
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    audit_host: str = "0.0.0.0"  # noqa: S104 - partner sites fetch their receipts here
    audit_port: int = 9095


@dataclass(frozen=True, slots=True)
class RunSection:
    rounds: int = 5
    strategy: str = "FedAvg"
    strategy_options: Mapping[str, float] = field(default_factory=dict)
    model: str = "mlp"
    seed: int = 0
    min_sites: int = 3  # sites refuse smaller secure cohorts ([limits] min_cohort, default 3)
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    clip_norm: float = 5.0
    stage_timeout_s: float = 120.0
    sites_wait_timeout_s: float = 120.0
    secure: bool = True
    update_clip: float = 1.0
    quant_levels: int = 4096
    max_weight: int = 100_000
    threshold: int = 0  # Shamir threshold per neighbourhood; 0 = the protocol's default
    # The fraction of a cohort that may drop out of a secure round (sizes the graph degree:
    # fedseal.protocol.params.least_degree_for_dropouts); 0: the fixed window rule.
    dropout_tolerance: float = 0.0
    # Secure rounds: the next round's setup goes out with this round's evaluation messages
    # (one exchange less per round); false = every round starts with its own setup exchange.
    setup_with_evaluation: bool = True
    # The run's data contract (fedseal.protocol.contract): every site's dataset must have
    # been prepared under it; its digest is signed into every round setup and compared with
    # each site's at the run's start. None: no contract (sites' data is not compared).
    contract: Path | None = None
    contract_digest: bytes = b""  # from the file at load time, not a TOML key


@dataclass(frozen=True, slots=True)
class LimitsSection:
    """``[limits]``: every bound the coordinator enforces on what sites send, from one place.

    ``max_message_bytes`` bounds a whole Flower message at the fleet gateway (model vector
    included); ``max_sites``, ``max_vector_length`` and ``max_envelope_bytes`` become the
    protocol's decode bounds (:meth:`protocol_limits`: cohort size, update length, one signed
    envelope without its bulk vector), checked before anything is allocated.
    """

    max_message_bytes: int = 64 << 20
    max_sites: int = 1000
    max_rounds: int = 10_000
    max_vector_length: int = Limits().max_vector_length
    max_envelope_bytes: int = Limits().max_message_bytes

    def protocol_limits(self) -> Limits:
        """The protocol's decode bounds for this coordinator's rounds."""
        return Limits(
            max_cohort=self.max_sites,
            max_vector_length=self.max_vector_length,
            max_message_bytes=self.max_envelope_bytes,
        )


@dataclass(frozen=True, slots=True)
class ConsortiumSection:
    """The signed consortium roster file and the roster authority's public key (PEM)."""

    roster: Path
    authority: Path


@dataclass(frozen=True, slots=True)
class DpSection:
    """``[dp]``: distributed DP for every round of a secure run (docs/dp.md).

    Attributes:
        enabled: DP rounds on (default off).
        epsilon: The run's target epsilon (required when enabled).
        delta: The run's delta (default 1e-6).
        clip: L2 clip of one site's update, model units (required when enabled).
        noise_multiplier: Central noise multiplier z over the honest survivors, or ``None``:
            the least that keeps ``run.rounds`` rounds within (epsilon, delta).
        granularity: gamma (model units per grid step), or ``None``: the finest whose noisy
            sum fits ``modulus_bits`` with wrap probability <= 2^-40.
        modulus_bits: The secure sum's field, 32 or 64.
        beta: Conditional randomized rounding's beta in [0, 1) (KLS21: exp(-0.5)).
    """

    enabled: bool = False
    epsilon: float = 0.0
    delta: float = 1e-6
    clip: float = 0.0
    noise_multiplier: float | None = None
    granularity: float | None = None
    modulus_bits: int = 32
    beta: float = math.exp(-0.5)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    path: Path
    coordinator: CoordinatorSection
    tls: TlsSection
    network: NetworkSection
    run: RunSection
    limits: LimitsSection
    consortium: ConsortiumSection | None = None
    dp: DpSection = field(default_factory=DpSection)


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ServerConfigError(name, "must be a table")
    return value


def _typed(sec: Mapping[str, Any], prefix: str, key: str, kind: type[T], default: T) -> T:
    if key not in sec:
        return default
    value = sec[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ServerConfigError(f"{prefix}.{key}", f"must be {kind.__name__}, got {type(value).__name__}")
    return value


def _ranged(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ServerConfigError(name, f"must be in [{lo}, {hi}], got {value}")


def _unknown(sec: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    extra = sorted(set(sec) - allowed)
    if extra:
        raise ServerConfigError(f"{prefix}.{extra[0]}", unknown_name(extra[0], allowed))


def parse_server_config(doc: Mapping[str, Any], base: Path, path: Path) -> ServerConfig:
    """Validate a parsed TOML document into a :class:`ServerConfig`.

    Raises:
        ServerConfigError: Naming the first offending key.
    """
    _unknown(doc, "", {"coordinator", "tls", "network", "run", "limits", "consortium", "dp"})

    def p(sec: Mapping[str, Any], prefix: str, key: str, default: str) -> Path:
        raw = _typed(sec, prefix, key, str, default)
        path_ = Path(raw).expanduser()
        return path_ if path_.is_absolute() else base / path_

    c = _section(doc, "coordinator")
    _unknown(c, "coordinator", {"key", "state_dir", "roster"})
    coordinator = CoordinatorSection(
        key=p(c, "coordinator", "key", "coordinator.key"),
        state_dir=p(c, "coordinator", "state_dir", "state"),
        roster=p(c, "coordinator", "roster", "roster.json"),
    )

    t = _section(doc, "tls")
    _unknown(t, "tls", {"insecure", "ca_cert", "server_cert", "server_key"})
    insecure = _typed(t, "tls", "insecure", bool, False)
    tls_paths: dict[str, Path | None] = {}
    for key in ("ca_cert", "server_cert", "server_key"):
        if key in t:
            tls_paths[key] = p(t, "tls", key, "")
        elif not insecure:
            raise ServerConfigError(f"tls.{key}", "required unless tls.insecure = true")
        else:
            tls_paths[key] = None
    tls = TlsSection(insecure=insecure, **tls_paths)

    n = _section(doc, "network")
    _unknown(
        n,
        "network",
        {
            "fleet_host", "fleet_port", "internal_port", "metrics_host", "metrics_port",
            "audit_host", "audit_port",
        },
    )
    d = NetworkSection()
    network = NetworkSection(
        fleet_host=_typed(n, "network", "fleet_host", str, d.fleet_host),
        fleet_port=_typed(n, "network", "fleet_port", int, d.fleet_port),
        internal_port=_typed(n, "network", "internal_port", int, d.internal_port),
        metrics_port=_typed(n, "network", "metrics_port", int, d.metrics_port),
        metrics_host=_typed(n, "network", "metrics_host", str, d.metrics_host),
        audit_host=_typed(n, "network", "audit_host", str, d.audit_host),
        audit_port=_typed(n, "network", "audit_port", int, d.audit_port),
    )
    for host_key in ("fleet_host", "metrics_host", "audit_host"):
        host = getattr(network, host_key)
        if not host or len(host) > 253 or any(ch.isspace() or ch in "/:[]" for ch in host):
            raise ServerConfigError(f"network.{host_key}", f"must be a host name or IPv4 address, got {host!r}")
    _ranged("network.fleet_port", network.fleet_port, 1, 65535)
    _ranged("network.internal_port", network.internal_port, 1, 65535)
    _ranged("network.metrics_port", network.metrics_port, 0, 65535)
    _ranged("network.audit_port", network.audit_port, 0, 65535)
    if network.internal_port == network.fleet_port:
        raise ServerConfigError("network.internal_port", "must differ from network.fleet_port")
    if network.audit_port in (network.fleet_port, network.internal_port, network.metrics_port or -1):
        raise ServerConfigError(
            "network.audit_port", "must differ from the fleet, internal and metrics ports"
        )

    lim = _section(doc, "limits")
    keys = ("max_message_bytes", "max_sites", "max_rounds", "max_vector_length", "max_envelope_bytes")
    _unknown(lim, "limits", set(keys))
    dl = LimitsSection()
    limits = LimitsSection(**{k: _typed(lim, "limits", k, int, getattr(dl, k)) for k in keys})
    _ranged("limits.max_message_bytes", limits.max_message_bytes, 1 << 10, 2 << 30)
    _ranged("limits.max_sites", limits.max_sites, 1, 100_000)
    _ranged("limits.max_rounds", limits.max_rounds, 1, 1_000_000)
    _ranged("limits.max_vector_length", limits.max_vector_length, 1, 1 << 31)
    _ranged("limits.max_envelope_bytes", limits.max_envelope_bytes, 1 << 10, 1 << 30)

    r = _section(doc, "run")
    _unknown(
        r,
        "run",
        {f.name for f in RunSection.__dataclass_fields__.values()} - {"contract_digest"},
    )
    dr = RunSection()
    opts_raw = r.get("strategy_options", {})
    if not isinstance(opts_raw, dict):
        raise ServerConfigError("run.strategy_options", "must be a table")
    opts: dict[str, float] = {}
    for k, v in opts_raw.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ServerConfigError(f"run.strategy_options.{k}", "must be a number")
        opts[k] = float(v)
    run = RunSection(
        rounds=_typed(r, "run", "rounds", int, dr.rounds),
        strategy=_typed(r, "run", "strategy", str, dr.strategy),
        strategy_options=opts,
        model=_typed(r, "run", "model", str, dr.model),
        seed=_typed(r, "run", "seed", int, dr.seed),
        min_sites=_typed(r, "run", "min_sites", int, dr.min_sites),
        epochs=_typed(r, "run", "epochs", int, dr.epochs),
        batch_size=_typed(r, "run", "batch_size", int, dr.batch_size),
        learning_rate=_typed(r, "run", "learning_rate", float, dr.learning_rate),
        clip_norm=_typed(r, "run", "clip_norm", float, dr.clip_norm),
        stage_timeout_s=_typed(r, "run", "stage_timeout_s", float, dr.stage_timeout_s),
        sites_wait_timeout_s=_typed(
            r, "run", "sites_wait_timeout_s", float, dr.sites_wait_timeout_s
        ),
        secure=_typed(r, "run", "secure", bool, dr.secure),
        update_clip=_typed(r, "run", "update_clip", float, dr.update_clip),
        quant_levels=_typed(r, "run", "quant_levels", int, dr.quant_levels),
        max_weight=_typed(r, "run", "max_weight", int, dr.max_weight),
        threshold=_typed(r, "run", "threshold", int, dr.threshold),
        dropout_tolerance=_typed(r, "run", "dropout_tolerance", float, dr.dropout_tolerance),
        setup_with_evaluation=_typed(r, "run", "setup_with_evaluation", bool, dr.setup_with_evaluation),
        **_contract(r, p),
    )
    _ranged("run.rounds", run.rounds, 1, limits.max_rounds)
    _ranged("run.min_sites", run.min_sites, 1, limits.max_sites)
    _ranged("run.seed", run.seed, 0, 2**31 - 1)
    _ranged("run.epochs", run.epochs, 1, 1000)
    _ranged("run.batch_size", run.batch_size, 1, 1 << 16)
    _ranged("run.learning_rate", run.learning_rate, 1e-8, 100.0)
    _ranged("run.clip_norm", run.clip_norm, 1e-6, 1e6)
    _ranged("run.stage_timeout_s", run.stage_timeout_s, 0.1, 86_400)
    _ranged("run.sites_wait_timeout_s", run.sites_wait_timeout_s, 0.1, 86_400)
    _ranged("run.update_clip", run.update_clip, 1e-6, 1e6)
    _ranged("run.quant_levels", run.quant_levels, 2, 1 << 30)
    _ranged("run.max_weight", run.max_weight, 1, 1 << 40)
    _ranged("run.threshold", run.threshold, 0, limits.max_sites)
    _ranged("run.dropout_tolerance", run.dropout_tolerance, 0.0, 0.49)

    consortium = None
    if "consortium" in doc:
        k = _section(doc, "consortium")
        _unknown(k, "consortium", {"roster", "authority"})
        for key, other in (("roster", "authority"), ("authority", "roster")):
            if key not in k:
                raise ServerConfigError(
                    f"consortium.{key}",
                    ("required with consortium." + other if other in k else "required")
                    + " (give both the signed roster file and the roster authority's public "
                    "key, or leave [consortium] out)",
                )
            if not _typed(k, "consortium", key, str, ""):
                raise ServerConfigError(f"consortium.{key}", "must be a non-empty path")
        consortium = ConsortiumSection(
            roster=p(k, "consortium", "roster", ""),
            authority=p(k, "consortium", "authority", ""),
        )
    return ServerConfig(
        path=path,
        coordinator=coordinator,
        tls=tls,
        network=network,
        run=run,
        limits=limits,
        consortium=consortium,
        dp=_dp_section(_section(doc, "dp"), run),
    )


def _contract(r: Mapping[str, Any], p: Any) -> dict[str, Any]:
    """``run.contract``: the contract file, loaded now (a bad one fails at start)."""
    from fedseal.protocol.contract import ContractError, load_contract

    if "contract" not in r:
        return {}
    if not _typed(r, "run", "contract", str, ""):
        raise ServerConfigError("run.contract", "must be a non-empty path")
    path = p(r, "run", "contract", "")
    try:
        digest = load_contract(path).digest()
    except ContractError as exc:
        raise ServerConfigError("run.contract", str(exc)) from exc
    return {"contract": path, "contract_digest": digest}


def _positive(name: str, value: float, *, high: float = math.inf) -> None:
    if not (math.isfinite(value) and 0 < value <= high):
        bound = "" if high == math.inf else f" and <= {high:g}"
        raise ServerConfigError(name, f"must be finite, > 0{bound}, got {value!r}")


def _dp_section(sec: Mapping[str, Any], run: RunSection) -> DpSection:
    """``[dp]``, validated (every key's type and range even when disabled)."""
    _unknown(sec, "dp", {f.name for f in DpSection.__dataclass_fields__.values()})
    d = DpSection()
    enabled = _typed(sec, "dp", "enabled", bool, d.enabled)
    for key in ("epsilon", "clip"):
        if enabled and key not in sec:
            raise ServerConfigError(f"dp.{key}", "required when dp.enabled = true")
    noise: float | None = None
    if "noise_multiplier" in sec:
        noise = _typed(sec, "dp", "noise_multiplier", float, 0.0)
        _positive("dp.noise_multiplier", noise, high=1e6)
    granularity: float | None = None
    if "granularity" in sec:
        granularity = _typed(sec, "dp", "granularity", float, 0.0)
        _positive("dp.granularity", granularity)
    dp = DpSection(
        enabled=enabled,
        epsilon=_typed(sec, "dp", "epsilon", float, d.epsilon),
        delta=_typed(sec, "dp", "delta", float, d.delta),
        clip=_typed(sec, "dp", "clip", float, d.clip),
        noise_multiplier=noise,
        granularity=granularity,
        modulus_bits=_typed(sec, "dp", "modulus_bits", int, d.modulus_bits),
        beta=_typed(sec, "dp", "beta", float, d.beta),
    )
    if "epsilon" in sec:
        _positive("dp.epsilon", dp.epsilon, high=1e4)
    if "clip" in sec:
        _positive("dp.clip", dp.clip, high=1e6)
    if not (math.isfinite(dp.delta) and 0 < dp.delta < 1):
        raise ServerConfigError("dp.delta", f"must be in (0, 1), got {dp.delta!r}")
    if dp.modulus_bits not in (32, 64):
        raise ServerConfigError("dp.modulus_bits", f"must be 32 or 64, got {dp.modulus_bits}")
    if not (math.isfinite(dp.beta) and 0 <= dp.beta < 1) or math.copysign(1.0, dp.beta) < 0:
        raise ServerConfigError("dp.beta", f"must be in [0, 1), got {dp.beta!r}")
    if granularity is not None and "clip" in sec and not dp.clip / granularity >= 2.0**-20:
        raise ServerConfigError("dp.granularity", "must be at most 2^20 times dp.clip")
    if enabled and not run.secure:
        raise ServerConfigError(
            "dp.enabled", "distributed DP needs secure rounds (run.secure = true): the noise is "
            "added inside the secure sum"
        )
    return dp


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and validate ``server.toml``.

    Raises:
        ServerConfigError: If the file is missing, too large, not TOML, or a value is bad.
    """
    path = Path(path).expanduser().resolve()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ServerConfigError("", f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ServerConfigError("", f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ServerConfigError("", f"{path} is not valid TOML: {exc}") from exc
    return parse_server_config(doc, path.parent, path)
