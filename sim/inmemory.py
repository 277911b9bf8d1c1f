"""In-memory federation: N sites and a coordinator exchanging protocol bytes in memory.

Used by the protocol tests, the benchmark (``python -m bench protocol``), GPU checks and the
Flower adapters' tests. Deterministic for a given seed: identity keys, ephemeral keys, seeds
and nonces come from a per-site SHAKE-256 stream (:class:`DeterministicRandom`), the rounding
noise from the generators the caller passes in, the clock is a parameter.

*Simulation only*: a real site draws its secrets from ``os.urandom`` (the default of
:class:`~fedseal.protocol.client.ClientSession`).

Scripted dropouts: ``dropouts[stage]`` lists sites that receive the coordinator's message of
that stage but never answer it (nor anything later). A site silent at ``ADVERTISE`` makes the
coordinator start a new setup attempt for the others (``outcome.server.restarts``); each site
keeps one :class:`~fedseal.protocol.guard.SetupGuard` (``fed.guards``) across its sessions
and rounds, as a real site adapter should. Adversarial behaviour: subclass
:class:`Behaviour` and override its hooks to tamper with the coordinator's messages, the
sites' replies, or to inject messages before a stage closes.

Example::

    fed = Federation(config, ["a", "b", "c"], seed=b"demo",
                     updates=lambda site, info: LocalUpdate(vec, 10, root),
                     rounding_rng=lambda site: generators[site])
    outcome = fed.run_round(1)
    outcome.result.weighted_mean
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.keys import key_id
from fedseal.protocol.client import ClientSession, LocalUpdate, RoundInfo
from fedseal.protocol.config import RoundConfig, SitePolicy
from fedseal.protocol.discrete_gaussian import NoiseSource
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.guard import SetupGuard
from fedseal.protocol.roster import Roster, RosterEntry
from fedseal.protocol.seams import NO_SHARING, SharedWork
from fedseal.protocol.server import Receipt, RoundResult, SecAggServer, ServerStage
from fedseal.protocol.types import Packet, SiteId

__all__ = [
    "Behaviour",
    "DeterministicRandom",
    "Federation",
    "SimulationOutcome",
    "dataset_root_for",
    "deterministic_key",
]

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class DeterministicRandom:
    """A reproducible byte source: SHAKE-256(seed || counter). For simulations and tests only."""

    __slots__ = ("_counter", "_seed")

    def __init__(self, seed: bytes) -> None:
        self._seed = bytes(seed)
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        """Return the next ``n`` bytes."""
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


def deterministic_key(seed: bytes) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 identity key derived from ``seed`` (simulation only)."""
    scalar = int.from_bytes(hashlib.sha512(b"fedseal/sim/identity\x00" + seed).digest(), "big")
    return ec.derive_private_key(scalar % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def dataset_root_for(site: str) -> bytes:
    """The (fake) approved dataset root the simulator uses for ``site``."""
    return hashlib.sha256(b"fedseal/sim/dataset\x00" + site.encode()).digest()


class Behaviour:
    """Hooks for adversarial behaviour; the defaults are an honest federation.

    ``stage`` is always the coordinator stage the message belongs to: the stage that sends
    (for :meth:`coordinator_sends`) or collects (for :meth:`site_replies`) it.
    """

    def coordinator_sends(
        self, fed: Federation, stage: ServerStage, site: SiteId, packet: Packet
    ) -> Packet | None:
        """Tamper with (or withhold, by returning ``None``) a coordinator message."""
        return packet

    def site_replies(
        self, fed: Federation, stage: ServerStage, site: SiteId, packet: Packet
    ) -> Sequence[Packet]:
        """Tamper with, duplicate or drop a site's reply."""
        return (packet,)

    def before_advance(self, fed: Federation, stage: ServerStage) -> None:
        """Run just before the coordinator closes ``stage`` (e.g. to inject replays)."""


@dataclass(slots=True)
class SimulationOutcome:
    """What happened in one simulated round.

    Attributes:
        result: The round result, or ``None`` if the round failed.
        failure: The error the coordinator failed the round with, if any.
        server: The coordinator state machine (receipts, rejections, dropouts).
        sessions: Every site's session (stage, failure, revealed shares).
        client_errors: Errors sites raised while handling coordinator messages.
        receipts: Every receipt returned by ``server.receive``.
        server_seconds: Coordinator compute per stage (with a timer).
        client_seconds: Compute per site, summed over stages (with a timer).
        client_stage_seconds: Compute per stage, summed over sites (with a timer).
    """

    result: RoundResult | None
    failure: ProtocolError | None
    server: SecAggServer
    sessions: dict[SiteId, ClientSession]
    client_errors: dict[SiteId, ProtocolError] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    server_seconds: dict[str, float] = field(default_factory=dict)
    client_seconds: dict[SiteId, float] = field(default_factory=dict)
    client_stage_seconds: dict[str, float] = field(default_factory=dict)


class Federation:
    """N sites and a coordinator in one process (see the module docstring).

    Args:
        config: Round configuration.
        sites: Site ids.
        seed: Seed for every identity key, ephemeral key, mask seed and nonce.
        updates: ``(site, RoundInfo) -> LocalUpdate``; the training callback of each site.
        rounding_rng: ``site -> np.random.Generator`` for stochastic rounding (called once
            per site per round).
        dropouts: Stage -> sites that stop answering at that stage.
        behaviour: Adversarial hooks.
        timer: Optional clock (e.g. ``time.process_time``) to measure compute per stage.
        roster: Optional roster (default: every site active with its simulated root).
        site_policy: What every site accepts from setups (default :class:`SitePolicy()`).
        trusted_peers: What each site's own trust anchor says (site -> key id per peer);
            default: every site trusts the federation's own site keys (an honest
            consortium roster). Sybil tests enrol extra keys in ``roster`` that no site
            trusts.
        shared: What every site's session checks and decodes through
            (:mod:`fedseal.protocol.seams`); default: each site all of it itself, as deployed.
            A :class:`fedseal.sim.shared_work.SharedWork` shares it between the sites.
        dp_noise: ``site -> NoiseSource`` for a site's DP rounding and noise (called once per
            DP input); default each session's own, keyed from its deterministic secrets.
    """

    def __init__(
        self,
        config: RoundConfig,
        sites: Sequence[str],
        *,
        seed: bytes,
        updates: Callable[[SiteId, RoundInfo], LocalUpdate],
        rounding_rng: Callable[[SiteId], np.random.Generator],
        dropouts: Mapping[ServerStage, Collection[str]] | None = None,
        behaviour: Behaviour | None = None,
        timer: Callable[[], float] | None = None,
        roster: Roster | None = None,
        site_policy: SitePolicy | None = None,
        trusted_peers: Mapping[str, Mapping[str, bytes]] | None = None,
        shared: SharedWork = NO_SHARING,
        dp_noise: Callable[[SiteId], NoiseSource] | None = None,
    ) -> None:
        self.config = config
        self.dp_noise = dp_noise
        self.sites: tuple[SiteId, ...] = tuple(SiteId(s) for s in sites)
        self.seed = bytes(seed)
        self.updates = updates
        self.rounding_rng = rounding_rng
        self.dropouts = {
            stage: frozenset(SiteId(s) for s in v) for stage, v in (dropouts or {}).items()
        }
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.timer = timer
        self.shared = shared
        self.coordinator_key = deterministic_key(self.seed + b"/coordinator")
        self.site_keys: dict[SiteId, ec.EllipticCurvePrivateKey] = {
            s: deterministic_key(self.seed + b"/site/" + s.encode()) for s in self.sites
        }
        self.roster = (
            roster
            if roster is not None
            else Roster(
                RosterEntry(
                    site=s,
                    public_key=k.public_key(),
                    approved_roots=frozenset({dataset_root_for(s)}),
                )
                for s, k in self.site_keys.items()
            )
        )
        self.site_policy = site_policy if site_policy is not None else SitePolicy()
        consortium: dict[str, bytes] = {
            s: bytes(key_id(k.public_key())) for s, k in self.site_keys.items()
        }
        self.trusted_peers: dict[SiteId, Mapping[str, bytes]] = {
            s: (trusted_peers or {}).get(s, consortium) for s in self.sites
        }
        self.guards: dict[SiteId, SetupGuard] = {
            s: SetupGuard(self.site_policy) for s in self.sites
        }
        self.server: SecAggServer | None = None
        self.sessions: dict[SiteId, ClientSession] = {}
        #: Each site's commitment to its next graph nonce, carried from round to round as
        #: a coordinator does (the first round starts with a commit exchange).
        self.commitments: dict[str, bytes] = {}

    def run_id_for(self, round: int) -> bytes:
        """The run id used for every round of this federation."""
        return hashlib.sha256(b"fedseal/sim/run\x00" + self.seed).digest()[:16]

    def model_digest_for(self, round: int) -> bytes:
        """The (simulated) global-model digest of ``round``."""
        return hashlib.sha256(
            b"fedseal/sim/model\x00" + self.seed + round.to_bytes(4, "big")
        ).digest()

    def make_session(self, site: SiteId, round: int, now: float) -> ClientSession:
        """A fresh client session for ``site`` (deterministic secrets)."""
        noise = self.dp_noise
        return ClientSession(
            site,
            self.site_keys[site],
            self.coordinator_key.public_key(),
            update_fn=lambda info: self.updates(site, info),
            rng=self.rounding_rng(site),
            randbytes=DeterministicRandom(
                self.seed + b"/secrets/" + site.encode() + round.to_bytes(4, "big")
            ),
            now=lambda: now,
            limits=self.config.limits,
            trusted_peers=self.trusted_peers.get(site, {}),
            guard=self.guards.setdefault(site, SetupGuard(self.site_policy)),
            shared=self.shared,
            noise_source=(lambda: noise(site)) if noise is not None else None,
        )

    def _time(self) -> float:
        return self.timer() if self.timer is not None else 0.0

    def run_round(
        self, round: int = 1, *, now: float = 1_700_000_000.0, cohort: Sequence[str] | None = None
    ) -> SimulationOutcome:
        """Run one round end to end; never raises for protocol failures (see the outcome).

        Raises:
            ConfigError: If the configuration is invalid for the cohort.
        """
        members = tuple(SiteId(s) for s in cohort) if cohort is not None else self.sites
        server = SecAggServer(
            self.config,
            self.roster,
            members,
            identity_key=self.coordinator_key,
            run_id=self.run_id_for(round),
            round=round,
            model_digest=self.model_digest_for(round),
            now=now,
            commitments=self.commitments,
        )
        self.server = server
        self.sessions = {s: self.make_session(s, round, now) for s in members}
        outcome = SimulationOutcome(
            result=None, failure=None, server=server, sessions=self.sessions
        )
        gone: set[SiteId] = set()
        t0 = self._time()
        outbound = server.start()
        outcome.server_seconds["setup"] = self._time() - t0
        stage = server.stage
        while True:
            for site, packet in outbound.items():
                maybe = self.behaviour.coordinator_sends(self, stage, site, packet)
                if maybe is None or site in gone:
                    continue
                if site in self.dropouts.get(stage, frozenset()):
                    gone.add(site)
                    continue
                session = self.sessions[site]
                t0 = self._time()
                try:
                    reply = session.handle(maybe.payload, maybe.bulk)
                except ProtocolError as exc:
                    outcome.client_errors[site] = exc
                    continue
                finally:
                    spent = self._time() - t0
                    outcome.client_seconds[site] = outcome.client_seconds.get(site, 0.0) + spent
                    outcome.client_stage_seconds[stage.value] = (
                        outcome.client_stage_seconds.get(stage.value, 0.0) + spent
                    )
                if reply is None:
                    continue
                for r in self.behaviour.site_replies(self, stage, site, reply):
                    t0 = self._time()
                    outcome.receipts.append(server.receive(site, r.payload, r.bulk))
                    outcome.server_seconds[stage.value] = (
                        outcome.server_seconds.get(stage.value, 0.0) + self._time() - t0
                    )
            self.behaviour.before_advance(self, stage)
            t0 = self._time()
            try:
                outbound = server.advance()
            except ProtocolError as exc:
                outcome.failure = exc
                return outcome
            finally:
                self.commitments.update((str(s), c) for s, c in server.next_commitments.items())
                key = f"{stage.value} (close)"
                outcome.server_seconds[key] = (
                    outcome.server_seconds.get(key, 0.0) + self._time() - t0
                )
            if server.stage is ServerStage.DONE:
                break
            stage = server.stage
        outcome.result = server.result
        for site, packet in server.result_notices().items():
            if site not in gone and site not in outcome.client_errors:
                try:
                    self.sessions[site].handle(packet.payload)
                except ProtocolError as exc:
                    outcome.client_errors[site] = exc
        return outcome
