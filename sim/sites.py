"""How the simulation's virtual sites are built: one ClientApp object standing for every
virtual site (:class:`SimulatedSites`), each site built on first use in the process that runs it,
by default as ``fl-client run`` builds it (:func:`real_site_app`), or by a caller's
``site_factory``.

Ray pickles the ClientApp for every message; :class:`SimulatedSites` pickles to a reference
that each actor resolves to one cached set of site runtimes per process (built lazily: an
actor builds only the sites pinned to it, see :func:`fedseal.sim.engine.pinned_ray_backend`).

Shared work: every secure site verifies all N signed key adverts and a majority of the N
survivor signatures (DESIGN §5), so N virtual sites in one process made N^2 checks of the same
N signatures, one after another (at N = 100 about 15-20 ms of each site's ~100 ms of CPU per
round). The virtual sites of one actor process therefore share one
:class:`fedseal.sim.shared_work.SharedWork`, handed to each site's session through its
``SiteRuntime.shared_work`` (the seam of :mod:`fedseal.protocol.seams`): a verification that
succeeded for exactly the same key, message and signature bytes is not repeated, and the
broadcast messages (setup, advert bundle, survivor set, unmask request) are decoded, and each
round's neighbour graph built, once per process, not once per virtual site (pure functions of
their bytes, frozen results, failures never kept). What every site accepts or refuses is
unchanged; a deployed site is its own process and does all of it itself.
``FEDSEAL_SIM_SHARE_VERIFIED=0`` turns the sharing off (to measure a site's full cost).

Settings: :class:`SimulatedSites` reads every ``FEDSEAL_*`` variable once, where it is built (the
process that starts the simulation), and carries what its sites need
(``FEDSEAL_SIM_SHARE_VERIFIED``, ``FEDSEAL_SIM_PROFILE``, ``FEDSEAL_TORCH_THREADS``) to the Ray
actor processes in its pickled reference.

Layering: the coordinator's modules never import ``fedseal.client`` or torch
(``tests/test_layering.py``). Simulation is the one place where the site code runs in the
coordinator's program; it is imported here lazily, inside the functions that build a site,
which run only in the Ray actor process, never in the process running the ServerApp.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseal.settings import DEFAULT_TORCH_THREADS, Environment, SettingsError
from fedseal.sim.errors import SimulationError
from fedseal.sim.shared_work import SharedWork

__all__ = [
    "SimulatedSites",
    "content_bytes",
    "message_bytes",
    "read_environment",
    "real_site_app",
]

#: With ``FEDSEAL_SIM_PROFILE`` set to a directory, every virtual site's ClientApp calls run
#: under cProfile, and each site process writes its accumulated profile to
#: ``DIR/sites-PID.prof`` every ``PROFILE_EVERY`` calls (a development aid: the calls after the
#: last write are not in the file).
PROFILE_EVERY = 50


def read_environment() -> Environment:
    """This process's ``FEDSEAL_*`` settings (:meth:`fedseal.settings.Environment.read`).

    Raises:
        SimulationError: A variable holds a value it does not allow (step ``arguments``).
    """
    try:
        return Environment.read()
    except SettingsError as exc:
        raise SimulationError("arguments", str(exc)) from None


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
    factory: str | None, environment: Environment,
) -> SimulatedSites:
    """Unpickling target of :class:`SimulatedSites`: one cached instance per process."""
    key = (site_dirs, extra_models, traffic_log, factory, environment)
    with _PROCESS_LOCK:
        sites = _PROCESS_SITES.get(key)
        if sites is None:
            sites = _PROCESS_SITES[key] = SimulatedSites(
                site_dirs, extra_models, traffic_log, factory, environment=environment
            )
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
    compare site work across runs on a shared machine. The real sites built by one instance
    (one per process) share one :class:`~fedseal.sim.shared_work.SharedWork` (module
    docstring), unless ``FEDSEAL_SIM_SHARE_VERIFIED`` is ``0``.

    ``environment``: the ``FEDSEAL_*`` settings the sites run with (default: read here, with
    :func:`read_environment`); the coordinator passphrase is not kept (nor pickled).

    Raises:
        SimulationError: A ``FEDSEAL_*`` variable holds a value it does not allow.
    """

    def __init__(
        self, site_dirs: tuple[str, ...], extra_models: tuple[str, ...] = (),
        traffic_log: str | None = None, factory: str | None = None,
        *, environment: Environment | None = None,
    ) -> None:
        super().__init__()
        self.site_dirs = tuple(site_dirs)
        self.extra_models = tuple(extra_models)
        self.traffic_log = traffic_log
        self.factory = factory
        if environment is None:
            environment = read_environment()
        self.environment = dataclasses.replace(environment, coordinator_passphrase=None)
        self._apps: dict[int, ClientApp] = {}
        self._lock = threading.Lock()
        self._profiler: Any = None
        self._profiled_calls = 0
        self._shared_work: SharedWork | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _sites_in_this_process,
            (self.site_dirs, self.extra_models, self.traffic_log, self.factory, self.environment),
        )

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

    @property
    def shared_work(self) -> SharedWork | None:
        """What this process's real sites share (made on first use), or ``None`` when
        ``FEDSEAL_SIM_SHARE_VERIFIED`` turns the sharing off."""
        if self._shared_work is None and self.environment.sim_share_verified:
            self._shared_work = SharedWork()
        return self._shared_work

    def _build(self, site_dir: Path) -> ClientApp:
        if self.factory is not None:
            # A caller's own ClientApp factory (tests, the benchmark's Flower baselines), named
            # as Flower names a ClientApp: imported where the site runs.
            module_name, _, attr = self.factory.partition(":")
            built = getattr(importlib.import_module(module_name), attr)(site_dir)
            if not isinstance(built, ClientApp):
                raise SimulationError("site", f"{self.factory} did not return a ClientApp")
            return built
        return real_site_app(
            site_dir, self.extra_models, self.shared_work, torch_threads=self.environment.torch_threads
        )

    def __call__(self, message: Message, context: Context) -> Message:
        partition = int(str(context.node_config["partition-id"]))
        t0, cpu0, t_start = time.perf_counter(), time.thread_time(), time.time()
        profile_dir = self.environment.sim_profile_dir
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


def real_site_app(
    site_dir: Path, extra_models: tuple[str, ...], shared_work: SharedWork | None = None,
    *, torch_threads: int = DEFAULT_TORCH_THREADS,
) -> ClientApp:
    """What ``fl-client run`` builds for a site, minus the SuperNode (see
    :mod:`fedseal.sim.simulate`); its secure sessions check and decode through ``shared_work``
    when given; torch uses ``torch_threads`` (``FEDSEAL_TORCH_THREADS``) intra-op threads."""
    import torch

    from fedseal.client import flower_app, node
    from fedseal.client.config import load_client_config
    from fedseal.client.privacy_ledger import PrivacyLedger
    from fedseal.client.site_data import load_site_data
    from fedseal.crypto.keys import load_private_key, load_public_key
    from fedseal.protocol.seams import NO_SHARING

    cfg = load_client_config(site_dir / "client.toml")
    # As `fl-client run`: one intra-op thread; oversubscribed OpenMP threads are far slower on a
    # shared host (measured here: the same plain round 1 s or 8 s depending on other load).
    torch.set_num_threads(torch_threads)
    try:
        root = node.attest_dataset(cfg, re_enrol=False)  # refuses a dataset changed since approval
    except node.SiteRunError as exc:
        raise SimulationError(f"site {cfg.name}", str(exc)) from exc
    data = load_site_data(cfg.dataset_dir, validation_fraction=cfg.validation_fraction, seed=7)
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
        # ... and the work its virtual sites share (module docstring).
        shared_work=shared_work if shared_work is not None else NO_SHARING,
        # As `fl-client run`: the DP rounds a virtual site takes part in are paid for in its
        # state directory, across simulations over the same prepared sites.
        ledger=PrivacyLedger(cfg.state_dir),
    )
    return flower_app.make_client_app(runtime)
