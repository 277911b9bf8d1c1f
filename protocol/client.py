"""Client (site) side of a secure round: a sans-IO state machine.

Usage: one :class:`ClientSession` per round; feed it every message the coordinator sends
(``reply = session.handle(payload)``) and send back ``reply`` if it is not ``None``.

Transition table (stage, message kind accepted -> next stage, reply)::

    AWAIT_SETUP      ROUND_SETUP     -> AWAIT_ADVERTS    KEY_ADVERT
    AWAIT_ADVERTS    ROUND_SETUP     -> AWAIT_ADVERTS    KEY_ADVERT  (new setup attempt)
    AWAIT_ADVERTS    ADVERT_BUNDLE   -> AWAIT_SHARES     ENCRYPTED_SHARES
    AWAIT_SHARES     SHARE_DELIVERY  -> AWAIT_SURVIVORS  MASKED_INPUT (+ bulk vector)
    AWAIT_SURVIVORS  SURVIVOR_SET    -> AWAIT_UNMASK     CONSISTENCY_SIGNATURE
    AWAIT_UNMASK     UNMASK_REQUEST  -> DONE             UNMASK_RESPONSE
    DONE             ROUND_RESULT    -> DONE             (none)

Rules the site enforces (each violation raises a typed error):
    * every coordinator message is signed by the pinned coordinator key and binds this
      run, round, model digest, setup digest and this site as recipient;
    * the round parameters are safe (threshold > half a neighbourhood, no wrap-around) and
      the cohort holds at least ``SitePolicy.min_cohort`` sites (:class:`CohortTooSmallError`);
    * every other cohort member is a site this site knows *independently of the coordinator*,
      with exactly the key it trusts for it (``trusted_peers``: its pinned consortium roster
      and ``[peers]`` table), and there are at least ``SitePolicy.min_known_peers`` of them
      (:class:`UntrustedPeerError`): a coordinator cannot fill a cohort with its own keys;
    * the degree, threshold and ``min_survivors`` meet the site's own floor for its
      ``max_colluding_fraction`` (gamma) and ``security_bits`` (:mod:`fedseal.protocol.params`,
      :class:`WeakRoundError`), whatever the coordinator proposes;
    * setup attempts: a new setup for the same run, round and model while the site waits
      for the advert bundle starts a new attempt (fresh ephemeral keys and seed); the site
      answers only attempts ``0..max_setup_attempts-1`` (:class:`SetupAttemptError`), each
      newer than the last it answered for that round and none after it shared keys in the
      round (:class:`StaleMessageError`; see :mod:`fedseal.protocol.guard`);
    * the advert bundle holds exactly one valid advert of *every* member of the signed
      setup cohort (:class:`IncompleteBundleError` otherwise), each signed by the member it
      names and binding the same setup, and this site's own advert unchanged (no key
      substitution): having seen the adverts, a coordinator cannot re-draw the graph by
      leaving some out;
    * the neighbour graph is computed locally from the signed adverts (never taken from
      the coordinator); shares come only from neighbours; the graph seed is part of the
      survivor statement every site signs, so sites shown different bundles never reach
      the consistency quorum;
    * at least ``t`` neighbours' shares arrived before the site masks its input;
    * it signs a survivor set only if it holds at least ``min_known_peers`` other sites and
      the consistency quorum, and no window of ``k/2`` consecutive ring positions holds more
      dropped sites than the floor allows (claimed dropouts cannot cut honest sites off);
    * it reveals shares only after valid signatures over the *same* survivor set it signed
      from ``max(t, (n + c) // 2 + 1)`` of the ``n`` cohort members, ``c = floor(gamma n)``
      (two sets can never both reach it, even with ``c`` colluders signing both);
    * for each neighbour it reveals either the self-mask seed share (survivor) or the
      mask-key share (dropped), never both, never for a non-neighbour, and only once;
    * distributed DP (docs/dp.md): a setup without DP is refused by a site whose policy
      requires it (:class:`~fedseal.protocol.config.DpRequiredError`); a DP setup is refused
      (:class:`~fedseal.protocol.config.DpPolicyError`, naming the parameter) if its noise
      assumes more honest survivors than the site's own colluding fraction leaves, if the
      central noise multiplier over those survivors is below the site's floor, or if the
      modulus cannot hold the noisy sum; its rotation seed must be the one derived from the
      run and round. The DP input is the site's own noisy encoding of its clipped update,
      unweighted (its example count is sent as 1 and its clip indicator as 0: neither is
      released in a DP round, docs/dp.md §6).

A :class:`~fedseal.protocol.errors.StaleMessageError` or
:class:`~fedseal.protocol.errors.DuplicateMessageError` leaves the session where it was;
any other :class:`~fedseal.protocol.errors.ProtocolError` moves it to ``FAILED`` (the site
drops out of the round and reveals nothing more).
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.aead import open_sealed
from fedseal.crypto.aead import seal as aead_seal
from fedseal.crypto.agreement import AgreementKey
from fedseal.crypto.errors import (
    AgreementError,
    CryptoError,
    DecryptionError,
    KeyFormatError,
    SignatureError,
)
from fedseal.crypto.keys import key_id, public_key_from_der, public_key_to_der
from fedseal.crypto.prg import SEED_SIZE, Mask, MaskSum
from fedseal.crypto.shamir import Share, split_many
from fedseal.crypto.signing import sign

from .config import (
    Limits,
    QuantizationConfig,
    RoundParameters,
    SitePolicy,
    check_dp_round,
    validate_parameters,
)
from .discrete_gaussian import NoiseSource, PrgNoise
from .dp import DpParams, encode_integers, rotation_seed_for, wrap
from .encoding import Reader, Writer
from .envelope import Envelope, OpenedMessage, open_envelope, seal
from .errors import (
    CohortTooSmallError,
    ConfigError,
    CoordinatorMisbehaviourError,
    DecodeError,
    DuplicateMessageError,
    IncompleteBundleError,
    ProtocolError,
    StaleMessageError,
    ThresholdError,
    UnknownSignerError,
    UntrustedPeerError,
    VerificationError,
    WeakRoundError,
)
from .graph import (
    NeighbourGraph,
    build_graph,
    bundle_digest,
    graph_seed,
    nonce_reveal,
    opens,
)
from .guard import SetupGuard
from .masking import (
    PAIR_DOMAIN,
    SEED_BYTES,
    SELF_DOMAIN,
    decode_share_pair,
    decrypt_share_pair,
    encode_masked,
    encode_share_pair,
    encrypt_share_pair,
    pair_sign_negative,
    pairwise_seed,
    seed_commitment,
)
from .messages import (
    AGREEMENT_PUBLIC_BYTES,
    AdvertBundle,
    ConsistencySignature,
    EncryptedShares,
    Header,
    KeyAdvert,
    MaskedInput,
    RoundResultNotice,
    RoundSetup,
    ShareDelivery,
    ShareKind,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
    decode_payload,
    survivor_statement,
)
from .params import SecurityFloor, check_parameters, check_survivor_windows, site_floor
from .quantize import CHUNK
from .seams import MAX_KEY_BYTES, NO_SHARING, SharedWork
from .types import (
    COORDINATOR,
    DIGEST_BYTES,
    SURVIVOR_STATEMENT_TYPE,
    MessageKind,
    Packet,
    SiteId,
    site_sort_key,
)

__all__ = ["ClientSession", "ClientStage", "LocalUpdate", "Packet", "RoundInfo"]


_STATE_MAGIC = b"fedseal/v1/client-state\x00"


class ClientStage(enum.Enum):
    """Where a site is in the round."""

    AWAIT_SETUP = "await-setup"
    AWAIT_ADVERTS = "await-adverts"
    AWAIT_SHARES = "await-shares"
    AWAIT_SURVIVORS = "await-survivors"
    AWAIT_UNMASK = "await-unmask"
    DONE = "done"
    FAILED = "failed"


_STAGE_CODES: Mapping[ClientStage, int] = {stage: i for i, stage in enumerate(ClientStage)}

TRANSITIONS: Mapping[ClientStage, tuple[MessageKind, ClientStage]] = {
    ClientStage.AWAIT_SETUP: (MessageKind.ROUND_SETUP, ClientStage.AWAIT_ADVERTS),
    ClientStage.AWAIT_ADVERTS: (MessageKind.ADVERT_BUNDLE, ClientStage.AWAIT_SHARES),
    ClientStage.AWAIT_SHARES: (MessageKind.SHARE_DELIVERY, ClientStage.AWAIT_SURVIVORS),
    ClientStage.AWAIT_SURVIVORS: (MessageKind.SURVIVOR_SET, ClientStage.AWAIT_UNMASK),
    ClientStage.AWAIT_UNMASK: (MessageKind.UNMASK_REQUEST, ClientStage.DONE),
    ClientStage.DONE: (MessageKind.ROUND_RESULT, ClientStage.DONE),
}


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """What the training callback learns about the round.

    Attributes:
        run_id: The run.
        round: The round number.
        model_digest: SHA-256 of the global model to train from (the adapter checks it
            against the model it received).
        vector_length: Elements the update must have.
        quantization: Clip / levels / modulus of the round.
        max_weight: Largest example count allowed.
        dp: The round's DP parameters if it is a DP round (the adapter charges its privacy
            ledger with them before returning the update: the noisy input is sent right
            after), else ``None``.
    """

    run_id: bytes
    round: int
    model_digest: bytes
    vector_length: int
    quantization: QuantizationConfig
    max_weight: int
    dp: DpParams | None = None


@dataclass(frozen=True, slots=True)
class LocalUpdate:
    """The training callback's result.

    Attributes:
        vector: 1-D float update (e.g. new weights minus global weights), ``vector_length`` long.
        example_count: Weight of this update (``1..max_weight``).
        dataset_root: The 32-byte Merkle root of the dataset trained on (DESIGN.md §6).
    """

    vector: npt.ArrayLike
    example_count: int
    dataset_root: bytes


UpdateFn = Callable[[RoundInfo], LocalUpdate]


@dataclass(slots=True)
class _Peer:
    site: SiteId
    public_key: ec.EllipticCurvePublicKey
    share_public: bytes = b""
    mask_public: bytes = b""


class ClientSession:
    """One site's state in one secure round (see the module docstring for the rules).

    Args:
        site: This site's enrolled id.
        identity_key: This site's ECDSA P-256 identity key.
        coordinator_key: The pinned coordinator public key.
        update_fn: Called once, at the masked-input stage, to train and return the update.
        rng: Generator for stochastic rounding.
        randbytes: Source of seeds, ephemeral keys and nonces.
        now: Clock (seconds since the epoch) for the setup's expiry.
        limits: Size bounds for untrusted input.
        trusted_peers: The site's own trust anchor: site -> key id (SHA-256 of the DER
            public key) of every peer it knows independently of the coordinator (its pinned
            consortium roster and ``[peers]`` table). A cohort member not listed here with
            exactly that key is refused (:class:`UntrustedPeerError`): a coordinator cannot
            fill a cohort with keys of its own.
        expected_run: If given, the setup must be for this run id.
        min_round: If given, the setup's round must be at least this (no replay of old rounds).
        expected_round: If given, the setup must be for exactly this round (an adapter that
            checked a model for a run and round binds the session to them).
        policy: What setups the site accepts (attempt cap, minimum cohort); default
            ``guard.policy`` if a guard is given, else :class:`SitePolicy()`.
        guard: The site's :class:`~fedseal.protocol.guard.SetupGuard`, shared by its
            sessions so the attempt cap spans sessions; default a private one.
        shared: Where signature checks, decodes and neighbour graphs are made
            (:mod:`fedseal.protocol.seams`): by default here, every time; a simulation passes
            one that shares them with the other virtual sites of its process. Every header,
            cohort and sender check is made by this session either way.
        noise_source: Called once per DP input for the rounding and noise randomness;
            default a :class:`~fedseal.protocol.discrete_gaussian.PrgNoise` keyed by 32
            bytes of ``randbytes`` (the OS CSPRNG unless ``randbytes`` is injected).
    """

    def __init__(
        self,
        site: str,
        identity_key: ec.EllipticCurvePrivateKey,
        coordinator_key: ec.EllipticCurvePublicKey,
        *,
        update_fn: UpdateFn,
        rng: np.random.Generator,
        randbytes: Callable[[int], bytes] = os.urandom,
        now: Callable[[], float] = time.time,
        trusted_peers: Mapping[str, bytes],
        limits: Limits | None = None,
        expected_run: bytes | None = None,
        min_round: int | None = None,
        expected_round: int | None = None,
        policy: SitePolicy | None = None,
        guard: SetupGuard | None = None,
        shared: SharedWork = NO_SHARING,
        noise_source: Callable[[], NoiseSource] | None = None,
    ) -> None:
        if not site:
            raise ValueError("site id must be non-empty")
        self.site = SiteId(site)
        self._identity = identity_key
        self._identity_der = public_key_to_der(identity_key.public_key())
        self._coordinator_key = coordinator_key
        self._coordinator_id = bytes(key_id(coordinator_key))
        self._update_fn = update_fn
        self._rng = rng
        self._randbytes = randbytes
        self._now = now
        self.limits = limits if limits is not None else Limits()
        self._trusted = {SiteId(s): bytes(k) for s, k in trusted_peers.items()}
        self._expected_run = expected_run
        self._min_round = min_round
        self._expected_round = expected_round
        #: (run, round, model) of a commit exchange this session answered: the setup proper
        #: must match it.
        self._committed: tuple[bytes, int, bytes] | None = None
        if policy is None:
            policy = guard.policy if guard is not None else SitePolicy()
        self.policy = policy
        self._guard = guard if guard is not None else SetupGuard(policy)
        self._shared = shared
        self._noise_source = noise_source
        self.stage = ClientStage.AWAIT_SETUP
        self.failure: ProtocolError | None = None
        #: Elements the quantizer clipped; in a DP round 1 if the update's norm was clipped
        #: (a local fact: the masked input reports 0).
        self.clipped = 0
        self.revealed: tuple[tuple[SiteId, ShareKind], ...] = ()
        self.result: RoundResultNotice | None = None
        self._seen: set[bytes] = set()
        # Set by the setup.
        self._setup: RoundSetup | None = None
        self._setup_digest = b""
        self._setup_envelope = b""
        self._peers: dict[SiteId, _Peer] = {}
        self._by_key_id: dict[bytes, SiteId] = {}
        self._share_key: AgreementKey | None = None
        self._mask_key: AgreementKey | None = None
        self._seed = b""
        self._advert_digest = b""
        self._graph: NeighbourGraph | None = None
        self._held: dict[SiteId, tuple[Share, Share]] = {}
        self._survivors: tuple[SiteId, ...] = ()
        self._floor: SecurityFloor | None = None
        self._bundle = b""

    # -- public API ---------------------------------------------------------------------

    def handle(self, payload: bytes, bulk: object = None) -> Packet | None:
        """Consume one coordinator message and return the reply to send (or ``None``).

        Args:
            payload: The envelope bytes received.
            bulk: Ignored (coordinator messages carry no bulk vector); accepted so adapters
                can pass what they received uniformly.

        Raises:
            StaleMessageError: Wrong kind for this stage, other run/round, expired setup, a
                setup attempt not newer than one answered (the session stays where it was).
            DuplicateMessageError: The same signed content arrived before.
            SetupAttemptError, CohortTooSmallError, IncompleteBundleError: Setups beyond
                the site's policy or a bundle missing a cohort member's advert (these are
                :class:`CoordinatorMisbehaviourError`); the session moves to ``FAILED``.
            DecodeError, VerificationError, ThresholdError: The session moves to ``FAILED``.
        """
        if self.stage is ClientStage.FAILED:
            raise StaleMessageError(
                "session already failed", site=self.site, stage=self.stage.value
            )
        expected_kind, next_stage = TRANSITIONS[self.stage]
        expected: tuple[MessageKind, ...] = (expected_kind,)
        if self.stage is ClientStage.AWAIT_ADVERTS:
            expected = (expected_kind, MessageKind.ROUND_SETUP)
        round_ = self._setup.header.round if self._setup is not None else None
        try:
            opened = open_envelope(
                payload,
                self.limits,
                expected=expected,
                resolve_signer=self._coordinator_signer,
                shared=self._shared,
            )
            if opened.content_digest in self._seen:
                raise DuplicateMessageError("coordinator message seen before")
            reply = self._dispatch(opened)
        except (StaleMessageError, DuplicateMessageError) as exc:
            raise exc.with_context(site=self.site, round=round_, stage=self.stage.value) from None
        except ProtocolError as exc:
            self.failure = exc.with_context(site=self.site, round=round_, stage=self.stage.value)
            self.stage = ClientStage.FAILED
            raise
        self._seen.add(opened.content_digest)
        if opened.envelope.kind is MessageKind.ROUND_SETUP:
            if self._setup is None:  # a commit exchange: still waiting for the setup proper
                self.stage = ClientStage.AWAIT_SETUP
                return reply
            self._setup_envelope = bytes(payload)
            next_stage = ClientStage.AWAIT_ADVERTS
        self.stage = next_stage
        return reply

    @property
    def bundle(self) -> bytes:
        """Digest of the advert bundle this site computed its graph from (``b""`` before):
        what its survivor-set signature binds."""
        return self._bundle

    @property
    def setup(self) -> RoundSetup | None:
        """The signed round setup this session answers (``None`` before one)."""
        return self._setup

    @property
    def dp(self) -> DpParams | None:
        """The DP parameters of the accepted setup (``None``: no setup yet, or no DP)."""
        return self._setup.params.dp if self._setup is not None else None

    @property
    def attempt(self) -> int | None:
        """The setup attempt this session answers (``None`` before a setup)."""
        return self._setup.attempt if self._setup is not None else None

    @property
    def graph(self) -> NeighbourGraph | None:
        """The neighbour graph this site computed from its advert bundle (``None`` before)."""
        return self._graph

    @property
    def neighbours(self) -> tuple[SiteId, ...]:
        """This site's neighbours (empty before the adverts arrive)."""
        return self._graph.of(self.site) if self._graph is not None else ()

    # -- persistence between messages (stateless ClientApp processes) ------------------------

    def export_state(self, key: bytes) -> bytes:
        """Serialize this session, sealed with ChaCha20-Poly1305 under ``key`` (32 bytes).

        The state holds round secrets (ephemeral private keys, self-mask seed, neighbours'
        shares), so it is always encrypted; keep ``key`` site-local (e.g. derived from the
        site's key store) and drop the blob once the round is over. Restore with
        :meth:`restore`.
        """
        w = Writer().raw(_STATE_MAGIC).text(self.site).u8(_STAGE_CODES[self.stage])
        w.blob(self._setup_envelope)
        for secret in (self._share_key, self._mask_key):
            w.blob(secret.private_bytes() if secret is not None else b"")
        w.blob(self._seed).blob(self._advert_digest)
        graph_seed_bytes = self._graph.seed if self._graph is not None else b""
        advertisers = sorted(self._graph.neighbours, key=site_sort_key) if self._graph else []
        w.blob(graph_seed_bytes).blob(self._bundle).count(len(advertisers))
        for site in advertisers:
            peer = self._peers[site]
            w.text(site).fixed(peer.share_public, AGREEMENT_PUBLIC_BYTES)
            w.fixed(peer.mask_public, AGREEMENT_PUBLIC_BYTES)
        w.count(len(self._held))
        for owner in sorted(self._held, key=site_sort_key):
            seed_share, key_share = self._held[owner]
            w.text(owner).blob(seed_share.to_bytes()).blob(key_share.to_bytes())
        w.count(len(self._survivors))
        for site in self._survivors:
            w.text(site)
        w.count(len(self._seen))
        for digest in sorted(self._seen):
            w.fixed(digest, DIGEST_BYTES)
        w.u64(self.clipped).count(len(self.revealed))
        for owner, kind in self.revealed:
            w.text(owner).u8(int(kind))
        sealed: bytes = aead_seal(
            key, w.to_bytes(), _STATE_MAGIC + self.site.encode(), nonce=self._randbytes(12)
        )
        return sealed

    @classmethod
    def restore(
        cls,
        blob: bytes,
        key: bytes,
        site: str,
        identity_key: ec.EllipticCurvePrivateKey,
        coordinator_key: ec.EllipticCurvePublicKey,
        **kwargs: Any,
    ) -> ClientSession:
        """Rebuild a session from :meth:`export_state` (same arguments as the constructor).

        Raises:
            DecodeError: If the blob does not open under ``key`` for ``site`` or is malformed.
        """
        session = cls(site, identity_key, coordinator_key, **kwargs)
        try:
            plain = open_sealed(key, blob, _STATE_MAGIC + session.site.encode())
        except DecryptionError as exc:
            raise DecodeError("client state does not open (wrong key, site or tampered)") from exc
        try:
            session._load(plain)
        except (CryptoError, ProtocolError) as exc:
            raise DecodeError("client state is malformed") from exc
        return session

    def _load(self, plain: bytes) -> None:
        limits = self.limits
        r = Reader(plain, what="client state")
        if (
            r.fixed(len(_STATE_MAGIC)) != _STATE_MAGIC
            or r.text(limits.max_site_id_bytes) != self.site
        ):
            raise DecodeError("client state for another site")
        code = r.u8()
        stage = next((st for st, c in _STAGE_CODES.items() if c == code), None)
        if stage is None:
            raise DecodeError("client state has an unknown stage")
        setup_envelope = r.blob(limits.max_message_bytes)
        share_priv, mask_priv = r.blob(32), r.blob(32)
        seed, advert_digest = r.blob(SEED_BYTES), r.blob(DIGEST_BYTES)
        seed_of_graph, bundle = r.blob(DIGEST_BYTES), r.blob(DIGEST_BYTES)
        advertisers: dict[SiteId, tuple[bytes, bytes]] = {}
        for _ in range(r.count(limits.max_cohort)):
            who = SiteId(r.text(limits.max_site_id_bytes))
            advertisers[who] = (r.fixed(AGREEMENT_PUBLIC_BYTES), r.fixed(AGREEMENT_PUBLIC_BYTES))
        held: dict[SiteId, tuple[Share, Share]] = {}
        for _ in range(r.count(limits.max_cohort)):
            owner = SiteId(r.text(limits.max_site_id_bytes))
            held[owner] = (
                Share.from_bytes(r.blob(limits.max_share_bytes)),
                Share.from_bytes(r.blob(limits.max_share_bytes)),
            )
        survivors = tuple(
            SiteId(r.text(limits.max_site_id_bytes)) for _ in range(r.count(limits.max_cohort))
        )
        seen = {r.fixed(DIGEST_BYTES) for _ in range(r.count(1 << 16))}
        clipped = r.u64()
        revealed = tuple(
            (SiteId(r.text(limits.max_site_id_bytes)), ShareKind(r.u8()))
            for _ in range(r.count(limits.max_cohort))
        )
        r.finish()
        if setup_envelope:
            opened = open_envelope(
                setup_envelope,
                limits,
                expected=(MessageKind.ROUND_SETUP,),
                resolve_signer=self._coordinator_signer,
                shared=self._shared,
            )
            if not isinstance(opened.message, RoundSetup):
                raise DecodeError("client state holds no round setup")
            self._adopt_setup(opened.message)
            self._setup_envelope = setup_envelope
        self._share_key = AgreementKey.from_private_bytes(share_priv) if share_priv else None
        self._mask_key = AgreementKey.from_private_bytes(mask_priv) if mask_priv else None
        self._seed, self._advert_digest = seed, advert_digest
        if advertisers:
            setup = self._require_setup()
            for who, (share_public, mask_public) in advertisers.items():
                if who not in self._peers:
                    raise DecodeError("client state names a site outside the cohort")
                self._peers[who].share_public = share_public
                self._peers[who].mask_public = mask_public
            self._graph = build_graph(
                advertisers,
                seed_of_graph,
                setup.params.degree,
                setup.params.threshold,
                self._shared,
            )
        self._held, self._survivors, self._seen = held, survivors, seen
        self._bundle = bundle
        self.clipped, self.revealed, self.stage = clipped, revealed, stage

    # -- helpers --------------------------------------------------------------------------

    def _coordinator_signer(self, envelope: Envelope) -> ec.EllipticCurvePublicKey:
        if envelope.signer != self._coordinator_id:
            raise UnknownSignerError("message not signed by the pinned coordinator key")
        return self._coordinator_key

    def _header(self) -> Header:
        setup = self._require_setup()
        return Header(
            run_id=setup.header.run_id,
            round=setup.header.round,
            sender=self.site,
            recipient=COORDINATOR,
            model_digest=setup.header.model_digest,
            setup_digest=self._setup_digest,
        )

    def _require_graph(self) -> NeighbourGraph:
        if self._graph is None:
            raise RuntimeError("no neighbour graph yet")
        return self._graph

    def _quorum(self) -> int:
        """Survivor-set signatures needed: see :func:`fedseal.protocol.config.consistency_quorum`."""
        return max(self._require_floor().quorum, self._require_setup().params.threshold)

    def _require_floor(self) -> SecurityFloor:
        if self._floor is None:
            raise RuntimeError("no security floor yet")
        return self._floor

    def _require_setup(self) -> RoundSetup:
        if self._setup is None:
            raise RuntimeError("no setup yet")
        return self._setup

    def _check_header(self, header: Header, *, sender: SiteId, recipient: SiteId) -> None:
        setup = self._require_setup()
        if header.run_id != setup.header.run_id:
            raise StaleMessageError("message from another run")
        if header.round != setup.header.round:
            raise StaleMessageError(f"message for round {header.round}")
        if header.sender != sender or header.recipient != recipient:
            raise CoordinatorMisbehaviourError("message has the wrong sender or recipient")
        if header.model_digest != setup.header.model_digest:
            raise CoordinatorMisbehaviourError("message binds another global model digest")
        if header.setup_digest != self._setup_digest:
            raise CoordinatorMisbehaviourError("message binds another round setup")

    def _seal(
        self,
        message: KeyAdvert | EncryptedShares | MaskedInput | ConsistencySignature | UnmaskResponse,
    ) -> bytes:
        return seal(message, self._identity)

    def _dispatch(self, opened: OpenedMessage) -> Packet | None:
        msg = opened.message
        if isinstance(msg, RoundSetup):
            return self._on_setup(msg)
        self._check_header(msg.header, sender=COORDINATOR, recipient=self.site)
        if isinstance(msg, AdvertBundle):
            return self._on_adverts(msg)
        if isinstance(msg, ShareDelivery):
            return self._on_shares(msg)
        if isinstance(msg, SurvivorSet):
            return self._on_survivors(msg)
        if isinstance(msg, UnmaskRequest):
            return self._on_unmask(msg)
        if isinstance(msg, RoundResultNotice):
            self.result = msg
            return None
        raise StaleMessageError(f"unexpected message {type(msg).__name__}")

    # -- stage 0: setup -> key advert ------------------------------------------------------

    def _adopt_setup(self, setup: RoundSetup) -> None:
        """Check a (signature-verified) setup and take its cohort and parameters."""
        h = setup.header
        if h.sender != COORDINATOR or h.recipient != self.site:
            raise CoordinatorMisbehaviourError("setup has the wrong sender or recipient")
        if h.setup_digest != bytes(DIGEST_BYTES):
            raise DecodeError("setup must carry an all-zero setup digest")
        try:
            validate_parameters(setup.params, len(setup.cohort), self.limits)
        except ConfigError as exc:
            raise CoordinatorMisbehaviourError(f"unsafe round parameters: {exc.message}") from exc
        peers: dict[SiteId, _Peer] = {}
        by_key: dict[bytes, SiteId] = {}
        own_der = b""
        for member in setup.cohort:
            try:
                public_key = public_key_from_der(member.public_key_der)
            except KeyFormatError as exc:
                raise CoordinatorMisbehaviourError(
                    "cohort lists an invalid identity key", site=member.site
                ) from exc
            # public_key_from_der accepts only the canonical DER, so the key id (SHA-256 of the
            # canonical DER) is the hash of the listed bytes: no re-encoding per cohort member.
            der = bytes(member.public_key_der)
            kid = hashlib.sha256(der).digest()
            if member.site == self.site:
                own_der = der
            if kid in by_key:
                raise CoordinatorMisbehaviourError(
                    "cohort lists one key for two sites", site=member.site
                )
            if member.site != self.site and self._trusted.get(member.site) != kid:
                raise UntrustedPeerError(
                    "cohort lists a key this site cannot tie to its trust anchor "
                    "(consortium roster or [peers]): "
                    + ("another key than the one it trusts for this site"
                       if member.site in self._trusted else "a site it does not know"),
                    site=member.site,
                )
            peers[member.site] = _Peer(site=member.site, public_key=public_key)
            by_key[kid] = member.site
        own = peers.get(self.site)
        if own is None:
            raise CoordinatorMisbehaviourError("this site is not in the round's cohort")
        if len(peers) < self.policy.min_cohort:
            raise CohortTooSmallError(
                f"round setup cohort of {len(peers)} sites is below this site's minimum "
                f"of {self.policy.min_cohort}"
            )
        if len(peers) - 1 < self.policy.min_known_peers:
            raise UntrustedPeerError(
                f"round setup cohort holds {len(peers) - 1} other known sites, this site "
                f"requires {self.policy.min_known_peers} (min_known_peers)"
            )
        gamma, bits = self.policy.max_colluding_fraction, self.policy.security_bits
        try:
            check_parameters(
                len(peers),
                setup.params.degree,
                setup.params.threshold,
                setup.params.min_survivors,
                gamma,
                bits,
            )
        except ConfigError as exc:
            raise WeakRoundError(
                f"round parameters below this site's floor: {exc.message}"
            ) from exc
        self._check_dp(setup, len(peers))
        self._floor = site_floor(len(peers), setup.params.degree, gamma, bits)
        if own_der != self._identity_der:
            raise CoordinatorMisbehaviourError("cohort lists a different key for this site")
        self._setup = setup
        self._setup_digest = setup.digest
        self._peers = peers
        self._by_key_id = by_key

    def _check_dp(self, setup: RoundSetup, cohort_size: int) -> None:
        """The site's DP checks (module docstring), before it answers the setup."""
        params, policy = setup.params, self.policy
        check_dp_round(
            params,
            cohort_size,
            policy.max_colluding_fraction,
            min_noise_multiplier=policy.min_noise_multiplier,
            dp_required=policy.dp_required,
        )
        if params.dp is not None and params.rotation_seed != rotation_seed_for(
            setup.header.run_id, setup.header.round
        ):
            raise CoordinatorMisbehaviourError(
                "the DP rotation seed is not the one derived from the run and round"
            )

    def _dp_input(
        self, update_vector: npt.NDArray[Any], params: RoundParameters, masks: list[Mask]
    ) -> tuple[npt.NDArray[Any], bytes]:
        """This site's DP input: :func:`~fedseal.protocol.dp.encode_integers` of the update
        (clip, rotate, round, add its noise share), wrapped, masked and hashed chunk by chunk."""
        dp = params.dp
        if dp is None:
            raise RuntimeError("not a DP round")
        source = (
            self._noise_source()
            if self._noise_source is not None
            else PrgNoise(self._randbytes(SEED_SIZE))
        )
        encoded = encode_integers(update_vector, dp, params.rotation_seed, source)
        self.clipped = int(encoded.clipped)
        vector = wrap(encoded.values, dp.modulus_bits)
        streams = MaskSum(vector.dtype, masks)
        digest = hashlib.sha256()
        for start in range(0, vector.shape[0], CHUNK):
            part = vector[start : start + CHUNK]
            streams.apply_into(part)
            digest.update(part.data)
        return vector, digest.digest()

    def _on_setup(self, setup: RoundSetup) -> Packet:
        h = setup.header
        if h.round < 1:
            raise CoordinatorMisbehaviourError(f"setup for round {h.round}: rounds start at 1")
        if self._expected_run is not None and h.run_id != self._expected_run:
            raise StaleMessageError("setup for another run")
        if self._min_round is not None and h.round < self._min_round:
            raise StaleMessageError(f"setup for old round {h.round}")
        if self._expected_round is not None and h.round != self._expected_round:
            raise StaleMessageError(
                f"setup for round {h.round}, this session answers round {self._expected_round}"
            )
        if self._committed is not None and self._committed != (h.run_id, h.round, h.model_digest):
            raise CoordinatorMisbehaviourError(
                "a setup after a commit exchange must be for its run, round and model"
            )
        current = self._setup
        if current is not None:  # a new setup attempt while waiting for the advert bundle
            c = current.header
            if h.run_id != c.run_id or h.round != c.round:
                raise StaleMessageError("a new setup attempt must be for the same run and round")
            if setup.attempt <= current.attempt:
                raise StaleMessageError(
                    f"setup attempt {setup.attempt} is not newer than attempt {current.attempt}"
                )
            if h.model_digest != c.model_digest:
                raise CoordinatorMisbehaviourError("a new setup attempt names another model")
        if self._now() > setup.expires_at:
            raise StaleMessageError("round setup has expired")
        commit_only = any(not m.nonce_commitment for m in setup.cohort)
        if commit_only and current is not None:
            raise CoordinatorMisbehaviourError("a commit exchange after the setup of the round")
        if commit_only:
            # A commit exchange (some member has no committed graph nonce yet): the site
            # checks the cohort as for any setup, commits to a nonce and waits for the setup
            # proper; it reveals nothing, and the exchange counts as no attempt.
            self._adopt_setup(setup)
            return self._commit_only_advert()
        self._guard.check(h.run_id, h.round, setup.attempt)
        self._adopt_setup(setup)
        own = next(m for m in setup.cohort if m.site == self.site)
        nonce = self._guard.nonce_for(h.run_id, h.round, own.nonce_commitment, setup.attempt)
        self._guard.admit(h.run_id, h.round, setup.attempt)
        # Secrets of an earlier attempt are dropped: nothing of them was shared.
        self._graph = None
        self._held = {}
        self._survivors = ()
        self._share_key = AgreementKey.generate(self._randbytes)
        self._mask_key = AgreementKey.generate(self._randbytes)
        self._seed = self._randbytes(SEED_BYTES)
        if len(self._seed) != SEED_BYTES:
            raise ValueError("randbytes returned the wrong number of bytes")
        advert = KeyAdvert(
            header=self._header(),
            share_public=self._share_key.public_bytes(),
            mask_public=self._mask_key.public_bytes(),
            seed_commitment=seed_commitment(h.run_id, h.round, self.site, self._seed),
            graph_nonce=nonce_reveal(h.run_id, self.site, nonce, setup.attempt),
            next_commitment=self._guard.new_commitment(h.run_id, self.site, self._randbytes),
        )
        data = self._seal(advert)
        self._advert_digest = Envelope.from_bytes(data, self.limits).content_digest
        return Packet(data)

    def _commit_only_advert(self) -> Packet:
        """The answer to a commit exchange: a signed advert whose only content is the
        commitment to a fresh graph nonce (its keys are never used); the session goes back to
        waiting for the setup proper."""
        setup = self._require_setup()
        h = setup.header
        advert = KeyAdvert(
            header=self._header(),
            share_public=AgreementKey.generate(self._randbytes).public_bytes(),
            mask_public=AgreementKey.generate(self._randbytes).public_bytes(),
            seed_commitment=bytes(DIGEST_BYTES),
            next_commitment=self._guard.new_commitment(h.run_id, self.site, self._randbytes),
        )
        data = self._seal(advert)
        self._committed = (h.run_id, h.round, h.model_digest)
        self._setup, self._setup_digest, self._peers, self._by_key_id = None, b"", {}, {}
        self._floor = None
        return Packet(data)

    # -- stage 1: adverts -> encrypted shares ----------------------------------------------

    def _verify_advert(self, data: bytes) -> tuple[SiteId, KeyAdvert, bytes]:
        # Simulations: another virtual site of this process may have opened these very bytes
        # (the advert names its own signer key id; the cohort lookup below is this site's).
        key = (bytes(data), self.limits) if len(data) <= MAX_KEY_BYTES else None
        envelope, advert, digest = self._shared.remembered(
            "adverts", key, lambda: self._open_advert(data)
        )
        owner = self._by_key_id.get(envelope.signer)
        if owner is None:
            raise CoordinatorMisbehaviourError("key advert signed by a key outside the cohort")
        try:
            self._check_header(advert.header, sender=owner, recipient=COORDINATOR)
        except StaleMessageError as exc:
            raise CoordinatorMisbehaviourError(
                "key advert from another run or round", site=owner
            ) from exc
        return owner, advert, digest

    def _open_advert(self, data: bytes) -> tuple[Envelope, KeyAdvert, bytes]:
        """Decode the frame, verify the signature under the cohort key the signer id names,
        decode the payload: what does not depend on which site of the cohort opens it."""
        envelope = Envelope.from_bytes(data, self.limits)
        if envelope.kind is not MessageKind.KEY_ADVERT:
            raise CoordinatorMisbehaviourError(
                "advert bundle holds a message that is not a key advert"
            )
        owner = self._by_key_id.get(envelope.signer)
        if owner is None:
            raise CoordinatorMisbehaviourError("key advert signed by a key outside the cohort")
        try:
            self._shared.verify(
                self._peers[owner].public_key,
                envelope.kind.type_name,
                envelope.payload,
                envelope.signature,
            )
        except SignatureError as exc:
            raise CoordinatorMisbehaviourError(
                "key advert signature does not verify (substituted keys?)", site=owner
            ) from exc
        advert = decode_payload(envelope.kind, envelope.payload, self.limits, self._shared)
        if not isinstance(advert, KeyAdvert):
            raise DecodeError("key advert did not decode as one")
        return envelope, advert, envelope.content_digest

    def _on_adverts(self, bundle: AdvertBundle) -> Packet:
        setup = self._require_setup()
        digests: dict[SiteId, bytes] = {}
        adverts: dict[SiteId, KeyAdvert] = {}
        for data in bundle.adverts:
            owner, advert, digest = self._verify_advert(data)
            if owner in adverts:
                raise CoordinatorMisbehaviourError("two key adverts for one site", site=owner)
            adverts[owner] = advert
            digests[owner] = digest
        # Strict bundle: every cohort member's advert, so the graph seed is fixed by the
        # committed nonces of the signed cohort; a coordinator that has seen the adverts
        # cannot re-draw the graph by leaving some out (it must start a new, logged attempt).
        missing = [m.site for m in setup.cohort if m.site not in adverts]
        if missing:
            raise IncompleteBundleError(
                f"advert bundle lacks the adverts of {len(missing)} of the "
                f"{len(setup.cohort)} cohort members",
                site=missing[0],
            )
        if digests.get(self.site) != self._advert_digest:
            raise CoordinatorMisbehaviourError("this site's own key advert was replaced")
        h = setup.header
        listed = {m.site: m.nonce_commitment for m in setup.cohort}
        for owner, advert in adverts.items():
            # Every value was fixed (committed) before any of this attempt was revealed.
            if not opens(h.run_id, owner, listed[owner], advert.graph_nonce, setup.attempt):
                raise CoordinatorMisbehaviourError(
                    "key advert reveals a graph nonce that does not open its listed commitment",
                    site=owner,
                )
            self._peers[owner].share_public = advert.share_public
            self._peers[owner].mask_public = advert.mask_public
        graph = build_graph(
            adverts,
            graph_seed({o: a.graph_nonce for o, a in adverts.items()}),
            setup.params.degree,
            setup.params.threshold,
            self._shared,
        )
        self._graph = graph
        self._bundle = bundle_digest(digests)
        self._guard.mark_shared(setup.header.run_id, setup.header.round, setup.attempt)
        neighbours = graph.of(self.site)
        share_key, mask_key = self._share_key, self._mask_key
        if share_key is None or mask_key is None:
            raise RuntimeError("keys missing after setup")
        seed_shares, key_shares = split_many(
            [self._seed, mask_key.private_bytes()],
            setup.params.threshold,
            len(neighbours),
            randbytes=self._randbytes,
        )
        items: list[tuple[SiteId, bytes]] = []
        for i, peer in enumerate(neighbours):
            plaintext = encode_share_pair(seed_shares[i].to_bytes(), key_shares[i].to_bytes())
            try:
                ct = encrypt_share_pair(
                    plaintext,
                    own_share_key=share_key,
                    peer_share_public=self._peers[peer].share_public,
                    run_id=h.run_id,
                    round=h.round,
                    setup_digest=self._setup_digest,
                    sender=self.site,
                    recipient=peer,
                    randbytes=self._randbytes,
                )
            except AgreementError as exc:
                raise VerificationError(
                    "neighbour advertised an invalid share key", site=peer
                ) from exc
            items.append((peer, ct))
        items.sort(key=lambda item: site_sort_key(item[0]))
        return Packet(self._seal(EncryptedShares(header=self._header(), items=tuple(items))))

    # -- stage 2: shares -> masked input ---------------------------------------------------

    def _on_shares(self, delivery: ShareDelivery) -> Packet:
        setup = self._require_setup()
        graph = self._graph
        share_key, mask_key = self._share_key, self._mask_key
        if graph is None or share_key is None or mask_key is None:
            raise RuntimeError("graph or keys missing")
        h = setup.header
        held: dict[SiteId, tuple[Share, Share]] = {}
        for sender, ct in delivery.items:
            if not graph.adjacent(self.site, sender):
                raise CoordinatorMisbehaviourError(
                    "shares delivered from a non-neighbour", site=sender
                )
            try:
                plaintext = decrypt_share_pair(
                    ct,
                    own_share_key=share_key,
                    peer_share_public=self._peers[sender].share_public,
                    run_id=h.run_id,
                    round=h.round,
                    setup_digest=self._setup_digest,
                    sender=sender,
                    recipient=self.site,
                )
                seed_raw, key_raw = decode_share_pair(plaintext, self.limits)
                seed_share, key_share = Share.from_bytes(seed_raw), Share.from_bytes(key_raw)
            except (DecryptionError, AgreementError) as exc:
                raise VerificationError("encrypted shares do not open", site=sender) from exc
            except CryptoError as exc:
                raise VerificationError("decrypted shares are malformed", site=sender) from exc
            expected_index = graph.share_index(sender, self.site)
            if seed_share.index != expected_index or key_share.index != expected_index:
                raise VerificationError("shares carry the wrong Shamir index", site=sender)
            held[sender] = (seed_share, key_share)
        t = setup.params.threshold
        if len(held) < t:
            raise ThresholdError(f"shares from {len(held)} neighbours, below the threshold {t}")
        self._held = held
        info = RoundInfo(
            run_id=h.run_id,
            round=h.round,
            model_digest=h.model_digest,
            vector_length=setup.params.vector_length,
            quantization=setup.params.quantization,
            max_weight=setup.params.max_weight,
            dp=setup.params.dp,
        )
        update = self._update_fn(info)
        if not 1 <= update.example_count <= setup.params.max_weight:
            raise ValueError(
                f"example_count {update.example_count} outside 1..max_weight {setup.params.max_weight}"
            )
        if len(update.dataset_root) != DIGEST_BYTES:
            raise ValueError("dataset_root must be 32 bytes")
        update_vector = np.asarray(update.vector)
        if update_vector.ndim != 1 or update_vector.shape[0] != setup.params.vector_length:
            raise ValueError(
                f"update has shape {update_vector.shape}, the round needs "
                f"({setup.params.vector_length},)"
            )
        masks = [Mask(self._seed, SELF_DOMAIN)]
        for peer in sorted(held, key=site_sort_key):
            try:
                seed = pairwise_seed(
                    mask_key, self._peers[peer].mask_public, h.run_id, h.round, self.site, peer
                )
            except AgreementError as exc:
                raise VerificationError(
                    "neighbour advertised an invalid mask key", site=peer
                ) from exc
            masks.append(Mask(seed, PAIR_DOMAIN, negate=pair_sign_negative(self.site, peer)))
        if setup.params.dp is not None:
            # Unweighted, and neither the count nor the clip indicator is released.
            vector, bulk_digest = self._dp_input(update_vector, setup.params, masks)
            example_count, clipped = 1, 0
        else:
            encoded = encode_masked(
                update_vector, update.example_count, setup.params.quantization, self._rng, masks
            )
            vector, bulk_digest = encoded.vector, encoded.digest
            self.clipped = clipped = encoded.clipped
            example_count = update.example_count
        masked = MaskedInput(
            header=self._header(),
            dataset_root=bytes(update.dataset_root),
            example_count=example_count,
            vector_length=int(vector.shape[0]),
            modulus_bits=setup.params.quantization.modulus_bits,
            clipped=clipped,
            bulk_digest=bulk_digest,
        )
        return Packet(self._seal(masked), vector)

    # -- stage 3: survivor set -> consistency signature -------------------------------------

    def _on_survivors(self, announced: SurvivorSet) -> Packet:
        setup = self._require_setup()
        survivors = announced.survivors
        if self.site not in survivors:
            raise CoordinatorMisbehaviourError("survivor set sent to a site outside it")
        unknown = [s for s in survivors if s not in self._peers]
        if unknown:
            raise CoordinatorMisbehaviourError(
                "survivor set names a site outside the cohort", site=unknown[0]
            )
        if len(survivors) < setup.params.min_survivors:
            raise CoordinatorMisbehaviourError(
                f"survivor set of {len(survivors)} below min_survivors {setup.params.min_survivors}"
            )
        if len(survivors) - 1 < self.policy.min_known_peers:
            raise UntrustedPeerError(
                f"survivor set holds {len(survivors) - 1} other known sites, this site "
                f"requires {self.policy.min_known_peers} (min_known_peers)"
            )
        floor = self._require_floor()
        if len(survivors) < self._quorum():
            raise WeakRoundError(
                f"survivor set of {len(survivors)} below this site's consistency quorum "
                f"{self._quorum()} (cohort {len(setup.cohort)}, max_colluding_fraction "
                f"{self.policy.max_colluding_fraction:.3g})"
            )
        graph = self._require_graph()
        try:
            # Dropouts the coordinator claims must not cut a group of honest sites off the
            # rest of the ring (it would learn that group's sum).
            check_survivor_windows(
                graph.ring, survivors, graph.degree, floor.max_dropped_per_window
            )
        except ConfigError as exc:
            raise WeakRoundError(f"survivor set refused: {exc.message}") from exc
        for s in survivors:
            if s != self.site and s in self.neighbours and s not in self._held:
                raise CoordinatorMisbehaviourError(
                    "survivor set names a neighbour whose shares never arrived", site=s
                )
        self._survivors = survivors
        h = setup.header
        statement = survivor_statement(h.run_id, h.round, self._setup_digest, self._bundle, survivors)
        signature = sign(self._identity, SURVIVOR_STATEMENT_TYPE, statement)
        return Packet(self._seal(ConsistencySignature(header=self._header(), signature=signature)))

    # -- stage 4: unmask request -> revealed shares -----------------------------------------

    def _on_unmask(self, request: UnmaskRequest) -> Packet:
        setup = self._require_setup()
        h = setup.header
        if request.survivors != self._survivors:
            raise CoordinatorMisbehaviourError(
                "unmask request shows a different survivor set than was signed"
            )
        statement = survivor_statement(
            h.run_id, h.round, self._setup_digest, self._bundle, self._survivors
        )
        # t signatures do not force one view when the cohort holds two disjoint groups of t
        # (any sparse graph): a majority of the cohort does (each honest site signs once).
        needed = self._quorum()
        valid = 0
        for signer, signature in request.signatures:
            if signer not in self._survivors:
                continue
            try:
                self._shared.verify(
                    self._peers[signer].public_key, SURVIVOR_STATEMENT_TYPE, statement, signature
                )
            except SignatureError:
                continue
            valid += 1
            if valid >= needed:
                break
        if valid < needed:
            raise CoordinatorMisbehaviourError(
                f"only {valid} valid signatures on the survivor set, {needed} required"
            )
        alive, dropped = set(request.alive), set(request.dropped)
        both = alive & dropped
        if both:
            raise CoordinatorMisbehaviourError(
                "unmask request names a site both alive and dropped", site=min(both)
            )
        outside = sorted((alive | dropped) - set(self._held), key=site_sort_key)
        if outside:
            raise CoordinatorMisbehaviourError(
                "unmask request asks for shares of a non-neighbour (or one whose shares never arrived)",
                site=outside[0],
            )
        survivors = set(self._survivors)
        if not alive <= survivors:
            raise CoordinatorMisbehaviourError(
                "unmask request asks for the self-mask share of a non-survivor"
            )
        if dropped & survivors:
            raise CoordinatorMisbehaviourError(
                "unmask request asks for the mask-key share of a survivor (both shares of one site)",
                site=min(dropped & survivors),
            )
        shares: list[tuple[SiteId, ShareKind, bytes]] = []
        for owner in sorted(alive | dropped, key=site_sort_key):
            seed_share, key_share = self._held[owner]
            if owner in alive:
                shares.append((owner, ShareKind.SELF_MASK_SEED, seed_share.to_bytes()))
            else:
                shares.append((owner, ShareKind.MASK_KEY, key_share.to_bytes()))
        self.revealed = tuple((o, k) for o, k, _ in shares)
        # Forget the secrets: nothing more is ever revealed in this round.
        self._held = {}
        self._seed = b""
        return Packet(self._seal(UnmaskResponse(header=self._header(), shares=tuple(shares))))
