"""The coordinator's Flower ``ServerApp`` (Message API + ``Grid``).

Flower loads ``fedseal.server.flower_app:app`` from the *installed* fedseal package (the run's
FAB carries only a ``pyproject.toml`` naming this component; see :mod:`fedseal.server.deploy`).
The run config carries one key, ``fedseal-config``: the absolute path of ``server.toml`` on the
coordinator host, plus ``fedseal-resume`` (bool).

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

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedseal.server.checkpoint import CheckpointError, CheckpointStore, RunState, model_digest
from fedseal.server.config import ConsortiumSection, ServerConfig, env_seconds, load_server_config
from fedseal.server.metrics import Metrics
from fedseal.server.roster import Roster
from fedseal.server.strategies import build_strategy

__all__ = ["NODES_FILE", "ROUNDS_FILE", "STATUS_FILE", "app", "exchange", "run_federation"]

log = logging.getLogger("fedseal.server")

NODES_FILE = "nodes.json"
STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.jsonl"
#: The ServerApp process's pid, so a restarted coordinator can end one its predecessor left.
SERVERAPP_PID_FILE = "serverapp.pid"
MAX_EXAMPLES = 10**9
#: Record names of a secure round's messages; the sites' ClientApp (client/flower_app.py)
#: reads the same: the protocol message, and in an evaluation message that carries the next
#: round's setup, that round's training config; in its reply, a refused setup's reason.
SETUP_RECORD = "secagg"
SETUP_CONFIG_RECORD = "train-config"
SETUP_ERROR_RECORD = "secagg-error"
#: ``status.json``'s ``reason`` is one line for a terminal; the traceback is in serverapp.log.
MAX_REASON_CHARS = 300
#: A site's error reply whose reason starts with this refuses the message (policy, not a fault).
REFUSED_PREFIX = "refused:"

app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    cfg = load_server_config(str(context.run_config["fedseal-config"]))
    resume = bool(context.run_config.get("fedseal-resume", False))
    run_federation(grid, cfg, resume=resume)


class AuditHaltError(RuntimeError):
    """The audit log could not take an entry; the run stops rather than continue unrecorded."""


class _ConsortiumCheck:
    """``[consortium]``: the signed consortium roster in force, verified at run start and at
    the start of every round, and recorded in the audit log (secure runs) when it changes."""

    def __init__(self, run: _Run, section: ConsortiumSection) -> None:
        from fedseal.server.audit_hook import ConsortiumWatch

        self.run = run
        self.watch = ConsortiumWatch(section)
        self.secure: _SecureCoordinator | None = None  # set once the audit log is open

    def check(self, what: str) -> None:
        """Verify the file; record it if it changed.

        Raises:
            ConsortiumRefusedError: It does not verify or went back (status failed, logged).
            AuditHaltError: The audit log refused it.
        """
        from fedseal.server.audit_hook import ConsortiumRefusedError

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
        secure, current = self.secure, self.watch.current
        if secure is None or secure.audit is None or current is None:
            return
        secure.audit_call("the consortium roster", secure.audit.consortium_roster, current, again=again)


class _FixedNodes:
    """A view of the grid whose node list is the sample we chose (strategies sample from it)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


ENV_PULL_BACKOFF = "FEDSEAL_OBJECT_PULL_BACKOFF_S"
DEFAULT_PULL_BACKOFF_S = 0.05


def reply_pull_backoff(env: Mapping[str, str] = os.environ) -> tuple[float, float]:
    """(initial, cap) seconds the grid waits before re-pulling a reply object not yet available.

    ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (0.01 to 1, default 0.05) is the initial wait; the cap is
    five times that, at least 0.25 s (``1``: Flower's first retry after 1 s). The sites read
    the same variable (:func:`fedseal.client.supernode.pull_backoff`).

    Raises:
        ValueError: The variable is not a number of seconds between 0.01 and 1.
    """
    value = env_seconds(env, ENV_PULL_BACKOFF, DEFAULT_PULL_BACKOFF_S, 0.01, 1.0)
    return value, max(0.25, 5 * value)


def _fast_reply_pulls(initial: float, cap: float) -> None:
    """Make the deployment grid re-pull a not-yet-available reply object after ``initial`` s.

    A SuperNode's reply is listed by the SuperLink as soon as it is registered, before its
    objects are pushed, so the grid's first ``PullObject`` usually finds it unavailable and
    Flower's ``pull_objects`` waits a fixed 1 s before asking again. ``HttpGrid.pull_messages``
    calls the module-level ``pull_objects`` of ``flwr.superlink.grid.http_grid``; that name is
    rebound to one with a shorter back-off (idempotent: an earlier rebinding is replaced).
    """
    from flwr.superlink.grid import http_grid

    current = getattr(http_grid, "pull_objects")  # noqa: B009 (not re-exported: mypy --strict)
    if getattr(current, "fedseal_backoff", None) == (initial, cap):
        return
    original = getattr(current, "__wrapped__", current)

    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial)
        kwargs.setdefault("backoff_cap", cap)
        return original(*args, **kwargs)

    pull_objects.__wrapped__ = original  # type: ignore[attr-defined]
    pull_objects.fedseal_backoff = (initial, cap)  # type: ignore[attr-defined]
    http_grid.pull_objects = pull_objects  # type: ignore[attr-defined]


#: First wait between empty pulls of an exchange; it doubles up to the exchange's ``poll``.
MIN_POLL_S = 0.005


class ReplySignal:
    """What a grid whose replies are stored in this process (the simulation engine) can tell
    an exchange: which of its messages have a reply waiting, and an event set on every stored
    reply. Carried by the grid as :data:`REPLY_SIGNAL_ATTR` (optional)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._replied: set[str] = set()

    def replied(self, message_id: str) -> None:
        """A reply to message ``message_id`` was stored."""
        with self._lock:
            self._replied.add(message_id)
        self.event.set()

    def take(self) -> set[str]:
        """The messages replied to since the last call."""
        with self._lock:
            replied, self._replied = self._replied, set()
        return replied


#: Attribute of a grid holding a :class:`ReplySignal` (optional).
REPLY_SIGNAL_ATTR = "fedseal_reply_signal"


def exchange_iter(
    grid: Grid, messages: Iterable[Message], timeout: float, poll: float = 0.2, batch: int = 16
) -> Iterator[Message]:
    """Push ``messages``, then yield replies as they arrive until all came or ``timeout`` passed.

    Same contract as ``Grid.send_and_receive`` but polls with a back-off from
    :data:`MIN_POLL_S` up to ``poll`` seconds, starting again after every reply (Flower's own
    implementation sleeps 3 s between pulls, which adds up over a multi-stage round: a reply
    that comes within milliseconds, as on the simulation engine, is seen within milliseconds,
    and an idle wait costs at most one pull per ``poll``), and pulls
    at most ``batch`` replies at a time, so a caller that consumes each reply before asking for
    the next (the secure round adds each masked vector to one running sum) holds at most
    ``batch`` replies in memory, however many sites there are. Reply objects not yet uploaded
    are re-pulled after :func:`reply_pull_backoff` (50 ms) instead of Flower's 1 s.

    A grid carrying a :class:`ReplySignal` (the simulation engine) is asked only for the
    messages it says have replies, and its event ends the idle wait; every ``poll`` seconds all
    pending messages are asked for anyway. (Each pull costs the link state work per message
    asked for: asking for all N pending messages after each of N replies was O(N^2) per stage.)

    Raises:
        ValueError: ``FEDSEAL_OBJECT_PULL_BACKOFF_S`` is set to an invalid value.
    """
    _fast_reply_pulls(*reply_pull_backoff())
    signal: ReplySignal | None = getattr(grid, REPLY_SIGNAL_ATTR, None)
    messages = list(messages)
    started = time.monotonic()
    log.info("exchange: pushing %d messages", len(messages))
    pending = list(grid.push_messages(messages))
    total = len(pending)
    del messages
    log.debug("exchange: pushed; polling")
    deadline = time.monotonic() + timeout
    wait = min(MIN_POLL_S, poll)
    hinted: set[str] = set()
    last_full = time.monotonic()
    while pending:
        if signal is None:
            candidates = pending
        else:
            signal.event.clear()  # before taking: a reply stored after it ends the next wait
            hinted |= signal.take()
            if time.monotonic() - last_full >= poll:
                last_full = time.monotonic()
                candidates = pending
            else:
                candidates = [m for m in pending if m in hinted]
        got_any = False
        for start in range(0, len(candidates), batch):
            window = candidates[start:start + batch]
            got = list(grid.pull_messages(window))
            hinted.difference_update(window)
            if not got:
                continue
            got_any = True
            wait = min(MIN_POLL_S, poll)
            answered = {m.metadata.reply_to_message_id for m in got}
            pending = [m for m in pending if m not in answered]
            log.debug("exchange: %d replies, %d pending", len(got), len(pending))
            yield from got
            del got
        if not pending or time.monotonic() >= deadline:
            break
        if not got_any:
            idle = min(wait, max(0.0, deadline - time.monotonic()))
            if signal is not None:
                signal.event.wait(idle)
            else:
                time.sleep(idle)
            wait = min(2 * wait, poll)
    log.info(
        "exchange: %d of %d replied in %.2fs", total - len(pending), total, time.monotonic() - started
    )


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, poll: float = 0.2) -> list[Message]:
    """All replies of :func:`exchange_iter` as a list (small replies: evaluation, pings)."""
    return list(exchange_iter(grid, messages, timeout, poll))


@dataclass(frozen=True, slots=True)
class _Accepted:
    site: str
    num_examples: int


class _Run:
    def __init__(self, grid: Grid, cfg: ServerConfig) -> None:
        self.grid = grid
        self.cfg = cfg
        self.state_dir = cfg.coordinator.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.roster = Roster.load_or_create(cfg.coordinator.roster)
        self.checkpoints = CheckpointStore(self.state_dir / "checkpoints")
        (self.state_dir / SERVERAPP_PID_FILE).write_text(f"{os.getpid()}\n")
        self.failure_recorded = False
        self.metrics = Metrics.start(cfg.network.metrics_port, cfg.network.metrics_host)
        self.node_sites = self._load_node_map()

    def _load_node_map(self) -> dict[int, str]:
        path = self.state_dir / NODES_FILE
        doc = json.loads(path.read_text()) if path.exists() else {}
        return {int(k): str(v) for k, v in doc.items()}

    def archive_checkpoints(self) -> None:
        """Move an earlier run's checkpoints aside (``checkpoints-<run id>``) before a new run,
        so ``--resume`` can never pick up another run's model."""
        directory = self.checkpoints.directory
        if not directory.is_dir() or not any(directory.iterdir()):
            return
        try:
            latest = self.checkpoints.latest()
        except CheckpointError:
            latest = None
        tag = latest[0].run_id[:16] if latest is not None else f"unknown-{int(time.time())}"
        target = directory.with_name(f"{directory.name}-{tag}")
        if target.exists():
            target = directory.with_name(f"{directory.name}-{tag}-{int(time.time())}")
        directory.rename(target)
        log.info("earlier checkpoints moved to %s", target)

    def read_status(self) -> dict[str, Any]:
        """The last status written (by this or an earlier, killed coordinator), or {}."""
        try:
            doc = json.loads((self.state_dir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def status(self, **fields: Any) -> None:
        _write_status(self.state_dir, secure=self.cfg.run.secure, **fields)
        if fields.get("phase") == "failed":
            self.failure_recorded = True

    def enrolled_online(self) -> list[int]:
        active = {s.name for s in self.roster.active()}
        return sorted(
            n for n in self.grid.get_node_ids() if self.node_sites.get(int(n)) in active
        )

    def wait_for_sites(self, minimum: int, timeout: float, *, want_all: bool = False) -> list[int]:
        """Wait until ``minimum`` enrolled sites are online (``want_all``: every active one,
        falling back to ``minimum`` at the deadline)."""
        deadline = time.monotonic() + timeout
        goal = max(minimum, len(self.roster.active())) if want_all else minimum
        while True:
            nodes = self.enrolled_online()
            if len(nodes) >= goal or time.monotonic() >= deadline:
                return nodes
            time.sleep(0.5)


def _arrays_to_numpy(rec: ArrayRecord) -> dict[str, npt.NDArray[Any]]:
    return {k: v.numpy() for k, v in rec.items()}


def _numpy_to_record(arrays: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _validate_reply(
    run: _Run, msg: Message, reference: Mapping[str, npt.NDArray[Any]]
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
        arrays_rec = content["arrays"]
        metrics = content["metrics"]
        info = content["site"]
    except KeyError:
        return "malformed"
    if not isinstance(arrays_rec, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return "malformed"
    if not isinstance(info, ConfigRecord):
        return "malformed"
    root = info.get("dataset-root")
    if not isinstance(root, str) or root.lower() not in site.dataset_roots:
        return "unapproved-dataset-root"
    n = metrics.get("num-examples")
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


#: Seconds a ``query.ping`` waits before the sites that did not answer are pinged again.
PING_ROUND_S = 15.0


def _responsive(run: _Run, nodes: list[int], timeout: float, round_s: float = PING_ROUND_S) -> list[int]:
    """The nodes that answer a ``query.ping`` within ``timeout`` (all of them, if they do sooner).

    After a coordinator restart Flower still lists the previous session's nodes as online, and a
    SuperNode may need many seconds to reconnect (its back-off grows while the SuperLink is
    down); a round must not start before its cohort can actually be reached. A site's first
    ping can also fail while its SuperNode is still clearing the previous run's task (it then
    answers with an error, or not at all): sites that did not answer properly are pinged again
    every ``round_s`` seconds (at once after an error reply) until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    alive: set[int] = set()
    attempt = 0
    while True:
        todo = [n for n in nodes if n not in alive]
        left = deadline - time.monotonic()
        if not todo or left <= 0:
            break
        attempt += 1
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"ping": 1})}), dst_node_id=n, message_type="query.ping")
            for n in todo
        ]
        replies = exchange(run.grid, msgs, min(left, round_s))
        errors = 0
        for r in replies:
            if r.has_error():
                errors += 1
            else:
                alive.add(int(r.metadata.src_node_id))
        if len(alive) < len(nodes):
            log.info(
                "ping %d: %d of %d sites answered (%d with an error); pinging the others again",
                attempt, len(alive), len(nodes), errors,
            )
            if errors and len(replies) == len(todo):  # everyone replied, some with errors
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    log.info("ping: %d of %d sites answered", len(alive), len(nodes))
    return sorted(alive)


def _train_config(cfg: ServerConfig, round_: int, run_id: str) -> ConfigRecord:
    r = cfg.run
    fields: dict[str, Any] = {
        "run-id": run_id,
        "round": round_,
        "epochs": r.epochs,
        "batch-size": r.batch_size,
        "learning-rate": r.learning_rate,
        "clip-norm": r.clip_norm,
        "model": r.model,
        "seed": r.seed,
    }
    if r.strategy == "FedProx":  # the sites add the proximal term to their local loss
        fields["proximal-mu"] = float(r.strategy_options.get("proximal_mu", 0.0))
    return ConfigRecord(fields)


def _initial_model(run: _Run, nodes: list[int]) -> dict[str, npt.NDArray[Any]]:
    """Ask one site to build the configured model from the run's seed (no torch here)."""
    cfg = run.cfg
    for node in nodes:
        msg = Message(
            RecordDict({"config": ConfigRecord({"model": cfg.run.model, "seed": cfg.run.seed})}),
            dst_node_id=node,
            message_type="query.initial_model",
        )
        replies = exchange(run.grid, [msg], cfg.run.stage_timeout_s)
        for rep in replies:
            rec = None if rep.has_error() else rep.content.get("arrays")
            if isinstance(rec, ArrayRecord):
                arrays = _arrays_to_numpy(rec)
                if arrays and all(np.isfinite(a).all() for a in arrays.values()):
                    return {k: a.astype(np.float32) for k, a in arrays.items()}
        log.warning("site node %s gave no initial model; trying another", node)
    raise RuntimeError("no site returned an initial model")


def flat_model(arrays: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """The model as one float32 vector, arrays in sorted-name order (the secure-round layout)."""
    return np.concatenate([np.asarray(arrays[k], np.float32).ravel() for k in sorted(arrays)])


def unflat_model(
    flat: npt.NDArray[Any], like: Mapping[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[np.float32]]:
    out, pos = {}, 0
    for k in sorted(like):
        n = like[k].size
        out[k] = flat[pos : pos + n].reshape(like[k].shape).astype(np.float32)
        pos += n
    return out


def flat_digest(flat: npt.NDArray[np.float32]) -> bytes:
    """SHA-256 of the little-endian float32 bytes of the flattened model (``model_digest``)."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f4").tobytes()).digest()


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


class _SecureCoordinator:
    """Drives :class:`fedseal.protocol.SecAggServer` over the Flower grid, stage by stage."""

    def __init__(self, run: _Run, run_id: str) -> None:
        from fedseal.crypto.keys import load_private_key

        self.run = run
        self.run_id = bytes.fromhex(run_id)
        pass_env = os.environ.get("FEDSEAL_COORDINATOR_PASSPHRASE")
        self.key = load_private_key(run.cfg.coordinator.key, pass_env.encode() if pass_env else None)
        self.audit: Any = None
        self.last_aggregate: bytes | None = None
        #: Each site's commitment to the graph nonce of its next round (from its last key
        #: advert): listed in the next setup, so only a site's first round of the run (or the
        #: first after a restart of the coordinator) needs a commit exchange.
        self.commitments: dict[str, bytes] = {}

    def audit_call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Write to the audit log, durably; if it refuses or fails, the run stops (fail closed).

        Nothing is acknowledged to a site or published as a model before its audit entry is
        committed, so a log that cannot take an entry halts the run at that point: the log
        stays verifiable up to its last entry and no model goes out unrecorded.

        Raises:
            AuditHaltError: The audit log refused or failed to store the entry.
        """
        from fedseal.audit.log import AuditError

        if self.audit is None:
            return
        try:
            fn(*args, **kwargs)
        except (AuditError, ValueError, OSError, sqlite3.Error) as exc:
            reason = f"the audit log refused {what}: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
            log.error("%s; stopping the run (nothing further is acknowledged or published)", reason)
            self.run.status(phase="failed", reason=reason)
            raise AuditHaltError(reason) from exc

    def _log_envelopes(
        self, rnd: int, entries: list[Any], start: int, payloads: dict[tuple[str, str], bytes]
    ) -> int:
        """Log the protocol log entries from ``start`` on (one durable commit); return the new end."""
        if self.audit is not None and len(entries) > start:
            self.audit_call("envelopes", self.audit.envelopes, rnd, entries[start:], payloads)
        return len(entries)

    def _roster(self) -> Any:
        from fedseal.protocol import Roster as ProtoRoster
        from fedseal.protocol import RosterEntry

        return ProtoRoster(
            RosterEntry(
                site=s.name,
                public_key=s.public_key,
                approved_roots=frozenset(bytes.fromhex(r) for r in s.dataset_roots),
                active=s.status == "active",
            )
            for s in self.run.roster.sites
        )

    def _config(self, length: int, cohort: int) -> Any:
        from fedseal.protocol import ConfigError as ProtoConfigError
        from fedseal.protocol import QuantizationConfig, RoundConfig

        r = self.run.cfg.run
        for bits in (32, 64):
            cfg = RoundConfig(
                vector_length=length,
                quantization=QuantizationConfig.from_clip(r.update_clip, levels=r.quant_levels, modulus_bits=bits),
                max_weight=r.max_weight,
                threshold=r.threshold or None,
                round_timeout_s=int(max(600, 10 * r.stage_timeout_s)),
            )
            try:
                cfg.resolve(cohort)
            except ProtoConfigError:
                if bits == 64:
                    raise
                continue
            return cfg
        raise AssertionError("unreachable")  # pragma: no cover

    def begin(self, rnd: int, nodes: list[int], arrays: Mapping[str, npt.NDArray[Any]]) -> SetupAhead:
        """Build round ``rnd``'s setup now, to send with the current round's evaluation.

        Raises:
            fedseal.protocol.ProtocolError: The round cannot be set up (e.g. its configuration).
        """
        server = self._server(rnd, nodes, flat_model(arrays))
        return SetupAhead(rnd=rnd, nodes=list(nodes), server=server, outbound=server.start())

    def _server(self, rnd: int, nodes: list[int], flat: npt.NDArray[np.float32]) -> Any:
        from fedseal.protocol import SecAggServer

        sites = sorted(self.run.node_sites[n] for n in nodes)
        return SecAggServer(
            self._config(flat.size, len(nodes)), self._roster(), sites,
            identity_key=self.key, run_id=self.run_id, round=rnd, model_digest=flat_digest(flat),
            now=time.time(), commitments=self.commitments,
        )

    def round(
        self, rnd: int, nodes: list[int], arrays: Mapping[str, npt.NDArray[Any]], train_cfg: ConfigRecord,
        rec: dict[str, Any], ahead: SetupAhead | None = None,
    ) -> npt.NDArray[np.float64] | None:
        """One secure round; returns the weighted mean of the sites' deltas, or None if failed.

        With ``ahead`` (built by :meth:`begin` for this round and these ``nodes``, and sent with
        the previous round's evaluation), the setup stage takes the key adverts that came back
        with the evaluation replies instead of an exchange of its own.
        """
        from fedseal.protocol import ProtocolError, Rejection

        run, cfg = self.run, self.run.cfg
        site_of = {n: run.node_sites[n] for n in nodes}
        node_of = {s: n for n, s in site_of.items()}
        server = ahead.server if ahead is not None else self._server(rnd, nodes, flat_model(arrays))
        payloads: dict[tuple[str, str], bytes] = {}
        logged = 0
        self.last_aggregate = None

        def take(
            site: str, stage_name: str, payload: object, bulk: npt.NDArray[Any] | None,
            why: str = "site error or empty reply",
        ) -> None:
            if not isinstance(payload, bytes) or not payload:
                server.drop(site, why)
                run.metrics.rejected.labels(reason="site-error").inc()
                return
            run.metrics.bytes_received.inc(len(payload) + (bulk.nbytes if bulk is not None else 0))
            payloads[(site, stage_name)] = payload
            receipt = server.receive(site, payload, bulk)
            if isinstance(receipt, Rejection):
                run.metrics.rejected.labels(reason=type(receipt.error).__name__).inc()
                rec["rejected"] = rec.get("rejected", 0) + 1
                log.warning("round %d: rejected %s at %s: %s", rnd, site, stage_name, receipt.reason)

        try:
            outbound = ahead.outbound if ahead is not None else server.start()
            stage = 0
            while outbound:
                stage_name = server.stage.value
                run.status(phase="training", round=rnd, run_id=self.run_id.hex(), stage=stage_name)
                ts = time.monotonic()
                if stage == 0 and ahead is not None:
                    # The setup went out with the last evaluation; its adverts came back with it.
                    rec["setup_with_evaluation"] = True
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
                    model_rec = _numpy_to_record(arrays) if stage == 0 else None
                    for site, pkt in outbound.items():
                        content = RecordDict({SETUP_RECORD: ConfigRecord({"payload": pkt.payload})})
                        if model_rec is not None:
                            content["arrays"] = model_rec
                            content["config"] = train_cfg
                        msgs.append(Message(content, dst_node_id=node_of[site], message_type="train.secagg"))
                        run.metrics.bytes_sent.inc(len(pkt.payload))
                    # Each reply is verified and (a masked input) added to the running sum before
                    # the next is pulled: memory holds one model-sized vector per pulled batch.
                    for reply in exchange_iter(run.grid, msgs, cfg.run.stage_timeout_s):
                        site = site_of.get(int(reply.metadata.src_node_id))
                        if site is None:
                            continue
                        if reply.has_error():
                            reason = _error_reason(reply)
                            _report_site_error(run, rnd, site, reason, rec, stage_name)
                            take(site, stage_name, None, None, f"error reply: {reason}")
                            continue
                        payload = _reply_payload(reply)
                        bulk_rec = reply.content.get("bulk") if payload else None
                        bulk = (
                            bulk_rec["masked"].numpy()
                            if isinstance(bulk_rec, ArrayRecord) and "masked" in bulk_rec else None
                        )
                        take(site, stage_name, payload, bulk)
                rec[f"{stage_name}_s"] = time.monotonic() - ts
                run.metrics.stage_seconds.labels(stage=stage_name).observe(rec[f"{stage_name}_s"])
                # The stage's envelopes are durably logged before the next stage's messages
                # (which acknowledge them) go out.
                logged = self._log_envelopes(rnd, server.log, logged, payloads)
                try:
                    outbound = server.advance()
                finally:
                    self.commitments.update(server.next_commitments)
                stage += 1
            result = server.result
        except ProtocolError as exc:
            self._log_envelopes(rnd, server.log, logged, payloads)
            kind = _failure_kind(exc)
            survivors = sorted(str(s) for s in server.survivors)
            log.warning(
                "round %d abandoned (%s; survivors %s): %s", rnd, kind, ", ".join(survivors) or "none",
                exc, exc_info=exc,
            )
            rec.update(
                failure=_one_line(f"{type(exc).__name__}: {exc}"), failure_kind=kind, abandoned=True,
                survivors=survivors,
            )
            return None
        rec["accepted"] = len(result.survivors)
        rec["sites"] = sorted(result.survivors)
        rec["dropouts"] = len(result.dropouts)
        rec["aggregate_digest"] = result.aggregate_digest.hex()
        run.metrics.accepted.inc(len(result.survivors))
        self._log_envelopes(rnd, server.log, logged, payloads)
        self.last_aggregate = result.aggregate_digest
        mean: npt.NDArray[np.float64] = np.asarray(result.weighted_mean, np.float64)
        rec["total_weight"] = int(result.total_weight)
        return mean


def _site_of(run: _Run, reply: Message) -> str:
    """The enrolled site name of a reply's sender (``node <id>`` for a node that maps to none)."""
    node = int(reply.metadata.src_node_id)
    return run.node_sites.get(node) or f"node {node}"


def _failed_outcome(rec: dict[str, Any]) -> str:
    """The outcome of a round that applied nothing: abandoned (a secure round's protocol
    failure) or failed, with the reason and the sites that refused."""
    reason = str(rec["failure"])
    refused = sorted(rec.get("refused", {}))
    if refused:
        reason += f"; refused by {', '.join(refused)}"
    if rec.get("abandoned"):
        return f"abandoned ({reason}; nothing applied, model unchanged)"
    return f"failed ({reason}; model unchanged)"


def _failure_kind(exc: Exception) -> str:
    """A round failure's kind for metrics and records: the error class in kebab case, without
    ``Error`` (``AggregateOutOfRangeError`` -> ``aggregate-out-of-range``)."""
    name = type(exc).__name__.removesuffix("Error") or type(exc).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


def _one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters (a site's reason is
    untrusted: no line break or terminal control sequence reaches the console)."""
    printable = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(printable.split())[:limit]


def _error_reason(reply: Message) -> str:
    """The reason of a site's error reply, as one line."""
    reason = getattr(reply.error, "reason", "")
    return _one_line(str(reason or "")) or "error reply without a reason"


EVALUATION_REFUSED_RECORD = "evaluation-refused"
"""In a site's ``evaluate`` reply without metrics: why it did not evaluate (``reason``; the site's
``fedseal.client.flower_app.EVALUATION_REFUSED_RECORD``)."""


def _report_site_error(run: _Run, rnd: int, site: str, reason: str, rec: dict[str, Any], stage: str) -> None:
    """One console line naming the enrolled ``site`` and its ``reason``, the round's record
    (``refused`` or ``site_errors``: site -> reason) and ``fedseal_site_errors_total``."""
    refused = reason.startswith(REFUSED_PREFIX)
    rec.setdefault("refused" if refused else "site_errors", {})[site] = reason
    run.metrics.site_errors.labels(site=site, kind="refused" if refused else "error").inc()
    if refused:
        line = f"round {rnd}: {site} {reason}"
    else:
        line = f"round {rnd}: {site} answered {stage} with an error: {reason}"
    log.warning("%s", line)
    print(f"fedseal: {line}", flush=True)


def _reply_payload(reply: Message) -> object:
    """The protocol message a site's reply carries (``SETUP_RECORD``'s ``payload``), unchecked:
    the caller treats anything but non-empty bytes as no answer."""
    sec = reply.content.get(SETUP_RECORD)
    return sec.get("payload") if isinstance(sec, ConfigRecord) else None


def _setup_with_evaluation(
    run: _Run, secure: _SecureCoordinator, emsgs: list[Message], rnd: int,
    arrays: Mapping[str, npt.NDArray[Any]], train_cfg: ConfigRecord,
) -> SetupAhead | None:
    """Put round ``rnd``'s setup into the evaluation messages (which carry the model it trains
    from; ``emsgs`` is changed in place); returns it, or None when the next cohort is not
    exactly the evaluated sites (a site joined, or the strategy evaluates a sample) or the setup
    cannot be built: that round then starts with a setup exchange of its own.

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
        ahead = secure.begin(rnd, nodes, arrays)
    except ProtocolError as exc:
        log.warning("round %d: setup not sent with the evaluation: %s", rnd, exc)
        return None
    run.status(phase="training", round=rnd, run_id=secure.run_id.hex(), stage="advertise")
    node_of = {run.node_sites[n]: n for n in nodes}
    for site, pkt in ahead.outbound.items():
        node = node_of[site]
        # A strategy's evaluation messages share one RecordDict: each gets its own here.
        content = RecordDict(dict(targets[node].content.items()))
        content[SETUP_RECORD] = ConfigRecord({"payload": pkt.payload})
        content[SETUP_CONFIG_RECORD] = train_cfg
        targets[node] = Message(content, dst_node_id=node, message_type=targets[node].metadata.message_type)
        run.metrics.bytes_sent.inc(len(pkt.payload))
    emsgs[:] = [targets[int(m.metadata.dst_node_id)] for m in emsgs]
    return ahead


def _collect_adverts(run: _Run, ahead: SetupAhead, replies: list[Message]) -> None:
    """Take the key adverts (or the refusals) the evaluation replies brought back."""
    wanted = set(ahead.outbound)
    for reply in replies:
        site = run.node_sites.get(int(reply.metadata.src_node_id))
        if site not in wanted or reply.has_error():
            continue
        payload = _reply_payload(reply)
        if isinstance(payload, bytes) and payload:
            ahead.adverts[site] = payload
            continue
        err = reply.content.get(SETUP_ERROR_RECORD)
        reason = err.get("reason") if isinstance(err, ConfigRecord) else None
        ahead.refused[site] = str(reason) if reason else "evaluation reply without a key advert"


def _eval_examples(replies: list[Message]) -> int:
    """The evaluation examples the replies' metrics cover (their ``num-examples``)."""
    total = 0
    for r in replies:
        n = r.content["metrics"].get("num-examples", 0)
        if isinstance(n, int | float) and not isinstance(n, bool) and 0 <= n <= 10**12:
            total += int(n)
    return total


def _summary(round_: int, total: int, rec: dict[str, Any]) -> str:
    acc = rec.get("accuracy")
    parts = [
        f"round {round_}/{total}: {rec['outcome']}",
        f"sites {rec['accepted']}/{rec['sampled']}",
    ]
    if rec.get("rejected"):
        parts.append(f"rejected {rec['rejected']}")
    if acc is not None:
        parts.append(f"accuracy {acc:.4f} macro-F1 {rec['macro_f1']:.4f} loss {rec['loss']:.4f}")
    parts.append(f"{rec['seconds']:.1f}s")
    return ", ".join(parts)


def _reconcile_restart(
    run: _Run,
    secure: _SecureCoordinator | None,
    state: RunState,
    arrays: dict[str, npt.NDArray[Any]],
    previous: dict[str, Any],
    rounds_log: Path,
) -> tuple[RunState, dict[str, npt.NDArray[Any]], int]:
    """Bring checkpoints and the audit log into agreement after a restart; return the first round.

    The audit log is the record of what was committed. A checkpoint the log does not hold (the
    coordinator died between writing it and logging the round) was never published and is
    discarded. The round that was in progress when the coordinator stopped, and any discarded
    one, is *abandoned*: recorded as failed in the log and in ``rounds.jsonl``, nothing of it
    applied, and the run continues with the next round number (sites never see a round
    number twice).

    Raises:
        AuditHaltError: The audit log disagrees with the checkpoints in a way that cannot be
            reconciled (it records a later round than any checkpoint, or another open run).
    """
    last_started = 0
    if previous.get("run_id") == state.run_id and previous.get("phase") == "training":
        last_started = int(previous.get("round", 0))
    # Rounds that ended (committed, failed or abandoned): a failed round has no checkpoint.
    finished = max([state.round] + [int(r.get("round", 0)) for r in read_rounds(rounds_log)])
    if secure is not None and secure.audit is not None:
        audit_log = secure.audit.log

        def halt(reason: str) -> AuditHaltError:
            run.status(phase="failed", reason=reason)
            return AuditHaltError(reason)

        if audit_log.current_run_id is None and state.round == 0:
            secure.audit_call(
                "run start", secure.audit.run_start, state.run_id, run.cfg.path.read_bytes(),
                flat_digest(flat_model(arrays)), run.cfg.run.rounds,
            )
        elif audit_log.current_run_id != bytes.fromhex(state.run_id):
            raise halt(
                f"the audit log's open run is {(audit_log.current_run_id or b'').hex() or 'none'}, "
                f"the checkpoints are of run {state.run_id}: cannot resume"
            )
        if audit_log.last_round < state.round:
            gone = run.checkpoints.discard_after(audit_log.last_round)
            log.warning("checkpoints of rounds %s were never logged as committed: discarded", gone)
            latest = run.checkpoints.latest()
            if latest is None:
                raise halt("no checkpoint is left that the audit log records: cannot resume")
            state, arrays = latest
        if audit_log.current_model_digest not in (None, flat_digest(flat_model(arrays))):
            raise halt(
                f"the audit log's current model (after round {audit_log.last_round}) is not the "
                f"newest checkpoint's (round {state.round}): cannot resume"
            )
        finished = audit_log.last_round  # the log is the record of which rounds ended
    last_abandoned = max(last_started, finished)
    for rnd in range(finished + 1, last_abandoned + 1):
        reason = "abandoned: the coordinator stopped during this round; nothing of it was applied"
        log.warning("round %d %s", rnd, reason)
        if secure is not None and secure.audit is not None:
            secure.audit_call(
                "round result", secure.audit.round_result, rnd, None, flat_digest(flat_model(arrays)),
                failed=reason,
            )
        rec = {"round": rnd, "outcome": "abandoned (coordinator restarted mid-round; model unchanged)",
               "sampled": 0, "accepted": 0, "rejected": 0, "seconds": 0.0}
        _append_round(rounds_log, rec)
        print(f"fedseal: {_summary(rnd, run.cfg.run.rounds, rec)}", flush=True)
    return state, arrays, max(state.round, last_abandoned) + 1


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The round records of ``rounds.jsonl`` (empty if there is none yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_round(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def _write_status(state_dir: Path, *, secure: bool, **fields: Any) -> None:
    """Replace ``status.json`` atomically (the coordinator's CLI polls it)."""
    tmp = state_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"secure": secure, "time": time.time(), **fields}))
    os.replace(tmp, state_dir / STATUS_FILE)


def run_federation(grid: Grid, cfg: ServerConfig, *, resume: bool) -> None:
    """Run (or resume) the configured number of rounds. See the module docstring.

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
    run: _Run | None = None
    try:
        run = _Run(grid, cfg)
        _run_federation(run, grid, cfg, resume=resume)
    except Exception as exc:
        if run is None or not run.failure_recorded:
            reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
            log.exception("run failed: %s", reason)
            _write_status(state_dir, secure=cfg.run.secure, phase="failed", reason=reason)
        raise
    finally:  # runs repeated in one process (simulation, benchmarks) keep their logs apart
        log.removeHandler(handler)
        handler.close()


def _run_federation(run: _Run, grid: Grid, cfg: ServerConfig, *, resume: bool) -> None:
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
    run.status(phase="waiting-for-sites", round=0)
    nodes = run.wait_for_sites(cfg.run.min_sites, cfg.run.sites_wait_timeout_s, want_all=True)
    if len(nodes) < cfg.run.min_sites:
        run.status(phase="failed", reason=f"only {len(nodes)} enrolled sites online")
        raise RuntimeError(
            f"only {len(nodes)} enrolled sites online after {cfg.run.sites_wait_timeout_s}s; "
            f"run.min_sites = {cfg.run.min_sites}"
        )
    latest = run.checkpoints.latest() if resume else None
    if latest is not None:
        state, arrays = latest
        history = list(state.history)
        log.info("resuming run %s after committed round %d", state.run_id, state.round)
        alive = _responsive(run, nodes, cfg.run.sites_wait_timeout_s)
        if len(alive) < cfg.run.min_sites:
            run.status(phase="failed", reason=f"only {len(alive)} sites answered after the restart")
            raise RuntimeError(f"only {len(alive)} sites answered after the restart")
    else:
        run.archive_checkpoints()
        arrays = _initial_model(run, nodes)
        state = RunState(run_id=secrets.token_hex(16), round=0, model_digest=model_digest(arrays).hex())
        history = []
        run.checkpoints.commit(state, arrays)
    run_id = state.run_id
    secure = _SecureCoordinator(run, run_id) if cfg.run.secure else None
    if secure is not None:
        from fedseal.server.audit_hook import RunAudit

        audit_path = run.state_dir / "audit.sqlite"
        try:
            secure.audit = RunAudit.open(audit_path, secure.key, run.roster)
        except Exception as exc:  # a secure run without its audit log does not start
            reason = f"audit log {audit_path} unavailable: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
            log.error("%s", reason)
            run.status(phase="failed", reason=reason)
            raise AuditHaltError(reason) from exc
        if consortium is not None:
            consortium.secure = secure
            consortium.record(again=latest is None)
        if secure.audit is not None and latest is None:
            secure.audit_call(
                "run start", secure.audit.run_start, run_id, cfg.path.read_bytes(),
                flat_digest(flat_model(arrays)), cfg.run.rounds,
            )
    rounds_log = run.state_dir / ROUNDS_FILE
    first_round = state.round + 1
    if latest is not None:
        state, arrays, first_round = _reconcile_restart(run, secure, state, arrays, previous, rounds_log)
    ahead: SetupAhead | None = None  # this round's setup, sent with the last evaluation
    for rnd in range(first_round, cfg.run.rounds + 1):
        t0 = time.monotonic()
        run.status(phase="training", round=rnd, run_id=run_id)
        if consortium is not None:
            consortium.check(f"stopping the run at round {rnd}")
        if ahead is not None:  # built for this round during the last evaluation
            nodes = ahead.nodes
        else:
            nodes = run.wait_for_sites(cfg.run.min_sites, cfg.run.sites_wait_timeout_s)
        rec: dict[str, Any] = {"round": rnd, "sampled": len(nodes), "accepted": 0, "rejected": 0}
        new_arrays = None
        if len(nodes) >= cfg.run.min_sites and secure is not None:
            mean_delta = secure.round(rnd, nodes, arrays, _train_config(cfg, rnd, run_id), rec, ahead)
            ahead = None
            if mean_delta is not None:
                # The strategy sees one reply: the secure weighted mean of the sites' new models.
                mean = unflat_model(flat_model(arrays).astype(np.float64) + mean_delta, arrays)
                view = _FixedNodes(grid, nodes)
                strategy.configure_train(rnd, _numpy_to_record(arrays), ConfigRecord(), view)  # type: ignore[arg-type, unused-ignore]
                synthetic = Message(
                    RecordDict(
                        {
                            "arrays": _numpy_to_record(mean),
                            "metrics": MetricRecord({"num-examples": int(rec.get("total_weight", 1))}),
                        }
                    ),
                    dst_node_id=0,
                    message_type="train",
                )
                agg, _ = strategy.aggregate_train(rnd, [synthetic])
                if agg is not None:
                    new_arrays = {k: a.astype(np.float32) for k, a in _arrays_to_numpy(agg).items()}
        elif len(nodes) >= cfg.run.min_sites:
            view = _FixedNodes(grid, nodes)
            msgs = list(
                strategy.configure_train(
                    rnd, _numpy_to_record(arrays), _train_config(cfg, rnd, run_id), view,  # type: ignore[arg-type, unused-ignore]
                )
            )
            ts = time.monotonic()
            acc: dict[str, npt.NDArray[np.float64]] = {
                k: np.zeros(v.shape, np.float64) for k, v in arrays.items()
            }
            total = 0
            accepted: list[_Accepted] = []
            # Each update is added to the running sum as it arrives (memory: one model).
            for reply in exchange_iter(grid, msgs, cfg.run.stage_timeout_s):
                if reply.has_error():  # e.g. "refused: plain training is disabled at this site"
                    reason = _error_reason(reply)
                    _report_site_error(run, rnd, _site_of(run, reply), reason, rec, "train")
                    run.metrics.rejected.labels(
                        reason="site-refused" if reason.startswith(REFUSED_PREFIX) else "site-error"
                    ).inc()
                    rec["rejected"] += 1
                    continue
                verdict = _validate_reply(run, reply, arrays)
                if isinstance(verdict, str):
                    run.metrics.rejected.labels(reason=verdict).inc()
                    rec["rejected"] += 1
                    log.warning("round %d: rejected reply from node %s: %s", rnd, reply.metadata.src_node_id, verdict)
                    continue
                site, n, upd = verdict
                for k, a in upd.items():
                    acc[k] += n * a.astype(np.float64)
                total += n
                accepted.append(_Accepted(site, n))
                run.metrics.accepted.inc()
                del reply, upd
            rec["train_s"] = time.monotonic() - ts
            run.metrics.stage_seconds.labels(stage="train").observe(rec["train_s"])
            rec["accepted"] = len(accepted)
            rec["sites"] = sorted(a.site for a in accepted)
            if len(accepted) >= cfg.run.min_sites and total > 0:
                mean = {k: (v / total).astype(np.float32) for k, v in acc.items()}
                synthetic = Message(
                    RecordDict(
                        {
                            "arrays": _numpy_to_record(mean),
                            "metrics": MetricRecord({"num-examples": total}),
                        }
                    ),
                    dst_node_id=0,
                    message_type="train",
                )
                agg, _ = strategy.aggregate_train(rnd, [synthetic])
                if agg is not None:
                    new_arrays = {k: a.astype(np.float32) for k, a in _arrays_to_numpy(agg).items()}
            else:
                rec.update(
                    failure=(
                        f"too few valid updates: {len(accepted)} of {len(nodes)} sites sent one, "
                        f"run.min_sites = {cfg.run.min_sites}"
                    ),
                    failure_kind="too-few-valid-updates",
                )
        else:
            rec.update(
                failure=f"too few sites: {len(nodes)} online, run.min_sites = {cfg.run.min_sites}",
                failure_kind="too-few-sites",
            )
        if new_arrays is None and "failure" not in rec:
            rec.update(failure="the strategy returned no model", failure_kind="no-aggregate")
        if new_arrays is not None:
            # Commit order: checkpoint (local, not yet published), then the audit log's round
            # result and checkpoint entries, then evaluation (the first time the new model
            # leaves the coordinator). A restart reconciles a checkpoint the log lacks.
            arrays = new_arrays
            rec["outcome"] = "committed"
            state = RunState(
                run_id=run_id, round=rnd, model_digest=model_digest(arrays).hex(), history=tuple(history)
            )
            path = run.checkpoints.commit(state, arrays)
            rec["checkpoint"] = str(path)
        if secure is not None and secure.audit is not None:
            failed = "" if new_arrays is not None else str(rec.get("failure", "round failed"))
            secure.audit_call(
                "round result", secure.audit.round_result, rnd,
                secure.last_aggregate if new_arrays is not None else None,
                flat_digest(flat_model(arrays)),
                failed=failed,
            )
            if new_arrays is not None:
                model_file = run.checkpoints.model_path(rnd)
                secure.audit_call(
                    "checkpoint", secure.audit.checkpoint, rnd, flat_digest(flat_model(arrays)),
                    hashlib.sha256(model_file.read_bytes()).digest(), model_file.name,
                )
        if new_arrays is None:
            rec["outcome"] = _failed_outcome(rec)
            run.metrics.rounds_failed.inc()
            run.metrics.rounds_abandoned.labels(reason=rec["failure_kind"]).inc()
        else:
            # Federated evaluation of the new global model.
            view = _FixedNodes(grid, nodes)
            emsgs = list(
                strategy.configure_evaluate(
                    rnd, _numpy_to_record(arrays), _train_config(cfg, rnd, run_id), view,  # type: ignore[arg-type, unused-ignore]
                )
            )
            if secure is not None and cfg.run.setup_with_evaluation and rnd < cfg.run.rounds:
                ahead = _setup_with_evaluation(run, secure, emsgs, rnd + 1, arrays, _train_config(cfg, rnd + 1, run_id))
            te = time.monotonic()
            replies = exchange(grid, emsgs, cfg.run.stage_timeout_s)
            if ahead is not None:
                _collect_adverts(run, ahead, replies)
                rec["next_setup_adverts"] = len(ahead.adverts)
            for r in replies:
                if r.has_error():
                    _report_site_error(run, rnd, _site_of(run, r), _error_reason(r), rec, "evaluate")
                    continue
                withheld = r.content.get(EVALUATION_REFUSED_RECORD)
                if isinstance(withheld, ConfigRecord):  # the site returned no metrics, and why
                    why = _one_line(str(withheld.get("reason", ""))) or "evaluation withheld"
                    _report_site_error(run, rnd, _site_of(run, r), why, rec, "evaluate")
            ereplies = [
                r
                for r in replies
                if not r.has_error()
                and isinstance(r.content.get("metrics"), MetricRecord)
                and run.node_sites.get(int(r.metadata.src_node_id)) is not None
            ]
            rec["evaluate_s"] = time.monotonic() - te
            run.metrics.stage_seconds.labels(stage="evaluate").observe(rec["evaluate_s"])
            agg_eval = strategy.aggregate_evaluate(rnd, ereplies) if ereplies else None
            if agg_eval is not None:
                rec["accuracy"] = float(agg_eval.get("accuracy", float("nan")))
                rec["macro_f1"] = float(agg_eval.get("macro-f1", float("nan")))
                rec["loss"] = float(agg_eval.get("loss", float("nan")))
                run.metrics.accuracy.set(rec["accuracy"])
                if secure is not None and secure.audit is not None:
                    # The round's result went into the log before the model left for
                    # evaluation; its aggregated metrics follow as their own signed entry.
                    metrics = {k: v for k, v in agg_eval.items() if k != "num-examples"}
                    evaluated = sorted({run.node_sites[int(r.metadata.src_node_id)] for r in ereplies})
                    secure.audit_call(
                        "evaluation", secure.audit.evaluation, rnd, metrics, _eval_examples(ereplies), evaluated
                    )
            run.metrics.rounds.inc()
            run.metrics.survivors.set(rec["accepted"])
        rec["seconds"] = time.monotonic() - t0
        if rec["outcome"] == "committed":
            history.append({k: float(v) for k, v in rec.items() if isinstance(v, int | float)})
            state = replace(state, history=tuple(history))
            run.checkpoints.update_state(state)
        line = _summary(rnd, cfg.run.rounds, rec)
        log.info("%s", line)
        print(f"fedseal: {line}", flush=True)
        _append_round(rounds_log, rec)
    if secure is not None and secure.audit is not None:
        secure.audit_call("run end", secure.audit.run_end)
    if secure is not None and secure.audit is not None:
        rec_audit: str | None = str(secure.audit.path)
        secure.audit.close()
    else:
        rec_audit = None
    final = run.checkpoints.model_path(state.round)
    run.status(phase="finished", round=state.round, run_id=run_id, model=str(final), audit_log=rec_audit)
    print(f"fedseal: finished; final model {final}", flush=True)
