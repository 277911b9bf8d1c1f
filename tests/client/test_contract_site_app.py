"""Through the real ClientApp (what ``fl-client run`` answers): a site reports its dataset's
data contract in ``query.policy`` and refuses, before any key advert, a signed round setup
naming another contract, with one line the coordinator records as a refusal (issue 18.4)."""

# ruff: noqa: F811 - the fixtures imported from test_site_trust_app are parameters here

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord, Message, RecordDict

from fedseal.client.flower_app import make_client_app
from fedseal.client.site_data import SiteData
from fedseal.protocol import MessageKind, QuantizationConfig, RoundConfig
from fedseal.protocol.model import flatten
from tests.client.test_site_trust_app import (  # noqa: F401 - fixtures used by name
    RUN_1,
    Deliver,
    Trainings,
    _one_torch_thread,
    _task_identity,
    advert_kind,
    data,
    deliver,
    initial_model,
    runtime,
    secure_round,
    trained,
)

MINE = bytes(range(32))
OTHER = bytes(range(1, 33))


def _config(site_data: SiteData, contract: bytes) -> RoundConfig:
    return RoundConfig(
        vector_length=flatten(initial_model(site_data)).size,
        quantization=QuantizationConfig.from_clip(10.0, levels=1 << 10),
        max_weight=1000,
        contract_digest=contract,
    )


def test_the_policy_reply_names_the_datasets_contract(data: SiteData, deliver: Deliver) -> None:
    for contract, shown in ((MINE, MINE.hex()), (b"", "")):
        app = make_client_app(runtime(data, contract=contract))
        query = Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="query.policy"
        )
        reply = deliver(app, query)
        assert reply.message.content["policy"]["contract"] == shown


def test_a_setup_naming_another_contract_is_refused_before_any_advert_or_training(
    data: SiteData,
    deliver: Deliver,
    trained: Trainings,
) -> None:
    rt = runtime(data, contract=MINE)
    run = secure_round(
        deliver, make_client_app(rt), data, initial_model(data), run_id=RUN_1, rnd=1,
        round_config=_config(data, OTHER),
    )  # fmt: skip
    reply = run.replies["advertise"]
    assert reply.message.has_error() and not reply.message.has_content()
    assert reply.error == (
        f"refused: data contract: the round setup names contract {OTHER.hex()}, this site's "
        f"dataset was prepared under contract {MINE.hex()}"
    )
    assert set(run.replies) == {"advertise"} and rt._session is None
    assert not run.completed and trained.seeds == []


def test_a_setup_naming_the_datasets_contract_or_none_is_answered_with_a_key_advert(
    data: SiteData,
    deliver: Deliver,
) -> None:
    for site_contract, setup_contract in ((MINE, MINE), (MINE, b""), (b"", b"")):
        rt = runtime(data, contract=site_contract)
        run = secure_round(
            deliver, make_client_app(rt), data, initial_model(data), run_id=RUN_1, rnd=1,
            round_config=_config(data, setup_contract), stop_before="share",
        )  # fmt: skip
        reply = run.replies["advertise"]
        assert not reply.message.has_error(), reply.details
        assert advert_kind(reply.payload) is MessageKind.KEY_ADVERT


def test_a_site_without_a_contract_refuses_a_setup_that_names_one(
    data: SiteData, deliver: Deliver
) -> None:
    run = secure_round(
        deliver, make_client_app(runtime(data)), data, initial_model(data), run_id=RUN_1, rnd=1,
        round_config=dataclasses.replace(_config(data, b""), contract_digest=OTHER),
    )  # fmt: skip
    assert run.replies["advertise"].error.endswith(
        "this site's dataset was prepared under no contract"
    )
