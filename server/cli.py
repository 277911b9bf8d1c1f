"""``fl-server``: the coordinator command line."""

from __future__ import annotations

import typer

NOT_IMPLEMENTED_EXIT = 2

app = typer.Typer(
    name="fl-server",
    help="fedseal coordinator: enrol sites, run secure federated training, checkpoint.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("run")
def run() -> None:
    """Start the SuperLink and the secure run (not implemented yet)."""
    typer.echo("fl-server run: not implemented yet", err=True)
    raise typer.Exit(NOT_IMPLEMENTED_EXIT)


def main() -> None:
    app()
