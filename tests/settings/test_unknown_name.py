"""A configuration key the reader does not know is named with the closest one it knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.server.cli import init as init_cmd
from fedseal.server.config import ServerConfigError, load_server_config
from fedseal.settings import unknown_name


@pytest.mark.parametrize(
    ("typo", "known", "said"),
    [
        ("roster_authority", {"roster", "authority"}, "unknown key (did you mean 'authority'?)"),
        ("rouns", {"rounds", "model", "seed"}, "unknown key (did you mean 'rounds'?)"),
        ("fleet_prot", {"fleet_port", "fleet_host"}, "unknown key (did you mean 'fleet_port'?)"),
        ("zzz", {"rounds", "model"}, "unknown key"),
    ],
)
def test_an_unknown_key_is_named_with_the_closest_known_one(typo: str, known: set[str], said: str) -> None:
    assert unknown_name(typo, known) == said


def test_the_sites_key_name_in_the_coordinators_consortium_table_gets_the_right_one(tmp_path: Path) -> None:
    init_cmd(tmp_path / "coord", san=["localhost"], passphrase_env=None)
    path = tmp_path / "coord" / "server.toml"
    path.write_text(path.read_text() + '\n[consortium]\nroster = "r.json"\nroster_authority = "a.pub"\n')
    with pytest.raises(ServerConfigError, match=r"consortium\.roster_authority: unknown key \(did you mean 'authority'\?\)"):
        load_server_config(path)
