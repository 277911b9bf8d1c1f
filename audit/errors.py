"""The audit layer's errors, in one place.

Two families, kept apart because they say different things::

    ProtocolError (fedseal.protocol.errors)
    └── AuditError                 the log's content is wrong
        ├── AuditStateError        the coordinator asked the log to record an inconsistent entry
        └── AuditVerificationError a log fails verification (names the first bad place)

    CryptoError (fedseal.crypto.errors)
    └── AuditLogError              the store cannot serve the request
        ├── LogFormatError         not a fedseal audit log, unknown schema version, corrupt rows
        └── LogRangeError          index or tree size outside the log

:class:`RuleViolation` is internal: the run rules (:mod:`fedseal.audit.rules`) raise it, and the
verifier and the writer turn it into :class:`AuditVerificationError` / :class:`AuditStateError`.
"""

from __future__ import annotations

from fedseal.crypto.errors import CryptoError
from fedseal.protocol.errors import ProtocolError

__all__ = [
    "AuditError",
    "AuditLogError",
    "AuditServiceError",
    "AuditStateError",
    "AuditVerificationError",
    "LogFormatError",
    "LogRangeError",
    "RuleViolation",
]


class AuditError(ProtocolError):
    """Base of the audit errors (a :class:`~fedseal.protocol.errors.ProtocolError`)."""


class AuditStateError(AuditError):
    """The coordinator asked the log to record something inconsistent with what it holds.

    Raised by :class:`AuditLog` *before* writing, so the log never records a run that would
    fail verification (e.g. an accepted envelope from a revoked site, a skipped round).
    """


class AuditVerificationError(AuditError):
    """The log fails verification; names the first bad place.

    Attributes:
        index: The first bad entry's index (``None`` for a failure not tied to one entry).
        entry_type: That entry's kind name (``"genesis"``, ``"envelope"``, …) if known.
        check: Short machine-readable name of the failed check (``"leaf-hash"``,
            ``"signature"``, ``"tree-head-root"``, ``"round-order"``, …).
        detail: Human-readable explanation.
        tree_head_seq: The tree head concerned, for tree-head failures.
    """

    def __init__(
        self,
        check: str,
        detail: str,
        *,
        index: int | None = None,
        entry_type: str | None = None,
        tree_head_seq: int | None = None,
        site: str | None = None,
        round: int | None = None,
    ) -> None:
        where = []
        if index is not None:
            where.append(f"entry {index}" + (f" ({entry_type})" if entry_type else ""))
        if tree_head_seq is not None:
            where.append(f"tree head #{tree_head_seq}")
        prefix = ", ".join(where) or "log"
        super().__init__(f"{prefix}: {check}: {detail}", site=site, round=round)
        self.index = index
        self.entry_type = entry_type
        self.check = check
        self.detail = detail
        self.tree_head_seq = tree_head_seq


class AuditLogError(CryptoError):
    """Base of the audit-log store's errors."""


class LogFormatError(AuditLogError):
    """The file is not a fedseal audit log, has an unknown schema, or holds corrupt rows.

    Attributes:
        index: The entry index concerned, if one is.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"{message} (entry {index})")
        self.index = index


class LogRangeError(AuditLogError):
    """An index or tree size lies outside the log.

    Attributes:
        value: The offending index or size.
        size: The log's size when the request was made.
    """

    def __init__(self, message: str, *, value: int, size: int) -> None:
        super().__init__(f"{message}: {value} (log size {size})")
        self.value = value
        self.size = size


class RuleViolation(Exception):
    """An entry breaks a run rule: ``check`` names the rule, ``detail`` says how (internal)."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(detail)
        self.check = check
        self.detail = detail


class AuditServiceError(Exception):
    """A call to the audit service failed or returned malformed data.

    Attributes:
        code: The gRPC status code name (e.g. ``"PERMISSION_DENIED"``), or ``"DATA_LOSS"`` for
            a malformed response.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
