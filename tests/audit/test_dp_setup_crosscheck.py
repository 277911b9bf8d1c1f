"""``fl-audit verify`` matches each DP round's logged accounting against the round's signed
setup: the DP parameters the sites saw, bound by the setup digest in every masked input they
signed. Each attack is a log its own coordinator rewrote and re-signed with its real key (so
hashes, tree heads and signatures all hold): only the cross-check can catch it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import EXIT_FAILED, app
from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    AuditEntry,
    DpRound,
    EnvelopeRecord,
    RoundRecord,
    RunStart,
)
from fedseal.audit.errors import AuditStateError, AuditVerificationError
from fedseal.audit.rules import SETUP_MESSAGE_TYPE
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import key_id, save_public_key
from fedseal.crypto.signing import sign
from fedseal.protocol.config import Limits
from fedseal.protocol.dp import DpParams
from fedseal.protocol.envelope import Envelope, seal
from fedseal.protocol.messages import MaskedInput, RoundSetup, decode_payload
from fedseal.protocol.types import MessageKind
from tests.audit.logbuilder import (
    CLOCK0,
    BuiltLog,
    build_run_log,
    digest,
    log_setup,
    masked_input_payload,
    rewrite_log,
    round_setup,
    sample_dp_params,
)

runner = CliRunner()
DELTA = 1e-6
LIMITS = Limits()
Rewrite = Callable[[AuditEntry], list[AuditEntry]]


def _dp_log(tmp_path: Path, **kw: object) -> BuiltLog:
    return build_run_log(
        tmp_path / "audit.sqlite", rounds=3, dp=sample_dp_params(), dp_budget=(50.0, DELTA),
        revoke_last_after_round=None, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _verify_fails(built: BuiltLog, path: Path) -> AuditVerificationError:
    with pytest.raises(AuditVerificationError) as err:
        verify_log(path, coordinator_key=built.coordinator.public_key())
    return err.value


def _replace_dp(rnd: int, params: DpParams) -> Rewrite:
    def change(entry: AuditEntry) -> list[AuditEntry]:
        if isinstance(entry, DpRound) and entry.round == rnd:
            return [dataclasses.replace(entry, dp_params=params.to_bytes())]
        return [entry]

    return change


def _setup_of(entry: EnvelopeRecord) -> RoundSetup:
    setup = decode_payload(MessageKind.ROUND_SETUP, entry.payload, LIMITS)
    assert isinstance(setup, RoundSetup)
    return setup


def _resetup(built: BuiltLog, rnd: int, make: Callable[[RoundSetup], RoundSetup]) -> Rewrite:
    """Round ``rnd`` re-run under another setup: the coordinator's new signed setup, and the
    sites' masked inputs re-signed (with their own keys) binding its digest."""
    bound: list[bytes] = []
    inputs: list[bytes] = []

    def change(entry: AuditEntry) -> list[AuditEntry]:
        if isinstance(entry, RoundRecord) and entry.round == rnd:
            return [dataclasses.replace(entry, accepted_input_digests=tuple(sorted(inputs)))]
        if not isinstance(entry, EnvelopeRecord) or entry.round != rnd or not entry.accepted:
            return [entry]
        if entry.message_type == SETUP_MESSAGE_TYPE:
            setup = make(_setup_of(entry))
            bound.append(setup.digest)
            env = Envelope.from_bytes(seal(setup, built.coordinator), LIMITS)
            return [dataclasses.replace(entry, payload=env.payload, signature=env.signature)]
        if entry.message_type == INPUT_MESSAGE_TYPE:
            old = decode_payload(MessageKind.MASKED_INPUT, entry.payload, LIMITS)
            assert isinstance(old, MaskedInput) and entry.bulk_digest and entry.dataset_root
            payload = masked_input_payload(
                built.run_id, rnd, entry.site, old.header.model_digest, entry.dataset_root,
                old.example_count, entry.bulk_digest, bound[-1],
            )  # fmt: skip
            signature = sign(built.sites[entry.site], INPUT_MESSAGE_TYPE, payload)
            new = dataclasses.replace(entry, payload=payload, signature=signature)
            inputs.append(new.content_digest)
            return [new]
        return [entry]

    return change


def test_an_honest_dp_log_with_its_setups_verifies(tmp_path: Path) -> None:
    built = _dp_log(tmp_path)
    result = verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert result.dp_runs[0][1] == 3
    # The rewrite helper itself changes nothing a verifier could object to.
    same = rewrite_log(built, tmp_path / "same.sqlite", lambda e: [e])
    assert verify_log(same, coordinator_key=built.coordinator.public_key()).root_hash == (
        result.root_hash
    )


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_accounting_that_names_other_noise_than_the_signed_setup_fails_naming_the_round(
    tmp_path: Path, factor: float
) -> None:
    # factor 2: the coordinator logs more noise than the sites added (to look more private);
    # factor 0.5: less (the accounting would then be needlessly pessimistic, still a lie).
    built = _dp_log(tmp_path)
    dp = sample_dp_params()
    claimed = dataclasses.replace(dp, local_stddev=dp.local_stddev * factor)
    forged = rewrite_log(built, tmp_path / "forged.sqlite", _replace_dp(2, claimed))
    err = _verify_fails(built, forged)
    assert (err.check, err.entry_type) == ("dp-setup", "dp-round")
    assert "round 2's DP accounting names other DP parameters than its signed setup" in str(err)
    assert "local_stddev" in str(err)
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    cli = runner.invoke(app, ["verify", str(forged), "--coordinator-key", str(pub)])
    assert cli.exit_code == EXIT_FAILED and "round 2" in cli.output


def test_a_dp_round_logged_without_its_accounting_fails_naming_the_round(tmp_path: Path) -> None:
    built = _dp_log(tmp_path)
    dropped = rewrite_log(
        built, tmp_path / "dropped.sqlite",
        lambda e: [] if isinstance(e, DpRound) and e.round == 2 else [e],
    )  # fmt: skip
    err = _verify_fails(built, dropped)
    assert (err.check, err.entry_type) == ("dp-round", "round-result")
    assert "round 2 of a DP run completed without its DP accounting entry" in str(err)


def test_a_round_whose_sites_signed_a_setup_without_dp_fails_even_with_its_accounting(
    tmp_path: Path,
) -> None:
    # The coordinator ran round 2 without noise (sites with dp = "off" take such a setup)
    # and logged the usual accounting entry for it.
    built = _dp_log(tmp_path)
    plain = _resetup(
        built, 2, lambda s: dataclasses.replace(
            s, params=dataclasses.replace(s.params, dp=None, rotation_seed=b"")
        ),
    )  # fmt: skip
    err = _verify_fails(built, rewrite_log(built, tmp_path / "plain.sqlite", plain))
    assert (err.check, err.entry_type) == ("dp-setup", "round-result")
    assert "round 2 of a DP run released a sum whose setup carries no DP parameters" in str(err)


def test_a_round_whose_setup_is_not_in_the_log_fails(tmp_path: Path) -> None:
    built = _dp_log(tmp_path)
    hidden = rewrite_log(
        built, tmp_path / "hidden.sqlite",
        lambda e: [] if isinstance(e, EnvelopeRecord) and e.message_type == SETUP_MESSAGE_TYPE
        and e.round == 3 else [e],
    )  # fmt: skip
    err = _verify_fails(built, hidden)
    assert err.check == "dp-setup" and "round 3 of a DP run: its inputs bind a setup" in str(err)


def test_a_setup_with_dp_in_a_run_without_a_dp_budget_fails(tmp_path: Path) -> None:
    # A run logged as non-DP whose round 1 summed DP inputs: its privacy loss is unaccounted.
    built = _dp_log(tmp_path)

    def no_budget(entry: AuditEntry) -> list[AuditEntry]:
        if isinstance(entry, RunStart):
            return [dataclasses.replace(entry, dp_budget=None)]
        return [] if isinstance(entry, DpRound) else [entry]

    err = _verify_fails(built, rewrite_log(built, tmp_path / "nobudget.sqlite", no_budget))
    assert err.check == "dp-setup" and "round 1's setup carries DP parameters" in str(err)


def test_a_setup_with_another_rotation_seed_fails_at_the_setup(tmp_path: Path) -> None:
    built = _dp_log(tmp_path)
    seeded = _resetup(
        built, 2, lambda s: dataclasses.replace(
            s, params=dataclasses.replace(s.params, rotation_seed=bytes(32))
        ),
    )  # fmt: skip
    err = _verify_fails(built, rewrite_log(built, tmp_path / "seed.sqlite", seeded))
    assert (err.check, err.entry_type) == ("dp-setup", "envelope")
    assert "round 2's setup carries another rotation seed" in str(err)


def test_with_two_setup_attempts_the_accounting_must_match_the_one_the_inputs_bind(
    tmp_path: Path,
) -> None:
    built = _dp_log(tmp_path, restart_round=2)
    verify_log(built.path, coordinator_key=built.coordinator.public_key())
    # Logging the first attempt's (different) parameters instead fails.
    first_attempt = rewrite_log(
        built, tmp_path / "first.sqlite", _replace_dp(2, sample_dp_params(5.0))
    )
    err = _verify_fails(built, first_attempt)
    assert err.check == "dp-setup" and "round 2's DP accounting names other" in str(err)


def test_the_log_refuses_accounting_or_setups_the_verifier_would_reject(tmp_path: Path) -> None:
    built = build_run_log(
        tmp_path / "audit.sqlite", rounds=2, dp=sample_dp_params(), dp_budget=(50.0, DELTA),
        revoke_last_after_round=None, end_run=False,
    )  # fmt: skip
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        # Round 3, live: its setup, the sites' inputs binding it, its result.
        model = built.models[-1]
        setup = round_setup(built.run_id, 3, model, dict(built.sites), sample_dp_params())
        log_setup(log, setup, built.coordinator)
        for i, (site, key) in enumerate(sorted(built.sites.items())):
            bulk, root = digest("bulk", site, 3), built.roots[site]
            payload = masked_input_payload(
                built.run_id, 3, site, model, root, 1 + i, bulk, setup.digest
            )
            log.append_envelope(
                INPUT_MESSAGE_TYPE, payload, sign(key, INPUT_MESSAGE_TYPE, payload),
                bytes(key_id(key.public_key())), accepted=True, reason=None, site=site, round=3,
                stage="masked_input", dataset_root=root, bulk_digest=bulk, num_examples=1 + i,
                model_digest=model,
            )  # fmt: skip
        log.append_round_result(
            3, aggregate_digest=digest("aggregate", 3), new_model_digest=digest("model", 3)
        )
        log.sign_tree_head(CLOCK0 + 10**6)
        other = dataclasses.replace(sample_dp_params(), local_stddev=1e9)
        with pytest.raises(AuditStateError, match="other DP parameters than its signed setup"):
            log.append_dp_round(3, dp_params=other.to_bytes())
        log.append_dp_round(3, dp_params=sample_dp_params().to_bytes())
        active = dict(built.sites)
        model = digest("model", 3)
        bad_seed = round_setup(
            built.run_id, 4, model, active, sample_dp_params(), rotation_seed=bytes(32)
        )
        with pytest.raises(AuditStateError, match="another rotation seed"):
            log_setup(log, bad_seed, built.coordinator)
        # A setup "from" a site key is not the coordinator's.
        good = round_setup(built.run_id, 4, model, active, sample_dp_params())
        site_signed = Envelope.from_bytes(seal(good, built.sites[min(built.sites)]), LIMITS)
        with pytest.raises(AuditStateError, match="not recorded as the coordinator's own"):
            log.append_envelope(
                SETUP_MESSAGE_TYPE, site_signed.payload, site_signed.signature,
                site_signed.signer, accepted=True, reason=None, site="", round=4, stage="setup",
            )  # fmt: skip
        log_setup(log, good, built.coordinator)
    finally:
        log.close()
