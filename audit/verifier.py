"""The offline verifier of a whole audit log: hashes, signatures, tree heads, run rules and
every unsigned copy the store keeps.

Example (auditor side)::

    # what fl-audit verify does: the entries, the signed tree heads, and every unsigned copy
    # the store keeps (index columns, tree-head columns, the nodes cache):
    summary = AuditVerifier(coordinator_key=pinned).verify_store(store)
    # the entries and tree heads only (e.g. entries obtained from elsewhere):
    summary = AuditVerifier(coordinator_key=pinned).run(store.iter_entries(), store.tree_heads())

Trust anchor: without ``coordinator_key`` the verifier checks the tree heads against the key the
log's own genesis entry names, so a log forged wholesale under a fresh key verifies. An auditor
pins the coordinator's public key (``fl-audit verify --coordinator-key``); ``VerifiedLog``
records which key was used and whether it was pinned.

The verifier, in numbered steps, for each entry in index order:

1. the index follows the previous one (a gap is a deleted entry);
2. the stored leaf hash equals ``leaf_hash(entry bytes)``;
3. the bytes decode canonically (:mod:`fedseal.audit.codec`);
4. the run rules hold (:mod:`fedseal.audit.rules`; :class:`AuditVerifier` lists them);
   accepted envelopes queue a signature check (:mod:`fedseal.audit.signatures`) against the key
   enrolled *in the log* (and in a trusted roster if given);
5. every tree head whose size is reached has a valid coordinator signature and the root
   recomputed from the entries so far (a :class:`~fedseal.crypto.merkle.CompactRange`);
6. with :meth:`AuditVerifier.verify_store`, the store's unsigned copies (index columns, tree
   head columns, the ``nodes`` cache) equal what the entries and signed tree heads say.

Hot paths (each checks exactly what the general code checks, and hands anything unusual to
it): envelope entries decode in one pass, and the store is scanned as plain ``(index, bytes,
stored leaf hash)`` rows. Nothing is skipped: every leaf hash and tree node is recomputed from
the entry bytes, every signature and tree head is verified.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.codec import ENVELOPE_PREFIX, decode_entry, decode_envelope_fast, entry_tags
from fedseal.audit.entries import (
    AuditEntry,
    EntryKind,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    RoundRecord,
    RunEnd,
)
from fedseal.audit.errors import AuditVerificationError, RuleViolation
from fedseal.audit.rules import RunRules, dp_accounting
from fedseal.audit.signatures import (
    JobFailure,
    SignatureBatchCheck,
    SignatureBatchSubmit,
    SignatureJob,
    check_signatures_serial,
)
from fedseal.audit.store import MerkleLogStore, StoredEntry, StoredTreeHead, node_id
from fedseal.audit.treehead import SignedTreeHead
from fedseal.crypto.keys import public_key_from_der, public_key_to_der
from fedseal.crypto.merkle import CompactRange, leaf_hash
from fedseal.protocol.errors import BadSignatureError, DecodeError
from fedseal.protocol.roster import Roster

__all__ = ["AuditVerifier", "VerifiedLog", "verify_audit_log"]

_ENVELOPE_LABEL = EntryKind.ENVELOPE.label


def _ready(result: JobFailure | None) -> Callable[[], JobFailure | None]:
    return lambda: result


@dataclass(frozen=True, slots=True)
class VerifiedLog:
    """Facts about a log that passed verification.

    Attributes:
        entries: Number of entries checked.
        tree_heads: Number of signed tree heads checked.
        signatures: Number of site signatures checked.
        runs: ``(run_id hex, status or "open", completed rounds, failed rounds)`` per run.
        accepted_envelopes: Accepted envelopes.
        rejected_envelopes: Rejected envelopes.
        root_hash: Root of the whole log.
        warnings: Facts that are not failures (an open run, entries after the last tree head).
        consortium_rosters: ``(consortium, latest version, roster digest hex, authority key id
            hex)`` per consortium whose signed roster the log records.
        coordinator_key_id: Key id (hex) of the coordinator key the tree heads verified under:
            the pinned key, or, without one, the key the log's own genesis entry names.
        coordinator_key_pinned: Whether that key was pinned by the caller (a trust anchor) or
            only taken from the log itself.
        evaluations: Number of evaluation entries (per-round evaluation metrics).
        signed_entries: Entries covered by the largest signed tree head (``[0, signed_entries)``);
            any after it (``entries - signed_entries``) are signed by nobody: anyone who can
            write the file can append them.
        open_run: Whether the last run has not ended (its run end is not in the log).
        dp_runs: ``(run id hex, DP rounds, epsilon, delta)`` per DP run: the site-level
            (epsilon, delta)-DP of its released sums, recomputed from the logged parameters.
    """

    entries: int
    tree_heads: int
    signatures: int
    runs: tuple[tuple[str, str, int, int], ...]
    accepted_envelopes: int
    rejected_envelopes: int
    root_hash: bytes
    warnings: tuple[str, ...]
    consortium_rosters: tuple[tuple[str, int, str, str], ...] = ()
    coordinator_key_id: str = ""
    coordinator_key_pinned: bool = False
    evaluations: int = 0
    signed_entries: int = 0
    open_run: bool = False
    dp_runs: tuple[tuple[str, int, float, float], ...] = ()


def _count_open_dp_round(
    sem: RunRules, dp_runs: dict[bytes, tuple[int, float, float]]
) -> list[str]:
    """Count the open round of an open DP run in ``dp_runs`` when it accepted masked inputs
    (the coordinator holds them: released, docs/dp.md §7), though its result is not logged
    yet; return the warning that says so (none if there is no such round)."""
    run = sem.run
    try:
        pending = sem.released_dp()
    except RuleViolation as exc:  # e.g. its setup is missing: the result would be refused
        return [
            f"the open round of run {run.run_id.hex() if run else ''} cannot be accounted: {exc.detail}"
        ]
    if run is None or pending is None or run.dp_budget is None:
        return []
    rho, eps = dp_accounting(pending.to_bytes(), run.dp_rhos, run.dp_budget[1])
    dp_runs[run.run_id] = (len(run.dp_rhos) + 1, eps, run.dp_budget[1])
    return [
        f"run {run.run_id.hex()}: round {run.last_round + 1} accepted masked inputs and has no "
        f"result yet: its privacy is counted (rho {rho:.4g}, epsilon {eps:.4g} so far)"
    ]


class AuditVerifier:
    """Offline verification of a whole log.

    Run semantics checked (besides hashes and signatures):

    * entry 0 is the genesis; tree heads verify under its coordinator key (and equal a pinned
      key if one is given);
    * roster: enrol only unenrolled sites with valid, unshared keys (equal to the trusted
      roster's if given); roots replaced / revocations only for active sites; a dataset root
      is withdrawn (with its reason) once, only if approved for the site, and from then on no
      roster change approves it again and no accepted input carries it (the failure names the
      round, the site and the withdrawal);
    * consortium rosters: the signed roster decodes and agrees with the recorded consortium,
      version and digest, its signature verifies under the authority key recorded with it (the
      pinned authority key, if given), and a consortium's version never goes down (the same
      version is always the same roster);
    * runs: a run starts only when none is open, with a fresh run id and the log roster's
      digest; run-scoped entries name the open run;
    * accepted envelopes: for the open round only, from an active enrolled site, signed by its
      enrolled key (signature checked), never the same signed content twice, made from the
      round's model; inputs carry an approved dataset root and come once per site; protocol
      payloads decode and agree with the recorded fields;
    * round results: consecutive rounds (none missing or duplicated), starting from the
      previous model, listing exactly the accepted inputs and their senders; a failed round
      leaves the model unchanged; the sites a result names absent (with why) are enrolled
      sites, none of them also among the round's accepted inputs; checkpoints and run
      ends name the right model;
    * evaluations: at most one per round, of the last round logged, a completed one, naming
      its new model, counting only enrolled sites;
    * DP accounting (runs whose start carries a DP budget): exactly one entry per completed
      round, after its result and before the next result or the run end, at the run's delta;
      its rho and epsilon so far are recomputed from the logged DpParams
      (:func:`fedseal.privacy.dp_round_noise`, ``round_rho``, ``epsilon``) and must agree to
      1e-9 relative, and epsilon never passes the run's budget;
    * a signed tree head covers every round result before the next round's result (or the run
      end) and the run end itself; tree heads never go backwards in size or time.

    Rejected envelopes are evidence of what the coordinator refused (often *because* the
    signature or enrolment was bad): their signatures are not required to verify, and they
    count towards no aggregate.
    """

    def __init__(
        self,
        *,
        coordinator_key: ec.EllipticCurvePublicKey | None = None,
        trusted_roster: Roster | None = None,
        consortium_authority: ec.EllipticCurvePublicKey | None = None,
        check_signatures: SignatureBatchCheck = check_signatures_serial,
        submit_signatures: SignatureBatchSubmit | None = None,
        batch_size: int = 1024,
        max_outstanding: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Args:
        coordinator_key: Pinned coordinator key (else the genesis key is used).
        trusted_roster: Sites' keys and approved roots the log must agree with.
        consortium_authority: Pinned roster authority key: every consortium roster entry
            must be signed by it.
        check_signatures: Checks a batch synchronously (used if ``submit_signatures`` is None).
        submit_signatures: Starts checking a batch and returns a function that waits for
            the result, so signature checks overlap with the in-order semantic checks.
        batch_size: Jobs per batch.
        max_outstanding: Batches in flight before the oldest is awaited.
        progress: Called with the number of entries checked so far.
        """
        self._pinned = coordinator_key
        self._trusted = trusted_roster
        self._authority = (
            None if consortium_authority is None else public_key_to_der(consortium_authority)
        )
        check = check_signatures
        self._submit: SignatureBatchSubmit = submit_signatures or (lambda jobs: _ready(check(jobs)))
        self._batch = batch_size
        self._max_outstanding = max_outstanding
        self._progress = progress

    def run(
        self, entries: Iterable[StoredEntry], tree_heads: Sequence[StoredTreeHead]
    ) -> VerifiedLog:
        """Verify; return facts, or raise naming the first bad place.

        Raises:
            AuditVerificationError: The first failure (lowest entry index).
        """
        return self.run_rows(((e.index, e.data, e.leaf_hash) for e in entries), tree_heads)

    def verify_store(self, store: MerkleLogStore) -> VerifiedLog:
        """Verify the log in ``store`` *and every unsigned copy the store keeps*, i.e. every
        value any reader of the store (look-ups, proofs, ``fl-audit show``) relies on:

        * ``entries``: the ``data`` and ``leaf_hash`` columns are BLOBs, the leaf hash is the
          hash of the data, and the index columns ``kind``, ``site`` and ``round`` are exactly
          :func:`entry_tags` of the decoded entry (types included);
        * ``tree_heads``: ``seq`` runs 1, 2, 3, … (none deleted or renumbered), ``blob`` decodes,
          and ``tree_size``, ``root_hash`` and ``timestamp_ms`` equal the signed values;
        * ``nodes``: every row is the root of a complete subtree of the tree recomputed from the
          entry bytes, under its key, and every such subtree has its row (none missing, edited
          or added).

        A failure names the table, the row and the column.

        Raises:
            AuditVerificationError: The first failure.
            fedseal.audit.errors.LogFormatError: The database cannot be read.
        """
        problem = store.integrity_problem()
        if problem is not None:
            raise AuditVerificationError("integrity", problem)
        heads = _check_tree_head_rows(store.tree_head_rows())
        return self.run_rows(store.iter_leaf_rows(raw=True), heads, store=store)

    def run_rows(
        self,
        rows: Iterable[tuple[int, bytes, bytes]],
        tree_heads: Sequence[StoredTreeHead],
        *,
        store: MerkleLogStore | None = None,
    ) -> VerifiedLog:
        """:meth:`run` over plain ``(index, entry bytes, stored leaf hash)`` rows, e.g.
        :meth:`fedseal.audit.store.MerkleLogStore.iter_leaf_rows` (no per-entry objects).

        The stored leaf hash is only compared with the one recomputed from the bytes; the tree
        is always rebuilt from the recomputed hashes. With ``store`` (the store ``rows`` come
        from), its index columns and its ``nodes`` cache are checked too (see
        :meth:`verify_store`, which also checks the tree-head columns).

        Raises:
            AuditVerificationError: The first failure (lowest entry index).
        """
        sem = RunRules(self._trusted, inline_checks=False, consortium_authority=self._authority)
        index_rows = None if store is None else iter(store.iter_index_rows())
        node_rows: list[Iterator[tuple[int, object]]] = []  # per height - 1, from the store
        evaluations = 0
        heads = _decode_heads(tree_heads)
        by_size: dict[int, list[tuple[int, SignedTreeHead]]] = {}
        for seq, head in heads:
            by_size.setdefault(head.tree_size, []).append((seq, head))
        pending: list[SignatureJob] = []
        signatures = 0
        tree = CompactRange()  # the compact range [0, n)
        n = 0
        coordinator: ec.EllipticCurvePublicKey | None = None
        need_head_after: int | None = None  # index of a round result / run end awaiting an STH
        last_kind = ""

        outstanding: list[tuple[list[SignatureJob], Callable[[], JobFailure | None]]] = []

        def resolve_oldest() -> None:
            nonlocal signatures
            jobs, result = outstanding.pop(0)
            bad = result()
            signatures += len(jobs) if bad is None else bad.position
            if bad is not None:
                outstanding.clear()
                job = jobs[bad.position]
                raise AuditVerificationError(
                    bad.check,
                    bad.detail,
                    index=job.index,
                    entry_type=EntryKind.ENVELOPE.label,
                    site=job.record.site,
                    round=job.record.round,
                )

        def flush(before: int | None, *, resolve: bool) -> None:
            nonlocal pending
            jobs = pending if before is None else [j for j in pending if j.index < before]
            pending = [] if before is None else [j for j in pending if j.index >= before]
            if jobs:
                outstanding.append((jobs, self._submit(jobs)))
            while outstanding and (resolve or len(outstanding) > self._max_outstanding):
                resolve_oldest()

        def fail(
            check: str,
            detail: str,
            index: int | None,
            entry_type: str | None,
            tree_head_seq: int | None = None,
        ) -> NoReturn:
            flush(index, resolve=True)
            raise AuditVerificationError(
                check, detail, index=index, entry_type=entry_type, tree_head_seq=tree_head_seq
            )

        def check_node(source: MerkleLogStore, height: int, k: int, value: bytes) -> None:
            """The stored node of subtree ``k`` at ``height`` (just recomputed) is ``value``."""
            while len(node_rows) < height:
                node_rows.append(iter(source.iter_node_rows(len(node_rows) + 1)))
            want = node_id(height, k)
            what = f"(height {height}, entries [{k << height}, {(k + 1) << height}))"
            row = next(node_rows[height - 1], None)
            if row is None or row[0] > want:
                fail("node-cache", f"nodes row id={want} {what} is missing", None, None)
            if row[0] < want:
                fail(
                    "node-cache",
                    f"nodes row id={row[0]} is not a subtree of the tree (next expected: id={want} "
                    f"{what})",
                    None,
                    None,
                )
            if type(row[1]) is not bytes or not compare(row[1], value):
                fail(
                    "node-cache",
                    f"nodes row id={want} {what}: column hash holds {_sql_repr(row[1])}, not the "
                    "root of those entries recomputed from their bytes",
                    None,
                    None,
                )

        node_sink = None if store is None else functools.partial(check_node, store)
        compare = hmac.compare_digest
        batch = self._batch
        progress = self._progress
        envelope = sem.envelope
        for index, data, stored_lh in rows:
            if index != n:
                fail(
                    "missing-entry", f"entry {n} is missing (next stored index is {index})", n, None
                )
            if type(data) is not bytes or type(stored_lh) is not bytes:
                column, value = (
                    ("data", data) if type(data) is not bytes else ("leaf_hash", stored_lh)
                )
                fail(
                    "column-type",
                    f"entries row idx={index}: column {column} holds {_sql_repr(value)}, not a BLOB",
                    index,
                    None,
                )
            lh = leaf_hash(data)  # recomputed from the bytes; the stored copy is only compared
            if not compare(lh, stored_lh):
                fail(
                    "leaf-hash",
                    "stored leaf hash differs from the hash of the entry bytes",
                    index,
                    _peek_kind(data),
                )
            # Envelope entries (nearly all of a log) go straight to their one-pass decoder.
            entry: AuditEntry | None = (
                decode_envelope_fast(data)
                if type(data) is bytes and data[:2] == ENVELOPE_PREFIX
                else None
            )
            if entry is None:
                try:
                    entry = decode_entry(data)
                except DecodeError as exc:
                    fail("decode", exc.message, index, _peek_kind(data))
            if type(entry) is EnvelopeRecord:
                # The hot path: one accepted or rejected envelope.
                try:
                    job = envelope(index, entry, data)
                except RuleViolation as exc:
                    fail(exc.check, exc.detail, index, _ENVELOPE_LABEL)
                if job is not None:
                    pending.append(job)
                    if len(pending) >= batch:
                        flush(None, resolve=False)
            else:
                kind_label = entry.KIND.label
                closing = isinstance(entry, (RoundRecord, RunEnd))
                if closing and need_head_after is not None:
                    fail(
                        "missing-tree-head",
                        f"no signed tree head after {last_kind} entry {need_head_after}",
                        need_head_after,
                        last_kind,
                    )
                try:
                    sem.apply(index, entry, data=data)
                except RuleViolation as exc:
                    fail(exc.check, exc.detail, index, kind_label)
                if isinstance(entry, Genesis):
                    coordinator = public_key_from_der(entry.coordinator_key_der)
                    pinned_der = None if self._pinned is None else public_key_to_der(self._pinned)
                    if pinned_der is not None and pinned_der != entry.coordinator_key_der:
                        fail(
                            "coordinator-key",
                            "the log's genesis names coordinator key "
                            f"{hashlib.sha256(entry.coordinator_key_der).hexdigest()}, not the "
                            f"pinned coordinator key {hashlib.sha256(pinned_der).hexdigest()}",
                            index,
                            kind_label,
                        )
                if closing:
                    need_head_after, last_kind = index, kind_label
                elif type(entry) is Evaluation:
                    evaluations += 1
            if index_rows is not None:
                tags = next(index_rows, None)
                if tags is None or tags[0] != index:
                    fail("index-column", f"entries row idx={index}: index columns unreadable",
                         index, entry.KIND.label)  # fmt: skip
                _check_tags(index, tags[1:], entry, fail)
            # RFC 9162 §2.1.1 by a compact range; every subtree it completes is checked
            # against the store's nodes cache.
            tree.append(lh, node_sink)
            n += 1
            if n in by_size:
                for seq, head in by_size[n]:
                    root = tree.root()
                    self._check_head(seq, head, root, sem.genesis, coordinator, fail)
                    if need_head_after is not None and n > need_head_after:
                        need_head_after = None
            if progress is not None and n % 65536 == 0:
                progress(n)
        flush(None, resolve=True)
        if n == 0:
            raise AuditVerificationError("empty", "the log holds no entries")
        if store is not None:
            for h, stream in enumerate(node_rows, 1):
                extra = next(stream, None)
                if extra is not None:
                    raise AuditVerificationError(
                        "node-cache",
                        f"nodes row id={extra[0]} (height {h}) is not a complete subtree of the "
                        f"{n} entries",
                    )
            stray = store.node_ids_outside(max(len(node_rows), 1))
            if stray:
                raise AuditVerificationError(
                    "node-cache",
                    f"nodes row id={stray[0]} is not a complete subtree of the {n} entries",
                )
        for seq, head in heads:
            if head.tree_size > n:
                raise AuditVerificationError(
                    "truncated",
                    f"tree head claims {head.tree_size} entries but the log holds {n} (entries removed)",
                    tree_head_seq=seq,
                )
        warnings = []
        if need_head_after is not None:
            if last_kind == EntryKind.RUN_END.label:
                raise AuditVerificationError(
                    "missing-tree-head",
                    "no signed tree head covers the run end",
                    index=need_head_after,
                    entry_type=last_kind,
                )
            warnings.append(f"no signed tree head yet after {last_kind} entry {need_head_after}")
        covered = max((h.tree_size for _, h in heads), default=0)
        if covered < n:
            warnings.append(
                f"entries {covered}..{n - 1} are not covered by a signed tree head (unsigned: "
                "anyone who can write the file can append them)"
            )
        runs = [(r.hex(), s.name.lower() if s else "open", c, f) for r, s, c, f, _ in sem.runs]
        dp_runs = dict(sem.dp_runs)
        if sem.run is not None:
            warnings.append(f"run {sem.run.run_id.hex()} has not ended")
            runs.append(
                (sem.run.run_id.hex(), "open", sem.run.rounds_completed, sem.run.rounds_failed)
            )
            warnings.extend(_count_open_dp_round(sem, dp_runs))
        if self._progress is not None:
            self._progress(n)
        return VerifiedLog(
            entries=n,
            tree_heads=len(heads),
            signatures=signatures,
            runs=tuple(runs),
            accepted_envelopes=sem.accepted,
            rejected_envelopes=sem.rejected,
            root_hash=tree.root(),
            warnings=tuple(warnings),
            consortium_rosters=tuple(
                (c.consortium, c.version, c.roster_digest.hex(), c.authority_key_id.hex())
                for c in sem.consortia.values()
            ),
            coordinator_key_id=(
                "" if sem.genesis is None
                else hashlib.sha256(sem.genesis.coordinator_key_der).hexdigest()
            ),
            coordinator_key_pinned=self._pinned is not None,
            evaluations=evaluations,
            signed_entries=covered,
            open_run=sem.run is not None,
            dp_runs=tuple((r.hex(), *v) for r, v in dp_runs.items()),
        )  # fmt: skip

    def _check_head(
        self,
        seq: int,
        head: SignedTreeHead,
        root: bytes,
        genesis: Genesis | None,
        coordinator: ec.EllipticCurvePublicKey | None,
        fail: Callable[..., NoReturn],
    ) -> None:
        if genesis is None or coordinator is None:
            fail("tree-head", "tree head before the genesis entry", None, None, tree_head_seq=seq)
        if head.log_id != genesis.log_id:
            fail("tree-head-log-id", "tree head names another log", None, None, tree_head_seq=seq)
        try:
            head.verify(coordinator)
        except BadSignatureError:
            fail(
                "tree-head-signature",
                "coordinator signature does not verify",
                None,
                None,
                tree_head_seq=seq,
            )
        if not hmac.compare_digest(head.root_hash, root):
            fail(
                "tree-head-root",
                f"signed root differs from the root of entries [0, {head.tree_size}): "
                "an entry was altered, inserted, removed or reordered",
                None, None, tree_head_seq=seq,
            )  # fmt: skip


def _peek_kind(data: bytes) -> str | None:
    if len(data) >= 2:
        try:
            return EntryKind(data[1]).label
        except ValueError:
            return None
    return None


def _sql_repr(value: object) -> str:
    """A stored value as a reader sees it: its SQLite type and a short rendering."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        shown = value[:16].hex() + ("…" if len(value) > 16 else "")
        return f"BLOB {shown or '(empty)'} ({len(value)} bytes)"
    if isinstance(value, str):
        return f"TEXT {value[:40]!r}"
    if isinstance(value, int):
        return f"INTEGER {value}"
    if isinstance(value, float):
        return f"REAL {value!r}"
    return f"{type(value).__name__} {value!r}"


_TAG_COLUMNS = ("kind", "site", "round")


def _check_tags(
    index: int, stored: Sequence[object], entry: AuditEntry, fail: Callable[..., NoReturn]
) -> None:
    """The index columns ``(kind, site, round)`` of row ``index`` are :func:`entry_tags`."""
    for column, have, want in zip(_TAG_COLUMNS, stored, entry_tags(entry), strict=True):
        if type(have) is not type(want) or have != want:
            fail(
                "index-column",
                f"entries row idx={index}: column {column} holds {_sql_repr(have)}, the entry "
                f"says {_sql_repr(want)}",
                index,
                entry.KIND.label,
            )


def _check_tree_head_rows(
    rows: Sequence[tuple[int, object, object, object, object]],
) -> list[StoredTreeHead]:
    """Check the raw ``tree_heads`` rows against their signed blobs; return them as heads.

    ``seq`` must run 1, 2, 3, … (a gap is a deleted tree head), ``blob`` must be a BLOB that
    decodes, and ``tree_size``, ``root_hash`` and ``timestamp_ms`` must be the signed values
    (types included). Signatures are checked later, with the entries.

    Raises:
        AuditVerificationError: Naming the row and the column.
    """
    heads = []
    seen: dict[bytes, int] = {}
    for expected, (seq, size, root, ts, blob) in enumerate(rows, 1):
        if seq != expected:
            raise AuditVerificationError(
                "tree-head-seq",
                f"tree_heads row seq={seq}: expected seq={expected} (tree heads are numbered "
                "from 1 without gaps: one was deleted or renumbered)",
                tree_head_seq=seq,
            )
        if type(blob) is not bytes:
            raise AuditVerificationError(
                "tree-head-column",
                f"tree_heads row seq={seq}: column blob holds {_sql_repr(blob)}, not a BLOB",
                tree_head_seq=seq,
            )
        try:
            head = SignedTreeHead.from_bytes(blob)
        except DecodeError as exc:
            raise AuditVerificationError(
                "tree-head-decode", f"tree_heads row seq={seq}: {exc.message}", tree_head_seq=seq
            ) from exc
        for column, have, want in (
            ("tree_size", size, head.tree_size),
            ("root_hash", root, head.root_hash),
            ("timestamp_ms", ts, head.timestamp_ms),
        ):
            if type(have) is not type(want) or have != want:
                raise AuditVerificationError(
                    "tree-head-column",
                    f"tree_heads row seq={seq}: column {column} holds {_sql_repr(have)}, the "
                    f"signed tree head says {_sql_repr(want)}",
                    tree_head_seq=seq,
                )
        if blob in seen:
            raise AuditVerificationError(
                "tree-head-duplicate",
                f"tree_heads row seq={seq} repeats the signed tree head of row seq={seen[blob]}",
                tree_head_seq=seq,
            )
        seen[blob] = seq
        heads.append(StoredTreeHead(seq, head.tree_size, head.root_hash, head.timestamp_ms, blob))
    return heads


def _decode_heads(tree_heads: Sequence[StoredTreeHead]) -> list[tuple[int, SignedTreeHead]]:
    heads: list[tuple[int, SignedTreeHead]] = []
    prev: SignedTreeHead | None = None
    for stored in sorted(tree_heads, key=lambda h: h.seq):
        try:
            head = SignedTreeHead.from_bytes(stored.blob)
        except DecodeError as exc:
            raise AuditVerificationError(
                "tree-head-decode", exc.message, tree_head_seq=stored.seq
            ) from exc
        if head.tree_size == 0:
            raise AuditVerificationError(
                "tree-head", "tree head of an empty log", tree_head_seq=stored.seq
            )
        if prev is not None and (
            head.tree_size < prev.tree_size or head.timestamp_ms < prev.timestamp_ms
        ):
            raise AuditVerificationError(
                "tree-head-order",
                "tree head is older (smaller or earlier) than the one before it",
                tree_head_seq=stored.seq,
            )
        heads.append((stored.seq, head))
        prev = head
    return heads


def verify_audit_log(
    entries: Iterable[StoredEntry],
    tree_heads: Sequence[StoredTreeHead],
    *,
    coordinator_key: ec.EllipticCurvePublicKey | None = None,
    trusted_roster: Roster | None = None,
    consortium_authority: ec.EllipticCurvePublicKey | None = None,
) -> None:
    """Verify a whole log (see :class:`AuditVerifier`).

    Raises:
        AuditVerificationError: Naming the first bad entry or tree head.
    """
    AuditVerifier(
        coordinator_key=coordinator_key,
        trusted_roster=trusted_roster,
        consortium_authority=consortium_authority,
    ).run(entries, tree_heads)
