"""Every ``fl-server`` help text reads as written: rich markup drops a bare ``[name]``."""

from __future__ import annotations

import fedseal.sim.commands  # noqa: F401 (registers demo and simulate on fl-server, as its entry point does)
from fedseal.server.cli import app
from tests.client.test_cli_help import check_bracketed_help


def test_every_bracketed_name_in_an_fl_server_help_text_is_shown() -> None:
    assert check_bracketed_help(app, "fl-server") > 0  # submit names [run], [dp] and [consortium]
