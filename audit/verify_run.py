"""The verdict on a whole log as a library (``fl-audit verify`` and ``report``): run every check
against a trust anchor, check the sites' witnessed tree heads, and weigh what the checks leave
open (an unpinned key, an open run, unsigned entries, a ``-wal`` file, warnings) into an exit
code and the words to print: :func:`verify_run` returns a :class:`~fedseal.audit.auditor.Verdict`,
:func:`judge_report` a :class:`ReportVerdict`. Printing and exiting are the command layer's
(``fedseal.audit.cli``).

Example::

    anchor = load_anchor("verify", Path("coordinator.pub"), False)
    verdict = verify_run(prepare_verify(Path("audit.sqlite"), anchor))
    print(*verdict.lines, sep="\\n"); sys.exit(verdict.exit_code)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.auditor import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNREADABLE,
    AuditCommandError,
    TrustAnchor,
    Verdict,
    default_jobs,
    load_key_file,
    load_roster_file,
    open_log,
    unpinned_warning,
    unsigned_tail,
    unwitnessed,
    unwitnessed_text,
    verify_log,
    wal_bytes,
    wal_warning,
    witness_summary,
)
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import Genesis
from fedseal.audit.errors import AuditLogError, AuditVerificationError
from fedseal.audit.report import collect_view, dp_guarantee, render_report
from fedseal.audit.verifier import VerifiedLog
from fedseal.audit.witness import LogView, WitnessResult, check_witness_file
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.roster import Roster

__all__ = [
    "ProgressTracker",
    "ReportVerdict",
    "VerifyPlan",
    "check_witnesses",
    "judge_report",
    "prepare_verify",
    "render_run_report",
    "verify_run",
]

# Called with the number of entries to check; the context it opens yields the callback that is
# told how many are checked so far (``fl-audit verify`` shows a progress bar on a terminal).
ProgressTracker = Callable[[int], AbstractContextManager[Callable[[int], None] | None]]


@dataclass(frozen=True)
class VerifyPlan:
    """A verification ready to run: the inputs read and the log found readable.

    Attributes:
        log: The log file.
        anchor: The trust anchor (and witness files).
        roster: The trusted roster the log's enrolments must agree with, if any.
        consortium_authority: The pinned consortium roster authority key, if any.
        jobs: Processes for the site signature checks.
        total: Entries in the log when it was opened (the progress bar's total).
        wal_bytes: Size of the ``-wal`` file beside the log (0: none).
    """

    log: Path
    anchor: TrustAnchor
    roster: Roster | None = None
    consortium_authority: ec.EllipticCurvePublicKey | None = None
    jobs: int = 1
    total: int = 0
    wal_bytes: int = 0


def prepare_verify(
    log: Path,
    anchor: TrustAnchor,
    *,
    roster: Path | None = None,
    consortium_authority: Path | None = None,
    jobs: int = 0,
) -> VerifyPlan:
    """Read the consortium authority key and the trusted roster, open the log for its size and
    look for a ``-wal`` file beside it; ``jobs`` 0 picks :func:`default_jobs`.

    Raises:
        AuditCommandError: EXIT_UNREADABLE, a key, roster or the log cannot be read.
    """
    authority = None
    if consortium_authority is not None:
        authority = load_key_file(consortium_authority, "consortium authority key")
    trusted = load_roster_file(roster) if roster is not None else None
    store = open_log(log)
    total = store.size
    store.close()
    return VerifyPlan(
        log, anchor, trusted, authority, jobs or default_jobs(), total, wal_bytes(log)
    )


def check_witnesses(log: Path, anchor: TrustAnchor, result: VerifiedLog) -> list[WitnessResult]:
    """Check the anchor's witness files against ``log``, which verified as ``result`` (its
    entries and recomputed root); one result per file.

    Raises:
        AuditCommandError: EXIT_FAILED (entry 0 is no longer the genesis entry),
            EXIT_UNREADABLE (the log cannot be read).
    """
    if not anchor.witnesses or anchor.key is None:
        return []
    store = open_log(log)
    try:
        genesis = decode_entry(store.entries(0, 1)[0].data)
        if not isinstance(genesis, Genesis):  # verify_log checked it; the file changed since
            raise AuditCommandError(EXIT_FAILED, f"{log}: entry 0 is no longer the genesis entry")
        view = LogView(genesis.log_id, result.entries, result.root_hash, store.consistency_proof)
        key = anchor.key
        return [check_witness_file(w, coordinator_key=key, log=view) for w in anchor.witnesses]
    except (AuditLogError, ProtocolError) as exc:
        raise AuditCommandError(EXIT_UNREADABLE, f"{log}: {exc}") from exc
    finally:
        store.close()


def verify_run(
    plan: VerifyPlan,
    *,
    allow_open: bool = False,
    allow_wal: bool = False,
    strict: bool = False,
    as_json: bool = False,
    track: ProgressTracker | None = None,
) -> Verdict:
    """``fl-audit verify``: run every check of ``plan`` and weigh the result.

    Exit 1 names the first bad entry, tree head or stored row, a witnessed tree head the log
    contradicts, or entries after the last signed tree head with no run open (unless
    ``allow_open``). Exit 3 when the checks hold but the key was not pinned, a run is open
    (unless ``allow_open``), a ``-wal`` file lies beside the log (unless ``allow_wal``),
    unsigned entries follow a finished run with ``allow_open``, or ``strict`` and any warning.

    Raises:
        AuditCommandError: EXIT_UNREADABLE (the log cannot be read), EXIT_FAILED (it changed).
    """
    try:
        with (track or _no_progress)(plan.total) as progress:
            result = verify_log(
                plan.log,
                coordinator_key=plan.anchor.key,
                roster=plan.roster,
                consortium_authority=plan.consortium_authority,
                jobs=plan.jobs,
                progress=progress,
            )
    except AuditVerificationError as exc:
        return _failed_check(exc, as_json)
    except AuditLogError as exc:
        raise AuditCommandError(EXIT_UNREADABLE, f"{plan.log}: {exc}") from exc
    witnessed = check_witnesses(plan.log, plan.anchor, result)
    contradicted = [r.failure for r in witnessed if r.failure is not None]
    if contradicted:
        if not as_json:
            return Verdict(EXIT_FAILED, warnings=tuple(f"FAILED: {f}" for f in contradicted))
        failures = [
            {
                "file": str(f.path),
                "line": f.line,
                "site": f.site,
                "tree_size": f.tree_size,
                "check": f.check,
                "detail": f.detail,
            }
            for f in contradicted
        ]
        out = {"ok": False, "check": "witness", "witnesses": failures}
        return Verdict(EXIT_FAILED, (json.dumps(out),))
    tail = unsigned_tail(result)
    if tail and not result.open_run and not allow_open:
        return _unsigned_tail_failure(result, tail, as_json)
    # Why the verdict is qualified (exit 3), and the warnings that go to stderr.
    qualified: list[str] = []
    notes: list[str] = []
    if plan.anchor.trust_log_key:
        qualified.append("log-key-only")
        notes.append(unpinned_warning(result.coordinator_key_id))
    if plan.wal_bytes:
        notes.append(wal_warning(plan.log, plan.wal_bytes))
        if not allow_wal:
            qualified.append("wal-file")
    if any(status == "open" for _, status, _, _ in result.runs) and not allow_open:
        qualified.append("open-run")
        notes.append("warning: the last run has not ended (--allow-open for a live log). Exit 3.")
    if tail and result.open_run:  # "open-run" qualifies the verdict (exit 3 or --allow-open)
        notes.append(f"warning: {tail} (the run is still open: --allow-open for a live log)")
    elif tail:  # no run open, --allow-open: a live coordinator between runs, never exit 0
        qualified.append("unsigned-tail")
        notes.append(f"warning: {tail} (no run is open: exit 3 even with --allow-open)")
    if strict and result.warnings:
        qualified.append("warnings")
    code = EXIT_INCOMPLETE if qualified else EXIT_OK
    if as_json:
        out = _verified_json(plan, result, witnessed, code, qualified, bool(tail))
        lines: tuple[str, ...] = (json.dumps(out),)
    else:
        lines = _verified_lines(plan.anchor, result, witnessed)
    return Verdict(code, lines, tuple(f"fl-audit: {note}" for note in notes))


def _no_progress(total: int) -> AbstractContextManager[None]:
    return nullcontext()


def _failed_check(exc: AuditVerificationError, as_json: bool) -> Verdict:
    """The verdict on a log that failed a check (exit 1), naming the first bad place."""
    if not as_json:
        return Verdict(EXIT_FAILED, warnings=(f"FAILED: {exc}",))
    out = {
        "ok": False,
        "index": exc.index,
        "entry_type": exc.entry_type,
        "tree_head_seq": exc.tree_head_seq,
        "check": exc.check,
        "detail": exc.detail,
    }
    return Verdict(EXIT_FAILED, (json.dumps(out),))


def _unsigned_tail_failure(result: VerifiedLog, tail: str, as_json: bool) -> Verdict:
    """The verdict on a finished run's log with entries no signed tree head covers (exit 1)."""
    detail = (
        f"{tail}; no run is open, and a finished run's log must be fully signed (the run "
        "end's tree head covers every entry before it)"
    )
    if not as_json:
        return Verdict(EXIT_FAILED, warnings=(f"FAILED: {detail}",))
    out = {
        "ok": False,
        "index": result.signed_entries,
        "entry_type": None,
        "tree_head_seq": None,
        "check": "unsigned-tail",
        "detail": detail,
        "signed_entries": result.signed_entries,
        "entries": result.entries,
    }
    return Verdict(EXIT_FAILED, (json.dumps(out),))


def _verified_json(
    plan: VerifyPlan,
    result: VerifiedLog,
    witnessed: Sequence[WitnessResult],
    code: int,
    qualified: Sequence[str],
    has_tail: bool,
) -> dict[str, Any]:
    """``fl-audit verify --json``'s object for a log whose checks hold."""
    span = unwitnessed(result, witnessed)
    return {
        "ok": True,
        "exit_code": code,
        "qualified": list(qualified),
        "coordinator_key_id": result.coordinator_key_id,
        "trust_anchor": "coordinator-key" if plan.anchor.key is not None else "log-key",
        "entries": result.entries,
        "signed_entries": result.signed_entries,
        "unsigned_entries": (
            None if not has_tail else {"first": result.signed_entries, "last": result.entries - 1}
        ),
        "unwitnessed_entries": None if span is None else {"first": span[0], "last": span[1]},
        "tree_heads": result.tree_heads,
        "signatures": result.signatures,
        "root_hash": result.root_hash.hex(),
        "runs": [
            {"run_id": r, "status": s, "completed_rounds": c, "failed_rounds": f}
            for r, s, c, f in result.runs
        ],
        "accepted_envelopes": result.accepted_envelopes,
        "rejected_envelopes": result.rejected_envelopes,
        "evaluations": result.evaluations,
        "dp_runs": [
            {"run_id": r, "dp_rounds": n, "epsilon": e, "delta": d}
            for r, n, e, d in result.dp_runs
        ],
        "consortium_rosters": [
            {"consortium": c, "version": v, "roster_digest": d, "authority_key_id": k}
            for c, v, d, k in result.consortium_rosters
        ],
        "wal_bytes": plan.wal_bytes,
        "warnings": list(result.warnings),
        "witnesses": [
            {
                "file": str(r.file.path),
                "sites": list(r.file.sites),
                "tree_heads": r.checked,
                "largest_tree_size": r.file.largest,
            }
            for r in witnessed
        ],
    }


def _verified_lines(
    anchor: TrustAnchor, result: VerifiedLog, witnessed: Sequence[WitnessResult]
) -> tuple[str, ...]:
    """``fl-audit verify``'s text for a log whose checks hold."""
    lines = [
        f"OK: {result.entries} entries ({result.signed_entries} signed), "
        f"{result.tree_heads} signed tree heads, "
        f"{result.signatures} site signatures, root {result.root_hash.hex()}"
        + (
            f"; {witness_summary(witnessed)}: all consistent with the log"
            if witnessed
            else "; no witnesses (--witness FILE: the sites' receipts)"
        )
    ]
    span = unwitnessed(result, witnessed)
    if span is not None:
        lines.append(f"  {unwitnessed_text(span)}")
    pinned = "pinned (--coordinator-key)" if anchor.key is not None else "the log's own, NOT pinned"
    lines.append(f"  coordinator key {result.coordinator_key_id}: {pinned}")
    for run_id, status, done, failed in result.runs:
        lines.append(f"  run {run_id}: {status}, {done} rounds completed, {failed} failed")
    for run_id, rounds, eps, delta in result.dp_runs:
        lines.append(f"  run {run_id}: {dp_guarantee(eps, delta, rounds)} (recomputed)")
    for name, version, digest, kid in result.consortium_rosters:
        lines.append(
            f"  consortium roster {name!r}: version {version}, digest {digest[:16]}…, "
            f"authority key {kid[:16]}…"
        )
    lines.extend(f"  warning: {warning}" for warning in result.warnings)
    return tuple(lines)


@dataclass(frozen=True)
class ReportVerdict:
    """The verdict ``fl-audit report`` states in its HTML report.

    Attributes:
        exit_code: 0, 1 (verification or a witness failed) or 3 (only the log's own key).
        verdict: The verdict in words ("not checked" without an anchor).
        warnings: Lines for stderr before the report is written (each whole, prefix included).
        signed_entries: Entries the verified signed tree heads cover (None: not verified).
        witnessed: One result per witness file.
    """

    exit_code: int
    verdict: str
    warnings: tuple[str, ...] = ()
    signed_entries: int | None = None
    witnessed: tuple[WitnessResult, ...] = ()


def judge_report(log: Path, anchor: TrustAnchor | None) -> ReportVerdict:
    """Verify ``log`` under ``anchor`` (None: do not verify) for ``fl-audit report``: a failure
    is a verdict (exit 1), not an exception.

    Raises:
        AuditCommandError: EXIT_UNREADABLE, the log cannot be read.
    """
    open_log(log).close()
    if anchor is None:
        return ReportVerdict(EXIT_OK, "not checked")
    signed: int | None = None
    witnessed: list[WitnessResult] = []
    warnings: list[str] = []
    code = EXIT_OK
    try:
        result = verify_log(log, coordinator_key=anchor.key, jobs=default_jobs())
        signed = result.signed_entries
        witnessed = check_witnesses(log, anchor, result)
        contradicted = [r.failure for r in witnessed if r.failure is not None]
        if contradicted:
            verdict = "FAILED: " + "; ".join(str(f) for f in contradicted)
            code = EXIT_FAILED
        elif anchor.key is not None:
            verdict = (
                f"all checks hold against the pinned coordinator key "
                f"{result.coordinator_key_id} ({result.entries} entries, "
                f"{result.tree_heads} signed tree heads"
                + (
                    f"; {witness_summary(witnessed)}: all consistent with the log)"
                    if witnessed
                    else "; no witnesses checked)"
                )
            )
        else:
            verdict = (
                f"checks hold ({result.entries} entries), but only against the coordinator "
                f"key the log names itself ({result.coordinator_key_id}), NOT a pinned one: "
                "a log forged under a fresh key would pass too"
            )
            warnings.append(f"fl-audit: {unpinned_warning(result.coordinator_key_id)}")
            code = EXIT_INCOMPLETE
        tail = unsigned_tail(result)
        if code != EXIT_FAILED and tail and not result.open_run:
            verdict = (
                f"FAILED: {tail}; no run is open, and a finished run's log must be fully signed"
            )
            code = EXIT_FAILED
        if code != EXIT_FAILED:
            span = unwitnessed(result, witnessed)
            if span is not None:
                verdict += f"; note: {unwitnessed_text(span)}"
            verdict += "".join(f"; warning: {w}" for w in result.warnings)
    except (AuditVerificationError, AuditLogError) as exc:
        verdict = f"FAILED: {exc}"
        code = EXIT_FAILED
    return ReportVerdict(code, verdict, tuple(warnings), signed, tuple(witnessed))


def render_run_report(log: Path, judged: ReportVerdict) -> str:
    """The self-contained HTML report on ``log`` stating ``judged``'s verdict.

    Raises:
        AuditCommandError: EXIT_UNREADABLE, the log cannot be read.
    """
    store = open_log(log)
    try:
        view = collect_view(store, judged.signed_entries)
    finally:
        store.close()
    return render_report(view, str(log), judged.verdict, list(judged.witnessed))
