"""The site-side trust anchor (fedseal.client.trust): roster under a pinned authority, rollback
protection, static peers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseal.client.trust import SEEN_FILE, SiteTrust, TrustError, load_site_trust
from fedseal.crypto import keys
from fedseal.protocol.consortium import (
    ConsortiumRoster,
    ConsortiumSite,
    SignedConsortiumRoster,
    with_revoked,
    with_site,
)

T0 = 1_700_000_000_000
AUTHORITY = keys.generate_identity_key()
SITE_KEYS = [keys.generate_identity_key() for _ in range(5)]
DERS = [keys.public_key_to_der(k.public_key()) for k in SITE_KEYS]
KIDS = [bytes(keys.key_id(k.public_key())) for k in SITE_KEYS]


def _base() -> ConsortiumRoster:
    return ConsortiumRoster(
        "eu-hospitals", 1, T0, (ConsortiumSite("site-a", DERS[0]), ConsortiumSite("site-b", DERS[1]))
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    pub = tmp_path / "authority.pub"
    keys.save_public_key(AUTHORITY.public_key(), pub)
    return {"roster": tmp_path / "roster.json", "authority": pub, "state": tmp_path / "state"}


def _write(path: Path, roster: ConsortiumRoster, key=AUTHORITY) -> None:
    path.write_text(SignedConsortiumRoster.sign(roster, key).to_json(), encoding="utf-8")


def _load(env: dict[str, Path], static: dict[str, str] | None = None) -> SiteTrust:
    return load_site_trust(
        roster_path=env["roster"],
        authority_key_path=env["authority"],
        static_peers=static or {},
        state_dir=env["state"],
    )


def test_verified_roster_gives_its_active_sites_as_peers(env: dict[str, Path]) -> None:
    _write(env["roster"], with_revoked(with_site(_base(), "site-c", DERS[2], T0), "site-b", T0))
    trust = _load(env)
    assert dict(trust.peers) == {"site-a": KIDS[0], "site-c": KIDS[2]}
    assert (trust.roster_version, trust.consortium) == (3, "eu-hospitals")
    assert dict(trust.sources) == {"site-a": "roster", "site-c": "roster"}
    assert trust.trusts("site-a", KIDS[0]) and not trust.trusts("site-a", KIDS[1])
    assert not trust.trusts("site-b", KIDS[1])


def test_accepted_version_is_remembered_in_the_state_dir(env: dict[str, Path]) -> None:
    roster = with_site(_base(), "site-c", DERS[2], T0)
    _write(env["roster"], roster)
    _load(env)
    seen = json.loads((env["state"] / SEEN_FILE).read_text())
    (record,) = seen["authorities"].values()
    assert record == {"consortium": "eu-hospitals", "version": 2, "digest": roster.digest().hex()}
    assert (env["state"] / SEEN_FILE).stat().st_mode & 0o077 == 0


def test_rollback_to_an_older_roster_version_is_refused(env: dict[str, Path]) -> None:
    old = _base()
    new = with_revoked(old, "site-b", T0 + 1)
    _write(env["roster"], new)
    assert "site-b" not in _load(env).peers
    _write(env["roster"], old)  # the coordinator replays version 1, where site-b was active
    with pytest.raises(TrustError, match="version 1 is older than version 2") as err:
        _load(env)
    assert err.value.key == str(env["roster"])


def test_same_version_with_other_content_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], with_site(_base(), "site-c", DERS[2], T0))
    _load(env)
    _write(env["roster"], with_site(_base(), "site-x", DERS[3], T0))  # also version 2
    with pytest.raises(TrustError, match="same version, other content"):
        _load(env)


def test_same_roster_loads_again_and_a_newer_one_advances_the_state(env: dict[str, Path]) -> None:
    roster = _base()
    _write(env["roster"], roster)
    _load(env)
    assert _load(env).roster_version == 1
    _write(env["roster"], with_site(roster, "site-c", DERS[2], T0 + 1))
    assert _load(env).roster_version == 2
    _write(env["roster"], roster)
    with pytest.raises(TrustError, match="rollback refused"):
        _load(env)


def test_roster_of_another_consortium_from_the_same_authority_is_refused(
    env: dict[str, Path],
) -> None:
    _write(env["roster"], _base())
    _load(env)
    other = ConsortiumRoster("us-clinics", 7, T0, (ConsortiumSite("site-q", DERS[4]),))
    _write(env["roster"], other)
    with pytest.raises(TrustError, match="consortium 'us-clinics'"):
        _load(env)


def test_corrupt_rollback_state_is_an_error_not_a_reset(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    env["state"].mkdir()
    (env["state"] / SEEN_FILE).write_text("{}")
    with pytest.raises(TrustError, match="rollback state is malformed") as err:
        _load(env)
    assert err.value.key == str(env["state"] / SEEN_FILE)


def test_roster_signed_by_another_key_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base(), key=keys.generate_identity_key())
    with pytest.raises(TrustError, match="not by the pinned authority key"):
        _load(env)
    assert not (env["state"] / SEEN_FILE).exists()


def test_roster_edited_by_hand_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    doc = json.loads(env["roster"].read_text())
    doc["readable"]["sites"][0]["key_id"] = KIDS[4].hex()
    env["roster"].write_text(json.dumps(doc))
    with pytest.raises(TrustError, match="readable copy differs") as err:
        _load(env)
    assert err.value.key == str(env["roster"])


def test_static_peers_are_merged_with_the_roster(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    trust = _load(env, {"site-a": KIDS[0].hex(), "site-z": KIDS[4].hex().upper()})
    assert dict(trust.peers) == {"site-a": KIDS[0], "site-b": KIDS[1], "site-z": KIDS[4]}
    assert dict(trust.sources) == {"site-a": "both", "site-b": "roster", "site-z": "peers"}


def test_static_peer_with_another_key_than_the_roster_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    with pytest.raises(TrustError, match="differs from the key of 'site-a'") as err:
        _load(env, {"site-a": KIDS[3].hex()})
    assert err.value.key == "peers.site-a"


def test_static_peer_revoked_in_the_roster_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], with_revoked(_base(), "site-b", T0))
    with pytest.raises(TrustError, match="revoked in the consortium roster") as err:
        _load(env, {"site-b": KIDS[1].hex()})
    assert err.value.key == "peers.site-b"


def test_static_peer_holding_another_roster_sites_key_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    with pytest.raises(TrustError, match="belongs to 'site-a'"):
        _load(env, {"site-q": KIDS[0].hex()})


@pytest.mark.parametrize(
    ("static", "message"),
    [
        ({"site-a": "ab"}, "64 hex digits"),
        ({"Site A": KIDS[0].hex()}, "site id 'Site A' is invalid"),
        ({"site-a": KIDS[0].hex(), "site-b": KIDS[0].hex()}, "same key id as peers.site-a"),
    ],
)
def test_malformed_static_peers_are_refused(
    tmp_path: Path, static: dict[str, str], message: str
) -> None:
    with pytest.raises(TrustError, match=message):
        load_site_trust(
            roster_path=None, authority_key_path=None, static_peers=static, state_dir=tmp_path
        )


def test_static_peers_alone_are_the_peers(tmp_path: Path) -> None:
    trust = load_site_trust(
        roster_path=None,
        authority_key_path=None,
        static_peers={"site-a": KIDS[0].hex()},
        state_dir=tmp_path,
    )
    assert dict(trust.peers) == {"site-a": KIDS[0]} and trust.roster_version is None
    assert dict(trust.sources) == {"site-a": "peers"}


def test_neither_roster_nor_peers_gives_no_peers(tmp_path: Path) -> None:
    trust = load_site_trust(
        roster_path=None, authority_key_path=None, static_peers={}, state_dir=tmp_path
    )
    assert dict(trust.peers) == {} and trust.consortium is None


def test_missing_authority_key_file_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    env["authority"].unlink()
    with pytest.raises(TrustError, match="authority public key not found") as err:
        _load(env)
    assert err.value.key == str(env["authority"])


def test_unusable_authority_key_file_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    env["authority"].write_text("not a key")
    with pytest.raises(TrustError, match="not a usable authority key"):
        _load(env)


def test_roster_without_an_authority_key_is_refused(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    with pytest.raises(TrustError, match="needs the roster authority's public key") as err:
        load_site_trust(
            roster_path=env["roster"],
            authority_key_path=None,
            static_peers={},
            state_dir=env["state"],
        )
    assert err.value.key == str(env["roster"])


def test_authority_key_without_a_roster_is_refused(env: dict[str, Path]) -> None:
    with pytest.raises(TrustError, match="no consortium roster"):
        load_site_trust(
            roster_path=None,
            authority_key_path=env["authority"],
            static_peers={},
            state_dir=env["state"],
        )


def test_missing_roster_file_is_refused(env: dict[str, Path]) -> None:
    with pytest.raises(TrustError, match="cannot read") as err:
        _load(env)
    assert err.value.key == str(env["roster"])


def test_site_trust_mappings_are_read_only(env: dict[str, Path]) -> None:
    _write(env["roster"], _base())
    trust = _load(env)
    with pytest.raises(TypeError):
        trust.peers["site-evil"] = b"\x00" * 32  # type: ignore[index]
