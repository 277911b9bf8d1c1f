"""``fl-audit``: offline verification, proofs and reports over the coordinator's audit log.

Example::

    fl-audit verify audit.sqlite --coordinator-key coordinator.pub --roster roster.json
    fl-audit verify audit.sqlite --coordinator-key coordinator.pub --consortium-authority authority.key.pub
    fl-audit verify audit.sqlite --coordinator-key coordinator.pub --witness site-a.heads --witness site-b.heads
    fl-audit prove audit.sqlite --coordinator-key coordinator.pub --site site-a --round 3 --json > receipt.json
    fl-audit consistency audit.sqlite 120
    fl-audit show audit.sqlite
    fl-audit report audit.sqlite --coordinator-key coordinator.pub --out report.html
    fl-audit export audit.sqlite --format jsonl > audit.jsonl

Trust anchor: the commands that vouch for the log (``verify``, ``prove``, ``report``) need the
coordinator's public key as the auditor obtained it out of band (``--coordinator-key PUB.pem``,
e.g. the ``coordinator.pub`` the sites pin): the log's genesis entry must name exactly that key,
and every signed tree head must verify under it. Without it a log forged wholesale under a
fresh key would verify. ``--trust-log-key`` runs the checks against the key the log names itself
instead: a warning on stderr and exit 3, never 0.

Witnesses (``--witness FILE``, repeatable, ``verify`` and ``report``, only with
``--coordinator-key``): the signed tree heads a site kept, as ``fl-client receipts export`` writes
them. The log alone cannot show that it was cut back to an earlier tree head or rewritten and
re-signed with the coordinator's own key; a witness can. Every witnessed head must verify under
the pinned key, name the log's id, and be consistent with the log (a prefix of it, by an RFC 6962
consistency proof to the root recomputed from the entries); a head larger than the log means
truncation. A failure names the witness file, line, site and tree size (exit 1); see
``fedseal.audit.witness``.

Exit codes (every command):

* 0 — success (``verify``: every check holds against the pinned key, the run has ended);
* 1 — verification failed (a witnessed tree head included) / the requested proof or entry does
  not exist or does not verify;
* 2 — usage error (bad option or argument; no trust anchor; ``--witness`` without
  ``--coordinator-key``);
* 3 — the checks hold, but the verdict is qualified: only against the log's own key
  (``--trust-log-key``), a run that has not ended (unless ``--allow-open``), a non-empty
  ``-wal`` file beside the log (unless ``--allow-wal``: a copy of the main file alone is then
  not the whole log), ``prove`` against a root no signed tree head covers, or with
  ``verify --strict`` any warning (entries not yet covered by a signed tree head);
* 4 — the log (or a key / roster / witness file) cannot be read: missing, not a fedseal log,
  malformed.

Imports neither flwr nor torch (tests/test_layering.py checks it).

Trusted roster file (``--roster``): the coordinator's ``roster.json`` (``fedseal.server.roster``:
``{"sites": [{"name", "public_key_der" (hex), "dataset_roots", "status"}]}``) or, JSON::

    {"sites": [{"site": "site-a", "public_key_pem": "-----BEGIN PUBLIC KEY-----...",
                "approved_roots": ["<64 hex>", ...], "active": true}, ...]}
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import html
import json
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from fedseal.audit.log import (
    AuditEntry,
    AuditVerificationError,
    AuditVerifier,
    Checkpoint,
    ConsortiumRosterRecord,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    JobFailure,
    RosterChange,
    RoundResult,
    RunEnd,
    RunStart,
    SignatureJob,
    SignedTreeHead,
    VerifiedLog,
    check_signatures_serial,
    decode_entry,
    find_input,
)
from fedseal.audit.store import AuditLogError, MerkleLogStore, wal_file
from fedseal.audit.witness import (
    LogView,
    WitnessFile,
    WitnessFormatError,
    WitnessResult,
    check_witness_file,
    read_witness_file,
)
from fedseal.crypto.errors import CryptoError, MerkleProofError
from fedseal.crypto.keys import load_public_key, public_key_from_der, public_key_to_der
from fedseal.crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.roster import Roster, RosterEntry

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_UNREADABLE = 4

app = typer.Typer(
    name="fl-audit",
    help=(
        "Verify a fedseal audit log offline, prove inclusion of a site's update, report a run.\n\n"
        "verify, prove and report need a trust anchor: --coordinator-key PUB.pem, the "
        "coordinator's public key obtained out of band (the log's own genesis key must equal "
        "it); --trust-log-key checks against the key the log names itself and exits 3. "
        "--witness FILE (with --coordinator-key) adds the signed tree heads a site kept "
        "(fl-client receipts export): a log cut back or rewritten under them fails.\n\n"
        "Exit codes: 0 ok; 1 verification failed / proof not found; 2 usage error (e.g. no "
        "trust anchor); 3 checks hold but qualified (log's own key only, open run, -wal file "
        "beside the log, verify --strict warnings); 4 unreadable log, key or roster file."
    ),
    no_args_is_help=True,
    add_completion=False,
)

LogArg = Annotated[
    Path,
    typer.Argument(help="The audit log (SQLite file written by fl-server).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead.")]
CoordinatorKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--coordinator-key",
        help="Trust anchor: the coordinator's public key (PEM), obtained out of band (e.g. the "
        "coordinator.pub the sites pin). The log's genesis key must be this key and every "
        "signed tree head must verify under it.",
        show_default=False,
    ),
]
TrustLogKeyOpt = Annotated[
    bool,
    typer.Option(
        "--trust-log-key",
        help="No trust anchor: check against the coordinator key the log names itself (a log "
        "forged under a fresh key passes too). Prints a warning and exits 3, never 0.",
    ),
]
WitnessOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--witness",
        help="A site's witnessed tree heads (fl-client receipts export; repeatable; needs "
        "--coordinator-key): each must verify under the pinned key, name this log and be a "
        "prefix of it. A log cut back below, or rewritten under, a witnessed head fails (exit 1).",
        show_default=False,
    ),
]


def _clean(text: str) -> str:
    """``text`` with every control or format character (terminal escape sequences, bidi
    overrides, newlines) shown as an escape: strings from the log or a witness file reach the
    terminal only through this (or :func:`_markup`)."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Co", "Cn"):
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return "".join(out)


def _markup(text: str) -> str:
    """``text`` (from the log) made safe for rich: control characters escaped, markup inert."""
    return escape(_clean(text))


def _echo(text: str, *, err: bool = False) -> None:
    typer.echo(_clean(text), err=err)


def _fail(code: int, message: str) -> typer.Exit:
    _echo(f"fl-audit: {message}", err=True)
    return typer.Exit(code)


@dataclass(frozen=True)
class _Anchor:
    """What the auditor trusts: a pinned coordinator key, or (explicitly) the log's own key;
    with the pinned key, the tree heads the sites kept (``--witness FILE``)."""

    key: ec.EllipticCurvePublicKey | None
    trust_log_key: bool
    witnesses: tuple[WitnessFile, ...] = ()


def _anchor(
    command: str,
    coordinator_key: Path | None,
    trust_log_key: bool,
    witness: Sequence[Path] | None = None,
) -> _Anchor:
    if coordinator_key is not None and trust_log_key:
        raise _fail(EXIT_USAGE, "--coordinator-key and --trust-log-key exclude each other")
    if witness and coordinator_key is None:
        raise _fail(
            EXIT_USAGE,
            "--witness needs --coordinator-key PUB.pem: a witnessed tree head counts only if the "
            "pinned coordinator key signed it",
        )
    if coordinator_key is None and not trust_log_key:
        raise _fail(
            EXIT_USAGE,
            f"{command} needs a trust anchor: --coordinator-key PUB.pem (the coordinator's "
            "public key, obtained out of band: the log's genesis key must be this key), or "
            "--trust-log-key to check against the key the log names itself (exit 3: a log "
            "forged under a fresh key would pass that too)",
        )
    if coordinator_key is None:
        return _Anchor(None, True)
    try:
        key = load_public_key(coordinator_key)
    except (OSError, CryptoError) as exc:
        raise _fail(EXIT_UNREADABLE, f"coordinator key {coordinator_key}: {exc}") from exc
    try:
        files = tuple(read_witness_file(path) for path in witness or ())
    except WitnessFormatError as exc:
        raise _fail(EXIT_UNREADABLE, str(exc)) from exc
    return _Anchor(key, False, files)


def _check_witnesses(log: Path, anchor: _Anchor, result: VerifiedLog) -> list[WitnessResult]:
    """Check the anchor's witness files against ``log``, which verified as ``result`` (its
    entries and recomputed root); one result per file."""
    if not anchor.witnesses or anchor.key is None:
        return []
    store = _open(log)
    try:
        genesis = decode_entry(store.entries(0, 1)[0].data)
        if not isinstance(genesis, Genesis):  # verify_log checked it; the file changed since
            raise _fail(EXIT_FAILED, f"{log}: entry 0 is no longer the genesis entry")
        view = LogView(genesis.log_id, result.entries, result.root_hash, store.consistency_proof)
        key = anchor.key
        return [check_witness_file(w, coordinator_key=key, log=view) for w in anchor.witnesses]
    except (AuditLogError, ProtocolError) as exc:
        raise _fail(EXIT_UNREADABLE, f"{log}: {exc}") from exc
    finally:
        store.close()


def _witness_summary(results: Sequence[WitnessResult]) -> str:
    """``N witnessed tree heads from F file(s) (site(s) ...; up to size S)``."""
    heads = sum(len(r.file.heads) for r in results)
    sites = sorted({s for r in results for s in r.file.sites})
    return (
        f"{heads} witnessed tree heads from {len(results)} file(s) (site(s) {', '.join(sites)}; "
        f"up to size {max(r.file.largest for r in results)})"
    )


def _unsigned_tail(result: VerifiedLog) -> str:
    """The entries no signed tree head covers, in words ("" if none)."""
    if result.signed_entries >= result.entries:
        return ""
    return (
        f"entries {result.signed_entries}..{result.entries - 1} follow the last signed tree head "
        f"(size {result.signed_entries}): they are UNSIGNED, anyone who can write the file can "
        "have appended them"
    )


def _unwitnessed(result: VerifiedLog, witnessed: Sequence[WitnessResult]) -> tuple[int, int] | None:
    """``(first, last)`` entries that no witnessed tree head covers (only with witnesses)."""
    if not witnessed:
        return None
    largest = max(r.file.largest for r in witnessed)
    return None if largest >= result.entries else (largest, result.entries - 1)


def _unwitnessed_text(span: tuple[int, int]) -> str:
    return (
        f"entries {span[0]}..{span[1]} are witnessed by no site: only the coordinator's own "
        "signature covers them (a site's receipts end before the run's last tree head)"
    )


def _unpinned_warning(key_id_hex: str) -> str:
    return (
        "warning: verified only against the log's own key (coordinator key "
        f"{key_id_hex or '?'}, named by the log's genesis entry), not against a pinned one: a log "
        "forged under a fresh key verifies too. Pin the coordinator's public key with "
        "--coordinator-key PUB.pem. Exit 3."
    )


def _wal_warning(log: Path, size: int) -> str:
    return (
        f"warning: {wal_file(log)} exists beside the log ({size} bytes of committed pages not "
        f"yet checkpointed into {log.name}): the log is open in a running coordinator, or its "
        "writer did not stop cleanly. This check read both files, but a copy of "
        f"{log.name} alone may silently miss entries: back up a live log with fedseal-backup "
        f'or sqlite3 {log} ".backup COPY.sqlite" (SQLite\'s online backup), never with cp.'
    )


def _wal_bytes(log: Path) -> int:
    """Size of the ``-wal`` file beside the log's real file (a symlink resolved first: SQLite
    keeps the WAL beside the file it opens, not beside the link)."""
    try:
        return wal_file(log.resolve()).stat().st_size
    except OSError:
        return 0


def _open(path: Path) -> MerkleLogStore:
    try:
        return MerkleLogStore.open(path, read_only=True)
    except FileNotFoundError as exc:
        raise _fail(EXIT_UNREADABLE, f"{path}: no such file") from exc
    except AuditLogError as exc:
        raise _fail(EXIT_UNREADABLE, f"{path}: {exc}") from exc


# --- parallel signature checks -----------------------------------------------------------


class _ParallelChecker:
    """Checks batches of site signatures in worker processes (ECDSA is CPU-bound), so they
    overlap with the verifier's in-order semantic checks in this process."""

    def __init__(self, jobs: int) -> None:
        self._jobs = jobs
        self._pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None

    def __call__(self, batch: Sequence[SignatureJob]) -> Callable[[], JobFailure | None]:
        if self._pool is None:
            result: JobFailure | None = check_signatures_serial(batch)
            return lambda: result
        size = max(64, -(-len(batch) // self._jobs))
        offsets = range(0, len(batch), size)
        futures = [
            self._pool.submit(check_signatures_serial, list(batch[i : i + size])) for i in offsets
        ]

        def wait() -> JobFailure | None:
            for offset, future in zip(offsets, futures, strict=True):
                bad: JobFailure | None = future.result()
                if bad is not None:
                    for other in futures:
                        other.cancel()
                    return JobFailure(offset + bad.position, bad.check, bad.detail)
            return None

        return wait

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _default_jobs() -> int:
    """Worker processes: this process needs a core for the in-order checks; on fewer than
    4 CPUs, workers only add contention (measured in BENCHMARKS.md)."""
    cpus = os.cpu_count() or 1
    return 1 if cpus < 4 else min(8, cpus - 1)


def _load_roster(path: Path) -> Roster:
    """Read a trusted roster: the coordinator's ``roster.json`` (fedseal.server.roster) or the
    documented auditor format (see the module docstring)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = []
        for item in raw["sites"]:
            if "public_key_pem" in item:
                key = load_pem_public_key(item["public_key_pem"].encode())
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise ValueError("not an EC key")
                der = public_key_to_der(key)
            else:
                der = bytes.fromhex(item["public_key_der"])
            roots = item.get("approved_roots", item.get("dataset_roots", []))
            active = (
                item["active"] if "active" in item else item.get("status", "active") == "active"
            )
            entries.append(
                RosterEntry.from_der(
                    item.get("site", item.get("name")),
                    der,
                    [bytes.fromhex(r) for r in roots],
                    active=bool(active),
                )
            )
        return Roster(entries)
    except (OSError, ValueError, KeyError, TypeError, CryptoError, ProtocolError) as exc:
        raise _fail(EXIT_UNREADABLE, f"roster {path}: {type(exc).__name__}: {exc}") from exc


def verify_log(
    path: Path,
    *,
    coordinator_key: ec.EllipticCurvePublicKey | None = None,
    roster: Roster | None = None,
    consortium_authority: ec.EllipticCurvePublicKey | None = None,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> VerifiedLog:
    """Verify the log at ``path`` (library entry point of ``fl-audit verify``): the entries,
    the signed tree heads and every unsigned copy the store keeps
    (:meth:`~fedseal.audit.log.AuditVerifier.verify_store`).

    ``coordinator_key`` is the trust anchor; without it the tree heads are checked against the
    key the log's genesis names (the result says so: ``coordinator_key_pinned`` is false), which
    proves nothing about who wrote the log.

    Raises:
        AuditVerificationError: The first bad entry, tree head or stored copy.
        fedseal.audit.store.AuditLogError: The file is not a readable fedseal log.
    """
    store = MerkleLogStore.open(path, read_only=True)
    checker = _ParallelChecker(jobs)
    try:
        return AuditVerifier(
            coordinator_key=coordinator_key,
            trusted_roster=roster,
            consortium_authority=consortium_authority,
            submit_signatures=checker,
            progress=progress,
        ).verify_store(store)
    finally:
        checker.close()
        store.close()


@app.command("verify")
def verify_cmd(
    log: LogArg,
    coordinator_key: CoordinatorKeyOpt = None,
    trust_log_key: TrustLogKeyOpt = False,
    witness: WitnessOpt = None,
    roster: Annotated[
        Path | None,
        typer.Option(help="Trusted roster (JSON) the log's enrolments and roots must agree with."),
    ] = None,
    consortium_authority: Annotated[
        Path | None,
        typer.Option(
            help="Pinned consortium roster authority public key (PEM): every consortium roster "
            "in the log must be signed by it."
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=0,
            max=256,
            help="Processes for signature checks (0: CPUs - 1 up to 8 on 4+ CPUs, else 1).",
        ),
    ] = 0,
    allow_open: Annotated[
        bool,
        typer.Option(
            "--allow-open",
            help="Exit 0 (not 3) when the last run has not ended (a live log); entries after "
            "the last signed tree head with no run open (a live coordinator between runs) then "
            "exit 3, not 1.",
        ),
    ] = False,
    allow_wal: Annotated[
        bool,
        typer.Option(
            "--allow-wal",
            help="Exit 0 (not 3) when a non-empty LOG-wal file lies beside the log (a live log); "
            "the warning is printed all the same.",
        ),
    ] = False,
    strict: Annotated[
        bool, typer.Option(help="Exit 3 on any warning (e.g. entries after the last tree head).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the Merkle tree and check every signature, tree head, run rule and stored copy.

    Needs a trust anchor: --coordinator-key PUB.pem (the log's genesis key must be that key),
    or --trust-log-key (checks against the log's own key; warns and exits 3).
    With --witness FILE (a site's exported receipts) every witnessed tree head must verify under
    the pinned key and be a prefix of the log: a log cut back below one, or rewritten under one,
    fails, naming the witness file, line, site and tree size. Names the first
    bad entry, tree head or stored row (table, row, column) and exits 1 if anything fails;
    exits 3 if the checks hold but the run has not ended (--allow-open), a -wal file lies
    beside the log (--allow-wal), or the key was not pinned.
    """
    anchor = _anchor("verify", coordinator_key, trust_log_key, witness)
    authority = None
    if consortium_authority is not None:
        try:
            authority = load_public_key(consortium_authority)
        except (OSError, CryptoError) as exc:
            raise _fail(
                EXIT_UNREADABLE, f"consortium authority key {consortium_authority}: {exc}"
            ) from exc
    trusted = _load_roster(roster) if roster is not None else None
    store = _open(log)
    total = store.size
    store.close()
    wal_size = _wal_bytes(log)
    n_jobs = jobs or _default_jobs()
    show_progress = not as_json and sys.stderr.isatty()
    try:
        with Progress(console=Console(stderr=True), disable=not show_progress) as bar:
            task = bar.add_task("verifying", total=total)
            result = verify_log(
                log,
                coordinator_key=anchor.key,
                roster=trusted,
                consortium_authority=authority,
                jobs=n_jobs,
                progress=lambda done: bar.update(task, completed=done),
            )
    except AuditVerificationError as exc:
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "ok": False,
                        "index": exc.index,
                        "entry_type": exc.entry_type,
                        "tree_head_seq": exc.tree_head_seq,
                        "check": exc.check,
                        "detail": exc.detail,
                    }
                )
            )
        else:
            _echo(f"FAILED: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc
    except AuditLogError as exc:
        raise _fail(EXIT_UNREADABLE, f"{log}: {exc}") from exc
    witnessed = _check_witnesses(log, anchor, result)
    contradicted = [r.failure for r in witnessed if r.failure is not None]
    if contradicted:
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "ok": False,
                        "check": "witness",
                        "witnesses": [
                            {
                                "file": str(f.path),
                                "line": f.line,
                                "site": f.site,
                                "tree_size": f.tree_size,
                                "check": f.check,
                                "detail": f.detail,
                            }
                            for f in contradicted
                        ],
                    }
                )
            )
        else:
            for failure in contradicted:
                _echo(f"FAILED: {failure}", err=True)
        raise typer.Exit(EXIT_FAILED)
    tail = _unsigned_tail(result)
    if tail and not result.open_run and not allow_open:
        detail = (
            f"{tail}; no run is open, and a finished run's log must be fully signed (the run "
            "end's tree head covers every entry before it)"
        )
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "ok": False,
                        "index": result.signed_entries,
                        "entry_type": None,
                        "tree_head_seq": None,
                        "check": "unsigned-tail",
                        "detail": detail,
                        "signed_entries": result.signed_entries,
                        "entries": result.entries,
                    }
                )
            )
        else:
            _echo(f"FAILED: {detail}", err=True)
        raise typer.Exit(EXIT_FAILED)
    unwitnessed = _unwitnessed(result, witnessed)
    # Why the verdict is qualified (exit 3), and the warnings that go to stderr.
    qualified: list[str] = []
    notes: list[str] = []
    if anchor.trust_log_key:
        qualified.append("log-key-only")
        notes.append(_unpinned_warning(result.coordinator_key_id))
    if wal_size:
        notes.append(_wal_warning(log, wal_size))
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
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "exit_code": code,
                    "qualified": qualified,
                    "coordinator_key_id": result.coordinator_key_id,
                    "trust_anchor": "coordinator-key" if anchor.key is not None else "log-key",
                    "entries": result.entries,
                    "signed_entries": result.signed_entries,
                    "unsigned_entries": (
                        None
                        if not tail
                        else {"first": result.signed_entries, "last": result.entries - 1}
                    ),
                    "unwitnessed_entries": (
                        None
                        if unwitnessed is None
                        else {"first": unwitnessed[0], "last": unwitnessed[1]}
                    ),
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
                    "consortium_rosters": [
                        {
                            "consortium": c,
                            "version": v,
                            "roster_digest": d,
                            "authority_key_id": k,
                        }
                        for c, v, d, k in result.consortium_rosters
                    ],
                    "wal_bytes": wal_size,
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
            )
        )
    else:
        _echo(
            f"OK: {result.entries} entries ({result.signed_entries} signed), "
            f"{result.tree_heads} signed tree heads, "
            f"{result.signatures} site signatures, root {result.root_hash.hex()}"
            + (
                f"; {_witness_summary(witnessed)}: all consistent with the log"
                if witnessed
                else "; no witnesses (--witness FILE: the sites' receipts)"
            )
        )
        if unwitnessed is not None:
            _echo(f"  {_unwitnessed_text(unwitnessed)}")
        _echo(
            f"  coordinator key {result.coordinator_key_id}: "
            + (
                "pinned (--coordinator-key)"
                if anchor.key is not None
                else "the log's own, NOT pinned"
            )
        )
        for run_id, status, done, failed in result.runs:
            _echo(f"  run {run_id}: {status}, {done} rounds completed, {failed} failed")
        for name, version, digest, kid in result.consortium_rosters:
            _echo(
                f"  consortium roster {name!r}: version {version}, digest {digest[:16]}…, "
                f"authority key {kid[:16]}…"
            )
        for warning in result.warnings:
            _echo(f"  warning: {warning}")
    for note in notes:
        _echo(f"fl-audit: {note}", err=True)
    if code != EXIT_OK:
        raise typer.Exit(code)


def _signed_heads(store: MerkleLogStore) -> list[tuple[SignedTreeHead, bytes]]:
    """The stored tree heads as signed (decoded from their blobs, not from the unsigned
    columns), with their bytes; blobs that do not decode are left out."""
    heads = []
    for stored in store.tree_heads():
        try:
            heads.append((SignedTreeHead.from_bytes(stored.blob), stored.blob))
        except ProtocolError:
            continue
    return heads


def _head_for(
    store: MerkleLogStore, min_size: int, tree_size: int | None
) -> tuple[int, bytes, str, SignedTreeHead | None]:
    """(size, root, signed tree head b64 or "", the signed tree head or None) to prove against."""
    heads = _signed_heads(store)
    if tree_size is None:
        if heads and heads[-1][0].tree_size >= min_size:
            latest, blob = heads[-1]
            return latest.tree_size, latest.root_hash, base64.b64encode(blob).decode(), latest
        tree_size = store.size
    for head, blob in heads:
        if head.tree_size == tree_size:
            return tree_size, head.root_hash, base64.b64encode(blob).decode(), head
    return tree_size, store.root(tree_size), "", None


def _check_anchor_head(store: MerkleLogStore, anchor: _Anchor, head: SignedTreeHead | None) -> str:
    """Check the log's genesis key against the anchor and ``head``'s signature under it;
    return the coordinator key id (hex).

    Raises:
        typer.Exit: EXIT_FAILED naming what does not hold.
    """
    try:
        genesis = decode_entry(store.entries(0, 1)[0].data)
    except (AuditLogError, ProtocolError) as exc:
        raise _fail(EXIT_FAILED, f"the log's genesis entry is unreadable: {exc}") from exc
    if not isinstance(genesis, Genesis):
        raise _fail(EXIT_FAILED, "entry 0 is not the log's genesis entry")
    log_kid = hashlib.sha256(genesis.coordinator_key_der).hexdigest()
    if anchor.key is not None:
        pinned_kid = hashlib.sha256(public_key_to_der(anchor.key)).hexdigest()
        if pinned_kid != log_kid:
            raise _fail(
                EXIT_FAILED,
                f"the log's genesis names coordinator key {log_kid}, not the pinned coordinator "
                f"key {pinned_kid}",
            )
    if head is not None:
        try:
            key = anchor.key or public_key_from_der(genesis.coordinator_key_der)
            if head.log_id != genesis.log_id:
                raise _fail(EXIT_FAILED, "the signed tree head names another log")
            head.verify(key)
        except (CryptoError, ProtocolError) as exc:
            raise _fail(
                EXIT_FAILED,
                f"the signed tree head of size {head.tree_size} does not verify under the "
                f"coordinator key {log_kid}: {exc}",
            ) from exc
    return log_kid


@app.command("prove")
def prove_cmd(
    log: LogArg,
    site: Annotated[str, typer.Option(help="Site id whose accepted masked input to prove.")],
    round: Annotated[int, typer.Option("--round", min=1, help="Round number.")],
    coordinator_key: CoordinatorKeyOpt = None,
    trust_log_key: TrustLogKeyOpt = False,
    run_id: Annotated[
        str | None, typer.Option(help="Run id (hex); default: the latest run.")
    ] = None,
    tree_size: Annotated[
        int | None, typer.Option(help="Prove against this tree size (default: latest tree head).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an inclusion proof of a site's accepted masked-input envelope for a round.

    Needs a trust anchor (--coordinator-key PUB.pem, or --trust-log-key: exit 3). The proof
    is checked before it is printed, against the root of a signed tree head whose signature
    verifies under the anchor; a site verifies it with fedseal.crypto.merkle.verify_inclusion
    against a signed tree head it trusts. A root no signed tree head covers exits 3.
    """
    anchor = _anchor("prove", coordinator_key, trust_log_key)
    store = _open(log)
    try:
        rid = bytes.fromhex(run_id) if run_id else None
        index = find_input(store, site, round, rid)
        if index is None:
            raise _fail(EXIT_FAILED, f"no accepted masked input from {site!r} in round {round}")
        size, root, sth, head = _head_for(store, index + 1, tree_size)
        if not index < size <= store.size:
            raise _fail(EXIT_FAILED, f"tree size {size} does not contain entry {index}")
        kid = _check_anchor_head(store, anchor, head)
        entry = store.entries(index, index + 1)[0]
        lh = leaf_hash(entry.data)
        proof = store.inclusion_proof(index, size)
        verify_inclusion(lh, index, size, proof, root)
    except (AuditLogError, MerkleProofError, ValueError, ProtocolError) as exc:
        raise _fail(EXIT_FAILED, f"cannot prove: {exc}") from exc
    finally:
        store.close()
    out = {
        "site": site,
        "round": round,
        "leaf_index": index,
        "tree_size": size,
        "leaf_hash": lh.hex(),
        "root_hash": root.hex(),
        "audit_path": [h.hex() for h in proof],
        "entry_b64": base64.b64encode(entry.data).decode(),
        "signed_tree_head_b64": sth,
    }
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"entry {index} in tree of {size}: leaf {lh.hex()}")
        typer.echo(f"root {root.hex()}" + (" (signed tree head)" if sth else " (unsigned)"))
        for i, h in enumerate(proof):
            typer.echo(f"  path[{i}] {h.hex()}")
        typer.echo("proof verifies")
    code = EXIT_OK
    if not sth:
        typer.echo(
            f"fl-audit: warning: no signed tree head covers size {size}: the root is the log "
            "file's own, signed by nobody. Exit 3.",
            err=True,
        )
        code = EXIT_INCOMPLETE
    if anchor.trust_log_key:
        typer.echo(f"fl-audit: {_unpinned_warning(kid)}", err=True)
        code = EXIT_INCOMPLETE
    if code != EXIT_OK:
        raise typer.Exit(code)


@app.command("consistency")
def consistency_cmd(
    log: LogArg,
    old_size: Annotated[int, typer.Argument(min=1, help="The older tree size.")],
    new_size: Annotated[
        int | None,
        typer.Option(help="The newer tree size (default: latest tree head or log size)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print (and check) a consistency proof that the log at OLD_SIZE is a prefix of a newer one."""
    store = _open(log)
    try:
        size, new_root, sth, _ = _head_for(store, old_size, new_size)
        old_root = store.root(old_size)
        proof = store.consistency_proof(old_size, size)
        verify_consistency(old_size, size, old_root, new_root, proof)
    except (AuditLogError, MerkleProofError, ValueError) as exc:
        raise _fail(EXIT_FAILED, f"cannot prove consistency: {exc}") from exc
    finally:
        store.close()
    out = {
        "old_size": old_size,
        "new_size": size,
        "old_root": old_root.hex(),
        "new_root": new_root.hex(),
        "proof": [h.hex() for h in proof],
        "signed_tree_head_b64": sth,
    }
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{old_size} -> {size}: old root {old_root.hex()}, new root {new_root.hex()}")
        for i, h in enumerate(proof):
            typer.echo(f"  proof[{i}] {h.hex()}")
        typer.echo("proof verifies")


# --- a lenient view of the log for show / report / export --------------------------------


@dataclass
class _RoundView:
    run: str
    round: int
    index: int
    status: str
    survivors: tuple[str, ...]
    metrics: dict[str, float]  # the round result's (training metrics, not an evaluation)
    new_model: str
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the evaluation entry's only
    eval_examples: int | None = None  # from the round's evaluation entry, if logged
    eval_sites: tuple[str, ...] = ()


@dataclass
class _ConsortiumView:
    index: int
    run: str  # the run open when it was logged ("" between runs)
    consortium: str
    version: int
    sites: int  # active sites
    revoked: int
    digest: str
    authority_key_id: str


@dataclass
class _LogView:
    entries: int = 0  # shown: those the latest signed tree head covers
    total: int = 0  # in the file, signed or not
    undecodable: list[int] = field(default_factory=list)
    genesis: Genesis | None = None
    rounds: list[_RoundView] = field(default_factory=list)
    runs: list[tuple[str, str]] = field(default_factory=list)
    roster: dict[str, str] = field(default_factory=dict)
    rejections: list[tuple[int, str, int, str, str, str]] = field(default_factory=list)
    # (site, (run number, round)) -> "accepted" / "rejected"
    inputs: dict[tuple[str, tuple[int, int]], str] = field(default_factory=dict)
    checkpoints: list[tuple[str, int, str]] = field(default_factory=list)
    tree_heads: list[tuple[int, int, str, int]] = field(default_factory=list)
    consortium: list[_ConsortiumView] = field(default_factory=list)


def _collect(store: MerkleLogStore, signed: int | None = None) -> _LogView:
    """The entries ``[0, signed)`` (default: those the largest stored signed tree head covers),
    decoded leniently; entries after them are signed by nobody and only counted."""
    view = _LogView()
    for head in store.tree_heads():
        try:  # the signed values, not the table's unsigned copies of them
            sth = SignedTreeHead.from_bytes(head.blob)
            view.tree_heads.append((head.seq, sth.tree_size, sth.root_hash.hex(), sth.timestamp_ms))
        except ProtocolError:
            view.tree_heads.append((head.seq, -1, "undecodable", -1))
    if signed is None:
        signed = max((size for _, size, _, _ in view.tree_heads), default=0)
    view.total = store.size
    current = ""
    for stored in store.iter_entries(0, min(signed, view.total)):
        view.entries += 1
        try:
            entry = decode_entry(stored.data)
        except ProtocolError:
            view.undecodable.append(stored.index)
            continue
        if isinstance(entry, Genesis):
            view.genesis = entry
        elif isinstance(entry, RosterChange):
            view.roster[entry.site] = entry.action.name.lower()
        elif isinstance(entry, RunStart):
            current = entry.run_id.hex()
            view.runs.append((current, "open"))
        elif isinstance(entry, EnvelopeRecord):
            label = f"{current[:8]}/{entry.round}"
            if entry.accepted:
                if entry.message_type.endswith("masked-input"):
                    view.inputs[(entry.site, (len(view.runs), entry.round))] = "accepted"
            else:
                view.rejections.append(
                    (stored.index, label, entry.round, entry.site, entry.stage, entry.reason)
                )
                if entry.message_type.endswith("masked-input"):
                    view.inputs.setdefault((entry.site, (len(view.runs), entry.round)), "rejected")
        elif isinstance(entry, RoundResult):
            view.rounds.append(
                _RoundView(
                    current[:8],
                    entry.round,
                    stored.index,
                    entry.status.name.lower(),
                    entry.survivors,
                    entry.metric_values,
                    entry.new_model_digest.hex(),
                )
            )
        elif isinstance(entry, Checkpoint):
            view.checkpoints.append((entry.name, entry.round, entry.model_digest.hex()))
        elif isinstance(entry, Evaluation):
            for r in reversed(view.rounds):
                if r.run == current[:8] and r.round == entry.round:
                    r.eval_metrics = entry.metric_values
                    r.eval_examples = entry.num_examples
                    r.eval_sites = entry.sites
                    break
        elif isinstance(entry, RunEnd) and view.runs:
            view.runs[-1] = (view.runs[-1][0], entry.status.name.lower())
            current = ""
        elif isinstance(entry, ConsortiumRosterRecord):
            roster = entry.roster
            active = sum(1 for s in roster.sites if s.active)
            view.consortium.append(
                _ConsortiumView(
                    stored.index, current[:8], entry.consortium, entry.version, active,
                    len(roster.sites) - active, entry.roster_digest.hex(),
                    entry.authority_key_id.hex(),
                )
            )  # fmt: skip
    return view


def _unsigned_note(view: _LogView) -> str:
    if view.total <= view.entries:
        return ""
    return (
        f"entries {view.entries}..{view.total - 1} ({view.total - view.entries}) follow the last "
        "signed tree head: UNSIGNED (anyone who can write the file can append them), not shown"
    )


@app.command("show")
def show_cmd(log: LogArg) -> None:
    """Print runs, rounds (survivors, evaluation metrics), rejections and tree heads as tables.

    A view, not a verdict: it checks nothing (run fl-audit verify for that).
    """
    store = _open(log)
    try:
        view = _collect(store)
    finally:
        store.close()
    console = Console()
    console.print(
        f"[bold]{_markup(str(log))}[/bold]: {view.entries} signed entries"
        + (f" (of {view.total})" if view.total != view.entries else "")
        + f", {len(view.tree_heads)} signed tree heads"
        + (f", log id {view.genesis.log_id.hex()}" if view.genesis else "")
        + " (not verified: fl-audit verify LOG --coordinator-key PUB.pem checks it)"
    )
    if view.total > view.entries:
        console.print(f"[bold red]{_markup(_unsigned_note(view))}[/bold red]")
    if view.undecodable:
        console.print(f"[red]undecodable entries: {view.undecodable[:20]}[/red]")
    t = Table(title="Roster (latest action per site)")
    t.add_column("site")
    t.add_column("status")
    for site, action in sorted(view.roster.items()):
        t.add_row(_markup(site), "revoked" if action == "revoke" else "enrolled")
    console.print(t)
    t = Table(title="Consortium rosters (as signed by the roster authority)")
    for col in ("entry", "run", "consortium", "version", "sites", "revoked", "digest", "authority"):
        t.add_column(col, overflow="fold")
    for c in view.consortium:
        t.add_row(
            str(c.index), c.run, _markup(c.consortium), str(c.version), str(c.sites),
            str(c.revoked), c.digest[:12], c.authority_key_id[:12],
        )  # fmt: skip
    console.print(t)
    t = Table(
        title="Rounds (accuracy, loss, macro-F1: the coordinator's claimed federated evaluation "
        "of the new model, from its evaluation entry; no site signature backs them)"
    )
    for col in (
        "run", "round", "entry", "status", "survivors", "accuracy", "loss", "macro-F1",
        "eval examples", "new model",
    ):  # fmt: skip
        t.add_column(col)
    for r in view.rounds:
        t.add_row(
            r.run,
            str(r.round),
            str(r.index),
            r.status,
            _markup(", ".join(r.survivors)),
            _fmt(r.eval_metrics.get("accuracy")),
            _fmt(r.eval_metrics.get("loss")),
            _fmt(r.eval_metrics.get("macro-f1")),
            "" if r.eval_examples is None else str(r.eval_examples),
            r.new_model[:16],
        )
    console.print(t)
    t = Table(title="Rejected envelopes")
    for col in ("entry", "run/round", "site", "stage", "reason"):
        t.add_column(col)
    for index, label, _, site, stage, reason in view.rejections:
        t.add_row(str(index), label, _markup(site), _markup(stage), _markup(reason))
    console.print(t)
    t = Table(title="Signed tree heads")
    for col in ("seq", "size", "root", "timestamp (ms)"):
        t.add_column(col)
    for seq, size, root, ts in view.tree_heads:
        t.add_row(str(seq), str(size), root[:16], str(ts))
    console.print(t)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


# --- HTML report with hand-made SVG plots --------------------------------------------------


def _svg_lines(series: dict[str, list[tuple[int, float]]], title: str) -> str:
    w, h, pad = 560, 260, 40
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no metrics recorded.</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="12">round</text>',
        f'<text x="4" y="{pad - 8}" font-size="11">{y1:.3g}</text>',
        f'<text x="4" y="{h - pad}" font-size="11">{y0:.3g}</text>',
    ]
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        pts = sorted(pts)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        parts.append(
            f'<text x="{w - pad - 90}" y="{pad + 14 * i}" fill="{color}" font-size="12">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_participation(view: _LogView) -> str:
    sites = sorted({s for s, _ in view.inputs} | set(view.roster))
    rounds = sorted({r for _, r in view.inputs})
    if not sites or not rounds:
        return "<p>No masked inputs recorded.</p>"
    cell, left, top = 22, 120, 30
    w, h = left + cell * len(rounds) + 20, top + cell * len(sites) + 20
    color = {"accepted": "#2ca02c", "rejected": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append("<title>participation per site per round</title>")
    many_runs = len({run for run, _ in rounds}) > 1
    for j, (run, rnd) in enumerate(rounds):
        label = f"{run}/{rnd}" if many_runs else str(rnd)
        parts.append(
            f'<text x="{left + cell * j + cell / 2}" y="{top - 8}" font-size="10" '
            f'text-anchor="middle">{label}</text>'
        )
    for i, s in enumerate(sites):
        y = top + cell * i
        parts.append(
            f'<text x="{left - 6}" y="{y + 15}" font-size="11" text-anchor="end">{html.escape(s)}</text>'
        )
        for j, r in enumerate(rounds):
            state = view.inputs.get((s, r), "absent")
            parts.append(
                f'<rect x="{left + cell * j}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{color.get(state, "#ccc")}"><title>{html.escape(s)} round {r[1]}: {state}'
                "</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _svg_bars(counts: Counter[str], title: str) -> str:
    if not counts:
        return "<p>No rejections.</p>"
    items = counts.most_common()
    bar, left, w = 22, 260, 640
    h = bar * len(items) + 20
    top = max(counts.values())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append(f"<title>{html.escape(title)}</title>")
    for i, (reason, n) in enumerate(items):
        y = 10 + bar * i
        length = (w - left - 60) * n / top
        parts.append(
            f'<text x="{left - 6}" y="{y + 15}" font-size="11" text-anchor="end">'
            f"{html.escape(reason[:40])}</text>"
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar - 4}" fill="#d62728"/>'
        )
        parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 15}" font-size="11">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _witness_rows(results: Sequence[WitnessResult]) -> str:
    if not results:
        return (
            "<p>No witnesses checked: nothing outside the log shows that it was not cut back to "
            "an earlier signed tree head, or rewritten and re-signed with the coordinator's key. "
            "Collect the sites' receipts (<code>fl-client receipts export</code>) and pass them "
            "with <code>--witness FILE</code>.</p>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(str(r.file.path))}</td><td>{html.escape(', '.join(r.file.sites))}"
        f"</td><td>{len(r.file.heads)}</td><td>{r.file.largest}</td>"
        + (
            f'<td class="ok">consistent: all {r.checked} verify under the pinned key and are '
            "prefixes of this log</td></tr>"
            if r.failure is None
            else f'<td class="bad">FAILED ({html.escape(r.failure.check)}): '
            f"{html.escape(str(r.failure))}</td></tr>"
        )
        for r in results
    )
    return (
        "<p>Signed tree heads the sites kept (their receipts), checked against this log: "
        "signature under the pinned coordinator key, log id, and consistency (a witnessed head "
        "must be a prefix of the log).</p><table><tr><th>witness file</th><th>site(s)</th>"
        f"<th>tree heads</th><th>largest size</th><th>result</th></tr>{rows}</table>"
    )


def render_report(
    view: _LogView, title: str, verdict: str, witnesses: Sequence[WitnessResult] = ()
) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, no external resources)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for idx, r in enumerate(view.rounds, 1):
        for name, value in r.eval_metrics.items():
            series.setdefault(name, []).append((idx, value))
    loss = {k: v for k, v in series.items() if "loss" in k}
    acc = {k: v for k, v in series.items() if "loss" not in k}
    reasons = Counter(reason for *_, reason in view.rejections)
    rows = "".join(
        f"<tr><td>{html.escape(r.run)}</td><td>{r.round}</td><td>{r.status}</td>"
        f"<td>{html.escape(', '.join(r.survivors))}</td><td>{_fmt(r.eval_metrics.get('accuracy'))}</td>"
        f"<td>{_fmt(r.eval_metrics.get('loss'))}</td>"
        f"<td>{_fmt(r.eval_metrics.get('macro-f1'))}</td>"
        f"<td>{'' if r.eval_examples is None else r.eval_examples}</td>"
        f"<td>{r.new_model[:16]}</td></tr>"
        for r in view.rounds
    )
    rej = "".join(
        f"<tr><td>{i}</td><td>{html.escape(lbl)}</td><td>{html.escape(s)}</td>"
        f"<td>{html.escape(st)}</td><td>{html.escape(reason)}</td></tr>"
        for i, lbl, _, s, st, reason in view.rejections
    )
    consortium = "".join(
        f"<tr><td>{c.index}</td><td>{html.escape(c.run)}</td><td>{html.escape(c.consortium)}</td>"
        f"<td>{c.version}</td><td>{c.sites}</td><td>{c.revoked}</td><td>{c.digest[:16]}</td>"
        f"<td>{c.authority_key_id[:16]}</td></tr>"
        for c in view.consortium
    )
    unsigned = ""
    if view.total > view.entries:
        unsigned = f' <b class="bad">({html.escape(_unsigned_note(view))})</b>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}
.ok{{color:#2ca02c}}.bad{{color:#d62728}}</style></head><body>
<h1>fedseal audit report</h1>
<p>{html.escape(title)}: {view.entries} signed entries{unsigned}, {len(view.tree_heads)} signed tree heads.</p>
<p><b>Verification:</b> {html.escape(verdict)}</p>
<h2>Witnesses</h2>{_witness_rows(witnesses)}
<h2>Accuracy and macro-F1 per round</h2>{_svg_lines(acc, "accuracy per round")}
<h2>Loss per round</h2>{_svg_lines(loss, "loss per round")}
<h2>Participation per site per round</h2>
<p>green: masked input accepted; red: rejected; grey: none.</p>{_svg_participation(view)}
<h2>Rejection reasons</h2>{_svg_bars(reasons, "rejection reasons")}
<h2>Consortium rosters</h2><table><tr><th>entry</th><th>run</th><th>consortium</th>
<th>version</th><th>sites</th><th>revoked</th><th>digest</th><th>authority</th></tr>{consortium}</table>
<h2>Rounds</h2>
<p>Accuracy, loss and macro-F1: the federated evaluation of the round's new model, from its
evaluation entry: the coordinator's claim (signed by it; no site's signature backs them).</p>
<table><tr><th>run</th><th>round</th><th>status</th><th>survivors</th><th>accuracy</th>
<th>loss</th><th>macro-F1</th><th>eval examples</th><th>new model</th></tr>{rows}</table>
<h2>Rejected envelopes</h2><table><tr><th>entry</th><th>run/round</th><th>site</th><th>stage</th>
<th>reason</th></tr>{rej}</table>
</body></html>
"""


@app.command("report")
def report_cmd(
    log: LogArg,
    out: Annotated[Path, typer.Option(help="Where to write the HTML report.")],
    coordinator_key: CoordinatorKeyOpt = None,
    trust_log_key: TrustLogKeyOpt = False,
    witness: WitnessOpt = None,
    verify: Annotated[
        bool,
        typer.Option(help="Also verify the log and state the verdict (needs a trust anchor)."),
    ] = True,
) -> None:
    """Write a self-contained HTML report: accuracy/loss, participation, rejection reasons.

    With --verify (the default) the report states the verdict of fl-audit verify, so it needs a
    trust anchor: --coordinator-key PUB.pem, or --trust-log-key (verdict and exit 3 say the
    key was not pinned). With --witness FILE (needs --coordinator-key) the report lists each
    witness file and whether the log is consistent with its tree heads. Exits 1 (after writing
    the report) if verification or a witness fails.
    """
    if witness and not verify:
        raise _fail(
            EXIT_USAGE,
            "--witness needs --verify: witnesses are checked against a log that verified",
        )
    anchor = _anchor("report", coordinator_key, trust_log_key, witness) if verify else None
    _open(log).close()
    signed: int | None = None  # entries the verified signed tree heads cover
    verdict = "not checked"
    code = EXIT_OK
    witnessed: list[WitnessResult] = []
    if anchor is not None:
        try:
            result = verify_log(log, coordinator_key=anchor.key, jobs=_default_jobs())
            signed = result.signed_entries
            witnessed = _check_witnesses(log, anchor, result)
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
                        f"; {_witness_summary(witnessed)}: all consistent with the log)"
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
                typer.echo(f"fl-audit: {_unpinned_warning(result.coordinator_key_id)}", err=True)
                code = EXIT_INCOMPLETE
            tail = _unsigned_tail(result)
            if code != EXIT_FAILED and tail and not result.open_run:
                verdict = (
                    f"FAILED: {tail}; no run is open, and a finished run's log must be fully signed"
                )
                code = EXIT_FAILED
            if code != EXIT_FAILED:
                span = _unwitnessed(result, witnessed)
                if span is not None:
                    verdict += f"; note: {_unwitnessed_text(span)}"
                verdict += "".join(f"; warning: {w}" for w in result.warnings)
        except (AuditVerificationError, AuditLogError) as exc:
            verdict = f"FAILED: {exc}"
            code = EXIT_FAILED
    store = _open(log)
    try:
        view = _collect(store, signed)
    finally:
        store.close()
    out.write_text(render_report(view, str(log), verdict, witnessed), encoding="utf-8")
    _echo(f"wrote {out}")
    if code != EXIT_OK:
        _echo(f"fl-audit: verification: {verdict}", err=True)
        raise typer.Exit(code)


def _jsonable(entry: AuditEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"type": entry.KIND.label}
    for f in dataclasses.fields(entry):
        out[f.name] = _plain(getattr(entry, f.name))
    return out


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _export_lines(store: MerkleLogStore) -> Iterator[str]:
    for stored in store.iter_entries():
        record: dict[str, Any] = {"index": stored.index, "leaf_hash": stored.leaf_hash.hex()}
        try:
            record["entry"] = _jsonable(decode_entry(stored.data))
        except ProtocolError as exc:
            record["error"] = str(exc)
            record["data_b64"] = base64.b64encode(stored.data).decode()
        yield json.dumps(record)
    for head in store.tree_heads():
        try:
            sth = SignedTreeHead.from_bytes(head.blob)
            yield json.dumps(
                {
                    "tree_head": head.seq,
                    "tree_size": sth.tree_size,
                    "root_hash": sth.root_hash.hex(),
                    "timestamp_ms": sth.timestamp_ms,
                    "signature": sth.signature.hex(),
                    "log_id": sth.log_id.hex(),
                }
            )
        except ProtocolError as exc:
            yield json.dumps({"tree_head": head.seq, "error": str(exc)})


@app.command("export")
def export_cmd(
    log: LogArg,
    fmt: Annotated[str, typer.Option("--format", help="Output format (only 'jsonl').")] = "jsonl",
    out: Annotated[Path | None, typer.Option(help="Output file (default: stdout).")] = None,
) -> None:
    """Export every entry (decoded, bytes as hex) and tree head as JSON lines."""
    if fmt != "jsonl":
        raise _fail(EXIT_USAGE, f"unknown format {fmt!r} (supported: jsonl)")
    store = _open(log)
    try:
        if out is None:
            for line in _export_lines(store):
                sys.stdout.write(line + "\n")
        else:
            with out.open("w", encoding="utf-8") as fh:
                for line in _export_lines(store):
                    fh.write(line + "\n")
    finally:
        store.close()


def main() -> None:
    """Console-script entry point."""
    app()
