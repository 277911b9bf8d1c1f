"""The site's patches of Flower internals (fedseal.client.flower_patches): each does what it
should, and each fails here first when the Flower underneath changes (the patched attribute
exists with the signature and behaviour the patch assumes)."""

from __future__ import annotations

import importlib
import inspect
import time

import pytest

from fedseal.client import flower_patches
from fedseal.settings import PullBackoff

LOOP = "flwr.supernode.start_client_internal"


# --------------------------------------------------------------------------- the version gate


def test_the_installed_flower_is_a_supported_one() -> None:
    version = flower_patches.require_supported_flower()
    assert ".".join(version.split(".")[:2]) in flower_patches.FLOWER_VERSIONS


@pytest.mark.parametrize("version", ["1.41.0", "1.43.0", "2.42.0"])
def test_another_flower_is_refused_with_a_clear_error(version: str) -> None:
    with pytest.raises(RuntimeError, match=rf"flwr {version} is installed.*flwr==1\.42\.\*"):
        flower_patches.check_flower_version(version)
    flower_patches.check_flower_version("1.42.7")  # any patch release of a supported minor


# --------------------------------------------------------------------------- what each patch assumes


def test_patch_1_the_loop_module_sleeps_on_its_own_time_module() -> None:
    module = importlib.import_module(LOOP)
    assert getattr(module, "time", None) in (time, None) or isinstance(module.time, flower_patches.PollClock)
    assert inspect.getsource(module).count(flower_patches.PATCHED_CALL) == 1


def test_patch_2_the_loop_pulls_objects_through_a_module_level_pull_objects_with_backoff() -> None:
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supercore.run import RunNotRunningException

    module = importlib.import_module(LOOP)
    assert "obj_contents = pull_objects(" in inspect.getsource(module)
    assert getattr(module.pull_objects, "__wrapped__", module.pull_objects) is pull_objects
    params = inspect.signature(pull_objects).parameters
    assert {"initial_backoff", "backoff_cap", "max_time"} <= set(params)
    # The bug the patch works around: Flower's clean-up catches Exception, which this is not.
    assert not issubclass(RunNotRunningException, Exception)


def test_patch_3_the_loop_pushes_only_after_a_pull_that_returned_a_run_id() -> None:
    module = importlib.import_module(LOOP)
    pull_and_store = module._pull_and_store_message
    pull_and_store = getattr(pull_and_store, "__wrapped__", pull_and_store)
    assert "state" in inspect.signature(pull_and_store).parameters
    source = "".join(inspect.getsource(module).split())
    assert flower_patches.LOOP_PUSH_AFTER_PULL in source
    assert "_pull_and_store_message(" in source


def test_patch_4_the_node_state_finishes_tasks_and_stores_error_replies_as_assumed() -> None:
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    finish = getattr(InMemoryNodeState.finish_task, "__wrapped__", InMemoryNodeState.finish_task)
    assert list(inspect.signature(finish).parameters) == ["self", "task_id", "sub_status", "details"]
    assert list(inspect.signature(InMemoryNodeState._store_error_replies).parameters) == [
        "self", "run_ids", "error",
    ]
    assert "task_ids" in inspect.signature(InMemoryNodeState.get_tasks).parameters
    assert flower_patches.node_state_is_readable()


def test_patch_5_a_message_id_written_into_the_metadata_is_the_messages_id() -> None:
    from flwr.app import Metadata, RecordDict
    from flwr.app.message import make_message

    message = make_message(
        metadata=Metadata(
            run_id=1, message_id="", src_node_id=1, dst_node_id=5, reply_to_message_id="",
            group_id="1", created_at=1.0, ttl=3600.0, message_type="train",
        ),
        content=RecordDict(),
    )
    assert not hasattr(type(message.metadata).message_id, "fset") or (
        type(message.metadata).message_id.fset is None  # no setter: hence the patch
    )
    flower_patches.set_message_id(message, message.object_id)
    assert message.metadata.message_id == message.object_id


# --------------------------------------------------------------------------- what each patch does


def test_install_caps_only_the_supernode_loop_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", time)  # restored after the test
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    monkeypatch.setattr(module, "_pull_and_store_message", module._pull_and_store_message)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    flower_patches.install(0.25)
    assert isinstance(module.time, flower_patches.PollClock)
    module.time.sleep(3)
    module.time.sleep(0.1)
    assert slept == [0.25, 0.1]
    assert module.time.time is time.time  # everything else is the real module
    # Only that module is patched.
    assert importlib.import_module("flwr.supernode.cli.flower_supernode").__dict__.get("time") is not module.time


def test_the_patched_call_is_still_in_the_pinned_flower() -> None:
    """If Flower moves its idle sleep, this fails (and install() refuses to start)."""
    import inspect

    source = inspect.getsource(importlib.import_module("flwr.supernode.start_client_internal"))
    assert source.count(flower_patches.PATCHED_CALL) == 1


def test_install_refuses_a_flower_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", object())
    with pytest.raises(RuntimeError, match=r"flwr==1\.42"):
        flower_patches.install(0.25)


def test_a_run_that_ended_mid_pull_becomes_an_exception_that_flowers_cleanup_catches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower raises a BaseException there, which skipped the clean-up and wedged the site."""
    from flwr.supercore.run import RunNotRunningException

    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", time)

    def ended(*args: object, **kwargs: object) -> dict[str, bytes]:
        raise RunNotRunningException

    monkeypatch.setattr(module, "pull_objects", ended)
    monkeypatch.setattr(module, "_pull_and_store_message", module._pull_and_store_message)
    flower_patches.install(0.25)
    with pytest.raises(Exception) as info:  # an Exception (caught by Flower), not a BaseException
        module.pull_objects(["a"], pull_object_fn=lambda _: b"")
    assert isinstance(info.value, flower_patches.RunEndedError)
    ok = {"x": b"1"}
    monkeypatch.setattr(module, "pull_objects", lambda *a, **k: ok)
    monkeypatch.setattr(module, "time", time)
    flower_patches.install(0.25)
    assert module.pull_objects(["x"], pull_object_fn=lambda _: b"") is ok


def test_install_makes_the_supernode_object_pulls_use_the_short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", time)
    calls: list[dict[str, object]] = []

    def fake_pull(*args: object, **kwargs: object) -> dict[str, bytes]:
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(module, "pull_objects", fake_pull)
    monkeypatch.setattr(module, "_pull_and_store_message", module._pull_and_store_message)
    flower_patches.install(0.25, PullBackoff(initial_s=0.05, cap_s=0.25))
    module.pull_objects(["a"], pull_object_fn=lambda _: b"")
    module.pull_objects(["a"], pull_object_fn=lambda _: b"", initial_backoff=2.0)  # an explicit value wins
    assert calls[0]["initial_backoff"] == 0.05 and calls[0]["backoff_cap"] == 0.25
    assert calls[1]["initial_backoff"] == 2.0


def test_the_short_backoff_reaches_flowers_real_pull_loop() -> None:
    """Flower's pull_objects retries an unavailable object after the back-off it is given."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    backoff = PullBackoff(initial_s=0.01, cap_s=0.02)
    tries = {"x": 0}

    def pull_one(object_id: str) -> bytes:
        tries[object_id] += 1
        if tries[object_id] < 4:  # not yet uploaded by the sender
            raise ObjectUnavailableError(object_id)
        return b"content"

    # With Flower's default back-off (1 s, 2 s, 4 s) the fourth try would come after max_time.
    got = pull_objects(["x"], pull_one, max_time=5.0, **backoff.kwargs())
    assert got == {"x": b"content"} and tries["x"] == 4


def test_local_waits_for_the_executors_reply_are_capped_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", time)
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    monkeypatch.setattr(module, "_pull_and_store_message", module._pull_and_store_message)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    flower_patches.install(0.25, local_wait_s=flower_patches.LOCAL_WAIT_S)
    module.time.sleep(3)  # the idle pull: one network request per wake-up
    module.time.sleep(0.5)  # waiting for the executor's reply: in-memory
    module.time.sleep(0.01)
    assert slept == [0.25, flower_patches.LOCAL_WAIT_S, 0.01]


class _Entry:
    def __init__(self, reply_to: str, retrieved: bool = False) -> None:
        self.message = type("M", (), {"metadata": type("Md", (), {"reply_to_message_id": reply_to})()})()
        self.is_retrieved = retrieved


class _State:
    def __init__(self, *entries: _Entry) -> None:
        import threading

        self.lock_msg_store = threading.Lock()
        self.msg_store = {str(i): e for i, e in enumerate(entries)}


def test_an_idle_pull_with_a_stranded_reply_makes_flowers_loop_push_it() -> None:
    """The CI hang: the executor's reply landed after the loop's push of a stale reply."""
    calls: list[object] = []

    def pull_and_store(**kwargs: object) -> int | None:
        calls.append(kwargs["state"])
        return None  # no new message from the SuperLink

    wrapped = flower_patches.push_stranded_replies(pull_and_store)
    assert wrapped(state=_State(_Entry("m-in-1"))) is not None  # a reply waits: push it
    assert wrapped(state=_State()) is None  # nothing waiting: idle as before
    assert wrapped(state=_State(_Entry(""))) is None  # only an incoming message: not a reply
    assert wrapped(state=_State(_Entry("m-in-2", retrieved=True))) is None  # already being pushed
    assert len(calls) == 4


def test_a_pulled_message_is_passed_through_unchanged() -> None:
    wrapped = flower_patches.push_stranded_replies(lambda **kwargs: 1234)
    assert wrapped(state=_State(_Entry("m"))) == 1234


def test_checking_for_a_reply_consumes_nothing_in_flowers_real_node_state() -> None:
    from types import SimpleNamespace

    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState, MessageEntry

    state = InMemoryNodeState(ObjectStoreFactory().store())
    reply = SimpleNamespace(metadata=SimpleNamespace(run_id=7, reply_to_message_id="m-in", message_id="m-out"))
    with state.lock_msg_store:
        state.msg_store["m-out"] = MessageEntry(message=reply)  # type: ignore[arg-type]
    assert flower_patches.has_unsent_reply(state)
    assert flower_patches.has_unsent_reply(state)  # still there: nothing was marked retrieved
    assert state.get_messages_legacy(is_reply=True) == [reply]
    assert not flower_patches.has_unsent_reply(state)  # handed to the push loop now


def test_install_wraps_the_pull_once_however_often_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", time)
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    original = getattr(module._pull_and_store_message, "__wrapped__", module._pull_and_store_message)
    monkeypatch.setattr(module, "_pull_and_store_message", original)
    flower_patches.install(0.25)
    monkeypatch.setattr(module, "time", time)
    flower_patches.install(0.25)
    assert module._pull_and_store_message.__wrapped__ is original


def _node_state_with_a_retrieved_client_task() -> tuple[object, int, object]:
    """Flower's real SuperNode state holding one incoming message, handed to a ClientApp task."""
    from flwr.app import Metadata, RecordDict
    from flwr.app.message import make_message
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state = InMemoryNodeState(ObjectStoreFactory().store())
    incoming = make_message(
        metadata=Metadata(
            run_id=77, message_id="", src_node_id=1, dst_node_id=5, reply_to_message_id="",
            group_id="4", created_at=1.0, ttl=3600.0, message_type="train.secagg",
        ),
        content=RecordDict(),
    )
    incoming.metadata.__dict__["_message_id"] = incoming.object_id
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=77, fab_hash="f")
    assert task_id is not None
    state.store_message(incoming)
    assert state.get_messages_legacy(run_ids=[77], is_reply=False) == [incoming]  # the executor took it
    return state, task_id, incoming


def test_flowers_own_state_leaves_no_reply_when_a_clientapp_task_fails_the_wedge() -> None:
    """Without the patch: the loop's `_push_messages` would wait for this reply forever."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    finish = getattr(InMemoryNodeState.finish_task, "__wrapped__", InMemoryNodeState.finish_task)
    state, task_id, _ = _node_state_with_a_retrieved_client_task()
    assert finish(state, task_id, SubStatus.FAILED, "ObjectPullError: timeout")
    assert not flower_patches.has_unsent_reply(state)


def test_a_failed_clientapp_task_leaves_an_error_reply_the_loop_sends() -> None:
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    finish = flower_patches.error_reply_on_failed_client_task(
        getattr(InMemoryNodeState.finish_task, "__wrapped__", InMemoryNodeState.finish_task)
    )
    state, task_id, incoming = _node_state_with_a_retrieved_client_task()
    assert finish(state, task_id, SubStatus.FAILED, "ObjectPullError: timeout")
    assert flower_patches.has_unsent_reply(state)
    (reply,) = state.get_messages_legacy(is_reply=True)  # what `_push_messages` sends
    assert reply.metadata.reply_to_message_id == incoming.metadata.message_id  # type: ignore[attr-defined]
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ObjectPullError: timeout" in reply.error.reason
    # Finishing it again (the SuperNode's own clean-up after a failed pull) adds nothing.
    assert not finish(state, task_id, SubStatus.FAILED, "Pulling message objects failed")
    assert not flower_patches.has_unsent_reply(state)


def test_a_completed_task_or_an_answered_message_gets_no_extra_reply() -> None:
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SubStatus
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    finish = flower_patches.error_reply_on_failed_client_task(
        getattr(InMemoryNodeState.finish_task, "__wrapped__", InMemoryNodeState.finish_task)
    )
    state, task_id, incoming = _node_state_with_a_retrieved_client_task()
    answer = Message(RecordDict(), reply_to=incoming)  # type: ignore[arg-type]
    answer.metadata.__dict__["_message_id"] = answer.object_id
    state.store_message(answer)  # the executor's own error reply, pushed before it failed the task
    assert finish(state, task_id, SubStatus.FAILED, "ValueError: bad")
    assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)] == [answer.metadata.message_id]


def test_install_patches_the_node_states_finish_task_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    module = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(module, "time", time)
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    monkeypatch.setattr(module, "_pull_and_store_message", module._pull_and_store_message)
    original = getattr(InMemoryNodeState.finish_task, "__wrapped__", InMemoryNodeState.finish_task)
    monkeypatch.setattr(InMemoryNodeState, "finish_task", original)
    flower_patches.install(0.25)
    monkeypatch.setattr(module, "time", time)
    flower_patches.install(0.25)
    assert InMemoryNodeState.finish_task is not original
    assert InMemoryNodeState.finish_task.__wrapped__ is original  # type: ignore[attr-defined]
