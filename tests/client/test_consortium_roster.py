"""The signed consortium roster document (fedseal.protocol.consortium)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseal.crypto import keys
from fedseal.protocol.consortium import (
    MAX_ROSTER_SITES,
    ROSTER_TAG,
    ConsortiumRoster,
    ConsortiumRosterError,
    ConsortiumSite,
    RosterContentError,
    RosterFormatError,
    RosterSignatureError,
    SignedConsortiumRoster,
    decode_roster,
    encode_roster,
    trusted_keys,
    with_revoked,
    with_site,
)
from fedseal.protocol.encoding import Writer
from fedseal.protocol.errors import BadSignatureError, DecodeError, ProtocolError

T0 = 1_700_000_000_000
AUTHORITY = keys.generate_identity_key()
OTHER_AUTHORITY = keys.generate_identity_key()
SITE_KEYS = [keys.generate_identity_key() for _ in range(8)]
DERS = [keys.public_key_to_der(k.public_key()) for k in SITE_KEYS]


def _roster(n: int = 3, consortium: str = "eu-hospitals") -> ConsortiumRoster:
    sites = tuple(ConsortiumSite(f"site-{chr(ord('a') + i)}", DERS[i]) for i in range(n))
    return ConsortiumRoster(consortium, 1, T0, sites)


def _signed_json(roster: ConsortiumRoster, key=AUTHORITY) -> str:
    return SignedConsortiumRoster.sign(roster, key).to_json()


def _load(text: str | bytes) -> ConsortiumRoster:
    return SignedConsortiumRoster.from_json(text).verify(AUTHORITY.public_key())


# --- round trip ----------------------------------------------------------------------------


def test_signed_roster_round_trips_through_json_and_verifies() -> None:
    roster = with_revoked(_roster(3), "site-b", T0 + 1)
    assert _load(_signed_json(roster)) == roster
    assert decode_roster(encode_roster(roster)) == roster
    assert encode_roster(roster).startswith(ROSTER_TAG)


def test_sites_are_stored_sorted_by_id_whatever_order_they_are_given_in() -> None:
    a, b = ConsortiumSite("site-a", DERS[0]), ConsortiumSite("site-b", DERS[1])
    assert ConsortiumRoster("c", 1, T0, (b, a)) == ConsortiumRoster("c", 1, T0, (a, b))
    assert [s.site for s in ConsortiumRoster("c", 1, T0, (b, a)).sites] == ["site-a", "site-b"]


def test_trusted_keys_lists_active_sites_with_their_key_ids() -> None:
    roster = with_revoked(_roster(3), "site-c", T0 + 1)
    assert trusted_keys(roster) == {
        "site-a": bytes(keys.key_id(SITE_KEYS[0].public_key())),
        "site-b": bytes(keys.key_id(SITE_KEYS[1].public_key())),
    }


def test_readable_copy_shows_sites_key_ids_and_status() -> None:
    doc = json.loads(_signed_json(with_revoked(_roster(2), "site-a", T0 + 5)))
    assert doc["format"] == "fedseal-consortium-roster-v1"
    assert doc["authority_key_id"] == bytes(keys.key_id(AUTHORITY.public_key())).hex()
    assert doc["readable"]["version"] == 2
    assert doc["readable"]["issued_at"] == "2023-11-14T22:13:20.005Z"
    assert [(s["site"], s["status"]) for s in doc["readable"]["sites"]] == [
        ("site-a", "revoked"),
        ("site-b", "active"),
    ]
    assert doc["readable"]["sites"][1]["key_id"] == bytes(keys.key_id(SITE_KEYS[1].public_key())).hex()


def test_reformatted_json_with_the_same_content_still_loads() -> None:
    roster = _roster(2)
    doc = json.loads(_signed_json(roster))
    assert _load(json.dumps(doc, separators=(",", ":"), sort_keys=True)) == roster


# --- signature -----------------------------------------------------------------------------


def test_roster_signed_by_another_authority_is_refused() -> None:
    signed = SignedConsortiumRoster.from_json(_signed_json(_roster(), OTHER_AUTHORITY))
    with pytest.raises(RosterSignatureError, match="not by the pinned authority key"):
        signed.verify(AUTHORITY.public_key())


def test_signature_by_another_key_under_the_pinned_authority_key_id_is_refused() -> None:
    roster = _roster()
    forged = SignedConsortiumRoster.sign(roster, OTHER_AUTHORITY)
    relabelled = SignedConsortiumRoster(
        roster, forged.signature, bytes(keys.key_id(AUTHORITY.public_key()))
    )
    with pytest.raises(RosterSignatureError, match="does not verify"):
        relabelled.verify(AUTHORITY.public_key())


def test_signature_errors_are_protocol_bad_signature_errors() -> None:
    assert issubclass(RosterSignatureError, BadSignatureError)
    assert issubclass(RosterFormatError, DecodeError)
    assert issubclass(ConsortiumRosterError, ProtocolError)


def test_every_flipped_byte_of_the_signed_roster_bytes_is_refused() -> None:
    roster = _roster(2)
    signed = SignedConsortiumRoster.sign(roster, AUTHORITY)
    payload = encode_roster(roster)
    for i in range(len(payload)):
        tampered = bytearray(payload)
        tampered[i] ^= 0x01
        with pytest.raises(ConsortiumRosterError):
            other = decode_roster(bytes(tampered))
            SignedConsortiumRoster(other, signed.signature, signed.authority_key_id).verify(
                AUTHORITY.public_key()
            )


def test_every_single_bit_flip_of_the_roster_file_is_refused() -> None:
    data = _signed_json(_roster(2)).encode()
    for i in range(len(data)):
        for bit in range(8):
            tampered = bytearray(data)
            tampered[i] ^= 1 << bit
            with pytest.raises(ConsortiumRosterError):
                _load(bytes(tampered))


# --- the readable copy and strict JSON -----------------------------------------------------


def _doc(roster: ConsortiumRoster | None = None) -> dict:
    return json.loads(_signed_json(roster or _roster(2)))


def test_readable_copy_that_differs_from_the_signed_bytes_is_refused() -> None:
    doc = _doc()
    doc["readable"]["sites"][0]["status"] = "revoked"
    with pytest.raises(RosterFormatError, match="readable copy differs"):
        SignedConsortiumRoster.from_json(json.dumps(doc))


def test_readable_copy_listing_an_extra_site_is_refused() -> None:
    doc = _doc()
    extra = dict(doc["readable"]["sites"][0], site="site-z")
    doc["readable"]["sites"].append(extra)
    with pytest.raises(RosterFormatError, match="readable copy differs"):
        SignedConsortiumRoster.from_json(json.dumps(doc))


def test_readable_version_written_as_a_boolean_or_string_is_refused() -> None:
    for value in (True, "1"):
        doc = _doc()
        doc["readable"]["version"] = value
        with pytest.raises(RosterFormatError, match="readable copy differs"):
            SignedConsortiumRoster.from_json(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("readable"), "'readable' is missing"),
        (lambda d: d.pop("signature"), "'signature' is missing"),
        (lambda d: d.update(comment="x"), "unknown member 'comment'"),
        (lambda d: d.update(format="fedseal-consortium-roster-v2"), "format"),
        (lambda d: d.update(authority_key_id=d["authority_key_id"].upper()), "lowercase hex"),
        (lambda d: d.update(authority_key_id="ab"), "64 lowercase hex"),
        (lambda d: d.update(signature="not base64!"), "signature is not base64"),
        (lambda d: d.update(signature=12), "signature must be a base64 string"),
        (lambda d: d.update(roster="QQ"), "roster is not valid base64"),
        (lambda d: d.update(signature=base64.b64encode(b"\x30" * 4).decode()), "signature must be"),
        (lambda d: d.update(roster=base64.b64encode(b"junk").decode()), "truncated"),
    ],
)
def test_malformed_roster_file_gives_a_specific_error(edit, message: str) -> None:
    doc = _doc()
    edit(doc)
    with pytest.raises(RosterFormatError, match=message):
        SignedConsortiumRoster.from_json(json.dumps(doc))


def test_non_canonical_base64_padding_bits_are_refused() -> None:
    # A DER signature is 70 to 72 bytes: sign until its base64 has padding (72 has none).
    doc = next(d for d in (_doc() for _ in range(200)) if d["signature"].endswith("="))
    sig = doc["signature"]
    # The last character before the padding carries unused bits; set one of them.
    idx = sig.rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bumped = alphabet[alphabet.index(idx) ^ 1]
    doc["signature"] = sig.rstrip("=")[:-1] + bumped + sig[len(sig.rstrip("=")) :]
    assert base64.b64decode(doc["signature"]) == base64.b64decode(sig)
    with pytest.raises(RosterFormatError, match="canonical base64"):
        SignedConsortiumRoster.from_json(json.dumps(doc))


def test_duplicate_json_member_is_refused() -> None:
    text = _signed_json(_roster(1))
    text = text.replace('"format":', '"format": "x", "format":', 1)
    with pytest.raises(RosterFormatError, match="appears twice"):
        SignedConsortiumRoster.from_json(text)


def test_oversized_file_is_refused_before_parsing() -> None:
    with pytest.raises(RosterFormatError, match="exceed the bound 100"):
        SignedConsortiumRoster.from_json(" " * 101, max_bytes=100)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"\xff{}", "not valid UTF-8"),
        ("[1, 2]", "not a JSON object"),
        ("{", "not valid JSON"),
        ('{"format": NaN}', "NaN is not allowed"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_garbage_files_give_a_format_error(text: str | bytes, message: str) -> None:
    with pytest.raises(RosterFormatError, match=message):
        SignedConsortiumRoster.from_json(text)


# --- content rules -------------------------------------------------------------------------


def test_duplicate_site_is_refused() -> None:
    with pytest.raises(RosterContentError, match="site listed twice"):
        ConsortiumRoster(
            "c", 1, T0, (ConsortiumSite("site-a", DERS[0]), ConsortiumSite("site-a", DERS[1]))
        )


def test_two_sites_with_one_key_are_refused() -> None:
    with pytest.raises(RosterContentError, match="same public key as site 'site-a'"):
        ConsortiumRoster(
            "c", 1, T0, (ConsortiumSite("site-a", DERS[0]), ConsortiumSite("site-b", DERS[0]))
        )


def _raw_roster(entries: list[tuple[str, bytes, int]], version: int = 1) -> bytes:
    w = Writer().raw(ROSTER_TAG).text("c").u64(version).u64(T0).count(len(entries))
    for site, der, flag in entries:
        w.text(site).blob(der).u8(flag)
    return w.to_bytes()


@pytest.mark.parametrize(
    ("entries", "version", "message"),
    [
        ([("site-a", DERS[0], 1), ("site-a", DERS[1], 1)], 1, "not strictly sorted"),
        ([("site-b", DERS[0], 1), ("site-a", DERS[1], 1)], 1, "not strictly sorted"),
        ([("site-a", DERS[0], 1), ("site-b", DERS[0], 1)], 1, "same public key"),
        ([("site-a", DERS[0], 2)], 1, "active flag 2"),
        ([("Site-A", DERS[0], 1)], 1, "site id 'Site-A' is invalid"),
        ([("site-a", DERS[0][:-1], 1)], 1, "public key"),
        ([("site-a", DERS[0], 1)], 0, "version must be"),
    ],
)
def test_decoding_refuses_invalid_signed_bytes(entries, version: int, message: str) -> None:
    with pytest.raises(RosterFormatError, match=message):
        decode_roster(_raw_roster(entries, version))


def test_decoding_refuses_trailing_bytes_and_a_wrong_tag() -> None:
    good = _raw_roster([("site-a", DERS[0], 1)])
    assert decode_roster(good).sites[0].site == "site-a"
    with pytest.raises(RosterFormatError, match="trailing"):
        decode_roster(good + b"\x00")
    with pytest.raises(RosterFormatError, match="domain tag"):
        decode_roster(b"fedseal/v1/roster\x00" + good[len(ROSTER_TAG) :])


def test_decoding_refuses_a_site_count_over_the_bound_before_reading_sites() -> None:
    w = Writer().raw(ROSTER_TAG).text("c").u64(1).u64(T0).count(MAX_ROSTER_SITES + 1)
    with pytest.raises(RosterFormatError, match="exceeds bound"):
        decode_roster(w.to_bytes())


@pytest.mark.parametrize("name", ["", " padded", "tab\there", "x" * 129])
def test_invalid_consortium_names_are_refused(name: str) -> None:
    with pytest.raises(RosterContentError, match="consortium name"):
        ConsortiumRoster(name, 1, T0)


@pytest.mark.parametrize("der", [DERS[0] + b"\x00", DERS[0][:-1], b"", b"\x30\x00"])
def test_malformed_or_non_canonical_site_key_is_refused(der: bytes) -> None:
    with pytest.raises(RosterContentError, match="public key"):
        ConsortiumSite("site-a", der)


# --- edits ---------------------------------------------------------------------------------


def test_adding_a_site_bumps_the_version_and_keeps_the_consortium() -> None:
    roster = _roster(1)
    added = with_site(roster, "site-z", DERS[5], T0 + 10)
    assert (added.version, added.issued_at_ms, added.consortium) == (2, T0 + 10, "eu-hospitals")
    assert added.site("site-z") == ConsortiumSite("site-z", DERS[5], True)
    assert roster.site("site-z") is None  # the original is unchanged


def test_revoking_a_site_bumps_the_version_and_keeps_it_listed_inactive() -> None:
    revoked = with_revoked(_roster(2), "site-a", T0 + 10)
    assert revoked.version == 2
    assert revoked.site("site-a") == ConsortiumSite("site-a", DERS[0], False)
    assert "site-a" not in trusted_keys(revoked)


def test_adding_an_active_site_again_or_another_sites_key_is_refused() -> None:
    roster = _roster(2)
    with pytest.raises(RosterContentError, match="already in the roster"):
        with_site(roster, "site-a", DERS[5], T0)
    with pytest.raises(RosterContentError, match="same public key"):
        with_site(roster, "site-z", DERS[1], T0)


def test_a_revoked_site_comes_back_only_with_a_new_key() -> None:
    revoked = with_revoked(_roster(2), "site-a", T0 + 1)
    with pytest.raises(RosterContentError, match="needs a new key"):
        with_site(revoked, "site-a", DERS[0], T0 + 2)
    back = with_site(revoked, "site-a", DERS[6], T0 + 2)
    assert back.version == 3 and back.site("site-a") == ConsortiumSite("site-a", DERS[6], True)


def test_revoking_an_unknown_or_revoked_site_is_refused() -> None:
    roster = _roster(1)
    with pytest.raises(RosterContentError, match="not in the roster"):
        with_revoked(roster, "site-q", T0)
    with pytest.raises(RosterContentError, match="already revoked"):
        with_revoked(with_revoked(roster, "site-a", T0), "site-a", T0)


def test_digest_changes_with_any_edit() -> None:
    roster = _roster(2)
    assert roster.digest() != with_revoked(roster, "site-a", T0).digest()
    assert roster.digest() != ConsortiumRoster(roster.consortium, 1, T0 + 1, roster.sites).digest()


# --- properties ----------------------------------------------------------------------------

_SITE_IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)


@st.composite
def rosters(draw: st.DrawFn) -> ConsortiumRoster:
    names = draw(st.lists(_SITE_IDS, unique=True, max_size=len(DERS)))
    key_order = draw(st.permutations(range(len(DERS))))
    sites = tuple(
        ConsortiumSite(name, DERS[key_order[i]], draw(st.booleans()))
        for i, name in enumerate(names)
    )
    consortium = draw(
        st.text(
            st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1, max_size=30
        )
    )
    return ConsortiumRoster(
        consortium,
        draw(st.integers(1, 2**64 - 1)),
        draw(st.integers(0, 253_402_300_799_999)),
        sites,
    )


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(roster=rosters())
def test_any_roster_round_trips_through_bytes_and_signed_json(roster: ConsortiumRoster) -> None:
    assert decode_roster(encode_roster(roster)) == roster
    assert _load(_signed_json(roster)) == roster


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(roster=rosters(), data=st.data())
def test_any_tampered_roster_is_refused(roster: ConsortiumRoster, data: st.DataObject) -> None:
    signed = SignedConsortiumRoster.sign(roster, AUTHORITY)
    payload = bytearray(encode_roster(roster))
    index = data.draw(st.integers(0, len(payload) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    payload[index] ^= mask
    with pytest.raises(ConsortiumRosterError):
        tampered = decode_roster(bytes(payload))
        SignedConsortiumRoster(tampered, signed.signature, signed.authority_key_id).verify(
            AUTHORITY.public_key()
        )
    text = bytearray(signed.to_json().encode())
    index = data.draw(st.integers(0, len(text) - 1), label="json index")
    bit = data.draw(st.integers(0, 7), label="json bit")
    text[index] ^= 1 << bit
    with pytest.raises(ConsortiumRosterError):
        _load(bytes(text))
