"""``fl-audit``: offline verification, proofs and reports over the coordinator's audit log.

Example::

    fl-audit verify audit.sqlite --coordinator-key coordinator.pub.pem --roster roster.json
    fl-audit verify audit.sqlite --consortium-authority authority.key.pub
    fl-audit prove audit.sqlite --site site-a --round 3 --json > receipt.json
    fl-audit consistency audit.sqlite 120
    fl-audit show audit.sqlite
    fl-audit report audit.sqlite --out report.html
    fl-audit export audit.sqlite --format jsonl > audit.jsonl

Exit codes (every command):

* 0 — success (``verify``: every check holds);
* 1 — verification failed / the requested proof or entry does not exist or does not verify;
* 2 — usage error (bad option or argument);
* 3 — ``verify --strict`` only: the log verifies but is incomplete (an open run, or entries
  not yet covered by a signed tree head);
* 4 — the log (or a key / roster file) cannot be read: missing, not a fedseal log, malformed.

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
import html
import json
import os
import sys
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
from rich.progress import Progress
from rich.table import Table

from fedseal.crypto.auditlog import AuditLogError, MerkleLogStore
from fedseal.crypto.errors import CryptoError, MerkleProofError
from fedseal.crypto.keys import load_public_key, public_key_to_der
from fedseal.crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from fedseal.protocol.audit import (
    AuditEntry,
    AuditVerificationError,
    AuditVerifier,
    Checkpoint,
    ConsortiumRosterRecord,
    EnvelopeRecord,
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
        "Exit codes: 0 ok; 1 verification failed / proof not found; 2 usage error; "
        "3 incomplete log (verify --strict); 4 unreadable log, key or roster file."
    ),
    no_args_is_help=True,
    add_completion=False,
)

LogArg = Annotated[
    Path,
    typer.Argument(help="The audit log (SQLite file written by fl-server).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead.")]


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"fl-audit: {message}", err=True)
    return typer.Exit(code)


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
    """Verify the log at ``path`` (library entry point of ``fl-audit verify``).

    Raises:
        AuditVerificationError: The first bad entry or tree head.
        fedseal.crypto.auditlog.AuditLogError: The file is not a readable fedseal log.
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
        ).run_rows(store.iter_leaf_rows(), store.tree_heads())
    finally:
        checker.close()
        store.close()


@app.command("verify")
def verify_cmd(
    log: LogArg,
    roster: Annotated[
        Path | None,
        typer.Option(help="Trusted roster (JSON) the log's enrolments and roots must agree with."),
    ] = None,
    coordinator_key: Annotated[
        Path | None,
        typer.Option(help="Pinned coordinator public key (PEM); else the log's genesis key."),
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
    strict: Annotated[
        bool, typer.Option(help="Exit 3 if the log is incomplete (open run, uncovered entries).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the Merkle tree and check every signature, tree head and run rule.

    Names the first bad entry (index, type, failed check) and exits 1 if anything fails.
    """
    pinned = None
    if coordinator_key is not None:
        try:
            pinned = load_public_key(coordinator_key)
        except (OSError, CryptoError) as exc:
            raise _fail(EXIT_UNREADABLE, f"coordinator key {coordinator_key}: {exc}") from exc
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
    n_jobs = jobs or _default_jobs()
    show_progress = not as_json and sys.stderr.isatty()
    try:
        with Progress(console=Console(stderr=True), disable=not show_progress) as bar:
            task = bar.add_task("verifying", total=total)
            result = verify_log(
                log,
                coordinator_key=pinned,
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
            typer.echo(f"FAILED: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc
    except AuditLogError as exc:
        raise _fail(EXIT_UNREADABLE, f"{log}: {exc}") from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "entries": result.entries,
                    "tree_heads": result.tree_heads,
                    "signatures": result.signatures,
                    "root_hash": result.root_hash.hex(),
                    "runs": [
                        {"run_id": r, "status": s, "completed_rounds": c, "failed_rounds": f}
                        for r, s, c, f in result.runs
                    ],
                    "accepted_envelopes": result.accepted_envelopes,
                    "rejected_envelopes": result.rejected_envelopes,
                    "consortium_rosters": [
                        {
                            "consortium": c,
                            "version": v,
                            "roster_digest": d,
                            "authority_key_id": k,
                        }
                        for c, v, d, k in result.consortium_rosters
                    ],
                    "warnings": list(result.warnings),
                }
            )
        )
    else:
        typer.echo(
            f"OK: {result.entries} entries, {result.tree_heads} signed tree heads, "
            f"{result.signatures} site signatures, root {result.root_hash.hex()}"
        )
        for run_id, status, done, failed in result.runs:
            typer.echo(f"  run {run_id}: {status}, {done} rounds completed, {failed} failed")
        for name, version, digest, kid in result.consortium_rosters:
            typer.echo(
                f"  consortium roster {name!r}: version {version}, digest {digest[:16]}…, "
                f"authority key {kid[:16]}…"
            )
        for warning in result.warnings:
            typer.echo(f"  warning: {warning}")
    if strict and result.warnings:
        raise typer.Exit(EXIT_INCOMPLETE)


def _head_for(
    store: MerkleLogStore, min_size: int, tree_size: int | None
) -> tuple[int, bytes, str]:
    """(size, root, signed tree head b64 or "") to prove against."""
    if tree_size is None:
        latest = store.latest_tree_head()
        if latest is not None and latest.tree_size >= min_size:
            return latest.tree_size, latest.root_hash, base64.b64encode(latest.blob).decode()
        tree_size = store.size
    for head in store.tree_heads():
        if head.tree_size == tree_size:
            return tree_size, head.root_hash, base64.b64encode(head.blob).decode()
    return tree_size, store.root(tree_size), ""


@app.command("prove")
def prove_cmd(
    log: LogArg,
    site: Annotated[str, typer.Option(help="Site id whose accepted masked input to prove.")],
    round: Annotated[int, typer.Option("--round", min=1, help="Round number.")],
    run_id: Annotated[
        str | None, typer.Option(help="Run id (hex); default: the latest run.")
    ] = None,
    tree_size: Annotated[
        int | None, typer.Option(help="Prove against this tree size (default: latest tree head).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an inclusion proof of a site's accepted masked-input envelope for a round.

    The proof is checked before it is printed; a site verifies it with
    fedseal.crypto.merkle.verify_inclusion against a signed tree head it trusts.
    """
    store = _open(log)
    try:
        rid = bytes.fromhex(run_id) if run_id else None
        index = find_input(store, site, round, rid)
        if index is None:
            raise _fail(EXIT_FAILED, f"no accepted masked input from {site!r} in round {round}")
        size, root, sth = _head_for(store, index + 1, tree_size)
        if not index < size <= store.size:
            raise _fail(EXIT_FAILED, f"tree size {size} does not contain entry {index}")
        entry = store.entries(index, index + 1)[0]
        lh = leaf_hash(entry.data)
        proof = store.inclusion_proof(index, size)
        verify_inclusion(lh, index, size, proof, root)
    except (AuditLogError, MerkleProofError, ValueError) as exc:
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
        size, new_root, sth = _head_for(store, old_size, new_size)
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
    metrics: dict[str, float]
    new_model: str


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
    entries: int = 0
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


def _collect(store: MerkleLogStore) -> _LogView:
    view = _LogView()
    current = ""
    for stored in store.iter_entries():
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
    for head in store.tree_heads():
        view.tree_heads.append((head.seq, head.tree_size, head.root_hash.hex(), head.timestamp_ms))
    return view


@app.command("show")
def show_cmd(log: LogArg) -> None:
    """Print runs, rounds (survivors, metrics), rejections and tree heads as tables."""
    store = _open(log)
    try:
        view = _collect(store)
    finally:
        store.close()
    console = Console()
    console.print(
        f"[bold]{log}[/bold]: {view.entries} entries, {len(view.tree_heads)} signed tree heads"
        + (f", log id {view.genesis.log_id.hex()}" if view.genesis else "")
    )
    if view.undecodable:
        console.print(f"[red]undecodable entries: {view.undecodable[:20]}[/red]")
    t = Table(title="Roster (latest action per site)")
    t.add_column("site")
    t.add_column("status")
    for site, action in sorted(view.roster.items()):
        t.add_row(site, "revoked" if action == "revoke" else "enrolled")
    console.print(t)
    t = Table(title="Consortium rosters (as signed by the roster authority)")
    for col in ("entry", "run", "consortium", "version", "sites", "revoked", "digest", "authority"):
        t.add_column(col, overflow="fold")
    for c in view.consortium:
        t.add_row(
            str(c.index), c.run, c.consortium, str(c.version), str(c.sites), str(c.revoked),
            c.digest[:12], c.authority_key_id[:12],
        )  # fmt: skip
    console.print(t)
    t = Table(title="Rounds")
    for col in ("run", "round", "entry", "status", "survivors", "accuracy", "loss", "new model"):
        t.add_column(col)
    for r in view.rounds:
        t.add_row(
            r.run,
            str(r.round),
            str(r.index),
            r.status,
            ", ".join(r.survivors),
            _fmt(r.metrics.get("accuracy")),
            _fmt(r.metrics.get("loss")),
            r.new_model[:16],
        )
    console.print(t)
    t = Table(title="Rejected envelopes")
    for col in ("entry", "run/round", "site", "stage", "reason"):
        t.add_column(col)
    for index, label, _, site, stage, reason in view.rejections:
        t.add_row(str(index), label, site, stage, reason)
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


def render_report(view: _LogView, title: str, verdict: str) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, no external resources)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for idx, r in enumerate(view.rounds, 1):
        for name, value in r.metrics.items():
            series.setdefault(name, []).append((idx, value))
    acc = {k: v for k, v in series.items() if "acc" in k}
    loss = {k: v for k, v in series.items() if "acc" not in k}
    reasons = Counter(reason for *_, reason in view.rejections)
    rows = "".join(
        f"<tr><td>{html.escape(r.run)}</td><td>{r.round}</td><td>{r.status}</td>"
        f"<td>{html.escape(', '.join(r.survivors))}</td><td>{r.new_model[:16]}</td></tr>"
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
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}
.ok{{color:#2ca02c}}.bad{{color:#d62728}}</style></head><body>
<h1>fedseal audit report</h1>
<p>{html.escape(title)}: {view.entries} entries, {len(view.tree_heads)} signed tree heads.</p>
<p><b>Verification:</b> {html.escape(verdict)}</p>
<h2>Accuracy per round</h2>{_svg_lines(acc, "accuracy per round")}
<h2>Loss per round</h2>{_svg_lines(loss, "loss per round")}
<h2>Participation per site per round</h2>
<p>green: masked input accepted; red: rejected; grey: none.</p>{_svg_participation(view)}
<h2>Rejection reasons</h2>{_svg_bars(reasons, "rejection reasons")}
<h2>Consortium rosters</h2><table><tr><th>entry</th><th>run</th><th>consortium</th>
<th>version</th><th>sites</th><th>revoked</th><th>digest</th><th>authority</th></tr>{consortium}</table>
<h2>Rounds</h2><table><tr><th>run</th><th>round</th><th>status</th><th>survivors</th>
<th>new model</th></tr>{rows}</table>
<h2>Rejected envelopes</h2><table><tr><th>entry</th><th>run/round</th><th>site</th><th>stage</th>
<th>reason</th></tr>{rej}</table>
</body></html>
"""


@app.command("report")
def report_cmd(
    log: LogArg,
    out: Annotated[Path, typer.Option(help="Where to write the HTML report.")],
    verify: Annotated[bool, typer.Option(help="Also verify the log and state the verdict.")] = True,
) -> None:
    """Write a self-contained HTML report: accuracy/loss, participation, rejection reasons."""
    store = _open(log)
    try:
        view = _collect(store)
    finally:
        store.close()
    verdict = "not checked"
    if verify:
        try:
            result = verify_log(log, jobs=_default_jobs())
            verdict = f"all checks hold ({result.entries} entries)" + "".join(
                f"; warning: {w}" for w in result.warnings
            )
        except AuditVerificationError as exc:
            verdict = f"FAILED: {exc}"
    out.write_text(render_report(view, str(log), verdict), encoding="utf-8")
    typer.echo(f"wrote {out}")


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
