"""``fl-server``: the coordinator command line.

Commands: ``init`` (coordinator key, demo CA, server TLS certificate, ``server.toml``),
``enroll``, ``revoke --reason``, ``roster`` (table or ``--json``), ``roots withdraw`` /
``roots list`` (a dataset root withdrawn for erasure or withdrawn consent is never accepted
again; recorded with its reason in the roster history and, from there, the audit log),
``provision`` (one kit per site and one for the coordinator: :mod:`fedseal.server.provision`),
``status`` (sites, their floors and the run: :mod:`fedseal.server.status`), ``run`` (SuperLink +
gateway + one run), ``serve`` (the same, kept up, serving the runs ``submit`` queues), ``runs``,
``logs RUN``, ``stop RUN`` (:mod:`fedseal.server.runs_cli`), ``demo`` (everything on loopback, three sites), ``simulate`` (the same apps on Flower's
simulation engine, N virtual sites; :mod:`fedseal.sim.simulate`).

Exit codes: 0 success; 1 a run failed or was refused at a step (the message names it);
2 bad usage or configuration (the message names the key).

This module imports neither flwr nor torch at import time (``fl-audit`` shares the package).
"""

from __future__ import annotations

import os

# gRPC's fork handlers restart its event-engine threads in a forked child; this process forks
# children with a preexec_fn (SuperNode / SuperLink / sites, for PR_SET_PDEATHSIG), and the
# child's close_fds then closed the restarted poller's epoll fd under it: the child aborted
# ("epoll_wait error: Bad file descriptor", SIGABRT) before exec. The children exec at once
# and need nothing of the parent's gRPC state, so the handlers are off (before grpc loads).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # fl-server's commands import the server modules when they run
    from fedseal.server.roster import Enrolment

app = typer.Typer(
    name="fl-server",
    help="fedseal coordinator: enrol sites, run secure federated training, checkpoint.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2


def _now_ms() -> int:
    return int(time.time() * 1000)


def usage_error(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` as one line (not wrapped, not read as markup); the exit to raise."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def write_server_toml(
    path: Path,
    *,
    fleet_port: int = 9092,
    internal_port: int = 9091,
    metrics_port: int = 9464,
    fleet_host: str = "0.0.0.0",  # noqa: S104
    audit_port: int = 9095,
    audit_host: str = "0.0.0.0",  # noqa: S104
    run_overrides: dict[str, object] | None = None,
    consortium: tuple[Path, Path] | None = None,
) -> None:
    """Write a server.toml with the layout ``fl-server init`` creates (paths relative).

    ``consortium``: (signed consortium roster file, roster authority public key) for a
    ``[consortium]`` table; left out when ``None``.
    """
    run = {
        "rounds": 5,
        "strategy": "FedAvg",
        "model": "mlp",
        "seed": 0,
        "min_sites": 3,
        "epochs": 1,
        "batch_size": 32,
        "learning_rate": 0.05,
        "clip_norm": 5.0,
        "stage_timeout_s": 120.0,
        "sites_wait_timeout_s": 120.0,
    } | (run_overrides or {})

    def val(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = [
        "# fedseal coordinator configuration (fl-server run --config server.toml)",
        "[coordinator]",
        'key = "coordinator.key"',
        'state_dir = "state"',
        'roster = "roster.json"',
        "",
        "[tls]",
        'ca_cert = "tls/ca.pem"',
        'server_cert = "tls/server.pem"',
        'server_key = "tls/server.key"',
        "",
        "[network]",
        f"fleet_host = {val(fleet_host)}",
        f"fleet_port = {fleet_port}",
        f"internal_port = {internal_port}",
        'metrics_host = "127.0.0.1"',
        f"metrics_port = {metrics_port}",
        f"audit_host = {val(audit_host)}",
        f"audit_port = {audit_port}",
        "",
        "[run]",
        *(f"{k} = {val(v)}" for k, v in run.items() if not isinstance(v, Mapping)),
        "",
    ]
    for name, table in run.items():  # [run.strategy_options]: a sub-table, after [run]'s keys
        if isinstance(table, Mapping) and table:
            lines += [f"[run.{name}]", *(f"{k} = {val(v)}" for k, v in table.items()), ""]
    if consortium is not None:
        roster, authority = consortium
        lines += [
            "[consortium]",
            f"roster = {val(str(roster))}",
            f"authority = {val(str(authority))}",
            "",
        ]
    path.write_text("\n".join(lines))


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory to create the coordinator in.")],
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="DNS name or IP the sites use to reach this host (repeat)."),
    ] = None,
    passphrase_env: Annotated[
        str | None,
        typer.Option(help="Encrypt the coordinator key with the passphrase in this env variable."),
    ] = None,
) -> None:
    """Create the coordinator key, a demo CA + server TLS certificate, server.toml, a roster."""
    import os

    from fedseal.crypto.keys import generate_identity_key, key_id, save_private_key, save_public_key
    from fedseal.server.pki import create_ca, issue_server_certificate, private_key_pem
    from fedseal.server.roster import Enrolment

    directory = directory.expanduser()
    if (directory / "server.toml").exists():
        raise usage_error(f"{directory}/server.toml exists; refusing to overwrite")
    names = san or ["localhost", "127.0.0.1"]
    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise usage_error(f"environment variable {passphrase_env} is empty or unset")
        passphrase = value.encode()
    (directory / "tls").mkdir(parents=True, exist_ok=True)
    key = generate_identity_key()
    save_private_key(key, directory / "coordinator.key", passphrase)
    save_public_key(key.public_key(), directory / "coordinator.pub")
    now = datetime.now(UTC)
    ca = create_ca("fedseal demo CA", now=now)
    cert, tls_key = issue_server_certificate(ca, names, now=now)
    (directory / "tls" / "ca.pem").write_bytes(ca.certificate_pem())
    for name, data in (("ca.key", private_key_pem(ca.key)), ("server.key", tls_key)):
        p = directory / "tls" / name
        p.touch(mode=0o600)
        p.chmod(0o600)
        p.write_bytes(data)
    (directory / "tls" / "server.pem").write_bytes(cert)
    write_server_toml(directory / "server.toml")
    Enrolment().save(directory / "roster.json")
    console.print(f"coordinator key id {bytes(key_id(key.public_key())).hex()}")
    console.print(f"wrote {directory}/server.toml; give sites {directory}/tls/ca.pem")


def _config_roster(config: Path) -> tuple[object, Path]:
    from fedseal.server.config import ServerConfigError, load_server_config

    try:
        cfg = load_server_config(config)
    except ServerConfigError as exc:
        raise usage_error(f"{config}: {exc}") from exc
    return cfg, cfg.coordinator.roster


def _read_roster(config: Path) -> Enrolment:
    """The roster ``server.toml`` names (usage error, one line, if either cannot be read)."""
    from fedseal.server.roster import Enrolment, EnrolmentError

    _, roster_path = _config_roster(config)
    try:
        return Enrolment.load_or_create(roster_path)
    except EnrolmentError as exc:
        raise usage_error(str(exc)) from exc


@app.command("enroll")
def enroll(
    site: Annotated[str, typer.Option(help="Site name (a-z, 0-9, '-', '_').")],
    key: Annotated[Path, typer.Option(help="The site's public key (PEM).")],
    dataset_root: Annotated[
        list[str], typer.Option("--dataset-root", help="Approved dataset root, 64 hex (repeat).")
    ],
    config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
) -> None:
    """Enroll a site (or approve another dataset root for it). Recorded in the roster history."""
    from fedseal.crypto.errors import KeyFormatError
    from fedseal.crypto.keys import load_public_key
    from fedseal.server.roster import Enrolment, EnrolmentError

    _, roster_path = _config_roster(config)
    try:
        pub = load_public_key(key)
        roster = Enrolment.load_or_create(roster_path)
        roster = roster.enroll(site, pub, dataset_root, now_ms=_now_ms())
        roster.save(roster_path)
    except (KeyFormatError, OSError) as exc:
        raise usage_error(f"cannot read site key {key}: {exc}") from exc
    except EnrolmentError as exc:
        raise usage_error(str(exc)) from exc
    entry = roster.get(site)
    if entry is not None:
        console.print(f"enrolled {site} key id {entry.key_id_hex[:16]}… roots {len(entry.dataset_roots)}")


@app.command("revoke")
def revoke(
    site: Annotated[str, typer.Option(help="Site name.")],
    reason: Annotated[
        str,
        typer.Option(
            help="Why (one line, recorded in the roster history and the audit log), e.g. "
            "'left the consortium' or 'key compromised'."
        ),
    ] = "",
    config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
) -> None:
    """Revoke a site: it is unregistered from the SuperLink at the next `run`."""
    from fedseal.server.roster import Enrolment, EnrolmentError

    _, roster_path = _config_roster(config)
    try:
        roster = Enrolment.load_or_create(roster_path)
        roster = roster.revoke(site, reason=reason, now_ms=_now_ms())
        roster.save(roster_path)
    except EnrolmentError as exc:
        raise usage_error(str(exc)) from exc
    console.print(f"revoked {site}" + (f" ({escape(reason.strip())})" if reason.strip() else ""))


roots_app = typer.Typer(
    help="Dataset roots: withdraw one (erasure, consent withdrawn) or list them.",
    no_args_is_help=True,
)
app.add_typer(roots_app, name="roots")


@roots_app.command("withdraw")
def roots_withdraw(
    site: Annotated[str, typer.Option(help="Site name.")],
    root: Annotated[str, typer.Option(help="The dataset root to withdraw (64 hex).")],
    reason: Annotated[
        str,
        typer.Option(
            help="Why (required, one line; recorded in the audit log), e.g. 'erasure request "
            "2025-031' or 'consent withdrawn'."
        ),
    ],
    config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
) -> None:
    """Withdraw a site's approved dataset root: no round accepts it again (a running run
    refuses it from its next round on), and it can never be approved again, for any site.
    The withdrawal (time, reason) is recorded in the roster history and the audit log."""
    from fedseal.server.roster import Enrolment, EnrolmentError

    _, roster_path = _config_roster(config)
    try:
        roster = Enrolment.load_or_create(roster_path)
        roster = roster.withdraw_root(site, root, reason=reason, now_ms=_now_ms())
        roster.save(roster_path)
    except EnrolmentError as exc:
        raise usage_error(str(exc)) from exc
    entry = roster.get(site)
    left = len(entry.dataset_roots) if entry is not None else 0
    console.print(
        f"withdrew dataset root {root.lower()[:16]}… of {site} ({escape(reason.strip())}); "
        f"{left} approved root(s) left"
        + ("" if left else f"; the site needs a new root: fl-server enroll --site {site} ...")
    )


@roots_app.command("list")
def roots_list(
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List approved and withdrawn dataset roots (withdrawn: when and why)."""
    roster = _read_roster(config)
    if site is not None and roster.get(site) is None:
        raise usage_error(f"site {site!r}: no such site")
    rows: list[dict[str, object]] = []
    for s in roster.sites:
        if site is None or s.name == site:
            rows += [{"site": s.name, "root": r, "status": "approved"} for r in s.dataset_roots]
    for w in roster.withdrawn().values():
        if site is None or w.site == site:
            rows.append(
                {"site": w.site, "root": w.root, "status": "withdrawn", "time_ms": w.time_ms,
                 "reason": w.reason}
            )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"roots": rows}, indent=1))
        return
    table = Table(title="dataset roots")
    for col in ("site", "root", "status", "withdrawn", "reason"):
        table.add_column(col, overflow="fold")
    for row in rows:
        when = row.get("time_ms")
        table.add_row(
            str(row["site"]), str(row["root"]), str(row["status"]),
            "" if not isinstance(when, int)
            else datetime.fromtimestamp(when / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
            escape(str(row.get("reason", ""))),
        )  # fmt: skip
    Console().print(table)


@app.command("roster")
def roster_cmd(
    config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show enrolled sites."""
    roster = _read_roster(config)
    if as_json:
        doc = roster.to_json()
        for s in doc["sites"]:
            event = roster.revocation(s["name"])
            if event is not None:
                s["revoked_at_ms"], s["revoke_reason"] = event.time_ms, event.reason
            s["withdrawn_roots"] = [r for r, w in roster.withdrawn().items() if w.site == s["name"]]
        typer.echo(json.dumps({"sites": doc["sites"], "head": roster.digest().hex()}, indent=1))
        return
    table = Table(title=f"roster ({len(roster.events)} changes, head {roster.digest().hex()[:12]}…)")
    for col in ("site", "status", "key id", "approved dataset roots", "enrolled"):
        table.add_column(col)
    withdrawn = roster.withdrawn()
    for s in roster.sites:
        event = roster.revocation(s.name)
        status = s.status if event is None or not event.reason else f"{s.status}: {event.reason}"
        gone = sum(1 for w in withdrawn.values() if w.site == s.name)
        table.add_row(
            s.name,
            escape(status) + (f"\n{gone} root(s) withdrawn" if gone else ""),
            s.key_id_hex[:16] + "…",
            "\n".join(r[:16] + "…" for r in s.dataset_roots),
            datetime.fromtimestamp(s.enrolled_at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)


@app.command("run")
def run(
    config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
    resume: Annotated[bool, typer.Option(help="Continue from the last committed round.")] = False,
) -> None:
    """Start the SuperLink (TLS, SuperNode auth, loopback), the fleet gateway, and the run."""
    from fedseal.server.config import ServerConfigError, load_server_config
    from fedseal.server.deploy import run_coordinator
    from fedseal.server.errors import DeployError
    from fedseal.server.strategies import StrategyError

    try:
        cfg = load_server_config(config)
    except ServerConfigError as exc:
        raise usage_error(f"{config}: {exc}") from exc
    if not cfg.run.secure:
        console.print(
            "[yellow]note:[/yellow] run.secure = false: updates reach the coordinator in the "
            "clear inside TLS."
        )
    from fedseal.server.live import LiveView

    try:
        with LiveView(console, cfg.run.rounds) as view:
            outcome = run_coordinator(
                cfg, resume=resume, on_round=view.round, on_info=view.info, on_status=view.status
            )
    except StrategyError as exc:
        raise usage_error(str(exc)) from exc
    except DeployError as exc:
        raise usage_error(str(exc), EXIT_FAILED) from exc
    rec = outcome.record
    if rec is not None:
        console.print(escape(runs_cli.end_line(rec)), soft_wrap=True)
    if outcome.status != "finished:completed":
        console.print(
            f"[red]the run failed[/red]: {escape(outcome.reason or 'no reason recorded')}", soft_wrap=True
        )
        raise typer.Exit(EXIT_FAILED)
    if outcome.rounds and not any(r.get("outcome") == "committed" for r in outcome.rounds):
        console.print("[red]no round of this run committed[/red]: see rounds.jsonl and serverapp.log")
        raise typer.Exit(EXIT_FAILED)


from fedseal.server import admin_cli, runs_cli  # noqa: E402 (their commands use usage_error, above)

admin_cli.register(app, usage_error)  # provision, status
runs_cli.register(app, usage_error)  # serve, submit, runs, logs, stop


def main() -> None:
    app()
