"""A DP round's privacy accounting is a signed entry after its round result: ρ from the logged
DpParams and the run's ε so far, both recomputed by ``fl-audit verify``, which fails (exit 1,
naming the round) when either was tampered with."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import EXIT_FAILED, EXIT_OK, app
from fedseal.audit.codec import decode_entry, encode_entry, entry_tags
from fedseal.audit.entries import DpRound, EntryKind, RoundStatus, RunStart, RunStatus
from fedseal.audit.errors import AuditStateError, AuditVerificationError
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import save_public_key
from fedseal.privacy import dp_round_noise, epsilon, round_rho
from fedseal.protocol.errors import DecodeError
from tests.audit.logbuilder import CLOCK0, BuiltLog, build_run_log, digest, sample_dp_params

runner = CliRunner()
DELTA = 1e-6


def _dp_rounds(path: Path) -> list[tuple[int, DpRound]]:
    with MerkleLogStore.open(path, read_only=True) as store:
        out = []
        for index in store.find(int(EntryKind.DP_ROUND)):
            entry = decode_entry(store.entries(index, index + 1)[0].data)
            assert isinstance(entry, DpRound)
            out.append((index, entry))
        return out


def _entry(**changes: object) -> DpRound:
    dp = sample_dp_params()
    rho = round_rho(dp_round_noise(dp))
    e = DpRound(digest("run")[:16], 2, dp.to_bytes(), rho, epsilon([rho, rho], DELTA), DELTA)
    return dataclasses.replace(e, **changes)


def test_a_dp_round_entry_round_trips_with_its_floats_as_binary64_bit_patterns() -> None:
    e = _entry()
    data = encode_entry(e)
    assert data[:2] == bytes([1, int(EntryKind.DP_ROUND)])
    assert decode_entry(data) == e
    assert data[-24:] == struct.pack(">ddd", e.rho, e.epsilon_so_far, e.delta)
    assert entry_tags(e) == (int(EntryKind.DP_ROUND), None, 2)
    assert e.params == sample_dp_params()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0])
@pytest.mark.parametrize("name", ["rho", "epsilon_so_far", "delta"])
def test_a_float_field_refuses_nan_infinities_zero_and_negative_zero(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=name):
        _entry(**{name: bad})
    data = bytearray(encode_entry(_entry()))
    offset = {"rho": -24, "epsilon_so_far": -16, "delta": -8}[name]
    data[len(data) + offset : len(data) + offset + 8] = struct.pack(">d", bad)
    with pytest.raises(DecodeError):
        decode_entry(bytes(data))


def test_a_dp_round_entry_refuses_parameters_that_do_not_decode_and_a_delta_of_one() -> None:
    with pytest.raises(ValueError, match="dp_params"):
        _entry(dp_params=b"not dp params")
    with pytest.raises(ValueError, match="delta"):
        _entry(delta=1.0)


@settings(max_examples=60, deadline=None)
@given(
    rho=st.floats(min_value=1e-300, max_value=1e300),
    eps=st.floats(min_value=1e-300, max_value=1e300),
    delta=st.floats(min_value=1e-300, max_value=0.999),
    rnd=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_valid_dp_round_entry_decodes_to_itself(
    rho: float, eps: float, delta: float, rnd: int
) -> None:
    e = _entry(rho=rho, epsilon_so_far=eps, delta=delta, round=rnd)
    assert decode_entry(encode_entry(e)) == e


def test_a_run_start_without_dp_keeps_its_bytes_and_one_with_dp_carries_its_budget() -> None:
    plain = RunStart(digest("r")[:16], digest("c"), digest("ro"), digest("m"), "v", 5, 3)
    with_dp = dataclasses.replace(plain, dp_budget=(8.0, DELTA))
    assert encode_entry(with_dp)[: len(encode_entry(plain))] == encode_entry(plain)
    assert encode_entry(with_dp)[len(encode_entry(plain)) :] == b"\x01" + struct.pack(">dd", 8.0, DELTA)
    assert decode_entry(encode_entry(with_dp)) == with_dp and with_dp.dp and not plain.dp
    with pytest.raises(DecodeError, match="section tag 0"):
        decode_entry(encode_entry(plain) + b"\x00" + struct.pack(">dd", 8.0, DELTA))
    with pytest.raises(ValueError, match="delta"):
        dataclasses.replace(plain, dp_budget=(8.0, 0.0))


def _dp_log(tmp_path: Path, *, rounds: int = 3, end_run: bool = True) -> BuiltLog:
    return build_run_log(
        tmp_path / "audit.sqlite", rounds=rounds, dp=sample_dp_params(), end_run=end_run,
        dp_budget=(8.0, DELTA),
    )  # fmt: skip


def test_a_dp_run_verifies_with_one_entry_per_round_and_the_recomputed_epsilon(
    tmp_path: Path,
) -> None:
    built = _dp_log(tmp_path)
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    rho = round_rho(dp_round_noise(sample_dp_params()))
    entries = _dp_rounds(built.path)
    assert [e.round for _, e in entries] == [1, 2, 3]
    assert [e.rho for _, e in entries] == [rho] * 3
    assert [e.epsilon_so_far for _, e in entries] == [
        epsilon([rho] * k, DELTA) for k in (1, 2, 3)
    ]
    assert result.dp_runs == ((built.run_id.hex(), 3, epsilon([rho] * 3, DELTA), DELTA),)
    # Each one directly follows its round result (written in the same commit).
    with MerkleLogStore.open(built.path, read_only=True) as store:
        results = store.find(int(EntryKind.ROUND_RESULT))
    assert [i for i, _ in entries] == [i + 1 for i in results]


def _tamper(tmp_path: Path, **changes: object) -> tuple[BuiltLog, int]:
    """A DP run of 2 rounds, then round 3's result and a forged accounting entry for it."""
    built = build_run_log(
        tmp_path / "audit.sqlite", rounds=3, dp=sample_dp_params(), end_run=False,
        dp_budget=(8.0, DELTA), dp_until=2,
    )  # fmt: skip
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        rhos = list(log.dp_rhos)
    finally:
        log.close()
    dp = sample_dp_params()
    rho = round_rho(dp_round_noise(dp))
    honest = DpRound(built.run_id, 3, dp.to_bytes(), rho, epsilon([*rhos, rho], DELTA), DELTA)
    forged = dataclasses.replace(honest, **changes)
    with MerkleLogStore.open(built.path) as store:
        index = store.append(int(EntryKind.DP_ROUND), encode_entry(forged), round=3)
    return built, index


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"rho": "x1.001"}, "dp-rho"),
        ({"epsilon_so_far": "x0.99"}, "dp-epsilon"),
        ({"epsilon_so_far": "x1.000001"}, "dp-epsilon"),
        # less noise than the setup the sites signed for: caught before rho is recomputed
        ({"dp_params": "more noise"}, "dp-setup"),
        ({"delta": 1e-5}, "dp-round"),
    ],
)
def test_a_tampered_rho_or_epsilon_fails_verify_naming_the_round(
    tmp_path: Path, changes: dict[str, object], check: str
) -> None:
    dp = sample_dp_params()
    rho = round_rho(dp_round_noise(dp))
    eps3 = epsilon([rho] * 3, DELTA)
    concrete: dict[str, object] = {}
    for name, value in changes.items():
        if value == "more noise":  # the log claims less privacy loss than the params give
            concrete[name] = dataclasses.replace(dp, local_stddev=dp.local_stddev * 0.5).to_bytes()
        elif isinstance(value, str):
            base = rho if name == "rho" else eps3
            concrete[name] = base * float(value[1:])
        else:
            concrete[name] = value
    built, index = _tamper(tmp_path, **concrete)
    with pytest.raises(AuditVerificationError) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert (err.value.index, err.value.check, err.value.entry_type) == (index, check, "dp-round")
    assert "round 3" in str(err.value)
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    result = runner.invoke(app, ["verify", str(built.path), "--coordinator-key", str(pub)])
    assert result.exit_code == EXIT_FAILED, result.output
    assert "round 3" in result.output


def test_an_honest_accounting_entry_appended_the_same_way_verifies(tmp_path: Path) -> None:
    built, _ = _tamper(tmp_path)
    verify_log(built.path, coordinator_key=built.coordinator.public_key())


def test_the_log_refuses_dp_accounting_that_breaks_the_rules(tmp_path: Path) -> None:
    built = build_run_log(
        tmp_path / "audit.sqlite", rounds=3, dp=sample_dp_params(), end_run=False,
        dp_budget=(8.0, DELTA), dp_until=2, revoke_last_after_round=None,
    )  # fmt: skip
    params = sample_dp_params().to_bytes()
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        with pytest.raises(AuditStateError, match="DP accounting of round 2 after round 3"):
            log.append_dp_round(2, dp_params=params)
        no_noise = dataclasses.replace(sample_dp_params(), local_stddev=0.0).to_bytes()
        with pytest.raises(AuditStateError, match="without noise"):
            log.append_dp_round(3, dp_params=no_noise)
        # Round 3 completed without its accounting: neither the next result nor the end.
        with pytest.raises(AuditStateError, match="round 3 of a DP run completed without"):
            log.append_run_end(RunStatus.COMPLETED, ended_at_ms=CLOCK0 + 10**6)
        log.append_dp_round(3, dp_params=params)
        with pytest.raises(AuditStateError, match="second DP accounting entry for round 3"):
            log.append_dp_round(3, dp_params=params)
        log.append_round_result(
            4, aggregate_digest=None, new_model_digest=built.models[-1], status=RoundStatus.FAILED,
            reason="too few sites",
        )  # fmt: skip
        log.sign_tree_head(CLOCK0 + 2 * 10**6)
        with pytest.raises(AuditStateError, match="which released nothing"):
            log.append_dp_round(4, dp_params=params)
        log.append_run_end(RunStatus.COMPLETED, ended_at_ms=CLOCK0 + 2 * 10**6, reason="done")
        log.sign_tree_head(CLOCK0 + 2 * 10**6)
    finally:
        log.close()
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert result.dp_runs[0][1] == 3


def test_a_reopened_log_keeps_the_runs_rhos(tmp_path: Path) -> None:
    built = _dp_log(tmp_path, rounds=2, end_run=False)
    rho = round_rho(dp_round_noise(sample_dp_params()))
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        assert log.dp_rhos == (rho, rho) and log.dp_budget == (8.0, DELTA)
    finally:
        log.close()


def test_dp_accounting_in_a_run_without_dp_fails_verify(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", rounds=2, end_run=False)
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        with pytest.raises(AuditStateError, match="no DP budget"):
            log.append_dp_round(2, dp_params=sample_dp_params().to_bytes())
    finally:
        log.close()
    dp = sample_dp_params()
    rho = round_rho(dp_round_noise(dp))
    forged = DpRound(built.run_id, 2, dp.to_bytes(), rho, epsilon([rho], DELTA), DELTA)
    with MerkleLogStore.open(built.path) as store:
        index = store.append(int(EntryKind.DP_ROUND), encode_entry(forged), round=2)
    with pytest.raises(AuditVerificationError) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert (err.value.index, err.value.check) == (index, "dp-round")


def test_a_round_past_the_runs_budget_is_refused_and_fails_verify(tmp_path: Path) -> None:
    rho = round_rho(dp_round_noise(sample_dp_params()))
    budget = (epsilon([rho] * 2, DELTA) * 1.001, DELTA)  # two rounds fit, a third does not
    built = build_run_log(
        tmp_path / "audit.sqlite", rounds=3, dp=sample_dp_params(), end_run=False,
        dp_budget=budget, dp_until=2,
    )  # fmt: skip
    params = sample_dp_params().to_bytes()
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        with pytest.raises(AuditStateError, match="past its budget"):
            log.append_dp_round(3, dp_params=params)
    finally:
        log.close()
    forged = DpRound(built.run_id, 3, params, rho, epsilon([rho] * 3, DELTA), DELTA)
    with MerkleLogStore.open(built.path) as store:
        index = store.append(int(EntryKind.DP_ROUND), encode_entry(forged), round=3)
    with pytest.raises(AuditVerificationError) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert (err.value.index, err.value.check) == (index, "dp-budget")


def test_show_report_and_verify_state_the_guarantee_in_plain_words(tmp_path: Path) -> None:
    built = _dp_log(tmp_path)
    rho = round_rho(dp_round_noise(sample_dp_params()))
    eps = epsilon([rho] * 3, DELTA)
    words = f"site-level (ε, δ)-DP for the released sums: ε = {eps:.3g} at δ = 1e-06 after 3 rounds"
    shown = runner.invoke(app, ["show", str(built.path)], env={"COLUMNS": "220"})
    assert shown.exit_code == EXIT_OK, shown.output
    assert words in shown.output
    for k in (1, 2, 3):
        assert f"round {k}: ρ = {rho:.4g}, ε so far = {epsilon([rho] * k, DELTA):.4g}" in shown.output
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    verified = runner.invoke(app, ["verify", str(built.path), "--coordinator-key", str(pub)])
    assert verified.exit_code == EXIT_OK, verified.output
    assert words in verified.output
    out = tmp_path / "report.html"
    args = ["report", str(built.path), "--out", str(out), "--coordinator-key", str(pub)]
    assert runner.invoke(app, args).exit_code == EXIT_OK
    assert words in out.read_text()
