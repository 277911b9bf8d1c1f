"""The coordinator's audit-log writer (:class:`AuditLog`) and look-ups over a stored log.

Example (coordinator side)::

    log = AuditLog.open("audit.sqlite", signer=coordinator_key, now_ms=now(), log_id=os.urandom(16))
    log.append_roster_change(RosterAction.ENROL, "site-a", public_key_der=der, approved_roots=[root], now_ms=now())
    log.append_consortium_roster(signed_roster, authority_public_key, now_ms=now())  # verified first
    log.append_run_start(run_id, config_digest=c, initial_model_digest=m0, code_version="0.1.0", started_at_ms=now())
    log.append_envelope(MessageKind.MASKED_INPUT.type_name, payload, signature, key_id, accepted=True,
                        reason=None, site="site-a", round=1, stage="masked_input",
                        dataset_root=root, bulk_digest=d, num_examples=120, model_digest=m0)
    log.append_round_result(1, aggregate_digest=agg, new_model_digest=m1)   # survivors/inputs from the log
    head = log.sign_tree_head(now())                                        # after every round
    log.append_evaluation(1, metrics={"accuracy": 0.91, "loss": 0.3}, num_examples=600, sites=s)
    ...
    log.append_run_end(RunStatus.COMPLETED, ended_at_ms=now()); log.sign_tree_head(now())

Every append is checked against the run rules (:mod:`fedseal.audit.rules`) before it is written.
The writer does no I/O of its own: :meth:`AuditLog.open` opens the SQLite store of
:mod:`fedseal.audit.store`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.codec import decode_entry, encode_checked, encode_entry, entry_tags
from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    LOG_ID_BYTES,
    AuditEntry,
    Checkpoint,
    ConsortiumRosterRecord,
    DpRound,
    EntryKind,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    RosterAction,
    RosterChange,
    RoundRecord,
    RoundStatus,
    RunEnd,
    RunStart,
    RunStatus,
    absent_items,
    metric_items,
)
from fedseal.audit.errors import AuditStateError, AuditVerificationError, RuleViolation
from fedseal.audit.rules import RunRules, _Run, dp_accounting
from fedseal.audit.store import MerkleLogStore, StoredEntry
from fedseal.audit.treehead import SignedTreeHead
from fedseal.crypto.keys import public_key_to_der
from fedseal.protocol.consortium import SignedConsortiumRoster
from fedseal.protocol.roster import Roster
from fedseal.protocol.types import site_sort_key

__all__ = ["AuditLog", "ReceivedEnvelope", "find_input", "roster_from_log"]


@dataclass(frozen=True, slots=True)
class ReceivedEnvelope:
    """One envelope for :meth:`AuditLog.append_envelopes` (same fields as
    :meth:`AuditLog.append_envelope`)."""

    message_type: str
    payload: bytes
    signature: bytes
    signer_key_id: bytes
    accepted: bool
    reason: str | None
    site: str
    round: int
    stage: str
    dataset_root: bytes | None = None
    bulk_digest: bytes | None = None
    num_examples: int | None = None
    model_digest: bytes | None = None


class AuditLog:
    """The coordinator's append-only audit log (durable: every append is committed first).

    Every ``append_*`` checks the entry against the run's rules (the verifier's, minus
    signatures) *before* writing and raises :class:`AuditStateError` instead of recording an
    inconsistent history.

    The coordinator's sequence:

    1. ``open(path, signer=coordinator_key, now_ms=..., log_id=os.urandom(16))`` at start-up
       (an existing log resumes: roster and open run are rebuilt from indexed entries, and a
       round result left without a tree head by a crash is covered at once);
    2. ``append_roster_change`` for every enrolment (key DER + approved dataset roots), roots
       change and revocation — before the run that depends on it; ``append_consortium_roster``
       for the signed consortium roster the sites run under, at run start and whenever its
       version changes;
    3. ``append_run_start(run_id, config_digest=..., initial_model_digest=..., code_version=...)``;
    4. for each stage, every envelope received, accepted or rejected with its reason, *before*
       acting on it: ``append_envelope`` or, for a stage's replies at once, ``append_envelopes``
       (one fsync); accepted masked inputs carry dataset root, bulk digest, example count and
       the model digest they were trained from;
    5. ``append_round_result(round, aggregate_digest=..., new_model_digest=..., metrics=...,
       absent={site: why})`` (survivors and input digests default to the accepted inputs;
       ``absent``: the expected sites not in the sum, and why), then ``sign_tree_head``;
       ``append_checkpoint`` for each checkpoint written; ``append_evaluation`` once the new
       model's federated evaluation is aggregated;
    6. ``append_run_end(status, ended_at_ms=...)``, then ``sign_tree_head``.
    """

    def __init__(
        self, store: MerkleLogStore, signer: ec.EllipticCurvePrivateKey, genesis: Genesis
    ) -> None:
        self._store = store
        self._signer = signer
        self._genesis = genesis
        self._sem = RunRules()
        self._replay()
        # The last round result / run end, if no signed tree head covers it yet.
        latest = store.latest_tree_head()
        covered = 0 if latest is None else latest.tree_size
        closing = (
            store.find(int(EntryKind.ROUND_RESULT))[-1:] + store.find(int(EntryKind.RUN_END))[-1:]
        )
        last = max(closing, default=-1)
        self._uncovered: int | None = last if last >= covered else None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        signer: ec.EllipticCurvePrivateKey,
        now_ms: int,
        log_id: bytes | None = None,
        note: str = "",
    ) -> AuditLog:
        """Open the log at ``path``, creating it (with its genesis entry) if it is new.

        Args:
            path: SQLite file.
            signer: The coordinator's identity key; must be the genesis key of an existing log.
            now_ms: Current time (ms since the epoch), recorded in a new log's genesis.
            log_id: 16 random bytes naming a new log (required when creating it).
            note: Free text for a new log's genesis (e.g. the deployment name).

        Raises:
            AuditStateError: If ``signer`` is not the key the existing log was created with,
                or the existing log's roster / open run is inconsistent.
            fedseal.protocol.errors.DecodeError: If an entry needed to resume does not decode.
            ValueError: If a new log is created without a 16-byte ``log_id``.
            fedseal.audit.errors.LogFormatError: If the file is not a fedseal log.
        """
        store = MerkleLogStore.open(path)
        der = public_key_to_der(signer.public_key())
        if store.size == 0:
            if log_id is None or len(log_id) != LOG_ID_BYTES:
                store.close()
                raise ValueError("creating a log needs a 16-byte log_id")
            genesis = Genesis(log_id, der, now_ms, note)
            store.append(int(EntryKind.GENESIS), encode_entry(genesis))
        else:
            first = decode_entry(store.entries(0, 1)[0].data)
            if not isinstance(first, Genesis):
                store.close()
                raise AuditStateError("entry 0 is not a genesis entry")
            genesis = first
            if genesis.coordinator_key_der != der:
                store.close()
                raise AuditStateError("the log was created with another coordinator key")
        log = cls(store, signer, genesis)
        if log._uncovered is not None:
            # A coordinator killed between a round result and its tree head: sign it now.
            log.sign_tree_head(now_ms)
        return log

    def _replay(self) -> None:
        """Rebuild roster and open-run state from indexed entries (not a full scan)."""
        store, sem = self._store, self._sem
        sem.apply(0, self._genesis)
        wanted = sorted(
            store.find(int(EntryKind.ROSTER_CHANGE))
            + store.find(int(EntryKind.CONSORTIUM_ROSTER))
            + store.find(int(EntryKind.RUN_START))
            + store.find(int(EntryKind.RUN_END))
            + store.find(int(EntryKind.ROUND_RESULT))
            + store.find(int(EntryKind.EVALUATION))
            + store.find(int(EntryKind.DP_ROUND))
        )
        starts = store.find(int(EntryKind.RUN_START))
        ends = store.find(int(EntryKind.RUN_END))
        open_start = starts[-1] if starts and (not ends or ends[-1] < starts[-1]) else None
        envelopes: list[int] = []
        if open_start is not None:
            results = [i for i in store.find(int(EntryKind.ROUND_RESULT)) if i > open_start]
            last_round = 0
            if results:
                last = decode_entry(store.entries(results[-1], results[-1] + 1)[0].data)
                last_round = last.round if isinstance(last, RoundRecord) else 0
            envelopes = [
                i
                for i in store.find(int(EntryKind.ENVELOPE), round=last_round + 1)
                if i > open_start
            ]
        for index in sorted(wanted + envelopes):
            entry = decode_entry(store.entries(index, index + 1)[0].data)
            try:
                # Closed runs: only the roster and run-id bookkeeping matter.
                if open_start is None or index < open_start:
                    if isinstance(entry, RosterChange | ConsortiumRosterRecord):
                        sem.apply(index, entry, replay=True)
                    elif isinstance(entry, RunStart):
                        sem.run_ids.add(entry.run_id)
                    continue
                sem.apply(index, entry, replay=True)
            except RuleViolation as exc:
                raise AuditStateError(
                    f"the existing log is inconsistent at entry {index}: {exc.detail} "
                    "(run fl-audit verify)"
                ) from exc

    # -- properties ------------------------------------------------------------------------

    @property
    def store(self) -> MerkleLogStore:
        """The underlying store (for proofs and the audit service)."""
        return self._store

    @property
    def log_id(self) -> bytes:
        """This log's id."""
        return self._genesis.log_id

    @property
    def size(self) -> int:
        """Number of entries."""
        size: int = self._store.size
        return size

    @property
    def current_run_id(self) -> bytes | None:
        """The open run's id, if a run is open."""
        return None if self._sem.run is None else self._sem.run.run_id

    @property
    def current_model_digest(self) -> bytes | None:
        """The open run's current global model digest."""
        return None if self._sem.run is None else self._sem.run.model

    @property
    def last_round(self) -> int:
        """The open run's last finished round (0 before the first)."""
        return 0 if self._sem.run is None else self._sem.run.last_round

    def roster(self) -> Roster:
        """The roster as recorded in the log."""
        return self._sem.roster()

    @property
    def consortium_roster(self) -> ConsortiumRosterRecord | None:
        """The consortium roster logged last (of any consortium), or ``None``."""
        return self._sem.last_consortium

    def close(self) -> None:
        """Close the store."""
        self._store.close()

    # -- appends ---------------------------------------------------------------------------

    def _append(self, entry: AuditEntry) -> int:
        return self._append_many([entry])[0]

    def _append_many(self, items: Sequence[AuditEntry]) -> list[int]:
        """Check every entry against the rules, then write them all in one durable commit
        (index columns from :func:`entry_tags`, which the verifier checks them against).

        On any failure nothing is written and the in-memory state is rebuilt from the log.
        """
        first = self._store.size
        try:
            for k, entry in enumerate(items):
                try:
                    self._sem.apply(first + k, entry, replay=False)
                except RuleViolation as exc:
                    raise AuditStateError(
                        f"refusing to record {entry.KIND.label}"
                        + (f" (item {k} of the batch)" if len(items) > 1 else "")
                        + f": {exc.detail}"
                    ) from exc
            rows = [
                (kind, encode_checked(e), site, rnd)
                for e in items
                for kind, site, rnd in (entry_tags(e),)
            ]
            start: int = self._store.append_many(rows)
        except BaseException:
            self._sem = RunRules()
            self._replay()
            raise
        return list(range(start, start + len(items)))

    def append_roster_change(
        self,
        action: RosterAction,
        site: str,
        *,
        public_key_der: bytes = b"",
        approved_roots: Iterable[bytes] = (),
        reason: str = "",
        now_ms: int,
    ) -> int:
        """Record an enrolment (key + approved dataset roots), a roots change or a revocation.

        Returns:
            The entry's index (durable on return).

        Raises:
            AuditStateError: Enrolling an enrolled site, a key already used, or changing a
                site that is not enrolled.
            ValueError: Malformed fields.
        """
        roots = tuple(sorted(set(approved_roots)))
        return self._append(
            RosterChange(RosterAction(action), site, public_key_der, roots, reason, now_ms)
        )

    def append_consortium_roster(
        self,
        signed: SignedConsortiumRoster,
        authority_key: ec.EllipticCurvePublicKey,
        *,
        now_ms: int,
    ) -> int:
        """Record the signed consortium roster the sites run under (verify it first).

        The entry keeps the authority's signed bytes and signature verbatim and the authority's
        public key, so an auditor can re-verify it offline. Logging the same roster again (at
        the next run start) is allowed; an older version or another roster with a logged
        version is not.

        Returns:
            The entry's index (durable on return).

        Raises:
            AuditStateError: The signature does not verify under ``authority_key``, or the
                version is lower than the consortium's last logged one (or equal, with other
                contents).
            ValueError: Malformed fields (e.g. a roster over the entry's size bound).
        """
        payload = signed.payload
        entry = ConsortiumRosterRecord(
            signed.roster.consortium, signed.roster.version, hashlib.sha256(payload).digest(),
            payload, bytes(signed.signature), public_key_to_der(authority_key), now_ms,
        )  # fmt: skip
        return self._append(entry)

    def append_run_start(
        self,
        run_id: bytes,
        *,
        config_digest: bytes,
        initial_model_digest: bytes,
        code_version: str,
        started_at_ms: int,
        planned_rounds: int = 0,
        dp_budget: tuple[float, float] | None = None,
        settings: str = "",
    ) -> int:
        """Record a run start; the roster digest is the log roster's (enrol sites first).
        ``dp_budget``: the run's target ``(epsilon, delta)`` when its rounds are DP rounds
        (each completed round then needs its :meth:`append_dp_round`); ``settings``: the run
        settings the coordinator declares (:func:`~fedseal.audit.entries.canonical_settings`).

        Raises:
            AuditStateError: A run is open, or ``run_id`` was used before.
        """
        entry = RunStart(
            run_id, config_digest, self._sem.roster().digest(), initial_model_digest,
            code_version, started_at_ms, planned_rounds, dp_budget, settings,
        )  # fmt: skip
        return self._append(entry)

    def append_envelope(
        self,
        message_type: str,
        payload: bytes,
        signature: bytes,
        signer_key_id: bytes,
        *,
        accepted: bool,
        reason: str | None,
        site: str,
        round: int,
        stage: str,
        dataset_root: bytes | None = None,
        bulk_digest: bytes | None = None,
        num_examples: int | None = None,
        model_digest: bytes | None = None,
    ) -> int:
        """Record an envelope received from ``site``, accepted or rejected (with ``reason``).

        Record it *before* acting on it (adding an accepted input to the sum, answering).

        Raises:
            AuditStateError: An accepted envelope that the rules forbid (site not enrolled
                or revoked, wrong key, closed round, unapproved dataset root, second input,
                fields disagreeing with the signed payload).
            ValueError: Malformed fields (``reason`` must be given exactly when rejected).
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        entry = EnvelopeRecord(
            run.run_id, round, stage, site, message_type, bytes(signer_key_id), accepted,
            reason or "", bytes(payload), bytes(signature), dataset_root, bulk_digest,
            num_examples, model_digest,
        )  # fmt: skip
        return self._append(entry)

    def append_envelopes(self, envelopes: Sequence[ReceivedEnvelope]) -> list[int]:
        """Record a batch of received envelopes in one durable commit (group commit).

        The natural unit is one stage's replies (e.g. what ``Grid.send_and_receive`` returned):
        one fsync instead of one per envelope. All or nothing: if any envelope breaks the rules,
        none is written.

        Returns:
            The entries' indices, in order.

        Raises:
            AuditStateError: As for :meth:`append_envelope`, naming the offending item.
            ValueError: Malformed fields.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        items: list[AuditEntry] = []
        for e in envelopes:
            record = EnvelopeRecord(
                run.run_id, e.round, e.stage, e.site, e.message_type, bytes(e.signer_key_id),
                e.accepted, e.reason or "", bytes(e.payload), bytes(e.signature), e.dataset_root,
                e.bulk_digest, e.num_examples, e.model_digest,
            )  # fmt: skip
            items.append(record)
        return self._append_many(items)

    def append_round_result(
        self,
        round: int,
        *,
        aggregate_digest: bytes | None,
        new_model_digest: bytes,
        survivors: Iterable[str] | None = None,
        accepted_input_digests: Iterable[bytes] | None = None,
        status: RoundStatus = RoundStatus.COMPLETED,
        reason: str = "",
        metrics: Mapping[str, float] | None = None,
        dp_params: bytes | None = None,
        absent: Mapping[str, str] | None = None,
    ) -> int:
        """Record a round's outcome. ``survivors``/``accepted_input_digests`` default to what
        the log recorded for the round (if given, they must equal it). ``dp_params``: the
        canonical ``DpParams`` bytes of a DP round whose noisy sum was unmasked (completed, or
        failed after that); its :class:`DpRound` accounting entry is then written with the
        result, in the same commit. ``absent``: each site expected in the round that is not in
        its sum -> why, one printable line (:attr:`RoundRecord.absent`; at most
        :data:`~fedseal.audit.entries.MAX_ABSENT_SITES` sites, reasons of at most
        :data:`~fedseal.audit.entries.MAX_ABSENT_REASON` bytes).

        Raises:
            AuditStateError: Wrong round number, inputs or survivors differing from the
                accepted envelopes, a failed round that changes the model, an absent site that
                is not enrolled or whose masked input the round accepted, or no
                tree head signed since the previous round result.
            ValueError: ``absent`` is malformed: not strings, too many sites, a reason empty,
                over its bound or more than one printable line.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        surv = tuple(
            sorted(set(survivors if survivors is not None else run.inputs), key=site_sort_key)
        )
        digests = tuple(
            sorted(
                set(
                    accepted_input_digests
                    if accepted_input_digests is not None
                    else run.inputs.values()
                )
            )
        )
        metric_values = metric_items(metrics)
        if dp_params is None and status == RoundStatus.FAILED:
            # A failed DP round that accepted masked inputs counts as released (the rules'
            # released_dp), e.g. one a coordinator restarted mid-round writes: its accounting
            # goes with it.
            with contextlib.suppress(RuleViolation):  # the result's own check then names it
                released = self._sem.released_dp()
                dp_params = None if released is None else released.to_bytes()
        entry = RoundRecord(
            run.run_id, round, RoundStatus(status), run.model, surv, digests, aggregate_digest,
            new_model_digest, reason, metric_values, absent_items(absent),
        )  # fmt: skip
        self._require_covered()
        if dp_params is not None:
            # One durable commit: a crash cannot leave a DP round without its accounting
            # (a failed round's too: it accepted masked inputs, its privacy counts as spent).
            index = self._append_many([entry, self._dp_entry(run, round, dp_params)])[0]
        else:
            index = self._append(entry)
        self._uncovered = index
        return index

    def _dp_entry(self, run: _Run, round: int, dp_params: bytes) -> DpRound:
        if run.dp_budget is None:
            raise AuditStateError(
                "refusing to record DP accounting: the run start has no DP budget"
            )
        delta = run.dp_budget[1]
        try:
            rho, eps = dp_accounting(dp_params, run.dp_rhos, delta)
        except ValueError as exc:
            raise AuditStateError(f"refusing to record DP accounting: {exc}") from exc
        return DpRound(run.run_id, round, dp_params, rho, eps, delta)

    def append_dp_round(self, round: int, *, dp_params: bytes) -> int:
        """Record the privacy accounting of ``round`` (completed, the last logged; see
        :class:`DpRound`): its ρ from the canonical ``DpParams`` bytes, and the run's ε so far
        at the run start's δ, computed here as the verifier recomputes them.

        Raises:
            AuditStateError: No run open, a run without DP budget, not the last round, a
                failed round, a second entry for the round, or parameters without privacy.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        return self._append(self._dp_entry(run, round, dp_params))

    @property
    def dp_rhos(self) -> tuple[float, ...]:
        """The open run's logged DP rounds' ρ, in order (empty without a DP run)."""
        return () if self._sem.run is None else tuple(self._sem.run.dp_rhos)

    @property
    def dp_budget(self) -> tuple[float, float] | None:
        """The open run's ``(epsilon, delta)`` budget if it is a DP run."""
        return None if self._sem.run is None else self._sem.run.dp_budget

    def _require_covered(self) -> None:
        if self._uncovered is not None:
            raise AuditStateError(
                f"entry {self._uncovered} (a round result or run end) has no signed tree head "
                "yet: call sign_tree_head() after every round result and after the run end"
            )

    def append_checkpoint(
        self, round: int, *, model_digest: bytes, file_digest: bytes, name: str
    ) -> int:
        """Record a checkpoint file written after ``round``.

        Raises:
            AuditStateError: No run open, or the model is not that round's.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        return self._append(Checkpoint(run.run_id, round, model_digest, file_digest, name))

    def append_evaluation(
        self,
        round: int,
        *,
        metrics: Mapping[str, float],
        num_examples: int,
        sites: Iterable[str] = (),
        model_digest: bytes | None = None,
        now_ms: int = 0,
    ) -> int:
        """Record the federated evaluation of ``round``'s new model (see :class:`Evaluation`):
        after its round result and checkpoint, before the next round's result.

        Args:
            round: The round whose new model was evaluated (the last round logged).
            metrics: Aggregated metrics (e.g. ``accuracy``, ``loss``, ``macro-f1``), finite.
            num_examples: Evaluation examples the metrics cover.
            sites: The sites whose evaluation replies were aggregated.
            model_digest: The model evaluated (default: the round's new model; if given, it
                must be that).
            now_ms: When the evaluation was aggregated.

        Raises:
            AuditStateError: No run open, not the last round, a failed round, a second
                evaluation of the round, another model, or a site that is not enrolled.
            ValueError: A metric that is not finite or out of range, or a bad metric name.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        entry = Evaluation(
            run.run_id, round, run.model if model_digest is None else model_digest, num_examples,
            tuple(sorted(set(sites), key=site_sort_key)), metric_items(metrics), now_ms,
        )  # fmt: skip
        return self._append(entry)

    def append_run_end(self, status: RunStatus, *, ended_at_ms: int, reason: str = "") -> int:
        """Record the end of the open run (with its final model). Sign a tree head after it.

        Raises:
            AuditStateError: No run open, or no tree head was signed after the last round.
        """
        run = self._sem.run
        if run is None:
            raise AuditStateError("no run is open")
        entry = RunEnd(
            run.run_id, RunStatus(status), run.last_round, run.model, ended_at_ms, reason
        )
        self._require_covered()
        index = self._append(entry)
        self._uncovered = index
        return index

    # -- tree heads and proofs -------------------------------------------------------------

    def sign_tree_head(self, now_ms: int) -> SignedTreeHead:
        """Sign and store a tree head over the whole log.

        Raises:
            AuditStateError: If ``now_ms`` is earlier than the latest tree head's time.
        """
        size = self._store.size
        latest = self._store.latest_tree_head()
        if latest is not None and now_ms < latest.timestamp_ms:
            raise AuditStateError("clock went backwards since the last tree head")
        head = SignedTreeHead.create(
            self._signer, log_id=self.log_id, tree_size=size, root_hash=self._store.root(size),
            timestamp_ms=now_ms,
        )  # fmt: skip
        self._store.add_tree_head(size, head.root_hash, now_ms, head.to_bytes())
        self._uncovered = None
        return head

    def latest_tree_head(self) -> SignedTreeHead | None:
        """The latest signed tree head, if any."""
        stored = self._store.latest_tree_head()
        return None if stored is None else SignedTreeHead.from_bytes(stored.blob)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """Inclusion proof of entry ``index`` in the tree of ``tree_size`` entries."""
        proof: list[bytes] = self._store.inclusion_proof(index, tree_size)
        return proof

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Consistency proof between two tree sizes."""
        proof: list[bytes] = self._store.consistency_proof(old_size, new_size)
        return proof

    def entries(self, start: int, end: int) -> list[StoredEntry]:
        """Stored entries ``[start, end)``."""
        found: list[StoredEntry] = self._store.entries(start, end)
        return found

    def find_input(self, site: str, round: int, run_id: bytes | None = None) -> int | None:
        """Index of ``site``'s accepted input envelope in ``round`` (of ``run_id``, default the
        latest run), or ``None``."""
        return find_input(self._store, site, round, run_id)


def roster_from_log(store: MerkleLogStore) -> Roster:
    """The roster as the log's roster-change entries define it (genesis excluded).

    Raises:
        AuditVerificationError: If a roster change is malformed or inconsistent.
        DecodeError: If a roster-change entry does not decode.
    """
    sem = RunRules()
    for index in store.find(int(EntryKind.ROSTER_CHANGE)):
        entry = decode_entry(store.entries(index, index + 1)[0].data)
        if not isinstance(entry, RosterChange):
            raise AuditVerificationError(
                "roster", "entry tagged as a roster change is not one", index=index
            )
        try:
            sem.apply(index, entry)
        except RuleViolation as exc:
            raise AuditVerificationError(exc.check, exc.detail, index=index) from exc
    return sem.roster()


def find_input(
    store: MerkleLogStore, site: str, round: int, run_id: bytes | None = None
) -> int | None:
    """Index of ``site``'s accepted input envelope in ``round`` (latest run unless ``run_id``).

    Decodes the candidate entries (the store's tags are only hints).
    """
    found: int | None = None
    for index in store.find(int(EntryKind.ENVELOPE), round=round, site=site):
        entry = decode_entry(store.entries(index, index + 1)[0].data)
        if (
            isinstance(entry, EnvelopeRecord)
            and entry.accepted
            and entry.message_type == INPUT_MESSAGE_TYPE
            and entry.site == site
            and entry.round == round
            and (run_id is None or entry.run_id == run_id)
        ):
            found = index
    return found
