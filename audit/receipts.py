"""The site's receipt checker: is my accepted update in the coordinator's log, and is the log
append-only as far as I have seen it?

Example::

    checker = ReceiptChecker(state_dir, site="site-a", coordinator_key=pinned_coordinator_key)
    checker.ensure_may_contribute()                 # before every round: raises once blocked
    ...  # the round: the site sent `payload` (its signed masked-input envelope's payload)
    receipt = checker.check_round(source, run_id=run_id, round=r,
                                  message_type=MessageKind.MASKED_INPUT.type_name, payload=payload)

``source`` is anything with the :class:`AuditSource` methods, normally :class:`fedseal.audit.service_client.GrpcAuditSource`
over a TLS channel to the coordinator's audit service::

    channel = grpc.secure_channel("coordinator:9093", grpc.ssl_channel_credentials(ca_pem))
    source = GrpcAuditSource(channel, site="site-a", key=site_identity_key, clock=now_ms)

After each round the site, in order:

1. fetches the latest signed tree head (STH) and checks the coordinator's signature (key pinned
   at set-up) and the log id (pinned on first use);
2. checks it is consistent with the largest tree head it has seen before (RFC 9162 consistency
   proof; equal sizes need equal roots; a smaller head must be a prefix of the larger) — since
   every stored head was checked the same way, the new head is consistent with all of them;
3. stores the head on disk (append + fsync) *before* trusting anything else;
4. finds its own accepted masked-input entry, fetches it with an inclusion proof against the STH
   and checks: the proof verifies, and the entry is an *accepted* envelope from this site, for
   this run and round, with exactly the payload the site signed.

Any failure except "not yet covered" is loud: it raises :class:`ReceiptError` and writes a
``BLOCKED`` file to the state directory; from then on :meth:`ReceiptChecker.ensure_may_contribute`
raises :class:`ContributionBlockedError`, so the site stops contributing until a person
investigates and removes the file.

What the coordinator must provide: an audit service (or any :class:`AuditSource`) that serves
the latest STH, inclusion and consistency proofs, and the index of the site's accepted input;
and it must sign a tree head after every round result (``AuditLog.sign_tree_head``), so the
site's entry is covered when it checks.

The stored tree heads are the site's outside view of the log: ``fl-client receipts export``
writes them (:func:`witness_records`, one JSON object a line) for an auditor, whose
``fl-audit verify LOG --coordinator-key PUB --witness FILE`` fails on a log that was cut back
below, or rewritten under, a head the site saw.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import EnvelopeRecord
from fedseal.audit.errors import AuditServiceError
from fedseal.audit.treehead import (
    SignedTreeHead,
)
from fedseal.crypto.errors import MerkleProofError
from fedseal.crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from fedseal.protocol.errors import BadSignatureError, DecodeError

__all__ = [
    "AuditSource",
    "ContributionBlockedError",
    "Receipt",
    "ReceiptChecker",
    "ReceiptError",
    "ReceiptPendingError",
    "SiteReceipts",
    "read_tree_heads",
    "witness_records",
]

log = logging.getLogger("fedseal.client")

_HEADS = "tree_heads.jsonl"
_RECEIPTS = "receipts.jsonl"
_BLOCKED = "BLOCKED"


class AuditSource(Protocol):
    """Where the site reads the coordinator's log from (the audit service client)."""

    def latest_tree_head(self) -> bytes:
        """The latest signed tree head's canonical bytes."""
        ...

    def inclusion_proof(self, index: int, tree_size: int) -> tuple[bytes, list[bytes]]:
        """``(entry bytes, audit path)`` of entry ``index`` in the tree of ``tree_size``."""
        ...

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof between two sizes."""
        ...

    def find_input(self, round: int, run_id: bytes) -> int | None:
        """Index of this site's accepted masked input in ``round`` of ``run_id``."""
        ...

    def find_model(self, run_id: bytes, model_digest: bytes) -> int | None:
        """Index of the entry that committed ``model_digest`` in ``run_id`` (the run's start,
        for its initial model, or a completed round's result), or ``None``."""
        ...


class ReceiptError(Exception):
    """The coordinator's log does not prove what it must; the site stops contributing.

    Attributes:
        check: Short name of the failed check (``"tree-head-signature"``, ``"fork"``,
            ``"inclusion"``, ``"entry-mismatch"``, ``"missing-input"``, …).
        round: The round being checked, if any.
    """

    def __init__(self, check: str, message: str, *, round: int | None = None) -> None:
        super().__init__(f"audit receipt check failed ({check}): {message}")
        self.check = check
        self.round = round


class ReceiptPendingError(ReceiptError):
    """The latest signed tree head does not cover the site's entry yet (not blocking)."""


class ContributionBlockedError(ReceiptError):
    """An earlier receipt check failed; the site refuses to contribute (see ``BLOCKED``)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that the site's accepted input is entry ``leaf_index`` of the signed tree."""

    run_id: bytes
    round: int
    leaf_index: int
    tree_size: int
    root_hash: bytes


def read_tree_heads(receipts_dir: str | os.PathLike[str]) -> list[SignedTreeHead]:
    """The tree heads a :class:`ReceiptChecker` stored in ``receipts_dir``, in the order seen
    (each was checked when stored: signature, log id, consistency with all seen before).

    Raises:
        ReceiptError: If the stored state is corrupt.
    """
    path = Path(receipts_dir) / _HEADS
    if not path.exists():
        return []
    heads = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            heads.append(SignedTreeHead.from_bytes(base64.b64decode(json.loads(line)["sth"])))
        except (ValueError, KeyError, TypeError, DecodeError) as exc:
            raise ReceiptError("state", f"{path} line {number} is corrupt") from exc
    return heads


def witness_records(receipts_dir: str | os.PathLike[str], site: str) -> list[dict[str, str | int]]:
    """The site's witnessed tree heads as ``fl-client receipts export`` writes them (one JSON
    object a line; ``fl-audit verify --witness FILE`` reads them): each distinct head once, in
    the order first seen.

    Each record: ``site``, ``log_id`` (hex), ``tree_size``, ``root_hash`` (hex),
    ``timestamp_ms`` and ``sth_b64``, the signed tree head's canonical bytes (base64). Only
    ``sth_b64`` is signed; the auditor checks the other fields against it.

    Raises:
        ReceiptError: If the stored state is corrupt.
    """
    records: list[dict[str, str | int]] = []
    seen: set[bytes] = set()
    for head in read_tree_heads(receipts_dir):
        blob = head.to_bytes()
        if blob in seen:
            continue
        seen.add(blob)
        records.append(
            {
                "site": site,
                "log_id": head.log_id.hex(),
                "tree_size": head.tree_size,
                "root_hash": head.root_hash.hex(),
                "timestamp_ms": head.timestamp_ms,
                "sth_b64": base64.b64encode(blob).decode(),
            }
        )
    return records


class ReceiptChecker:
    """Checks receipts and tree-head consistency; keeps its state in ``state_dir``."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        site: str,
        coordinator_key: ec.EllipticCurvePublicKey,
    ) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._site = site
        self._key = coordinator_key

    # -- state on disk ----------------------------------------------------------------------

    def seen_tree_heads(self) -> list[SignedTreeHead]:
        """Every tree head stored so far, in the order seen.

        Raises:
            ReceiptError: If the stored state is corrupt.
        """
        return read_tree_heads(self._dir)

    def _append_line(self, name: str, record: dict[str, object]) -> None:
        with (self._dir / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _block(self, error: ReceiptError) -> ReceiptError:
        (self._dir / _BLOCKED).write_text(str(error) + "\n", encoding="utf-8")
        return error

    def ensure_may_contribute(self) -> None:
        """Raise if an earlier check failed.

        Raises:
            ContributionBlockedError: With the recorded reason.
        """
        path = self._dir / _BLOCKED
        if path.exists():
            reason = path.read_text(encoding="utf-8").strip()
            raise ContributionBlockedError(
                "blocked", f"{reason} (remove {path} after investigating)"
            )

    # -- checks -----------------------------------------------------------------------------

    def observe_tree_head(self, source: AuditSource, head_bytes: bytes) -> SignedTreeHead:
        """Check a tree head (signature, log id, consistency with all seen) and store it.

        Raises:
            ReceiptError: On any failure (and the site is blocked).
        """
        try:
            head = SignedTreeHead.from_bytes(head_bytes)
        except DecodeError as exc:
            raise self._block(ReceiptError("tree-head-decode", "malformed tree head")) from exc
        try:
            head.verify(self._key)
        except BadSignatureError as exc:
            raise self._block(
                ReceiptError("tree-head-signature", "not signed by the coordinator")
            ) from exc
        seen = self.seen_tree_heads()
        if seen:
            if head.log_id != seen[0].log_id:
                raise self._block(ReceiptError("log-id", "tree head of another log"))
            largest = max(seen, key=lambda h: h.tree_size)
            try:
                if head.tree_size >= largest.tree_size:
                    proof = (
                        source.consistency_proof(largest.tree_size, head.tree_size)
                        if (head.tree_size > largest.tree_size)
                        else []
                    )
                    verify_consistency(
                        largest.tree_size, head.tree_size, largest.root_hash, head.root_hash, proof
                    )
                else:
                    proof = source.consistency_proof(head.tree_size, largest.tree_size)
                    verify_consistency(
                        head.tree_size, largest.tree_size, head.root_hash, largest.root_hash, proof
                    )
            except MerkleProofError as exc:
                raise self._block(
                    ReceiptError(
                        "fork",
                        f"tree head of size {head.tree_size} is not consistent with the one of "
                        f"size {largest.tree_size} seen before: history was rewritten or forked",
                    )
                ) from exc
        self._append_line(_HEADS, {"sth": base64.b64encode(head.to_bytes()).decode()})
        return head

    def check_round(
        self,
        source: AuditSource,
        *,
        run_id: bytes,
        round: int,
        message_type: str,
        payload: bytes,
        required: bool = True,
    ) -> Receipt | None:
        """Check that this site's accepted input of ``round`` is in the signed log.

        ``required`` says the site knows its input entered the aggregate (it signed a survivor
        set naming itself). Then a log without the input is tampering, and blocks the site.
        Otherwise (the input was rejected or dropped, or the round was abandoned) a log without
        it is what an honest coordinator writes: the result is ``None``, nothing is blocked. An
        input the log *does* hold is always checked in full.

        Args:
            source: The audit service client.
            run_id: The run's id.
            round: The round just finished.
            message_type: The type the site signed its input under.
            payload: The exact payload bytes the site signed and sent.

        Raises:
            ContributionBlockedError: If an earlier check failed.
            ReceiptPendingError: If the latest tree head does not cover the entry yet.
            ReceiptError: If the entry is missing, differs or is not proven (site blocked).
        """
        self.ensure_may_contribute()
        head = self.observe_tree_head(source, source.latest_tree_head())
        index = source.find_input(round, run_id)
        if index is None and not required:
            return None
        if index is None:
            raise self._block(
                ReceiptError(
                    "missing-input", "the log holds no accepted input of ours", round=round
                )
            )
        if index >= head.tree_size:
            raise ReceiptPendingError(
                "pending", f"entry {index} is not yet covered by a signed tree head", round=round
            )
        entry_bytes, proof = source.inclusion_proof(index, head.tree_size)
        try:
            verify_inclusion(leaf_hash(entry_bytes), index, head.tree_size, proof, head.root_hash)
        except MerkleProofError as exc:
            raise self._block(
                ReceiptError("inclusion", "inclusion proof does not verify", round=round)
            ) from exc
        try:
            entry = decode_entry(entry_bytes)
        except DecodeError as exc:
            raise self._block(
                ReceiptError("entry-decode", "entry does not decode", round=round)
            ) from exc
        if not (
            isinstance(entry, EnvelopeRecord)
            and entry.accepted
            and entry.site == self._site
            and entry.run_id == run_id
            and entry.round == round
            and entry.message_type == message_type
            and entry.payload == payload
        ):
            raise self._block(
                ReceiptError(
                    "entry-mismatch",
                    "the proven entry is not our accepted input with the payload we signed",
                    round=round,
                )
            )
        receipt = Receipt(run_id, round, index, head.tree_size, head.root_hash)
        self._append_line(
            _RECEIPTS,
            {
                "run_id": run_id.hex(),
                "round": round,
                "leaf_index": index,
                "tree_size": head.tree_size,
                "root_hash": head.root_hash.hex(),
            },
        )
        return receipt


class SiteReceipts:
    """What ``fl-client run`` does with a :class:`ReceiptChecker` around each secure round.

    Example::

        receipts = SiteReceipts(checker, source)
        receipts.before_round()                       # setup message: raises once blocked
        receipts.sent_masked_input(run_id, r, payload)  # the signed payload, exact bytes
        receipts.after_round(run_id, r)               # once the round result is out

    A check that is merely pending (tree head not signed yet) or that cannot reach the audit
    service is logged as an error and retried before the next round; any other failure is
    logged as an error and blocks the site (:class:`ContributionBlockedError` from then on).
    """

    def __init__(self, checker: ReceiptChecker, source: AuditSource, message_type: str) -> None:
        self._checker = checker
        self._source = source
        self._message_type = message_type
        self._pending: dict[tuple[bytes, int], bytes] = {}
        self._included: set[tuple[bytes, int]] = set()
        self._lock = threading.Lock()
        self.verified = 0

    @property
    def checker(self) -> ReceiptChecker:
        """The receipt checker (its pinned coordinator key and stored tree heads)."""
        return self._checker

    @property
    def source(self) -> AuditSource:
        """The audit service client."""
        return self._source

    def before_round(self) -> None:
        """Retry unfinished checks, then refuse if the site is blocked.

        Raises:
            ContributionBlockedError: A receipt check failed (now or earlier).
        """
        for run_id, rnd in sorted(self._pending):
            self.after_round(run_id, rnd)
        try:
            self._checker.ensure_may_contribute()
        except ContributionBlockedError as exc:
            # The site's console line (round, why) is the executor's, from the refusal raised.
            log.debug("refusing to contribute to this round: %s", exc)
            raise

    def sent_masked_input(self, run_id: bytes, round: int, payload: bytes) -> None:
        """Remember the payload this site signed as its masked input of ``round``."""
        with self._lock:
            self._pending[(run_id, round)] = payload

    def included(self, run_id: bytes, round: int) -> None:
        """Note that this site signed a survivor set naming itself in ``round``: its input is
        in the aggregate, so the log must hold it."""
        with self._lock:
            self._included.add((run_id, round))

    def after_round(self, run_id: bytes, round: int) -> None:
        """Check the receipt of ``round`` if this site sent a masked input in it (never raises:
        the outcome is logged, and a failure blocks the site)."""
        with self._lock:
            payload = self._pending.get((run_id, round))
            if payload is None:
                return
            required = (run_id, round) in self._included
            try:
                receipt = self._checker.check_round(
                    self._source,
                    run_id=run_id,
                    round=round,
                    message_type=self._message_type,
                    payload=payload,
                    required=required,
                )
            except ReceiptPendingError as exc:
                log.error("round %d: receipt not yet provable, retried later: %s", round, exc)
                return
            except AuditServiceError as exc:
                log.error(
                    "round %d: audit service unavailable, receipt retried later: %s", round, exc
                )
                return
            except ReceiptError as exc:
                del self._pending[(run_id, round)]
                log.error(
                    "round %d: %s -- this site stops contributing until a person investigates "
                    "and removes the BLOCKED file",
                    round,
                    exc,
                )
                return
            del self._pending[(run_id, round)]
            self._included.discard((run_id, round))
            if receipt is None:
                log.debug(  # the site's console line, with the log's reason, is the ClientApp's
                    "round %d: the log holds no accepted input of ours, and this site was not "
                    "among the survivors it signed for (input rejected or dropped, or the round "
                    "abandoned): it was not used; nothing to prove",
                    round,
                )
                return
            self.verified += 1
            log.info(
                "round %d: receipt verified: our masked input is entry %d under the signed tree "
                "head of size %d",
                round,
                receipt.leaf_index,
                receipt.tree_size,
            )
