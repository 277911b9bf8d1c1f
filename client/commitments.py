"""Is the model the coordinator hands this site one that its signed audit log committed?

A coordinator that sends one model to overlapping cohorts, or a model of its own making to
evaluate, can learn about one site's data by differencing or probing. A site therefore trains
and evaluates only a model that the coordinator's log committed: the run's initial model
(``RunStart.initial_model_digest``) or the new model of a completed round
(``RoundRecord.new_model_digest``), proven by an inclusion proof under a signed tree head that
is consistent with every tree head the site has seen (the same checks as its receipts,
:class:`fedseal.audit.receipts.ReceiptChecker`). It also refuses to go back: a model
committed by an earlier round than one it already verified for the run is refused.

Example::

    commitments = ModelCommitments(checker, source)
    commitments.check(run_id, model_digest)   # raises ModelNotCommittedError

A site without an audit address cannot make this check; ``fl-client run`` says so at start.

Why was my input not used? When a round's result leaves this site's masked input out, the
site looks for its own *rejected* envelope in the same signed log (:func:`input_rejection`):
the coordinator records every envelope it rejects with the reason, so the site's console can
say why its input was refused, from an entry it proved, or that the log holds none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    AuditEntry,
    EnvelopeRecord,
    RoundRecord,
    RoundStatus,
    RunStart,
)
from fedseal.audit.receipts import AuditSource, ReceiptChecker, ReceiptError
from fedseal.client.errors import SiteError
from fedseal.crypto.errors import MerkleProofError
from fedseal.crypto.merkle import leaf_hash, verify_inclusion
from fedseal.protocol.errors import DecodeError

__all__ = [
    "EntrySource",
    "InputRejection",
    "ModelCommitments",
    "ModelNotCommittedError",
    "input_rejection",
]

#: Most log entries :func:`input_rejection` reads back, newest first (a round holds a few
#: envelopes per site and stage: thousands of sites' rounds fit).
REJECTION_SCAN_ENTRIES = 20_000
#: Entries asked for per ``GetEntries`` call (the audit service's default bound).
_WINDOW = 256


class ModelNotCommittedError(SiteError):
    """The model is not one the signed log committed for this run (the site refuses it)."""


class ModelCommitments:
    """Checks model digests against the coordinator's signed log (see the module docstring).

    Args:
        checker: The site's receipt checker (its pinned coordinator key and stored tree heads).
        source: The audit service client.
    """

    def __init__(self, checker: ReceiptChecker, source: AuditSource) -> None:
        self._checker = checker
        self._source = source
        self._lock = threading.Lock()
        #: (run id, model digest) -> the round that committed it (0: the initial model).
        self._verified: dict[tuple[bytes, bytes], int] = {}
        #: run id -> the latest committing round verified.
        self._latest: dict[bytes, int] = {}

    def check(self, run_id: bytes, model_digest: bytes) -> int:
        """Return the round that committed ``model_digest`` in ``run_id`` (0 = initial model).

        Raises:
            ModelNotCommittedError: Not committed, not yet covered by a signed tree head,
                an entry that does not match, or a model older than one already verified.
            ReceiptError: The tree head or the inclusion proof fails (the site is blocked).
            AuditServiceError: The audit service cannot be reached.
        """
        with self._lock:
            key = (bytes(run_id), bytes(model_digest))
            committed = self._verified.get(key)
            if committed is None:
                committed = self._prove(run_id, model_digest)
                self._verified[key] = committed
            latest = self._latest.get(key[0], -1)
            if committed < latest:
                raise ModelNotCommittedError(
                    f"the model was committed by round {committed}, but round {latest}'s "
                    "model is already committed: a coordinator may not send an older model"
                )
            self._latest[key[0]] = committed
            return committed

    def _prove(self, run_id: bytes, model_digest: bytes) -> int:
        short = model_digest.hex()[:16]
        head = self._checker.observe_tree_head(self._source, self._source.latest_tree_head())
        index = self._source.find_model(run_id, model_digest)
        if index is None:
            raise ModelNotCommittedError(
                f"model {short}… is neither the run's initial model nor a completed round's "
                "result in the coordinator's signed log"
            )
        if index >= head.tree_size:
            raise ModelNotCommittedError(
                f"model {short}… is at entry {index}, not yet under a signed tree head"
            )
        entry_bytes, proof = self._source.inclusion_proof(index, head.tree_size)
        try:
            verify_inclusion(leaf_hash(entry_bytes), index, head.tree_size, proof, head.root_hash)
        except MerkleProofError as exc:
            raise ReceiptError("inclusion", "model commitment proof does not verify") from exc
        try:
            entry = decode_entry(entry_bytes)
        except DecodeError as exc:
            raise ModelNotCommittedError(f"entry {index} does not decode") from exc
        if (
            isinstance(entry, RunStart)
            and entry.run_id == run_id
            and entry.initial_model_digest == model_digest
        ):
            return 0
        if (
            isinstance(entry, RoundRecord)
            and entry.run_id == run_id
            and entry.status is RoundStatus.COMPLETED
            and entry.new_model_digest == model_digest
        ):
            return entry.round
        raise ModelNotCommittedError(
            f"entry {index} does not commit model {short}… for this run"
        )


@runtime_checkable
class EntrySource(AuditSource, Protocol):
    """An :class:`AuditSource` that also serves entries by range
    (:class:`fedseal.audit.service_client.GrpcAuditSource` does)."""

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Entries ``[start, end)`` as ``(index, bytes)``; possibly fewer (a prefix)."""
        ...


@dataclass(frozen=True, slots=True)
class InputRejection:
    """This site's masked input as the signed log rejected it: its entry and the reason."""

    index: int
    reason: str


def input_rejection(
    checker: ReceiptChecker,
    source: EntrySource,
    *,
    site: str,
    run_id: bytes,
    round: int,
    payload: bytes,
    message_type: str = INPUT_MESSAGE_TYPE,
) -> InputRejection | None:
    """The coordinator's signed log entry rejecting this site's masked input of ``round``, or
    ``None`` when the log holds none under its latest signed tree head.

    The log is read back newest first (at most :data:`REJECTION_SCAN_ENTRIES` entries, back to
    the run's start or an entry of an earlier round of the run); a candidate counts only once
    proven: an inclusion proof under the tree head (checked as the receipts check it: the
    coordinator's signature, consistency with every head seen), and the proven entry is a
    rejected envelope from ``site``, for this run, round and message type, with exactly the
    ``payload`` the site signed.

    Raises:
        ReceiptError: The tree head fails its checks (the site is blocked, as for a receipt),
            or the candidate's inclusion proof does not verify.
        AuditServiceError: The audit service cannot be reached.
    """
    head = checker.observe_tree_head(source, source.latest_tree_head())

    def ours(entry: AuditEntry) -> bool:
        return (
            isinstance(entry, EnvelopeRecord)
            and not entry.accepted
            and entry.site == site
            and entry.run_id == run_id
            and entry.round == round
            and entry.message_type == message_type
            and entry.payload == payload
        )

    for index, data in _newest_first(source, head.tree_size):
        try:
            entry = decode_entry(data)
        except DecodeError:
            continue  # a hint only: what counts is the proven entry below
        if ours(entry):
            entry_bytes, proof = source.inclusion_proof(index, head.tree_size)
            try:
                verify_inclusion(
                    leaf_hash(entry_bytes), index, head.tree_size, proof, head.root_hash
                )
                proven = decode_entry(entry_bytes)
            except (MerkleProofError, DecodeError) as exc:
                raise ReceiptError(
                    "inclusion", f"the rejected-input entry {index} is not proven", round=round
                ) from exc
            if not ours(proven) or not isinstance(proven, EnvelopeRecord):
                raise ReceiptError(
                    "entry-mismatch",
                    f"entry {index} as proven is not our rejected input",
                    round=round,
                )
            return InputRejection(index, proven.reason)
        if _earlier(entry, run_id, round):
            break
    return None


def _earlier(entry: AuditEntry, run_id: bytes, round: int) -> bool:
    """Whether ``entry`` precedes every entry of ``round`` of ``run_id`` (its run's start, or
    an entry of an earlier round of the run)."""
    if isinstance(entry, RunStart):
        return entry.run_id == run_id
    if isinstance(entry, EnvelopeRecord | RoundRecord):
        return entry.run_id == run_id and entry.round < round
    return False


def _newest_first(source: EntrySource, size: int) -> Iterator[tuple[int, bytes]]:
    """Entries ``[0, size)`` newest first, at most :data:`REJECTION_SCAN_ENTRIES` of them."""
    end = size
    floor = max(0, size - REJECTION_SCAN_ENTRIES)
    while end > floor:
        start = max(floor, end - _WINDOW)
        window: dict[int, bytes] = {}
        at = start
        while at < end:  # the service may answer a prefix (its byte bound): ask for the rest
            got = [(i, d) for i, d in source.entries(at, end) if at <= i < end]
            if not got:
                break
            window.update(got)
            at = max(i for i, _ in got) + 1
        yield from sorted(window.items(), reverse=True)
        end = start
