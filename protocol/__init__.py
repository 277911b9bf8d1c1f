"""fedseal.protocol: sans-IO secure aggregation (SecAgg+ with signed messages), DESIGN.md §4-§5.

Coordinator side — the adapter seam (e.g. ``fedseal.server`` over Flower's
``Grid.send_and_receive``)::

    from fedseal.protocol import (Packet, ProtocolError, QuantizationConfig, RoundConfig,
                                  Roster, RosterEntry, SecAggServer)

    config = RoundConfig(vector_length=n_params,
                         quantization=QuantizationConfig.from_clip(0.5, levels=2**12),
                         max_weight=60_000)
    roster = Roster(RosterEntry.from_der(site, der, approved_roots) for site, der, ... in enrolled)
    server = SecAggServer(config, roster, sampled_sites, identity_key=coordinator_key,
                          run_id=run_id, round=rnd, model_digest=sha256(global_model_bytes),
                          now=time.time())
    try:
        outbound = server.start()                    # {site_id: Packet(payload, bulk=None)}
        while outbound:
            replies = send_and_receive(outbound, timeout=stage_timeout)   # adapter's transport
            for site, reply in replies.items():      # reply: Packet(payload bytes, bulk or None)
                server.receive(site, reply.payload, reply.bulk)   # -> Accepted | Rejection
            outbound = server.advance()              # sites that did not reply = dropouts
                                                     # (or server.drop(site, reason) earlier)
            # server.stage is ServerStage.ADVERTISE again after advance(): a new setup
            # attempt (a cohort member did not advertise keys); the packets are round setups
        result = server.result                       # RoundResult
        new_weights = old_weights + result.weighted_mean   # any weighted-mean strategy
    except ProtocolError as exc:                     # ThresholdError, ReconstructionError
        ...  # round failed cleanly: log exc, keep the model unchanged, next round

* ``Packet.payload`` is the signed envelope (bytes); ``Packet.bulk`` is the masked numpy
  vector (uint32, or uint64 with ``modulus_bits=64``) that travels beside it on the
  masked-input stage only. The coordinator never sends a bulk vector; the global model
  itself travels outside the protocol (its SHA-256 is ``model_digest``).
* ``server.receive`` never raises for bad peer input; a :class:`Rejection` (typed error in
  ``.error``, ``.reason``) makes the site a dropout. ``server.log`` holds every
  :class:`Accepted`/:class:`Rejection` (content digests and signatures for the audit log).
* :class:`RoundResult`: ``weighted_sum`` (float64), ``total_weight``, ``weighted_mean``,
  ``survivors``, ``weights``, ``dataset_roots``, ``clipped``/``clipped_total``,
  ``aggregate``/``aggregate_digest`` (exact integer sum), ``dropouts``, ``rejections``,
  ``setup_attempts`` and ``restarts`` (:class:`SetupRestart`, also in ``server.log``).
* Sites accept only an advert bundle with every cohort member's advert; when a cohort
  member does not advertise, ``advance()`` starts a new setup attempt (same round, attempt
  number + 1, the sites that advertised, fresh keys), up to ``config.max_setup_attempts``.

Site side (e.g. ``fedseal.client`` in a Flower ``ClientApp``), one session per round::

    from fedseal.protocol import ClientSession, LocalUpdate

    def train(info):                  # called once, at the masked-input stage
        check(info.model_digest == sha256(received_model_bytes))
        delta, n_examples = local_training(...)
        return LocalUpdate(vector=delta, example_count=n_examples, dataset_root=manifest_root)

    guard = SetupGuard(SitePolicy())          # kept (and persisted) by the site: attempt caps,
                                              # rounds answered, committed graph nonces
    anchor = {"site-b": key_id_b, "site-c": key_id_c}  # peers from the site's own roster
    session = ClientSession(site_id, site_key, pinned_coordinator_public_key,
                            update_fn=train, rng=rounding_generator,  # a numpy Generator
                            trusted_peers=anchor, guard=guard)
    reply = session.handle(message_bytes)     # -> Packet | None; send reply.payload (+ reply.bulk)

A new setup attempt of the same round is handled by the same session (it answers with a
fresh key advert); a fresh session for it works too as long as it shares the ``guard``.

``session.handle`` raises a :class:`ProtocolError` if the coordinator misbehaves (the site
then reveals nothing more: ``session.stage`` is ``FAILED``). Where the ClientApp does not
live across messages (Flower's subprocess isolation, simulation actors), persist the session
between messages with ``blob = session.export_state(state_key)`` (AEAD-sealed: it holds round
secrets) and ``ClientSession.restore(blob, state_key, site_id, site_key, coordinator_key,
update_fn=..., rng=...)``.

For tests and benchmarks, :class:`~fedseal.sim.inmemory.Federation` runs a whole
round in memory with scripted dropouts and adversarial hooks.

Known limits (by design, as in Bonawitz et al.): a site that sends its neighbours
undecryptable shares makes them abort (they drop out; nothing leaks); a site that masks its
input with other seeds than it committed to corrupts the aggregate like any poisoned update
(input integrity is out of scope). Nobody sets the neighbour graph: its seed hashes graph
nonces every cohort member committed to before the setup (in its previous round's advert, or a
commit exchange the run's first round starts with), revealed one hash-chain step per attempt,
so a colluding member cannot grind its advert; the coordinator can force at most
``SitePolicy.max_setup_attempts`` re-draws per round, each a signed, logged restart (bias bound
in :mod:`fedseal.protocol.graph`). A site takes part only with peers it can tie to its own trust
anchor (``trusted_peers``: its consortium roster and ``[peers]``), and only in rounds that meet
its own floor (:mod:`fedseal.protocol.params`): degree, threshold, and survivor-set signatures
from ``max(t, (n + c) // 2 + 1)`` of the cohort (``config.consistency_quorum``), so a round
also needs that many sites to advertise, submit and sign; fewer fail it with
``ThresholdError``.
"""

from .client import ClientSession, ClientStage, LocalUpdate, RoundInfo
from .config import Limits, QuantizationConfig, RoundConfig, RoundParameters, SitePolicy
from .errors import (
    AggregateOutOfRangeError,
    BadSignatureError,
    BulkMismatchError,
    CohortTooSmallError,
    ConfigError,
    CoordinatorMisbehaviourError,
    DecodeError,
    DuplicateMessageError,
    IncompleteBundleError,
    ProtocolError,
    ReconstructionError,
    RevokedSignerError,
    SetupAttemptError,
    StaleMessageError,
    ThresholdError,
    UnapprovedDatasetError,
    UnknownSignerError,
    UntrustedPeerError,
    VerificationError,
    WeakRoundError,
)
from .guard import SetupGuard
from .roster import Roster, RosterEntry
from .server import (
    Accepted,
    Dropout,
    Rejection,
    RoundResult,
    SecAggServer,
    ServerStage,
    SetupRestart,
    VerifiedSubmission,
)
from .types import COORDINATOR, MessageKind, Packet, SiteId

__all__ = [
    "COORDINATOR",
    "Accepted",
    "AggregateOutOfRangeError",
    "BadSignatureError",
    "BulkMismatchError",
    "ClientSession",
    "ClientStage",
    "CohortTooSmallError",
    "ConfigError",
    "CoordinatorMisbehaviourError",
    "DecodeError",
    "Dropout",
    "DuplicateMessageError",
    "IncompleteBundleError",
    "Limits",
    "LocalUpdate",
    "MessageKind",
    "Packet",
    "ProtocolError",
    "QuantizationConfig",
    "ReconstructionError",
    "Rejection",
    "RevokedSignerError",
    "Roster",
    "RosterEntry",
    "RoundConfig",
    "RoundInfo",
    "RoundParameters",
    "RoundResult",
    "SecAggServer",
    "ServerStage",
    "SetupAttemptError",
    "SetupGuard",
    "SetupRestart",
    "SiteId",
    "SitePolicy",
    "StaleMessageError",
    "ThresholdError",
    "UnapprovedDatasetError",
    "UnknownSignerError",
    "UntrustedPeerError",
    "VerificationError",
    "VerifiedSubmission",
    "WeakRoundError",
]
