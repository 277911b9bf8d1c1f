"""A site stopped mid-round (a spot reclaim) and restarted continues its secure round (issue
20.3), through the real ClientApp and the pinned executor's task path: its training resumes
from the local checkpoint, and a message it had already answered is answered again with the
same bytes, never a second, different masked input (two inputs under the same masks would
reveal the difference of two trainings)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from fedseal.client import training
from fedseal.client.flower_app import SiteRuntime, make_client_app
from fedseal.client.site_data import SiteData
from fedseal.client.train_checkpoint import Preemption, TrainingCheckpoint
from fedseal.protocol.types import MessageKind
from tests.client import test_site_trust_app as trust_app
from tests.client.test_site_trust_app import (
    RUN_1,
    Deliver,
    Reply,
    advert_kind,
    initial_model,
    runtime,
    secure_round,
)

data = trust_app.data
deliver = trust_app.deliver
_task_identity = trust_app._task_identity
_one_torch_thread = trust_app._one_torch_thread

SECRET = bytes(range(32))


def _site(data: SiteData, state: Path, stop: threading.Event | None = None) -> SiteRuntime:
    """The site as ``fl-client run`` builds it: its state directory keeps the round, the
    training checkpoints and the setup guard; ``stop`` is its SIGTERM."""
    state.mkdir(parents=True, exist_ok=True)
    return runtime(
        data, training_secret=SECRET, guard_path=state / "setup-guard.bin", round_dir=state / "round",
        preemption=Preemption(stop), checkpoint_every_steps=3,
    )  # fmt: skip


def _try(deliver: Deliver, app: Any, msg: Message) -> Reply | None:
    """The executor's answer, or ``None`` when it sent nothing (a preempted task)."""
    try:
        return deliver(app, msg)
    except KeyError:  # nothing was pushed: no reply, no task end
        return None


def test_a_site_stopped_mid_training_resumes_from_its_checkpoint_when_the_message_comes_again(
    deliver: Deliver, data: SiteData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    sigterm = threading.Event()
    before = _site(data, state, sigterm)
    steps = {"n": 0}
    real_step = training.train_step

    def step_then_reclaim(*args: Any, **kw: Any) -> Any:
        steps["n"] += 1
        if steps["n"] == 5:
            sigterm.set()  # the reclaim notice arrives mid-training
        return real_step(*args, **kw)

    monkeypatch.setattr(training, "train_step", step_then_reclaim)
    loads: list[object] = []
    real_load = TrainingCheckpoint.load

    def spy_load(self: TrainingCheckpoint, model: Any, opt: Any) -> Any:
        loads.append(progress := real_load(self, model, opt))
        return progress

    monkeypatch.setattr(TrainingCheckpoint, "load", spy_load)
    apps = {"now": make_client_app(before)}
    preempted: list[str] = []

    def site_restarting_once(_app: Any, msg: Message) -> Reply:
        reply = _try(deliver, apps["now"], msg)
        if reply is not None:
            return reply
        preempted.append(msg.metadata.message_type)
        assert list((state / "training").iterdir())  # the checkpoint the stop wrote
        apps["now"] = make_client_app(_site(data, state))  # a new process, same state directory
        again = _try(deliver, apps["now"], msg)  # the coordinator pushes the message again
        assert again is not None
        return again

    run = secure_round(site_restarting_once, None, data, initial_model(data), run_id=RUN_1, rnd=1)
    assert preempted == ["train.secagg"]  # once, in the training of the masked-input stage
    assert run.errors == {} and run.completed, run.failure
    assert loads[0] is None and loads[-1] is not None  # started fresh, then resumed
    resumed = loads[-1]
    assert resumed.steps == 5  # type: ignore[attr-defined]  # the checkpoint of the stop, not the last periodic one (3)
    assert not (state / "round").exists() and not (state / "training").exists()  # the round ended


def test_a_message_answered_before_the_stop_is_answered_again_with_the_same_bytes(
    deliver: Deliver, data: SiteData, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    apps = {"now": make_client_app(_site(data, state))}
    seen: dict[str, tuple[bytes, bytes]] = {}
    trainings = {"n": 0}
    real_train = SiteRuntime.train

    def counting(self: SiteRuntime, *args: Any, **kw: Any) -> Any:
        trainings["n"] += 1
        return real_train(self, *args, **kw)

    SiteRuntime.train = counting  # type: ignore[method-assign]
    try:
        def answer_then_restart(_app: Any, msg: Message) -> Reply:
            reply = deliver(apps["now"], msg)
            if reply.bulk is not None:  # the masked input: sent, then the site is restarted
                apps["now"] = make_client_app(_site(data, state))
                again = deliver(apps["now"], msg)  # the coordinator sends it once more
                seen["first"] = (reply.payload, reply.bulk.tobytes())
                seen["again"] = (again.payload, again.bulk.tobytes() if again.bulk is not None else b"")
            return reply

        run = secure_round(answer_then_restart, None, data, initial_model(data), run_id=RUN_1, rnd=1)
    finally:
        SiteRuntime.train = real_train  # type: ignore[method-assign]
    assert run.errors == {} and run.completed, run.failure
    assert seen["again"] == seen["first"]  # byte for byte: never a second masked input
    assert advert_kind(seen["first"][0]) is MessageKind.MASKED_INPUT
    assert trainings["n"] == 1  # not trained again


def test_without_a_state_directory_a_site_keeps_its_round_in_memory_only(
    deliver: Deliver, data: SiteData, tmp_path: Path
) -> None:
    site = runtime(data, training_secret=SECRET)
    run = secure_round(deliver, make_client_app(site), data, initial_model(data), run_id=RUN_1, rnd=1)
    assert run.completed and site.round_store() is None
    assert not any(tmp_path.iterdir())


def _payload(msg: Message) -> bytes:
    from fedseal.protocol.records import SETUP_RECORD

    value = msg.content[SETUP_RECORD]["payload"]
    assert isinstance(value, bytes)
    return value


def _with_payload(msg: Message, payload: bytes) -> Message:
    from flwr.app import ConfigRecord, RecordDict

    from fedseal.protocol.records import SETUP_RECORD

    content = RecordDict({k: v for k, v in msg.content.items() if k != SETUP_RECORD})
    content[SETUP_RECORD] = ConfigRecord({"payload": payload})
    return Message(content, dst_node_id=1, message_type=msg.metadata.message_type)


def test_a_round_setup_pushed_again_gets_the_same_answer_and_the_round_goes_on(
    deliver: Deliver, data: SiteData, tmp_path: Path
) -> None:
    """The coordinator pushes a message again when a site's node went away and came back
    (briefly offline, or restarted): a setup already answered must not be taken as a new one."""
    state = tmp_path / "state"
    apps = {"now": make_client_app(_site(data, state))}
    again: list[tuple[bytes, bytes]] = []

    def setup_twice(_app: Any, msg: Message) -> Reply:
        reply = deliver(apps["now"], msg)
        if "arrays" in msg.content and not again:
            apps["now"] = make_client_app(_site(data, state))  # and after a restart
            second = deliver(apps["now"], msg)
            again.append((reply.payload, second.payload))
        return reply

    run = secure_round(setup_twice, None, data, initial_model(data), run_id=RUN_1, rnd=1)
    [(first, second)] = again
    assert first and second == first
    assert run.errors == {} and run.completed, run.failure


def test_a_session_that_failed_is_never_brought_back_by_a_restart(
    deliver: Deliver, data: SiteData, tmp_path: Path
) -> None:
    """A site that caught the coordinator cheating (a survivor set whose signature does not
    verify) drops out and reveals nothing more: neither the same process nor a restarted one
    answers that round's later messages from the disk."""
    state = tmp_path / "state"
    apps = {"now": make_client_app(_site(data, state))}
    answers: dict[str, Reply] = {}

    def tamper_then_restart(_app: Any, msg: Message) -> Reply:
        if "arrays" not in msg.content and advert_kind(_payload(msg)) is MessageKind.SURVIVOR_SET:
            forged = bytearray(_payload(msg))
            forged[-5] ^= 1  # inside the signature
            answers["forged"] = deliver(apps["now"], _with_payload(msg, bytes(forged)))
            answers["same process"] = deliver(apps["now"], msg)
            apps["now"] = make_client_app(_site(data, state))
            answers["restarted"] = deliver(apps["now"], msg)
            return answers["restarted"]
        return deliver(apps["now"], msg)

    run = secure_round(tamper_then_restart, None, data, initial_model(data), run_id=RUN_1, rnd=1)
    assert answers["forged"].error and not answers["forged"].payload
    assert "session already failed" in answers["same process"].error
    assert answers["restarted"].error == "ValueError: secagg stage without a round setup"
    assert not run.completed
    assert not (state / "round").exists() and not (state / "training").exists()
