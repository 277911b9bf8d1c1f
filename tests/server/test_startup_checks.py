"""``fl-server run`` checks its TLS files, its key and its ports before anything starts, and
says which file or port is wrong in one line (not "superlink exited with code 1" or a
500-line traceback)."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.crypto.keys import generate_identity_key, save_public_key
from fedseal.server import deploy
from fedseal.server.pki import create_ca, issue_server_certificate
from fedseal.sim.commands import app

runner = CliRunner()
PORT_KEYS = ("fleet_port", "internal_port", "audit_port", "metrics_port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    """``fl-server init`` + three enrolled sites (init's run.min_sites), every port a free
    loopback one; returns server.toml."""
    coord = tmp_path / "coord"
    assert runner.invoke(app, ["init", str(coord)]).exit_code == 0
    toml = coord / "server.toml"
    for site in ("site-a", "site-b", "site-c"):
        save_public_key(generate_identity_key().public_key(), tmp_path / f"{site}.pub")
        res = runner.invoke(
            app,
            [
                "enroll",
                "--config",
                str(toml),
                "--site",
                site,
                "--key",
                str(tmp_path / f"{site}.pub"),
                "--dataset-root",
                "ab" * 32,
            ],
        )
        assert res.exit_code == 0, res.output
    text = toml.read_text().replace('"0.0.0.0"', '"127.0.0.1"')
    for key in PORT_KEYS:
        text = re.sub(rf"^{key} = \d+$", f"{key} = {_free_port()}", text, flags=re.MULTILINE)
    toml.write_text(text)
    return toml


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """Fails a test whose `fl-server run` got as far as starting a process or the gateway."""
    started: list[list[str]] = []

    def start(self: object, argv: list[str], *args: object) -> subprocess.Popen[bytes]:
        started.append(argv)
        raise AssertionError(f"fl-server run started {argv[:3]}")

    monkeypatch.setattr(deploy._Children, "start", start)
    monkeypatch.setattr(deploy, "PORT_GRACE_S", 0.0)
    yield started
    assert started == []


def _refused(toml: Path) -> str:
    """Run ``fl-server run``; require exit 1, one ``error: start-up:`` line, nothing started."""
    res = runner.invoke(app, ["run", "--config", str(toml)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: start-up: "), res.output
    state = toml.parent / "state"
    assert not (state / "superlink.log").exists() and not (state / "audit.sqlite").exists()
    return lines[0]


@pytest.mark.parametrize("name", ["ca.pem", "server.pem", "server.key"])
def test_a_missing_tls_file_is_named(coordinator: Path, name: str) -> None:
    path = coordinator.parent / "tls" / name
    path.unlink()
    key = {
        "ca.pem": "tls.ca_cert",
        "server.pem": "tls.server_cert",
        "server.key": "tls.server_key",
    }[name]
    line = _refused(coordinator)
    assert f"{key} {path} cannot be read: No such file or directory" in line


def test_a_ca_path_that_is_a_directory_is_named(coordinator: Path) -> None:
    ca = coordinator.parent / "tls" / "ca.pem"
    ca.unlink()
    ca.mkdir()
    assert f"tls.ca_cert {ca} cannot be read: Is a directory" in _refused(coordinator)


def test_a_ca_file_without_a_certificate_is_named(coordinator: Path) -> None:
    ca = coordinator.parent / "tls" / "ca.pem"
    ca.write_text("-----BEGIN NOTHING-----\n")
    assert f"tls.ca_cert {ca} holds no PEM CA certificate" in _refused(coordinator)


def test_a_server_certificate_that_does_not_match_its_key_is_named(coordinator: Path) -> None:
    from datetime import UTC, datetime

    tls = coordinator.parent / "tls"
    _cert, other_key = issue_server_certificate(
        create_ca("other", now=datetime.now(UTC)), ["localhost"], now=datetime.now(UTC)
    )
    (tls / "server.key").write_bytes(other_key)
    line = _refused(coordinator)
    assert (
        f"tls.server_cert {tls / 'server.pem'} and tls.server_key {tls / 'server.key'} do not load"
        in line
    )


def test_a_missing_coordinator_key_is_named(coordinator: Path) -> None:
    key = coordinator.parent / "coordinator.key"
    key.unlink()
    assert f"coordinator.key {key} cannot be read" in _refused(coordinator)


@pytest.mark.parametrize("key", PORT_KEYS)
def test_a_port_in_use_is_named_with_its_setting(coordinator: Path, key: str) -> None:
    port = int(re.search(rf"^{key} = (\d+)$", coordinator.read_text(), re.MULTILINE).group(1))  # type: ignore[union-attr]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        line = _refused(coordinator)
    assert f"port {port} on 127.0.0.1 (network.{key}, " in line
    assert f"is already in use: stop what holds it or change network.{key} in server.toml" in line


def test_ports_that_are_off_are_not_checked(coordinator: Path) -> None:
    from fedseal.server.config import load_server_config

    toml = coordinator
    toml.write_text(
        re.sub(r"^metrics_port = \d+$", "metrics_port = 0", toml.read_text(), flags=re.MULTILINE)
    )
    cfg = load_server_config(toml)
    assert [k for k, *_ in deploy.listening_ports(cfg)] == [
        "network.internal_port",
        "network.fleet_port",
        "network.audit_port",
    ]
    deploy.check_start_up(cfg)  # all files present, all ports free: passes


def test_the_superlinks_last_error_of_this_start_is_the_one_named(tmp_path: Path) -> None:
    log = tmp_path / "superlink.log"
    log.write_text("ERROR an old run's error\n")
    offset = log.stat().st_size
    assert deploy.last_error_line(log, offset=offset) == ""
    with log.open("a") as f:
        f.write("INFO starting\n\x1b[31mERROR\x1b[0m bind failed\nValueError: bad --ssl-keyfile\n")
    assert deploy.last_error_line(log, offset=offset) == "ValueError: bad --ssl-keyfile"
    assert deploy.last_error_line(tmp_path / "missing.log") == ""
    with log.open("a") as f:
        f.write("fedseal superlink: the control socket path /x is longer than 107 bytes\n")
    assert deploy.last_error_line(log, offset=offset).startswith(
        "fedseal superlink: the control socket"
    )
