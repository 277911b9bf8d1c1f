"""``fl-audit``: offline verification, proofs and reports over the coordinator's audit log.

The command layer only: it parses options, calls the library (``fedseal.audit.auditor``,
``fedseal.audit.verify_run``, ``fedseal.audit.report``), prints what it returns and exits.

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

import sys
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from fedseal.audit.auditor import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    AuditCommandError,
    Verdict,
    load_anchor,
    open_log,
    prove_consistency,
    prove_inclusion,
)
from fedseal.audit.report import (
    collect_view,
    dp_lines,
    export_lines,
    format_metric,
    unsigned_note,
)
from fedseal.audit.verify_run import (
    ProgressTracker,
    judge_report,
    prepare_verify,
    render_run_report,
    verify_run,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_UNREADABLE",
    "EXIT_USAGE",
    "app",
    "main",
]

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


@contextmanager
def _exits() -> Iterator[None]:
    """Turn the library's :class:`AuditCommandError` into ``fl-audit: MESSAGE`` and its exit."""
    try:
        yield
    except AuditCommandError as exc:
        raise _fail(exc.exit_code, exc.message) from exc


def _emit(verdict: Verdict) -> None:
    """Print a verdict (its lines on stdout, then its warnings on stderr) and exit with it."""
    for line in verdict.lines:
        _echo(line)
    for warning in verdict.warnings:
        _echo(warning, err=True)
    if verdict.exit_code != EXIT_OK:
        raise typer.Exit(verdict.exit_code)


def _progress_bar(show: bool) -> ProgressTracker:
    """A progress tracker for :func:`verify_run`: a bar on stderr when ``show``."""

    @contextmanager
    def track(total: int) -> Iterator[Callable[[int], None]]:
        with Progress(console=Console(stderr=True), disable=not show) as bar:
            task = bar.add_task("verifying", total=total)
            yield lambda done: bar.update(task, completed=done)

    return track


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
    with _exits():
        plan = prepare_verify(
            log,
            load_anchor("verify", coordinator_key, trust_log_key, witness),
            roster=roster,
            consortium_authority=consortium_authority,
            jobs=jobs,
        )
        verdict = verify_run(
            plan,
            allow_open=allow_open,
            allow_wal=allow_wal,
            strict=strict,
            as_json=as_json,
            track=_progress_bar(not as_json and sys.stderr.isatty()),
        )
    _emit(verdict)


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
    with _exits():
        anchor = load_anchor("prove", coordinator_key, trust_log_key)
        verdict = prove_inclusion(
            log, anchor, site=site, round=round, run_id=run_id, tree_size=tree_size, as_json=as_json
        )
    _emit(verdict)


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
    with _exits():
        verdict = prove_consistency(log, old_size, new_size, as_json=as_json)
    _emit(verdict)


def _roster_row(index: int, data: bytes) -> tuple[int, str, str, str, int, str] | None:
    """A roster-change entry as (entry, site, action, dataset roots (short), time ms, reason):
    an enrolment, roots change, revocation (with its reason) or root withdrawal (the roots
    withdrawn and why); ``None`` if it does not decode as one (``show`` lists undecodable
    entries itself)."""
    from fedseal.audit.codec import decode_entry
    from fedseal.audit.entries import RosterChange
    from fedseal.protocol.errors import ProtocolError

    try:
        entry = decode_entry(data)
    except (ProtocolError, ValueError):
        return None
    if not isinstance(entry, RosterChange):
        return None
    roots = ", ".join(r.hex()[:16] + "…" for r in entry.approved_roots)
    action = entry.action.name.lower().replace("_", "-")
    return index, entry.site, action, roots, entry.at_ms, entry.reason


def _ms(at_ms: int) -> str:
    from datetime import UTC, datetime

    if at_ms <= 0:
        return ""
    return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@app.command("show")
def show_cmd(log: LogArg) -> None:
    """Print runs, rounds (survivors, evaluation metrics), rejections and tree heads as tables.

    The roster's history lists every enrolment, roots change, revocation (with its reason) and
    dataset-root withdrawal (the root, when and why). A view, not a verdict: it checks nothing
    (run fl-audit verify for that).
    """
    with _exits():
        store = open_log(log)
    try:
        view = collect_view(store)
        from fedseal.audit.entries import EntryKind

        changes = [  # signed entries only, as the rest of the view
            row
            for index in store.find(int(EntryKind.ROSTER_CHANGE))
            if index < view.entries
            and (row := _roster_row(index, store.entries(index, index + 1)[0].data)) is not None
        ]
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
        console.print(f"[bold red]{_markup(unsigned_note(view))}[/bold red]")
    if view.undecodable:
        console.print(f"[red]undecodable entries: {view.undecodable[:20]}[/red]")
    t = Table(title="Roster (latest action per site)")
    t.add_column("site")
    t.add_column("status")
    status: dict[str, str] = {}  # a root withdrawal or roots change leaves the status as it was
    for _, site, action, _, _, _ in changes:
        if action in ("enrol", "revoke"):
            status[site] = "revoked" if action == "revoke" else "enrolled"
    for site in sorted(view.roster):
        t.add_row(_markup(site), status.get(site, "enrolled"))
    console.print(t)
    t = Table(title="Roster history (enrolments, roots, revocations, dataset-root withdrawals)")
    for col in ("entry", "time", "site", "action", "dataset roots", "reason"):
        t.add_column(col, overflow="fold")
    for index, site, action, roots, at_ms, reason in changes:
        t.add_row(str(index), _ms(at_ms), _markup(site), action, roots, _markup(reason))
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
            format_metric(r.eval_metrics.get("accuracy")),
            format_metric(r.eval_metrics.get("loss")),
            format_metric(r.eval_metrics.get("macro-f1")),
            "" if r.eval_examples is None else str(r.eval_examples),
            r.new_model[:16],
        )
    console.print(t)
    for line in dp_lines(view):
        console.print(_markup(line))
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
    """Write the run's record of processing as one self-contained HTML page (no scripts).

    For a data-protection officer: each run's identity and timeline (start, end, rounds
    planned/committed/failed, configuration digest, DP budget); every site's enrolment, dataset
    roots, withdrawals and revocation with time and reason; which dataset root each site used
    in each round; participation per site per round (one row per site, readable at 100 sites x
    50 rounds); what was rejected or failed and why; checkpoints and final model; ε per round;
    and what the log does not record. Site ids and reasons from the log are escaped.

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
    with _exits():
        anchor = load_anchor("report", coordinator_key, trust_log_key, witness) if verify else None
        judged = judge_report(log, anchor)
        for warning in judged.warnings:
            _echo(warning, err=True)
        html = render_run_report(log, judged)
    out.write_text(html, encoding="utf-8")
    _echo(f"wrote {out}")
    if judged.exit_code != EXIT_OK:
        _echo(f"fl-audit: verification: {judged.verdict}", err=True)
        raise typer.Exit(judged.exit_code)


@app.command("export")
def export_cmd(
    log: LogArg,
    fmt: Annotated[str, typer.Option("--format", help="Output format (only 'jsonl').")] = "jsonl",
    out: Annotated[Path | None, typer.Option(help="Output file (default: stdout).")] = None,
) -> None:
    """Export every entry (decoded, bytes as hex) and tree head as JSON lines."""
    if fmt != "jsonl":
        raise _fail(EXIT_USAGE, f"unknown format {fmt!r} (supported: jsonl)")
    with _exits():
        store = open_log(log)
    try:
        if out is None:
            for line in export_lines(store):
                sys.stdout.write(line + "\n")
        else:
            with out.open("w", encoding="utf-8") as fh:
                for line in export_lines(store):
                    fh.write(line + "\n")
    finally:
        store.close()


def main() -> None:
    """Console-script entry point."""
    app()
