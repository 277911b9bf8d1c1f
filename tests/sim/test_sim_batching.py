"""The simulation engine's batched worker: waiting messages go to the site actors together, each
message still gets its own reply (or error reply), in the engine's reply queue."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedseal.sim.engine import run_apps_on_engine
from fedseal.sim.errors import SimulationError
from fedseal.sim.flower_patches import batched_worker


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Flower's messages name the process's task; set one for these tests, then put it back."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class Store:
    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.updated: list[Context] = []

    def retrieve_context(self, run_id: int) -> Context:
        return Context(
            run_id=run_id, node_id=100 + self.partition, node_config={"partition-id": self.partition},
            state=RecordDict(), run_config={},
        )

    def update_context(self, run_id: int, context: Context) -> None:
        self.updated.append(context)


class Backend:
    """Two actors; the site of partition 3 raises, as a ClientApp that fails would."""

    actors = ("actor-0", "actor-1")

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def process_batch(
        self, items: list[tuple[Message, Context]], per_call: int = 8
    ) -> list[tuple[Any, Context, int, str]]:
        self.calls.append([int(str(c.node_config["partition-id"])) for _, c in items])
        self.per_call = per_call
        out: list[tuple[Any, Context, int, str]] = []
        for message, context in items:
            p = int(str(context.node_config["partition-id"]))
            if p == 3:
                out.append((None, context, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "site 3 failed"))
            else:
                out.append((Message(RecordDict({"r": ConfigRecord({"p": p})}), reply_to=message), context, 0, ""))
        return out


class Metrics:
    def __init__(self) -> None:
        self.runtimes: list[float] = []

    def add_clientapp_runtime(self, runtime: float) -> None:
        self.runtimes.append(runtime)


def message_for(node: int) -> Message:
    msg = Message(RecordDict({"c": ConfigRecord({"n": node})}), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"in-{node}"
    return msg


def run_worker(
    nodes: list[int], stores: dict[int, Store], backend: Backend, metrics: Metrics, batch: int
) -> list[Message]:
    """Queue a message for each node, run the batched worker until each has its reply, stop it."""
    inq: queue.Queue[Message] = queue.Queue()
    outq: queue.Queue[Message] = queue.Queue()
    for node in nodes:
        inq.put(message_for(node))
    stop = threading.Event()
    worker = threading.Thread(
        target=batched_worker, args=(inq, outq, stores, backend, stop, metrics), kwargs={"batch": batch}
    )
    worker.start()
    try:
        return [outq.get(timeout=10) for _ in nodes]
    finally:
        stop.set()
        worker.join(timeout=10)
        assert not worker.is_alive()


def test_waiting_messages_reach_the_actors_together_and_each_gets_its_reply() -> None:
    stores = {100 + p: Store(p) for p in range(7)}
    backend, metrics = Backend(), Metrics()
    # node 999 has no context: an error reply of its own
    replies = run_worker([*range(100, 107), 999], stores, backend, metrics, batch=2)
    # Up to batch x actors = 4 messages per turn; node 999 never reaches the backend.
    assert backend.calls == [[0, 1, 2, 3], [4, 5, 6]] and backend.per_call == 2
    by_source = {r.metadata.reply_to_message_id: r for r in replies}
    assert set(by_source) == {f"in-{n}" for n in [*range(100, 107), 999]}
    assert len({r.metadata.message_id for r in replies}) == 8  # each reply has its own id
    for p in range(7):
        reply = by_source[f"in-{100 + p}"]
        if p == 3:
            assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            assert "site 3 failed" in str(reply.error.reason)
            assert stores[103].updated == []  # a failed message's context is not written back
        else:
            assert not reply.has_error() and reply.content["r"]["p"] == p
            assert len(stores[100 + p].updated) == 1
    assert by_source["in-999"].has_error()
    assert len(metrics.runtimes) == 7


def test_a_backend_failing_a_whole_batch_gives_each_message_an_error_reply() -> None:
    class Broken(Backend):
        def process_batch(
            self, items: list[tuple[Message, Context]], per_call: int = 8
        ) -> list[tuple[Any, Context, int, str]]:
            raise RuntimeError("actor lost")

    replies = run_worker([100, 101], {100: Store(0), 101: Store(1)}, Broken(), Metrics(), batch=8)
    assert all(r.has_error() and "actor lost" in str(r.error.reason) for r in replies)


@pytest.mark.parametrize("batch", [0, 257])
def test_a_batch_size_out_of_range_is_refused(batch: int) -> None:
    with pytest.raises(SimulationError, match="batch"):
        run_apps_on_engine(None, None, 2, batch=batch)


@pytest.fixture
def _environment_restored() -> Iterator[None]:
    """Starting Ray rewrites this process's environment (PYTHONPATH, RAY_*, ...); later tests
    in the same process (the deployment's compose validation) must not see it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.usefixtures("_environment_restored")
def test_the_pinned_backend_runs_a_batch_on_real_actors_in_order_and_in_calls_of_per_call() -> None:
    """Real Ray actors: sites 0, 2, 4 pinned to actor 0 and 1, 3 to actor 1; per_call=2 splits
    actor 0's three messages over two calls; site 3's ClientApp raises: an error for it alone."""
    from flwr.clientapp import ClientApp

    from fedseal.sim.engine import default_backend_config, pinned_ray_backend

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        p = int(str(context.node_config["partition-id"]))
        if p == 3:
            raise RuntimeError("site 3 broke")
        return Message(RecordDict({"r": ConfigRecord({"p": p, "pid": __import__("os").getpid()})}), reply_to=msg)

    backend = pinned_ray_backend()(default_backend_config(2))
    backend.build(lambda: app)
    try:
        items = [(message_for(100 + p), Store(p).retrieve_context(run_id=1)) for p in range(5)]
        results = backend.process_batch(items, per_call=2)
    finally:
        backend.terminate()
    assert [r[2] for r in results] == [0, 0, 0, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, 0]
    assert "site 3 broke" in results[3][3]
    replies = {p: results[p][0] for p in (0, 1, 2, 4)}
    assert all(r is not None and r.metadata.reply_to_message_id == f"in-{100 + p}" for p, r in replies.items())
    pids = {p: r.content["r"]["pid"] for p, r in replies.items() if r is not None}
    assert pids[0] == pids[2] == pids[4] != pids[1]  # each site in its pinned actor
