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

The engine (Flower's in-memory link state and Ray backend, each site pinned to one actor) is
:mod:`fedseal.sim.engine`; how each virtual site is built (re-attestation, the work the virtual
sites of one process share) is :mod:`fedseal.sim.sites`. The site code (``fedseal.client``,
torch) is imported only there, lazily, in the Ray actor processes, never in the process running
the ServerApp (``tests/test_layering.py``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseal.server.dp_round import BUDGET_REACHED
from fedseal.server.rundir import NODES_FILE, ROUNDS_FILE, STATUS_FILE
from fedseal.sim.demo import Federation, prepare_federation
from fedseal.sim.engine import DEFAULT_BATCH, MAX_ACTORS, MAX_BATCH, run_apps_on_engine
from fedseal.sim.errors import SimulationError
from fedseal.sim.sites import SimulatedSites

__all__ = [
    "MAX_SITES",
    "SimulationOutcome",
    "prepare_simulation",
    "run_fedseal_simulation",
    "run_simulate_command",
    "verify_audit_log",
]

MAX_SITES = 10_000


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
    dp: Mapping[str, object] | None = None,
    dp_site_budget: float = 0.0,
) -> Federation:
    """Split MNIST-5k over ``sites`` virtual sites and prepare keys, coordinator and roster.

    The split is ``fl-client data split mnist-5k`` (IID or Dirichlet(alpha) over labels, seeded);
    everything else is :func:`fedseal.sim.demo.prepare_federation`, as for the demo. An
    existing ``workdir`` with the same number of sites is reused (data, keys, enrolment; each
    site's privacy ledger too, so DP runs in one workdir spend the same site budgets). ``dp``:
    ``server.toml [dp]`` (every site then requires DP, with ``[privacy] epsilon_budget``
    ``dp_site_budget``, see :func:`~fedseal.sim.demo.prepare_federation`).

    Raises:
        SimulationError: Bad arguments, or the split or another preparation step failed.
    """
    if not 2 <= sites <= MAX_SITES:
        raise SimulationError("arguments", f"--sites must be in [2, {MAX_SITES}], got {sites}")
    if scheme not in ("iid", "dirichlet"):
        raise SimulationError("arguments", f"--scheme must be iid or dirichlet, got {scheme!r}")
    if not alpha > 0:
        raise SimulationError("arguments", "--alpha must be positive")
    from fedseal.server.errors import DeployError
    from fedseal.sim.demo import installed_command

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
            installed_command("fl-client"), "data", "split", "mnist-5k", str(data_dir), "--sites", str(sites),
            "--scheme", scheme, "--alpha", repr(float(alpha)), "--seed", str(seed), "--json",
        ]
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
        if out.returncode != 0:
            raise SimulationError("prepare data", (out.stderr or out.stdout).strip()[-600:])
    overrides: dict[str, object] = {"seed": seed, "sites_wait_timeout_s": 120.0, "min_sites": 2}
    overrides |= dict(run_overrides or {})
    try:
        return prepare_federation(
            workdir, num_sites=sites, run_overrides=overrides, dp=dp, dp_site_budget=dp_site_budget
        )
    except DeployError as exc:
        raise SimulationError("prepare federation", str(exc)) from exc


# --------------------------------------------------------------------------- the site side
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
        fedseal.audit.errors.AuditVerificationError: The first bad entry.
        fedseal.audit.errors.AuditLogError: The file is not a readable fedseal log.
    """
    from fedseal.audit.auditor import verify_log
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
    strategy: str = "FedAvg",
    strategy_options: Mapping[str, float] | None = None,
    dp: Mapping[str, object] | None = None,
) -> int:
    """``fl-server simulate``: prepare, run, print accuracy per round, verify the audit log.

    Returns the exit code: 0 when every round committed, or, with ``dp``, the run stopped
    committed at its privacy budget (and, when secure, the audit log verifies), 1 otherwise,
    2 for bad arguments. ``actors``: Ray actors running the sites (each site pinned to one),
    ``batch``: messages per Ray call to an actor at most (see :func:`run_apps_on_engine`);
    ``strategy``/``strategy_options``: ``server.toml [run] strategy`` and
    ``[run.strategy_options]``; ``dp``: ``server.toml [dp]`` (secure runs only).
    """
    if not 1 <= actors <= MAX_ACTORS:
        echo(f"error: --actors must be in [1, {MAX_ACTORS}], got {actors}")
        return 2
    if not 1 <= batch <= MAX_BATCH:
        echo(f"error: --batch must be in [1, {MAX_BATCH}], got {batch}")
        return 2
    if dp is not None and not secure:
        echo("error: --dp: distributed DP adds its noise inside the secure sum (drop --plain)")
        return 2
    from fedseal.server.strategies import StrategyError, check_strategy

    try:
        check_strategy(strategy)
    except StrategyError as exc:
        echo(f"error: --strategy: {exc}")
        return 2
    import tempfile

    from fedseal.audit.errors import AuditError
    from fedseal.crypto.errors import CryptoError

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="fedseal-sim-"))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    echo(
        f"fedseal simulate: {sites} virtual sites, MNIST-5k split {scheme}"
        f"{f' alpha={alpha}' if scheme == 'dirichlet' else ''} seed {seed}, model {model}, "
        f"{rounds} {'secure' if secure else 'PLAIN (updates in the clear)'} rounds, strategy {strategy}"
        + (f", distributed DP epsilon {dp.get('epsilon')} at delta {dp.get('delta')}" if dp else "")
        + f", in {workdir}"
    )
    try:
        fed = prepare_simulation(
            workdir, sites=sites, scheme=scheme, alpha=alpha, seed=seed,
            run_overrides={
                "rounds": rounds, "secure": secure, "model": model, "stage_timeout_s": 300.0,
                "strategy": strategy, "strategy_options": dict(strategy_options or {}),
            },
            dp=dp,
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
    budget_stop = dp is not None and bool(committed) and str(outcome.status.get("stopped", "")).startswith(BUDGET_REACHED)
    if dp is not None:
        eps = ", ".join(f"{float(r['dp_epsilon']):.3g}" for r in committed if "dp_epsilon" in r)
        echo(
            f"distributed DP: epsilon after each round {eps or 'none'} (delta {dp.get('delta')}, run budget "
            f"{dp.get('epsilon')})" + ("; the run stopped at its privacy budget" if budget_stop else "")
        )
    echo(f"final model: {outcome.model}")
    ok = len(committed) == rounds or budget_stop
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
