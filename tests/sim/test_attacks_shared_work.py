"""Every attack of test_attacks again, with the work a simulation process shares handed to every
site (signature checks, decoded messages, neighbour graphs): each is still caught the same way."""

from __future__ import annotations

from typing import Any

import pytest

from fedseal.sim.inmemory import Federation
from fedseal.sim.shared_work import SharedWork
from tests.protocol.test_attacks import *  # noqa: F403  (the attack tests, collected here again)


@pytest.fixture(autouse=True)
def _shared_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each federation a test builds gives its sites one SharedWork (one per test: a process)."""
    work = SharedWork()
    real = Federation.__init__

    def init(self: Federation, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("shared", work)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Federation, "__init__", init)
