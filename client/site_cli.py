"""``fl-client keys ...`` and ``fl-client run``."""

from __future__ import annotations

import typer

NOT_IMPLEMENTED_EXIT = 2


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run() -> None:
        """Join a federation as a partner site (not implemented yet)."""
        typer.echo("fl-client run: not implemented yet", err=True)
        raise typer.Exit(NOT_IMPLEMENTED_EXIT)
