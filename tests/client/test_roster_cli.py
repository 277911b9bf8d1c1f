"""`fl-client roster authority-init|create|add|revoke|show`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.client.cli import app
from fedseal.crypto import keys

runner = CliRunner()


def _site_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    key = keys.generate_identity_key()
    pub = tmp_path / f"{name}.key.pub"
    keys.save_public_key(key.public_key(), pub)
    return pub, bytes(keys.key_id(key.public_key())).hex()


def _invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["roster", *args], env=env)


def _show(roster: Path, authority_pub: Path) -> dict:
    result = _invoke("show", "--roster", str(roster), "--authority", str(authority_pub), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def authority(tmp_path: Path) -> Path:
    out = tmp_path / "authority.key"
    result = _invoke("authority-init", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_authority_init_writes_a_private_key_0600_and_its_public_key(tmp_path: Path) -> None:
    out = tmp_path / "authority.key"
    result = _invoke("authority-init", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    pub = keys.load_public_key(tmp_path / "authority.key.pub")
    assert result.stdout.strip() == f"authority key id {bytes(keys.key_id(pub)).hex()}"
    assert "OFFLINE" in result.stderr
    again = _invoke("authority-init", "--out", str(out))
    assert again.exit_code == 2 and "exists" in again.stderr


def test_authority_init_encrypts_with_the_passphrase_from_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "authority.key"
    result = _invoke("authority-init", "--out", str(out), "--passphrase-env", "AUTH_PW", env={"AUTH_PW": "s3cret"})
    assert result.exit_code == 0, result.output
    assert keys.load_private_key(out, b"s3cret") is not None
    unset = _invoke("authority-init", "--out", str(tmp_path / "b.key"), "--passphrase-env", "NOPE_UNSET")
    assert unset.exit_code == 2 and "NOPE_UNSET" in unset.stderr


def test_create_add_revoke_show_edits_the_roster_one_version_at_a_time(
    tmp_path: Path, authority: Path
) -> None:
    pub_a, kid_a = _site_key(tmp_path, "site-a")
    pub_b, kid_b = _site_key(tmp_path, "site-b")
    pub_c, kid_c = _site_key(tmp_path, "site-c")
    roster = tmp_path / "roster.json"
    authority_pub = tmp_path / "authority.key.pub"

    created = _invoke(
        "create", "--authority-key", str(authority), "--consortium", "eu-hospitals",
        "--out", str(roster), "--site", f"site-a={pub_a}", "--site", f"site-b={pub_b}",
    )
    assert created.exit_code == 0, created.output
    doc = _show(roster, authority_pub)
    assert (doc["consortium"], doc["version"]) == ("eu-hospitals", 1)
    assert doc["sites"] == [
        {"site": "site-a", "key_id": kid_a, "status": "active"},
        {"site": "site-b", "key_id": kid_b, "status": "active"},
    ]

    added = _invoke("add", "--roster", str(roster), "--authority-key", str(authority), "--site", "site-c", "--key", str(pub_c))
    assert added.exit_code == 0, added.output
    assert added.stdout.strip() == "version 2"
    revoked = _invoke("revoke", "--roster", str(roster), "--authority-key", str(authority), "--site", "site-a")
    assert revoked.exit_code == 0, revoked.output

    doc = _show(roster, authority_pub)
    assert doc["version"] == 3
    assert [(s["site"], s["key_id"], s["status"]) for s in doc["sites"]] == [
        ("site-a", kid_a, "revoked"),
        ("site-b", kid_b, "active"),
        ("site-c", kid_c, "active"),
    ]

    text = _invoke("show", "--roster", str(roster), "--authority", str(authority_pub))
    assert text.exit_code == 0, text.output
    assert "version      3" in text.stdout
    assert f"site-a  {kid_a}  revoked" in text.stdout
    assert "signature verified" in text.stderr


def test_show_refuses_a_roster_edited_by_hand(tmp_path: Path, authority: Path) -> None:
    pub_a, _ = _site_key(tmp_path, "site-a")
    roster = tmp_path / "roster.json"
    assert _invoke("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(roster), "--site", f"site-a={pub_a}").exit_code == 0
    doc = json.loads(roster.read_text())
    doc["readable"]["sites"][0]["status"] = "revoked"
    roster.write_text(json.dumps(doc))
    result = _invoke("show", "--roster", str(roster), "--authority", str(tmp_path / "authority.key.pub"))
    assert result.exit_code == 1
    assert "refused" in result.stderr and "readable copy differs" in result.stderr


def test_show_refuses_a_roster_whose_signed_bytes_were_swapped(tmp_path: Path, authority: Path) -> None:
    pub_a, _ = _site_key(tmp_path, "site-a")
    pub_b, _ = _site_key(tmp_path, "site-b")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for out, pub in ((one, pub_a), (two, pub_b)):
        assert _invoke("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(out), "--site", f"site-x={pub}").exit_code == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    a["roster"], a["readable"] = b["roster"], b["readable"]  # b's content, a's signature
    one.write_text(json.dumps(a))
    result = _invoke("show", "--roster", str(one), "--authority", str(tmp_path / "authority.key.pub"))
    assert result.exit_code == 1 and "does not verify" in result.stderr


def test_show_under_another_authority_is_refused(tmp_path: Path, authority: Path) -> None:
    roster = tmp_path / "roster.json"
    assert _invoke("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(roster)).exit_code == 0
    other = tmp_path / "other.pub"
    keys.save_public_key(keys.generate_identity_key().public_key(), other)
    result = _invoke("show", "--roster", str(roster), "--authority", str(other))
    assert result.exit_code == 1 and "not by the pinned authority key" in " ".join(result.stderr.split())


def test_add_refuses_a_roster_not_signed_by_the_given_authority_key(
    tmp_path: Path, authority: Path
) -> None:
    roster = tmp_path / "roster.json"
    assert _invoke("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(roster)).exit_code == 0
    before = roster.read_text()
    other = tmp_path / "other.key"
    assert _invoke("authority-init", "--out", str(other)).exit_code == 0
    pub, _ = _site_key(tmp_path, "site-a")
    result = _invoke("add", "--roster", str(roster), "--authority-key", str(other), "--site", "site-a", "--key", str(pub))
    assert result.exit_code == 1 and "refused" in result.stderr
    assert roster.read_text() == before


def test_usage_errors_exit_2_and_leave_the_roster_unchanged(tmp_path: Path, authority: Path) -> None:
    pub_a, _ = _site_key(tmp_path, "site-a")
    roster = tmp_path / "roster.json"
    assert _invoke("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(roster), "--site", f"site-a={pub_a}").exit_code == 0
    before = roster.read_text()
    cases = [
        ("add", "--roster", str(roster), "--authority-key", str(authority), "--site", "site-a", "--key", str(pub_a)),
        ("add", "--roster", str(roster), "--authority-key", str(authority), "--site", "Bad Name", "--key", str(pub_a)),
        ("add", "--roster", str(roster), "--authority-key", str(authority), "--site", "site-b", "--key", str(tmp_path / "missing.pub")),
        ("revoke", "--roster", str(roster), "--authority-key", str(authority), "--site", "site-q"),
        ("revoke", "--roster", str(roster), "--authority-key", str(tmp_path / "missing.key"), "--site", "site-a"),
        ("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(roster)),
        ("create", "--authority-key", str(authority), "--consortium", "c", "--out", str(tmp_path / "n.json"), "--site", "site-a"),
    ]
    for args in cases:
        result = _invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.stderr
    assert roster.read_text() == before
    assert not (tmp_path / "n.json").exists()


def test_create_refuses_two_sites_with_one_key(tmp_path: Path, authority: Path) -> None:
    pub_a, _ = _site_key(tmp_path, "site-a")
    result = _invoke(
        "create", "--authority-key", str(authority), "--consortium", "c", "--out", str(tmp_path / "r.json"),
        "--site", f"site-a={pub_a}", "--site", f"site-b={pub_a}",
    )
    assert result.exit_code == 2 and "same public key" in result.stderr


def test_roster_help_is_listed_under_fl_client() -> None:
    result = runner.invoke(app, ["roster", "--help"])
    assert result.exit_code == 0
    for command in ("authority-init", "create", "add", "revoke", "show"):
        assert command in result.stdout
