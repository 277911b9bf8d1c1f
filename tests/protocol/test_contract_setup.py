"""The run's data-contract digest is signed into the round setup as a tagged trailing section
(issue 18.4): a setup without a contract keeps its bytes, one with a contract appends one
section after the DP section, and a malformed section is a decode error."""

from __future__ import annotations

import dataclasses

import pytest

from fedseal.protocol import dp
from fedseal.protocol.config import RoundConfig
from fedseal.protocol.errors import ConfigError, DecodeError
from fedseal.protocol.messages import RoundSetup, decode_payload
from fedseal.protocol.types import MessageKind

from ._support import LIMITS_DEFAULT, make_config, make_fed

DIGEST = bytes(range(100, 132))
DP = dp.DpParams(16, 1.0, 1e-3, 300.0, 0.1, 32, 4, 1)


def _setup(contract: bytes = b"", params_dp: dp.DpParams | None = None) -> RoundSetup:
    fed, _ = make_fed(5, length=16, seed=3)
    outcome = fed.run_round(1)
    setup = outcome.server.setup
    params = dataclasses.replace(
        setup.params,
        contract_digest=contract,
        dp=params_dp,
        rotation_seed=bytes(32) if params_dp else b"",
    )
    return dataclasses.replace(setup, params=params)


def test_a_contract_appends_one_tagged_section_and_round_trips() -> None:
    plain, with_contract = _setup(), _setup(DIGEST)
    assert with_contract.body_bytes() == plain.body_bytes() + b"\x02" + DIGEST
    assert with_contract.digest != plain.digest  # the signed setup digest binds the contract
    decoded = decode_payload(MessageKind.ROUND_SETUP, with_contract.to_payload(), LIMITS_DEFAULT)
    assert decoded == with_contract and decoded.params.contract_digest == DIGEST


def test_the_contract_section_follows_the_dp_section() -> None:
    with_dp = _setup(b"", DP)
    both = _setup(DIGEST, DP)
    assert both.body_bytes() == with_dp.body_bytes() + b"\x02" + DIGEST
    assert decode_payload(MessageKind.ROUND_SETUP, both.to_payload(), LIMITS_DEFAULT) == both


@pytest.mark.parametrize(
    "mutate",
    [
        lambda plain, dp_section, contract: plain + contract + dp_section,  # out of order
        lambda plain, dp_section, contract: plain + contract + contract,  # twice
        lambda plain, dp_section, contract: plain + contract[:-1],  # truncated digest
        lambda plain, dp_section, contract: plain + b"\x03" + DIGEST,  # unknown tag
    ],
)
def test_a_malformed_contract_section_is_a_decode_error(mutate: object) -> None:
    plain = _setup().to_payload()
    dp_section = _setup(b"", DP).to_payload()[len(plain) :]
    contract = _setup(DIGEST).to_payload()[len(plain) :]
    with pytest.raises(DecodeError):
        decode_payload(MessageKind.ROUND_SETUP, mutate(plain, dp_section, contract), LIMITS_DEFAULT)  # type: ignore[operator]


def test_the_round_config_carries_the_digest_into_the_parameters_and_checks_its_length() -> None:
    cfg = dataclasses.replace(make_config(16), contract_digest=DIGEST)
    assert cfg.resolve(5).contract_digest == DIGEST
    assert RoundConfig.resolve(make_config(16), 5).contract_digest == b""
    with pytest.raises(ConfigError, match="contract_digest must be empty or 32 bytes"):
        dataclasses.replace(make_config(16), contract_digest=b"short").resolve(5)


def test_a_whole_round_with_a_contract_signs_it_into_every_sites_setup() -> None:
    fed, _ = make_fed(
        5, length=16, seed=3, config=dataclasses.replace(make_config(16), contract_digest=DIGEST)
    )
    outcome = fed.run_round(1)
    assert outcome.failure is None
    assert outcome.server.setup.params.contract_digest == DIGEST
