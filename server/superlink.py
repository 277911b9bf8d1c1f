"""``flower-superlink`` with its per-request state clean-up throttled.

Usage (what :mod:`fedseal.server.deploy` runs)::

    python -m fedseal.server.superlink --host 127.0.0.1 --port 9091 --database state/superlink.db ...

Why. With ``--database`` (which ``fl-server run --resume`` needs: runs and registered sites
survive a restart) Flower 1.42's SuperLink keeps its state in SQLite, and
``SqlCoreState._cleanup_expired_task_tokens`` runs two ``UPDATE ... RETURNING`` statements and
a commit at the start of *every* ``get_run_status`` and ``get_runs`` call. ``get_run_status``
runs on every Fleet and Runtime object push and pull (``check_abort``), so a single message
costs a dozen clean-ups; profiled in the demo (3 sites, 2 cores) the clean-up was the largest
single item of the SuperLink's CPU time (about a tenth), and the SuperLink is the busiest
process of a deployment. Its only job is to expire task claims whose heartbeat stopped, with
heartbeat deadlines of tens of seconds; running it at most once per
``FEDSEAL_SUPERLINK_CLEANUP_S`` seconds (default :data:`DEFAULT_CLEANUP_S`) delays such an
expiry by at most that long and changes nothing else: an expired task still records the
deadline it missed (``finished_at = active_until``), not the time of the clean-up.

Everything else is the unchanged ``flower-superlink`` CLI (TLS, ``--enable-supernode-auth``,
the database). The patch targets a pinned Flower (``flwr==1.42.*``): :func:`install` raises
a clear error if the method it throttles is gone, so an upgrade fails loudly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["DEFAULT_CLEANUP_S", "ENV_CLEANUP", "cleanup_interval", "install", "throttled"]

ENV_CLEANUP = "FEDSEAL_SUPERLINK_CLEANUP_S"
DEFAULT_CLEANUP_S = 1.0
_PATCHED_CLASS = "flwr.supercore.corestate.sql_corestate:SqlCoreState"
_PATCHED_METHOD = "_cleanup_expired_task_tokens"


def cleanup_interval(env: Mapping[str, str] = os.environ) -> float:
    """The configured minimum seconds between two clean-ups (0 = every call, as Flower does).

    Raises:
        ValueError: ``FEDSEAL_SUPERLINK_CLEANUP_S`` is not a number of seconds between 0 and 10.
    """
    from fedseal.server.config import env_seconds

    return env_seconds(env, ENV_CLEANUP, DEFAULT_CLEANUP_S, 0.0, 10.0)


def throttled(
    method: Callable[[Any], None], interval_s: float, clock: Callable[[], float] = time.monotonic
) -> Callable[[Any], None]:
    """``method`` (taking only ``self``) run at most once per ``interval_s`` seconds per object.

    A call inside the interval returns at once. The first call on each object runs; a call
    that raises still counts as run (the next one comes after the interval).
    """
    last: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def run_if_due(self: Any) -> None:
        now = clock()
        with lock:
            previous = last.get(self)
            if previous is not None and now - previous < interval_s:
                return
            last[self] = now
        method(self)

    run_if_due.__wrapped__ = method  # type: ignore[attr-defined]
    return run_if_due


def install(interval_s: float) -> None:
    """Throttle the SuperLink's SQL state clean-up to once per ``interval_s`` (0: unchanged).

    Raises:
        RuntimeError: The installed Flower has no such method (not ``flwr==1.42.*``).
    """
    import importlib

    module_name, cls_name = _PATCHED_CLASS.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    method = getattr(cls, _PATCHED_METHOD, None) if cls is not None else None
    if not callable(method):
        raise RuntimeError(
            f"{_PATCHED_CLASS} has no {_PATCHED_METHOD}: this Flower version is not the one "
            "fedseal's SuperLink launcher was written for (flwr==1.42.*)"
        )
    if interval_s > 0:
        setattr(cls, _PATCHED_METHOD, throttled(getattr(method, "__wrapped__", method), interval_s))


def main() -> None:
    """Run ``flower-superlink`` with the clean-up throttled (arguments as for Flower's CLI)."""
    try:
        install(cleanup_interval())
    except (ValueError, RuntimeError) as err:
        print(f"fedseal superlink: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
