"""``fl-client``: the partner-site command line.

Commands are contributed by the modules that own them (``register(app)``), so each
area of the site keeps its commands next to its code.
"""

from __future__ import annotations

import typer

from fedseal.client import site_cli
from fedseal.client.data import cli as data_cli

app = typer.Typer(
    name="fl-client",
    help="fedseal partner site: prepare and attest data, manage the site key, join a federation.",
    no_args_is_help=True,
    add_completion=False,
)
data_cli.register(app)
site_cli.register(app)


def main() -> None:
    app()
