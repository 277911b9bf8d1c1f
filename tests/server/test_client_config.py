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


# -- [privacy], [trust], [peers] ----------------------------------------------------------------


def test_privacy_defaults_are_the_safe_ones(tmp_path: Path) -> None:
    from fedseal.protocol.config import DEFAULT_COLLUDING_FRACTION

    (tmp_path / "client.toml").write_text(GOOD)
    cfg = load_client_config(tmp_path / "client.toml")
    p = cfg.privacy
    assert p.allow_plain is False
    assert (p.min_cohort, p.min_known_peers, p.security_bits, p.max_setup_attempts) == (3, 2, 40, 3)
    assert p.max_colluding_fraction == DEFAULT_COLLUDING_FRACTION and abs(p.max_colluding_fraction - 1 / 3) < 1e-9
    assert p.max_update_clip == 1000.0
    assert (cfg.roster, cfg.roster_authority, dict(cfg.peers)) == (None, None, {})


def test_privacy_trust_and_peers_are_read(tmp_path: Path) -> None:
    kid = "AB" * 32
    (tmp_path / "client.toml").write_text(
        GOOD
        + "[privacy]\nallow_plain = true\nmin_cohort = 5\nmin_known_peers = 3\n"
        "max_colluding_fraction = 0.25\nsecurity_bits = 64\nmax_setup_attempts = 2\n"
        '[trust]\nroster = "trust/roster.json"\nroster_authority = "/etc/fedseal/authority.pub"\n'
        f'[peers]\n"site-b" = "{kid}"\n'
        "[limits]\nmax_update_clip = 5.0\nmax_cohort = 50\n"
    )
    cfg = load_client_config(tmp_path / "client.toml")
    p = cfg.privacy
    assert p.allow_plain is True
    assert (p.min_cohort, p.min_known_peers, p.security_bits, p.max_setup_attempts) == (5, 3, 64, 2)
    assert p.max_colluding_fraction == 0.25
    assert (p.max_update_clip, p.max_cohort) == (5.0, 50)
    assert cfg.roster == tmp_path / "trust" / "roster.json"
    assert cfg.roster_authority == Path("/etc/fedseal/authority.pub")
    assert dict(cfg.peers) == {"site-b": kid.lower()}


def test_a_cohort_minimum_below_the_known_peers_it_needs_is_raised_to_hold_them(tmp_path: Path) -> None:
    # A cohort always holds the site itself and its known peers.
    (tmp_path / "client.toml").write_text(GOOD + "[privacy]\nmin_known_peers = 4\n")
    assert load_client_config(tmp_path / "client.toml").privacy.min_cohort == 5


@pytest.mark.parametrize(
    ("section", "key", "words"),
    [
        ("[privacy]\nmax_colluding_fraction = 0.6\n", "privacy.max_colluding_fraction", "[0, 0.5)"),
        ("[privacy]\nmax_colluding_fraction = -0.1\n", "privacy.max_colluding_fraction", "[0, 0.5)"),
        ("[privacy]\nsecurity_bits = 4\n", "privacy.security_bits", "8..128"),
        ("[privacy]\nsecurity_bits = 40.0\n", "privacy.security_bits", "must be int"),
        ("[privacy]\nmin_cohort = 1\n", "privacy.min_cohort", "2 reveals"),
        ("[privacy]\nmin_known_peers = 0\n", "privacy.min_known_peers", "[1, 65536]"),
        ("[privacy]\nmax_setup_attempts = 0\n", "privacy.max_setup_attempts", "[1, 16]"),
        ('[privacy]\nallow_plain = "yes"\n', "privacy.allow_plain", "must be bool"),
        ("[privacy]\nallow_plain = 1\n", "privacy.allow_plain", "must be bool"),
        ("[privacy]\ncolour = 1\n", "privacy.colour", "unknown key"),
        ("[privacy]\nmax_update_clip = 5.0\n", "privacy.max_update_clip", "unknown key"),
        ("[limits]\nmax_update_clip = 0.0\n", "limits.max_update_clip", "(0, 1e9]"),
        ("[limits]\nmax_cohort = 1\n", "limits.max_cohort", "[2, 65536]"),
        ("[limits]\nmax_clip_norm = 0.0\n", "limits.max_clip_norm", "(0, 1e6]"),
        ("[limits]\nmin_cohort = 3\n", "limits.min_cohort", "moved to [privacy] min_cohort"),
        ("[limits]\nmax_setup_attempts = 3\n", "limits.max_setup_attempts", "moved to [privacy]"),
        ('[trust]\nroster = "roster.json"\n', "trust.roster_authority", "required with the other"),
        ('[trust]\nroster_authority = "authority.pub"\n', "trust.roster", "required with the other"),
        ('[trust]\nroster = ""\nroster_authority = "a.pub"\n', "trust.roster", "file path"),
        ('[trust]\nroster = "r.json"\nroster_authority = "a.pub"\nurl = "x"\n', "trust.url", "unknown key"),
        ('[peers]\n"site-b" = "xyz"\n', "peers.site-b", "64 hex"),
        ('[peers]\n"site-b" = "%s"\n' % ("ab" * 31), "peers.site-b", "64 hex"),
        ('[peers]\n"site-b" = 7\n', "peers.site-b", "64 hex"),
        ("privacy = 3\n", "privacy", "must be a table"),
    ],
)
def test_a_bad_privacy_trust_or_peers_value_fails_naming_the_key(
    tmp_path: Path, section: str, key: str, words: str
) -> None:
    # A top-level key goes before the tables; a table after them.
    (tmp_path / "client.toml").write_text(GOOD + section if section.startswith("[") else section + GOOD)
    with pytest.raises(ClientConfigError) as info:
        load_client_config(tmp_path / "client.toml")
    assert info.value.key == key
    assert words in info.value.reason, info.value.reason
