"""Through the site's real ClientApp and the pinned executor's task path (what ``fl-client run``
answers):

* a plain round carries the run's data contract digest (the coordinator's real
  ``train_config``), and a site refuses a plain ``train`` or an ``evaluate`` naming another
  contract than its dataset's, or none where its dataset has one, before it loads the model;
* the site's console (``fl-client run`` logs to its stderr) gets one line, no traceback, naming
  the round, what was refused and why, for every refused round (plain not allowed, contract,
  trust policy, DP policy, privacy budget) and evaluation;
* a masked input the round left out is named on the console with the reason of the log's own
  rejected-envelope entry for it (proven through the real audit service), or "not in the log".
"""

# ruff: noqa: F811 - the fixtures imported from test_site_trust_app are parameters here

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord

from fedseal.audit.entries import INPUT_MESSAGE_TYPE, RosterAction
from fedseal.audit.receipts import ReceiptChecker, SiteReceipts
from fedseal.audit.service import serve_audit_log
from fedseal.audit.service_client import GrpcAuditSource
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog, roster_from_log
from fedseal.client.flower_app import SiteRuntime, make_client_app
from fedseal.client.policy import SitePrivacy
from fedseal.client.privacy_ledger import PrivacyLedger
from fedseal.client.site_data import SiteData
from fedseal.crypto.keys import public_key_to_der
from fedseal.crypto.signing import sign
from fedseal.protocol import QuantizationConfig, RoundConfig
from fedseal.protocol.contract import parse_contract
from fedseal.protocol.model import flatten
from fedseal.protocol.records import EVALUATION_REFUSED_RECORD, RUN_CONTRACT, SETUP_RECORD
from fedseal.server.config import ServerConfig
from fedseal.server.flower_app import train_config as coordinator_train_config
from fedseal.sim.inmemory import deterministic_key
from tests.audit.logbuilder import masked_input_payload
from tests.audit.test_audit_service import _tls
from tests.client.test_dp_site import (
    budget_reason,
    dp_config,
    dp_round,
    flat_size,
    past_budget,
    round_cost,
)
from tests.client.test_dp_site import site as dp_site
from tests.client.test_site_trust_app import (  # noqa: F401 - fixtures used by name
    COORDINATOR,
    NOW_MS,
    RUN_1,
    SITE,
    SITE_KEY,
    SYBIL_KEYS,
    Deliver,
    Trainings,
    _one_torch_thread,
    _task_identity,
    data,
    deliver,
    digest_of,
    initial_model,
    kid,
    message,
    runtime,
    secure_round,
    train_config,
    trained,
)
from tests.server._fedgrid import Federated

CONTRACT: dict[str, Any] = {
    "format": "fedseal-data-contract/1",
    "features": [{"name": f"f{i}", "dtype": "float"} for i in range(3)],
    "label": {"name": "y", "values": [0, 1, 2, 3, 4]},
}
RUN_DIGEST = parse_contract(CONTRACT).digest()
OTHER = parse_contract({**CONTRACT, "features": CONTRACT["features"][:2]}).digest()
PLAIN = SitePrivacy(allow_plain=True)


def console(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The site's warning lines (what ``fl-client run`` prints on its stderr above info), each
    checked to be one line without a traceback."""
    lines = [
        r for r in caplog.records if r.name.startswith("fedseal") and r.levelno >= logging.WARNING
    ]
    for record in lines:
        assert record.exc_info is None and "\n" not in record.getMessage(), record.getMessage()
    return [r.getMessage() for r in lines]


@pytest.fixture
def site_console(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="fedseal"):
        yield caplog


def with_contract(rec: ConfigRecord, digest: bytes) -> ConfigRecord:
    return ConfigRecord({**dict(rec), RUN_CONTRACT: digest.hex()})


def coordinator_config(tmp: Path, *, contract: bool) -> ServerConfig:
    """A plain run's real ``server.toml`` (with ``[run] contract`` or without)."""
    fed = Federated(
        tmp, ["site-b", "site-c"], secure=False, run_contract=CONTRACT if contract else None
    )
    return fed.cfg


# -- plain rounds carry the contract ----------------------------------------------------------


def test_the_coordinators_plain_round_names_its_contract_and_a_site_of_another_refuses_it_untrained(
    data: SiteData,
    deliver: Deliver,
    trained: Trainings,
    tmp_path: Path,
    site_console: pytest.LogCaptureFixture,
) -> None:
    cfg = coordinator_config(tmp_path / "with", contract=True)
    rec = coordinator_train_config(cfg, 1, RUN_1.hex())
    assert rec[RUN_CONTRACT] == RUN_DIGEST.hex()
    plain_train = message("train", initial_model(data), rec)

    reply = deliver(make_client_app(runtime(data, privacy=PLAIN, contract=OTHER)), plain_train)
    why = (
        f"data contract: the plain training message names contract {RUN_DIGEST.hex()}, this "
        f"site's dataset was prepared under contract {OTHER.hex()}"
    )
    assert reply.error == f"refused: {why}" and reply.details == reply.error
    assert not reply.message.has_content() and trained.seeds == []
    assert console(site_console) == [f"round 1: refused plain training: {why}"]

    ok = deliver(make_client_app(runtime(data, privacy=PLAIN, contract=RUN_DIGEST)), plain_train)
    assert not ok.message.has_error(), ok.details
    assert len(trained.seeds) == 1


def test_a_plain_round_naming_no_contract_is_trained_as_a_setup_without_one_is(
    data: SiteData, deliver: Deliver, trained: Trainings, tmp_path: Path
) -> None:
    """A run without ``[run] contract`` declares nothing to check against: a site with a
    contract trains it, as it accepts a signed setup naming none; naming another is refused."""
    rec = coordinator_train_config(coordinator_config(tmp_path, contract=False), 1, RUN_1.hex())
    assert RUN_CONTRACT not in rec
    plain_train = message("train", initial_model(data), rec)
    reply = deliver(make_client_app(runtime(data, privacy=PLAIN, contract=RUN_DIGEST)), plain_train)
    assert not reply.error, reply.details
    assert not deliver(make_client_app(runtime(data, privacy=PLAIN)), plain_train).error
    assert len(trained.seeds) == 2
    named = message("train", initial_model(data), with_contract(rec, RUN_DIGEST))
    assert deliver(make_client_app(runtime(data, privacy=PLAIN)), named).error.endswith(
        "this site's dataset was prepared under no contract"
    )
    assert len(trained.seeds) == 2


def test_a_malformed_contract_in_the_config_is_an_error_not_a_training(
    data: SiteData, deliver: Deliver, trained: Trainings
) -> None:
    rec = ConfigRecord({**dict(train_config(RUN_1, 1)), RUN_CONTRACT: "zz" * 32})
    reply = deliver(
        make_client_app(runtime(data, privacy=PLAIN)), message("train", initial_model(data), rec)
    )
    assert reply.error == "ValueError: config 'data-contract' must be 64 hex characters"
    assert trained.seeds == []


def test_an_evaluation_naming_another_contract_is_withheld_with_the_reason_on_the_console(
    data: SiteData, deliver: Deliver, site_console: pytest.LogCaptureFixture
) -> None:
    app = make_client_app(runtime(data, privacy=PLAIN, contract=OTHER))
    weights = initial_model(data)
    reply = deliver(
        app, message("evaluate", weights, with_contract(train_config(RUN_1, 2), RUN_DIGEST))
    )
    why = (
        f"data contract: the evaluation message names contract {RUN_DIGEST.hex()}, this site's "
        f"dataset was prepared under contract {OTHER.hex()}"
    )
    assert not reply.error and "metrics" not in reply.message.content
    assert reply.message.content[EVALUATION_REFUSED_RECORD]["reason"] == f"refused: {why}"
    assert console(site_console) == [f"round 2: refused the evaluation: {why}"]
    # The dataset's own contract is evaluated.
    ok = deliver(app, message("evaluate", weights, with_contract(train_config(RUN_1, 2), OTHER)))
    assert ok.message.content["metrics"]["num-examples"] == data.validation.num_rows


# -- one console line per refused round or evaluation -----------------------------------------


def test_a_refused_plain_round_is_one_console_line_naming_round_what_and_why(
    data: SiteData, deliver: Deliver, site_console: pytest.LogCaptureFixture
) -> None:
    reply = deliver(
        make_client_app(runtime(data)),
        message("train", initial_model(data), train_config(RUN_1, 4)),
    )
    assert reply.error.startswith("refused: plain training is disabled")
    assert console(site_console) == [
        "round 4: refused plain training: plain training is disabled at this site ([privacy] "
        "allow_plain = false): it would send this site's trained weights in the clear"
    ]


def test_a_setup_naming_another_contract_is_one_console_line(
    data: SiteData, deliver: Deliver, site_console: pytest.LogCaptureFixture
) -> None:
    config = RoundConfig(
        vector_length=flatten(initial_model(data)).size,
        quantization=QuantizationConfig.from_clip(10.0, levels=1 << 10),
        max_weight=1000,
        contract_digest=OTHER,
    )
    rt = runtime(data, contract=RUN_DIGEST)
    run = secure_round(
        deliver,
        make_client_app(rt),
        data,
        initial_model(data),
        run_id=RUN_1,
        rnd=3,
        round_config=config,
    )
    assert run.replies["advertise"].error.startswith("refused: data contract:")
    assert console(site_console) == [
        f"round 3: refused the round setup: data contract: the round setup names contract "
        f"{OTHER.hex()}, this site's dataset was prepared under contract {RUN_DIGEST.hex()}"
    ]


def test_a_cohort_the_site_does_not_trust_is_one_console_line_without_a_traceback(
    data: SiteData, deliver: Deliver, site_console: pytest.LogCaptureFixture
) -> None:
    run = secure_round(
        deliver, make_client_app(runtime(data)), data, initial_model(data), run_id=RUN_1, rnd=1,
        members=SYBIL_KEYS,
    )  # fmt: skip
    error = run.replies["advertise"].error
    assert error.startswith("UntrustedPeerError:")
    assert console(site_console) == [f"round 1: refused the round setup: {error}"]


def test_the_dp_policy_and_the_privacy_budget_refusals_are_one_console_line_each(
    data: SiteData, deliver: Deliver, tmp_path: Path, site_console: pytest.LogCaptureFixture
) -> None:
    no_dp = RoundConfig(
        vector_length=flat_size(initial_model(data)),
        quantization=QuantizationConfig.from_clip(10.0, levels=1 << 10),
        max_weight=1000,
    )
    dp_round(deliver, make_client_app(dp_site(data, tmp_path / "a")), data, config=no_dp, rnd=2)
    assert console(site_console) == [
        "round 2: refused the round setup: differential privacy: this site takes part only in "
        'rounds with distributed DP, the setup has none (parameter dp) ([privacy] dp = "required")'
    ]
    site_console.clear()

    config = dp_config(flat_size(initial_model(data)), 3)
    before, after, budget = past_budget(PrivacyLedger(tmp_path / "b"), round_cost(config))
    rt = dp_site(data, tmp_path / "b", epsilon_budget=budget)
    dp_round(deliver, make_client_app(rt), data, config=config, rnd=5)
    why = budget_reason(before, after, budget).removeprefix("refused: ")
    assert console(site_console) == [f"round 5: refused the round setup: {why}"]


def test_a_withheld_evaluation_and_a_refused_carried_setup_are_one_console_line_each(
    data: SiteData, deliver: Deliver, site_console: pytest.LogCaptureFixture
) -> None:
    evaluation = message(
        "evaluate", initial_model(data), train_config(RUN_1, 6),
        **{SETUP_RECORD: ConfigRecord({"payload": b"not a setup"}), "train-config": train_config(RUN_1, 7)},
    )  # fmt: skip
    reply = deliver(make_client_app(runtime(data)), evaluation)
    assert not reply.error and EVALUATION_REFUSED_RECORD in reply.message.content
    setup_error = str(reply.message.content["secagg-error"]["reason"])
    assert console(site_console) == [
        "round 6: refused the evaluation: this site cannot tie the model to the coordinator's "
        "signed log (no [coordinator] audit_address; [privacy] evaluate_unverified = false)",
        f"round 7: refused the round setup (carried with the evaluation): {setup_error}",
    ]


# -- a masked input the round left out: why, from the signed log ------------------------------

PEER = "site-b"
PEER_KEY = deterministic_key(b"site-console/site-b")
REJECTED = "UnapprovedDatasetError: dataset root is not approved for this site"


@dataclass
class RoundLog:
    """The coordinator's signed log of RUN_1, served by the real audit service: round 1 with
    this site's masked input rejected (``rejected`` payload, entry ``rejected_at``) and the
    peer's accepted; round 2 with both accepted (this site's: ``accepted``)."""

    port: int
    ca: bytes
    rejected: bytes
    rejected_at: int
    accepted: bytes
    channels: list[grpc.Channel]

    def receipts(self, state: Path) -> SiteReceipts:
        channel = grpc.secure_channel(
            f"localhost:{self.port}", grpc.ssl_channel_credentials(self.ca)
        )
        self.channels.append(channel)
        source = GrpcAuditSource(
            channel, site=SITE, key=SITE_KEY, clock=lambda: NOW_MS, timeout_s=10
        )
        checker = ReceiptChecker(state, site=SITE, coordinator_key=COORDINATOR.public_key())
        return SiteReceipts(checker, source, INPUT_MESSAGE_TYPE)


def _input(
    log: AuditLog,
    key: ec.EllipticCurvePrivateKey,
    site: str,
    rnd: int,
    root: bytes,
    model: bytes,
    why: str | None,
) -> tuple[bytes, int]:
    bulk = hashlib.sha256(b"bulk %s %d" % (site.encode(), rnd)).digest()
    payload = masked_input_payload(RUN_1, rnd, site, model, root, 100, bulk)
    index = log.append_envelope(
        INPUT_MESSAGE_TYPE, payload, sign(key, INPUT_MESSAGE_TYPE, payload), kid(key),
        accepted=why is None, reason=why, site=site, round=rnd, stage="masked_input",
        dataset_root=root, bulk_digest=bulk, num_examples=100, model_digest=model,
    )  # fmt: skip
    return payload, index


@pytest.fixture(scope="module")
def round_log(tmp_path_factory: pytest.TempPathFactory, data: SiteData) -> Iterator[RoundLog]:
    path = tmp_path_factory.mktemp("console-audit") / "audit.sqlite"
    models = [initial_model(data)]
    t = iter(range(NOW_MS - 100_000, NOW_MS, 1000))
    log = AuditLog.open(path, signer=COORDINATOR, now_ms=next(t), log_id=b"C" * 16)
    ours, peers = bytes.fromhex(data.root_hex), hashlib.sha256(b"peer root").digest()
    for site, key, root in ((SITE, SITE_KEY, ours), (PEER, PEER_KEY, peers)):
        log.append_roster_change(
            RosterAction.ENROL, site, public_key_der=public_key_to_der(key.public_key()),
            approved_roots=[root], now_ms=next(t),
        )  # fmt: skip
    log.append_run_start(
        RUN_1, config_digest=hashlib.sha256(b"config").digest(), initial_model_digest=digest_of(models[0]),
        code_version="0.1.0", started_at_ms=next(t), planned_rounds=2,
    )  # fmt: skip
    log.sign_tree_head(next(t))
    payloads: dict[int, tuple[bytes, int]] = {}
    for rnd in (1, 2):
        base = digest_of(models[rnd - 1])
        payloads[rnd] = _input(log, SITE_KEY, SITE, rnd, ours, base, REJECTED if rnd == 1 else None)
        _input(log, PEER_KEY, PEER, rnd, peers, base, None)
        models.append({k: v + 0.01 for k, v in models[-1].items()})
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
    fixture = RoundLog(port, ca, payloads[1][0], payloads[1][1], payloads[2][0], [])
    yield fixture
    for channel in fixture.channels:
        channel.close()
    server.stop(grace=None)
    store.close()


def _after_sending(rt: SiteRuntime, rnd: int, payload: bytes) -> None:
    """What the ClientApp records when its masked input of ``rnd`` leaves (``answer``)."""
    assert rt.receipts is not None
    rt.receipts.sent_masked_input(RUN_1, rnd, payload)
    rt.sent_input(RUN_1, rnd, payload)


def _evaluated(data: SiteData, deliver: Deliver, rt: SiteRuntime, rnd: int) -> None:
    reply = deliver(
        make_client_app(rt), message("evaluate", initial_model(data), train_config(RUN_1, rnd))
    )
    assert reply.message.content["metrics"]["num-examples"] == data.validation.num_rows


def test_a_rejected_masked_input_is_named_on_the_console_with_the_logs_own_reason(
    data: SiteData,
    deliver: Deliver,
    round_log: RoundLog,
    tmp_path: Path,
    site_console: pytest.LogCaptureFixture,
) -> None:
    rt = runtime(
        data, privacy=SitePrivacy(evaluate_unverified=True), receipts=round_log.receipts(tmp_path)
    )
    _after_sending(rt, 1, round_log.rejected)
    _evaluated(data, deliver, rt, 1)
    line = (
        f"round 1: this site's masked input was not accepted: the coordinator rejected it: "
        f"{REJECTED} (audit log entry {round_log.rejected_at})"
    )
    assert line in console(site_console)
    assert not (tmp_path / "BLOCKED").exists()  # a rejected input is not tampering
    site_console.clear()
    _evaluated(data, deliver, rt, 1)  # said once per round
    assert not [x for x in console(site_console) if "masked input" in x]


def test_an_input_the_log_neither_accepted_nor_rejected_is_not_in_the_log(
    data: SiteData,
    deliver: Deliver,
    round_log: RoundLog,
    tmp_path: Path,
    site_console: pytest.LogCaptureFixture,
) -> None:
    rt = runtime(
        data, privacy=SitePrivacy(evaluate_unverified=True), receipts=round_log.receipts(tmp_path)
    )
    _after_sending(
        rt, 1, round_log.rejected[:-1] + bytes([round_log.rejected[-1] ^ 1])
    )  # not what the log holds
    _evaluated(data, deliver, rt, 1)
    assert (
        "round 1: this site's masked input was not accepted: not in the log (neither accepted nor "
        "rejected: dropped, or the round was abandoned before it)"
    ) in console(site_console)


def test_an_accepted_input_gives_no_console_line(
    data: SiteData,
    deliver: Deliver,
    round_log: RoundLog,
    tmp_path: Path,
    site_console: pytest.LogCaptureFixture,
) -> None:
    rt = runtime(
        data, privacy=SitePrivacy(evaluate_unverified=True), receipts=round_log.receipts(tmp_path)
    )
    _after_sending(rt, 2, round_log.accepted)
    _evaluated(data, deliver, rt, 2)
    assert console(site_console) == [] and rt.receipts is not None and rt.receipts.verified == 1
