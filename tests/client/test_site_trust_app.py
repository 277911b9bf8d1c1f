"""Site trust through the real ClientApp path: what a deployed ``fl-client run`` answers.

Every test drives :func:`fedseal.client.flower_app.make_client_app` with Flower messages, and
every reply goes through the pinned executor's task path (:class:`PinnedExecutor._run_task`,
the SuperNode's Runtime API stubbed out), so an error is seen exactly as the coordinator sees
it. Each attack worked before the site-trust rules:

* plain ``train`` was always answered (the site's trained weights in the clear);
* a round setup's cohort was taken from the coordinator (Sybil keys accepted);
* local training was seeded with the round number from the unsigned config, so a coordinator
  re-sending one model (another run, or to another site runtime) got identical training;
* any model was evaluated or trained from, committed by the signed audit log or not.

The secure rounds are real: a :class:`SecAggServer` signing with the coordinator's key, two
honest peers as :class:`ClientSession` objects, and the site under test as the ClientApp.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SubStatus
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from fedseal.audit.entries import INPUT_MESSAGE_TYPE, RosterAction
from fedseal.audit.receipts import ReceiptChecker
from fedseal.audit.service import serve_audit_log
from fedseal.audit.service_client import GrpcAuditSource
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog, roster_from_log
from fedseal.client import executor as executor_module
from fedseal.client import flower_app
from fedseal.client.commitments import ModelCommitments
from fedseal.client.config import load_client_config
from fedseal.client.flower_app import SiteRuntime, make_client_app, model_flat
from fedseal.client.models import build_model, state_dict_to_numpy
from fedseal.client.policy import SitePrivacy
from fedseal.client.site_data import SiteData, load_site_data
from fedseal.crypto.keys import (
    generate_identity_key,
    key_id,
    public_key_to_der,
    save_private_key,
    save_public_key,
)
from fedseal.crypto.signing import sign
from fedseal.protocol import (
    ClientSession,
    ClientStage,
    Limits,
    LocalUpdate,
    MessageKind,
    ProtocolError,
    QuantizationConfig,
    Roster,
    RosterEntry,
    RoundConfig,
    SecAggServer,
)
from fedseal.protocol.envelope import Envelope
from fedseal.protocol.model import flatten, model_digest
from fedseal.protocol.records import SETUP_RECORD
from fedseal.sim.inmemory import dataset_root_for, deterministic_key
from tests.audit.logbuilder import masked_input_payload
from tests.audit.test_audit_service import _tls
from tests.client._data_support import make_dataset

SITE = "site-a"
PEERS = ("site-b", "site-c")
RUN_1 = bytes.fromhex("11" * 16)
RUN_2 = bytes.fromhex("22" * 16)
NOW_MS = 1_780_000_000_000
COORDINATOR = deterministic_key(b"trust-app/coordinator")
SITE_KEY = deterministic_key(b"trust-app/site-a")
PEER_KEYS = {p: deterministic_key(b"trust-app/" + p.encode()) for p in PEERS}
# Keys the coordinator made for itself and enrols in its own roster.
SYBIL_KEYS = {
    p: deterministic_key(b"trust-app/sybil/" + p.encode()) for p in ("sybil-1", "sybil-2")
}


def kid(key: ec.EllipticCurvePrivateKey) -> bytes:
    return bytes(key_id(key.public_key()))


#: The site's trust anchor: the two peers it knows independently of the coordinator.
TRUSTED = {p: kid(k) for p, k in PEER_KEYS.items()}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """500 rows x = [id, 2 id, 3 id], label = id % 5 (tests/client/_data_support.py)."""
    d = tmp_path_factory.mktemp("trust-app") / "d"
    make_dataset(d, [300, 200])
    return load_site_data(d, validation_fraction=0.2, seed=7)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_node_id", "_task_id"):  # what a SuperNode sets for its ClientApp
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Reply:
    """What the coordinator gets back for one message (via the pinned executor)."""

    message: Message
    status: str
    details: str

    @property
    def error(self) -> str:
        return self.message.error.reason if self.message.has_error() else ""

    @property
    def payload(self) -> bytes:
        if self.message.has_error():
            return b""
        sec = self.message.content.get(SETUP_RECORD)
        value = sec.get("payload") if isinstance(sec, ConfigRecord) else None
        return value if isinstance(value, bytes) else b""

    @property
    def bulk(self) -> npt.NDArray[Any] | None:
        rec = None if self.message.has_error() else self.message.content.get("bulk")
        return rec["masked"].numpy() if isinstance(rec, ArrayRecord) else None


Deliver = Callable[[Any, Message], Reply]


class _NoHeartbeat:
    is_running = False

    def __init__(self, fn: object) -> None:
        pass

    def start(self) -> None:
        pass


class _NoClient:
    def close(self) -> None:
        pass


@pytest.fixture
def deliver(monkeypatch: pytest.MonkeyPatch) -> Deliver:
    """Run one message through ``PinnedExecutor._run_task`` (the Runtime API stubbed out)."""
    box: dict[str, Any] = {}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    fab = Fab(hash_str="ab" * 32, content=b"never executed", verifications={})
    monkeypatch.setattr(
        executor_module,
        "pull_task_input",
        lambda client, **kw: (box["in"], context, Run.create_empty(1), fab),
    )
    monkeypatch.setattr(
        executor_module, "push_message", lambda client, reply, ctx: box.__setitem__("out", reply)
    )
    monkeypatch.setattr(
        executor_module,
        "push_task_output",
        lambda client, context, sub_status, details: box.update(status=sub_status, details=details),
    )
    monkeypatch.setattr(executor_module, "HeartbeatSender", _NoHeartbeat)
    monkeypatch.setattr(executor_module.PinnedExecutor, "_client", lambda self, token: _NoClient())

    def run(app: Any, msg: Message) -> Reply:
        box.clear()
        box["in"] = msg
        executor_module.PinnedExecutor("127.0.0.1:1", app)._run_task("token")
        return Reply(box["out"], box["status"], box["details"])

    return run


@dataclass
class Trainings:
    """Every local training of the site: its seed, the weights it started from and the
    trained weights (flat)."""

    seeds: list[int] = field(default_factory=list)
    started: list[npt.NDArray[np.float32]] = field(default_factory=list)
    weights: list[npt.NDArray[np.float32]] = field(default_factory=list)


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> Trainings:
    """Wrap the ClientApp's ``train`` to record what every local training produced."""
    seen = Trainings()
    real = flower_app.train

    def recording(model: torch.nn.Module, x: Any, y: Any, req: Any, seed: int, **loop: Any) -> Any:
        seen.started.append(model_flat(model).copy())
        result = real(model, x, y, req, seed=seed, **loop)
        seen.seeds.append(seed)
        seen.weights.append(model_flat(model).copy())
        return result

    monkeypatch.setattr(flower_app, "train", recording)
    return seen


# -- messages ---------------------------------------------------------------------------------


def cohort_roster(data: SiteData, members: Mapping[str, ec.EllipticCurvePrivateKey]) -> Roster:
    """The coordinator's roster of a round: this site with its dataset root, and ``members``."""
    return Roster(
        [
            RosterEntry(
                site=SITE,
                public_key=SITE_KEY.public_key(),
                approved_roots=frozenset({bytes.fromhex(data.root_hex)}),
            )
        ]
        + [
            RosterEntry(
                site=s, public_key=k.public_key(), approved_roots=frozenset({dataset_root_for(s)})
            )
            for s, k in members.items()
        ]
    )


def initial_model(data: SiteData) -> dict[str, npt.NDArray[np.float32]]:
    return state_dict_to_numpy(
        build_model("mlp", seed=0, num_features=data.num_features, num_classes=data.num_classes)
    )


def crafted(
    weights: Mapping[str, npt.NDArray[np.float32]], shift: float
) -> dict[str, npt.NDArray[np.float32]]:
    return {k: (v + np.float32(shift)).astype(np.float32) for k, v in weights.items()}


def model_flat_of(weights: Mapping[str, npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    return flatten(weights)


def digest_of(weights: Mapping[str, npt.NDArray[np.float32]]) -> bytes:
    flat = flatten(weights)
    return model_digest(flat)


def train_config(run_id: bytes, rnd: int) -> ConfigRecord:
    return ConfigRecord(
        {
            "run-id": run_id.hex(),
            "round": rnd,
            "model": "mlp",
            "seed": 0,
            "epochs": 1,
            "batch-size": 32,
            "learning-rate": 1e-3,
            "clip-norm": 1.0,
        }
    )


def arrays(weights: Mapping[str, npt.NDArray[np.float32]]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def message(
    kind: str,
    weights: Mapping[str, npt.NDArray[np.float32]] | None,
    config: ConfigRecord | None,
    **extra: Any,
) -> Message:
    content: dict[str, Any] = dict(extra)
    if config is not None:
        content["config"] = config
    if weights is not None:
        content["arrays"] = arrays(weights)
    return Message(RecordDict(content), dst_node_id=1, message_type=kind)


def runtime(data: SiteData, **kw: Any) -> SiteRuntime:
    kw.setdefault("identity_key", SITE_KEY)
    kw.setdefault("coordinator_key", COORDINATOR.public_key())
    kw.setdefault("trusted_peers", dict(TRUSTED))
    return SiteRuntime(name=SITE, data=data, **kw)


# -- a secure round with the site under test --------------------------------------------------


@dataclass
class RoundRun:
    """One secure round: the site's replies per coordinator stage, and how it ended
    (``completed``: a result with the site's input in it)."""

    replies: dict[str, Reply] = field(default_factory=dict)
    failure: Exception | None = None
    completed: bool = False

    @property
    def errors(self) -> dict[str, str]:
        return {stage: r.error for stage, r in self.replies.items() if r.error}


def coordinator_and_peers(
    config: RoundConfig,
    roster: Any,
    members: Mapping[str, ec.EllipticCurvePrivateKey],
    run_id: bytes,
    rnd: int,
    flat: npt.NDArray[np.float32],
) -> tuple[SecAggServer, dict[str, ClientSession]]:
    """A coordinator signing with ``COORDINATOR`` for the site and ``members``, and the members
    as honest sessions (zero updates) that trust every member of the roster."""
    server = SecAggServer(
        config,
        roster,
        [SITE, *members],
        identity_key=COORDINATOR,
        run_id=run_id,
        round=rnd,
        model_digest=model_digest(flat),
        now=time.time(),
    )
    everyone = {SITE: kid(SITE_KEY)} | {s: kid(k) for s, k in members.items()}
    sessions = {
        s: ClientSession(
            s,
            k,
            COORDINATOR.public_key(),
            update_fn=lambda info, s=s: LocalUpdate(
                np.zeros(info.vector_length), 10, dataset_root_for(s)
            ),
            rng=np.random.default_rng(1),
            trusted_peers={p: i for p, i in everyone.items() if p != s},
        )
        for s, k in members.items()
    }
    return server, sessions


def secure_round(
    deliver: Deliver,
    app: Any,
    data: SiteData,
    weights: Mapping[str, npt.NDArray[np.float32]],
    *,
    run_id: bytes,
    rnd: int,
    config_round: int | None = None,
    members: Mapping[str, ec.EllipticCurvePrivateKey] = PEER_KEYS,
    round_config: RoundConfig | None = None,
    stop_before: str | None = None,
    before: Mapping[str, Callable[[], object]] | None = None,
) -> RoundRun:
    """Run round ``rnd`` of ``run_id`` from ``weights``: a coordinator signing with
    ``COORDINATOR`` whose roster enrols the site and ``members`` (the keys it chose).

    The members answer as honest sessions that trust every member of the roster; the site
    under test answers through ``app``. The setup message carries the model and a training
    config naming ``config_round`` (default: the signed round). ``stop_before`` names a
    coordinator stage not to send (e.g. ``"share"``: stop once the keys were shared);
    ``before[stage]`` runs before that stage's messages are sent (another message to the site).
    """
    flat = flatten(weights)
    roster = cohort_roster(data, members)
    config = round_config or RoundConfig(
        vector_length=flat.size,
        quantization=QuantizationConfig.from_clip(10.0, levels=1 << 10),
        max_weight=1000,
    )
    server, sessions = coordinator_and_peers(config, roster, members, run_id, rnd, flat)
    out = RoundRun()
    cfg = train_config(run_id, rnd if config_round is None else config_round)
    outbound = server.start()
    first = True
    while outbound:
        # The run's first round starts with a commit exchange (graph nonces): its reply is
        # recorded as the setup's, under "advertise", unless the setup proper follows.
        stage = "advertise" if server.stage.value == "commit" else server.stage.value
        if stage == stop_before:
            return out
        if before and stage in before:
            before[stage]()
        for site, packet in outbound.items():
            if site == SITE:
                extra = {SETUP_RECORD: ConfigRecord({"payload": packet.payload})}
                # The setup carries the model and the training config (as the coordinator's).
                msg = message("train.secagg", *((weights, cfg) if first else (None, None)), **extra)
                reply = deliver(app, msg)
                out.replies[stage] = reply
                if reply.payload:
                    server.receive(site, reply.payload, reply.bulk)
            else:
                try:
                    answer = sessions[site].handle(packet.payload)
                except ProtocolError:  # an honest peer refuses what the site refuses too
                    continue
                if answer is not None:
                    server.receive(site, answer.payload, answer.bulk)
        first = False
        try:
            outbound = server.advance()
        except Exception as exc:  # the coordinator fails the round (e.g. the site dropped out)
            out.failure = exc
            return out
    out.completed = server.result is not None and SITE in server.result.survivors
    return out


def advert_kind(payload: bytes) -> MessageKind:
    return Envelope.from_bytes(payload, Limits()).kind


# -- 1. plain training ------------------------------------------------------------------------


def test_plain_training_is_refused_by_default_with_a_reason_and_no_weights(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    app = make_client_app(runtime(data))
    reply = deliver(app, message("train", initial_model(data), train_config(RUN_1, 1)))
    assert reply.message.has_error() and not reply.message.has_content()
    assert "refused: plain training is disabled" in reply.error
    # A policy refusal, not a fault: the coordinator reads the reason without an exception name.
    assert reply.details == reply.error and "SiteRefusal" not in reply.details
    assert reply.status == SubStatus.FAILED
    assert trained.seeds == []  # nothing was trained


def test_a_broken_recipe_is_one_line_at_the_site_and_in_the_reply_without_a_traceback(
    data: SiteData, deliver: Deliver, caplog: pytest.LogCaptureFixture
) -> None:
    from fedseal.client.recipe import RecipeError

    app = ClientApp()

    @app.query("initial_model")
    def broken(msg: Message, context: Context) -> Message:
        raise RecipeError("acme.models:net", "fails to import: No module named 'acme'")

    with caplog.at_level("WARNING", logger="fedseal"):
        reply = deliver(app, Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1,
                                     message_type="query.initial_model"))
    assert reply.details == "RecipeError: recipe 'acme.models:net': fails to import: No module named 'acme'"
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "acme" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None  # one line, no traceback


def test_plain_training_is_answered_only_where_the_site_opted_in(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    app = make_client_app(runtime(data, privacy=SitePrivacy(allow_plain=True)))
    reply = deliver(app, message("train", initial_model(data), train_config(RUN_1, 1)))
    assert not reply.message.has_error(), reply.details
    assert reply.message.content["metrics"]["num-examples"] == data.train.num_rows
    assert set(reply.message.content["arrays"]) == set(initial_model(data))
    assert len(trained.seeds) == 1


# -- 2. Sybil cohorts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "members",
    [
        pytest.param(SYBIL_KEYS, id="keys-of-the-coordinators-own"),
        pytest.param(
            {"site-b": SYBIL_KEYS["sybil-1"], "site-c": PEER_KEYS["site-c"]},
            id="known-name-other-key",
        ),
    ],
)
def test_a_cohort_of_keys_the_site_cannot_tie_to_its_anchor_is_refused_before_any_advert(
    data: SiteData,
    deliver: Deliver,
    trained: Trainings,
    members: dict[str, ec.EllipticCurvePrivateKey],
) -> None:
    rt = runtime(data)
    app = make_client_app(rt)
    run = secure_round(
        deliver, app, data, initial_model(data), run_id=RUN_1, rnd=1, members=members
    )
    reply = run.replies["advertise"]
    assert reply.message.has_error() and not reply.message.has_content()
    assert reply.error.startswith("UntrustedPeerError:")
    assert "cannot tie to its trust anchor" in reply.error
    assert rt._session is None  # a refused setup is not adopted: no session of it is kept
    assert set(run.replies) == {"advertise"}  # no advert: the site is out of the round
    assert not run.completed and trained.seeds == []


def test_the_same_setup_with_a_cohort_the_site_trusts_is_answered_with_a_key_advert(
    data: SiteData, deliver: Deliver
) -> None:
    rt = runtime(data)
    run = secure_round(
        deliver,
        make_client_app(rt),
        data,
        initial_model(data),
        run_id=RUN_1,
        rnd=1,
        stop_before="share",
    )
    reply = run.replies["advertise"]
    assert not reply.message.has_error(), reply.details
    assert advert_kind(reply.payload) is MessageKind.KEY_ADVERT
    assert rt._session.stage is ClientStage.AWAIT_ADVERTS


def test_a_cohort_with_fewer_known_peers_than_the_policy_asks_is_refused(
    data: SiteData, deliver: Deliver
) -> None:
    # site-c is trusted, but the site asks for 2 known peers and the cohort holds one.
    app = make_client_app(runtime(data, trusted_peers={"site-c": TRUSTED["site-c"]}))
    run = secure_round(deliver, app, data, initial_model(data), run_id=RUN_1, rnd=1)
    assert run.replies["advertise"].error.startswith("UntrustedPeerError:")


def test_round_parameters_below_the_sites_floor_are_refused(
    data: SiteData, deliver: Deliver
) -> None:
    # The coordinator claims nobody colludes: a quorum of 2 of 3; the site's gamma = 1/3 needs 3.
    flat_size = sum(v.size for v in initial_model(data).values())
    weak = RoundConfig(
        vector_length=flat_size,
        quantization=QuantizationConfig.from_clip(10.0, levels=1 << 10),
        max_weight=1000,
        max_colluding_fraction=0.0,
    )
    app = make_client_app(runtime(data))
    run = secure_round(
        deliver, app, data, initial_model(data), run_id=RUN_1, rnd=1, round_config=weak
    )
    assert run.replies["advertise"].error.startswith("WeakRoundError:")


# -- 3. training randomness -------------------------------------------------------------------


def test_a_complete_secure_round_trains_once_with_the_seed_of_the_signed_run_and_round(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    rt = runtime(data)
    run = secure_round(deliver, make_client_app(rt), data, initial_model(data), run_id=RUN_1, rnd=3)
    assert run.completed and not run.errors, run.errors
    assert trained.seeds == [rt.training_seed(RUN_1, 3)]
    assert trained.seeds[0] != 3  # never the round number of the unsigned config
    assert advert_kind(run.replies["masked-input"].payload) is MessageKind.MASKED_INPUT


def test_one_model_sent_in_two_runs_is_trained_differently(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    # A coordinator re-sending one model in a fresh run, same round number, to difference the
    # two updates: on the old code (seed = config round) both trainings were identical.
    app = make_client_app(runtime(data))
    for run_id in (RUN_1, RUN_2):
        run = secure_round(deliver, app, data, initial_model(data), run_id=run_id, rnd=1)
        assert run.completed and not run.errors, run.errors
    assert len(trained.weights) == 2 and trained.seeds[0] != trained.seeds[1]
    assert not np.array_equal(trained.weights[0], trained.weights[1])


def test_two_sites_with_different_training_secrets_train_one_signed_round_differently(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    for secret in (b"\x01" * 32, b"\x02" * 32):
        app = make_client_app(runtime(data, training_secret=secret))
        run = secure_round(deliver, app, data, initial_model(data), run_id=RUN_1, rnd=1)
        assert run.completed and not run.errors, run.errors
    assert trained.seeds[0] != trained.seeds[1]
    assert not np.array_equal(trained.weights[0], trained.weights[1])
    # ... while one secret and one signed (run, round) give one seed, whatever else differs.
    assert runtime(data, training_secret=b"\x01" * 32).training_seed(RUN_1, 1) == trained.seeds[0]


def test_opted_in_plain_training_is_seeded_by_the_site_secret_not_the_round_number(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    # Plain training has no signed round; its seed still mixes the site's secret in, so the
    # coordinator's config cannot make it the round number (and repeat it at will).
    rt = runtime(data, privacy=SitePrivacy(allow_plain=True))
    reply = deliver(
        make_client_app(rt), message("train", initial_model(data), train_config(RUN_1, 1))
    )
    assert not reply.message.has_error(), reply.details
    assert trained.seeds == [rt.training_seed(RUN_1, 1)] and trained.seeds[0] != 1
    assert (
        runtime(data, privacy=SitePrivacy(allow_plain=True)).training_seed(RUN_1, 1)
        != trained.seeds[0]
    )


def test_a_second_setup_for_a_round_in_which_the_site_shared_keys_is_refused(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    rt = runtime(data)
    app = make_client_app(rt)
    first = secure_round(
        deliver, app, data, initial_model(data), run_id=RUN_1, rnd=2, stop_before="masked-input"
    )
    assert (
        not first.errors
        and advert_kind(first.replies["share"].payload) is MessageKind.ENCRYPTED_SHARES
    )
    # A fresh setup of the same round (new keys, a new graph draw) from the same coordinator.
    again = secure_round(deliver, app, data, initial_model(data), run_id=RUN_1, rnd=2)
    reply = again.replies["advertise"]
    assert reply.error.startswith("StaleMessageError:") and "already shared keys" in reply.error
    older = secure_round(deliver, app, data, initial_model(data), run_id=RUN_1, rnd=1)
    assert older.replies["advertise"].error.startswith("StaleMessageError:")
    assert trained.seeds == []


def test_a_setup_whose_signed_round_differs_from_its_config_is_refused_before_training(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    rt = runtime(data)
    run = secure_round(
        deliver, make_client_app(rt), data, initial_model(data), run_id=RUN_1, rnd=2, config_round=1
    )
    errors = run.errors
    # Refused at the setup, before its key advert leaves (the model and commitments were
    # checked for the config's run and round).
    assert set(errors) == {"advertise"}, errors  # the stage whose reply is the key advert
    assert "setup for round 2, this session answers round 1" in errors["advertise"]
    assert trained.seeds == [] and not run.completed


# -- 4. model commitments ---------------------------------------------------------------------


@dataclass
class AuditFixture:
    port: int
    ca: bytes
    models: list[dict[str, npt.NDArray[np.float32]]]
    channels: list[grpc.Channel] = field(default_factory=list)

    def commitments(self, state: Path) -> ModelCommitments:
        channel = grpc.secure_channel(
            f"localhost:{self.port}", grpc.ssl_channel_credentials(self.ca)
        )
        self.channels.append(channel)
        source = GrpcAuditSource(
            channel, site=SITE, key=SITE_KEY, clock=lambda: NOW_MS, timeout_s=10
        )
        checker = ReceiptChecker(state, site=SITE, coordinator_key=COORDINATOR.public_key())
        return ModelCommitments(checker, source)


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory, data: SiteData) -> Iterator[AuditFixture]:
    """The coordinator's signed log of run 1: the initial model, then rounds 1 and 2 completed,
    served by the real audit service over TLS."""
    path = tmp_path_factory.mktemp("audit") / "audit.sqlite"
    models = [initial_model(data)]
    models += [crafted(models[0], 0.01), crafted(models[0], 0.02)]
    t = iter(range(NOW_MS - 100_000, NOW_MS, 1000))
    log = AuditLog.open(path, signer=COORDINATOR, now_ms=next(t), log_id=b"L" * 16)
    log.append_roster_change(
        RosterAction.ENROL,
        SITE,
        public_key_der=public_key_to_der(SITE_KEY.public_key()),
        approved_roots=[bytes.fromhex(data.root_hex)],
        now_ms=next(t),
    )
    log.append_run_start(
        RUN_1,
        config_digest=hashlib.sha256(b"config").digest(),
        initial_model_digest=digest_of(models[0]),
        code_version="0.1.0",
        started_at_ms=next(t),
        planned_rounds=3,
    )
    log.sign_tree_head(next(t))
    root = bytes.fromhex(data.root_hex)
    for rnd in (1, 2):
        bulk = hashlib.sha256(b"bulk %d" % rnd).digest()
        trained_from = digest_of(models[rnd - 1])
        payload = masked_input_payload(RUN_1, rnd, SITE, trained_from, root, 100, bulk)
        log.append_envelope(
            INPUT_MESSAGE_TYPE,
            payload,
            sign(SITE_KEY, INPUT_MESSAGE_TYPE, payload),
            kid(SITE_KEY),
            accepted=True,
            reason=None,
            site=SITE,
            round=rnd,
            stage="masked_input",
            dataset_root=root,
            bulk_digest=bulk,
            num_examples=100,
            model_digest=trained_from,
        )
        log.append_round_result(
            rnd,
            aggregate_digest=hashlib.sha256(b"agg %d" % rnd).digest(),
            new_model_digest=digest_of(models[rnd]),
        )
        log.sign_tree_head(next(t))
    log.close()
    ca, tls = _tls()
    store = MerkleLogStore.open(path)
    server, port = serve_audit_log(
        store,
        roster=lambda: roster_from_log(store),
        address="localhost:0",
        tls=tls,
        clock=lambda: NOW_MS,
    )
    fixture = AuditFixture(port, ca, models)
    yield fixture
    for channel in fixture.channels:
        channel.close()
    server.stop(grace=None)
    store.close()


def test_a_committed_model_is_evaluated(
    data: SiteData, deliver: Deliver, audit: AuditFixture, tmp_path: Path
) -> None:
    app = make_client_app(runtime(data, commitments=audit.commitments(tmp_path)))
    for weights in audit.models:  # the initial model, then each round's, in order
        reply = deliver(app, message("evaluate", weights, train_config(RUN_1, 1)))
        assert not reply.message.has_error(), reply.details
        assert reply.message.content["metrics"]["num-examples"] == data.validation.num_rows


def test_a_crafted_model_is_not_evaluated(
    data: SiteData, deliver: Deliver, audit: AuditFixture, tmp_path: Path
) -> None:
    app = make_client_app(runtime(data, commitments=audit.commitments(tmp_path)))
    probe = dict(audit.models[0])
    first = sorted(probe)[0]
    probe[first] = probe[first].copy()
    probe[first].flat[0] += np.float32(
        0.5
    )  # one weight changed: a model of the coordinator's making
    reply = deliver(app, message("evaluate", probe, train_config(RUN_1, 1)))
    assert reply.message.has_error() and not reply.message.has_content()
    assert reply.error.startswith("refused: evaluation: ")
    assert "neither the run's initial model nor a completed round's result" in reply.error
    # A committed model of another run is not this run's either.
    other = deliver(app, message("evaluate", audit.models[0], train_config(RUN_2, 1)))
    assert other.error.startswith("refused: evaluation: ")


def test_a_round_setup_for_an_uncommitted_model_is_refused_before_any_advert(
    data: SiteData, deliver: Deliver, audit: AuditFixture, tmp_path: Path, trained: Trainings
) -> None:
    rt = runtime(data, commitments=audit.commitments(tmp_path))
    app = make_client_app(rt)
    run = secure_round(deliver, app, data, crafted(audit.models[0], 0.5), run_id=RUN_1, rnd=1)
    reply = run.replies["advertise"]
    assert reply.error.startswith("refused: round 1 setup: ") and not reply.payload
    assert rt._session is None and trained.seeds == []
    # The same coordinator, the committed model: the site takes part.
    ok = secure_round(deliver, app, data, audit.models[0], run_id=RUN_1, rnd=1, stop_before="share")
    assert advert_kind(ok.replies["advertise"].payload) is MessageKind.KEY_ADVERT


def test_a_model_sent_to_evaluate_mid_round_does_not_become_the_model_the_round_trains_from(
    data: SiteData, deliver: Deliver, audit: AuditFixture, tmp_path: Path, trained: Trainings
) -> None:
    # Between the setup (a committed model) and the stage where the site trains, the
    # coordinator sends an evaluation of a model of its own making. The site refuses to
    # evaluate it, and must still train from the model the signed setup names.
    app = make_client_app(runtime(data, commitments=audit.commitments(tmp_path)))
    probe = crafted(audit.models[0], 0.5)
    refusals: list[str] = []

    def evaluate_probe() -> None:
        refusals.append(deliver(app, message("evaluate", probe, train_config(RUN_1, 1))).error)

    run = secure_round(
        deliver,
        app,
        data,
        audit.models[0],
        run_id=RUN_1,
        rnd=1,
        before={"masked-input": evaluate_probe},
    )
    assert refusals and refusals[0].startswith("refused: evaluation: ")
    assert run.completed and not run.errors, run.errors
    assert len(trained.started) == 1
    assert np.array_equal(trained.started[0], model_flat_of(audit.models[0]))


def test_an_older_model_than_one_verified_for_the_run_is_refused(
    data: SiteData, deliver: Deliver, audit: AuditFixture, tmp_path: Path
) -> None:
    app = make_client_app(runtime(data, commitments=audit.commitments(tmp_path)))
    assert not deliver(
        app, message("evaluate", audit.models[2], train_config(RUN_1, 2))
    ).message.has_error()
    for older in (audit.models[0], audit.models[1]):
        reply = deliver(app, message("evaluate", older, train_config(RUN_1, 3)))
        assert reply.error.startswith("refused: evaluation: ") and "older model" in reply.error
    # Round 2's model itself is still accepted (not older than itself).
    assert not deliver(
        app, message("evaluate", audit.models[2], train_config(RUN_1, 3))
    ).message.has_error()


# -- 5. fl-client policy show / run -----------------------------------------------------------


def _client_toml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(
        '[site]\nname = "site-a"\n[coordinator]\nsuperlink = "coord.example:9092"\n'
        f'[data]\ndataset_dir = "data"\napproved_root = "{"ab" * 32}"\n{extra}'
    )
    return path


def _policy_show(path: Path) -> Any:
    from fedseal.client.cli import app

    return CliRunner().invoke(app, ["policy", "show", "--config", str(path)])


def test_policy_show_prints_the_refusal_of_plain_training_the_floor_and_the_known_peers(
    tmp_path: Path,
) -> None:
    from fedseal.protocol.consortium import ConsortiumRoster, ConsortiumSite, SignedConsortiumRoster

    authority = generate_identity_key()
    save_public_key(authority.public_key(), tmp_path / "authority.pub")
    roster = ConsortiumRoster(
        "eu",
        1,
        NOW_MS,
        (
            ConsortiumSite(SITE, public_key_to_der(SITE_KEY.public_key())),
            ConsortiumSite("site-b", public_key_to_der(PEER_KEYS["site-b"].public_key())),
        ),
    )
    (tmp_path / "roster.json").write_text(SignedConsortiumRoster.sign(roster, authority).to_json())
    path = _client_toml(
        tmp_path,
        '[trust]\nroster = "roster.json"\nroster_authority = "authority.pub"\n'
        f'[peers]\n"site-b" = "{TRUSTED["site-b"].hex()}"\n"site-c" = "{TRUSTED["site-c"].hex()}"\n',
    )
    result = _policy_show(path)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "plain training: refused (allow_plain = false)" in lines
    assert any(
        line.startswith("floor: up to 0.3333 of a cohort colluding") and "2^-40" in line
        for line in lines
    )
    assert any(
        line.startswith("secure rounds: cohort >= 3 sites with >= 2 other known sites")
        for line in lines
    )
    # The site itself is not its own peer.
    assert "known peers (2): site-b (both), site-c (peers)" in lines
    assert any(line.startswith("model commitments: NOT checked") for line in lines)


def test_policy_show_says_when_plain_training_is_allowed_and_the_site_knows_no_peer(
    tmp_path: Path,
) -> None:
    result = _policy_show(_client_toml(tmp_path, "[privacy]\nallow_plain = true\n"))
    assert result.exit_code == 0, result.output
    assert "plain training: ALLOWED" in result.stdout
    assert "known peers: NONE" in result.stdout


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param("", id="neither-trust-nor-peers"),
        pytest.param(f'[peers]\n"site-a" = "{kid(SITE_KEY).hex()}"\n', id="only-itself"),
    ],
)
def test_fl_client_run_refuses_to_start_without_a_known_peer(tmp_path: Path, extra: str) -> None:
    from fedseal.client.node import SiteRunError, run_site

    save_private_key(SITE_KEY, tmp_path / "site.key")
    cfg = load_client_config(_client_toml(tmp_path, extra))
    lines: list[str] = []
    with pytest.raises(SiteRunError) as info:
        run_site(cfg, re_enrol=False, on_info=lines.append)
    assert info.value.step == "trust" and "knows no peer" in info.value.reason
    assert lines == []  # before the dataset, the coordinator or the SuperNode


def test_a_request_for_one_batch_per_epoch_still_trains_differently_under_two_seeds(
    data: SiteData,
) -> None:
    # With every row in one batch, training would not depend on the seed at all (the review's
    # finding): the same model trained twice gives the same update, which a coordinator can
    # difference across cohorts. The site keeps at least two minibatches per epoch.
    from fedseal.client.models import build_model
    from fedseal.client.training import train

    rt = runtime(data)
    rec = train_config(RUN_1, 1)
    rec["batch-size"] = 1 << 16
    req = rt.train_request(rec)
    rows = len(data.y_train)
    assert req.batch_size == rows // 2
    updates = []
    seeds = (rt.training_seed(RUN_1, 1), rt.training_seed(RUN_1, 1), rt.training_seed(RUN_2, 1))
    for seed in seeds:
        model = build_model("mlp", seed=0, num_features=data.num_features, num_classes=data.num_classes)
        train(model, data.x_train, data.y_train, req, seed=seed)
        updates.append(model_flat(model))
    # The same seed trains bit for bit the same model; another seed a different one (by far more
    # than float32 rounding of weights of this size, ~1e-7; how much more depends on the split).
    assert np.array_equal(updates[0], updates[1])
    assert float(np.abs(updates[0] - updates[2]).max()) > 1e-6


def test_without_an_audit_address_the_site_evaluates_no_model_unless_it_says_so(
    data: SiteData, deliver: Deliver
) -> None:
    # It cannot tie the model to the signed log: no metrics, a reason instead (a setup carried
    # by the evaluation is still answered, with its own checks).
    from fedseal.protocol.records import EVALUATION_REFUSED_RECORD

    weights = initial_model(data)
    for privacy, evaluated in (
        (SitePrivacy(), False),
        (SitePrivacy(evaluate_unverified=True), True),
        (SitePrivacy(allow_plain=True), True),
    ):
        app = make_client_app(runtime(data, privacy=privacy))
        reply = deliver(app, message("evaluate", weights, train_config(RUN_1, 1)))
        assert not reply.error
        assert ("metrics" in reply.message.content) is evaluated
        if not evaluated:
            reason = reply.message.content[EVALUATION_REFUSED_RECORD]["reason"]
            assert "cannot tie the model to the coordinator's signed log" in str(reason)
