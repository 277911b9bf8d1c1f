"""Strategies on top of secure aggregation: weighted means work, robust ones are refused."""

from __future__ import annotations

import pytest

from fedseal.server.strategies import (
    REFUSED_STRATEGIES,
    SUPPORTED_STRATEGIES,
    StrategyError,
    StrategyRefusedError,
    build_strategy,
    check_strategy,
)


@pytest.mark.parametrize("name", sorted(REFUSED_STRATEGIES))
def test_strategies_needing_individual_updates_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(StrategyRefusedError) as info:
        check_strategy(name)
    assert "individual" in str(info.value)
    assert "FedAvg" in str(info.value)


@pytest.mark.parametrize("name", SUPPORTED_STRATEGIES)
def test_every_weighted_mean_strategy_builds_from_flower(name: str) -> None:
    strategy = build_strategy(name, {}, min_sites=3)
    assert type(strategy).__name__ == name
    assert strategy.min_train_nodes == 3


def test_an_unknown_strategy_name_is_an_error_listing_the_supported_ones() -> None:
    with pytest.raises(StrategyError, match="FedYogi"):
        check_strategy("FedMagic")


def test_a_bad_strategy_option_is_reported_not_raised_as_type_error() -> None:
    with pytest.raises(StrategyError, match="strategy_options"):
        build_strategy("FedAvg", {"no_such_option": 1.0}, min_sites=2)


def test_strategy_options_reach_the_flower_strategy() -> None:
    strategy = build_strategy("FedAvgM", {"server_momentum": 0.9}, min_sites=2)
    assert strategy.server_momentum == 0.9  # type: ignore[attr-defined]
