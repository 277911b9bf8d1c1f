"""The run rules: what a log may record, applied entry by entry.

:class:`RunRules` is shared by the verifier (:class:`fedseal.audit.verifier.AuditVerifier`
lists the rules) and the coordinator's writer (:class:`fedseal.audit.writer.AuditLog`, which
refuses an entry that breaks them *before* writing it). A broken rule raises
:class:`~fedseal.audit.errors.RuleViolation`; an accepted envelope yields the
:class:`~fedseal.audit.signatures.SignatureJob` that checks its site signature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    AuditEntry,
    Checkpoint,
    ConsortiumRosterRecord,
    DpRound,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    RosterAction,
    RosterChange,
    RoundRecord,
    RoundStatus,
    RunStart,
    RunStatus,
)
from fedseal.audit.errors import RuleViolation
from fedseal.audit.signatures import SignatureJob, cached_public_key, cross_check
from fedseal.crypto.errors import CryptoError
from fedseal.crypto.keys import key_id, public_key_from_der
from fedseal.crypto.signing import verify
from fedseal.protocol.config import Limits
from fedseal.protocol.consortium import ROSTER_TYPE
from fedseal.protocol.dp import DpParams, rotation_seed_for
from fedseal.protocol.encoding import Reader
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.messages import Header, RoundSetup, decode_payload
from fedseal.protocol.roster import Roster, RosterEntry
from fedseal.protocol.types import MessageKind, SiteId, site_sort_key

__all__ = [
    "DP_RELATIVE_TOLERANCE",
    "MAX_EVALUATION_EXAMPLES",
    "SETUP_MESSAGE_TYPE",
    "RunRules",
    "dp_accounting",
]


MAX_EVALUATION_EXAMPLES = 10**12
"""The most evaluation examples an :class:`Evaluation` may claim (a sanity bound)."""
DP_RELATIVE_TOLERANCE = 1e-9
"""How far a DP round entry's ρ and ε may be from the verifier's recomputation (relative):
both sides run the same code on the same bytes, so only a different platform's libm can
move them, by a few ulps."""


SETUP_MESSAGE_TYPE = MessageKind.ROUND_SETUP.type_name
"""Envelope entries of this type are the coordinator's own signed round setups (one per setup
attempt; ``site`` is ``""``, the setup's sender): the parameters every site of the round saw,
bound by the setup digest in the header of every later message of the round."""

_LIMITS = Limits()


def _bound_setup_digest(payload: bytes) -> bytes | None:
    """The setup digest a protocol payload's header binds (``None``: the header does not
    decode; the signature check's decode then names the failure)."""
    try:
        return Header.decode(Reader(payload, what="header"), _LIMITS).setup_digest
    except ProtocolError:
        return None


def _differing(logged: DpParams, signed: DpParams) -> str:
    """The DpParams attributes that differ, as ``name logged (setup signed)``."""
    return ", ".join(
        f"{f.name} {getattr(logged, f.name)!r} (setup: {getattr(signed, f.name)!r})"
        for f in dataclasses.fields(logged)
        if getattr(logged, f.name) != getattr(signed, f.name)
    )


def dp_accounting(params_bytes: bytes, rhos: list[float], delta: float) -> tuple[float, float]:
    """``(rho, epsilon_so_far)`` of a DP round with canonical ``DpParams`` bytes after the
    run's earlier rounds' ``rhos``, at ``delta``: what the coordinator logs and what the
    verifier recomputes (:func:`fedseal.privacy.dp_round_noise`, ``round_rho``, ``epsilon``).

    Raises:
        ValueError: The parameters promise no privacy (no noise, no honest survivor) or do
            not decode.
    """
    # Imported here: the accountant loads dp-accounting and scipy, which logs without DP
    # (and every fl-audit command on them) do not need.
    from fedseal.privacy import dp_round_noise, epsilon, round_rho
    from fedseal.protocol.dp import DpParams
    from fedseal.protocol.errors import ProtocolError

    try:
        params = DpParams.from_bytes(params_bytes)
    except ProtocolError as exc:
        raise ValueError(f"the DP parameters do not decode: {exc}") from exc
    rho = round_rho(dp_round_noise(params))
    return rho, epsilon([*rhos, rho], delta)


def _close(claimed: float, recomputed: float) -> bool:
    return math.isfinite(recomputed) and abs(claimed - recomputed) <= DP_RELATIVE_TOLERANCE * abs(
        recomputed
    )


@dataclass(slots=True)
class _Site:
    key_der: bytes
    key_id: bytes
    roots: frozenset[bytes]
    active: bool


@dataclass(frozen=True, slots=True)
class _Withdrawal:
    """A withdrawn dataset root: the roster-change entry that withdrew it, whose it was, why."""

    index: int
    site: str
    at_ms: int
    reason: str

    def describe(self, root: bytes) -> str:
        return (
            f"dataset root {root.hex()[:16]}… of {self.site!r}, withdrawn at entry {self.index} "
            f"({self.reason})"
        )


@dataclass(slots=True)
class _Run:
    run_id: bytes
    start_index: int
    last_round: int = 0
    model: bytes = b""
    models: dict[int, bytes] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)
    seen: set[bytes] = field(default_factory=set)
    rounds_completed: int = 0
    rounds_failed: int = 0
    last_status: RoundStatus | None = None
    evaluated: int = 0  # the last round whose evaluation is logged
    dp_budget: tuple[float, float] | None = None  # the run start's (epsilon, delta) for DP runs
    dp_rhos: list[float] = field(default_factory=list)  # each logged DP round's rho, in order
    dp_round: int = 0  # the last round whose DP accounting is logged
    dp_epsilon: float = 0.0  # the run's epsilon after its last logged DP round
    # The open round: its logged setups by digest, the setup digest each accepted masked
    # input binds.
    setups: dict[bytes, RoundSetup] = field(default_factory=dict)
    input_setups: dict[str, bytes] = field(default_factory=dict)
    # The last round's DP parameters (its signed setup's) when it released a sum: its DP
    # accounting entry is due before the next result or the run end.
    dp_due: DpParams | None = None
    # The writer's replay reads no past round's envelopes: a replayed round's accounting is
    # not re-checked against its setup (fl-audit verify checks every round).
    dp_unchecked: bool = False
    dp_required: bool = False  # the last round's accounting entry is due


class RunRules:
    """The run's rules, applied entry by entry (see :class:`AuditVerifier`)."""

    def __init__(
        self,
        trusted_roster: Roster | None = None,
        *,
        inline_checks: bool = True,
        consortium_authority: bytes | None = None,
    ) -> None:
        self.inline_checks = inline_checks  # cross-check payloads here (else in the jobs)
        self.genesis: Genesis | None = None
        self.authority = consortium_authority  # pinned roster authority key (DER), if any
        self.consortia: dict[str, ConsortiumRosterRecord] = {}  # latest roster per consortium
        self.last_consortium: ConsortiumRosterRecord | None = None
        self.sites: dict[str, _Site] = {}
        #: Withdrawn dataset roots (any site's): never approved or accepted again.
        self.withdrawn: dict[bytes, _Withdrawal] = {}
        self.run: _Run | None = None
        self.run_ids: set[bytes] = set()
        self.trusted = trusted_roster
        self.runs: list[tuple[bytes, RunStatus | None, int, int, int]] = []
        self.accepted = 0
        self.rejected = 0
        #: DP runs: run id -> (DP rounds logged, epsilon so far, delta), as recomputed.
        self.dp_runs: dict[bytes, tuple[int, float, float]] = {}

    def roster(self) -> Roster:
        return Roster(
            RosterEntry.from_der(s, v.key_der, v.roots, active=v.active)
            for s, v in self.sites.items()
        )

    def apply(
        self, index: int, entry: AuditEntry, *, replay: bool = False, data: bytes = b""
    ) -> SignatureJob | None:
        if index == 0 and not isinstance(entry, Genesis):
            raise RuleViolation("genesis", "entry 0 must be the log's genesis entry")
        if isinstance(entry, Genesis):
            if index != 0:
                raise RuleViolation("genesis", "a second genesis entry")
            try:
                public_key_from_der(entry.coordinator_key_der)
            except CryptoError as exc:
                raise RuleViolation(
                    "coordinator-key", "genesis holds an invalid coordinator key"
                ) from exc
            self.genesis = entry
            return None
        if isinstance(entry, RosterChange):
            self._roster_change(index, entry)
            return None
        if isinstance(entry, RunStart):
            self._run_start(index, entry)
            return None
        if isinstance(entry, ConsortiumRosterRecord):
            self._consortium_roster(entry, replay=replay)
            return None
        if isinstance(entry, EnvelopeRecord):
            return self.envelope(index, entry, data, replay=replay)
        run = self._open_run(entry.run_id)
        if isinstance(entry, RoundRecord):
            self._round_result(run, entry, replay=replay)
        elif isinstance(entry, Checkpoint):
            want = run.models.get(entry.round)
            if want is None:
                raise RuleViolation(
                    "checkpoint", f"checkpoint of round {entry.round}, which has no model yet"
                )
            if entry.model_digest != want:
                raise RuleViolation(
                    "checkpoint", f"checkpoint model differs from round {entry.round}'s model"
                )
        elif isinstance(entry, Evaluation):
            self._evaluation(run, entry)
        elif isinstance(entry, DpRound):
            self._dp_round(run, entry)
        else:
            self._require_dp_accounting(run, "the run end")
            if run.inputs:
                # Accepted masked inputs end in a result: else a DP round whose sum the
                # coordinator holds could be left out of the accounting by ending the run.
                raise RuleViolation(
                    "run-end",
                    f"run ends while round {run.last_round + 1} holds accepted masked inputs "
                    "and no result",
                )
            if entry.final_round != run.last_round:
                raise RuleViolation(
                    "run-end",
                    f"run ends at round {entry.final_round}, last round was {run.last_round}",
                )
            if entry.final_model_digest != run.model:
                raise RuleViolation(
                    "model-chain", "final model digest differs from the last round's model"
                )
            self.runs.append(
                (run.run_id, entry.status, run.rounds_completed, run.rounds_failed, run.start_index)
            )
            self.run = None
        return None

    def _open_run(self, run_id: bytes) -> _Run:
        run = self.run
        if run is None:
            raise RuleViolation("outside-run", "run-scoped entry while no run is open")
        if run_id != run.run_id:
            raise RuleViolation("run-id", "entry names another run than the open one")
        return run

    def envelope(
        self, index: int, entry: EnvelopeRecord, data: bytes = b"", *, replay: bool = False
    ) -> SignatureJob | None:
        """:meth:`apply` for an envelope entry (the verifier's hot path calls it directly)."""
        run = self.run
        if index == 0 or run is None or entry.run_id != run.run_id:
            if index == 0:
                raise RuleViolation("genesis", "entry 0 must be the log's genesis entry")
            run = self._open_run(entry.run_id)  # raises the precise failure
        return self._envelope(index, run, entry, replay=replay, data=data)

    def _roster_change(self, index: int, entry: RosterChange) -> None:
        current = self.sites.get(entry.site)
        if entry.action == RosterAction.WITHDRAW_ROOT:
            self._withdraw_roots(index, entry, current)
            return
        for root in entry.approved_roots:
            earlier = self.withdrawn.get(root)
            if earlier is not None:
                raise RuleViolation(
                    "root-withdrawn",
                    f"roster change for site {entry.site!r} approves {earlier.describe(root)}: "
                    "a withdrawn root is never approved again",
                )
        if entry.action == RosterAction.ENROL:
            if current is not None and current.active:
                raise RuleViolation("roster", f"site {entry.site!r} enrolled twice")
            try:
                kid = bytes(key_id(public_key_from_der(entry.public_key_der)))
            except CryptoError as exc:
                raise RuleViolation(
                    "roster", f"site {entry.site!r} enrolled with an invalid key"
                ) from exc
            if any(s.key_id == kid for name, s in self.sites.items() if name != entry.site):
                raise RuleViolation(
                    "roster", f"site {entry.site!r} enrolled with another site's key"
                )
            if self.trusted is not None:
                t = self.trusted.get(SiteId(entry.site))
                if t is None or t.key_id != kid:
                    raise RuleViolation(
                        "trusted-roster",
                        f"site {entry.site!r}'s key is not the one in the trusted roster",
                    )
            self.sites[entry.site] = _Site(
                entry.public_key_der, kid, frozenset(entry.approved_roots), True
            )
            return
        if current is None or not current.active:
            raise RuleViolation(
                "roster", f"roster change for site {entry.site!r}, which is not enrolled"
            )
        if entry.action == RosterAction.SET_ROOTS:
            current.roots = frozenset(entry.approved_roots)
        else:
            current.active = False

    def _withdraw_roots(self, index: int, entry: RosterChange, current: _Site | None) -> None:
        """A withdrawal: of roots approved for an enrolled (maybe since revoked) site, each
        withdrawn once; they leave the site's roots and are never approved or accepted again."""
        if current is None:
            raise RuleViolation(
                "roster", f"root withdrawal for site {entry.site!r}, which is not enrolled"
            )
        for root in entry.withdrawn_roots:
            earlier = self.withdrawn.get(root)
            if earlier is not None:
                raise RuleViolation(
                    "root-withdrawn", f"{earlier.describe(root)} is withdrawn a second time"
                )
            if root not in current.roots:
                raise RuleViolation(
                    "roster",
                    f"root withdrawal for site {entry.site!r} names dataset root "
                    f"{root.hex()[:16]}…, which is not approved for it",
                )
        for root in entry.withdrawn_roots:
            self.withdrawn[root] = _Withdrawal(index, entry.site, entry.at_ms, entry.reason)
        current.roots = current.roots - frozenset(entry.withdrawn_roots)

    def _consortium_roster(self, entry: ConsortiumRosterRecord, *, replay: bool) -> None:
        what = f"consortium roster {entry.consortium!r} version {entry.version}"
        if self.authority is not None and entry.authority_key_der != self.authority:
            raise RuleViolation(
                "consortium-authority",
                f"{what} is signed by authority key {entry.authority_key_id.hex()[:16]}…, "
                "not by the pinned roster authority",
            )
        if not replay:
            try:
                key = cached_public_key(entry.authority_key_der)
                verify(key, ROSTER_TYPE, entry.payload, entry.signature)
            except CryptoError as exc:
                raise RuleViolation(
                    "consortium-signature",
                    f"{what}: the authority's signature does not verify under the authority key "
                    "recorded with it",
                ) from exc
        previous = self.consortia.get(entry.consortium)
        if previous is not None:
            if entry.version < previous.version:
                raise RuleViolation(
                    "consortium-version",
                    f"{what} follows version {previous.version}: roster versions never go down",
                )
            if entry.version == previous.version and entry.roster_digest != previous.roster_digest:
                raise RuleViolation(
                    "consortium-version",
                    f"{what} differs from the roster logged earlier with the same version",
                )
        self.consortia[entry.consortium] = entry
        self.last_consortium = entry

    def _run_start(self, index: int, entry: RunStart) -> None:
        if self.run is not None:
            raise RuleViolation("run-start", "a run starts while another is open")
        if entry.run_id in self.run_ids:
            raise RuleViolation("run-start", "run id reused")
        if entry.roster_digest != self.roster().digest():
            raise RuleViolation(
                "roster-digest", "run start's roster digest differs from the log's roster"
            )
        self.run_ids.add(entry.run_id)
        self.run = _Run(
            entry.run_id, index, model=entry.initial_model_digest, dp_budget=entry.dp_budget
        )
        if entry.dp_budget is not None:
            self.dp_runs[entry.run_id] = (0, 0.0, entry.dp_budget[1])
        self.run.models[0] = entry.initial_model_digest

    def _envelope(
        self, index: int, run: _Run, e: EnvelopeRecord, *, replay: bool, data: bytes
    ) -> SignatureJob | None:
        if not e.accepted:
            self.rejected += 1
            return None
        self.accepted += 1
        if e.round != run.last_round + 1:
            raise RuleViolation(
                "round-order",
                f"accepted envelope for round {e.round} while round {run.last_round + 1} is open",
            )
        if e.message_type == SETUP_MESSAGE_TYPE:
            return self._setup(index, run, e, data)
        site = self.sites.get(e.site)
        if site is None:
            raise RuleViolation(
                "not-enrolled", f"accepted envelope from site {e.site!r}, which is not enrolled"
            )
        if not site.active:
            raise RuleViolation("revoked", f"accepted envelope from revoked site {e.site!r}")
        if e.signer_key_id != site.key_id:
            raise RuleViolation(
                "signer", f"accepted envelope signed by a key that is not {e.site!r}'s"
            )
        trusted = None
        if self.trusted is not None:
            trusted = self.trusted.get(SiteId(e.site))
            if trusted is None or not trusted.active or trusted.key_id != site.key_id:
                raise RuleViolation(
                    "trusted-roster",
                    f"site {e.site!r} is not active with this key in the trusted roster",
                )
        digest = e.content_digest
        if digest in run.seen:
            raise RuleViolation("duplicate", "the same signed content was accepted twice")
        run.seen.add(digest)
        if self.inline_checks and not replay:
            cross_check(e)
        if e.model_digest is not None and e.model_digest != run.model:
            raise RuleViolation(
                "model-chain", "envelope was made from another model than the round's"
            )
        if e.message_type == INPUT_MESSAGE_TYPE:
            if (
                e.dataset_root is None
                or e.bulk_digest is None
                or e.num_examples is None
                or e.model_digest is None
            ):
                raise RuleViolation(
                    "input-fields",
                    "accepted input lacks dataset root, bulk digest, example count or model digest",
                )
            withdrawn = self.withdrawn.get(e.dataset_root)
            if withdrawn is not None:
                raise RuleViolation(
                    "root-withdrawn",
                    f"round {e.round}: accepted input from {e.site!r} carries "
                    f"{withdrawn.describe(e.dataset_root)}",
                )
            if e.dataset_root not in site.roots:
                raise RuleViolation("dataset-root", f"dataset root not approved for {e.site!r}")
            if trusted is not None and e.dataset_root not in trusted.approved_roots:
                raise RuleViolation(
                    "trusted-roster",
                    f"dataset root not approved for {e.site!r} in the trusted roster",
                )
            if e.site in run.inputs:
                raise RuleViolation(
                    "duplicate", f"second accepted input from {e.site!r} in round {e.round}"
                )
            run.inputs[e.site] = digest
            bound = _bound_setup_digest(e.payload)
            if bound is not None:
                run.input_setups[e.site] = bound
        return SignatureJob(index, site.key_der, e, data)

    def _setup(self, index: int, run: _Run, e: EnvelopeRecord, data: bytes) -> SignatureJob:
        """An accepted envelope of the coordinator's own round setup: signed by the genesis
        coordinator key (checked with the site signatures), for the open round, decoding to a
        setup of this run and round; a DP setup's rotation seed is the derived one."""
        genesis = self.genesis
        if genesis is None:  # pragma: no cover - entry 0 is always the genesis
            raise RuleViolation("genesis", "a round setup before the genesis entry")
        if e.site or e.signer_key_id != hashlib.sha256(genesis.coordinator_key_der).digest():
            raise RuleViolation(
                "setup", f"round {e.round}'s setup is not recorded as the coordinator's own"
            )
        digest = e.content_digest
        if digest in run.seen:
            raise RuleViolation("duplicate", "the same signed content was accepted twice")
        run.seen.add(digest)
        try:
            setup = decode_payload(MessageKind.ROUND_SETUP, e.payload, _LIMITS)
        except ProtocolError as exc:
            raise RuleViolation("setup", f"round {e.round}'s setup does not decode: {exc}") from exc
        if not isinstance(setup, RoundSetup):  # pragma: no cover - decode_payload's contract
            raise RuleViolation("setup", f"round {e.round}'s setup is not a round setup")
        h = setup.header
        if h.run_id != run.run_id or h.round != e.round or h.sender:
            raise RuleViolation(
                "setup", f"round {e.round}'s setup names another run, round or sender"
            )
        if setup.params.dp is not None:
            if setup.params.rotation_seed != rotation_seed_for(run.run_id, e.round):
                raise RuleViolation(
                    "dp-setup",
                    f"round {e.round}'s setup carries another rotation seed than the one "
                    "derived from the run id and round",
                )
        run.setups[setup.digest] = setup
        return SignatureJob(index, genesis.coordinator_key_der, e, data)

    def _round_result(self, run: _Run, e: RoundRecord, *, replay: bool) -> None:
        self._require_dp_accounting(run, f"round {e.round}'s result")
        if e.round != run.last_round + 1:
            raise RuleViolation(
                "round-order", f"result of round {e.round} where round {run.last_round + 1} was due"
            )
        if e.base_model_digest != run.model:
            raise RuleViolation(
                "model-chain",
                f"round {e.round} starts from another model than round {run.last_round}'s",
            )
        if not replay:
            want_digests = tuple(sorted(run.inputs.values()))
            want_sites = tuple(sorted(run.inputs, key=site_sort_key))
            if e.accepted_input_digests != want_digests:
                raise RuleViolation(
                    "aggregate-inputs",
                    "the aggregate's inputs differ from the accepted input envelopes",
                )
            if e.survivors != want_sites:
                raise RuleViolation(
                    "survivors", "survivor set differs from the sites whose inputs were accepted"
                )
        if e.absent:
            self._absent_sites(run, e)
        if e.status == RoundStatus.COMPLETED:
            if e.aggregate_digest is None or not e.survivors:
                raise RuleViolation(
                    "round-result", "a completed round needs an aggregate and survivors"
                )
        elif e.aggregate_digest is not None or e.new_model_digest != e.base_model_digest:
            raise RuleViolation(
                "round-result",
                "a failed round must leave the model unchanged, without aggregate",
            )
        if replay:
            dp_due, required = None, run.dp_budget is not None and e.status == RoundStatus.COMPLETED
        else:
            dp_due = self._released_dp(run, e.round)
            required = dp_due is not None
        if e.status == RoundStatus.COMPLETED:
            run.rounds_completed += 1
        else:
            run.rounds_failed += 1
        run.last_round = e.round
        run.last_status = e.status
        run.model = e.new_model_digest
        run.models[e.round] = e.new_model_digest
        run.inputs = {}
        run.setups, run.input_setups = {}, {}
        run.dp_due, run.dp_required, run.dp_unchecked = dp_due, required, replay

    def _absent_sites(self, run: _Run, e: RoundRecord) -> None:
        """A round's absent sites are enrolled sites (a site revoked during the run may be one:
        its input is then rejected), none of them among its inputs: a site cannot be both in
        the sum (or, failed, accepted) and absent."""
        inputs = set(e.survivors) | run.inputs.keys()  # equal unless replaying
        for site, _ in e.absent:
            if self.sites.get(site) is None:
                raise RuleViolation(
                    "not-enrolled",
                    f"round {e.round}'s result names absent site {site!r}, which is not enrolled",
                )
            if site in inputs:
                raise RuleViolation(
                    "absent",
                    f"round {e.round}'s result names site {site!r} absent, but its masked input "
                    "was accepted in that round",
                )

    def released_dp(self) -> DpParams | None:
        """The DP parameters of the open round if its result will owe DP accounting (it
        accepted masked inputs in a DP run), else ``None``. The writer fills in a failed
        round's accounting with it (e.g. for a coordinator restarted mid-round).

        Raises:
            RuleViolation: As a result of the open round would (e.g. its setup is missing).
        """
        run = self.run
        if run is None:
            return None
        return self._released_dp(run, run.last_round + 1)

    def _released_dp(self, run: _Run, r: int) -> DpParams | None:
        """The DP parameters of round ``r`` if its result released a noisy sum to the
        coordinator (its DP accounting is then due), checked against its signed setup.

        The round's setup is the logged one whose digest its accepted masked inputs bind (of
        several attempts, the one whose cohort produced them). A round counts as released
        as soon as it accepted a masked input, completed or not: whether the coordinator could
        remove the masks cannot be told from the log (it may leave unmask responses out, or
        hold colluders' shares it never logs), and the sites charged their ledgers before
        sending (docs/dp.md §7). A DP run
        must log the setup of every round with inputs; a setup with DP parameters needs a
        DP run, and a DP run's released sums need DP.
        """
        bound = {run.input_setups.get(site) for site in run.inputs}
        if not bound:
            return None  # no input was summed: nothing to release
        if len(bound) > 1 or None in bound:
            raise RuleViolation("setup", f"round {r}'s accepted inputs do not all bind one setup")
        setup = run.setups.get(next(iter(bound)) or b"")
        if setup is None:
            if run.dp_budget is not None:
                raise RuleViolation(
                    "dp-setup",
                    f"round {r} of a DP run: its inputs bind a setup the log does not hold (the "
                    "DP parameters the sites saw cannot be checked)",
                )
            return None  # a run without DP: its setups need not be logged
        cohort = {m.site for m in setup.cohort}
        if any(site not in cohort for site in run.inputs):
            raise RuleViolation(
                "setup", f"round {r}'s inputs come from sites outside its setup's cohort"
            )
        dp = setup.params.dp
        if dp is not None and run.dp_budget is None:
            raise RuleViolation(
                "dp-setup",
                f"round {r}'s setup carries DP parameters in a run whose start has no DP "
                "budget: its privacy loss is not accounted",
            )
        if dp is None and run.dp_budget is not None:
            raise RuleViolation(
                "dp-setup",
                f"round {r} of a DP run released a sum whose setup carries no DP parameters "
                "(no noise)",
            )
        return dp

    def _evaluation(self, run: _Run, e: Evaluation) -> None:
        if e.round != run.last_round or e.round == 0:
            raise RuleViolation(
                "evaluation",
                f"evaluation of round {e.round} after round {run.last_round}'s result "
                "(only the last round's new model is evaluated, before the next round ends)",
            )
        if run.last_status != RoundStatus.COMPLETED:
            raise RuleViolation("evaluation", f"evaluation of round {e.round}, which failed")
        if run.evaluated == e.round:
            raise RuleViolation("evaluation", f"a second evaluation of round {e.round}")
        if e.model_digest != run.model:
            raise RuleViolation(
                "model-chain", f"the evaluated model is not round {e.round}'s new model"
            )
        for site in e.sites:
            if site not in self.sites:
                raise RuleViolation(
                    "not-enrolled", f"evaluation counts site {site!r}, which is not enrolled"
                )
            if not self.sites[site].active:
                raise RuleViolation(
                    "evaluation", f"evaluation counts site {site!r}, which is revoked"
                )
        if not e.sites:
            raise RuleViolation("evaluation", f"evaluation of round {e.round} names no site")
        if e.num_examples > MAX_EVALUATION_EXAMPLES:
            raise RuleViolation(
                "evaluation",
                f"evaluation of round {e.round} claims {e.num_examples} examples (more than "
                f"{MAX_EVALUATION_EXAMPLES})",
            )
        values = dict(e.metrics)
        for name in ("accuracy", "macro-f1"):
            if name in values and not 0 <= values[name] <= 1_000_000:
                raise RuleViolation(
                    "evaluation",
                    f"evaluation of round {e.round}: {name} {values[name] / 1e6} is outside [0, 1]",
                )
        if "loss" in values and values["loss"] < 0:
            raise RuleViolation(
                "evaluation", f"evaluation of round {e.round}: loss {values['loss'] / 1e6} < 0"
            )
        run.evaluated = e.round

    def _require_dp_accounting(self, run: _Run, what: str) -> None:
        """A round that released a noisy sum (completed, or failed after the coordinator could
        unmask it) has its DP accounting entry before the next result / run end."""
        if run.dp_required and run.dp_round != run.last_round:
            how = (
                "completed"
                if run.last_status == RoundStatus.COMPLETED
                else "was abandoned after it accepted masked inputs,"
            )
            raise RuleViolation(
                "dp-round",
                f"round {run.last_round} of a DP run {how} without its DP accounting entry "
                f"before {what}",
            )

    def _dp_round(self, run: _Run, e: DpRound) -> None:
        if run.dp_budget is None:
            raise RuleViolation(
                "dp-round",
                f"DP accounting of round {e.round} in a run whose start has no DP budget",
            )
        if e.round != run.last_round or e.round == 0:
            raise RuleViolation(
                "dp-round",
                f"DP accounting of round {e.round} after round {run.last_round}'s result "
                "(it follows its own round's result)",
            )
        if run.dp_round == e.round:
            raise RuleViolation("dp-round", f"a second DP accounting entry for round {e.round}")
        signed = run.dp_due
        if signed is None and not run.dp_unchecked:
            raise RuleViolation(
                "dp-round",
                f"DP accounting of round {e.round}, which released nothing (failed before it "
                "accepted a masked input)",
            )
        logged = e.params  # it decodes (DpRound's own invariant)
        if signed is not None and logged != signed:
            raise RuleViolation(
                "dp-setup",
                f"round {e.round}'s DP accounting names other DP parameters than its signed "
                f"setup carried: {_differing(logged, signed)}",
            )
        delta = run.dp_budget[1]
        if e.delta != delta:
            raise RuleViolation(
                "dp-round",
                f"round {e.round}'s DP accounting is at delta {e.delta!r}, the run start's "
                f"budget at delta {delta!r}",
            )
        try:
            rho, eps = dp_accounting(e.dp_params, run.dp_rhos, delta)
        except ValueError as exc:
            raise RuleViolation("dp-round", f"round {e.round}: {exc}") from exc
        if not _close(e.rho, rho):
            raise RuleViolation(
                "dp-rho",
                f"round {e.round}'s logged rho {e.rho!r} differs from the rho {rho!r} its logged "
                "DP parameters give",
            )
        if not _close(e.epsilon_so_far, eps):
            raise RuleViolation(
                "dp-epsilon",
                f"round {e.round}'s logged epsilon {e.epsilon_so_far!r} differs from the epsilon "
                f"{eps!r} the run's logged rounds give at delta {delta:g}",
            )
        if eps > run.dp_budget[0] * (1 + DP_RELATIVE_TOLERANCE):
            raise RuleViolation(
                "dp-budget",
                f"round {e.round} takes the run to epsilon {eps:.6g}, past its budget "
                f"{run.dp_budget[0]:g} at delta {delta:g}",
            )
        run.dp_rhos.append(rho)
        run.dp_round = e.round
        run.dp_epsilon = eps
        self.dp_runs[run.run_id] = (len(run.dp_rhos), eps, delta)
