"""Reading a site's reply defensively: its protocol payload, its error reason as one printable
line, and the report of a site's error reply (console line, metric, round record).

A site may answer any message with a Flower error reply instead of content; one whose reason
starts with :data:`fedseal.protocol.records.REFUSED_PREFIX` is a *refusal* (policy, e.g. a
site that does not allow plain training). Each error reply gives one console line naming the
enrolled site and its reason, and is counted in
``fedseal_site_errors_total{site, kind="refused"|"error"}``; the round's record lists it under
``refused`` or ``site_errors`` (site -> reason). A site's text is untrusted: no line break or
terminal control sequence reaches the console.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message

from fedseal.protocol import records
from fedseal.server.metrics import Metrics
from fedseal.server.rundir import MAX_REASON_CHARS

__all__ = [
    "error_reason",
    "is_refusal",
    "one_line",
    "record_site_errors",
    "reply_payload",
    "report_site_error",
    "setup_refusal",
]

log = logging.getLogger("fedseal.server")


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    printable = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(printable.split())[:limit]


def error_reason(reply: Message) -> str:
    """The reason of a site's error reply, as one line."""
    reason = getattr(reply.error, "reason", "")
    return one_line(str(reason or "")) or "error reply without a reason"


def is_refusal(reason: str) -> bool:
    """Whether a site's error reason refuses the message (policy, not a fault)."""
    return reason.startswith(records.REFUSED_PREFIX)


def report_site_error(metrics: Metrics, rnd: int, site: str, reason: str, stage: str) -> None:
    """One console line naming the enrolled ``site`` and its ``reason``, and
    ``fedseal_site_errors_total``."""
    refused = is_refusal(reason)
    metrics.site_errors.labels(site=site, kind="refused" if refused else "error").inc()
    if refused:
        line = f"round {rnd}: {site} {reason}"
    else:
        line = f"round {rnd}: {site} answered {stage} with an error: {reason}"
    log.warning("%s", line)
    print(f"fedseal: {line}", flush=True)


def record_site_errors(rec: dict[str, Any], errors: Iterable[tuple[str, str]]) -> None:
    """Add site errors (site, reason) to a round record: ``refused`` or ``site_errors``."""
    for site, reason in errors:
        rec.setdefault("refused" if is_refusal(reason) else "site_errors", {})[site] = reason


def reply_payload(reply: Message) -> object:
    """The protocol message a site's reply carries (:data:`~fedseal.protocol.records.SETUP_RECORD`'s
    payload), unchecked: the caller treats anything but non-empty bytes as no answer."""
    sec = reply.content.get(records.SETUP_RECORD)
    return sec.get(records.PAYLOAD) if isinstance(sec, ConfigRecord) else None


def setup_refusal(reply: Message) -> str | None:
    """Why a site refused the setup an evaluation message carried (its reply's
    :data:`~fedseal.protocol.records.SETUP_ERROR_RECORD`), or ``None``."""
    err = reply.content.get(records.SETUP_ERROR_RECORD)
    reason = err.get(records.REASON) if isinstance(err, ConfigRecord) else None
    return str(reason) if reason else None
