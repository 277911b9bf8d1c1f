"""Shared pytest configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# CI runs on a shared 2-core machine: no per-example deadlines, a fixed profile for CI.
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _no_shared_signature_checks_across_tests() -> Iterator[None]:
    """Building a simulated site turns on :func:`fedseal.crypto.signing.share_verified` and
    :func:`fedseal.protocol.memo.share_decoded` for its process; each test starts and ends
    with both off, as a deployed process runs."""
    from fedseal.crypto import signing
    from fedseal.protocol import memo

    signing.share_verified(None)
    memo.share_decoded(None)
    yield
    signing.share_verified(None)
    memo.share_decoded(None)
