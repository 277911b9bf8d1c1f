"""Small shared types: site ids, message kinds and their stages."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

import numpy as np
import numpy.typing as npt

__all__ = [
    "COORDINATOR",
    "DIGEST_BYTES",
    "RUN_ID_BYTES",
    "SURVIVOR_STATEMENT_TYPE",
    "MessageKind",
    "Packet",
    "SiteId",
    "site_sort_key",
]

SiteId = NewType("SiteId", str)
"""A site's enrolled name (non-empty UTF-8, bounded by ``Limits.max_site_id_bytes``)."""

COORDINATOR = SiteId("")
"""The sender/recipient name of the coordinator in message headers."""

RUN_ID_BYTES = 16
DIGEST_BYTES = 32


def site_sort_key(site: str) -> bytes:
    """Canonical order of site ids: their UTF-8 bytes."""
    return site.encode("utf-8")


class MessageKind(enum.IntEnum):
    """Message type tags. Each kind belongs to exactly one stage of the round.

    The tag's name (``MESSAGE_TYPES``) is part of the signed bytes, so a signature on one
    kind can never be replayed as another.
    """

    ROUND_SETUP = 1  # coordinator -> site       stage 0
    KEY_ADVERT = 2  # site -> coordinator        stage 1
    ADVERT_BUNDLE = 3  # coordinator -> site     stage 2 (request for shares)
    ENCRYPTED_SHARES = 4  # site -> coordinator  stage 2
    SHARE_DELIVERY = 5  # coordinator -> site    stage 3 (request for masked input)
    MASKED_INPUT = 6  # site -> coordinator      stage 3
    SURVIVOR_SET = 7  # coordinator -> site      stage 4
    CONSISTENCY_SIGNATURE = 8  # site -> coordinator  stage 4
    UNMASK_REQUEST = 9  # coordinator -> site    stage 5
    UNMASK_RESPONSE = 10  # site -> coordinator  stage 5
    ROUND_RESULT = 11  # coordinator -> site     after the round

    @property
    def type_name(self) -> str:
        """The message-type string passed to ``fedseal.crypto.signing.sign``."""
        return "fedseal/v1/" + self.name.lower().replace("_", "-")


SURVIVOR_STATEMENT_TYPE = "fedseal/v1/survivor-statement"
"""Signed by each site over the survivor set in the consistency check (Bonawitz §4)."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One protocol message on the wire: envelope bytes plus an optional bulk vector.

    Attributes:
        payload: Signed envelope bytes.
        bulk: The masked vector (uint32/uint64) for masked-input messages, else ``None``.
    """

    payload: bytes
    bulk: npt.NDArray[np.uint32] | npt.NDArray[np.uint64] | None = None
