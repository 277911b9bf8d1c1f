"""The simulation's one error: preparing or running a simulation failed, with the step that
failed (``arguments``, ``prepare data``, ``site ...``, ``simulation engine``, ``ServerApp``).

Raised by every module of the simulation (:mod:`fedseal.sim.simulate`, :mod:`fedseal.sim.sites`,
:mod:`fedseal.sim.engine`); it lives here, below all of them.
"""

from __future__ import annotations

__all__ = ["SimulationError"]


class SimulationError(Exception):
    """Preparing or running a simulation failed (the message names the step)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason

