"""fl-server run registers sites and watches the run over the Control API from its own process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from fedseal.crypto.keys import generate_identity_key
from fedseal.server import control_api, rundir
from fedseal.server.errors import DeployError
from fedseal.server.roster import Enrolment

ROOT = "aa" * 32


class FakeControl:
    def __init__(self) -> None:
        self.registered: dict[int, tuple[str, Any]] = {}
        self.unregistered: list[tuple[str, int]] = []

    def register(self, site: str, public_key: Any) -> int:
        node_id = 1000 + len(self.registered)
        self.registered[node_id] = (site, public_key)
        return node_id

    def unregister(self, site: str, node_id: int) -> None:
        self.unregistered.append((site, node_id))


def _cfg(tmp_path: Path) -> Any:
    return SimpleNamespace(coordinator=SimpleNamespace(state_dir=tmp_path))


def test_sites_are_registered_once_and_a_revoked_site_is_unregistered(tmp_path: Path) -> None:
    keys = [generate_identity_key().public_key() for _ in range(2)]
    roster = Enrolment().enroll("site-a", keys[0], [ROOT], now_ms=1).enroll("site-b", keys[1], [ROOT], now_ms=2)
    control = FakeControl()
    nodes = control_api.register_sites(_cfg(tmp_path), roster, control)  # type: ignore[arg-type]
    assert sorted(nodes.values()) == ["site-a", "site-b"]
    assert {site: key for site, key in control.registered.values()} == {"site-a": keys[0], "site-b": keys[1]}
    assert json.loads((tmp_path / rundir.NODES_FILE).read_text()) == {str(k): v for k, v in nodes.items()}
    openssh = keys[0].public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert (tmp_path / "site-keys" / "site-a.pub").read_bytes() == openssh + b"\n"

    # A restart (--resume) registers nobody again; a revocation removes the site's node.
    again = control_api.register_sites(_cfg(tmp_path), roster.revoke("site-b", now_ms=3), control)  # type: ignore[arg-type]
    site_b = next(k for k, v in nodes.items() if v == "site-b")
    assert len(control.registered) == 2 and control.unregistered == [("site-b", site_b)]
    assert list(again.values()) == ["site-a"]
    assert json.loads((tmp_path / rundir.NODES_FILE).read_text()) == {str(k): v for k, v in again.items()}


def test_a_control_api_failure_names_the_step(tmp_path: Path) -> None:
    class Down:
        def RegisterNode(self, request: Any) -> Any:
            raise httpx.ConnectError("connection refused")

        def ListRuns(self, request: Any) -> Any:
            return SimpleNamespace(run_dict={})

    api = object.__new__(control_api.ControlApi)
    api._client = Down()  # type: ignore[assignment]
    with pytest.raises(DeployError, match="ConnectError") as info:
        api.register("site-a", generate_identity_key().public_key())
    assert info.value.step == "register site site-a"
    with pytest.raises(DeployError, match="does not know run 7") as unknown:
        api.run_status(7)
    assert unknown.value.step == "poll run"
