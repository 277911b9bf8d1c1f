"""client.toml validation: a good file loads, a bad one names the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.client.config import ClientConfigError, load_client_config

GOOD = """
[site]
name = "site-a"
[coordinator]
superlink = "coord.example:9092"
[data]
dataset_dir = "data"
approved_root = "%s"
""" % ("ab" * 32)


def test_a_minimal_file_loads_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "client.toml").write_text(GOOD)
    cfg = load_client_config(tmp_path / "client.toml")
    assert cfg.name == "site-a"
    assert cfg.ca_cert == tmp_path / "ca.pem"
    assert cfg.coordinator_key == tmp_path / "coordinator.pub"
    assert cfg.dataset_dir == tmp_path / "data"
    assert cfg.insecure is False
    assert cfg.limits.max_epochs == 5
    assert cfg.audit_address is None  # receipts are checked only where an audit service is named


def test_the_audit_address_is_read_when_set(tmp_path: Path) -> None:
    (tmp_path / "client.toml").write_text(
        GOOD.replace("[coordinator]\n", '[coordinator]\naudit_address = "coord.example:9095"\n')
    )
    assert load_client_config(tmp_path / "client.toml").audit_address == "coord.example:9095"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (('approved_root = "' + "ab" * 32, 'approved_root = "xyz'), "data.approved_root"),
        (('"coord.example:9092"', '"coord.example"'), "coordinator.superlink"),
        (("[data]", "[data]\nvalidation_fraction = 0.99"), "data.validation_fraction"),
        (("[site]", "[site]\ncolour = 1"), "site.colour"),
        (("[site]", "[limits]\nmax_epochs = 0\n[site]"), "limits.max_epochs"),
        (('name = "site-a"\n', ""), "site.name"),
        (("[coordinator]\n", '[coordinator]\naudit_address = "coord.example"\n'), "coordinator.audit_address"),
        (("[coordinator]\n", '[coordinator]\naudit_address = "coord:70000"\n'), "coordinator.audit_address"),
        (("[coordinator]\n", '[coordinator]\naudit_address = "coord:0"\n'), "coordinator.audit_address"),
        (("[coordinator]\n", "[coordinator]\naudit_address = 9095\n"), "coordinator.audit_address"),
    ],
)
def test_a_bad_value_fails_naming_the_key(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    (tmp_path / "client.toml").write_text(GOOD.replace(*edit))
    with pytest.raises(ClientConfigError) as info:
        load_client_config(tmp_path / "client.toml")
    assert info.value.key == key
