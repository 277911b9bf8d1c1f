"""The pinned executor pulls a task's message whose objects reach the SuperNode late.

The SuperNode hands out a task before it has pulled the message's objects from the
coordinator, so the executor's first object pulls find them unavailable; it must retry after
its short back-off (not Flower's fixed 1 s) and rebuild exactly the message that was sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.supercore.run import Run

from fedseal.client.executor import pull_task_input
from fedseal.settings import PullBackoff

RUN_ID = 7


def _message() -> Message:
    content = RecordDict(
        {
            "model": ArrayRecord({"w": Array(np.arange(12, dtype=np.float32).reshape(3, 4))}),
            "config": ConfigRecord({"stage": "advertise", "round": 1}),
        }
    )
    msg = make_message(
        metadata=Metadata(
            run_id=RUN_ID, message_id="", src_node_id=1, dst_node_id=42, reply_to_message_id="",
            group_id="1", created_at=1.0, ttl=3600.0, message_type="train.secagg",
        ),
        content=content,
    )
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


class LateObjectsRuntime:
    """A SuperNode Runtime API whose objects become available after `late` pulls each."""

    def __init__(self, message: Message, late: int | None) -> None:
        self.message = message
        self.objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
        self.late = late
        self.pulls: dict[str, int] = {}
        self.confirmed: list[str] = []

    def PullTaskInput(self, request: Any) -> PullTaskInputResponse:
        context = Context(run_id=RUN_ID, node_id=42, node_config={}, state=RecordDict(), run_config={})
        run = Run.create_empty(RUN_ID)
        fab = Fab(hash_str="ab" * 32, content=b"not executed", verifications={})
        return PullTaskInputResponse(context=context_to_proto(context), run=run_to_proto(run), fab=fab_to_proto(fab))

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(self.message))],
            message_object_trees=[get_object_tree(self.message)],
        )

    def PullObject(self, request: Any) -> PullObjectResponse:
        n = self.pulls[request.object_id] = self.pulls.get(request.object_id, 0) + 1
        if request.object_id not in self.objects:
            return PullObjectResponse(object_found=False, object_available=False)
        if self.late is None or n <= self.late:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True, object_content=self.objects[request.object_id])

    def ConfirmMessageReceived(self, request: Any) -> ConfirmMessageReceivedResponse:
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def test_a_message_whose_objects_arrive_late_is_pulled_whole_after_short_backoffs() -> None:
    sent = _message()
    runtime = LateObjectsRuntime(sent, late=3)
    # With Flower's back-off (1 s, 2 s, 4 s) the fourth pull would come after max_time.
    message, context, run, fab = pull_task_input(
        runtime, max_time=5.0, backoff=PullBackoff(initial_s=0.01, cap_s=0.02)  # type: ignore[arg-type]
    )
    assert all(n == 4 for n in runtime.pulls.values()) and set(runtime.pulls) == set(runtime.objects)
    assert message.metadata.message_id == sent.object_id and runtime.confirmed == [sent.object_id]
    np.testing.assert_array_equal(
        message.content.array_records["model"]["w"].numpy(), np.arange(12, dtype=np.float32).reshape(3, 4)
    )
    assert message.content.config_records["config"]["stage"] == "advertise"
    assert context.run_id == RUN_ID and run.run_id == RUN_ID and fab.hash_str == "ab" * 32


def test_objects_that_never_arrive_fail_the_task_at_its_time_limit() -> None:
    runtime = LateObjectsRuntime(_message(), late=None)
    with pytest.raises(ObjectPullError):
        pull_task_input(runtime, max_time=0.2, backoff=PullBackoff(initial_s=0.01, cap_s=0.05))  # type: ignore[arg-type]
    assert runtime.confirmed == []
