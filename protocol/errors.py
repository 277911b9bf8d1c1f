"""The protocol layer's exception tree (CONVENTIONS.md, habit 4).

Every error raised because of input from a peer (a site or the coordinator) is a
:class:`ProtocolError`; programming mistakes raise built-ins (``ValueError``,
``TypeError``, ``RuntimeError``). Errors carry structured fields (``site``, ``round``,
``stage``) and their messages never contain key, seed or share material.

Tree::

    ProtocolError
    ├── DecodeError                 malformed, truncated, oversized bytes
    ├── VerificationError           the bytes decode but must not be trusted
    │   ├── UnknownSignerError      key id / site not enrolled, or signer is not the sender
    │   ├── RevokedSignerError      site enrolled but revoked
    │   ├── BadSignatureError       signature does not verify
    │   ├── BulkMismatchError       bulk vector length, dtype or SHA-256 digest mismatch
    │   ├── UnapprovedDatasetError  dataset root not approved for that site
    │   └── CoordinatorMisbehaviourError  a request a correct coordinator never sends
    │       ├── IncompleteBundleError     advert bundle misses a cohort member's advert
    │       ├── SetupAttemptError         setup attempt beyond the site's cap
    │       └── CohortTooSmallError       setup cohort below the site's minimum
    ├── StaleMessageError           other run, other round, other stage, expired
    ├── DuplicateMessageError       same signed content seen twice / second submission
    ├── ThresholdError              too few parties left for the round to complete
    ├── ReconstructionError         shares do not reconstruct the committed secret
    ├── AggregateOutOfRangeError    the unmasked sum lies outside what the signed counts allow
    └── ConfigError                 round configuration out of bounds (names the limit)
"""

from __future__ import annotations

__all__ = [
    "AggregateOutOfRangeError",
    "BadSignatureError",
    "BulkMismatchError",
    "CohortTooSmallError",
    "ConfigError",
    "CoordinatorMisbehaviourError",
    "DecodeError",
    "DuplicateMessageError",
    "GuardFullError",
    "IncompleteBundleError",
    "NonceError",
    "ProtocolError",
    "ReconstructionError",
    "RevokedSignerError",
    "SetupAttemptError",
    "StaleMessageError",
    "ThresholdError",
    "UnapprovedDatasetError",
    "UnknownSignerError",
    "UntrustedPeerError",
    "VerificationError",
    "WeakRoundError",
]


class ProtocolError(Exception):
    """Base of the protocol layer's errors.

    Attributes:
        site: The site the error concerns (sender or subject), if any.
        round: The round number, if known.
        stage: The protocol stage name, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        site: str | None = None,
        round: int | None = None,
        stage: str | None = None,
    ) -> None:
        self.message = message
        self.site = site
        self.round = round
        self.stage = stage
        context = [
            f"{name}={value}"
            for name, value in (("site", site), ("round", round), ("stage", stage))
            if value is not None
        ]
        super().__init__(f"{message} [{', '.join(context)}]" if context else message)

    def with_context(
        self, *, site: str | None = None, round: int | None = None, stage: str | None = None
    ) -> ProtocolError:
        """Fill in missing context fields (in place) and return ``self`` for re-raising."""
        if self.site is None:
            self.site = site
        if self.round is None:
            self.round = round
        if self.stage is None:
            self.stage = stage
        context = [
            f"{name}={value}"
            for name, value in (("site", self.site), ("round", self.round), ("stage", self.stage))
            if value is not None
        ]
        self.args = (f"{self.message} [{', '.join(context)}]" if context else self.message,)
        return self


class DecodeError(ProtocolError):
    """Bytes are malformed: truncated, trailing data, out-of-range field, over a size bound."""


class VerificationError(ProtocolError):
    """A message decodes but fails a check (signature, enrolment, binding, content)."""


class UnknownSignerError(VerificationError):
    """The signer is not enrolled, not in the cohort, or is not who the message claims."""


class RevokedSignerError(VerificationError):
    """The signer is enrolled but its key has been revoked."""


class BadSignatureError(VerificationError):
    """The signature does not verify under the enrolled key."""


class BulkMismatchError(VerificationError):
    """The bulk vector's length, dtype or SHA-256 does not match its signed description."""


class UnapprovedDatasetError(VerificationError):
    """The dataset Merkle root in a masked input is not approved for that site."""


class CoordinatorMisbehaviourError(VerificationError):
    """The coordinator sent something a correct coordinator never sends.

    Examples: substituted key adverts, a survivor set without enough signatures,
    a request for both shares of one site, a request naming a non-neighbour.
    """


class IncompleteBundleError(CoordinatorMisbehaviourError):
    """The advert bundle lacks a valid advert of some member of the signed setup cohort.

    A site accepts only a bundle holding every cohort member's advert, so a coordinator that
    has seen the adverts cannot re-draw the neighbour graph by leaving some out; a
    cohort member that did not advertise makes the coordinator start a new setup attempt.
    """


class SetupAttemptError(CoordinatorMisbehaviourError):
    """A round setup's attempt number is at or beyond the site's ``max_setup_attempts``."""


class CohortTooSmallError(CoordinatorMisbehaviourError):
    """A round setup's cohort is smaller than the site's ``min_cohort`` (isolation attempt)."""


class StaleMessageError(ProtocolError):
    """The message belongs to another run, round or stage, or has expired."""


class DuplicateMessageError(ProtocolError):
    """The same signed content (or a second submission from one sender) arrived twice."""


class ThresholdError(ProtocolError):
    """Too few parties remain (in some neighbourhood) for the round to complete."""


class ReconstructionError(ProtocolError):
    """Shares do not reconstruct a secret matching its commitment and no subset does."""


class AggregateOutOfRangeError(ProtocolError):
    """The unmasked aggregate holds an element no honest inputs can sum to: some input wrapped
    the field (e.g. a site added ``2**(b-1)`` to its masked vector and re-signed it).

    Raised after unmasking when an element, read as a signed two's-complement integer, lies
    outside ``[-bound, bound]`` with ``bound = levels * (sum of the survivors' signed example
    counts)``. The round is abandoned: it has no result and nothing is applied. Which input
    was out of range cannot be told from the masked sum.

    Attributes:
        count: How many elements lie outside the bound.
        worst: The element of largest magnitude (signed).
        bound: The bound the elements were checked against.
    """

    def __init__(
        self,
        message: str,
        *,
        count: int,
        worst: int,
        bound: int,
        site: str | None = None,
        round: int | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(message, site=site, round=round, stage=stage)
        self.count = count
        self.worst = worst
        self.bound = bound


class ConfigError(ProtocolError):
    """A round configuration is out of bounds; the message names the offending limit."""


class UntrustedPeerError(CoordinatorMisbehaviourError):
    """A round names a site whose key the site cannot tie to its own trust anchor (consortium
    roster or ``[peers]`` table), or too few independently known peers."""


class WeakRoundError(CoordinatorMisbehaviourError):
    """Round parameters or a survivor set below the site's own security floor (degree,
    threshold, quorum or dropouts for its ``max_colluding_fraction`` and security bits)."""


class NonceError(CoordinatorMisbehaviourError):
    """A round setup lists, for this site, a graph-nonce commitment it did not make for the
    run (or forgot), or one it already opened in another round (:mod:`fedseal.protocol.graph`)."""


class GuardFullError(StaleMessageError):
    """The site's setup guard holds the most runs it keeps: no setup of a new run is answered
    (a guard that forgot runs would let a coordinator replay or roll back their rounds)."""
