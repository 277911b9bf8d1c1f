"""The site's Flower ``ClientApp``: answers the coordinator's messages with local work.

Usage (what ``fl-client run`` does; the app is built in-process, never loaded from a FAB)::

    from fedseal.client.flower_app import SiteRuntime, make_client_app
    app = make_client_app(SiteRuntime(name="site-a", data=data, limits=SiteLimits()))

Message types handled:

* ``query.initial_model`` – build the named model with the coordinator's seed, return weights.
  The name is a recipe (:mod:`fedseal.client.recipe`: built-in ``mlp``/``cnn`` or a
  ``module:attribute`` installed at this site) that ``[limits] allowed_models`` lists; any other
  is refused, an unresolvable or failing one is answered with a one-line
  :class:`~fedseal.client.recipe.RecipeError` naming it. Its preprocessing is fitted once on the
  local training part and kept; training and evaluation run its loss, optimizer, step and
  metrics.
* ``train`` – plain training, **refused** unless the site opted in (``[privacy] allow_plain``):
  it would hand the coordinator this site's trained weights in the clear. If allowed: load the
  global weights, train locally (hyper-parameters clamped by
  :class:`~fedseal.client.training.SiteLimits`), return the new weights, the example count and
  the dataset root this site committed to.
* ``train.secagg`` – one stage of a secure round (DESIGN.md §5): the first message carries the
  global model, training config and the signed round setup; every stage's signed payload is
  answered by :class:`fedseal.protocol.ClientSession` (which calls back into local training at
  the masked-input stage); the masked vector travels beside the envelope as an array.
* ``evaluate`` – loss, accuracy, macro-F1 and the recipe's own metrics of the global weights on
  the local validation part, only for a model the coordinator's signed log committed (see below).

Site trust (``[privacy]``, ``[trust]``, ``[peers]`` of ``client.toml``; :mod:`fedseal.client.policy`):
every secure round's session gets the site's own policy and its trust anchor (the peers it
knows independently of the coordinator). Local training draws its randomness from a site
secret mixed with the *signed* run id and round (never from the coordinator's config), and the
site's setup guard lets it train at most once per run and round, rounds only increasing. With
an audit address, the model a round trains from, and every model the site evaluates, must be
one the signed log committed (:class:`fedseal.client.commitments.ModelCommitments`).

Receipts (``[coordinator] audit_address`` set, :class:`fedseal.audit.receipts.SiteReceipts`):
a secure round's setup first retries unfinished checks and is refused once the site is blocked;
the exact payload of the site's signed masked-input envelope is kept; the ``evaluate`` message
of a committed round, sent only after the coordinator signed the tree head over the round
result, triggers the check that this payload is an accepted entry of the signed log.

Differential privacy (docs/dp.md; ``[privacy] dp``, ``epsilon_budget``, ``delta``): a round
setup the site's DP policy refuses (none with ``dp = "required"``, noise below its floor) is
refused with ``"refused: differential privacy: ..."``. A DP round the site takes part in is
paid for in its privacy ledger (:class:`fedseal.client.privacy_ledger.PrivacyLedger`, in its
state directory) before it trains and before its noised input exists (charge, then send: see
:meth:`SiteRuntime.charge_privacy`); a round past the budget is refused with
``"refused: privacy budget: ..."`` and nothing is sent.

Data contract (``fl-client data prepare --contract``; :mod:`fedseal.protocol.contract`): the
``query.policy`` reply names the contract digest the dataset's manifest records, and a signed
round setup naming another contract is refused before the key advert leaves (``"refused: data
contract: ..."``); a setup without a contract is answered as before. A plain ``train`` and an
``evaluate`` carry the run's digest in their config (:data:`~fedseal.protocol.records.RUN_CONTRACT`,
unsigned): one naming another contract than the dataset's, or none when the dataset has one, is
refused the same way (an evaluation by withholding its metrics with that reason; a setup carried
with it is still answered, under the signed check).

The site's console (``fl-client run``'s stderr, where the site's log goes): every refusal and
failure of a message is one line naming the round, what was refused and why, without a
traceback (:meth:`SiteClientApp.describe_failure`, which the pinned executor logs; a withheld
evaluation and a refused carried setup are noticed here, :meth:`SiteRuntime.notice`); and when a
round's result left the site's masked input out, one line says why: the reason of the log's
proven rejected-envelope entry for it (:func:`fedseal.client.commitments.input_rejection`), or
"not in the log" (:meth:`SiteRuntime.report_input`).

Every input is checked before use: config types and ranges, array names and shapes against the
locally built model. A malformed message is answered with a Flower error reply, never a crash.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hmac
import io
import logging
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType
from numpy.lib import format as npy_format
from torch import nn

from fedseal.audit.errors import AuditServiceError
from fedseal.audit.receipts import ReceiptError, SiteReceipts
from fedseal.client.commitments import EntrySource, ModelCommitments, input_rejection
from fedseal.client.distributed import Devices
from fedseal.client.errors import SiteError
from fedseal.client.models import (
    BUILTIN_RECIPES,
    build_model,
    load_numpy_state_dict,
    resolve_recipe,
    state_dict_to_numpy,
)
from fedseal.client.policy import SitePrivacy, SiteRefusal
from fedseal.client.recipe import Recipe, RecipeError, Transform
from fedseal.client.round_state import RoundStore, round_state_key
from fedseal.client.site_data import SiteData
from fedseal.client.site_privacy import honest_sites
from fedseal.client.train_checkpoint import Preemption, TrainingCheckpoint, training_identity
from fedseal.client.training import (
    EvalResult,
    SiteLimits,
    TrainRequest,
    TrainResult,
    evaluate,
    fit_preprocessing,
    train,
)
from fedseal.crypto.keys import write_atomic
from fedseal.protocol import records
from fedseal.protocol.config import DpPolicyError
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.model import model_digest, model_order
from fedseal.protocol.seams import NO_SHARING, SharedWork

if TYPE_CHECKING:  # the ledger imports the accountant (dp-accounting, scipy): only when used
    from fedseal.client.privacy_ledger import PrivacyLedger
    from fedseal.protocol.dp import DpParams

__all__ = [
    "SiteClientApp",
    "SiteRefusal",
    "SiteRuntime",
    "array_to_numpy",
    "make_client_app",
    "model_delta",
    "model_flat",
    "numpy_to_array",
]

log = logging.getLogger("fedseal.client")

#: Rounds whose masked input :meth:`SiteRuntime.report_input` keeps until their evaluation.
_INPUTS_KEPT = 8

_TRAIN_SEED_TAG = b"fedseal/v1/train-seed\x00"


@dataclass
class SiteRuntime:
    """Everything the ClientApp needs, owned by the ``fl-client run`` process.

    ``trusted_peers`` is the site's trust anchor (site -> key id, from its pinned consortium
    roster and ``[peers]``); ``training_secret`` (32 bytes, kept in the site's state directory
    by ``fl-client run``) makes local training unpredictable to the coordinator;
    ``commitments`` (set with an audit address) checks models against the signed log;
    ``ledger`` (``state_dir/privacy-ledger.json``, set by ``fl-client run`` and the simulation)
    pays for the DP rounds the site takes part in (:meth:`charge_privacy`).
    """

    name: str
    data: SiteData
    limits: SiteLimits = field(default_factory=SiteLimits)
    allowed_models: tuple[str, ...] = ("mlp", "cnn")
    identity_key: ec.EllipticCurvePrivateKey | None = None
    coordinator_key: ec.EllipticCurvePublicKey | None = None
    receipts: SiteReceipts | None = None
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    trusted_peers: dict[str, bytes] = field(default_factory=dict)
    training_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    commitments: ModelCommitments | None = None
    #: Where the setup guard (which setups this site answered, per run) is kept between
    #: restarts of the site; ``None`` keeps it in memory only.
    guard_path: Path | None = None
    #: Where the secure sessions check signatures and decode (:mod:`fedseal.protocol.seams`):
    #: each session itself by default; a simulation shares them between its virtual sites.
    shared_work: SharedWork = NO_SHARING
    #: The site's privacy ledger; ``None``: none configured (see :meth:`charge_privacy`).
    ledger: PrivacyLedger | None = None
    #: The digest of the data contract the dataset was prepared under (its manifest's), ``b""``
    #: for none: reported in ``query.policy``; a setup naming another contract is refused.
    contract: bytes = b""
    #: ``[training] devices``: where local training runs (several devices: one DDP rank each,
    #: spawned by this process for the training only; they never see a key or a message).
    devices: Devices = field(default_factory=Devices)
    #: Where a secure round in progress is kept (:mod:`fedseal.client.round_state`) and local
    #: training checkpoints are written (``<dir>/training``), so a restarted site continues
    #: its round; ``None`` (the simulation, tests): in memory only.
    round_dir: Path | None = None
    #: The site's stop request (SIGTERM): training saves its checkpoint and pauses.
    preemption: Preemption | None = None
    #: ``[training] checkpoint_every_steps``.
    checkpoint_every_steps: int = 50
    _models: dict[tuple[str, int], nn.Module] = field(default_factory=dict)
    _recipes: dict[str, tuple[Recipe, Transform | None]] = field(default_factory=dict)
    _session: Any = None
    _restore_tried: bool = False
    _round: tuple[bytes, int] = (b"", 0)
    _guard: Any = None
    _guard_saved: bytes = b""
    #: (run id, round) -> the masked-input payload this site signed, and whether it then
    #: signed a survivor set naming itself (its input in the aggregate): for report_input.
    _inputs: dict[tuple[bytes, int], tuple[bytes, bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ledger is not None and (self.privacy.dp == "required" or self.privacy.epsilon_budget is not None):
            from fedseal.privacy import preload

            preload()  # a site that accounts DP rounds loads the accountant at start, not in round 1

    def guard(self) -> Any:
        """The site's one :class:`fedseal.protocol.SetupGuard` (loaded from ``guard_path``).

        Every session of this site shares it, so a coordinator cannot reset the limit on
        setup attempts, or re-run a round after key sharing, by sending a new setup.

        Raises:
            ValueError: The stored guard is unreadable (the site refuses rather than forget).
        """
        from fedseal.protocol import ProtocolError, SetupGuard

        if self._guard is None:
            policy = self.privacy.protocol_policy()
            raw = self.guard_path.read_bytes() if self.guard_path is not None and self.guard_path.exists() else b""
            try:
                self._guard = SetupGuard.from_bytes(raw, policy) if raw else SetupGuard(policy)
            except ProtocolError as exc:
                raise ValueError(f"setup guard {self.guard_path} is unreadable: {exc}") from exc
            self._guard_saved = raw
        return self._guard

    def save_guard(self) -> None:
        """Persist the guard if it changed (atomically)."""
        if self._guard is None or self.guard_path is None:
            return
        raw = self._guard.to_bytes()
        if raw != self._guard_saved:
            # 0600: it holds the graph nonces the site committed to, secret until revealed.
            write_atomic(self.guard_path, raw, 0o600)
            self._guard_saved = raw

    def train_request(self, rec: ConfigRecord) -> TrainRequest:
        """The coordinator's hyper-parameters, clamped by the site's limits, with at least two
        minibatches per epoch: with one, training would not depend on the site's secret seed
        (the order and split of the batches), and one model trained twice would give the same
        update twice, which a coordinator could difference across cohorts."""
        req = self.limits.clamp(train_request(rec))
        rows = len(self.data.y_train)
        return dataclasses.replace(req, batch_size=max(1, min(req.batch_size, rows // 2)))

    def training_seed(self, run_id: bytes, round_: int) -> int:
        """The seed of local training in ``round_`` of ``run_id``: HMAC-SHA256 of the signed
        run and round under the site's secret, so the coordinator can neither predict it nor
        make two trainings on one model identical (and difference them)."""
        mac = hmac.new(
            self.training_secret, _TRAIN_SEED_TAG + bytes(run_id) + round_.to_bytes(4, "big"), "sha256"
        )
        return int.from_bytes(mac.digest()[:8], "big") & ((1 << 63) - 1)

    def charge_privacy(self, run_id: bytes, round_: int, dp: DpParams, *, honest_sites: int) -> None:
        """Pay for DP round ``round_`` of ``run_id`` before its noised input exists
        (:func:`fedseal.client.site_privacy.charge_round`: the rule and the refusals)."""
        from fedseal.client.site_privacy import charge_round

        charge_round(self, run_id, round_, dp, honest_sites=honest_sites)

    def check_privacy(self, run_id: bytes, round_: int, dp: DpParams, *, honest_sites: int) -> None:
        """Refuse at the setup a DP round the charge would refuse
        (:func:`fedseal.client.site_privacy.check_round`)."""
        from fedseal.client.site_privacy import check_round

        check_round(self, run_id, round_, dp, honest_sites=honest_sites)

    def check_model(self, run_id: bytes, digest: bytes, what: str) -> None:
        """Refuse a model the coordinator's signed log did not commit (with an audit address).

        Raises:
            SiteRefusal: Not committed, or older than a model already verified for the run.
        """
        if self.commitments is None:
            return
        from fedseal.audit.errors import AuditServiceError
        from fedseal.audit.receipts import ReceiptError
        from fedseal.client.commitments import ModelNotCommittedError

        try:
            committed = self.commitments.check(run_id, digest)
        except (ModelNotCommittedError, ReceiptError, AuditServiceError) as exc:
            raise SiteRefusal(f"{what}: {exc}") from exc
        log.info("%s: model %s… committed by %s", what, digest.hex()[:16],
                 "the run start" if committed == 0 else f"round {committed}")

    def notice(self, line: str) -> None:
        """One line for the site's console (``fl-client run`` logs to its stderr): a round or
        an evaluation refused, a masked input not used. Text from the coordinator in ``line``
        is made one printable line."""
        log.warning("%s", one_line(line))

    def sent_input(self, run_id: bytes, round_: int, payload: bytes) -> None:
        """This site signed ``payload`` as its masked input of ``round_`` (see
        :meth:`report_input`); the last few rounds are kept."""
        self._inputs[(run_id, round_)] = (payload, False)
        for key in list(self._inputs)[:-_INPUTS_KEPT]:
            del self._inputs[key]

    def input_included(self, run_id: bytes, round_: int) -> None:
        """This site signed a survivor set naming itself: its input is in the aggregate."""
        sent = self._inputs.get((run_id, round_))
        if sent is not None:
            self._inputs[(run_id, round_)] = (sent[0], True)

    def report_input(self, run_id: bytes, round_: int) -> None:
        """After the receipt check of ``round_`` (its result and signed tree head are out):
        if this site sent a masked input the round left out (it signed no survivor set naming
        itself, and the log holds no accepted input of it), say so on the console, once, with
        the reason of the log's proven rejected-envelope entry for that input, or "not in the
        log". Never raises (a lookup that fails is named in the line)."""
        sent = self._inputs.pop((run_id, round_), None)
        if sent is None or sent[1] or self.receipts is None:
            return
        payload, source = sent[0], self.receipts.source
        head = f"round {round_}: this site's masked input was not accepted"
        try:
            if source.find_input(round_, run_id) is not None:
                return  # accepted after all: the receipt check proves it
            found = None
            if isinstance(source, EntrySource):
                found = input_rejection(
                    self.receipts.checker, source, site=self.name, run_id=run_id, round=round_,
                    payload=payload,
                )  # fmt: skip
        except (AuditServiceError, ReceiptError) as exc:
            self.notice(f"{head}; why could not be read from the audit log: {exc}")
            return
        if found is None:
            self.notice(
                f"{head}: not in the log (neither accepted nor rejected: dropped, or the round "
                "was abandoned before it)"
            )
        else:
            self.notice(
                f"{head}: the coordinator rejected it: {found.reason} (audit log entry "
                f"{found.index})"
            )

    def recipe(self, name: str) -> tuple[Recipe, Transform | None]:
        """The recipe ``name`` names (:mod:`fedseal.client.recipe`), and its preprocessing
        fitted on this site's training part (once per recipe, then kept).

        Raises:
            SiteRefusal: ``name`` is not in ``[limits] allowed_models``.
            RecipeError: It cannot be resolved here, or its preprocessing fails (one line
                naming the recipe; the cause is chained for the site's log).
        """
        if name not in self.allowed_models:
            raise SiteRefusal(
                f"model {name!r} is not in this site's [limits] allowed_models "
                f"({', '.join(self.allowed_models) or 'none'})"
            )
        found = self._recipes.get(name)
        if found is None:
            recipe = resolve_recipe(name)
            with recipe_failures(name, "preprocessing (fit on the training part)"):
                transform = fit_preprocessing(recipe, self.data.x_train)
            found = self._recipes[name] = (recipe, transform)
            if recipe.preprocess is not None:
                log.info("recipe %r: preprocessing fitted on %d training rows", name, len(self.data.x_train))
        return found

    def model(self, name: str, seed: int) -> nn.Module:
        """The model of recipe ``name`` with the initial weights of ``seed`` (built once).

        Raises:
            SiteRefusal: ``name`` is not allowed at this site.
            RecipeError: See :meth:`recipe`; or the model factory fails here.
        """
        recipe, _ = self.recipe(name)
        key = (name, seed)
        if key not in self._models:
            self._models[key] = build_model(
                name, seed=seed, num_features=self.data.num_features, num_classes=self.data.num_classes,
                recipe=recipe,
            )
        return self._models[key]

    def train(
        self, name: str, model: nn.Module, req: TrainRequest, seed: int, *, identity: str | None = None
    ) -> TrainResult:
        """Train ``model`` on this site's training part with recipe ``name``; ``identity``
        (:func:`~fedseal.client.train_checkpoint.training_identity`) names the training's
        checkpoint (``round_dir/training/<identity>``: resumed if there, written as it goes).

        Raises:
            RecipeError: A part of a site-installed recipe failed (the message names it).
            SiteError: The data failed (e.g. a shard changed mid-stream).
            Preempted: The site is being stopped (the checkpoint is saved; send nothing).
        """
        checkpoint = None
        if identity is not None and self.round_dir is not None:
            checkpoint = TrainingCheckpoint(
                self.round_dir.parent / "training" / identity, self.checkpoint_every_steps, self.preemption
            )
        with recipe_failures(name, "training"):
            return train(
                model, self.data.x_train, self.data.y_train, req, seed=seed, devices=self.devices,
                checkpoint=checkpoint, **self._loop(name),
            )  # fmt: skip

    def round_store(self) -> RoundStore | None:
        """The stored secure round (:mod:`fedseal.client.round_state`), ``None`` without a
        ``round_dir``."""
        if self.round_dir is None:
            return None
        return RoundStore(self.round_dir, round_state_key(self.training_secret))

    def clear_training(self) -> None:
        """Remove the local training checkpoints (a round's answer is saved or sent)."""
        if self.round_dir is not None:
            shutil.rmtree(self.round_dir.parent / "training", ignore_errors=True)

    def evaluate(self, name: str, model: nn.Module) -> EvalResult:
        """Evaluate ``model`` on this site's validation part with recipe ``name``.

        Raises:
            RecipeError: A part of a site-installed recipe failed (the message names it).
            SiteError: The data failed.
        """
        with recipe_failures(name, "evaluation"):
            return evaluate(
                model, self.data.x_val, self.data.y_val, num_classes=self.data.num_classes, **self._loop(name)
            )

    def _loop(self, name: str) -> dict[str, Any]:
        """The training loop's recipe arguments: none for a recipe that is only a model (the
        built-ins), which then trains exactly as fedseal's default loop."""
        recipe, transform = self.recipe(name)
        if _model_only(recipe):
            return {}
        return {"recipe": recipe, "transform": transform}


def check_contract(dataset: bytes, signed: bytes) -> None:
    """Refuse a signed setup whose data contract is not the one this site's dataset was
    prepared under (``b""``: none). A setup without a contract is accepted as before.

    Raises:
        SiteRefusal: One line naming both digests.
    """
    if not signed or hmac.compare_digest(signed, dataset):
        return
    have = f"contract {dataset.hex()}" if dataset else "no contract"
    raise SiteRefusal(
        f"data contract: the round setup names contract {signed.hex()}, this site's dataset "
        f"was prepared under {have}"
    )


def config_contract(rec: ConfigRecord) -> bytes:
    """The data contract digest a message's config names
    (:data:`~fedseal.protocol.records.RUN_CONTRACT`), ``b""`` for none.

    Raises:
        ValueError: It is not 64 hex characters.
    """
    raw = rec.get(records.RUN_CONTRACT)
    if raw is None:
        return b""
    try:
        digest = bytes.fromhex(raw) if isinstance(raw, str) and len(raw) == 64 else b""
    except ValueError:
        digest = b""
    if not digest:
        raise ValueError(f"config {records.RUN_CONTRACT!r} must be 64 hex characters")
    return digest


def contract_refusal(dataset: bytes, named: bytes, what: str) -> str | None:
    """Why a message (``what``, e.g. "the plain training message") naming the data contract
    ``named`` (``b""``: none) is refused by a site whose dataset was prepared under
    ``dataset`` (``b""``: none), or ``None``: it names the dataset's contract, or none (as a
    signed setup, :func:`check_contract`: a run without ``[run] contract`` declares nothing to
    check against).
    """
    if not named or hmac.compare_digest(named, dataset):
        return None
    said = f"contract {named.hex()}" if named else "no contract"
    have = f"contract {dataset.hex()}" if dataset else "no contract"
    return f"data contract: {what} names {said}, this site's dataset was prepared under {have}"


def evaluation_refusal(runtime: SiteRuntime, rec: ConfigRecord) -> str | None:
    """Why the site withholds its metrics of an ``evaluate`` (the reply's reason, ``"refused:
    ..."``), or ``None``: the message names another data contract than the dataset's, or the
    site cannot tie the model to the coordinator's signed log.

    Raises:
        ValueError: The config's contract digest is malformed.
    """
    mismatch = contract_refusal(runtime.contract, config_contract(rec), "the evaluation message")
    if mismatch is not None:
        return f"{records.REFUSED_PREFIX} {mismatch}"
    privacy = runtime.privacy
    if runtime.commitments is None and not (privacy.evaluate_unverified or privacy.allow_plain):
        return (
            "refused: evaluation: this site cannot tie the model to the coordinator's signed "
            "log (no [coordinator] audit_address; [privacy] evaluate_unverified = false)"
        )
    return None


def one_line(text: str, limit: int = 500) -> str:
    """``text`` as one printable line of at most ``limit`` characters (control characters, such
    as a coordinator's escape codes or newlines, become spaces)."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(printable.split())[:limit]


class SiteClientApp(ClientApp):
    """The site's ClientApp (:func:`make_client_app`): it also says why it refused or failed a
    message, in one line for the site's console (the pinned executor logs it)."""

    def __init__(self, runtime: SiteRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def describe_failure(self, message: Message, exc: Exception) -> str | None:
        """``"round N: refused WHAT: WHY"`` (or ``"... WHAT failed: WHY"``) for a refusal
        (:class:`SiteRefusal`, a :class:`~fedseal.protocol.errors.ProtocolError` of the secure
        session, a blocked receipt check) or a site failure (:class:`SiteError`: a recipe, the
        data); ``None`` for anything else (a fault: the executor logs its traceback)."""
        if isinstance(exc, SiteRefusal):
            verb, why = "refused", str(exc).removeprefix(records.REFUSED_PREFIX).strip()
        elif isinstance(exc, ProtocolError | ReceiptError):
            verb, why = "refused", f"{type(exc).__name__}: {exc}"
        elif isinstance(exc, SiteError):
            verb, why = "failed", f"{type(exc).__name__}: {exc}"
        else:
            return None
        when, what = _when(self.runtime, message), _what(message)
        if verb == "refused":
            return one_line(f"{when}: refused {what}: {why}")
        return one_line(f"{when}: {what} failed: {why}")


def _reason(exc: Exception) -> str:
    """A failure as a reply's reason: a refusal as it is (``refused: ...``), else
    ``"Type: message"``."""
    return str(exc) if isinstance(exc, SiteRefusal) else f"{type(exc).__name__}: {exc}"


def _when(runtime: SiteRuntime, msg: Message) -> str:
    """Which round a message belongs to, as the coordinator's config says (a secure stage
    without one: the round of the setup this site answered)."""
    rec = msg.content.get(records.CONFIG_RECORD) if msg.has_content() else None
    value = rec.get(records.ROUND) if isinstance(rec, ConfigRecord) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**9:
        return f"round {value}"
    kind = msg.metadata.message_type
    if kind.startswith("query"):
        return "run start"
    if kind == records.message_type("train", records.SECURE_STAGE) and runtime._round[0]:
        return f"round {runtime._round[1]}"
    return "a round"


def _what(msg: Message) -> str:
    kind = msg.metadata.message_type
    if kind == "train":
        return "plain training"
    if kind == records.message_type("train", records.SECURE_STAGE):
        from fedseal.protocol import Limits
        from fedseal.protocol.envelope import Envelope

        try:  # the stage, as the coordinator's envelope names it (a hint for the line only)
            stage = Envelope.from_bytes(_secagg_payload(msg), Limits()).kind
        except (ValueError, ProtocolError):
            return "a secure-round message"
        return "the " + stage.name.lower().replace("_", " ")
    if kind == "evaluate":
        return "the evaluation"
    if kind == records.message_type("query", records.INITIAL_MODEL):
        return "the initial model"
    return kind


def _model_only(recipe: Recipe) -> bool:
    return (recipe.preprocess, recipe.loss, recipe.optimizer, recipe.step) == (None,) * 4 and not recipe.metrics


@contextlib.contextmanager
def recipe_failures(name: str, stage: str) -> Iterator[None]:
    """Turn a failure inside a site-installed recipe's code during ``stage`` into one
    :class:`RecipeError` line naming the recipe (the cause stays chained for the site's log).
    fedseal's own errors (:class:`SiteError`: data, policy) and the built-in recipes' failures
    pass unchanged."""
    try:
        yield
    except SiteError:
        raise
    except Exception as exc:
        if name in BUILTIN_RECIPES:
            raise
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise RecipeError(name, f"failed in {stage}: {reason}") from exc


def _secagg_payload(msg: Message) -> bytes:
    sec = msg.content.get(records.SETUP_RECORD)
    payload = sec.get(records.PAYLOAD) if isinstance(sec, ConfigRecord) else None
    if not isinstance(payload, bytes):
        raise ValueError("secagg message without payload")
    return payload


def _cfg(msg: Message) -> ConfigRecord:
    rec = msg.content.get(records.CONFIG_RECORD)
    if not isinstance(rec, ConfigRecord):
        raise ValueError("message has no config record")
    return rec


def _get(rec: ConfigRecord, key: str, kind: type, lo: float, hi: float) -> Any:
    value: Any = rec.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"config {key!r} missing or of the wrong type")
    number: Any = value  # an int or float here
    if not lo <= float(number) <= hi:
        raise ValueError(f"config {key!r} out of range")
    return value


def train_request(rec: ConfigRecord) -> TrainRequest:
    """The coordinator's training hyper-parameters (before the site's limits clamp them).
    ``proximal-mu`` (FedProx) is optional; absent means plain local SGD."""
    mu = _get(rec, records.PROXIMAL_MU, float, 0.0, 1e6) if records.PROXIMAL_MU in rec else 0.0
    return TrainRequest(
        epochs=_get(rec, records.EPOCHS, int, 1, 10_000),
        batch_size=_get(rec, records.BATCH_SIZE, int, 1, 1 << 20),
        learning_rate=_get(rec, records.LEARNING_RATE, float, 1e-12, 1e6),
        clip_norm=_get(rec, records.CLIP_NORM, float, 1e-12, 1e12),
        proximal_mu=mu,
    )


def _run_id(rec: ConfigRecord) -> bytes:
    raw = rec.get(records.RUN_ID)
    try:
        run_id = bytes.fromhex(raw) if isinstance(raw, str) else b""
    except ValueError:
        run_id = b""
    if len(run_id) != 16:
        raise ValueError("config 'run-id' must be 32 hex characters")
    return run_id


def _model_name(rec: ConfigRecord) -> str:
    name = rec.get(records.MODEL)
    if not isinstance(name, str) or len(name) > 200:
        raise ValueError("config 'model' missing")
    return name


@dataclass(frozen=True)
class _NewRound:
    """A round setup's fresh session, before the site adopts it (``adopt``: it accepted)."""

    session: Any
    round_key: tuple[bytes, int]
    adopt: Callable[[], None]


def _secagg_content(payload: bytes, bulk: npt.NDArray[Any] | None) -> RecordDict:
    """A secure stage's answer as reply content: the signed payload, and the masked vector
    beside it."""
    content = RecordDict({records.SETUP_RECORD: ConfigRecord({records.PAYLOAD: payload})})
    if bulk is not None:
        content[records.BULK_RECORD] = ArrayRecord({records.BULK_MASKED: numpy_to_array(bulk)})
    return content


def _load_global(runtime: SiteRuntime, msg: Message, rec: ConfigRecord) -> nn.Module:
    model = runtime.model(_model_name(rec), _get(rec, records.SEED, int, 0, 2**31 - 1))
    arrays = msg.content.get(records.ARRAYS_RECORD)
    if not isinstance(arrays, ArrayRecord):
        raise ValueError("message has no arrays record")
    load_numpy_state_dict(model, {k: array_to_numpy(v) for k, v in arrays.items()})
    return model


def array_to_numpy(array: Array) -> npt.NDArray[Any]:
    """``array.numpy()`` without copying the buffer: a read-only view of ``array.data``.

    Flower's ``Array.numpy()`` runs ``np.load`` over a copy of the ``.npy`` bytes; the site
    only reads the weights (they are copied into the model), so a view of the message's own
    buffer is enough. Anything but a plain numeric ``.npy`` buffer goes through
    ``Array.numpy()`` (which refuses pickled objects).

    Raises:
        ValueError: The buffer is not a well-formed ``.npy`` array of the shape it declares.
    """
    if array.stype != SType.NUMPY or not isinstance(array.data, bytes):
        return array.numpy()
    buf = io.BytesIO(array.data)
    try:
        version = npy_format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buf)
        else:
            return array.numpy()
    except ValueError as exc:
        raise ValueError(f"array is not a readable .npy buffer: {exc}") from exc
    if dtype.hasobject:
        return array.numpy()  # refused there: never unpickle
    count = int(np.prod(shape, dtype=np.int64))
    if len(array.data) - buf.tell() != count * dtype.itemsize:
        raise ValueError(f"array buffer holds {len(array.data) - buf.tell()} bytes, its header declares {count} x {dtype}")
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=buf.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def numpy_to_array(ndarray: npt.NDArray[Any]) -> Array:
    """``Array(ndarray)`` with one copy of the buffer instead of two: the same ``.npy`` bytes
    ``np.save`` writes (a version 1.0 header, then the C-ordered data)."""
    arr = np.ascontiguousarray(ndarray)
    if arr.dtype.hasobject:
        return Array(arr)  # Flower refuses it (allow_pickle=False)
    header = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(arr))
    except ValueError:  # a header too long for version 1.0 (np.save would write 2.0)
        return Array(arr)
    data = b"".join((header.getbuffer(), arr.data.cast("B") if arr.size else b""))
    return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype=SType.NUMPY, data=data)


def model_flat(model: nn.Module) -> npt.NDArray[np.float32]:
    """The model's state dict as one float32 vector, tensors in the model vector's order
    (:func:`fedseal.protocol.model.flatten`, as the coordinator flattens the global model);
    one copy of the weights."""
    state = model.state_dict()
    parts = [state[k].detach().to("cpu", torch.float32).reshape(-1) for k in model_order(state)]
    if not parts:
        return np.zeros(0, np.float32)
    flat: npt.NDArray[np.float32] = torch.cat(parts).numpy()
    return flat


def model_delta(model: nn.Module, base: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """``model_flat(model) - base`` in float64 (each float32 weight widened before the
    subtraction), written tensor by tensor into one float64 vector.

    Raises:
        ValueError: The model's state has another number of values than ``base``.
    """
    state = model.state_dict()
    out = np.empty(base.shape[0], np.float64)
    offset = 0
    for k in model_order(state):
        values = state[k].detach().to("cpu", torch.float32).reshape(-1).numpy()
        end = offset + values.shape[0]
        if end > base.shape[0]:
            raise ValueError("the trained model has more values than the global model")
        np.subtract(values, base[offset:end], out=out[offset:end], dtype=np.float64)
        offset = end
    if offset != base.shape[0]:
        raise ValueError("the trained model has fewer values than the global model")
    return out


def make_client_app(runtime: SiteRuntime) -> SiteClientApp:
    """Build the site's ClientApp bound to ``runtime`` (data, limits, cached models)."""
    app = SiteClientApp(runtime)

    @app.query(records.INITIAL_MODEL)
    def initial_model(msg: Message, context: Context) -> Message:
        rec = _cfg(msg)
        model = runtime.model(_model_name(rec), _get(rec, records.SEED, int, 0, 2**31 - 1))
        arrays = {k: numpy_to_array(v) for k, v in state_dict_to_numpy(model).items()}
        return Message(RecordDict({records.ARRAYS_RECORD: ArrayRecord(arrays)}), reply_to=msg)

    @app.query(records.PING)
    def ping(msg: Message, context: Context) -> Message:
        site = ConfigRecord({records.SITE: runtime.name})
        return Message(RecordDict({records.SITE_RECORD: site}), reply_to=msg)

    @app.query(records.POLICY)
    def policy(msg: Message, context: Context) -> Message:
        """The site's floor, so a coordinator can refuse a run no site would join (the site
        still checks every round itself)."""
        p = runtime.privacy
        floor = ConfigRecord({
            records.SITE: runtime.name, records.MIN_COHORT: p.min_cohort,
            records.ALLOW_PLAIN: int(p.allow_plain), records.DP_REQUIRED: int(p.dp == "required"),
            records.CONTRACT: runtime.contract.hex(),
        })  # fmt: skip
        return Message(RecordDict({records.POLICY_RECORD: floor}), reply_to=msg)

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        # Refusals are one line on the site's console too (SiteClientApp.describe_failure).
        if not runtime.privacy.allow_plain:
            raise SiteRefusal(
                "plain training is disabled at this site ([privacy] allow_plain = false): "
                "it would send this site's trained weights in the clear"
            )
        rec = _cfg(msg)
        # Before the model is loaded: another contract's model may not even fit this data.
        mismatch = contract_refusal(
            runtime.contract, config_contract(rec), "the plain training message"
        )
        if mismatch is not None:
            raise SiteRefusal(mismatch)
        model = _load_global(runtime, msg, rec)
        req = runtime.train_request(rec)
        round_ = _get(rec, records.ROUND, int, 0, 10**9)
        seed = runtime.training_seed(_run_id(rec), round_)
        result = runtime.train(_model_name(rec), model, req, seed)
        weights = state_dict_to_numpy(model)
        log.info(
            "round %d: trained on %d examples (%d epochs, batch %d, lr %g), loss %.4f",
            round_, result.num_examples, req.epochs, req.batch_size, req.learning_rate, result.mean_loss,
        )
        content = RecordDict(
            {
                records.ARRAYS_RECORD: ArrayRecord({k: numpy_to_array(v) for k, v in weights.items()}),
                records.METRICS_RECORD: MetricRecord(
                    {records.NUM_EXAMPLES: result.num_examples, records.TRAIN_LOSS: result.mean_loss}
                ),
                records.SITE_RECORD: ConfigRecord(
                    {records.DATASET_ROOT: runtime.data.root_hex, records.SITE: runtime.name}
                ),
            }
        )
        return Message(content, reply_to=msg)

    def start_session(msg: Message, rec: ConfigRecord) -> _NewRound:
        """A round setup: a fresh client session that trains from the model in ``msg``, not
        yet the site's (:func:`answer` adopts it once it accepted the setup: a refused or
        repeated setup changes nothing of the round in progress)."""
        if runtime.identity_key is None or runtime.coordinator_key is None:
            raise ValueError("this site has no identity key / pinned coordinator key")
        # The session trains its own copy: a later message (an evaluation, even a refused one)
        # loads its weights into the shared cached model, and must not change the model this
        # round trains from, i.e. the one the signed setup names and the audit log committed.
        model = copy.deepcopy(_load_global(runtime, msg, rec))
        model_name = _model_name(rec)
        global_flat = model_flat(model)
        req = runtime.train_request(rec)
        round_ = _get(rec, records.ROUND, int, 0, 10**9)
        run_id = _run_id(rec)
        if runtime.receipts is not None:
            runtime.receipts.before_round()  # raises (an error reply) once blocked
        # Before any key is advertised: the model must be the one the signed log committed.
        runtime.check_model(run_id, model_digest(global_flat), f"round {round_} setup")
        session = new_session(model, model_name, req, run_id, round_, global_flat)

        def adopt() -> None:
            runtime._session, runtime._round = session, (run_id, round_)
            store = runtime.round_store()
            if store is not None:  # kept until the round ends: a restarted site continues it
                runtime.clear_training()
                store.begin(
                    run_id, round_, model_name=model_name, model_seed=_get(rec, records.SEED, int, 0, 2**31 - 1),
                    request=req, global_digest=model_digest(global_flat), arrays=state_dict_to_numpy(model),
                )  # fmt: skip

        return _NewRound(session, (run_id, round_), adopt)

    def restore_session() -> Any:
        """The stored round's session, continued by a restarted site (``None``: none). Once per
        process, at its first secure message: a session that failed, or was replaced, in this
        process is never brought back from the disk."""
        if runtime._restore_tried:
            return None
        runtime._restore_tried = True
        store = runtime.round_store()
        stored = store.load() if store is not None else None
        if stored is None:
            runtime.clear_training()  # a checkpoint without its round is of no use: not kept
            return None
        if runtime.identity_key is None or runtime.coordinator_key is None:
            return None
        model = copy.deepcopy(runtime.model(stored.model_name, stored.model_seed))
        load_numpy_state_dict(model, stored.arrays)
        global_flat = model_flat(model)
        if model_digest(global_flat) != stored.global_digest:
            raise ValueError("the stored round's model does not match its digest")
        runtime._round = (stored.run_id, stored.round)
        session = new_session(
            model, stored.model_name, runtime.limits.clamp(stored.request), stored.run_id, stored.round,
            global_flat, blob=stored.session,
        )  # fmt: skip
        log.info("round %d: continuing the round this site was in when it stopped", stored.round)
        return session

    def new_session(
        model: nn.Module, model_name: str, req: TrainRequest, run_id: bytes, round_: int,
        global_flat: npt.NDArray[np.float32], *, blob: bytes | None = None,
    ) -> Any:  # fmt: skip
        """A client session training ``model``; ``blob``: restored from a stored round."""
        from fedseal.protocol import ClientSession, LocalUpdate, RoundInfo

        def update_fn(info: RoundInfo) -> LocalUpdate:
            if info.model_digest != model_digest(global_flat):
                raise ValueError("the round setup names another global model than the one received")
            if (info.run_id, info.round) != (run_id, round_):
                raise ValueError("the signed round setup names another run or round than its config")
            clip = info.quantization.clip
            if clip > runtime.privacy.max_update_clip:
                raise SiteRefusal(
                    f"the round's update clip {clip:g} is above this site's "
                    f"[limits] max_update_clip {runtime.privacy.max_update_clip:g}"
                )
            if info.dp is not None:
                # Charge, then send: paid for before training and before the session adds the
                # noise; a refusal here leaves the ledger as it was and sends nothing.
                setup = session.setup
                honest = (
                    info.dp.honest_survivors if setup is None else honest_sites(runtime.privacy, setup)
                )
                runtime.charge_privacy(info.run_id, info.round, info.dp, honest_sites=honest)
            # Randomness from the site's secret and the *signed* run and round: the guard lets
            # the site train once per (run, round), and no two trainings are alike.
            seed = runtime.training_seed(info.run_id, info.round)
            identity = training_identity(
                info.run_id, info.round, info.model_digest, model_name, repr(req), seed, runtime.data.root_hex
            )  # the dataset too: a site that re-prepared its data never resumes the old one's
            result = runtime.train(model_name, model, req, seed, identity=identity)
            delta = model_delta(model, global_flat)
            log.info("round %d: trained on %d examples, loss %.4f (secure)", round_, result.num_examples, result.mean_loss)
            return LocalUpdate(
                vector=delta,
                # A DP round is unweighted and its count never leaves the site (docs/dp.md §2,
                # §6): 1, not a count the round's max_weight was not sized for.
                example_count=1 if info.dp is not None else result.num_examples,
                dataset_root=bytes.fromhex(runtime.data.root_hex),
            )

        key, coordinator = runtime.identity_key, runtime.coordinator_key
        if key is None or coordinator is None:
            raise ValueError("this site has no identity key / pinned coordinator key")
        guard = runtime.guard()
        options: dict[str, Any] = dict(
            update_fn=update_fn,
            rng=np.random.default_rng(secrets.randbits(128)),
            trusted_peers=runtime.trusted_peers,
            limits=runtime.privacy.limits(),
            # The model and commitments were checked for the config's run and round: a signed
            # setup for another is refused before the guard records anything.
            expected_run=run_id,
            expected_round=round_,
            policy=guard.policy,
            guard=guard,
            shared=runtime.shared_work,
        )
        if blob is None:
            session = ClientSession(runtime.name, key, coordinator, **options)
        else:
            session = ClientSession.restore(
                blob, round_state_key(runtime.training_secret), runtime.name, key, coordinator, **options
            )
        return session

    def saved_answer(payload: bytes) -> RecordDict | None:
        """The answer saved for ``payload`` (this message answered before, maybe before the site
        stopped, maybe never delivered): the same bytes again, or ``None``."""
        store = runtime.round_store()
        saved = store.reply_for(payload) if store is not None else None
        if saved is None:
            return None
        log.info("answering a message again with the answer saved when it was first answered")
        return _secagg_content(*saved)

    def answer(payload: bytes, new: _NewRound | None = None) -> RecordDict:
        """The client session's answer to one stage's message, as reply content. ``new``: a
        round setup's fresh session, adopted only if it accepts the setup."""
        from fedseal.protocol import ClientStage, DuplicateMessageError, StaleMessageError

        if new is not None:
            session, expected = new.session, new.round_key
        else:
            if runtime._session is None:
                runtime._session = restore_session()  # a restarted site, given its message again
            session, expected = runtime._session, runtime._round
        if session is None:
            raise ValueError("secagg stage without a round setup")
        store = runtime.round_store()
        try:
            reply = session.handle(payload)
        except (DuplicateMessageError, StaleMessageError):  # answered before (the session moved on)?
            saved = saved_answer(payload)
            if saved is None:
                raise
            return saved
        except DpPolicyError as exc:  # the site's own DP policy: a refusal, not a fault
            required = ' ([privacy] dp = "required")' if exc.parameter == "dp" else ""
            raise SiteRefusal(f"differential privacy: {exc.message}{required}") from exc
        except ProtocolError:
            if new is None and store is not None:  # a failed session is not kept to be restored
                store.clear()
                runtime.clear_training()
            raise
        finally:
            runtime.save_guard()

        def refuse(why: str) -> NoReturn:
            if new is None:  # the round in progress: nothing more of it is answered
                runtime._session = None
                if store is not None:
                    store.clear()
            raise SiteRefusal(why)

        setup = session.setup
        if setup is not None and (setup.header.run_id, setup.header.round) != expected:
            # Checked before the key advert leaves: the signed setup must name the run and
            # round of the config the model and commitments were checked for.
            refuse("the signed round setup names another run or round than its config")
        accepted = session.stage is ClientStage.AWAIT_ADVERTS  # a setup, just now
        if setup is not None and accepted:
            try:
                check_contract(runtime.contract, setup.params.contract_digest)
            except SiteRefusal as exc:  # refused before the key advert leaves
                refuse(str(exc).removeprefix(records.REFUSED_PREFIX).strip())
        if setup is not None and setup.params.dp is not None and accepted:
            # A round past the budget is refused before the key advert leaves.
            try:
                runtime.check_privacy(
                    setup.header.run_id, setup.header.round, setup.params.dp,
                    honest_sites=honest_sites(runtime.privacy, setup),
                )
            except SiteRefusal as exc:
                refuse(str(exc).removeprefix(records.REFUSED_PREFIX).strip())
        if new is not None:
            new.adopt()  # the setup is accepted: this is the round in progress now
        if runtime.receipts is not None and session.stage is ClientStage.AWAIT_UNMASK:
            # We signed a survivor set naming ourselves: our input is in the aggregate.
            runtime.receipts.included(*runtime._round)
            runtime.input_included(*runtime._round)
        if reply is not None and reply.bulk is not None and runtime.receipts is not None:
            # The masked input: keep the exact signed payload for the receipt check.
            from fedseal.protocol import Limits
            from fedseal.protocol.envelope import Envelope

            run_id, round_ = runtime._round
            sent = Envelope.from_bytes(reply.payload, Limits())
            runtime.receipts.sent_masked_input(run_id, round_, sent.payload)
            runtime.sent_input(run_id, round_, sent.payload)
        out, bulk = (reply.payload, reply.bulk) if reply is not None else (b"", None)
        if store is not None:
            # Saved before the answer leaves: a restart never answers this message differently.
            if session.stage in (ClientStage.DONE, ClientStage.FAILED):
                store.clear()
                runtime.clear_training()
            else:
                store.save_session(session.export_state(round_state_key(runtime.training_secret)))
                store.save_reply(payload, out, bulk)
            if bulk is not None:
                runtime.clear_training()  # the masked input is saved: its training is over
        return _secagg_content(out, bulk)

    @app.train(records.SECURE_STAGE)
    def secagg_handler(msg: Message, context: Context) -> Message:
        """One stage of a secure round: the protocol's client session answers it."""
        payload = _secagg_payload(msg)
        if records.ARRAYS_RECORD in msg.content:  # round setup: a fresh session trains from this model
            saved = saved_answer(payload)  # the same setup again (pushed again): the same answer
            if saved is not None:
                return Message(saved, reply_to=msg)
            return Message(answer(payload, start_session(msg, _cfg(msg))), reply_to=msg)
        return Message(answer(payload), reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        rec = _cfg(msg)
        if runtime.receipts is not None and records.RUN_ID in rec:
            # Sent after the round result and its signed tree head: our input must be proven.
            run_id, evaluated = _run_id(rec), _get(rec, records.ROUND, int, 0, 10**9)
            runtime.receipts.after_round(run_id, evaluated)
            runtime.report_input(run_id, evaluated)  # one console line if it was left out
        content = RecordDict()
        reason = evaluation_refusal(runtime, rec)
        if reason is not None:
            # No metrics, the reason instead (a carried setup is still answered below, under
            # its own signed checks; its model is the one the setup names).
            why = reason.removeprefix(records.REFUSED_PREFIX).strip().removeprefix("evaluation: ")
            runtime.notice(f"{_when(runtime, msg)}: refused the evaluation: {why}")
            content[records.EVALUATION_REFUSED_RECORD] = ConfigRecord({records.REASON: reason})
        else:
            model = _load_global(runtime, msg, rec)
            if runtime.commitments is not None and not runtime.privacy.allow_plain:
                # Only a committed model: a crafted one would probe this site's validation data.
                runtime.check_model(_run_id(rec), model_digest(model_flat(model)), "evaluation")
            res = runtime.evaluate(_model_name(rec), model)
            content[records.METRICS_RECORD] = MetricRecord(
                {
                    records.NUM_EXAMPLES: res.num_examples,
                    records.LOSS: res.loss,
                    records.ACCURACY: res.accuracy,
                    records.MACRO_F1: res.macro_f1,
                    **res.extra,  # the recipe's own metrics (names never clash: Recipe checks)
                }
            )
        if records.SETUP_RECORD in msg.content:
            # The next round's setup rides on this evaluation: the model just evaluated is the
            # one it trains from. A refused setup still returns the metrics, with the reason.
            train_rec = msg.content.get(records.SETUP_CONFIG_RECORD)
            try:
                payload = _secagg_payload(msg)
                if not isinstance(train_rec, ConfigRecord):
                    raise ValueError("round setup without its training config")
                answered = saved_answer(payload) or answer(payload, start_session(msg, train_rec))
                content[records.SETUP_RECORD] = answered[records.SETUP_RECORD]
            except Exception as exc:  # reported to the coordinator: the site sits the round out
                refused = _reason(exc)[:300]
                setup_round = (
                    train_rec.get(records.ROUND) if isinstance(train_rec, ConfigRecord) else None
                )
                when = f"round {setup_round}" if isinstance(setup_round, int) else "the next round"
                why = refused.removeprefix(records.REFUSED_PREFIX).strip()
                runtime.notice(
                    f"{when}: refused the round setup (carried with the evaluation): {why}"
                )
                log.debug("traceback", exc_info=exc)
                content[records.SETUP_ERROR_RECORD] = ConfigRecord({records.REASON: refused})
        return Message(content, reply_to=msg)

    return app
