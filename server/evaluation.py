"""Federated evaluation of a round's committed model, returned as one value.

Usage (the round loop, :mod:`fedseal.server.flower_app`)::

    emsgs = evaluation_messages(run, strategy, rnd, model, eval_cfg, nodes)
    ahead = setup_with_evaluation(...)            # secure runs: the next setup rides along
    result = evaluate(run, strategy, rnd, emsgs, ahead)     # -> EvaluationOutcome

Each site evaluates the model on its validation part (loss, accuracy, macro-F1, weighted by
example count in the strategy's aggregate). A site may answer with an error reply, or withhold
its metrics with the reason (:data:`fedseal.protocol.records.EVALUATION_REFUSED_RECORD`): both
are reported (:func:`fedseal.server.replies.report_site_error`) and listed in the round record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedseal.protocol import records
from fedseal.protocol.model import ModelVector
from fedseal.server.exchange import FixedNodes, arrays_to_record, exchange
from fedseal.server.replies import error_reason, one_line, report_site_error
from fedseal.server.rundir import Run
from fedseal.server.secure_round import SetupAhead, collect_adverts

__all__ = ["EvaluationOutcome", "evaluate", "evaluation_messages"]


@dataclass(frozen=True, slots=True)
class EvaluationOutcome:
    """What one federated evaluation gave.

    Attributes:
        seconds: Its wall time.
        metrics: The strategy's aggregate (``None``: no site returned metrics).
        examples: The evaluation examples the metrics cover.
        sites: The enrolled sites whose metrics were aggregated.
        site_errors: Error replies and withheld evaluations (site, reason).
        next_setup_adverts: Key adverts for the next round that came back (``None``: no setup
            rode along).
    """

    seconds: float
    metrics: dict[str, Any] | None
    examples: int
    sites: tuple[str, ...]
    site_errors: tuple[tuple[str, str], ...]
    next_setup_adverts: int | None = None

    def record(self) -> dict[str, Any]:
        """The round record's fields (``rounds.jsonl``), site errors aside."""
        rec: dict[str, Any] = {}
        if self.next_setup_adverts is not None:
            rec["next_setup_adverts"] = self.next_setup_adverts
        rec["evaluate_s"] = self.seconds
        if self.metrics is not None:
            rec["accuracy"] = float(self.metrics.get(records.ACCURACY, float("nan")))
            rec["macro_f1"] = float(self.metrics.get(records.MACRO_F1, float("nan")))
            rec["loss"] = float(self.metrics.get(records.LOSS, float("nan")))
            own = {records.ACCURACY, records.MACRO_F1, records.LOSS, records.NUM_EXAMPLES}
            extra = {k: float(v) for k, v in self.metrics.items() if k not in own}
            if extra:  # a site recipe's own metrics (client/recipe.py), example-weighted means
                rec["metrics"] = extra
        return rec

    def logged_metrics(self) -> dict[str, float]:
        """The aggregated metrics the audit log records (the example count is its own field)."""
        return {k: v for k, v in (self.metrics or {}).items() if k != records.NUM_EXAMPLES}


def evaluation_messages(
    run: Run, strategy: Strategy, rnd: int, model: ModelVector, config: ConfigRecord, nodes: list[int]
) -> list[Message]:
    """The strategy's evaluation messages for ``model`` to the sites of ``nodes``."""
    return list(
        strategy.configure_evaluate(
            rnd, arrays_to_record(model.arrays), config, FixedNodes(run.grid, nodes),  # type: ignore[arg-type, unused-ignore]
        )
    )


def _examples(replies: list[Message]) -> int:
    """The evaluation examples the replies' metrics cover (their ``num-examples``)."""
    total = 0
    for r in replies:
        n = r.content[records.METRICS_RECORD].get(records.NUM_EXAMPLES, 0)
        if isinstance(n, int | float) and not isinstance(n, bool) and 0 <= n <= 10**12:
            total += int(n)
    return total


def evaluate(
    run: Run, strategy: Strategy, rnd: int, emsgs: list[Message], ahead: SetupAhead | None = None
) -> EvaluationOutcome:
    """Send ``emsgs``, aggregate the metrics that come back (and, with ``ahead``, take the next
    round's key adverts from the replies)."""
    te = time.monotonic()
    replies = exchange(run.grid, emsgs, run.cfg.run.stage_timeout_s)
    if ahead is not None:
        collect_adverts(run, ahead, replies)
    site_errors: list[tuple[str, str]] = []
    for r in replies:
        if r.has_error():
            site, reason = run.site_of(r.metadata.src_node_id), error_reason(r)
            report_site_error(run.metrics, rnd, site, reason, "evaluate")
            site_errors.append((site, reason))
            continue
        withheld = r.content.get(records.EVALUATION_REFUSED_RECORD)
        if isinstance(withheld, ConfigRecord):  # the site returned no metrics, and why
            why = one_line(str(withheld.get(records.REASON, ""))) or "evaluation withheld"
            site = run.site_of(r.metadata.src_node_id)
            report_site_error(run.metrics, rnd, site, why, "evaluate")
            site_errors.append((site, why))
    ereplies = [
        r
        for r in replies
        if not r.has_error()
        and isinstance(r.content.get(records.METRICS_RECORD), MetricRecord)
        and run.node_sites.get(int(r.metadata.src_node_id)) is not None
    ]
    seconds = time.monotonic() - te
    run.metrics.stage_seconds.labels(stage="evaluate").observe(seconds)
    agg = strategy.aggregate_evaluate(rnd, ereplies) if ereplies else None
    return EvaluationOutcome(
        seconds=seconds,
        metrics=dict(agg) if agg is not None else None,
        examples=_examples(ereplies),
        sites=tuple(sorted({run.node_sites[int(r.metadata.src_node_id)] for r in ereplies})),
        site_errors=tuple(site_errors),
        next_setup_adverts=len(ahead.adverts) if ahead is not None else None,
    )
