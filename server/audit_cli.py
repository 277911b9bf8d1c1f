"""``fl-audit``: offline verification of the coordinator's audit log.

Imports neither flwr nor torch (a test enforces it).
"""

from __future__ import annotations

import typer

NOT_IMPLEMENTED_EXIT = 2

app = typer.Typer(
    name="fl-audit",
    help="Verify a fedseal audit log offline, prove inclusion of a site's update, report a run.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("verify")
def verify() -> None:
    """Verify the whole log (not implemented yet)."""
    typer.echo("fl-audit verify: not implemented yet", err=True)
    raise typer.Exit(NOT_IMPLEMENTED_EXIT)


def main() -> None:
    app()
