"""The roster: enrolment rules, revocation, a hash-chained history, safe files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedseal.crypto.keys import generate_identity_key
from fedseal.server.roster import Enrolment, EnrolmentError

ROOT_A = "aa" * 32
ROOT_B = "bb" * 32


def test_enrolling_then_approving_a_new_root_records_two_chained_events() -> None:
    key = generate_identity_key().public_key()
    r = Enrolment().enroll("site-a", key, [ROOT_A], now_ms=1).enroll("site-a", key, [ROOT_B], now_ms=2)
    site = r.get("site-a")
    assert site is not None and site.dataset_roots == (ROOT_A, ROOT_B)
    assert [e.action for e in r.events] == ["enroll", "approve-root"]
    assert r.events[1].prev == r.events[0].digest().hex()


def test_the_same_key_cannot_be_enrolled_for_two_sites() -> None:
    key = generate_identity_key().public_key()
    r = Enrolment().enroll("site-a", key, [ROOT_A], now_ms=1)
    with pytest.raises(EnrolmentError, match="already enrolled"):
        r.enroll("site-b", key, [ROOT_A], now_ms=2)


def test_a_site_cannot_silently_change_its_key() -> None:
    r = Enrolment().enroll("site-a", generate_identity_key().public_key(), [ROOT_A], now_ms=1)
    with pytest.raises(EnrolmentError, match="different key"):
        r.enroll("site-a", generate_identity_key().public_key(), [ROOT_A], now_ms=2)


def test_a_revoked_site_stays_on_file_and_is_no_longer_active() -> None:
    r = Enrolment().enroll("site-a", generate_identity_key().public_key(), [ROOT_A], now_ms=1)
    r = r.revoke("site-a", now_ms=2)
    assert r.active() == ()
    assert r.get("site-a") is not None
    with pytest.raises(EnrolmentError, match="revoked"):
        r.enroll("site-a", r.sites[0].public_key, [ROOT_B], now_ms=3)


@pytest.mark.parametrize("name", ["", "Site", "a b", "-x", "x" * 64, "é"])
def test_site_names_are_restricted(name: str) -> None:
    with pytest.raises(EnrolmentError):
        Enrolment().enroll(name, generate_identity_key().public_key(), [ROOT_A], now_ms=1)


@pytest.mark.parametrize("root", ["", "zz" * 32, "aa" * 31, "aa" * 33])
def test_dataset_roots_must_be_sha256_hex(root: str) -> None:
    with pytest.raises(EnrolmentError):
        Enrolment().enroll("site-a", generate_identity_key().public_key(), [root], now_ms=1)


def test_the_file_round_trips_with_mode_0600(tmp_path: Path) -> None:
    r = Enrolment().enroll("site-a", generate_identity_key().public_key(), [ROOT_A], now_ms=1)
    path = tmp_path / "roster.json"
    r.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Enrolment.load(path)
    assert again == r
    assert again.digest() == r.digest()


def test_an_edited_history_is_detected_on_load(tmp_path: Path) -> None:
    r = Enrolment().enroll("site-a", generate_identity_key().public_key(), [ROOT_A], now_ms=1)
    r = r.enroll("site-b", generate_identity_key().public_key(), [ROOT_B], now_ms=2)
    doc = r.to_json()
    doc["events"][0]["dataset_roots"] = [ROOT_B]
    path = tmp_path / "roster.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EnrolmentError, match="hash chain"):
        Enrolment.load(path)
