"""Every ``fl-client`` help text reads as written: rich markup drops a bare ``[name]``."""

from __future__ import annotations

import re
from collections.abc import Iterator

import click
import typer
from typer.testing import CliRunner

from fedseal.client.cli import app

#: A TOML table or key in brackets, escaped for rich (``\\[privacy]``) or not.
_BRACKET = re.compile(r"\\?\[([a-z_.]+)\]")


def _commands(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def _help_texts(cmd: click.Command) -> list[str]:
    texts = [cmd.help or ""]
    texts += [p.help or "" for p in cmd.params if isinstance(p, click.Option)]
    return texts


def check_bracketed_help(cli: typer.Typer, prog: str) -> int:
    """Assert every ``[name]`` of every help text of ``cli`` is shown; how many commands had one."""
    root = typer.main.get_command(cli)
    runner = CliRunner()
    checked = 0
    for path, cmd in _commands(root):
        wanted = {f"[{m}]" for text in _help_texts(cmd) for m in _BRACKET.findall(text)}
        if not wanted:
            continue
        shown = runner.invoke(cli, [*path, "--help"], env={"COLUMNS": "300"}).output
        missing = sorted(w for w in wanted if w not in shown)
        assert not missing, f"{prog} {' '.join(path)} --help loses {missing}"
        checked += 1
    return checked


def test_every_bracketed_name_in_an_fl_client_help_text_is_shown() -> None:
    # the policy group names [privacy], [limits], [trust] and [peers]
    assert check_bracketed_help(app, "fl-client") > 0


def test_the_policy_help_names_the_tables_it_reads() -> None:
    out = CliRunner().invoke(app, ["policy", "--help"], env={"COLUMNS": "300"}).output
    assert "client.toml [privacy], [limits], [trust], [peers]" in out
