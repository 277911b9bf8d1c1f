"""``fl-client keys init``, ``fl-client run``, ``fl-client policy show``,
``fl-client privacy show`` and ``fl-client receipts export``.

Exit codes: 0 success; 1 the site was refused or stopped on an error at a named step
(dataset changed, key not enrolled, TLS failure, ...); 2 bad usage or configuration.
Heavy imports (torch, flwr) happen inside the commands, never at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from fedseal.client.policy import SitePrivacy
    from fedseal.client.privacy_ledger import PrivacyLedger

EXIT_FAILED = 1
EXIT_USAGE = 2

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(help="Manage the site's identity key.", no_args_is_help=True)

    @keys_app.command("init")
    def keys_init(
        out: Annotated[Path, typer.Option(help="Private key path (PEM PKCS8, mode 0600).")] = Path(
            "site.key"
        ),
        passphrase_env: Annotated[
            str | None, typer.Option(help="Encrypt with the passphrase held in this env variable.")
        ] = None,
        force: Annotated[bool, typer.Option(help="Overwrite an existing key.")] = False,
    ) -> None:
        """Create the site's ECDSA P-256 identity key and its public key (OUT.pub)."""
        from fedseal.crypto.keys import (
            generate_identity_key,
            key_id,
            save_private_key,
            save_public_key,
        )

        if out.exists() and not force:
            console.print(f"[red]error:[/red] {out} exists (use --force to replace it)")
            raise typer.Exit(EXIT_USAGE)
        passphrase = None
        if passphrase_env:
            value = os.environ.get(passphrase_env)
            if not value:
                console.print(
                    f"[red]error:[/red] environment variable {passphrase_env} is empty or unset"
                )
                raise typer.Exit(EXIT_USAGE)
            passphrase = value.encode()
        key = generate_identity_key()
        save_private_key(key, out, passphrase)
        pub = out.with_name(out.name + ".pub")
        save_public_key(key.public_key(), pub)
        typer.echo(f"key id {bytes(key_id(key.public_key())).hex()}")
        console.print(f"wrote {out} (0600) and {pub}; send {pub} to the coordinator")

    app.add_typer(keys_app, name="keys")

    @app.command("run")
    def run(
        config: Annotated[Path, typer.Option(help="client.toml")] = Path("client.toml"),
        re_enrol: Annotated[
            bool,
            typer.Option(
                "--re-enrol",
                help="Accept a changed dataset once: its root is kept in the state directory "
                "(approved-root.json), so later starts need no client.toml edit; the "
                "coordinator must still approve it (fl-server enroll).",
            ),
        ] = False,
    ) -> None:
        """Join a federation: re-attest the dataset, start a SuperNode, train when asked."""
        import logging

        from fedseal.client.config import ClientConfigError, load_client_config
        from fedseal.client.node import SiteRunError, run_site

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        try:
            cfg = load_client_config(config)
        except ClientConfigError as exc:
            console.print(f"[red]error:[/red] {config}: {exc}")
            raise typer.Exit(EXIT_USAGE) from exc
        try:
            # One line each (not wrapped at the terminal's width, never read as markup).
            code = run_site(
                cfg, re_enrol=re_enrol, on_info=lambda s: console.print(escape(s), soft_wrap=True)
            )
        except SiteRunError as exc:
            console.print(f"[red]refused:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from exc
        raise typer.Exit(code)

    # Help texts are rich markup: a bracketed name needs a backslash before it, or rich reads it
    # as a style tag and drops it ("client.toml , , , ").
    policy_app = typer.Typer(
        help="The site's privacy policy (client.toml \\[privacy], \\[limits], \\[trust], \\[peers]).",
        no_args_is_help=True,
    )

    @policy_app.command("show")
    def policy_show(
        config: Annotated[Path, typer.Option(help="client.toml")] = Path("client.toml"),
    ) -> None:
        """Print the effective policy this site enforces on every coordinator request."""
        from fedseal.client.config import ClientConfigError, load_client_config
        from fedseal.client.node import SiteRunError, effective_policy, site_trust

        try:
            cfg = load_client_config(config)
        except ClientConfigError as exc:
            console.print(f"[red]error:[/red] {config}: {exc}")
            raise typer.Exit(EXIT_USAGE) from exc
        try:
            trust = site_trust(cfg)
        except SiteRunError as exc:
            console.print(f"[red]refused:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from exc
        typer.echo(f"site {cfg.name} ({cfg.path})")
        for line in effective_policy(cfg, trust.sources, cfg.audit_address is not None):
            typer.echo(f"  {line}")

    app.add_typer(policy_app, name="policy")

    privacy_app = typer.Typer(
        help="The differential privacy this site has spent (its privacy ledger).",
        no_args_is_help=True,
    )

    @privacy_app.command("show")
    def privacy_show(
        config: Annotated[Path, typer.Option(help="client.toml")] = Path("client.toml"),
    ) -> None:
        """Print the site's privacy ledger: per run its DP rounds and epsilon, and the budget left."""
        from fedseal.client.config import ClientConfigError, load_client_config
        from fedseal.client.privacy_ledger import LedgerError, PrivacyLedger

        try:
            cfg = load_client_config(config)
        except ClientConfigError as exc:
            console.print(
                f"[red]error:[/red] {escape(str(config))}: {escape(str(exc))}", soft_wrap=True
            )
            raise typer.Exit(EXIT_USAGE) from exc
        ledger = PrivacyLedger(cfg.state_dir)
        try:
            lines = _ledger_lines(ledger, cfg.privacy)
        except LedgerError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from exc
        typer.echo(f"site {cfg.name}: privacy ledger {ledger.path}")
        for line in lines:
            typer.echo(f"  {line}")

    app.add_typer(privacy_app, name="privacy")

    receipts_app = typer.Typer(
        help="The signed tree heads this site verified (its audit receipts).", no_args_is_help=True
    )

    @receipts_app.command("export")
    def receipts_export(
        config: Annotated[Path, typer.Option(help="client.toml")] = Path("client.toml"),
        out: Annotated[Path | None, typer.Option(help="Write here instead of to stdout.")] = None,
    ) -> None:
        """Write the coordinator's signed tree heads this site verified, one JSON object a line.

        Give the file to the auditor: fl-audit verify LOG --coordinator-key PUB --witness FILE
        fails if the log was cut back below, or rewritten under, any of these heads.
        """
        from fedseal.audit.receipts import ReceiptError, witness_records
        from fedseal.client.config import ClientConfigError, load_client_config
        from fedseal.crypto.keys import write_atomic

        try:
            cfg = load_client_config(config)
        except ClientConfigError as exc:
            console.print(
                f"[red]error:[/red] {escape(str(config))}: {escape(str(exc))}", soft_wrap=True
            )
            raise typer.Exit(EXIT_USAGE) from exc
        receipts_dir = cfg.state_dir / "receipts"
        try:
            records = witness_records(receipts_dir, cfg.name)
        except ReceiptError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from exc
        if not records:
            console.print(
                f"[red]error:[/red] site {escape(cfg.name)} has no witnessed tree heads in "
                f"{escape(str(receipts_dir))}: a site keeps them only with \\[coordinator] "
                "audit_address set, from its first checked round on",
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_FAILED)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if out is None:
            typer.echo(text, nl=False)
        else:
            try:
                write_atomic(out, text.encode(), mode=0o644)
            except OSError as exc:
                console.print(
                    f"[red]error:[/red] cannot write {escape(str(out))}: {escape(str(exc))}",
                    soft_wrap=True,
                )
                raise typer.Exit(EXIT_USAGE) from exc
        sizes = [int(r["tree_size"]) for r in records]
        console.print(
            f"wrote {len(records)} signed tree heads of site {escape(cfg.name)} (sizes "
            f"{min(sizes)} to {max(sizes)}, log {records[0]['log_id']}) to "
            f"{escape(str(out or 'stdout'))}",
            soft_wrap=True,
        )
        if (receipts_dir / "BLOCKED").exists():
            console.print(
                f"[yellow]note:[/yellow] this site is blocked "
                f"({escape(str(receipts_dir / 'BLOCKED'))}): a "
                "receipt check failed; the heads above all passed their checks when stored",
                soft_wrap=True,
            )

    app.add_typer(receipts_app, name="receipts")


def _ledger_lines(ledger: PrivacyLedger, privacy: SitePrivacy) -> list[str]:
    """``fl-client privacy show``'s lines: the mode, each run, the total against the budget."""
    from fedseal.privacy import epsilon

    delta = privacy.delta
    mode = (
        "required (rounds without DP are refused)"
        if privacy.dp_required
        else "off (rounds without DP are accepted; they release exact sums and are not charged)"
    )
    lines = [f"differential privacy: {mode}"]
    runs = ledger.runs(delta)
    for run in runs:
        lines.append(
            f"run {run.run_id}: {len(run.rounds)} DP round{'s' if len(run.rounds) != 1 else ''} "
            f"({_ranges(run.rounds)}), epsilon {run.epsilon:.4g} at delta {delta:g} "
            f"(zCDP rho {run.rho:.4g})"
        )
    rounds = sum(len(r.rounds) for r in runs)
    spent = epsilon(ledger.rhos(), delta)
    if not runs:
        lines.append("no DP round charged yet: epsilon 0 spent")
    else:
        lines.append(
            f"all runs together: {rounds} DP round{'s' if rounds != 1 else ''} in {len(runs)} "
            f"run{'s' if len(runs) != 1 else ''}, epsilon {spent:.4g} spent at delta {delta:g} "
            "(runs compose: this is more than any one run's epsilon, less than their sum)"
        )
    budget = privacy.epsilon_budget
    if budget is None:
        lines.append("budget: none set ([privacy] epsilon_budget): DP rounds are not limited")
    elif spent > budget:
        lines.append(
            f"budget: epsilon {budget:g}: EXCEEDED by {spent - budget:.4g}; every DP round is refused"
        )
    else:
        lines.append(
            f"budget: epsilon {budget:g} at delta {delta:g} over all runs: {budget - spent:.4g} left "
            f"({100.0 * spent / budget:.1f} % spent)"
        )
    return lines


def _ranges(rounds: tuple[int, ...]) -> str:
    """Sorted round numbers as ``rounds 0-4, 7`` (runs of consecutive numbers joined)."""
    parts: list[str] = []
    start = prev = rounds[0]
    for r in (*rounds[1:], None):
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("round " if len(rounds) == 1 else "rounds ") + ", ".join(parts)
