"""A secure round over the Flower grid: :class:`fedseal.protocol.SecAggServer` driven stage by
stage, its outcome returned as one value.

Usage (the round loop, :mod:`fedseal.server.flower_app`)::

    secure = SecureCoordinator(run, run_id, key, audit)
    outcome = secure.round(rnd, nodes, model, train_cfg, ahead)    # -> SecureOutcome
    if outcome.mean_delta is not None: ...                          # else outcome.failure
    ahead = setup_with_evaluation(run, secure, emsgs, rnd + 1, model, next_cfg)
    collect_adverts(run, ahead, evaluation_replies)

Each stage's signed packets go out as ``train.secagg`` messages (the first one also carries
the global model and the training config), replies are fed to ``server.receive`` as they
arrive (a site that does not answer within ``run.stage_timeout_s`` is a dropout), the stage's
envelopes are durably logged before the next stage's messages (which acknowledge them) go
out, and ``server.advance`` yields the next stage. A :class:`~fedseal.protocol.ProtocolError`
(too few survivors, reconstruction failure, an unmasked aggregate out of range) *abandons* the
round: :class:`SecureOutcome` then names the failure, its kind and the survivors.

With ``run.setup_with_evaluation`` the next round's setup rides on this round's evaluation
messages (:func:`setup_with_evaluation`): each site evaluates, adopts the setup and
returns its key advert with its metrics (or, in ``secagg-error``, why it refused); the next
round then starts at the advert bundle, one exchange less per round. It is not sent along when
the next cohort differs from the evaluated sites.

With ``server.toml [dp]`` every round is a distributed-DP round: :meth:`SecureCoordinator.dp_params`
builds its :class:`~fedseal.protocol.dp.DpParams` for the cohort (:mod:`fedseal.server.dp_round`),
``RoundConfig(dp=...)`` carries them in the signed setup, the outcome's ``mean_delta`` is the
decoded unweighted noisy mean and ``outcome.dp`` the parameters, which the audit log's DP
accounting entry records; :meth:`SecureCoordinator.next_round_fits` is the budget check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedseal.protocol import records
from fedseal.protocol.dp import DpParams
from fedseal.protocol.model import ModelVector
from fedseal.protocol.types import site_sort_key
from fedseal.server.audit_hook import FailClosedAudit, refresh_roster
from fedseal.server.dp_round import DpPlan
from fedseal.server.exchange import arrays_to_record, exchange_iter
from fedseal.server.replies import (
    error_reason,
    is_refusal,
    one_line,
    reply_payload,
    report_site_error,
    setup_refusal,
)
from fedseal.server.roster import Enrolment
from fedseal.server.rundir import Run

__all__ = [
    "SecureCoordinator",
    "SecureOutcome",
    "SetupAhead",
    "collect_adverts",
    "failure_kind",
    "setup_with_evaluation",
]

log = logging.getLogger("fedseal.server")


@dataclass
class SetupAhead:
    """A secure round's setup built during the previous round's evaluation and sent with it.

    ``adverts``: the key adverts (envelope bytes) that came back with the evaluation replies;
    ``refused``: sites that answered the evaluation but refused the setup, with their reason.
    """

    rnd: int
    nodes: list[int]
    server: Any
    outbound: Mapping[str, Any]
    adverts: dict[str, bytes] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SecureOutcome:
    """What one secure round gave.

    Attributes:
        mean_delta: The secure weighted mean of the sites' deltas (``None``: abandoned).
        aggregate_digest: The exact integer aggregate's digest (``None``: abandoned).
        total_weight: The survivors' signed example counts, summed.
        sites: The survivors (completed round).
        dropouts: How many sites dropped out.
        rejected: How many replies the state machine rejected.
        stage_seconds: Each stage's wall time, in order (a repeated stage: the last one).
        site_errors: Error replies (site, reason), refusals included.
        setup_with_evaluation: Its setup went out with the last evaluation.
        failure: Why it was abandoned (one line), and ``failure_kind`` (e.g. ``threshold``).
        survivors: For an abandoned round, the sites whose masked inputs it accepted.
        absent: Each sampled site whose input is not in the sum (or, abandoned, that was not
            among the survivors), with why, one line: ``refused: ...`` (its policy), ``error:
            ...`` (its error reply), ``rejected at <stage>: ...`` (a reply that failed
            verification: signature, dataset root, ...), ``dropped at <stage>: ...`` (no reply
            before the stage closed, a transport failure).
        dp: The parameters of a DP round that counts as released: a completed one
            (``mean_delta`` is then the unweighted noisy mean), or one abandoned after it
            accepted a masked input (it spends privacy all the same); else ``None``.
    """

    mean_delta: npt.NDArray[np.float64] | None
    aggregate_digest: bytes | None = None
    total_weight: int = 0
    sites: tuple[str, ...] = ()
    dropouts: int = 0
    rejected: int = 0
    stage_seconds: tuple[tuple[str, float], ...] = ()
    site_errors: tuple[tuple[str, str], ...] = ()
    setup_with_evaluation: bool = False
    failure: str | None = None
    failure_kind: str | None = None
    survivors: tuple[str, ...] = ()
    dp: DpParams | None = None
    absent: tuple[tuple[str, str], ...] = ()

    def record(self) -> dict[str, Any]:
        """The round record's fields (``rounds.jsonl``), site errors aside."""
        rec: dict[str, Any] = {"rejected": self.rejected}
        if self.absent:
            rec["absent"] = dict(self.absent)
        if self.setup_with_evaluation:
            rec["setup_with_evaluation"] = True
        rec.update((f"{stage}_s", seconds) for stage, seconds in self.stage_seconds)
        if self.mean_delta is None:
            rec.update(
                failure=self.failure, failure_kind=self.failure_kind, abandoned=True,
                survivors=list(self.survivors),
            )
        else:
            rec.update(
                accepted=len(self.sites), sites=list(self.sites), dropouts=self.dropouts,
                aggregate_digest=(self.aggregate_digest or b"").hex(), total_weight=self.total_weight,
            )
        if self.dp is not None:
            rec.update(
                dp_local_stddev=self.dp.local_stddev, dp_gamma=self.dp.gamma,
                dp_honest_survivors=self.dp.honest_survivors,
            )
        return rec


def failure_kind(exc: Exception) -> str:
    """A round failure's kind for metrics and records: the error class in kebab case, without
    ``Error`` (``AggregateOutOfRangeError`` -> ``aggregate-out-of-range``)."""
    name = type(exc).__name__.removesuffix("Error") or type(exc).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


#: A round failure's kind as the operator reads it (the rest: the kind with spaces).
_KIND_WORDS = {"threshold": "too few sites left", "coordinator-misbehaviour": "protocol violation"}


def failure_text(exc: Exception, kind: str) -> str:
    """Why a round was abandoned, as one console line: the failure's kind in words and the
    protocol's message, without the exception's class name or its ``[round=…, stage=…]``
    context (the round line says both): ``too few sites left: 2 masked inputs, min_survivors
    is 3``."""
    message = getattr(exc, "message", None)
    detail = message if isinstance(message, str) and message else str(exc)
    words = _KIND_WORDS.get(kind, kind.replace("-", " "))
    return one_line(detail if detail.lower().startswith(words) else f"{words}: {detail}")


class SecureCoordinator:
    """Drives :class:`fedseal.protocol.SecAggServer` over the Flower grid, stage by stage."""

    def __init__(
        self, run: Run, run_id: str, key: ec.EllipticCurvePrivateKey, audit: FailClosedAudit | None
    ) -> None:
        self.run = run
        self.run_id = bytes.fromhex(run_id)
        self.key = key
        self.audit = audit
        #: Each site's commitment to the graph nonce of its next round (from its last key
        #: advert): listed in the next setup, so only a site's first round of the run (or the
        #: first after a restart of the coordinator) needs a commit exchange.
        self.commitments: dict[str, bytes] = {}
        dp = run.cfg.dp
        #: ``[dp]``'s plan (None without DP): each round's DpParams, the budget check.
        self.dp_plan = DpPlan(dp, rounds=run.cfg.run.rounds) if dp.enabled else None

    def refresh_roster(self) -> bool:
        """Read the roster file again before a round (:func:`~fedseal.server.audit_hook.refresh_roster`:
        a root withdrawn while the run goes on is refused from this round on, and recorded in
        the audit log first). Returns whether the roster in force changed."""
        run = self.run
        updated = refresh_roster(run.cfg.coordinator.roster, run.roster, self.audit)
        if updated is None:
            return False
        run.roster = updated
        return True

    def _roster(self) -> Any:
        from fedseal.protocol import Roster as ProtoRoster
        from fedseal.protocol import RosterEntry, SiteId

        return ProtoRoster(
            RosterEntry(
                site=SiteId(s.name),
                public_key=s.public_key,
                approved_roots=frozenset(bytes.fromhex(r) for r in s.dataset_roots),
                active=s.status == "active",
            )
            for s in self.run.roster.sites
        )

    def _base_config(self, length: int, bits: int) -> Any:
        from fedseal.protocol import QuantizationConfig, RoundConfig

        r = self.run.cfg.run
        return RoundConfig(
            vector_length=length,
            quantization=QuantizationConfig.from_clip(r.update_clip, levels=r.quant_levels, modulus_bits=bits),
            max_weight=r.max_weight,
            threshold=r.threshold or None,
            dropout_tolerance=r.dropout_tolerance,
            round_timeout_s=int(max(600, 10 * r.stage_timeout_s)),
            limits=self.run.cfg.limits.protocol_limits(),
            contract_digest=r.contract_digest,  # signed into every setup ([run] contract)
        )

    def dp_params(self, length: int, cohort: int) -> DpParams | None:
        """The DP parameters of a round of ``cohort`` sites (``None`` without ``[dp]``):
        ``min_survivors`` as the round's configuration resolves it, the colluders from the
        configuration's own assumed fraction (:class:`fedseal.server.dp_round.DpPlan`).

        Raises:
            fedseal.protocol.ConfigError: The round cannot be configured for this cohort.
        """
        if self.dp_plan is None:
            return None
        # The survivor floor of the round without DP (the quantizer at 64 bits only so that
        # it cannot be what fails): the DP round keeps it (RoundConfig.resolve).
        resolved = self._base_config(length, 64).resolve(cohort)
        return self.dp_plan.params(
            length=length, cohort=cohort, min_survivors=resolved.min_survivors
        )

    def dp_rhos(self) -> tuple[float, ...]:
        """The zCDP ρ of this run's DP rounds so far, as its audit log records them."""
        return () if self.audit is None else self.audit.log.dp_rhos

    def next_round_fits(self, length: int, cohort: int) -> bool:
        """Whether one more round of ``cohort`` sites stays within ``[dp]`` (ε, δ) (always,
        without DP; a round that cannot be configured is let run, to fail with its reason)."""
        from fedseal.protocol import ProtocolError

        if self.dp_plan is None:
            return True
        try:
            dp = self.dp_params(length, cohort)
        except ProtocolError:
            return True
        return dp is None or self.dp_plan.fits(self.dp_rhos(), dp)

    def _config(self, length: int, cohort: int) -> Any:
        dp = self.dp_params(length, cohort)
        if dp is not None:
            # The quantizer is not used in a DP round, only its modulus (protocol/config.py).
            cfg = replace(self._base_config(length, dp.modulus_bits), dp=dp)
            cfg.resolve(cohort)
            return cfg
        cfg = self._base_config(length, 32)  # 64 bits when the cohort needs it (auto_field)
        cfg.resolve(cohort)
        return cfg

    def begin(self, rnd: int, nodes: list[int], model: ModelVector) -> SetupAhead:
        """Build round ``rnd``'s setup now, to send with the current round's evaluation.

        Raises:
            fedseal.protocol.ProtocolError: The round cannot be set up (e.g. its configuration).
        """
        server = self._server(rnd, nodes, model)
        return SetupAhead(rnd=rnd, nodes=list(nodes), server=server, outbound=server.start())

    def _server(self, rnd: int, nodes: list[int], model: ModelVector) -> Any:
        from fedseal.protocol import SecAggServer

        self.refresh_roster()
        sites = sorted(self.run.node_sites[n] for n in nodes)
        return SecAggServer(
            self._config(model.size, len(nodes)), self._roster(), sites,
            identity_key=self.key, run_id=self.run_id, round=rnd, model_digest=model.digest,
            now=time.time(), commitments=self.commitments,
        )

    def _log_setup(self, rnd: int, outbound: Mapping[str, Any]) -> None:
        """Log the round setup ``outbound`` carries, if it is one (a new attempt's, too): one
        copy (the body and setup digest are the same for every cohort member)."""
        if self.audit is not None and outbound:
            self.audit.setup(rnd, next(iter(outbound.values())).payload)

    def _log_envelopes(self, rnd: int, entries: list[Any], start: int) -> int:
        """Log the protocol log entries from ``start`` on (one durable commit); return the new end."""
        if self.audit is not None and len(entries) > start:
            self.audit.envelopes(rnd, entries[start:])
        return len(entries)

    def round(
        self, rnd: int, nodes: list[int], model: ModelVector, train_cfg: ConfigRecord,
        ahead: SetupAhead | None = None,
    ) -> SecureOutcome:
        """One secure round from ``model``.

        With ``ahead`` (built by :meth:`begin` for this round and these ``nodes``, and sent with
        the previous round's evaluation), the setup stage takes the key adverts that came back
        with the evaluation replies instead of an exchange of its own.

        Raises:
            fedseal.server.audit_hook.AuditHaltError: The audit log refused the envelopes.
        """
        from fedseal.protocol import ProtocolError, Rejection

        run, cfg = self.run, self.run.cfg
        site_of = {n: run.node_sites[n] for n in nodes}
        node_of = {s: n for n, s in site_of.items()}
        server = ahead.server if ahead is not None else self._server(rnd, nodes, model)
        if ahead is not None and self.refresh_roster():
            # Built with the last evaluation: a root withdrawn since is refused in this round
            # too (mid-run changes never revoke a cohort member: only roots narrow here).
            server.roster = self._roster()
        logged = 0
        rejected = 0
        stage_seconds: list[tuple[str, float]] = []
        site_errors: list[tuple[str, str]] = []

        def take(
            site: str, stage_name: str, payload: object, bulk: npt.NDArray[Any] | None,
            why: str = "site error or empty reply",
        ) -> None:
            nonlocal rejected
            if not isinstance(payload, bytes) or not payload:
                server.drop(site, why)
                run.metrics.rejected.labels(reason="site-error").inc()
                return
            run.metrics.bytes_received.inc(len(payload) + (bulk.nbytes if bulk is not None else 0))
            receipt = server.receive(site, payload, bulk)
            if isinstance(receipt, Rejection):
                run.metrics.rejected.labels(reason=type(receipt.error).__name__).inc()
                rejected += 1
                log.warning("round %d: rejected %s at %s: %s", rnd, site, stage_name, receipt.reason)

        def outcome(**fields: Any) -> SecureOutcome:
            return SecureOutcome(
                rejected=rejected, stage_seconds=tuple(stage_seconds), site_errors=tuple(site_errors),
                setup_with_evaluation=ahead is not None,
                absent=_name_withdrawn(
                    absent_sites(site_of.values(), server, dict(site_errors)), server, run.roster
                ),
                **fields,
            )

        try:
            outbound = ahead.outbound if ahead is not None else server.start()
            self._log_setup(rnd, outbound)
            stage = 0
            while outbound:
                stage_name = server.stage.value
                run.status(phase="training", round=rnd, run_id=self.run_id.hex(), stage=stage_name)
                ts = time.monotonic()
                if stage == 0 and ahead is not None:
                    # The setup went out with the last evaluation; its adverts came back with it.
                    for site in outbound:
                        if site in ahead.refused:
                            why = f"refused the setup: {ahead.refused[site]}"
                            log.warning("round %d: %s %s", rnd, site, why)
                            take(site, stage_name, None, None, why)
                        elif site in ahead.adverts:
                            take(site, stage_name, ahead.adverts[site], None)
                else:
                    msgs = []
                    # The setup carries the global model and training config.
                    model_rec = arrays_to_record(model.arrays) if stage == 0 else None
                    for site, pkt in outbound.items():
                        content = RecordDict(
                            {records.SETUP_RECORD: ConfigRecord({records.PAYLOAD: pkt.payload})}
                        )
                        if model_rec is not None:
                            content[records.ARRAYS_RECORD] = model_rec
                            content[records.CONFIG_RECORD] = train_cfg
                        msgs.append(Message(
                            content, dst_node_id=node_of[site],
                            message_type=records.message_type("train", records.SECURE_STAGE),
                        ))
                        run.metrics.bytes_sent.inc(len(pkt.payload))
                    # Each reply is verified and (a masked input) added to the running sum before
                    # the next is pulled: memory holds one model-sized vector per pulled batch.
                    for reply in exchange_iter(run.grid, msgs, cfg.run.stage_timeout_s):
                        site = site_of.get(int(reply.metadata.src_node_id))
                        if site is None:
                            continue
                        if reply.has_error():
                            reason = error_reason(reply)
                            report_site_error(run.metrics, rnd, site, reason, stage_name)
                            site_errors.append((site, reason))
                            take(site, stage_name, None, None, f"error reply: {reason}")
                            continue
                        payload = reply_payload(reply)
                        bulk_rec = reply.content.get(records.BULK_RECORD) if payload else None
                        bulk = (
                            bulk_rec[records.BULK_MASKED].numpy()
                            if isinstance(bulk_rec, ArrayRecord) and records.BULK_MASKED in bulk_rec
                            else None
                        )
                        take(site, stage_name, payload, bulk)
                seconds = time.monotonic() - ts
                stage_seconds.append((stage_name, seconds))
                run.metrics.stage_seconds.labels(stage=stage_name).observe(seconds)
                # The stage's envelopes are durably logged before the next stage's messages
                # (which acknowledge them) go out.
                logged = self._log_envelopes(rnd, server.log, logged)
                try:
                    outbound = server.advance()
                finally:
                    self.commitments.update(server.next_commitments)
                self._log_setup(rnd, outbound)  # a new setup attempt (or the one after COMMIT)
                stage += 1
            result = server.result
        except ProtocolError as exc:
            self._log_envelopes(rnd, server.log, logged)
            kind = failure_kind(exc)
            survivors = tuple(sorted(str(s) for s in server.survivors))
            log.warning(
                "round %d abandoned (%s; survivors %s): %s", rnd, kind, ", ".join(survivors) or "none",
                exc, exc_info=exc,
            )
            return outcome(
                mean_delta=None, failure=failure_text(exc, kind), failure_kind=kind,
                survivors=survivors, dp=_released_dp(server),
            )
        run.metrics.accepted.inc(len(result.survivors))
        self._log_envelopes(rnd, server.log, logged)
        return outcome(
            mean_delta=np.asarray(result.weighted_mean, np.float64),
            aggregate_digest=result.aggregate_digest,
            total_weight=int(result.total_weight),
            sites=tuple(sorted(str(s) for s in result.survivors)),
            dropouts=len(result.dropouts),
            dp=result.dp,
        )


def absent_sites(
    sampled: Iterable[str], server: Any, site_errors: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    """Why each sampled site is not among the round's survivors (:class:`SecureOutcome`'s
    ``absent``), in site order: its error reply if it sent one (a refusal as it is), else its
    first dropout, ``rejected`` when a verification failure dropped it, else being left out of
    a new setup attempt. A site with none of these in an abandoned round did its part: the
    round's failure line says why it was abandoned."""
    survivors = {str(s) for s in server.survivors}
    # A masked input accepted before the stage closed is in the round even when the round
    # ends before its survivors are fixed: that site is not absent (the audit log refuses it).
    survivors |= {
        str(r.site) for r in getattr(server, "log", ()) if getattr(r, "masked_input", None) is not None
    }
    dropouts: dict[str, Any] = {}
    for d in server.dropouts:
        dropouts.setdefault(str(d.site), d)
    left_out: dict[str, int] = {}
    for restart in server.restarts:
        for s in restart.dropped:
            left_out.setdefault(str(s), restart.attempt)
    rejected = {(str(r.site), r.reason) for r in server.rejections}
    out = []
    for site in sorted(set(sampled) - survivors, key=site_sort_key):
        error, d = site_errors.get(site), dropouts.get(site)
        if error is not None:
            why = error if is_refusal(error) else f"error: {error}"
        elif d is not None:
            verb = "rejected" if (site, d.reason) in rejected else "dropped"
            why = f"{verb} at {d.stage.value}: {d.reason}"
        elif site in left_out:
            why = f"dropped at advertise: no key advert, left out of setup attempt {left_out[site]}"
        elif server.stage.value == "failed":
            continue
        else:
            why = "dropped: not in the round's cohort"
        out.append((site, one_line(why)))
    return tuple(out)


def _name_withdrawn(
    absent: tuple[tuple[str, str], ...], server: Any, roster: Enrolment
) -> tuple[tuple[str, str], ...]:
    """``absent`` with each site whose masked input carried a withdrawn dataset root named as
    such (``rejected at masked-input: dataset root ab12… of site-a was withdrawn on <date>
    (<reason>)``) instead of the protocol's "not approved"."""
    from fedseal.protocol import Limits, MessageKind, ProtocolError, UnapprovedDatasetError
    from fedseal.protocol.messages import MaskedInput, decode_payload

    withdrawn = roster.withdrawn()
    if not withdrawn or not absent:
        return absent
    named: dict[str, str] = {}
    for r in server.rejections:
        if not isinstance(r.error, UnapprovedDatasetError) or r.envelope is None:
            continue
        try:
            msg = decode_payload(MessageKind.MASKED_INPUT, r.envelope.payload, Limits())
        except ProtocolError:
            continue
        w = withdrawn.get(msg.dataset_root.hex()) if isinstance(msg, MaskedInput) else None
        if w is not None:
            named[str(r.site)] = one_line(f"rejected at {r.stage.value}: {w.describe()}")
    return tuple((site, named.get(site, why)) for site, why in absent)


def _released_dp(server: Any) -> DpParams | None:
    """The DP parameters of an abandoned round that accepted a masked input: it counts as
    released (the rule ``fl-audit verify`` applies: whether the coordinator could remove the
    masks cannot be told from the log, and the sites charged their ledgers before sending);
    else ``None``."""
    from fedseal.protocol import Accepted, MessageKind

    params = server.setup.params
    if params.dp is None:
        return None
    inputs = any(isinstance(r, Accepted) and r.kind == MessageKind.MASKED_INPUT for r in server.log)
    return params.dp if inputs else None


def setup_with_evaluation(
    run: Run, secure: SecureCoordinator, emsgs: list[Message], rnd: int, model: ModelVector,
    train_cfg: ConfigRecord,
) -> SetupAhead | None:
    """Put round ``rnd``'s setup into the evaluation messages (which carry the model it
    trains from; ``emsgs`` is changed in place); returns it, or None when the next cohort is
    not exactly the evaluated sites (a site joined, or the strategy evaluates a sample) or
    the setup cannot be built: that round then starts with a setup exchange of its own.

    From here on the status names round ``rnd``, so a coordinator restarted before it ends
    abandons it (its sites have seen its setup) instead of setting it up a second time.
    """
    from fedseal.protocol import ProtocolError

    targets = {int(m.metadata.dst_node_id): m for m in emsgs}
    nodes = run.enrolled_online()
    if len(nodes) < run.cfg.run.min_sites or set(nodes) != set(targets):
        log.info("round %d: setup not sent with the evaluation (cohort differs from the evaluated sites)", rnd)
        return None
    try:
        ahead = secure.begin(rnd, nodes, model)
    except ProtocolError as exc:
        log.warning("round %d: setup not sent with the evaluation: %s", rnd, exc)
        return None
    run.status(phase="training", round=rnd, run_id=secure.run_id.hex(), stage="advertise")
    node_of = {run.node_sites[n]: n for n in nodes}
    for site, pkt in ahead.outbound.items():
        node = node_of[site]
        # A strategy's evaluation messages share one RecordDict: each gets its own here.
        content = RecordDict(dict(targets[node].content.items()))
        content[records.SETUP_RECORD] = ConfigRecord({records.PAYLOAD: pkt.payload})
        content[records.SETUP_CONFIG_RECORD] = train_cfg
        targets[node] = Message(content, dst_node_id=node, message_type=targets[node].metadata.message_type)
        run.metrics.bytes_sent.inc(len(pkt.payload))
    emsgs[:] = [targets[int(m.metadata.dst_node_id)] for m in emsgs]
    return ahead


def collect_adverts(run: Run, ahead: SetupAhead, replies: list[Message]) -> None:
    """Take the key adverts (or the refusals) the evaluation replies brought back."""
    wanted = set(ahead.outbound)
    for reply in replies:
        site = run.node_sites.get(int(reply.metadata.src_node_id))
        if site not in wanted or reply.has_error():
            continue
        payload = reply_payload(reply)
        if isinstance(payload, bytes) and payload:
            ahead.adverts[site] = payload
            continue
        ahead.refused[site] = setup_refusal(reply) or "evaluation reply without a key advert"
