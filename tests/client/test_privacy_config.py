"""client.toml's differential-privacy keys, how ``policy show`` describes them, and
``fl-client privacy show``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from fedseal.client.config import ClientConfigError, load_client_config
from fedseal.client.policy import SitePrivacy, describe_policy
from fedseal.client.privacy_ledger import LEDGER_FILE, PrivacyLedger
from fedseal.client.training import SiteLimits
from fedseal.privacy import Budget, epsilon

GOOD = """
[site]
name = "site-a"
[coordinator]
superlink = "coord.example:9092"
[data]
dataset_dir = "data"
approved_root = "%s"
""" % ("ab" * 32)

DIGEST = "ab" * 32


def _config(tmp_path: Path, privacy: str = "") -> Path:
    path = tmp_path / "client.toml"
    path.write_text(GOOD + (f"[privacy]\n{privacy}" if privacy else ""))
    return path


def test_dp_is_off_by_default_with_no_budget_and_delta_1e_6(tmp_path: Path) -> None:
    p = load_client_config(_config(tmp_path)).privacy
    assert (p.dp, p.dp_required, p.epsilon_budget, p.delta, p.min_noise_multiplier) == (
        "off", False, None, 1e-6, 0.0,
    )
    assert p.budget() is None


def test_the_dp_keys_are_read(tmp_path: Path) -> None:
    p = load_client_config(
        _config(
            tmp_path,
            'dp = "required"\nepsilon_budget = 4\ndelta = 1e-7\nmin_noise_multiplier = 0.8\n',
        )
    ).privacy
    assert p.dp_required and p.epsilon_budget == 4.0 and isinstance(p.epsilon_budget, float)
    assert (p.delta, p.min_noise_multiplier) == (1e-7, 0.8)
    assert p.budget() == Budget(epsilon=4.0, delta=1e-7)


def test_the_protocol_policy_gets_the_dp_requirement_and_the_noise_floor(tmp_path: Path) -> None:
    p = load_client_config(
        _config(tmp_path, 'dp = "required"\nepsilon_budget = 4\nmin_noise_multiplier = 0.8\n')
    ).privacy
    policy = p.protocol_policy()
    assert (policy.dp_required, policy.min_noise_multiplier) == (True, 0.8)
    assert SitePrivacy().protocol_policy().dp_required is False


def test_a_budget_may_be_set_with_dp_off(tmp_path: Path) -> None:
    p = load_client_config(_config(tmp_path, "epsilon_budget = 2.5\n")).privacy
    assert not p.dp_required and p.budget() == Budget(2.5, 1e-6)


@pytest.mark.parametrize(
    ("privacy", "key", "words"),
    [
        ('dp = "on"\nepsilon_budget = 1.0\n', "privacy.dp", '"required" or "off"'),
        ("dp = true\n", "privacy.dp", "must be str"),
        ('dp = "required"\n', "privacy.epsilon_budget", 'required when dp = "required"'),
        ("epsilon_budget = 0.0\n", "privacy.epsilon_budget", "> 0"),
        ("epsilon_budget = -1\n", "privacy.epsilon_budget", "> 0"),
        ("epsilon_budget = inf\n", "privacy.epsilon_budget", "finite"),
        ("epsilon_budget = nan\n", "privacy.epsilon_budget", "finite"),
        ('epsilon_budget = "4"\n', "privacy.epsilon_budget", "must be float"),
        ("delta = 1e-3\n", "privacy.delta", "(0, 1e-3)"),
        ("delta = 0.0\n", "privacy.delta", "(0, 1e-3)"),
        ("delta = nan\n", "privacy.delta", "(0, 1e-3)"),
        ("min_noise_multiplier = -0.1\n", "privacy.min_noise_multiplier", ">= 0"),
        ("min_noise_multiplier = inf\n", "privacy.min_noise_multiplier", "finite"),
        ("dp_epsilon = 1.0\n", "privacy.dp_epsilon", "unknown key"),
    ],
)
def test_a_bad_dp_value_fails_naming_the_key(tmp_path: Path, privacy: str, key: str, words: str) -> None:
    with pytest.raises(ClientConfigError) as info:
        load_client_config(_config(tmp_path, privacy))
    assert info.value.key == key
    assert words in info.value.reason, info.value.reason


def _dp_line(privacy: SitePrivacy) -> str:
    lines = list(describe_policy(privacy, SiteLimits(), {}, commitments="checked"))
    (line,) = [x for x in lines if x.startswith("differential privacy")]
    return line


def test_policy_show_describes_dp_its_budget_and_its_noise_floor() -> None:
    required = _dp_line(
        SitePrivacy(dp="required", epsilon_budget=4.0, delta=1e-7, min_noise_multiplier=0.8)
    )
    assert "REQUIRED" in required and "refused" in required
    assert "budget epsilon 4 at delta 1e-07 over all runs" in required
    assert "noise multiplier over honest survivors >= 0.8" in required
    off = _dp_line(SitePrivacy())
    assert 'off (dp = "off"' in off and "no epsilon budget set" in off


# -- fl-client privacy show -----------------------------------------------------------------------


def _privacy_show(path: Path) -> Result:
    from fedseal.client.cli import app

    return CliRunner().invoke(app, ["privacy", "show", "--config", str(path)])


def test_privacy_show_prints_each_run_the_total_and_the_budget_left(tmp_path: Path) -> None:
    path = _config(tmp_path, 'dp = "required"\nepsilon_budget = 4\n')
    ledger = PrivacyLedger(tmp_path / "state")
    for rnd in (0, 1, 2, 5):
        ledger.charge("run-one", rnd, 1e-3, DIGEST)
    ledger.charge("run-two", 0, 2e-3, DIGEST)
    result = _privacy_show(path)
    assert result.exit_code == 0, result.output
    out: str = result.output
    total = epsilon([1e-3] * 4 + [2e-3], 1e-6)
    assert f"privacy ledger {tmp_path / 'state' / LEDGER_FILE}" in out
    assert "differential privacy: required" in out
    assert f"run run-one: 4 DP rounds (rounds 0-2, 5), epsilon {epsilon([1e-3] * 4, 1e-6):.4g}" in out
    assert f"run run-two: 1 DP round (round 0), epsilon {epsilon([2e-3], 1e-6):.4g}" in out
    assert f"all runs together: 5 DP rounds in 2 runs, epsilon {total:.4g} spent at delta 1e-06" in out
    assert f"budget: epsilon 4 at delta 1e-06 over all runs: {4 - total:.4g} left" in out


def test_privacy_show_of_a_new_site_says_nothing_is_spent(tmp_path: Path) -> None:
    result = _privacy_show(_config(tmp_path))
    assert result.exit_code == 0, result.output
    out: str = result.output
    assert "no DP round charged yet: epsilon 0 spent" in out
    assert "budget: none set" in out


def test_privacy_show_says_when_the_budget_is_exceeded(tmp_path: Path) -> None:
    path = _config(tmp_path, "epsilon_budget = 0.1\n")
    PrivacyLedger(tmp_path / "state").charge("run", 0, 1.0, DIGEST)
    result = _privacy_show(path)
    assert result.exit_code == 0
    assert "EXCEEDED" in result.output


def test_privacy_show_fails_on_a_corrupt_ledger_and_on_a_bad_config(tmp_path: Path) -> None:
    path = _config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / LEDGER_FILE).write_text('{"format": "fedseal/privacy-ledger/v1"')
    result = _privacy_show(path)
    assert result.exit_code == 1
    assert "unreadable" in result.output and "restore it" in result.output
    bad = _config(tmp_path, 'dp = "maybe"\n')
    result = _privacy_show(bad)
    assert result.exit_code == 2
    assert "privacy.dp" in result.output
