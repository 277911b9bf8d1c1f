"""fedseal.privacy: differential-privacy accounting for the published models (docs/dp.md).

Sits above :mod:`fedseal.protocol` (which adds the noise inside the secure sum) and below the
audit log and the adapters (which record and enforce the budget)::

    from fedseal.privacy import Budget, RoundNoise, RoundShape, epsilon, noise_for_target, round_rho

    shape = RoundShape(clip=1.0, granularity=1e-3, dimension=2**20, honest_sites=60)
    noise = noise_for_target(Budget(epsilon=4.0, delta=1e-6), rounds=500, shape=shape)
    rhos = [round_rho(noise)] * 500          # one zCDP rho per committed round, in the log
    assert epsilon(rhos, 1e-6) <= 4.0
"""

from __future__ import annotations

from .accountant import (
    ORDERS,
    Budget,
    Neighbouring,
    RoundNoise,
    RoundShape,
    dp_round_noise,
    epsilon,
    noise_for_target,
    preload,
    privacy_event,
    round_rho,
    tau,
)

__all__ = [
    "ORDERS",
    "Budget",
    "Neighbouring",
    "RoundNoise",
    "RoundShape",
    "dp_round_noise",
    "epsilon",
    "noise_for_target",
    "preload",
    "privacy_event",
    "round_rho",
    "tau",
]
