"""Test harness only: skew this Python process's wall clock by ``FEDSEAL_CLOCK_SKEW_S`` seconds.

The multi-host test (``deploy/netns/run_netns_test.sh``) puts this directory on ``PYTHONPATH``
of one site, so that site and its SuperNode child read a wall clock that is off by the given
seconds, as on a host whose NTP is wrong: ``time.time``, ``time.time_ns`` and
``datetime.datetime.now/utcnow/today`` (what Flower's signed request timestamps, fedseal's
protocol expiry and audit requests use). ``time.monotonic`` and sleeps are untouched, as they are
on such a host. Why not libfaketime: with it, CPython's timed waits either hang (faked
CLOCK_MONOTONIC: ``threading.Event.wait``) or fail with EINVAL (``FAKETIME_DONT_FAKE_MONOTONIC``:
``time.sleep``), so the site would break for reasons a skewed host does not have. Not skewed:
OpenSSL's own certificate-validity clock (the harness's certificates are back-dated an hour).
"""

from __future__ import annotations

import datetime as _datetime
import os
import time as _time

_SKEW = float(os.environ.get("FEDSEAL_CLOCK_SKEW_S", "0") or 0)

if _SKEW:
    _real_time, _real_time_ns = _time.time, _time.time_ns

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    def _skewed_time_ns() -> int:
        return _real_time_ns() + int(_SKEW * 1_000_000_000)

    _time.time = _skewed_time
    _time.time_ns = _skewed_time_ns

    class _SkewedDatetime(_datetime.datetime):
        @classmethod
        def now(cls, tz: _datetime.tzinfo | None = None) -> _datetime.datetime:  # type: ignore[override]
            return _datetime.datetime.fromtimestamp(_skewed_time(), tz)

        @classmethod
        def utcnow(cls) -> _datetime.datetime:  # type: ignore[override]
            return _datetime.datetime.fromtimestamp(_skewed_time(), _datetime.UTC).replace(tzinfo=None)

        @classmethod
        def today(cls) -> _datetime.datetime:  # type: ignore[override]
            return _datetime.datetime.fromtimestamp(_skewed_time())

    _datetime.datetime = _SkewedDatetime  # type: ignore[misc]
