"""The next round's setup rides on the evaluation messages (``run.setup_with_evaluation``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedseal.protocol.records import SETUP_CONFIG_RECORD, SETUP_ERROR_RECORD, SETUP_RECORD
from fedseal.server import secure_round
from fedseal.server.secure_round import SetupAhead


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.sent = 0

    def status(self, **fields: Any) -> None:
        self.statuses.append(fields)

    def inc(self, n: float = 1) -> None:
        self.sent += int(n)


def _run(online: list[int], rec: Recorder) -> Any:
    return SimpleNamespace(
        cfg=SimpleNamespace(run=SimpleNamespace(min_sites=2)),
        node_sites={n: f"site-{n}" for n in (1, 2, 3, 4)},
        enrolled_online=lambda: online,
        status=rec.status,
        metrics=SimpleNamespace(bytes_sent=rec),
    )


def _secure(began: list[tuple[int, list[int]]]) -> Any:
    def begin(rnd: int, nodes: list[int], arrays: Any) -> SetupAhead:
        began.append((rnd, list(nodes)))
        outbound = {f"site-{n}": SimpleNamespace(payload=f"setup for site-{n}".encode()) for n in nodes}
        return SetupAhead(rnd=rnd, nodes=list(nodes), server=None, outbound=outbound)

    return SimpleNamespace(begin=begin, run_id=b"\x01" * 16)


def _evaluation_messages(nodes: list[int]) -> list[Message]:
    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})  # as Flower's strategies do
    return [Message(content=shared, message_type="evaluate", dst_node_id=n) for n in nodes]


def test_each_site_gets_its_own_setup_although_the_strategy_shared_one_record_dict() -> None:
    rec, began = Recorder(), []
    emsgs = _evaluation_messages([1, 2, 3])
    train_cfg = ConfigRecord({"round": 2})
    ahead = secure_round.setup_with_evaluation(_run([1, 2, 3], rec), _secure(began), emsgs, 2, {}, train_cfg)  # type: ignore[arg-type]
    assert ahead is not None and began == [(2, [1, 2, 3])]
    assert [int(m.metadata.dst_node_id) for m in emsgs] == [1, 2, 3]
    for m in emsgs:
        n = int(m.metadata.dst_node_id)
        assert m.content[SETUP_RECORD]["payload"] == f"setup for site-{n}".encode()
        assert m.content[SETUP_CONFIG_RECORD]["round"] == 2
        assert m.content["config"]["server-round"] == 1  # the evaluation's own records stay
        assert m.metadata.message_type == "evaluate"
    # The status names the next round before its setup leaves: a restart abandons that round.
    assert rec.statuses == [{"phase": "training", "round": 2, "run_id": "01" * 16, "stage": "advertise"}]
    assert rec.sent == sum(len(f"setup for site-{n}") for n in (1, 2, 3))


@pytest.mark.parametrize(
    ("online", "evaluated"),
    [([1, 2, 3, 4], [1, 2, 3]), ([1, 2], [1, 2, 3]), ([1], [1])],
    ids=["a site joined", "an evaluated site left", "too few sites"],
)
def test_no_setup_rides_along_when_the_cohort_is_not_the_evaluated_sites(
    online: list[int], evaluated: list[int]
) -> None:
    rec, began = Recorder(), []
    emsgs = _evaluation_messages(evaluated)
    before = [m.content for m in emsgs]
    ahead = secure_round.setup_with_evaluation(_run(online, rec), _secure(began), emsgs, 2, {}, ConfigRecord({}))  # type: ignore[arg-type]
    assert ahead is None and began == [] and rec.statuses == []
    assert [m.content for m in emsgs] == before and all(SETUP_RECORD not in c for c in before)


def test_adverts_and_refusals_are_taken_from_the_evaluation_replies() -> None:
    ahead = SetupAhead(rnd=2, nodes=[1, 2, 3, 4], server=None, outbound={f"site-{n}": None for n in (1, 2, 3, 4)})

    def reply(node: int, content: RecordDict, error: bool = False) -> Any:
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node), content=content, has_error=lambda: error
        )

    metrics = {"metrics": MetricRecord({"num-examples": 3})}
    replies = [
        reply(1, RecordDict({**metrics, SETUP_RECORD: ConfigRecord({"payload": b"advert-1"})})),
        reply(2, RecordDict({**metrics, SETUP_ERROR_RECORD: ConfigRecord({"reason": "DecodeError: junk"})})),
        reply(3, RecordDict(dict(metrics))),  # an older site: metrics only
        reply(4, RecordDict({}), error=True),  # the evaluation failed: silence, as at an advert timeout
        reply(9, RecordDict({SETUP_RECORD: ConfigRecord({"payload": b"stranger"})})),  # not in the cohort
    ]
    secure_round.collect_adverts(SimpleNamespace(node_sites={n: f"site-{n}" for n in (1, 2, 3, 4, 9)}), ahead, replies)  # type: ignore[arg-type]
    assert ahead.adverts == {"site-1": b"advert-1"}
    assert ahead.refused == {"site-2": "DecodeError: junk", "site-3": "evaluation reply without a key advert"}
