"""Flower's simulation engine as fedseal runs it: the Ray backend that pins each virtual site to
one actor, the in-memory link state (the engine's "network"), and :func:`run_apps_on_engine`,
which runs a ServerApp against N virtual SuperNodes.

Engine details (Flower 1.42): this module does what ``flwr.simulation.run_simulation`` does
(in-memory ``LinkState``, an ``InMemoryGrid``, the ServerApp in a thread, ``vce.start_vce``
with the Ray backend, here through ``vce_api.run_api``) with two differences, both needed by
fedseal: the nodes are registered first (``existing_nodes_mapping``: the caller maps them to
sites before the ServerApp starts) and the ServerApp's context carries the run config
(``fedseal-config``), which the public ``run_simulation`` cannot pass. The site side is by
default one Ray actor holding every virtual site (``client_resources.num_cpus`` = all CPUs):
fedseal's ClientApp keeps a secure round's client session in memory between the stages of a
round, so all messages of a site must reach the same process. With ``actors=K`` the sites run
in K actors, each site pinned to actor ``partition % K`` for the whole run
(:func:`pinned_ray_backend`; Flower's own backend would hand a message to any idle actor),
with two engine threads per actor so that no actor idles while messages for it wait, and the
messages waiting for one actor go to it together, up to 8 in one Ray call
(:func:`fedseal.sim.flower_patches.batched_worker`; each Ray call cost the engine a few
milliseconds of its own, per message and per exchange: at N = 100 that was half of a plain
FedAvg round here). The patches of Flower's engine internals are all in
:mod:`fedseal.sim.flower_patches`; the ClientApp the engine runs for the sites is
:class:`fedseal.sim.sites.SimulatedSites`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedseal.sim import flower_patches
from fedseal.sim.errors import SimulationError
from fedseal.sim.sites import read_environment

__all__ = [
    "DEFAULT_BATCH",
    "MAX_ACTORS",
    "MAX_BATCH",
    "InMemoryLink",
    "default_backend_config",
    "in_memory_link",
    "pinned_ray_backend",
    "run_apps_on_engine",
]

log = logging.getLogger("fedseal.sim.engine")

MAX_ACTORS = 64
MAX_BATCH = 256
DEFAULT_BATCH = 8
"""Messages one Ray call hands a site actor at most (``run_apps_on_engine(batch=...)``)."""


def default_backend_config(actors: int = 1) -> dict[str, Any]:
    """Ray backend with ``actors`` site processes.

    One actor (the default) gets all CPUs: every virtual site in one process. With more, each
    actor is one logical CPU of a Ray instance sized to ``actors`` (more actors than cores is
    allowed: they share the cores); see :func:`run_apps_on_engine` for how sites are pinned.

    Raises:
        SimulationError: ``actors`` is not in ``[1, 64]``.
    """
    if not 1 <= actors <= MAX_ACTORS:
        raise SimulationError("arguments", f"actors must be in [1, {MAX_ACTORS}], got {actors}")
    cpus = max(1, len(os.sched_getaffinity(0)))
    per_actor, total = (cpus, cpus) if actors == 1 else (1, actors)
    return {
        "client_resources": {"num_cpus": per_actor, "num_gpus": 0.0},
        "init_args": {"num_cpus": total, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": True},
        "actor": {"tensorflow": 0},
    }


_PINNED_BACKEND: Any = None


def pinned_ray_backend() -> Any:
    """Flower's ``RayBackend`` with every virtual site pinned to one actor for the whole run.

    Flower's own backend hands each message to whichever actor is idle. fedseal's ClientApp
    keeps a secure round's client session in the memory of the process that answered the
    round's setup, so a site's later stages must reach that same process: here partition
    ``p`` always runs in actor ``p % actors`` (a Ray actor runs one call at a time, so no two
    messages of one actor's sites ever run at once). A lost actor is never replaced; its sites'
    later messages fail (error replies: the coordinator sees dropouts), a session never moves.
    """
    global _PINNED_BACKEND
    if _PINNED_BACKEND is not None:
        return _PINNED_BACKEND
    import ray
    from flwr.common.constant import PARTITION_ID_KEY
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, VirtualClientEngineActor

    @ray.remote
    class BatchClientAppActor(VirtualClientEngineActor):
        """Flower's ClientApp actor, plus one call that runs several messages in order."""

        def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
            super().__init__()
            if on_actor_init_fn:
                on_actor_init_fn()

        def run_batch(
            self, app_fn: Callable[[], ClientApp], items: list[tuple[Message, str, Context]]
        ) -> list[tuple[Message | None, Context, int, str]]:
            """Each item's (reply, context, 0, "") or (None, context, error code, reason)."""
            from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
            from flwr.common.constant import ErrorCode

            out: list[tuple[Message | None, Context, int, str]] = []
            for message, cid, context in items:
                try:
                    _, reply, updated = self.run(app_fn, message, cid, context)
                    out.append((reply, updated, 0, ""))
                except Exception as ex:  # reported per message, as Flower's engine worker does
                    code = (
                        ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                        else ErrorCode.CLIENT_APP_RAISED_EXCEPTION if isinstance(ex, ClientAppException)
                        else ErrorCode.UNKNOWN
                    )
                    out.append((None, context, code, f"{type(ex)}:<'{ex}'>"))
            return out

    class PinnedRayBackend(RayBackend):
        def build(self, app_fn: Callable[[], ClientApp]) -> None:
            # As RayBackend.build, with the batch-capable actor.
            self.pool = BasicActorPool(
                actor_type=BatchClientAppActor, client_resources=self.client_resources,
                actor_kwargs=self.actor_kwargs,
            )
            self.pool.add_actors_to_pool(self.pool.actors_capacity)
            self.app_fn = app_fn
            self.actors = tuple(self.pool.pool)
            if not self.actors:
                raise SimulationError("simulation engine", "Ray started no actor for the sites")

        @property
        def num_workers(self) -> int:
            """Engine threads handing messages to the actors: two per actor.

            Each engine thread blocks until its message's actor has answered. With one thread
            per actor (Flower's count, right for its any-idle-actor pool) two threads holding
            messages of sites pinned to the same actor left the other actor idle; with two per
            actor every actor has a call queued while messages wait (a Ray actor runs its
            calls one at a time, in order). Flower's thread pool runs at most
            ``min(32, cpus + 4)`` of them.
            """
            pool_threads = min(32, (os.cpu_count() or 1) + 4)
            return max(len(self.actors), min(2 * len(self.actors), pool_threads))

        def pinned(self, context: Context) -> tuple[int, str]:
            """The index of the actor that runs this node's site, always the same one, and the
            site's partition id (Flower's ``cid``)."""
            partition = int(str(context.node_config[PARTITION_ID_KEY]))
            return partition % len(self.actors), str(partition)

        def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
            a, cid = self.pinned(context)
            _, reply, updated = ray.get(self.actors[a].run.remote(self.app_fn, message, cid, context))  # type: ignore[attr-defined]
            return reply, updated

        def process_batch(
            self, items: list[tuple[Message, Context]], per_call: int = DEFAULT_BATCH
        ) -> list[tuple[Message | None, Context, int, str]]:
            """Run ``items``, each site in its pinned actor, at most ``per_call`` per Ray call
            (an actor runs its calls one after another, in the order they were made).

            Returns, in the order of ``items``, each message's (reply, updated context, 0, "")
            or (None, context, error code, reason); a call that fails as a whole (a lost actor)
            fails each of its messages.
            """
            from flwr.common.constant import ErrorCode

            groups: dict[int, list[int]] = {}
            cids: list[str] = []
            for i, (_, context) in enumerate(items):
                a, cid = self.pinned(context)
                groups.setdefault(a, []).append(i)
                cids.append(cid)
            calls = [
                (
                    a, idx[k : k + per_call],
                    self.actors[a].run_batch.remote(  # type: ignore[attr-defined]
                        self.app_fn, [(items[i][0], cids[i], items[i][1]) for i in idx[k : k + per_call]],
                    ),
                )
                for a, idx in groups.items()
                for k in range(0, len(idx), per_call)
            ]
            out: list[tuple[Message | None, Context, int, str]] = [
                (None, context, ErrorCode.UNKNOWN, "not run") for _, context in items
            ]
            for a, part, call in calls:
                try:
                    results = ray.get(call)
                except Exception as ex:  # the actor is gone: each of its messages failed
                    log.error("site actor %d failed a batch of %d messages: %s", a, len(part), ex)
                    results = [(None, items[i][1], ErrorCode.UNKNOWN, f"{type(ex)}:<'{ex}'>") for i in part]
                for i, result in zip(part, results, strict=True):
                    out[i] = result
            return out

    _PINNED_BACKEND = PinnedRayBackend
    return _PINNED_BACKEND


@dataclass(frozen=True)
class InMemoryLink:
    """Flower's in-memory link state with one run and registered nodes, and its grid."""

    run: Any
    state_factory: Any
    state: Any
    mapping: dict[int, int]
    grid: Any


def in_memory_link(num_nodes: int) -> InMemoryLink:
    """The engine's "network" as ``run_apps_on_engine`` sets it up: an in-memory link state
    holding one run, ``num_nodes`` registered nodes (``{node_id: partition_id}``), an
    ``InMemoryGrid`` on it, and the wake-ups of
    :func:`~fedseal.sim.flower_patches.wake_engine_on_store` and
    :func:`~fedseal.sim.flower_patches.wake_exchange_on_reply`."""
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    state_factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state: Any = state_factory.state()  # the in-memory state (its fields are written below)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    flower_patches.wake_engine_on_store(state)
    mapping = dict(_register_nodes(num_nodes=num_nodes, state_factory=state_factory))
    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)
    flower_patches.wake_exchange_on_reply(state, grid)
    return InMemoryLink(run, state_factory, state, mapping, grid)


def run_apps_on_engine(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    *,
    run_config: Mapping[str, Any] | None = None,
    on_nodes: Callable[[dict[int, int]], None] | None = None,
    backend_config: Mapping[str, Any] | None = None,
    actors: int = 1,
    pin_sites: bool = True,
    batch: int = DEFAULT_BATCH,
) -> Context:
    """Run ``server_app`` against ``num_nodes`` virtual SuperNodes running ``client_app``.

    Flower 1.42's simulation engine (in-memory link state, ``InMemoryGrid``, Ray backend), as
    ``flwr.simulation.run_simulation`` runs it, except that the nodes are registered before the
    ServerApp starts (``on_nodes`` receives ``{node_id: partition_id}`` then) and the ServerApp's
    context carries ``run_config``.

    With ``actors > 1`` the sites run in that many Ray actors (processes); with ``pin_sites``
    (needed by fedseal's ClientApp, see :func:`pinned_ray_backend`) each site always in the
    same one, and the messages waiting for an actor go to it up to ``batch`` in one Ray call
    (:func:`~fedseal.sim.flower_patches.batched_worker`; ``batch=1``: one call per message, as Flower's engine);
    otherwise in any idle one (Flower's own backend and engine: for ClientApps that keep no
    state between messages outside ``Context``).

    Raises:
        SimulationError: The ServerApp or the engine raised (the cause is chained).
    """
    from flwr.server.superlink.fleet import vce
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.simulation.run_simulation import run_serverapp_th

    if num_nodes < 1:
        raise SimulationError("arguments", "at least one node is needed")
    if not 1 <= batch <= MAX_BATCH:
        raise SimulationError("arguments", f"batch must be in [1, {MAX_BATCH}], got {batch}")
    read_environment()  # a bad FEDSEAL_* setting is named here, not in a site's actor
    link = in_memory_link(num_nodes)
    run, state_factory, mapping, grid = link.run, link.state_factory, link.mapping, link.grid
    if on_nodes is not None:
        on_nodes(dict(mapping))
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {})
    )
    f_stop = threading.Event()
    errors: queue.Queue[BaseException] = queue.Queue()
    contexts: queue.Queue[Context] = queue.Queue()
    thread = run_serverapp_th(
        server_app_attr=None, server_app=server_app, server_app_context=context, grid=grid,
        app_dir="", f_stop=f_stop, exception_queue=errors, enable_tf_gpu_growth=False,
        ctx_queue=contexts,
    )
    config = dict(backend_config or default_backend_config(actors))
    # Ray rewrites this process's environment (PYTHONPATH with its thirdparty_files and the
    # working directory, PYTHONBREAKPOINT, RAY_*); later subprocesses (another tool, a
    # benchmark's next step) must not inherit that, so it is put back when the run ends.
    saved_environ = dict(os.environ)
    try:
        if pin_sites:
            from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores, run_api

            backend_type = pinned_ray_backend()
            with flower_patches.batched_engine(batch) if batch > 1 else contextlib.nullcontext():
                run_api(
                    lambda: client_app, lambda: backend_type(config), dict(mapping), state_factory,
                    _register_node_info_stores(nodes_mapping=dict(mapping), run=run, app_dir=None),
                    f_stop, VceMetrics(),
                )
        else:
            vce.start_vce(
                backend_name="ray", backend_config_json_stream=json.dumps(config), app_dir="",
                is_app=False, f_stop=f_stop, run=run, metrics=VceMetrics(), client_app=client_app,
                state_factory=state_factory, existing_nodes_mapping=dict(mapping),
            )
    except Exception as exc:  # the engine's own failure, reported with its cause
        f_stop.set()
        thread.join()
        raise SimulationError("simulation engine", f"{type(exc).__name__}: {exc}") from exc
    finally:
        f_stop.set()
        os.environ.clear()
        os.environ.update(saved_environ)
    thread.join()
    with contextlib.suppress(queue.Empty):
        failure = errors.get_nowait()
        raise SimulationError("ServerApp", f"{type(failure).__name__}: {failure}") from failure
    try:
        return contexts.get_nowait()
    except queue.Empty:
        return context
