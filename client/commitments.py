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
"""

from __future__ import annotations

import threading

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import RoundRecord, RoundStatus, RunStart
from fedseal.audit.receipts import AuditSource, ReceiptChecker, ReceiptError
from fedseal.client.errors import SiteError
from fedseal.crypto.errors import MerkleProofError
from fedseal.crypto.merkle import leaf_hash, verify_inclusion
from fedseal.protocol.errors import DecodeError

__all__ = ["ModelCommitments", "ModelNotCommittedError"]


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
