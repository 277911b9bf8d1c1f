"""The site's privacy ledger: charges, ε, idempotence, the budget, corruption and SIGKILL."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import select
import signal
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.client.errors import SiteError
from fedseal.client.privacy_ledger import (
    LEDGER_FILE,
    BudgetExceededError,
    Charge,
    LedgerCorruptError,
    PrivacyLedger,
    dp_round_noise,
    params_digest,
)
from fedseal.privacy import Budget, RoundNoise, RoundShape, epsilon, round_rho
from fedseal.protocol.dp import DpParams

DIGEST = "ab" * 32
OTHER = "cd" * 32
DELTA = 1e-6


def _ledger(path: Path) -> PrivacyLedger:
    return PrivacyLedger(path, clock=lambda: 1_700_000_000.0)


def _dp(stddev: float = 2000.0, survivors: int = 10, colluding: int = 3) -> DpParams:
    return DpParams(
        dimension=1024, clip=1.0, gamma=1e-3, local_stddev=stddev, beta=math.exp(-0.5),
        modulus_bits=32, min_survivors=survivors, colluding_sites=colluding,
    )


# -- charges and ε --------------------------------------------------------------------------------


def test_an_empty_or_missing_ledger_has_spent_nothing(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "state")
    assert ledger.charges() == ()
    assert ledger.spent(DELTA) == 0.0
    assert ledger.runs(DELTA) == []


def test_spent_is_the_accountants_epsilon_over_every_charged_rho_of_every_run(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    rhos = {("run-a", 0): 1e-3, ("run-a", 1): 2e-3, ("run-b", 0): 5e-4}
    for (run, rnd), rho in rhos.items():
        ledger.charge(run, rnd, rho, DIGEST)
    assert ledger.spent(DELTA) == epsilon(list(rhos.values()), DELTA)
    assert ledger.spent(DELTA, "run-a") == epsilon([1e-3, 2e-3], DELTA)
    runs = {r.run_id: r for r in ledger.runs(DELTA)}
    assert runs["run-a"].rounds == (0, 1) and runs["run-b"].rounds == (0,)
    assert runs["run-b"].epsilon == epsilon([5e-4], DELTA)
    # Composition across runs: more than either run alone, less than the sum of their ε.
    assert max(r.epsilon for r in runs.values()) < ledger.spent(DELTA) < sum(
        r.epsilon for r in runs.values()
    )


def test_a_charge_records_run_round_rho_time_and_digest_and_survives_reopening(tmp_path: Path) -> None:
    charge = _ledger(tmp_path).charge(bytes.fromhex("01" * 16), 7, 1e-3, bytes.fromhex(DIGEST))
    assert charge == Charge("01" * 16, 7, 1e-3, 1_700_000_000.0, (DIGEST,))
    assert PrivacyLedger(tmp_path).charges() == (charge,)
    assert (tmp_path / LEDGER_FILE).stat().st_mode & 0o777 == 0o600


def test_a_round_is_charged_the_accountants_rho_of_its_dp_parameters(tmp_path: Path) -> None:
    dp = _dp()
    charge = _ledger(tmp_path).charge_round("run", 0, dp)
    shape = RoundShape(clip=1.0, granularity=1e-3, dimension=1024, honest_sites=7)
    assert charge.rho == round_rho(RoundNoise(shape, 2000.0))
    assert charge.params == (hashlib.sha256(dp.to_bytes()).hexdigest(),) == (params_digest(dp),)


def test_the_site_counts_only_the_honest_survivors_it_believes_in() -> None:
    dp = _dp()
    assert dp_round_noise(dp).shape.honest_sites == 7
    assert dp_round_noise(dp, honest_sites=5).shape.honest_sites == 5
    assert dp_round_noise(dp, honest_sites=9).shape.honest_sites == 7  # never more than dp says
    assert round_rho(dp_round_noise(dp, honest_sites=5)) > round_rho(dp_round_noise(dp))


def test_a_round_without_noise_is_never_charged(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    with pytest.raises(SiteError, match="without noise"):
        ledger.charge_round("run", 0, _dp(stddev=0.0))
    for rho in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rho"):
            ledger.charge("run", 0, rho, DIGEST)
    assert ledger.charges() == ()


# -- idempotence ----------------------------------------------------------------------------------


def test_charging_the_same_run_and_round_again_charges_nothing_more(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    first = ledger.charge("run", 3, 1e-3, DIGEST)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    assert ledger.charge("run", 3, 1e-3, DIGEST) == first  # a retried round
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # nothing written
    assert ledger.rhos() == [1e-3]


def test_a_second_charge_of_a_round_with_other_parameters_keeps_the_larger_rho_once(tmp_path: Path) -> None:
    # A re-setup attempt of the same round: the guard lets the site mask one input per round,
    # so the round costs at most the larger rho, counted once.
    ledger = _ledger(tmp_path)
    ledger.charge("run", 0, 1e-3, DIGEST)
    ledger.charge("run", 0, 4e-3, OTHER)
    assert ledger.charges() == (Charge("run", 0, 4e-3, 1_700_000_000.0, (DIGEST, OTHER)),)
    ledger.charge("run", 0, 2e-3, DIGEST)
    assert ledger.rhos() == [4e-3]


charge_ops = st.lists(
    st.tuples(
        st.sampled_from(["run-a", "run-b"]),
        st.integers(0, 4),
        st.floats(1e-6, 1.0, allow_nan=False),
        st.sampled_from([DIGEST, OTHER]),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(charge_ops)
def test_any_sequence_of_charges_holds_one_entry_per_round_at_its_largest_rho(
    ops: list[tuple[str, int, float, str]],
) -> None:
    model: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ledger = _ledger(Path(tmp))
        for run, rnd, rho, digest in ops:
            ledger.charge(run, rnd, rho, digest)
            model[(run, rnd)] = max(model.get((run, rnd), 0.0), rho)
        reopened = PrivacyLedger(Path(tmp))
        assert {(c.run_id, c.round): c.rho for c in reopened.charges()} == model
        assert reopened.spent(DELTA) == epsilon(list(model.values()), DELTA)


# -- the budget -----------------------------------------------------------------------------------


def test_a_round_that_would_break_the_budget_is_refused_and_not_charged(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    budget = Budget(epsilon=1.0, delta=DELTA)
    rho = 2e-3  # ε(k rounds) crosses 1 after a handful of rounds
    charged = 0
    while not ledger.would_exceed(rho, budget):
        ledger.charge("run", charged, rho, DIGEST, budget=budget)
        charged += 1
    assert 0 < charged < 100
    assert epsilon([rho] * charged, DELTA) <= 1.0 < epsilon([rho] * (charged + 1), DELTA)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(BudgetExceededError, match="epsilon_budget") as info:
        ledger.charge("run", charged, rho, DIGEST, budget=budget)
    assert info.value.after > 1.0 >= info.value.spent
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    # Runs share the budget: a new run is refused too.
    with pytest.raises(BudgetExceededError):
        ledger.charge("another-run", 0, rho, DIGEST, budget=budget)
    # A retry of a round already paid for goes through: it costs nothing more.
    assert ledger.charge("run", charged - 1, rho, DIGEST, budget=budget).round == charged - 1


def test_raising_a_rounds_charge_is_checked_against_the_budget(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    budget = Budget(epsilon=1.0, delta=DELTA)
    ledger.charge("run", 0, 1e-3, DIGEST, budget=budget)
    with pytest.raises(BudgetExceededError):
        ledger.charge("run", 0, 1.0, OTHER, budget=budget)
    assert ledger.rhos() == [1e-3]


# -- corruption -----------------------------------------------------------------------------------


def _charged(tmp_path: Path) -> tuple[PrivacyLedger, bytes]:
    ledger = _ledger(tmp_path)
    for rnd in range(3):
        ledger.charge("run", rnd, 1e-3 * (rnd + 1), DIGEST)
    return ledger, (tmp_path / LEDGER_FILE).read_bytes()


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -3, -1])
def test_a_truncated_ledger_is_a_clear_error_not_zero_spent(tmp_path: Path, cut: float) -> None:
    ledger, raw = _charged(tmp_path)
    end = int(len(raw) * cut) if isinstance(cut, float) else cut
    (tmp_path / LEDGER_FILE).write_bytes(raw[:end])
    # -1 cuts only the final newline: still the same document and checksum.
    if cut == -1:
        assert len(ledger.charges()) == 3
        return
    for use in (ledger.charges, lambda: ledger.spent(DELTA)):
        with pytest.raises(LedgerCorruptError, match="restore it from a backup"):
            use()
    with pytest.raises(LedgerCorruptError):
        ledger.charge("run", 9, 1e-3, DIGEST)
    assert (tmp_path / LEDGER_FILE).read_bytes() == raw[:end]  # left as it was


def test_an_edited_ledger_fails_its_checksum(tmp_path: Path) -> None:
    ledger, raw = _charged(tmp_path)
    doc = json.loads(raw)
    doc["charges"][1]["rho"] = 1e-9  # someone "refunds" a round
    (tmp_path / LEDGER_FILE).write_text(json.dumps(doc))
    with pytest.raises(LedgerCorruptError, match="checksum"):
        ledger.charges()


@pytest.mark.parametrize(
    "text",
    ["garbage", "[]", '{"format": "x", "charges": [], "sha256": ""}', "\xff\xfe", "NaN"],
)
def test_a_ledger_that_is_not_one_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / LEDGER_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(LedgerCorruptError):
        PrivacyLedger(tmp_path).charges()


def test_a_ledger_repeating_a_round_is_refused_even_with_a_matching_checksum(tmp_path: Path) -> None:
    entry = {"run": "r", "round": 0, "rho": 1e-3, "time": 1.0, "params": [DIGEST]}
    body = {"format": "fedseal/privacy-ledger/v1", "charges": [entry, entry]}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["sha256"] = hashlib.sha256(canon.encode()).hexdigest()
    (tmp_path / LEDGER_FILE).write_text(json.dumps(body))
    with pytest.raises(LedgerCorruptError, match="repeats"):
        PrivacyLedger(tmp_path).charges()


# -- SIGKILL --------------------------------------------------------------------------------------


def _rho_of(rnd: int) -> float:
    return 1e-4 * (1 + rnd % 7)


def _charge_forever(state: Path, write_fd: int) -> None:
    """The child: charge rounds from where the ledger stands, each twice (a retry), acking."""
    ledger = PrivacyLedger(state)
    rnd = len(ledger.charges())
    while True:
        ledger.charge("run", rnd, _rho_of(rnd), DIGEST)
        os.write(write_fd, f"{rnd}\n".encode())
        ledger.charge("run", rnd, _rho_of(rnd), DIGEST)  # retried: must not double-charge
        if rnd:
            ledger.charge("run", rnd - 1, _rho_of(rnd - 1), OTHER)  # a re-setup of the last one
        rnd += 1


def test_a_site_killed_at_any_moment_keeps_a_prefix_of_its_charges_and_never_two(tmp_path: Path) -> None:
    rng = random.Random(17)
    acked = -1
    for _ in range(6):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                os.close(read_fd)
                _charge_forever(tmp_path, write_fd)
            finally:
                os._exit(0)
        os.close(write_fd)
        # Wait for the first ack (the child is charging), then kill at a random moment.
        assert select.select([read_fd], [], [], 30.0)[0], "the child never charged"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd, "rb") as pipe:
            acks = [int(line) for line in pipe.read().split()]
        assert acks and acks[0] == acked + 1
        acked = acks[-1]
        charges = PrivacyLedger(tmp_path).charges()
        rounds = [c.round for c in charges]
        # Every acknowledged charge is on disk; at most the one in flight beyond it.
        assert rounds == list(range(len(rounds))) and acked + 1 <= len(rounds) <= acked + 2
        assert [c.rho for c in charges] == [_rho_of(r) for r in rounds]
        acked = len(rounds) - 1  # the next child resumes after what is on disk
    assert acked >= 5
