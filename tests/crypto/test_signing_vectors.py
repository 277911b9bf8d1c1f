"""Known-answer tests: Wycheproof ECDSA P-256/SHA-256 (DER accepted; P1363 refused)."""

from __future__ import annotations

from typing import Any

import pytest

from fedseal.crypto import SignatureError, keys
from fedseal.crypto.signing import verify_der
from tests.vectorfiles import load_json

DER = load_json("wycheproof", "ecdsa_secp256r1_sha256_test.json")
P1363 = load_json("wycheproof", "ecdsa_secp256r1_sha256_p1363_test.json")


def _cases(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(g["publicKeyDer"], t) for g in doc["testGroups"] for t in g["tests"]]


def test_the_vector_files_hold_the_expected_number_of_cases() -> None:
    assert len(_cases(DER)) == DER["numberOfTests"] == 484
    assert len(_cases(P1363)) == P1363["numberOfTests"] == 262


@pytest.mark.parametrize(
    ("key_der", "case"), _cases(DER), ids=lambda v: f"tc{v['tcId']}" if isinstance(v, dict) else ""
)
def test_der_signature_verdict_matches_wycheproof(key_der: str, case: dict[str, Any]) -> None:
    public_key = keys.public_key_from_der(bytes.fromhex(key_der))
    msg, sig = bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"])
    # The DER file has no "acceptable" cases: every verdict is exact.
    if case["result"] == "valid":
        verify_der(public_key, msg, sig)
    else:
        assert case["result"] == "invalid"
        with pytest.raises(SignatureError):
            verify_der(public_key, msg, sig)


@pytest.mark.parametrize(
    ("key_der", "case"),
    _cases(P1363),
    ids=lambda v: f"tc{v['tcId']}" if isinstance(v, dict) else "",
)
def test_p1363_encoded_signatures_are_refused_because_only_der_is_accepted(
    key_der: str, case: dict[str, Any]
) -> None:
    # fedseal signatures are DER only; a raw r||s signature, even a valid one, must not verify.
    public_key = keys.public_key_from_der(bytes.fromhex(key_der))
    with pytest.raises(SignatureError):
        verify_der(public_key, bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"]))
