"""server.toml validation: good files load, bad ones name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseal.server.cli import write_server_toml
from fedseal.server.config import ServerConfigError, load_server_config


def test_the_file_written_by_init_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    write_server_toml(tmp_path / "server.toml", fleet_port=19092, internal_port=19091)
    cfg = load_server_config(tmp_path / "server.toml")
    assert cfg.network.fleet_port == 19092
    assert cfg.network.internal_port == 19091
    assert cfg.tls.ca_cert == tmp_path / "tls" / "ca.pem"
    assert cfg.coordinator.state_dir == tmp_path / "state"
    assert cfg.run.strategy == "FedAvg"
    assert cfg.network.audit_port == 9095
    assert cfg.network.audit_host == "0.0.0.0"
    assert cfg.network.metrics_host == "127.0.0.1"


def test_the_audit_and_metrics_addresses_default_and_load(tmp_path: Path) -> None:
    tls = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"
    (tmp_path / "s.toml").write_text(tls)
    net = load_server_config(tmp_path / "s.toml").network
    assert (net.audit_host, net.audit_port, net.metrics_host) == ("0.0.0.0", 9095, "127.0.0.1")
    (tmp_path / "s.toml").write_text(
        tls + "[network]\naudit_host = '127.0.0.1'\naudit_port = 0\nmetrics_host = '0.0.0.0'\n"
    )
    net = load_server_config(tmp_path / "s.toml").network
    assert (net.audit_host, net.audit_port, net.metrics_host) == ("127.0.0.1", 0, "0.0.0.0")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[run]\nrounds = 0\n", "run.rounds"),
        ("[run]\nrounds = 'five'\n", "run.rounds"),
        ("[run]\nlearning_rate = -1.0\n", "run.learning_rate"),
        ("[run]\nbogus = 1\n", "run.bogus"),
        ("[network]\nfleet_port = 70000\n", "network.fleet_port"),
        ("[network]\nfleet_port = 9091\ninternal_port = 9091\n", "network.internal_port"),
        ("[limits]\nmax_message_bytes = 10\n", "limits.max_message_bytes"),
        ("[limits]\nmax_vector_length = 0\n", "limits.max_vector_length"),
        ("[limits]\nmax_envelope_bytes = 10\n", "limits.max_envelope_bytes"),
        ("[network]\naudit_port = 70000\n", "network.audit_port"),
        ("[network]\naudit_port = -1\n", "network.audit_port"),
        ("[network]\naudit_port = '9095'\n", "network.audit_port"),
        ("[network]\naudit_port = 9092\n", "network.audit_port"),
        ("[network]\naudit_port = 9464\n", "network.audit_port"),
        ("[network]\naudit_host = ''\n", "network.audit_host"),
        ("[network]\naudit_host = 'a b'\n", "network.audit_host"),
        ("[network]\naudit_host = 7\n", "network.audit_host"),
        ("[network]\nmetrics_host = 'x/y'\n", "network.metrics_host"),
        ("[network]\nmetrics_host = true\n", "network.metrics_host"),
        ("[run.strategy_options]\neta = 'x'\n", "run.strategy_options.eta"),
    ],
)
def test_a_bad_value_fails_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    tls = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"
    (tmp_path / "s.toml").write_text(tls + body)
    with pytest.raises(ServerConfigError) as info:
        load_server_config(tmp_path / "s.toml")
    assert info.value.key == key


def test_tls_files_are_required_unless_insecure_is_explicit(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text("[run]\nrounds = 2\n")
    with pytest.raises(ServerConfigError) as info:
        load_server_config(tmp_path / "s.toml")
    assert info.value.key == "tls.ca_cert"
    (tmp_path / "s.toml").write_text("[tls]\ninsecure = true\n")
    assert load_server_config(tmp_path / "s.toml").tls.insecure is True


def test_a_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text("[run\n")
    with pytest.raises(ServerConfigError, match="not valid TOML"):
        load_server_config(tmp_path / "s.toml")


def test_setup_with_evaluation_defaults_on_and_must_be_a_boolean(tmp_path: Path) -> None:
    tls = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"
    (tmp_path / "s.toml").write_text(tls)
    assert load_server_config(tmp_path / "s.toml").run.setup_with_evaluation is True
    (tmp_path / "s.toml").write_text(tls + "[run]\nsetup_with_evaluation = false\n")
    assert load_server_config(tmp_path / "s.toml").run.setup_with_evaluation is False
    (tmp_path / "s.toml").write_text(tls + "[run]\nsetup_with_evaluation = 'no'\n")
    with pytest.raises(ServerConfigError, match="setup_with_evaluation"):
        load_server_config(tmp_path / "s.toml")


def test_the_limits_table_is_where_the_protocols_decode_bounds_come_from(tmp_path: Path) -> None:
    from fedseal.protocol import ConfigError, Limits, QuantizationConfig, RoundConfig

    tls = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"
    (tmp_path / "s.toml").write_text(tls)
    assert load_server_config(tmp_path / "s.toml").limits.protocol_limits() == Limits()
    (tmp_path / "s.toml").write_text(
        tls + "[limits]\nmax_sites = 4\nmax_vector_length = 100\nmax_envelope_bytes = 4096\n"
    )
    limits = load_server_config(tmp_path / "s.toml").limits.protocol_limits()
    assert (limits.max_cohort, limits.max_vector_length, limits.max_message_bytes) == (4, 100, 4096)

    def config(length: int) -> RoundConfig:
        return RoundConfig(
            vector_length=length, quantization=QuantizationConfig.from_clip(1.0, levels=1 << 15), max_weight=100,
            limits=limits,
        )

    config(100).resolve(4)  # within the table's bounds
    with pytest.raises(ConfigError, match="max_vector_length=100"):
        config(101).resolve(4)
    with pytest.raises(ConfigError, match="max_cohort=4"):
        config(100).resolve(5)


def test_the_consortium_table_is_optional_and_loads_both_paths(tmp_path: Path) -> None:
    tls = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"
    (tmp_path / "s.toml").write_text(tls)
    assert load_server_config(tmp_path / "s.toml").consortium is None
    table = "[consortium]\nroster = 'consortium/roster.json'\nauthority = '/etc/fedseal/a.pub'\n"
    (tmp_path / "s.toml").write_text(tls + table)
    section = load_server_config(tmp_path / "s.toml").consortium
    assert section is not None
    assert section.roster == tmp_path / "consortium" / "roster.json"  # relative to the file
    assert section.authority == Path("/etc/fedseal/a.pub")


def test_write_server_toml_writes_the_consortium_table(tmp_path: Path) -> None:
    write_server_toml(tmp_path / "server.toml")
    assert load_server_config(tmp_path / "server.toml").consortium is None
    roster, authority = tmp_path / "c d" / "roster.json", tmp_path / "c d" / "authority.key.pub"
    write_server_toml(tmp_path / "server.toml", consortium=(roster, authority))
    section = load_server_config(tmp_path / "server.toml").consortium
    assert section is not None and (section.roster, section.authority) == (roster, authority)


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        (
            "[consortium]\nroster = 'r.json'\n",
            "consortium.authority",
            "required with consortium.roster",
        ),
        (
            "[consortium]\nauthority = 'a.pub'\n",
            "consortium.roster",
            "required with consortium.authority",
        ),
        ("[consortium]\n", "consortium.roster", "required"),
        ("[consortium]\nroster = 'r.json'\nauthority = 3\n", "consortium.authority", "must be str"),
        ("[consortium]\nroster = ''\nauthority = 'a.pub'\n", "consortium.roster", "non-empty"),
        (
            "[consortium]\nroster = 'r'\nauthority = 'a'\nkey = 'k'\n",
            "consortium.key",
            "unknown key",
        ),
        ("consortium = 'r.json'\n", "consortium", "must be a table"),
    ],
)
def test_a_bad_consortium_table_names_the_key(
    tmp_path: Path, body: str, key: str, reason: str
) -> None:
    tls = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"
    (tmp_path / "s.toml").write_text(body + tls if not body.startswith("[") else tls + body)
    with pytest.raises(ServerConfigError) as info:
        load_server_config(tmp_path / "s.toml")
    assert info.value.key == key and reason in info.value.reason
    assert str(info.value).startswith(f"{key}: ")


_TLS = "[tls]\nca_cert='a'\nserver_cert='b'\nserver_key='c'\n"


def test_dp_is_off_by_default_and_a_dp_table_loads_with_its_defaults(tmp_path: Path) -> None:
    import math

    (tmp_path / "s.toml").write_text(_TLS)
    assert not load_server_config(tmp_path / "s.toml").dp.enabled
    (tmp_path / "s.toml").write_text(_TLS + "[dp]\nenabled = true\nepsilon = 8\nclip = 1\n")
    dp = load_server_config(tmp_path / "s.toml").dp
    assert (dp.enabled, dp.epsilon, dp.delta, dp.clip) == (True, 8.0, 1e-6, 1.0)
    assert (dp.noise_multiplier, dp.granularity, dp.modulus_bits) == (None, None, 32)
    assert dp.beta == math.exp(-0.5)
    (tmp_path / "s.toml").write_text(
        _TLS + "[dp]\nenabled = true\nepsilon = 4.5\ndelta = 1e-8\nclip = 0.5\n"
        "noise_multiplier = 1.2\ngranularity = 1e-5\nmodulus_bits = 64\nbeta = 0.0\n"
    )
    dp = load_server_config(tmp_path / "s.toml").dp
    assert (dp.epsilon, dp.delta, dp.clip, dp.noise_multiplier) == (4.5, 1e-8, 0.5, 1.2)
    assert (dp.granularity, dp.modulus_bits, dp.beta) == (1e-5, 64, 0.0)


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ("enabled = 1\nepsilon = 8\nclip = 1\n", "dp.enabled", "must be bool"),
        ("enabled = true\nclip = 1\n", "dp.epsilon", "required"),
        ("enabled = true\nepsilon = 8\n", "dp.clip", "required"),
        ("enabled = true\nepsilon = 0\nclip = 1\n", "dp.epsilon", "> 0"),
        ("enabled = true\nepsilon = nan\nclip = 1\n", "dp.epsilon", "finite"),
        ("enabled = true\nepsilon = 'eight'\nclip = 1\n", "dp.epsilon", "must be float"),
        ("enabled = true\nepsilon = 8\nclip = -1\n", "dp.clip", "> 0"),
        ("enabled = true\nepsilon = 8\nclip = 1\ndelta = 1\n", "dp.delta", "(0, 1)"),
        ("enabled = true\nepsilon = 8\nclip = 1\ndelta = 0\n", "dp.delta", "(0, 1)"),
        ("enabled = true\nepsilon = 8\nclip = 1\nnoise_multiplier = 0\n", "dp.noise_multiplier", "> 0"),
        ("enabled = true\nepsilon = 8\nclip = 1\ngranularity = -1e-3\n", "dp.granularity", "> 0"),
        ("enabled = true\nepsilon = 8\nclip = 1\nmodulus_bits = 48\n", "dp.modulus_bits", "32 or 64"),
        ("enabled = true\nepsilon = 8\nclip = 1\nbeta = 1.0\n", "dp.beta", "[0, 1)"),
        ("enabled = true\nepsilon = 8\nclip = 1\nbeta = -0.0\n", "dp.beta", "[0, 1)"),
        ("enabled = true\nepsilon = 8\nclip = 1\nsigma = 3\n", "dp.sigma", "unknown key"),
        ("enabled = true\nepsilon = 8\nclip = 1e-3\ngranularity = 1e4\n", "dp.granularity", "2^20"),
    ],
)
def test_a_bad_dp_value_fails_naming_the_key(
    tmp_path: Path, body: str, key: str, reason: str
) -> None:
    (tmp_path / "s.toml").write_text(_TLS + "[dp]\n" + body)
    with pytest.raises(ServerConfigError) as info:
        load_server_config(tmp_path / "s.toml")
    assert info.value.key == key and reason in info.value.reason, info.value


def test_dp_with_plain_rounds_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        _TLS + "[run]\nsecure = false\n[dp]\nenabled = true\nepsilon = 8\nclip = 1\n"
    )
    with pytest.raises(ServerConfigError) as info:
        load_server_config(tmp_path / "s.toml")
    assert info.value.key == "dp.enabled" and "secure" in info.value.reason
    (tmp_path / "s.toml").write_text(_TLS + "[run]\nsecure = false\n[dp]\nenabled = false\n")
    assert not load_server_config(tmp_path / "s.toml").dp.enabled
