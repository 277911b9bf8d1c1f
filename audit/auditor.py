"""The auditor's side of ``fl-audit`` as a library, short of a whole-log verdict: the trust
anchor (:func:`load_anchor`), verify a log file (:func:`verify_log`, site signatures checked in
worker processes), read a trusted roster file, prove an entry's inclusion or two tree sizes'
consistency against the signed tree heads (:func:`prove_inclusion`, :func:`prove_consistency`),
and word what a verdict leaves open (unsigned or unwitnessed entries, an unpinned key, a ``-wal``
file). A command's outcome is a :class:`Verdict` (exit code, lines for stdout, lines for stderr);
what stops a command early is an :class:`AuditCommandError`. ``fedseal.audit.verify_run`` weighs
a whole log (``fl-audit verify`` / ``report``).

Trusted roster file: the coordinator's ``roster.json`` (``fedseal.server.roster``:
``{"sites": [{"name", "public_key_der" (hex), "dataset_roots", "status"}]}``) or, JSON::

    {"sites": [{"site": "site-a", "public_key_pem": "-----BEGIN PUBLIC KEY-----...",
                "approved_roots": ["<64 hex>", ...], "active": true}, ...]}
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import Genesis
from fedseal.audit.errors import AuditLogError
from fedseal.audit.signatures import JobFailure, SignatureJob, check_signatures_serial
from fedseal.audit.store import MerkleLogStore, wal_file
from fedseal.audit.treehead import SignedTreeHead
from fedseal.audit.verifier import AuditVerifier, VerifiedLog
from fedseal.audit.witness import WitnessFile, WitnessFormatError, WitnessResult, read_witness_file
from fedseal.audit.writer import find_input
from fedseal.crypto.errors import CryptoError, MerkleProofError
from fedseal.crypto.keys import load_public_key, public_key_from_der, public_key_to_der
from fedseal.crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.roster import Roster, RosterEntry

__all__ = [
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_UNREADABLE",
    "EXIT_USAGE",
    "AuditCommandError",
    "ParallelSignatureChecker",
    "TrustAnchor",
    "Verdict",
    "check_anchor_head",
    "default_jobs",
    "head_for",
    "load_anchor",
    "load_key_file",
    "load_roster_file",
    "load_trusted_roster",
    "open_log",
    "prove_consistency",
    "prove_inclusion",
    "signed_heads",
    "unpinned_warning",
    "unsigned_tail",
    "unwitnessed",
    "unwitnessed_text",
    "verify_log",
    "wal_bytes",
    "wal_warning",
    "witness_summary",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_UNREADABLE = 4


class AuditCommandError(Exception):
    """An ``fl-audit`` command stops before its verdict: ``fl-audit: MESSAGE`` on stderr, exit
    ``exit_code`` (usage error, unreadable file, a proof that does not exist or verify)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass(frozen=True)
class Verdict:
    """What an ``fl-audit`` command ends with: print ``lines`` on stdout, then ``warnings`` on
    stderr (each whole, prefix included), then exit with ``exit_code``."""

    exit_code: int
    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrustAnchor:
    """What the auditor trusts: a pinned coordinator key, or (explicitly) the log's own key;
    with the pinned key, the tree heads the sites kept (``--witness FILE``)."""

    key: ec.EllipticCurvePublicKey | None
    trust_log_key: bool
    witnesses: tuple[WitnessFile, ...] = ()


def load_anchor(
    command: str,
    coordinator_key: Path | None,
    trust_log_key: bool,
    witness: Sequence[Path] | None = None,
) -> TrustAnchor:
    """The trust anchor ``command`` runs under: the pinned key read from ``coordinator_key``
    (with the witness files read), or the log's own key (``trust_log_key``).

    Raises:
        AuditCommandError: EXIT_USAGE (both or neither anchor; witnesses without a pinned key),
            EXIT_UNREADABLE (the key or a witness file cannot be read).
    """
    if coordinator_key is not None and trust_log_key:
        raise AuditCommandError(
            EXIT_USAGE, "--coordinator-key and --trust-log-key exclude each other"
        )
    if witness and coordinator_key is None:
        raise AuditCommandError(
            EXIT_USAGE,
            "--witness needs --coordinator-key PUB.pem: a witnessed tree head counts only if the "
            "pinned coordinator key signed it",
        )
    if coordinator_key is None and not trust_log_key:
        raise AuditCommandError(
            EXIT_USAGE,
            f"{command} needs a trust anchor: --coordinator-key PUB.pem (the coordinator's "
            "public key, obtained out of band: the log's genesis key must be this key), or "
            "--trust-log-key to check against the key the log names itself (exit 3: a log "
            "forged under a fresh key would pass that too)",
        )
    if coordinator_key is None:
        return TrustAnchor(None, True)
    key = load_key_file(coordinator_key, "coordinator key")
    try:
        files = tuple(read_witness_file(path) for path in witness or ())
    except WitnessFormatError as exc:
        raise AuditCommandError(EXIT_UNREADABLE, str(exc)) from exc
    return TrustAnchor(key, False, files)


def load_key_file(path: Path, what: str) -> ec.EllipticCurvePublicKey:
    """The public key (PEM) at ``path``; ``what`` names it in the error.

    Raises:
        AuditCommandError: EXIT_UNREADABLE, the file cannot be read or holds no such key.
    """
    try:
        return load_public_key(path)
    except (OSError, CryptoError) as exc:
        raise AuditCommandError(EXIT_UNREADABLE, f"{what} {path}: {exc}") from exc


def open_log(path: Path) -> MerkleLogStore:
    """The log at ``path``, opened read-only.

    Raises:
        AuditCommandError: EXIT_UNREADABLE, missing or not a readable fedseal log.
    """
    try:
        return MerkleLogStore.open(path, read_only=True)
    except FileNotFoundError as exc:
        raise AuditCommandError(EXIT_UNREADABLE, f"{path}: no such file") from exc
    except AuditLogError as exc:
        raise AuditCommandError(EXIT_UNREADABLE, f"{path}: {exc}") from exc


def load_roster_file(path: Path) -> Roster:
    """Read a trusted roster file (:func:`load_trusted_roster`).

    Raises:
        AuditCommandError: EXIT_UNREADABLE, naming the error.
    """
    try:
        return load_trusted_roster(path)
    except (OSError, ValueError, KeyError, TypeError, CryptoError, ProtocolError) as exc:
        raise AuditCommandError(
            EXIT_UNREADABLE, f"roster {path}: {type(exc).__name__}: {exc}"
        ) from exc


class ParallelSignatureChecker:
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


def default_jobs() -> int:
    """Worker processes: this process needs a core for the in-order checks; on fewer than
    4 CPUs, workers only add contention (measured in BENCHMARKS.md)."""
    cpus = os.cpu_count() or 1
    return 1 if cpus < 4 else min(8, cpus - 1)


def load_trusted_roster(path: Path) -> Roster:
    """Read a trusted roster: the coordinator's ``roster.json`` (fedseal.server.roster) or the
    documented auditor format (see the module docstring).

    Raises:
        OSError, ValueError, KeyError, TypeError, CryptoError, ProtocolError: The file cannot
            be read or is malformed.
    """
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
        active = item["active"] if "active" in item else item.get("status", "active") == "active"
        entries.append(
            RosterEntry.from_der(
                item.get("site", item.get("name")),
                der,
                [bytes.fromhex(r) for r in roots],
                active=bool(active),
            )
        )
    return Roster(entries)


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
    (:meth:`~fedseal.audit.verifier.AuditVerifier.verify_store`).

    ``coordinator_key`` is the trust anchor; without it the tree heads are checked against the
    key the log's genesis names (the result says so: ``coordinator_key_pinned`` is false), which
    proves nothing about who wrote the log.

    Raises:
        AuditVerificationError: The first bad entry, tree head or stored copy.
        fedseal.audit.errors.AuditLogError: The file is not a readable fedseal log.
    """
    store = MerkleLogStore.open(path, read_only=True)
    checker = ParallelSignatureChecker(jobs)
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


def witness_summary(results: Sequence[WitnessResult]) -> str:
    """``N witnessed tree heads from F file(s) (site(s) ...; up to size S)``."""
    heads = sum(len(r.file.heads) for r in results)
    sites = sorted({s for r in results for s in r.file.sites})
    return (
        f"{heads} witnessed tree heads from {len(results)} file(s) (site(s) {', '.join(sites)}; "
        f"up to size {max(r.file.largest for r in results)})"
    )


def unsigned_tail(result: VerifiedLog) -> str:
    """The entries no signed tree head covers, in words ("" if none)."""
    if result.signed_entries >= result.entries:
        return ""
    return (
        f"entries {result.signed_entries}..{result.entries - 1} follow the last signed tree head "
        f"(size {result.signed_entries}): they are UNSIGNED, anyone who can write the file can "
        "have appended them"
    )


def unwitnessed(result: VerifiedLog, witnessed: Sequence[WitnessResult]) -> tuple[int, int] | None:
    """``(first, last)`` entries that no witnessed tree head covers (only with witnesses)."""
    if not witnessed:
        return None
    largest = max(r.file.largest for r in witnessed)
    return None if largest >= result.entries else (largest, result.entries - 1)


def unwitnessed_text(span: tuple[int, int]) -> str:
    return (
        f"entries {span[0]}..{span[1]} are witnessed by no site: only the coordinator's own "
        "signature covers them (a site's receipts end before the run's last tree head)"
    )


def unpinned_warning(key_id_hex: str) -> str:
    return (
        "warning: verified only against the log's own key (coordinator key "
        f"{key_id_hex or '?'}, named by the log's genesis entry), not against a pinned one: a log "
        "forged under a fresh key verifies too. Pin the coordinator's public key with "
        "--coordinator-key PUB.pem. Exit 3."
    )


def wal_warning(log: Path, size: int) -> str:
    return (
        f"warning: {wal_file(log)} exists beside the log ({size} bytes of committed pages not "
        f"yet checkpointed into {log.name}): the log is open in a running coordinator, or its "
        "writer did not stop cleanly. This check read both files, but a copy of "
        f"{log.name} alone may silently miss entries: back up a live log with fedseal-backup "
        f'or sqlite3 {log} ".backup COPY.sqlite" (SQLite\'s online backup), never with cp.'
    )


def wal_bytes(log: Path) -> int:
    """Size of the ``-wal`` file beside the log's real file (a symlink resolved first: SQLite
    keeps the WAL beside the file it opens, not beside the link)."""
    try:
        return wal_file(log.resolve()).stat().st_size
    except OSError:
        return 0


def signed_heads(store: MerkleLogStore) -> list[tuple[SignedTreeHead, bytes]]:
    """The stored tree heads as signed (decoded from their blobs, not from the unsigned
    columns), with their bytes; blobs that do not decode are left out."""
    heads = []
    for stored in store.tree_heads():
        try:
            heads.append((SignedTreeHead.from_bytes(stored.blob), stored.blob))
        except ProtocolError:
            continue
    return heads


def head_for(
    store: MerkleLogStore, min_size: int, tree_size: int | None
) -> tuple[int, bytes, str, SignedTreeHead | None]:
    """(size, root, signed tree head b64 or "", the signed tree head or None) to prove against."""
    heads = signed_heads(store)
    if tree_size is None:
        if heads and heads[-1][0].tree_size >= min_size:
            latest, blob = heads[-1]
            return latest.tree_size, latest.root_hash, base64.b64encode(blob).decode(), latest
        tree_size = store.size
    for head, blob in heads:
        if head.tree_size == tree_size:
            return tree_size, head.root_hash, base64.b64encode(blob).decode(), head
    return tree_size, store.root(tree_size), "", None


def check_anchor_head(
    store: MerkleLogStore, anchor: TrustAnchor, head: SignedTreeHead | None
) -> str:
    """Check the log's genesis key against the anchor and ``head``'s signature under it;
    return the coordinator key id (hex).

    Raises:
        AuditCommandError: EXIT_FAILED naming what does not hold.
    """
    try:
        genesis = decode_entry(store.entries(0, 1)[0].data)
    except (AuditLogError, ProtocolError) as exc:
        raise AuditCommandError(
            EXIT_FAILED, f"the log's genesis entry is unreadable: {exc}"
        ) from exc
    if not isinstance(genesis, Genesis):
        raise AuditCommandError(EXIT_FAILED, "entry 0 is not the log's genesis entry")
    log_kid = hashlib.sha256(genesis.coordinator_key_der).hexdigest()
    if anchor.key is not None:
        pinned_kid = hashlib.sha256(public_key_to_der(anchor.key)).hexdigest()
        if pinned_kid != log_kid:
            raise AuditCommandError(
                EXIT_FAILED,
                f"the log's genesis names coordinator key {log_kid}, not the pinned coordinator "
                f"key {pinned_kid}",
            )
    if head is not None:
        try:
            key = anchor.key or public_key_from_der(genesis.coordinator_key_der)
            if head.log_id != genesis.log_id:
                raise AuditCommandError(EXIT_FAILED, "the signed tree head names another log")
            head.verify(key)
        except (CryptoError, ProtocolError) as exc:
            raise AuditCommandError(
                EXIT_FAILED,
                f"the signed tree head of size {head.tree_size} does not verify under the "
                f"coordinator key {log_kid}: {exc}",
            ) from exc
    return log_kid


def prove_inclusion(
    log: Path,
    anchor: TrustAnchor,
    *,
    site: str,
    round: int,
    run_id: str | None = None,
    tree_size: int | None = None,
    as_json: bool = False,
) -> Verdict:
    """``fl-audit prove``: an inclusion proof of ``site``'s accepted masked-input envelope in
    ``round`` (of run ``run_id``, hex; default the latest), checked before it is returned
    against the root of a signed tree head (of ``tree_size``; default the latest) that verifies
    under ``anchor``. Exit 3 for a root no signed tree head covers, or an unpinned key.

    Raises:
        AuditCommandError: EXIT_UNREADABLE (the log), EXIT_FAILED (no such input, or the proof
            or tree head does not verify).
    """
    store = open_log(log)
    try:
        rid = bytes.fromhex(run_id) if run_id else None
        index = find_input(store, site, round, rid)
        if index is None:
            raise AuditCommandError(
                EXIT_FAILED, f"no accepted masked input from {site!r} in round {round}"
            )
        size, root, sth, head = head_for(store, index + 1, tree_size)
        if not index < size <= store.size:
            raise AuditCommandError(EXIT_FAILED, f"tree size {size} does not contain entry {index}")
        kid = check_anchor_head(store, anchor, head)
        entry = store.entries(index, index + 1)[0]
        lh = leaf_hash(entry.data)
        proof = store.inclusion_proof(index, size)
        verify_inclusion(lh, index, size, proof, root)
    except (AuditLogError, MerkleProofError, ValueError, ProtocolError) as exc:
        raise AuditCommandError(EXIT_FAILED, f"cannot prove: {exc}") from exc
    finally:
        store.close()
    if as_json:
        lines: tuple[str, ...] = (
            json.dumps(
                {
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
            ),
        )
    else:
        lines = (
            f"entry {index} in tree of {size}: leaf {lh.hex()}",
            f"root {root.hex()}" + (" (signed tree head)" if sth else " (unsigned)"),
            *(f"  path[{i}] {h.hex()}" for i, h in enumerate(proof)),
            "proof verifies",
        )
    warnings = []
    if not sth:
        warnings.append(
            f"fl-audit: warning: no signed tree head covers size {size}: the root is the log "
            "file's own, signed by nobody. Exit 3."
        )
    if anchor.trust_log_key:
        warnings.append(f"fl-audit: {unpinned_warning(kid)}")
    return Verdict(EXIT_INCOMPLETE if warnings else EXIT_OK, lines, tuple(warnings))


def prove_consistency(
    log: Path, old_size: int, new_size: int | None = None, *, as_json: bool = False
) -> Verdict:
    """``fl-audit consistency``: a consistency proof (checked) that the log at ``old_size`` is a
    prefix of it at ``new_size`` (default: the latest signed tree head or the log's size).

    Raises:
        AuditCommandError: EXIT_UNREADABLE (the log), EXIT_FAILED (the proof does not verify).
    """
    store = open_log(log)
    try:
        size, new_root, sth, _ = head_for(store, old_size, new_size)
        old_root = store.root(old_size)
        proof = store.consistency_proof(old_size, size)
        verify_consistency(old_size, size, old_root, new_root, proof)
    except (AuditLogError, MerkleProofError, ValueError) as exc:
        raise AuditCommandError(EXIT_FAILED, f"cannot prove consistency: {exc}") from exc
    finally:
        store.close()
    if as_json:
        out = {
            "old_size": old_size,
            "new_size": size,
            "old_root": old_root.hex(),
            "new_root": new_root.hex(),
            "proof": [h.hex() for h in proof],
            "signed_tree_head_b64": sth,
        }
        return Verdict(EXIT_OK, (json.dumps(out),))
    return Verdict(
        EXIT_OK,
        (
            f"{old_size} -> {size}: old root {old_root.hex()}, new root {new_root.hex()}",
            *(f"  proof[{i}] {h.hex()}" for i, h in enumerate(proof)),
            "proof verifies",
        ),
    )
