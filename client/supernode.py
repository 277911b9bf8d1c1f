"""``flower-supernode`` with the site's Flower patches installed and their settings read from
the environment.

This launcher runs the unchanged ``flower-supernode`` CLI after
:func:`fedseal.client.flower_patches.install` (one module for every patch of Flower's internals
the site applies, each explained there): the SuperNode loop's idle poll is capped at
``FEDSEAL_SUPERNODE_POLL_S`` seconds (default :data:`fedseal.settings.DEFAULT_POLL_S`; Flower sleeps a
hard-coded 3 s, and every protocol message cost up to that much idle latency: ~20 s of a ~31 s
round in the demo), its waits for the site's own executor at
:data:`fedseal.client.flower_patches.LOCAL_WAIT_S`, and its object pulls start at
``FEDSEAL_OBJECT_PULL_BACKOFF_S`` (default :data:`fedseal.settings.DEFAULT_PULL_BACKOFF_S`,
50 ms; ``1`` gives Flower's first retry after 1 s) instead of Flower's 1 s, capped at
:attr:`fedseal.settings.PullBackoff.cap_s`;
the executor (:mod:`fedseal.client.executor`) and the coordinator's ServerApp pull with the
same setting (the executor, on loopback, caps its retries at 0.1 s). The other patches keep a
site from wedging when the coordinator restarts or a link is cut mid-round. The settings are
read once, with every ``FEDSEAL_*`` variable, by :meth:`fedseal.settings.Environment.read`.

Cost: an idle site issues one small authenticated HTTPS pull per interval (at 0.25 s, 4 per
second per site) instead of one per 3 s.

Run as ``python -m fedseal.client.supernode <flower-supernode arguments>``; a Flower other than
the one the patches were written for, or a bad setting, exits with code 2 and one line.

A Fleet loop that ends exits the process with :data:`EXIT_FLEET_LOOP_ENDED` and one line
(:data:`FLEET_LOOP_ENDED` and why): when its reconnection retries give up ("Giving up
reconnection after 36.77 seconds and 8 tries", e.g. after the fleet port answered something
other than the Fleet API), Flower's SuperNode logs the error and leaves its loop, and its
Runtime API thread then kept the process alive with no loop behind it, so the site looked
connected and never trained again. ``fl-client run`` starts a SuperNode that exited so again
(:mod:`fedseal.client.node`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable

from fedseal.client.flower_patches import LOCAL_WAIT_S, install
from fedseal.settings import Environment, PullBackoff

__all__ = [
    "EXIT_FLEET_LOOP_ENDED",
    "FLEET_LOOP_ENDED",
    "loopback_backoff",
    "main",
    "run_fleet_loop",
]

#: The launcher's exit status when the SuperNode's Fleet loop ended with an exception.
EXIT_FLEET_LOOP_ENDED = 4
#: What the launcher prints before the reason when the Fleet loop ended (read by ``fl-client run``).
FLEET_LOOP_ENDED = "fedseal supernode: the Fleet loop ended: "


def loopback_backoff(backoff: PullBackoff) -> PullBackoff:
    """``backoff`` with its cap lowered to 0.1 s (or the initial wait, if longer).

    For the executor's pulls from its own SuperNode: loopback, no TLS, in-memory state, so
    retrying often is cheap, and the cap is the longest the site may idle after the message's
    objects reached its SuperNode.
    """
    return PullBackoff(
        initial_s=backoff.initial_s, cap_s=max(backoff.initial_s, min(backoff.cap_s, 0.1))
    )


def main() -> None:
    """The launcher's process: its ``FEDSEAL_*`` variables read once, the patches installed,
    then ``flower-supernode``."""
    try:
        environment = Environment.read()
        install(environment.supernode_poll_s, environment.pull_backoff, LOCAL_WAIT_S)
    except (ValueError, RuntimeError) as err:
        print(f"fedseal supernode: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    # The site's supernode.log is a file: timestamps help an operator, colour codes do not.
    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    run_fleet_loop(flower_supernode)


def run_fleet_loop(supernode: Callable[[], None]) -> None:
    """Run ``supernode`` (Flower's SuperNode, in this process's main thread); when it returns or
    raises, print :data:`FLEET_LOOP_ENDED` with the reason in one line, and end the process at
    once with :data:`EXIT_FLEET_LOOP_ENDED`.

    Flower 1.42's Fleet loop never returns while it is connected: its connection context logs
    an error that ends it (``log(ERROR, exc)`` in ``fleet_http_connection``: the retries gave up)
    and returns, and the Runtime API thread (not a daemon) then kept the process alive with no
    loop behind it; hence ``os._exit``. The reason is the last error Flower logged (or the
    exception). Its own exits (``SystemExit``: Flower's exit code 305, a signal) pass unchanged.
    """
    errors = _LastError()
    logging.getLogger("flwr").addHandler(errors)
    try:
        supernode()
        reason = errors.message or "the connection to the coordinator ended"
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        traceback.print_exc(file=sys.stderr)
    print(f"{FLEET_LOOP_ENDED}{reason}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_FLEET_LOOP_ENDED)


class _LastError(logging.Handler):
    """Keeps the first line of the last ERROR record (Flower's logger)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            text = record.getMessage().strip()
            self.message = " ".join(text.splitlines()[0].split())[:300] if text else self.message


if __name__ == "__main__":
    main()
