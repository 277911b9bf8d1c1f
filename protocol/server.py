"""Coordinator side of a secure round: a sans-IO state machine with a streaming sum.

Driving it (the adapter seam; see ``fedseal.protocol`` for a full example)::

    server = SecAggServer(config, roster, cohort, identity_key=k, run_id=r, round=1,
                          model_digest=d, now=time.time())
    outbound = server.start()                       # {site: Packet}
    while outbound:
        for site, packet in deliver(outbound):      # replies that arrived before the timeout
            server.receive(site, packet.payload, packet.bulk)
        outbound = server.advance()                 # silent sites become dropouts
    result = server.result                          # RoundResult

Stages and transitions (``advance()`` closes the current stage)::

    stage          accepts                  advance() sends          next
    COMMIT         KEY_ADVERT (commitment)  ROUND_SETUP (attempt 0)  ADVERTISE
    ADVERTISE      KEY_ADVERT               ADVERT_BUNDLE            SHARE
                   (a member was silent)    ROUND_SETUP (attempt+1)  ADVERTISE
    SHARE          ENCRYPTED_SHARES         SHARE_DELIVERY           MASKED_INPUT
    MASKED_INPUT   MASKED_INPUT + bulk      SURVIVOR_SET             CONSISTENCY
    CONSISTENCY    CONSISTENCY_SIGNATURE    UNMASK_REQUEST           UNMASK
    UNMASK         UNMASK_RESPONSE          (nothing: unmasks)       DONE
    any            --                       ThresholdError etc.      FAILED

Graph nonces (:mod:`fedseal.protocol.graph`): the setup lists, per member, the commitment to
its graph nonce the coordinator holds (``commitments``: from the member's key advert of its
previous round of the run, ``next_commitments`` of that round's state machine). When a member
has none (its first round of the run, or after the coordinator restarted), the round starts with
a COMMIT stage: a setup listing the commitments known (empty for the others), answered by
adverts that carry only a fresh commitment; then the setup proper (attempt 0) lists them all.
That one extra exchange is paid only then: in steady state every advert commits to the nonce of
the site's next round. An advert whose revealed value does not open its listed commitment is
rejected (the site is a dropout of the stage, so a new attempt follows).

Setup attempts: sites accept only an advert bundle holding the adverts of *every* member
of the signed setup cohort (so a coordinator cannot re-draw the neighbour graph by leaving
adverts out). When some cohort members do not advertise (or are rejected), ``advance()``
at the ADVERTISE close starts a new setup attempt for the same round: a fresh signed
:class:`~fedseal.protocol.messages.RoundSetup` with ``attempt + 1`` (bound into its setup
digest) and the parameters re-resolved for the sites that did advertise, which draw fresh
keys. It needs at least ``min_survivors`` and the consistency quorum of the first attempt's
cohort among them and at most ``config.max_setup_attempts`` attempts; otherwise the round
fails with :class:`~fedseal.protocol.errors.ThresholdError`. Each restart is a
:class:`SetupRestart` in ``log``, ``restarts`` and the result. The adapter recognises a new
attempt by ``stage is ServerStage.ADVERTISE`` after ``advance()`` (as after ``start()``): the
packets are round setups. A reply that binds an earlier attempt's setup is rejected with
:class:`~fedseal.protocol.errors.StaleMessageError` without making the site a dropout.

Rules:
    * :meth:`receive` never raises for bad peer input: it returns a :class:`Rejection`
      carrying the typed error, and a rejected site is a dropout of that stage (except a
      duplicate, which is rejected while the first submission stands).
    * Verification of every reply, in order: frame and size; expected kind for the stage;
      signer key is the roster key of the replying site, site active and in the cohort;
      signature over the received bytes; duplicate content digest; header binds this run,
      round, model digest and setup digest, sender = replying site, recipient = coordinator;
      then the stage-specific content checks.
    * A masked input enters the running sum only as a :class:`VerifiedSubmission` (dataset
      root approved for that site in the roster, example count in ``1..max_weight``, bulk
      dtype, length and SHA-256 as signed). The vector is added and not kept.
    * After every stage the coordinator checks that every site whose masks must be removed
      still has ``t`` live neighbours, and that the consistency quorum (more than half the
      cohort, at least ``t``: what sites demand before revealing) is still within reach;
      otherwise the round fails with
      :class:`~fedseal.protocol.errors.ThresholdError` and the model is unchanged.
    * Reconstructed secrets are checked against the owner's signed commitments (seed
      commitment; mask public key). Wrong shares are identified and excluded by trying share
      subsets, fewest exclusions first; if no subset matches, the round fails with
      :class:`~fedseal.protocol.errors.ReconstructionError`. It never returns a wrong
      aggregate silently.
    * The unmasked aggregate is range-checked before it becomes a result (below); a violation
      fails the round with :class:`~fedseal.protocol.errors.AggregateOutOfRangeError`.

Aggregate range check (after unmasking, before any :class:`RoundResult` exists): every
element of the aggregate, read as a signed two's-complement integer of ``Z_2^b``, must lie in
``[-B, B]`` with ``B = levels * W`` and ``W`` the sum of the survivors' *signed* example
counts. An honest site's element is ``w_i * q`` with ``q`` in ``[-levels, levels]``
(:mod:`fedseal.protocol.quantize`), so honest sums never leave ``[-B, B]``, and ``B`` is
reached exactly when every survivor sends ``+clip`` (or ``-clip``) with its full weight.

Distributed DP (``config.dp``, docs/dp.md): the setup carries the DP parameters and the
rotation seed (:func:`fedseal.protocol.dp.rotation_seed_for` of run and round); the sum runs
over ``dp.dimension`` elements; every survivor weighs 1 whatever count it reports (the DP sum
is unweighted: a weight would multiply the sensitivity); the unmasked sum is decoded with
:func:`fedseal.protocol.dp.decode` (centre, rescale by gamma, un-rotate, unpad), so
``weighted_sum`` is the noisy sum of the clipped updates, ``total_weight`` the survivor count
and ``weighted_mean`` the unweighted noisy mean; ``RoundResult.dp`` names the parameters.
Its range check (:func:`check_dp_aggregate`) allows what honest encodings reach except with
probability <= 2^-40 each: every element within :func:`fedseal.protocol.dp.coordinate_reach` and
the sum's L2 norm within :func:`fedseal.protocol.dp.sum_norm_bound` (n Delta plus a tail bound of
the noise's norm). It catches an input that wraps the field or was not clipped and rounded as
the setup says, and bounds what any input can add to the sum; it cannot tell which input. The
coordinator has seen the (noisy) sum when it fails: the round is abandoned, its privacy spent.
Otherwise the round fails (``FAILED``, no result: nothing is applied) with the count of
offending elements and the worst one. The check is vectorised: a min and a max reduction per
chunk of :data:`~fedseal.protocol.quantize.CHUNK` elements over a signed view of the sum (no
copy of the vector); the offending elements are counted, chunk by chunk, only if there are any.

What it catches: an input that wraps the field, e.g. a site adding ``2**(b-1)`` (or any
offset that takes an element of the sum beyond ``B``) to its masked vector and re-signing it,
which before this check committed a mean of thousands of clip units. What it does *not*
catch: a malicious input whose effect on the sum stays within ``[-B, B]`` -- a site sending
``+-clip`` everywhere, an example count inflated up to ``max_weight`` (which widens ``B``), or
an offset that other sites' values bring back inside the bound -- and it cannot say which
site was out of range (only the masked sum is seen). Bounding each input on its own needs
per-input range proofs (zero-knowledge proofs that each masked vector encodes values in
``[-levels * w_i, levels * w_i]``): future work.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.crypto.agreement import AgreementKey
from fedseal.crypto.errors import AgreementError, KeyFormatError, ShareError, SignatureError
from fedseal.crypto.prg import Mask, add_masks_into
from fedseal.crypto.shamir import Share, combine
from fedseal.crypto.signing import verify

from .config import RoundConfig, RoundParameters, consistency_quorum
from .dp import DpParams, rotation_seed_for
from .dp import coordinate_reach as dp_coordinate_reach
from .dp import decode as dp_decode
from .dp import sum_norm_bound as dp_sum_norm_bound
from .envelope import Envelope, OpenedMessage, open_envelope, seal
from .errors import (
    AggregateOutOfRangeError,
    BadSignatureError,
    BulkMismatchError,
    ConfigError,
    DecodeError,
    DuplicateMessageError,
    ProtocolError,
    ReconstructionError,
    StaleMessageError,
    ThresholdError,
    UnapprovedDatasetError,
    UnknownSignerError,
    VerificationError,
)
from .graph import NeighbourGraph, build_graph, bundle_digest, graph_seed, opens
from .masking import (
    PAIR_DOMAIN,
    SEED_BYTES,
    SELF_DOMAIN,
    pair_sign_negative,
    pairwise_seed,
    seed_commitment,
)
from .messages import (
    AdvertBundle,
    CohortMember,
    ConsistencySignature,
    EncryptedShares,
    Header,
    KeyAdvert,
    MaskedInput,
    Message,
    RoundResultNotice,
    RoundSetup,
    ShareDelivery,
    ShareKind,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
    survivor_statement,
)
from .quantize import CHUNK, dequantize, vector_dtype
from .roster import Roster
from .types import (
    COORDINATOR,
    DIGEST_BYTES,
    RUN_ID_BYTES,
    SURVIVOR_STATEMENT_TYPE,
    MessageKind,
    Packet,
    SiteId,
    site_sort_key,
)

__all__ = [
    "Accepted",
    "Dropout",
    "LogEntry",
    "Receipt",
    "Rejection",
    "RoundResult",
    "SecAggServer",
    "ServerStage",
    "SetupRestart",
    "StreamingSum",
    "VerifiedSubmission",
    "check_aggregate_range",
    "check_dp_aggregate",
]

MAX_RECONSTRUCTION_ATTEMPTS = 2048
"""Share subsets tried per secret before giving up on garbage shares."""

UIntVector = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]


class ServerStage(enum.Enum):
    """Where the coordinator is in the round."""

    SETUP = "setup"
    COMMIT = "commit"
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


_ALL_KINDS = frozenset(MessageKind)

TRANSITIONS: Mapping[ServerStage, tuple[MessageKind, ServerStage]] = {
    ServerStage.COMMIT: (MessageKind.KEY_ADVERT, ServerStage.ADVERTISE),
    ServerStage.ADVERTISE: (MessageKind.KEY_ADVERT, ServerStage.SHARE),
    ServerStage.SHARE: (MessageKind.ENCRYPTED_SHARES, ServerStage.MASKED_INPUT),
    ServerStage.MASKED_INPUT: (MessageKind.MASKED_INPUT, ServerStage.CONSISTENCY),
    ServerStage.CONSISTENCY: (MessageKind.CONSISTENCY_SIGNATURE, ServerStage.UNMASK),
    ServerStage.UNMASK: (MessageKind.UNMASK_RESPONSE, ServerStage.DONE),
}


@dataclass(frozen=True, slots=True)
class InputFacts:
    """What an accepted masked input signed and the coordinator checked (for the audit log).

    Attributes:
        dataset_root: The dataset root the site trained on (approved for it in the roster).
        example_count: Its signed example count (the weight of its input).
        bulk_digest: SHA-256 of the masked vector that travelled beside it (checked).
        model_digest: The global model digest its header binds (this round's).
    """

    dataset_root: bytes
    example_count: int
    bulk_digest: bytes
    model_digest: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """A reply that passed verification.

    Attributes:
        site: The sender.
        stage: The stage it answered.
        kind: Its message kind.
        content_digest: Its signed-content digest (for the audit log).
        signature: Its DER signature (for the audit log).
        signer: The signer's key id.
        payload: The signed payload bytes (small: bulk vectors travel beside it), so an
            auditor can re-verify the signature offline.
        masked_input: For a masked input, what it signed and was checked (else ``None``).
    """

    site: SiteId
    stage: ServerStage
    kind: MessageKind
    content_digest: bytes
    signature: bytes
    signer: bytes = b""
    payload: bytes = field(default=b"", repr=False)
    masked_input: InputFacts | None = None

    @property
    def envelope(self) -> Envelope:
        """The envelope as received."""
        return Envelope(
            kind=self.kind, payload=self.payload, signature=self.signature, signer=self.signer
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    """A reply (or a revealed share) that failed verification; the site counts as dropped.

    What was received travels with it (for the audit log): ``envelope`` when the frame decoded
    (its signature may not verify), else ``frame``, the bytes as received. For a revealed share
    that does not match its commitment, ``envelope`` is the holder's unmask response.

    Attributes:
        site: The site concerned.
        stage: The stage it was received in.
        error: The typed error (its class name and message are the reason).
        content_digest: Signed-content digest of the message, when the frame decoded.
        envelope: The received envelope, when the frame decoded (unverified).
        frame: The received bytes, when they are not an envelope (else ``None``).
    """

    site: SiteId
    stage: ServerStage
    error: ProtocolError
    content_digest: bytes | None = None
    envelope: Envelope | None = field(default=None, repr=False)
    frame: bytes | None = field(default=None, repr=False)

    @property
    def reason(self) -> str:
        """``"ErrorClass: message"``."""
        return f"{type(self.error).__name__}: {self.error.message}"


Receipt = Accepted | Rejection


@dataclass(frozen=True, slots=True)
class SetupRestart:
    """A new setup attempt: some cohort members did not advertise keys.

    Attributes:
        attempt: The new attempt number (1 for the first restart).
        cohort: The new attempt's cohort (the sites that advertised).
        dropped: Cohort members of the previous attempt left out.
        setup_digest: The new attempt's setup digest.
    """

    attempt: int
    cohort: tuple[SiteId, ...]
    dropped: tuple[SiteId, ...]
    setup_digest: bytes


LogEntry = Accepted | Rejection | SetupRestart


@dataclass(frozen=True, slots=True)
class Dropout:
    """A site that did not reply (or was rejected) in a stage."""

    site: SiteId
    stage: ServerStage
    reason: str


_VERIFIED = object()


@dataclass(frozen=True, slots=True)
class VerifiedSubmission:
    """A masked input that passed every check; only the verifier creates these.

    Attributes:
        site: The sender.
        example_count: Its weight.
        dataset_root: Its approved dataset root.
        clipped: Elements it clipped.
        vector: The masked vector (dtype and length checked, digest matched).
    """

    site: SiteId
    example_count: int
    dataset_root: bytes
    clipped: int
    vector: UIntVector = field(repr=False)
    _token: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._token is not _VERIFIED:
            raise TypeError("VerifiedSubmission is created only by the verification pipeline")


class StreamingSum:
    """One running vector modulo ``2**b``; accepts only :class:`VerifiedSubmission`."""

    __slots__ = ("_sites", "total")

    def __init__(self, length: int, modulus_bits: int) -> None:
        self.total: UIntVector = np.zeros(length, dtype=vector_dtype(modulus_bits))
        self._sites: set[SiteId] = set()

    def add(self, submission: VerifiedSubmission) -> None:
        """Add a verified masked vector (wrapping), once per site."""
        if not isinstance(submission, VerifiedSubmission):
            raise TypeError("only a VerifiedSubmission can enter the sum")
        if submission.site in self._sites:
            raise RuntimeError("a site's submission was added twice")
        np.add(self.total, submission.vector, out=self.total)
        self._sites.add(submission.site)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """The outcome of a completed round, consumable by any weighted-mean strategy.

    Attributes:
        run_id: The run.
        round: The round.
        weighted_sum: ``sum_i w_i x_i`` over survivors (float64, dequantized).
        total_weight: ``sum_i w_i`` over survivors.
        survivors: Sites whose inputs are in the sum.
        weights: Example count per survivor.
        dataset_roots: Dataset root per survivor.
        clipped: Clipped-element count per survivor (as reported by the site).
        aggregate: The exact integer sum modulo ``2**b`` (uint32/uint64).
        aggregate_digest: SHA-256 of ``aggregate``'s little-endian bytes.
        dropouts: Every site that dropped out, with the stage and reason.
        rejections: Every rejected message or share, with its typed error.
        setup_attempts: Setup attempts the round took (1 without restarts).
        restarts: Each new setup attempt, with the sites left out.
        dp: The DP parameters if it was a DP round (``weighted_sum`` is then the noisy
            unweighted sum, every weight 1), else ``None``.
    """

    run_id: bytes
    round: int
    weighted_sum: npt.NDArray[np.float64] = field(repr=False)
    total_weight: int
    survivors: tuple[SiteId, ...]
    weights: Mapping[SiteId, int]
    dataset_roots: Mapping[SiteId, bytes]
    clipped: Mapping[SiteId, int]
    aggregate: UIntVector = field(repr=False)
    aggregate_digest: bytes
    dropouts: tuple[Dropout, ...]
    rejections: tuple[Rejection, ...]
    setup_attempts: int = 1
    restarts: tuple[SetupRestart, ...] = ()
    dp: DpParams | None = None

    @property
    def weighted_mean(self) -> npt.NDArray[np.float64]:
        """``weighted_sum / total_weight``."""
        return self.weighted_sum / self.total_weight

    @property
    def clipped_total(self) -> int:
        """Clipped elements over all survivors."""
        return sum(self.clipped.values())


@dataclass(slots=True)
class _SiteState:
    advert: KeyAdvert | None = None
    advert_bytes: bytes = b""
    advert_digest: bytes = b""
    shares_out: dict[SiteId, bytes] = field(default_factory=dict)
    partners: frozenset[SiteId] = frozenset()
    example_count: int = 0
    dataset_root: bytes = b""
    clipped: int = 0
    statement_signature: bytes = b""


class SecAggServer:
    """The coordinator's state in one secure round (see the module docstring).

    Args:
        config: Round configuration (validated for the cohort size).
        roster: Enrolled sites (keys, approved roots, status).
        cohort: The sampled sites; all must be active in the roster.
        identity_key: The coordinator's ECDSA P-256 key (signs every message it sends).
        run_id: 16-byte run id.
        round: Round number.
        model_digest: SHA-256 of the global model this round trains from.
        now: Current time (seconds since the epoch) for the setup's expiry.
        commitments: Site -> commitment to its graph nonce, from its last key advert of this
            run (:attr:`next_commitments` of an earlier round); a member without one makes
            the round start with a commit exchange.

    Raises:
        ConfigError: Invalid configuration, unknown or revoked cohort member.
    """

    def __init__(
        self,
        config: RoundConfig,
        roster: Roster,
        cohort: Iterable[str],
        *,
        identity_key: ec.EllipticCurvePrivateKey,
        run_id: bytes,
        round: int,
        model_digest: bytes,
        now: float,
        commitments: Mapping[str, bytes] | None = None,
    ) -> None:
        sites = sorted({SiteId(s) for s in cohort}, key=site_sort_key)
        if len(run_id) != RUN_ID_BYTES:
            raise ConfigError(f"run id must be {RUN_ID_BYTES} bytes")
        if len(model_digest) != DIGEST_BYTES:
            raise ConfigError("model digest must be 32 bytes")
        if not 0 <= round < 1 << 32:
            raise ConfigError(f"round {round} outside 0..2^32-1")
        for s in sites:
            entry = roster.get(s)
            if entry is None:
                raise ConfigError("cohort member is not enrolled", site=s)
            if not entry.active:
                raise ConfigError("cohort member is revoked", site=s)
        self.config = config
        self.run_id = bytes(run_id)
        self.round = round
        self.params: RoundParameters = self._resolve(len(sites))
        self.initial_params: RoundParameters = self.params
        self.limits = config.limits
        self.roster = roster
        self.cohort: tuple[SiteId, ...] = tuple(sites)
        self.initial_cohort: tuple[SiteId, ...] = self.cohort
        self.model_digest = bytes(model_digest)
        self._identity = identity_key
        known = commitments or {}
        members = tuple(
            CohortMember(s, roster[s].public_key_der, bytes(known.get(s, b""))) for s in sites
        )
        #: Site -> the commitment to the graph nonce of its next round (from its adverts).
        self.next_commitments: dict[SiteId, bytes] = {}
        header = Header(
            run_id=self.run_id,
            round=round,
            sender=COORDINATOR,
            recipient=COORDINATOR,
            model_digest=self.model_digest,
            setup_digest=bytes(DIGEST_BYTES),
        )
        self._setup = RoundSetup(
            header=header,
            cohort=members,
            params=self.params,
            expires_at=int(now) + config.round_timeout_s,
        )
        self.setup_digest = self._setup.digest
        self._earlier_setups: set[bytes] = set()
        self.restarts: list[SetupRestart] = []
        self.stage = ServerStage.SETUP
        self.failure: ProtocolError | None = None
        self.awaiting: frozenset[SiteId] = frozenset()
        self.accepted: dict[SiteId, Accepted] = {}
        self.rejections: list[Rejection] = []
        self.dropouts: list[Dropout] = []
        self.log: list[LogEntry] = []
        self.graph: NeighbourGraph | None = None
        self._state: dict[SiteId, _SiteState] = {s: _SiteState() for s in sites}
        self._seen: set[bytes] = set()
        self._u1: frozenset[SiteId] = frozenset()
        self._u2: tuple[SiteId, ...] = ()
        self._u3: tuple[SiteId, ...] = ()
        self._requests: dict[SiteId, dict[SiteId, ShareKind]] = {}
        self._revealed: dict[tuple[SiteId, ShareKind], list[tuple[SiteId, Share]]] = {}
        self._sum = StreamingSum(self.params.masked_length, self.params.quantization.modulus_bits)
        self._result: RoundResult | None = None
        self._liars: set[SiteId] = set()
        self._bundle = b""

    def _resolve(self, cohort_size: int) -> RoundParameters:
        """``config.resolve`` plus, in a DP round, the round's derived rotation seed."""
        params = self.config.resolve(cohort_size)
        if params.dp is None:
            return params
        return dataclasses.replace(params, rotation_seed=rotation_seed_for(self.run_id, self.round))

    # -- public API ---------------------------------------------------------------------

    @property
    def setup(self) -> RoundSetup:
        """The current attempt's round setup (its digest is bound by every later message)."""
        return self._setup

    @property
    def attempt(self) -> int:
        """The current setup attempt (0 first)."""
        return self._setup.attempt

    @property
    def survivors(self) -> tuple[SiteId, ...]:
        """Sites whose masked inputs entered the sum (empty until the masked-input stage
        closes); kept when the round fails after that, e.g. for the audit record."""
        return self._u2

    @property
    def result(self) -> RoundResult:
        """The round's result once ``stage`` is ``DONE``.

        Raises:
            ProtocolError: The error the round failed with, if it failed.
            RuntimeError: If the round is still running.
        """
        if self.failure is not None:
            raise self.failure
        if self._result is None:
            raise RuntimeError(f"round not finished (stage {self.stage.value})")
        return self._result

    def start(self) -> dict[SiteId, Packet]:
        """Send the signed round setup to every cohort member (stage 0; a commit exchange
        first if a member has no committed graph nonce)."""
        if self.stage is not ServerStage.SETUP:
            raise RuntimeError("round already started")
        committed = all(m.nonce_commitment for m in self._setup.cohort)
        return self._send_setups(ServerStage.ADVERTISE if committed else ServerStage.COMMIT)

    def _send_setups(self, stage: ServerStage = ServerStage.ADVERTISE) -> dict[SiteId, Packet]:
        out = {}
        for s in self.cohort:
            setup = dataclasses.replace(
                self._setup, header=self._header(s, setup_digest=bytes(DIGEST_BYTES))
            )
            out[s] = Packet(seal(setup, self._identity))
        self._enter(stage, self.cohort)
        return out

    def receive(self, site: str, payload: bytes, bulk: object = None) -> Receipt:
        """Verify and absorb one reply from ``site`` (as identified by the transport).

        Returns:
            :class:`Accepted`, or a :class:`Rejection` holding the typed error.

        Raises:
            RuntimeError: If no stage is collecting replies (a programming error).
        """
        if self.stage not in TRANSITIONS:
            raise RuntimeError(f"no replies are collected in stage {self.stage.value}")
        sid = SiteId(site)
        digest: bytes | None = None
        superseded = False
        received: list[Envelope] = []  # the frame, once it decoded (kept by a rejection)
        try:
            opened = self._open(sid, payload, received)
            digest = opened.content_digest
            if digest in self._seen:
                raise DuplicateMessageError(
                    "message content seen before (replay or re-encoded signature)"
                )
            if sid in self.accepted:
                raise DuplicateMessageError("site already answered this stage")
            header = opened.message.header
            if header.setup_digest in self._earlier_setups and header.run_id == self.run_id:
                superseded = True
                raise StaleMessageError("reply to an earlier setup attempt of this round")
            if sid not in self.awaiting:
                raise StaleMessageError("site is not part of this stage (dropped out or rejected)")
            self._check_header(opened.message.header, sid)
            self._absorb(sid, opened, bulk)
        except ProtocolError as exc:
            err = exc.with_context(site=sid, round=self.round, stage=self.stage.value)
            rejection = Rejection(
                site=sid, stage=self.stage, error=err, content_digest=digest,
                envelope=received[0] if received else None,
                frame=None if received or not isinstance(payload, bytes | bytearray | memoryview)
                else bytes(payload),
            )
            self.rejections.append(rejection)
            self.log.append(rejection)
            keeps = isinstance(exc, DuplicateMessageError) or superseded
            if not keeps and sid in self.awaiting:
                self.awaiting = self.awaiting - {sid}
                self.dropouts.append(Dropout(sid, self.stage, rejection.reason))
            return rejection
        self._seen.add(opened.content_digest)
        msg = opened.message
        receipt = Accepted(
            site=sid,
            stage=self.stage,
            kind=opened.envelope.kind,
            content_digest=opened.content_digest,
            signature=opened.envelope.signature,
            signer=opened.envelope.signer,
            payload=opened.envelope.payload,
            masked_input=InputFacts(
                dataset_root=msg.dataset_root, example_count=msg.example_count,
                bulk_digest=msg.bulk_digest, model_digest=msg.header.model_digest,
            ) if isinstance(msg, MaskedInput) else None,
        )
        self.accepted[sid] = receipt
        self.awaiting = self.awaiting - {sid}
        self.log.append(receipt)
        return receipt

    def drop(self, site: str, reason: str) -> None:
        """Tell the state machine that ``site`` is gone for this stage (e.g. its transport
        failed); it is then a dropout exactly like a site that did not reply in time.

        Raises:
            RuntimeError: If no stage is collecting replies.
        """
        if self.stage not in TRANSITIONS:
            raise RuntimeError(f"no replies are collected in stage {self.stage.value}")
        sid = SiteId(site)
        if sid in self.awaiting:
            self.awaiting = self.awaiting - {sid}
            self.dropouts.append(Dropout(sid, self.stage, reason))

    def advance(self) -> dict[SiteId, Packet]:
        """Close the current stage: silent sites are dropouts; return the next messages.

        Returns:
            The next stage's messages (one per site); empty once the round is ``DONE``.

        Raises:
            ThresholdError: Too few parties remain; the round is ``FAILED``.
            ReconstructionError: Shares cannot be reconciled with commitments; ``FAILED``.
            AggregateOutOfRangeError: The unmasked sum is outside the range the signed example
                counts allow (an input wrapped the field); ``FAILED``, no result.
        """
        if self.stage not in TRANSITIONS:
            raise RuntimeError(f"cannot advance from stage {self.stage.value}")
        for s in sorted(self.awaiting, key=site_sort_key):
            self.dropouts.append(Dropout(s, self.stage, "no reply before the stage closed"))
        answered = tuple(s for s in self.cohort if s in self.accepted)
        try:
            if self.stage is ServerStage.COMMIT:
                return self._after_commit(answered)
            if self.stage is ServerStage.ADVERTISE:
                return self._after_adverts(answered)
            if self.stage is ServerStage.SHARE:
                return self._after_shares(answered)
            if self.stage is ServerStage.MASKED_INPUT:
                return self._after_masked(answered)
            if self.stage is ServerStage.CONSISTENCY:
                return self._after_consistency(answered)
            self._after_unmask(answered)
            return {}
        except ProtocolError as exc:
            self.failure = exc.with_context(round=self.round, stage=self.stage.value)
            self.stage = ServerStage.FAILED
            self.awaiting = frozenset()
            raise

    def result_notices(self) -> dict[SiteId, Packet]:
        """Optional signed round-result notices for the survivors (after ``DONE``)."""
        result = self.result
        return {
            s: Packet(
                seal(
                    RoundResultNotice(
                        header=self._header(s),
                        survivors=result.survivors,
                        total_weight=result.total_weight,
                        aggregate_digest=result.aggregate_digest,
                    ),
                    self._identity,
                )
            )
            for s in result.survivors
        }

    # -- plumbing -------------------------------------------------------------------------

    def _enter(self, stage: ServerStage, expected: Iterable[SiteId]) -> None:
        self.stage = stage
        self.awaiting = frozenset(expected)
        self.accepted = {}

    def _header(self, recipient: SiteId, *, setup_digest: bytes | None = None) -> Header:
        return Header(
            run_id=self.run_id,
            round=self.round,
            sender=COORDINATOR,
            recipient=recipient,
            model_digest=self.model_digest,
            setup_digest=self.setup_digest if setup_digest is None else setup_digest,
        )

    def _open(self, site: SiteId, payload: bytes, received: list[Envelope]) -> OpenedMessage:
        """:func:`~fedseal.protocol.envelope.open_envelope` for this stage; the frame, once it
        decoded, is appended to ``received`` (a rejection keeps it for the audit log)."""
        kind = TRANSITIONS[self.stage][0]

        def resolve(envelope: Envelope) -> ec.EllipticCurvePublicKey:
            received.append(envelope)
            # Step 3 of open_envelope, here so that a frame of the wrong kind is kept too.
            if envelope.kind is not kind:
                raise StaleMessageError(
                    f"message kind {envelope.kind.type_name} where {kind.type_name} was expected"
                )
            entry = self.roster.require_signer(site, envelope.signer)
            if site not in self._state:
                raise UnknownSignerError("site is not in this round's cohort")
            return entry.public_key

        return open_envelope(payload, self.limits, expected=_ALL_KINDS, resolve_signer=resolve)

    def _check_header(self, header: Header, site: SiteId) -> None:
        if header.run_id != self.run_id:
            raise StaleMessageError("message from another run")
        if header.round != self.round:
            raise StaleMessageError(f"message for round {header.round}")
        if header.sender != site:
            raise UnknownSignerError("message names another sender")
        if header.recipient != COORDINATOR:
            raise VerificationError("message not addressed to the coordinator")
        if header.model_digest != self.model_digest:
            raise VerificationError("message binds another global model digest")
        if header.setup_digest != self.setup_digest:
            raise VerificationError("message binds another round setup")

    def _absorb(self, site: SiteId, opened: OpenedMessage, bulk: object) -> None:
        msg: Message = opened.message
        state = self._state[site]
        if isinstance(msg, KeyAdvert):
            for point in (msg.share_public, msg.mask_public):
                try:
                    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
                except ValueError as exc:
                    raise VerificationError("advertised key is not a P-256 point") from exc
            if msg.share_public == msg.mask_public:
                raise VerificationError("advertised share and mask keys must differ")
            self.next_commitments[site] = msg.next_commitment
            if self.stage is ServerStage.COMMIT:
                return  # only the commitment counts; the keys are never used
            listed = next(m.nonce_commitment for m in self._setup.cohort if m.site == site)
            if not opens(self.run_id, site, listed, msg.graph_nonce, self._setup.attempt):
                raise VerificationError(
                    "the advert's graph nonce does not open the commitment listed for the site"
                )
            state.advert = msg
            state.advert_bytes = opened.envelope.to_bytes()
            state.advert_digest = opened.content_digest
        elif isinstance(msg, EncryptedShares):
            self._absorb_shares(site, msg)
        elif isinstance(msg, MaskedInput):
            self._sum.add(self._verify_masked(site, msg, bulk))
        elif isinstance(msg, ConsistencySignature):
            statement = survivor_statement(
                self.run_id, self.round, self.setup_digest, self._bundle, self._u2
            )
            try:
                verify(
                    self.roster[site].public_key, SURVIVOR_STATEMENT_TYPE, statement, msg.signature
                )
            except SignatureError as exc:
                raise BadSignatureError("signature over the survivor set does not verify") from exc
            state.statement_signature = msg.signature
        elif isinstance(msg, UnmaskResponse):
            self._absorb_unmask(site, msg)
        else:
            raise StaleMessageError(f"unexpected message {type(msg).__name__}")

    def _absorb_shares(self, site: SiteId, msg: EncryptedShares) -> None:
        graph = self._require_graph()
        recipients = tuple(s for s, _ in msg.items)
        if recipients != graph.of(site):
            raise VerificationError(
                "encrypted shares not addressed to exactly the site's neighbours"
            )
        self._state[site].shares_out = dict(msg.items)

    def _verify_masked(self, site: SiteId, msg: MaskedInput, bulk: object) -> VerifiedSubmission:
        p = self.params
        if not 1 <= msg.example_count <= p.max_weight:
            raise VerificationError(f"example count {msg.example_count} outside 1..{p.max_weight}")
        length = p.masked_length
        if msg.vector_length != length or msg.modulus_bits != p.quantization.modulus_bits:
            raise BulkMismatchError("signed vector length or modulus differs from the round's")
        if msg.dataset_root not in self.roster[site].approved_roots:
            raise UnapprovedDatasetError("dataset root is not approved for this site")
        if msg.clipped > length:
            raise VerificationError("clipped count exceeds the vector length")
        dtype = vector_dtype(p.quantization.modulus_bits)
        if not isinstance(bulk, np.ndarray):
            raise BulkMismatchError("masked input arrived without a bulk vector")
        if bulk.dtype != dtype:
            raise BulkMismatchError(f"bulk vector dtype {bulk.dtype}, expected {dtype}")
        if bulk.ndim != 1 or bulk.shape[0] != length:
            raise BulkMismatchError(f"bulk vector shape {bulk.shape}, expected ({length},)")
        vector = np.ascontiguousarray(bulk)
        if hashlib.sha256(vector.data).digest() != msg.bulk_digest:
            raise BulkMismatchError("bulk vector SHA-256 differs from the signed digest")
        state = self._state[site]
        state.example_count = msg.example_count
        state.dataset_root = msg.dataset_root
        state.clipped = msg.clipped
        return VerifiedSubmission(
            site=site,
            example_count=msg.example_count,
            dataset_root=msg.dataset_root,
            clipped=msg.clipped,
            vector=vector,
            _token=_VERIFIED,
        )

    def _absorb_unmask(self, site: SiteId, msg: UnmaskResponse) -> None:
        graph = self._require_graph()
        requested = self._requests.get(site, {})
        given = {owner: kind for owner, kind, _ in msg.shares}
        if given != requested:
            raise VerificationError("revealed shares differ from the ones requested")
        parsed: list[tuple[SiteId, ShareKind, Share]] = []
        for owner, kind, raw in msg.shares:
            try:
                share = Share.from_bytes(raw)
            except ShareError as exc:
                raise DecodeError("revealed share is malformed") from exc
            if share.index != graph.share_index(owner, site):
                raise VerificationError("revealed share carries the wrong Shamir index")
            parsed.append((owner, kind, share))
        for owner, kind, share in parsed:
            self._revealed.setdefault((owner, kind), []).append((site, share))

    def _require_graph(self) -> NeighbourGraph:
        if self.graph is None:
            raise RuntimeError("neighbour graph not built yet")
        return self.graph

    # -- stage closers ----------------------------------------------------------------------

    def _needed_owners(self) -> list[SiteId]:
        """Sites whose secrets must be reconstructed: survivors (self-mask seed) and dropped
        sites that share a pairwise mask with a survivor (mask key)."""
        graph = self._require_graph()
        survivors = frozenset(self._u2)
        return [
            j
            for j in sorted(self._u1, key=site_sort_key)
            if j in survivors or any(i in survivors for i in graph.of(j))
        ]

    def _check_holders(self, owners: Iterable[SiteId], alive: frozenset[SiteId], what: str) -> None:
        graph = self._require_graph()
        t = self.params.threshold
        for owner in owners:
            holders = [s for s in graph.of(owner) if s in alive and s in self._u1]
            if len(holders) < t:
                raise ThresholdError(
                    f"only {len(holders)} neighbours of a site remain after {what}; threshold is {t}",
                    site=owner,
                )

    def _require_quorum(self, count: int, what: str) -> None:
        """Sites reveal only after a consistency quorum of signatures; fail early without."""
        quorum = consistency_quorum(
            self.params.threshold, len(self.cohort), self.config.max_colluding_fraction
        )
        if count < quorum:
            raise ThresholdError(
                f"{count} {what}, below the consistency quorum {quorum} "
                f"(threshold {self.params.threshold}, majority of {len(self.cohort)})"
            )

    def _after_commit(self, committed: tuple[SiteId, ...]) -> dict[SiteId, Packet]:
        """The setup proper (attempt 0) for the members that committed, listing every
        commitment; a member that did not commit is a dropout, as one that does not advertise."""
        self._check_enough(committed, "graph-nonce commitments")
        self._earlier_setups.add(self.setup_digest)
        if len(committed) < len(self.cohort):
            self._set_cohort(committed)
        self._setup = dataclasses.replace(
            self._setup,
            cohort=tuple(
                dataclasses.replace(m, nonce_commitment=self.next_commitments[m.site])
                for m in self._setup.cohort
            ),
        )
        self.setup_digest = self._setup.digest
        self._state = {s: _SiteState() for s in self.cohort}
        return self._send_setups()

    def _after_adverts(self, advertised: tuple[SiteId, ...]) -> dict[SiteId, Packet]:
        if len(advertised) < len(self.cohort):
            return self._restart(advertised)
        nonces = {s: self._advert(s).graph_nonce for s in advertised}
        self.graph = build_graph(
            advertised, graph_seed(nonces), self.params.degree, self.params.threshold
        )
        self._bundle = bundle_digest({s: self._state[s].advert_digest for s in advertised})
        bundle = tuple(self._state[s].advert_bytes for s in advertised)
        out = {
            s: Packet(seal(AdvertBundle(header=self._header(s), adverts=bundle), self._identity))
            for s in advertised
        }
        self._enter(ServerStage.SHARE, advertised)
        return out

    def _advert(self, site: SiteId) -> KeyAdvert:
        advert = self._state[site].advert
        if advert is None:
            raise RuntimeError("advertised site without an advert")
        return advert

    def _check_enough(self, remaining: tuple[SiteId, ...], what: str) -> None:
        """A new setup over ``remaining`` needs the first attempt's ``min_survivors`` and
        consistency quorum among them."""
        first = self.initial_params
        if len(remaining) < first.min_survivors:
            raise ThresholdError(f"{len(remaining)} {what}, min_survivors is {first.min_survivors}")
        quorum = consistency_quorum(
            first.threshold, len(self.initial_cohort), self.config.max_colluding_fraction
        )
        if len(remaining) < quorum:
            raise ThresholdError(
                f"{len(remaining)} {what}, below the consistency quorum {quorum} "
                f"(threshold {first.threshold}, cohort of {len(self.initial_cohort)})"
            )

    def _set_cohort(self, remaining: tuple[SiteId, ...]) -> None:
        """Narrow the cohort (and re-resolve the parameters) to ``remaining``."""
        try:
            params = self._resolve(len(remaining))
        except ConfigError as exc:
            raise ThresholdError(
                f"{len(remaining)} sites are too few for a new setup: {exc.message}"
            ) from exc
        kept = frozenset(remaining)
        self.params = params
        self.cohort = remaining
        self._setup = dataclasses.replace(
            self._setup, cohort=tuple(m for m in self._setup.cohort if m.site in kept), params=params
        )
        self._sum = StreamingSum(params.masked_length, params.quantization.modulus_bits)

    def _restart(self, advertised: tuple[SiteId, ...]) -> dict[SiteId, Packet]:
        """Start a new setup attempt for the sites that advertised (see the module docstring)."""
        dropped = tuple(s for s in self.cohort if s not in advertised)
        self._check_enough(advertised, "key adverts")
        attempt = self._setup.attempt + 1
        if attempt >= self.config.max_setup_attempts:
            raise ThresholdError(
                f"{len(dropped)} cohort members did not advertise keys and all "
                f"{self.config.max_setup_attempts} setup attempts are spent"
            )
        self._earlier_setups.add(self.setup_digest)
        self._set_cohort(advertised)
        self._setup = dataclasses.replace(self._setup, attempt=attempt)
        self.setup_digest = self._setup.digest
        self._state = {s: _SiteState() for s in advertised}
        restart = SetupRestart(
            attempt=attempt, cohort=advertised, dropped=dropped, setup_digest=self.setup_digest
        )
        self.restarts.append(restart)
        self.log.append(restart)
        return self._send_setups()

    def _after_shares(self, shared: tuple[SiteId, ...]) -> dict[SiteId, Packet]:
        graph = self._require_graph()
        self._u1 = frozenset(shared)
        if len(shared) < self.params.min_survivors:
            raise ThresholdError(
                f"{len(shared)} sites shared keys, min_survivors is {self.params.min_survivors}"
            )
        self._check_holders(shared, self._u1, "key sharing")
        out = {}
        for s in shared:
            senders = [j for j in graph.of(s) if j in self._u1]
            self._state[s].partners = frozenset(senders)
            items = tuple((j, self._state[j].shares_out[s]) for j in senders)
            out[s] = Packet(
                seal(ShareDelivery(header=self._header(s), items=items), self._identity)
            )
        self._enter(ServerStage.MASKED_INPUT, shared)
        return out

    def _after_masked(self, submitted: tuple[SiteId, ...]) -> dict[SiteId, Packet]:
        self._u2 = submitted
        if len(submitted) < self.params.min_survivors:
            raise ThresholdError(
                f"{len(submitted)} masked inputs, min_survivors is {self.params.min_survivors}"
            )
        self._require_quorum(len(submitted), "masked inputs")
        self._check_holders(self._needed_owners(), frozenset(submitted), "masked input")
        out = {
            s: Packet(
                seal(SurvivorSet(header=self._header(s), survivors=submitted), self._identity)
            )
            for s in submitted
        }
        self._enter(ServerStage.CONSISTENCY, submitted)
        return out

    def _after_consistency(self, signed: tuple[SiteId, ...]) -> dict[SiteId, Packet]:
        self._u3 = signed
        self._require_quorum(len(signed), "consistency signatures")
        self._check_holders(self._needed_owners(), frozenset(signed), "the consistency check")
        signatures = tuple((s, self._state[s].statement_signature) for s in signed)
        survivors = frozenset(self._u2)
        out = {}
        for s in signed:
            partners = self._state[s].partners
            alive = tuple(j for j in sorted(partners, key=site_sort_key) if j in survivors)
            dropped = tuple(j for j in sorted(partners, key=site_sort_key) if j not in survivors)
            self._requests[s] = {j: ShareKind.SELF_MASK_SEED for j in alive} | {
                j: ShareKind.MASK_KEY for j in dropped
            }
            request = UnmaskRequest(
                header=self._header(s),
                survivors=self._u2,
                signatures=signatures,
                alive=alive,
                dropped=dropped,
            )
            out[s] = Packet(seal(request, self._identity))
        self._enter(ServerStage.UNMASK, signed)
        return out

    def _after_unmask(self, responded: tuple[SiteId, ...]) -> None:
        self._check_holders(self._needed_owners(), frozenset(responded), "unmasking")
        survivors = self._u2
        total = self._sum.total
        h_run, h_round = self.run_id, self.round
        # Every mask to remove is collected first and removed in one chunk-major pass
        # (fedseal.crypto.prg.MaskSum): the sum is only touched once all seeds reconstructed.
        masks: list[Mask] = []
        for owner in survivors:
            advert = self._state[owner].advert
            if advert is None:
                raise RuntimeError("survivor without an advert")
            commitment = advert.seed_commitment

            def seed_ok(
                secret: bytes, owner: SiteId = owner, commitment: bytes = commitment
            ) -> bool:
                return seed_commitment(h_run, h_round, owner, secret) == commitment

            seed = self._reconstruct(owner, ShareKind.SELF_MASK_SEED, SEED_BYTES, seed_ok)
            masks.append(Mask(seed, SELF_DOMAIN, negate=True))
        survivor_set = frozenset(survivors)
        for owner in sorted(self._u1 - survivor_set, key=site_sort_key):
            advert = self._state[owner].advert
            if advert is None:
                raise RuntimeError("dropped site without an advert")
            affected = [
                i
                for i in self._require_graph().of(owner)
                if i in survivor_set and owner in self._state[i].partners
            ]
            if not affected:
                continue
            mask_public = advert.mask_public

            def key_ok(secret: bytes, mask_public: bytes = mask_public) -> bool:
                try:
                    rebuilt: bytes = AgreementKey.from_private_bytes(secret).public_bytes()
                    return rebuilt == mask_public
                except KeyFormatError:
                    return False

            key = AgreementKey.from_private_bytes(
                self._reconstruct(owner, ShareKind.MASK_KEY, 32, key_ok)
            )
            for i in affected:
                peer_advert = self._state[i].advert
                if peer_advert is None:
                    raise RuntimeError("survivor without an advert")
                try:
                    seed = pairwise_seed(key, peer_advert.mask_public, h_run, h_round, owner, i)
                except AgreementError as exc:
                    raise ReconstructionError("a survivor's mask key is unusable", site=i) from exc
                # Survivor i added +mask if i < owner, -mask otherwise; remove exactly that.
                masks.append(Mask(seed, PAIR_DOMAIN, negate=not pair_sign_negative(i, owner)))
        add_masks_into(total, masks)
        p, q = self.params, self.params.quantization
        aggregate = total
        if p.dp is not None:  # unweighted, its own range check (module docstring)
            check_dp_aggregate(aggregate, p.dp, len(survivors))
            weights = dict.fromkeys(survivors, 1)
            total_weight = len(survivors)
            weighted_sum = dp_decode(aggregate, p.dp, p.rotation_seed, p.vector_length)
        else:
            weights = {s: self._state[s].example_count for s in survivors}
            total_weight = sum(weights.values())
            check_aggregate_range(aggregate, q.levels * total_weight)
            weighted_sum = dequantize(aggregate, q)
        self._result = RoundResult(
            run_id=self.run_id,
            round=self.round,
            weighted_sum=weighted_sum,
            total_weight=total_weight,
            survivors=survivors,
            weights=weights,
            dataset_roots={s: self._state[s].dataset_root for s in survivors},
            clipped={s: self._state[s].clipped for s in survivors},
            aggregate=aggregate,
            aggregate_digest=hashlib.sha256(aggregate.data).digest(),
            dropouts=tuple(self.dropouts),
            rejections=tuple(self.rejections),
            setup_attempts=self._setup.attempt + 1,
            restarts=tuple(self.restarts),
            dp=p.dp,
        )
        self.stage = ServerStage.DONE
        self.awaiting = frozenset()

    def _reconstruct(
        self, owner: SiteId, kind: ShareKind, length: int, check: Callable[[bytes], bool]
    ) -> bytes:
        """Reconstruct ``owner``'s secret, excluding garbage shares; see the module docstring."""
        t = self.params.threshold
        revealed = sorted(self._revealed.get((owner, kind), []), key=lambda hs: hs[1].index)
        if len(revealed) < t:
            raise ThresholdError(
                f"{len(revealed)} shares revealed for a site, threshold is {t}", site=owner
            )
        trusted = [s for h, s in revealed if h not in self._liars]
        if len(trusted) >= t:
            secret = _try_combine(trusted, t, length)
            if secret is not None and check(secret):
                base = trusted[: t - 1]
                for holder, share in revealed:
                    if holder in self._liars and _try_combine([*base, share], t, length) != secret:
                        self._reject_share(holder, owner)
                return secret
        shares = [s for _, s in revealed]
        # Exclude as few shares as possible first (0, then 1, 2, ...): e garbage shares are
        # found in sum_{j<=e} C(r, j) attempts wherever they sit, and the kept shares must
        # all lie on one polynomial (combine checks every share beyond the first t).
        exclusions = itertools.chain.from_iterable(
            itertools.combinations(range(len(shares)), e) for e in range(len(shares) - t + 1)
        )
        for attempt, excluded in enumerate(exclusions):
            if attempt >= MAX_RECONSTRUCTION_ATTEMPTS:
                break
            kept = [s for i, s in enumerate(shares) if i not in excluded]
            candidate = _try_combine(kept, t, length)
            if candidate is None or not check(candidate):
                continue
            base = kept[: t - 1]
            for holder, share in revealed:
                if share in base:
                    continue
                if _try_combine([*base, share], t, length) != candidate:
                    self._reject_share(holder, owner)
            return candidate
        raise ReconstructionError(
            "no subset of the revealed shares matches the signed commitment", site=owner
        )

    def _reject_share(self, holder: SiteId, owner: SiteId) -> None:
        self._liars.add(holder)
        err = VerificationError(f"revealed a share of {owner} that does not match its commitment")
        err.with_context(site=holder, round=self.round, stage=ServerStage.UNMASK.value)
        response = self.accepted.get(holder)  # the unmask response that revealed the share
        rejection = Rejection(
            site=holder, stage=ServerStage.UNMASK, error=err,
            envelope=response.envelope if response is not None else None,
        )
        self.rejections.append(rejection)
        self.log.append(rejection)


def check_aggregate_range(aggregate: UIntVector, bound: int) -> None:
    """Check every element of a wrapped sum, read as signed, against ``[-bound, bound]``.

    Two reductions (min, max) per chunk of ``CHUNK`` elements over a signed *view* (no copy);
    only when they show a violation are the offending elements counted, chunk by chunk.

    Args:
        aggregate: The unmasked sum modulo ``2**b`` (uint32 or uint64).
        bound: ``levels * total weight`` (see the module docstring); below ``2**(b-1)``.

    Raises:
        AggregateOutOfRangeError: With the number of elements outside the bound and the
            element of largest magnitude.
    """
    signed = _signed_view(aggregate)
    length = signed.shape[0]
    lowest, highest = 0, 0
    for start in range(0, length, CHUNK):
        part = signed[start : start + CHUNK]
        lowest = min(lowest, int(np.minimum.reduce(part)))
        highest = max(highest, int(np.maximum.reduce(part)))
    if -bound <= lowest and highest <= bound:
        return
    count = 0
    for start in range(0, length, CHUNK):
        part = signed[start : start + CHUNK]
        count += int(np.count_nonzero(part > bound)) + int(np.count_nonzero(part < -bound))
    worst = lowest if -lowest > highest else highest
    raise AggregateOutOfRangeError(
        f"aggregate out of range: {count} of {length} elements outside +-{bound} "
        f"(levels x the survivors' example counts), the largest is {worst}; an input wrapped "
        "the field",
        count=count,
        worst=worst,
        bound=bound,
    )


def check_dp_aggregate(aggregate: UIntVector, dp: DpParams, sites: int) -> None:
    """Check a DP round's unmasked sum of ``sites`` encodings against what honest ones reach
    (module docstring): every element, read as signed, within ``coordinate_reach`` and the L2
    norm within ``sum_norm_bound``, each failing for honest inputs with probability <= 2^-40.

    Raises:
        AggregateOutOfRangeError: With the elements beyond the reach, the largest, and the norm.
    """
    signed = _signed_view(aggregate)
    reach = math.floor(dp_coordinate_reach(dp, sites))
    norm = float(np.linalg.norm(signed.astype(np.float64)))
    norm_bound = dp_sum_norm_bound(dp, sites)
    lowest, highest = int(np.min(signed, initial=0)), int(np.max(signed, initial=0))
    if -reach <= lowest and highest <= reach and norm <= norm_bound:
        return
    count = int(np.count_nonzero(signed > reach)) + int(np.count_nonzero(signed < -reach))
    worst = lowest if -lowest > highest else highest
    raise AggregateOutOfRangeError(
        f"DP aggregate out of range: {count} of {signed.shape[0]} elements outside +-{reach}, the "
        f"largest is {worst}; L2 norm {norm:.6g} (at most {norm_bound:.6g} from {sites} honest "
        "encodings); an input was not clipped, rounded and noised as the setup says, or wrapped "
        "the field",
        count=count,
        worst=worst,
        bound=reach,
    )


def _signed_view(total: UIntVector) -> npt.NDArray[np.int32] | npt.NDArray[np.int64]:
    """The two's-complement reading of a wrapped sum, as a view (no copy)."""
    if total.dtype == np.uint32:
        return total.view(np.int32)
    if total.dtype == np.uint64:
        return total.view(np.int64)
    raise ValueError(f"expected uint32 or uint64, got {total.dtype}")


def _try_combine(shares: Sequence[Share], threshold: int, length: int) -> bytes | None:
    try:
        secret: bytes = combine(shares, threshold, length)
        return secret
    except ShareError:
        return None
