"""Every attack of test_attacks again, with the work a simulation process shares turned on
(signature checks, decoded messages, neighbour graphs): each is still caught the same way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedseal.crypto import signing
from fedseal.protocol import memo
from tests.protocol.test_attacks import *  # noqa: F403  (the attack tests, collected here again)


@pytest.fixture(autouse=True)
def _shared_work() -> Iterator[None]:
    signing.share_verified()
    memo.share_decoded()
    yield  # tests/conftest.py turns both off again
