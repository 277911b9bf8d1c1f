"""``fl-server simulate``: the coordinator's ServerApp and the sites' ClientApp on Flower's
simulation engine, N virtual sites over a split of MNIST-5k.

Usage::

    from fedseal.sim.simulate import prepare_simulation, run_fedseal_simulation
    fed = prepare_simulation(Path("/tmp/sim"), sites=10, scheme="dirichlet", alpha=0.5, seed=1,
                             run_overrides={"rounds": 5, "secure": True})
    outcome = run_fedseal_simulation(fed)
    outcome.rounds[-1]["accuracy"], outcome.audit_log

What is the same as a real run (``fl-server run`` + ``fl-client run``): the federation is
prepared by :func:`fedseal.sim.demo.prepare_federation` (per-site Parquet datasets with their
own manifest and salt, site keys, the coordinator key, ``server.toml``, enrolment with the
approved dataset roots); the coordinator is the installed ``fedseal.server.flower_app:app``
(secure rounds, checkpoints, ``rounds.jsonl``, the signed audit log ``state/audit.sqlite``);
each virtual site runs ``fedseal.client.flower_app.make_client_app`` over a
``SiteRuntime`` built from its ``client.toml`` after re-attesting its dataset (a changed
dataset is refused as ``fl-client run`` refuses it).

What differs: no TLS, no SuperNode authentication and no network (Flower's in-memory link
state and its Ray backend carry the messages); node ids are registered before the ServerApp
starts so ``nodes.json`` maps them to enrolled sites (the real run gets them from
``flwr supernode register``); site audit receipts are off (there is no audit service to ask).

Engine details (Flower 1.42): this module does what ``flwr.simulation.run_simulation`` does
(in-memory ``LinkState``, an ``InMemoryGrid``, the ServerApp in a thread, ``vce.start_vce``
with the Ray backend, here through ``vce_api.run_api``) with two differences, both needed by
fedseal: the nodes are registered
first (``existing_nodes_mapping``, see above) and the ServerApp's context carries the run config
(``fedseal-config``), which the public ``run_simulation`` cannot pass. The site side is by
default one Ray actor holding every virtual site (``client_resources.num_cpus`` = all CPUs):
fedseal's ClientApp keeps a secure round's client session in memory between the stages of a
round, so all messages of a site must reach the same process. With ``actors=K`` the sites run
in K actors, each site pinned to actor ``partition % K`` for the whole run
(:func:`pinned_ray_backend`; Flower's own backend would hand a message to any idle actor),
with two engine threads per actor so that no actor idles while messages for it wait, and the
messages waiting for one actor go to it together, up to 8 in one Ray call
(:func:`_batched_worker`; each Ray call cost the engine a few milliseconds of its own, per
message and per exchange: at N = 100 that was half of a plain FedAvg round here).
Ray pickles the ClientApp for every message; :class:`SimulatedSites` pickles to a reference
that each actor resolves to one cached set of site runtimes per process (built lazily: an
actor builds only the sites pinned to it).

Shared signature checks: every secure site verifies all N signed key adverts and a majority of
the N survivor signatures (DESIGN §5), so N virtual sites in one process made N^2 checks of
the same N signatures, one after another (at N = 100 about 15-20 ms of each site's ~100 ms of
CPU per round). Each actor process therefore turns on
:func:`fedseal.crypto.signing.share_verified`: a verification that succeeded for exactly the
same key, message and signature bytes is not repeated; failures are never remembered, so what
every site accepts or refuses is unchanged. Likewise
:func:`fedseal.protocol.memo.share_decoded`: the broadcast messages (setup, advert bundle,
survivor set, unmask request) are decoded, and each round's neighbour graph built, once per
process, not once per virtual site (pure functions of their bytes, frozen results, failures
never kept). A deployed site is its own process and does all of it itself.
``FEDSEAL_SIM_SHARE_VERIFIED=0`` turns both off (to measure a site's full cost).

Layering: the coordinator's modules never import ``fedseal.client`` or torch
(``tests/test_layering.py``). Simulation is the one place where the site code runs in the
coordinator's program; it is loaded by module name, as Flower loads any ClientApp, and only in
the Ray actor process, never in the process running the ServerApp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedseal.server.flower_app import NODES_FILE, ROUNDS_FILE, STATUS_FILE
from fedseal.sim.demo import Federation, prepare_federation

__all__ = [
    "SimulatedSites",
    "SimulationError",
    "SimulationOutcome",
    "content_bytes",
    "default_backend_config",
    "message_bytes",
    "pinned_ray_backend",
    "prepare_simulation",
    "run_apps_on_engine",
    "run_fedseal_simulation",
]

log = logging.getLogger("fedseal.sim.simulate")

SITE_APP_MODULE = "fedseal.client.flower_app"
"""The installed ClientApp factory every virtual site runs (``make_client_app``)."""

MAX_SITES = 10_000

MAX_ACTORS = 64
MAX_BATCH = 256
DEFAULT_BATCH = 8
"""Messages one Ray call hands a site actor at most (``run_apps_on_engine(batch=...)``)."""

#: ``0`` makes each virtual site repeat every signature check (see the module docstring).
SHARE_VERIFIED_ENV = "FEDSEAL_SIM_SHARE_VERIFIED"
PROFILE_ENV = "FEDSEAL_SIM_PROFILE"
"""Set to a directory: every virtual site's ClientApp calls run under cProfile, and each site
process writes its accumulated profile to ``DIR/sites-PID.prof`` every ``PROFILE_EVERY`` calls
(a development aid: the calls after the last write are not in the file)."""
PROFILE_EVERY = 50


class SimulationError(Exception):
    """Preparing or running a simulation failed (the message names the step)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def shares_verified(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the virtual sites of one process share their signature checks
    (:data:`SHARE_VERIFIED_ENV`: unset or ``1`` yes, ``0`` no).

    Raises:
        SimulationError: The variable holds anything else.
    """
    value = env.get(SHARE_VERIFIED_ENV, "1")
    if value not in ("0", "1"):
        raise SimulationError("arguments", f"{SHARE_VERIFIED_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


@dataclass(frozen=True, slots=True)
class SimulationOutcome:
    """What a finished simulation left behind.

    Attributes:
        status: ``status.json`` of the coordinator (phase, final model, audit log).
        rounds: The lines of ``rounds.jsonl``, one per round, in order.
        model: Path of the final model checkpoint, if any.
        audit_log: Path of the signed audit log (secure runs), if any.
        seconds: Wall time of the whole simulation (engine start-up included).
    """

    status: Mapping[str, Any]
    rounds: tuple[Mapping[str, Any], ...]
    model: str | None
    audit_log: str | None
    seconds: float


# --------------------------------------------------------------------------- preparation


def prepare_simulation(
    workdir: Path,
    *,
    sites: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 1,
    run_overrides: Mapping[str, object] | None = None,
) -> Federation:
    """Split MNIST-5k over ``sites`` virtual sites and prepare keys, coordinator and roster.

    The split is ``fl-client data split mnist-5k`` (IID or Dirichlet(alpha) over labels, seeded);
    everything else is :func:`fedseal.sim.demo.prepare_federation`, as for the demo. An
    existing ``workdir`` with the same number of sites is reused (data, keys, enrolment).

    Raises:
        SimulationError: Bad arguments, or the split or another preparation step failed.
    """
    if not 2 <= sites <= MAX_SITES:
        raise SimulationError("arguments", f"--sites must be in [2, {MAX_SITES}], got {sites}")
    if scheme not in ("iid", "dirichlet"):
        raise SimulationError("arguments", f"--scheme must be iid or dirichlet, got {scheme!r}")
    if not alpha > 0:
        raise SimulationError("arguments", "--alpha must be positive")
    from fedseal.server.deploy import DeployError
    from fedseal.sim.demo import _bin

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    if data_dir.exists():
        have = sum(1 for p in data_dir.iterdir() if (p / "fedseal-manifest.json").exists())
        if have != sites:
            raise SimulationError(
                "prepare data", f"{data_dir} holds {have} site datasets, not {sites}; use another --workdir"
            )
    else:
        argv = [
            _bin("fl-client"), "data", "split", "mnist-5k", str(data_dir), "--sites", str(sites),
            "--scheme", scheme, "--alpha", repr(float(alpha)), "--seed", str(seed), "--json",
        ]
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
        if out.returncode != 0:
            raise SimulationError("prepare data", (out.stderr or out.stdout).strip()[-600:])
    overrides: dict[str, object] = {"seed": seed, "sites_wait_timeout_s": 120.0, "min_sites": 2}
    overrides |= dict(run_overrides or {})
    try:
        return prepare_federation(workdir, num_sites=sites, run_overrides=overrides)
    except DeployError as exc:
        raise SimulationError("prepare federation", str(exc)) from exc


# --------------------------------------------------------------------------- the site side


def message_bytes(message: Message) -> int:
    """Payload bytes of a reply (:func:`content_bytes` of its content; 0 for an error reply)."""
    return 0 if message.has_error() else content_bytes(message.content)


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content: array buffers, bytes and strings, 8 per number.

    The same count for every kind of reply (fedseal plain or secure, Flower's SecAgg+), used to
    compare what a site uploads; transport framing (protobuf, HTTP) is not included.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) for arr in record.values())
        elif isinstance(record, ConfigRecord | MetricRecord):
            for value in record.values():
                total += _value_bytes(value)
    return total


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


_PROCESS_SITES: dict[tuple[Any, ...], SimulatedSites] = {}
_PROCESS_LOCK = threading.Lock()


def _sites_in_this_process(
    site_dirs: tuple[str, ...], extra_models: tuple[str, ...], traffic_log: str | None,
    factory: str | None,
) -> SimulatedSites:
    """Unpickling target of :class:`SimulatedSites`: one cached instance per process."""
    key = (site_dirs, extra_models, traffic_log, factory)
    with _PROCESS_LOCK:
        sites = _PROCESS_SITES.get(key)
        if sites is None:
            sites = _PROCESS_SITES[key] = SimulatedSites(site_dirs, extra_models, traffic_log, factory)
        return sites


class SimulatedSites(ClientApp):
    """One ClientApp object for every virtual site: node partition ``i`` is ``site_dirs[i]``.

    Each site's ClientApp is built on first use, in the process that handles its messages,
    from its prepared directory (``client.toml``, ``site.key``, dataset): by default the real
    one, ``make_client_app(SiteRuntime(...))`` of :mod:`fedseal.client.flower_app`. With
    ``factory`` (``"module:callable"``, called as ``factory(site_dir)``) another ClientApp is
    built instead (the benchmark's Flower SecAgg+ baseline). ``extra_models`` are added to the
    models the sites allow (the benchmark's models of a given size). With ``traffic_log``, one
    JSON line per reply (partition, message type, the Unix time the site's ClientApp started on
    it, :func:`message_bytes`, wall seconds and CPU seconds of the calling thread the ClientApp
    took, the process that ran it) is
    appended there. CPU seconds do not count time the thread waited for a busy core, so they
    compare site work across runs on a shared machine.
    """

    def __init__(
        self, site_dirs: tuple[str, ...], extra_models: tuple[str, ...] = (),
        traffic_log: str | None = None, factory: str | None = None,
    ) -> None:
        super().__init__()
        self.site_dirs = tuple(site_dirs)
        self.extra_models = tuple(extra_models)
        self.traffic_log = traffic_log
        self.factory = factory
        self._apps: dict[int, ClientApp] = {}
        self._lock = threading.Lock()
        self._profiler: Any = None
        self._profiled_calls = 0

    def __reduce__(self) -> tuple[Any, ...]:
        return (_sites_in_this_process, (self.site_dirs, self.extra_models, self.traffic_log, self.factory))

    def site_app(self, partition: int) -> ClientApp:
        """The ClientApp of virtual site ``partition`` (built on first use).

        Raises:
            SimulationError: The partition is unknown, or the site cannot start (its dataset
                changed since approval, its key or data cannot be read).
        """
        with self._lock:
            app = self._apps.get(partition)
            if app is None:
                if not 0 <= partition < len(self.site_dirs):
                    raise SimulationError("site", f"no virtual site for partition {partition}")
                app = self._apps[partition] = self._build(Path(self.site_dirs[partition]))
            return app

    def _build(self, site_dir: Path) -> ClientApp:
        if self.factory is not None:
            module_name, _, attr = self.factory.partition(":")
            built = getattr(importlib.import_module(module_name), attr)(site_dir)
            if not isinstance(built, ClientApp):
                raise SimulationError("site", f"{self.factory} did not return a ClientApp")
            return built
        return _real_site_app(site_dir, self.extra_models)

    def __call__(self, message: Message, context: Context) -> Message:
        partition = int(str(context.node_config["partition-id"]))
        t0, cpu0, t_start = time.perf_counter(), time.thread_time(), time.time()
        profile_dir = os.environ.get(PROFILE_ENV)
        if profile_dir:
            reply = self._profiled(Path(profile_dir), partition, message, context)
        else:
            reply = self.site_app(partition)(message, context)
        if self.traffic_log is not None:
            line = json.dumps(
                {
                    "site": partition, "type": message.metadata.message_type, "start": round(t_start, 6),
                    "bytes": message_bytes(reply), "seconds": round(time.perf_counter() - t0, 6),
                    "cpu_seconds": round(time.thread_time() - cpu0, 6), "pid": os.getpid(),
                }
            )
            with open(self.traffic_log, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        return reply


    def _profiled(self, profile_dir: Path, partition: int, message: Message, context: Context) -> Message:
        """Run one site's ClientApp under cProfile, adding to this process's profile file."""
        import cProfile

        profiler = self._profiler
        if profiler is None:
            profiler = self._profiler = cProfile.Profile()
        profiler.enable()
        try:
            return self.site_app(partition)(message, context)
        finally:
            profiler.disable()
            self._profiled_calls += 1
            if self._profiled_calls % PROFILE_EVERY == 0:  # writing it takes a while: not every call
                profile_dir.mkdir(parents=True, exist_ok=True)
                profiler.dump_stats(str(profile_dir / f"sites-{os.getpid()}.prof"))


def _real_site_app(site_dir: Path, extra_models: tuple[str, ...]) -> ClientApp:
    """What ``fl-client run`` builds for a site, minus the SuperNode (see module docstring)."""
    from fedseal.crypto.keys import load_private_key, load_public_key
    from fedseal.crypto.signing import share_verified
    from fedseal.protocol.memo import share_decoded

    config = importlib.import_module("fedseal.client.config")
    node = importlib.import_module("fedseal.client.node")
    site_data = importlib.import_module("fedseal.client.site_data")
    flower_app = importlib.import_module(SITE_APP_MODULE)
    cfg = config.load_client_config(site_dir / "client.toml")
    # As `fl-client run`: one intra-op thread; oversubscribed OpenMP threads are far slower on a
    # shared host (measured here: the same plain round 1 s or 8 s depending on other load).
    importlib.import_module("torch").set_num_threads(int(os.environ.get("FEDSEAL_TORCH_THREADS", "1")))
    if shares_verified():
        share_verified()  # this actor's virtual sites check each signature once (docstring)
        share_decoded()  # ... and decode each broadcast message, build each graph, once
    try:
        root = node.attest_dataset(cfg, re_enrol=False)  # refuses a dataset changed since approval
    except node.SiteRunError as exc:
        raise SimulationError(f"site {cfg.name}", str(exc)) from exc
    data = site_data.load_site_data(cfg.dataset_dir, validation_fraction=cfg.validation_fraction, seed=7)
    if data.root_hex != root:
        raise SimulationError(f"site {cfg.name}", "manifest root differs from the attested root")
    passphrase = os.environ.get(cfg.passphrase_env) if cfg.passphrase_env else None
    try:
        trust = node.site_trust(cfg)  # the site's own anchor: its pinned consortium roster
    except node.SiteRunError as exc:
        raise SimulationError(f"site {cfg.name}", str(exc)) from exc
    runtime = flower_app.SiteRuntime(
        name=cfg.name,
        data=data,
        limits=cfg.limits,
        allowed_models=tuple(cfg.allowed_models) + tuple(m for m in extra_models if m not in cfg.allowed_models),
        identity_key=load_private_key(cfg.key, passphrase.encode() if passphrase else None),
        coordinator_key=load_public_key(cfg.coordinator_key),
        receipts=None,
        # Injected for the simulation only: its virtual sites have no audit service to check
        # model commitments against, and the experiment wants their evaluation.
        privacy=dataclasses.replace(cfg.privacy, evaluate_unverified=True),
        trusted_peers=dict(trust.peers),
    )
    app: ClientApp = flower_app.make_client_app(runtime)
    return app


# --------------------------------------------------------------------------- the engine


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
    class BatchClientAppActor(VirtualClientEngineActor):  # type: ignore[misc]
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


def _batched_worker(
    messageins_queue: queue.Queue[Message],
    messageres_queue: queue.Queue[Message],
    node_info_store: Mapping[int, Any],
    backend: Any,
    f_stop: threading.Event,
    metrics: Any,
    *,
    batch: int,
) -> None:
    """Flower 1.42's engine worker (``vce_api.worker``), handing the site actors the waiting
    messages together: up to ``batch`` per actor in one Ray call (``process_batch``).

    A Ray call costs the engine a few milliseconds beyond the ClientApp's own work (measured
    here: an exchange of 10 messages of 2 ms each took 34 ms one call per message, 18 ms in one
    call per actor), paid per message and per exchange. Each message is still run by its own
    site, in its pinned actor, in arrival order; a message that raises gets an error reply
    (the coordinator sees that site drop out) exactly as with Flower's worker.
    """
    from uuid import uuid4

    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    per_call = batch * max(1, len(getattr(backend, "actors", ())))
    while not f_stop.is_set():
        try:
            taken = [messageins_queue.get(timeout=1.0)]
        except queue.Empty:
            continue
        while len(taken) < per_call:
            try:
                taken.append(messageins_queue.get_nowait())
            except queue.Empty:
                break
        items: list[tuple[Message, Context]] = []
        for message in taken:
            try:
                store = node_info_store[message.metadata.dst_node_id]
                items.append((message, store.retrieve_context(run_id=message.metadata.run_id)))
            except Exception as ex:  # no context for this node: an error reply, as Flower's worker
                log.error("no context for node %s: %s", message.metadata.dst_node_id, ex)
                reply = Message(Error(code=ErrorCode.UNKNOWN, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message)
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                messageres_queue.put(reply)
        if not items:
            continue
        started = time.perf_counter()
        try:
            results = backend.process_batch(items, per_call=batch)
        except Exception as ex:  # the backend itself failed: every message gets an error reply
            log.error("the site actors failed a batch of %d messages: %s", len(items), ex)
            results = [(None, context, ErrorCode.UNKNOWN, f"{type(ex)}:<'{ex}'>") for _, context in items]
        share = (time.perf_counter() - started) / len(items)
        for (message, _), (out, context, code, reason) in zip(items, results, strict=True):
            metrics.add_clientapp_runtime(share)
            if out is None:
                log.error("site of node %s failed: %s", message.metadata.dst_node_id, reason)
                out = Message(Error(code=code, reason=reason), reply_to=message)
            else:
                node_info_store[message.metadata.dst_node_id].update_context(
                    message.metadata.run_id, context=context
                )
            out.metadata.__dict__["_message_id"] = str(uuid4())
            messageres_queue.put(out)


@contextlib.contextmanager
def _batched_engine(batch: int) -> Any:
    """Make ``vce_api.run_api`` start :func:`_batched_worker` threads (the name it submits)."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_worker = vce_api.worker
    vce_api.worker = functools.partial(_batched_worker, batch=batch)
    try:
        yield
    finally:
        vce_api.worker = flower_worker


_WAKE_ATTR = "_fedseal_messages_stored"


def _wake_exchange_on_reply(state: Any, grid: Any) -> None:
    """Tell the ServerApp's exchange which of its messages got a reply, as each is stored.

    :func:`fedseal.server.flower_app.exchange_iter` polls with a back-off from 5 ms to 0.2 s,
    and each poll asked the link state for every pending message (work per message asked for:
    O(N^2) per stage). Here ``state.store_message_res`` records the message replied to in a
    :class:`~fedseal.server.flower_app.ReplySignal` carried by the grid; the exchange's idle
    wait ends on its event and it asks only for the replied messages (all of them still every
    poll interval).
    """
    from fedseal.server.flower_app import REPLY_SIGNAL_ATTR, ReplySignal

    signal = ReplySignal()
    store = state.store_message_res

    def store_message_res(message: Any) -> Any:
        result = store(message)
        signal.replied(str(message.metadata.reply_to_message_id))
        return result

    state.store_message_res = store_message_res
    setattr(grid, REPLY_SIGNAL_ATTR, signal)


def _one_pass_readable(state: Any) -> bool:
    """Whether ``state`` is Flower's in-memory link state with the fields
    :func:`_undelivered_one_per_node` reads (else the dispatcher asks node by node)."""
    return all(hasattr(state, name) for name in ("lock", "message_ins_store", "_check_stored_messages"))


def _undelivered_one_per_node(state: Any, nodes: Mapping[int, int]) -> list[Message]:
    """The oldest undelivered message of every node in ``nodes``, marked delivered.

    What Flower's ``state.get_message_ins(node_id=n, limit=1)`` returns for each node ``n``,
    in one pass over the stored messages instead of one pass per node (each
    ``get_message_ins`` call walks and re-checks every stored message).
    """
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store.keys())
        state._check_stored_messages(set(ids))  # drops expired ones, as get_message_ins does
        taken: set[int] = set()
        out: list[Message] = []
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None:
                continue
            node = msg.metadata.dst_node_id
            if msg.metadata.delivered_at == "" and node in nodes and node not in taken:
                taken.add(node)
                out.append(msg)
        delivered_at = now().isoformat()
        for msg in out:
            msg.metadata.delivered_at = delivered_at
    return out


def _wake_engine_on_store(state: Any) -> None:
    """Make the engine dispatch a message as soon as the ServerApp stores it, in one pass.

    Flower 1.42's engine moves messages from the link state to its workers in
    ``vce_api.add_messages_to_queue``, which asks every node for a message and then sleeps a
    fixed 0.1 s: each protocol stage waited up to that long before any site saw its message (a
    secure round has five stages, plain FedAvg one). Here ``state.store_message_ins`` sets an
    event and the dispatcher (rebound in ``vce_api``, the name ``run_api`` calls) waits on it
    instead, still at most 0.1 s so that ``f_stop`` is seen as before. And each look is one
    pass over the stored messages (:func:`_undelivered_one_per_node`): Flower's
    ``get_message_ins`` walks every stored message per call, so asking N nodes cost O(N^2)
    checks per look; woken per stored message, that was O(N^3) per stage, and at N = 100 the
    dispatcher was the busiest thread of the ServerApp's process (py-spy). States without the
    event (another caller's run in this process) keep Flower's fixed tick; states without the
    fields the one pass reads are asked node by node. Applied to every arm of a run alike.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(state, _WAKE_ATTR, None) is None:
        wake = threading.Event()
        store = state.store_message_ins

        def store_message_ins(message: Any) -> Any:
            result = store(message)
            wake.set()
            return result

        state.store_message_ins = store_message_ins
        setattr(state, _WAKE_ATTR, wake)
    if getattr(vce_api.add_messages_to_queue, "fedseal_wakes", False):
        return

    def add_messages_to_queue(
        state: Any, queue: Any, nodes_mapping: Mapping[int, int], f_stop: threading.Event
    ) -> None:
        wake: threading.Event | None = getattr(state, _WAKE_ATTR, None)
        one_pass = _one_pass_readable(state)
        while not f_stop.is_set():
            if wake is not None:
                wake.clear()  # before the look: a message stored during it wakes the next one
            if one_pass:
                msgs = _undelivered_one_per_node(state, nodes_mapping)
            else:
                msgs = [m for n in nodes_mapping for m in state.get_message_ins(node_id=n, limit=1)]
            for msg in msgs:
                queue.put(msg)
            if msgs and wake is not None:
                continue  # a node may hold another message: look again at once
            (wake if wake is not None else f_stop).wait(0.1)

    add_messages_to_queue.fedseal_wakes = True  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue


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
    ``InMemoryGrid`` on it, and the wake-ups of :func:`_wake_engine_on_store` and
    :func:`_wake_exchange_on_reply`."""
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
    state = state_factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    _wake_engine_on_store(state)
    mapping = dict(_register_nodes(num_nodes=num_nodes, state_factory=state_factory))
    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)
    _wake_exchange_on_reply(state, grid)
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
    (:func:`_batched_worker`; ``batch=1``: one call per message, as Flower's engine);
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
    shares_verified()  # a bad setting is named here, not in a site's actor
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
            with _batched_engine(batch) if batch > 1 else contextlib.nullcontext():
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


def run_fedseal_simulation(
    fed: Federation,
    *,
    backend_config: Mapping[str, Any] | None = None,
    extra_models: tuple[str, ...] = (),
    traffic_log: Path | None = None,
    actors: int = 1,
    site_factory: str | None = None,
    batch: int = DEFAULT_BATCH,
) -> SimulationOutcome:
    """Run the prepared federation's ServerApp and ClientApp on the simulation engine.

    Returns after the ServerApp finished; every round is in ``outcome.rounds`` (also printed by
    the ServerApp as ``fedseal: round ...`` lines). ``site_factory`` (``"module:callable"``,
    importable in the engine's processes) builds each virtual site's ClientApp from its
    directory instead of the real one: fault injection in tests.

    Raises:
        SimulationError: The engine or the ServerApp failed (e.g. too few sites answered).
    """
    from fedseal.server.config import load_server_config
    from fedseal.server.flower_app import app as server_app

    cfg = load_server_config(fed.server_toml)
    state_dir = cfg.coordinator.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in (NODES_FILE, ROUNDS_FILE, STATUS_FILE):
        (state_dir / stale).unlink(missing_ok=True)
    sites = tuple(str(p) for p in fed.sites)
    names = [Path(p).name for p in sites]

    def write_nodes(mapping: dict[int, int]) -> None:
        doc = {str(node): names[part] for node, part in mapping.items()}
        (state_dir / NODES_FILE).write_text(json.dumps(doc, indent=1))

    client_app = SimulatedSites(sites, extra_models, str(traffic_log) if traffic_log else None, site_factory)
    t0 = time.monotonic()
    run_apps_on_engine(
        server_app, client_app, len(sites),
        run_config={"fedseal-config": str(fed.server_toml), "fedseal-resume": False},
        on_nodes=write_nodes, backend_config=backend_config, actors=actors, pin_sites=True, batch=batch,
    )
    seconds = time.monotonic() - t0
    status = json.loads((state_dir / STATUS_FILE).read_text()) if (state_dir / STATUS_FILE).exists() else {}
    rounds_path = state_dir / ROUNDS_FILE
    rounds = tuple(
        json.loads(line) for line in (rounds_path.read_text().splitlines() if rounds_path.exists() else ())
        if line.strip()
    )
    return SimulationOutcome(
        status=status, rounds=rounds, model=status.get("model"), audit_log=status.get("audit_log"),
        seconds=seconds,
    )


# --------------------------------------------------------------------------- the command


def verify_audit_log(fed: Federation, audit_log: Path) -> Any:
    """Verify ``audit_log`` with ``fl-audit verify``'s library entry point, pinning the
    coordinator's public key; returns its ``VerifiedLog``.

    Raises:
        fedseal.audit.log.AuditVerificationError: The first bad entry.
        fedseal.audit.store.AuditLogError: The file is not a readable fedseal log.
    """
    from fedseal.audit.cli import verify_log
    from fedseal.crypto.keys import load_public_key

    pub = load_public_key(fed.server_toml.parent / "coordinator.pub")
    return verify_log(audit_log, coordinator_key=pub)


def run_simulate_command(
    *,
    sites: int,
    rounds: int,
    scheme: str,
    alpha: float,
    seed: int,
    model: str,
    secure: bool,
    workdir: Path | None,
    echo: Callable[[str], None],
    actors: int = 1,
    batch: int = DEFAULT_BATCH,
) -> int:
    """``fl-server simulate``: prepare, run, print accuracy per round, verify the audit log.

    Returns the exit code: 0 when every round committed (and, when secure, the audit log
    verifies), 1 otherwise, 2 for bad arguments. ``actors``: Ray actors running the sites
    (each site pinned to one), ``batch``: messages per Ray call to an actor at most (see
    :func:`run_apps_on_engine`).
    """
    if not 1 <= actors <= MAX_ACTORS:
        echo(f"error: --actors must be in [1, {MAX_ACTORS}], got {actors}")
        return 2
    if not 1 <= batch <= MAX_BATCH:
        echo(f"error: --batch must be in [1, {MAX_BATCH}], got {batch}")
        return 2
    import tempfile

    from fedseal.audit.log import AuditError
    from fedseal.crypto.errors import CryptoError

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="fedseal-sim-"))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    echo(
        f"fedseal simulate: {sites} virtual sites, MNIST-5k split {scheme}"
        f"{f' alpha={alpha}' if scheme == 'dirichlet' else ''} seed {seed}, model {model}, "
        f"{rounds} {'secure' if secure else 'PLAIN (updates in the clear)'} rounds, in {workdir}"
    )
    try:
        fed = prepare_simulation(
            workdir, sites=sites, scheme=scheme, alpha=alpha, seed=seed,
            run_overrides={"rounds": rounds, "secure": secure, "model": model, "stage_timeout_s": 300.0},
        )
    except SimulationError as exc:
        echo(f"error: {exc}")
        return 2 if exc.step == "arguments" else 1
    try:
        outcome = run_fedseal_simulation(fed, actors=actors, batch=batch)
    except SimulationError as exc:
        echo(f"error: {exc}")
        return 1
    committed = [r for r in outcome.rounds if r.get("outcome") == "committed"]
    accs = ", ".join(f"{float(r['accuracy']):.4f}" for r in committed if "accuracy" in r)
    echo(f"{len(committed)}/{rounds} rounds committed in {outcome.seconds:.1f}s; accuracy per round: {accs}")
    echo(f"final model: {outcome.model}")
    ok = len(committed) == rounds
    if secure:
        if outcome.audit_log is None:
            echo("error: no audit log was written (see coordinator/state/serverapp.log)")
            return 1
        try:
            verified = verify_audit_log(fed, Path(outcome.audit_log))
        except (AuditError, CryptoError, OSError) as exc:
            echo(f"audit log {outcome.audit_log}: FAILED: {exc}")
            return 1
        echo(
            f"audit log {outcome.audit_log}: verifies ({verified.entries} entries, "
            f"{verified.tree_heads} signed tree heads, {verified.signatures} site signatures)"
        )
    return 0 if ok else 1
