"""``fl-server provision`` and ``fl-server status``: the operator's set-up and admin view.

Registered on ``fl-server`` by :mod:`fedseal.server.cli` (``admin_cli.register(app,
usage_error)``). The work is done by :mod:`fedseal.server.provision` and
:mod:`fedseal.server.status`; this module parses options and prints.

Exit codes: 0 success; 2 bad usage or configuration, or a kit that cannot be made as asked (one
line naming the input and why).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from fedseal.server.config import ServerConfig

__all__ = ["config_loader", "register"]

console = Console(stderr=True)


def config_loader(fail: Callable[[str], typer.Exit]) -> Callable[[Path], ServerConfig]:
    """``load(config)``: ``server.toml`` read, or ``fail`` raised with the file and why (one line)."""

    def load(config: Path) -> ServerConfig:
        from fedseal.server.config import ServerConfigError, load_server_config

        try:
            return load_server_config(config)
        except ServerConfigError as exc:
            raise fail(f"{config}: {exc}") from exc

    return load


def register(app: typer.Typer, fail: Callable[[str], typer.Exit]) -> None:
    """Add ``provision`` and ``status`` to ``app``; ``fail(message)`` is the exit to raise for
    a one-line usage error (``fl-server``'s)."""
    load = config_loader(fail)

    @app.command("provision")
    def provision_cmd(
        site: Annotated[
            list[str],
            typer.Option("--site", help="A partner site's name (a-z, 0-9, '-', '_'; repeat)."),
        ],
        address: Annotated[
            str,
            typer.Option(
                help="The DNS name or IP address the sites reach this coordinator by (no port: "
                "the fleet and audit ports come from server.toml). The server certificate must "
                "name it."
            ),
        ],
        out: Annotated[
            Path,
            typer.Option(help="Output directory (new or empty): one kit per site + coordinator/."),
        ],
        config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
        roster: Annotated[
            Path | None,
            typer.Option(
                help="The signed consortium roster the sites pin (with --roster-authority)."
            ),
        ] = None,
        roster_authority: Annotated[
            Path | None,
            typer.Option(help="The roster authority's PUBLIC key (PEM), pinned by the sites."),
        ] = None,
    ) -> None:
        """Write a start-up kit per site and one for the coordinator (no private key in any).

        A site's kit: client.toml (filled in but for its dataset), ca.pem, coordinator.pub, the
        consortium roster and its authority's key (when given), start.sh (site key, dataset
        root, enrolment request, fl-client run) and README.txt. The coordinator's kit: what
        each site sends back and the fl-server enroll command per site. Exit 2: refused, one
        line saying why (nothing written).
        """
        from fedseal.server.provision import ProvisionError, provision

        cfg = load(config)
        try:
            kits = provision(
                cfg, site, address=address, out=out, now=datetime.now(UTC), roster=roster,
                authority=roster_authority,
            )  # fmt: skip
        except ProvisionError as exc:
            raise fail(str(exc)) from exc
        except OSError as exc:
            raise fail(f"cannot write the kits to {out}: {exc.strerror or exc}") from exc
        console.print(
            f"wrote {len(kits.sites)} site kit(s) ({', '.join(p.name for p in kits.sites)}) and "
            f"the coordinator's kit to {escape(str(kits.out))}",
            soft_wrap=True,
        )
        console.print(
            f"next: read {escape(str(kits.coordinator / 'README.txt'))} (what to send, what comes "
            "back, the enroll command per site)",
            soft_wrap=True,
        )
        for note in kits.notes:
            console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)

    @app.command("status")
    def status_cmd(
        config: Annotated[Path, typer.Option(help="server.toml")] = Path("server.toml"),
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """Show the enrolled sites (online, last seen, floor) and where the run is.

        Per site: enrolled or revoked, approved dataset roots, node id, online now and last
        seen (asked of the SuperLink while fl-server run is up), the floor it reported at the
        last run's start. Then the run's phase and round. Works before any run, during one and
        after it.
        """
        from fedseal.server.roster import EnrolmentError
        from fedseal.server.status import collect_status, render, superlink_nodes

        cfg = load(config)
        try:
            st = collect_status(cfg, live=superlink_nodes)
        except EnrolmentError as exc:
            raise fail(f"{cfg.coordinator.roster}: {exc}") from exc
        if as_json:
            typer.echo(json.dumps(st.to_json(), indent=1))
            return
        header, table = render(st, now=time.time())
        out = Console()
        for line in header:
            out.print(escape(line), soft_wrap=True, highlight=False)
        out.print(table)
