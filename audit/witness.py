"""Witnesses for ``fl-audit``: the signed tree heads the sites kept, checked against a log.

A log file alone cannot show that it was cut back to an earlier signed tree head, or that its
coordinator rewrote history and signed it again with its own key: both are internally
consistent. The sites' receipts are the outside view. Every site checks each tree head it is
shown (signature, log id, consistency with all it saw before) and keeps it;
``fl-client receipts export`` writes them, one JSON object a line::

    {"site": "site-a", "log_id": "<32 hex>", "tree_size": 17, "root_hash": "<64 hex>",
     "timestamp_ms": 1780000000000, "sth_b64": "<the signed tree head's bytes, base64>"}

Only ``sth_b64`` is signed; the other fields are copies, which must equal the signed values.

For every witnessed head, :func:`check_witness_file` checks, against a log that verified:

1. its signature under the pinned coordinator key (the trust anchor: a witness file vouches
   for nothing without it);
2. that it names the log's id (the genesis entry's);
3. that the log is consistent with it: a head of ``tree_size`` at most the log's size must be a
   prefix of the log (an RFC 6962 / 9162 consistency proof from the witnessed root to the root
   recomputed from the log's entries); a head larger than the log means the log was truncated.

Example::

    files = [read_witness_file(p) for p in paths]          # WitnessFormatError: unreadable
    results = [check_witness_file(f, coordinator_key=key, log=view) for f in files]
    failed = [r.failure for r in results if r.failure is not None]
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.treehead import SignedTreeHead
from fedseal.crypto.errors import CryptoError, MerkleProofError
from fedseal.crypto.keys import key_id
from fedseal.crypto.merkle import EMPTY_ROOT, verify_consistency
from fedseal.protocol.errors import BadSignatureError, DecodeError

__all__ = [
    "LogView",
    "WitnessFailure",
    "WitnessFile",
    "WitnessFormatError",
    "WitnessResult",
    "WitnessedHead",
    "check_witness_file",
    "read_witness_file",
]

MAX_WITNESS_BYTES = 64 * 1024 * 1024
_SITE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_FIELDS = ("site", "log_id", "tree_size", "root_hash", "timestamp_ms", "sth_b64")


class WitnessFormatError(Exception):
    """A witness file cannot be read: missing, too large, not JSON lines, a line without the
    fields, or a copied field that disagrees with the signed tree head."""


@dataclass(frozen=True, slots=True)
class WitnessedHead:
    """One line of a witness file: a signed tree head the site ``site`` saw."""

    line: int
    site: str
    head: SignedTreeHead


@dataclass(frozen=True, slots=True)
class WitnessFile:
    """A witness file as read (not yet checked)."""

    path: Path
    heads: tuple[WitnessedHead, ...]

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites the lines name, sorted."""
        return tuple(sorted({h.site for h in self.heads}))

    @property
    def largest(self) -> int:
        """The largest witnessed tree size."""
        return max(h.head.tree_size for h in self.heads)


@dataclass(frozen=True, slots=True)
class LogView:
    """What the witnesses are checked against: a log that verified.

    Attributes:
        log_id: The id its genesis entry names.
        size: The number of entries verified.
        root_hash: The root recomputed from those entries (not the store's copy).
        consistency_proof: ``(old_size, new_size) -> proof`` from the log's store (checked
            against both roots, so it need not be trusted).
    """

    log_id: bytes
    size: int
    root_hash: bytes
    consistency_proof: Callable[[int, int], list[bytes]]


class WitnessFailure(Exception):
    """A witnessed tree head the log contradicts (or that the pinned key did not sign).

    Attributes:
        path: The witness file.
        line: The line (1-based).
        site: The site the line names.
        tree_size: The witnessed tree size.
        check: ``"signature"``, ``"log-id"``, ``"truncated"`` or ``"rewritten"``.
        detail: What does not hold.
    """

    def __init__(
        self, path: Path, line: int, site: str, tree_size: int, check: str, detail: str
    ) -> None:
        super().__init__(
            f"witness {path} line {line}: site {site}'s signed tree head of size {tree_size}: "
            f"{detail}"
        )
        self.path = path
        self.line = line
        self.site = site
        self.tree_size = tree_size
        self.check = check
        self.detail = detail


@dataclass(frozen=True, slots=True)
class WitnessResult:
    """The outcome for one witness file: ``failure`` is the first head that does not hold."""

    file: WitnessFile
    checked: int
    failure: WitnessFailure | None


def _hex(record: dict[str, object], name: str, size: int) -> bytes:
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a hex string")
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ValueError(f"{name} is not {size} bytes")
    return raw


def _parse_line(text: str) -> tuple[str, SignedTreeHead]:
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [f for f in _FIELDS if f not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    site, blob = record["site"], record["sth_b64"]
    if not isinstance(site, str) or not site or not isinstance(blob, str):
        raise ValueError("site and sth_b64 must be non-empty strings")
    if _SITE_ID.fullmatch(site) is None:
        raise ValueError(
            f"site {site[:80]!r} is not a site id ([a-z0-9][a-z0-9_-]{{0,62}}; the field is not "
            "signed, so it must not be able to carry arbitrary text)"
        )
    head = SignedTreeHead.from_bytes(base64.b64decode(blob, validate=True))
    copies = {
        "log_id": (_hex(record, "log_id", len(head.log_id)), head.log_id),
        "tree_size": (record["tree_size"], head.tree_size),
        "root_hash": (_hex(record, "root_hash", len(head.root_hash)), head.root_hash),
        "timestamp_ms": (record["timestamp_ms"], head.timestamp_ms),
    }
    for name, (copy, signed) in copies.items():
        if type(copy) is not type(signed) or copy != signed:
            raise ValueError(f"{name} {record[name]!r} is not the signed tree head's")
    return site, head


def read_witness_file(path: Path) -> WitnessFile:
    """Read a witness file (``fl-client receipts export``'s output).

    Raises:
        WitnessFormatError: Unreadable, empty, or a malformed line (named).
    """
    try:
        if path.stat().st_size > MAX_WITNESS_BYTES:
            raise WitnessFormatError(f"witness {path}: larger than {MAX_WITNESS_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WitnessFormatError(f"witness {path}: cannot read: {exc}") from exc
    heads = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            site, head = _parse_line(line)
        except (ValueError, TypeError, KeyError, binascii.Error, DecodeError) as exc:
            raise WitnessFormatError(
                f"witness {path} line {number}: not a witnessed tree head "
                f"(fl-client receipts export writes them): {exc}"
            ) from exc
        heads.append(WitnessedHead(number, site, head))
    if not heads:
        raise WitnessFormatError(f"witness {path}: holds no tree heads")
    return WitnessFile(path, tuple(heads))


def _check_head(
    witness: WitnessedHead, path: Path, key: ec.EllipticCurvePublicKey, log: LogView
) -> None:
    head = witness.head

    def fail(check: str, detail: str) -> WitnessFailure:
        return WitnessFailure(path, witness.line, witness.site, head.tree_size, check, detail)

    try:
        head.verify(key)
    except BadSignatureError as exc:
        raise fail(
            "signature",
            f"not signed by the pinned coordinator key {bytes(key_id(key)).hex()}",
        ) from exc
    if head.log_id != log.log_id:
        raise fail("log-id", f"names log {head.log_id.hex()}, but this log is {log.log_id.hex()}")
    if head.tree_size > log.size:
        raise fail(
            "truncated",
            f"the site saw {head.tree_size} entries signed, but the log holds only {log.size}: "
            "the log was cut back",
        )
    try:
        if head.tree_size == 0:
            if head.root_hash != EMPTY_ROOT:
                raise MerkleProofError("an empty tree has the empty root")
        else:
            proof = log.consistency_proof(head.tree_size, log.size)
            verify_consistency(head.tree_size, log.size, head.root_hash, log.root_hash, proof)
    except (CryptoError, ValueError) as exc:  # MerkleProofError is a CryptoError
        raise fail(
            "rewritten",
            f"root {head.root_hash.hex()[:16]}… is not a prefix of this log (size {log.size}, "
            f"root {log.root_hash.hex()[:16]}…): the log's history was rewritten ({exc})",
        ) from exc


def check_witness_file(
    witness: WitnessFile, *, coordinator_key: ec.EllipticCurvePublicKey, log: LogView
) -> WitnessResult:
    """Check every head of ``witness`` (see the module docstring) against ``log``; the result
    holds the first one that does not hold, if any."""
    for checked, head in enumerate(witness.heads):
        try:
            _check_head(head, witness.path, coordinator_key, log)
        except WitnessFailure as failure:
            return WitnessResult(witness, checked, failure)
    return WitnessResult(witness, len(witness.heads), None)
