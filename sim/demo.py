"""``fl-server demo``: a whole federation on loopback, one command.

Steps: split MNIST-5k into per-site Parquet datasets (``fl-client data split``), create each
site's key (``fl-client keys init``), create the coordinator (key, demo CA, TLS certificate),
sign a consortium roster of the sites with a roster authority key that is not the
coordinator's (``consortium/``: the sites pin its public key in ``client.toml``; the
coordinator verifies and audit-logs the roster through ``[consortium]`` in ``server.toml``),
write ``server.toml``, enroll the sites with their dataset roots, start ``fl-client run`` for
every site as a separate process, then run the coordinator (SuperLink + fleet gateway +
ServerApp) in this process, print accuracy per round, and stop every process it started.

Sites are driven through the ``fl-client`` command line (subprocesses), so this module imports
nothing from ``fedseal.client`` (the coordinator never imports torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedseal.crypto.keys import (
    generate_identity_key,
    load_private_key,
    load_public_key,
    public_key_to_der,
    save_private_key,
    save_public_key,
)
from fedseal.server.cli import init as init_cmd
from fedseal.server.cli import write_server_toml
from fedseal.server.config import load_server_config
from fedseal.server.deploy import pdeathsig_preexec, run_coordinator
from fedseal.server.errors import DeployError
from fedseal.server.live import LiveView
from fedseal.server.roster import Enrolment

__all__ = ["Federation", "free_port", "prepare_federation", "run_demo", "site_receipts", "start_site"]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (ephemeral range)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def installed_command(name: str) -> str:
    """Path of a fedseal console script (``fl-client``, ``fl-audit``) installed next to this
    interpreter: the demo and the simulation run the very install they were started from."""
    return str(Path(sys.executable).parent / name)


def _check(argv: list[str], what: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    if out.returncode != 0:
        raise DeployError(what, (out.stderr or out.stdout).strip()[-600:])
    return out.stdout


def write_client_toml(
    path: Path, *, name: str, superlink: str, ca: Path, dataset: Path, root: str, runtime_port: int,
    audit_address: str | None = None, roster: Path | None = None, authority: Path | None = None,
    allow_plain: bool = False, dp_budget: float | None = None,
) -> None:
    """``dp_budget``: the site requires distributed DP (``[privacy] dp = "required"``) and
    spends at most this ε over all its DP rounds (``epsilon_budget``)."""
    audit = [f'audit_address = "{audit_address}"'] if audit_address else []
    trust = (
        ["[trust]", f'roster = "{roster}"', f'roster_authority = "{authority}"', ""]
        if roster is not None and authority is not None
        else []
    )
    # The safe default is allow_plain = false; only a plain (comparison) run opts in.
    privacy = ["[privacy]", "allow_plain = true", ""] if allow_plain else []
    if dp_budget is not None:
        privacy = [
            *(privacy[:-1] or ["[privacy]"]), 'dp = "required"', f"epsilon_budget = {dp_budget!r}", ""
        ]
    path.write_text(
        "\n".join(
            [
                "[site]",
                f'name = "{name}"',
                'key = "site.key"',
                'state_dir = "state"',
                "",
                "[coordinator]",
                f'superlink = "{superlink}"',
                f'ca_cert = "{ca}"',
                f'public_key = "{ca.parent.parent / "coordinator.pub"}"',
                *audit,
                "",
                "[data]",
                f'dataset_dir = "{dataset}"',
                f'approved_root = "{root}"',
                "",
                *privacy,
                *trust,
                "[runtime]",
                f"port = {runtime_port}",
                "",
            ]
        )
    )


@dataclass(frozen=True, slots=True)
class Federation:
    """A prepared loopback federation: coordinator directory and site directories."""

    workdir: Path
    server_toml: Path
    ca_cert: Path
    fleet_port: int
    internal_port: int
    sites: tuple[Path, ...]  # each holds client.toml, site.key(.pub); data under workdir/data
    audit_port: int | None = None  # the coordinator's audit service (secure runs)


def site_receipts(site_dir: Path) -> list[dict[str, object]]:
    """The receipts a prepared site verified (its ``state/receipts/receipts.jsonl``), in order.

    Raises:
        ValueError: If the file holds a line that is not JSON.
    """
    path = site_dir / "state" / "receipts" / "receipts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_federation(
    workdir: Path,
    *,
    num_sites: int,
    run_overrides: dict[str, object] | None = None,
    fleet_port: int | None = None,
    internal_port: int | None = None,
    dp: Mapping[str, object] | None = None,
    dp_site_budget: float = 0.0,
) -> Federation:
    """Split MNIST-5k over ``num_sites``, create keys, the coordinator, enroll every site.
    ``dp``: a ``[dp]`` section for ``server.toml`` (its keys and values; ``enabled`` is set),
    and every site then requires DP with ``[privacy] epsilon_budget`` ``dp_site_budget`` (0:
    :data:`DEMO_SITE_BUDGET`, or 1.25 times the run's ε when that is more).

    Idempotent for an existing ``workdir`` (data, keys and enrolment are reused; ports and
    ``server.toml`` are rewritten).

    Raises:
        DeployError: A preparation step failed (its output is in the message).
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sites_dir = workdir / "data"
    if not sites_dir.exists():
        out = _check(
            [installed_command("fl-client"), "data", "split", "mnist-5k", str(sites_dir), "--sites", str(num_sites),
             "--seed", "1", "--json"],
            "prepare data",
        )
        split = json.loads(out)["sites"]
    else:
        split = [
            {"dir": str(p), "root": json.loads((p / "fedseal-manifest.json").read_text())["root"]}
            for p in sorted(sites_dir.iterdir())
        ]
    coord = workdir / "coordinator"
    if not (coord / "server.toml").exists():
        init_cmd(coord, san=["localhost", "127.0.0.1"], passphrase_env=None)
    fleet_port = fleet_port or free_port()
    internal_port = internal_port or free_port()
    secure = bool((run_overrides or {}).get("secure", True))
    audit_port = free_port() if secure else None
    names = [f"site-{i}" for i in range(len(split))]
    for name in names:
        sdir = workdir / "sites" / name
        sdir.mkdir(parents=True, exist_ok=True)
        if not (sdir / "site.key").exists():  # what `fl-client keys init` does, without a process
            site_key = generate_identity_key()
            save_private_key(site_key, sdir / "site.key")
            save_public_key(site_key.public_key(), sdir / "site.key.pub")
    consortium_roster, authority = write_consortium_roster(
        workdir / "consortium", {name: workdir / "sites" / name / "site.key.pub" for name in names}
    )
    write_server_toml(
        coord / "server.toml",
        fleet_port=fleet_port,
        internal_port=internal_port,
        metrics_port=0,
        fleet_host="127.0.0.1",
        audit_host="127.0.0.1",
        audit_port=audit_port or free_port(),
        run_overrides={"sites_wait_timeout_s": 60.0} | (run_overrides or {}),
        consortium=(consortium_roster, authority),
    )
    if dp is not None:
        with (coord / "server.toml").open("a") as fh:
            fh.write("\n".join(["", "[dp]", "enabled = true", *_toml_items(dp), ""]))
    cfg = load_server_config(coord / "server.toml")
    roster = Enrolment.load_or_create(cfg.coordinator.roster)
    ca = coord / "tls" / "ca.pem"
    site_dirs = []
    for name, site in zip(names, split, strict=True):
        sdir = workdir / "sites" / name
        if roster.get(name) is None:
            roster = roster.enroll(
                name, load_public_key(sdir / "site.key.pub"), [site["root"]], now_ms=int(time.time() * 1000)
            )
        write_client_toml(
            sdir / "client.toml", name=name, superlink=f"localhost:{fleet_port}", ca=ca,
            dataset=Path(site["dir"]).resolve(), root=site["root"], runtime_port=free_port(),
            audit_address=f"localhost:{audit_port}" if audit_port else None,
            roster=consortium_roster, authority=authority, allow_plain=not secure,
            dp_budget=_site_budget(dp, dp_site_budget) if dp is not None else None,
        )
        site_dirs.append(sdir)
    roster.save(cfg.coordinator.roster)
    return Federation(
        workdir, coord / "server.toml", ca, fleet_port, internal_port, tuple(site_dirs), audit_port
    )


def _site_budget(dp: Mapping[str, object], given: float) -> float:
    if given > 0:
        return given
    epsilon = dp.get("epsilon", 0.0)
    return max(DEMO_SITE_BUDGET, 1.25 * float(epsilon) if isinstance(epsilon, int | float) else 0.0)


def set_allow_plain(site_dirs: tuple[Path, ...] | list[Path], allow: bool) -> None:
    """Rewrite prepared sites' ``client.toml`` (as :func:`write_client_toml` wrote it) to allow
    or refuse plain training: the opt-in a plain comparison run (``--plain``, benchmarks) needs."""
    block = "[privacy]\nallow_plain = true\n\n"
    for site_dir in site_dirs:
        path = Path(site_dir) / "client.toml"
        text = path.read_text().replace(block, "")
        if allow:
            text = text.replace("[runtime]\n", block + "[runtime]\n", 1)
        path.write_text(text)


def write_consortium_roster(directory: Path, site_keys: dict[str, Path]) -> tuple[Path, Path]:
    """Stand in for the consortium's governance: an authority key (not the coordinator's) and
    the roster of ``site_keys`` it signs. Returns (roster file, authority public key file).

    What ``fl-client roster authority-init`` and ``fl-client roster create --site ...`` do; the
    authority key is reused if present, the roster re-signed (a new version) when its sites
    change.
    """
    from fedseal.protocol.consortium import (
        ConsortiumRoster,
        ConsortiumSite,
        SignedConsortiumRoster,
    )

    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path, roster_path = directory / "authority.key", directory / "authority.key.pub", directory / "roster.json"
    if not key_path.exists():
        authority = generate_identity_key()
        save_private_key(authority, key_path)
        save_public_key(authority.public_key(), pub_path)
    authority_key = load_private_key(key_path)
    sites = tuple(
        ConsortiumSite(name, public_key_to_der(load_public_key(path))) for name, path in sorted(site_keys.items())
    )
    version = 1
    if roster_path.exists():
        old = SignedConsortiumRoster.from_json(roster_path.read_bytes()).verify(authority_key.public_key())
        if old.sites == sites:
            return roster_path, pub_path
        version = old.version + 1
    roster = ConsortiumRoster("fedseal-demo", version, int(time.time() * 1000), sites)
    roster_path.write_text(SignedConsortiumRoster.sign(roster, authority_key).to_json())
    return roster_path, pub_path


def start_site(site_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start ``fl-client run`` for a prepared site in its own process group (log: fl-client.log)."""
    with (site_dir / "fl-client.log").open("ab") as log:
        return subprocess.Popen(
            [installed_command("fl-client"), "run", "--config", str(site_dir / "client.toml"), *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=pdeathsig_preexec,
        )


def _verify_audit_log(console: Console, log: Path, pub: Path) -> bool:
    """What an auditor does: ``fl-audit verify`` against the coordinator's public key (the trust
    anchor the sites pin), then print the commands to do it by hand. Returns whether it held."""
    from fedseal.audit.auditor import verify_log
    from fedseal.audit.errors import AuditLogError, AuditVerificationError

    try:
        result = verify_log(log, coordinator_key=load_public_key(pub))
    except (AuditVerificationError, AuditLogError, OSError) as exc:
        console.print(f"[red]audit log verification failed[/red]: {escape(str(exc))}")
        return False
    console.print(
        f"audit log verified against the pinned coordinator key: {result.entries} entries, "
        f"{result.tree_heads} signed tree heads, {result.signatures} site signatures, "
        f"{result.evaluations} round evaluations"
    )
    fl_audit = installed_command("fl-audit")
    hint = f"{fl_audit} verify {log} --coordinator-key {pub}"
    console.print(f"verify it yourself: {escape(hint)}", soft_wrap=True)
    console.print(f"rounds with their accuracy: {escape(f'{fl_audit} show {log}')}", soft_wrap=True)
    return True


def _toml_items(table: Mapping[str, object]) -> list[str]:
    return [
        f"{k} = {'true' if v is True else 'false' if v is False else repr(v)}"
        for k, v in table.items()
        if k != "enabled"
    ]


DEMO_DP: dict[str, object] = {"epsilon": 8.0, "delta": 1e-6, "clip": 1.0}
"""``fl-server demo --dp``'s ``[dp]``: a modest run budget (ε = 8 at δ = 1e-6 over the run's
rounds); the noise multiplier and granularity are derived per round (server/dp_round.py)."""
DEMO_SITE_BUDGET = 10.0
"""Each demo site's ``[privacy] epsilon_budget``: above the run's ε, so one run fits."""


def run_demo(
    *, workdir: Path | None, rounds: int, num_sites: int, console: Console, secure: bool = True,
    setup_with_evaluation: bool = True, dp: bool = False,
) -> int:
    """Run the demo; return the process exit code."""
    t_start = time.monotonic()
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="fedseal-demo-")
        workdir = Path(tmp)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]fedseal demo[/bold] in {workdir}")
    console.print(
        "Secure rounds (SecAgg+, signed envelopes, dataset roots checked against the roster) "
        "over Flower with TLS and SuperNode key authentication; every envelope, round result "
        "and checkpoint goes into the signed Merkle audit log (checked at the end with "
        "`fl-audit verify` against the pinned coordinator key)."
        if secure
        else "[yellow]--plain:[/yellow] updates reach the coordinator in the clear (inside TLS)."
    )
    try:
        fed = prepare_federation(
            workdir,
            num_sites=num_sites,
            run_overrides={
                "rounds": rounds, "min_sites": 3, "stage_timeout_s": 60.0, "secure": secure,
                "setup_with_evaluation": setup_with_evaluation,
            },
            dp=DEMO_DP if dp else None,
        )
    except DeployError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    cfg = load_server_config(fed.server_toml)
    console.print(f"enrolled {len(fed.sites)} sites")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Sites start first: they load torch, re-attest their data and then wait for the
        # coordinator's gateway, which opens only once every site is registered.
        console.print("starting the sites as separate processes (fl-client run)")
        procs.extend(start_site(sdir) for sdir in fed.sites)
        with LiveView(console, cfg.run.rounds) as view:
            outcome = run_coordinator(
                cfg, resume=False, on_round=view.round, on_info=view.info, on_status=view.status
            )
    except DeployError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    accs = [r.get("accuracy") for r in outcome.rounds if r.get("outcome") == "committed"]
    console.print(f"run {outcome.status} in {time.monotonic() - t_start:.0f}s")
    if outcome.reason:
        console.print(f"[red]the run failed[/red]: {escape(outcome.reason)}")
    console.print(f"accuracy per round: {', '.join(f'{a:.3f}' for a in accs if isinstance(a, float))}")
    eps = [r.get("dp_epsilon") for r in outcome.rounds if r.get("outcome") == "committed"]
    if dp and eps and isinstance(eps[-1], float):
        console.print(
            f"distributed DP: epsilon per round {', '.join(f'{e:.3g}' for e in eps if isinstance(e, float))}"
            f" (delta {DEMO_DP['delta']:g}, run budget {DEMO_DP['epsilon']:g}; the sites' ledgers "
            f"allow {DEMO_SITE_BUDGET:g} each)"
        )
    console.print(f"final model: {outcome.model}")
    console.print(f"audit log: {outcome.audit_log or 'none (see serverapp.log)'}")
    if outcome.audit_log:
        if not _verify_audit_log(console, Path(outcome.audit_log), fed.server_toml.parent / "coordinator.pub"):
            return 1
    if fed.audit_port is not None:
        counts = {sdir.name: len(site_receipts(sdir)) for sdir in fed.sites}
        console.print(
            f"site receipts verified against signed tree heads: {sum(counts.values())} "
            f"({', '.join(f'{k} {v}' for k, v in counts.items())})"
        )
        blocked = [sdir.name for sdir in fed.sites if (sdir / "state" / "receipts" / "BLOCKED").exists()]
        if blocked:
            console.print(f"[red]receipt check failed at {', '.join(blocked)}[/red] (see their fl-client.log)")
            return 1
    console.print(f"logs: {workdir}/coordinator/state/superlink.log, {workdir}/sites/*/fl-client.log")
    if not accs:
        console.print("[red]no round committed[/red] (see the logs above)")
        return 1
    return 0 if outcome.status == "finished:completed" else 1
