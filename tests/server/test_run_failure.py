"""A run that ends early says why: in ``status.json`` (the ServerApp) and in fl-server's output."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fedseal.crypto.keys import generate_identity_key
from fedseal.server import flower_app, metrics, rundir
from fedseal.server.cli import init as init_cmd
from fedseal.server.cli import write_server_toml
from fedseal.server.config import ServerConfig, load_server_config
from fedseal.server.deploy import failure_reason
from fedseal.server.roster import Enrolment


class NoSitesGrid:
    """A grid on which no site ever connects."""

    def get_node_ids(self) -> list[int]:
        return []


def _config(tmp_path: Path, *, metrics_port: int) -> ServerConfig:
    init_cmd(tmp_path / "coord", san=["localhost"], passphrase_env=None)
    path = tmp_path / "coord" / "server.toml"
    write_server_toml(
        path, metrics_port=metrics_port, audit_port=0, run_overrides={"sites_wait_timeout_s": 1.0}
    )
    return load_server_config(path)


def _status(cfg: ServerConfig) -> dict[str, object]:
    doc = json.loads((cfg.coordinator.state_dir / rundir.STATUS_FILE).read_text())
    assert isinstance(doc, dict)
    return doc


def test_a_serverapp_that_cannot_bind_its_metrics_port_records_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure behind CI's multi-host restarts: it used to leave no status and no log line."""
    monkeypatch.setattr(metrics, "BIND_WAIT_S", 0.2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = _config(tmp_path, metrics_port=port)
        with pytest.raises(OSError, match=f"metrics endpoint 127.0.0.1:{port}"):
            flower_app.run_federation(NoSitesGrid(), cfg, resume=False)  # type: ignore[arg-type]
    status = _status(cfg)
    assert status["phase"] == "failed"
    assert f"metrics endpoint 127.0.0.1:{port}" in str(status["reason"])
    assert str(status["reason"]).startswith("OSError: ")
    log_text = (cfg.coordinator.state_dir / "serverapp.log").read_text()
    assert "run failed: OSError" in log_text and "Traceback" in log_text
    assert failure_reason(cfg.coordinator.state_dir, status) == status["reason"]


def test_a_specific_reason_already_recorded_is_kept(tmp_path: Path) -> None:
    cfg = _config(tmp_path, metrics_port=0)
    roster = Enrolment.load_or_create(cfg.coordinator.roster)
    for name in ("site-a", "site-b", "site-c"):  # enrolled (run.min_sites = 3), none online
        roster = roster.enroll(name, generate_identity_key().public_key(), ["ab" * 32], now_ms=1)
    roster.save(cfg.coordinator.roster)
    with pytest.raises(flower_app.CoordinatorError, match="only 0 of 3 enrolled sites online"):
        flower_app.run_federation(NoSitesGrid(), cfg, resume=False)  # type: ignore[arg-type]
    status = _status(cfg)
    assert status["phase"] == "failed"
    assert status["reason"] == (
        "only 0 of 3 enrolled sites online after 1s (run.min_sites = 3); not online: site-a, "
        "site-b, site-c (a site that refused at its own start says why on its console)"
    )
    assert "run failed" not in (cfg.coordinator.state_dir / "serverapp.log").read_text()


def test_without_a_status_the_reason_is_the_serverapps_last_error_in_the_superlink_log(
    tmp_path: Path,
) -> None:
    (tmp_path / "superlink.log").write_text(
        "\x1b[92mINFO \x1b[0m:      Starting Flower ServerApp\n"
        "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "fedseal.server.flower_app.AuditHaltError: the audit log refused a round\n"
        "\x1b[92mINFO \x1b[0m:      Run finished\n"
    )
    reason = failure_reason(tmp_path, {})
    assert reason.startswith("the ServerApp ended without recording a reason")
    assert reason.endswith("fedseal.server.flower_app.AuditHaltError: the audit log refused a round")
    # A status that is not a failure (the ServerApp was killed mid-round) does not hide the log.
    assert failure_reason(tmp_path, {"phase": "round", "reason": "x"}) == reason


def test_an_error_line_without_a_traceback_is_reported(tmp_path: Path) -> None:
    (tmp_path / "superlink.log").write_text("INFO : up\nERROR :     Failed to push task output: boom\n")
    assert failure_reason(tmp_path, {}).endswith("ERROR :     Failed to push task output: boom")


def test_no_log_at_all_is_said(tmp_path: Path) -> None:
    reason = failure_reason(tmp_path, {})
    assert "superlink.log is unreadable" in reason
