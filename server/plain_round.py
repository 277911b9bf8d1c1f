"""A plain round (``run.secure = false``): updates in the clear inside TLS, validated and
averaged as they arrive; its outcome returned as one value.

Usage (the round loop, :mod:`fedseal.server.flower_app`)::

    outcome = plain_round(run, strategy, rnd, nodes, model, train_cfg)   # -> PlainOutcome
    if outcome.mean is not None: ...                                     # else outcome.failure

::

    train     strategy.configure_train -> exchange (timeout = run.stage_timeout_s); the
              config (``train_config``) names the run's data contract with ``[run] contract``
              (``records.RUN_CONTRACT``): a site whose dataset follows another, or has one the
              run does not name, refuses (``refused: data contract: ...``)
    roster    the roster file read again (a dataset root withdrawn since the last round is
              refused from this one on)
    validate  each reply: enrolled node, approved dataset root (a withdrawn one is named as
              such), exact names/shapes/dtypes, finite values, 1 <= num-examples <= 10**9; a
              rejected reply is a dropout
    aggregate streaming weighted mean (one float64 accumulator, O(model) memory)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedseal.protocol import records
from fedseal.protocol.model import ModelVector
from fedseal.protocol.types import site_sort_key
from fedseal.server.audit_hook import refresh_roster
from fedseal.server.exchange import FixedNodes, arrays_to_record, exchange_iter
from fedseal.server.replies import error_reason, is_refusal, report_site_error
from fedseal.server.rundir import Run

__all__ = ["MAX_EXAMPLES", "PlainOutcome", "plain_round", "validate_reply"]

log = logging.getLogger("fedseal.server")

MAX_EXAMPLES = 10**9


@dataclass(frozen=True, slots=True)
class PlainOutcome:
    """What one plain round gave.

    Attributes:
        mean: The weighted mean of the valid updates (``None``: too few of them).
        total_weight: Their example counts, summed.
        sites: The sites whose updates were accepted.
        rejected: How many replies were rejected (error replies included).
        seconds: The training stage's wall time.
        site_errors: Error replies (site, reason), refusals included.
        failure: Why nothing was aggregated (one line), and ``failure_kind``.
        absent: Each sampled site without an accepted update, with why (as a secure round's
            :attr:`~fedseal.server.secure_round.SecureOutcome.absent`).
    """

    mean: dict[str, npt.NDArray[np.float32]] | None
    total_weight: int
    sites: tuple[str, ...]
    rejected: int
    seconds: float
    site_errors: tuple[tuple[str, str], ...] = ()
    failure: str | None = None
    failure_kind: str | None = None
    absent: tuple[tuple[str, str], ...] = ()

    def record(self) -> dict[str, Any]:
        """The round record's fields (``rounds.jsonl``), site errors aside."""
        rec: dict[str, Any] = {
            "rejected": self.rejected, "train_s": self.seconds, "accepted": len(self.sites),
            "sites": list(self.sites),
        }
        if self.absent:
            rec["absent"] = dict(self.absent)
        if self.failure is not None:
            rec.update(failure=self.failure, failure_kind=self.failure_kind)
        return rec


def _hex_root(value: object) -> bytes | None:
    """A dataset root sent as hex (the wire's config edge), as bytes; ``None`` if it is not."""
    if not isinstance(value, str) or not (value.isascii() and value.isalnum()):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def validate_reply(
    run: Run, msg: Message, reference: Mapping[str, npt.NDArray[Any]]
) -> tuple[str, int, dict[str, npt.NDArray[Any]]] | str:
    """Return (site, num_examples, arrays) or a rejection reason."""
    if msg.has_error():
        return "site-error"
    site_name = run.node_sites.get(int(msg.metadata.src_node_id))
    site = run.roster.get(site_name) if site_name else None
    if site is None or site.status != "active":
        return "unknown-site"
    content = msg.content
    try:
        arrays_rec = content[records.ARRAYS_RECORD]
        metrics = content[records.METRICS_RECORD]
        info = content[records.SITE_RECORD]
    except KeyError:
        return "malformed"
    if not isinstance(arrays_rec, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "malformed"
    if not isinstance(info, ConfigRecord):
        return "malformed"
    root = _hex_root(info.get(records.DATASET_ROOT))
    if root is not None and root.hex() in run.roster.withdrawn():
        return "withdrawn-dataset-root"
    if root is None or root not in {bytes.fromhex(r) for r in site.dataset_roots}:
        return "unapproved-dataset-root"
    n = metrics.get(records.NUM_EXAMPLES)
    if not isinstance(n, int | float) or not 1 <= n <= MAX_EXAMPLES or int(n) != n:
        return "bad-example-count"
    if set(arrays_rec.keys()) != set(reference):
        return "bad-shape"
    arrays = {}
    for k, ref in reference.items():
        a = arrays_rec[k].numpy()
        if a.shape != ref.shape or a.dtype != ref.dtype:
            return "bad-shape"
        if not np.isfinite(a).all():
            return "non-finite"
        arrays[k] = a
    return site.name, int(n), arrays


def _explain(run: Run, msg: Message, verdict: str) -> str:
    """A rejection verdict for the round's line: a withdrawn root is named with its
    withdrawal (``dataset root ab12… of site-a was withdrawn on <date> (<reason>)``)."""
    if verdict != "withdrawn-dataset-root":
        return verdict
    info = msg.content.get(records.SITE_RECORD)
    root = _hex_root(info.get(records.DATASET_ROOT)) if isinstance(info, ConfigRecord) else None
    w = run.roster.withdrawn().get(root.hex()) if root is not None else None
    return w.describe() if w is not None else verdict


def plain_round(
    run: Run, strategy: Strategy, rnd: int, nodes: list[int], model: ModelVector,
    train_cfg: ConfigRecord,
) -> PlainOutcome:
    """One plain round from ``model`` with the sites of ``nodes``: the strategy's training
    messages out, each valid update added to a running weighted sum as it arrives."""
    arrays = model.arrays
    updated = refresh_roster(run.cfg.coordinator.roster, run.roster, None)
    if updated is not None:
        run.roster = updated
    msgs = list(
        strategy.configure_train(
            rnd, arrays_to_record(arrays), train_cfg, FixedNodes(run.grid, nodes),  # type: ignore[arg-type, unused-ignore]
        )
    )
    ts = time.monotonic()
    acc: dict[str, npt.NDArray[np.float64]] = {k: np.zeros(v.shape, np.float64) for k, v in arrays.items()}
    total = 0
    rejected = 0
    accepted: list[str] = []
    site_errors: list[tuple[str, str]] = []
    why: dict[str, str] = {}
    # Each update is added to the running sum as it arrives (memory: one model).
    for reply in exchange_iter(run.grid, msgs, run.cfg.run.stage_timeout_s):
        if reply.has_error():  # e.g. "refused: plain training is disabled at this site"
            reason = error_reason(reply)
            site = run.site_of(reply.metadata.src_node_id)
            report_site_error(run.metrics, rnd, site, reason, "train")
            site_errors.append((site, reason))
            why[site] = reason if is_refusal(reason) else f"error: {reason}"
            run.metrics.rejected.labels(reason="site-refused" if is_refusal(reason) else "site-error").inc()
            rejected += 1
            continue
        verdict = validate_reply(run, reply, arrays)
        if isinstance(verdict, str):
            run.metrics.rejected.labels(reason=verdict).inc()
            rejected += 1
            log.warning("round %d: rejected reply from node %s: %s", rnd, reply.metadata.src_node_id, verdict)
            node = int(reply.metadata.src_node_id)
            if node in run.node_sites:
                why[run.node_sites[node]] = f"rejected at train: {_explain(run, reply, verdict)}"
            continue
        site, n, upd = verdict
        for k, a in upd.items():
            acc[k] += n * a.astype(np.float64)
        total += n
        accepted.append(site)
        run.metrics.accepted.inc()
        del reply, upd
    seconds = time.monotonic() - ts
    run.metrics.stage_seconds.labels(stage="train").observe(seconds)
    sampled = sorted((run.node_sites[n] for n in nodes if n in run.node_sites), key=site_sort_key)
    absent = tuple(
        (site, why.get(site, f"dropped at train: no reply within {run.cfg.run.stage_timeout_s:g} s"))
        for site in sampled
        if site not in accepted
    )
    outcome = PlainOutcome(
        mean=None, total_weight=total, sites=tuple(sorted(accepted)), rejected=rejected,
        seconds=seconds, site_errors=tuple(site_errors), absent=absent,
    )
    min_sites = run.cfg.run.min_sites
    if len(accepted) >= min_sites and total > 0:
        return replace(outcome, mean={k: (v / total).astype(np.float32) for k, v in acc.items()})
    return replace(
        outcome,
        failure=(
            f"too few valid updates: {len(accepted)} of {len(nodes)} sites sent one, "
            f"run.min_sites = {min_sites}"
        ),
        failure_kind="too-few-valid-updates",
    )
