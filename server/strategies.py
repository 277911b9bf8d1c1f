"""Which Flower strategies can run on top of secure aggregation, and building them.

Usage::

    from fedseal.server.strategies import check_strategy, build_strategy
    check_strategy("FedAdam")                 # fine; "Krum" raises StrategyRefusedError
    strategy = build_strategy("FedAdam", {"eta": 0.05}, min_sites=3)

Secure aggregation reveals only the (weighted) sum of the sites' updates, never an individual
update. Strategies whose aggregation is a weighted mean of the updates, followed by any
server-side optimiser step, work unchanged on that sum: FedAvg, FedAvgM, FedProx, FedAdam,
FedAdagrad, FedYogi. Strategies that must *see* every individual update are refused at
start-up: Krum and MultiKrum (pairwise distances between updates), Bulyan (Krum then a trimmed
mean), FedMedian (coordinate-wise median) and FedTrimmedAvg (coordinate-wise trimmed mean).

This module imports Flower only inside :func:`build_strategy`, so the CLI can check a name
without importing flwr.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedseal.server.errors import CoordinatorError

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

__all__ = [
    "REFUSED_STRATEGIES",
    "SUPPORTED_STRATEGIES",
    "StrategyError",
    "StrategyRefusedError",
    "build_strategy",
    "check_strategy",
]

SUPPORTED_STRATEGIES = ("FedAvg", "FedAvgM", "FedProx", "FedAdam", "FedAdagrad", "FedYogi")

REFUSED_STRATEGIES: dict[str, str] = {
    "Krum": "Krum scores each update by its distances to the other individual updates",
    "MultiKrum": "MultiKrum scores each update by its distances to the other individual updates",
    "Bulyan": "Bulyan runs Krum and a trimmed mean over the individual updates",
    "FedMedian": "FedMedian takes the coordinate-wise median of the individual updates",
    "FedTrimmedAvg": "FedTrimmedAvg trims the extreme individual values per coordinate",
}


class StrategyError(CoordinatorError):
    """A strategy name or option cannot be used.

    Attributes:
        strategy: The strategy name as configured.
        reason: Why.
    """

    def __init__(self, strategy: str, reason: str) -> None:
        super().__init__(f"strategy {strategy!r}: {reason}")
        self.strategy = strategy
        self.reason = reason


class StrategyRefusedError(StrategyError):
    """The strategy needs individual updates, which secure aggregation hides by design."""


def check_strategy(name: str) -> None:
    """Accept a supported strategy name; refuse the rest with an explanation.

    Raises:
        StrategyRefusedError: For a robust-aggregation strategy that needs individual updates.
        StrategyError: For a name that is not a known Flower strategy.
    """
    if name in SUPPORTED_STRATEGIES:
        return
    if name in REFUSED_STRATEGIES:
        raise StrategyRefusedError(
            name,
            f"{REFUSED_STRATEGIES[name]}, but secure aggregation reveals only the weighted "
            "sum of all updates, never an individual one (that is its purpose). Use one of "
            f"{', '.join(SUPPORTED_STRATEGIES)}.",
        )
    raise StrategyError(name, f"unknown strategy; supported: {', '.join(SUPPORTED_STRATEGIES)}")


def build_strategy(name: str, options: Mapping[str, float], *, min_sites: int) -> Strategy:
    """Instantiate a supported ``flwr.serverapp.strategy`` class.

    ``options`` are passed as keyword arguments (e.g. ``server_momentum`` for FedAvgM,
    ``proximal_mu`` for FedProx, ``eta``/``eta_l``/``tau`` for the FedOpt family).

    Raises:
        StrategyRefusedError: See :func:`check_strategy`.
        StrategyError: Unknown name, or an option the strategy does not accept.
    """
    check_strategy(name)
    from flwr.serverapp import strategy as flwr_strategy

    cls = getattr(flwr_strategy, name)
    try:
        return cls(  # type: ignore[no-any-return]
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
            **dict(options),
        )
    except TypeError as exc:
        raise StrategyError(name, f"bad strategy_options: {exc}") from exc
