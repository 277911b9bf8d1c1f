"""The coordinator's Flower ``ServerApp`` (Message API + ``Grid``).

Flower loads ``fedseal.server.flower_app:app`` from the *installed* fedseal package (the run's
FAB carries only a ``pyproject.toml`` naming this component; see :mod:`fedseal.server.deploy`).
The run config carries one key, ``fedseal-config``: the absolute path of ``server.toml`` on the
coordinator host, plus ``fedseal-resume`` (bool).

One round, as the loop below reads (each step in its own module)::

    setup       the run's state, consortium roster, model, audit log  rundir, audit_hook, resume
    collect     the sites' (masked) updates                           secure_round / plain_round
    secure sum  the weighted mean of the deltas, unmasked             secure_round
    strategy    the mean handed to the Flower strategy as one reply   (here)
    checkpoint  the new model, committed locally                      checkpoint
    audit       the round result and checkpoint entries               audit_hook
    evaluate    federated evaluation of the new model                 evaluation

Transport: :mod:`fedseal.server.exchange`; record names and the model vector:
:mod:`fedseal.protocol.records`, :mod:`fedseal.protocol.model`; Flower patches:
:mod:`fedseal.server.flower_patches`.

A secure round (``run.secure = true``, the default) is driven by
:class:`fedseal.protocol.SecAggServer` stage by stage: each stage's signed packets go out as
``train.secagg`` messages (the first one also carries the global model and the training
config), replies are fed to ``server.receive`` (a site that does not answer within
``run.stage_timeout_s`` is a dropout), ``server.advance`` yields the next stage, and the secure
weighted mean of the sites' deltas is handed to the Flower strategy as one synthetic reply.
A failed round (``ProtocolError``: too few survivors, reconstruction failure, an unmasked
aggregate out of the range the signed example counts allow) is *abandoned*: nothing of it is
applied, the model is unchanged, the audit log records it as failed with the typed reason
(and, as for every round result, the survivor set: the sites whose masked inputs it
accepted), ``rounds.jsonl`` holds the reason, the kind and the survivors,
``fedseal_rounds_abandoned_total{reason}`` counts it (``reason`` is the error kind, e.g.
``aggregate-out-of-range``, ``threshold``, ``reconstruction``), and the operator's console gets
the round's one summary line saying it was abandoned and why; the traceback goes to
``serverapp.log`` only. Evaluation and checkpointing then proceed as below.

With ``run.setup_with_evaluation`` (the default) the next round's setup rides on this round's
evaluation messages: the model they carry is the one the next round trains from, so each site
evaluates, adopts the setup and returns its key advert with its metrics (or, in
``secagg-error``, why it refused the setup); the next round then starts at the advert bundle,
one exchange less per round. The setup is built and signed exactly as it would be a moment
later (cohort fixed before any advert exists), so the protocol is unchanged. It is not sent
along when the next cohort differs from the evaluated sites (a site joined or left, or the
strategy evaluates a sample); that round starts with a setup exchange as before. The status
names the next round from the moment its setup leaves, so a coordinator restarted during the
evaluation abandons that round rather than set it up twice.

Distributed DP (``server.toml [dp]``, secure runs only): each round's DP parameters go out in
its setup (:mod:`fedseal.server.dp_round`; each setup is logged), the privacy accounting (ρ,
the run's ε so far) of every round that accepted a masked input is logged with its result: a
committed round's, and an abandoned one's (the strategy returned no model, the checkpoint
could not be written, the protocol failed after the masked inputs), whose ε also shows in
``rounds.jsonl`` and on the console: whether the coordinator could remove the masks cannot be
told from the log, so the accounting assumes it could, as the sites' ledgers do; a round
abandoned before any masked input spends nothing. Before each
round (and before its setup rides on an
evaluation) the coordinator checks that it stays within ``[dp] epsilon`` at ``delta``: if not,
the run ends there, committed, its run end saying "privacy budget reached", and so does the
console.

A plain round (``run.secure = false``; updates in the clear inside TLS)::

    sample    online nodes that map to active enrolled sites (>= run.min_sites, else the round fails)
    train     strategy.configure_train -> Grid.send_and_receive(timeout=run.stage_timeout_s)
    validate  each reply: enrolled node, approved dataset root, exact names/shapes/dtypes,
              finite values, 1 <= num-examples <= 10**9; a rejected reply is a dropout
    aggregate streaming weighted mean (one float64 accumulator, O(model) memory), handed to the
              strategy as one synthetic reply, so FedAvg/FedAvgM/FedProx/FedAdam/FedAdagrad/
              FedYogi apply their server-side step to the mean
    evaluate  federated evaluation (loss, accuracy, macro-F1), weighted by example count
    commit    checkpoint (safetensors + JSON), one summary line in the log and rounds.jsonl

Site error replies (any round, any stage): a site may answer a message with a Flower error
reply instead of content; one whose reason starts with ``refused:`` is a *refusal* (e.g. a site
that does not allow plain training answers a plain ``train`` with
``refused: plain training is disabled at this site ([privacy] allow_plain = false)``). Each
error reply gives one console line naming the enrolled site and its reason, is recorded in the
round's record (``refused``: site -> reason, other errors in ``site_errors``), and counted in
``fedseal_site_errors_total{site, kind="refused"|"error"}``; the site is a dropout and the round
goes on with the others if enough remain, else it fails with a message naming the refusals.

Audit log (secure mode): ``state_dir/audit.sqlite`` (:mod:`fedseal.server.audit_hook`) gets the
roster changes, the run start, every accepted/rejected envelope of each round (written after the
state machine verified it, before the round result), each round result with a signed tree
head, each checkpoint, each round's aggregated evaluation metrics (an ``evaluation`` entry
written after the evaluation: the round result is committed before the new model leaves the
coordinator) and the run end. An entry the log refuses disables audit logging for the
rest of the run with an error in ``serverapp.log`` and ``status.json`` (training continues).

Consortium roster (``[consortium]`` in ``server.toml``): before it waits for the sites, the run
verifies the signed consortium roster under the roster authority's public key and refuses to
start (``status.json``: ``phase = "failed"`` with the one-line reason) if it does not verify.
A secure run records it in the audit log as the authority signed it before the run start (a
resumed run only if it changed), and the file is checked again at the start of every round: a
new version is recorded, one that does not verify or is older than the one in force (or in the
log) stops the run, like an audit refusal.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import replace
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedseal.crypto.keys import load_private_key
from fedseal.protocol import records
from fedseal.protocol.dp import DpParams
from fedseal.protocol.model import ModelVector, unflatten
from fedseal.protocol.types import site_sort_key
from fedseal.server import flower_patches
from fedseal.server.audit_hook import (
    AuditHaltError,
    ConsortiumRefusedError,
    ConsortiumWatch,
    FailClosedAudit,
    RunAudit,
    declared_settings,
)
from fedseal.server.checkpoint import RunState, SavedCheckpoint
from fedseal.server.config import ConsortiumSection, ServerConfig, load_server_config
from fedseal.server.dp_round import BUDGET_REACHED
from fedseal.server.errors import CoordinatorError, RunStopped
from fedseal.server.evaluation import evaluate, evaluation_messages
from fedseal.server.exchange import FixedNodes, arrays_to_record, exchange, record_to_arrays
from fedseal.server.plain_round import plain_round
from fedseal.server.replies import error_reason, one_line, record_site_errors
from fedseal.server.resume import reconcile_restart, responsive
from fedseal.server.rundir import MAX_REASON_CHARS, Run, append_round, summary, write_status
from fedseal.server.secure_round import SecureCoordinator, SetupAhead, setup_with_evaluation
from fedseal.server.site_floors import (
    ask_floors,
    contract_refusal,
    enrolment_refusal,
    refusal,
    write_floors,
)
from fedseal.server.strategies import build_strategy
from fedseal.settings import Environment

__all__ = ["app", "run_federation", "train_config"]

log = logging.getLogger("fedseal.server")

#: How a run an operator stopped says so (``fl-server stop``; the reason follows).
OPERATOR_STOP = "stopped by the operator"

app = ServerApp()


@app.main()
def server_main(grid: Grid, context: Context) -> None:
    environment = Environment.read()  # every FEDSEAL_* variable, checked before anything else
    cfg = load_server_config(str(context.run_config["fedseal-config"]))
    resume = bool(context.run_config.get("fedseal-resume", False))
    run_federation(grid, cfg, resume=resume, environment=environment)


def run_federation(
    grid: Grid, cfg: ServerConfig, *, resume: bool, environment: Environment | None = None
) -> None:
    """Run (or resume) the configured number of rounds. See the module docstring.

    ``environment`` is the process's ``FEDSEAL_*`` settings (default: the defaults): the
    grid's reply-object pulls use its back-off (:func:`fedseal.server.flower_patches.fast_reply_pulls`)
    and its coordinator passphrase decrypts the coordinator key.

    Whatever ends the run early, from the start-up of the run's state (roster, checkpoints,
    the metrics port) to the last round, is written to ``serverapp.log`` with its traceback and
    to ``status.json`` as ``phase = "failed"`` with a one-line ``reason`` (unless a more specific
    reason was already recorded), so ``fl-server run`` can say why; then it is raised again.
    """
    state_dir = cfg.coordinator.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(state_dir / "serverapp.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if environment is None:
        environment = Environment()
    run: Run | None = None
    try:
        backoff = environment.pull_backoff
        flower_patches.fast_reply_pulls(backoff.initial_s, backoff.cap_s)
        run = Run(grid, cfg)
        _run_federation(run, resume=resume, passphrase=environment.coordinator_passphrase)
    except Exception as exc:
        if run is None or not run.failure_recorded:
            reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
            log.exception("run failed: %s", reason)
            write_status(state_dir, secure=cfg.run.secure, phase="failed", reason=reason)
        raise
    finally:  # runs repeated in one process (simulation, benchmarks) keep their logs apart
        log.removeHandler(handler)
        handler.close()


def train_config(cfg: ServerConfig, round_: int, run_id: str) -> ConfigRecord:
    """The training config a round's messages carry (the sites clamp it to their limits).

    With ``[run] contract`` it names the run's data contract digest: a plain round's ``train``
    and every ``evaluate`` are refused by a site whose dataset follows another contract (a
    secure round's setup carries the digest signed).
    """
    r = cfg.run
    fields: dict[str, Any] = {
        records.RUN_ID: run_id,
        records.ROUND: round_,
        records.EPOCHS: r.epochs,
        records.BATCH_SIZE: r.batch_size,
        records.LEARNING_RATE: r.learning_rate,
        records.CLIP_NORM: r.clip_norm,
        records.MODEL: r.model,
        records.SEED: r.seed,
    }
    if r.strategy == "FedProx":  # the sites add the proximal term to their local loss
        fields[records.PROXIMAL_MU] = float(r.strategy_options.get("proximal_mu", 0.0))
    if r.contract_digest:
        fields[records.RUN_CONTRACT] = r.contract_digest.hex()
    return ConfigRecord(fields)


class _ConsortiumCheck:
    """``[consortium]``: the signed consortium roster in force, verified at run start and at
    the start of every round, and recorded in the audit log (secure runs) when it changes."""

    def __init__(self, run: Run, section: ConsortiumSection) -> None:
        self.run = run
        self.watch = ConsortiumWatch(section)
        self.audit: FailClosedAudit | None = None  # set once the audit log is open

    def check(self, what: str) -> None:
        """Verify the file; record it if it changed.

        Raises:
            ConsortiumRefusedError: It does not verify or went back (status failed, logged).
            AuditHaltError: The audit log refused it.
        """
        try:
            changed = self.watch.check()
        except ConsortiumRefusedError as exc:
            reason = f"{what}: {exc}"[:MAX_REASON_CHARS]
            log.error("%s", reason)
            self.run.status(phase="failed", reason=reason)
            raise
        if changed is not None:
            log.info("%s verified (%s)", changed.describe(), changed.path)
            self.record()

    def record(self, *, again: bool = False) -> None:
        """Record the roster in force in the audit log unless the log's last one is the same
        roster (``again``: record it anyway, as at a new run's start).

        Raises:
            AuditHaltError: The audit log refused it (e.g. a version lower than it holds).
        """
        current = self.watch.current
        if self.audit is not None and current is not None:
            self.audit.consortium_roster(current, again=again)


INITIAL_MODEL_ASKED = 3
"""Sites asked at once for the initial model: the first valid reply wins; a dead site costs one
stage timeout per batch, not per site, and the uploads stay a few models, not one per site."""


def _initial_model(run: Run, nodes: list[int]) -> dict[str, npt.NDArray[Any]]:
    """Ask sites (a few at a time) to build the configured model from the run's seed (no torch
    here); the first valid reply wins.

    Raises:
        CoordinatorError: No site returned one; the message names each site asked and why.
    """
    cfg = run.cfg
    why: dict[str, str] = {}
    for start in range(0, len(nodes), INITIAL_MODEL_ASKED):
        batch = nodes[start : start + INITIAL_MODEL_ASKED]
        msgs = [
            Message(
                RecordDict({records.CONFIG_RECORD: ConfigRecord({records.MODEL: cfg.run.model, records.SEED: cfg.run.seed})}),
                dst_node_id=node,
                message_type=records.message_type("query", records.INITIAL_MODEL),
            )
            for node in batch
        ]
        unanswered = {run.site_of(n) for n in batch}
        for rep in exchange(run.grid, msgs, cfg.run.stage_timeout_s):
            site = run.site_of(rep.metadata.src_node_id)
            unanswered.discard(site)
            if rep.has_error():
                why[site] = f"error reply: {error_reason(rep)}"
                continue
            rec = rep.content.get(records.ARRAYS_RECORD)
            arrays = record_to_arrays(rec) if isinstance(rec, ArrayRecord) else {}
            if not arrays:
                why[site] = "its reply holds no model arrays"
            elif not all(np.isfinite(a).all() for a in arrays.values()):
                why[site] = "its model holds NaN or infinite values"
            else:
                return {k: a.astype(np.float32) for k, a in arrays.items()}
        for site in unanswered:
            why[site] = f"no reply within {cfg.run.stage_timeout_s:g} s (run.stage_timeout_s)"
        log.warning("no initial model from %s", "; ".join(f"{k}: {v}" for k, v in sorted(why.items())))
    raise CoordinatorError(
        "no site returned an initial model ("
        + ("; ".join(f"{site}: {reason}" for site, reason in sorted(why.items())) or "no site online")
        + ")"
    )


def names(sites: list[str], most: int = 8) -> str:
    """Sites as a console list: the first ``most`` named, the rest counted."""
    more = len(sites) - most
    return ", ".join(sites[:most]) + (f" and {more} more" if more > 0 else "")


def _refuse_start(run: Run, problem: str) -> NoReturn:
    """End a run that cannot start: ``status.json`` failed with ``problem`` (one line, as the
    operator's console shows it), the console line, and :class:`CoordinatorError`."""
    run.fail(problem)
    print(f"fedseal: refusing to start the run: {problem}", flush=True)
    raise CoordinatorError(problem)


def _open_audit(run: Run, key: ec.EllipticCurvePrivateKey) -> FailClosedAudit:
    """The run's audit log (``state_dir/audit.sqlite``), fail closed.

    Raises:
        AuditHaltError: It cannot be opened (a secure run without its audit log does not start).
    """
    audit_path = run.state_dir / "audit.sqlite"
    try:
        audit = RunAudit.open(audit_path, key, run.roster)
    except Exception as exc:
        reason = f"audit log {audit_path} unavailable: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        log.error("%s", reason)
        run.status(phase="failed", reason=reason)
        raise AuditHaltError(reason) from exc
    return FailClosedAudit(audit, halt=lambda reason: run.status(phase="failed", reason=reason))


def _coordinator_key(run: Run, passphrase: str | None) -> ec.EllipticCurvePrivateKey:
    """The coordinator's identity key (``passphrase``: ``FEDSEAL_COORDINATOR_PASSPHRASE``
    decrypts it)."""
    return load_private_key(run.cfg.coordinator.key, passphrase.encode() if passphrase else None)


def _aggregate(
    strategy: Strategy, rnd: int, mean: dict[str, npt.NDArray[Any]], weight: int
) -> dict[str, npt.NDArray[np.float32]] | None:
    """The strategy's new model from the round's weighted mean, handed to it as one synthetic
    reply (so FedAvg/FedAvgM/FedProx/FedAdam/FedAdagrad/FedYogi apply their server step)."""
    synthetic = Message(
        RecordDict(
            {
                records.ARRAYS_RECORD: arrays_to_record(mean),
                records.METRICS_RECORD: MetricRecord({records.NUM_EXAMPLES: weight}),
            }
        ),
        dst_node_id=0,
        message_type="train",
    )
    agg, _ = strategy.aggregate_train(rnd, [synthetic])
    if agg is None:
        return None
    return {k: a.astype(np.float32) for k, a in record_to_arrays(agg).items()}


def _failed_outcome(rec: dict[str, Any]) -> str:
    """The outcome of a round that applied nothing: abandoned (a secure round's protocol
    failure) or failed, with the reason and the sites that refused."""
    reason = str(rec["failure"])
    refused = sorted(rec.get("refused", {}))
    if refused and not rec.get("absent"):  # else the line names every absent site and why
        reason += f"; refused by {', '.join(refused)}"
    if rec.get("abandoned"):
        return f"abandoned ({reason}; nothing applied, model unchanged)"
    return f"failed ({reason}; model unchanged)"


def _run_federation(run: Run, *, resume: bool, passphrase: str | None) -> None:
    try:
        fed = _Federation.setup(run, resume=resume, passphrase=passphrase)
    except RunStopped as exc:  # before the first round: nothing to keep
        reason = f"{OPERATOR_STOP} before the first round: {exc}"
        run.fail(reason)
        print(f"fedseal: {reason}", flush=True)
        raise CoordinatorError(reason) from None
    for rnd in range(fed.first_round, run.cfg.run.rounds + 1):
        stop = run.stop_requested()
        try:
            if stop is None:
                fed.round(rnd)
        except RunStopped as exc:  # while waiting for the round's sites: nothing was sent
            stop = str(exc)
        if stop is not None:
            fed.stop(f"{OPERATOR_STOP}: {stop}")
        if fed.stop_reason:
            break
    fed.finish()


class _Federation:
    """One run's rounds: the model in force, the run state, the audit log and the strategy."""

    def __init__(
        self, run: Run, strategy: Strategy, consortium: _ConsortiumCheck | None, state: RunState,
        model: ModelVector, audit: FailClosedAudit | None, secure: SecureCoordinator | None,
    ) -> None:
        self.run = run
        self.cfg = run.cfg
        self.strategy = strategy
        self.consortium = consortium
        self.state = state
        self.run_id = state.run_id
        self.history: list[dict[str, float]] = list(state.history)
        self.model = model
        self.audit = audit
        self.secure = secure
        self.first_round = state.round + 1
        self.ahead: SetupAhead | None = None  # the next round's setup, sent with an evaluation
        self.round_dp: DpParams | None = None  # the DP parameters of the round being committed
        self.stop_reason = ""  # why the run ends before run.rounds ("privacy budget reached")
        self.last_outcome = ""  # the last round's outcome, or why the run stopped before it

    @classmethod
    def setup(cls, run: Run, *, resume: bool, passphrase: str | None) -> _Federation:
        """The run's start: consortium roster, sites, model (new or resumed), audit log
        (``passphrase`` decrypts the coordinator key)."""
        cfg = run.cfg
        strategy = build_strategy(cfg.run.strategy, cfg.run.strategy_options, min_sites=cfg.run.min_sites)
        if not cfg.run.secure:
            log.warning(
                "fedseal: run.secure = false: updates travel in the clear inside TLS "
                "(plain FedAvg-style rounds)"
            )
        previous = run.read_status() if resume else {}
        consortium = _ConsortiumCheck(run, cfg.consortium) if cfg.consortium is not None else None
        if consortium is not None:
            consortium.check("refusing to start the run")
        problem = enrolment_refusal(cfg, len(run.roster.active()))
        if problem is not None:  # said now, not after sites_wait_timeout_s
            _refuse_start(run, problem)
        run.status(phase="waiting-for-sites", round=0)
        nodes = run.wait_for_sites(cfg.run.min_sites, cfg.run.sites_wait_timeout_s, want_all=True)
        online = {run.site_of(n) for n in nodes}
        offline = [s.name for s in run.roster.active() if s.name not in online]
        if len(nodes) < cfg.run.min_sites:
            _refuse_start(
                run,
                f"only {len(nodes)} of {len(run.roster.active())} enrolled sites online after "
                f"{cfg.run.sites_wait_timeout_s:g}s (run.min_sites = {cfg.run.min_sites}); not online: "
                f"{names(offline)} (a site that refused at its own start says why on its console)",
            )
        if offline:
            print(f"fedseal: starting without {names(offline)} (not online)", flush=True)
        latest = run.checkpoints.latest() if resume else None
        if latest is not None:
            state, arrays = latest
            log.info("resuming run %s after committed round %d", state.run_id, state.round)
            alive = responsive(run.grid, nodes, cfg.run.sites_wait_timeout_s)
            if len(alive) < cfg.run.min_sites:
                run.status(phase="failed", reason=f"only {len(alive)} sites answered after the restart")
                raise RuntimeError(f"only {len(alive)} sites answered after the restart")
            nodes = alive
        # A run no site would join is refused here, in one line, not round after round.
        if cfg.run.contract_digest:
            print(f"fedseal: data contract {cfg.run.contract} (digest {cfg.run.contract_digest.hex()})", flush=True)
        answered: set[str] = set()
        floors = ask_floors(run, nodes, answered)
        write_floors(run.state_dir, floors, now=time.time())
        silent = sorted((run.site_of(n) for n in nodes if run.site_of(n) not in answered), key=site_sort_key)
        if silent:
            print(f"fedseal: listed online but not answering: {names(silent)}", flush=True)
        problem = refusal(cfg, floors, online=len(answered))
        if problem is not None:
            _refuse_start(run, problem)
        mismatch = contract_refusal(cfg, floors)
        if mismatch is not None:  # enough sites follow the contract: the run goes on without these
            print(f"fedseal: warning: {mismatch}; the run goes on without them", flush=True)
        if latest is not None:
            model = ModelVector.of(arrays)
        else:
            run.archive_checkpoints()
            model = ModelVector.of(_initial_model(run, nodes))
            state = RunState(run_id=secrets.token_hex(16), round=0, model_digest=model.digest.hex())
            run.checkpoints.commit(state, model.arrays)
        audit: FailClosedAudit | None = None
        secure: SecureCoordinator | None = None
        if cfg.run.secure:
            key = _coordinator_key(run, passphrase)
            audit = _open_audit(run, key)
            secure = SecureCoordinator(run, state.run_id, key, audit)
            if consortium is not None:
                consortium.audit = audit
                consortium.record(again=latest is None)
            if latest is None:
                budget = (cfg.dp.epsilon, cfg.dp.delta) if cfg.dp.enabled else None
                audit.run_start(
                    state.run_id, cfg.path.read_bytes(), model.digest, cfg.run.rounds, budget,
                    declared_settings(cfg),
                )
        fed = cls(run, strategy, consortium, state, model, audit, secure)
        if latest is not None:
            state, arrays, fed.first_round = reconcile_restart(
                run, audit, state, dict(model.arrays), previous, run.rounds_log
            )
            if state.model_digest != model.digest.hex():  # a checkpoint the log lacks: discarded
                fed.model = ModelVector.of(arrays)
            fed.state, fed.history = state, list(state.history)
        return fed

    def round(self, rnd: int) -> None:
        """One round: collect and sum the updates, the strategy's step, checkpoint, audit,
        evaluate; then its record (``rounds.jsonl``) and its console line."""
        run, cfg = self.run, self.cfg
        t0 = time.monotonic()
        run.status(phase="training", round=rnd, run_id=self.run_id)
        if self.consortium is not None:
            self.consortium.check(f"stopping the run at round {rnd}")
        if self.ahead is not None:  # built for this round during the last evaluation
            nodes = self.ahead.nodes
        else:
            nodes = run.wait_for_sites(cfg.run.min_sites, cfg.run.sites_wait_timeout_s)
        if not self._budget_allows(rnd, len(nodes)):
            return
        rec: dict[str, Any] = {"round": rnd, "sampled": len(nodes), "accepted": 0, "rejected": 0}
        new_arrays, aggregate_digest = self._collect(rnd, nodes, rec)
        if new_arrays is None and "failure" not in rec:
            rec.update(failure="the strategy returned no model", failure_kind="no-aggregate")
        saved = self._commit(rnd, new_arrays, aggregate_digest, rec)
        if saved is None:
            rec["outcome"] = _failed_outcome(rec)
            run.metrics.rounds_failed.inc()
            run.metrics.rounds_abandoned.labels(reason=rec["failure_kind"]).inc()
        else:
            rec["outcome"] = "committed"
            rec["checkpoint"] = str(saved.model_path)
            self._evaluate(rnd, nodes, rec)
            run.metrics.rounds.inc()
            run.metrics.survivors.set(rec["accepted"])
        rec["seconds"] = time.monotonic() - t0
        if saved is not None:
            self.history.append({k: float(v) for k, v in rec.items() if isinstance(v, int | float)})
            self.state = replace(self.state, history=tuple(self.history))
            run.checkpoints.update_state(self.state)
        self.last_outcome = f"round {rnd}: {rec['outcome']}"
        line = summary(rnd, cfg.run.rounds, rec)
        if "dp_epsilon" in rec:
            line += f"; DP epsilon {rec['dp_epsilon']:.3g} at delta {cfg.dp.delta:g} so far"
        log.info("%s", line)
        print(f"fedseal: {line}", flush=True)
        append_round(run.rounds_log, rec)

    def _collect(
        self, rnd: int, nodes: list[int], rec: dict[str, Any]
    ) -> tuple[dict[str, npt.NDArray[np.float32]] | None, bytes | None]:
        """Collect the sites' updates and sum them (securely or in the clear), and hand the
        weighted mean to the strategy: its new model and the secure aggregate's digest."""
        cfg, model, strategy = self.cfg, self.model, self.strategy
        if len(nodes) < cfg.run.min_sites:
            rec.update(
                failure=f"too few sites: {len(nodes)} online, run.min_sites = {cfg.run.min_sites}",
                failure_kind="too-few-sites",
            )
            return None, None
        train_cfg = train_config(cfg, rnd, self.run_id)
        if self.secure is None:
            plain = plain_round(self.run, strategy, rnd, nodes, model, train_cfg)
            rec.update(plain.record())
            record_site_errors(rec, plain.site_errors)
            if plain.mean is None:
                return None, None
            return _aggregate(strategy, rnd, plain.mean, plain.total_weight), None
        secured = self.secure.round(rnd, nodes, model, train_cfg, self.ahead)
        self.ahead = None
        self.round_dp = secured.dp
        rec.update(secured.record())
        record_site_errors(rec, secured.site_errors)
        if secured.mean_delta is None:
            return None, None
        # The strategy sees one reply: the secure weighted mean of the sites' new models.
        mean = unflatten(model.flat.astype(np.float64) + secured.mean_delta, model.arrays)
        strategy.configure_train(
            rnd, arrays_to_record(model.arrays), ConfigRecord(), FixedNodes(self.run.grid, nodes),  # type: ignore[arg-type, unused-ignore]
        )
        return _aggregate(strategy, rnd, mean, secured.total_weight), secured.aggregate_digest

    def _commit(
        self, rnd: int, new_arrays: dict[str, npt.NDArray[np.float32]] | None,
        aggregate_digest: bytes | None, rec: dict[str, Any],
    ) -> SavedCheckpoint | None:
        """Commit order: checkpoint (local, not yet published), then the audit log's round
        result and checkpoint entries; evaluation is the first time the new model leaves the
        coordinator. A restart reconciles a checkpoint the log lacks."""
        saved: SavedCheckpoint | None = None
        if new_arrays is not None:
            model = ModelVector.of(new_arrays)  # flattened and hashed once per round
            state = RunState(
                run_id=self.run_id, round=rnd, model_digest=model.digest.hex(),
                history=tuple(self.history),
            )
            try:
                saved = self.run.checkpoints.commit(state, model.arrays)
            except OSError as exc:  # abandoned: nothing published, the model in force stays
                log.exception("round %d: the checkpoint could not be written", rnd)
                rec.update(
                    failure=f"the checkpoint could not be written: {type(exc).__name__}: {exc}",
                    failure_kind="checkpoint",
                )
            else:
                self.model, self.state = model, state
        if self.audit is not None:
            failed = "" if saved is not None else str(rec.get("failure", "round failed"))
            # A DP round whose noisy sum was unmasked spends privacy, committed or not: its
            # accounting entry follows the result (secure_round.SecureOutcome.dp).
            self.audit.round_result(
                rnd, aggregate_digest if saved is not None else None, self.model.digest, failed=failed,
                dp=self.round_dp, absent=rec.get("absent"),
            )
            if self.round_dp is not None and self.secure is not None:
                plan, rhos = self.secure.dp_plan, self.secure.dp_rhos()
                if plan is not None and rhos:
                    rec.update(dp_rho=rhos[-1], dp_epsilon=plan.epsilon_after(rhos))
            self.round_dp = None
            if saved is not None:
                self.audit.checkpoint(rnd, self.model.digest, saved.file_sha256, saved.model_path.name)
        return saved

    def _evaluate(self, rnd: int, nodes: list[int], rec: dict[str, Any]) -> None:
        """Federated evaluation of the new model (the next round's setup may ride along); its
        aggregated metrics follow the round result into the audit log as their own entry."""
        run, cfg = self.run, self.cfg
        emsgs = evaluation_messages(run, self.strategy, rnd, self.model, train_config(cfg, rnd, self.run_id), nodes)
        if (
            self.secure is not None and cfg.run.setup_with_evaluation and rnd < cfg.run.rounds
            and self.secure.next_round_fits(self.model.size, len(run.enrolled_online()))
        ):
            self.ahead = setup_with_evaluation(
                run, self.secure, emsgs, rnd + 1, self.model, train_config(cfg, rnd + 1, self.run_id)
            )
        evaluation = evaluate(run, self.strategy, rnd, emsgs, self.ahead)
        rec.update(evaluation.record())
        record_site_errors(rec, evaluation.site_errors)
        if evaluation.metrics is not None:
            run.metrics.accuracy.set(rec["accuracy"])
            if self.audit is not None:
                self.audit.evaluation(rnd, evaluation.logged_metrics(), evaluation.examples, evaluation.sites)

    def _budget_allows(self, rnd: int, cohort: int) -> bool:
        """Whether round ``rnd`` of ``cohort`` sites stays within ``[dp]`` (ε, δ); if not, the
        run stops here, committed (:attr:`stop_reason`), and the console says so."""
        if self.secure is None or self.secure.dp_plan is None:
            return True
        if self.secure.next_round_fits(self.model.size, cohort):
            return True
        plan = self.secure.dp_plan
        spent = plan.epsilon_after(self.secure.dp_rhos())
        self.stop_reason = (
            f"{BUDGET_REACHED}: epsilon {spent:.4g} of {plan.section.epsilon:g} at delta "
            f"{plan.section.delta:g} after {len(self.secure.dp_rhos())} DP rounds; round {rnd} "
            "would exceed it"
        )
        log.info("%s", self.stop_reason)
        print(f"fedseal: {self.stop_reason}; stopping the run (committed)", flush=True)
        return False

    def stop(self, reason: str) -> None:
        """End the run before its next round (its committed rounds stand), saying why."""
        self.stop_reason = reason
        log.info("%s", reason)
        print(f"fedseal: {reason}; stopping the run", flush=True)

    def finish(self) -> None:
        """The run end: recorded in the audit log (which is closed), ``status.json`` finished;
        or, when no round of the run committed, failed with why (the last round's outcome):
        the initial model is not a result."""
        audit_log: str | None = None
        failed = ""
        if self.state.round == 0:
            last = self.last_outcome or self.stop_reason or "no round ran"
            failed = one_line(f"no round committed; the last: {last}")
        if self.audit is not None:
            self.audit.run_end(failed or self.stop_reason, aborted=bool(failed))
            audit_log = str(self.audit.path)
            self.audit.close()
        if failed:
            log.error("run failed: %s", failed)
            print(f"fedseal: the run failed: {failed}", flush=True)
            self.run.status(phase="failed", reason=failed, run_id=self.run_id, audit_log=audit_log)
            return
        final = self.run.checkpoints.model_path(self.state.round)
        early = {"stopped": self.stop_reason} if self.stop_reason else {}
        self.run.status(
            phase="finished", round=self.state.round, run_id=self.run_id, model=str(final),
            audit_log=audit_log, **early,
        )
        print(f"fedseal: finished; final model {final}", flush=True)
