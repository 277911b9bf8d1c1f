"""``fl-client data ...`` and ``fl-client attest``."""

from __future__ import annotations

import typer

NOT_IMPLEMENTED_EXIT = 2


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Prepare and split datasets into attested Parquet shards.", no_args_is_help=True)

    @data_app.command("prepare")
    def prepare() -> None:
        """Write zstd Parquet shards and the manifest (not implemented yet)."""
        typer.echo("fl-client data prepare: not implemented yet", err=True)
        raise typer.Exit(NOT_IMPLEMENTED_EXIT)

    app.add_typer(data_app, name="data")
